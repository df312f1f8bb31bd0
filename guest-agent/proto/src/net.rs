//! Networking between the host and the guest agent: the guest's addresses
//! (chosen by the host, passed on the kernel command line), the published
//! ports the agent reports, and the two byte formats that cross vsock for
//! them: forwarded connections ([`FORWARD_PORT`]) and the DNS relay
//! ([`DNS_PORT`]). See `docs/networking.md`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Guest vsock port for published-port traffic: the host opens one
/// connection per forwarded TCP connection or UDP peer, starting with a
/// [`ForwardHeader`] line.
pub const FORWARD_PORT: u32 = 1030;

/// Host vsock port the agent connects to for DNS: every query a guest or
/// container process sends to the agent's resolver goes to the host agent
/// as a [`DnsFrame`], which answers with the host's view of names.
pub const DNS_PORT: u32 = 1026;

/// Host vsock port the agent connects to for a TCP connection to the
/// host's loopback (`host.docker.internal`): it sends a [`HostConnect`]
/// line, the host agent connects and answers `OK\n` (then bytes both
/// ways) or `ERR <reason>\n`.
pub const HOST_CONNECT_PORT: u32 = 1027;

/// What a [`HOST_CONNECT_PORT`] connection asks for: `tcp <port>\n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostConnect {
    pub port: u16,
}

impl HostConnect {
    pub fn encode(&self) -> String {
        format!("tcp {}\n", self.port)
    }

    /// Parses a request line (without its newline).
    pub fn parse(line: &str) -> Option<HostConnect> {
        let port: u16 = line.strip_prefix("tcp ")?.parse().ok()?;
        (port != 0).then_some(HostConnect { port })
    }
}

/// The guest's network settings. The host agent picks them, starts passt
/// (or gvproxy) with the same values and passes them on the kernel command
/// line, so both ends agree without DHCP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub ipv4: Ipv4Addr,
    pub prefix4: u8,
    /// The router; passt maps it to the host's loopback, so it is what
    /// `host.docker.internal` names.
    pub gateway4: Ipv4Addr,
    pub ipv6: Option<Ipv6Net>,
    pub mtu: u16,
}

/// The guest's IPv6 address, prefix and router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6Net {
    pub addr: Ipv6Addr,
    pub prefix: u8,
    pub gateway: Ipv6Addr,
}

/// Largest MTU passt offers: the largest 802.3 frame's payload, rounded
/// down to 32 bits. Bigger frames mean fewer of them per byte, which is
/// what an emulated guest pays for.
pub const MAX_MTU: u16 = 65520;

impl NetConfig {
    /// Berth's default network: 192.168.127.0/24 (as gvproxy uses) and
    /// fd00:b5:127::/64, guest .2, router .1.
    pub fn berth_default(ipv6: bool) -> NetConfig {
        NetConfig {
            ipv4: Ipv4Addr::new(192, 168, 127, 2),
            prefix4: 24,
            gateway4: Ipv4Addr::new(192, 168, 127, 1),
            ipv6: ipv6.then_some(Ipv6Net {
                addr: Ipv6Addr::new(0xfd00, 0xb5, 0x127, 0, 0, 0, 0, 2),
                prefix: 64,
                gateway: Ipv6Addr::new(0xfd00, 0xb5, 0x127, 0, 0, 0, 0, 1),
            }),
            mtu: MAX_MTU,
        }
    }

    /// The kernel command line words for these settings.
    pub fn cmdline_words(&self) -> String {
        let mut s = format!(
            "berth.ip={}/{} berth.gw={} berth.mtu={}",
            self.ipv4, self.prefix4, self.gateway4, self.mtu
        );
        if let Some(v6) = &self.ipv6 {
            s.push_str(&format!(
                " berth.ip6={}/{} berth.gw6={}",
                v6.addr, v6.prefix, v6.gateway
            ));
        }
        s
    }

    /// Reads the settings back from a kernel command line; `None` if the
    /// IPv4 words are missing or malformed (no network then). A malformed
    /// IPv6 pair only drops IPv6.
    pub fn from_cmdline(cmdline: &str) -> Option<NetConfig> {
        let mut ip = None;
        let mut gw = None;
        let mut ip6 = None;
        let mut gw6 = None;
        let mut mtu = 1500;
        for word in cmdline.split_ascii_whitespace() {
            let Some((k, v)) = word.split_once('=') else {
                continue;
            };
            match k {
                "berth.ip" => ip = parse_cidr::<Ipv4Addr>(v, 32),
                "berth.gw" => gw = v.parse::<Ipv4Addr>().ok(),
                "berth.ip6" => ip6 = parse_cidr::<Ipv6Addr>(v, 128),
                "berth.gw6" => gw6 = v.parse::<Ipv6Addr>().ok(),
                "berth.mtu" => {
                    if let Ok(m) = v.parse::<u16>() {
                        if (576..=MAX_MTU).contains(&m) {
                            mtu = m;
                        }
                    }
                }
                _ => {}
            }
        }
        let (ipv4, prefix4) = ip?;
        Some(NetConfig {
            ipv4,
            prefix4,
            gateway4: gw?,
            ipv6: match (ip6, gw6) {
                (Some((addr, prefix)), Some(gateway)) => Some(Ipv6Net {
                    addr,
                    prefix,
                    gateway,
                }),
                _ => None,
            },
            mtu,
        })
    }
}

