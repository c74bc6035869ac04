//! Which misses the log writes once it is full. Until the tier reaches its bound every miss is
//! written; after that, writing a URL asked for once evicts (a segment at a time, FIFO) objects
//! that earned their place, and most URLs in a wiki's long tail are asked for once. So a full
//! log writes a miss only if the same URL missed recently before: the first miss leaves a
//! ghost (a 16-bit fingerprint), the second finds it and is written. `min_uses` (nginx's
//! `proxy_cache_min_uses`) asks for more misses still, always.
//!
//! How long a ghost is remembered decides how selective this is. S3-FIFO's ghost queue holds
//! as many URLs as its main queue holds objects; here a slot per four objects in the log did
//! best in `benches/disk_hit_ratio.py` (Zipf s = 1.0: byte hit ratio 69.5 % with a slot per
//! object, 70.3 % per two, 70.9 % per four, 70.8 % per eight, 70.2 % per sixteen; s = 0.8:
//! 47.2 % per four against 46.5 % per two). The table is sized once for the bound and uses as
//! many of its slots as the log's object count asks for.
//!
//! The table is cheap enough to sit on the miss path: one relaxed load and store, two bytes a
//! slot, no allocation. A colliding URL overwrites a ghost (it is forgotten sooner) or, once in
//! 65,535 times, matches one (it is written a miss early): both only move the hit ratio, never
//! what is served.

use std::sync::atomic::{AtomicU16, Ordering};

use pingora::cache::key::HashBinary;

/// The table is sized for objects of this size on average filling the bound; fewer slots are
/// used while the log holds fewer objects.
const BYTES_PER_SLOT: u64 = 4 * 1024;
const MIN_SLOTS: u64 = 1 << 8;
/// Objects in the log per ghost slot in use (see the module note).
const OBJECTS_PER_GHOST: u64 = 4;
/// 32 MiB of table at most (a bound of 64 GiB or more).
const MAX_SLOTS: u64 = 1 << 24;

pub struct Ghosts {
    slots: Box<[AtomicU16]>,
}

impl Ghosts {
    /// A table for a tier bounded at `size` bytes.
    pub fn for_size(size: u64) -> Ghosts {
        let slots = (size / BYTES_PER_SLOT)
            .clamp(MIN_SLOTS, MAX_SLOTS)
            .next_power_of_two();
        Ghosts {
            slots: (0..slots).map(|_| AtomicU16::new(0)).collect(),
        }
    }

    /// True if `primary` left a ghost since another URL took its slot (the ghost is then laid
    /// to rest: the URL is being written); otherwise leaves one and returns false. `objects`:
    /// how many the log holds now.
    pub fn seen_again(&self, primary: &HashBinary, objects: u64) -> bool {
        let (slot, fingerprint) = self.place(primary, objects);
        let held = &self.slots[slot];
        if held.load(Ordering::Relaxed) == fingerprint {
            held.store(0, Ordering::Relaxed);
            return true;
        }
        held.store(fingerprint, Ordering::Relaxed);
        false
    }

    /// The slot and the (never zero: zero is an empty slot) fingerprint of a key, from
    /// different bytes of its hash, among the slots in use for `objects` in the log.
    fn place(&self, primary: &HashBinary, objects: u64) -> (usize, u16) {
        let in_use = (objects / OBJECTS_PER_GHOST)
            .clamp(MIN_SLOTS, self.slots.len() as u64)
            .next_power_of_two()
            .min(self.slots.len() as u64);
        let [a, b, c, d, e, f, g, h, i, j, ..] = *primary;
        let low = u64::from_le_bytes([a, b, c, d, e, f, g, h]);
        let slot = (low & (in_use - 1)) as usize;
        let fingerprint = u16::from_le_bytes([i, j]).max(1);
        (slot, fingerprint)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u32) -> HashBinary {
        let mut k = [0u8; 16];
        k[..4].copy_from_slice(&n.to_le_bytes());
        k[8..12].copy_from_slice(&(n.wrapping_mul(2_654_435_761)).to_le_bytes());
        k
    }

    #[test]
    fn a_url_is_admitted_on_its_second_miss_and_then_needs_two_more() {
        let ghosts = Ghosts::for_size(1 << 30);
        assert!(!ghosts.seen_again(&key(7), 1000));
        assert!(ghosts.seen_again(&key(7), 1000));
        assert!(
            !ghosts.seen_again(&key(7), 1000),
            "the ghost was laid to rest"
        );
        assert!(ghosts.seen_again(&key(7), 1000));
    }

    #[test]
    fn another_url_in_the_slot_pushes_a_ghost_out() {
        let ghosts = Ghosts::for_size(0);
        // 256 slots in use for 1024 objects: same slot (low bytes), different fingerprint.
        let (a, mut b) = (key(3), key(3 + 256));
        b[8] ^= 0x55;
        assert!(!ghosts.seen_again(&a, 1024));
        assert!(!ghosts.seen_again(&b, 1024));
        assert!(!ghosts.seen_again(&a, 1024), "pushed out by b");
    }

    #[test]
    fn more_objects_in_the_log_use_more_slots() {
        let ghosts = Ghosts::for_size(1 << 30);
        let (a, mut b) = (key(3), key(3 + 256));
        b[8] ^= 0x55;
        assert!(!ghosts.seen_again(&a, 100_000));
        assert!(!ghosts.seen_again(&b, 100_000));
        assert!(ghosts.seen_again(&a, 100_000), "a slot of its own");
    }

    #[test]
    fn the_table_grows_with_the_bound_within_limits() {
        assert_eq!(Ghosts::for_size(0).len(), 1 << 8);
        assert_eq!(Ghosts::for_size(1 << 30).len(), 1 << 18);
        assert_eq!(Ghosts::for_size(1 << 50).len(), 1 << 24);
    }
}
