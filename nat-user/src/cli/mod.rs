//! The `bpfnat` command line: argument types and dispatch. One file per command group.

mod cluster;
mod conntrack;
mod container;
mod explain;
mod map;
mod monitor;
mod nat;
mod port;
mod stats;
mod top;
mod up;
pub mod view;

use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use clap::{CommandFactory as _, Parser, Subcommand, ValueEnum};
use serde::Serialize;

pub use conntrack::ConntrackCmd;
pub use container::ContainerCmd;
pub use nat::NatCmd;
pub use port::{PortArgs, PortCmd};
pub use up::UpArgs;

use nat_plumbing::stdout;

use crate::env::{DEFAULT_BPFFS_DIR, DEFAULT_STATE_DIR, Env};

#[derive(Parser, Debug)]
#[command(
    name = "bpfnat",
    version,
    about = "eBPF NAT and forwarding for container hosts: MASQUERADE, published ports and bridge forwarding without iptables"
)]
pub struct Cli {
    /// Where programs, links and maps are pinned (a directory on bpffs).
    #[arg(long, global = true, default_value = DEFAULT_BPFFS_DIR)]
    pub bpffs_dir: PathBuf,
    /// Where the small state file and its lock live.
    #[arg(long, global = true, default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Format::Text)]
    pub output: Format,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Load and attach the datapath to the uplink and create the container gateway.
    Up(UpArgs),
    /// Remove every container, link, pin and map this instance owns.
    Down,
    /// Show whether the datapath is up and how it is configured.
    Status,
    /// Create, remove and list containers (network namespaces behind the node).
    #[command(subcommand)]
    Container(ContainerCmd),
    /// A container's published ports (`docker port`); publish and unpublish (`docker -p`).
    Port(PortArgs),
    /// Static 1:1 NAT: an external address that belongs to one container, both ways.
    #[command(subcommand)]
    Nat(NatCmd),
    /// Inspect and manage tracked connections.
    #[command(subcommand)]
    Conntrack(ConntrackCmd),
    /// Per-reason packet counters of the datapath.
    Stats,
    /// Any pinned map, decoded: `map list`, `map dump NAME`.
    #[command(subcommand)]
    Map(map::MapCmd),
    /// Who holds the conntrack table and the MASQUERADE ports: connections, entries and
    /// SNAT ports per container, largest first.
    Top,
    /// Live datapath events: dropped packets with their reason, and (`--type trace`) new
    /// connections and translations, one line each, until Ctrl-C.
    Monitor(monitor::MonitorArgs),
    /// What the datapath would do with one packet, decided by its programs on a crafted
    /// frame without committing anything: each map consulted with its key and what it
    /// found, the translation, the verdict and where the packet would go.
    Explain(explain::ExplainArgs),
    /// This node in its cluster: its block, the datastore's health, the other nodes and
    /// the routes to their pods.
    #[command(subcommand)]
    Cluster(cluster::ClusterCmd),
    /// Run the node agent: keep the datapath up, follow the uplink address, garbage-collect
    /// conntrack, serve Prometheus metrics and /healthz.
    Agent {
        /// Agent configuration (JSON): uplink, subnet, metricsAddr, gcIntervalSecs, ...
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Build a self-contained lab, show NAT and port publishing working, tear it down.
    Demo,
    /// Print a shell completion script, e.g. `bpfnat completion bash > /etc/bash_completion.d/bpfnat`.
    Completion {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Write the manual pages (bpfnat.1 and one per command) into a directory; `cargo xtask
    /// man` runs it.
    #[command(hide = true)]
    Man {
        /// Where the pages go, e.g. `target/man`.
        dir: PathBuf,
    },
}

/// Everything a command needs besides its own arguments.
/// A command's context: the services' environment and how to show results.
#[derive(Clone, Debug)]
pub struct Ctx {
    pub env: Env,
    pub format: Format,
}

impl std::ops::Deref for Ctx {
    type Target = Env;

    fn deref(&self) -> &Env {
        &self.env
    }
}

impl Ctx {
    /// Print `value` (a `kind` of the JSON schema, see `view`) as JSON or as `text()`.
    pub fn emit<T: Serialize>(
        &self,
        kind: &str,
        value: &T,
        text: impl FnOnce() -> String,
    ) -> Result<()> {
        match self.format {
            Format::Json => stdout::line(&serde_json::to_string_pretty(&view::Envelope {
                api_version: view::API_VERSION,
                kind,
                body: value,
            })?)?,
            Format::Text => {
                let t = text();
                if !t.is_empty() {
                    stdout::line(t.trim_end())?;
                }
            }
        }
        Ok(())
    }

    /// `emit` for a list: `{"apiVersion", "kind", "items": [...]}`.
    pub fn emit_list<T: Serialize>(
        &self,
        kind: &str,
        items: &[T],
        text: impl FnOnce() -> String,
    ) -> Result<()> {
        self.emit(kind, &view::Items { items }, text)
    }
}

pub fn run(cli: Cli) -> Result<()> {
    let ctx = Ctx {
        env: Env::new(&cli.bpffs_dir, &cli.state_dir),
        format: cli.output,
    };
    if let Command::Demo = cli.command {
        if cli.output == Format::Json {
            bail!("the demo prints a walkthrough for people; it has no JSON output (-o json)");
        }
        // The demo drives this binary as child processes; it needs no runtime of its own.
        let exe = std::env::current_exe().context("find the bpfnat binary")?;
        return bpfnat_lab::demo::run(&exe);
    }
    match &cli.command {
        Command::Completion { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "bpfnat", &mut out);
            stdout::line(String::from_utf8_lossy(&out).trim_end())?;
            return Ok(());
        }
        Command::Man { dir } => return man_pages(dir),
        _ => {}
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.command {
            Command::Up(a) => up::up(&ctx, a).await,
            Command::Down => up::down(&ctx).await,
            Command::Status => up::status(&ctx).await,
            Command::Container(c) => container::run(&ctx, c).await,
            Command::Port(c) => port::run(&ctx, c).await,
            Command::Nat(c) => nat::run(&ctx, c),
            Command::Conntrack(c) => conntrack::run(&ctx, c),
            Command::Stats => stats::run(&ctx),
            Command::Monitor(a) => monitor::run(&ctx, a).await,
            Command::Explain(a) => explain::run(&ctx, a).await,
            Command::Top => top::run(&ctx),
            Command::Map(c) => map::run(&ctx, c),
            Command::Cluster(c) => cluster::run(&ctx, c).await,
            Command::Agent { config } => {
                let cfg = crate::agent::load_config(config.as_deref())?;
                crate::agent::run(&ctx, cfg).await
            }
            Command::Demo | Command::Completion { .. } | Command::Man { .. } => Ok(()),
        }
    })
}

