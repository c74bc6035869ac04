//! Time-stamped invalidations that are checked when an object is used rather than applied to
//! every object when they arrive:
//!
//! - **purge times** per URL: a fill whose origin request started before the URL was last
//!   purged is not stored, which closes the race MediaWiki covers with a delayed second
//!   ("rebound") purge: a purge arriving while a fill of the old page is in flight;
//! - **bans** of a host or a URL prefix: recorded in O(1), and any object under them fetched
//!   before the ban is treated as a miss on its next use. A ban lives as long as the TTL cap,
//!   after which every object it could match has expired anyway.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::RwLock;
use std::time::{Duration, SystemTime};

use pingora::cache::key::HashBinary;

use super::key::CacheUrl;

#[derive(Debug, Clone)]
struct Ban {
    host: String,
    path_prefix: String,
    at: SystemTime,
}

pub struct Invalidations {
    purged: moka::sync::Cache<HashBinary, SystemTime>,
    bans: RwLock<Vec<Ban>>,
    /// `bans.len()`, readable without the lock: the hit path checks it first.
    ban_count: AtomicUsize,
    lifetime: Duration,
}

impl Invalidations {
    /// `lifetime`: the TTL cap; nothing stored is fresh for longer, so older records can go.
    pub fn new(lifetime: Duration) -> Invalidations {
        Invalidations {
            purged: moka::sync::Cache::builder()
                .max_capacity(1 << 20)
                .time_to_live(lifetime)
                .build(),
            bans: RwLock::new(Vec::new()),
            ban_count: AtomicUsize::new(0),
            lifetime,
        }
    }

    pub fn record_purge(&self, primary: HashBinary, at: SystemTime) {
        self.purged.insert(primary, at);
    }

    /// Whether a fill whose origin request started at `fetched` was overtaken by a purge.
    pub fn purged_since(&self, primary: &HashBinary, fetched: SystemTime) -> bool {
        self.purged.get(primary).is_some_and(|at| at >= fetched)
    }

    /// Bans everything under `host` + `path_prefix` fetched before now.
    pub fn ban(&self, host: &str, path_prefix: &str) {
        let now = SystemTime::now();
        if let Ok(mut bans) = self.bans.write() {
            bans.retain(|b| {
                now.duration_since(b.at)
                    .map_or(true, |age| age < self.lifetime)
            });
            bans.push(Ban {
                host: host.to_string(),
                path_prefix: path_prefix.to_string(),
                at: now,
            });
            self.ban_count.store(bans.len(), Ordering::Release);
        }
    }

    pub fn has_bans(&self) -> bool {
        self.ban_count.load(Ordering::Acquire) > 0
    }

    /// Whether an object for `url` stored at `created` is under a later ban.
    pub fn banned(&self, url: &CacheUrl, created: SystemTime) -> bool {
        if !self.has_bans() {
            return false;
        }
        match self.bans.read() {
            Ok(bans) => bans.iter().any(|b| {
                b.at >= created
                    && b.host == url.host
                    && url.path_and_query.starts_with(&b.path_prefix)
            }),
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::key::Scheme;

    #[test]
    fn bans_match_host_and_prefix_and_only_older_objects() {
        let inv = Invalidations::new(Duration::from_secs(3600));
        let before = SystemTime::now() - Duration::from_secs(1);
        assert!(!inv.banned(&CacheUrl::new(Scheme::Http, "h", "/p/1").unwrap(), before));
        inv.ban("h", "/p/");
        let after = SystemTime::now() + Duration::from_secs(1);
        assert!(inv.banned(&CacheUrl::new(Scheme::Http, "h", "/p/1").unwrap(), before));
        assert!(inv.banned(
            &CacheUrl::new(Scheme::Https, "h", "/p/x?y").unwrap(),
            before
        ));
        assert!(!inv.banned(&CacheUrl::new(Scheme::Http, "h", "/q/1").unwrap(), before));
        assert!(!inv.banned(
            &CacheUrl::new(Scheme::Http, "other", "/p/1").unwrap(),
            before
        ));
        assert!(!inv.banned(&CacheUrl::new(Scheme::Http, "h", "/p/1").unwrap(), after));
    }

    #[test]
    fn purge_times() {
        let inv = Invalidations::new(Duration::from_secs(3600));
        let t0 = SystemTime::now();
        inv.record_purge([1; 16], t0);
        assert!(inv.purged_since(&[1; 16], t0 - Duration::from_millis(5)));
        assert!(!inv.purged_since(&[1; 16], t0 + Duration::from_millis(5)));
        assert!(!inv.purged_since(&[2; 16], t0 - Duration::from_millis(5)));
    }
}
