//! The dashboard's "top URLs" and "top misses" over the last five minutes, and its list of
//! recent purges: bounded heavy-hitter sketches (space-saving, Metwally et al. 2005) over the
//! canonical key, one per minute, merged when read. No URL ever becomes a metric label; the
//! sketches hold at most [`CAPACITY`] keys each, [`MINUTES`] minutes of them.
//!
//! Cost on the request path: the first [`EXACT_PER_MINUTE`] requests of each minute are all
//! counted (so a small wiki, or a test, sees exact counts); after that one request in
//! [`STRIDE`] per thread is counted [`STRIDE`] times, so a busy node pays an atomic load and a
//! thread-local increment for most requests. Which keys matter comes from the request path
//! (`crate::proxy::record`); drawing them, from the admin page.

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

use serde_json::{json, Value};

use crate::cache::fx::FxLike;
use crate::cache::key::CacheUrl;

/// Keys each minute's sketch holds.
pub const CAPACITY: usize = 128;
/// Minutes kept: what "the last five minutes" merges (the current one included).
pub const MINUTES: usize = 5;
/// Requests counted one by one at the start of each minute: a wiki that serves fewer (about
/// 16 a second) sees exact counts, a busier one estimates whose error shrinks with its rate.
pub const EXACT_PER_MINUTE: u32 = 1_000;
/// Past that, one request in this many per thread, counted this many times.
pub const STRIDE: u32 = 16;
/// Recent purges listed.
pub const RECENT_PURGES: usize = 20;

/// Space-saving: at most `CAPACITY` counters; a new key takes the smallest counter's place
/// and count (its `error`), so a key counted `n` times is never under-counted and no key is
/// over-counted by more than the smallest count. Keys are found by a 64-bit hash of the URL
/// (no string is built for a key already counted).
#[derive(Default)]
struct Sketch {
    slots: Vec<Slot>,
    /// Each slot's count, apart: the smallest is looked for at each new key once the sketch
    /// is full, and a kilobyte of counts scans faster than the slots.
    counts: Vec<u64>,
    index: HashMap<u64, usize, BuildHasherDefault<FxLike>>,
}

struct Slot {
    hash: u64,
    key: String,
    error: u64,
}

impl Sketch {
    fn add(&mut self, hash: u64, key: impl FnOnce() -> String, weight: u64) {
        if let Some(&i) = self.index.get(&hash) {
            self.counts[i] += weight;
            return;
        }
        let slot = |error| Slot {
            hash,
            key: key(),
            error,
        };
        if self.slots.len() < CAPACITY {
            self.index.insert(hash, self.slots.len());
            self.slots.push(slot(0));
            self.counts.push(weight);
            return;
        }
        let Some((i, &min)) = self.counts.iter().enumerate().min_by_key(|(_, c)| **c) else {
            return;
        };
        self.counts[i] = min + weight;
        let old = std::mem::replace(&mut self.slots[i], slot(min));
        self.index.remove(&old.hash);
        self.index.insert(hash, i);
    }
}

#[derive(Default)]
struct Minute {
    requests: Sketch,
    misses: Sketch,
}

/// A purge as the dashboard lists it.
#[derive(Debug, Clone)]
pub struct RecentPurge {
    /// The URL, tag or prefix purged, as it was named.
    pub what: String,
    pub source: &'static str,
    /// Unix seconds.
    pub at: u64,
    /// Objects it removed or marked stale here, when known.
    pub objects: Option<u64>,
}

/// A node seen on the purge bus, as the fleet panel lists it.
#[derive(Debug, Clone)]
struct Peer {
    purges: u64,
    /// When its last purge was applied here (Unix seconds).
    last_applied: u64,
    /// How long that purge took from its node to this one.
    last_lag: f64,
}

/// Nodes the fleet panel lists at most (a fleet's nodes, not a growing list).
pub const FLEET: usize = 256;

#[derive(Default)]
struct State {
    minutes: VecDeque<Minute>,
    purges: VecDeque<RecentPurge>,
    fleet: std::collections::BTreeMap<String, Peer>,
}

pub struct Top {
    state: Mutex<State>,
    exact_left: AtomicU32,
}

impl Default for Top {
    fn default() -> Self {
        Top::new()
    }
}

thread_local! {
    static STRIDE_COUNT: Cell<u32> = const { Cell::new(0) };
}

impl Top {
    pub fn new() -> Top {
        let mut minutes = VecDeque::with_capacity(MINUTES);
        minutes.push_back(Minute::default());
        Top {
            state: Mutex::new(State {
                minutes,
                purges: VecDeque::with_capacity(RECENT_PURGES),
                fleet: Default::default(),
            }),
            exact_left: AtomicU32::new(EXACT_PER_MINUTE),
        }
    }

    /// Counts one answered request for `url`; `missed` when it went to the origin for the
    /// cache (a miss).
    pub fn observe(&self, url: &CacheUrl, missed: bool) {
        let exact = self.exact_left.load(Ordering::Relaxed) > 0
            && (self.exact_left)
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok();
        let weight = if exact {
            1
        } else {
            let turn = STRIDE_COUNT.with(|c| {
                let n = c.get().wrapping_add(1);
                c.set(n);
                n % STRIDE == 0
            });
            if !turn {
                return;
            }
            u64::from(STRIDE)
        };
        let mut hasher = FxLike::default();
        hasher.write(url.scheme.as_str().as_bytes());
        hasher.write(url.host.as_bytes());
        hasher.write(url.path_and_query.as_bytes());
        let hash = hasher.finish();
        if let Ok(mut state) = self.state.lock() {
            if let Some(minute) = state.minutes.back_mut() {
                minute.requests.add(hash, || url.primary(), weight);
                if missed {
                    minute.misses.add(hash, || url.primary(), weight);
                }
            }
        }
    }

