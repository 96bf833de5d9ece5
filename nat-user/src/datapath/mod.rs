//! The only place that knows pin paths (`Pins`, which the agent and the tests use too):
//! load the embedded eBPF object, pin programs, maps and links under `<bpffs-dir>/<PIN_VERSION>/`, and
//! read and write the maps in domain terms. Which maps exist, and their layouts, is
//! `nat_common::MAP_SPECS`.
//!
//! Layout:
//! ```text
//! <bpffs-dir>/v5/maps/<map>                 every map of MAP_SPECS marked pinned
//! <bpffs-dir>/v5/progs/{tc_container,tc_uplink,xdp_uplink,sock_*}
//! <bpffs-dir>/v5/links/<interface>          the uplink's TCX ingress link
//! <bpffs-dir>/v5/xdp-links/<interface>      the uplink's XDP link (`up --xdp native|generic`)
//! <bpffs-dir>/v5/cgroup-links/<program>     the socket programs' links
//! ```
//! Links are pinned, so the datapath keeps running after the loader exits. Container veths
//! carry a tc filter instead (`attach_container`), which is the device's own.

mod batch;
mod clock;
mod conntrack;
pub mod dump;
pub mod explain;
pub mod monitor;

use std::{
    collections::BTreeMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    EbpfLoader,
    maps::{
        Array, HashMap, Map, MapData, MapInfo, MapType, PerCpuArray,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{
        CgroupAttachMode, CgroupSockAddr, CgroupSockAddrAttachType, Program, ProgramError,
        ProgramInfo, SchedClassifier, TcAttachType, Xdp, XdpMode, links::FdLink, tc,
    },
};
use nat_common::{
    Addr4, Addr6, ClusterNet, Config, Counter, Endpoint, MAP_SPECS, MapKind, MapSpec, NodeAddr,
    PIN_VERSION, Port, PortKey4, PortKey6, PortTarget4, PortTarget6, Reason, STATIC_EXTERNAL,
    STATIC_INTERNAL, StaticNat4, StaticNat6, map_names, prog_names,
};
use nat_plumbing::netlink::{BpfFilter, Netlink};
use nix::sys::statfs::{BPF_FS_MAGIC, statfs};

pub use clock::{Clock, calibrate as calibrate_clock};
pub use conntrack::{CtSummary, Flow, FlowEnd, PortsByProto, Usage, ct_now_ns};

use crate::{
    net::Cidr,
    spec::{PortMapping, Proto},
};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nat"));

const PROGS: [&str; 3] = [
    prog_names::TC_CONTAINER,
    prog_names::TC_UPLINK,
    prog_names::XDP_UPLINK,
];

/// The socket programs for host-local access to published ports, with their hooks.
const SOCK_PROGS: [(&str, CgroupSockAddrAttachType); 8] = [
    (
        prog_names::SOCK_CONNECT4,
        CgroupSockAddrAttachType::Connect4,
    ),
    (
        prog_names::SOCK_SENDMSG4,
        CgroupSockAddrAttachType::UDPSendMsg4,
    ),
    (
        prog_names::SOCK_RECVMSG4,
        CgroupSockAddrAttachType::UDPRecvMsg4,
    ),
    (
        prog_names::SOCK_GETPEERNAME4,
        CgroupSockAddrAttachType::GetPeerName4,
    ),
    (
        prog_names::SOCK_CONNECT6,
        CgroupSockAddrAttachType::Connect6,
    ),
    (
        prog_names::SOCK_SENDMSG6,
        CgroupSockAddrAttachType::UDPSendMsg6,
    ),
    (
        prog_names::SOCK_RECVMSG6,
        CgroupSockAddrAttachType::UDPRecvMsg6,
    ),
    (
        prog_names::SOCK_GETPEERNAME6,
        CgroupSockAddrAttachType::GetPeerName6,
    ),
];

/// What every command that needs the datapath says when there is none.
pub const NOT_UP: &str = "bpfnat is not up: run `bpfnat up --uplink IFACE` first";

/// Pin locations for one bpfnat instance.
#[derive(Clone, Debug)]
pub struct Pins {
    root: PathBuf,
}

impl Pins {
    #[must_use]
    pub fn new(bpffs_dir: &Path) -> Self {
        Self {
            root: bpffs_dir.join(PIN_VERSION),
        }
    }

    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where map `name` is pinned.
    #[must_use]
    pub fn map(&self, name: &str) -> PathBuf {
        self.root.join("maps").join(name)
    }

    /// Where program `name` is pinned.
    #[must_use]
    pub fn prog(&self, name: &str) -> PathBuf {
        self.root.join("progs").join(name)
    }

    /// Where the TC link of interface `ifname` is pinned.
    #[must_use]
    pub fn link(&self, ifname: &str) -> PathBuf {
        self.root.join("links").join(ifname)
    }

    fn xdp_link(&self, ifname: &str) -> PathBuf {
        self.root.join("xdp-links").join(ifname)
    }

    fn cgroup_link(&self, prog: &str) -> PathBuf {
        self.root.join("cgroup-links").join(prog)
    }

    /// Whether a datapath is installed here.
    #[must_use]
    pub fn installed(&self) -> bool {
        self.prog(prog_names::TC_CONTAINER).exists()
    }

    /// Interfaces with a pinned link.
    pub fn linked_interfaces(&self) -> Vec<String> {
        std::fs::read_dir(self.root.join("links"))
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Mount bpffs on /sys/fs/bpf when it is not (a fresh machine), and check `dir` is on a bpffs.
pub fn ensure_bpffs(dir: &Path) -> Result<()> {
    const SYS_FS_BPF: &str = "/sys/fs/bpf";
    let is_bpffs = |p: &Path| statfs(p).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC);
    // Two instances starting at once must not stack two mounts.
    let _lock = crate::netns::host_lock()?;
    if dir.starts_with(SYS_FS_BPF) && !is_bpffs(Path::new(SYS_FS_BPF)) {
        nix::mount::mount(
            Some("bpf"),
            SYS_FS_BPF,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .context("mount bpffs on /sys/fs/bpf")?;
    }
    let mut probe = dir;
    while !probe.exists() {
        probe = probe.parent().unwrap_or(Path::new("/"));
    }
    if !is_bpffs(probe) {
        bail!(
            "{} is not on a bpffs: choose a --bpffs-dir below a mounted bpf filesystem (e.g. /sys/fs/bpf/bpfnat)",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))
}

/// The maps shared by every load, pinned under `maps/`.
fn pinned_maps() -> impl Iterator<Item = &'static MapSpec> {
    MAP_SPECS.iter().filter(|m| m.pinned)
}

fn map_type(kind: MapKind) -> MapType {
    match kind {
        MapKind::Array => MapType::Array,
        MapKind::Hash => MapType::Hash,
        MapKind::LruHash => MapType::LruHash,
        MapKind::PerCpuArray => MapType::PerCpuArray,
        MapKind::LpmTrie => MapType::LpmTrie,
        MapKind::RingBuf => MapType::RingBuf,
    }
}

/// aya reuses whatever is pinned at a map's path, whatever its shape: check first. The stats
/// array's length is part of its shape too: an older, shorter one would leave new reasons
/// uncounted.
fn check_pinned_maps(pins: &Pins) -> Result<()> {
    for m in pinned_maps() {
        let path = pins.map(m.name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path)
            .with_context(|| format!("inspect pinned map {}", path.display()))?;
        let found = (
            info.map_type().ok(),
            info.key_size() as usize,
            info.value_size() as usize,
        );
        let entries_ok = m.fixed_entries.is_none_or(|n| info.max_entries() == n);
        if found != (Some(map_type(m.kind)), m.key_size, m.value_size) || !entries_ok {
            bail!(
                "pinned map {} has another layout ({:?}, key {} B, value {} B, {} entries) than this bpfnat expects; run `bpfnat down` or remove it",
                path.display(),
                found.0,
                found.1,
                found.2,
                info.max_entries()
            );
        }
    }
    Ok(())
}

/// Load the programs, create (or reuse) and pin the maps, pin the programs.
pub fn install(pins: &Pins, conntrack_max: u32) -> Result<()> {
    for old in retire_other_versions(pins)? {
        eprintln!(
            "warning: removed the datapath an older bpfnat pinned at {} (its connections are not carried over)",
            old.display()
        );
    }
    check_pinned_maps(pins)?;
    for sub in ["maps", "progs", "links", "xdp-links", "cgroup-links"] {
        let d = pins.root.join(sub);
        std::fs::create_dir_all(&d).with_context(|| format!("create {}", d.display()))?;
    }
    let mut loader = EbpfLoader::new();
    let map_paths: Vec<(&str, PathBuf)> =
        pinned_maps().map(|m| (m.name, pins.map(m.name))).collect();
    for (name, path) in &map_paths {
        loader.map_pin_path(name, path.as_path());
    }
    // One size for both families, as `--conntrack-max` says.
    for (table, fresh) in [
        (map_names::CONNTRACK, map_names::CONNTRACK_NEW),
        (map_names::CONNTRACK6, map_names::CONNTRACK6_NEW),
    ] {
        loader.map_max_entries(table, conntrack_max);
        loader.map_max_entries(fresh, nat_common::conntrack_new_max(conntrack_max));
    }
    let clock = clock::calibrate();
    loader.override_global("CLOCK_JIFFY_NS", &clock.jiffy_ns, true);
    loader.override_global("CLOCK_OFFSET_NS", &clock.offset_ns, true);
    let mut ebpf = loader.load(OBJECT).context("load the eBPF object")?;
    let names = PROGS
        .iter()
        .copied()
        .chain(SOCK_PROGS.iter().map(|(n, _)| *n));
    for name in names {
        let prog = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?;
        match prog {
            Program::SchedClassifier(p) => p.load(),
            Program::Xdp(p) => p.load(),
            Program::CgroupSockAddr(p) => p.load(),
            other => bail!(
                "program {name} has an unexpected type {:?}",
                other.prog_type()
            ),
        }
        .with_context(|| format!("load program {name} (verifier)"))?;
        let path = pins.prog(name);
        remove_pin(&path)?;
        prog.pin(&path)
            .with_context(|| format!("pin program {name} at {}", path.display()))?;
    }
    Ok(())
}

/// The root of the cgroup v2 hierarchy (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on a
/// hybrid layout).
fn cgroup2_root() -> Result<PathBuf> {
    let info =
        std::fs::read_to_string("/proc/self/mountinfo").context("read /proc/self/mountinfo")?;
    info.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .ok_or_else(|| {
            anyhow!("no cgroup v2 hierarchy is mounted: host access to published ports needs one (mount -t cgroup2 none /sys/fs/cgroup)")
        })
}

/// Attach the socket programs to the root cgroup (they act only for sockets of the node's
/// namespace, by its cookie in `config`) and pin the links. Replaces earlier links of ours.
pub fn attach_sock(pins: &Pins) -> Result<()> {
    let root = cgroup2_root()?;
    for (name, ty) in SOCK_PROGS {
        let mut prog = CgroupSockAddr::from_pin(pins.prog(name), ty)
            .with_context(|| format!("open pinned program {name} (is the datapath up?)"))?;
        let cg = std::fs::File::open(&root)
            .with_context(|| format!("open cgroup {}", root.display()))?;
        let path = pins.cgroup_link(name);
        remove_pin(&path)?;
        // With bpf_link (kernel >= 5.7) several programs share a hook whatever the mode, and
        // the kernel wants the flags empty: `Single` is how aya says so.
        let id = prog
            .attach(cg, CgroupAttachMode::Single)
            .with_context(|| format!("attach {name} to cgroup {}", root.display()))?;
        let link: FdLink = prog
            .take_link(id)
            .context("take the cgroup link")?
            .try_into()
            .with_context(|| format!("cgroup link for {name} is not a bpf_link"))?;
        link.pin(&path)
            .with_context(|| format!("pin link at {}", path.display()))?;
    }
    Ok(())
}

/// The cookie of the calling thread's network namespace.
pub fn netns_cookie() -> Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // The wildcard address: binding needs no interface (127.0.0.1 would need `lo` up).
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").context("socket for SO_NETNS_COOKIE")?;
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(anyhow!(io::Error::last_os_error())
            .context("getsockopt(SO_NETNS_COOKIE) (kernel >= 5.14)"));
    }
    Ok(cookie)
}

