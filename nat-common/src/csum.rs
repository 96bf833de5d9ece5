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

/// The checksum difference of replacing the 16 bytes `old` by `new` (an IPv6 address, as
/// four native-order words): the ones' complement sum of the new words and of the
/// complements of the old ones, folded to 32 bits (2^32 is 1 modulo 0xffff, so this equals
/// the sum of 16-bit words), as `bpf_csum_diff` returns it. Summed here, it spares the
/// datapath that helper call; taking words, it spares it byte-by-byte loads.
#[must_use]
#[inline(always)]
pub fn csum_diff16(old: [u32; 4], new: [u32; 4]) -> u32 {
    let mut sum = 0u64;
    let mut i = 0;
    while i < 4 {
        sum += csum_word_diff(old[i], new[i]);
        i += 1;
    }
    csum_fold32(sum)
}

/// One word's part of a checksum difference (`csum_diff16`): its new value and the
/// complement of its old one, to be summed and folded by `csum_fold32`.
#[must_use]
#[inline(always)]
pub const fn csum_word_diff(old: u32, new: u32) -> u64 {
    (!old) as u64 + new as u64
}

/// A sum of 32-bit words folded to 32 bits with end-around carry.
#[must_use]
#[inline(always)]
pub const fn csum_fold32(mut sum: u64) -> u32 {
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum as u32
}
