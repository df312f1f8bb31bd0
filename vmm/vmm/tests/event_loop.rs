//! The event loop on its own: sources served on the `vmm-events` thread,
//! and nothing left behind (thread, file descriptors) once it stops. Its
//! own test binary, so the descriptor count isn't disturbed by other tests.

use berth_vmm::event_loop::EventLoop;
use std::sync::mpsc;
use std::time::Duration;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_owned())
        .collect()
}

#[test]
fn serves_eventfds_on_its_thread_and_stops_cleanly() {
    drop(EventLoop::start().unwrap());
    let before = open_fds();
    for _ in 0..5 {
        let events = EventLoop::start().unwrap();
        let event = EventFd::new(EFD_NONBLOCK).unwrap();
        let signal = event.try_clone().unwrap();
        let (tx, rx) = mpsc::channel();
        events
            .watch("test queue", event, move |e| {
                let n = e.read()?;
                let name = std::thread::current().name().map(str::to_owned);
                let _ = tx.send((n, name));
                Ok(())
            })
            .unwrap();
        signal.write(3).unwrap();
        let (n, name) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(n, 3);
        assert_eq!(name.as_deref(), Some("vmm-events"));
        signal.write(1).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap().0, 1);
        events.stop();
        assert!(
            rx.recv_timeout(Duration::from_millis(50)).is_err(),
            "the task ended with the loop"
        );
        // The watched eventfd was closed with its task; `signal` is ours.
        drop(signal);
    }
    assert_eq!(open_fds(), before, "no file descriptor leaked");
    // A joined thread may linger in /proc for a moment before it is reaped.
    let gone = (0..100).any(|_| {
        let gone = !thread_names().iter().any(|n| n == "vmm-events");
        if !gone {
            std::thread::sleep(Duration::from_millis(10));
        }
        gone
    });
    assert!(gone, "the vmm-events thread ended");
}
