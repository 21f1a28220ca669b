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

//!
//! Payloads of a few sectors (the common case of a small-block workload) take a third path. The
//! CRC instruction has a latency of three cycles and a throughput of one per cycle, and the crate
//! runs a single stream below a few KiB, so a 512-byte payload waited on 64 dependent
//! instructions. Here such a payload is cut into blocks of three lanes that run as three
//! independent streams and are joined with the linearity of CRCs: for lanes A, B, C of L bytes,
//! `crc(s, ABC) = shift(crc(s, A), 2L) ^ shift(crc(0, B), L) ^ crc(0, C)`, where `shift(x, n)`
//! is the state after `n` zero bytes, a linear map done with four 256-entry tables. Measured
//! with the core benchmark's CRC baseline: 48.5 ns for 512 bytes through the crate, 20.5 ns here.
//!
//! Payloads from `FOLD_BYTES_MIN` up are checked on a fourth path where the CPU has AVX-512 and VPCLMULQDQ
//! (carry-less multiplication of four 128-bit lanes at once): the input is folded 256 bytes at a
//! time, four 64-byte accumulators each multiplied forward by the constant `x^n mod P` for the
//! distance it moves, and the last 16 bytes go through the CRC instruction. The CRC instruction
//! takes 8 bytes per cycle at best; folding takes 64 bytes per instruction pair. Measured on
//! this machine's EPYC (a scratch loop, same data, ns per call): 512 B 16.5-17.3 against 20.5
//! for the three-stream path; 4 KiB 78-81 against 187-194 for the crate; 64 KiB 1,138 against
//! 2,509-2,694. Folding with 128-bit PCLMULQDQ instead was slower than the crate from 4 KiB up
//! (280 ns at 4 KiB): this CPU runs about one such multiplication per cycle and a half.

/// Inputs up to this size take the direct path.
const SMALL_BYTES_MAX: usize = 64;
/// Bytes of one lane of the three-stream path: 21 words, so a 512-byte payload is one block of
/// 504 bytes and one word.
const LANE_BYTES: usize = 168;
/// Inputs from this size up take the folding path where the CPU has it: the four accumulators
/// start from the first 256 bytes.
const FOLD_BYTES_MIN: usize = 4 * 64;
/// Inputs below this size (and above `SMALL_BYTES_MAX`) take the three-stream path; from here on
/// the crate's own interleaved code is as fast.
const MEDIUM_BYTES_END: usize = 4096;

/// CRC-32C of `bytes`.
#[inline]
pub fn crc32c(bytes: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if bytes.len() >= FOLD_BYTES_MIN && folding_is_supported() {
        // SAFETY: the CPU has the folding path's features, checked just above.
        return unsafe { crc32c_fold_avx512(bytes) };
    }
    #[cfg(target_arch = "x86_64")]
    if bytes.len() < MEDIUM_BYTES_END && std::arch::is_x86_feature_detected!("sse4.2") {
        if bytes.len() <= SMALL_BYTES_MAX {
            // SAFETY: the CPU supports SSE 4.2, checked above (std caches the answer).
            return unsafe { crc32c_small_sse42(bytes) };
        }
        // SAFETY: as above.
        return unsafe { crc32c_medium_sse42(bytes) };
    }
    crc32c::crc32c(bytes)
}

/// CRC-32C of the first `N` bytes of `bytes` (which must be at least that long), for the
/// fixed-size records, entries and headers. Same result as `crc32c`; with the length known when
/// compiling, the direct path is straight-line code: no loop, no length tests. The core bench
/// checksums about five records and entries per write; per call, callgrind counted about 50
/// instructions through the general direct path (order record, 44 bytes) and about 17 here.
#[inline]
pub fn crc32c_prefix<const N: usize>(bytes: &[u8]) -> u32 {
    let head: &[u8; N] = bytes
        .first_chunk::<N>()
        .expect("a fixed-size record is checksummed over its own length");
    #[cfg(target_arch = "x86_64")]
    if N <= SMALL_BYTES_MAX && std::arch::is_x86_feature_detected!("sse4.2") {
        // SAFETY: the CPU supports SSE 4.2, checked above (std caches the answer).
        return unsafe { crc32c_fixed_sse42(head) };
    }
    crc32c(head)
}

