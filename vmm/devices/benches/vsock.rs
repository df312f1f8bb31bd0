//! vsock device throughput, in process: a guest driver on test queues in
//! memory (`virtio::vsock::testing`) and real unix sockets on the host
//! side, one stream and 16 streams each way, beside a plain unix socket
//! pair moving the same bytes on this machine in the same run.
//!
//! `cargo bench -p berth-devices --features test-utils --bench vsock`
//! (BERTH_BENCH_MIB: MiB per case, default 512).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use berth_devices::virtio::vsock::op;
use berth_devices::virtio::vsock::testing::{Guest, Hdr};

/// Guest RX buffers and guest TX packets carry this much data.
const PKT: u32 = 64 << 10;
/// Credit the guest advertises per connection.
const GUEST_BUF: u32 = 1 << 20;
/// Host reads and writes in chunks of this size.
const CHUNK: usize = 256 << 10;

fn mib() -> u64 {
    std::env::var("BERTH_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512)
}

/// A guest connected to `n` host streams (host-initiated, as docker.sock
/// connections are): returns the guest and (stream, host port) pairs.
fn connected(n: usize) -> (Guest, Vec<(UnixStream, u32)>) {
    let mut g = Guest::with("bench", PKT, 64);
    let conns = (0..n).map(|i| g.host_connect(5000 + i as u32)).collect();
    (g, conns)
}

/// Host → guest: writers on threads, the guest consuming on this one and
/// granting credit as it goes. Returns MB/s.
fn host_to_guest(streams: usize, total: u64) -> f64 {
    let (mut g, conns) = connected(streams);
    let per = total / streams as u64;
    let mut ports = Vec::new();
    let t0 = Instant::now();
    let writers: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, (mut s, hport))| {
            ports.push((5000 + i as u32, hport));
            std::thread::spawn(move || {
                let buf = vec![0xa5u8; CHUNK];
                let mut left = per;
                while left > 0 {
                    let n = left.min(CHUNK as u64) as usize;
                    s.write_all(&buf[..n]).unwrap();
                    left -= n as u64;
                }
                s
            })
        })
        .collect();
    let mut got: HashMap<u32, (u64, u64)> = HashMap::new(); // host port → (bytes, reported)
    let mut total_got = 0u64;
    while total_got < per * streams as u64 {
        let outstanding = g.rx_bufs.len();
        if outstanding < 64 {
            g.post_rx(64 - outstanding);
        }
        for (h, data) in g.poll() {
            if h.op != op::RW {
                continue;
            }
            total_got += data.len() as u64;
            let e = got.entry(h.src_port).or_default();
            e.0 += data.len() as u64;
            if e.0 - e.1 >= (GUEST_BUF / 4) as u64 {
                e.1 = e.0;
                let (gport, hport) = ports
                    .iter()
                    .copied()
                    .find(|&(_, hp)| hp == h.src_port)
                    .unwrap();
                let mut cu = Hdr::guest(op::CREDIT_UPDATE, gport, hport);
                cu.buf_alloc = GUEST_BUF;
                cu.fwd_cnt = e.0 as u32;
                g.send(cu, &[]);
            }
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    for w in writers {
        drop(w.join().unwrap());
    }
    total_got as f64 / secs / 1e6
}

/// Guest → host: the guest sends 64 KiB packets within the device's
/// credit; readers on threads. Returns MB/s.
fn guest_to_host(streams: usize, total: u64) -> f64 {
    let (mut g, conns) = connected(streams);
    let per = total / streams as u64;
    let t0 = Instant::now();
    let mut ports = Vec::new();
    let readers: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, (mut s, hport))| {
            ports.push((5000 + i as u32, hport));
            std::thread::spawn(move || {
                let mut buf = vec![0u8; CHUNK];
                let mut left = per;
                while left > 0 {
                    let n = s.read(&mut buf).unwrap();
                    assert!(n > 0, "stream ended early");
                    left -= n as u64;
                }
            })
        })
        .collect();
    // Per stream: bytes sent, and the device's latest credit (buf_alloc,
    // fwd_cnt) as it reported it.
    let mut sent = vec![0u64; streams];
    let mut credit: HashMap<u32, (u32, u32)> = HashMap::new();
    let data = vec![0x5au8; PKT as usize];
    while sent.iter().any(|&s| s < per) {
        let mut progressed = false;
        for (i, &(gport, hport)) in ports.iter().enumerate() {
            if sent[i] >= per {
                continue;
            }
            let (alloc, fwd) = credit.get(&hport).copied().unwrap_or((256 << 10, 0));
            let in_flight = (sent[i] as u32).wrapping_sub(fwd);
            if in_flight + PKT > alloc {
                continue;
            }
            let n = PKT.min((per - sent[i]) as u32);
            g.send(Hdr::guest(op::RW, gport, hport), &data[..n as usize]);
            sent[i] += n as u64;
            progressed = true;
        }
        if g.rx_bufs.len() < 32 {
            g.post_rx(32 - g.rx_bufs.len());
        }
        for (h, _) in g.poll() {
            credit.insert(h.src_port, (h.buf_alloc, h.fwd_cnt));
        }
        if !progressed {
            std::thread::yield_now();
        }
    }
    for r in readers {
        r.join().unwrap();
    }
    (per * streams as u64) as f64 / t0.elapsed().as_secs_f64() / 1e6
}

/// The same bytes through plain unix socket pairs, `streams` at once.
fn socketpair(streams: usize, total: u64) -> f64 {
    let per = total / streams as u64;
    let t0 = Instant::now();
    let threads: Vec<_> = (0..streams)
        .map(|_| {
            let (mut a, mut b) = UnixStream::pair().unwrap();
            let w = std::thread::spawn(move || {
                let buf = vec![0xa5u8; CHUNK];
                let mut left = per;
                while left > 0 {
                    let n = left.min(CHUNK as u64) as usize;
                    a.write_all(&buf[..n]).unwrap();
                    left -= n as u64;
                }
            });
            let r = std::thread::spawn(move || {
                let mut buf = vec![0u8; PKT as usize];
                let mut left = per;
                while left > 0 {
                    let n = b.read(&mut buf).unwrap();
                    left -= n as u64;
                }
            });
            (w, r)
        })
        .collect();
    for (w, r) in threads {
        w.join().unwrap();
        r.join().unwrap();
    }
    (per * streams as u64) as f64 / t0.elapsed().as_secs_f64() / 1e6
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let total = mib() << 20;
    println!(
        "vsock device in process, {} MiB per case; RX buffers and TX packets of {} KiB",
        total >> 20,
        PKT >> 10
    );
    println!(
        "{:<10} {:>16} {:>16} {:>18}",
        "streams", "host→guest MB/s", "guest→host MB/s", "socketpair MB/s"
    );
    for streams in [1, 16] {
        let h2g = host_to_guest(streams, total);
        let g2h = guest_to_host(streams, total);
        let pair = socketpair(streams, total);
        println!("{streams:<10} {h2g:>16.0} {g2h:>16.0} {pair:>18.0}");
    }
}
