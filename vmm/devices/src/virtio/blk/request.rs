//! One virtio-blk request: parse, check, execute, and the status byte.

use std::io::{self, Read, Write};

use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryMmap;

use super::engine::{Counters, Engine};
use super::{MAX_DISCARD_SEGMENTS, MAX_REQUEST_BYTES, SECTOR_SIZE};

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
const WRITE_ZEROES_UNMAP: u32 = 1;

/// Bytes moved between guest memory and the file per step.
const CHUNK: usize = 1 << 20;

/// The status byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    IoErr = 1,
    Unsupported = 2,
}

/// Why a request failed (logged at debug; the guest sees the status).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("descriptor chain is malformed")]
    Chain,
    #[error("request of {0} bytes is larger than the device allows")]
    TooLarge(usize),
    #[error("request beyond the end of the disk")]
    OutOfRange,
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    #[error("an earlier flush failed; the disk's durability is unknown")]
    FlushFailed,
    #[error("I/O error: {0}")]
    Io(io::Error),
    #[error("flushing the disk failed: {0}")]
    Sync(io::Error),
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Completed: the bytes written to the guest (data + status), or 0 if
    /// not even a status byte could be written.
    Done(u32),
    /// The host's disk is full: nothing is reported to the guest and the
    /// request runs again once there is room.
    HostFull,
}

/// Runs the request in `chain`.
pub fn execute(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    engine: &mut Engine,
) -> Outcome {
    let c = engine.counters.clone();
    let Ok(mut reader) = chain.clone().reader(mem) else {
        Counters::add(&c.errors, 1);
        return Outcome::Done(0);
    };
    let Ok(mut writer) = chain.writer(mem) else {
        Counters::add(&c.errors, 1);
        return Outcome::Done(0);
    };
    // The status byte is the last writable byte.
    let Some(data_len) = writer.available_bytes().checked_sub(1) else {
        Counters::add(&c.errors, 1);
        return Outcome::Done(0);
    };
    let Ok(mut status_writer) = writer.split_at(data_len) else {
        Counters::add(&c.errors, 1);
        return Outcome::Done(0);
    };
    let result = run(&mut reader, &mut writer, data_len, engine);
    let status = match &result {
        Ok(()) => Status::Ok,
        Err(RequestError::Io(e)) if is_host_full(e) => {
            let waits = Counters::get(&c.enospc_waits);
            Counters::add(&c.enospc_waits, 1);
            if let Some(s) = engine.log.hit() {
                tracing::warn!(
                    "virtio-blk: the host disk is full; the guest's disk I/O waits until there is free space ({} waits so far){s}",
                    waits + 1
                );
            }
            return Outcome::HostFull;
        }
        Err(RequestError::Unsupported(_)) => Status::Unsupported,
        Err(_) => Status::IoErr,
    };
    if let Err(e) = &result {
        Counters::add(&c.errors, 1);
        match e {
            RequestError::Io(_) | RequestError::Sync(_) | RequestError::FlushFailed => {
                if let Some(s) = engine.log.hit() {
                    tracing::error!("virtio-blk: {e}{s}");
                }
            }
            _ => tracing::debug!("virtio-blk: {e}"),
        }
    }
    if status_writer.write_all(&[status as u8]).is_err() {
        return Outcome::Done(0);
    }
    // At most MAX_REQUEST_BYTES + 1: always fits.
    Outcome::Done(u32::try_from(writer.bytes_written() + 1).unwrap_or(0))
}

/// ENOSPC, or EDQUOT (a user's quota is a full disk too).
fn is_host_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

