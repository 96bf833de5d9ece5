//! Small IPv4 value types for the CLI: subnets and port ranges.

use std::{fmt, net::Ipv4Addr, str::FromStr};

use anyhow::{Result, anyhow, bail};

/// An IPv4 network in CIDR notation, e.g. `10.88.0.0/16`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    #[must_use]
    pub fn mask(&self) -> Ipv4Addr {
        Ipv4Addr::from(
            u32::MAX
                .checked_shl(32 - u32::from(self.prefix))
                .unwrap_or(0),
        )
    }

    #[must_use]
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & u32::from(self.mask()) == u32::from(self.addr)
    }

    #[must_use]
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !u32::from(self.mask()))
    }

    /// Why containers cannot live in this network, if they cannot: it overlaps a range that
    /// is never forwarded (loopback, "this network", link-local, multicast, reserved).
    #[must_use]
    pub fn unusable(&self) -> Option<&'static str> {
        const SPECIAL: [(Ipv4Addr, u8, &str); 5] = [
            (
                Ipv4Addr::new(0, 0, 0, 0),
                8,
                "it overlaps 0.0.0.0/8 (\"this network\")",
            ),
            (
                Ipv4Addr::new(127, 0, 0, 0),
                8,
                "it overlaps 127.0.0.0/8 (loopback)",
            ),
            (
                Ipv4Addr::new(169, 254, 0, 0),
                16,
                "it overlaps 169.254.0.0/16 (link-local)",
            ),
            (
                Ipv4Addr::new(224, 0, 0, 0),
                4,
                "it overlaps 224.0.0.0/4 (multicast)",
            ),
            (
                Ipv4Addr::new(240, 0, 0, 0),
                4,
                "it overlaps 240.0.0.0/4 (reserved, broadcast)",
            ),
        ];
        SPECIAL.iter().find_map(|&(addr, prefix, why)| {
            let special = Self { addr, prefix };
            // Two networks overlap when the shorter prefix contains the other's base.
            let overlap = if prefix <= self.prefix {
                special.contains(self.addr)
            } else {
                self.contains(addr)
            };
            overlap.then_some(why)
        })
    }

    /// Host addresses, lowest first (network and broadcast excluded).
    pub fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> {
        let first = u32::from(self.addr) + 1;
        let last = u32::from(self.broadcast()) - 1;
        (first..=last).map(Ipv4Addr::from)
    }
}

impl FromStr for Cidr {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let (a, p) = s.split_once('/').ok_or_else(|| {
            anyhow!("invalid subnet {s:?}: expected ADDRESS/PREFIX, e.g. 10.88.0.0/16")
        })?;
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| anyhow!("invalid subnet {s:?}: {a:?} is not an IPv4 address"))?;
        let prefix: u8 = p
            .parse()
            .ok()
            .filter(|p| (8..=30).contains(p))
            .ok_or_else(|| anyhow!("invalid subnet {s:?}: prefix must be 8-30"))?;
        let c = Self { addr, prefix };
        let net = Ipv4Addr::from(u32::from(addr) & u32::from(c.mask()));
        if net != addr {
            bail!("invalid subnet {s:?}: host bits set (did you mean {net}/{prefix}?)");
        }
        if let Some(why) = c.unusable() {
            bail!(
                "invalid subnet {s:?}: {why}, which Linux never routes between hosts; choose a private range such as 10.88.0.0/16"
            );
        }
        Ok(c)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// An inclusive port range `MIN-MAX`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

impl FromStr for PortRange {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let err =
            || anyhow!("invalid port range {s:?}: expected MIN-MAX within 1-65535, MIN <= MAX");
        let (a, b) = s.split_once('-').ok_or_else(err)?;
        let (min, max): (u16, u16) = (a.parse().map_err(|_| err())?, b.parse().map_err(|_| err())?);
        if min == 0 || min > max {
            return Err(err());
        }
        Ok(Self { min, max })
    }
}

/// Docker's MAC scheme: `02:42` followed by the IPv4 address; on a v6-only node, by the
/// IPv6 address's last four bytes (unique among addresses handed out in order, which differ
/// there first; the datapath forwards by interface, so a chosen address that repeats them
/// costs nothing but a confusing neighbour table).
#[must_use]
pub fn mac_for(ip: Option<Ipv4Addr>, ip6: Option<std::net::Ipv6Addr>) -> [u8; 6] {
    let o = match (ip, ip6) {
        (Some(ip), _) => ip.octets(),
        (None, Some(ip6)) => {
            let b = ip6.octets();
            [b[12], b[13], b[14], b[15]]
        }
        (None, None) => [0; 4],
    };
    [0x02, 0x42, o[0], o[1], o[2], o[3]]
}

