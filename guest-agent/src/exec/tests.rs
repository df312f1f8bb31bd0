//! Exec sessions with real processes, driven through the control server
//! as the host would. Each test has its own reaper that only waits for the
//! children it spawned, so tests can run side by side.

use std::time::{Duration, Instant};

use berth_proto::exec::MAX_EXEC_PAYLOAD;
use berth_proto::{
    read_exec_frame, read_frame, write_exec_frame, write_frame, ErrorCode, ExecFrame, ExecRequest,
    Request, Response, TermSize,
};
use nix::errno::Errno;
use nix::sys::signal::kill;
use nix::unistd::Pid;
use tokio::io::{AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;

use crate::reaper::Reaper;
use crate::state::Shared;

/// Every test finishes well within this, or fails instead of hanging.
const LIMIT: Duration = Duration::from_secs(20);

fn connect() -> (DuplexStream, JoinHandle<()>) {
    let reaper = Reaper::start_own_children().unwrap();
    let (client, server) = tokio::io::duplex(256 * 1024);
    let task = tokio::spawn(crate::control::serve(server, Shared::new(), reaper, "test"));
    (client, task)
}

fn request(argv: &[&str], tty: Option<TermSize>) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|a| (*a).to_owned()).collect(),
        env: Vec::new(),
        cwd: None,
        tty,
    }
}

async fn exec(client: &mut DuplexStream, req: ExecRequest) -> Response {
    write_frame(client, &Request::Exec(req)).await.unwrap();
    read_frame::<Response, _>(client).await.unwrap()
}

#[derive(Debug, Default)]
struct Outcome {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    code: i32,
}

impl Outcome {
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// Reads exec frames up to and including `Exit`.
async fn collect(client: &mut DuplexStream) -> Outcome {
    let mut out = Outcome::default();
    loop {
        match read_exec_frame(client).await.unwrap() {
            ExecFrame::Stdout(d) => out.stdout.extend(d),
            ExecFrame::Stderr(d) => out.stderr.extend(d),
            ExecFrame::Exit(code) => {
                out.code = code;
                return out;
            }
            other => panic!("the agent sent {other:?}"),
        }
    }
}

/// After `Exit` the agent closes the connection and `serve` returns.
async fn assert_closed(mut client: DuplexStream, task: JoinHandle<()>) {
    task.await.unwrap();
    assert!(matches!(
        read_exec_frame(&mut client).await,
        Err(berth_proto::ExecFrameError::Closed)
    ));
}

fn gone(pid: Pid) -> bool {
    kill(pid, None) == Err(Errno::ESRCH)
}

async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(LIMIT, f)
        .await
        .expect("test timed out")
}

#[tokio::test]
async fn pipes_carry_stdout_stderr_and_the_exit_code() {
    within(async {
        let (mut client, task) = connect();
        let req = request(&["sh", "-c", "echo out; echo err >&2; exit 3"], None);
        assert_eq!(exec(&mut client, req).await, Response::Ok);
        let out = collect(&mut client).await;
        assert_eq!(out.stdout(), "out\n");
        assert_eq!(out.stderr, b"err\n");
        assert_eq!(out.code, 3);
        assert_closed(client, task).await;
    })
    .await
}

#[tokio::test]
async fn stdin_is_relayed_and_eof_closes_it() {
    within(async {
        let (mut client, task) = connect();
        assert_eq!(
            exec(&mut client, request(&["cat"], None)).await,
            Response::Ok
        );
        for frame in [
            ExecFrame::Stdin(b"hello ".to_vec()),
            ExecFrame::Stdin(b"world".to_vec()),
            ExecFrame::StdinEof,
        ] {
            write_exec_frame(&mut client, &frame).await.unwrap();
        }
        let out = collect(&mut client).await;
        assert_eq!(out.stdout(), "hello world");
        assert_eq!(out.code, 0);
        assert_closed(client, task).await;
    })
    .await
}