fn run(
    reader: &mut virtio_queue::Reader<'_>,
    writer: &mut virtio_queue::Writer<'_>,
    data_len: usize,
    e: &mut Engine,
) -> Result<(), RequestError> {
    let c = e.counters.clone();
    let mut hdr = [0u8; 16];
    reader
        .read_exact(&mut hdr)
        .map_err(|_| RequestError::Chain)?;
    let kind = u32::from_le_bytes(hdr[0..4].try_into().unwrap_or_default());
    let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap_or_default());
    // Descriptors may alias one another: a chain's total length says
    // nothing about guest memory, so it is capped here.
    for len in [data_len, reader.available_bytes()] {
        if len > MAX_REQUEST_BYTES {
            return Err(RequestError::TooLarge(len));
        }
    }
    let sectors = e.sectors;
    let span = |len: u64| -> Result<u64, RequestError> {
        let end = sector
            .checked_add(len.div_ceil(SECTOR_SIZE))
            .ok_or(RequestError::OutOfRange)?;
        if end > sectors || !len.is_multiple_of(SECTOR_SIZE) {
            return Err(RequestError::OutOfRange);
        }
        Ok(sector * SECTOR_SIZE)
    };
    match kind {
        T_IN => {
            let mut offset = span(data_len as u64)?;
            let mut buf = vec![0u8; data_len.min(CHUNK)];
            let mut left = data_len;
            while left > 0 {
                let n = left.min(buf.len());
                e.storage
                    .read_at(&mut buf[..n], offset)
                    .map_err(RequestError::Io)?;
                writer
                    .write_all(&buf[..n])
                    .map_err(|_| RequestError::Chain)?;
                offset += n as u64;
                left -= n;
            }
            Counters::add(&c.reads, 1);
            Counters::add(&c.bytes_read, data_len as u64);
            Ok(())
        }
        T_OUT => {
            if e.read_only {
                return Err(RequestError::ReadOnly);
            }
            let len = reader.available_bytes();
            let mut offset = span(len as u64)?;
            let mut buf = vec![0u8; len.min(CHUNK)];
            let mut left = len;
            while left > 0 {
                let n = left.min(buf.len());
                reader
                    .read_exact(&mut buf[..n])
                    .map_err(|_| RequestError::Chain)?;
                e.storage
                    .write_at(&buf[..n], offset)
                    .map_err(RequestError::Io)?;
                offset += n as u64;
                left -= n;
            }
            if !e.writeback {
                sync(e)?;
            }
            Counters::add(&c.writes, 1);
            Counters::add(&c.bytes_written, len as u64);
            Ok(())
        }
        T_FLUSH => {
            Counters::add(&c.flushes, 1);
            if e.read_only {
                return Ok(());
            }
            sync(e)
        }
        T_GET_ID => {
            let n = data_len.min(e.id.len());
            writer
                .write_all(&e.id[..n])
                .map_err(|_| RequestError::Chain)
        }
        T_DISCARD | T_WRITE_ZEROES => {
            if e.read_only {
                return Err(RequestError::ReadOnly);
            }
            let segs = reader.available_bytes() / 16;
            if segs == 0
                || segs > MAX_DISCARD_SEGMENTS as usize
                || !reader.available_bytes().is_multiple_of(16)
            {
                return Err(RequestError::Chain);
            }
            for _ in 0..segs {
                let mut seg = [0u8; 16];
                reader
                    .read_exact(&mut seg)
                    .map_err(|_| RequestError::Chain)?;
                let start = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
                let count = u32::from_le_bytes(seg[8..12].try_into().unwrap_or_default()) as u64;
                let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
                let end = start.checked_add(count).ok_or(RequestError::OutOfRange)?;
                if end > sectors {
                    return Err(RequestError::OutOfRange);
                }
                // Punching a hole reads back as zeroes and frees the space;
                // a write-zeroes that may not unmap keeps it allocated.
                let (off, len) = (start * SECTOR_SIZE, count * SECTOR_SIZE);
                if kind == T_WRITE_ZEROES && flags & WRITE_ZEROES_UNMAP == 0 {
                    e.storage.zero_range(off, len)
                } else {
                    e.storage.punch_hole(off, len)
                }
                .map_err(RequestError::Io)?;
            }
            if !e.writeback {
                sync(e)?;
            }
            Counters::add(&c.discards, 1);
            Ok(())
        }
        other => Err(RequestError::Unsupported(other)),
    }
}

/// Makes completed writes durable; once that has failed, never claims it
/// again.
fn sync(e: &mut Engine) -> Result<(), RequestError> {
    if e.flush_failed {
        Counters::add(&e.counters.flush_errors, 1);
        return Err(RequestError::FlushFailed);
    }
    if let Err(err) = e.storage.sync() {
        e.flush_failed = true;
        Counters::add(&e.counters.flush_errors, 1);
        e.counters
            .flush_failed
            .store(1, std::sync::atomic::Ordering::Relaxed);
        tracing::error!(
            "virtio-blk: flushing the disk failed ({err}); writes since the last good flush may be lost, and every later flush will fail"
        );
        return Err(RequestError::Sync(err));
    }
    Ok(())
}