/// Remove every pin of this instance (detaching every link), an older layout's included.
pub fn uninstall(pins: &Pins) -> Result<()> {
    retire_other_versions(pins)?;
    remove_tree(&pins.root)?;
    // The parent directory is ours too when it is empty now.
    if let Some(parent) = pins.root.parent() {
        let _ = std::fs::remove_dir(parent);
    }
    Ok(())
}

fn remove_tree(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(anyhow!(e).context(format!("remove {}", dir.display()))),
    }
}

/// The number of a layout directory name (`v2` -> 2).
fn layout_number(name: &str) -> Option<u32> {
    let n = name.strip_prefix('v')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

/// Remove the pins an older bpfnat left beside ours (`<bpffs-dir>/v1` for a `v2` loader):
/// unpinning its links detaches its programs, which would otherwise keep running beside the
/// new ones on the same interfaces. Its connection table has another layout and is not
/// carried over. A newer layout's pins are refused, not removed: an older loader must not
/// take a newer one's place. Returns what was removed.
fn retire_other_versions(pins: &Pins) -> Result<Vec<PathBuf>> {
    let ours = layout_number(PIN_VERSION).unwrap_or(0);
    let Some(dir) = pins.root.parent() else {
        return Ok(Vec::new());
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(Vec::new());
    };
    let mut older = Vec::new();
    for e in entries.filter_map(Result::ok) {
        let Some(n) = e.file_name().to_str().and_then(layout_number) else {
            continue;
        };
        if !e.path().is_dir() || n == ours {
            continue;
        }
        if n > ours {
            bail!(
                "{} holds the datapath of a newer bpfnat (pin layout v{n}; this one is {PIN_VERSION}): use that bpfnat",
                dir.display()
            );
        }
        older.push(e.path());
    }
    for path in &older {
        remove_tree(path)?;
    }
    Ok(older)
}

fn remove_pin(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(anyhow!(e).context(format!("remove {}", path.display()))),
    }
}

