//! The memory tier's index: a bounded, concurrent map from a primary key to what the tier
//! keeps for it, evicting by weight under W-TinyLFU (a small LRU window, then a segmented LRU
//! whose door is a frequency sketch), and dropping an entry once its useful life is over. It
//! owns the entries' order and their frequencies; it does not know what a value is (the tier
//! gives a weight and a lifetime for each).
//!
//! Why not moka, which the tier used before: an entry there costs about 180 bytes at a million
//! entries (its key in an `Arc`, an entry-info block, deque and timer-wheel nodes, a bucket;
//! benches/README.md §21). Here it is one slot in a vector (key, value, weight, deadline,
//! links: 48 bytes), a 4-byte cell of a hash table at most 80 % full and 8 bytes of sketch.
//!
//! Expiry is lazy: an entry past its deadline is dropped when it is next looked up, when an
//! eviction reaches it, or by a sweep that looks at two slots per insert, so dead entries
//! leave without a timer per entry.

use std::hash::BuildHasher;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pingora::cache::key::HashBinary;

/// Why an entry left other than by an explicit removal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// Evicted to make room.
    Size,
    /// Its useful life was over.
    Expired,
}

/// What [`Index::compute`] does with the entry it was shown.
pub enum Op<V> {
    Nop,
    Put(V),
    Remove,
}

type Listener<V> = Box<dyn Fn(&HashBinary, V, Removal) + Send + Sync>;

pub struct Index<V> {
    shards: Box<[Mutex<Shard<V>>]>,
    /// Keys are hashes of URLs that clients choose, and the table's buckets follow the key's
    /// low bits: mixed with a secret per process, a client cannot aim many keys at one bucket.
    seed: u64,
    epoch: Instant,
    weigh: fn(&V) -> u32,
    life: fn(&V) -> Duration,
    listener: Option<Listener<V>>,
    /// Seconds added to the clock, for tests of expiry.
    #[cfg(test)]
    skew: std::sync::atomic::AtomicU32,
}

/// The least a shard holds, so that the largest object the tier stores still fits one shard
/// many times over; more shards only while each keeps this much.
const SHARD_FLOOR: u64 = 64 << 20;
const MAX_SHARDS: u64 = 64;
const NIL: u32 = u32::MAX;

/// The lists of W-TinyLFU: a new entry enters the window; leaving it, it must win against
/// the main space's least recently used entry on frequency to stay (probation); a second
/// hit moves it to the protected segment.
const WINDOW: u8 = 0;
const PROBATION: u8 = 1;
const PROTECTED: u8 = 2;
/// A slot on no list: free for the next entry.
const FREE: u8 = 3;

impl<V: Clone> Index<V> {
    /// An index holding at most `capacity` weight; `vacant` is what a free slot holds (a
    /// value that keeps nothing alive).
    pub fn new(
        capacity: u64,
        vacant: V,
        weigh: fn(&V) -> u32,
        life: fn(&V) -> Duration,
        listener: Option<Listener<V>>,
    ) -> Index<V> {
        let shards = (capacity / SHARD_FLOOR).clamp(1, MAX_SHARDS);
        // A power of two at most that.
        let shards = 1u64 << (63 - shards.leading_zeros());
        let each = capacity / shards;
        let seed = std::collections::hash_map::RandomState::new().hash_one(0x5eed_u64);
        Index {
            shards: (0..shards)
                .map(|_| Mutex::new(Shard::new(each, seed, vacant.clone())))
                .collect(),
            seed,
            epoch: Instant::now(),
            weigh,
            life,
            listener,
            #[cfg(test)]
            skew: std::sync::atomic::AtomicU32::new(0),
        }
    }

    fn hash(&self, key: &HashBinary) -> u64 {
        mix(self.seed, key)
    }

    fn shard(&self, hash: u64) -> MutexGuard<'_, Shard<V>> {
        // The table's cells use the low bits and its tags the top six: the shard takes bits
        // from the middle.
        let at = (hash >> 32) as usize & (self.shards.len() - 1);
        // A panic while a shard was held leaves its lists consistent (no method panics
        // between two link writes), so a poisoned lock is taken as it is.
        self.shards[at].lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now(&self) -> u32 {
        self.seconds_at(Instant::now())
    }

