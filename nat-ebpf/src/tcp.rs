//! TCP window tracking, after nf_conntrack's `tcp_in_window`, so that a forged segment cannot
//! change a connection's state. Each entry keeps its own direction's view: the sequence
//! number after the highest byte it sent (`tcp_end`), the highest one it lets the other side
//! send (`tcp_limit`: acknowledgement plus scaled window) and its largest window
//! (`tcp_maxwin`). A segment is in the window when
//! - it ends no later than the receiver allows (`end <= receiver.tcp_limit`),
//! - it ends after the oldest byte the receiver may still accept
//!   (`end > sender.tcp_end - receiver.tcp_maxwin`),
//! - its acknowledgement (if any, RST aside) is of data the receiver did send and not older
//!   than the sender's window.
//!
//! A segment outside the window is forwarded (the endpoint answers it) but teaches nothing and
//! changes no state; an RST outside it is dropped (`drop_tcp_window`). A direction not seen
//! yet is learned from its first segment, except an answer to a SYN, which must acknowledge
//! exactly that SYN (RFC 9293, SYN-SENT). A connection picked up mid-stream (its SYNs never
//! seen, so its window scaling unknown) is tracked without judging windows, as nf_conntrack
//! does, until a SYN starts it over.
//!
//! Two shortcuts for plain segments (no SYN, FIN or RST) of an assured, established
//! connection, which otherwise cost a second lookup (the other direction's entry): from the
//! container's side they are learned from without the check (`steady_from_inside`); from
//! outside they are checked against the copy of the other direction's fields their own entry
//! keeps (`steady_from_outside`), and only a segment outside that copy's window reads the
//! other entry, which refreshes the copy.

use core::ffi::c_void;

use aya_ebpf::helpers::bpf_loop;
use nat_common::{
    CtEntry, CtMeta, DIR_ORIGINAL, DIR_REPLY, Reason, TCP_PEER_COPY, TCP_SEEN, tcp_flags,
    tcp_state, tcp_transition,
};

use crate::{
    conntrack::{arrives_from_outside, lookup, meta},
    family::Fam,
    maps::CSUM_BUF,
    parse::{Ip, ptr_at},
    pkt::Pkt,
};

/// `CtMeta::tcp_track`: `tcp_limit` is set (this direction has acknowledged something).
const TCP_ACKED: u8 = 2;
/// `CtMeta::tcp_track`: this direction's SYN offered window scaling.
const TCP_WS_OFFERED: u8 = 4;
/// `CtMeta::tcp_track`: the connection was picked up mid-stream, so its window scaling is
/// unknown and its windows are not judged (nf_conntrack's `BE_LIBERAL` for such pickups).
const TCP_LIBERAL: u8 = 8;
/// nf_conntrack's bound for acknowledgements when no window is known yet.
const MAX_ACK_WINDOW: u32 = 66000;
/// RFC 7323's largest shift.
const MAX_WSCALE: u8 = 14;

/// What window tracking needs from a segment, host order.
#[derive(Clone, Copy)]
pub struct Seg {
    pub ack: u32,
    /// The sequence number after it: `seq` + payload, SYN and FIN counting one each.
    pub end: u32,
    /// The raw (unscaled) window field.
    pub win: u32,
    pub flags: u8,
    /// Length of the TCP options.
    pub opt_len: u8,
}

#[inline(always)]
fn before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

#[inline(always)]
fn after(a: u32, b: u32) -> bool {
    before(b, a)
}

/// The segment's numbers, or `None` for a later fragment (no TCP header).
#[inline(always)]
pub fn seg<A>(ctx: &impl Pkt, p: &Ip<A>) -> Option<Seg> {
    if !p.l4_present {
        return None;
    }
    let t = ptr_at::<[u8; 20]>(ctx, p.l4_off)?;
    // SAFETY: bounds checked by `ptr_at`.
    let t = unsafe { *t };
    let doff = u32::from(t[12] >> 4) * 4;
    let ihl = p.ip_hdr_len() as u32;
    let payload = u32::from(p.tot_len).saturating_sub(ihl + doff);
    let flags = t[13];
    let seq = u32::from_be_bytes([t[4], t[5], t[6], t[7]]);
    let syn_fin = u32::from(flags & tcp_flags::SYN != 0) + u32::from(flags & tcp_flags::FIN != 0);
    Some(Seg {
        ack: u32::from_be_bytes([t[8], t[9], t[10], t[11]]),
        end: seq.wrapping_add(payload).wrapping_add(syn_fin),
        win: u32::from(u16::from_be_bytes([t[14], t[15]])),
        flags,
        opt_len: doff.saturating_sub(20) as u8,
    })
}

