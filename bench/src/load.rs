//! Traffic: iperf3 for throughput and small-packet UDP, and our own request/response tools for
//! transactions and new connections per second. Endpoints run pinned, in one of two
//! placements (`Placement`): both on one CPU, so a rate reads as the CPU cost of one operation
//! through the datapath with the receiver's work included; or the receiver on the other CPU,
//! so it reads as the cost of sending and forwarding alone.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use nat_plumbing::netns;

use crate::topo::{Endpoints, IPERF_PORT, RR_PORT};

/// The CPU the endpoints share (CPU 0 keeps the harness).
pub const BENCH_CPU: usize = 1;
/// The receiver's CPU when it is not the sender's.
pub const OTHER_CPU: usize = 0;

/// Where the two ends of a measurement run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Client and server on `BENCH_CPU`.
    Shared,
    /// Client (the sender, and the forwarding its packets cause) on `BENCH_CPU`, server (the
    /// receiver) on `OTHER_CPU`.
    Split,
}

impl Placement {
    pub const ALL: [Self; 2] = [Self::Shared, Self::Split];

    pub const fn label(self) -> &'static str {
        match self {
            Self::Shared => "receiver on the sender's CPU",
            Self::Split => "receiver on the other CPU",
        }
    }

    const fn server_cpu(self) -> usize {
        match self {
            Self::Shared => BENCH_CPU,
            Self::Split => OTHER_CPU,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    /// TCP single-stream throughput, Gbit/s.
    TcpGbps,
    /// 64-byte UDP datagrams received per second (sendmmsg/recvmmsg in batches, so the
    /// sender's system calls do not hide the datapath's cost).
    UdpPps,
    /// New TCP connections per second (connect, 1-byte request, response, close).
    Crr,
    /// 1-byte request/response transactions per second on one connection.
    Rr,
}

impl Metric {
    pub const ALL: [Self; 4] = [Self::TcpGbps, Self::UdpPps, Self::Crr, Self::Rr];

    /// How often a run of `reps` repetitions measures this metric. A single TCP stream
    /// varies most from one measurement to the next (on a 2-CPU VM one datapath's best
    /// repetition reached 1.5× its worst, so a median of three could not tell 10 % apart):
    /// it gets two more. A run of one (`--quick`) stays at one.
    pub const fn reps(self, reps: usize) -> usize {
        match self {
            Self::TcpGbps if reps > 1 => reps + 2,
            _ => reps,
        }
    }

    /// The most repetitions any metric gets in a run of `reps`.
    pub const fn max_reps(reps: usize) -> usize {
        Self::TcpGbps.reps(reps)
    }

    pub const fn label(self) -> &'static str {
        match self {
            Self::TcpGbps => "TCP Gbit/s",
            Self::UdpPps => "UDP 64B pkt/s received",
            Self::Crr => "TCP conn/s",
            Self::Rr => "TCP trans/s",
        }
    }
}