    /// Starts a new minute (the oldest of [`MINUTES`] is dropped). Called once a minute.
    pub fn next_minute(&self) {
        if let Ok(mut state) = self.state.lock() {
            if state.minutes.len() == MINUTES {
                state.minutes.pop_front();
            }
            state.minutes.push_back(Minute::default());
        }
        self.exact_left.store(EXACT_PER_MINUTE, Ordering::Relaxed);
    }

    pub fn purged(&self, purge: RecentPurge) {
        if let Ok(mut state) = self.state.lock() {
            if state.purges.len() == RECENT_PURGES {
                state.purges.pop_front();
            }
            state.purges.push_back(purge);
        }
    }

    /// A purge from `node`, accepted there at `accepted`, was applied here at `applied`.
    pub fn node_seen(&self, node: &str, applied: SystemTime, accepted: SystemTime) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        if !state.fleet.contains_key(node) && state.fleet.len() >= FLEET {
            return;
        }
        let peer = state.fleet.entry(node.to_string()).or_insert(Peer {
            purges: 0,
            last_applied: 0,
            last_lag: 0.0,
        });
        peer.purges += 1;
        peer.last_applied = unix_seconds(applied);
        peer.last_lag = applied
            .duration_since(accepted)
            .map_or(0.0, |d| d.as_secs_f64());
    }

    /// The `n` most requested and most missed keys of the last five minutes (counts summed
    /// over the minutes; `at_least` is what a sketch guarantees of each), the recent purges,
    /// newest first, and the nodes seen on the bus.
    pub fn report(&self, n: usize) -> Value {
        let Ok(state) = self.state.lock() else {
            return json!({});
        };
        let top = |pick: &dyn Fn(&Minute) -> &Sketch| -> Vec<Value> {
            // Per key: the count, and the count it certainly had (less each minute's error).
            let mut sums: HashMap<&str, (u64, u64)> = HashMap::new();
            for minute in &state.minutes {
                let sketch = pick(minute);
                for (slot, count) in sketch.slots.iter().zip(&sketch.counts) {
                    let sum = sums.entry(slot.key.as_str()).or_default();
                    sum.0 += count;
                    sum.1 += count - slot.error;
                }
            }
            let mut all: Vec<(&str, (u64, u64))> = sums.into_iter().collect();
            all.sort_by(|a, b| b.1 .0.cmp(&a.1 .0).then(a.0.cmp(b.0)));
            all.truncate(n);
            (all.into_iter())
                .map(|(key, (count, at_least))| json!({"key": key, "count": count, "at_least": at_least}))
                .collect()
        };
        json!({
            "requests": top(&|m| &m.requests),
            "misses": top(&|m| &m.misses),
            "fleet": state.fleet.iter().map(|(node, p)| json!({
                "node": node,
                "purges": p.purges,
                "last": p.last_applied,
                "lag_seconds": p.last_lag,
            })).collect::<Vec<_>>(),
            "purges": state.purges.iter().rev().map(|p| json!({
                "what": p.what,
                "source": p.source,
                "at": p.at,
                "objects": p.objects,
            })).collect::<Vec<_>>(),
        })
    }
}

pub fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::key::Scheme;

    fn url(path: &str) -> CacheUrl {
        CacheUrl::new(Scheme::Http, "wiki.test", path).unwrap()
    }

    #[test]
    fn the_heaviest_keys_come_first_with_exact_counts_below_the_budget() {
        let top = Top::new();
        for (path, times) in [("/a", 30), ("/b", 20), ("/c", 10)] {
            for _ in 0..times {
                top.observe(&url(path), path == "/c");
            }
        }
        top.next_minute();
        top.observe(&url("/b"), false);
        let report = top.report(2);
        assert_eq!(
            report["requests"],
            json!([
                {"key": "http://wiki.test/a", "count": 30, "at_least": 30},
                {"key": "http://wiki.test/b", "count": 21, "at_least": 21}
            ])
        );
        assert_eq!(
            report["misses"],
            json!([{"key": "http://wiki.test/c", "count": 10, "at_least": 10}])
        );
    }

    #[test]
    fn a_sketch_keeps_a_heavy_key_among_many_light_ones() {
        let mut sketch = Sketch::default();
        for i in 0..10_000u64 {
            sketch.add(i, || format!("/light/{i}"), 1);
            if i % 10 == 0 {
                sketch.add(u64::MAX, || "/heavy".to_string(), 1);
            }
        }
        assert!(sketch.slots.len() <= CAPACITY);
        let at = sketch.slots.iter().position(|s| s.key == "/heavy").unwrap();
        let (count, error) = (sketch.counts[at], sketch.slots[at].error);
        // Never under-counted; over-counted by at most its error.
        assert!(count >= 1_000 && count - error <= 1_000, "{count} {error}");
    }
}