/// Copies `source` into `destination` (the same length) and returns the CRC-32C of the bytes,
/// reading each byte once: the primary places a client's write in the staging ring and
/// checksums it in one pass instead of a copy and then a second read. The result is
/// `crc32c(source)` (checked by the tests below).
pub fn copy_crc32c(source: &[u8], destination: &mut [u8]) -> u32 {
    assert_eq!(
        source.len(),
        destination.len(),
        "a copy needs a destination of the source's length"
    );
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("sse4.2") {
        // SAFETY: the CPU supports SSE 4.2, checked above (std caches the answer).
        return unsafe { copy_crc32c_sse42(source, destination) };
    }
    destination.copy_from_slice(source);
    crc32c::crc32c(destination)
}

/// The reflected CRC-32C polynomial.
const POLYNOMIAL: u32 = 0x82F6_3B78;

/// `shift(x, n)` as four tables: entry `[i][b]` is the shift of byte `b` in byte position `i`
/// of the state, so a shift is four lookups XORed (it is linear in the state).
type ShiftTables = [[u32; 256]; 4];

/// Tables for shifting a state by one lane and by two lanes of zero bytes.
fn lane_shift_tables() -> &'static (ShiftTables, ShiftTables) {
    static TABLES: std::sync::OnceLock<Box<(ShiftTables, ShiftTables)>> =
        std::sync::OnceLock::new();
    TABLES.get_or_init(|| {
        let mut tables = Box::new(([[0u32; 256]; 4], [[0u32; 256]; 4]));
        for position in 0..4 {
            for byte in 0..256u32 {
                let state = byte << (8 * position);
                let one = shift_by_zero_bytes(state, LANE_BYTES);
                tables.0[position][byte as usize] = one;
                tables.1[position][byte as usize] = shift_by_zero_bytes(one, LANE_BYTES);
            }
        }
        tables
    })
}

/// The raw state (no initial or final inversion) after `n` zero bytes: only used to build the
/// tables, once.
fn shift_by_zero_bytes(state: u32, n: usize) -> u32 {
    shift_by_zero_bits(state, 8 * n)
}

/// The raw state after `bits` zero bits, one at a time: each is a multiplication by `x` mod P
/// (bit 0 of the register is the coefficient of x^31). Only used to build tables, once.
fn shift_by_zero_bits(mut state: u32, bits: usize) -> u32 {
    for _ in 0..bits {
        state = (state >> 1) ^ (POLYNOMIAL & 0u32.wrapping_sub(state & 1));
    }
    state
}

#[inline]
fn apply_shift(tables: &ShiftTables, state: u32) -> u32 {
    tables[0][(state & 0xff) as usize]
        ^ tables[1][((state >> 8) & 0xff) as usize]
        ^ tables[2][((state >> 16) & 0xff) as usize]
        ^ tables[3][(state >> 24) as usize]
}