fn pinned(cpu: usize, ns: &Path, program: &Path, args: &[&str]) -> Result<Command> {
    let mut c = Command::new("taskset");
    c.arg("-c").arg(cpu.to_string()).arg(program).args(args);
    netns::command_in(&mut c, ns)?;
    Ok(c)
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(mut c: Command) -> Result<Server> {
    let child = c
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start server")?;
    // Let it bind before the client connects.
    std::thread::sleep(Duration::from_millis(150));
    Ok(Server(child))
}

fn output(mut c: Command) -> Result<String> {
    let out = c.output().context("run client")?;
    if !out.status.success() {
        bail!(
            "client failed: {}{}",
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout)
                .chars()
                .take(400)
                .collect::<String>()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The unspecified address of `a`'s family: servers listen on it, senders bind to it.
fn any(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    }
}

/// The order in which a round measures `n` setups: starting at `first` (mod `n`), then on.
/// Rounds start at different setups: in a fixed order each setup always follows the same
/// other (bpfnat was always last), and whatever a round's drift or a predecessor leaves
/// behind would land on the same setup every time.
pub fn round(n: usize, first: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |i| (first + i) % n.max(1))
}

/// Measure `metric` for `secs` seconds between the endpoints, both on one CPU; `me` is this
/// binary (the RR/CRR tools are its hidden subcommands).
pub fn measure(me: &Path, e: &Endpoints, metric: Metric, secs: u32) -> Result<f64> {
    measure_placed(me, e, metric, secs, Placement::Shared)
}

/// `measure` with the endpoints placed as `at` says.
pub fn measure_placed(
    me: &Path,
    e: &Endpoints,
    metric: Metric,
    secs: u32,
    at: Placement,
) -> Result<f64> {
    let (client, server) = (BENCH_CPU, at.server_cpu());
    let iperf = Path::new("iperf3");
    let t = secs.to_string();
    let target = e.target.to_string();
    match metric {
        Metric::TcpGbps => {
            let port = IPERF_PORT.to_string();
            let _srv = start(pinned(
                server,
                &e.server,
                iperf,
                &["-s", "-1", "-p", &port],
            )?)?;
            let args = ["-c", &target, "-p", &port, "-t", &t, "-J"];
            let json: serde_json::Value =
                serde_json::from_str(&output(pinned(client, &e.client, iperf, &args)?)?)
                    .context("parse iperf3 JSON")?;
            json["end"]["sum_received"]["bits_per_second"]
                .as_f64()
                .map(|b| b / 1e9)
                .ok_or_else(|| anyhow!("no throughput in iperf3 output"))
        }
        Metric::UdpPps => {
            let listen = SocketAddr::from((any(e.target), IPERF_PORT)).to_string();
            // The sink counts for the flood's duration plus a margin, then prints its count.
            let window = (secs + 1).to_string();
            let sink = pinned(
                server,
                &e.server,
                me,
                &["udp-sink", "--listen", &listen, "--secs", &window],
            )?
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("start udp-sink")?;
            std::thread::sleep(Duration::from_millis(150));
            let addr = SocketAddr::from((e.target, IPERF_PORT)).to_string();
            let sent = output(pinned(
                client,
                &e.client,
                me,
                &["udp-flood", "--addr", &addr, "--secs", &t],
            )?)?;
            let got = sink.wait_with_output().context("wait for udp-sink")?;
            let received: f64 = String::from_utf8_lossy(&got.stdout)
                .trim()
                .parse()
                .context("parse udp-sink output")?;
            let _ = sent;
            Ok(received / f64::from(secs))
        }
        Metric::Crr | Metric::Rr => {
            let listen = SocketAddr::from((any(e.target), RR_PORT)).to_string();
            let _srv = start(pinned(
                server,
                &e.server,
                me,
                &["rr-server", "--listen", &listen],
            )?)?;
            let addr = SocketAddr::from((e.target, RR_PORT)).to_string();
            let mode = if metric == Metric::Crr { "crr" } else { "rr" };
            let out = output(pinned(
                client,
                &e.client,
                me,
                &["rr-client", "--addr", &addr, "--secs", &t, "--mode", mode],
            )?)?;
            out.trim().parse::<f64>().context("parse rr-client output")
        }
    }
}

/// Request byte asking the server to close after answering (CRR): the server side then holds
/// TIME_WAIT, so the client never runs out of ports.
const CLOSE_AFTER: u8 = 2;

/// `rr-server`: answer each 1-byte request with 1 byte, one connection at a time.
pub fn rr_server(listen: SocketAddr) -> Result<()> {
    let l = TcpListener::bind(listen).with_context(|| format!("bind {listen}"))?;
    let mut b = [0u8; 1];
    loop {
        let (mut s, _) = l.accept()?;
        let _ = s.set_nodelay(true);
        while matches!(s.read(&mut b), Ok(1)) {
            if s.write_all(&b).is_err() || b[0] == CLOSE_AFTER {
                break;
            }
        }
    }
}

/// `rr-client`: transactions (or whole connections) per second for `secs` seconds.
pub fn rr_client(addr: SocketAddr, secs: u64, new_connections: bool) -> Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut n: u64 = 0;
    let request = if new_connections { CLOSE_AFTER } else { 1 };
    let mut b = [request; 1];
    let connect = || -> Result<TcpStream> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .with_context(|| format!("connect {addr}"))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        Ok(s)
    };
    let mut conn = if new_connections {
        None
    } else {
        Some(connect()?)
    };
    while Instant::now() < deadline {
        let mut s = match conn.take() {
            Some(s) => s,
            None => connect()?,
        };
        s.write_all(&[request])?;
        s.read_exact(&mut b)?;
        n += 1;
        if !new_connections {
            conn = Some(s);
        }
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

const BATCH: usize = 64;
const DGRAM: usize = 64;

/// One message header per iovec, for sendmmsg/recvmmsg; `iov` must outlive their use.
fn headers(iov: &mut [libc::iovec]) -> Vec<libc::mmsghdr> {
    iov.iter_mut()
        .map(|v| {
            // SAFETY: an all-zero mmsghdr is valid; it then points at one live iovec.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = v;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect()
}

/// `udp-flood`: send 64-byte datagrams to `addr` for `secs` seconds, 64 per sendmmsg; prints
/// how many were sent.
pub fn udp_flood(addr: SocketAddr, secs: u64) -> Result<u64> {
    let sock = std::net::UdpSocket::bind((any(addr.ip()), 0))?;
    sock.connect(addr)?;
    let payload = [0x5au8; DGRAM];
    let mut iov: Vec<libc::iovec> = (0..BATCH)
        .map(|_| libc::iovec {
            iov_base: payload.as_ptr() as *mut libc::c_void,
            iov_len: DGRAM,
        })
        .collect();
    let mut msgs = headers(&mut iov);
    let fd = std::os::fd::AsRawFd::as_raw_fd(&sock);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut sent = 0u64;
    while Instant::now() < deadline {
        // SAFETY: `msgs` holds BATCH valid headers.
        let n = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), BATCH as u32, 0) };
        if n > 0 {
            sent += n as u64;
        }
    }
    Ok(sent)
}

