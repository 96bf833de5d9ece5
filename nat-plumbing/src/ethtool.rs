//! The two interface offload switches the XDP path depends on, set through the ethtool ioctl
//! (what `ethtool -K IFACE gro on` / `tx off` does), in the calling thread's namespace.
//!
//! - GRO on a veth turns on its NAPI receive path, without which frames an XDP program
//!   redirects into the veth pair are dropped (`veth_xdp_xmit` needs the peer's NAPI).
//! - Transmit checksum offload: a local sender behind a veth hands over packets whose L4
//!   checksum is only partial; XDP, which has no skb, cannot tell. The lab turns it off on
//!   its "external host" when it measures or tests XDP.

use std::{io, path::Path};

use anyhow::{Context as _, Result, bail};

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_STXCSUM: u32 = 0x17;
const ETHTOOL_GGRO: u32 = 0x2b;
const ETHTOOL_SGRO: u32 = 0x2c;
const ETHTOOL_GTXCSUM: u32 = 0x16;

/// An on/off offload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offload {
    /// Generic receive offload (on a veth: its NAPI receive path).
    Gro,
    /// Transmit checksum offload (and with it TSO).
    TxChecksum,
}

impl Offload {
    fn cmds(self) -> (u32, u32) {
        match self {
            Self::Gro => (ETHTOOL_GGRO, ETHTOOL_SGRO),
            Self::TxChecksum => (ETHTOOL_GTXCSUM, ETHTOOL_STXCSUM),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Gro => "gro",
            Self::TxChecksum => "tx checksumming",
        }
    }
}

#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    data: *mut EthtoolValue,
    _pad: [u8; 16],
}

fn ioctl(ifname: &str, value: &mut EthtoolValue) -> io::Result<()> {
    if ifname.is_empty() || ifname.len() >= libc::IFNAMSIZ {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: value,
        _pad: [0; 16],
    };
    for (d, s) in req.name.iter_mut().zip(ifname.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: a plain socket used only for the ioctl, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `req` and the value it points to outlive the call; the kernel reads the name and
    // reads/writes one `ethtool_value`.
    let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL, &raw mut req) };
    let err = io::Error::last_os_error();
    // SAFETY: `fd` is ours.
    unsafe { libc::close(fd) };
    if rc < 0 { Err(err) } else { Ok(()) }
}

/// Whether `what` is on for `ifname` in the calling thread's namespace.
pub fn get(ifname: &str, what: Offload) -> Result<bool> {
    let mut v = EthtoolValue {
        cmd: what.cmds().0,
        data: 0,
    };
    ioctl(ifname, &mut v).with_context(|| format!("read {} of {ifname}", what.name()))?;
    Ok(v.data != 0)
}

/// Switch `what` on or off for `ifname` in the calling thread's namespace, and check it took.
pub fn set(ifname: &str, what: Offload, on: bool) -> Result<()> {
    let mut v = EthtoolValue {
        cmd: what.cmds().1,
        data: u32::from(on),
    };
    ioctl(ifname, &mut v).with_context(|| {
        format!(
            "turn {} {} on {ifname}",
            what.name(),
            if on { "on" } else { "off" }
        )
    })?;
    if get(ifname, what)? != on {
        bail!(
            "{} stays {} on {ifname}: the driver does not allow the change",
            what.name(),
            if on { "off" } else { "on" }
        );
    }
    Ok(())
}

/// `set` inside the network namespace at `ns`.
pub fn set_in(ns: &Path, ifname: &str, what: Offload, on: bool) -> Result<()> {
    let name = ifname.to_owned();
    crate::netns::run_in(ns, move || set(&name, what, on))
}
