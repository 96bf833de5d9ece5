//! Where the record is kept: `<state-dir>/state.json`, a snapshot of the whole `State`, and
//! `<state-dir>/state.journal`, one JSON line per save since the snapshot that holds only the
//! containers it changed. Every command holds an exclusive lock on `<state-dir>/lock` while it
//! reads and writes them.
//!
//! A `container add` changes one container, twice (its intent, then the finished record).
//! Rewriting the snapshot for that cost time in proportion to the node's containers (the
//! whole record serialised and written durably, twice per add); appending a line does not.
//! Both files are written durably: the snapshot through `write_durably`, each journal line
//! with one `write` followed by `fdatasync` (but for an intent, `save_intent`). A line that a killed command left half written
//! has no newline yet: loading drops it, as the command never finished that save. Every
//! `COMPACT_AFTER` lines, or when the node or static NAT changes, the snapshot is rewritten and
//! the journal emptied; lines are numbered so that a journal the compaction did not get to
//! empty (killed between the two) is not applied twice.

use std::{
    cell::RefCell,
    fs::{File, OpenOptions},
    io::{self, Write as _},
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context as _, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use super::{Container, Node, State, StaticMapping};

/// Journal lines after which a save rewrites the snapshot instead: replaying them costs a
/// small fraction of parsing the snapshot, and a compaction is one snapshot write.
const COMPACT_AFTER: u32 = 64;

/// The locked state directory. The lock is released on drop.
pub struct Store {
    dir: PathBuf,
    _lock: File,
    /// What the files hold, as of this store's last `load` or `save`: `save` journals the
    /// difference to it.
    base: RefCell<Option<Base>>,
}

struct Base {
    node: Option<Node>,
    static_nat: Vec<StaticMapping>,
    generation: u32,
    /// In name order, as `State::containers` iterates. Shared with the caller's state: an
    /// unchanged container is the same allocation.
    containers: Vec<Arc<Container>>,
    /// The snapshot file exists (a journal without its snapshot is not applied).
    snapshot: bool,
    /// The highest line number in the snapshot or the journal.
    seq: u64,
    /// Lines in the journal, applied or not.
    lines: u32,
}

/// One journal line: what a save changed.
#[derive(Serialize, Deserialize)]
struct Entry<C> {
    seq: u64,
    generation: u32,
    #[serde(default = "Vec::new", skip_serializing_if = "Vec::is_empty")]
    put: Vec<C>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    del: Vec<String>,
}

impl Store {
    /// Create the directory if needed and take the lock (waits for other bpfnat commands).
    pub fn open(dir: &Path) -> Result<Self> {
        let (lock, lock_path) = lock_file(dir, "lock")?;
        lock.lock()
            .with_context(|| format!("lock {}", lock_path.display()))?;
        Ok(Self {
            dir: dir.to_owned(),
            _lock: lock,
            base: RefCell::new(None),
        })
    }

    fn snapshot_path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    fn journal_path(&self) -> PathBuf {
        self.dir.join("state.journal")
    }

    pub fn load(&self) -> Result<State> {
        let path = self.snapshot_path();
        let (mut state, snapshot) = match std::fs::read(&path) {
            Ok(b) => (
                // Checked for UTF-8 once, as a whole: from bytes, serde_json checks every
                // string on its own, a fifth of the parse.
                std::str::from_utf8(&b)
                    .map_err(anyhow::Error::from)
                    .and_then(|s| Ok(serde_json::from_str::<State>(s)?))
                    .with_context(|| {
                        format!("parse {} (remove it to start over)", path.display())
                    })?,
                true,
            ),
            Err(e) if e.kind() == io::ErrorKind::NotFound => (State::default(), false),
            Err(e) => return Err(anyhow!(e).context(format!("read {}", path.display()))),
        };
        let (seq, lines) = self.replay(&mut state, snapshot)?;
        *self.base.borrow_mut() = Some(Base {
            node: state.node.clone(),
            static_nat: state.static_nat.clone(),
            generation: state.generation,
            containers: state.containers.values().cloned().collect(),
            snapshot,
            seq,
            lines,
        });
        Ok(state)
    }

    /// Apply the journal's lines after the snapshot to `state` (none without a snapshot: the
    /// journal belonged to one that was removed). Returns the highest line number seen and
    /// the number of lines. A last line without its newline is cut off.
    fn replay(&self, state: &mut State, snapshot: bool) -> Result<(u64, u32)> {
        let path = self.journal_path();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok((state.journal_seq, 0));
            }
            Err(e) => return Err(anyhow!(e).context(format!("read {}", path.display()))),
        };
        let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        if complete < bytes.len() {
            // A save that was killed while writing: it never happened.
            let f = OpenOptions::new()
                .write(true)
                .open(&path)
                .with_context(|| format!("open {}", path.display()))?;
            f.set_len(complete as u64)
                .and_then(|()| f.sync_data())
                .with_context(|| format!("cut the unfinished line off {}", path.display()))?;
        }
        let mut seq = state.journal_seq;
        let mut lines = 0;
        for (i, line) in bytes[..complete].split(|&b| b == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            lines += 1;
            let e: Entry<Container> = serde_json::from_slice(line).with_context(|| {
                format!(
                    "parse line {} of {} (remove it and state.json to start over)",
                    i + 1,
                    path.display()
                )
            })?;
            if !snapshot || e.seq <= state.journal_seq {
                // Already in the snapshot (a compaction killed before it emptied the
                // journal), or of a snapshot that is gone.
                seq = seq.max(e.seq);
                continue;
            }
            if e.seq != seq + 1 {
                bail!(
                    "{} skips from entry {seq} to {} (remove it and state.json to start over)",
                    path.display(),
                    e.seq
                );
            }
            seq = e.seq;
            state.generation = e.generation;
            for name in &e.del {
                state.containers.remove(name);
            }
            for c in e.put {
                state.containers.insert(c.name.clone(), Arc::new(c));
            }
        }
        Ok((seq, lines))
    }

    /// Record `state`: a journal line with the containers that changed since this store's
    /// last load or save, or a new snapshot when more than containers changed (or the journal
    /// is due for compaction). Durable once it returns.
    pub fn save(&self, state: &State) -> Result<()> {
        self.write(state, true)
    }

    /// Record an intent: `state` with a `pending` container, before the kernel objects it
    /// describes exist. Like `save`, but a journal line is not waited onto the disk: what it
    /// guards against is a killed command, whose line the page cache keeps, while the objects
    /// (namespaces on tmpfs, links, filters) do not outlive a power loss either. The
    /// command's next `save` syncs it with its own line (one `fdatasync`, about 0.4 ms of a
    /// `container add` on this VM's ext4 `/run`, is saved).
    pub fn save_intent(&self, state: &State) -> Result<()> {
        self.write(state, false)
    }

    fn write(&self, state: &State, sync: bool) -> Result<()> {
        if self.base.borrow().is_none() {
            // Learn the line numbers (and what the files hold) first.
            self.load()?;
        }
        let mut base = self.base.borrow_mut();
        let b = base
            .as_mut()
            .ok_or_else(|| anyhow!("the state store lost its baseline"))?;
        match b.delta(state) {
            Some((put, del)) if b.lines < COMPACT_AFTER => {
                if put.is_empty() && del.is_empty() && state.generation == b.generation {
                    return Ok(());
                }
                let mut line = serde_json::to_vec(&Entry {
                    seq: b.seq + 1,
                    generation: state.generation,
                    put,
                    del,
                })
                .context("serialize state")?;
                line.push(b'\n');
                self.append(&line, sync)?;
                b.seq += 1;
                b.lines += 1;
            }
            _ => {
                // The snapshot covers every line written so far.
                let data = serde_json::to_vec(&State {
                    journal_seq: b.seq,
                    ..state.clone()
                })
                .context("serialize state")?;
                write_durably(&self.snapshot_path(), &data, 0o644)?;
                self.empty_journal()?;
                b.snapshot = true;
                b.lines = 0;
                b.node.clone_from(&state.node);
                b.static_nat.clone_from(&state.static_nat);
            }
        }
        b.generation = state.generation;
        b.containers = state.containers.values().cloned().collect();
        Ok(())
    }

    /// Append one line to the journal, durably if `sync` (creating it, and syncing the
    /// directory, if it is not there yet).
    fn append(&self, line: &[u8], sync: bool) -> Result<()> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let path = self.journal_path();
        let open = |create| {
            OpenOptions::new()
                .append(true)
                .create(create)
                .mode(0o644)
                .open(&path)
        };
        let (f, created) = match open(false) {
            Ok(f) => (Ok(f), false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => (open(true), true),
            Err(e) => (Err(e), false),
        };
        let mut f = f.with_context(|| format!("open {}", path.display()))?;
        // One write: a kill leaves the line whole or without its newline.
        f.write_all(line)
            .and_then(|()| if sync { f.sync_data() } else { Ok(()) })
            .with_context(|| format!("append to {}", path.display()))?;
        if created {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Empty the journal after a snapshot that includes it (a missing journal stays missing).
    fn empty_journal(&self) -> Result<()> {
        let path = self.journal_path();
        match OpenOptions::new().write(true).open(&path) {
            Ok(f) => f
                .set_len(0)
                .and_then(|()| f.sync_data())
                .with_context(|| format!("empty {}", path.display())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(anyhow!(e).context(format!("open {}", path.display()))),
        }
    }

    /// Remove the record (after `down`). The directory and lock file stay.
    pub fn clear(&self) -> Result<()> {
        // The snapshot first: a journal left without it is not applied.
        for path in [self.snapshot_path(), self.journal_path()] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(anyhow!(e).context(format!("remove {}", path.display()))),
            }
        }
        *self.base.borrow_mut() = None;
        Ok(())
    }
}

