//! Frames on the wire, bypassing every IP stack: an attacker's raw sends and a capture of
//! what really leaves an interface.

use std::{
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// ETH_P_ALL in network order, as AF_PACKET wants it.
const ALL: u16 = (libc::ETH_P_ALL as u16).to_be();

/// An AF_PACKET socket bound to `ifname` of the calling thread's namespace.
fn packet_socket(ifname: &str) -> std::io::Result<(OwnedFd, i32)> {
    let name = std::ffi::CString::new(ifname).expect("interface name");
    // SAFETY: plain socket syscalls; the descriptor is owned at once.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(ALL));
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let sock = OwnedFd::from_raw_fd(fd);
        let ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
        if ifindex == 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ALL;
        addr.sll_ifindex = ifindex;
        if libc::bind(
            sock.as_raw_fd(),
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_ll>() as u32,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok((sock, ifindex))
    }
}

/// Write each of `frames` as it is on interface `ifname` of namespace `ns`.
pub fn send(ns: &Path, ifname: &str, frames: Vec<Vec<u8>>) {
    let ifname = ifname.to_owned();
    nat_plumbing::netns::run_in(ns, move || {
        let (sock, _) = packet_socket(&ifname)?;
        for f in &frames {
            // SAFETY: `f` outlives the call; the socket is bound, so no address is needed.
            let n = unsafe { libc::send(sock.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
            assert_eq!(n, f.len() as isize, "raw send on {ifname}");
        }
        Ok(())
    })
    .expect("raw send");
}

/// Frames seen on an interface, in both directions.
pub type Captured = JoinHandle<Vec<Vec<u8>>>;

/// Capture every frame on `ifname` of namespace `ns` for `window` (starts before it returns).
pub fn capture(ns: &Path, ifname: &str, window: Duration) -> Captured {
    let ns: PathBuf = ns.to_owned();
    let ifname = ifname.to_owned();
    let sock = nat_plumbing::netns::run_in(&ns, move || Ok(packet_socket(&ifname)?.0))
        .expect("capture socket");
    std::thread::spawn(move || {
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: setsockopt with a valid timeval.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                size_of::<libc::timeval>() as u32,
            );
        }
        let deadline = Instant::now() + window;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65536];
        while Instant::now() < deadline {
            // SAFETY: `buf` is valid for its length.
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n > 0 {
                out.push(buf[..n as usize].to_vec());
            }
        }
        out
    })
}

/// The IPv4 source, destination and L4 ports of an Ethernet frame, if it is IPv4 TCP/UDP.
#[must_use]
pub fn ipv4_ports(f: &[u8]) -> Option<(std::net::Ipv4Addr, u16, std::net::Ipv4Addr, u16)> {
    if f.len() < 34 || f[12..14] != [0x08, 0x00] {
        return None;
    }
    let ihl = usize::from(f[14] & 0x0f) * 4;
    let l4 = 14 + ihl;
    if f.len() < l4 + 4 || !matches!(f[23], 6 | 17) {
        return None;
    }
    let a = |o: usize| std::net::Ipv4Addr::new(f[o], f[o + 1], f[o + 2], f[o + 3]);
    let port = |o: usize| u16::from_be_bytes([f[o], f[o + 1]]);
    Some((a(26), port(l4), a(30), port(l4 + 2)))
}
