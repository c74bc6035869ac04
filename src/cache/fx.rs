//! A fast hash for tables that need no defence against chosen collisions: tables of names
//! from the config, which a request only probes (the rule index), and counters where two
//! URLs sharing a 64-bit hash would at worst be counted together (the dashboard's top URLs).
//! Never for an unbounded table a client can fill.

use std::hash::Hasher;

/// A multiply-rotate hash over eight bytes at a time (as rustc's FxHash): a host name or a
/// path segment hashes in a dozen instructions, where the standard SipHash costs about a
/// hundred.
#[derive(Default)]
pub struct FxLike(u64);

impl Hasher for FxLike {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x517c_c1b7_2722_0a95;
        let mut hash = self.0;
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            hash = (hash.rotate_left(5) ^ u64::from_le_bytes(word)).wrapping_mul(K);
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            hash = (hash.rotate_left(5) ^ u64::from_le_bytes(word)).wrapping_mul(K);
        }
        self.0 = hash;
    }

    fn write_u8(&mut self, byte: u8) {
        self.0 = (self.0.rotate_left(5) ^ u64::from(byte)).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}
