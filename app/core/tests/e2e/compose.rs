//! docker-compose (Debian's package) against Berth, through the context.

use std::time::Duration;

use super::{eventually, Case, Ctx, BB};

pub const CASES: &[Case] = &[("compose_two_services_healthcheck", two_services)];

fn two_services(ctx: &Ctx) {
    if !super::have_program("docker-compose", "docker-compose") {
        return;
    }
    let dir = ctx.work.join("compose");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("docker-compose.yml"),
        format!(
            r#"version: "2.4"
services:
  db:
    image: {BB}
    command: ["httpd", "-f", "-p", "80", "-h", "/www"]
    healthcheck:
      test: ["CMD", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1/"]
      interval: 1s
      timeout: 3s
      retries: 30
  web:
    image: {BB}
    depends_on:
      db:
        condition: service_healthy
    command: ["sh", "-c", "wget -qO- http://db/ && echo web-reached-db; sleep 600"]
"#
        ),
    )
    .unwrap();
    // docker-compose v1 does not read docker contexts: DOCKER_HOST it is.
    let sock = ctx.state.join("docker.sock");
    let compose = |args: &[&str]| {
        let mut c = std::process::Command::new("docker-compose");
        c.args(["-p", "berthe2e"])
            .args(args)
            .current_dir(&dir)
            .env("DOCKER_HOST", format!("unix://{}", sock.display()))
            .env("DOCKER_CONFIG", &ctx.docker_config)
            .stdin(std::process::Stdio::null());
        super::ok(
            c.output().unwrap(),
            &format!("docker-compose {}", args.join(" ")),
        )
    };
    compose(&["up", "-d"]);
    let ps = compose(&["ps"]);
    assert!(
        ps.contains("berthe2e_db_1") && ps.contains("berthe2e_web_1"),
        "{ps}"
    );
    assert!(ps.contains("healthy"), "{ps}");
    eventually("web reached db", Duration::from_secs(60), || {
        compose(&["logs", "web"]).contains("web-reached-db")
    });
    let logs = compose(&["logs", "web"]);
    assert!(logs.contains("hello from busybox httpd"), "{logs}");
    compose(&["down"]);
    let left = ctx.docker_ok(&["ps", "-a", "--format", "{{.Names}}"]);
    assert!(!left.contains("berthe2e"), "{left}");
}