    /// Whole seconds from the index's epoch to `at`.
    fn seconds_at(&self, at: Instant) -> u32 {
        let since = at.saturating_duration_since(self.epoch);
        let now = since.as_secs().min(u64::from(u32::MAX)) as u32;
        #[cfg(test)]
        let now = now + self.skew.load(std::sync::atomic::Ordering::Relaxed);
        now
    }

    fn deadline(&self, value: &V) -> u32 {
        let life = (self.life)(value).as_secs().saturating_add(1);
        u64::from(self.now())
            .saturating_add(life)
            .min(u64::from(u32::MAX)) as u32
    }

    fn tell(&self, gone: Vec<(HashBinary, V, Removal)>) {
        if let Some(listener) = &self.listener {
            for (key, value, why) in gone {
                listener(&key, value, why);
            }
        }
    }

    /// The value for `key`, counted as an access.
    pub fn get(&self, key: &HashBinary) -> Option<V> {
        self.get_at(key, Instant::now())
    }

    /// [`Self::get`] by a clock read at `at`, for a caller that has just read it.
    pub fn get_at(&self, key: &HashBinary, at: Instant) -> Option<V> {
        let hash = self.hash(key);
        let now = self.seconds_at(at);
        let mut gone = Vec::new();
        let found = {
            let mut shard = self.shard(hash);
            shard.sketch.increment(hash);
            match shard.find(hash, key) {
                Some(at) if shard.slots[at as usize].deadline() <= now => {
                    gone.extend(shard.unlink(hash, at, Removal::Expired));
                    None
                }
                Some(at) => {
                    shard.touch(at);
                    Some(shard.slots[at as usize].value.clone())
                }
                None => None,
            }
        };
        self.tell(gone);
        found
    }

    /// Whether `key` has a live entry; not counted as an access.
    pub fn contains(&self, key: &HashBinary) -> bool {
        let hash = self.hash(key);
        let now = self.now();
        let shard = self.shard(hash);
        shard
            .find(hash, key)
            .is_some_and(|at| shard.slots[at as usize].deadline() > now)
    }

    /// Replaces, removes or leaves the entry for `key` as `f` decides from the live value (or
    /// `None`), atomically with respect to every other call for the same key.
    pub fn compute(&self, key: &HashBinary, f: impl FnOnce(Option<&V>) -> Op<V>) {
        let hash = self.hash(key);
        let now = self.now();
        let mut gone = Vec::new();
        {
            let mut shard = self.shard(hash);
            let mut at = shard.find(hash, key);
            if let Some(a) = at.filter(|a| shard.slots[*a as usize].deadline() <= now) {
                gone.extend(shard.unlink(hash, a, Removal::Expired));
                at = None;
            }
            let current = at.map(|a| &shard.slots[a as usize].value);
            let mut op = f(current);
            if let Op::Put(value) = &op {
                if u64::from((self.weigh)(value)) > shard.capacity {
                    // It could only stay by evicting everything else: not admitted.
                    if let Op::Put(value) = std::mem::replace(&mut op, Op::Remove) {
                        gone.push((*key, value, Removal::Size));
                    }
                }
            }
            match (op, at) {
                (Op::Nop, _) => {}
                (Op::Remove, Some(a)) => {
                    shard.unlink(hash, a, Removal::Size);
                }
                (Op::Remove, None) => {}
                (Op::Put(value), Some(a)) => {
                    let (weight, deadline) = ((self.weigh)(&value), self.deadline(&value));
                    shard.replace(a, value, weight, deadline);
                    shard.evict(now, &mut gone);
                }
                (Op::Put(value), None) => {
                    let (weight, deadline) = ((self.weigh)(&value), self.deadline(&value));
                    shard.sketch.increment(hash);
                    shard.insert(hash, *key, value, weight, deadline, &mut gone);
                    shard.sweep(now, &mut gone);
                    shard.evict(now, &mut gone);
                }
            }
        }
        self.tell(gone);
    }

    /// Removes the entry for `key`; returns its value if it was live.
    pub fn remove(&self, key: &HashBinary) -> Option<V> {
        let hash = self.hash(key);
        let now = self.now();
        let mut shard = self.shard(hash);
        let at = shard.find(hash, key)?;
        let live = shard.slots[at as usize].deadline() > now;
        let (_, value, _) = shard.unlink(hash, at, Removal::Size)?;
        live.then_some(value)
    }

