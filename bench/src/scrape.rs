//! The agent's `/metrics` against a full conntrack table: a scrape reads the summary the
//! garbage collector left, so its cost must not grow with the table. Fills `entries`
//! entries (live UDP connections between outside hosts), runs the agent, and times scrapes
//! while and after the collector walks the table.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use bpfnat_lab::Lab;

const PORT: u16 = 9979;

/// What a scrape costs with a full table.
pub struct Scrape {
    pub entries: u32,
    /// Median scrape while the collector's first walk of the table is under way.
    pub during_gc_ms: f64,
    /// Median scrape once it is done.
    pub after_gc_ms: f64,
    /// How long that walk took (`bpfnat_conntrack_gc_duration_seconds`).
    pub gc_s: f64,
}

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// GET /metrics in the node's namespace: (milliseconds, body).
fn scrape(lab: &Lab) -> Result<(f64, String)> {
    nat_plumbing::netns::run_in(&lab.node, || {
        let t = Instant::now();
        let mut s = TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], PORT)),
            Duration::from_secs(1),
        )?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok((t.elapsed().as_secs_f64() * 1e3, body))
    })
}

fn value(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

pub fn measure(bin: &Path, entries: u32) -> Result<Scrape> {
    let lab = Lab::new("bnb-scrape", bin)?;
    let max = (entries * 2).to_string();
    lab.ok(&[
        "up",
        "--uplink",
        bpfnat_lab::UPLINK,
        "--conntrack-max",
        &max,
    ])?;
    bpfnat_tests::fill_conntrack(&lab.bpffs_dir, entries / 2)?;
    std::fs::create_dir_all(&lab.state_dir)?;
    let cfg = lab.state_dir.join("agent.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"uplink": "{}", "metricsAddr": "127.0.0.1:{PORT}", "gcIntervalSecs": 3600}}"#,
            bpfnat_lab::UPLINK
        ),
    )?;
    let mut c = lab.bpfnat(&["agent", "--config", cfg.to_str().unwrap_or_default()])?;
    c.stdout(Stdio::null()).stderr(Stdio::null());
    let _agent = Agent(c.spawn().context("start the agent")?);
    // Scrapes while the first collection walks the table, then after it.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut during = Vec::new();
    let (after, gc_s) = loop {
        if Instant::now() > deadline {
            bail!("the agent's first garbage collection did not finish in 120 s");
        }
        let Ok((ms, body)) = scrape(&lab) else {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        match value(&body, "bpfnat_conntrack_entries ") {
            Some(n) if n >= f64::from(entries) => {
                let mut after = Vec::new();
                for _ in 0..5 {
                    after.push(scrape(&lab)?.0);
                }
                let gc = value(&body, "bpfnat_conntrack_gc_duration_seconds_sum").unwrap_or(0.0);
                break (after, gc);
            }
            _ => during.push(ms),
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok(Scrape {
        entries,
        during_gc_ms: if during.is_empty() {
            f64::NAN
        } else {
            median(during)
        },
        after_gc_ms: median(after),
        gc_s,
    })
}
