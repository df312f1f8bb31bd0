//! `berth`: run Docker in a lightweight VM.

use std::io::{IsTerminal, Read, Seek, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use berth_core::config::Config;
use berth_core::context::{self, ContextOutcome};
use berth_core::lifecycle::{self, LifecycleError, Started};
use berth_core::paths::StateDir;
use berth_core::status::{Status, StopHow, VmState};
use clap::{Parser, Subcommand};

/// Exit codes besides 0 (success) and 2 (bad usage, from clap).
const EXIT_FAILED: u8 = 1;
const EXIT_NOT_RUNNING: u8 = 3;
/// `stop`: the VM stopped, but not in order (killed).
const EXIT_FORCED: u8 = 4;

/// `println!` that does not panic when stdout is gone: a reader that
/// stopped reading (`berth status | head -1`) ends the command quietly and
/// successfully, as `berth logs` does; any other write error is reported.
macro_rules! outln {
    ($($arg:tt)*) => {{
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            stdout_failed(e);
        }
    }};
}

fn stdout_failed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("berth: cannot write the output: {e}");
    std::process::exit(i32::from(EXIT_FAILED));
}

#[derive(Debug, Parser)]
#[command(name = "berth", version, about = "Docker in a lightweight VM")]
struct Cli {
    /// Which VM (its state lives in <data dir>/berth/<name>).
    #[arg(long, global = true, default_value = "default", env = "BERTH_VM")]
    vm: String,
    /// Guest image directory (default: the installed or built one).
    #[arg(long, global = true, env = "BERTH_IMAGE_DIR")]
    image_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start the VM and wait until Docker answers.
    Start,
    /// Stop the VM in order: containers stopped, disk flushed, power off.
    Stop {
        /// Kill the VM if it has not stopped after --timeout seconds.
        #[arg(long)]
        force: bool,
        #[arg(long, default_value_t = 15)]
        timeout: u64,
    },
    /// Stop, then start.
    Restart,
    /// Show whether the VM runs, with which driver, and where Docker is.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Show the guest console.
    Logs {
        /// Keep printing new lines.
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines.
        #[arg(short = 'n', long)]
        tail: Option<usize>,
    },
    /// A shell in the guest, or run one command there and return its exit code.
    Shell {
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Read or change settings.
    Config {
        #[command(subcommand)]
        action: ConfigCmd,
    },
    /// Run the host agent in the foreground (started by `berth start`).
    #[command(hide = true)]
    HostAgent {
        #[arg(long)]
        state_dir: PathBuf,
        #[arg(long)]
        image_dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCmd {
    /// Print one setting, or all.
    Get { key: Option<String> },
    /// Change one setting.
    Set { key: String, value: String },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Cmd::HostAgent {
        state_dir,
        image_dir,
    } = cli.command
    {
        return host_agent(state_dir, image_dir);
    }
    let state = match StateDir::for_vm(&cli.vm) {
        Ok(s) => s,
        Err(e) => return fail(&e.to_string()),
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start: {e}")),
    };
    let image = cli.image_dir.as_deref();
    match cli.command {
        Cmd::Start => rt.block_on(start(&state, image)),
        Cmd::Stop { force, timeout } => rt.block_on(stop(&state, force, timeout)),
        Cmd::Restart => rt.block_on(async {
            let c = stop(&state, false, 0).await;
            // A stop by force still leaves the VM stopped: start it.
            if c != ExitCode::SUCCESS && c != ExitCode::from(EXIT_FORCED) {
                return c;
            }
            start(&state, image).await
        }),
        Cmd::Status { json } => rt.block_on(status(&state, json)),
        Cmd::Logs { follow, tail } => logs(&state, follow, tail),
        Cmd::Shell { command } => rt.block_on(shell(&state, command)),
        Cmd::Config { action } => rt.block_on(config(&state, action)),
        Cmd::HostAgent { .. } => unreachable!("handled above"),
    }
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("berth: {msg}");
    ExitCode::from(EXIT_FAILED)
}

fn host_agent(state_dir: PathBuf, image_dir: PathBuf) -> ExitCode {
    // Our own session: the terminal that ran `berth start` may close.
    let _ = nix::unistd::setsid();
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let state = StateDir::at(state_dir);
    // The lock first: a second host agent says so on its own stderr and
    // never touches the running one's log.
    let lock = match berth_core::hostagent::lock_for_host_agent(&state) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("berth host agent: error: {e:#}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    // Everything this process and its children print goes to
    // host-agent.log, capped and rotated.
    let log_max = Config::load(&state.config())
        .map(|c| c.log_max_mib)
        .unwrap_or(8)
        << 20;
    let log_pipe =
        match berth_core::hostagent::logs::capture_stdio(&state.host_agent_log(), log_max) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("berth host agent: cannot cap host-agent.log ({e}); writing it directly");
                None
            }
        };
    let fd_limit = berth_limits::fds::raise_nofile_limit()
        .unwrap_or_else(|_| berth_limits::fds::current_nofile_limit());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BERTH_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
    eprintln!(
        "berth host agent starting (pid {}, open-file limit {fd_limit})",
        std::process::id()
    );
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start: {e}")),
    };
    let code = match rt.block_on(berth_core::hostagent::run(state, image_dir, lock)) {
        Ok(()) => {
            eprintln!("berth host agent: stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("berth host agent: error: {e:#}");
            ExitCode::from(EXIT_FAILED)
        }
    };
    drop(rt);
    if let Some(p) = log_pipe {
        p.finish();
    }
    code
}

async fn start(state: &StateDir, image: Option<&std::path::Path>) -> ExitCode {
    let t0 = Instant::now();
    let r = lifecycle::start(state, image, |phase| {
        eprintln!("[{:>5.1}s] {phase}", t0.elapsed().as_secs_f64());
    })
    .await;
    let s = match r {
        Ok(Started::AlreadyRunning(s)) => {
            outln!(
                "Berth is already running (driver {}).",
                s.driver.as_deref().unwrap_or("?")
            );
            s
        }
        Ok(Started::Now(s)) => {
            outln!(
                "Berth is running: Docker {} ready in {:.1} s (driver {}).",
                s.docker_version.as_deref().unwrap_or("?"),
                s.boot_ms.unwrap_or(0) as f64 / 1000.0,
                s.driver.as_deref().unwrap_or("?")
            );
            s
        }
        Err(LifecycleError::StartFailed {
            reason,
            console_tail,
        }) => {
            eprintln!("berth: the VM failed to start: {reason}");
            if !console_tail.is_empty() {
                eprintln!("--- last guest console lines ---\n{console_tail}\n---");
            }
            eprintln!(
                "Nothing is left running. Full logs: {}",
                state.root.display()
            );
            return ExitCode::from(EXIT_FAILED);
        }
        Err(e) => return fail(&e.to_string()),
    };
    let cfg = Config::load(&state.config()).unwrap_or_default();
    let socket = PathBuf::from(&s.docker_socket);
    match context::install(&socket, cfg.switch_docker_context) {
        ContextOutcome::Ready { current: true } => {
            outln!("The docker context \"berth\" is current: run `docker ps`.")
        }
        ContextOutcome::Ready { current: false } => {
            outln!("Use it with `docker --context berth ps` (or `docker context use berth`).")
        }
        ContextOutcome::NoDockerCli => outln!("Note: {}.", context::INSTALL_HINT),
        ContextOutcome::Failed(e) => eprintln!("berth: could not set up the docker context: {e}"),
    }
    outln!(
        "Docker socket: {}  (or: export DOCKER_HOST=unix://{})",
        socket.display(),
        socket.display()
    );
    ExitCode::SUCCESS
}

async fn stop(state: &StateDir, force: bool, timeout: u64) -> ExitCode {
    let t0 = Instant::now();
    match lifecycle::stop(state, force, Duration::from_secs(timeout), |p| {
        eprintln!("[{:>5.1}s] {p}", t0.elapsed().as_secs_f64())
    })
    .await
    {
        Ok(lifecycle::Stopped::NotRunning) => {
            outln!("Berth is not running.");
            ExitCode::SUCCESS
        }
        Ok(lifecycle::Stopped::Now(report)) => match report {
            Some(r) if r.how == StopHow::Forced => {
                outln!("Berth stopped by force: {}.", r.message);
                ExitCode::from(EXIT_FORCED)
            }
            Some(r) if r.how == StopHow::Crashed => {
                outln!("Berth stopped: {}.", r.message);
                ExitCode::from(EXIT_FORCED)
            }
            Some(r) => {
                outln!("Berth stopped: {}.", r.message);
                ExitCode::SUCCESS
            }
            None => {
                outln!("Berth stopped.");
                ExitCode::SUCCESS
            }
        },
        Err(e) => fail(&e.to_string()),
    }
}

async fn status(state: &StateDir, json: bool) -> ExitCode {
    let mut s: Status = match lifecycle::status(state).await {
        Ok(s) => s,
        Err(e) => return fail(&e.to_string()),
    };
    s.docker_context = context::current();
    if json {
        outln!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    outln!(
        "state:          {}{}",
        s.state,
        if s.phase != s.state.to_string() {
            format!(" ({})", s.phase)
        } else {
            String::new()
        }
    );
    if let Some(d) = &s.driver {
        outln!("driver:         {d}");
    }
    if let Some(r) = &s.driver_reason {
        outln!("  why:          {r}");
    }
    if let Some(p) = s.pid {
        outln!("VM process:     {p}");
    }
    if let Some(u) = s.uptime_s {
        outln!("uptime:         {u} s");
    }
    outln!(
        "resources:      {} CPUs, {} MiB memory, {} GiB disk",
        s.cpus,
        s.memory_mib,
        s.disk_gib
    );
    if let Some(r) = &s.resources {
        for line in resource_lines(r) {
            outln!("{line}");
        }
    }
    if let Some(c) = &s.clock {
        outln!("{}", clock_line(c));
    }
    if s.state == VmState::Running {
        outln!(
            "docker:         {} at {}",
            s.docker_version.as_deref().unwrap_or("?"),
            s.docker_socket
        );
    }
    if let Some(b) = s.boot_ms {
        outln!("boot:           {:.1} s to Docker ready", b as f64 / 1000.0);
    }
    match &s.docker_context {
        Some(c) => outln!(
            "docker context: {c}{}",
            if c == context::CONTEXT {
                ""
            } else {
                " (not berth)"
            }
        ),
        None => outln!("docker context: none ({})", context::INSTALL_HINT),
    }
    if let Some(n) = &s.network {
        outln!(
            "network:        guest {}, host (host.docker.internal) {}{}{}",
            n.guest_ip,
            n.host_ip,
            if n.ipv6 { ", IPv6" } else { "" },
            match &n.passt {
                Some(p) => format!(
                    "; passt pid {}{}",
                    p.pid.map_or("-".into(), |p| p.to_string()),
                    if p.restarts > 0 {
                        format!(", restarted {} times", p.restarts)
                    } else {
                        String::new()
                    }
                ),
                None => String::new(),
            }
        );
    }
    if s.state == VmState::Running {
        if s.shares.is_empty() {
            outln!("shared folders: none (`berth config set shares PATH,…`)");
        } else {
            outln!("shared folders:");
        }
        for sh in &s.shares {
            match &sh.error {
                Some(e) => outln!("  {}: NOT SHARED: {e}", sh.path),
                None => outln!(
                    "  {}{}",
                    sh.path,
                    if sh.read_only { " (read-only)" } else { "" }
                ),
            }
        }
        if s.forwards.is_empty() {
            outln!("ports:          none published");
        } else {
            outln!("ports:");
        }
        for f in &s.forwards {
            let host = match f.host_ip {
                std::net::IpAddr::V6(ip) => format!("[{ip}]:{}", f.host_port),
                ip => format!("{ip}:{}", f.host_port),
            };
            match &f.error {
                Some(e) => outln!("  {host}/{} -> {}: ERROR {e}", f.proto, f.container),
                None => outln!(
                    "  {host}/{} -> {}:{}",
                    f.proto,
                    f.container,
                    f.container_port
                ),
            }
        }
    }
    if let Some(w) = &s.warning {
        outln!("WARNING:        {w}");
    }
    if let Some(e) = &s.error {
        outln!("last error:     {e}");
    }
    if s.state == VmState::Stopped {
        if let Some(r) = &s.last_stop {
            outln!("last stop:      {}", r.message);
        }
    }
    outln!("state dir:      {}", s.state_dir);
    ExitCode::SUCCESS
}

fn logs(state: &StateDir, follow: bool, tail: Option<usize>) -> ExitCode {
    let path = state.console_log();
    let mut f = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) => {
            return fail(&format!(
                "no console log at {} ({e}); has the VM been started?",
                path.display()
            ))
        }
    };
    let mut out = std::io::stdout().lock();
    if let Some(n) = tail {
        let _ = writeln!(out, "{}", lifecycle::tail(&path, n));
        let _ = f.seek(std::io::SeekFrom::End(0));
    } else if std::io::copy(&mut f, &mut out).is_err() {
        return ExitCode::SUCCESS;
    }
    if !follow {
        return ExitCode::SUCCESS;
    }
    let _ = out.flush();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match f.read(&mut buf) {
            Ok(0) => {
                // A new boot replaces the file: follow the new one.
                let replaced = std::fs::metadata(&path)
                    .ok()
                    .zip(f.metadata().ok())
                    .is_some_and(|(a, b)| {
                        use std::os::unix::fs::MetadataExt;
                        a.ino() != b.ino()
                    });
                if replaced {
                    if let Ok(n) = std::fs::File::open(&path) {
                        f = n;
                        continue;
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            Ok(n) => {
                if out.write_all(&buf[..n]).and_then(|_| out.flush()).is_err() {
                    return ExitCode::SUCCESS;
                }
            }
            Err(e) => return fail(&e.to_string()),
        }
    }
}

async fn shell(state: &StateDir, command: Vec<String>) -> ExitCode {
    match lifecycle::agent_status(state).await {
        Some(s) if s.state == VmState::Running => {}
        _ => {
            eprintln!("berth: Berth is not running; start it with `berth start`");
            return ExitCode::from(EXIT_NOT_RUNNING);
        }
    }
    match berth_core::shell::run(&state.vsock_sock(), command).await {
        Ok(code) => {
            let _ = std::io::stdout().flush();
            // The stdin reader may be blocked in read(2): leave now.
            std::process::exit(code)
        }
        Err(e) => fail(&e.to_string()),
    }
}

async fn config(state: &StateDir, action: ConfigCmd) -> ExitCode {
    let cfg = match Config::load(&state.config()) {
        Ok(c) => c,
        Err(e) => return fail(&e.to_string()),
    };
    match action {
        ConfigCmd::Get { key: Some(k) } => match cfg.get(&k) {
            Ok(v) => outln!("{v}"),
            Err(e) => return fail(&e.to_string()),
        },
        ConfigCmd::Get { key: None } => {
            for k in berth_core::config::KEYS.split(", ") {
                outln!("{k} = {}", cfg.get(k).unwrap_or_default());
            }
        }
        ConfigCmd::Set { key, value } => match lifecycle::set_config(state, &key, &value).await {
            Ok(change) => outln!("{}", change.message),
            Err(e) => return fail(&e.to_string()),
        },
    }
    let _ = std::io::stdin().is_terminal();
    ExitCode::SUCCESS
}

fn mib(b: u64) -> String {
    format!("{:.0} MiB", b as f64 / (1u64 << 20) as f64)
}

/// The VM's host memory and disk, one line each.
fn resource_lines(r: &berth_core::status::Resources) -> Vec<String> {
    let mut v = Vec::new();
    if let Some(rss) = r.vm_rss_bytes {
        v.push(format!(
            "host memory:    {} resident (VM process){}",
            mib(rss),
            match r.balloon_reported_bytes {
                Some(b) => format!("; {} given back by the balloon", mib(b)),
                None => "; free guest memory is given back (QEMU does not count it)".into(),
            }
        ));
    }
    if let (Some(a), Some(l)) = (r.data_disk_allocated_bytes, r.data_disk_apparent_bytes) {
        v.push(format!(
            "data disk:      {} allocated on the host (du), {:.1} GiB apparent (ls)",
            mib(a),
            l as f64 / (1u64 << 30) as f64
        ));
    }
    v
}

/// The guest clock's last check and correction.
fn clock_line(c: &berth_core::hostagent::clock::ClockStatus) -> String {
    let mut line = format!(
        "guest clock:    {:+.1} ms from the host's at the last check (±{:.1} ms)",
        c.offset_ms,
        c.rtt_ms / 2.0
    );
    if let Some(k) = &c.last_correction {
        line.push_str(&format!(
            "; last {} by {:.1} ms ({}, {} s ago)",
            if k.step { "stepped" } else { "slewed" },
            -k.offset_ms,
            k.reason,
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
                .saturating_sub(k.at_unix)
        ));
    }
    line
}
