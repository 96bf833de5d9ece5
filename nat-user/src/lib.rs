//! bpfnat's userspace: the loader CLI's building blocks, shared with the demo and the
//! end-to-end tests (which build their labs with [`lab`]).

pub mod agent;
pub mod cli;
pub mod cni;
pub mod datapath;
pub mod endpoints;
pub mod env;
pub mod ethtool;
pub mod lab;
pub mod net;
pub mod netlink;
pub mod netns;
pub mod node;
pub mod spec;
pub mod state;
