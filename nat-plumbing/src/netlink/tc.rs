//! The clsact qdisc and a direct-action cls_bpf filter on its ingress hook, over the same
//! rtnetlink socket as the rest (what `tc qdisc add dev X clsact` and `tc filter replace dev
//! X ingress pref P handle H bpf da fd F` send). The program comes as a file descriptor:
//! opening a pinned program through aya's `SchedClassifier::from_pin` runs aya's kernel
//! feature probes (17 BTF, program and map loads, about 0.3 ms) in every process that does
//! it, and a `container add` needs none of them.

use std::os::fd::{AsRawFd as _, BorrowedFd};

use anyhow::{Context as _, Result, anyhow};
use futures::StreamExt as _;
use rtnetlink::{
    packet_core::{
        NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkMessage,
        NetlinkPayload,
    },
    packet_route::{
        RouteNetlinkMessage,
        tc::{
            TcAttribute, TcBpfFlags, TcFilterBpf, TcFilterBpfOption, TcHandle, TcMessage, TcOption,
        },
    },
};

use super::{Netlink, is_errno};

/// `ETH_P_ALL`, in network byte order as `tcm_info`'s protocol half wants it.
const ALL_PROTOCOLS: u16 = (libc::ETH_P_ALL as u16).to_be();

/// A cls_bpf filter on a clsact ingress hook.
pub struct BpfFilter<'a> {
    pub prog: BorrowedFd<'a>,
    /// The program's name, as `tc filter show` prints it.
    pub name: &'a str,
    /// `tc filter … pref`.
    pub priority: u16,
    /// `tc filter … handle`.
    pub handle: u32,
}

impl Netlink {
    /// Send `msg` and wait for the kernel's acknowledgement.
    async fn acked(&self, msg: RouteNetlinkMessage, flags: u16) -> Result<(), rtnetlink::Error> {
        let mut req = NetlinkMessage::from(msg);
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        let mut replies = self.handle.clone().request(req)?;
        while let Some(m) = replies.next().await {
            if let NetlinkPayload::Error(e) = m.payload {
                return Err(rtnetlink::Error::NetlinkError(e));
            }
        }
        Ok(())
    }

    /// Give link `index` a clsact qdisc, unless it has one.
    pub async fn add_clsact(&self, index: u32) -> Result<()> {
        let mut m = TcMessage::with_index(link_index(index)?);
        m.header.handle = TcHandle::from(0xFFFF_0000);
        m.header.parent = TcHandle::CLSACT;
        m.attributes.push(TcAttribute::Kind("clsact".to_owned()));
        match self
            .acked(
                RouteNetlinkMessage::NewQueueDiscipline(m),
                NLM_F_CREATE | NLM_F_EXCL,
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if is_errno(&e, libc::EEXIST) => Ok(()),
            Err(e) => Err(anyhow!(e).context(format!("add a clsact qdisc to link {index}"))),
        }
    }

    /// Put `f` on link `index`'s clsact ingress hook: a new filter, or the program of the
    /// one with the same priority and handle replaced atomically.
    pub async fn put_ingress_filter(&self, index: u32, f: &BpfFilter<'_>) -> Result<()> {
        let mut m = TcMessage::with_index(link_index(index)?);
        m.header.parent = TcHandle {
            major: TcHandle::CLSACT.major,
            minor: TcHandle::MIN_INGRESS,
        };
        m.header.handle = TcHandle::from(f.handle);
        m.header.info = (u32::from(f.priority) << 16) | u32::from(ALL_PROTOCOLS);
        let fd = u32::try_from(f.prog.as_raw_fd()).context("a program fd")?;
        m.attributes
            .push(TcAttribute::Kind(TcFilterBpf::KIND.to_owned()));
        m.attributes.push(TcAttribute::Options(vec![
            TcOption::Bpf(TcFilterBpfOption::ProgFd(fd)),
            TcOption::Bpf(TcFilterBpfOption::ProgName(f.name.to_owned())),
            TcOption::Bpf(TcFilterBpfOption::Flags(TcBpfFlags::DirectAction)),
        ]));
        self.acked(
            RouteNetlinkMessage::NewTrafficFilter(m),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .await
        .with_context(|| format!("attach bpf filter {} to link {index}", f.name))
    }
}

fn link_index(index: u32) -> Result<i32> {
    i32::try_from(index).with_context(|| format!("link index {index}"))
}
