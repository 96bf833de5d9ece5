//! bpfnat's userspace, the library behind the `bpfnat` binary: the CLI, the agent and the
//! CNI plugin (thin callers) over the node and endpoint services, the datapath loader, the
//! state store. The end-to-end tests reach in only for pin paths (`datapath::Pins`) and what
//! they check against (`cni::SUPPORTED_VERSIONS`, `agent::load_config`); the lab they build
//! is `bpfnat-lab`, which drives the binary.

pub mod agent;
pub mod cli;
mod cluster;
pub mod cni;
pub mod datapath;
mod endpoints;
mod env;
mod explain;
mod net;
mod node;
mod spec;
mod state;

use nat_plumbing::{ethtool, netlink, netns};
