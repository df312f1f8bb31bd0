//! `berth-agent bench-ping <N>`: the in-guest Docker API round trip, for
//! host benchmarks that run it through `exec`. Only when not PID 1.

use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::{Method, StatusCode};

use crate::daemons::DOCKER_SOCKET;
use crate::docker_api::{ApiError, Connection};

/// Longest wait for one `/_ping` answer.
const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the benchmark stopped.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("dockerd answered /_ping with {0}")]
    Status(StatusCode),
    #[error("no answer to /_ping within {0:?}")]
    Timeout(Duration),
}

/// Runs the mode with the arguments after `bench-ping`; returns the exit
/// status.
pub fn main(args: &[String]) -> i32 {
    let n = match args {
        [n] => n.parse::<usize>().ok().filter(|n| *n > 0),
        _ => None,
    };
    let Some(n) = n else {
        eprintln!("usage: berth-agent bench-ping <N>  (N ≥ 1 requests)");
        return 2;
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("berth-agent: bench-ping cannot start a runtime: {e}");
            return 1;
        }
    };
    match rt.block_on(ping_many(DOCKER_SOCKET, n)) {
        Ok(samples) => {
            println!("{}", report(&samples));
            0
        }
        Err(e) => {
            eprintln!("berth-agent: bench-ping failed: {e}");
            1
        }
    }
}

/// `n` sequential `GET /_ping` on one keep-alive connection; the duration
/// of each, request written to answer read.
pub async fn ping_many(socket: &str, n: usize) -> Result<Vec<Duration>, BenchError> {
    let mut conn = Connection::open(socket).await?;
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        let answer = conn.send(Method::GET, "/_ping", "text/plain", Bytes::new());
        let (status, _) = tokio::time::timeout(PING_TIMEOUT, answer)
            .await
            .map_err(|_| BenchError::Timeout(PING_TIMEOUT))??;
        samples.push(start.elapsed());
        if status != StatusCode::OK {
            return Err(BenchError::Status(status));
        }
    }
    Ok(samples)
}

/// `bench-ping n=<N> median_us=<..> p90_us=<..> min_us=<..> mean_us=<..>`,
/// nearest-rank percentiles. The mean matters where the guest clock is
/// coarse (under TCG it is jiffies, 4 ms): single samples are quantized,
/// their sum is not.
pub fn report(samples: &[Duration]) -> String {
    let mut us: Vec<u128> = samples.iter().map(Duration::as_micros).collect();
    us.sort_unstable();
    let mean = us.iter().sum::<u128>() / us.len().max(1) as u128;
    format!(
        "bench-ping n={} median_us={} p90_us={} min_us={} mean_us={mean}",
        us.len(),
        percentile(&us, 50),
        percentile(&us, 90),
        us.first().copied().unwrap_or(0)
    )
}

/// The nearest-rank `p`th percentile of sorted values (0 for none).
fn percentile(sorted: &[u128], p: usize) -> u128 {
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted.get(rank - 1).copied().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use http_body_util::Full;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;

    #[test]
    fn percentiles_are_nearest_rank() {
        let ms =
            |v: &[u64]| -> Vec<Duration> { v.iter().map(|m| Duration::from_micros(*m)).collect() };
        assert_eq!(
            report(&ms(&[50, 10, 40, 30, 20, 60, 70, 80, 90, 100])),
            "bench-ping n=10 median_us=50 p90_us=90 min_us=10 mean_us=55"
        );
        assert_eq!(
            report(&ms(&[7])),
            "bench-ping n=1 median_us=7 p90_us=7 min_us=7 mean_us=7"
        );
        assert_eq!(
            report(&[]),
            "bench-ping n=0 median_us=0 p90_us=0 min_us=0 mean_us=0"
        );
    }

    #[test]
    fn bad_arguments_are_refused() {
        assert_eq!(main(&[]), 2);
        assert_eq!(main(&["0".into()]), 2);
        assert_eq!(main(&["x".into()]), 2);
        assert_eq!(main(&["1".into(), "2".into()]), 2);
    }

    /// A fake dockerd that accepts one connection only: all pings must
    /// travel on it.
    #[tokio::test]
    async fn pings_share_one_connection() {
        let dir = std::env::temp_dir().join(format!("berth-bench-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("docker.sock");
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let served = Arc::new(AtomicUsize::new(0));
        let count = served.clone();
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                assert_eq!(req.uri().path(), "/_ping");
                count.fetch_add(1, Ordering::Relaxed);
                async { Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from("OK")))) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
        let samples = ping_many(path.to_str().unwrap(), 25).await.unwrap();
        assert_eq!(samples.len(), 25);
        assert_eq!(served.load(Ordering::Relaxed), 25);
        server.abort();
        let _ = std::fs::remove_dir_all(dir);
    }
}
