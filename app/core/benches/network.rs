//! `cargo bench -p berth-core --bench network` (via `scripts/bench.sh`):
//! Berth's network beside the host's own loopback, each pair measured in
//! the same run. Figures go into docs/benchmarks.md.
//!
//! 1. The published-port forwarder alone, in process, no VM: a client on
//!    the host's loopback → the host agent's forwarder (`net::ports`) →
//!    our vsock device (`berth-devices`, a guest driver on test queues)
//!    → a sink or echo peer in that driver. Berth's own overhead, apart
//!    from any guest.
//! 2. Through a real VM (whatever driver `auto` picks; QEMU with TCG
//!    here): host → container through a published port, container → host
//!    through `host.docker.internal` (passt), and connection setup
//!    (connect, one byte each way) through a published port.
//!
//! Every server runs on this host's loopback or in the VM; the VM's only
//! resolver is a dead loopback port, so nothing leaves the machine.
//! BERTH_BENCH_MIB sets the in-process volume (default 1024), and
//! BERTH_BENCH_VM_MIB the VM's (default 256).

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_core::net::ports::Forwards;
use berth_devices::virtio::vsock::op;
use berth_devices::virtio::vsock::testing::{Guest, Hdr};
use berth_proto::{Proto, PublishedPort, FORWARD_PORT};

const CHUNK: usize = 256 << 10;
/// Guest RX buffers and TX packets.
const PKT: u32 = 64 << 10;
const GUEST_BUF: u32 = 1 << 20;

