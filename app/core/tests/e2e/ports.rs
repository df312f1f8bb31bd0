//! Published ports: `docker run -p` answers on the host's addresses,
//! forwarded by Berth itself over vsock, following the container's life.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::hostnet::{free_port, host_ipv4, http_get, udp_exchange};
use super::network::{ensure_net_image, NET_IMAGE};
use super::{eventually, Case, Ctx, BB};

pub const CASES: &[Case] = &[
    ("ports_tcp_on_localhost_and_every_address", tcp_default),
    ("ports_bound_to_one_address", specific_addresses),
    ("ports_udp_both_ways_per_peer", udp),
    ("ports_picked_by_dockerd", dynamic),
    ("ports_follow_the_container", lifecycle),
    ("ports_host_port_in_use_is_reported", in_use),
    ("ports_1000_sequential_200_concurrent", many_connections),
    ("ports_1gib_intact", one_gib),
    ("ports_compose_services", compose),
    ("ports_restored_after_berth_restart", after_restart),
];

const HELLO: &str = "hello from busybox httpd\n";

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn get(addr: SocketAddr) -> Option<String> {
    http_get(addr, Duration::from_secs(10))
}

/// Whether anything accepts connections on `addr` now.
fn open(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok()
}

fn httpd(ctx: &Ctx, name: &str, publish: &str, extra: &[&str]) -> String {
    let _ = ctx.docker(&["rm", "-f", name]);
    let mut a = vec!["run", "-d", "--name", name, "-p", publish];
    a.extend_from_slice(extra);
    a.extend([BB, "httpd", "-f", "-p", "80", "-h", "/www"]);
    ctx.docker_ok(&a)
}

