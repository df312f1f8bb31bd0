//! Berth's device models. Each device's logic is written once over
//! virtqueues and guest memory, with no hypervisor or event-loop types, so
//! the same code serves `berth-vmm`'s virtio-mmio transport and the
//! vhost-user transport that QEMU attaches to.

pub mod legacy;
pub mod virtio;
