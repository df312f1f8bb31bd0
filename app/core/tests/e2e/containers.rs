//! Everyday docker CLI use through the forwarded socket.

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::time::Duration;

use berth_testkit::pty::PtySession;

use super::{eventually, Case, Ctx, BB};

pub const CASES: &[Case] = &[
    ("docker_version_info", version_info),
    ("docker_run_rm", run_rm),
    ("docker_run_stdin_half_close", run_stdin_half_close),
    ("docker_run_d_logs_follow_stop_rm", run_detached_logs),
    ("docker_exec_it", exec_it),
    ("docker_run_it", run_it),
    ("docker_cp_both_ways", cp_both_ways),
    ("docker_volume_survives_recreation", volume_recreation),
    ("docker_network_by_name", network_by_name),
    ("docker_stats_inspect_df_prune", stats_inspect_df_prune),
    ("docker_events_stream", events_stream),
];

fn version_info(ctx: &Ctx) {
    let v = ctx.docker_ok(&["version", "--format", "{{.Server.Version}}"]);
    assert!(v.trim().starts_with("20.10"), "{v}");
    let info = ctx.docker_ok(&[
        "info",
        "--format",
        "{{.OperatingSystem}}|{{.Driver}}|{{.CgroupVersion}}",
    ]);
    assert!(info.contains("overlay2") && info.contains("|2"), "{info}");
}

fn run_rm(ctx: &Ctx) {
    let out = ctx.docker_ok(&["run", "--rm", BB, "sh", "-c", "echo hi from $(uname -s)"]);
    assert_eq!(out, "hi from Linux\n");
    let out = ctx.docker(&["run", "--rm", BB, "sh", "-c", "exit 9"]);
    assert_eq!(out.status.code(), Some(9));
}

fn run_stdin_half_close(ctx: &Ctx) {
    let mut child = ctx
        .docker_cmd(&["run", "--rm", "-i", BB, "sh", "-c", "wc -c; echo done"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&vec![b'x'; 300_000]).unwrap();
    drop(stdin); // EOF must reach wc through the forwarder and vsock
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["300000", "done"]
    );
}