    /// The weight of every entry, live or past its deadline and not yet dropped.
    pub fn weight(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).weight())
            .sum()
    }

    /// Calls `f` with every live value.
    pub fn for_each(&self, mut f: impl FnMut(&V)) {
        let now = self.now();
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            for slot in &shard.slots {
                if slot.list() != FREE && slot.deadline() > now {
                    f(&slot.value);
                }
            }
        }
    }
}

/// `key` mixed with `seed`: a folded multiply of its two halves, each offset by a secret.
fn mix(seed: u64, key: &HashBinary) -> u64 {
    let mut low = [0u8; 8];
    let mut high = [0u8; 8];
    low.copy_from_slice(&key[..8]);
    high.copy_from_slice(&key[8..]);
    let product = u128::from(u64::from_le_bytes(low) ^ seed)
        * u128::from(u64::from_le_bytes(high) ^ seed.rotate_left(32) ^ 0x9e37_79b9_7f4a_7c15);
    (product as u64) ^ ((product >> 64) as u64)
}

/// The slots by key: open addressing with linear probing over 32-bit cells, each a slot's
/// number and six bits of its key's hash (so a probe rarely reads a slot that is not the one
/// sought). At most 80 % full; a removal shifts the cells after it back (no tombstones).
struct Table {
    cells: Vec<u32>,
    len: usize,
}

const EMPTY: u32 = u32::MAX;
const TAG_BITS: u32 = 6;
/// Slots a shard can number in a cell.
const MAX_SLOTS: usize = 1 << (32 - TAG_BITS);

impl Table {
    fn new() -> Table {
        Table {
            cells: vec![EMPTY; 16],
            len: 0,
        }
    }

    fn mask(&self) -> usize {
        self.cells.len() - 1
    }

    fn home(&self, hash: u64) -> usize {
        hash as usize & self.mask()
    }

    fn tag(hash: u64) -> u32 {
        (hash >> (64 - TAG_BITS)) as u32
    }

    fn cell(at: u32, hash: u64) -> u32 {
        (at << TAG_BITS) | Table::tag(hash)
    }

    /// The cells from `hash`'s home up to the first empty one.
    fn probe(&self, hash: u64) -> impl Iterator<Item = (usize, u32)> + '_ {
        let mask = self.mask();
        let home = self.home(hash);
        (0..self.cells.len())
            .map(move |i| (home + i) & mask)
            .map(|i| (i, self.cells[i]))
            .take_while(|(_, c)| *c != EMPTY)
    }

    fn find(&self, hash: u64, is: impl Fn(u32) -> bool) -> Option<u32> {
        let tag = Table::tag(hash);
        self.probe(hash)
            .filter(|(_, c)| c & ((1 << TAG_BITS) - 1) == tag)
            .map(|(_, c)| c >> TAG_BITS)
            .find(|at| is(*at))
    }

    fn insert(&mut self, hash: u64, at: u32, hash_of: impl Fn(u32) -> u64) {
        if (self.len + 1) * 5 > self.cells.len() * 4 {
            self.grow(hash_of);
        }
        let mask = self.mask();
        let mut i = self.home(hash);
        while self.cells[i] != EMPTY {
            i = (i + 1) & mask;
        }
        self.cells[i] = Table::cell(at, hash);
        self.len += 1;
    }

    fn grow(&mut self, hash_of: impl Fn(u32) -> u64) {
        let doubled = vec![EMPTY; self.cells.len() * 2];
        let old = std::mem::replace(&mut self.cells, doubled);
        let mask = self.mask();
        for cell in old.into_iter().filter(|c| *c != EMPTY) {
            let hash = hash_of(cell >> TAG_BITS);
            let mut i = self.home(hash);
            while self.cells[i] != EMPTY {
                i = (i + 1) & mask;
            }
            self.cells[i] = cell;
        }
    }

    /// Removes slot `at`, whose key hashes to `hash`.
    fn remove(&mut self, hash: u64, at: u32, hash_of: impl Fn(u32) -> u64) {
        let Some((mut hole, _)) = self.probe(hash).find(|(_, c)| c >> TAG_BITS == at) else {
            return;
        };
        self.cells[hole] = EMPTY;
        self.len -= 1;
        let mask = self.mask();
        let mut i = hole;
        loop {
            i = (i + 1) & mask;
            let cell = self.cells[i];
            if cell == EMPTY {
                return;
            }
            // A cell may move back into the hole unless its home lies after the hole, up to
            // where it is now (cyclically): then the hole is not on its probe path.
            let home = self.home(hash_of(cell >> TAG_BITS));
            let stays = if hole <= i {
                hole < home && home <= i
            } else {
                hole < home || home <= i
            };
            if !stays {
                self.cells[hole] = cell;
                self.cells[i] = EMPTY;
                hole = i;
            }
        }
    }
}

