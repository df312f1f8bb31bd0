//! The 8250 serial console, from vm-superio, writing to the console log
//! (and optionally stdout). The guest decides how much it prints, so the
//! log is size-capped and rotated ([`RotatingLog`]).

use std::io::Write;

use berth_limits::RotatingLog;
use vm_superio::{Serial, Trigger};

/// Where console output goes.
#[derive(Debug)]
pub struct ConsoleOut {
    file: Option<RotatingLog>,
    stdout: bool,
    pub bytes: u64,
    /// The end of the output so far, to spot a kernel panic message.
    tail: Vec<u8>,
    pub panicked: bool,
}

const PANIC_MARK: &[u8] = b"Kernel panic - not syncing";

impl ConsoleOut {
    pub fn new(file: Option<RotatingLog>, stdout: bool) -> ConsoleOut {
        ConsoleOut {
            file,
            stdout,
            bytes: 0,
            tail: Vec::new(),
            panicked: false,
        }
    }

    fn scan(&mut self, buf: &[u8]) {
        self.tail.extend_from_slice(buf);
        if self.tail.windows(PANIC_MARK.len()).any(|w| w == PANIC_MARK) {
            self.panicked = true;
        }
        let keep = PANIC_MARK.len();
        if self.tail.len() > keep {
            self.tail.drain(..self.tail.len() - keep);
        }
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.bytes += buf.len() as u64;
        self.scan(buf);
        if let Some(f) = self.file.as_mut() {
            f.write_all(buf)?;
        }
        if self.stdout {
            let mut o = std::io::stdout().lock();
            o.write_all(buf)?;
            o.flush()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if let Some(f) = self.file.as_mut() {
            f.flush()?;
        }
        Ok(())
    }
}

/// Raises the serial line's interrupt.
pub struct IrqTrigger(pub Box<dyn Fn() + Send>);

impl std::fmt::Debug for IrqTrigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IrqTrigger")
    }
}

impl Trigger for IrqTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        (self.0)();
        Ok(())
    }
}

/// The console UART at 0x3f8 (8 ports).
pub struct SerialConsole {
    uart: Serial<IrqTrigger, vm_superio::serial::NoEvents, ConsoleOut>,
}

impl std::fmt::Debug for SerialConsole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SerialConsole")
    }
}

impl SerialConsole {
    pub fn new(irq: IrqTrigger, out: ConsoleOut) -> SerialConsole {
        SerialConsole {
            uart: Serial::new(irq, out),
        }
    }

    pub fn read(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }

    pub fn write(&mut self, offset: u8, value: u8) {
        // Errors are from the output file; the guest can't act on them.
        let _ = self.uart.write(offset, value);
    }

    pub fn bytes_out(&self) -> u64 {
        self.uart.writer().bytes
    }

    /// Whether the guest printed a kernel panic.
    pub fn guest_panicked(&self) -> bool {
        self.uart.writer().panicked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chatty_guest_cannot_grow_the_log_past_its_cap() {
        let dir = std::env::temp_dir().join(format!("berth-serial-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console.log");
        let log = RotatingLog::open(&path, 64 << 10).unwrap();
        let mut serial = SerialConsole::new(
            IrqTrigger(Box::new(|| {})),
            ConsoleOut::new(Some(log), false),
        );
        // 1 MiB through the UART's data register, byte by byte.
        for i in 0..(1u32 << 20) {
            serial.write(0, b'a' + (i % 26) as u8);
        }
        let cur = std::fs::metadata(&path).unwrap().len();
        let old = std::fs::metadata(dir.join("console.log.1")).unwrap().len();
        assert!(cur <= 64 << 10 && old == 64 << 10, "{cur} {old}");
        assert_eq!(serial.bytes_out(), 1 << 20);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn spots_a_panic_split_across_writes() {
        let mut o = ConsoleOut::new(None, false);
        o.write_all(b"[ 1.0] Kernel pan").unwrap();
        assert!(!o.panicked);
        o.write_all(b"ic - not syncing: Attempted to kill init!")
            .unwrap();
        assert!(o.panicked);
    }
}
