//! Where a packet goes, decided before it is translated (as the kernel routes before its
//! SNAT): into a container (the endpoint table) or out (the FIB), with the answer cached in
//! a tracked direction's entry for `NEXT_HOP_CACHE_NS`. Nothing here changes the packet.

use core::{ffi::c_void, mem::size_of};

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        bpf_check_mtu_flags::BPF_MTU_CHK_SEGS, bpf_fib_lookup as FibParams,
    },
    helpers::{bpf_check_mtu, bpf_fib_lookup},
    programs::TcContext,
};
use nat_common::{Config, CtMeta, Endpoint, NEXT_HOP_CACHE_NS};

use crate::{
    family::Fam,
    parse::{ETH_LEN, Ip},
};

/// Where a tracked direction delivers into a container: the container's host veth and the
/// MACs to write.
#[derive(Clone, Copy)]
pub struct Hop {
    pub ifindex: u32,
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
}

/// The container hop cached in `e`, while fresh. Like the FIB next hop, it is trusted for
/// `NEXT_HOP_CACHE_NS`, so endpoint changes take effect within it.
#[inline(always)]
fn cached_peer(e: *const CtMeta, now: u64) -> Option<Hop> {
    // SAFETY: read of a live map value; a torn read yields a valid but stale hop at worst.
    let e = unsafe { &*e };
    if e.nh_peer == 1 && e.nh_ifindex != 0 && now < e.nh_until_ns {
        Some(Hop {
            ifindex: e.nh_ifindex,
            dmac: e.nh_dmac,
            smac: e.nh_smac,
        })
    } else {
        None
    }
}

/// Cache `ep` as the container hop of `e`.
#[inline(always)]
fn remember_peer(e: *mut CtMeta, ep: &Endpoint, now: u64) -> Hop {
    // SAFETY: as in `route_tracked`: concurrent writers store the same hop.
    let e = unsafe { &mut *e };
    e.nh_peer = 1;
    e.nh_ifindex = ep.ifindex;
    e.nh_dmac = ep.mac;
    e.nh_smac = ep.host_mac;
    e.nh_until_ns = now + NEXT_HOP_CACHE_NS;
    Hop {
        ifindex: ep.ifindex,
        dmac: ep.mac,
        smac: ep.host_mac,
    }
}

/// The container hop of a tracked direction whose packets go to `dst` (after translation):
/// from the entry's cache while fresh, else from the endpoint table (and cached). `None`:
/// the packets do not end in a container.
#[inline(always)]
pub fn peer_hop<A: Fam>(cfg: &Config, e: *mut CtMeta, dst: &A, now: u64) -> Option<Hop> {
    match cached_peer(e, now) {
        Some(h) => Some(h),
        None => A::container_at(cfg, dst).map(|ep| remember_peer(e, &ep, now)),
    }
}

/// Where a tracked direction's packet goes.
#[derive(Clone, Copy)]
pub enum Way {
    /// Into a container's namespace.
    Peer(Hop),
    /// Out, by the FIB's next hop (possibly too big for it: `FRAG_NEEDED`).
    Out(NextHop),
}

/// Decide where a packet of the tracked direction `e` goes; its destination after
/// translation is `dst`.
#[inline(always)]
pub fn tracked_way<A: Fam>(
    ctx: &TcContext,
    cfg: &Config,
    p: &Ip<A>,
    ifindex: u32,
    e: *mut CtMeta,
    dst: &A,
    now: u64,
) -> Way {
    match peer_hop(cfg, e, dst, now) {
        Some(h) => Way::Peer(h),
        None => Way::Out(out_hop(ctx, p, ifindex, e, now)),
    }
}

/// `bpf_fib_lookup`'s "the packet is too big for the egress device".
pub const FRAG_NEEDED: i32 = BPF_FIB_LKUP_RET_FRAG_NEEDED as i32;
pub const SUCCESS: i32 = BPF_FIB_LKUP_RET_SUCCESS as i32;
pub const NO_NEIGH: i32 = BPF_FIB_LKUP_RET_NO_NEIGH as i32;

/// What a FIB lookup said: the kernel's code and, on success, the next hop. Smaller than the
/// kernel's `bpf_fib_lookup`, so it can be kept across the connection setup.
#[derive(Clone, Copy)]
pub struct NextHop {
    pub rc: i32,
    pub ifindex: u32,
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    /// The egress device's MTU.
    pub mtu: u32,
    /// Taken from a conntrack entry's cache, not from a lookup.
    pub cached: bool,
}

