//! End to end in the real app: the release-embedded UI in WebKitGTK under
//! Xvfb, driven through tauri-driver and WebKitWebDriver, against a real
//! Berth VM that the UI itself starts (QEMU with TCG here). What the UI
//! shows is checked against the `docker` and `berth` CLIs.
//!
//! A custom harness (`harness = false`): one app, one VM, cases in order,
//! each reported as `case <name> ... ok`. It needs the app built with the
//! UI embedded, which `cargo test` would overwrite with a dev build, so
//! `scripts/test.sh` builds it and copies it to
//! `target/debug/berth-desktop-e2e` (beside `berth`, which runs the host
//! agent, and `berth-vmm`). Screenshots go to `target/screenshots/` (or
//! `BERTH_SCREENSHOT_DIR`).

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use berth_testkit::{busybox_rootfs_tar, require_image, Scratch};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

/// The guest boots under TCG here: give `Start` time.
const BOOT: Duration = Duration::from_secs(300);
const CONTAINER: &str = "desk-e2e";
const IMAGE: &str = "berth-desk-e2e/busybox:1";

struct Env {
    work: PathBuf,
    data_home: PathBuf,
    docker_config: PathBuf,
    image_dir: PathBuf,
    app: PathBuf,
    app_dir: PathBuf,
    shots: PathBuf,
    /// The session bus the app (and its tray) is on.
    bus: String,
}

impl Env {
    fn apply(&self, c: &mut Command) {
        c.env("XDG_DATA_HOME", &self.data_home)
            .env("DOCKER_CONFIG", &self.docker_config)
            .env("BERTH_IMAGE_DIR", &self.image_dir)
            .env_remove("DOCKER_HOST")
            .env_remove("DOCKER_CONTEXT")
            .env("DBUS_SESSION_BUS_ADDRESS", &self.bus)
            .stdin(Stdio::null());
    }

    fn run(&self, program: &Path, args: &[&str]) -> (bool, String, String) {
        let mut c = Command::new(program);
        c.args(args);
        self.apply(&mut c);
        let out = c.output().expect("running a client");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn berth_ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.run(&self.app_dir.join("berth"), args);
        assert!(ok, "berth {} failed: {out}{err}", args.join(" "));
        out
    }

    fn docker(&self, args: &[&str]) -> (bool, String, String) {
        self.run(Path::new("docker"), args)
    }

    fn docker_ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.docker(args);
        assert!(ok, "docker {} failed: {out}{err}", args.join(" "));
        out
    }
}

/// Skips loudly, or fails where the whole suite must run.
fn skip(msg: &str) -> ExitCode {
    if std::env::var("BERTH_E2E_REQUIRED").as_deref() == Ok("1") {
        eprintln!("FAILED e2e_desktop: {msg}");
        return ExitCode::FAILURE;
    }
    eprintln!("\n*** SKIPPED e2e_desktop: {msg} ***\n");
    ExitCode::SUCCESS
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn wait_port(port: u16, timeout: Duration) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// A child process group killed when dropped.
struct Group(Child);

impl Drop for Group {
    fn drop(&mut self) {
        let pgid = self.0.id() as i32;
        let _ = Command::new("kill")
            .args(["-TERM", "--", &format!("-{pgid}")])
            .status();
        std::thread::sleep(Duration::from_millis(300));
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pgid}")])
            .status();
        let _ = self.0.wait();
    }
}

fn spawn_group(mut c: Command, log: &Path) -> Group {
    let f = std::fs::File::create(log).expect("log file");
    c.stdout(f.try_clone().unwrap())
        .stderr(f)
        .stdin(Stdio::null())
        .process_group(0);
    Group(c.spawn().expect("spawning"))
}

fn free_display() -> u32 {
    (91..200)
        .find(|n| !Path::new(&format!("/tmp/.X11-unix/X{n}")).exists())
        .expect("a free X display")
}

/// The UI's text at `css` (empty if absent), read in the page.
async fn text(c: &Client, css: &str) -> String {
    c.execute(
        "const e = document.querySelector(arguments[0]); return e ? e.textContent : '';",
        vec![json!(css)],
    )
    .await
    .ok()
    .and_then(|v| v.as_str().map(str::to_owned))
    .unwrap_or_default()
}

async fn count(c: &Client, css: &str) -> usize {
    c.execute(
        "return document.querySelectorAll(arguments[0]).length;",
        vec![json!(css)],
    )
    .await
    .ok()
    .and_then(|v| v.as_u64())
    .unwrap_or(0) as usize
}

