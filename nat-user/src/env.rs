//! What every caller of bpfnat's services needs: where the pins and the state live. The CLI,
//! the agent and the CNI plugin each build one; how results are shown is theirs.

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::{datapath::Pins, state::Store};

/// Default bpffs directory of an instance.
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/bpfnat";
/// Default state directory of an instance.
pub const DEFAULT_STATE_DIR: &str = "/run/bpfnat";

#[derive(Clone, Debug)]
pub struct Env {
    pub pins: Pins,
    pub bpffs_dir: PathBuf,
    pub state_dir: PathBuf,
}

impl Env {
    #[must_use]
    pub fn new(bpffs_dir: &Path, state_dir: &Path) -> Self {
        Self {
            pins: Pins::new(bpffs_dir),
            bpffs_dir: bpffs_dir.to_owned(),
            state_dir: state_dir.to_owned(),
        }
    }

    /// The state directory, locked for this command (released on drop).
    pub fn store(&self) -> Result<Store> {
        Store::open(&self.state_dir)
    }
}
