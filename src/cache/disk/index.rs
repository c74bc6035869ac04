//! The disk tier's index: where each stored object is, in 24 bytes of table per object (a
//! 64-bit key and a [`Loc`]), so that a million objects cost tens of megabytes of memory, not
//! their heads. Everything else a hit needs (the metadata, the full key) is in the record the
//! index points at and is checked when read.
//!
//! Keys are 64 bits of the primary hash (and of the variant slot's, for a URL that varies).
//! Two URLs sharing them would share an entry: the later store replaces the earlier one's
//! entry, and a lookup that reads a record naming another URL treats it as a miss. A URL's
//! variants are also listed by its primary key, so a purge finds them all.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use pingora::cache::key::HashBinary;

/// Where an object's record is, and two facts about it that change without rewriting it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loc {
    pub seg: u32,
    pub offset: u32,
    /// The record's length (head and body, without padding).
    pub len: u32,
    /// Bit 31: read since it was written (a hot object, re-admitted when its segment is
    /// evicted). Bits 0–30: when it was soft-purged, in seconds since [`SOFT_EPOCH`] (0: not).
    flags: u32,
}

/// Unix time of 2020-01-01T00:00:00Z: soft-purge times count from it, in 31 bits (until 2088).
pub const SOFT_EPOCH: u64 = 1_577_836_800;
const TOUCHED: u32 = 1 << 31;

impl Loc {
    pub fn new(seg: u32, offset: u32, len: u32) -> Loc {
        Loc {
            seg,
            offset,
            len,
            flags: 0,
        }
    }

    /// The record's position in the log: later records have larger positions.
    pub fn position(&self) -> u64 {
        (u64::from(self.seg) << 32) | u64::from(self.offset)
    }

    pub fn touched(&self) -> bool {
        self.flags & TOUCHED != 0
    }

    /// When it was soft-purged, in Unix seconds.
    pub fn expired_at(&self) -> Option<u64> {
        let secs = self.flags & !TOUCHED;
        (secs != 0).then(|| SOFT_EPOCH + u64::from(secs))
    }

    pub fn with_expired_at(self, unix_secs: u64) -> Loc {
        let secs = unix_secs
            .saturating_sub(SOFT_EPOCH)
            .clamp(1, u64::from(!TOUCHED)) as u32;
        // A second soft purge keeps the first, earlier time.
        let secs = match self.flags & !TOUCHED {
            0 => secs,
            earlier => earlier.min(secs),
        };
        Loc {
            flags: (self.flags & TOUCHED) | secs,
            ..self
        }
    }

    /// The same object written again elsewhere keeps its soft purge, not its heat.
    pub fn moved_to(self, seg: u32, offset: u32, len: u32) -> Loc {
        Loc {
            seg,
            offset,
            len,
            flags: self.flags & !TOUCHED,
        }
    }

    /// The flags as stored in a checkpoint.
    pub fn flags(&self) -> u32 {
        self.flags
    }

    pub fn with_flags(self, flags: u32) -> Loc {
        Loc { flags, ..self }
    }
}

/// The 64-bit keys of a URL (its primary key) and of one of its variants.
pub fn keys(primary: &HashBinary, slot: Option<&HashBinary>) -> (u64, u64) {
    let p = word(primary);
    let key = match slot {
        None => p,
        Some(s) => {
            let k = p ^ word(s).rotate_left(17).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            // Never the primary slot's key.
            if k == p {
                !k
            } else {
                k
            }
        }
    };
    (p, key)
}

fn word(hash: &HashBinary) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&hash[..8]);
    u64::from_le_bytes(w)
}

/// Keys are hashes already: one multiply spreads them over the table.
#[derive(Default)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, k: u64) {
        self.0 = k.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type Table<V> = HashMap<u64, V, BuildHasherDefault<KeyHasher>>;

#[derive(Default)]
struct Shard {
    objects: Table<Loc>,
    /// A URL's variant keys (not its primary slot's, which is its primary key).
    variants: Table<Vec<u64>>,
}

pub const SHARDS: usize = 64;

pub struct Index {
    shards: Box<[Mutex<Shard>]>,
    count: AtomicU64,
    /// `[cache] max_variants`: indexing one more variant of a URL that has this many lets
    /// its oldest go (its record stays in its segment until the segment is evicted).
    max_variants: usize,
    /// Variants let go so.
    pub displaced: AtomicU64,
}

/// One entry as a checkpoint keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub primary: u64,
    pub key: u64,
    pub loc: Loc,
}

