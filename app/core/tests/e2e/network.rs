//! The VM's network: containers reach the host's loopback through
//! `host.docker.internal`, the host's own address like any outside host,
//! and names the host resolves; passt is restarted when it dies. Every
//! server and the only resolver are started by the test on this host.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::hostnet::{host_ipv4, tcp_greeter, udp_ponger, ZONE};
use super::{eventually, Case, Ctx, BB};

/// An image with the static UDP tool (busybox's nc has no UDP).
pub const NET_IMAGE: &str = "berth-e2e/net:1";
const NETWORK: &str = "e2e-net";

pub const CASES: &[Case] = &[
    ("net_guest_eth0_and_resolver", guest_eth0),
    (
        "net_host_docker_internal_reaches_host_loopback",
        host_loopback,
    ),
    ("net_host_address_like_any_outside_host", host_address),
    ("net_dns_names_the_host_resolves", dns_names),
    ("net_guest_ipv6_reaches_host_loopback", guest_ipv6),
    ("net_passt_restarted_when_killed", passt_restart),
];

/// Builds [`NET_IMAGE`] (once) and the user-defined network.
pub fn ensure_net_image(ctx: &Ctx) {
    if ctx
        .docker(&["image", "inspect", NET_IMAGE])
        .status
        .success()
    {
        return;
    }
    let dir = ctx.work.join("net-image");
    std::fs::create_dir_all(&dir).unwrap();
    let tool = berth_testkit::nettool(&dir);
    assert!(tool.exists());
    std::fs::write(
        dir.join("Dockerfile"),
        format!("FROM {BB}\nCOPY nettool /bin/nettool\n"),
    )
    .unwrap();
    ctx.docker_ok(&["build", "-q", "-t", NET_IMAGE, dir.to_str().unwrap()]);
}

fn ensure_network(ctx: &Ctx) {
    if !ctx
        .docker(&["network", "inspect", NETWORK])
        .status
        .success()
    {
        ctx.docker_ok(&["network", "create", NETWORK]);
    }
}

/// `docker run --rm` on `network` (None: the default bridge) with `args`.
fn run_on(ctx: &Ctx, network: Option<&str>, extra: &[&str], cmd: &[&str]) -> String {
    let mut a = vec!["run", "--rm"];
    if let Some(n) = network {
        a.extend(["--network", n]);
    }
    a.extend_from_slice(extra);
    a.extend_from_slice(cmd);
    ctx.docker_ok(&a)
}

fn guest_eth0(ctx: &Ctx) {
    let addr = ctx.berth_ok(&["shell", "--", "ip", "-4", "-br", "addr", "show", "eth0"]);
    assert!(
        addr.contains("192.168.127.2/24") && addr.contains("UP"),
        "{addr}"
    );
    let mtu = ctx.berth_ok(&["shell", "--", "cat", "/sys/class/net/eth0/mtu"]);
    assert_eq!(mtu.trim(), "65520");
    let route = ctx.berth_ok(&["shell", "--", "ip", "-4", "route", "show", "default"]);
    assert!(route.contains("via 192.168.127.1 dev eth0"), "{route}");
    let resolv = ctx.berth_ok(&["shell", "--", "cat", "/etc/resolv.conf"]);
    assert!(resolv.contains("nameserver 192.168.127.2"), "{resolv}");
    let st = ctx.status();
    assert_eq!(st["network"]["guest_ip"], "192.168.127.2", "{st}");
    assert_eq!(st["network"]["host_ip"], "192.168.127.1", "{st}");
    assert!(st["network"]["passt"]["pid"].as_u64().is_some(), "{st}");
    // The network came up before dockerd started.
    let console = ctx.console();
    let net_at = console
        .lines()
        .position(|l| l.starts_with("berth-agent: network ") && l.ends_with("ip=192.168.127.2"));
    let dockerd_at = console
        .lines()
        .position(|l| l.starts_with("berth-agent: dockerd-started"));
    assert!(
        net_at.is_some() && net_at < dockerd_at,
        "network before dockerd: {net_at:?} {dockerd_at:?}"
    );
    let human = ctx.berth_ok(&["status"]);
    assert!(
        human.contains("guest 192.168.127.2, host (host.docker.internal) 192.168.127.1"),
        "{human}"
    );
}