#[must_use]
pub fn fmt_mac(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parses_and_checks_host_bits() {
        let c: Cidr = "10.88.0.0/16".parse().unwrap();
        assert_eq!(c.mask(), Ipv4Addr::new(255, 255, 0, 0));
        assert!(c.contains(Ipv4Addr::new(10, 88, 3, 4)));
        assert!(!c.contains(Ipv4Addr::new(10, 89, 0, 1)));
        assert_eq!(c.broadcast(), Ipv4Addr::new(10, 88, 255, 255));
        assert_eq!(c.hosts().next(), Some(Ipv4Addr::new(10, 88, 0, 1)));
        assert!("10.88.0.1/16".parse::<Cidr>().is_err());
        assert!("10.88.0.0/31".parse::<Cidr>().is_err());
        assert!("10.88.0.0".parse::<Cidr>().is_err());
    }

    #[test]
    fn subnets_linux_never_forwards_are_refused() {
        for bad in [
            "127.0.0.0/8",
            "127.1.0.0/16",
            "0.0.0.0/8",
            "169.254.0.0/16",
            "224.0.0.0/8",
            "239.1.0.0/16",
            "240.0.0.0/8",
        ] {
            let e = bad.parse::<Cidr>().expect_err(bad).to_string();
            assert!(e.contains("never routes"), "{bad}: {e}");
        }
        for good in [
            "10.88.0.0/16",
            "192.0.2.0/24",
            "172.16.0.0/12",
            "100.64.0.0/10",
        ] {
            assert!(good.parse::<Cidr>().is_ok(), "{good}");
        }
    }

    #[test]
    fn port_ranges() {
        assert_eq!(
            "1024-65535".parse::<PortRange>().unwrap(),
            PortRange {
                min: 1024,
                max: 65535
            }
        );
        assert!("0-10".parse::<PortRange>().is_err());
        assert!("10-9".parse::<PortRange>().is_err());
    }

    #[test]
    fn macs_follow_docker() {
        assert_eq!(
            fmt_mac(&mac_for(Some(Ipv4Addr::new(10, 88, 0, 2)), None)),
            "02:42:0a:58:00:02"
        );
    }
}

/// An IPv6 network in CIDR notation, e.g. `fd00:88::/64`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr6 {
    pub addr: std::net::Ipv6Addr,
    pub prefix: u8,
}

impl Cidr6 {
    fn mask(&self) -> u128 {
        u128::MAX
            .checked_shl(128 - u32::from(self.prefix))
            .unwrap_or(0)
    }

    #[must_use]
    pub fn contains(&self, ip: std::net::Ipv6Addr) -> bool {
        u128::from(ip) & self.mask() == u128::from(self.addr)
    }

    /// The `n`th address of the network (0: the network's own, the subnet-router anycast).
    #[must_use]
    pub fn nth(&self, n: u128) -> Option<std::net::Ipv6Addr> {
        let a = u128::from(self.addr).checked_add(n)?;
        let ip = std::net::Ipv6Addr::from(a);
        self.contains(ip).then_some(ip)
    }
}

impl FromStr for Cidr6 {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let (a, p) = s.split_once('/').ok_or_else(|| {
            anyhow!("invalid IPv6 subnet {s:?}: expected ADDRESS/PREFIX, e.g. fd00:88::/64")
        })?;
        let addr: std::net::Ipv6Addr = a
            .parse()
            .map_err(|_| anyhow!("invalid IPv6 subnet {s:?}: {a:?} is not an IPv6 address"))?;
        let prefix: u8 = p
            .parse()
            .ok()
            .filter(|p| (48..=120).contains(p))
            .ok_or_else(|| anyhow!("invalid IPv6 subnet {s:?}: prefix must be 48-120"))?;
        let c = Self { addr, prefix };
        let net = std::net::Ipv6Addr::from(u128::from(addr) & c.mask());
        if net != addr {
            bail!("invalid IPv6 subnet {s:?}: host bits set (did you mean {net}/{prefix}?)");
        }
        let seg = addr.segments()[0];
        let unicast = (0x2000..=0x3fff).contains(&seg) || seg & 0xfe00 == 0xfc00;
        if !unicast {
            bail!(
                "invalid IPv6 subnet {s:?}: containers need global unicast (2000::/3) or unique local (fc00::/7) addresses, e.g. fd00:88::/64"
            );
        }
        Ok(c)
    }
}

impl fmt::Display for Cidr6 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}
