//! Internet checksum arithmetic shared by the datapath and the tests.

/// The Internet checksum `csum` after a `size`-byte (2 or 4) field it covers changed from
/// `old` to `new`, all as read from the packet in native order: HC' = ~(~HC + ~m + m')
/// (RFC 1624, eqn. 3). What XDP uses where TC has the kernel's checksum helpers.
#[must_use]
#[inline(always)]
pub const fn csum_replace(csum: u16, old: u32, new: u32, size: u64) -> u16 {
    let mut sum = (!csum) as u32;
    if size == 4 {
        let nold = !old;
        sum += (nold & 0xffff) + (nold >> 16) + (new & 0xffff) + (new >> 16);
    } else {
        sum += (!(old as u16)) as u32 + (new as u16) as u32;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The Internet checksum `csum` after the bytes it covers changed by `diff`: the ones'
/// complement sum of the new bytes less the old (what `bpf_csum_diff` returns), unfolded.
#[must_use]
#[inline(always)]
pub const fn csum_add_diff(csum: u16, diff: u32) -> u16 {
    let mut sum = (!csum) as u64 + diff as u64;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The checksum difference of replacing the 16 bytes `old` by `new` (an IPv6 address): the
/// ones' complement sum of the new 16-bit words and of the complements of the old ones,
/// unfolded, as `bpf_csum_diff` returns it. Summed here, it spares the datapath that helper
/// call and the word copies of both addresses it needs.
#[must_use]
#[inline(always)]
pub fn csum_diff16(old: &[u8; 16], new: &[u8; 16]) -> u32 {
    let mut sum = 0u32;
    let mut i = 0;
    while i < 16 {
        sum += u32::from(!u16::from_ne_bytes([old[i], old[i + 1]]));
        sum += u32::from(u16::from_ne_bytes([new[i], new[i + 1]]));
        i += 2;
    }
    sum
}