struct Slot<V> {
    key: HashBinary,
    /// The index's vacant value while the slot is free.
    value: V,
    weight: u32,
    /// The list the slot is on (two bits) and, below, the second since the index's epoch at
    /// which the entry stops being useful: one word keeps a slot in 48 bytes.
    list_deadline: u32,
    prev: u32,
    next: u32,
}

const DEADLINE_BITS: u32 = 30;
/// About 34 years after the process started.
const LAST_DEADLINE: u32 = (1 << DEADLINE_BITS) - 1;

impl<V> Slot<V> {
    fn deadline(&self) -> u32 {
        self.list_deadline & LAST_DEADLINE
    }

    fn list(&self) -> u8 {
        (self.list_deadline >> DEADLINE_BITS) as u8
    }

    fn set(&mut self, list: u8, deadline: u32) {
        self.list_deadline = (u32::from(list) << DEADLINE_BITS) | deadline.min(LAST_DEADLINE);
    }
}

/// A doubly linked list through the slots: `head` the most recently used, `tail` the least.
#[derive(Clone, Copy)]
struct List {
    head: u32,
    tail: u32,
}

struct Shard<V> {
    table: Table,
    slots: Vec<Slot<V>>,
    free: Vec<u32>,
    lists: [List; 3],
    weights: [u64; 3],
    capacity: u64,
    sketch: Sketch,
    /// Where the expiry sweep looks next.
    sweep_at: usize,
    seed: u64,
    vacant: V,
}

impl<V: Clone> Shard<V> {
    fn new(capacity: u64, seed: u64, vacant: V) -> Shard<V> {
        Shard {
            table: Table::new(),
            slots: Vec::new(),
            free: Vec::new(),
            lists: [List {
                head: NIL,
                tail: NIL,
            }; 3],
            weights: [0; 3],
            capacity,
            sketch: Sketch::new(),
            sweep_at: 0,
            seed,
            vacant,
        }
    }

    fn weight(&self) -> u64 {
        self.weights.iter().sum()
    }

    /// The main space's share: 99 % (the window takes 1 %), 80 % of it protected.
    fn window_cap(&self) -> u64 {
        (self.capacity / 100).max(1)
    }

    fn protected_cap(&self) -> u64 {
        (self.capacity - self.window_cap()) / 5 * 4
    }

    fn find(&self, hash: u64, key: &HashBinary) -> Option<u32> {
        self.table
            .find(hash, |at| self.slots[at as usize].key == *key)
    }

    fn link_head(&mut self, at: u32, list: u8) {
        let head = self.lists[list as usize].head;
        {
            let slot = &mut self.slots[at as usize];
            slot.prev = NIL;
            slot.next = head;
            let deadline = slot.deadline();
            slot.set(list, deadline);
        }
        if head == NIL {
            self.lists[list as usize].tail = at;
        } else {
            self.slots[head as usize].prev = at;
        }
        self.lists[list as usize].head = at;
        self.weights[list as usize] += u64::from(self.slots[at as usize].weight);
    }

    fn detach(&mut self, at: u32) {
        let (prev, next, list, weight) = {
            let s = &self.slots[at as usize];
            (s.prev, s.next, s.list(), s.weight)
        };
        if prev == NIL {
            self.lists[list as usize].head = next;
        } else {
            self.slots[prev as usize].next = next;
        }
        if next == NIL {
            self.lists[list as usize].tail = prev;
        } else {
            self.slots[next as usize].prev = prev;
        }
        self.weights[list as usize] -= u64::from(weight);
    }

    /// A hit: to the front of its list, or from probation into the protected segment.
    fn touch(&mut self, at: u32) {
        let list = self.slots[at as usize].list();
        self.detach(at);
        if list == PROBATION {
            self.link_head(at, PROTECTED);
            self.demote_protected();
        } else {
            self.link_head(at, list);
        }
    }

