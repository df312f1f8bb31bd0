//! virtio-blk throughput: requests/s and MB/s of our device (test queues in
//! memory, a real file on this disk) beside `fio` doing the same I/O to the
//! same file in the same run.
//!
//! `cargo bench -p berth-devices --features test-utils --bench blk` (BERTH_BENCH_DIR picks the
//! directory of the test file, default `target/bench-blk`; BERTH_BENCH_SECS
//! the time per case, default 3).

use std::process::Command;
use std::sync::atomic::AtomicU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_devices::virtio::blk::Block;
use berth_devices::virtio::device::{InterruptLine, QueueInterrupt, VirtioDevice};
use berth_devices::virtio::testing::TestQueue;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const FILE_SIZE: u64 = 1 << 30;
const QSIZE: u16 = 256;
/// Requests in flight per notification (a guest with queue depth 32).
const DEPTH: usize = 32;
const HDR_AREA: u64 = 0x10_0000;
const STATUS_AREA: u64 = 0x18_0000;
const DATA_AREA: u64 = 0x20_0000;
const MEM: usize = DATA_AREA as usize + DEPTH * (1 << 20) + (1 << 20);

struct NoIrq;
impl InterruptLine for NoIrq {
    fn trigger(&self) {}
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    Read,
    Write,
    WriteFlush,
}

struct Rig {
    mem: &'static GuestMemoryMmap,
    q: TestQueue,
    dev: Block,
    submitted: u16,
}

