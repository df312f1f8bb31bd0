//! One virtio-blk request: parse, check, execute, and the status byte.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;

use nix::fcntl::{fallocate, FallocateFlags};
use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryMmap;

use super::{BlockMetrics, MAX_DISCARD_SEGMENTS, SECTOR_SIZE};

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
const WRITE_ZEROES_UNMAP: u32 = 1;

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
    #[error("request beyond the end of the disk")]
    OutOfRange,
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    #[error("I/O error: {0}")]
    Io(std::io::Error),
}

/// Runs the request in `chain`; returns the bytes written to the guest
/// (data + status), or 0 if not even a status byte could be written.
pub fn execute(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    file: &File,
    read_only: bool,
    sectors: u64,
    id: &[u8; 20],
    metrics: &mut BlockMetrics,
) -> u32 {
    let Ok(mut reader) = chain.clone().reader(mem) else {
        return 0;
    };
    let Ok(mut writer) = chain.writer(mem) else {
        return 0;
    };
    // The status byte is the last writable byte.
    let Some(data_len) = writer.available_bytes().checked_sub(1) else {
        metrics.errors += 1;
        return 0;
    };
    let Ok(mut status_writer) = writer.split_at(data_len) else {
        return 0;
    };
    let result = run(
        &mut reader,
        &mut writer,
        data_len,
        file,
        read_only,
        sectors,
        id,
        metrics,
    );
    let status = match &result {
        Ok(()) => Status::Ok,
        Err(RequestError::Unsupported(_)) => Status::Unsupported,
        Err(_) => Status::IoErr,
    };
    if let Err(e) = &result {
        metrics.errors += 1;
        tracing::debug!("virtio-blk: {e}");
    }
    if status_writer.write_all(&[status as u8]).is_err() {
        return 0;
    }
    (writer.bytes_written() + 1) as u32
}

#[allow(clippy::too_many_arguments)]
fn run(
    reader: &mut virtio_queue::Reader<'_>,
    writer: &mut virtio_queue::Writer<'_>,
    data_len: usize,
    file: &File,
    read_only: bool,
    sectors: u64,
    id: &[u8; 20],
    metrics: &mut BlockMetrics,
) -> Result<(), RequestError> {
    let mut hdr = [0u8; 16];
    reader
        .read_exact(&mut hdr)
        .map_err(|_| RequestError::Chain)?;
    let kind = u32::from_le_bytes(hdr[0..4].try_into().unwrap_or_default());
    let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap_or_default());
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
            let mut buf = vec![0u8; data_len.min(1 << 20)];
            let mut left = data_len;
            while left > 0 {
                let n = left.min(buf.len());
                file.read_exact_at(&mut buf[..n], offset)
                    .map_err(RequestError::Io)?;
                writer
                    .write_all(&buf[..n])
                    .map_err(|_| RequestError::Chain)?;
                offset += n as u64;
                left -= n;
            }
            metrics.reads += 1;
            metrics.bytes_read += data_len as u64;
            Ok(())
        }
        T_OUT => {
            if read_only {
                return Err(RequestError::ReadOnly);
            }
            let len = reader.available_bytes();
            let mut offset = span(len as u64)?;
            let mut buf = vec![0u8; len.min(1 << 20)];
            let mut left = len;
            while left > 0 {
                let n = left.min(buf.len());
                reader
                    .read_exact(&mut buf[..n])
                    .map_err(|_| RequestError::Chain)?;
                file.write_all_at(&buf[..n], offset)
                    .map_err(RequestError::Io)?;
                offset += n as u64;
                left -= n;
            }
            metrics.writes += 1;
            metrics.bytes_written += len as u64;
            Ok(())
        }
        T_FLUSH => {
            metrics.flushes += 1;
            if read_only {
                return Ok(());
            }
            file.sync_data().map_err(RequestError::Io)
        }
        T_GET_ID => {
            let n = data_len.min(id.len());
            writer.write_all(&id[..n]).map_err(|_| RequestError::Chain)
        }
        T_DISCARD | T_WRITE_ZEROES => {
            if read_only {
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
                let mode = if kind == T_WRITE_ZEROES && flags & WRITE_ZEROES_UNMAP == 0 {
                    FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE
                } else {
                    FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE
                };
                fallocate(
                    file,
                    mode,
                    (start * SECTOR_SIZE) as i64,
                    (count * SECTOR_SIZE) as i64,
                )
                .map_err(|e| RequestError::Io(e.into()))?;
            }
            metrics.discards += 1;
            Ok(())
        }
        other => Err(RequestError::Unsupported(other)),
    }
}
