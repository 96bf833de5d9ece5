//! Where packets go: the ARP responder, delivery into a container, routing to the outside.

use core::{ffi::c_void, mem::size_of, ptr::null_mut};

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        bpf_check_mtu_flags::BPF_MTU_CHK_SEGS, bpf_fib_lookup as FibParams,
    },
    helpers::{bpf_check_mtu, bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
    programs::TcContext,
};
use nat_common::{Config, CtEntry4, CtMeta, Endpoint, NEXT_HOP_CACHE_NS, Reason, STATIC_EXTERNAL};
use network_types::{arp::ArpHdr, eth::EthHdr};

use crate::{
    TC_ACT_OK,
    conntrack::{self, Xlate},
    lookup::{container_at, endpoint, static_nat},
    nat::{self, dec_ttl},
    parse,
    parse::{ETH_LEN, Ip4},
    pkt::Pkt,
    stats::count,
};

const AF_INET: u8 = 2;
const ARP_REQUEST: u16 = 1;
const ARP_REPLY: u16 = 2;

#[inline(always)]
pub fn set_macs(ctx: &impl Pkt, dst: [u8; 6], src: [u8; 6]) -> Result<(), Reason> {
    let macs = [
        dst[0], dst[1], dst[2], dst[3], dst[4], dst[5], src[0], src[1], src[2], src[3], src[4],
        src[5],
    ];
    ctx.put(0, &macs)
}

#[repr(C)]
#[derive(Clone, Copy)]
struct EthArp {
    eth: EthHdr,
    arp: ArpHdr,
}

/// Answer a container's ARP request for the gateway (with its host veth's MAC) or for another
/// container (with that container's MAC), so all traffic reaches this program as unicast.
#[inline(always)]
pub fn arp_reply(
    ctx: &TcContext,
    cfg: &Config,
    ifindex: u32,
    eth_src: [u8; 6],
) -> Result<i32, Reason> {
    let Some(arp) = parse::arp(ctx) else {
        return Err(Reason::DropTruncated);
    };
    if arp.oper() != ARP_REQUEST || arp.hlen != 6 || arp.plen != 4 {
        // Replies to the node's own requests, gratuitous announcements: the stack's business.
        count(Reason::Pass, ctx.len());
        return Ok(TC_ACT_OK);
    }
    let me = endpoint(&arp.spa).ok_or(Reason::DropSpoof)?;
    if me.ifindex != ifindex || me.mac != arp.sha || me.mac != eth_src {
        return Err(Reason::DropSpoof);
    }
    let mac = if arp.tpa == cfg.v4.gateway_addr {
        me.host_mac
    } else if let Some(peer) = endpoint(&arp.tpa)
        && arp.tpa != arp.spa
    {
        peer.mac
    } else {
        return Err(Reason::DropArpUnknown);
    };
    answer_arp(ctx, &arp, mac, ifindex)
}

/// Turn the ARP request in the packet into the reply "`arp.tpa` is at `mac`" and send it back
/// out of `ifindex`, where it came from.
#[inline(always)]
fn answer_arp(ctx: &TcContext, arp: &ArpHdr, mac: [u8; 6], ifindex: u32) -> Result<i32, Reason> {
    let mut reply = *arp;
    reply.set_oper(ARP_REPLY);
    reply.sha = mac;
    reply.spa = arp.tpa;
    reply.tha = arp.sha;
    reply.tpa = arp.spa;
    let frame = EthArp {
        eth: EthHdr {
            dst_addr: arp.sha,
            src_addr: mac,
            ether_type: network_types::eth::EtherType::Arp as u16,
        },
        arp: reply,
    };
    ctx.store(0, &frame, 0).map_err(|_| Reason::DropHelper)?;
    count(Reason::ArpReply, ctx.len());
    // SAFETY: plain helper call; egress of the interface the request came in on.
    Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
}