#[tokio::test]
async fn large_output_is_split_into_frames() {
    within(async {
        let (mut client, task) = connect();
        let n = 3 * MAX_EXEC_PAYLOAD + 17;
        let script = format!("head -c {n} /dev/zero");
        let req = request(&["sh", "-c", &script], None);
        assert_eq!(exec(&mut client, req).await, Response::Ok);
        // read_exec_frame refuses payloads over the limit.
        let out = collect(&mut client).await;
        assert_eq!(out.stdout.len(), n);
        assert_eq!(out.code, 0);
        assert_closed(client, task).await;
    })
    .await
}

#[tokio::test]
async fn environment_and_working_directory() {
    within(async {
        let (mut client, task) = connect();
        let mut req = request(
            &["sh", "-c", "echo $FOO $HOME $TERM; pwd; echo $PATH"],
            None,
        );
        req.env = vec!["FOO=bar=baz".into()];
        req.cwd = Some("/tmp".into());
        assert_eq!(exec(&mut client, req).await, Response::Ok);
        let out = collect(&mut client).await;
        assert_eq!(
            out.stdout(),
            format!("bar=baz /root\n/tmp\n{}\n", crate::process::PATH)
        );
        assert_closed(client, task).await;
    })
    .await
}

#[tokio::test]
async fn signals_reach_the_process_and_end_in_128_plus_signal() {
    within(async {
        let (mut client, task) = connect();
        assert_eq!(
            exec(&mut client, request(&["sleep", "1000"], None)).await,
            Response::Ok
        );
        write_exec_frame(&mut client, &ExecFrame::Signal(15))
            .await
            .unwrap();
        assert_eq!(collect(&mut client).await.code, 128 + 15);
        assert_closed(client, task).await;
    })
    .await
}

#[tokio::test]
async fn tty_has_the_asked_size() {
    within(async {
        let (mut client, task) = connect();
        let size = TermSize { rows: 33, cols: 77 };
        let req = request(&["sh", "-c", "tty; stty size; echo $TERM"], Some(size));
        assert_eq!(exec(&mut client, req).await, Response::Ok);
        let out = collect(&mut client).await;
        let text = out.stdout();
        assert!(text.starts_with("/dev/pts/"), "{text:?}");
        assert!(text.contains("\r\n33 77\r\n"), "{text:?}");
        assert!(text.contains("xterm-256color"), "{text:?}");
        assert!(out.stderr.is_empty());
        assert_eq!(out.code, 0);
        assert_closed(client, task).await;
    })
    .await
}

#[tokio::test]
async fn tty_resize_and_input() {
    within(async {
        let (mut client, task) = connect();
        let size = TermSize { rows: 10, cols: 20 };
        let req = request(&["sh", "-c", "read x; stty size; echo got $x"], Some(size));
        assert_eq!(exec(&mut client, req).await, Response::Ok);
        let resize = ExecFrame::Resize {
            rows: 40,
            cols: 100,
        };
        write_exec_frame(&mut client, &resize).await.unwrap();
        write_exec_frame(&mut client, &ExecFrame::Stdin(b"go\n".to_vec()))
            .await
            .unwrap();
        let text = collect(&mut client).await.stdout();
        assert!(text.contains("40 100\r\n"), "{text:?}");
        assert!(text.contains("got go\r\n"), "{text:?}");
        assert_closed(client, task).await;
    })
    .await
}

#[tokio::test]
async fn tty_stdin_eof_ends_cat() {
    within(async {
        let (mut client, task) = connect();
        let size = TermSize { rows: 24, cols: 80 };
        assert_eq!(
            exec(&mut client, request(&["cat"], Some(size))).await,
            Response::Ok
        );
        write_exec_frame(&mut client, &ExecFrame::Stdin(b"abc\n".to_vec()))
            .await
            .unwrap();
        write_exec_frame(&mut client, &ExecFrame::StdinEof)
            .await
            .unwrap();
        let out = collect(&mut client).await;
        // The terminal echoes the line, then cat prints it.
        assert_eq!(out.stdout(), "abc\r\nabc\r\n");
        assert_eq!(out.code, 0);
        assert_closed(client, task).await;
    })
    .await
}

#[tokio::test]
async fn empty_argv_runs_a_login_shell() {
    within(async {
        let (mut client, task) = connect();
        assert_eq!(exec(&mut client, request(&[], None)).await, Response::Ok);
        let script = b"case $0 in *bash|*sh) exit 4;; esac; exit 1\n".to_vec();
        write_exec_frame(&mut client, &ExecFrame::Stdin(script))
            .await
            .unwrap();
        assert_eq!(collect(&mut client).await.code, 4);
        assert_closed(client, task).await;
    })
    .await
}

