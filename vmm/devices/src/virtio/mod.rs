//! virtio devices and the virtio-mmio transport.

pub mod balloon;
pub mod blk;
pub mod device;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod queue;
pub mod rng;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;
pub mod vsock;
pub mod worker;