impl Base {
    /// The containers `state` puts and deletes relative to this base, or `None` when it
    /// changes more than containers (or there is no snapshot to journal against).
    fn delta<'a>(&self, state: &'a State) -> Option<(Vec<&'a Container>, Vec<String>)> {
        if !self.snapshot || state.node != self.node || state.static_nat != self.static_nat {
            return None;
        }
        // Both in name order: one merge.
        let (mut put, mut del) = (Vec::new(), Vec::new());
        let mut old = self.containers.iter().peekable();
        for (name, c) in &state.containers {
            while let Some(o) = old.next_if(|o| o.name < *name) {
                del.push(o.name.clone());
            }
            match old.next_if(|o| o.name == *name) {
                Some(o) if Arc::ptr_eq(o, c) || **o == **c => {}
                _ => put.push(&**c),
            }
        }
        del.extend(old.map(|o| o.name.clone()));
        Some((put, del))
    }
}

/// The lock file `name` in the state directory `dir` (both created if needed), open and not
/// locked yet, and its path.
pub fn lock_file(dir: &Path, name: &str) -> Result<(File, PathBuf)> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("create state directory {}", dir.display()))?;
    let path = dir.join(name);
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    Ok((f, path))
}

/// Replace `path` with `content` (mode `mode`) atomically and durably: readers see the old
/// file or the new one, never half of one, and after a crash or power loss the new one is
/// there once this returns (the file is synced before the rename, the directory after it).
pub fn write_durably(path: &Path, content: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let name = path
        .file_name()
        .ok_or_else(|| anyhow!("{} names no file", path.display()))?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{}.bpfnat-tmp", name.to_string_lossy()));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("create {}", tmp.display()))?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .and_then(|()| f.write_all(content))
        .and_then(|()| f.sync_all())
        .with_context(|| format!("write {}", tmp.display()))?;
    drop(f);
    std::fs::rename(&tmp, path).with_context(|| format!("replace {}", path.display()))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("sync directory {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    /// A state directory of its own, removed on drop.
    struct Dir(PathBuf);

    impl Dir {
        fn new(tag: &str) -> Self {
            let d = std::env::temp_dir().join(format!("bpfnat-store-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            Self(d)
        }
        fn journal(&self) -> Vec<u8> {
            std::fs::read(self.0.join("state.journal")).unwrap_or_default()
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn container(name: &str, last: u8) -> Arc<Container> {
        Arc::new(Container {
            name: name.to_owned(),
            ip: Some(Ipv4Addr::new(192, 0, 2, last)),
            ip6: None,
            mac: [2, 0, 0, 0, 0, last],
            host_if: format!("bn-{name}"),
            host_ifindex: u32::from(last),
            host_mac: [2, 1, 0, 0, 0, last],
            netns: PathBuf::from(format!("/run/netns/{name}")),
            owns_netns: true,
            ports: crate::state::Published::default(),
            sysctls: Vec::new(),
            ifname: "eth0".to_owned(),
            cni: false,
            cni_attachment: None,
            pending: false,
        })
    }

    fn names(s: &State) -> Vec<&str> {
        s.containers.keys().map(String::as_str).collect()
    }

    /// A state with containers `a` and `b` saved as a snapshot, and the store that saved it.
    fn two(dir: &Dir) -> (Store, State) {
        let store = Store::open(&dir.0).unwrap();
        let mut s = store.load().unwrap();
        s.static_nat.push(StaticMapping {
            external: Ipv4Addr::new(203, 0, 113, 9).into(),
            internal: Ipv4Addr::new(192, 0, 2, 9).into(),
        });
        for (n, i) in [("a", 2), ("b", 3)] {
            s.containers.insert(n.to_owned(), container(n, i));
        }
        store.save(&s).unwrap();
        (store, s)
    }

    /// `two`, then a container `c` added through the journal; the store closed again.
    fn three(tag: &str) -> Dir {
        let dir = Dir::new(tag);
        let (store, mut s) = two(&dir);
        s.containers.insert("c".to_owned(), container("c", 4));
        store.save(&s).unwrap();
        dir
    }

    #[test]
    fn container_changes_are_journaled_and_read_back() {
        let dir = Dir::new("journal");
        let (store, mut s) = two(&dir);
        let snapshot = std::fs::read(dir.0.join("state.json")).unwrap();
        assert!(
            dir.journal().is_empty(),
            "a static NAT change is a snapshot"
        );

        s.containers.insert("c".to_owned(), container("c", 4));
        Arc::make_mut(s.containers.get_mut("a").unwrap()).pending = true;
        s.containers.remove("b");
        s.generation = 7;
        store.save(&s).unwrap();
        let journal = String::from_utf8(dir.journal()).unwrap();
        assert_eq!(journal.lines().count(), 1, "{journal}");
        assert!(journal.contains(r#""del":["b"]"#), "{journal}");
        assert!(journal.contains(r#""name":"a""#) && journal.contains(r#""name":"c""#));
        assert_eq!(
            std::fs::read(dir.0.join("state.json")).unwrap(),
            snapshot,
            "the snapshot is not rewritten for container changes"
        );
        store.save(&s).unwrap();
        assert_eq!(dir.journal().len(), journal.len(), "no change, no line");
        drop(store);

        let back = Store::open(&dir.0).unwrap().load().unwrap();
        assert_eq!(names(&back), ["a", "c"]);
        assert!(back.containers["a"].pending);
        assert_eq!(back.generation, 7);
        assert_eq!(back.static_nat, s.static_nat);
    }

    #[test]
    fn a_half_written_line_is_dropped_and_cut_off() {
        let dir = three("torn");
        let whole = dir.journal();
        let mut torn = whole.clone();
        torn.extend_from_slice(br#"{"seq":2,"generation":0,"del":["#);
        std::fs::write(dir.0.join("state.journal"), &torn).unwrap();

        let store = Store::open(&dir.0).unwrap();
        let mut s = store.load().unwrap();
        assert_eq!(
            names(&s),
            ["a", "b", "c"],
            "the whole line applies, the torn one not"
        );
        assert_eq!(dir.journal(), whole, "the torn line is cut off");
        s.containers.remove("a");
        store.save(&s).unwrap();
        drop(store);
        assert_eq!(
            names(&Store::open(&dir.0).unwrap().load().unwrap()),
            ["b", "c"]
        );
    }

    #[test]
    fn compaction_rewrites_the_snapshot_and_survives_being_cut_short() {
        let dir = Dir::new("compact");
        let (store, mut s) = two(&dir);
        let mut before = Vec::new();
        for i in 0..=COMPACT_AFTER {
            before = dir.journal();
            s.containers
                .insert("c".to_owned(), container("c", (i % 200) as u8 + 10));
            store.save(&s).unwrap();
        }
        assert!(
            dir.journal().is_empty(),
            "compacted after {COMPACT_AFTER} lines"
        );
        assert_eq!(
            before.iter().filter(|&&b| b == b'\n').count(),
            COMPACT_AFTER as usize
        );
        drop(store);
        let expect = s.containers["c"].clone();
        assert_eq!(
            Store::open(&dir.0).unwrap().load().unwrap().containers["c"],
            expect
        );

        // Killed between the snapshot and emptying the journal: the old lines stay, and are
        // already in the snapshot (applying them would bring back an older `c`).
        std::fs::write(dir.0.join("state.journal"), &before).unwrap();
        let store = Store::open(&dir.0).unwrap();
        let mut s = store.load().unwrap();
        assert_eq!(s.containers["c"], expect);
        s.containers.remove("a");
        store.save(&s).unwrap();
        drop(store);
        let back = Store::open(&dir.0).unwrap().load().unwrap();
        assert_eq!(names(&back), ["b", "c"]);
        assert_eq!(back.containers["c"], expect);
    }

    #[test]
    fn a_journal_without_its_snapshot_is_not_applied() {
        let dir = three("orphan");
        std::fs::remove_file(dir.0.join("state.json")).unwrap();

        let store = Store::open(&dir.0).unwrap();
        let mut s = store.load().unwrap();
        assert!(s.containers.is_empty(), "{:?}", names(&s));
        s.containers.insert("d".to_owned(), container("d", 5));
        store.save(&s).unwrap();
        assert!(dir.journal().is_empty(), "the next save is a snapshot");
        drop(store);
        assert_eq!(names(&Store::open(&dir.0).unwrap().load().unwrap()), ["d"]);
    }

    #[test]
    fn a_gap_in_the_journal_is_an_error() {
        let dir = Dir::new("gap");
        let (store, mut s) = two(&dir);
        s.containers.remove("a");
        store.save(&s).unwrap();
        drop(store);
        let j = String::from_utf8(dir.journal())
            .unwrap()
            .replace(r#""seq":1"#, r#""seq":3"#);
        std::fs::write(dir.0.join("state.journal"), j).unwrap();
        let e = Store::open(&dir.0).unwrap().load().unwrap_err();
        assert!(
            format!("{e:#}").contains("skips from entry 0 to 3"),
            "{e:#}"
        );
    }
}
