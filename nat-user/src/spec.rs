//! Docker's `-p` syntax: `[HOST_IP:]HOST_PORT[-END]:CONTAINER_PORT[-END][/tcp|/udp]`, with an
//! IPv6 host address in brackets (`[::]:8080:80`).

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use anyhow::{Result, anyhow, bail};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    #[must_use]
    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => nat_common::PROTO_TCP,
            Self::Udp => nat_common::PROTO_UDP,
        }
    }

    /// The protocol with IP protocol number `n`, if a port can be published for it.
    #[must_use]
    pub const fn from_number(n: u8) -> Option<Self> {
        match n {
            nat_common::PROTO_TCP => Some(Self::Tcp),
            nat_common::PROTO_UDP => Some(Self::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

/// One published port: `host_ip:host_port -> container_port/proto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortMapping {
    /// As Docker has it: `None` = every address of the node, in each family the container
    /// has (`8080:80`); `0.0.0.0` = every IPv4 address, `::` every IPv6 one; else that
    /// address only.
    pub host_ip: Option<IpAddr>,
    pub host_port: u16,
    pub container_port: u16,
    pub proto: Proto,
}

/// Whether two listening addresses of one family overlap (`None`: every address).
fn overlap<T: PartialEq>(a: Option<Option<T>>, b: Option<Option<T>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a.is_none() || b.is_none() || a == b,
        _ => false,
    }
}

impl PortMapping {
    /// Where the port listens over IPv4: `None` not at all, `Some(None)` on every address,
    /// `Some(Some(a))` on `a`.
    #[must_use]
    pub fn v4(&self) -> Option<Option<Ipv4Addr>> {
        match self.host_ip {
            None => Some(None),
            Some(IpAddr::V4(a)) => Some((!a.is_unspecified()).then_some(a)),
            Some(IpAddr::V6(_)) => None,
        }
    }

    /// Where the port listens over IPv6, as `v4` says for IPv4.
    #[must_use]
    pub fn v6(&self) -> Option<Option<Ipv6Addr>> {
        match self.host_ip {
            None => Some(None),
            Some(IpAddr::V6(a)) => Some((!a.is_unspecified()).then_some(a)),
            Some(IpAddr::V4(_)) => None,
        }
    }

    /// Whether two mappings want the same host port on a shared address (Docker refuses
    /// the second).
    #[must_use]
    pub fn conflicts_with(&self, other: &Self) -> bool {
        self.proto == other.proto
            && self.host_port == other.host_port
            && (overlap(self.v4(), other.v4()) || overlap(self.v6(), other.v6()))
    }
}

impl fmt::Display for PortMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.host_ip {
            Some(IpAddr::V4(ip)) => write!(f, "{ip}:")?,
            Some(IpAddr::V6(ip)) => write!(f, "[{ip}]:")?,
            None => {}
        }
        write!(
            f,
            "{}:{}/{}",
            self.host_port, self.container_port, self.proto
        )
    }
}

/// Which host port a request wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostPort {
    /// Exactly this port (`8080:80`, or one port of a pairwise range).
    Exact(u16),
    /// Any free port of this range (`8000-8010:80`).
    OneOf(u16, u16),
    /// Any free port of the node's ephemeral range (`80`, `127.0.0.1::80`).
    Ephemeral,
}

/// One container port to publish, before the host port is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRequest {
    pub host_ip: Option<IpAddr>,
    pub host: HostPort,
    pub container_port: u16,
    pub proto: Proto,
}

impl PortRequest {
    /// Whether an existing mapping is what this request asked for (`port del`).
    #[must_use]
    pub fn matches(&self, m: &PortMapping) -> bool {
        self.host_ip == m.host_ip
            && self.container_port == m.container_port
            && self.proto == m.proto
            && match self.host {
                HostPort::Exact(p) => m.host_port == p,
                HostPort::OneOf(a, b) => (a..=b).contains(&m.host_port),
                HostPort::Ephemeral => true,
            }
    }
}

/// A parsed `-p` argument: Docker's syntax, one request per container port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSpec {
    pub requests: Vec<PortRequest>,
}

impl PortSpec {
    /// Choose host ports: exact ones as given, the others the lowest port of their range
    /// for which `free` holds (and that this spec has not taken already).
    pub fn resolve(
        &self,
        ephemeral: (u16, u16),
        free: impl Fn(&PortMapping) -> bool,
    ) -> Result<Vec<PortMapping>> {
        let mut out: Vec<PortMapping> = Vec::new();
        for r in &self.requests {
            let (lo, hi) = match r.host {
                HostPort::Exact(p) => (p, p),
                HostPort::OneOf(a, b) => (a, b),
                HostPort::Ephemeral => ephemeral,
            };
            let pick = (lo..=hi)
                .map(|host_port| PortMapping {
                    host_ip: r.host_ip,
                    host_port,
                    container_port: r.container_port,
                    proto: r.proto,
                })
                .find(|m| {
                    matches!(r.host, HostPort::Exact(_))
                        || (free(m) && !out.iter().any(|o| o.conflicts_with(m)))
                });
            match pick {
                Some(m) => out.push(m),
                None => bail!(
                    "no free host port in {lo}-{hi} for container port {}/{}",
                    r.container_port,
                    r.proto
                ),
            }
        }
        Ok(out)
    }
}