impl NextHop {
    /// Whether the packet would be forwarded (too big for the egress device counts: the
    /// route exists).
    #[inline(always)]
    pub fn forwards(&self) -> bool {
        self.rc == SUCCESS || self.rc == NO_NEIGH || self.rc == FRAG_NEEDED
    }
}

/// FIB lookup for `p` as if it arrived on `ifindex`.
#[inline(always)]
pub fn fib<A: Fam>(ctx: &TcContext, p: &Ip<A>, ifindex: u32) -> NextHop {
    // Zeroed a word at a time: `zeroed()` became a call to `memset`, a byte loop on the BPF
    // target (about 40 ns for these 64 bytes).
    let mut f = core::mem::MaybeUninit::<FibParams>::uninit();
    // SAFETY: `zero` writes every byte of the (4-aligned) struct; all-zero is a valid input.
    let f = unsafe {
        crate::pkt::zero(f.as_mut_ptr());
        &mut *f.as_mut_ptr()
    };
    A::fib_addrs(f, p);
    f.l4_protocol = p.proto;
    f.sport = u16::from_ne_bytes(p.sport);
    f.dport = u16::from_ne_bytes(p.dport);
    // tot_len 0: the kernel checks the skb (GSO aware) against the egress MTU itself.
    f.__bindgen_anon_1.tot_len = 0;
    f.ifindex = ifindex;
    // SAFETY: `f` lives on the stack for the call; size matches the struct.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb as *mut c_void,
            f,
            size_of::<FibParams>() as i32,
            0,
        )
    };
    let nh = NextHop {
        rc: rc as i32,
        ifindex: f.ifindex,
        dmac: f.dmac,
        smac: f.smac,
        // SAFETY: after the lookup the kernel has written the MTU over `tot_len`.
        mtu: u32::from(unsafe { f.__bindgen_anon_1.mtu_result }),
        cached: false,
    };
    crate::explain::fib(&p.dst, &nh);
    nh
}

/// The way out for a packet of the tracked direction `e`: the next hop the FIB gave is kept in
/// the entry for `NEXT_HOP_CACHE_NS`, so most packets of a connection skip the lookup; a
/// cached hop still has the packet checked against its device's MTU (GSO aware), as the FIB
/// lookup does.
#[inline(always)]
fn out_hop<A: Fam>(ctx: &TcContext, p: &Ip<A>, ifindex: u32, e: *mut CtMeta, now: u64) -> NextHop {
    // SAFETY: `e` points at the connection's map value; concurrent writers store the same
    // next hop, and a torn read costs one wrong-but-valid redirect at worst until refreshed.
    let e = unsafe { &mut *e };
    if e.nh_peer == 0 && e.nh_ifindex != 0 && now < e.nh_until_ns {
        let fits = ctx.len() <= e.nh_mtu.saturating_add(ETH_LEN as u32);
        let mut mtu: u32 = 0;
        // Only a packet longer than the cached MTU (GSO, or an MTU that shrank) pays for the
        // helper.
        let rc = if fits {
            0
        } else {
            // SAFETY: `mtu` lives for the call; 0 asks for the skb's own length, and
            // BPF_MTU_CHK_SEGS checks a GSO packet's segments.
            unsafe {
                bpf_check_mtu(
                    ctx.skb.skb as *mut c_void,
                    e.nh_ifindex,
                    &mut mtu,
                    0,
                    u64::from(BPF_MTU_CHK_SEGS),
                )
            }
        };
        return NextHop {
            rc: if rc == 0 { SUCCESS } else { FRAG_NEEDED },
            ifindex: e.nh_ifindex,
            dmac: e.nh_dmac,
            smac: e.nh_smac,
            mtu: e.nh_mtu,
            cached: true,
        };
    }
    let nh = fib(ctx, p, ifindex);
    if nh.rc == SUCCESS || nh.rc == FRAG_NEEDED {
        e.nh_peer = 0;
        e.nh_ifindex = nh.ifindex;
        e.nh_dmac = nh.dmac;
        e.nh_smac = nh.smac;
        e.nh_mtu = nh.mtu;
        e.nh_until_ns = now + NEXT_HOP_CACHE_NS;
    }
    nh
}