    fn demote_protected(&mut self) {
        self.spill(PROTECTED, self.protected_cap());
    }

    /// Moves the least recently used entries of `list` to the front of probation until `list`
    /// weighs at most `cap`; returns how many moved.
    fn spill(&mut self, list: u8, cap: u64) -> usize {
        let mut moved = 0;
        while self.weights[list as usize] > cap {
            let tail = self.lists[list as usize].tail;
            if tail == NIL {
                break;
            }
            self.detach(tail);
            self.link_head(tail, PROBATION);
            moved += 1;
        }
        moved
    }

    fn insert(
        &mut self,
        hash: u64,
        key: HashBinary,
        value: V,
        weight: u32,
        deadline: u32,
        gone: &mut Vec<(HashBinary, V, Removal)>,
    ) {
        if self.free.is_empty() && self.slots.len() >= MAX_SLOTS {
            // More entries than a cell can number (no shard reaches this: every object
            // weighs hundreds of bytes): not admitted.
            gone.push((key, value, Removal::Size));
            return;
        }
        let slot = Slot {
            key,
            value,
            weight,
            list_deadline: deadline.min(LAST_DEADLINE),
            prev: NIL,
            next: NIL,
        };
        let at = match self.free.pop() {
            Some(at) => {
                self.slots[at as usize] = slot;
                at
            }
            None => {
                self.slots.push(slot);
                (self.slots.len() - 1) as u32
            }
        };
        let (slots, seed) = (&self.slots, self.seed);
        self.table
            .insert(hash, at, |a| mix(seed, &slots[a as usize].key));
        self.link_head(at, WINDOW);
        self.sketch.fit(self.table.len);
    }

    fn replace(&mut self, at: u32, value: V, weight: u32, deadline: u32) {
        let list = self.slots[at as usize].list();
        self.detach(at);
        let slot = &mut self.slots[at as usize];
        slot.value = value;
        slot.weight = weight;
        slot.set(list, deadline);
        self.link_head(at, list);
    }

    fn unlink_at(&mut self, at: u32, why: Removal) -> Option<(HashBinary, V, Removal)> {
        let hash = mix(self.seed, &self.slots[at as usize].key);
        self.unlink(hash, at, why)
    }

    /// Takes the entry at `at` out; returns it with `why`.
    fn unlink(&mut self, hash: u64, at: u32, why: Removal) -> Option<(HashBinary, V, Removal)> {
        if self.slots[at as usize].list() == FREE {
            return None;
        }
        self.detach(at);
        let (slots, seed) = (&self.slots, self.seed);
        self.table
            .remove(hash, at, |a| mix(seed, &slots[a as usize].key));
        self.free.push(at);
        let vacant = self.vacant.clone();
        let slot = &mut self.slots[at as usize];
        slot.weight = 0;
        slot.set(FREE, 0);
        let value = std::mem::replace(&mut slot.value, vacant);
        Some((slot.key, value, why))
    }

    /// Looks at the next two slots and drops either if its life is over.
    fn sweep(&mut self, now: u32, gone: &mut Vec<(HashBinary, V, Removal)>) {
        for _ in 0..2 {
            if self.slots.is_empty() {
                return;
            }
            self.sweep_at = (self.sweep_at + 1) % self.slots.len();
            let at = self.sweep_at as u32;
            let slot = &self.slots[at as usize];
            if slot.list() != FREE && slot.deadline() <= now {
                gone.extend(self.unlink_at(at, Removal::Expired));
            }
        }
    }

    /// Brings the shard within its capacity: the window's overflow moves to probation, then
    /// each entry that left the window is kept only if the sketch has seen it more often than
    /// the main space's least recently used entry, which otherwise goes.
    fn evict(&mut self, now: u32, gone: &mut Vec<(HashBinary, V, Removal)>) {
        let mut candidates = self.spill(WINDOW, self.window_cap());
        while self.weight() > self.capacity {
            let Some(victim) = [PROBATION, PROTECTED, WINDOW]
                .iter()
                .map(|l| self.lists[*l as usize].tail)
                .find(|t| *t != NIL)
            else {
                break;
            };
            let dead = |at: u32| self.slots[at as usize].deadline() <= now;
            let freq = |at: u32| {
                self.sketch
                    .frequency(mix(self.seed, &self.slots[at as usize].key))
            };
            let head = self.lists[PROBATION as usize].head;
            let candidate = (candidates > 0 && head != NIL && head != victim).then_some(head);
            let loser = match candidate {
                Some(c) if !dead(victim) && (dead(c) || freq(c) <= freq(victim)) => c,
                _ => victim,
            };
            if candidates > 0 && loser == head {
                candidates -= 1;
            }
            let why = if dead(loser) {
                Removal::Expired
            } else {
                Removal::Size
            };
            gone.extend(self.unlink_at(loser, why));
        }
    }
}