/// Option walk state, shared with the `bpf_loop` callback.
#[repr(C)]
struct Opts {
    /// Where the next option starts in the buffer.
    next: u32,
    /// Where the options end in the buffer.
    len: u32,
    /// The window scale option's shift, or 0xff when absent.
    wscale: u32,
}

/// The option at the cursor (1 stops the walk): one step per option, so a SYN's usual five
/// options take five steps, not one per byte.
unsafe extern "C" fn opt_step(_i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `Opts` on the caller's stack that `wscale` passed in.
    let o = unsafe { &mut *ctx.cast::<Opts>() };
    let k = o.next;
    if k >= o.len {
        return 1;
    }
    let Some(buf) = CSUM_BUF.get_ptr(0) else {
        return 1;
    };
    // SAFETY: indexes below 64 in a 512-byte map value.
    let byte = |j: u32| unsafe { (*buf)[(j & 63) as usize] };
    match byte(k) {
        0 => 1,
        1 => {
            o.next = k + 1;
            0
        }
        kind => {
            let len = u32::from(byte(k + 1));
            if len < 2 || k + len > o.len {
                return 1;
            }
            if kind == 3 && len == 3 {
                o.wscale = u32::from(byte(k + 2).min(MAX_WSCALE));
                return 1;
            }
            o.next = k + len;
            0
        }
    }
}

/// The window scale a SYN offers, if any. One load of a fixed 40 bytes that end where the
/// TCP header ends (starting inside the IP header when the options are shorter): the packet
/// always holds them, and a fixed size keeps the verifier's work small.
#[inline(never)]
fn wscale<A>(ctx: &impl Pkt, p: &Ip<A>, s: &Seg) -> Option<u8> {
    let len = u32::from(s.opt_len);
    if len == 0 || len > 40 {
        return None;
    }
    let buf = CSUM_BUF.get_ptr_mut(0)?;
    let end = (p.l4_off + 20) as u32 + len;
    // SAFETY: 40 bytes of a 512-byte map value.
    if !unsafe { ctx.load(end - 40, buf.cast(), 40) } {
        return None;
    }
    let mut o = Opts {
        next: 40 - len,
        len: 40,
        wscale: 0xff,
    };
    // SAFETY: the callback only touches `o`, which outlives the call.
    unsafe {
        bpf_loop(
            40,
            opt_step as *mut c_void,
            (&raw mut o).cast::<c_void>(),
            0,
        );
    }
    (o.wscale != 0xff).then_some(o.wscale as u8)
}

/// Start a direction's view from its SYN (a new or reopened connection).
#[inline(always)]
pub fn init_from_syn<A>(ctx: &impl Pkt, p: &Ip<A>, e: &mut CtMeta) {
    let Some(s) = seg(ctx, p) else {
        return;
    };
    e.tcp_end = s.end;
    // A SYN's window is never scaled.
    e.tcp_maxwin = s.win.max(1);
    e.tcp_track = TCP_SEEN;
    e.tcp_wscale = 0;
    e.tcp_limit = 0;
    if let Some(ws) = wscale(ctx, p, &s) {
        e.tcp_track |= TCP_WS_OFFERED;
        e.tcp_wscale = ws;
    }
}

/// Start the original direction's view of a new connection from its first segment: a SYN,
/// or any segment of a connection picked up mid-stream.
#[inline(always)]
pub fn init<A>(ctx: &impl Pkt, p: &Ip<A>, e: &mut CtMeta) {
    let Some(s) = seg(ctx, p) else {
        return;
    };
    if s.flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN {
        init_from_syn(ctx, p, e);
    } else {
        learn(e, &s);
        e.tcp_track |= TCP_LIBERAL;
    }
}

/// Whether `s`, sent by the direction of `snd` to that of `rcv`, is in the window.
#[inline(always)]
fn in_window(snd: &CtMeta, rcv: &CtMeta, s: &Seg) -> bool {
    let rst = s.flags & tcp_flags::RST != 0;
    let ack = s.flags & tcp_flags::ACK != 0;
    if (snd.tcp_track | rcv.tcp_track) & TCP_LIBERAL != 0 {
        return true;
    }
    if rcv.tcp_track & TCP_SEEN == 0 {
        // Nothing known about the receiver yet (picked up mid-stream, or a retransmitted SYN).
        return true;
    }
    if snd.tcp_track & TCP_SEEN == 0 {
        // The first answer to a SYN: a SYN-ACK or RST must acknowledge that SYN exactly.
        if snd.state == tcp_state::SYN_SENT && (rst || s.flags & tcp_flags::SYN != 0) {
            return ack && s.ack == rcv.tcp_end;
        }
        return true;
    }
    if rcv.tcp_track & TCP_ACKED != 0 && after(s.end, rcv.tcp_limit) {
        return false;
    }
    let oldest = snd.tcp_end.wrapping_sub(rcv.tcp_maxwin);
    if !after(s.end, oldest.wrapping_sub(1)) {
        return false;
    }
    if ack && !rst {
        let span = snd.tcp_maxwin.max(MAX_ACK_WINDOW);
        if after(s.ack, rcv.tcp_end) || before(s.ack, rcv.tcp_end.wrapping_sub(span)) {
            return false;
        }
    }
    true
}