/// CRC-32C in blocks of three lanes run as independent streams (see the module docs), then the
/// rest one word at a time. Same result as the crate (checked by the tests below).
///
/// # Safety
/// The CPU must support SSE 4.2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
unsafe fn crc32c_medium_sse42(bytes: &[u8]) -> u32 {
    use std::arch::x86_64::_mm_crc32_u64;
    let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let (one_lane, two_lanes) = lane_shift_tables();
    let mut state = u32::MAX;
    let mut at = 0;
    let lane_word = |lane: &[u8]| u64::from_le_bytes(lane.try_into().expect("8 bytes"));
    while bytes.len() - at >= 3 * LANE_BYTES {
        // Lanes as fixed-size slices and words as exact chunks: the compiler then sees every
        // read in bounds and unrolls the loop, which with indexed reads it did not (512 bytes:
        // 460 instructions under callgrind and 32 ns with indexed reads, 20.5 ns like this).
        let (lane_a, rest) = bytes[at..at + 3 * LANE_BYTES].split_at(LANE_BYTES);
        let (lane_b, lane_c) = rest.split_at(LANE_BYTES);
        let (mut a, mut b, mut c) = (u64::from(state), 0u64, 0u64);
        for ((word_a, word_b), word_c) in lane_a
            .chunks_exact(8)
            .zip(lane_b.chunks_exact(8))
            .zip(lane_c.chunks_exact(8))
        {
            a = _mm_crc32_u64(a, lane_word(word_a));
            b = _mm_crc32_u64(b, lane_word(word_b));
            c = _mm_crc32_u64(c, lane_word(word_c));
        }
        state = apply_shift(two_lanes, a as u32) ^ apply_shift(one_lane, b as u32) ^ c as u32;
        at += 3 * LANE_BYTES;
    }
    let mut crc = u64::from(state);
    while bytes.len() - at >= 8 {
        crc = _mm_crc32_u64(crc, word(at));
        at += 8;
    }
    !crc_tail(crc as u32, &bytes[at..])
}

/// The three-stream path of [`crc32c_medium_sse42`] at any length, storing each word as it is
/// read. Above `MEDIUM_BYTES_END` the crate runs longer lanes, but the joins here (eight table
/// lookups per 504 bytes) cost a few percent, and the copy is what this saves.
///
/// # Safety
/// The CPU must support SSE 4.2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
unsafe fn copy_crc32c_sse42(source: &[u8], destination: &mut [u8]) -> u32 {
    use std::arch::x86_64::_mm_crc32_u64;
    debug_assert_eq!(source.len(), destination.len());
    let (one_lane, two_lanes) = lane_shift_tables();
    let mut state = u32::MAX;
    let word = |bytes: &[u8]| u64::from_le_bytes(bytes.try_into().expect("8 bytes"));
    let mut blocks = source.chunks_exact(3 * LANE_BYTES);
    let mut block_copies = destination.chunks_exact_mut(3 * LANE_BYTES);
    for (block, copy) in (&mut blocks).zip(&mut block_copies) {
        // Fixed-size lanes and exact chunks, as in the read-only path: every access is then
        // known in bounds and the loop unrolls.
        let (lane_a, rest) = block.split_at(LANE_BYTES);
        let (lane_b, lane_c) = rest.split_at(LANE_BYTES);
        let (copy_a, rest) = copy.split_at_mut(LANE_BYTES);
        let (copy_b, copy_c) = rest.split_at_mut(LANE_BYTES);
        let (mut a, mut b, mut c) = (u64::from(state), 0u64, 0u64);
        for (((word_a, word_b), word_c), ((to_a, to_b), to_c)) in lane_a
            .chunks_exact(8)
            .zip(lane_b.chunks_exact(8))
            .zip(lane_c.chunks_exact(8))
            .zip(
                copy_a
                    .chunks_exact_mut(8)
                    .zip(copy_b.chunks_exact_mut(8))
                    .zip(copy_c.chunks_exact_mut(8)),
            )
        {
            to_a.copy_from_slice(word_a);
            to_b.copy_from_slice(word_b);
            to_c.copy_from_slice(word_c);
            a = _mm_crc32_u64(a, word(word_a));
            b = _mm_crc32_u64(b, word(word_b));
            c = _mm_crc32_u64(c, word(word_c));
        }
        state = apply_shift(two_lanes, a as u32) ^ apply_shift(one_lane, b as u32) ^ c as u32;
    }
    // The rest (under 504 bytes; 8 for a 512-byte payload) word by word too: a
    // `copy_from_slice` of a length not known here is a call to memcpy, which callgrind counted
    // at about 20 instructions for those 8 bytes.
    let rest = blocks.remainder();
    let rest_copy = block_copies.into_remainder();
    let mut words = rest.chunks_exact(8);
    let mut word_copies = rest_copy.chunks_exact_mut(8);
    let mut crc = u64::from(state);
    for (rest_word, word_copy) in (&mut words).zip(&mut word_copies) {
        word_copy.copy_from_slice(rest_word);
        crc = _mm_crc32_u64(crc, word(rest_word));
    }
    let tail = words.remainder();
    // (The compiler turns this loop into a call to memcpy; most payloads are whole sectors and
    // have no tail, so the call is skipped for them.)
    if !tail.is_empty() {
        word_copies.into_remainder().copy_from_slice(tail);
    }
    !crc_tail(crc as u32, tail)
}

