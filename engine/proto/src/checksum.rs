//! The one checksum ordinal uses, on the wire and at rest.
//!
//! Why CRC-32C (Castagnoli):
//! - x86-64 has had a CRC-32C instruction since SSE 4.2 and aarch64 has one in its CRC extension;
//!   the `crc32c` crate uses them (three interleaved streams), which runs at memory speed for
//!   payloads and costs a few nanoseconds for a 44-byte record header. A software fallback exists.
//! - It is what the storage stack around us already trusts for the same job (iSCSI, ext4 and
//!   btrfs metadata, NVMe/TCP data digests), and it detects every burst error of up to 32 bits.
//! - The failure it must catch here is not a random bit flip but a torn or stale ring slot: a mix of
//!   two payloads. For that any good 32-bit hash misses with probability 2^-32 per torn slot, so a
//!   faster non-CRC hash (xxh3) would buy speed we do not need at the price of a second algorithm.

/// CRC-32C of `bytes`.
#[inline]
pub fn crc32c(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_published_check_value() {
        // RFC 3720 (iSCSI) B.4 and every CRC catalogue give 0xE3069283 for "123456789".
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }
}
