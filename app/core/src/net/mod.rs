//! The VM's network on the host side: passt (the guest's way out and to
//! the host's loopback), the guest's resolver, and published ports.
//!
//! * [`passt`]: the host agent starts passt as the user and hands it a
//!   connection to the VM's network socket (QEMU's `-netdev stream` or
//!   berth-vmm's virtio-net), restarting it if it dies;
//! * [`dns`]: answers the guest agent's relayed DNS queries with the
//!   host's view of names;
//! * [`hostloop`]: TCP from the guest to the host's loopback
//!   (`host.docker.internal`), over vsock;
//! * [`ports`]: binds every port the containers publish on the host and
//!   joins each connection (or UDP peer) to the guest over vsock.
//!
//! See `docs/networking.md`.

pub mod dns;
pub mod hostloop;
pub mod passt;
pub mod ports;

use berth_proto::NetConfig;

/// Whether the host has IPv6 beyond loopback: a default route in
/// `/proc/net/ipv6_route`. Without it passt runs IPv4 only and the guest
/// gets no IPv6 address.
pub fn host_has_ipv6() -> bool {
    let Ok(routes) = std::fs::read_to_string("/proc/net/ipv6_route") else {
        return false;
    };
    routes.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // destination ::/0 on an interface other than lo
        f.len() >= 10 && f[0].bytes().all(|b| b == b'0') && f[1] == "00" && f[9] != "lo"
    })
}

/// The network the guest gets on this host.
pub fn plan() -> NetConfig {
    NetConfig::berth_default(host_has_ipv6())
}