/// Whether this CPU can run [`crc32c_fold_avx512`] (std caches the answers).
#[cfg(target_arch = "x86_64")]
#[inline]
fn folding_is_supported() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("vpclmulqdq")
        && std::arch::is_x86_feature_detected!("pclmulqdq")
        && std::arch::is_x86_feature_detected!("sse4.2")
}

/// The two 64-bit multipliers that move a 128-bit lane `chunks` lanes (of 16 bytes) forward.
///
/// Why these: load 16 message bytes little-endian as `v = v_lo + 2^64 v_hi`. In the reflected
/// bit order of CRC-32C, `v_lo` holds the lane's first 64 message bits `H` and `v_hi` the next 64
/// `L`, so the lane is the polynomial `H x^64 + L`, and moving it `d = 128 chunks` bits later is
/// `H x^(d+64) + L x^d`, which mod P is `H (x^(d+64) mod P) + L (x^d mod P)`: two products of at
/// most 95 bits, a lane again. A carry-less product of two bit-reversed operands comes out
/// bit-reversed and one place short (its top bit would be degree 127), i.e. multiplied by `x`;
/// so the multipliers are `x^(d+63)` and `x^(d-1)` mod P, bit-reversed into 64 bits.
fn fold_multipliers(chunks: usize) -> [u64; 2] {
    let bits = 128 * chunks;
    let reversed = |power: usize| u64::from(x_to_the_mod_p(power)) << 32;
    [reversed(bits + 63), reversed(bits - 1)]
}

/// `x^power mod P` as the CRC register holds it: the register for 1 (its top coefficient, bit
/// 31) moved `power` bits on.
fn x_to_the_mod_p(power: usize) -> u32 {
    shift_by_zero_bits(0x8000_0000, power)
}

/// Multipliers for moving a lane 1 to 16 lanes forward (index = lanes; 0 unused).
fn fold_table() -> &'static [[u64; 2]; 17] {
    static TABLE: std::sync::OnceLock<[[u64; 2]; 17]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = [[0u64; 2]; 17];
        for (chunks, multipliers) in table.iter_mut().enumerate().skip(1) {
            *multipliers = fold_multipliers(chunks);
        }
        table
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,vpclmulqdq")]
#[inline]
fn fold_512(
    accumulator: std::arch::x86_64::__m512i,
    multipliers: std::arch::x86_64::__m512i,
    next: std::arch::x86_64::__m512i,
) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::{_mm512_clmulepi64_epi128, _mm512_ternarylogic_epi64};
    // Each 128-bit lane: its first 64 message bits times the first multiplier, its next 64
    // times the second; 0x96 is the three-way XOR.
    let first = _mm512_clmulepi64_epi128(accumulator, multipliers, 0x00);
    let second = _mm512_clmulepi64_epi128(accumulator, multipliers, 0x11);
    _mm512_ternarylogic_epi64(first, second, next, 0x96)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "pclmulqdq,sse2")]
#[inline]
fn fold_128(lane: std::arch::x86_64::__m128i, multipliers: [u64; 2]) -> std::arch::x86_64::__m128i {
    use std::arch::x86_64::{_mm_clmulepi64_si128, _mm_set_epi64x, _mm_xor_si128};
    let multipliers = _mm_set_epi64x(multipliers[1] as i64, multipliers[0] as i64);
    _mm_xor_si128(
        _mm_clmulepi64_si128(lane, multipliers, 0x00),
        _mm_clmulepi64_si128(lane, multipliers, 0x11),
    )
}

