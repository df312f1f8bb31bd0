//! passt, started and kept running by the host agent.
//!
//! The VM's network device listens on `net.sock` in the state directory
//! (QEMU: `-netdev stream,server=on`; berth-vmm: `--net-socket`). The host
//! agent connects to it and starts passt on that connection (`--fd`), as
//! the user, with the addresses it chose for the guest. No TAP, no bridge,
//! no root. When passt exits the VM side sees the connection close and
//! listens again; the host agent connects anew and starts another passt,
//! so the guest's network comes back without a VM restart (connections
//! open at the time are lost, as they would be on a real link drop).
//!
//! passt speaks the stream framing every backend of ours does: each
//! Ethernet frame preceded by its length as a big-endian `u32`. gvproxy
//! (macOS, Windows) speaks the same with `-listen-qemu`; see
//! `docs/networking.md`.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_proto::NetConfig;
use serde::Serialize;

use crate::paths::find_on_path;

/// passt could not be found or started.
#[derive(Debug, thiserror::Error)]
pub enum PasstError {
    #[error("passt was not found on PATH: Berth needs it for the VM's network (Debian/Ubuntu: sudo apt-get install passt; Fedora: sudo dnf install passt), or set BERTH_PASST to its path")]
    NotFound,
    #[error("cannot connect to the VM's network socket {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot start passt: {0}")]
    Spawn(std::io::Error),
}

/// Finds passt: `$BERTH_PASST`, else on PATH.
pub fn find() -> Result<PathBuf, PasstError> {
    if let Some(p) = std::env::var_os("BERTH_PASST") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(PasstError::NotFound)
        };
    }
    find_on_path("passt").ok_or(PasstError::NotFound)
}

/// Size at which passt's own log is cut.
const LOG_MAX: u64 = 1 << 20;

/// passt's command line for `cfg`, on descriptor `fd`, logging to `log`.
pub fn args(cfg: &NetConfig, fd: i32, log: &Path) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "--foreground".into(),
        "--quiet".into(),
        "--fd".into(),
        fd.to_string(),
        // A capped file of its own (passt opens it before it drops
        // privileges); it exits by itself when the VM side closes.
        "--log-file".into(),
        log.display().to_string(),
        "--log-size".into(),
        LOG_MAX.to_string(),
        "--address".into(),
        cfg.ipv4.to_string(),
        "--netmask".into(),
        cfg.prefix4.to_string(),
        "--gateway".into(),
        cfg.gateway4.to_string(),
        "--mtu".into(),
        cfg.mtu.to_string(),
        // The addresses are static (kernel command line): nothing to ask.
        "--no-dhcp".into(),
        "--no-dhcpv6".into(),
        "--no-ra".into(),
        // Published ports are Berth's own (over vsock), not passt's.
        "--tcp-ports".into(),
        "none".into(),
        "--udp-ports".into(),
        "none".into(),
    ];
    match &cfg.ipv6 {
        Some(v6) => a.extend([
            "--address".into(),
            v6.addr.to_string(),
            "--gateway".into(),
            v6.gateway.to_string(),
        ]),
        None => a.push("--ipv4-only".into()),
    }
    a
}

/// What `berth status` shows of passt.
#[derive(Debug, Default)]
pub struct PasstStats {
    pub pid: AtomicU32,
    pub starts: AtomicU64,
}

/// A snapshot of [`PasstStats`].
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, ts_rs::TS)]
pub struct PasstStatus {
    pub pid: Option<u32>,
    /// How often passt was restarted after exiting.
    pub restarts: u64,
}

impl PasstStats {
    pub fn snapshot(&self) -> PasstStatus {
        let pid = self.pid.load(Ordering::Relaxed);
        PasstStatus {
            pid: (pid != 0).then_some(pid),
            restarts: self.starts.load(Ordering::Relaxed).saturating_sub(1),
        }
    }
}

