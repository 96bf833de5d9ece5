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
