//! The `qemu` driver: `qemu-system-x86_64 -M microvm` with Berth's vsock
//! backend attached over vhost-user.

use std::process::Stdio;

use super::{log_stdio, wait_for_socket, Accel, Driver, DriverError, Machine, MachineSpec};
use crate::paths::{find_on_path, helper_binary};

/// virtio-mmio transports QEMU's microvm machine has.
const MICROVM_TRANSPORTS: usize = 8;

/// Whether the guest's CPU has RDRAND: TCG's `max` CPU always does, KVM
/// passes the host's through. The guest kernel then seeds its random
/// generator from it at once, and no virtio-rng transport is needed.
pub fn guest_has_rdrand(accel: Accel) -> bool {
    match accel {
        Accel::Tcg => true,
        Accel::Kvm => std::fs::read_to_string("/proc/cpuinfo")
            .is_ok_and(|c| c.split_whitespace().any(|w| w == "rdrand")),
    }
}

/// QEMU's `-accel` and `-cpu` arguments.
pub fn accel_args(accel: Accel) -> [&'static str; 4] {
    match accel {
        Accel::Kvm => ["-accel", "kvm", "-cpu", "host"],
        // Single-threaded TCG was the reliable setting in our trials. The
        // translation cache is capped at 256 MiB: QEMU's default (1 GiB)
        // fills as new guest processes run and is never given back, so
        // the VM's resident memory would grow by up to 1 GiB of cache.
        Accel::Tcg => ["-accel", "tcg,thread=single,tb-size=256", "-cpu", "max"],
    }
}

/// The kernel options the driver adds to the guest's command line (each
/// with a leading space). Blocks for 100 ms under TCG (the host's TSC is
/// measured).
pub fn kernel_options(accel: Accel, rng: bool) -> String {
    let mut opts = String::new();
    // Under TCG the guest's TSC counts at the host's rate (stopped while
    // the VM is paused), but the guest cannot calibrate it (no HPET or PM
    // timer on microvm, and its PIT calibration fails whenever the
    // emulated vCPU is slow) nor trusts it across vCPUs, and falls back to
    // counting timer ticks, which loses 0.1–0.5 s a minute here. Given
    // the host's TSC frequency and told to trust it, it keeps time on the
    // TSC, within milliseconds.
    if accel == Accel::Tcg {
        opts.push_str(" tsc=reliable");
        if let Some(k) = berth_hypervisor::tsc::host_tsc_khz(std::time::Duration::from_millis(100))
        {
            opts.push_str(&format!(" tsc_early_khz={k}"));
        }
    }
    if !rng {
        // RDRAND seeds the kernel's generator at once (TCG's comes from
        // the host's getrandom; KVM's is the host CPU's own).
        opts.push_str(" random.trust_cpu=on");
    }
    opts
}

/// The virtio devices a VM with `shares` folders needs, if they fit.
pub fn device_count(shares: usize, net: bool, rng: bool) -> Result<usize, DriverError> {
    // balloon, vsock, two disks, and what is asked for.
    let n = 4 + usize::from(net) + usize::from(rng) + shares;
    if n > MICROVM_TRANSPORTS {
        let room = MICROVM_TRANSPORTS - (n - shares);
        return Err(DriverError::Startup(format!(
            "{shares} shared folders do not fit: QEMU's microvm machine has {MICROVM_TRANSPORTS} virtio devices and this VM needs {} of them for itself, leaving room for {room}; share fewer (a parent folder shares everything under it): `berth config set shares ...`",
            n - shares
        )));
    }
    Ok(n)
}

