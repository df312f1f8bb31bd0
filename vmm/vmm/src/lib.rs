//! berth-vmm as a library: the x86_64 boot path, the VM builder and its
//! event loop, and the vhost-user transport for external VMMs.

pub mod api;
pub mod config;
pub mod event_loop;
pub mod exit;
pub mod vcpu;
pub mod vhost_user;
pub mod vm;
pub mod x86_64;