/// A count-min sketch of 4-bit counters, four per key in one 64-bit word, halved every ten
/// increments per counter word so that old popularity fades (TinyLFU).
struct Sketch {
    words: Vec<u64>,
    additions: usize,
}

impl Sketch {
    fn new() -> Sketch {
        Sketch {
            words: vec![0; 64],
            additions: 0,
        }
    }

    /// Grows to a word per entry (cleared: a sketch of a much smaller table would saturate).
    fn fit(&mut self, entries: usize) {
        if entries > self.words.len() {
            self.words = vec![0; entries.next_power_of_two()];
            self.additions = 0;
        }
    }

    fn cells(&self, hash: u64) -> (usize, [u32; 4]) {
        let word = (hash as usize) & (self.words.len() - 1);
        let spread = hash >> 32;
        let mut shifts = [0u32; 4];
        for (row, shift) in shifts.iter_mut().enumerate() {
            // Each row a nibble of its own quarter of the word.
            let nibble = ((spread >> (row * 2)) & 3) as u32;
            *shift = (row as u32 * 4 + nibble) * 4;
        }
        (word, shifts)
    }

    fn frequency(&self, hash: u64) -> u8 {
        let (word, shifts) = self.cells(hash);
        shifts
            .iter()
            .map(|s| ((self.words[word] >> s) & 15) as u8)
            .min()
            .unwrap_or(0)
    }