fn forwards(ctx: &Ctx) -> Vec<serde_json::Value> {
    ctx.status()["forwards"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn tcp_default(ctx: &Ctx) {
    let p = free_port();
    let t0 = Instant::now();
    httpd(ctx, "e2e-web", &format!("{p}:80"), &[]);
    let started = t0.elapsed();
    // The forward follows dockerd's start event: measured from `docker
    // run` returning (the container has started) to the first answer.
    let t1 = Instant::now();
    let mut first = None;
    while t1.elapsed() < Duration::from_secs(30) {
        if let Some(b) = http_get(loopback(p), Duration::from_millis(500)) {
            first = Some(b);
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let wait = t1.elapsed();
    assert_eq!(
        first.as_deref(),
        Some(HELLO),
        "127.0.0.1:{p} never answered"
    );
    println!(
        "  docker run -d took {:.2} s; 127.0.0.1:{p} answered {:.3} s after it returned",
        started.as_secs_f64(),
        wait.as_secs_f64()
    );
    // 0.0.0.0 (Docker's default) binds every host address.
    let ip = host_ipv4();
    assert_eq!(get(SocketAddr::from((ip, p))).as_deref(), Some(HELLO));
    if TcpListener::bind("[::1]:0").is_ok() {
        assert_eq!(
            get(SocketAddr::from(([0u16, 0, 0, 0, 0, 0, 0, 1], p))).as_deref(),
            Some(HELLO),
            "dockerd publishes :: too"
        );
    }
    let f = forwards(ctx);
    assert!(
        f.iter().any(|f| f["host_port"] == p
            && f["host_ip"] == "0.0.0.0"
            && f["container"] == "e2e-web"
            && f["container_port"] == 80
            && f["state"] == "active"),
        "{f:?}"
    );
    let human = ctx.berth_ok(&["status"]);
    assert!(
        human.contains(&format!("0.0.0.0:{p}/tcp -> e2e-web:80")),
        "{human}"
    );
}

fn specific_addresses(ctx: &Ctx) {
    let p = free_port();
    httpd(ctx, "e2e-lo", &format!("127.0.0.1:{p}:80"), &[]);
    eventually("127.0.0.1 answers", Duration::from_secs(30), || {
        get(loopback(p)).as_deref() == Some(HELLO)
    });
    let ip = host_ipv4();
    assert!(
        !open(SocketAddr::from((ip, p))),
        "bound to loopback only, yet {ip}:{p} accepts"
    );
    if TcpListener::bind("[::1]:0").is_ok() {
        let p6 = free_port();
        httpd(ctx, "e2e-lo6", &format!("[::1]:{p6}:80"), &[]);
        let v6 = SocketAddr::from(([0u16, 0, 0, 0, 0, 0, 0, 1], p6));
        eventually("[::1] answers", Duration::from_secs(30), || {
            get(v6).as_deref() == Some(HELLO)
        });
        assert!(
            !open(loopback(p6)),
            "bound to ::1 only, yet 127.0.0.1 accepts"
        );
        ctx.docker_ok(&["rm", "-f", "e2e-lo6"]);
    } else {
        println!("  (no IPv6 loopback on this host: [::1] check skipped)");
    }
    ctx.docker_ok(&["rm", "-f", "e2e-lo"]);
}

fn udp(ctx: &Ctx) {
    ensure_net_image(ctx);
    let p = free_port();
    let _ = ctx.docker(&["rm", "-f", "e2e-udp"]);
    ctx.docker_ok(&[
        "run",
        "-d",
        "--name",
        "e2e-udp",
        "-p",
        &format!("{p}:53/udp"),
        NET_IMAGE,
        "nettool",
        "echo",
        "53",
    ]);
    let addr = loopback(p);
    eventually("a UDP answer", Duration::from_secs(30), || {
        udp_exchange(addr, b"first", Duration::from_millis(500)).is_some()
    });
    // Several peers, each its own session, datagrams both ways.
    for i in 0..5 {
        let msg = format!("peer-{i}");
        let back = udp_exchange(addr, msg.as_bytes(), Duration::from_secs(5));
        assert_eq!(back.as_deref(), Some(msg.as_bytes()));
    }
    let big = vec![7u8; 8000];
    assert_eq!(
        udp_exchange(addr, &big, Duration::from_secs(5)).as_deref(),
        Some(&big[..]),
        "an 8000-byte datagram"
    );
    let f = forwards(ctx);
    let fwd = f
        .iter()
        .find(|f| f["host_port"] == p && f["proto"] == "udp")
        .expect("udp forward listed");
    assert!(fwd["connections"].as_u64() >= Some(7), "{fwd}");
    ctx.docker_ok(&["rm", "-f", "e2e-udp"]);
}

/// The host port dockerd picked, from `docker port`.
fn docker_port(ctx: &Ctx, name: &str, port: &str) -> u16 {
    let out = ctx.docker_ok(&["port", name, port]);
    out.lines()
        .find_map(|l| l.strip_prefix("0.0.0.0:"))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no 0.0.0.0 binding in {out:?}"))
}

fn dynamic(ctx: &Ctx) {
    httpd(ctx, "e2e-dyn", "80", &[]);
    let p = docker_port(ctx, "e2e-dyn", "80/tcp");
    eventually(
        "-p 80 answers on the same port",
        Duration::from_secs(30),
        || get(loopback(p)).as_deref() == Some(HELLO),
    );
    let _ = ctx.docker(&["rm", "-f", "e2e-all"]);
    ctx.docker_ok(&[
        "run", "-d", "--name", "e2e-all", "-P", "--expose", "80", BB, "httpd", "-f", "-p", "80",
        "-h", "/www",
    ]);
    let q = docker_port(ctx, "e2e-all", "80/tcp");
    eventually(
        "-P answers on the same port",
        Duration::from_secs(30),
        || get(loopback(q)).as_deref() == Some(HELLO),
    );
    ctx.docker_ok(&["rm", "-f", "e2e-dyn", "e2e-all"]);
}

fn lifecycle(ctx: &Ctx) {
    let p = free_port();
    httpd(ctx, "e2e-life", &format!("{p}:80"), &[]);
    let up = |what: &str| {
        eventually(what, Duration::from_secs(30), || {
            get(loopback(p)).as_deref() == Some(HELLO)
        })
    };
    let gone = |what: &str| {
        eventually(what, Duration::from_secs(30), || {
            !open(loopback(p)) && !forwards(ctx).iter().any(|f| f["host_port"] == p)
        })
    };
    up("after run");
    ctx.docker_ok(&["stop", "-t", "1", "e2e-life"]);
    gone("closed after stop");
    ctx.docker_ok(&["start", "e2e-life"]);
    up("after start");
    ctx.docker_ok(&["restart", "-t", "1", "e2e-life"]);
    up("after restart");
    ctx.docker_ok(&["rm", "-f", "e2e-life"]);
    gone("closed after rm");
}

fn in_use(ctx: &Ctx) {
    let taken = TcpListener::bind("0.0.0.0:0").unwrap();
    let p = taken.local_addr().unwrap().port();
    httpd(ctx, "e2e-clash", &format!("{p}:80"), &[]);
    eventually("the clash is reported", Duration::from_secs(30), || {
        forwards(ctx).iter().any(|f| {
            f["host_port"] == p
                && f["state"] == "error"
                && f["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("already in use"))
        })
    });
    let human = ctx.berth_ok(&["status"]);
    assert!(
        human.contains("ERROR") && human.contains("already in use"),
        "{human}"
    );
    let log = std::fs::read_to_string(ctx.state.join("host-agent.log")).unwrap_or_default();
    assert!(
        log.contains(&format!("cannot publish tcp port {p}")),
        "host-agent.log says nothing"
    );
    // Nothing else is affected: the earlier forward still answers.
    let web = forwards(ctx)
        .iter()
        .find(|f| f["container"] == "e2e-web")
        .and_then(|f| f["host_port"].as_u64())
        .expect("e2e-web still forwarded") as u16;
    assert_eq!(get(loopback(web)).as_deref(), Some(HELLO));
    // Once the other program lets go, the forward takes the port.
    drop(taken);
    eventually("the port is taken over", Duration::from_secs(30), || {
        get(loopback(p)).as_deref() == Some(HELLO)
    });
    ctx.docker_ok(&["rm", "-f", "e2e-clash"]);
}

fn host_agent_fds(ctx: &Ctx) -> usize {
    let pid = ctx.status()["host_agent_pid"].as_u64().unwrap();
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// One exchange with an echo server: connect, send, read it back, close.
fn echo_once(addr: SocketAddr, msg: &[u8], timeout: Duration) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, timeout) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(timeout));
    let mut back = vec![0u8; msg.len()];
    s.write_all(msg).is_ok() && s.read_exact(&mut back).is_ok() && back == msg
}

/// Against an echo server that does not fork (busybox httpd forks per
/// connection behind a listen backlog of 9: under emulation its queue,
/// not the forwarder, would be measured).
fn many_connections(ctx: &Ctx) {
    ensure_net_image(ctx);
    let p = free_port();
    let _ = ctx.docker(&["rm", "-f", "e2e-echo"]);
    ctx.docker_ok(&[
        "run",
        "-d",
        "--name",
        "e2e-echo",
        "-p",
        &format!("{p}:7"),
        NET_IMAGE,
        "nettool",
        "tcpecho",
        "7",
    ]);
    let addr = loopback(p);
    eventually("the echo answers", Duration::from_secs(30), || {
        echo_once(addr, b"hi", Duration::from_secs(2))
    });
    let fds = host_agent_fds(ctx);
    let t = Instant::now();
    for i in 0..1000 {
        let msg = format!("sequential-{i}");
        assert!(
            echo_once(addr, msg.as_bytes(), Duration::from_secs(30)),
            "sequential connection {i}"
        );
    }
    println!(
        "  1000 sequential connections in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let threads: Vec<_> = (0..200)
        .map(|i| {
            std::thread::spawn(move || {
                echo_once(
                    addr,
                    format!("concurrent-{i}").as_bytes(),
                    Duration::from_secs(120),
                )
            })
        })
        .collect();
    let ok = threads
        .into_iter()
        .map(|t| t.join().unwrap())
        .filter(|ok| *ok)
        .count();
    assert_eq!(ok, 200, "concurrent connections echoed");
    println!(
        "  200 concurrent connections in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    eventually(
        "host agent descriptors back",
        Duration::from_secs(30),
        || host_agent_fds(ctx) <= fds + 2,
    );
    ctx.docker_ok(&["rm", "-f", "e2e-echo"]);
}

fn one_gib(ctx: &Ctx) {
    const SIZE: u64 = 1 << 30;
    let p = free_port();
    let _ = ctx.docker(&["rm", "-f", "e2e-sink"]);
    ctx.docker_ok(&[
        "run",
        "-d",
        "--name",
        "e2e-sink",
        "-p",
        &format!("{p}:9000"),
        BB,
        "sh",
        "-c",
        "nc -l -p 9000 | sha256sum",
    ]);
    let addr = loopback(p);
    let mut conn = None;
    eventually("the sink accepts", Duration::from_secs(30), || {
        conn = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok();
        conn.is_some()
    });
    let mut conn = conn.unwrap();
    let mut sum = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut sum_in = sum.stdin.take().unwrap();
    // Not compressible, not repeating: a xorshift stream.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut chunk = vec![0u8; 1 << 20];
    let t = Instant::now();
    for _ in 0..SIZE / chunk.len() as u64 {
        for w in chunk.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        conn.write_all(&chunk).unwrap();
        sum_in.write_all(&chunk).unwrap();
    }
    conn.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    let _ = conn.read_to_end(&mut rest);
    let secs = t.elapsed().as_secs_f64();
    drop(sum_in);
    let want = String::from_utf8(sum.wait_with_output().unwrap().stdout).unwrap();
    let want = want.split_whitespace().next().unwrap().to_owned();
    ctx.docker_ok(&["wait", "e2e-sink"]);
    let got = ctx.docker_ok(&["logs", "e2e-sink"]);
    assert_eq!(got.split_whitespace().next(), Some(want.as_str()));
    println!(
        "  1 GiB through 127.0.0.1:{p} in {secs:.1} s ({:.0} MiB/s), sha256 {}…",
        1024.0 / secs,
        &want[..16]
    );
    ctx.docker_ok(&["rm", "-f", "e2e-sink"]);
}

fn compose(ctx: &Ctx) {
    if !super::have_program("docker-compose", "docker-compose") {
        return;
    }
    let p = free_port();
    let dir = ctx.work.join("compose-ports");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("docker-compose.yml"),
        format!(
            r#"version: "2.4"
services:
  front:
    image: {BB}
    command: ["httpd", "-f", "-p", "80", "-h", "/www"]
    ports: ["{p}:80"]
  probe:
    image: {BB}
    command: ["sh", "-c", "nslookup -type=a host.docker.internal; sleep 600"]
"#
        ),
    )
    .unwrap();
    let sock = ctx.state.join("docker.sock");
    let compose = |args: &[&str]| {
        let mut c = Command::new("docker-compose");
        c.args(["-p", "berthports"])
            .args(args)
            .current_dir(&dir)
            .env("DOCKER_HOST", format!("unix://{}", sock.display()))
            .env("DOCKER_CONFIG", &ctx.docker_config)
            .stdin(Stdio::null());
        super::ok(
            c.output().unwrap(),
            &format!("docker-compose {}", args.join(" ")),
        )
    };
    compose(&["up", "-d"]);
    eventually(
        "the compose service answers",
        Duration::from_secs(30),
        || get(loopback(p)).as_deref() == Some(HELLO),
    );
    // On the compose project's own network, host.docker.internal resolves.
    eventually(
        "compose network resolves the host",
        Duration::from_secs(60),
        || compose(&["logs", "probe"]).contains("192.168.127.1"),
    );
    compose(&["down"]);
    eventually("closed after down", Duration::from_secs(30), || {
        !open(loopback(p))
    });
}

fn after_restart(ctx: &Ctx) {
    let p = free_port();
    httpd(
        ctx,
        "e2e-always",
        &format!("{p}:80"),
        &["--restart", "always"],
    );
    eventually("answers", Duration::from_secs(30), || {
        get(loopback(p)).as_deref() == Some(HELLO)
    });
    ctx.berth_ok(&["restart"]);
    let t = Instant::now();
    eventually(
        "answers after berth restart",
        Duration::from_secs(60),
        || get(loopback(p)).as_deref() == Some(HELLO),
    );
    println!(
        "  forward back {:.1} s after `berth restart` returned",
        t.elapsed().as_secs_f64()
    );
    ctx.docker_ok(&["rm", "-f", "e2e-always", "e2e-web"]);
}