/// Polls `check` (every 50 ms) until true; returns how long it took.
async fn until<F, Fut>(what: &str, timeout: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t0 = Instant::now();
    loop {
        if check().await {
            return t0.elapsed();
        }
        assert!(t0.elapsed() < timeout, "{what}: not seen after {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn click(c: &Client, css: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .click()
        .await
        .unwrap_or_else(|e| panic!("clicking {css}: {e}"));
}

async fn shot(c: &Client, env: &Env, name: &str) {
    // Let WebKit paint.
    tokio::time::sleep(Duration::from_millis(400)).await;
    match c.screenshot().await {
        Ok(png) => {
            let p = env.shots.join(format!("{name}.png"));
            std::fs::write(&p, png).unwrap();
            println!("      screenshot {}", p.display());
        }
        Err(e) => println!("      screenshot {name} failed: {e}"),
    }
}

fn row_css(name: &str) -> String {
    format!("[data-testid=container-row][data-name=\"{name}\"]")
}

type Case = (&'static str, for<'a> fn(&'a Client, &'a Env) -> CaseFut<'a>);
type CaseFut<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + 'a>>;

fn cases() -> Vec<Case> {
    vec![
        ("ui_shows_a_stopped_engine", |c, e| {
            Box::pin(stopped_engine(c, e))
        }),
        ("ui_starts_the_engine", |c, e| Box::pin(starts_engine(c, e))),
        ("ui_lists_a_cli_container_live", |c, e| {
            Box::pin(lists_cli_container(c, e))
        }),
        ("ui_streams_logs_live", |c, e| Box::pin(streams_logs(c, e))),
        ("ui_terminal_runs_a_command", |c, e| {
            Box::pin(terminal_runs(c, e))
        }),
        ("ui_charts_a_containers_stats", |c, e| {
            Box::pin(charts_stats(c, e))
        }),
        ("ui_stops_and_removes_a_container", |c, e| {
            Box::pin(stops_and_removes(c, e))
        }),
        ("ui_pulls_and_removes_images", |c, e| {
            Box::pin(pulls_and_removes_images(c, e))
        }),
        ("ui_manages_and_browses_volumes", |c, e| {
            Box::pin(volumes(c, e))
        }),
        ("ui_figures_300_containers_100k_lines", |c, e| {
            Box::pin(figures(c, e))
        }),
        ("ui_settings_agree_with_the_cli", |c, e| {
            Box::pin(settings_agree(c, e))
        }),
        ("ui_troubleshoot_and_engine_use", |c, e| {
            Box::pin(troubleshoot(c, e))
        }),
        ("ui_dark_theme_screenshots", |c, e| {
            Box::pin(dark_theme(c, e))
        }),
        ("ui_tray_over_dbus", |c, e| Box::pin(tray_over_dbus(c, e))),
    ]
}

async fn stopped_engine(c: &Client, env: &Env) {
    until(
        "the stopped engine's empty state",
        Duration::from_secs(20),
        || async {
            text(c, "[data-testid=containers-empty]")
                .await
                .contains("stopped")
        },
    )
    .await;
    shot(c, env, "containers-engine-stopped").await;
    click(c, "[data-testid=nav-engine]").await;
    until("the engine view", Duration::from_secs(5), || async {
        text(c, "[data-testid=engine-state]").await == "stopped"
    })
    .await;
    shot(c, env, "engine-stopped").await;
}

async fn starts_engine(c: &Client, env: &Env) {
    click(c, "[data-testid=engine-start]").await;
    let saw = std::cell::Cell::new(false);
    let t = until("the engine running", BOOT, || async {
        if !text(c, "[data-testid=engine-progress]").await.is_empty() {
            saw.set(true);
        }
        text(c, "[data-testid=engine-state]").await == "running"
    })
    .await;
    let saw_progress = saw.get();
    println!(
        "      running after {:.1} s (progress lines shown: {saw_progress})",
        t.as_secs_f64()
    );
    assert!(saw_progress, "no progress lines were shown while starting");
    let st: serde_json::Value =
        serde_json::from_str(&env.berth_ok(&["status", "--json"])).expect("status JSON");
    assert_eq!(st["state"], "running", "berth status disagrees: {st}");
    until("the Docker version", Duration::from_secs(10), || async {
        text(c, "[data-testid=engine-docker]").await.contains('.')
    })
    .await;
    shot(c, env, "engine-running").await;
}

async fn lists_cli_container(c: &Client, env: &Env) {
    let tar = busybox_rootfs_tar(&env.work);
    env.docker_ok(&["import", tar.to_str().unwrap(), IMAGE]);
    click(c, "[data-testid=nav-containers]").await;
    until(
        "the empty container list",
        Duration::from_secs(20),
        || async {
            count(c, "[data-testid=containers-none]").await == 1
                || count(c, "[data-testid=container-row]").await > 0
        },
    )
    .await;
    // Prints a line, then one more each time /tmp/go appears.
    let script = "echo first-line; echo to-stderr >&2; \
                  while sleep 0.2; do if [ -f /tmp/go ]; then rm /tmp/go; echo LIVE-$(cat /proc/uptime); fi; done";
    env.docker_ok(&[
        "run",
        "-d",
        "--name",
        CONTAINER,
        "-p",
        "127.0.0.1:18090:80",
        IMAGE,
        "sh",
        "-c",
        script,
    ]);
    let running = row_css(CONTAINER) + "[data-state=running]";
    let t = until(
        "the container listed as running",
        Duration::from_secs(10),
        || async { count(c, &running).await == 1 },
    )
    .await;
    println!(
        "      listed as running {:.0} ms after `docker run -d` returned",
        t.as_secs_f64() * 1000.0
    );
    assert!(
        t < Duration::from_secs(1),
        "listed after {t:?}, not within a second"
    );
    shot(c, env, "containers-running").await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    rss_figure("idle on the container list, one container").await;
}

/// The app's resident memory: its own process and WebKit's (the host
/// agent it started is the engine's, not the app's, and is left out).
async fn rss_figure(when: &str) {
    if let Some(pid) = app_pid() {
        let mut parts = vec![("app".to_owned(), rss_kib(pid))];
        parts.extend(
            children(pid)
                .into_iter()
                .filter(|(_, n)| n.starts_with("WebKit"))
                .map(|(p, n)| (n, rss_kib(p))),
        );
        let rss: u64 = parts.iter().map(|p| p.1 .0).sum();
        let pss: u64 = parts.iter().map(|p| p.1 .1).sum();
        println!(
            "      figure: app memory, {when}: RSS {} MiB, PSS {} MiB ({})",
            rss / 1024,
            pss / 1024,
            parts
                .iter()
                .map(|(n, (r, p))| format!("{n} RSS {} / PSS {} MiB", r / 1024, p / 1024))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
}

async fn streams_logs(c: &Client, env: &Env) {
    click(c, &format!("{} [data-row-name]", row_css(CONTAINER))).await;
    until("the first log line", Duration::from_secs(20), || async {
        text(c, "[data-testid=logs-lines]")
            .await
            .contains("first-line")
    })
    .await;
    assert!(
        count(c, "[data-testid=logs-lines] .line.err").await >= 1,
        "stderr is not told apart"
    );
    env.docker_ok(&["exec", CONTAINER, "touch", "/tmp/go"]);
    let t = until("a live log line", Duration::from_secs(20), || async {
        text(c, "[data-testid=logs-lines]").await.contains("LIVE-")
    })
    .await;
    println!(
        "      live line shown {:.0} ms after `docker exec` returned",
        t.as_secs_f64() * 1000.0
    );
    // Search highlights.
    let search = c
        .find(Locator::Css("[data-testid=logs-search]"))
        .await
        .unwrap();
    search.send_keys("live").await.unwrap();
    until("the search hit", Duration::from_secs(5), || async {
        text(c, "[data-testid=logs-hits]").await.contains("1 of 1")
    })
    .await;
    assert!(count(c, "[data-testid=logs-lines] mark").await >= 1);
    shot(c, env, "container-logs").await;
}

async fn terminal_runs(c: &Client, env: &Env) {
    click(c, "[data-testid=tab-terminal]").await;
    until("the shell", Duration::from_secs(30), || async {
        count(c, "[data-testid=terminal-status]").await == 0
            && count(c, ".xterm-helper-textarea").await == 1
    })
    .await;
    let input = c
        .find(Locator::Css(".xterm-helper-textarea"))
        .await
        .unwrap();
    input
        .send_keys("echo answer-$((6*7))\u{E007}")
        .await
        .unwrap();
    until("the command's output", Duration::from_secs(20), || async {
        text(c, ".xterm-rows").await.contains("answer-42")
    })
    .await;
    shot(c, env, "container-terminal").await;
}

async fn stops_and_removes(c: &Client, env: &Env) {
    click(c, "button[aria-label='Back to the list']").await;
    until("the list", Duration::from_secs(10), || async {
        count(c, &row_css(CONTAINER)).await == 1
    })
    .await;
    click(c, &format!("{} [data-testid=row-stop]", row_css(CONTAINER))).await;
    until(
        "docker seeing it stopped",
        Duration::from_secs(60),
        || async {
            env.docker(&["inspect", "-f", "{{.State.Running}}", CONTAINER])
                .1
                .trim()
                == "false"
        },
    )
    .await;
    until(
        "the list showing it exited",
        Duration::from_secs(10),
        || async {
            c.execute(
                "const r = document.querySelector(arguments[0]); return r ? r.dataset.state : '';",
                vec![json!(row_css(CONTAINER))],
            )
            .await
            .ok()
            .and_then(|v| v.as_str().map(|s| s == "exited"))
            .unwrap_or(false)
        },
    )
    .await;
    click(
        c,
        &format!("{} [data-testid=row-remove]", row_css(CONTAINER)),
    )
    .await;
    until("the confirmation", Duration::from_secs(5), || async {
        count(c, "[data-testid=confirm]").await == 1
    })
    .await;
    shot(c, env, "containers-remove-confirm").await;
    click(c, "[data-testid=confirm-remove]").await;
    until(
        "docker no longer listing it",
        Duration::from_secs(30),
        || async {
            !env.docker_ok(&["ps", "-a", "--format", "{{.Names}}"])
                .lines()
                .any(|n| n == CONTAINER)
        },
    )
    .await;
    until("the list dropping it", Duration::from_secs(10), || async {
        count(c, &row_css(CONTAINER)).await == 0
    })
    .await;
}

async fn settings_agree(c: &Client, env: &Env) {
    click(c, "[data-testid=nav-settings]").await;
    let before: u32 = env
        .berth_ok(&["config", "get", "cpus"])
        .trim()
        .parse()
        .unwrap();
    let want = if before == 1 { 2 } else { before - 1 };
    let cpus = c
        .find(Locator::Css("[data-testid=set-cpus]"))
        .await
        .unwrap();
    until("the settings form", Duration::from_secs(10), || async {
        cpus.prop("value").await.ok().flatten().as_deref() == Some(&before.to_string())
    })
    .await;
    cpus.clear().await.unwrap();
    cpus.send_keys(&want.to_string()).await.unwrap();
    click(c, "[data-testid=settings-save]").await;
    until(
        "the restart-needed notice",
        Duration::from_secs(10),
        || async { count(c, "[data-testid=restart-needed]").await == 1 },
    )
    .await;
    assert_eq!(
        env.berth_ok(&["config", "get", "cpus"]).trim(),
        want.to_string(),
        "berth config get disagrees with the UI"
    );
    shot(c, env, "settings-restart-needed").await;
    // An invalid value is refused with the CLI's message.
    cpus.clear().await.unwrap();
    cpus.send_keys("0").await.unwrap();
    click(c, "[data-testid=settings-save]").await;
    until(
        "the validation message",
        Duration::from_secs(10),
        || async { !text(c, ".err").await.is_empty() },
    )
    .await;
    assert_eq!(
        env.berth_ok(&["config", "get", "cpus"]).trim(),
        want.to_string()
    );
    // Back as it was, for the next run.
    env.berth_ok(&["config", "set", "cpus", &before.to_string()]);
}

async fn js(c: &Client, script: &str, args: Vec<serde_json::Value>) -> serde_json::Value {
    c.execute(script, args)
        .await
        .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
}

async fn type_into(c: &Client, css: &str, value: &str) {
    let e = c
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"));
    e.clear().await.unwrap();
    e.send_keys(value).await.unwrap();
}

/// Calls an app command straight from the page, as the UI does; returns
/// `{ok}` or `{err}` (the UiError).
async fn invoke(c: &Client, cmd: &str, args: serde_json::Value) -> serde_json::Value {
    c.execute_async(
        "const [cmd, args, done] = arguments;
         window.__TAURI_INTERNALS__.invoke(cmd, args)
           .then((ok) => done({ ok }), (err) => done({ err }));",
        vec![json!(cmd), args],
    )
    .await
    .unwrap_or_else(|e| panic!("invoking {cmd}: {e}"))
}

/// The app's process id (the e2e copy's name is unique).
fn app_pid() -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == "berth-desktop-e" || comm.trim() == "berth-desktop-e2e").then_some(pid)
    })
}

/// Resident and proportional (shared pages divided among their users)
/// KiB of a process.
fn rss_kib(pid: u32) -> (u64, u64) {
    let field = |file: &str, key: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/{file}"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("status", "VmRSS:"), field("smaps_rollup", "Pss:"))
}

/// Child processes of `pid` (WebKit's web and network processes).
fn children(pid: u32) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        // pid (comm) state ppid …
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        if rest.split_whitespace().nth(1).and_then(|v| v.parse().ok()) == Some(pid) {
            let comm = std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
            out.push((p, comm.trim().to_owned()));
        }
    }
    out
}

