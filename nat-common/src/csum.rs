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

#[cfg(test)]
mod tests {
    use super::*;

    /// The Internet checksum of `b` (native-order words), as the kernel computes it.
    fn full(b: &[u8]) -> u16 {
        let mut s: u64 = b
            .chunks(2)
            .map(|w| u64::from(u16::from_ne_bytes([w[0], *w.get(1).unwrap_or(&0)])))
            .sum();
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        !(s as u16)
    }

    #[test]
    fn an_address_replaced_through_its_difference_gives_the_recomputed_checksum() {
        let mut pkt = [0u8; 64];
        for (i, b) in pkt.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(37).wrapping_add(11);
        }
        let cases: [([u8; 16], [u8; 16]); 3] = [
            (
                [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
                [0xfd, 0, 0, 0x88, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3],
            ),
            ([0xff; 16], [0; 16]),
            ([0; 16], [0xff; 16]),
        ];
        for (old, new) in cases {
            pkt[8..24].copy_from_slice(&old);
            let before = full(&pkt);
            pkt[8..24].copy_from_slice(&new);
            let after = full(&pkt);
            let got = csum_add_diff(before, csum_diff16(&old, &new));
            // 0 and 0xffff are the same value in ones' complement.
            assert!(
                got == after || (got ^ after) == 0xffff && (got == 0 || after == 0),
                "{old:?} -> {new:?}: {got:#x} vs {after:#x}"
            );
        }
    }
}