fn env_mib(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// One guest-side stream of the in-process peer.
#[derive(Default)]
struct GConn {
    gport: u32,
    received: u64,
    reported: u64,
    sent: u64,
    peer_alloc: u32,
    peer_fwd: u32,
    header_done: bool,
    echo: Vec<u8>,
}

/// Runs the guest side until `stop`: accepts the forwarder's connections
/// to FORWARD_PORT, skips each one's header line, then counts (sink) or
/// echoes what arrives. `bytes` counts payload received.
fn guest_peer(mut g: Guest, echo: bool, stop: Arc<AtomicBool>, bytes: Arc<AtomicU64>) {
    let mut conns: HashMap<u32, GConn> = HashMap::new();
    while !stop.load(Ordering::Relaxed) {
        if g.rx_bufs.len() < 64 {
            g.post_rx(64 - g.rx_bufs.len());
        }
        let got = g.poll();
        let idle = got.is_empty();
        for (h, data) in got {
            let hport = h.src_port;
            match h.op {
                op::REQUEST if h.dst_port == FORWARD_PORT => {
                    let mut r = Hdr::guest(op::RESPONSE, h.dst_port, hport);
                    r.buf_alloc = GUEST_BUF;
                    g.send(r, &[]);
                    conns.insert(
                        hport,
                        GConn {
                            gport: h.dst_port,
                            peer_alloc: h.buf_alloc,
                            peer_fwd: h.fwd_cnt,
                            ..GConn::default()
                        },
                    );
                    continue;
                }
                op::SHUTDOWN | op::RST => {
                    if let Some(c) = conns.remove(&hport) {
                        let mut r = Hdr::guest(op::RST, c.gport, hport);
                        r.fwd_cnt = c.received as u32;
                        if h.op == op::SHUTDOWN {
                            g.send(r, &[]);
                        }
                    }
                    continue;
                }
                _ => {}
            }
            let Some(c) = conns.get_mut(&hport) else {
                continue;
            };
            c.peer_alloc = h.buf_alloc;
            c.peer_fwd = h.fwd_cnt;
            if h.op != op::RW {
                continue;
            }
            c.received += data.len() as u64;
            let mut payload = &data[..];
            if !c.header_done {
                if let Some(i) = payload.iter().position(|&b| b == b'\n') {
                    c.header_done = true;
                    payload = &payload[i + 1..];
                } else {
                    payload = &[];
                }
            }
            bytes.fetch_add(payload.len() as u64, Ordering::Relaxed);
            if echo {
                c.echo.extend_from_slice(payload);
            }
            if c.received - c.reported >= (GUEST_BUF / 4) as u64 {
                c.reported = c.received;
                let mut cu = Hdr::guest(op::CREDIT_UPDATE, c.gport, hport);
                cu.buf_alloc = GUEST_BUF;
                cu.fwd_cnt = c.received as u32;
                g.send(cu, &[]);
            }
        }
        for (&hport, c) in conns.iter_mut() {
            while !c.echo.is_empty() {
                let in_flight = (c.sent as u32).wrapping_sub(c.peer_fwd);
                let room = c.peer_alloc.saturating_sub(in_flight);
                let n = (c.echo.len() as u32).min(PKT).min(room) as usize;
                if n == 0 {
                    break;
                }
                let mut h = Hdr::guest(op::RW, c.gport, hport);
                h.buf_alloc = GUEST_BUF;
                h.fwd_cnt = c.received as u32;
                let part: Vec<u8> = c.echo.drain(..n).collect();
                g.send(h, &part);
                c.sent += n as u64;
            }
        }
        if idle {
            std::thread::yield_now();
        }
    }
}

/// A forwarder for one published port to an in-process guest.
struct InProcess {
    _rt: tokio::runtime::Runtime,
    _forwards: Arc<Forwards>,
    stop: Arc<AtomicBool>,
    bytes: Arc<AtomicU64>,
    peer: Option<std::thread::JoinHandle<()>>,
    addr: SocketAddr,
}

impl InProcess {
    fn start(name: &str, echo: bool) -> InProcess {
        let g = Guest::with(name, PKT, 64);
        let uds = g.uds();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let forwards = Forwards::new(uds);
        {
            let _e = rt.enter();
            forwards.reconcile(&[PublishedPort {
                proto: Proto::Tcp,
                host_ip: "127.0.0.1".parse().unwrap(),
                host_port: port,
                container_port: 80,
                container: "bench".into(),
            }]);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let bytes = Arc::new(AtomicU64::new(0));
        let peer = {
            let (stop, bytes) = (stop.clone(), bytes.clone());
            std::thread::spawn(move || guest_peer(g, echo, stop, bytes))
        };
        InProcess {
            _rt: rt,
            _forwards: forwards,
            stop,
            bytes,
            peer: Some(peer),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(p) = self.peer.take() {
            let _ = p.join();
        }
    }
}

/// Writes `total` bytes to `addr`; returns MB/s once `done()` says the
/// receiver has them.
fn push(addr: SocketAddr, total: u64, done: impl Fn() -> bool) -> f64 {
    let mut s = TcpStream::connect(addr).unwrap();
    let buf = vec![0x5au8; CHUNK];
    let t = Instant::now();
    let mut left = total;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        s.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    while !done() {
        std::thread::yield_now();
    }
    total as f64 / t.elapsed().as_secs_f64() / 1e6
}

/// A loopback TCP sink counting what it reads.
fn loopback_sink() -> (SocketAddr, Arc<AtomicU64>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let got = Arc::new(AtomicU64::new(0));
    let g = got.clone();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let mut buf = vec![0u8; CHUNK];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
                g.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    });
    (addr, got)
}

/// A TCP sink on `ip` for one connection: bytes read, and the seconds from
/// its first byte to its end.
fn timed_sink(ip: std::net::IpAddr) -> (SocketAddr, std::thread::JoinHandle<(u64, f64)>) {
    let l = TcpListener::bind((ip, 0)).unwrap();
    let addr = l.local_addr().unwrap();
    let h = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = vec![0u8; CHUNK];
        let mut got = 0u64;
        let mut first = None;
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            first.get_or_insert_with(Instant::now);
            got += n as u64;
        }
        (got, first.map_or(0.0, |t| t.elapsed().as_secs_f64()))
    });
    (addr, h)
}