pub(super) async fn launch(spec: &MachineSpec, accel: Accel) -> Result<Machine, DriverError> {
    let qemu = find_on_path("qemu-system-x86_64").ok_or(DriverError::NoQemu)?;
    let rng = !guest_has_rdrand(accel);
    device_count(spec.shares.len(), spec.net.is_some(), rng)?;
    let vmm = helper_binary("berth-vmm", "BERTH_VMM")?;
    let st = &spec.state;
    let vhost = st.vhost_vsock_sock();
    for s in [&vhost, &st.vsock_sock()] {
        let _ = std::fs::remove_file(s);
    }
    let log = log_stdio;

    let mut backend = tokio::process::Command::new(&vmm)
        .args(["vhost-user", "vsock", "--socket"])
        .arg(&vhost)
        .arg("--uds")
        .arg(st.vsock_sock())
        .stdin(Stdio::null())
        .stdout(log())
        .stderr(log())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| DriverError::Spawn {
            what: "berth-vmm vhost-user vsock",
            source,
        })?;
    wait_for_socket(&mut backend, &vhost, "berth-vmm vhost-user vsock").await?;
    let mut helpers = vec![backend];
    // One vhost-user fs backend per shared folder.
    for (i, share) in spec.shares.iter().enumerate() {
        let sock = st.vhost_fs_sock(i);
        let _ = std::fs::remove_file(&sock);
        let mut fs;
        if let Some(virtiofsd) = std::env::var_os("BERTH_BENCH_VIRTIOFSD") {
            // Benchmarks only: QEMU's own virtiofsd serves the folder, as
            // a reference (no file events, no read-only shares, no
            // ownership mapping).
            fs = tokio::process::Command::new(virtiofsd);
            fs.arg(format!("--socket-path={}", sock.display()))
                .arg("-o")
                .arg(format!("source={}", share.path))
                .args(["-o", "cache=auto"]);
        } else {
            fs = tokio::process::Command::new(&vmm);
            fs.args(["vhost-user", "fs", "--socket"])
                .arg(&sock)
                .arg("--dir")
                .arg(&share.path)
                .arg("--events-vsock")
                .arg(st.vsock_sock());
            if share.read_only {
                fs.arg("--read-only");
            }
        }
        let started = fs
            .stdin(Stdio::null())
            .stdout(log())
            .stderr(log())
            .kill_on_drop(true)
            .spawn();
        let mut child = match started {
            Ok(c) => c,
            Err(source) => {
                kill_all(&mut helpers).await;
                return Err(DriverError::Spawn {
                    what: "berth-vmm vhost-user fs",
                    source,
                });
            }
        };
        if let Err(e) = wait_for_socket(&mut child, &sock, "berth-vmm vhost-user fs").await {
            kill_all(&mut helpers).await;
            return Err(e);
        }
        helpers.push(child);
    }

    let mem = format!("{}M", spec.memory_mib);
    let mut cmd = tokio::process::Command::new(qemu);
    cmd.args([
        "-M",
        "microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=off",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        // The guest's reboot/poweroff ends QEMU through this controller.
        "-device",
        "i8042",
        // Free page reporting: memory the guest frees goes back to the
        // host (QEMU punches holes in the shared memfd, so the vhost-user
        // backends' mappings let go of it too).
        "-device",
        "virtio-balloon-device,free-page-reporting=on",
        // Modern (version 2) virtio-mmio for every device: vhost-user-fs
        // needs it, and it is what berth-vmm implements.
        "-global",
        "virtio-mmio.force-legacy=false",
    ]);
    if rng {
        cmd.args(["-device", "virtio-rng-device"]);
    }
    cmd.args(accel_args(accel));
    let extra = tokio::task::spawn_blocking(move || kernel_options(accel, rng))
        .await
        .unwrap_or_default();
    let cmdline = format!("{}{extra}", spec.cmdline());
    cmd.arg("-smp")
        .arg(spec.cpus.to_string())
        .arg("-m")
        .arg(&mem)
        // vhost-user needs guest memory the backend can map.
        .arg("-object")
        .arg(format!("memory-backend-memfd,id=mem,size={mem},share=on"))
        .args(["-machine", "memory-backend=mem"])
        // The console goes to the host agent, which caps and rotates
        // console.log (a file chardev would grow without limit).
        .arg("-chardev")
        .arg(format!(
            "socket,id=con0,path={}",
            st.console_sock().display()
        ))
        .args(["-serial", "chardev:con0"])
        .arg("-monitor")
        .arg(format!(
            "unix:{},server=on,wait=off",
            st.qemu_monitor().display()
        ))
        // QMP events: the host agent notices a VM paused on a full host disk.
        .arg("-qmp")
        .arg(format!(
            "unix:{},server=on,wait=off",
            st.qmp_sock().display()
        ))
        .arg("-chardev")
        .arg(format!("socket,id=vsock0,path={}", vhost.display()))
        .args(["-device", "vhost-user-vsock-device,chardev=vsock0"])
        .arg("-kernel")
        .arg(&spec.image.kernel)
        .arg("-append")
        .arg(cmdline);
    if spec.net.is_some() {
        // QEMU listens; the host agent connects and starts passt on that
        // connection, and again whenever passt has to be restarted (QEMU
        // listens again once a peer has gone).
        let _ = std::fs::remove_file(st.net_sock());
        cmd.arg("-netdev").arg(format!(
            "stream,id=net0,server=on,addr.type=unix,addr.path={}",
            st.net_sock().display()
        ));
        cmd.args(["-device", "virtio-net-device,netdev=net0"]);
    }
    for (i, share) in spec.shares.iter().enumerate() {
        cmd.arg("-chardev").arg(format!(
            "socket,id=fs{i},path={}",
            st.vhost_fs_sock(i).display()
        ));
        cmd.arg("-device").arg(format!(
            "vhost-user-fs-device,chardev=fs{i},tag={}",
            share.tag
        ));
    }
    let disks = [(&spec.image.rootfs, true), (&st.data_disk(), false)];
    for (i, (path, ro)) in disks.iter().enumerate() {
        cmd.arg("-drive").arg(format!(
            // werror=enospc (QEMU's default, said here): a full host disk
            // pauses the VM instead of failing the guest's writes.
            "id=d{i},file={},format=raw,if=none,readonly={},discard=unmap,cache=writeback,werror=enospc,rerror=report",
            path.display(),
            if *ro { "on" } else { "off" }
        ));
        cmd.arg("-device")
            .arg(format!("virtio-blk-device,drive=d{i}"));
    }
    cmd.stdin(Stdio::null())
        .stdout(log())
        .stderr(log())
        .kill_on_drop(true);
    let main = match cmd.spawn() {
        Ok(c) => c,
        Err(source) => {
            kill_all(&mut helpers).await;
            return Err(DriverError::Spawn {
                what: "qemu-system-x86_64",
                source,
            });
        }
    };
    Ok(Machine {
        driver: Driver::Qemu(accel),
        main,
        helpers,
    })
}

async fn kill_all(children: &mut [tokio::process::Child]) {
    for c in children {
        let _ = c.kill().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_shares_fit_and_a_fourth_is_explained() {
        assert_eq!(device_count(3, true, false).unwrap(), 8);
        let e = device_count(4, true, false).unwrap_err().to_string();
        assert!(e.contains("room for 3"), "{e}");
        // Without RDRAND the entropy device takes one more.
        assert!(device_count(3, true, true).is_err());
        assert_eq!(device_count(2, true, true).unwrap(), 8);
    }
}