/// Learn from an in-window segment of `e`'s direction.
#[inline(always)]
fn learn(e: &mut CtMeta, s: &Seg) {
    let win = if s.flags & tcp_flags::SYN != 0 {
        s.win
    } else {
        s.win << e.tcp_wscale
    };
    if e.tcp_track & TCP_SEEN == 0 {
        e.tcp_end = s.end;
        e.tcp_maxwin = win.max(1);
        e.tcp_track |= TCP_SEEN;
    } else {
        if after(s.end, e.tcp_end) {
            e.tcp_end = s.end;
        }
        if win > e.tcp_maxwin {
            e.tcp_maxwin = win;
        }
    }
    if s.flags & tcp_flags::ACK != 0 {
        // A zero window still lets one byte through (a window probe).
        let limit = s.ack.wrapping_add(win.max(1));
        if e.tcp_track & TCP_ACKED == 0 || after(limit, e.tcp_limit) {
            e.tcp_limit = limit;
            e.tcp_track |= TCP_ACKED;
        }
    }
}

/// The SYN-ACK settles window scaling: used only when both SYNs offered it.
#[inline(always)]
fn settle_wscale<A>(ctx: &impl Pkt, p: &Ip<A>, s: &Seg, e: &mut CtMeta, peer: &mut CtMeta) {
    match wscale(ctx, p, s) {
        Some(ws) if peer.tcp_track & TCP_WS_OFFERED != 0 => {
            e.tcp_wscale = ws;
            e.tcp_track |= TCP_WS_OFFERED;
        }
        _ => {
            e.tcp_wscale = 0;
            peer.tcp_wscale = 0;
        }
    }
}

/// Track a TCP segment of `e`'s direction: check it against the window, learn from it and
/// advance the connection's state in both entries. `Err` only for an RST outside the window;
/// `Ok(true)` when the segment was in the window and both sides have been seen.
#[inline(always)]
pub fn track<A: Fam>(ctx: &impl Pkt, e: *mut CtEntry<A>, p: &Ip<A>) -> Result<bool, Reason> {
    let Some(s) = seg(ctx, p) else {
        return Ok(false);
    };
    if steady_from_inside(e, &s) {
        // SAFETY: as below.
        learn(unsafe { &mut (*e).meta }, &s);
        return Ok(false);
    }
    if steady_from_outside(e, &s) {
        // SAFETY: as below.
        learn(unsafe { &mut (*e).meta }, &s);
        return Ok(false);
    }
    // SAFETY: `e` points into the map value; concurrent writers of one connection race to
    // similar values, as in nf_conntrack without its lock, and never past the window rules.
    let peer = lookup(&unsafe { (*e).peer_key() }).map(meta);
    let both_seen = track_seg(ctx, p, &s, meta(e), peer)?;
    if let Some(peer) = peer
        && arrives_from_outside(e)
    {
        copy_peer(meta(e), peer);
    }
    Ok(both_seen)
}

/// Keep the window fields of `peer` (the container's direction) in `e` (the direction from
/// outside) for `steady_from_outside`: only while the connection is established and both
/// directions' windows are judged (not picked up mid-stream), when those fields only grow.
#[inline(always)]
fn copy_peer(e: *mut CtMeta, peer: *const CtMeta) {
    // SAFETY: two live map values (a connection's two entries); the other one's fields are
    // read before this one is written.
    let (track, end, limit, maxwin) = unsafe {
        (
            (*peer).tcp_track,
            (*peer).tcp_end,
            (*peer).tcp_limit,
            (*peer).tcp_maxwin,
        )
    };
    // SAFETY: as above.
    let e = unsafe { &mut *e };
    let judged = TCP_SEEN | TCP_ACKED;
    if e.state != tcp_state::ESTABLISHED
        || track & (judged | TCP_LIBERAL) != judged
        || e.tcp_track & TCP_LIBERAL != 0
    {
        e.tcp_track &= !TCP_PEER_COPY;
        return;
    }
    e.peer_end = end;
    e.peer_limit = limit;
    e.peer_maxwin = maxwin;
    e.tcp_track |= TCP_PEER_COPY;
}