fn parse_cidr<T: FromStr>(s: &str, max: u8) -> Option<(T, u8)> {
    let (a, p) = s.split_once('/')?;
    let p: u8 = p.parse().ok()?;
    (p > 0 && p <= max).then_some(())?;
    Some((a.parse().ok()?, p))
}

/// A transport protocol of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

impl FromStr for Proto {
    type Err = ();
    fn from_str(s: &str) -> Result<Proto, ()> {
        match s {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            _ => Err(()),
        }
    }
}

/// One port a running container publishes, as dockerd reports it: the
/// host agent binds `host_ip:host_port` on the host and forwards what
/// arrives there.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PublishedPort {
    pub proto: Proto,
    /// `0.0.0.0`, `::`, `127.0.0.1`, `::1`, …
    pub host_ip: IpAddr,
    pub host_port: u16,
    pub container_port: u16,
    /// The container's name (without the leading `/`).
    pub container: String,
}

/// First line of every [`FORWARD_PORT`] connection: which published port
/// the traffic arrived on, `tcp 127.0.0.1 8080\n`. The agent looks the
/// target up in its own table, so a stale host cannot reach anything a
/// container does not publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwardHeader {
    pub proto: Proto,
    pub host_ip: IpAddr,
    pub host_port: u16,
}

/// Longest header line accepted, newline included.
pub const MAX_FORWARD_HEADER: usize = 64;

impl ForwardHeader {
    pub fn encode(&self) -> String {
        format!("{} {} {}\n", self.proto, self.host_ip, self.host_port)
    }

    /// Parses a header line (without its newline).
    pub fn parse(line: &str) -> Option<ForwardHeader> {
        let mut it = line.split(' ');
        let proto = it.next()?.parse().ok()?;
        let host_ip = it.next()?.parse().ok()?;
        let host_port = it.next()?.parse().ok()?;
        if it.next().is_some() || host_port == 0 {
            return None;
        }
        Some(ForwardHeader {
            proto,
            host_ip,
            host_port,
        })
    }
}

/// UDP datagrams on a forwarded stream: a big-endian `u16` length, then
/// the datagram.
pub fn encode_datagram(payload: &[u8], out: &mut Vec<u8>) -> bool {
    let Ok(len) = u16::try_from(payload.len()) else {
        return false;
    };
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
    true
}

/// How a DNS query reached the agent, which decides how big an answer may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsTransport {
    Udp = 0,
    Tcp = 1,
}

/// One DNS message on the relay: the agent sends queries, the host agent
/// answers with the same `tag`. On the stream: a big-endian `u32` length
/// of what follows, the `u32` tag, one transport byte, the DNS message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsFrame {
    pub tag: u32,
    pub transport: DnsTransport,
    pub message: Vec<u8>,
}

/// Largest DNS message relayed (the TCP maximum).
pub const MAX_DNS_MESSAGE: usize = 65535;
/// Fixed part of a relay frame after the length.
const DNS_FRAME_FIXED: usize = 5;

/// A relay frame that cannot be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DnsFrameError {
    #[error("DNS relay frame of {0} bytes is outside 6..={max}", max = MAX_DNS_MESSAGE + DNS_FRAME_FIXED)]
    Length(usize),
    #[error("DNS relay frame has unknown transport {0}")]
    Transport(u8),
}

impl DnsFrame {
    pub fn encode(&self) -> Vec<u8> {
        let len = (DNS_FRAME_FIXED + self.message.len()) as u32;
        let mut out = Vec::with_capacity(4 + len as usize);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&self.tag.to_be_bytes());
        out.push(self.transport as u8);
        out.extend_from_slice(&self.message);
        out
    }

    /// Checks a frame's length header; returns how many bytes follow it.
    pub fn body_len(header: [u8; 4]) -> Result<usize, DnsFrameError> {
        let len = u32::from_be_bytes(header) as usize;
        if !(DNS_FRAME_FIXED + 1..=DNS_FRAME_FIXED + MAX_DNS_MESSAGE).contains(&len) {
            return Err(DnsFrameError::Length(len));
        }
        Ok(len)
    }

    /// Parses what follows the length header.
    pub fn decode_body(body: &[u8]) -> Result<DnsFrame, DnsFrameError> {
        if body.len() <= DNS_FRAME_FIXED || body.len() > DNS_FRAME_FIXED + MAX_DNS_MESSAGE {
            return Err(DnsFrameError::Length(body.len()));
        }
        let tag = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
        let transport = match body[4] {
            0 => DnsTransport::Udp,
            1 => DnsTransport::Tcp,
            t => return Err(DnsFrameError::Transport(t)),
        };
        Ok(DnsFrame {
            tag,
            transport,
            message: body[DNS_FRAME_FIXED..].to_vec(),
        })
    }
}

