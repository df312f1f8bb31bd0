//! Legacy PC devices: the 8250 serial console (vm-superio) and an i8042.

pub mod i8042;
pub mod serial;