    fn increment(&mut self, hash: u64) {
        let (word, shifts) = self.cells(hash);
        let mut added = false;
        for s in shifts {
            if (self.words[word] >> s) & 15 < 15 {
                self.words[word] += 1 << s;
                added = true;
            }
        }
        if added {
            self.additions += 1;
            if self.additions >= 10 * self.words.len() {
                for w in &mut self.words {
                    // Halve every counter: shift, then clear what crossed a nibble.
                    *w = (*w >> 1) & 0x7777_7777_7777_7777;
                }
                self.additions /= 2;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    fn key(i: u64) -> HashBinary {
        // Keys are hashes in the tier: spread them as one would be.
        let h = mix(0x1234, &{
            let mut k = [0u8; 16];
            k[..8].copy_from_slice(&i.to_le_bytes());
            k
        });
        let mut k = [0u8; 16];
        k[..8].copy_from_slice(&h.to_le_bytes());
        k[8..].copy_from_slice(&i.to_le_bytes());
        k
    }

    /// Values are their own weight; their life is a minute unless the weight is odd.
    fn index(capacity: u64) -> Index<u32> {
        Index::new(
            capacity,
            0,
            |v| *v,
            |v| Duration::from_secs(if v % 2 == 1 { 0 } else { 60 }),
            None,
        )
    }

    fn put(index: &Index<u32>, k: u64, v: u32) {
        index.compute(&key(k), |_| Op::Put(v));
    }

    /// What an entry costs (the module's opening comment): a slot of 48 bytes for a value of
    /// two words, as the memory tier's family is.
    #[test]
    fn a_slot_is_48_bytes() {
        assert_eq!(std::mem::size_of::<Slot<[usize; 2]>>(), 48);
    }

    /// Against a reference map, with hashes crowded into few homes (long probe runs that wrap
    /// around the end) so that every case of the backward shift happens.
    #[test]
    fn the_table_finds_what_it_holds_through_inserts_and_removals() {
        let mut table = Table::new();
        let mut hashes: Vec<u64> = Vec::new();
        let mut held = std::collections::HashSet::new();
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..1_200u32 {
            let r = next();
            if r % 3 == 0 && !held.is_empty() {
                let at = *held.iter().nth((r >> 8) as usize % held.len()).unwrap();
                table.remove(hashes[at as usize], at, |a| hashes[a as usize]);
                held.remove(&at);
            } else {
                // Homes crowd into the last few cells; tags vary.
                let hash = (r & 0xfc00_0000_0000_0000) | (u64::MAX - (r >> 20) % 7);
                let at = hashes.len() as u32;
                hashes.push(hash);
                table.insert(hash, at, |a| hashes[a as usize]);
                held.insert(at);
            }
            if round % 10 == 0 {
                for (at, hash) in hashes.iter().enumerate() {
                    let at = at as u32;
                    assert_eq!(
                        table.find(*hash, |a| a == at).is_some(),
                        held.contains(&at),
                        "slot {at} at round {round}"
                    );
                }
                assert_eq!(table.len, held.len());
            }
        }
    }

    #[test]
    fn compute_puts_replaces_and_removes() {
        let index = index(1 << 20);
        assert_eq!(index.get(&key(1)), None);
        put(&index, 1, 10);
        assert_eq!(index.get(&key(1)), Some(10));
        index.compute(&key(1), |old| Op::Put(old.unwrap() + 10));
        assert_eq!(index.get(&key(1)), Some(20));
        assert_eq!(index.weight(), 20);
        index.compute(&key(1), |_| Op::Nop);
        assert!(index.contains(&key(1)));
        index.compute(&key(1), |_| Op::Remove);
        assert!(!index.contains(&key(1)));
        assert_eq!(index.weight(), 0);
        put(&index, 2, 4);
        assert_eq!(index.remove(&key(2)), Some(4));
        assert_eq!(index.remove(&key(2)), None);
    }

    #[test]
    fn the_bound_holds_and_what_leaves_is_told() {
        let evicted = Arc::new(AtomicU64::new(0));
        let told = evicted.clone();
        let index: Index<u32> = Index::new(
            10_000,
            0,
            |v| *v,
            |_| Duration::from_secs(60),
            Some(Box::new(move |_, v, why| {
                assert_eq!(why, Removal::Size);
                told.fetch_add(u64::from(v), Ordering::Relaxed);
            })),
        );
        for i in 0..1000 {
            put(&index, i, 100);
            assert!(index.weight() <= 10_000);
        }
        assert_eq!(index.weight() + evicted.load(Ordering::Relaxed), 100_000);
        // Heavier than the whole index: not admitted, and told as evicted.
        put(&index, 5000, 20_000);
        assert!(!index.contains(&key(5000)));
        assert_eq!(index.weight() + evicted.load(Ordering::Relaxed), 120_000);
    }

    /// TinyLFU's point: a scan of keys seen once does not push out the keys in use.
    #[test]
    fn a_scan_does_not_evict_what_is_popular() {
        let index = index(100 * 100);
        for i in 0..50 {
            put(&index, i, 100);
        }
        for _ in 0..5 {
            for i in 0..50 {
                assert_eq!(index.get(&key(i)), Some(100));
            }
        }
        for i in 1000..3000 {
            put(&index, i, 100);
        }
        let kept = (0..50).filter(|i| index.contains(&key(*i))).count();
        assert!(kept >= 45, "only {kept} of 50 popular keys kept");
    }

    #[test]
    fn an_entry_past_its_life_is_gone() {
        let expired = Arc::new(AtomicU64::new(0));
        let told = expired.clone();
        let index: Index<u32> = Index::new(
            1 << 20,
            0,
            |v| *v,
            |v| Duration::from_secs(if v % 2 == 1 { 0 } else { 60 }),
            Some(Box::new(move |_, _, why| {
                if why == Removal::Expired {
                    told.fetch_add(1, Ordering::Relaxed);
                }
            })),
        );
        put(&index, 1, 11);
        put(&index, 2, 12);
        for i in 10..20 {
            put(&index, i, 13);
        }
        assert_eq!(index.get(&key(1)), Some(11));
        index.skew.store(2, Ordering::Relaxed);
        assert_eq!(index.get(&key(1)), None);
        assert!(!index.contains(&key(10)));
        assert_eq!(index.get(&key(2)), Some(12));
        // The sweep drops the others as new entries come.
        for i in 100..120 {
            put(&index, i, 14);
        }
        assert_eq!(expired.load(Ordering::Relaxed), 11);
        assert_eq!(index.weight(), 12 + 20 * 14);
        let mut live = 0;
        index.for_each(|_| live += 1);
        assert_eq!(live, 21);
    }
}
