//! The host's network plumbing that bpfnat and its lab both drive: network namespaces
//! (`netns`), links, addresses and routes over rtnetlink (`netlink`), NIC offloads over the
//! ethtool ioctl (`ethtool`), and a standard output that ends quietly on a closed pipe
//! (`stdout`). Nothing here knows about the datapath.

pub mod ethtool;
pub mod netlink;
pub mod netns;
pub mod stdout;
