//! The control protocol's server side (types in `berth-proto`).

use std::sync::Arc;

use berth_proto::{
    read_frame, write_frame, AgentInfo, ErrorCode, FrameError, Request, Response, PROTOCOL_VERSION,
};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::clock;
use crate::exec;
use crate::reaper::Reaper;
use crate::state::{Shared, ShutdownCause};

/// Oldest client protocol version the agent still speaks.
const MIN_PROTOCOL: u32 = 1;

/// Serves one control connection until the peer closes it or sends
/// something malformed (answered with an error, then closed). An `exec`
/// that starts takes the connection over: it is closed when the process
/// has exited and its exit was sent.
pub async fn serve<S>(mut stream: S, shared: Arc<Shared>, reaper: Arc<Reaper>, kernel_release: &str)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        let handled = match read_frame::<Request, _>(&mut stream).await {
            Ok(req) => handle(req, &shared, &reaper, kernel_release),
            Err(FrameError::Closed) => return,
            Err(FrameError::Io(e)) => {
                tracing::debug!("control connection failed: {e}");
                return;
            }
            Err(e) => {
                let reply = Response::Error {
                    code: ErrorCode::BadRequest,
                    message: e.to_string(),
                };
                let _ = write_frame(&mut stream, &reply).await;
                return;
            }
        };
        match handled {
            Handled::Reply(reply) => {
                if write_frame(&mut stream, &reply).await.is_err() {
                    return;
                }
            }
            Handled::WatchPorts => {
                watch_ports(stream, &shared).await;
                return;
            }
            Handled::Exec(mut session) => {
                if write_frame(&mut stream, &Response::Ok).await.is_err() {
                    session.kill().await;
                    return;
                }
                session.run(stream).await;
                return;
            }
        }
    }
}

/// What a request leads to.
#[derive(Debug)]
pub enum Handled {
    /// One response, then the next request.
    Reply(Response),
    /// A started process that takes over the connection.
    Exec(exec::Session),
    /// The connection now carries the published ports and their changes.
    WatchPorts,
}

/// Sends the published ports now and after every change, until the peer
/// goes away.
async fn watch_ports<S>(mut stream: S, shared: &Shared)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    use tokio::io::AsyncReadExt;
    let mut rx = shared.ports.watch();
    loop {
        let ports = rx.borrow_and_update().clone();
        if write_frame(&mut stream, &Response::Ports { ports })
            .await
            .is_err()
        {
            return;
        }
        let mut byte = [0u8; 1];
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            // The host sends nothing more: a read returning means it left.
            _ = stream.read(&mut byte) => return,
        }
    }
}

fn failed(message: String) -> Response {
    Response::Error {
        code: ErrorCode::Failed,
        message,
    }
}

