//! The hash every tier indexes a URL by (pingora's `primary_bin`), and the secret it is keyed
//! with. It owns the choice of hash and the process's one secret; the disk tier keeps the
//! secret beside its records (`disk/keyfile.rs`), since its index outlives the process.
//!
//! Why keyed SipHash-2-4 with a 128-bit output, not pingora's unkeyed BLAKE2b-128: the hash
//! is the object's whole identity (no tier keeps the URL to compare), so two URLs must not
//! share one, even URLs a client picks to collide. A keyed pseudo-random function gives that
//! against anyone who does not hold the key (Aumasson and Bernstein, "SipHash: a fast
//! short-input PRF", 2012), and SipHash is built for the short inputs URLs are: BLAKE2b
//! compresses a whole 128-byte block for the shortest URL, 1,892 instructions of a 1 KiB
//! hit's 13,800, where SipHash takes 446 (benches/README.md §28).

use std::hash::Hasher;
use std::sync::OnceLock;

use pingora::cache::key::HashBinary;
use siphasher::sip128::{Hasher128, SipHasher24};

/// The 128-bit key of [`hash_parts`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeySecret(pub [u8; 16]);

impl std::fmt::Debug for KeySecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeySecret(..)")
    }
}

impl KeySecret {
    /// A new secret from the operating system's random source.
    pub fn random() -> KeySecret {
        let mut bytes = [0u8; 16];
        if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).is_err() {
            // ring reports failure only where the OS has no random source; the standard
            // library's per-process hash keys come from the same source or its fallback.
            let state = std::collections::hash_map::RandomState::new();
            use std::hash::BuildHasher;
            bytes[..8].copy_from_slice(&state.hash_one(1u8).to_le_bytes());
            bytes[8..].copy_from_slice(&state.hash_one(2u8).to_le_bytes());
        }
        KeySecret(bytes)
    }
}

static SECRET: OnceLock<(KeySecret, SipHasher24)> = OnceLock::new();

fn keyed() -> &'static (KeySecret, SipHasher24) {
    SECRET.get_or_init(|| keyed_with(KeySecret::random()))
}

fn keyed_with(secret: KeySecret) -> (KeySecret, SipHasher24) {
    (secret, SipHasher24::new_with_key(&secret.0))
}

/// The secret this process hashes keys with (chosen at random on first use, unless the disk
/// tier [`adopt`]ed its own first).
pub fn secret() -> KeySecret {
    keyed().0
}

/// Makes `stored` this process's secret, if no key has been hashed yet. Returns the secret
/// in force: `stored`, unless another was fixed first (then objects indexed under `stored`
/// cannot be found by this process).
pub fn adopt(stored: KeySecret) -> KeySecret {
    SECRET.get_or_init(|| keyed_with(stored)).0
}

/// The hash of the concatenation of `parts`.
pub fn hash_parts(parts: &[&[u8]]) -> HashBinary {
    let mut hasher = keyed().1;
    for part in parts {
        hasher.write(part);
    }
    hasher.finish128().as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_hash_as_their_concatenation() {
        assert_eq!(
            hash_parts(&[b"http", b"://", b"h", b"/wiki/A"]),
            hash_parts(&[b"http://h/wiki/A"])
        );
        assert_ne!(
            hash_parts(&[b"http://h/wiki/A"]),
            hash_parts(&[b"http://h/wiki/B"])
        );
    }

    /// The reference implementation's first 128-bit vector (the empty message under the key
    /// 00 01 .. 0f; SipHash's `vectors.h`, `vectors_sip128[0]`): the hash is SipHash-2-4 as
    /// published, so a disk tier's keys mean the same under any build.
    #[test]
    fn siphash_2_4_128_matches_the_reference_vector() {
        let key: [u8; 16] = std::array::from_fn(|i| i as u8);
        let (_, hasher) = keyed_with(KeySecret(key));
        assert_eq!(
            hasher.finish128().as_bytes(),
            [
                0xa3, 0x81, 0x7f, 0x04, 0xba, 0x25, 0xa8, 0xe6, 0x6d, 0xf6, 0x72, 0x14, 0xc7, 0x55,
                0x02, 0x93
            ]
        );
    }
}
