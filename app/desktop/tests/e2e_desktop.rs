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
}

impl Env {
    fn apply(&self, c: &mut Command) {
        c.env("XDG_DATA_HOME", &self.data_home)
            .env("DOCKER_CONFIG", &self.docker_config)
            .env("BERTH_IMAGE_DIR", &self.image_dir)
            .env_remove("DOCKER_HOST")
            .env_remove("DOCKER_CONTEXT")
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
        ("ui_stops_and_removes_a_container", |c, e| {
            Box::pin(stops_and_removes(c, e))
        }),
        ("ui_settings_agree_with_the_cli", |c, e| {
            Box::pin(settings_agree(c, e))
        }),
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
        ("dbus-run-session", "dbus"),
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
    let port = free_port();
    let native = free_port();
    let driver = spawn_group(
        {
            let mut c = Command::new("dbus-run-session");
            c.args([
                "--",
                "tauri-driver",
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
        .filter(|(n, _)| filter.as_deref().is_none_or(|f| n.contains(f)))
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