/// Connects to the VM's network socket, waiting (bounded) for it to exist
/// and to accept.
async fn connect(path: &Path, within: Duration) -> Result<OwnedFd, PasstError> {
    let deadline = Instant::now() + within;
    loop {
        match tokio::net::UnixStream::connect(path).await {
            Ok(s) => {
                let std = s.into_std().map_err(|source| PasstError::Connect {
                    path: path.display().to_string(),
                    source,
                })?;
                // passt expects a blocking socket of its own.
                std.set_nonblocking(false)
                    .map_err(|source| PasstError::Connect {
                        path: path.display().to_string(),
                        source,
                    })?;
                return Ok(OwnedFd::from(std));
            }
            Err(source) if Instant::now() >= deadline => {
                return Err(PasstError::Connect {
                    path: path.display().to_string(),
                    source,
                })
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Starts passt on `conn`. The descriptor is made inheritable just for
/// this spawn; the host agent's own copy is closed once passt has it, so
/// passt's exit is the end of the connection for the VM.
fn spawn(
    passt: &Path,
    cfg: &NetConfig,
    conn: OwnedFd,
    log: &Path,
) -> Result<tokio::process::Child, PasstError> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    fcntl(&conn, FcntlArg::F_SETFD(FdFlag::empty()))
        .map_err(|e| PasstError::Spawn(std::io::Error::from(e)))?;
    let child = tokio::process::Command::new(passt)
        .args(args(cfg, conn.as_raw_fd(), log))
        .stdin(std::process::Stdio::null())
        // passt's messages go to the host agent's capped log.
        .stdout(std::process::Stdio::inherit())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(PasstError::Spawn);
    drop(conn);
    child
}

/// Delay before the n-th consecutive restart: 100 ms doubling to 5 s.
fn backoff(n: u32) -> Duration {
    Duration::from_millis((100u64 << n.min(6)).min(5000))
}

/// Starts passt on the VM's network socket and keeps it running until the
/// task is dropped (which kills it). The first start's failure is
/// returned, so `berth start` can say what is wrong; later failures are
/// logged and retried.
pub async fn supervise(
    passt: PathBuf,
    net_sock: PathBuf,
    log: PathBuf,
    cfg: NetConfig,
    stats: Arc<PasstStats>,
    first: tokio::sync::oneshot::Sender<Result<(), String>>,
) {
    let mut first = Some(first);
    let mut failures = 0u32;
    loop {
        let started = Instant::now();
        let child = match connect(&net_sock, Duration::from_secs(30)).await {
            Ok(conn) => spawn(&passt, &cfg, conn, &log),
            Err(e) => Err(e),
        };
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                if let Some(tx) = first.take() {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
                failures += 1;
                tracing::warn!("restarting passt failed: {e}");
                tokio::time::sleep(backoff(failures)).await;
                continue;
            }
        };
        let pid = child.id().unwrap_or(0);
        stats.pid.store(pid, Ordering::Relaxed);
        stats.starts.fetch_add(1, Ordering::Relaxed);
        tracing::info!("passt started (pid {pid}) for the guest's network");
        if let Some(tx) = first.take() {
            let _ = tx.send(Ok(()));
        }
        let st = child.wait().await;
        stats.pid.store(0, Ordering::Relaxed);
        if started.elapsed() > Duration::from_secs(60) {
            failures = 0;
        }
        failures += 1;
        let delay = backoff(failures);
        tracing::warn!(
            "passt exited ({}); the guest's network is down until it restarts in {} ms",
            st.map(crate::hostagent::describe)
                .unwrap_or_else(|e| e.to_string()),
            delay.as_millis()
        );
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passt_gets_the_guest_addresses_and_no_port_forwarding() {
        let a = args(
            &NetConfig::berth_default(false),
            7,
            Path::new("/s/passt.log"),
        )
        .join(" ");
        for want in [
            "--foreground",
            "--fd 7",
            "--log-file /s/passt.log --log-size 1048576",
            "--address 192.168.127.2 --netmask 24 --gateway 192.168.127.1",
            "--mtu 65520",
            "--no-dhcp",
            "--tcp-ports none --udp-ports none",
            "--ipv4-only",
        ] {
            assert!(a.contains(want), "{want} missing from {a}");
        }
        let a = args(
            &NetConfig::berth_default(true),
            7,
            Path::new("/s/passt.log"),
        )
        .join(" ");
        assert!(
            a.contains("--address fd00:b5:127::2 --gateway fd00:b5:127::1"),
            "{a}"
        );
        assert!(!a.contains("--ipv4-only"));
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff(0), Duration::from_millis(100));
        assert_eq!(backoff(3), Duration::from_millis(800));
        assert_eq!(backoff(100), Duration::from_secs(5));
    }

    /// The real passt, on one end of a socket pair: it answers an ARP
    /// request for the gateway it was given.
    #[tokio::test]
    async fn real_passt_answers_arp_for_the_gateway() {
        let Ok(passt) = find() else {
            eprintln!("*** SKIPPED: passt is not installed ***");
            assert!(
                std::env::var("BERTH_E2E_REQUIRED").as_deref() != Ok("1"),
                "passt is required here"
            );
            return;
        };
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let cfg = NetConfig::berth_default(false);
        let log = std::env::temp_dir().join(format!("berth-passt-{}.log", std::process::id()));
        let mut child = spawn(&passt, &cfg, OwnedFd::from(theirs), &log).unwrap();
        let mac = [2u8, 0, 0, 0, 0, 2];
        let mut arp = vec![0xff; 6];
        arp.extend_from_slice(&mac);
        arp.extend_from_slice(&[8, 6, 0, 1, 8, 0, 6, 4, 0, 1]);
        arp.extend_from_slice(&mac);
        arp.extend_from_slice(&cfg.ipv4.octets());
        arp.extend_from_slice(&[0; 6]);
        arp.extend_from_slice(&cfg.gateway4.octets());
        use std::io::{Read, Write};
        let mut s = ours;
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&(arp.len() as u32).to_be_bytes()).unwrap();
        s.write_all(&arp).unwrap();
        let mut len = [0u8; 4];
        s.read_exact(&mut len).unwrap();
        let mut reply = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut reply).unwrap();
        assert_eq!(&reply[12..14], &[8, 6], "an ARP frame");
        assert_eq!(&reply[20..22], &[0, 2], "a reply");
        assert_eq!(&reply[28..32], &cfg.gateway4.octets(), "for the gateway");
        assert_eq!(&reply[32..38], &mac, "to us");
        child.kill().await.unwrap();
        let _ = std::fs::remove_file(log);
    }
}
