//! When each URL (or surrogate key) was last purged, for a bounded time and a bounded count:
//! the records behind the checks that keep a fill, a revalidation, a promotion to memory or a
//! range piece that a purge overtook from being stored ([`super::bans::Invalidations`]). It
//! does not decide what a purge removes.
//!
//! Purges are recorded in time order, so the records are a queue: the oldest leave first,
//! once older than the lifetime or past the bound, and a new record is always kept. A record
//! is a key and a time, once in a map and once in the queue: a million URLs' took 98 bytes
//! each (RSS, release build, the tables grown by doubling) where moka's cache, used before,
//! took 352, and whose default admission turned new keys away from a full table. A lookup
//! took about 200 ns.

use std::borrow::Borrow;
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

pub struct PurgeTimes<K> {
    records: Mutex<Records<K>>,
    capacity: usize,
    lifetime: Lifetime,
}

/// How long records are kept: the TTL cap, which a reload may raise and which never falls
/// while the process runs (objects stored under a higher cap stay fresh that long).
pub struct Lifetime(AtomicU64);

impl Lifetime {
    pub fn new(lifetime: Duration) -> Lifetime {
        Lifetime(AtomicU64::new(millis(lifetime)))
    }

    pub fn get(&self) -> Duration {
        Duration::from_millis(self.0.load(Ordering::Relaxed))
    }

    /// Raises the lifetime to `lifetime` if that is longer; a shorter one changes nothing.
    pub fn at_least(&self, lifetime: Duration) {
        self.0.fetch_max(millis(lifetime), Ordering::Relaxed);
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

struct Records<K> {
    /// The latest time of each key.
    latest: HashMap<K, SystemTime>,
    /// Every record, oldest first; a key purged again has a record per purge, and only its
    /// newest one's leaving forgets it.
    order: VecDeque<(K, SystemTime)>,
}

impl<K: Hash + Eq + Clone> PurgeTimes<K> {
    /// Keeps at most `capacity` records, none older than `lifetime`.
    pub fn new(capacity: usize, lifetime: Duration) -> PurgeTimes<K> {
        PurgeTimes {
            records: Mutex::new(Records {
                latest: HashMap::new(),
                order: VecDeque::new(),
            }),
            capacity: capacity.max(1),
            lifetime: Lifetime::new(lifetime),
        }
    }

    /// Records that `key` was purged at `at`.
    pub fn record(&self, key: K, at: SystemTime) {
        let mut records = self.lock();
        let Records { latest, order } = &mut *records;
        let kept = latest.entry(key.clone()).or_insert(at);
        *kept = (*kept).max(at);
        order.push_back((key, at));
        let horizon = at.checked_sub(self.lifetime.get());
        while let Some((_, oldest)) = order.front() {
            let expired = horizon.is_some_and(|h| *oldest < h);
            if !expired && order.len() <= self.capacity {
                break;
            }
            if let Some((gone, when)) = order.pop_front() {
                if latest.get(&gone) == Some(&when) {
                    latest.remove(&gone);
                }
            }
        }
    }

    /// When `key` was last purged, if that is remembered and within the lifetime.
    pub fn get<Q>(&self, key: &Q) -> Option<SystemTime>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let at = *self.lock().latest.get(key)?;
        let age = SystemTime::now().duration_since(at).unwrap_or_default();
        (age < self.lifetime.get()).then_some(at)
    }

    /// Keeps records for at least `lifetime` from now on (a reload raised the TTL cap).
    pub fn keep_for_at_least(&self, lifetime: Duration) {
        self.lifetime.at_least(lifetime);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Records<K>> {
        self.records
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_leave_first_and_a_key_purged_again_stays() {
        let times = PurgeTimes::new(3, Duration::from_secs(3600));
        let t0 = SystemTime::now();
        let at = |s: u64| t0 + Duration::from_millis(s);
        times.record("a", at(1));
        times.record("b", at(2));
        times.record("a", at(3));
        times.record("c", at(4));
        // Four records past a bound of three: a's first went, a's second keeps it.
        assert_eq!(times.get("a"), Some(at(3)));
        assert_eq!(times.get("b"), Some(at(2)));
        times.record("d", at(5));
        assert_eq!(times.get("b"), None, "the oldest record left");
        assert_eq!(times.get("c"), Some(at(4)));
        assert_eq!(times.get("d"), Some(at(5)));
    }

    #[test]
    fn records_older_than_the_lifetime_are_forgotten() {
        let times = PurgeTimes::new(100, Duration::from_secs(60));
        let now = SystemTime::now();
        times.record("old", now - Duration::from_secs(120));
        assert_eq!(times.get("old"), None, "past the lifetime when asked");
        times.record("new", now);
        assert_eq!(times.get("new"), Some(now));
        assert_eq!(times.lock().order.len(), 1, "the old record left the queue");
    }

    #[test]
    fn a_raised_lifetime_keeps_records_the_first_one_forgot_and_never_falls() {
        let times = PurgeTimes::new(100, Duration::from_secs(60));
        let now = SystemTime::now();
        let two_minutes_ago = now - Duration::from_secs(120);
        times.record("edited", two_minutes_ago);
        times.keep_for_at_least(Duration::from_secs(3600));
        times.keep_for_at_least(Duration::from_secs(1));
        times.record("new", now);
        assert_eq!(times.get("edited"), Some(two_minutes_ago));
        assert_eq!(times.lock().order.len(), 2);
    }
}