/// Wall-clock start of a process, Unix ms (from /proc: boot time plus its
/// start in clock ticks).
fn process_start_ms(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ticks: f64 = stat
        .rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()?;
    let btime: f64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    Some((btime + ticks / hz) * 1000.0)
}

/// Start-up figure: the app process's start to the UI's first painted
/// frame (main.ts records it).
async fn first_paint_figure(c: &Client) {
    let mut painted = serde_json::Value::Null;
    for _ in 0..200 {
        painted = js(c, "return window.__berthFirstPaint ?? null;", vec![]).await;
        if !painted.is_null() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    match (app_pid().and_then(process_start_ms), painted.as_f64()) {
        (Some(start), Some(paint)) => println!(
            "      figure: app start to first paint {:.0} ms (process start to the UI's first frame)",
            paint - start
        ),
        other => println!("      figure: first paint not measured ({other:?})"),
    }
}

async fn charts_stats(c: &Client, env: &Env) {
    click(c, "[data-testid=tab-stats]").await;
    until("the stats chart", Duration::from_secs(30), || async {
        text(c, "[data-testid=stats-mem]").await.contains('B')
    })
    .await;
    // A few samples for the lines.
    tokio::time::sleep(Duration::from_secs(3)).await;
    shot(c, env, "container-stats").await;
    click(c, "[data-testid=tab-inspect]").await;
    until("the inspect data", Duration::from_secs(20), || async {
        text(c, ".inspect").await.contains("Environment")
    })
    .await;
    shot(c, env, "container-inspect").await;
}

async fn pulls_and_removes_images(c: &Client, env: &Env) {
    // A registry on the host's loopback, as public ones are unreachable.
    let port = free_port();
    let cfg = env.work.join("registry.yml");
    std::fs::write(
        &cfg,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            env.work.join("registry").display()
        ),
    )
    .unwrap();
    let _registry = spawn_group(
        {
            let mut c = Command::new("docker-registry");
            c.args(["serve", cfg.to_str().unwrap()]);
            c
        },
        &env.work.join("registry.log"),
    );
    assert!(
        wait_port(port, Duration::from_secs(20)),
        "the registry did not listen: {}",
        std::fs::read_to_string(env.work.join("registry.log")).unwrap_or_default()
    );
    // An image of its own: our busybox plus an 8 MiB layer, so the pull
    // has a layer to download and extract.
    let remote = format!("host.docker.internal:{port}/berth-e2e/pulled:1");
    env.docker_ok(&[
        "run",
        "--name",
        "desk-layer",
        IMAGE,
        "sh",
        "-c",
        "dd if=/dev/urandom of=/blob bs=1024 count=8192 2>/dev/null",
    ]);
    env.docker_ok(&["commit", "desk-layer", &remote]);
    env.docker_ok(&["rm", "desk-layer"]);
    env.docker_ok(&["push", &remote]);
    env.docker_ok(&["rmi", &remote]);

    click(c, "[data-testid=nav-images]").await;
    until("the image list", Duration::from_secs(20), || async {
        count(c, "[data-testid=image-row]").await >= 1
    })
    .await;
    // Every state the progress panel shows, however briefly.
    js(
        c,
        "window.__pullSeen = [];
         new MutationObserver(() => {
           const p = document.querySelector('[data-testid=pull-progress]');
           if (p) window.__pullSeen.push(p.textContent);
         }).observe(document.body, { subtree: true, childList: true, characterData: true });",
        vec![],
    )
    .await;
    type_into(c, "[data-testid=pull-ref]", &remote).await;
    click(c, "[data-testid=pull-go]").await;
    let row = format!("[data-testid=image-row][data-tags~=\"{remote}\"]");
    let t = until(
        "the pulled image listed",
        Duration::from_secs(120),
        || async { count(c, &row).await == 1 },
    )
    .await;
    let seen = js(c, "return window.__pullSeen;", vec![]).await;
    let seen: Vec<String> = serde_json::from_value(seen).unwrap_or_default();
    let layer_lines = seen
        .iter()
        .filter(|s| {
            [
                "Pulling fs layer",
                "Downloading",
                "Extracting",
                "Pull complete",
                "Verifying",
            ]
            .iter()
            .any(|w| s.contains(w))
        })
        .count();
    println!(
        "      pulled in {:.1} s; the progress panel changed {} times, {layer_lines} with a layer's state",
        t.as_secs_f64(),
        seen.len()
    );
    assert!(layer_lines > 0, "no per-layer progress was shown: {seen:?}");
    env.docker_ok(&["image", "inspect", &remote]);
    assert!(text(c, "[data-testid=images-notice]")
        .await
        .contains(&remote));
    shot(c, env, "images").await;

    // Its layers.
    click(c, &format!("{row} button[aria-label^='History']")).await;
    until("the layers", Duration::from_secs(20), || async {
        count(c, "[data-testid=image-history] tbody tr").await >= 1
    })
    .await;
    shot(c, env, "images-layers").await;

    // In use: refused, naming the container; nothing removed.
    env.docker_ok(&["create", "--name", "desk-holder", &remote, "true"]);
    until("the image in use", Duration::from_secs(20), || async {
        text(c, &row).await.contains("desk-holder")
    })
    .await;
    click(c, &format!("{row} [data-testid=image-remove]")).await;
    until("the in-use question", Duration::from_secs(20), || async {
        text(c, "[data-testid=confirm]")
            .await
            .contains("desk-holder")
    })
    .await;
    shot(c, env, "images-remove-in-use").await;
    click(c, "[data-testid=confirm-cancel]").await;
    env.docker_ok(&["image", "inspect", &remote]);
    env.docker_ok(&["rm", "desk-holder"]);

    // Unused: removed at once; the CLI agrees.
    until("the image unused", Duration::from_secs(20), || async {
        !text(c, &row).await.contains("desk-holder")
    })
    .await;
    click(c, &format!("{row} [data-testid=image-remove]")).await;
    until(
        "docker no longer having it",
        Duration::from_secs(30),
        || async { !env.docker(&["image", "inspect", &remote]).0 },
    )
    .await;
    until("the list dropping it", Duration::from_secs(10), || async {
        count(c, &row).await == 0
    })
    .await;

    // Run from the dialog: Docker's refusal (an imported image has no
    // command) is shown in the dialog.
    let ours = format!("[data-testid=image-row][data-tags~=\"{IMAGE}\"]");
    click(c, &format!("{ours} button[aria-label^='Run']")).await;
    type_into(c, "[data-testid=run-name]", "desk-run").await;
    type_into(c, "[data-testid=run-ports]", "18091:80").await;
    click(c, "[data-testid=run-go]").await;
    until("the run error", Duration::from_secs(30), || async {
        !text(c, "[data-testid=run-error]").await.is_empty()
    })
    .await;
    println!(
        "      run dialog says: {}",
        text(c, "[data-testid=run-error]").await
    );
    shot(c, env, "images-run-dialog").await;
    let (_, names, _) = env.docker(&["ps", "-a", "--format", "{{.Names}}"]);
    assert!(
        !names.lines().any(|n| n == "desk-run"),
        "a failed run left a container behind"
    );
    // With a command it runs, published as asked.
    type_into(c, "[data-testid=run-command]", "sleep 3600").await;
    click(c, "[data-testid=run-go]").await;
    until("the dialog closed", Duration::from_secs(30), || async {
        count(c, "[data-testid=run-dialog]").await == 0
    })
    .await;
    let ports = env.docker_ok(&["port", "desk-run"]);
    assert!(ports.contains("18091"), "{ports}");
    assert_eq!(
        env.docker_ok(&["inspect", "-f", "{{.State.Running}}", "desk-run"])
            .trim(),
        "true"
    );
    env.docker_ok(&["rm", "-f", "desk-run"]);
}

