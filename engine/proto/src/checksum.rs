//! The one checksum ordinal uses, on the wire and at rest.
//!
//! Why CRC-32C (Castagnoli):
//! - x86-64 has had a CRC-32C instruction since SSE 4.2 and aarch64 has one in its CRC extension;
//!   the `crc32c` crate uses them (three interleaved streams), which runs at memory speed for
//!   payloads. A software fallback exists.
//! - It is what the storage stack around us already trusts for the same job (iSCSI, ext4 and
//!   btrfs metadata, NVMe/TCP data digests), and it detects every burst error of up to 32 bits.
//! - The failure it must catch here is not a random bit flip but a torn or stale ring slot: a mix of
//!   two payloads. For that any good 32-bit hash misses with probability 2^-32 per torn slot, so a
//!   faster non-CRC hash (xxh3) would buy speed we do not need at the price of a second algorithm.
//!
//! Records, entries and headers are 12 to 60 bytes, and each write checksums about eight of
//! them. For those the crate's dispatch and stream set-up cost more than the CRC itself
//! (about 150 instructions for 12 bytes, measured with callgrind), so inputs of up to 64 bytes
//! take a direct path: one CRC instruction per 8 bytes.

/// Inputs up to this size take the direct path.
const SMALL_BYTES_MAX: usize = 64;

/// CRC-32C of `bytes`.
#[inline]
pub fn crc32c(bytes: &[u8]) -> u32 {
    if bytes.len() <= SMALL_BYTES_MAX {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("sse4.2") {
            // SAFETY: the CPU supports SSE 4.2, checked on the line above (std caches the answer).
            return unsafe { crc32c_small_sse42(bytes) };
        }
    }
    crc32c::crc32c(bytes)
}

/// CRC-32C with the SSE 4.2 instruction, 8 bytes at a time, then the tail byte by byte. Same
/// result as the crate (checked by the tests below): initial value and final XOR of all ones.
///
/// # Safety
/// The CPU must support SSE 4.2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
unsafe fn crc32c_small_sse42(bytes: &[u8]) -> u32 {
    use std::arch::x86_64::{_mm_crc32_u64, _mm_crc32_u8};
    let mut crc = u64::from(u32::MAX);
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        crc = _mm_crc32_u64(
            crc,
            u64::from_le_bytes(word.try_into().expect("chunks of 8")),
        );
    }
    let mut crc = crc as u32;
    for &byte in words.remainder() {
        crc = _mm_crc32_u8(crc, byte);
    }
    !crc
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

    #[test]
    fn the_direct_path_agrees_with_the_crate_at_every_small_length() {
        // Every length from 0 to 80 (both sides of the 64-byte switch), several contents each.
        let mut state = 0x1234_5678_9ABC_DEF0u64;
        for len in 0..=80 {
            for _ in 0..8 {
                let bytes: Vec<u8> = (0..len)
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        state as u8
                    })
                    .collect();
                assert_eq!(crc32c(&bytes), crc32c::crc32c(&bytes), "length {len}");
            }
        }
    }
}