/// A loopback TCP echo server.
fn loopback_echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let _ = s.set_nodelay(true);
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// Connect, send one byte, read it back, close: `n` times; sorted ms.
fn connect_rtts(addr: SocketAddr, n: usize) -> Vec<f64> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).unwrap();
        v.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

fn in_process(total: u64) {
    println!(
        "\n## The published-port forwarder in process (no VM), {} MiB",
        total >> 20
    );
    let sink = InProcess::start("fwd-sink", false);
    // Warm up the connection path.
    let _ = push(sink.addr, 1 << 20, || {
        sink.bytes.load(Ordering::Relaxed) >= 1 << 20
    });
    let before = sink.bytes.load(Ordering::Relaxed);
    let fwd = push(sink.addr, total, || {
        sink.bytes.load(Ordering::Relaxed) >= before + total
    });
    let (laddr, lgot) = loopback_sink();
    let lo = push(laddr, total, || lgot.load(Ordering::Relaxed) >= total);
    drop(sink);
    println!("| path | MB/s | share of loopback |");
    println!("|---|---|---|");
    println!("| host loopback TCP | {lo:.0} | 100 % |");
    println!(
        "| loopback → forwarder → vsock device → guest sink | {fwd:.0} | {:.0} % |",
        fwd / lo * 100.0
    );
    let echo = InProcess::start("fwd-echo", true);
    let f = connect_rtts(echo.addr, 1000);
    let l = connect_rtts(loopback_echo(), 1000);
    drop(echo);
    println!("\n| connect + 1 byte each way, 1000 times | median ms | p99 ms |");
    println!("|---|---|---|");
    println!(
        "| host loopback | {:.3} | {:.3} |",
        percentile(&l, 0.5),
        percentile(&l, 0.99)
    );
    println!(
        "| through the forwarder and vsock device | {:.3} | {:.3} |",
        percentile(&f, 0.5),
        percentile(&f, 0.99)
    );
}

/// The host's own IPv4 address on its default route.
fn host_ipv4() -> std::net::Ipv4Addr {
    let out = Command::new("ip")
        .args(["-o", "-4", "addr", "show", "scope", "global"])
        .output()
        .expect("ip");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.split_whitespace().nth(3)?.split('/').next()?.parse().ok())
        .expect("a non-loopback IPv4 address")
}