/// The tc filter that runs `tc_container` on a container's host veth: its priority (`tc
/// filter … pref`) and handle. Fixed, so that a reinstall replaces the program in place.
pub const CONTAINER_FILTER_PRIO: u16 = 1;
pub const CONTAINER_FILTER_HANDLE: u32 = 1;

/// A container's host veth gets its program as a cls_bpf filter (direct action) on a clsact
/// qdisc, not a TCX link: attaching the first TCX link of a device waits out an RCU grace
/// period under the RTNL lock (about 10 ms here, most of a `container add`), a filter does
/// not. The filter lives and goes with the device, so nothing is pinned; on an interface
/// that has it already, cls_bpf swaps the program atomically. `ifname` is link `index` of
/// `nl`'s namespace.
pub async fn attach_container(pins: &Pins, nl: &Netlink, ifname: &str, index: u32) -> Result<()> {
    let name = prog_names::TC_CONTAINER;
    // The program's fd without `SchedClassifier::from_pin`, whose feature probes cost more
    // than the rest of the attach (`nat_plumbing::netlink::BpfFilter`).
    let prog = ProgramInfo::from_pin(pins.prog(name))
        .and_then(|info| info.fd())
        .with_context(|| format!("open pinned program {name} (is the datapath up?)"))?;
    // A TCX link (what earlier versions attached) would run ahead of the filter.
    remove_pin(&pins.link(ifname))?;
    nl.add_clsact(index).await?;
    nl.put_ingress_filter(
        index,
        &BpfFilter {
            prog: prog.as_fd(),
            name,
            priority: CONTAINER_FILTER_PRIO,
            handle: CONTAINER_FILTER_HANDLE,
        },
    )
    .await
    .with_context(|| format!("attach {name} to {ifname}"))
}

