//! The host's network plumbing that bpfnat and its lab both drive: network namespaces
//! (`netns`), links, addresses and routes over rtnetlink (`netlink`), and NIC offloads over
//! the ethtool ioctl (`ethtool`). Nothing here knows about the datapath.

pub mod ethtool;
pub mod netlink;
pub mod netns;