/// Carries out one request.
pub fn handle(req: Request, shared: &Shared, reaper: &Reaper, kernel_release: &str) -> Handled {
    let reply = match req {
        Request::Hello { protocol, client } => {
            if protocol < MIN_PROTOCOL {
                return Handled::Reply(Response::Error {
                    code: ErrorCode::UnsupportedVersion,
                    message: format!(
                        "protocol {protocol} is too old; this agent speaks {MIN_PROTOCOL}..={PROTOCOL_VERSION}"
                    ),
                });
            }
            tracing::debug!("control client {client:?} connected (protocol {protocol})");
            Response::Hello(AgentInfo {
                protocol: protocol.min(PROTOCOL_VERSION),
                agent_version: env!("CARGO_PKG_VERSION").to_owned(),
                kernel_release: kernel_release.to_owned(),
            })
        }
        Request::Ping { nonce } => Response::Pong { nonce },
        Request::GetState => Response::State(shared.snapshot()),
        Request::SetClock { unix_nanos } => match clock::set(unix_nanos) {
            Ok(()) => Response::Ok,
            Err(e) => failed(format!("setting the clock failed: {e}")),
        },
        Request::GetClock => match clock::now_nanos() {
            Ok(unix_nanos) => Response::Clock { unix_nanos },
            Err(e) => failed(format!("reading the clock failed: {e}")),
        },
        Request::AdjustClock { offset_nanos, step } => match clock::adjust(offset_nanos, step) {
            Ok(()) => Response::Ok,
            Err(e) => failed(e),
        },
        Request::Shutdown => {
            shared.request_shutdown(ShutdownCause::Request);
            Response::Ok
        }
        Request::WatchPorts => return Handled::WatchPorts,
        Request::Exec(req) => match exec::start(reaper, req) {
            Ok(session) => return Handled::Exec(session),
            Err(e) => {
                tracing::debug!("exec refused: {e}");
                Response::Error {
                    code: ErrorCode::Failed,
                    message: e.to_string(),
                }
            }
        },
    };
    Handled::Reply(reply)
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_proto::{encode_frame, Phase};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn roundtrip(input: Vec<u8>) -> (Vec<Response>, Arc<Shared>) {
        let shared = Shared::new();
        let reaper = Reaper::start_own_children().unwrap();
        let (mut client, server) = tokio::io::duplex(4096);
        let task = tokio::spawn(serve(server, shared.clone(), reaper, "6.1.0-test"));
        client.write_all(&input).await.unwrap();
        client.shutdown().await.unwrap();
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
        task.await.unwrap();
        let mut replies = Vec::new();
        let mut rest = &out[..];
        while rest.len() >= 4 {
            let len = berth_proto::decode_len(rest[..4].try_into().unwrap()).unwrap();
            replies.push(berth_proto::decode_body(&rest[4..4 + len]).unwrap());
            rest = &rest[4 + len..];
        }
        (replies, shared)
    }

    #[tokio::test]
    async fn hello_ping_state_shutdown() {
        let mut input = Vec::new();
        for req in [
            Request::Hello {
                protocol: 9,
                client: "t".into(),
            },
            Request::Ping { nonce: 42 },
            Request::GetState,
            Request::Shutdown,
        ] {
            input.extend(encode_frame(&req).unwrap());
        }
        let (replies, shared) = roundtrip(input).await;
        assert_eq!(replies.len(), 4);
        assert!(
            matches!(&replies[0], Response::Hello(i) if i.protocol == PROTOCOL_VERSION && i.kernel_release == "6.1.0-test")
        );
        assert_eq!(replies[1], Response::Pong { nonce: 42 });
        assert!(matches!(&replies[2], Response::State(s) if s.phase == Phase::Booting));
        assert_eq!(replies[3], Response::Ok);
        // The shutdown request was registered.
        let cause = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            shared.shutdown_requested(),
        )
        .await;
        assert_eq!(cause.unwrap(), ShutdownCause::Request);
    }

    #[tokio::test]
    async fn malformed_frames_get_an_error_and_a_close() {
        let bad_inputs: Vec<Vec<u8>> = vec![
            [&[0, 0, 0, 5][..], b"{nope"].concat(),
            [&[0, 0, 0, 13][..], br#"{"type":"x"}"#, b" "].concat(),
            vec![0xff, 0xff, 0xff, 0xff],
            vec![0, 0, 0, 0],
        ];
        for input in bad_inputs {
            // A valid ping after the garbage must not be answered.
            let mut input = input.clone();
            input.extend(encode_frame(&Request::Ping { nonce: 1 }).unwrap());
            let (replies, _) = roundtrip(input).await;
            assert_eq!(replies.len(), 1, "{replies:?}");
            assert!(matches!(
                &replies[0],
                Response::Error {
                    code: ErrorCode::BadRequest,
                    ..
                }
            ));
        }
    }

    #[tokio::test]
    async fn old_protocol_is_refused() {
        let (replies, _) = roundtrip(
            encode_frame(&Request::Hello {
                protocol: 0,
                client: "old".into(),
            })
            .unwrap(),
        )
        .await;
        assert!(matches!(
            &replies[0],
            Response::Error {
                code: ErrorCode::UnsupportedVersion,
                ..
            }
        ));
    }
}
