//! rtnetlink wrappers: links, veths, addresses, routes. A [`Netlink`] is bound to one network
//! namespace: the one its socket was opened in.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd as _,
    path::Path,
};

mod tc;

use anyhow::{Context as _, Result, anyhow, bail};
use futures::TryStreamExt as _;
use rtnetlink::{
    Handle, LinkUnspec, LinkVeth, RouteMessageBuilder,
    packet_route::{
        address::{AddressAttribute, AddressFlags, AddressHeaderFlags, AddressScope},
        link::{InfoData, InfoVeth, LinkAttribute, LinkInfo, LinkMessage, LinkXdp, XdpAttached},
        neighbour::NeighbourState,
        route::{
            RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
        },
    },
};

pub use tc::BpfFilter;

/// A link as bpfnat cares about it.
#[derive(Clone, Debug)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: [u8; 6],
    pub mtu: u32,
    /// The link kind (`veth`, `bridge`, …); `None` for a physical device.
    pub kind: Option<String>,
    /// How an XDP program is attached, if one is: `native`, `generic`, `offload`, `multi`.
    pub xdp: Option<&'static str>,
    /// The interface alias (`ip link set … alias`), if set.
    pub alias: Option<String>,
    /// The device group (`ip link set … group`; 0 by default).
    pub group: u32,
}

/// A main-table IPv4 route, as `routes_of` reads it and `replace_route` writes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProtoRoute {
    pub dst: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
    pub oif: Option<u32>,
}

fn route_message(r: &ProtoRoute, proto: u8) -> RouteMessage {
    let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(r.dst, r.prefix)
        .protocol(RouteProtocol::Other(proto));
    if let Some(gw) = r.gateway {
        b = b.gateway(gw);
    }
    if let Some(oif) = r.oif {
        b = b.output_interface(oif);
    }
    b.build()
}

pub struct Netlink {
    handle: Handle,
}

fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -errno)
}

impl Netlink {
    /// A socket in the calling thread's namespace. Needs a tokio runtime.
    pub fn current() -> Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection().context("open rtnetlink socket")?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// A socket in the namespace at `ns`, driven by the current tokio runtime.
    pub fn in_netns(ns: &Path) -> Result<Self> {
        let rt = tokio::runtime::Handle::current();
        let (conn, handle) = crate::netns::run_in(ns, move || {
            let _guard = rt.enter();
            let (conn, handle, _) = rtnetlink::new_connection().context("open rtnetlink socket")?;
            Ok((conn, handle))
        })
        .with_context(|| format!("netlink in {}", ns.display()))?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    fn to_link(msg: &LinkMessage) -> Link {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            mac: [0; 6],
            mtu: 0,
            kind: None,
            xdp: None,
            alias: None,
            group: 0,
        };
        for a in &msg.attributes {
            match a {
                LinkAttribute::IfName(n) => link.name.clone_from(n),
                LinkAttribute::Address(m) if m.len() == 6 => link.mac.copy_from_slice(m),
                LinkAttribute::Mtu(m) => link.mtu = *m,
                LinkAttribute::IfAlias(a) => link.alias = Some(a.clone()),
                LinkAttribute::Group(g) => link.group = *g,
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        if let LinkInfo::Kind(k) = i {
                            link.kind = Some(k.to_string());
                        }
                    }
                }
                LinkAttribute::Xdp(xdp) => {
                    for x in xdp {
                        if let LinkXdp::Attached(a) = x {
                            link.xdp = match a {
                                XdpAttached::Driver => Some("native"),
                                XdpAttached::SocketBuffer => Some("generic"),
                                XdpAttached::Hardware => Some("offload"),
                                XdpAttached::Multiple => Some("multi"),
                                _ => None,
                            };
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }

    /// Every link of the namespace.
    pub async fn links(&self) -> Result<Vec<Link>> {
        let mut s = self.handle.link().get().execute();
        let mut out = Vec::new();
        while let Some(m) = s.try_next().await.context("list links")? {
            out.push(Self::to_link(&m));
        }
        Ok(out)
    }

    /// Set the alias of link `index` (what `ip link` shows as `alias`).
    pub async fn set_alias(&self, index: u32, alias: &str) -> Result<()> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).alias(alias).build())
            .execute()
            .await
            .with_context(|| format!("set the alias of link {index}"))
    }

