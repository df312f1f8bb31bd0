//! The vhost-user transport: serves Berth's device logic to an external VMM
//! (QEMU's `vhost-user-*-device`) over a unix socket, for hosts where our
//! own hypervisor backend cannot run.

pub mod vsock;
