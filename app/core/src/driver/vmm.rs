//! The `vmm` driver: our own `berth-vmm`.

use std::process::Stdio;

use super::{Driver, DriverError, Machine, MachineSpec};
use crate::paths::helper_binary;

pub(super) async fn launch(spec: &MachineSpec) -> Result<Machine, DriverError> {
    let vmm = helper_binary("berth-vmm", "BERTH_VMM")?;
    let st = &spec.state;
    for s in [st.vsock_sock(), st.vmm_sock()] {
        let _ = std::fs::remove_file(s);
    }
    let log = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(st.host_agent_log())
        .map_err(|source| DriverError::Spawn {
            what: "the log file",
            source,
        })?;
    let log2 = log.try_clone().map_err(|source| DriverError::Spawn {
        what: "the log file",
        source,
    })?;
    let main = tokio::process::Command::new(vmm)
        .arg("run")
        .arg("--kernel")
        .arg(&spec.image.kernel)
        .arg("--rootfs")
        .arg(&spec.image.rootfs)
        .arg("--data-disk")
        .arg(st.data_disk())
        .arg("--cpus")
        .arg(spec.cpus.to_string())
        .arg("--memory")
        .arg(spec.memory_mib.to_string())
        .arg("--console-log")
        .arg(st.console_log())
        .arg("--cmdline")
        .arg(spec.cmdline())
        .arg("--vsock")
        .arg(st.vsock_sock())
        .arg("--api-socket")
        .arg(st.vmm_sock())
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| DriverError::Spawn {
            what: "berth-vmm",
            source,
        })?;
    Ok(Machine {
        driver: Driver::Vmm,
        main,
        helpers: Vec::new(),
    })
}