/// `udp-sink`: count datagrams arriving on `listen` for `secs` seconds (recvmmsg batches).
pub fn udp_sink(listen: SocketAddr, secs: u64) -> Result<u64> {
    let sock = std::net::UdpSocket::bind(listen).with_context(|| format!("bind {listen}"))?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    // Sender and sink share one CPU: a default-sized receive buffer would overflow while the
    // sender runs its time slice, and measure the scheduler instead of the datapath.
    let size: libc::c_int = 256 << 20;
    // SAFETY: setsockopt with a valid int.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const size).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    let mut bufs = vec![[0u8; 256]; BATCH];
    let mut iov: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    let mut msgs = headers(&mut iov);
    let fd = std::os::fd::AsRawFd::as_raw_fd(&sock);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut got = 0u64;
    while Instant::now() < deadline {
        // SAFETY: `msgs` holds BATCH valid headers pointing at live buffers.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                msgs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n > 0 {
            got += n as u64;
        }
    }
    Ok(got)
}

/// Wait (at most `max`) for the 1-minute load average to drop below `below`.
pub fn wait_idle(below: f64, max: Duration) {
    let until = Instant::now() + max;
    while Instant::now() < until {
        let load = std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(0.0);
        if load < below {
            return;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::{Metric, round};

    #[test]
    fn a_round_visits_every_setup_once_from_its_start() {
        assert_eq!(round(5, 7).collect::<Vec<_>>(), [2, 3, 4, 0, 1]);
        assert_eq!(round(2, 0).collect::<Vec<_>>(), [0, 1]);
        assert_eq!(round(0, 3).count(), 0);
    }

    #[test]
    fn only_tcp_throughput_gets_more_repetitions_and_quick_stays_at_one() {
        assert_eq!(Metric::TcpGbps.reps(3), 5);
        assert_eq!(Metric::max_reps(3), 5);
        for m in [Metric::UdpPps, Metric::Crr, Metric::Rr] {
            assert_eq!(m.reps(3), 3);
        }
        for m in Metric::ALL {
            assert_eq!(m.reps(1), 1);
        }
    }
}
