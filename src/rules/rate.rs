//! Rate limits per client address (`rate_limit`): a token bucket for each (rule, address),
//! in a table bounded in entries, so that a flood of addresses costs a bounded amount of
//! memory (the least recently used buckets go first, and an evicted client starts again with
//! a full bucket).

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::rules::RateLimit;

/// Buckets kept at most: about 100 bytes each, so 10 MiB at most.
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
        Limiter {
            buckets: moka::sync::Cache::builder()
                .max_capacity(MAX_BUCKETS)
                .time_to_idle(IDLE)
                .build(),
        }
    }

    /// Takes a token from `client`'s bucket for rule `rule`; when there is none, how long until
    /// there is.
    pub fn take(&self, rule: u16, client: IpAddr, limit: RateLimit) -> Option<Duration> {
        let now = Instant::now();
        let bucket = self.buckets.get_with((rule, client), || {
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
}
