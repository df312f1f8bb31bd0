//! virtio devices.

pub mod vsock;