/// `wget -qO- http://HOST:PORT/` in a container (busybox 1.35's wget
/// crashes with `-T`, so `timeout` bounds it).
fn wget(host: &str, port: &str) -> Vec<String> {
    [BB, "timeout", "30", "wget", "-q", "-O", "-"]
        .iter()
        .map(|s| s.to_string())
        .chain([format!("http://{host}:{port}/")])
        .collect()
}

fn host_loopback(ctx: &Ctx) {
    ensure_net_image(ctx);
    ensure_network(ctx);
    let lo: IpAddr = "127.0.0.1".parse().unwrap();
    let port = tcp_greeter(lo, "hello-from-host-loopback").to_string();
    for network in [None, Some(NETWORK)] {
        for name in ["host.docker.internal", "gateway.docker.internal"] {
            let cmd = wget(name, &port);
            let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
            let out = run_on(ctx, network, &[], &cmd);
            assert_eq!(out.trim(), "hello-from-host-loopback", "{network:?} {name}");
        }
    }
    // A client that half-closes at once (nc with no input) still gets the
    // answer, every time.
    for _ in 0..5 {
        let out = run_on(
            ctx,
            None,
            &[],
            &[BB, "nc", "-w", "10", "host.docker.internal", &port],
        );
        assert!(out.contains("hello-from-host-loopback"), "{out}");
    }
    // A closed host port is refused at once, not left to time out.
    let closed = super::hostnet::free_port().to_string();
    let t = Instant::now();
    let o = ctx.docker(&[
        "run",
        "--rm",
        BB,
        "nc",
        "-w",
        "30",
        "host.docker.internal",
        &closed,
    ]);
    println!(
        "  closed host port: nc ended in {:.1} s (docker run included): {}",
        t.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&o.stderr).trim()
    );
    assert!(
        t.elapsed() < Duration::from_secs(25),
        "a connection to a closed host port waited for nc's timeout"
    );
    // --add-host NAME:host-gateway names the same place.
    let out = run_on(
        ctx,
        None,
        &["--add-host", "devhost:host-gateway"],
        &[
            BB,
            "sh",
            "-c",
            &format!("grep devhost /etc/hosts; timeout 30 wget -q -O - http://devhost:{port}/"),
        ],
    );
    assert!(out.contains("192.168.127.1"), "{out}");
    assert!(out.contains("hello-from-host-loopback"), "{out}");
    // UDP too.
    let uport = udp_ponger(lo).to_string();
    for network in [None, Some(NETWORK)] {
        let out = run_on(
            ctx,
            network,
            &[],
            &[
                NET_IMAGE,
                "nettool",
                "send",
                "host.docker.internal",
                &uport,
                "ping",
            ],
        );
        assert_eq!(out.trim(), "pong:ping", "{network:?}");
    }
}

fn host_address(ctx: &Ctx) {
    let ip = host_ipv4();
    // Bound to the host's own address only: loopback would not answer.
    let port = tcp_greeter(IpAddr::V4(ip), "hello-from-host-address").to_string();
    let cmd = wget(&ip.to_string(), &port);
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let out = run_on(ctx, None, &[], &cmd);
    assert_eq!(out.trim(), "hello-from-host-address");
    // By a name the host's resolver knows.
    let cmd = wget(&format!("svc.{ZONE}"), &port);
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let out = run_on(ctx, Some(NETWORK), &[], &cmd);
    assert_eq!(out.trim(), "hello-from-host-address");
    let uport = udp_ponger(IpAddr::V4(ip)).to_string();
    let out = run_on(
        ctx,
        None,
        &[],
        &[
            NET_IMAGE,
            "nettool",
            "send",
            &ip.to_string(),
            &uport,
            "ping",
        ],
    );
    assert_eq!(out.trim(), "pong:ping");
}