/// On the uplink: answer ARP for the external addresses of static NAT mappings with the
/// uplink's MAC; everything else is the node's.
#[inline(always)]
pub fn uplink_arp(ctx: &TcContext, cfg: &Config, ifindex: u32) -> Result<i32, Reason> {
    if let Some(arp) = parse::arp(ctx)
        && arp.oper() == ARP_REQUEST
        && arp.hlen == 6
        && arp.plen == 4
        && static_nat(cfg, &arp.tpa).is_some_and(|s| s.kind == STATIC_EXTERNAL)
    {
        return answer_arp(ctx, &arp, cfg.uplink_mac, ifindex);
    }
    count(Reason::Pass, ctx.len());
    Ok(TC_ACT_OK)
}

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
pub fn cached_peer(e: *const CtMeta, now: u64) -> Option<Hop> {
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
pub fn remember_peer(e: *mut CtMeta, ep: &Endpoint, now: u64) -> Hop {
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

/// A packet of the tracked direction `e`, not yet translated: rewrite it to `x` and send it
/// into its container (straight into the namespace) or out by the uplink, with the hop cached
/// in the entry either way. The way out is chosen before the rewrite, as the kernel routes
/// before its SNAT: a packet too big for it with DF set goes to the stack untranslated, whose
/// ICMP "fragmentation needed" then reaches the container.
#[inline(always)]
pub fn forward_tracked(
    ctx: &TcContext,
    cfg: &Config,
    p: &mut Ip4,
    ifindex: u32,
    e: *mut CtEntry4,
    x: &Xlate,
    now: u64,
) -> Result<i32, Reason> {
    let e = conntrack::meta(e);
    let peer = match cached_peer(e, now) {
        Some(h) => Some(h),
        None => container_at(cfg, &x.dst).map(|ep| remember_peer(e, &ep, now)),
    };
    if let Some(hop) = peer {
        nat::apply(ctx, p, x)?;
        dec_ttl(ctx, p)?;
        set_macs(ctx, hop.dmac, hop.smac)?;
        count(Reason::Deliver, ctx.len());
        // SAFETY: plain helper call.
        return Ok(unsafe { bpf_redirect_peer(hop.ifindex, 0) } as i32);
    }
    let nh = out_hop(ctx, p, ifindex, e, now);
    if nh.rc == FRAG_NEEDED && p.df {
        count(Reason::MtuExceeded, ctx.len());
        return Ok(TC_ACT_OK);
    }
    nat::apply(ctx, p, x)?;
    route(ctx, p, ifindex, Some(nh))
}

/// Deliver `p` into the container behind `ep`, straight into its namespace.
#[inline(always)]
pub fn to_endpoint(
    ctx: &TcContext,
    p: &mut Ip4,
    ep: &Endpoint,
    routed: bool,
    reason: Reason,
) -> Result<i32, Reason> {
    if routed {
        dec_ttl(ctx, p)?;
    }
    set_macs(ctx, ep.mac, ep.host_mac)?;
    count(reason, ctx.len());
    // SAFETY: plain helper call.
    Ok(unsafe { bpf_redirect_peer(ep.ifindex, 0) } as i32)
}

/// `bpf_fib_lookup`'s "the packet is too big for the egress device".
pub const FRAG_NEEDED: i32 = BPF_FIB_LKUP_RET_FRAG_NEEDED as i32;
const SUCCESS: i32 = BPF_FIB_LKUP_RET_SUCCESS as i32;
const NO_NEIGH: i32 = BPF_FIB_LKUP_RET_NO_NEIGH as i32;

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
pub fn fib(ctx: &TcContext, p: &Ip4, ifindex: u32) -> NextHop {
    // SAFETY: an all-zero `bpf_fib_lookup` is a valid input.
    let mut f: FibParams = unsafe { core::mem::zeroed() };
    f.family = AF_INET;
    f.l4_protocol = p.proto;
    f.sport = u16::from_ne_bytes(p.sport);
    f.dport = u16::from_ne_bytes(p.dport);
    // tot_len 0: the kernel checks the skb (GSO aware) against the egress MTU itself.
    f.__bindgen_anon_1.tot_len = 0;
    f.ifindex = ifindex;
    f.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(p.src);
    f.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(p.dst);
    // SAFETY: `f` lives on the stack for the call; size matches the struct.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb as *mut c_void,
            &mut f,
            size_of::<FibParams>() as i32,
            0,
        )
    };
    NextHop {
        rc: rc as i32,
        ifindex: f.ifindex,
        dmac: f.dmac,
        smac: f.smac,
        // SAFETY: after the lookup the kernel has written the MTU over `tot_len`.
        mtu: u32::from(unsafe { f.__bindgen_anon_1.mtu_result }),
        cached: false,
    }
}

/// The way out for a packet of the tracked direction `e`: the next hop the FIB gave is kept in
/// the entry for `NEXT_HOP_CACHE_NS`, so most packets of a connection skip the lookup; a
/// cached hop still has the packet checked against its device's MTU (GSO aware), as the FIB
/// lookup does.
#[inline(always)]
fn out_hop(ctx: &TcContext, p: &Ip4, ifindex: u32, e: *mut CtMeta, now: u64) -> NextHop {
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

/// Send an already translated `p` on towards the outside, using `hint` when the caller has
/// already done the FIB lookup for this destination.
#[inline(always)]
pub fn route(
    ctx: &TcContext,
    p: &mut Ip4,
    ifindex: u32,
    hint: Option<NextHop>,
) -> Result<i32, Reason> {
    let f = match hint {
        Some(h) => h,
        None => fib(ctx, p, ifindex),
    };
    let rc = f.rc;
    if rc == SUCCESS {
        dec_ttl(ctx, p)?;
        set_macs(ctx, f.dmac, f.smac)?;
        count(
            if f.cached {
                Reason::NextHopCached
            } else {
                Reason::FibRedirect
            },
            ctx.len(),
        );
        // SAFETY: plain helper call.
        return Ok(unsafe { bpf_redirect(f.ifindex, 0) } as i32);
    }
    if rc == NO_NEIGH {
        dec_ttl(ctx, p)?;
        count(Reason::NeighRedirect, ctx.len());
        // SAFETY: a null `params` asks the kernel to resolve the next hop itself.
        return Ok(unsafe { bpf_redirect_neigh(f.ifindex, null_mut(), 0, 0) } as i32);
    }
    count(Reason::StackAfterNat, ctx.len());
    Ok(TC_ACT_OK)
}