fn free_port() -> u16 {
    TcpListener::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until `addr` accepts and answers the echo.
fn wait_echo(addr: SocketAddr) {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(60) {
        if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut b = [0u8; 1];
            if s.write_all(b"x").is_ok() && s.read_exact(&mut b).is_ok() {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{addr} never echoed");
}

fn through_vm(total: u64) {
    let vm = common::ScratchVm::new("netbench");
    // A resolver nobody answers on: nothing in the VM resolves outside.
    let _dead = vm.no_outside_dns();
    vm.berth(&["start"]);
    let st: serde_json::Value = serde_json::from_str(&vm.berth(&["status", "--json"])).unwrap();
    let driver = st["driver"].as_str().unwrap_or("?").to_owned();
    let tar = berth_testkit::busybox_rootfs_tar(&vm.work);
    vm.docker(&["import", tar.to_str().unwrap(), "bench/bb"]);
    let ctxdir = vm.work.join("img");
    std::fs::create_dir_all(&ctxdir).unwrap();
    berth_testkit::nettool(&ctxdir);
    std::fs::write(
        ctxdir.join("Dockerfile"),
        "FROM bench/bb\nCOPY nettool /bin/nettool\n",
    )
    .unwrap();
    vm.docker(&["build", "-q", "-t", "bench/net", ctxdir.to_str().unwrap()]);

    // Host → container through a published port.
    let p = free_port();
    vm.docker(&[
        "run",
        "-d",
        "--name",
        "sink",
        "-p",
        &format!("{p}:9000"),
        "bench/net",
        "nettool",
        "tcpsink",
        "9000",
    ]);
    let addr = SocketAddr::from(([127, 0, 0, 1], p));
    let t = Instant::now();
    let h2c = loop {
        assert!(t.elapsed() < Duration::from_secs(60), "sink never accepted");
        // Until the forward and nc are up, connections end at once.
        let Ok(mut s) = TcpStream::connect(addr) else {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        };
        let buf = vec![0x5au8; CHUNK];
        let t0 = Instant::now();
        let mut left = total;
        let mut ok = true;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            if s.write_all(&buf[..n]).is_err() {
                ok = false;
                break;
            }
            left -= n as u64;
        }
        if !ok {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        break total as f64 / t0.elapsed().as_secs_f64() / 1e6;
    };

    // Container → host: to its loopback through host.docker.internal (the
    // vsock relay), and to its own address (passt).
    let mib = total >> 20;
    let send = |host: &str, port: u16| {
        let (m, p) = (mib.to_string(), port.to_string());
        vm.docker(&[
            "run",
            "--rm",
            "bench/net",
            "nettool",
            "tcpsend",
            host,
            &p,
            &m,
        ]);
    };
    let (saddr, sink) = timed_sink("127.0.0.1".parse().unwrap());
    send("host.docker.internal", saddr.port());
    let (got, secs) = sink.join().unwrap();
    assert_eq!(got, total, "the host got every byte");
    let c2h = total as f64 / secs / 1e6;
    let ip = host_ipv4();
    let (saddr, sink) = timed_sink(ip.into());
    send(&ip.to_string(), saddr.port());
    let (got, secs) = sink.join().unwrap();
    assert_eq!(got, total, "the host got every byte");
    let c2a = total as f64 / secs / 1e6;

    // Host loopback reference, same volume.
    let (laddr, lgot) = loopback_sink();
    let lo = push(laddr, total, || lgot.load(Ordering::Relaxed) >= total);

    // Connection setup through a published port.
    let q = free_port();
    vm.docker(&[
        "run",
        "-d",
        "--name",
        "echo",
        "-p",
        &format!("{q}:7"),
        "bench/net",
        "nettool",
        "tcpecho",
        "7",
    ]);
    let eaddr = SocketAddr::from(([127, 0, 0, 1], q));
    wait_echo(eaddr);
    let vm_rtt = connect_rtts(eaddr, 1000);
    let lo_rtt = connect_rtts(loopback_echo(), 1000);
    vm.docker(&["rm", "-f", "sink", "echo"]);
    vm.berth(&["stop"]);

    println!("\n## Through the VM (driver {driver}), {mib} MiB each way");
    println!("| path | MB/s | share of loopback |");
    println!("|---|---|---|");
    println!("| host loopback TCP | {lo:.0} | 100 % |");
    println!(
        "| host → container, published port | {h2c:.1} | {:.2} % |",
        h2c / lo * 100.0
    );
    println!(
        "| container → host's loopback, host.docker.internal (vsock relay) | {c2h:.1} | {:.2} % |",
        c2h / lo * 100.0
    );
    println!(
        "| container → host's own address (passt) | {c2a:.1} | {:.2} % |",
        c2a / lo * 100.0
    );
    println!("(a static 64 KiB-write sender and discarding sink in the container; host → container timed from the first write to the sink's close, container → host from the host sink's first byte to its end)");
    println!("\n| connect + 1 byte each way, 1000 times | median ms | p99 ms |");
    println!("|---|---|---|");
    println!(
        "| host loopback | {:.3} | {:.3} |",
        percentile(&lo_rtt, 0.5),
        percentile(&lo_rtt, 0.99)
    );
    println!(
        "| published port into the VM | {:.3} | {:.3} |",
        percentile(&vm_rtt, 0.5),
        percentile(&vm_rtt, 0.99)
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    in_process(env_mib("BERTH_BENCH_MIB", 1024) << 20);
    if std::env::var("BERTH_BENCH_NO_VM").is_err() {
        through_vm(env_mib("BERTH_BENCH_VM_MIB", 256) << 20);
    }
}
