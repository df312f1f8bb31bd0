//! The vsock device when its process runs out of descriptors: `accept`
//! fails with EMFILE while the listener stays readable. The device must
//! pause accepting instead of spinning, keep its other work going, and
//! accept again once descriptors are free.
//!
//! Its own test binary (one test): it lowers this process's open-file
//! limit.

use std::io::Write;
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use berth_devices::virtio::vsock::Vsock;

fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").unwrap().count() as u64
}

fn set_soft_limit(n: u64) {
    let (_, hard) = berth_limits::fds::nofile_limits().unwrap();
    let r = libc::rlimit {
        rlim_cur: n as libc::rlim_t,
        rlim_max: hard as libc::rlim_t,
    };
    // SAFETY: setrlimit reads the struct we own.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) }, 0);
}

fn readable(fd: RawFd, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd we own, for the duration of the call.
    unsafe { libc::poll(&mut p, 1, ms) == 1 }
}

#[test]
fn accept_failures_pause_instead_of_spinning() {
    let dir = std::env::temp_dir().join(format!("berth-vsock-emfile-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let uds = dir.join("v.sock");
    let dev = Vsock::new(3, &uds, 4096).unwrap();
    let host_fd = dev.host_fd();
    // 40 clients wait in the backlog, each with its CONNECT line sent.
    let mut clients: Vec<UnixStream> = (0..40)
        .map(|_| {
            let mut c = UnixStream::connect(&uds).unwrap();
            c.write_all(b"CONNECT 2375\n").unwrap();
            c
        })
        .collect();
    // Room for 10 more descriptors only.
    let (soft, _) = berth_limits::fds::nofile_limits().unwrap();
    set_soft_limit(open_fds() + 10);

    // The device runs on its own thread, as it does in the VMM; a pass
    // over the host sockets must return (the old code looped forever).
    let (tx, rx) = mpsc::channel();
    let worker = std::thread::spawn(move || {
        let mut dev = dev;
        let mut wakeups = 0u32;
        let t0 = Instant::now();
        // One second of serving whatever the device's fd reports.
        while t0.elapsed() < Duration::from_secs(1) {
            if readable(host_fd, 50) {
                dev.handle_host_events();
                wakeups += 1;
                let _ = tx.send(());
            }
        }
        (dev, wakeups)
    });
    // The first pass must come back.
    rx.recv_timeout(Duration::from_secs(10))
        .expect("handle_host_events never returned: it spins on the failing accept");
    let (mut dev, wakeups) = worker.join().unwrap();
    let m = dev.metrics();
    println!("{wakeups} wakeups in 1 s at the limit; {m:?}");
    assert!(m.accept_errors >= 1, "accept must have failed: {m:?}");
    let accepted = m.handshakes + m.conns_open;
    assert!((1..40).contains(&accepted), "{m:?}");
    // The timer ticks at 10 Hz while accepting is paused; a spin would be
    // millions of wakeups.
    assert!(wakeups < 50, "{wakeups} wakeups in one second");

    // Descriptors free again: everyone still waiting is accepted.
    set_soft_limit(soft);
    let deadline = Instant::now() + Duration::from_secs(10);
    while dev.metrics().handshakes + dev.metrics().conns_open < 40 {
        assert!(Instant::now() < deadline, "{:?}", dev.metrics());
        if readable(host_fd, 100) {
            dev.handle_host_events();
        }
    }
    clients.clear();
    let _ = std::fs::remove_dir_all(&dir);
}
