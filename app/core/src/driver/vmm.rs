//! The `vmm` driver: our own `berth-vmm`.

use std::process::Stdio;

use super::{log_stdio, Driver, DriverError, Machine, MachineSpec};
use crate::paths::helper_binary;

/// The `berth-vmm run` arguments for `spec`.
pub fn run_args(spec: &MachineSpec) -> Vec<std::ffi::OsString> {
    let st = &spec.state;
    let mut a: Vec<std::ffi::OsString> = Vec::new();
    let mut flag = |name: &str, value: std::ffi::OsString| {
        a.push(name.into());
        a.push(value);
    };
    flag("--kernel", spec.image.kernel.clone().into());
    flag("--rootfs", spec.image.rootfs.clone().into());
    flag("--data-disk", st.data_disk().into());
    flag("--cpus", spec.cpus.to_string().into());
    flag("--memory", spec.memory_mib.to_string().into());
    flag("--console-log", st.console_log().into());
    flag("--console-log-max", spec.console_log_max.to_string().into());
    flag("--cmdline", spec.cmdline().into());
    flag("--vsock", st.vsock_sock().into());
    flag("--api-socket", st.vmm_sock().into());
    if spec.net.is_some() {
        flag("--net-socket", st.net_sock().into());
    }
    for share in &spec.shares {
        let ro = if share.read_only { ":ro" } else { "" };
        flag(
            "--share",
            format!("{}={}{ro}", share.tag, share.path).into(),
        );
    }
    a.insert(0, "run".into());
    a
}

pub(super) async fn launch(spec: &MachineSpec) -> Result<Machine, DriverError> {
    let vmm = helper_binary("berth-vmm", "BERTH_VMM")?;
    let st = &spec.state;
    for s in [st.vsock_sock(), st.vmm_sock()] {
        let _ = std::fs::remove_file(s);
    }
    let main = tokio::process::Command::new(vmm)
        .args(run_args(spec))
        .stdin(Stdio::null())
        .stdout(log_stdio())
        .stderr(log_stdio())
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