impl Default for Index {
    fn default() -> Self {
        Index::new(32)
    }
}

impl Index {
    pub fn new(max_variants: usize) -> Index {
        Index {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            count: AtomicU64::new(0),
            max_variants: max_variants.max(2),
            displaced: AtomicU64::new(0),
        }
    }

    fn shard(&self, primary: u64) -> std::sync::MutexGuard<'_, Shard> {
        let shard = &self.shards[(primary >> 58) as usize % SHARDS];
        shard
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Makes room for about `count` objects in all, spread over the shards, so that loading
    /// them does not grow the tables step by step.
    pub fn reserve(&self, count: u64) {
        let per_shard = usize::try_from(count / SHARDS as u64).unwrap_or(usize::MAX);
        // Shards fill unevenly: a few percent of slack keeps most from growing once more.
        let want = per_shard.saturating_add(per_shard / 16).saturating_add(16);
        for shard in self.shards.iter() {
            let mut shard = shard
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let have = shard.objects.len();
            shard.objects.reserve(want.saturating_sub(have));
        }
    }

    /// Where the object is, marking it read (see [`Loc::touched`]).
    pub fn get(&self, primary: &HashBinary, slot: Option<&HashBinary>) -> Option<Loc> {
        let (p, k) = keys(primary, slot);
        let mut shard = self.shard(p);
        let loc = shard.objects.get_mut(&k)?;
        loc.flags |= TOUCHED;
        Some(*loc)
    }

    /// Where the object is, without marking it read.
    pub fn peek(&self, primary: &HashBinary, slot: Option<&HashBinary>) -> Option<Loc> {
        let (p, k) = keys(primary, slot);
        self.shard(p).objects.get(&k).copied()
    }

    pub fn holds(&self, primary: &HashBinary) -> bool {
        let (p, _) = keys(primary, None);
        let shard = self.shard(p);
        shard.objects.contains_key(&p) || shard.variants.contains_key(&p)
    }

    /// Indexes an object, replacing what the key had; `only_if` makes it conditional on
    /// the key still being at that place (a copy of an object must not bring back one that
    /// was purged or replaced meanwhile). Returns whether it was indexed.
    pub fn insert(
        &self,
        primary: &HashBinary,
        slot: Option<&HashBinary>,
        loc: Loc,
        only_if: Option<Loc>,
    ) -> bool {
        let (p, k) = keys(primary, slot);
        let mut shard = self.shard(p);
        let current = shard.objects.get(&k).copied();
        if let Some(expected) = only_if {
            if current.map(|c| c.position()) != Some(expected.position()) {
                return false;
            }
        }
        self.put(&mut shard, p, k, loc, current);
        true
    }

    /// Indexes what a start-up scan found, unless the key holds a later record already (one
    /// written since this process started).
    pub fn insert_found(&self, entry: Entry) {
        let mut shard = self.shard(entry.primary);
        let current = shard.objects.get(&entry.key).copied();
        if current.is_some_and(|c| c.position() >= entry.loc.position()) {
            return;
        }
        self.put(&mut shard, entry.primary, entry.key, entry.loc, current);
    }