    /// The link called `name`, or `None`.
    pub async fn link(&self, name: &str) -> Result<Option<Link>> {
        let mut s = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match s.try_next().await {
            Ok(Some(m)) => Ok(Some(Self::to_link(&m))),
            Ok(None) => Ok(None),
            Err(e) if is_errno(&e, libc::ENODEV) => Ok(None),
            Err(e) => Err(anyhow!(e).context(format!("look up link {name}"))),
        }
    }

    /// The link called `name`; a clear error when there is none.
    pub async fn require_link(&self, name: &str) -> Result<Link> {
        self.link(name)
            .await?
            .ok_or_else(|| anyhow!("interface {name} not found"))
    }

    /// Create a veth pair: `host` here, `peer` created directly inside the namespace `peer_ns`
    /// with MAC `peer_mac`.
    pub async fn add_veth(
        &self,
        host: &str,
        peer: &str,
        peer_ns: &Path,
        peer_mac: [u8; 6],
        mtu: u32,
    ) -> Result<()> {
        let ns = crate::netns::open(peer_ns)?;
        let peer_msg = LinkUnspec::new_with_name(peer)
            .setns_by_fd(ns.as_raw_fd())
            .address(peer_mac.to_vec())
            .mtu(mtu)
            .build();
        let msg = LinkVeth::new(host, peer)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
            .mtu(mtu)
            .build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(|e| {
                if is_errno(&e, libc::EEXIST) {
                    anyhow!("interface {host} already exists")
                } else {
                    anyhow!(e)
                }
            })
            .with_context(|| format!("create veth pair {host} / {peer}"))
    }

    /// Create a veth pair with both ends here, both up: a home for node-local addresses that
    /// does not need the `dummy` module (which not every kernel has).
    pub async fn add_local_veth(&self, name: &str, peer: &str) -> Result<()> {
        self.handle
            .link()
            .add(LinkVeth::new(name, peer).up().build())
            .execute()
            .await
            .with_context(|| format!("create veth pair {name} / {peer}"))?;
        let p = self.require_link(peer).await?;
        self.set_up(p.index).await
    }

