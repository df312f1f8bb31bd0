//! virtio devices and the virtio-mmio transport.

pub mod blk;
pub mod device;
pub mod mmio;
pub mod rng;
pub mod vsock;