/// Whether segment `s` from outside is a plain segment of an assured, established connection
/// and in the window by the copy of the container's fields its entry keeps. The copy is
/// older than the container's entry, but those fields only grow while the connection is
/// established (a new SYN clears the copy), so each bound is at least as tight as
/// `in_window`'s: the end no later than the copy's limit, no earlier than the oldest byte the
/// copy's largest window allows, the acknowledgement no later than the copy's end. The lower
/// bound of the acknowledgement uses this direction's own limit instead of the container's
/// newest end: a container sends no further than that limit, so it is the tighter one. A
/// segment outside any of these goes the long way (`in_window` with the other entry).
#[inline(always)]
fn steady_from_outside<A>(e: *const CtEntry<A>, s: &Seg) -> bool {
    let ctl = tcp_flags::SYN | tcp_flags::FIN | tcp_flags::RST;
    // SAFETY: reads of a live map value.
    let m = unsafe { &(*e).meta };
    let need = TCP_SEEN | TCP_ACKED | TCP_PEER_COPY;
    if s.flags & ctl != 0
        || s.flags & tcp_flags::ACK == 0
        || m.assured != 1
        || m.state != tcp_state::ESTABLISHED
        || m.tcp_track & (need | TCP_LIBERAL) != need
    {
        return false;
    }
    let oldest = m.tcp_end.wrapping_sub(m.peer_maxwin);
    let span = m.tcp_maxwin.max(MAX_ACK_WINDOW);
    !after(s.end, m.peer_limit)
        && after(s.end, oldest.wrapping_sub(1))
        && !after(s.ack, m.peer_end)
        && !before(s.ack, m.tcp_limit.wrapping_sub(span))
        && arrives_from_outside(e)
}

/// Whether segment `s` of `e`'s direction can be learned from without the peer's entry (the
/// second hash lookup of every tracked TCP segment): a plain segment (no SYN, FIN or RST) of
/// an assured, established connection, from the container's side. Its sender is the container
/// (its veth and MAC vouched for it before its entry was used), and the window check would
/// only decide whether to learn from it: learning from the container's own out-of-window
/// segments can at most loosen the checks on the packets from outside of its own connection,
/// which it could end itself anyway. Such a segment changes no state. Segments from outside
/// are always checked.
#[inline(always)]
fn steady_from_inside<A>(e: *const CtEntry<A>, s: &Seg) -> bool {
    let ctl = tcp_flags::SYN | tcp_flags::FIN | tcp_flags::RST;
    // SAFETY: reads of a live map value.
    let m = unsafe { &(*e).meta };
    s.flags & ctl == 0
        && m.assured == 1
        && m.state == tcp_state::ESTABLISHED
        && m.tcp_track & TCP_SEEN != 0
        && !arrives_from_outside(e)
}

/// `track` for either family: `e` is the segment's direction, `peer` the other one when
/// its entry exists.
#[inline(always)]
fn track_seg<A>(
    ctx: &impl Pkt,
    p: &Ip<A>,
    s: &Seg,
    e: *mut CtMeta,
    peer: Option<*mut CtMeta>,
) -> Result<bool, Reason> {
    // SAFETY: as in `track`.
    let e = unsafe { &mut *e };
    let (next, fins) = tcp_transition(e.state, e.flags, e.dir, s.flags);
    let syn_only = s.flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN;
    let mut both_seen = false;
    if syn_only && e.dir == DIR_ORIGINAL && next == tcp_state::SYN_SENT {
        // A new connection on this tuple (or the SYN again): start over.
        init_from_syn(ctx, p, e);
        if let Some(peer) = peer {
            // SAFETY: as above.
            unsafe { (*peer).tcp_track = 0 };
        }
    } else if let Some(peer) = peer {
        // SAFETY: as above.
        let peer = unsafe { &mut *peer };
        if !in_window(e, peer, s) {
            if s.flags & tcp_flags::RST != 0 {
                return Err(Reason::DropTcpWindow);
            }
            return Ok(false);
        }
        if e.dir == DIR_REPLY
            && e.tcp_track & TCP_SEEN == 0
            && s.flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN | tcp_flags::ACK
        {
            settle_wscale(ctx, p, s, e, peer);
        }
        learn(e, s);
        both_seen = peer.tcp_track & TCP_SEEN != 0;
    } else {
        learn(e, s);
    }
    if next != e.state || fins != e.flags {
        e.state = next;
        e.flags = fins;
        if let Some(peer) = peer {
            // SAFETY: as above.
            unsafe {
                (*peer).state = next;
                (*peer).flags = fins;
            }
        }
    }
    Ok(both_seen)
}