/// Ends the command with this exit status and no message: what it has to say is already
/// on standard output (`status` of a node that is down or degraded).
#[derive(Debug)]
pub struct Exit(pub i32);

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit status {}", self.0)
    }
}

impl std::error::Error for Exit {}

/// `bpfnat.1` and a page per command (`bpfnat-container.1`, `bpfnat-container-add.1`, …).
fn man_pages(dir: &std::path::Path) -> Result<()> {
    fn write(dir: &std::path::Path, name: &str, cmd: clap::Command) -> Result<()> {
        let path = dir.join(format!("{name}.1"));
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd.clone().name(name.to_owned()))
            .render(&mut page)
            .with_context(|| format!("render {}", path.display()))?;
        std::fs::write(&path, page).with_context(|| format!("write {}", path.display()))?;
        for sub in cmd
            .get_subcommands()
            .filter(|s| !s.is_hide_set() && s.get_name() != "help")
        {
            write(dir, &format!("{name}-{}", sub.get_name()), sub.clone())?;
        }
        Ok(())
    }
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let mut cmd = Cli::command();
    cmd.build();
    write(dir, "bpfnat", cmd)
}

/// A plain text table: a header row and rows, columns padded to their widest cell.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(x) = w.get_mut(i) {
                *x = (*x).max(c.len());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w.get(i).copied().unwrap_or(0)))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push('\n');
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}