fn port(s: &str, what: &str) -> Result<u16> {
    match s.parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => bail!("invalid {what} port {s:?}: expected 1-65535"),
    }
}

fn range(s: &str, what: &str) -> Result<(u16, u16)> {
    match s.split_once('-') {
        None => {
            let p = port(s, what)?;
            Ok((p, p))
        }
        Some((a, b)) => {
            let (a, b) = (port(a, what)?, port(b, what)?);
            if b < a {
                bail!("invalid {what} port range {s:?}: end is below start");
            }
            Ok((a, b))
        }
    }
}

/// A `-p` argument's parts before they are expanded into one request per port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub host_ip: Option<IpAddr>,
    /// The host port range, `None` for an ephemeral port (`80`, `127.0.0.1::80`).
    pub host: Option<(u16, u16)>,
    pub container: (u16, u16),
    pub proto: Proto,
}

impl PortRange {
    /// Parse and check a `-p` argument (a host range of one port for several container
    /// ports is refused, a host range for one container port means any one of them).
    pub fn parse(spec: &str) -> Result<Self> {
        let err = |why: &str| {
            anyhow!(
                "invalid port spec {spec:?}: {why} (expected [[HOST_IP:]HOST_PORT[-END]:]CONTAINER_PORT[-END][/tcp|/udp])"
            )
        };
        let (ports, proto) = match spec.rsplit_once('/') {
            Some((p, "tcp")) => (p, Proto::Tcp),
            Some((p, "udp")) => (p, Proto::Udp),
            Some((_, other)) => return Err(err(&format!("unsupported protocol {other:?}"))),
            None => (spec, Proto::Tcp),
        };
        let (host_ip, host, cont) = if let Some(rest) = ports.strip_prefix('[') {
            // Docker's `[::]:8080:80`: an IPv6 host address in brackets.
            let (ip, rest) = rest
                .split_once("]:")
                .ok_or_else(|| err("a bracketed host address needs `]:` after it"))?;
            let ip: Ipv6Addr = ip
                .parse()
                .map_err(|_| err(&format!("{ip:?} is not an IPv6 address")))?;
            match rest.split(':').collect::<Vec<_>>().as_slice() {
                [h, c] => (Some(IpAddr::V6(ip)), *h, *c),
                _ => return Err(err("expected [IPV6]:HOST_PORT:CONTAINER_PORT")),
            }
        } else {
            let parts: Vec<&str> = ports.split(':').collect();
            match parts.as_slice() {
                [c] => (None, "", *c),
                [h, c] => {
                    if h.is_empty() {
                        return Err(err("the host port is missing"));
                    }
                    (None, *h, *c)
                }
                [ip, h, c] => {
                    let ip: Ipv4Addr = ip.parse().map_err(|_| {
                        err(&format!(
                            "{ip:?} is not an IPv4 address (an IPv6 one goes in brackets: [::1])"
                        ))
                    })?;
                    (Some(IpAddr::V4(ip)), *h, *c)
                }
                _ => return Err(err("too many ':'-separated fields")),
            }
        };
        let (c0, c1) = range(cont, "container").map_err(|e| err(&e.to_string()))?;
        let host = if host.is_empty() {
            None
        } else {
            let (h0, h1) = range(host, "host").map_err(|e| err(&e.to_string()))?;
            if !(c0 == c1 || h1 - h0 == c1 - c0) {
                return Err(err("host and container ranges differ in length"));
            }
            Some((h0, h1))
        };
        Ok(Self {
            host_ip,
            host,
            container: (c0, c1),
            proto,
        })
    }
}

impl FromStr for PortSpec {
    type Err = anyhow::Error;