/// CRC-32C by folding (see the module docs). Same result as the crate (checked by the tests
/// below).
///
/// Only for checking: copying with it (each 64-byte piece stored into the staging ring as it is
/// folded) made the core bench slower from 1 KiB up (1 KiB: 266-273 ns per write against
/// 226-237 with the three-stream copy; 4 KiB: 693-743 against 441-468), and no faster at 512 B.
/// The ring's lines are not in cache, and stores of whole lines as fast as folding runs queue
/// behind their misses; the three-stream copy stores at the pace of its CRC.
///
/// # Safety
/// The CPU must have AVX-512F, VPCLMULQDQ, PCLMULQDQ and SSE 4.2 ([`folding_is_supported`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,vpclmulqdq,pclmulqdq,sse4.2")]
unsafe fn crc32c_fold_avx512(bytes: &[u8]) -> u32 {
    use std::arch::x86_64::*;
    assert!(
        bytes.len() >= FOLD_BYTES_MIN,
        "folding starts from one whole block"
    );
    let table = fold_table();
    let broadcast = |[first, second]: [u64; 2]| {
        _mm512_set_epi64(
            second as i64,
            first as i64,
            second as i64,
            first as i64,
            second as i64,
            first as i64,
            second as i64,
            first as i64,
        )
    };
    let load = |piece: &[u8]| {
        let piece: &[u8; 64] = piece.try_into().expect("a 64-byte piece");
        // SAFETY: `piece` is 64 readable bytes; unaligned loads are allowed.
        unsafe { _mm512_loadu_si512(piece.as_ptr().cast()) }
    };
    let mut pieces = bytes.chunks_exact(64);
    let mut next = || load(pieces.next().expect("counted below"));
    let mut lanes = [next(), next(), next(), next()];
    // The initial register (all ones) is the same as those bits XORed into the first 32 bits of
    // the message.
    lanes[0] = _mm512_xor_si512(
        lanes[0],
        _mm512_castsi128_si512(_mm_cvtsi32_si128(u32::MAX as i32)),
    );
    let whole_pieces = bytes.len() / 64;
    let by_block = broadcast(table[16]);
    for _ in 0..whole_pieces / 4 - 1 {
        for lane in &mut lanes {
            *lane = fold_512(*lane, by_block, next());
        }
    }
    let by_piece = broadcast(table[4]);
    let mut joined = fold_512(lanes[0], by_piece, lanes[1]);
    joined = fold_512(joined, by_piece, lanes[2]);
    joined = fold_512(joined, by_piece, lanes[3]);
    for _ in 0..whole_pieces % 4 {
        joined = fold_512(joined, by_piece, next());
    }
    // The four 16-byte lanes of the last piece, each moved to the last one's place.
    let mut lane = _mm_xor_si128(
        _mm_xor_si128(
            fold_128(_mm512_extracti32x4_epi32::<0>(joined), table[3]),
            fold_128(_mm512_extracti32x4_epi32::<1>(joined), table[2]),
        ),
        _mm_xor_si128(
            fold_128(_mm512_extracti32x4_epi32::<2>(joined), table[1]),
            _mm512_extracti32x4_epi32::<3>(joined),
        ),
    );
    let rest = pieces.remainder();
    let mut sixteens = rest.chunks_exact(16);
    for sixteen in &mut sixteens {
        let sixteen: &[u8; 16] = sixteen.try_into().expect("16 bytes");
        // SAFETY: `sixteen` is 16 readable bytes; unaligned loads are allowed.
        let next = unsafe { _mm_loadu_si128(sixteen.as_ptr().cast()) };
        lane = _mm_xor_si128(fold_128(lane, table[1]), next);
    }
    // The folded message is now these 16 bytes (the same polynomial mod P, at the same place),
    // so their CRC from a zero register is the CRC so far; the last 0 to 15 bytes follow.
    let mut crc = _mm_crc32_u64(0, _mm_cvtsi128_si64(lane) as u64);
    crc = _mm_crc32_u64(crc, _mm_extract_epi64::<1>(lane) as u64);
    let mut words = sixteens.remainder().chunks_exact(8);
    for word in &mut words {
        crc = _mm_crc32_u64(crc, u64::from_le_bytes(word.try_into().expect("8 bytes")));
    }
    !crc_tail(crc as u32, words.remainder())
}