#[tokio::test]
async fn refused_requests_keep_the_connection() {
    within(async {
        let (mut client, task) = connect();
        let failed = |r: Response| match r {
            Response::Error {
                code: ErrorCode::Failed,
                message,
            } => message,
            other => panic!("expected a failure, got {other:?}"),
        };
        let msg = failed(exec(&mut client, request(&["berth-no-such-program"], None)).await);
        assert_eq!(msg, "no such program: berth-no-such-program");
        let mut bad_env = request(&["true"], None);
        bad_env.env = vec!["NOEQUALS".into()];
        assert!(failed(exec(&mut client, bad_env).await).contains("KEY=value"));
        let mut bad_cwd = request(&["true"], None);
        bad_cwd.cwd = Some("/berth/no/such/dir".into());
        assert!(failed(exec(&mut client, bad_cwd).await).contains("no such directory"));
        assert!(failed(exec(&mut client, request(&[""], None)).await).contains("NUL"));

        write_frame(&mut client, &Request::Ping { nonce: 5 })
            .await
            .unwrap();
        assert_eq!(
            read_frame::<Response, _>(&mut client).await.unwrap(),
            Response::Pong { nonce: 5 }
        );
        drop(client);
        task.await.unwrap();
    })
    .await
}

/// Starts `sh` printing its pid and then exec'ing into `sleep 1000`.
async fn start_sleeper(client: &mut DuplexStream, tty: Option<TermSize>) -> Pid {
    let req = request(&["sh", "-c", "echo $$; exec sleep 1000"], tty);
    assert_eq!(exec(client, req).await, Response::Ok);
    let mut line = String::new();
    while !line.contains('\n') {
        match read_exec_frame(client).await.unwrap() {
            ExecFrame::Stdout(d) => line.push_str(&String::from_utf8_lossy(&d)),
            other => panic!("unexpected {other:?}"),
        }
    }
    let pid = Pid::from_raw(line.trim().parse().unwrap());
    assert!(!gone(pid));
    pid
}

#[tokio::test]
async fn host_closing_kills_the_process() {
    within(async {
        for tty in [None, Some(TermSize { rows: 5, cols: 5 })] {
            let (mut client, task) = connect();
            let pid = start_sleeper(&mut client, tty).await;
            drop(client);
            task.await.unwrap();
            assert!(gone(pid), "pid {pid} survived (tty {tty:?})");
        }
    })
    .await
}

#[tokio::test]
async fn malformed_frame_kills_the_process() {
    within(async {
        let (mut client, task) = connect();
        let pid = start_sleeper(&mut client, None).await;
        client.write_all(&[0x7f, 0, 0, 0, 0]).await.unwrap();
        task.await.unwrap();
        assert!(gone(pid));
        // A frame kind only the agent sends is as bad.
        let (mut client, task) = connect();
        let pid = start_sleeper(&mut client, None).await;
        write_exec_frame(&mut client, &ExecFrame::Exit(0))
            .await
            .unwrap();
        task.await.unwrap();
        assert!(gone(pid));
    })
    .await
}

/// A background child that keeps the output open must not keep the
/// session from ending once the process itself exited.
#[tokio::test]
async fn lingering_children_do_not_hold_the_session() {
    within(async {
        for tty in [None, Some(TermSize { rows: 5, cols: 40 })] {
            let (mut client, task) = connect();
            // Ignoring SIGHUP keeps the child alive when the terminal's
            // session leader exits.
            let req = request(&["sh", "-c", "trap '' HUP; sleep 3 & echo done"], tty);
            assert_eq!(exec(&mut client, req).await, Response::Ok);
            let start = Instant::now();
            let out = collect(&mut client).await;
            assert!(out.stdout().starts_with("done"), "{:?}", out.stdout());
            assert_eq!(out.code, 0);
            assert!(start.elapsed() < Duration::from_secs(2), "tty {tty:?}");
            assert_closed(client, task).await;
        }
    })
    .await
}
