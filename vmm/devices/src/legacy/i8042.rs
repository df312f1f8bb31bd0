//! An i8042 keyboard controller with just enough behaviour for a microVM:
//! the guest resets the machine through it (`reboot=k`, command 0xfe), and
//! the host sends ctrl-alt-del through its keyboard port, which the guest's
//! kernel turns into SIGINT to init (an orderly shutdown by the agent).

use std::collections::VecDeque;

/// What the device needs from the VMM.
pub trait I8042Host: Send {
    /// The guest asked for a CPU reset.
    fn reset(&mut self);
    /// Raise IRQ 1 (keyboard data ready).
    fn keyboard_interrupt(&mut self);
}

const OFS_DATA: u8 = 0;
const OFS_STATUS: u8 = 4;

const SB_OUT_DATA_AVAIL: u8 = 0x01;
const SB_I8042_CMD_DATA: u8 = 0x08;
const SB_KBD_ENABLED: u8 = 0x10;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
const CMD_RESET_CPU: u8 = 0xfe;

const CB_KBD_INT: u8 = 0x01;
const CB_POST_OK: u8 = 0x04;

/// Keyboard command answers.
const KBD_ACK: u8 = 0xfa;

/// Set-2 scancodes of the chord, make and break.
const CTRL_ALT_DEL: &[u8] = &[
    0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14,
];

/// Bytes the output buffer holds at most (a guest not reading can't make
/// us grow).
const BUF_MAX: usize = 64;

pub struct I8042<H: I8042Host> {
    host: H,
    status: u8,
    control: u8,
    outp: u8,
    /// The command whose data byte comes next on the data port.
    pending_cmd: u8,
    buf: VecDeque<u8>,
}

impl<H: I8042Host> std::fmt::Debug for I8042<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("I8042")
            .field("status", &self.status)
            .field("buffered", &self.buf.len())
            .finish()
    }
}

impl<H: I8042Host> I8042<H> {
    pub fn new(host: H) -> I8042<H> {
        I8042 {
            host,
            status: SB_KBD_ENABLED,
            control: CB_POST_OK | CB_KBD_INT,
            outp: 0,
            pending_cmd: 0,
            buf: VecDeque::new(),
        }
    }

    /// Sends ctrl-alt-del through the keyboard port.
    pub fn ctrl_alt_del(&mut self) {
        for &b in CTRL_ALT_DEL {
            self.push(b);
        }
        self.raise();
    }

    fn push(&mut self, b: u8) {
        if self.buf.len() < BUF_MAX {
            self.buf.push_back(b);
        }
        self.status |= SB_OUT_DATA_AVAIL;
    }

    fn raise(&mut self) {
        if self.control & CB_KBD_INT != 0 && !self.buf.is_empty() {
            self.host.keyboard_interrupt();
        }
    }

    /// Port read at `offset` (0 = data port 0x60, 4 = status port 0x64).
    pub fn read(&mut self, offset: u8) -> u8 {
        match offset {
            OFS_STATUS => self.status,
            OFS_DATA => {
                let b = self.buf.pop_front().unwrap_or(0);
                if self.buf.is_empty() {
                    self.status &= !SB_OUT_DATA_AVAIL;
                } else {
                    self.raise();
                }
                b
            }
            _ => 0,
        }
    }

    /// Port write at `offset`.
    pub fn write(&mut self, offset: u8, value: u8) {
        match offset {
            OFS_STATUS => {
                self.status |= SB_I8042_CMD_DATA;
                match value {
                    CMD_RESET_CPU => self.host.reset(),
                    CMD_READ_CTR => {
                        let c = self.control;
                        self.push(c);
                    }
                    CMD_READ_OUTP => {
                        let o = self.outp;
                        self.push(o);
                    }
                    CMD_WRITE_CTR | CMD_WRITE_OUTP => self.pending_cmd = value,
                    _ => {}
                }
            }
            OFS_DATA => {
                self.status &= !SB_I8042_CMD_DATA;
                match std::mem::take(&mut self.pending_cmd) {
                    CMD_WRITE_CTR => self.control = value,
                    CMD_WRITE_OUTP => self.outp = value,
                    // A command to the keyboard itself: acknowledge it.
                    _ => {
                        self.push(KBD_ACK);
                        self.raise();
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Host {
        resets: u32,
        irqs: u32,
    }
    impl I8042Host for Host {
        fn reset(&mut self) {
            self.resets += 1;
        }
        fn keyboard_interrupt(&mut self) {
            self.irqs += 1;
        }
    }

    #[test]
    fn reset_command_resets() {
        let mut d = I8042::new(Host::default());
        d.write(OFS_STATUS, CMD_RESET_CPU);
        assert_eq!(d.host.resets, 1);
    }

    #[test]
    fn ctrl_alt_del_is_read_as_scancodes_with_an_interrupt() {
        let mut d = I8042::new(Host::default());
        d.ctrl_alt_del();
        assert!(d.host.irqs >= 1);
        let mut got = Vec::new();
        while d.read(OFS_STATUS) & SB_OUT_DATA_AVAIL != 0 {
            got.push(d.read(OFS_DATA));
        }
        assert_eq!(got, CTRL_ALT_DEL);
    }

    #[test]
    fn control_byte_round_trips_and_keyboard_commands_are_acked() {
        let mut d = I8042::new(Host::default());
        d.write(OFS_STATUS, CMD_WRITE_CTR);
        d.write(OFS_DATA, 0x45);
        d.write(OFS_STATUS, CMD_READ_CTR);
        assert_eq!(d.read(OFS_DATA), 0x45);
        d.write(OFS_DATA, 0xff);
        assert_eq!(d.read(OFS_DATA), KBD_ACK);
        // A guest that never reads can't grow the buffer.
        for _ in 0..1000 {
            d.write(OFS_DATA, 0xf2);
        }
        assert!(d.buf.len() <= BUF_MAX);
    }
}