/// CRC-32C with the SSE 4.2 instruction, 8 bytes at a time, then the tail in at most three steps. Same
/// result as the crate (checked by the tests below): initial value and final XOR of all ones.
///
/// # Safety
/// The CPU must support SSE 4.2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
unsafe fn crc32c_small_sse42(bytes: &[u8]) -> u32 {
    use std::arch::x86_64::_mm_crc32_u64;
    let mut crc = u64::from(u32::MAX);
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        crc = _mm_crc32_u64(
            crc,
            u64::from_le_bytes(word.try_into().expect("chunks of 8")),
        );
    }
    !crc_tail(crc as u32, words.remainder())
}

/// The direct path for a length known when compiling (see `crc32c_prefix`).
///
/// # Safety
/// The CPU must support SSE 4.2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
unsafe fn crc32c_fixed_sse42<const N: usize>(bytes: &[u8; N]) -> u32 {
    use std::arch::x86_64::_mm_crc32_u64;
    let mut crc = u64::from(u32::MAX);
    let mut at = 0;
    while at + 8 <= N {
        let word: [u8; 8] = bytes[at..at + 8].try_into().expect("8 bytes");
        crc = _mm_crc32_u64(crc, u64::from_le_bytes(word));
        at += 8;
    }
    !crc_tail(crc as u32, &bytes[at..])
}