async fn volumes(c: &Client, env: &Env) {
    env.docker_ok(&["volume", "create", "desk-vol"]);
    env.docker_ok(&[
        "run",
        "--rm",
        "-v",
        "desk-vol:/v",
        IMAGE,
        "sh",
        "-c",
        "mkdir -p /v/sub && echo hello > /v/sub/f.txt && ln -s / /v/escape \
         && dd if=/dev/zero of=/v/blob bs=1024 count=300 2>/dev/null",
    ]);
    env.docker_ok(&[
        "create",
        "--name",
        "desk-vol-user",
        "-v",
        "desk-vol:/v",
        IMAGE,
        "true",
    ]);
    click(c, "[data-testid=nav-volumes]").await;
    let row = "[data-testid=volume-row][data-name=desk-vol]";
    until(
        "the volume listed with its size and user",
        Duration::from_secs(60),
        || async {
            let t = text(c, row).await;
            t.contains("KiB") && t.contains("desk-vol-user")
        },
    )
    .await;
    println!(
        "      row: {}",
        text(c, row)
            .await
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    );
    shot(c, env, "volumes").await;

    click(c, &format!("{row} [data-testid=volume-browse]")).await;
    until("the volume's files", Duration::from_secs(30), || async {
        count(c, "[data-testid=volume-entry][data-name=sub]").await == 1
            && text(c, "[data-testid=volume-entry][data-name=escape]")
                .await
                .contains("→ /")
    })
    .await;
    click(c, "[data-testid=volume-entry][data-name=sub] button").await;
    until("a directory inside", Duration::from_secs(30), || async {
        count(c, "[data-testid=volume-entry][data-name=\"f.txt\"]").await == 1
    })
    .await;
    shot(c, env, "volumes-browse").await;
    // A link out of the volume is not followed.
    let r = invoke(
        c,
        "volume_browse",
        json!({"name": "desk-vol", "path": "escape"}),
    )
    .await;
    assert_eq!(r["err"]["code"], "invalid", "{r}");
    assert!(
        r["err"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("outside"),
        "{r}"
    );
    let r = invoke(
        c,
        "volume_browse",
        json!({"name": "desk-vol", "path": "../.."}),
    )
    .await;
    assert_eq!(r["err"]["code"], "invalid", "{r}");

    // In use: refused, naming the user.
    let r = invoke(c, "volume_remove", json!({"name": "desk-vol"})).await;
    assert!(
        r["err"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("desk-vol-user"),
        "{r}"
    );
    // Create and remove from the UI; the CLI agrees.
    type_into(c, "[data-testid=volume-name]", "desk-vol2").await;
    click(c, "[data-testid=volume-create]").await;
    until(
        "docker seeing the new volume",
        Duration::from_secs(20),
        || async {
            env.docker_ok(&["volume", "ls", "-q"])
                .lines()
                .any(|v| v == "desk-vol2")
        },
    )
    .await;
    let row2 = "[data-testid=volume-row][data-name=desk-vol2]";
    until("the new volume listed", Duration::from_secs(30), || async {
        count(c, row2).await == 1
    })
    .await;
    click(c, &format!("{row2} [data-testid=volume-remove]")).await;
    click(c, "[data-testid=confirm-go]").await;
    until(
        "docker no longer having it",
        Duration::from_secs(20),
        || async {
            !env.docker_ok(&["volume", "ls", "-q"])
                .lines()
                .any(|v| v == "desk-vol2")
        },
    )
    .await;
    env.docker_ok(&["rm", "desk-vol-user"]);
    env.docker_ok(&["volume", "rm", "desk-vol"]);
}

/// Frame times of the open log view: idle, dragged from the bottom to the
/// top in 120 frames, and wheel-like (three lines a frame).
async fn frame_figures(c: &Client, what: &str) {
    // The frame interval of this page with nothing to do, as the
    // reference for the scroll's frames (Xvfb paints in software).
    let idle = c
        .execute_async(
            "const done = arguments[0];
             const times = []; let last = performance.now();
             const f = () => { const now = performance.now(); times.push(now - last); last = now;
               if (times.length < 60) requestAnimationFrame(f);
               else done(times.slice(1).reduce((a, b) => a + b, 0) / (times.length - 1)); };
             requestAnimationFrame(f);",
            vec![],
        )
        .await
        .unwrap();
    println!(
        "      figure: {what}: idle frame interval of the page: mean {:.1} ms",
        idle.as_f64().unwrap_or(f64::NAN)
    );
    // Scrolling: 120 steps from the bottom to the top, one per frame.
    let f = c
        .execute_async(
            "const done = arguments[0];
             const box = document.querySelector('[data-testid=logs-lines]');
             const steps = 120, top = box.scrollHeight;
             const times = [];
             let i = 0, last = performance.now();
             const step = () => {
               const now = performance.now();
               if (i > 0) times.push(now - last);
               last = now;
               if (i === steps) {
                 times.sort((a, b) => a - b);
                 const mean = times.reduce((a, b) => a + b, 0) / times.length;
                 done({ mean, p95: times[Math.floor(times.length * 0.95)], max: times[times.length - 1],
                        shown: box.querySelectorAll('.line').length });
                 return;
               }
               box.scrollTop = top - (top * ++i) / steps;
               requestAnimationFrame(step);
             };
             requestAnimationFrame(step);",
            vec![],
        )
        .await
        .unwrap();
    println!(
        "      figure: logs view, {what}, dragged from bottom to top in 120 frames: frame mean {:.1} ms, p95 {:.1} ms, max {:.1} ms ({} line elements in the page)",
        f["mean"].as_f64().unwrap_or(f64::NAN),
        f["p95"].as_f64().unwrap_or(f64::NAN),
        f["max"].as_f64().unwrap_or(f64::NAN),
        f["shown"]
    );
    // Wheel-like: three lines a frame, 120 frames.
    let w = c
        .execute_async(
            "const done = arguments[0];
             const box = document.querySelector('[data-testid=logs-lines]');
             box.scrollTop = box.scrollHeight / 2;
             const times = []; let i = 0, last = performance.now();
             const step = () => {
               const now = performance.now();
               if (i > 0) times.push(now - last);
               last = now;
               if (i++ === 120) {
                 times.sort((a, b) => a - b);
                 done({ mean: times.reduce((a, b) => a + b, 0) / times.length,
                        p95: times[Math.floor(times.length * 0.95)] });
                 return;
               }
               box.scrollTop += 54;
               requestAnimationFrame(step);
             };
             requestAnimationFrame(step);",
            vec![],
        )
        .await
        .unwrap();
    println!(
        "      figure: logs view, {what}, scrolled 3 lines a frame: frame mean {:.1} ms, p95 {:.1} ms",
        w["mean"].as_f64().unwrap_or(f64::NAN),
        w["p95"].as_f64().unwrap_or(f64::NAN)
    );
}

/// Figures: the container list with 300 containers, the log view with
/// 100,000 lines, the app's resident memory idle.
async fn figures(c: &Client, env: &Env) {
    // 300 containers (100 of them in a compose project), four CLIs at once.
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for w in 0..4 {
            s.spawn(move || {
                for i in (w..300).step_by(4) {
                    let name = format!("bulk-{i:03}-a-container-with-a-long-descriptive-name");
                    let mut args = vec!["create", "--name", &name];
                    let label = "com.docker.compose.project=bulk-project";
                    if i < 100 {
                        args.extend(["--label", label]);
                    }
                    args.extend([IMAGE, "true"]);
                    env.docker_ok(&args);
                }
            });
        }
    });
    println!(
        "      made 300 containers in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    click(c, "[data-testid=nav-containers]").await;
    until("300 rows", Duration::from_secs(60), || async {
        count(c, "[data-testid=container-row]").await >= 300
    })
    .await;
    // Render time: from the view's switch to the frame after 300 rows exist
    // (the list is already in memory: this is the UI's own cost).
    let mut ms = Vec::new();
    for _ in 0..5 {
        click(c, "[data-testid=nav-images]").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let v = c
            .execute_async(
                "const done = arguments[0];
                 const t0 = performance.now();
                 document.querySelector('[data-testid=nav-containers]').click();
                 const tick = () => document.querySelectorAll('[data-testid=container-row]').length >= 300
                   ? requestAnimationFrame(() => done(performance.now() - t0))
                   : requestAnimationFrame(tick);
                 tick();",
                vec![],
            )
            .await
            .unwrap();
        ms.push(v.as_f64().unwrap_or(f64::NAN));
    }
    ms.sort_by(f64::total_cmp);
    println!(
        "      figure: container list with 300 containers rendered in {:.0} ms (median of 5; min {:.0}, max {:.0})",
        ms[2], ms[0], ms[4]
    );
    shot(c, env, "containers-300").await;
    env.docker_ok(&["container", "prune", "-f"]);
    until("the list emptied", Duration::from_secs(60), || async {
        count(c, "[data-testid=container-row]").await < 10
    })
    .await;

    // The same measures on a 2,000-line log, as the reference: what the
    // view costs at 100,000 lines beyond what any log costs here.
    env.docker_ok(&[
        "run", "-d", "--name", "desk-small", IMAGE, "sh", "-c",
        "awk 'BEGIN { for (i = 1; i <= 2000; i++) printf \"%06d a line from a chatty container, as long as a real one tends to be\\n\", i }'; sleep 100000",
    ]);
    until(
        "the small container listed",
        Duration::from_secs(20),
        || async { count(c, &row_css("desk-small")).await == 1 },
    )
    .await;
    click(c, &format!("{} [data-row-name]", row_css("desk-small"))).await;
    until("its 2,000 lines", Duration::from_secs(60), || async {
        text(c, "[data-testid=logs-lines]")
            .await
            .contains("002000 a line")
    })
    .await;
    frame_figures(c, "2,000 lines (reference)").await;
    click(c, "button[aria-label='Back to the list']").await;
    env.docker_ok(&["rm", "-f", "desk-small"]);

    // 100,000 log lines.
    env.docker_ok(&[
        "run",
        "-d",
        "--name",
        "desk-loud",
        IMAGE,
        "sh",
        "-c",
        "awk 'BEGIN { for (i = 1; i <= 100000; i++) printf \"%06d a line from a chatty container, as long as a real one tends to be\\n\", i }'; sleep 100000",
    ]);
    until("100,000 lines logged", Duration::from_secs(120), || async {
        env.docker(&["logs", "--tail", "1", "desk-loud"])
            .1
            .starts_with("100000")
    })
    .await;
    until(
        "the loud container listed",
        Duration::from_secs(20),
        || async { count(c, &row_css("desk-loud")).await == 1 },
    )
    .await;
    let v = c
        .execute_async(
            "const [css, done] = arguments;
             const t0 = performance.now();
             let first = null;
             document.querySelector(css).click();
             const tick = () => {
               const box = document.querySelector('[data-testid=logs-lines]');
               const now = performance.now();
               if (first === null && box && box.querySelector('.line')) first = now - t0;
               if (box && box.textContent.includes('100000 a line'))
                 requestAnimationFrame(() => done({ first, all: performance.now() - t0 }));
               else if (now - t0 > 60000) done({ first, all: null });
               else requestAnimationFrame(tick);
             };
             tick();",
            vec![json!(format!("{} [data-row-name]", row_css("desk-loud")))],
        )
        .await
        .unwrap();
    println!(
        "      figure: logs view, 100,000 lines: first line shown {:.0} ms, the last line {:.0} ms after the click",
        v["first"].as_f64().unwrap_or(f64::NAN),
        v["all"].as_f64().unwrap_or(f64::NAN)
    );
    assert!(v["all"].is_number(), "the 100,000th line never showed: {v}");
    let count_text = text(c, "[data-testid=logs-count]").await;
    let digits: String = count_text
        .split_whitespace()
        .next()
        .unwrap_or("")
        .chars()
        .filter(char::is_ascii_digit)
        .collect();
    assert_eq!(digits, "100000", "{count_text}");
    // The reference: the same log read whole by the docker CLI.
    let t = Instant::now();
    let (ok, out, _) = env.docker(&["logs", "desk-loud"]);
    assert!(ok && out.lines().count() == 100_000);
    println!(
        "      figure: reference, `docker logs` of the same 100,000 lines: {:.0} ms",
        t.elapsed().as_secs_f64() * 1000.0
    );
    frame_figures(c, "100,000 lines").await;
    shot(c, env, "container-logs-100k").await;
    click(c, "button[aria-label='Back to the list']").await;
    env.docker_ok(&["rm", "-f", "desk-loud"]);

    // Resident memory, idle on the container list for 10 s.
    tokio::time::sleep(Duration::from_secs(10)).await;
    rss_figure("idle after the 300-container and 100,000-line runs").await;
}

async fn troubleshoot(c: &Client, env: &Env) {
    click(c, "[data-testid=nav-engine]").await;
    until("memory and disk use", Duration::from_secs(30), || async {
        text(c, "[data-testid=engine-memory]")
            .await
            .contains("in use")
            && text(c, "[data-testid=engine-disk]").await.contains("used")
    })
    .await;
    // The VM's footprint on the host and the guest clock, as `berth
    // status` reports them.
    until(
        "host memory, disk and clock",
        Duration::from_secs(90),
        || async {
            text(c, "[data-testid=engine-host-memory]")
                .await
                .contains("resident")
                && text(c, "[data-testid=engine-host-disk]")
                    .await
                    .contains("allocated")
                && text(c, "[data-testid=engine-clock]")
                    .await
                    .contains("ms from the host")
        },
    )
    .await;
    let st: serde_json::Value = serde_json::from_str(&env.berth_ok(&["status", "--json"])).unwrap();
    let r = &st["resources"];
    assert!(
        r["vm_rss_bytes"].as_u64().unwrap_or(0) > 16 << 20,
        "berth status has the VM's resident memory: {r}"
    );
    assert!(
        r["data_disk_apparent_bytes"].as_u64().unwrap_or(0) > 0
            && r["data_disk_allocated_bytes"].as_u64().is_some(),
        "{r}"
    );
    assert!(
        st["clock"]["offset_ms"].as_f64().is_some(),
        "{}",
        st["clock"]
    );
    let shown = text(c, "[data-testid=engine-host-disk]").await;
    let apparent_gib = r["data_disk_apparent_bytes"].as_u64().unwrap() as f64 / (1u64 << 30) as f64;
    assert!(
        shown.contains(&format!("{apparent_gib:.1} GiB")) || shown.contains(&format!("{apparent_gib:.0} GiB")),
        "the engine view shows the same apparent size as berth status ({apparent_gib:.1} GiB): {shown}"
    );
    shot(c, env, "engine-running").await;
    click(c, "[data-testid=nav-troubleshoot]").await;
    until("the console log", Duration::from_secs(20), || async {
        text(c, "[data-testid=console-log]")
            .await
            .contains("berth-agent")
    })
    .await;
    shot(c, env, "troubleshoot").await;
    // The bundle (its file dialog is the OS's; the command is called as
    // the UI calls it with the path the dialog returned).
    let out = env.work.join("diag.tar.gz");
    let r = invoke(
        c,
        "diagnostics_save",
        json!({"path": out.to_str().unwrap()}),
    )
    .await;
    assert!(r["ok"]["files"].is_array(), "{r}");
    let (ok, list, err) = env.run(Path::new("tar"), &["-tzf", out.to_str().unwrap()]);
    assert!(ok, "{err}");
    for f in ["versions.txt", "status.json", "config.toml", "console.log"] {
        assert!(list.contains(f), "{f} missing from the bundle: {list}");
    }
    // Reset asks first, naming what would be lost; cancelled here.
    click(c, "[data-testid=reset]").await;
    until("the reset question", Duration::from_secs(20), || async {
        let t = text(c, "[data-testid=confirm]").await;
        t.contains("data.img") || t.contains("data disk")
    })
    .await;
    let q = text(c, "[data-testid=confirm]").await;
    assert!(q.contains("images") && q.contains("volumes"), "{q}");
    shot(c, env, "troubleshoot-reset-confirm").await;
    click(c, "[data-testid=confirm-cancel]").await;
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&env.berth_ok(&["status", "--json"])).unwrap()
            ["state"],
        "running"
    );
}