impl Rig {
    fn new(path: &std::path::Path) -> Rig {
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap(),
        ));
        let q = TestQueue::new(mem, GuestAddress(0), QSIZE);
        let mut dev = Block::open(path, false).unwrap();
        dev.ack_features(dev.features() & !(1 << 29)); // no EVENT_IDX
        let irq = QueueInterrupt::new(Arc::new(NoIrq), Arc::new(AtomicU32::new(0)));
        dev.activate(mem.clone(), vec![q.queue()], irq);
        Rig {
            mem,
            q,
            dev,
            submitted: 0,
        }
    }

    fn put_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = RawDescriptor::from(Descriptor::new(addr, len, flags, next));
        self.q.set_desc(self.mem, i, d);
    }

    /// Queues one request in `slot` (3 descriptors: header, data, status).
    fn queue(&mut self, slot: usize, kind: u32, sector: u64, len: u32) {
        const NEXT: u16 = 1;
        const WRITE: u16 = 2;
        let hdr = HDR_AREA + slot as u64 * 16;
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        let d0 = (slot * 3) as u16;
        let status = STATUS_AREA + slot as u64;
        if len > 0 {
            self.put_desc(d0, hdr, 16, NEXT, d0 + 1);
            let data = DATA_AREA + slot as u64 * (1 << 20);
            let dflags = if kind == 0 { WRITE | NEXT } else { NEXT };
            self.put_desc(d0 + 1, data, len, dflags, d0 + 2);
            self.put_desc(d0 + 2, status, 1, WRITE, 0);
        } else {
            self.put_desc(d0, hdr, 16, NEXT, d0 + 1);
            self.put_desc(d0 + 1, status, 1, WRITE, 0);
        }
        self.q.offer(self.mem, d0);
        self.submitted = self.submitted.wrapping_add(1);
    }

    /// Notifies, waits until everything offered has completed.
    fn kick_and_wait(&mut self) {
        self.dev.queue_notify(0);
        while self.q.used_idx(self.mem) != self.submitted {
            std::thread::yield_now();
        }
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Runs one case for `secs`; returns (requests/s, MB/s) counting data
/// requests only.
fn ours(rig: &mut Rig, op: Op, bs: u32, random: bool, secs: f64) -> (f64, f64) {
    let mut rng = Rng(0x9e3779b97f4a7c15);
    let blocks = FILE_SIZE / bs as u64;
    let mut next_seq = 0u64;
    let mut done = 0u64;
    let t0 = Instant::now();
    while t0.elapsed().as_secs_f64() < secs {
        let per_batch = if op == Op::WriteFlush {
            DEPTH / 2
        } else {
            DEPTH
        };
        let mut slot = 0;
        for _ in 0..per_batch {
            let block = if random {
                rng.next() % blocks
            } else {
                next_seq = (next_seq + 1) % blocks;
                next_seq
            };
            let sector = block * bs as u64 / 512;
            let kind = if op == Op::Read { 0 } else { 1 };
            rig.queue(slot, kind, sector, bs);
            slot += 1;
            if op == Op::WriteFlush {
                rig.queue(slot, 4, 0, 0);
                slot += 1;
            }
        }
        rig.kick_and_wait();
        done += per_batch as u64;
    }
    let s = t0.elapsed().as_secs_f64();
    (done as f64 / s, done as f64 * bs as f64 / s / 1e6)
}

/// fio doing the same to the same file: psync (one request at a time,
/// pread/pwrite as our device does), `fsync=1` for the flushed case.
fn fio(path: &std::path::Path, op: Op, bs: u32, random: bool, secs: f64) -> Option<(f64, f64)> {
    let rw = match (op, random) {
        (Op::Read, true) => "randread",
        (Op::Read, false) => "read",
        (_, true) => "randwrite",
        (_, false) => "write",
    };
    let mut cmd = Command::new("fio");
    cmd.args([
        "--name=ref",
        "--ioengine=psync",
        "--iodepth=1",
        "--direct=0",
        // Our device runs against the page cache as it is; fio would drop
        // the file's cached pages first.
        "--invalidate=0",
        "--time_based",
        "--output-format=json",
        &format!("--rw={rw}"),
        &format!("--bs={bs}"),
        &format!("--size={FILE_SIZE}"),
        &format!("--runtime={}", secs.ceil() as u64),
    ])
    .arg(format!("--filename={}", path.display()));
    if op == Op::WriteFlush {
        cmd.arg("--fsync=1");
    }
    let out = cmd.output().ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let side = if op == Op::Read { "read" } else { "write" };
    let j = &v["jobs"][0][side];
    Some((j["iops"].as_f64()?, j["bw_bytes"].as_f64()? / 1e6))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let dir = std::env::var_os("BERTH_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bench-blk")
        });
    let secs: f64 = std::env::var("BERTH_BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3.0);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("blk-bench.img");
    // A fully written file, so reads come from real data (page cache warm
    // for both us and fio).
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0x5au8; 1 << 20];
        for _ in 0..(FILE_SIZE >> 20) {
            f.write_all(&chunk).unwrap();
        }
        f.sync_all().unwrap();
    }
    let have_fio = Command::new("fio").arg("--version").output().is_ok();
    println!(
        "virtio-blk on {} ({} GiB file), {secs} s per case; ours at queue depth {DEPTH}, fio psync depth 1{}",
        path.display(),
        FILE_SIZE >> 30,
        if have_fio { "" } else { " (fio not installed: apt-get install fio)" }
    );
    println!(
        "{:<28} {:>12} {:>10} {:>12} {:>10}",
        "case", "ours req/s", "ours MB/s", "fio req/s", "fio MB/s"
    );
    let cases = [
        ("4 KiB random read", Op::Read, 4096, true),
        ("4 KiB random write", Op::Write, 4096, true),
        ("4 KiB random write+flush", Op::WriteFlush, 4096, true),
        ("1 MiB sequential read", Op::Read, 1 << 20, false),
        ("1 MiB sequential write", Op::Write, 1 << 20, false),
        ("1 MiB seq write+flush", Op::WriteFlush, 1 << 20, false),
    ];
    for (name, op, bs, random) in cases {
        let mut rig = Rig::new(&path);
        let (r, mb) = ours(&mut rig, op, bs, random, secs);
        drop(rig);
        let reference = if have_fio {
            fio(&path, op, bs, random, secs)
        } else {
            None
        };
        let (fr, fmb) = reference.map_or(("-".into(), "-".into()), |(a, b)| {
            (format!("{a:.0}"), format!("{b:.1}"))
        });
        println!("{name:<28} {r:>12.0} {mb:>10.1} {fr:>12} {fmb:>10}");
    }
    let _ = std::fs::remove_file(&path);
    let _ = Duration::ZERO;
}
