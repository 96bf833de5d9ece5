//! The ARP responder: containers' requests for the gateway and for each other, and the
//! uplink's for static NAT addresses. The subnet is one flat L2 segment this answers for.

use aya_ebpf::{helpers::bpf_redirect, programs::TcContext};
use nat_common::{Config, Reason, STATIC_EXTERNAL};
use network_types::{arp::ArpHdr, eth::EthHdr};

use crate::{
    TC_ACT_OK,
    lookup::{endpoint, static_nat},
    parse,
    stats::count,
};

const ARP_REQUEST: u16 = 1;
const ARP_REPLY: u16 = 2;

#[repr(C)]
#[derive(Clone, Copy)]
struct EthArp {
    eth: EthHdr,
    arp: ArpHdr,
}

/// Answer a container's ARP request for the gateway (with its host veth's MAC) or for another
/// container (with that container's MAC), so all traffic reaches this program as unicast.
#[inline(always)]
pub fn from_container(
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
pub fn from_uplink(ctx: &TcContext, cfg: &Config, ifindex: u32) -> Result<i32, Reason> {
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
