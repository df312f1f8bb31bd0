//! berth-vmm as a library: the x86_64 boot path, the VM builder and its
//! event loop, and the vhost-user transport for external VMMs.

pub mod vhost_user;
pub mod x86_64;