    fn from_str(spec: &str) -> Result<Self> {
        let PortRange {
            host_ip,
            host,
            container: (c0, c1),
            proto,
        } = PortRange::parse(spec)?;
        let hosts: Vec<HostPort> = match host {
            None => vec![HostPort::Ephemeral; usize::from(c1 - c0) + 1],
            Some((h0, h1)) if c0 == c1 && h0 != h1 => vec![HostPort::OneOf(h0, h1)],
            Some((h0, h1)) => (h0..=h1).map(HostPort::Exact).collect(),
        };
        let requests = hosts
            .into_iter()
            .zip(c0..=c1)
            .map(|(host, container_port)| PortRequest {
                host_ip,
                host,
                container_port,
                proto,
            })
            .collect();
        Ok(Self { requests })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(s: &str) -> Vec<PortMapping> {
        s.parse::<PortSpec>()
            .unwrap()
            .resolve((32768, 60999), |_| true)
            .unwrap()
    }

    fn one(s: &str) -> PortMapping {
        let m = resolve(s);
        assert_eq!(m.len(), 1);
        m[0]
    }

    #[test]
    fn plain_mapping_defaults_to_tcp_on_every_address() {
        let m = one("8080:80");
        assert_eq!(m.host_ip, None);
        assert_eq!(
            (m.host_port, m.container_port, m.proto),
            (8080, 80, Proto::Tcp)
        );
    }

    #[test]
    fn host_ip_and_udp() {
        let m = one("127.0.0.1:5353:53/udp");
        assert_eq!(m.host_ip, Some(Ipv4Addr::LOCALHOST.into()));
        assert_eq!(m.proto, Proto::Udp);
        // As Docker: 0.0.0.0 is every IPv4 address only, `::` every IPv6 one.
        let any4 = one("0.0.0.0:80:80");
        assert_eq!((any4.v4(), any4.v6()), (Some(None), None));
        let any6 = one("[::]:80:80");
        assert_eq!((any6.v4(), any6.v6()), (None, Some(None)));
        let both = one("80:80");
        assert_eq!((both.v4(), both.v6()), (Some(None), Some(None)));
        let m = one("[2001:db8::2]:8080:80/udp");
        assert_eq!(m.v6(), Some(Some("2001:db8::2".parse().unwrap())));
        assert_eq!(m.to_string(), "[2001:db8::2]:8080:80/udp");
        assert_eq!(one("[::]::80").host_port, 32768);
        for bad in ["[::1:80:80", "[1.2.3.4]:80:80", "[::]:80", "::1:80:80"] {
            assert!(bad.parse::<PortSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn mappings_conflict_only_on_a_shared_address_of_a_shared_family() {
        let conflict = |a: &str, b: &str| one(a).conflicts_with(&one(b));
        assert!(conflict("8080:80", "0.0.0.0:8080:81"));
        assert!(conflict("8080:80", "[::]:8080:81"));
        assert!(conflict("[::]:8080:80", "[2001:db8::2]:8080:81"));
        assert!(!conflict("0.0.0.0:8080:80", "[::]:8080:81"));
        assert!(!conflict("127.0.0.1:8080:80", "[2001:db8::2]:8080:81"));
        assert!(!conflict("[2001:db8::3]:8080:80", "[2001:db8::2]:8080:81"));
        assert!(!conflict("8080:80", "8080:80/udp"));
    }

    #[test]
    fn ranges_expand_pairwise() {
        let pairs: Vec<_> = resolve("8000-8002:9000-9002/udp")
            .iter()
            .map(|m| (m.host_port, m.container_port))
            .collect();
        assert_eq!(pairs, vec![(8000, 9000), (8001, 9001), (8002, 9002)]);
    }

    #[test]
    fn omitted_host_ports_come_from_the_ephemeral_range() {
        assert_eq!(one("80").host_port, 32768);
        let m = one("127.0.0.1::80");
        assert_eq!(
            (m.host_ip, m.host_port),
            (Some(Ipv4Addr::LOCALHOST.into()), 32768)
        );
        let two = resolve("80-81");
        assert_eq!((two[0].host_port, two[1].host_port), (32768, 32769));
        let taken = "80"
            .parse::<PortSpec>()
            .unwrap()
            .resolve((32768, 60999), |m| m.host_port > 32770);
        assert_eq!(taken.unwrap()[0].host_port, 32771);
    }

    #[test]
    fn a_host_range_for_one_container_port_takes_the_first_free() {
        let spec: PortSpec = "8000-8010:80".parse().unwrap();
        let m = spec
            .resolve((32768, 60999), |m| m.host_port != 8000)
            .unwrap();
        assert_eq!((m[0].host_port, m[0].container_port), (8001, 80));
        assert!(spec.resolve((32768, 60999), |_| false).is_err());
    }

    #[test]
    fn del_requests_match_what_add_chose() {
        let m = one("8001:80");
        assert!("8000-8010:80".parse::<PortSpec>().unwrap().requests[0].matches(&m));
        assert!("80".parse::<PortSpec>().unwrap().requests[0].matches(&m));
        assert!(!"80/udp".parse::<PortSpec>().unwrap().requests[0].matches(&m));
    }

    #[test]
    fn malformed_specs_are_rejected() {
        for bad in [
            "",
            "abc:80",
            "80:0",
            "70000:80",
            "80:80/sctp",
            "1.2.3:80:80",
            "8000-8001:80-82",
            "9-8:9-8",
            ":80",
            "1:2:3:4",
        ] {
            assert!(bad.parse::<PortSpec>().is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn conflicts_follow_docker() {
        let any = one("8080:80");
        let local = one("127.0.0.1:8080:81");
        let other = one("198.51.100.2:8080:82");
        assert!(any.conflicts_with(&local));
        assert!(!local.conflicts_with(&other));
        assert!(!any.conflicts_with(&one("8080:80/udp")));
    }
}
