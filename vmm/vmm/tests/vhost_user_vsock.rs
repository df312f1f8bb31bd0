//! End to end under QEMU (TCG here) with our vsock device: the real guest
//! image boots with QEMU's `vhost-user-vsock-device` attached to
//! `berth-vmm vhost-user vsock`; host clients reach the agent's ports through
//! `vsock.sock` with `CONNECT`, the agent's guest-initiated connection
//! reaches a host listener, and many parallel streams arrive intact while
//! our process's own memory stays bounded.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_proto::{read_frame, write_frame, Event, Phase, Request, Response, PROTOCOL_VERSION};
use berth_testkit::{Boot, Guest, Scratch};
use sha2::{Digest, Sha256};

const BOOT: Duration = Duration::from_secs(300);

/// `berth-vmm vhost-user vsock`, killed on drop.
struct Backend(Child);

impl Backend {
    fn start(vu: &Path, uds: &Path) -> Backend {
        let child = Command::new(env!("CARGO_BIN_EXE_berth-vmm"))
            .args(["vhost-user", "vsock", "--socket"])
            .arg(vu)
            .arg("--uds")
            .arg(uds)
            .spawn()
            .expect("starting berth-vmm");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !vu.exists() {
            assert!(
                Instant::now() < deadline,
                "berth-vmm did not create {}",
                vu.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Backend(child)
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Connects to guest `port` through the device's host socket.
fn connect(uds: &Path, port: u32) -> UnixStream {
    let mut s = UnixStream::connect(uds).expect("connecting to vsock.sock");
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        assert_eq!(
            s.read(&mut byte).unwrap(),
            1,
            "vsock.sock closed before OK for port {port}"
        );
        line.push(byte[0]);
    }
    let line = String::from_utf8(line).unwrap();
    assert!(line.starts_with("OK "), "unexpected answer {line:?}");
    s
}

/// Private memory of a process (our heap, not the shared guest memory).
fn rss_anon_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Deterministic pseudo-random bytes (xorshift64*).
fn fill(seed: u64, buf: &mut [u8]) -> u64 {
    let mut x = seed | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    x
}

/// Sends `mib` MiB through the echo port and checks what comes back.
fn echo_stream(uds: PathBuf, id: u64, mib: usize) -> u64 {
    let s = connect(&uds, berth_proto::ECHO_PORT);
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut seed = id + 1;
        for _ in 0..mib {
            seed = fill(seed, &mut buf);
            h.update(&buf);
            w.write_all(&buf).unwrap();
        }
        w.shutdown(std::net::Shutdown::Write).unwrap();
        h.finalize()
    });
    let mut r = s;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut got = 0u64;
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        got += n as u64;
    }
    let sent = writer.join().unwrap();
    assert_eq!(got, (mib as u64) << 20, "stream {id}: byte count");
    assert_eq!(h.finalize(), sent, "stream {id}: checksum");
    got
}

