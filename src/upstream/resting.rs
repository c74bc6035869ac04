//! Origins resting after a failed request (`[[origin]] fail_timeout`, nginx's passive health
//! check): an origin that refused or dropped a connection, or said nothing for `read_timeout`,
//! is passed over for `fail_timeout` while another origin of its pool is healthy, so that the
//! requests after the first do not each pay for the failure again (an app server whose health
//! path answers while its workers hang costs every request routed to it a whole
//! `read_timeout`). Which origin is picked, and what counts as a failure, are the pool's and
//! the request path's.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The one clock every pool's times count from, so that a reloaded pool can take over its
/// predecessor's.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// When each origin of one pool may be picked again, in milliseconds since [`epoch`] (0: it
/// has not failed).
pub struct Resting {
    fail_timeout: Duration,
    until: HashMap<SocketAddr, AtomicU64>,
    /// The latest of `until`: while it has passed, no origin rests and none is looked up.
    latest: AtomicU64,
}

impl Resting {
    /// For a pool of `origins`; those that rest in `previous` (the pool a reload replaces)
    /// go on resting until they would have there.
    pub fn new(
        origins: &[SocketAddr],
        fail_timeout: Duration,
        previous: Option<&Resting>,
    ) -> Resting {
        let until: HashMap<SocketAddr, AtomicU64> = (origins.iter())
            .map(|a| {
                let kept = previous
                    .and_then(|p| p.until.get(a))
                    .map_or(0, |u| u.load(Ordering::Relaxed));
                (*a, AtomicU64::new(kept))
            })
            .collect();
        let latest = until.values().map(|u| u.load(Ordering::Relaxed)).max();
        Resting {
            fail_timeout,
            until,
            latest: AtomicU64::new(latest.unwrap_or(0)),
        }
    }

    fn now(&self) -> u64 {
        // Never 0, which means "has not failed".
        epoch().elapsed().as_millis() as u64 + 1
    }

    /// `origin` failed a request: it rests for `fail_timeout` from now.
    pub fn failed(&self, origin: &SocketAddr) {
        if self.fail_timeout.is_zero() {
            return;
        }
        let until = self.now() + self.fail_timeout.as_millis() as u64;
        if let Some(slot) = self.until.get(origin) {
            slot.store(until, Ordering::Relaxed);
            self.latest.fetch_max(until, Ordering::Relaxed);
        }
    }

    /// The time to judge origins by, when any of them may be resting; `None` (without reading
    /// the clock when none has failed) when none is.
    pub fn now_if_any(&self) -> Option<u64> {
        let latest = self.latest.load(Ordering::Relaxed);
        if latest == 0 {
            return None;
        }
        let now = self.now();
        (now < latest).then_some(now)
    }

    /// Whether `origin` rests at `now` (from [`Self::now_if_any`]).
    pub fn rests(&self, origin: &SocketAddr, now: u64) -> bool {
        (self.until.get(origin)).is_some_and(|u| now < u.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_origin_rests_for_fail_timeout_and_only_it() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let resting = Resting::new(&[a, b], Duration::from_millis(50), None);
        assert_eq!(resting.now_if_any(), None);
        resting.failed(&a);
        let now = resting.now_if_any().unwrap();
        assert!(resting.rests(&a, now) && !resting.rests(&b, now));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(resting.now_if_any(), None, "rested long enough");

        resting.failed(&b);
        let reloaded = Resting::new(&[a, b], Duration::from_millis(50), Some(&resting));
        let now = reloaded.now_if_any().expect("a reload keeps the rest");
        assert!(reloaded.rests(&b, now) && !reloaded.rests(&a, now));

        let never = Resting::new(&[a], Duration::ZERO, None);
        never.failed(&a);
        assert_eq!(
            never.now_if_any(),
            None,
            "fail_timeout 0: only health checks count"
        );
    }
}
