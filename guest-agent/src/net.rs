//! The guest's network: `eth0` (virtio-net, joined to passt on the host)
//! with the addresses the host chose, the resolver configuration, and the
//! names every guest process should know.

use anyhow::{bail, Context, Result};
use berth_proto::NetConfig;

use crate::reaper::Reaper;

/// Where `ip -batch` reads its commands from.
const BATCH: &str = "/run/berth/net.batch";

/// The `ip -batch` commands that bring up `lo` and `eth0` for `cfg`.
pub fn ip_batch(cfg: &NetConfig) -> String {
    let mut s = format!(
        "link set lo up\n\
         link set eth0 mtu {mtu}\n\
         addr add {ip}/{p} dev eth0\n\
         link set eth0 up\n\
         route add default via {gw} dev eth0\n",
        mtu = cfg.mtu,
        ip = cfg.ipv4,
        p = cfg.prefix4,
        gw = cfg.gateway4,
    );
    if let Some(v6) = &cfg.ipv6 {
        s.push_str(&format!(
            "addr add {}/{} dev eth0 nodad\nroute add ::/0 via {} dev eth0\n",
            v6.addr, v6.prefix, v6.gateway
        ));
    }
    s
}

/// `/etc/resolv.conf`: the agent's own resolver on the guest's address,
/// which containers on every network can reach (dockerd drops loopback
/// resolvers from containers' copies).
pub fn resolv_conf(cfg: &NetConfig) -> String {
    format!(
        "# Berth: the guest agent relays queries to the host, which answers\n\
         # with the host's own resolver and /etc/hosts.\n\
         nameserver {}\n",
        cfg.ipv4
    )
}

/// The names the host is known by inside the guest.
pub fn hosts_lines(cfg: &NetConfig) -> String {
    format!(
        "{} host.docker.internal gateway.docker.internal\n",
        cfg.gateway4
    )
}

/// Brings up `lo` and `eth0` and writes resolv.conf and the host names.
/// Without network settings only `lo` comes up.
pub async fn setup(reaper: &Reaper, cfg: Option<&NetConfig>) -> Result<()> {
    let batch = match cfg {
        Some(c) => ip_batch(c),
        None => "link set lo up\n".to_owned(),
    };
    std::fs::write(BATCH, &batch).context("writing the ip commands")?;
    if cfg.is_some() {
        // Static addresses only: no router advertisements, no DAD wait.
        let _ = std::fs::write("/proc/sys/net/ipv6/conf/eth0/accept_ra", "0");
    }
    let out = crate::process::run(reaper, "ip", &["-batch", BATCH]).await?;
    if !out.exit.success() {
        bail!("ip -batch failed ({}): {}", out.exit, out.text.trim());
    }
    if let Some(c) = cfg {
        std::fs::write("/run/berth/resolv.conf", resolv_conf(c)).context("writing resolv.conf")?;
        let mut hosts = std::fs::read_to_string("/run/berth/hosts").unwrap_or_default();
        hosts.push_str(&hosts_lines(c));
        std::fs::write("/run/berth/hosts", hosts).context("writing hosts")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_for_the_default_network() {
        let c = NetConfig::berth_default(true);
        let b = ip_batch(&c);
        assert!(b.starts_with("link set lo up\n"), "{b}");
        assert!(b.contains("link set eth0 mtu 65520\n"), "{b}");
        assert!(b.contains("addr add 192.168.127.2/24 dev eth0\n"), "{b}");
        assert!(b.contains("route add default via 192.168.127.1 dev eth0\n"));
        assert!(
            b.contains("addr add fd00:b5:127::2/64 dev eth0 nodad\n"),
            "{b}"
        );
        assert!(
            b.contains("route add ::/0 via fd00:b5:127::1 dev eth0\n"),
            "{b}"
        );
        assert!(!ip_batch(&NetConfig::berth_default(false)).contains("::"));
        assert_eq!(
            resolv_conf(&c).lines().last(),
            Some("nameserver 192.168.127.2")
        );
        assert_eq!(
            hosts_lines(&c),
            "192.168.127.1 host.docker.internal gateway.docker.internal\n"
        );
    }
}