/// The last 0 to 7 bytes in at most three steps (4, 2, 1 bytes). Each CRC instruction waits
/// for the previous one (three cycles), and the records and entries that take the direct path
/// are 12, 28, 44 and 60 bytes long: byte by byte their 4-byte tails were four dependent steps,
/// which perf showed as a fifth of the direct path's time. (Safe to call only from code that
/// has SSE 4.2 enabled too, which the compiler checks.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
#[inline]
fn crc_tail(mut crc: u32, mut tail: &[u8]) -> u32 {
    use std::arch::x86_64::{_mm_crc32_u16, _mm_crc32_u32, _mm_crc32_u8};
    debug_assert!(tail.len() < 8);
    if let Some((four, rest)) = tail.split_first_chunk::<4>() {
        crc = _mm_crc32_u32(crc, u32::from_le_bytes(*four));
        tail = rest;
    }
    if let Some((two, rest)) = tail.split_first_chunk::<2>() {
        crc = _mm_crc32_u16(crc, u16::from_le_bytes(*two));
        tail = rest;
    }
    if let Some(&byte) = tail.first() {
        crc = _mm_crc32_u8(crc, byte);
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `len` bytes of xorshift64 from `seed` (not zero): test data with no pattern a CRC path
    /// could get right by accident.
    fn pseudo_random_bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut state = seed;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    #[test]
    fn matches_the_published_check_value() {
        // RFC 3720 (iSCSI) B.4 and every CRC catalogue give 0xE3069283 for "123456789".
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn the_three_stream_path_agrees_with_the_crate_at_every_length_it_takes() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut bytes = vec![0u8; MEDIUM_BYTES_END + 8];
        for byte in &mut bytes {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *byte = state as u8;
        }
        // The path itself, which the dispatch no longer takes from `FOLD_BYTES_MIN` up where
        // the CPU can fold.
        let three_streams = |bytes: &[u8]| {
            if std::arch::is_x86_feature_detected!("sse4.2") {
                // SAFETY: the CPU supports SSE 4.2, checked just above.
                unsafe { crc32c_medium_sse42(bytes) }
            } else {
                crc32c(bytes)
            }
        };
        for len in SMALL_BYTES_MAX..=MEDIUM_BYTES_END + 8 {
            // Both ends, and an odd start so unaligned words are read too.
            let head = &bytes[..len];
            let tail = &bytes[bytes.len() - len + 1..];
            for input in [head, tail] {
                let expected = crc32c::crc32c(input);
                assert_eq!(crc32c(input), expected, "length {}", input.len());
                assert_eq!(three_streams(input), expected, "length {}", input.len());
            }
        }
        assert_eq!(crc32c(&[0u8; 512]), crc32c::crc32c(&[0u8; 512]));
    }

    /// The folding path, where this CPU has it, against the crate: every length from its first
    /// block to 5 KiB from an odd start (every count of whole blocks, pieces, 16-byte lanes and
    /// tail bytes), and large payloads. The multipliers are derived, not copied from a table, so
    /// this is what shows them right.
    #[test]
    fn the_folding_path_agrees_with_the_crate() {
        if !folding_is_supported() {
            eprintln!("this CPU cannot fold (no AVX-512F with VPCLMULQDQ): path not tested here");
            return;
        }
        let bytes = pseudo_random_bytes(0x6A09_E667_F3BC_C908, (1 << 20) + 64);
        let lengths = (FOLD_BYTES_MIN..=5 * 1024).chain([65536, 65536 + 7, 1 << 20]);
        for len in lengths {
            let input = &bytes[3..3 + len];
            // SAFETY: the CPU can fold, checked above.
            let folded = unsafe { crc32c_fold_avx512(input) };
            assert_eq!(folded, crc32c::crc32c(input), "length {len}");
        }
        assert_eq!(
            // SAFETY: as above.
            unsafe { crc32c_fold_avx512(&[0u8; 512]) },
            crc32c::crc32c(&[0u8; 512])
        );
    }

    #[test]
    fn copying_with_the_checksum_gives_the_same_bytes_and_crc_at_every_length() {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut bytes = vec![0u8; 3 * MEDIUM_BYTES_END];
        for byte in &mut bytes {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *byte = state as u8;
        }
        let mut copy = vec![0u8; bytes.len()];
        // Every length up to three blocks past the medium path's end (and from an odd start, so
        // unaligned words are read and written too), then a few payload sizes.
        let lengths = (0..=2 * MEDIUM_BYTES_END + 3 * 3 * LANE_BYTES).chain([65536, 1 << 20]);
        for len in lengths {
            let source: Vec<u8> = if len <= bytes.len() - 1 {
                bytes[1..1 + len].to_vec()
            } else {
                bytes.iter().cycle().skip(1).take(len).copied().collect()
            };
            if copy.len() < len {
                copy.resize(len, 0);
            }
            copy[..len].fill(0xEE);
            let crc = copy_crc32c(&source, &mut copy[..len]);
            assert_eq!(crc, crc32c::crc32c(&source), "length {len}");
            assert_eq!(&copy[..len], &source[..], "length {len}");
        }
    }

    #[test]
    fn the_direct_path_agrees_with_the_crate_at_every_small_length() {
        // Every length from 0 to 80 (both sides of the 64-byte switch), several contents each.
        for len in 0..=80 {
            for content in 0..8 {
                let bytes = pseudo_random_bytes(0x1234_5678_9ABC_DEF0 + content, len);
                assert_eq!(crc32c(&bytes), crc32c::crc32c(&bytes), "length {len}");
            }
        }
    }

    #[test]
    fn the_fixed_length_path_agrees_with_the_crate() {
        // The record sizes in use (12, 28, 44, 60), both sides of them, the 64-byte switch, and
        // a prefix of a longer buffer (only the first N bytes count).
        let bytes: Vec<u8> = (0..100u32).map(|i| (i * 37 + 11) as u8).collect();
        macro_rules! check {
            ($($n:literal),*) => {$(
                assert_eq!(crc32c_prefix::<$n>(&bytes), crc32c::crc32c(&bytes[..$n]), "length {}", $n);
            )*};
        }
        check!(0, 1, 7, 8, 11, 12, 13, 27, 28, 29, 43, 44, 45, 59, 60, 61, 63, 64, 65, 80);
    }
}
