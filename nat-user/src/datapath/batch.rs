//! Reading a whole hash map in a few system calls (`BPF_MAP_LOOKUP_BATCH`) instead of two per
//! entry (aya's iterators: `get_next_key`, then a lookup). `container del`, `conntrack gc`,
//! `conntrack list` and the agent's metrics read the conntrack tables whole: at 262,144
//! entries that was half a million system calls.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
};

use anyhow::{Result, anyhow, bail};
use aya::{Pod, maps::MapData};
use aya_obj::generated::{bpf_attr, bpf_attr__bindgen_ty_3, bpf_cmd};

/// Entries asked for per call. The kernel hands out a hash bucket whole or not at all, so a
/// call whose next bucket holds more is retried with more room.
const BATCH: usize = 4096;
/// More room than any bucket of a sane table needs.
const MAX_BATCH: usize = 1 << 20;

/// Every entry of the hash map `map` (key `K`, value `V`: its key and value sizes). Entries
/// added or removed meanwhile may or may not be in it, as with an iteration.
pub fn dump<K: Pod, V: Pod>(map: &MapData) -> Result<Vec<(K, V)>> {
    let fd = u32::try_from(map.fd().as_fd().as_raw_fd()).map_err(|_| anyhow!("bad map fd"))?;
    let (ks, vs) = (size_of::<K>(), size_of::<V>());
    let mut out = Vec::new();
    let mut room = BATCH;
    let (mut keys, mut values) = (Vec::<u8>::new(), Vec::<u8>::new());
    // A hash map's position is a bucket number: where the last call stopped.
    let mut from: Option<u32> = None;
    let mut next = 0u32;
    loop {
        keys.resize(room * ks, 0);
        values.resize(room * vs, 0);
        // SAFETY: the union holds integers only: all zero is a value. Zeroed whole, not
        // built from its member, since the kernel refuses bytes past the member that are not
        // zero and a union literal leaves them undefined.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        attr.batch = bpf_attr__bindgen_ty_3 {
            in_batch: from.as_ref().map_or(0, |f| std::ptr::from_ref(f) as u64),
            out_batch: std::ptr::from_mut(&mut next) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: u32::try_from(room)?,
            map_fd: fd,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: the attribute block is a whole `union bpf_attr` whose batch member points
        // at buffers of `count` keys and values of the map's sizes and at a bucket number, all
        // alive across the call; the kernel writes only there and to `count`.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                bpf_cmd::BPF_MAP_LOOKUP_BATCH as libc::c_long,
                &raw mut attr,
                size_of::<bpf_attr>(),
            )
        };
        let err = (rc < 0).then(io::Error::last_os_error);
        // SAFETY: the batch member is the one written above; the kernel updates its count.
        let n = usize::try_from(unsafe { attr.batch.count })?.min(room);
        match err.as_ref().and_then(io::Error::raw_os_error) {
            None | Some(libc::ENOENT) => {}
            Some(libc::ENOSPC) if room < MAX_BATCH => {
                room *= 2;
                continue;
            }
            Some(_) => {
                let e = err.unwrap_or_else(io::Error::last_os_error);
                bail!("BPF_MAP_LOOKUP_BATCH: {e}");
            }
        }
        out.reserve(n);
        for i in 0..n {
            // SAFETY: entry `i` lies inside both buffers (`n` ≤ `room`), and `K` and `V` are
            // `Pod`: any bytes are a valid value.
            let (k, v) = unsafe {
                (
                    keys.as_ptr().add(i * ks).cast::<K>().read_unaligned(),
                    values.as_ptr().add(i * vs).cast::<V>().read_unaligned(),
                )
            };
            out.push((k, v));
        }
        if err.is_some() {
            // ENOENT: the last bucket was read.
            return Ok(out);
        }
        from = Some(next);
    }
}