/// busybox nslookup's answer lines for `name`.
fn lookup(ctx: &Ctx, network: Option<&str>, name: &str) -> String {
    let mut a = vec!["run", "--rm"];
    if let Some(n) = network {
        a.extend(["--network", n]);
    }
    a.extend([BB, "nslookup", "-type=a", name]);
    let out = ctx.docker(&a);
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn dns_names(ctx: &Ctx) {
    let host = host_ipv4().to_string();
    for network in [None, Some(NETWORK)] {
        let out = lookup(ctx, network, &format!("api.{ZONE}"));
        assert!(
            out.contains(&format!("Address: {host}")),
            "{network:?}: {out}"
        );
        let out = lookup(ctx, network, "host.docker.internal");
        assert!(out.contains("Address: 192.168.127.1"), "{network:?}: {out}");
        let t = Instant::now();
        let out = lookup(ctx, network, "no-such-name.invalid");
        assert!(
            out.contains("NXDOMAIN") || out.contains("can't find"),
            "{network:?}: {out}"
        );
        println!(
            "  {}: unknown name answered in {:.1} s (docker run included)",
            network.unwrap_or("bridge"),
            t.elapsed().as_secs_f64()
        );
    }
    // A name only this host's /etc/hosts knows, for its loopback: the
    // guest gets the router that leads there.
    let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    let local_name = hosts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        (f.next() == Some("127.0.0.1"))
            .then(|| f.find(|n| !n.starts_with("localhost")))
            .flatten()
            .map(str::to_owned)
    });
    match local_name {
        Some(n) => {
            let out = lookup(ctx, None, &n);
            assert!(out.contains("Address: 192.168.127.1"), "{n}: {out}");
        }
        None => {
            println!("  (no non-localhost name for 127.0.0.1 in /etc/hosts: that check skipped)")
        }
    }
    // The guest itself resolves through the same relay.
    let out = ctx.berth_ok(&["shell", "--", "getent", "hosts", &format!("db.{ZONE}")]);
    assert!(out.contains(&host), "{out}");
}

fn guest_ipv6(ctx: &Ctx) {
    let st = ctx.status();
    if st["network"]["ipv6"] != true {
        println!(
            "  *** SKIPPED: this host has no IPv6 default route, so the guest has no IPv6 ***"
        );
        return;
    }
    let port = tcp_greeter("::1".parse().unwrap(), "hello-over-ipv6");
    let out = ctx.berth_ok(&[
        "shell",
        "--",
        "bash",
        "-c",
        &format!(
            "exec 3<>/dev/tcp/fd00:b5:127::1/{port}; printf 'GET / HTTP/1.0\\r\\n\\r\\n' >&3; timeout 10 cat <&3"
        ),
    ]);
    assert!(out.contains("hello-over-ipv6"), "{out}");
}

fn passt_restart(ctx: &Ctx) {
    let st = ctx.status();
    let pid = st["network"]["passt"]["pid"].as_u64().expect("passt pid");
    // The host's own address: traffic that passt carries.
    let ip = host_ipv4();
    let port = tcp_greeter(IpAddr::V4(ip), "hello-after-restart").to_string();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let t = Instant::now();
    eventually("a new passt", Duration::from_secs(30), || {
        let s = ctx.status();
        s["network"]["passt"]["pid"]
            .as_u64()
            .is_some_and(|p| p != pid)
            && s["network"]["passt"]["restarts"].as_u64() >= Some(1)
    });
    println!("  passt back after {:.1} s", t.elapsed().as_secs_f64());
    // A new outbound connection works, without a VM restart.
    let cmd = wget(&ip.to_string(), &port);
    let mut a = vec!["run", "--rm"];
    a.extend(cmd.iter().map(String::as_str));
    eventually(
        "outbound after the restart",
        Duration::from_secs(60),
        || {
            let o = ctx.docker(&a);
            String::from_utf8_lossy(&o.stdout).contains("hello-after-restart")
        },
    );
    println!(
        "  outbound connection works {:.1} s after the kill",
        t.elapsed().as_secs_f64()
    );
    let log = std::fs::read_to_string(ctx.state.join("host-agent.log")).unwrap_or_default();
    assert!(log.contains("passt exited"), "host-agent.log says nothing");
}