#[test]
fn guest_image_with_our_vhost_user_vsock() {
    let Some(dir) = berth_testkit::require_image() else {
        return;
    };
    let scratch = Scratch::new("vhost-user-vsock");
    let work = &scratch.0;
    let data = work.join("data.img");
    berth_testkit::sparse_disk(&data, 8 << 30);
    let uds = work.join("vsock.sock");
    let vu = work.join("vu.sock");
    // The agent connects out to host port 1025 with its milestones.
    let events =
        UnixListener::bind(format!("{}_{}", uds.display(), berth_proto::EVENTS_PORT)).unwrap();
    let backend = Backend::start(&vu, &uds);
    let mut g = Guest::boot(Boot {
        dir: &dir,
        work,
        data_disk: Some(&data),
        extra_disk: None,
        // A new, blank data disk: the host says so.
        extra_cmdline: "berth.echo=1 berth.data_fresh=1",
        name: "vsock",
        vhost_user_vsock: Some(&vu),
    });
    let (_, ready_wall) = g.wait_for("berth-agent: docker-ready", BOOT);
    eprintln!(
        "docker-ready {:.1} s after QEMU start",
        ready_wall.as_secs_f64()
    );

    // Docker API through CONNECT 2375.
    let mut s = connect(&uds, berth_proto::DOCKER_PORT);
    s.write_all(b"GET /_ping HTTP/1.1\r\nHost: berth\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert!(answer.ends_with("OK"), "{answer}");

    // The control protocol.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let control = connect(&uds, berth_proto::CONTROL_PORT);
    control.set_nonblocking(true).unwrap();
    let mut control = rt
        .block_on(async { tokio::net::UnixStream::from_std(control) })
        .unwrap();
    rt.block_on(async {
        write_frame(
            &mut control,
            &Request::Hello {
                protocol: PROTOCOL_VERSION,
                client: "test".into(),
            },
        )
        .await
        .unwrap();
        let hello: Response = read_frame(&mut control).await.unwrap();
        assert!(
            matches!(hello, Response::Hello(ref i) if i.protocol == PROTOCOL_VERSION),
            "{hello:?}"
        );
        write_frame(&mut control, &Request::Ping { nonce: 99 })
            .await
            .unwrap();
        assert_eq!(
            read_frame::<Response, _>(&mut control).await.unwrap(),
            Response::Pong { nonce: 99 }
        );
        write_frame(&mut control, &Request::GetState).await.unwrap();
        let state: Response = read_frame(&mut control).await.unwrap();
        assert!(
            matches!(state, Response::State(ref s) if s.phase == Phase::Ready),
            "{state:?}"
        );
    });

    // A guest-initiated connection reached the host listener.
    events.set_nonblocking(false).unwrap();
    let (ev_stream, _) = events.accept().unwrap();
    ev_stream.set_nonblocking(true).unwrap();
    let mut ev_stream = rt
        .block_on(async { tokio::net::UnixStream::from_std(ev_stream) })
        .unwrap();
    let names: Vec<String> = rt.block_on(async {
        let mut names = Vec::new();
        while !names.iter().any(|n: &String| n == "docker-ready") {
            let ev: Event =
                tokio::time::timeout(Duration::from_secs(30), read_frame(&mut ev_stream))
                    .await
                    .expect("events arrive")
                    .unwrap();
            names.push(ev.name);
        }
        names
    });
    assert_eq!(
        names.first().map(String::as_str),
        Some("agent-start"),
        "{names:?}"
    );

    // Many parallel streams, checked end to end, with our memory watched.
    let streams: u64 = std::env::var("BERTH_VSOCK_STREAMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let mib: usize = std::env::var("BERTH_VSOCK_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let watcher = {
        let (done, peak, pid) = (done.clone(), peak.clone(), backend.pid());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(rss_anon_kib(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let before = rss_anon_kib(backend.pid());
    let t0 = Instant::now();
    let workers: Vec<_> = (0..streams)
        .map(|id| {
            let uds = uds.clone();
            std::thread::spawn(move || echo_stream(uds, id, mib))
        })
        .collect();
    let total: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    let secs = t0.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    watcher.join().unwrap();
    let peak_kib = peak.load(Ordering::Relaxed);
    eprintln!(
        "{streams} streams × {mib} MiB echoed intact: {} MiB each way in {secs:.1} s ({:.1} MiB/s each way); \
         berth-vmm private memory {} MiB before, peak {} MiB",
        total >> 20,
        (total >> 20) as f64 / secs,
        before >> 10,
        peak_kib >> 10
    );
    // Each connection buffers at most its 256 KiB credit window.
    assert!(
        peak_kib < 128 << 10,
        "berth-vmm used {peak_kib} KiB of private memory"
    );

    // Orderly shutdown through the control port ends QEMU; the backend
    // exits when QEMU disconnects.
    rt.block_on(async {
        write_frame(&mut control, &Request::Shutdown).await.unwrap();
        assert_eq!(
            read_frame::<Response, _>(&mut control).await.unwrap(),
            Response::Ok
        );
    });
    assert_eq!(g.wait_exit(BOOT), 0);
    let mut backend = backend;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(st) = backend.0.try_wait().unwrap() {
            assert!(st.success(), "berth-vmm exited with {st}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "berth-vmm did not exit after QEMU left"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let console = g.console();
    assert!(console.iter().any(|l| l.contains("berth-agent: power-off")));
}