fn open_tc(pins: &Pins, name: &str) -> Result<SchedClassifier> {
    SchedClassifier::from_pin(pins.prog(name))
        .with_context(|| format!("open pinned program {name} (is the datapath up?)"))
}

/// The uplink's program on TC ingress of `ifname` (in the calling thread's namespace) through
/// a pinned TCX link: it is attached once per `up`, and the link is owned (no other loader's
/// program can replace it unseen).
pub fn attach_uplink(pins: &Pins, ifname: &str) -> Result<()> {
    let name = prog_names::TC_UPLINK;
    let mut prog = open_tc(pins, name)?;
    let prog_id = prog
        .info()
        .with_context(|| format!("read pinned program {name}"))?
        .id();
    let link_path = pins.link(ifname);
    // Already there through our link: keep it (re-attaching would cut nothing, but the
    // kernel frees an unpinned link later, on a work queue, and refuses the same program
    // twice on one hook until then).
    if link_path.exists() && tcx_has(ifname, prog_id)? {
        return Ok(());
    }
    remove_pin(&link_path)?;
    wait_released(ifname, prog_id)?;
    let id = prog
        .attach(ifname, TcAttachType::Ingress)
        .with_context(|| format!("attach tc ingress to {ifname}"))?;
    let link: FdLink = prog
        .take_link(id)
        .context("take the TC link")?
        .try_into()
        .with_context(|| format!("TC link on {ifname} is not a TCX link (kernel < 6.6?)"))?;
    link.pin(&link_path)
        .with_context(|| format!("pin link at {}", link_path.display()))?;
    Ok(())
}

/// Whether program `prog_id` runs at TC ingress of `ifname`.
fn tcx_has(ifname: &str, prog_id: u32) -> Result<bool> {
    let (_, progs) = SchedClassifier::query_tcx(ifname, TcAttachType::Ingress)
        .with_context(|| format!("query tc programs on {ifname}"))?;
    Ok(progs.iter().any(|p| p.id() == prog_id))
}

/// Wait (bounded) until a link of `prog_id` on `ifname` whose last pin just went is freed.
fn wait_released(ifname: &str, prog_id: u32) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while tcx_has(ifname, prog_id)? {
        if std::time::Instant::now() > deadline {
            bail!(
                "program {prog_id} stays attached to {ifname} through a link that is not ours; detach it (bpftool net) and retry"
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    Ok(())
}

/// Detach what we attached to `ifname` (removing a pin drops the last reference; a
/// container's filter goes with its veth, and is deleted here if the veth stays).
pub fn detach(pins: &Pins, ifname: &str) -> Result<()> {
    unpin_links(pins, ifname)?;
    match tc::qdisc_detach_program(ifname, TcAttachType::Ingress, prog_names::TC_CONTAINER) {
        Ok(()) => Ok(()),
        // No filter, or no such interface (any more).
        Err(tc::TcError::IoError(e))
            if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENODEV) =>
        {
            Ok(())
        }
        Err(tc::TcError::NetlinkError(e))
            if matches!(
                e.raw_os_error(),
                Some(libc::ENODEV | libc::EINVAL | libc::ENOENT)
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(anyhow!(e).context(format!("detach the tc filter from {ifname}"))),
    }
}

/// Remove the pins of `ifname`'s XDP and TCX links (on a container veth, what earlier
/// versions attached): the links go with their last reference.
pub fn unpin_links(pins: &Pins, ifname: &str) -> Result<()> {
    remove_pin(&pins.xdp_link(ifname))?;
    remove_pin(&pins.link(ifname))
}

/// How the uplink's XDP program runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpAttach {
    /// In the driver, before an skb exists.
    Native,
    /// After the skb is built (any interface; slower than native).
    Generic,
}

/// Attach the uplink's XDP program to `ifname` (in the calling thread's namespace) and pin
/// the link, replacing an earlier one of ours.
pub fn attach_xdp(pins: &Pins, ifname: &str, how: XdpAttach) -> Result<()> {
    let name = prog_names::XDP_UPLINK;
    let mut prog = Xdp::from_pin(pins.prog(name), aya_obj::programs::XdpAttachType::Interface)
        .with_context(|| format!("open pinned program {name} (is the datapath up?)"))?;
    let link_path = pins.xdp_link(ifname);
    remove_pin(&link_path)?;
    let (mode, shown) = match how {
        XdpAttach::Native => (XdpMode::Driver, "native"),
        XdpAttach::Generic => (XdpMode::Skb, "generic"),
    };
    let id = prog.attach(ifname, mode).map_err(|e| {
        let erange = matches!(
            &e,
            ProgramError::SyscallError(s)
                if s.io_error.raw_os_error() == Some(libc::ERANGE)
        );
        let hint = if erange {
            // veth_xdp_set: a frame must fit one page.
            " (the MTU is too large for XDP on this device: at most about 3,500 bytes on a veth; use --xdp off or generic)"
        } else {
            ""
        };
        anyhow!(e).context(format!("attach {shown} XDP to {ifname}{hint}"))
    })?;
    let link: FdLink = prog
        .take_link(id)
        .context("take the XDP link")?
        .try_into()
        .with_context(|| format!("XDP on {ifname} is not a bpf_link (kernel < 5.9?)"))?;
    link.pin(&link_path)
        .with_context(|| format!("pin link at {}", link_path.display()))?;
    Ok(())
}

/// A map delete whose key is already gone did what it was asked: the kernel answers ENOENT
/// (aya passes it on as a syscall error), and a datapath or a concurrent command may have
/// removed the entry between a dump and the delete.
fn deleted(r: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        r => r,
    }
}