async fn dark_theme(c: &Client, env: &Env) {
    // A container for the list and detail views.
    env.docker_ok(&[
        "run",
        "-d",
        "--name",
        CONTAINER,
        "-p",
        "127.0.0.1:18090:80",
        IMAGE,
        "sh",
        "-c",
        "echo hello from a dark screenshot; echo on stderr >&2; sleep 100000",
    ]);
    env.docker_ok(&["volume", "create", "desk-dark-vol"]);
    click(c, "[data-testid=nav-settings]").await;
    js(
        c,
        "const s = document.querySelector('[data-testid=set-theme]');
         s.value = 'dark'; s.dispatchEvent(new Event('change', { bubbles: true }));",
        vec![],
    )
    .await;
    until("the dark theme", Duration::from_secs(5), || async {
        js(c, "return document.documentElement.dataset.theme;", vec![]).await == "dark"
    })
    .await;
    shot(c, env, "dark-settings").await;
    for (nav, name) in [
        ("engine", "dark-engine"),
        ("images", "dark-images"),
        ("volumes", "dark-volumes"),
        ("troubleshoot", "dark-troubleshoot"),
        ("containers", "dark-containers"),
    ] {
        click(c, &format!("[data-testid=nav-{nav}]")).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        shot(c, env, name).await;
    }
    until("the container", Duration::from_secs(20), || async {
        count(c, &row_css(CONTAINER)).await == 1
    })
    .await;
    click(c, &format!("{} [data-row-name]", row_css(CONTAINER))).await;
    until("its log", Duration::from_secs(20), || async {
        text(c, "[data-testid=logs-lines]")
            .await
            .contains("dark screenshot")
    })
    .await;
    shot(c, env, "dark-container-logs").await;
    click(c, "[data-testid=tab-stats]").await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    shot(c, env, "dark-container-stats").await;
    click(c, "[data-testid=tab-inspect]").await;
    until("the inspect data", Duration::from_secs(20), || async {
        text(c, ".inspect").await.contains("Environment")
    })
    .await;
    shot(c, env, "dark-container-inspect").await;
    click(c, "[data-testid=tab-terminal]").await;
    until("the shell", Duration::from_secs(30), || async {
        count(c, ".xterm-helper-textarea").await == 1
    })
    .await;
    let input = c
        .find(Locator::Css(".xterm-helper-textarea"))
        .await
        .unwrap();
    input.send_keys("ls /\u{E007}").await.unwrap();
    until("the listing", Duration::from_secs(20), || async {
        text(c, ".xterm-rows").await.contains("proc")
    })
    .await;
    shot(c, env, "dark-container-terminal").await;
    click(c, "button[aria-label='Back to the list']").await;
    env.docker_ok(&["rm", "-f", CONTAINER]);
    env.docker_ok(&["volume", "rm", "desk-dark-vol"]);
    click(c, "[data-testid=nav-settings]").await;
    js(
        c,
        "const s = document.querySelector('[data-testid=set-theme]');
         s.value = 'system'; s.dispatchEvent(new Event('change', { bubbles: true }));",
        vec![],
    )
    .await;
}