    pub async fn set_up(&self, index: u32) -> Result<()> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .with_context(|| format!("set link {index} up"))
    }

    pub async fn set_mtu(&self, index: u32, mtu: u32) -> Result<()> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).mtu(mtu).build())
            .execute()
            .await
            .with_context(|| format!("set link {index} mtu {mtu}"))
    }

    /// Delete a link; a link that is already gone is fine.
    pub async fn del_link(&self, index: u32) -> Result<()> {
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(()),
            Err(e) if is_errno(&e, libc::ENODEV) => Ok(()),
            Err(e) => Err(anyhow!(e).context(format!("delete link {index}"))),
        }
    }

    /// Delete the links `indexes` (those already gone are fine) in one request: they are put
    /// in a device group no other link is in, and the group is deleted. The kernel then
    /// unregisters them together and waits out its RCU grace periods once, where a link
    /// deleted on its own waits for them alone (about 30 ms per veth on a VM).
    pub async fn del_links(&self, indexes: &[u32]) -> Result<()> {
        if let [index] = indexes {
            return self.del_link(*index).await;
        }
        if indexes.is_empty() {
            return Ok(());
        }
        let group = self.unused_group().await?;
        for &index in indexes {
            match self
                .handle
                .link()
                .set(LinkUnspec::new_with_index(index).link_group(group).build())
                .execute()
                .await
            {
                Ok(()) => {}
                Err(e) if is_errno(&e, libc::ENODEV) => {}
                Err(e) => {
                    return Err(anyhow!(e).context(format!("put link {index} in group {group}")));
                }
            }
        }
        let mut del = self.handle.link().del(0);
        del.message_mut()
            .attributes
            .push(LinkAttribute::Group(group));
        match del.execute().await {
            Ok(()) => Ok(()),
            // None of them was left.
            Err(e) if is_errno(&e, libc::ENODEV) => Ok(()),
            Err(e) => Err(anyhow!(e).context(format!("delete the links of group {group}"))),
        }
    }

    /// A device group no link of the namespace is in: random, so that a group an
    /// administrator uses is never taken, and checked.
    async fn unused_group(&self) -> Result<u32> {
        use std::hash::BuildHasher as _;
        let taken: std::collections::HashSet<u32> =
            self.links().await?.iter().map(|l| l.group).collect();
        let random = std::hash::RandomState::new();
        (0u32..16)
            .map(|i| random.hash_one(i) as u32)
            // Group 0 is every device's default; low numbers are the ones people pick.
            .find(|g| *g > 0xffff && !taken.contains(g))
            .ok_or_else(|| anyhow!("no free device group found"))
    }

    pub async fn add_addr(&self, index: u32, addr: Ipv4Addr, prefix: u8) -> Result<()> {
        match self
            .handle
            .address()
            .add(index, IpAddr::V4(addr), prefix)
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if is_errno(&e, libc::EEXIST) => Ok(()),
            Err(e) => Err(anyhow!(e).context(format!("add address {addr}/{prefix}"))),
        }
    }

    /// Add an IPv6 address without duplicate address detection (bpfnat hands out each one
    /// once: waiting out DAD would only delay the container's first packet).
    pub async fn add_addr6(&self, index: u32, addr: Ipv6Addr, prefix: u8) -> Result<()> {
        let mut req = self.handle.address().add(index, IpAddr::V6(addr), prefix);
        req.message_mut().header.flags |= AddressHeaderFlags::Nodad;
        req.message_mut()
            .attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
        match req.execute().await {
            Ok(()) => Ok(()),
            Err(e) if is_errno(&e, libc::EEXIST) => Ok(()),
            Err(e) => Err(anyhow!(e).context(format!("add address {addr}/{prefix}"))),
        }
    }

    /// `dst/128 dev index`: how the node reaches a container over IPv6.
    pub async fn add_host_route6(&self, dst: Ipv6Addr, index: u32) -> Result<()> {
        let r = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(dst, 128)
            .output_interface(index)
            .build();
        self.handle
            .route()
            .add(r)
            .execute()
            .await
            .with_context(|| format!("add route {dst}/128"))
    }

    /// A permanent neighbour entry `dst lladdr mac dev index`.
    pub async fn add_neigh(&self, dst: IpAddr, mac: [u8; 6], index: u32) -> Result<()> {
        self.handle
            .neighbours()
            .add(index, dst)
            .link_layer_address(&mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .with_context(|| format!("add neighbour {dst}"))
    }

    /// IPv4 addresses on link `index`, primary first.
    pub async fn ipv4_addrs(&self, index: u32) -> Result<Vec<(Ipv4Addr, u8)>> {
        let mut s = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let mut out = Vec::new();
        while let Some(m) = s.try_next().await.context("list addresses")? {
            for a in &m.attributes {
                if let AddressAttribute::Local(IpAddr::V4(v4)) = a {
                    out.push((*v4, m.header.prefix_len));
                }
            }
        }
        Ok(out)
    }

    /// The global IPv6 addresses of link `index` that may be used as a source, in the
    /// kernel's order: scope universe, and neither tentative, failed, deprecated nor
    /// temporary (privacy addresses come and go; `IFA_F_TEMPORARY` is `IFA_F_SECONDARY`).
    pub async fn global_ipv6_addrs(&self, index: u32) -> Result<Vec<Ipv6Addr>> {
        let unusable = AddressFlags::Tentative
            | AddressFlags::Dadfailed
            | AddressFlags::Deprecated
            | AddressFlags::Secondary;
        Ok(self
            .ipv6_globals(Some(index))
            .await?
            .into_iter()
            .filter(|(_, _, flags)| !flags.intersects(unusable))
            .map(|(_, a, _)| a)
            .collect())
    }

    /// Every global IPv6 address (scope universe) of the namespace, with the ifindex that
    /// holds it.
    pub async fn all_global_ipv6_addrs(&self) -> Result<Vec<(u32, Ipv6Addr)>> {
        Ok(self
            .ipv6_globals(None)
            .await?
            .into_iter()
            .map(|(i, a, _)| (i, a))
            .collect())
    }

    /// The global IPv6 addresses of link `index` (of every link: `None`), each with its
    /// ifindex and flags (the 32-bit flags attribute when present, else the header's 8 bits).
    async fn ipv6_globals(&self, index: Option<u32>) -> Result<Vec<(u32, Ipv6Addr, AddressFlags)>> {
        let mut req = self.handle.address().get();
        if let Some(index) = index {
            req = req.set_link_index_filter(index);
        }
        let mut s = req.execute();
        let mut out = Vec::new();
        while let Some(m) = s.try_next().await.context("list addresses")? {
            if m.header.scope != AddressScope::Universe {
                continue;
            }
            let flags = m
                .attributes
                .iter()
                .find_map(|a| match a {
                    AddressAttribute::Flags(f) => Some(*f),
                    _ => None,
                })
                .unwrap_or_else(|| AddressFlags::from_bits_retain(m.header.flags.bits().into()));
            for a in &m.attributes {
                if let AddressAttribute::Address(IpAddr::V6(v6)) = a {
                    out.push((m.header.index, *v6, flags));
                }
            }
        }
        Ok(out)
    }

    /// Every IPv4 address of the namespace, with the ifindex that holds it.
    pub async fn all_ipv4_addrs(&self) -> Result<Vec<(u32, Ipv4Addr)>> {
        let mut s = self.handle.address().get().execute();
        let mut out = Vec::new();
        while let Some(m) = s.try_next().await.context("list addresses")? {
            for a in &m.attributes {
                if let AddressAttribute::Local(IpAddr::V4(v4)) = a {
                    out.push((m.header.index, *v4));
                }
            }
        }
        Ok(out)
    }

    /// `default via gw dev index`, in `gw`'s family.
    pub async fn add_default_route(&self, gw: impl Into<IpAddr>, index: u32) -> Result<()> {
        let gw = gw.into();
        let r = match gw {
            IpAddr::V4(g) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
                .gateway(g)
                .output_interface(index)
                .build(),
            IpAddr::V6(g) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
                .gateway(g)
                .output_interface(index)
                .build(),
        };
        match self.handle.route().add(r).execute().await {
            Ok(()) => Ok(()),
            Err(e) if is_errno(&e, libc::EEXIST) => Ok(()),
            Err(e) => Err(anyhow!(e).context(format!("add default route via {gw}"))),
        }
    }

    /// `dst/32 dev index scope link src src`: how the node reaches a container.
    pub async fn add_host_route(&self, dst: Ipv4Addr, index: u32, src: Ipv4Addr) -> Result<()> {
        let r = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, 32)
            .output_interface(index)
            .pref_source(src)
            .scope(RouteScope::Link)
            .build();
        self.handle
            .route()
            .add(r)
            .execute()
            .await
            .with_context(|| format!("add route {dst}/32"))
    }

    /// The main table's IPv4 routes of route protocol `proto` (`ip route show proto N`).
    pub async fn routes_of(&self, proto: u8) -> Result<Vec<ProtoRoute>> {
        let mut s = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute();
        let mut out = Vec::new();
        while let Some(m) = s.try_next().await.context("list routes")? {
            if m.header.protocol != RouteProtocol::Other(proto)
                || m.header.table != RouteHeader::RT_TABLE_MAIN
            {
                continue;
            }
            let mut r = ProtoRoute {
                dst: Ipv4Addr::UNSPECIFIED,
                prefix: m.header.destination_prefix_length,
                gateway: None,
                oif: None,
            };
            for a in &m.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(d)) => r.dst = *d,
                    RouteAttribute::Gateway(RouteAddress::Inet(g)) => r.gateway = Some(*g),
                    RouteAttribute::Oif(i) => r.oif = Some(*i),
                    _ => {}
                }
            }
            out.push(r);
        }
        Ok(out)
    }

    /// `ip route replace dst/prefix via gw dev index proto N`.
    pub async fn replace_route(&self, r: &ProtoRoute, proto: u8) -> Result<()> {
        self.handle
            .route()
            .add(route_message(r, proto))
            .replace()
            .execute()
            .await
            .with_context(|| format!("install route {}/{}", r.dst, r.prefix))
    }

    /// `ip route del dst/prefix proto N` (gone already is fine).
    pub async fn del_route(&self, r: &ProtoRoute, proto: u8) -> Result<()> {
        match self
            .handle
            .route()
            .del(route_message(r, proto))
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if is_errno(&e, libc::ESRCH) || is_errno(&e, libc::ENOENT) => Ok(()),
            Err(e) => Err(anyhow!(e).context(format!("remove route {}/{}", r.dst, r.prefix))),
        }
    }

    /// Bring `lo` up (a fresh namespace has it down).
    pub async fn lo_up(&self) -> Result<()> {
        let lo = self.require_link("lo").await?;
        self.set_up(lo.index).await
    }

    /// Fail unless the link exists and has the expected index (guards against a name reused
    /// by another interface).
    pub async fn check_link(&self, name: &str, index: u32) -> Result<Link> {
        let l = self.require_link(name).await?;
        if l.index != index {
            bail!(
                "interface {name} has index {} now, expected {index}",
                l.index
            );
        }
        Ok(l)
    }
}