    fn put(&self, shard: &mut Shard, p: u64, k: u64, loc: Loc, current: Option<Loc>) {
        shard.objects.insert(k, loc);
        if current.is_none() {
            self.count.fetch_add(1, Ordering::Relaxed);
            if k != p {
                let keys = shard.variants.entry(p).or_default();
                keys.push(k);
                // The primary slot counts among them and stays: the others are found
                // through it.
                let primary_slot = usize::from(shard.objects.contains_key(&p));
                let over = (keys.len() + primary_slot).saturating_sub(self.max_variants);
                let oldest: Vec<u64> = keys.drain(..over.min(keys.len())).collect();
                for old in oldest {
                    if shard.objects.remove(&old).is_some() {
                        self.count.fetch_sub(1, Ordering::Relaxed);
                        self.displaced.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }

    /// Removes every variant of a URL written before `before` (a log position; `u64::MAX`
    /// for all). Returns where they were.
    pub fn remove_all(&self, primary: &HashBinary, before: u64) -> Vec<Loc> {
        let (p, _) = keys(primary, None);
        let mut shard = self.shard(p);
        let mut removed = Vec::new();
        let mut take = |objects: &mut Table<Loc>, k: u64| match objects.get(&k) {
            Some(loc) if loc.position() < before => {
                removed.push(*loc);
                objects.remove(&k);
                true
            }
            _ => false,
        };
        take(&mut shard.objects, p);
        if let Some(mut keys) = shard.variants.remove(&p) {
            keys.retain(|k| !take(&mut shard.objects, *k));
            if !keys.is_empty() {
                shard.variants.insert(p, keys);
            }
        }
        self.count
            .fetch_sub(removed.len() as u64, Ordering::Relaxed);
        removed
    }

    /// Removes one object if it is still at `loc` (damaged, or its segment evicted). Returns
    /// whether it was, and whether the URL has no variant left.
    pub fn remove_at(
        &self,
        primary: &HashBinary,
        slot: Option<&HashBinary>,
        loc: Loc,
    ) -> (bool, bool) {
        let (p, k) = keys(primary, slot);
        let mut shard = self.shard(p);
        if shard.objects.get(&k).map(Loc::position) != Some(loc.position()) {
            return (false, false);
        }
        shard.objects.remove(&k);
        self.count.fetch_sub(1, Ordering::Relaxed);
        if k != p {
            if let Some(keys) = shard.variants.get_mut(&p) {
                keys.retain(|x| *x != k);
                if keys.is_empty() {
                    shard.variants.remove(&p);
                }
            }
        }
        let none_left = !shard.objects.contains_key(&p) && !shard.variants.contains_key(&p);
        (true, none_left)
    }

    /// Marks every variant of a URL written before `before` soft-purged at `unix_secs`.
    /// Returns how many.
    pub fn expire_all(&self, primary: &HashBinary, before: u64, unix_secs: u64) -> usize {
        let (p, _) = keys(primary, None);
        let mut shard = self.shard(p);
        let mut keys = shard.variants.get(&p).cloned().unwrap_or_default();
        keys.push(p);
        let mut marked = 0;
        for k in keys {
            if let Some(loc) = shard.objects.get_mut(&k) {
                if loc.position() < before {
                    *loc = loc.with_expired_at(unix_secs);
                    marked += 1;
                }
            }
        }
        marked
    }

    /// Hands every entry to `each`, shard by shard (each shard locked only while it is read).
    pub fn for_each(&self, mut each: impl FnMut(Entry)) {
        for i in 0..SHARDS {
            self.for_each_in(i, &mut each);
        }
    }

    /// The entries of one shard (of [`SHARDS`]), copied out: a pass over the index that does
    /// slow work per entry holds no lock meanwhile and never copies the whole index.
    pub fn shard_entries(&self, shard: usize) -> Vec<Entry> {
        let mut out = Vec::new();
        self.for_each_in(shard, |e| out.push(e));
        out
    }

    fn for_each_in(&self, shard: usize, mut each: impl FnMut(Entry)) {
        let Some(shard) = self.shards.get(shard) else {
            return;
        };
        let shard = shard
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut variant_of = Table::<u64>::default();
        for (p, keys) in &shard.variants {
            for k in keys {
                variant_of.insert(*k, *p);
            }
        }
        for (k, loc) in &shard.objects {
            each(Entry {
                primary: variant_of.get(k).copied().unwrap_or(*k),
                key: *k,
                loc: *loc,
            });
        }
    }

    /// Every entry (for tests).
    #[cfg(test)]
    pub fn entries(&self) -> Vec<Entry> {
        let mut out = Vec::with_capacity(self.count() as usize);
        self.for_each(|e| out.push(e));
        out
    }

    /// Removes every entry in segment `seg`, returning how many (a segment evicted, or found
    /// missing at start).
    pub fn drop_segment(&self, seg: u32) -> usize {
        let mut dropped = 0;
        for shard in self.shards.iter() {
            let mut shard = shard
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let gone: std::collections::HashSet<u64> = shard
                .objects
                .iter()
                .filter(|(_, loc)| loc.seg == seg)
                .map(|(k, _)| *k)
                .collect();
            for k in &gone {
                shard.objects.remove(k);
            }
            if !gone.is_empty() {
                shard.variants.retain(|_, keys| {
                    keys.retain(|k| !gone.contains(k));
                    !keys.is_empty()
                });
            }
            dropped += gone.len();
        }
        self.count.fetch_sub(dropped as u64, Ordering::Relaxed);
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(n: u8) -> HashBinary {
        let mut h = [0u8; 16];
        h[0] = n;
        h[7] = n.wrapping_mul(31);
        h
    }

    /// As the memory tier: a URL's variants are bounded, the oldest indexed going first.
    #[test]
    fn a_url_keeps_at_most_max_variants_on_disk() {
        let index = Index::new(4);
        let url = hash(1);
        index.insert(&url, None, Loc::new(1, 1000, 10), None);
        for n in 0..5u8 {
            index.insert(
                &url,
                Some(&hash(10 + n)),
                Loc::new(1, u32::from(n) * 16, 10),
                None,
            );
        }
        assert_eq!(index.get(&url, Some(&hash(10))), None);
        assert_eq!(index.get(&url, Some(&hash(11))), None);
        for n in 2..5u8 {
            assert!(index.get(&url, Some(&hash(10 + n))).is_some());
        }
        assert!(index.get(&url, None).is_some(), "the primary slot stays");
        assert_eq!(index.count(), 4);
        assert_eq!(index.displaced.load(Ordering::Relaxed), 2);
        assert_eq!(index.remove_all(&url, u64::MAX).len(), 4);
        assert_eq!(index.count(), 0);
    }

    #[test]
    fn variants_are_found_purged_and_counted_with_their_url() {
        let index = Index::default();
        let (url, other) = (hash(1), hash(2));
        index.insert(&url, None, Loc::new(1, 0, 10), None);
        index.insert(&url, Some(&hash(9)), Loc::new(1, 16, 10), None);
        index.insert(&url, Some(&hash(8)), Loc::new(2, 0, 10), None);
        index.insert(&other, None, Loc::new(2, 16, 10), None);
        assert_eq!(index.count(), 4);
        assert!(index.get(&url, Some(&hash(9))).unwrap().touched());
        assert_eq!(index.get(&url, Some(&hash(7))), None);
        // Written before (2, 0): two of the URL's three.
        let removed = index.remove_all(&url, Loc::new(2, 0, 0).position());
        assert_eq!(removed.len(), 2);
        assert_eq!(index.count(), 2);
        assert!(index.holds(&url));
        assert_eq!(index.remove_all(&url, u64::MAX).len(), 1);
        assert!(!index.holds(&url));
        assert!(index.holds(&other));
        assert_eq!(index.entries().len(), 1);
    }

    #[test]
    fn a_conditional_insert_does_not_bring_back_what_was_purged() {
        let index = Index::default();
        let url = hash(3);
        let first = Loc::new(1, 0, 10);
        index.insert(&url, None, first, None);
        assert!(index.insert(&url, None, Loc::new(1, 16, 10), Some(first)));
        assert!(!index.insert(&url, None, Loc::new(1, 32, 10), Some(first)));
        index.remove_all(&url, u64::MAX);
        assert!(!index.insert(&url, None, Loc::new(1, 48, 10), Some(first)));
        assert_eq!(index.count(), 0);
    }

    #[test]
    fn soft_purges_keep_the_earliest_time_and_survive_a_move() {
        let index = Index::default();
        let url = hash(4);
        index.insert(&url, Some(&hash(5)), Loc::new(1, 0, 10), None);
        assert_eq!(index.expire_all(&url, u64::MAX, SOFT_EPOCH + 100), 1);
        assert_eq!(index.expire_all(&url, u64::MAX, SOFT_EPOCH + 200), 1);
        let loc = index.get(&url, Some(&hash(5))).unwrap();
        assert_eq!(loc.expired_at(), Some(SOFT_EPOCH + 100));
        let moved = loc.moved_to(3, 8, 10);
        assert_eq!(
            (moved.expired_at(), moved.touched()),
            (Some(SOFT_EPOCH + 100), false)
        );
    }

    #[test]
    fn a_scan_never_replaces_a_later_record_and_a_lost_segment_drops_its_entries() {
        let index = Index::default();
        let url = hash(6);
        let (p, k) = keys(&url, None);
        index.insert(&url, None, Loc::new(5, 0, 10), None);
        index.insert_found(Entry {
            primary: p,
            key: k,
            loc: Loc::new(4, 0, 10),
        });
        assert_eq!(index.get(&url, None).unwrap().seg, 5);
        let (p2, k2) = keys(&hash(7), Some(&hash(1)));
        index.insert_found(Entry {
            primary: p2,
            key: k2,
            loc: Loc::new(4, 8, 10),
        });
        assert!(index.holds(&hash(7)));
        assert_eq!(index.drop_segment(4), 1);
        assert!(!index.holds(&hash(7)));
        assert_eq!(index.count(), 1);
    }
}