/// The tray's StatusNotifierItem and its menu, read and clicked over
/// D-Bus (an Xvfb has no tray to look at).
async fn tray_over_dbus(c: &Client, env: &Env) {
    let gdbus = |args: &[&str]| -> String {
        let mut all = vec!["call", "--session"];
        all.extend_from_slice(args);
        let (ok, out, err) = env.run(Path::new("gdbus"), &all);
        assert!(ok, "gdbus {}: {err}", args.join(" "));
        out
    };
    let names = gdbus(&[
        "--dest",
        "org.freedesktop.DBus",
        "--object-path",
        "/org/freedesktop/DBus",
        "--method",
        "org.freedesktop.DBus.ListNames",
    ]);
    // The app's connection exports the item under this path.
    let mut found = None;
    for n in names.split('\'').filter(|n| n.starts_with(":1.")) {
        let (ok, out, _) = env.run(
            Path::new("gdbus"),
            &[
                "introspect",
                "--session",
                "--dest",
                n,
                "--object-path",
                "/org/ayatana/NotificationItem",
            ],
        );
        let child = out
            .lines()
            .filter_map(|l| l.trim().strip_prefix("node "))
            .find(|node| !node.starts_with('/'));
        if let (true, Some(node)) = (ok, child) {
            found = Some((n.to_owned(), node.trim_end_matches(" {").to_owned()));
            break;
        }
    }
    let (dest, node) = found.expect("no StatusNotifierItem on the app's bus");
    let path = format!("/org/ayatana/NotificationItem/{node}");
    let props = gdbus(&[
        "--dest",
        &dest,
        "--object-path",
        &path,
        "--method",
        "org.freedesktop.DBus.Properties.GetAll",
        "org.kde.StatusNotifierItem",
    ]);
    assert!(props.contains("'Status': <'Active'>"), "{props}");
    let menu = format!("{path}/Menu");
    let layout = || {
        gdbus(&[
            "--dest",
            &dest,
            "--object-path",
            &menu,
            "--method",
            "com.canonical.dbusmenu.GetLayout",
            "--",
            "0",
            "-1",
            "@as []",
        ])
    };
    // Menu entries: (id, label, enabled).
    let items = |l: &str| -> Vec<(String, String, bool)> {
        l.split("<(")
            .skip(1)
            .filter_map(|it| {
                let id = it.split(',').next()?.trim().to_owned();
                let label = it
                    .split("'label': <'")
                    .nth(1)?
                    .split("'>")
                    .next()?
                    .to_owned();
                Some((id, label, !it.contains("'enabled': <false>")))
            })
            .collect()
    };
    let l = layout();
    let now = items(&l);
    println!("      tray menu: {now:?}");
    assert!(now.iter().any(|i| i.1 == "Berth: running"), "{l}");
    let stop = now
        .iter()
        .find(|i| i.1 == "Stop engine")
        .expect("a Stop item");
    assert!(stop.2, "Stop is disabled while running: {l}");
    assert!(now.iter().any(|i| i.1 == "Start engine" && !i.2), "{l}");
    assert!(now.iter().any(|i| i.1 == "Open Berth") && now.iter().any(|i| i.1.starts_with("Quit")));
    // Clicking Stop stops the engine, as the CLI sees it.
    gdbus(&[
        "--dest",
        &dest,
        "--object-path",
        &menu,
        "--method",
        "com.canonical.dbusmenu.Event",
        "--",
        &stop.0,
        "clicked",
        "<int32 0>",
        "0",
    ]);
    until(
        "the engine stopped from the tray",
        Duration::from_secs(90),
        || async {
            let (_, out, _) = env.run(&env.app_dir.join("berth"), &["status", "--json"]);
            out.contains("\"state\": \"stopped\"") || out.contains("\"state\":\"stopped\"")
        },
    )
    .await;
    until("the tray saying so", Duration::from_secs(20), || async {
        let now = items(&layout());
        now.iter().any(|i| i.1 == "Berth: stopped")
            && now.iter().any(|i| i.1 == "Start engine" && i.2)
    })
    .await;
    until("the window saying so", Duration::from_secs(20), || async {
        text(c, ".engine-pill").await.contains("stopped")
    })
    .await;
}

