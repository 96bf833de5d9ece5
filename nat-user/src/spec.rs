//! Docker's `-p` syntax: `[HOST_IP:]HOST_PORT[-END]:CONTAINER_PORT[-END][/tcp|/udp]`.

use std::{fmt, net::Ipv4Addr, str::FromStr};

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
    /// `None` = every address of the node.
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    pub container_port: u16,
    pub proto: Proto,
}

impl PortMapping {
    /// Whether two mappings want the same host port (Docker refuses the second).
    #[must_use]
    pub fn conflicts_with(&self, other: &Self) -> bool {
        self.proto == other.proto
            && self.host_port == other.host_port
            && (self.host_ip.is_none() || other.host_ip.is_none() || self.host_ip == other.host_ip)
    }
}

impl fmt::Display for PortMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(ip) = self.host_ip {
            write!(f, "{ip}:")?;
        }
        write!(
            f,
            "{}:{}/{}",
            self.host_port, self.container_port, self.proto
        )
    }
}

/// A parsed `-p` argument: one or more mappings (a range expands to one per port).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSpec {
    pub mappings: Vec<PortMapping>,
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

impl FromStr for PortSpec {
    type Err = anyhow::Error;

    fn from_str(spec: &str) -> Result<Self> {
        let err = |why: &str| {
            anyhow!(
                "invalid port spec {spec:?}: {why} (expected [HOST_IP:]HOST_PORT[-END]:CONTAINER_PORT[-END][/tcp|/udp])"
            )
        };
        let (ports, proto) = match spec.rsplit_once('/') {
            Some((p, "tcp")) => (p, Proto::Tcp),
            Some((p, "udp")) => (p, Proto::Udp),
            Some((_, other)) => return Err(err(&format!("unknown protocol {other:?}"))),
            None => (spec, Proto::Tcp),
        };
        let parts: Vec<&str> = ports.split(':').collect();
        let (host_ip, host, cont) = match parts.as_slice() {
            [h, c] => (None, *h, *c),
            [ip, h, c] => {
                let ip: Ipv4Addr = ip
                    .parse()
                    .map_err(|_| err(&format!("{ip:?} is not an IPv4 address")))?;
                (if ip.is_unspecified() { None } else { Some(ip) }, *h, *c)
            }
            _ => return Err(err("wrong number of ':'-separated fields")),
        };
        if host.is_empty() {
            return Err(err("the host port is missing"));
        }
        let (h0, h1) = range(host, "host").map_err(|e| err(&e.to_string()))?;
        let (c0, c1) = range(cont, "container").map_err(|e| err(&e.to_string()))?;
        if h1 - h0 != c1 - c0 {
            return Err(err("host and container ranges differ in length"));
        }
        let mappings = (0..=h1 - h0)
            .map(|i| PortMapping {
                host_ip,
                host_port: h0 + i,
                container_port: c0 + i,
                proto,
            })
            .collect();
        Ok(Self { mappings })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(s: &str) -> PortMapping {
        let p: PortSpec = s.parse().unwrap();
        assert_eq!(p.mappings.len(), 1);
        p.mappings[0]
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
        assert_eq!(m.host_ip, Some(Ipv4Addr::LOCALHOST));
        assert_eq!(m.proto, Proto::Udp);
        assert_eq!(one("0.0.0.0:80:80").host_ip, None);
    }

    #[test]
    fn ranges_expand_pairwise() {
        let p: PortSpec = "8000-8002:9000-9002/udp".parse().unwrap();
        let pairs: Vec<_> = p
            .mappings
            .iter()
            .map(|m| (m.host_port, m.container_port))
            .collect();
        assert_eq!(pairs, vec![(8000, 9000), (8001, 9001), (8002, 9002)]);
    }

    #[test]
    fn malformed_specs_are_rejected() {
        for bad in [
            "",
            "80",
            "abc:80",
            "80:0",
            "70000:80",
            "80:80/sctp",
            "1.2.3:80:80",
            "8000-8001:80",
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