fn open_map(pins: &Pins, name: &str) -> Result<Map> {
    let path = pins.map(name);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("open pinned map {} (is the datapath up?)", path.display()))?;
    Map::from_map_data(data).with_context(|| format!("map {name}"))
}

/// Typed access to the pinned maps.
pub struct Maps {
    config: Array<MapData, Config>,
    endpoints: HashMap<MapData, Addr4, Endpoint>,
    endpoints6: HashMap<MapData, Addr6, Endpoint>,
    ports: HashMap<MapData, PortKey4, PortTarget4>,
    ports6: HashMap<MapData, PortKey6, PortTarget6>,
    /// Each family's conntrack tables.
    ct4: conntrack::Tables<Addr4>,
    ct6: conntrack::Tables<Addr6>,
    stats: PerCpuArray<MapData, Counter>,
    static_nat: HashMap<MapData, Addr4, StaticNat4>,
    static_nat6: HashMap<MapData, Addr6, StaticNat6>,
    node_addrs: HashMap<MapData, Addr4, NodeAddr>,
    node_addrs6: HashMap<MapData, Addr6, NodeAddr>,
    cluster_nets: LpmTrie<MapData, Addr4, ClusterNet>,
    conntrack_max: u32,
}

/// One named counter summed over CPUs.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Stat {
    pub reason: &'static str,
    pub packets: u64,
    pub bytes: u64,
}

/// The IPv4 side of `m`, if it listens over IPv4.
fn port_key(m: &PortMapping) -> Option<PortKey4> {
    m.v4().map(|ip| PortKey4 {
        host_addr: ip.map_or([0; 4], |ip| ip.octets()),
        host_port: m.host_port.to_be_bytes(),
        proto: m.proto.number(),
        _pad: 0,
    })
}

/// What to write for one family's side of `m` (its key if it listens in that family, the
/// container's address in it): both, nothing (no side, or `8080:80` on a container without
/// an address of the family, whose other side is all there is), or an error for a mapping
/// on an address of a family the container lacks.
fn side<K, T>(
    m: &PortMapping,
    key: Option<K>,
    target: Option<T>,
    family: &str,
    other: &str,
) -> Result<Option<(K, T)>> {
    match (key, target) {
        (Some(k), Some(t)) => Ok(Some((k, t))),
        (Some(_), None) if m.host_ip.is_some() => Err(anyhow!(
            "the container has no {family} address: publish on an {other} address, or on every address (8080:80)"
        )),
        _ => Ok(None),
    }
}

/// The IPv6 side of `m`, if it listens over IPv6: a mapping on every node address does on
/// both families, as Docker's `-p 8080:80`.
fn port_key6(m: &PortMapping) -> Option<PortKey6> {
    m.v6().map(|ip| PortKey6 {
        host_addr: ip.map_or([0; 16], |ip| ip.octets()),
        host_port: m.host_port.to_be_bytes(),
        proto: m.proto.number(),
        _pad: 0,
    })
}