fn main() -> ExitCode {
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    if std::env::args().any(|a| a == "--list") {
        for (name, _) in cases() {
            println!("{name}: test");
        }
        return ExitCode::SUCCESS;
    }
    let Some(image_dir) = require_image() else {
        return ExitCode::SUCCESS;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let app = std::env::var_os("BERTH_E2E_APP")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/debug/berth-desktop-e2e"));
    let app_dir = app.parent().unwrap_or(Path::new(".")).to_owned();
    for (what, p) in [
        (
            "the app built with its UI (scripts/test.sh builds it)",
            app.clone(),
        ),
        ("the berth binary beside the app", app_dir.join("berth")),
        ("berth-vmm beside the app", app_dir.join("berth-vmm")),
    ] {
        if !p.is_file() {
            return skip(&format!("missing {what}: {}", p.display()));
        }
    }
    for (program, package) in [
        ("Xvfb", "xvfb"),
        ("WebKitWebDriver", "webkit2gtk-driver"),
        (
            "tauri-driver",
            "cargo install tauri-driver --version '^2' --locked",
        ),
        ("dbus-daemon", "dbus"),
        ("gdbus", "libglib2.0-bin"),
        ("docker-registry", "docker-registry"),
        ("docker", "the docker CLI"),
    ] {
        if berth_core::paths::find_on_path(program).is_none() {
            return skip(&format!("{program} is not on PATH ({package})"));
        }
    }
    let scratch = Scratch::new("e2e-desktop");
    let env = Env {
        work: scratch.0.clone(),
        data_home: scratch.0.join("data"),
        docker_config: scratch.0.join("docker-config"),
        image_dir,
        app: app.canonicalize().unwrap(),
        app_dir: app_dir.canonicalize().unwrap(),
        shots: std::env::var_os("BERTH_SCREENSHOT_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target/screenshots")),
        bus: format!("unix:path={}", scratch.0.join("bus").display()),
    };
    std::fs::create_dir_all(&env.docker_config).unwrap();
    std::fs::create_dir_all(&env.shots).unwrap();
    // No DNS query leaves this machine: the guest's resolver is a closed
    // local port. No folder is shared but the scratch one.
    env.berth_ok(&["config", "set", "dns_servers", "127.0.0.1:9"]);
    env.berth_ok(&["config", "set", "shares", scratch.0.to_str().unwrap()]);

    let display = free_display();
    let _xvfb = spawn_group(
        {
            let mut c = Command::new("Xvfb");
            c.args([
                &format!(":{display}"),
                "-screen",
                "0",
                "1280x800x24",
                "-nolisten",
                "tcp",
            ]);
            c
        },
        &env.work.join("xvfb.log"),
    );
    // The app's own session bus, so the tray can be read over it.
    let _bus = spawn_group(
        {
            let mut c = Command::new("dbus-daemon");
            c.args(["--session", "--nofork", &format!("--address={}", env.bus)]);
            c
        },
        &env.work.join("dbus.log"),
    );
    let bus_path = env.work.join("bus");
    let t0 = Instant::now();
    while !bus_path.exists() && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let port = free_port();
    let native = free_port();
    let driver = spawn_group(
        {
            let mut c = Command::new("tauri-driver");
            c.args([
                "--port",
                &port.to_string(),
                "--native-port",
                &native.to_string(),
            ]);
            env.apply(&mut c);
            c.env("DISPLAY", format!(":{display}"));
            c
        },
        &env.work.join("tauri-driver.log"),
    );
    // tauri-driver listens first, then starts WebKitWebDriver on the native
    // port: a session asked for before both listen fails.
    if !wait_port(port, Duration::from_secs(30)) || !wait_port(native, Duration::from_secs(30)) {
        eprintln!(
            "FAILED: tauri-driver ({port}) or WebKitWebDriver ({native}) did not listen:\n{}",
            std::fs::read_to_string(env.work.join("tauri-driver.log")).unwrap_or_default()
        );
        return ExitCode::FAILURE;
    }

    // A failed case reports its message; no backtraces in the log.
    std::panic::set_hook(Box::new(|_| {}));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let selected: Vec<Case> = cases()
        .into_iter()
        .filter(|(n, _)| {
            // Several filters separated by commas: a case runs if any matches.
            filter
                .as_deref()
                .is_none_or(|f| f.split(',').any(|f| n.contains(f)))
        })
        .collect();
    println!(
        "\nrunning {} desktop end-to-end cases in the real app",
        selected.len()
    );
    let (mut passed, mut failed) = (0, 0);
    rt.block_on(async {
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), json!("wry"));
        caps.insert("tauri:options".into(), json!({ "application": env.app }));
        let t0 = Instant::now();
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await;
        let client = match client {
            Ok(c) => c,
            Err(e) => {
                eprintln!(
                    "FAILED: no WebDriver session: {e}\n{}",
                    std::fs::read_to_string(env.work.join("tauri-driver.log")).unwrap_or_default()
                );
                failed += 1;
                return;
            }
        };
        println!("setup: app session in {:.1} s", t0.elapsed().as_secs_f64());
        first_paint_figure(&client).await;
        for (name, f) in &selected {
            let t = Instant::now();
            let r = futures_catch(f(&client, &env)).await;
            match r {
                Ok(()) => {
                    passed += 1;
                    println!("case {name} ... ok ({:.1} s)", t.elapsed().as_secs_f64());
                }
                Err(msg) => {
                    failed += 1;
                    println!(
                        "case {name} ... FAILED ({:.1} s)\n{msg}",
                        t.elapsed().as_secs_f64()
                    );
                    shot(&client, &env, &format!("failed-{name}")).await;
                    // Later cases build on this one.
                    break;
                }
            }
        }
        let _ = client.close().await;
    });
    let stop = env.run(&env.app_dir.join("berth"), &["stop", "--force"]);
    println!("teardown: berth stop: {}", stop.1.trim());
    drop(driver);
    println!("\ndesktop e2e: {passed} passed, {failed} failed");
    if failed > 0 {
        eprintln!(
            "tauri-driver and app log:\n{}",
            std::fs::read_to_string(env.work.join("tauri-driver.log")).unwrap_or_default()
        );
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Runs a case, turning its panic into the panic's message.
async fn futures_catch(f: CaseFut<'_>) -> Result<(), String> {
    use futures_util::FutureExt;
    std::panic::AssertUnwindSafe(f)
        .catch_unwind()
        .await
        .map_err(|p| {
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "panicked".into())
        })
}
