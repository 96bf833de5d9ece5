//! A container's published ports as the record holds them: runs of mappings whose host and
//! container ports both count up by one (`-p 10000-59999:10000-59999` is one run). Every
//! command loads the whole record, so a node with a published range of 50,000 ports would
//! otherwise build 50,000 mappings (1.2 MB, a millisecond in a fresh process) on every
//! command, whatever it is about; the mappings are counted out only where they are used one
//! by one: the datapath's port table, and conflicts with the host ports a command asks for.
//!
//! On disk each run is one Docker spec (`10000-59999:10000-59999/tcp`, `8080:80/tcp`);
//! records with one object per mapping, from before runs, still read.

use std::net::IpAddr;

use serde::{Deserialize, Deserializer, Serialize, Serializer, de::Error as _};

use crate::spec::{PortMapping, PortRange, Proto};

/// `len` mappings from `first` on, host and container ports each one higher than the last.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub first: PortMapping,
    /// At least 1; a run's last ports are at most 65535.
    pub len: u32,
}

impl Run {
    fn one(m: PortMapping) -> Self {
        Self { first: m, len: 1 }
    }

    /// Whether `m` is the mapping right after this run's last.
    fn continued_by(&self, m: &PortMapping) -> bool {
        let f = &self.first;
        m.proto == f.proto
            && m.host_ip == f.host_ip
            && u32::from(m.host_port) == u32::from(f.host_port) + self.len
            && u32::from(m.container_port) == u32::from(f.container_port) + self.len
    }

    /// The run's mappings.
    pub fn iter(self) -> impl Iterator<Item = PortMapping> {
        let f = self.first;
        (0..self.len).map(move |i| {
            // In range: the run's last ports are at most 65535.
            let at = |p: u16| (u32::from(p) + i) as u16;
            PortMapping {
                host_port: at(f.host_port),
                container_port: at(f.container_port),
                ..f
            }
        })
    }

    /// Whether a host port of this run is a `proto` port in `lo..=hi`.
    #[must_use]
    pub fn meets(&self, proto: Proto, lo: u16, hi: u16) -> bool {
        let first = u32::from(self.first.host_port);
        let last = first + self.len - 1;
        self.first.proto == proto && first <= u32::from(hi) && u32::from(lo) <= last
    }

    /// The run as one Docker spec.
    fn spec(&self) -> String {
        let m = &self.first;
        if self.len == 1 {
            return m.to_string();
        }
        let host = match m.host_ip {
            Some(IpAddr::V4(ip)) => format!("{ip}:"),
            Some(IpAddr::V6(ip)) => format!("[{ip}]:"),
            None => String::new(),
        };
        let last = |p: u16| u32::from(p) + self.len - 1;
        format!(
            "{host}{}-{}:{}-{}/{}",
            m.host_port,
            last(m.host_port),
            m.container_port,
            last(m.container_port),
            m.proto
        )
    }
}

/// A container's published ports, in the order they were published. Built mapping by
/// mapping or run by run, it is always in its longest runs, so two lists of the same
/// mappings compare equal.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Published {
    runs: Vec<Run>,
}

impl Published {
    #[must_use]
    pub fn runs(&self) -> &[Run] {
        &self.runs
    }

    /// Every mapping, one by one.
    pub fn iter(&self) -> impl Iterator<Item = PortMapping> + '_ {
        self.runs.iter().flat_map(|r| r.iter())
    }

    #[must_use]
    pub fn to_vec(&self) -> Vec<PortMapping> {
        let mut v = Vec::with_capacity(self.len());
        v.extend(self.iter());
        v
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.runs.iter().map(|r| r.len as usize).sum()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    pub fn push(&mut self, m: PortMapping) {
        match self.runs.last_mut() {
            Some(r) if r.continued_by(&m) => r.len += 1,
            _ => self.runs.push(Run::one(m)),
        }
    }

    /// Append a whole run, merged into the last one if it continues it.
    fn push_run(&mut self, run: Run) {
        match self.runs.last_mut() {
            Some(r) if r.continued_by(&run.first) => r.len += run.len,
            _ => self.runs.push(run),
        }
    }

    /// Keep the mappings `keep` says yes to.
    pub fn retain(&mut self, mut keep: impl FnMut(&PortMapping) -> bool) {
        let old = std::mem::take(&mut self.runs);
        for m in old.into_iter().flat_map(Run::iter) {
            if keep(&m) {
                self.push(m);
            }
        }
    }
}

impl FromIterator<PortMapping> for Published {
    fn from_iter<I: IntoIterator<Item = PortMapping>>(iter: I) -> Self {
        let mut p = Self::default();
        p.extend(iter);
        p
    }
}

impl Extend<PortMapping> for Published {
    fn extend<I: IntoIterator<Item = PortMapping>>(&mut self, iter: I) {
        for m in iter {
            self.push(m);
        }
    }
}

impl Serialize for Published {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.runs.iter().map(Run::spec))
    }
}