/// Reads one relay frame; `Ok(None)` on a clean end of stream.
#[cfg(feature = "tokio")]
pub async fn read_dns_frame<R>(r: &mut R) -> std::io::Result<Option<DnsFrame>>
where
    R: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;
    let mut header = [0u8; 4];
    match r.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = DnsFrame::body_len(header).map_err(std::io::Error::other)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    DnsFrame::decode_body(&body)
        .map(Some)
        .map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_config_survives_the_command_line() {
        for v6 in [false, true] {
            let c = NetConfig::berth_default(v6);
            let line = format!("console=ttyS0 {} quiet", c.cmdline_words());
            assert_eq!(NetConfig::from_cmdline(&line), Some(c));
        }
        assert_eq!(NetConfig::from_cmdline("console=ttyS0"), None);
        assert_eq!(
            NetConfig::from_cmdline("berth.ip=10.0.0.2/33 berth.gw=10.0.0.1"),
            None
        );
        assert_eq!(
            NetConfig::from_cmdline("berth.ip=10.0.0.2 berth.gw=10.0.0.1"),
            None
        );
        let c = NetConfig::from_cmdline(
            "berth.ip=10.0.0.2/8 berth.gw=10.0.0.1 berth.mtu=99999 berth.ip6=zz/64 berth.gw6=::1",
        )
        .unwrap();
        assert_eq!((c.mtu, c.ipv6), (1500, None));
    }

    #[test]
    fn forward_headers() {
        let h = ForwardHeader {
            proto: Proto::Udp,
            host_ip: "::1".parse().unwrap(),
            host_port: 5353,
        };
        assert_eq!(h.encode(), "udp ::1 5353\n");
        assert_eq!(ForwardHeader::parse("udp ::1 5353"), Some(h));
        for bad in [
            "",
            "tcp",
            "tcp 1.2.3.4",
            "sctp 1.2.3.4 80",
            "tcp 1.2.3.4 0",
            "tcp 1.2.3.4 65536",
            "tcp 1.2.3.4 80 x",
            "tcp  1.2.3.4 80",
        ] {
            assert_eq!(ForwardHeader::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn dns_frames_round_trip_and_refuse_bad_lengths() {
        let f = DnsFrame {
            tag: 7,
            transport: DnsTransport::Tcp,
            message: vec![1, 2, 3],
        };
        let bytes = f.encode();
        let len = DnsFrame::body_len(bytes[..4].try_into().unwrap()).unwrap();
        assert_eq!(len, bytes.len() - 4);
        assert_eq!(DnsFrame::decode_body(&bytes[4..]).unwrap(), f);
        assert!(DnsFrame::body_len([0, 0, 0, 5]).is_err());
        assert!(DnsFrame::body_len(u32::MAX.to_be_bytes()).is_err());
        assert!(DnsFrame::decode_body(&[0, 0, 0, 1, 9, 1]).is_err());
        assert!(DnsFrame::decode_body(&[0, 0, 0, 1]).is_err());
    }

    #[test]
    fn host_connect_lines() {
        let h = HostConnect { port: 5432 };
        assert_eq!(h.encode(), "tcp 5432\n");
        assert_eq!(HostConnect::parse("tcp 5432"), Some(h));
        for bad in [
            "",
            "tcp",
            "tcp 0",
            "tcp 70000",
            "udp 53",
            "tcp 1 2",
            "tcp -1",
        ] {
            assert_eq!(HostConnect::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn datagrams_fit_a_u16() {
        let mut out = Vec::new();
        assert!(encode_datagram(b"abc", &mut out));
        assert_eq!(out, [0, 3, b'a', b'b', b'c']);
        assert!(!encode_datagram(&vec![0; 70_000], &mut out));
    }

    #[test]
    fn published_ports_wire_format() {
        let p = PublishedPort {
            proto: Proto::Tcp,
            host_ip: "0.0.0.0".parse().unwrap(),
            host_port: 8080,
            container_port: 80,
            container: "web".into(),
        };
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(
            json,
            r#"{"proto":"tcp","host_ip":"0.0.0.0","host_port":8080,"container_port":80,"container":"web"}"#
        );
        assert_eq!(serde_json::from_str::<PublishedPort>(&json).unwrap(), p);
    }
}