impl Maps {
    pub fn open(pins: &Pins) -> Result<Self> {
        if !pins.installed() {
            bail!(NOT_UP);
        }
        Ok(Self {
            config: open_map(pins, map_names::CONFIG)?.try_into()?,
            endpoints: open_map(pins, map_names::ENDPOINTS)?.try_into()?,
            endpoints6: open_map(pins, map_names::ENDPOINTS6)?.try_into()?,
            ports: open_map(pins, map_names::PORTS)?.try_into()?,
            ports6: open_map(pins, map_names::PORTS6)?.try_into()?,
            ct4: conntrack::Tables::open(pins)?,
            ct6: conntrack::Tables::open(pins)?,
            stats: open_map(pins, map_names::STATS)?.try_into()?,
            static_nat: open_map(pins, map_names::STATIC_NAT)?.try_into()?,
            static_nat6: open_map(pins, map_names::STATIC_NAT6)?.try_into()?,
            node_addrs: open_map(pins, map_names::NODE_ADDRS)?.try_into()?,
            node_addrs6: open_map(pins, map_names::NODE_ADDRS6)?.try_into()?,
            cluster_nets: open_map(pins, map_names::CLUSTER_NETS)?.try_into()?,
            conntrack_max: MapInfo::from_pin(pins.map(map_names::CONNTRACK))
                .context("inspect conntrack map")?
                .max_entries(),
        })
    }

    pub fn set_config(&mut self, c: &Config) -> Result<()> {
        self.config.set(0, c, 0).context("write config map")
    }

    pub fn config(&self) -> Result<Config> {
        self.config.get(&0, 0).context("read config map")
    }