impl<'de> Deserialize<'de> for Published {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Stored {
            Run(String),
            One(PortMapping),
        }
        let mut out = Self::default();
        for stored in Vec::<Stored>::deserialize(d)? {
            match stored {
                Stored::One(m) => out.push(m),
                Stored::Run(spec) => {
                    let r = PortRange::parse(&spec).map_err(D::Error::custom)?;
                    let (c0, c1) = r.container;
                    let Some((h0, h1)) = r.host.filter(|(h0, h1)| h1 - h0 == c1 - c0) else {
                        return Err(D::Error::custom(format!(
                            "recorded port run {spec:?} leaves host ports open"
                        )));
                    };
                    out.push_run(Run {
                        first: PortMapping {
                            host_ip: r.host_ip,
                            host_port: h0,
                            container_port: c0,
                            proto: r.proto,
                        },
                        len: u32::from(h1 - h0) + 1,
                    });
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(ip: Option<&str>, h: u16, c: u16, proto: Proto) -> PortMapping {
        PortMapping {
            host_ip: ip.map(|i| i.parse().unwrap()),
            host_port: h,
            container_port: c,
            proto,
        }
    }

    fn sample() -> Vec<PortMapping> {
        let mut ms: Vec<PortMapping> = (0..50_000u16)
            .map(|i| m(None, 10_000 + i, 10_000 + i, Proto::Tcp))
            .collect();
        ms.extend([
            m(None, 8080, 80, Proto::Tcp),
            m(Some("0.0.0.0"), 53, 53, Proto::Udp),
            m(Some("0.0.0.0"), 54, 54, Proto::Udp),
            m(Some("::"), 8443, 443, Proto::Tcp),
            m(Some("2001:db8::2"), 9000, 9000, Proto::Tcp),
            m(Some("2001:db8::2"), 9001, 9001, Proto::Tcp),
            m(None, 65535, 65535, Proto::Udp),
        ]);
        ms
    }

    #[test]
    fn runs_round_trip_and_older_records_read() {
        let ms = sample();
        let p: Published = ms.iter().copied().collect();
        assert_eq!(p.runs().len(), 6);
        assert_eq!(p.len(), ms.len());
        assert_eq!(p.to_vec(), ms);
        let text = serde_json::to_string(&p).unwrap();
        assert_eq!(
            text,
            r#"["10000-59999:10000-59999/tcp","8080:80/tcp","0.0.0.0:53-54:53-54/udp","[::]:8443:443/tcp","[2001:db8::2]:9000-9001:9000-9001/tcp","65535:65535/udp"]"#
        );
        let back: Published = serde_json::from_str(&text).unwrap();
        assert_eq!(back, p);
        assert_eq!(back.to_vec(), ms);
        let old = r#"[{"host_ip":null,"host_port":8080,"container_port":80,"proto":"tcp"},
            {"host_ip":null,"host_port":8081,"container_port":81,"proto":"tcp"}]"#;
        let old: Published = serde_json::from_str(old).unwrap();
        assert_eq!(old.runs().len(), 1, "merged into one run");
        assert_eq!(
            old.to_vec(),
            [m(None, 8080, 80, Proto::Tcp), m(None, 8081, 81, Proto::Tcp)]
        );
        assert!(serde_json::from_str::<Published>(r#"["8000-8001:80/tcp"]"#).is_err());
    }

    #[test]
    fn the_same_mappings_are_the_same_runs_however_they_were_built() {
        let ms = sample();
        let by_one: Published = ms.iter().copied().collect();
        // Runs split where they were stored apart still merge on reading.
        let split = r#"["10000-19999:10000-19999/tcp","20000-59999:20000-59999/tcp","8080:80/tcp",
            "0.0.0.0:53:53/udp","0.0.0.0:54:54/udp","[::]:8443:443/tcp",
            "[2001:db8::2]:9000-9001:9000-9001/tcp","65535:65535/udp"]"#;
        assert_eq!(serde_json::from_str::<Published>(split).unwrap(), by_one);
        let mut cut = by_one.clone();
        cut.retain(|m| m.host_port != 30_000);
        assert_eq!(cut.len(), ms.len() - 1);
        assert_eq!(cut.runs().len(), 7, "the long run is cut in two");
        cut.extend([m(None, 30_000, 30_000, Proto::Tcp)]);
        assert_eq!(cut.len(), ms.len());
        assert_ne!(cut, by_one, "order is kept: the port is now last");
    }

    #[test]
    fn a_run_meets_the_host_ports_it_covers() {
        let r = Run {
            first: m(None, 100, 200, Proto::Tcp),
            len: 10,
        };
        assert!(r.meets(Proto::Tcp, 109, 109));
        assert!(r.meets(Proto::Tcp, 1, 100));
        assert!(!r.meets(Proto::Tcp, 110, 200));
        assert!(!r.meets(Proto::Udp, 100, 109));
        let last = Run {
            first: m(None, 65535, 65535, Proto::Udp),
            len: 1,
        };
        assert!(last.meets(Proto::Udp, 65535, 65535));
        assert_eq!(last.iter().count(), 1);
    }
}
