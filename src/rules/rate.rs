//! Rate limits per client (`rate_limit`): a token bucket for each (rule, client), where a
//! client is an IPv4 address or an IPv6 /64, in a table bounded in entries, so that a flood of addresses costs a bounded amount of
//! memory (the least recently used buckets go first, and an evicted client starts again with
//! a full bucket).

use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::rules::RateLimit;

/// Buckets kept at most: about 400 bytes each with moka's entry (393 measured with 100,000),
/// so about 40 MiB at most.
const MAX_BUCKETS: u64 = 100_000;

/// A client idle this long starts again with a full bucket.
const IDLE: Duration = Duration::from_secs(600);

pub struct Limiter {
    buckets: moka::sync::Cache<(u16, IpAddr), Arc<Mutex<Bucket>>>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Limiter {
    pub fn new() -> Limiter {
        Limiter::with_capacity(MAX_BUCKETS)
    }

    fn with_capacity(buckets: u64) -> Limiter {
        Limiter {
            // Least recently used buckets go first: moka's default admission (TinyLFU) would
            // instead keep no new client's bucket once the table is full.
            buckets: moka::sync::Cache::builder()
                .max_capacity(buckets)
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .time_to_idle(IDLE)
                .build(),
        }
    }

    /// Takes a token from `client`'s bucket for rule `rule`; when there is none, how long until
    /// there is.
    pub fn take(&self, rule: u16, client: IpAddr, limit: RateLimit) -> Option<Duration> {
        let now = Instant::now();
        let bucket = self.buckets.get_with((rule, counted_as(client)), || {
            Arc::new(Mutex::new(Bucket {
                tokens: f64::from(limit.burst),
                at: now,
            }))
        });
        let mut bucket = bucket
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let refill = now.saturating_duration_since(bucket.at).as_secs_f64() * limit.per_second;
        bucket.tokens = (bucket.tokens + refill).min(f64::from(limit.burst));
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return None;
        }
        Some(Duration::from_secs_f64(
            (1.0 - bucket.tokens) / limit.per_second,
        ))
    }
}

/// Whom a client counts as, for a rate limit's bucket and for `max_connections_per_client`:
/// an IPv4 address, or the /64 an IPv6 address is in. A /64 is the
/// smallest network a host is given (RFC 4291 §2.5.4: unicast addresses have a 64-bit
/// interface identifier; RFC 8981: a host picks temporary addresses in it at will), so a
/// bucket per IPv6 address gave one client 2^64 buckets. An IPv4-mapped address (RFC 4291
/// §2.5.5.2) is its IPv4 client.
pub fn counted_as(client: IpAddr) -> IpAddr {
    match client {
        IpAddr::V4(_) => client,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !(u128::from(u64::MAX)))),
        },
    }
}

impl Default for Limiter {
    fn default() -> Self {
        Limiter::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let limiter = Limiter::new();
        let limit = RateLimit {
            per_second: 10.0,
            burst: 3,
            origin_only: false,
        };
        let client: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(limiter.take(0, client, limit), None);
        }
        let wait = limiter.take(0, client, limit).expect("the bucket is empty");
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        // Another client, or another rule, has a bucket of its own.
        assert_eq!(limiter.take(0, "192.0.2.2".parse().unwrap(), limit), None);
        assert_eq!(limiter.take(1, client, limit), None);
        std::thread::sleep(Duration::from_millis(120));
        assert_eq!(limiter.take(0, client, limit), None, "refilled at 10/s");
    }

    /// Regression: moka's default admission (TinyLFU) turns a new key away from a full table
    /// when it has been seen no more often than the entry it would evict, so once as many
    /// clients as there are buckets had been seen (100,000 in ten minutes: a busy wiki, or a
    /// flood of addresses), a new client's bucket was never kept and it was never limited.
    #[test]
    fn a_new_client_is_limited_when_the_table_is_full() {
        let limiter = Limiter::with_capacity(100);
        let limit = RateLimit {
            per_second: 0.01,
            burst: 1,
            origin_only: false,
        };
        let client = |n: u32| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n));
        for n in 0..1_000 {
            for _ in 0..3 {
                limiter.take(0, client(n), limit);
            }
            limiter.buckets.run_pending_tasks();
        }
        let newcomer = client(5_000);
        assert_eq!(limiter.take(0, newcomer, limit), None);
        limiter.buckets.run_pending_tasks();
        assert!(limiter.take(0, newcomer, limit).is_some(), "not limited");
    }

    #[test]
    fn an_ipv6_client_is_its_64_and_a_mapped_address_its_ipv4_client() {
        let owner = |a: &str| counted_as(a.parse().unwrap()).to_string();
        assert_eq!(owner("2001:db8:1:2:a:b:c:d"), "2001:db8:1:2::");
        assert_eq!(owner("2001:db8:1:2::1"), "2001:db8:1:2::");
        assert_eq!(owner("2001:db8:1:3::1"), "2001:db8:1:3::");
        assert_eq!(owner("::ffff:198.51.100.7"), "198.51.100.7");
        assert_eq!(owner("198.51.100.7"), "198.51.100.7");
        assert_eq!(owner("::1"), "::");
    }
}