fn run_detached_logs(ctx: &Ctx) {
    let id = ctx.docker_ok(&[
        "run", "-d", "--name", "e2e-logger", BB, "sh", "-c",
        "trap 'echo bye; exit 0' TERM; i=0; while true; do i=$((i+1)); echo line-$i; sleep 0.2; done",
    ]);
    assert_eq!(id.trim().len(), 64);
    let mut follow = ctx
        .docker_cmd(&["logs", "-f", "e2e-logger"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(follow.stdout.take().unwrap()).lines();
    for want in ["line-1", "line-2", "line-3"] {
        assert_eq!(lines.next().unwrap().unwrap(), want);
    }
    ctx.docker_ok(&["stop", "-t", "20", "e2e-logger"]);
    // The stream ends by itself when the container stops.
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert_eq!(rest.last().map(String::as_str), Some("bye"), "{rest:?}");
    assert!(follow.wait().unwrap().success());
    ctx.docker_ok(&["rm", "e2e-logger"]);
    let ps = ctx.docker_ok(&["ps", "-a", "--format", "{{.Names}}"]);
    assert!(!ps.contains("e2e-logger"));
}

fn exec_it(ctx: &Ctx) {
    ctx.docker_ok(&["run", "-d", "--name", "e2e-exec", BB, "sleep", "600"]);
    let mut s = PtySession::spawn(ctx.docker_cmd(&["exec", "-it", "e2e-exec", "sh"]));
    s.expect("# ", Duration::from_secs(30));
    s.send("tty; echo exec-$((2*21))\n");
    s.expect("exec-42", Duration::from_secs(20));
    s.send("exit 4\n");
    assert_eq!(s.wait(Duration::from_secs(20)), 4);
    let out = s.output();
    assert!(out.contains("/dev/pts/"), "{out}");
    ctx.docker_ok(&["rm", "-f", "e2e-exec"]);
}

fn run_it(ctx: &Ctx) {
    let mut s = PtySession::spawn(ctx.docker_cmd(&["run", "--rm", "-it", BB, "sh"]));
    s.expect("# ", Duration::from_secs(30));
    s.send("echo run-it-$((100+1)); tty\n");
    s.expect("run-it-101", Duration::from_secs(20));
    s.send("exit 3\n");
    assert_eq!(s.wait(Duration::from_secs(20)), 3);
    assert!(s.output().contains("/dev/pts/"), "{}", s.output());
}

fn cp_both_ways(ctx: &Ctx) {
    let src = ctx.work.join("cp-in.bin");
    let data: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    std::fs::write(&src, &data).unwrap();
    ctx.docker_ok(&["run", "-d", "--name", "e2e-cp", BB, "sleep", "600"]);
    ctx.docker_ok(&["cp", src.to_str().unwrap(), "e2e-cp:/tmp/in.bin"]);
    let inside = ctx.docker_ok(&["exec", "e2e-cp", "md5sum", "/tmp/in.bin"]);
    let host = std::process::Command::new("md5sum")
        .arg(&src)
        .output()
        .unwrap();
    assert_eq!(
        inside.split_whitespace().next(),
        String::from_utf8_lossy(&host.stdout)
            .split_whitespace()
            .next()
    );
    ctx.docker_ok(&["exec", "e2e-cp", "sh", "-c", "cp /tmp/in.bin /tmp/out.bin"]);
    let dst = ctx.work.join("cp-out.bin");
    ctx.docker_ok(&["cp", "e2e-cp:/tmp/out.bin", dst.to_str().unwrap()]);
    assert!(
        std::fs::read(&dst).unwrap() == data,
        "copied-out file differs"
    );
    ctx.docker_ok(&["rm", "-f", "e2e-cp"]);
}

fn volume_recreation(ctx: &Ctx) {
    ctx.docker_ok(&["volume", "create", "e2e-vol"]);
    ctx.docker_ok(&[
        "run",
        "--rm",
        "-v",
        "e2e-vol:/data",
        BB,
        "sh",
        "-c",
        "echo kept > /data/f; sync",
    ]);
    let out = ctx.docker_ok(&["run", "--rm", "-v", "e2e-vol:/data", BB, "cat", "/data/f"]);
    assert_eq!(out, "kept\n");
}

fn network_by_name(ctx: &Ctx) {
    ctx.docker_ok(&["network", "create", "e2e-net"]);
    ctx.docker_ok(&[
        "run",
        "-d",
        "--name",
        "e2e-web",
        "--network",
        "e2e-net",
        BB,
        "httpd",
        "-f",
        "-p",
        "80",
        "-h",
        "/www",
    ]);
    let mut got = String::new();
    eventually("wget http://e2e-web/", Duration::from_secs(30), || {
        let o = ctx.docker(&[
            "run",
            "--rm",
            "--network",
            "e2e-net",
            BB,
            "wget",
            "-qO-",
            "http://e2e-web/",
        ]);
        got = String::from_utf8_lossy(&o.stdout).into_owned();
        o.status.success()
    });
    assert_eq!(got, "hello from busybox httpd\n");
    ctx.docker_ok(&["rm", "-f", "e2e-web"]);
    ctx.docker_ok(&["network", "rm", "e2e-net"]);
}

fn stats_inspect_df_prune(ctx: &Ctx) {
    ctx.docker_ok(&["run", "-d", "--name", "e2e-stats", BB, "sleep", "600"]);
    let stats = ctx.docker_ok(&[
        "stats",
        "--no-stream",
        "--format",
        "{{.Name}} {{.MemUsage}}",
        "e2e-stats",
    ]);
    assert!(
        stats.starts_with("e2e-stats ") && stats.contains("iB"),
        "{stats}"
    );
    let insp = ctx.docker_ok(&["inspect", "e2e-stats"]);
    let v: serde_json::Value = serde_json::from_str(&insp).unwrap();
    assert_eq!(v[0]["State"]["Running"], true);
    assert_eq!(v[0]["Config"]["Image"], BB);
    let df = ctx.docker_ok(&["system", "df"]);
    assert!(
        df.contains("Images") && df.contains("Local Volumes"),
        "{df}"
    );
    ctx.docker_ok(&["rm", "-f", "e2e-stats"]);
    ctx.docker_ok(&["run", "--name", "e2e-dead", BB, "true"]);
    let pruned = ctx.docker_ok(&["system", "prune", "-f"]);
    assert!(pruned.contains("Total reclaimed space"), "{pruned}");
    let all = ctx.docker_ok(&["ps", "-a", "--format", "{{.Names}}"]);
    assert!(!all.contains("e2e-dead"), "{all}");
    // Named volumes are not pruned without --volumes.
    assert!(ctx.docker_ok(&["volume", "ls", "-q"]).contains("e2e-vol"));
}

fn events_stream(ctx: &Ctx) {
    let mut ev = ctx
        .docker_cmd(&[
            "events",
            "--format",
            "{{.Type}} {{.Action}} {{.Actor.Attributes.name}}",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(ev.stdout.take().unwrap()).lines();
    std::thread::sleep(Duration::from_millis(500));
    ctx.docker_ok(&["run", "--rm", "--name", "e2e-evt", BB, "true"]);
    let mut seen = Vec::new();
    for l in lines.by_ref() {
        let l = l.unwrap();
        seen.push(l.clone());
        if l == "container destroy e2e-evt" {
            break;
        }
        assert!(seen.len() < 50, "{seen:?}");
    }
    assert!(
        seen.iter().any(|l| l == "container start e2e-evt"),
        "{seen:?}"
    );
    let _ = ev.kill();
    let _ = ev.wait();
}