    /// Make `node_addrs` hold exactly `addrs` (address, ifindex): the node's unicast
    /// addresses that outside packets may be DNATed from.
    pub fn set_node_addrs(&mut self, addrs: &[(Ipv4Addr, u32)]) -> Result<()> {
        for (ip, ifindex) in addrs {
            self.node_addrs
                .insert(ip.octets(), NodeAddr { ifindex: *ifindex }, 0)
                .with_context(|| format!("write node address {ip}"))?;
        }
        let stale: Vec<Addr4> = self
            .node_addrs
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !addrs.iter().any(|(ip, _)| ip.octets() == *k))
            .collect();
        for k in stale {
            deleted(self.node_addrs.remove(&k))
                .with_context(|| format!("remove node address {}", Ipv4Addr::from(k)))?;
        }
        Ok(())
    }

    /// Make `cluster_nets` hold exactly `want` (prefix → `NET_*` flags): new and changed
    /// prefixes first, then the stale ones go, so no prefix of the cluster is ever missing
    /// in between.
    pub fn set_cluster_nets(&mut self, want: &BTreeMap<Cidr, u32>) -> Result<()> {
        let have = self.cluster_nets()?;
        for (net, flags) in want {
            if have.get(net) != Some(flags) {
                self.cluster_nets
                    .insert(
                        &Key::new(u32::from(net.prefix), net.addr.octets()),
                        ClusterNet { flags: *flags },
                        0,
                    )
                    .with_context(|| format!("write cluster prefix {net}"))?;
            }
        }
        for net in have.keys().filter(|n| !want.contains_key(n)) {
            deleted(
                self.cluster_nets
                    .remove(&Key::new(u32::from(net.prefix), net.addr.octets())),
            )
            .with_context(|| format!("remove cluster prefix {net}"))?;
        }
        Ok(())
    }

    /// The cluster prefixes the datapath knows, with their `NET_*` flags.
    pub fn cluster_nets(&self) -> Result<BTreeMap<Cidr, u32>> {
        self.cluster_nets
            .iter()
            .map(|kv| {
                let (k, v) = kv.context("read cluster_nets map")?;
                let net = Cidr {
                    addr: Ipv4Addr::from(k.data()),
                    prefix: u8::try_from(k.prefix_len()).unwrap_or(32),
                };
                Ok((net, v.flags))
            })
            .collect()
    }

    /// The node addresses the datapath knows.
    pub fn node_addrs(&self) -> Result<Vec<Ipv4Addr>> {
        self.node_addrs
            .keys()
            .map(|k| k.map(Ipv4Addr::from).context("read node_addrs map"))
            .collect()
    }

    pub fn put_endpoint(&mut self, ip: Ipv4Addr, ep: &Endpoint) -> Result<()> {
        self.endpoints
            .insert(ip.octets(), ep, 0)
            .with_context(|| format!("write endpoint {ip}"))
    }

    /// Whether the datapath has an endpoint at `ip`.
    pub fn has_endpoint(&self, ip: IpAddr) -> Result<bool> {
        let r = match ip {
            IpAddr::V4(a) => self.endpoints.get(&a.octets(), 0),
            IpAddr::V6(a) => self.endpoints6.get(&a.octets(), 0),
        };
        match r {
            Ok(_) => Ok(true),
            Err(aya::maps::MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(anyhow!(e).context(format!("read endpoint {ip}"))),
        }
    }

    pub fn put_endpoint6(&mut self, ip: Ipv6Addr, ep: &Endpoint) -> Result<()> {
        self.endpoints6
            .insert(ip.octets(), ep, 0)
            .with_context(|| format!("write endpoint {ip}"))
    }

    pub fn remove_endpoint6(&mut self, ip: Ipv6Addr) -> Result<()> {
        deleted(self.endpoints6.remove(&ip.octets()))
            .with_context(|| format!("remove endpoint {ip}"))
    }

    pub fn remove_endpoint(&mut self, ip: Ipv4Addr) -> Result<()> {
        deleted(self.endpoints.remove(&ip.octets()))
            .with_context(|| format!("remove endpoint {ip}"))
    }

    /// Publish `ms` towards the container at `target` (and at `target6`, over IPv6, when it
    /// has an IPv6 address), each with the next generation after `generation`. Connections
    /// tracked for the same host ports from an earlier mapping are forgotten, so they cannot
    /// shadow the new one. On error, what was published here is withdrawn.
    pub fn put_ports(
        &mut self,
        ms: &[PortMapping],
        (target, target6): (Option<Ipv4Addr>, Option<Ipv6Addr>),
        generation: u32,
    ) -> Result<()> {
        for (i, m) in ms.iter().enumerate() {
            let generation = generation.wrapping_add(i as u32);
            let port = m.container_port.to_be_bytes();
            let r = side(m, port_key(m), target, "IPv4", "IPv6")
                .and_then(|s| match s {
                    Some((k, ip)) => {
                        let t = PortTarget4 {
                            addr: ip.octets(),
                            port,
                            _pad: [0; 2],
                            generation,
                        };
                        Ok(self.ports.insert(k, t, 0)?)
                    }
                    None => Ok(()),
                })
                .and_then(|()| match side(m, port_key6(m), target6, "IPv6", "IPv4")? {
                    Some((k, ip)) => {
                        let t = PortTarget6 {
                            addr: ip.octets(),
                            port,
                            _pad: [0; 2],
                            generation,
                        };
                        Ok(self.ports6.insert(k, t, 0)?)
                    }
                    None => Ok(()),
                });
            if let Err(e) = r {
                let _ = self.remove_ports(&ms[..=i]);
                return Err(e.context(format!("publish {m}")));
            }
        }
        self.forget_ports(ms)
    }

    /// Unpublish `ms` and forget the connections made to them.
    pub fn remove_ports(&mut self, ms: &[PortMapping]) -> Result<()> {
        self.unpublish(ms)?;
        self.forget_ports(ms)
    }

    /// Take `ms` out of the ports maps; their connections stay (`forget`).
    pub fn unpublish(&mut self, ms: &[PortMapping]) -> Result<()> {
        for m in ms {
            if let Some(k) = port_key(m) {
                deleted(self.ports.remove(&k)).with_context(|| format!("unpublish {m}"))?;
            }
            if let Some(k6) = port_key6(m) {
                deleted(self.ports6.remove(&k6)).with_context(|| format!("unpublish {m}"))?;
            }
        }
        Ok(())
    }

    /// Make `node_addrs6` hold exactly `addrs` (address, ifindex): the node's global IPv6
    /// addresses that outside packets may be DNATed from.
    pub fn set_node_addrs6(&mut self, addrs: &[(Ipv6Addr, u32)]) -> Result<()> {
        for (ip, ifindex) in addrs {
            self.node_addrs6
                .insert(ip.octets(), NodeAddr { ifindex: *ifindex }, 0)
                .with_context(|| format!("write node address {ip}"))?;
        }
        let stale: Vec<Addr6> = self
            .node_addrs6
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !addrs.iter().any(|(ip, _)| ip.octets() == *k))
            .collect();
        for k in stale {
            deleted(self.node_addrs6.remove(&k))
                .with_context(|| format!("remove node address {}", Ipv6Addr::from(k)))?;
        }
        Ok(())
    }

    /// What the `ports` and `ports6` maps publish, in domain terms: one mapping per family
    /// (its host address as the map has it: `0.0.0.0` or `::` for every address) and the
    /// container address it leads to.
    pub fn published(&self) -> Result<Vec<(PortMapping, IpAddr)>> {
        let mut out = Vec::new();
        let mut add = |host: IpAddr, port: Port, proto: u8, to: IpAddr, to_port: Port| {
            if let Some(proto) = Proto::from_number(proto) {
                out.push((
                    PortMapping {
                        host_ip: Some(host),
                        host_port: u16::from_be_bytes(port),
                        container_port: u16::from_be_bytes(to_port),
                        proto,
                    },
                    to,
                ));
            }
        };
        for (k, t) in self.ports()? {
            let host = Ipv4Addr::from(k.host_addr).into();
            add(
                host,
                k.host_port,
                k.proto,
                Ipv4Addr::from(t.addr).into(),
                t.port,
            );
        }
        for r in self.ports6.iter() {
            let (k, t) = r.context("read ports6 map")?;
            let host = Ipv6Addr::from(k.host_addr).into();
            add(
                host,
                k.host_port,
                k.proto,
                Ipv6Addr::from(t.addr).into(),
                t.port,
            );
        }
        Ok(out)
    }

    pub fn ports(&self) -> Result<Vec<(PortKey4, PortTarget4)>> {
        self.ports
            .iter()
            .map(|r| r.context("read ports map"))
            .collect()
    }

    /// Map `external` to `internal` one to one, both ways.
    /// Map `external` to `internal` one to one, both ways: the two are of one family.
    pub fn put_static_nat(&mut self, external: IpAddr, internal: IpAddr) -> Result<()> {
        match (external, internal) {
            (IpAddr::V4(e), IpAddr::V4(i)) => self.put_static_nat4(e, i),
            (IpAddr::V6(e), IpAddr::V6(i)) => self.put_static_nat6(e, i),
            _ => bail!(
                "static NAT maps an address to one of its own family ({external} -> {internal})"
            ),
        }
    }

    fn put_static_nat6(&mut self, external: Ipv6Addr, internal: Ipv6Addr) -> Result<()> {
        let ext = StaticNat6 {
            peer: internal.octets(),
            kind: STATIC_EXTERNAL,
            _pad: [0; 3],
        };
        let int = StaticNat6 {
            peer: external.octets(),
            kind: STATIC_INTERNAL,
            _pad: [0; 3],
        };
        self.static_nat6
            .insert(external.octets(), ext, 0)
            .with_context(|| format!("write static NAT {external}"))?;
        if let Err(e) = self.static_nat6.insert(internal.octets(), int, 0) {
            let _ = self.static_nat6.remove(&external.octets());
            return Err(anyhow!(e).context(format!("write static NAT {internal}")));
        }
        Ok(())
    }

    fn put_static_nat4(&mut self, external: Ipv4Addr, internal: Ipv4Addr) -> Result<()> {
        let ext = StaticNat4 {
            peer: internal.octets(),
            kind: STATIC_EXTERNAL,
            _pad: [0; 3],
        };
        let int = StaticNat4 {
            peer: external.octets(),
            kind: STATIC_INTERNAL,
            _pad: [0; 3],
        };
        self.static_nat
            .insert(external.octets(), ext, 0)
            .with_context(|| format!("write static NAT {external}"))?;
        if let Err(e) = self.static_nat.insert(internal.octets(), int, 0) {
            let _ = self.static_nat.remove(&external.octets());
            return Err(anyhow!(e).context(format!("write static NAT {internal}")));
        }
        Ok(())
    }

    pub fn remove_static_nat(&mut self, external: IpAddr, internal: IpAddr) -> Result<()> {
        for a in [external, internal] {
            match a {
                IpAddr::V4(a4) => deleted(self.static_nat.remove(&a4.octets())),
                IpAddr::V6(a6) => deleted(self.static_nat6.remove(&a6.octets())),
            }
            .with_context(|| format!("remove static NAT {a}"))?;
        }
        Ok(())
    }

    pub fn stats(&self) -> Result<Vec<Stat>> {
        Reason::ALL
            .iter()
            .map(|(r, name)| {
                let per_cpu = self
                    .stats
                    .get(&(*r as u32), 0)
                    .with_context(|| format!("read counter {name}"))?;
                let (packets, bytes) = per_cpu
                    .iter()
                    .fold((0, 0), |(p, b), c| (p + c.packets, b + c.bytes));
                Ok(Stat {
                    reason: name,
                    packets,
                    bytes,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod map_table {
    use super::{MAP_SPECS, OBJECT, map_type};

    #[test]
    fn the_map_table_describes_every_map_of_the_object() {
        let obj = aya_obj::Object::parse(OBJECT).expect("parse the built eBPF object");
        let mut in_object: Vec<&str> = obj
            .maps
            .keys()
            .map(String::as_str)
            .filter(|n| !n.starts_with('.'))
            .collect();
        in_object.sort_unstable();
        let mut in_table: Vec<&str> = MAP_SPECS.iter().map(|m| m.name).collect();
        in_table.sort_unstable();
        assert_eq!(
            in_object, in_table,
            "maps in the object vs nat_common::MAP_SPECS"
        );
        for m in &MAP_SPECS {
            let o = &obj.maps[m.name];
            assert_eq!(o.map_type(), map_type(m.kind) as u32, "{} kind", m.name);
            assert_eq!(o.key_size() as usize, m.key_size, "{} key", m.name);
            assert_eq!(o.value_size() as usize, m.value_size, "{} value", m.name);
            if let Some(n) = m.fixed_entries {
                assert_eq!(o.max_entries(), n, "{} entries", m.name);
            }
        }
    }
}

#[cfg(test)]
mod versions {
    use super::{PIN_VERSION, Pins, retire_other_versions};

    #[test]
    fn an_older_layouts_pins_are_retired_and_nothing_else() {
        let dir = std::env::temp_dir().join(format!("bpfnat-versions-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for d in ["v1/links", "v0", PIN_VERSION, "vx", "v", "other"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        let mut removed = retire_other_versions(&Pins::new(&dir)).unwrap();
        removed.sort();
        assert_eq!(removed, vec![dir.join("v0"), dir.join("v1")]);
        for kept in [PIN_VERSION, "vx", "v", "other"] {
            assert!(dir.join(kept).is_dir(), "{kept} kept");
        }
        // A newer layout is refused, and nothing is removed.
        std::fs::create_dir_all(dir.join("v1")).unwrap();
        std::fs::create_dir_all(dir.join("v99")).unwrap();
        let err = retire_other_versions(&Pins::new(&dir)).unwrap_err();
        assert!(err.to_string().contains("newer bpfnat"), "{err}");
        assert!(dir.join("v1").is_dir() && dir.join("v99").is_dir());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
