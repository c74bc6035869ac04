//! The dashboard's memory: what the node did each second of the last 15 minutes and each
//! minute of the last 24 hours, as a fixed ring of samples of the counters the dashboard
//! charts. One task reads the counters once a second ([`History::tick`]) and keeps the
//! difference from the last reading; nothing on the request path writes here, so a hit costs
//! what it cost before. The memory is fixed at start: [`SECONDS`] + [`MINUTES`] samples of
//! `size_of::<Sample>()` (288) bytes, 658 KiB (`a_sample_is_the_documented_size` checks it).
//! Reading a window as chart series belongs here too ([`History::window`]); drawing it, to
//! the admin page.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use prometheus::core::Collector;
use serde_json::{json, Value};

use super::Metrics;
use crate::cache::status::Disposition;
use crate::cache::Store;

/// Per-second samples kept: 15 minutes.
pub const SECONDS: usize = 900;
/// Per-minute samples kept: 24 hours.
pub const MINUTES: usize = 1440;

/// Upper bounds (seconds) of `skua_origin_response_seconds`' buckets; the last counts the rest.
pub const ORIGIN_BOUNDS: [f64; 13] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Upper bounds (seconds) of `skua_purge_reach_seconds`' buckets.
pub const REACH_BOUNDS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0, 60.0,
];

/// Kinds of origin error the dashboard tells apart, from pingora's error kind.
pub const ERROR_KINDS: [&str; 3] = ["connect", "timeout", "other"];
/// Purge sources, every one `skua_purges_total{source}` names (`handover`: relayed between
/// the old and the new process during a zero-downtime upgrade); `purge::Source`'s names, which
/// a test there holds to this list.
pub const PURGE_SOURCES: [&str; 5] = ["http", "htcp", "admin", "bus", "handover"];

/// What happened in one interval (a second or a minute), and the tiers' fill at its end.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sample {
    /// Unix time (seconds) at the interval's end.
    pub at: u64,
    /// Requests answered, by cache status ([`Disposition::ALL`] order).
    pub requests: [u32; 6],
    /// Response body bytes, by cache status.
    pub bytes: [u64; 6],
    /// Requests answered 4xx and 5xx.
    pub client_errors: u32,
    pub server_errors: u32,
    pub origin_requests: u32,
    /// By [`ERROR_KINDS`].
    pub origin_errors: [u32; 3],
    /// Origin responses by time to the response header: one count per [`ORIGIN_BOUNDS`]
    /// bucket (not cumulative), then those slower than the last bound.
    pub origin_latency: [u32; 14],
    /// Purges received, by [`PURGE_SOURCES`].
    pub purges: [u32; 5],
    /// Purges from the bus by time to reach this node, per [`REACH_BOUNDS`] bucket.
    pub reach: [u32; 17],
    pub evictions: u32,
    pub memory_bytes: u64,
    pub memory_capacity: u64,
    pub disk_bytes: u64,
    pub disk_capacity: u64,
}

impl Sample {
    /// Adds `other`'s counts to these and takes its time and tier fill (the later).
    fn absorb(&mut self, other: &Sample) {
        fn add<const N: usize>(a: &mut [u32; N], b: &[u32; N]) {
            a.iter_mut()
                .zip(b)
                .for_each(|(a, b)| *a = a.saturating_add(*b));
        }
        add(&mut self.requests, &other.requests);
        self.bytes
            .iter_mut()
            .zip(&other.bytes)
            .for_each(|(a, b)| *a += b);
        self.client_errors += other.client_errors;
        self.server_errors += other.server_errors;
        self.origin_requests += other.origin_requests;
        add(&mut self.origin_errors, &other.origin_errors);
        add(&mut self.origin_latency, &other.origin_latency);
        add(&mut self.purges, &other.purges);
        add(&mut self.reach, &other.reach);
        self.evictions += other.evictions;
        self.at = other.at;
        self.memory_bytes = other.memory_bytes;
        self.memory_capacity = other.memory_capacity;
        self.disk_bytes = other.disk_bytes;
        self.disk_capacity = other.disk_capacity;
    }
}

/// The counters as read at one moment (totals since start), and the tiers' fill.
#[derive(Debug, Clone, Default)]
struct Reading {
    requests: [u64; 6],
    bytes: [u64; 6],
    client_errors: u64,
    server_errors: u64,
    origin_requests: u64,
    origin_errors: [u64; 3],
    /// Cumulative, as Prometheus keeps them.
    origin_latency: [u64; 13],
    origin_count: u64,
    purges: [u64; 5],
    reach: [u64; 16],
    reach_count: u64,
    evictions: u64,
    memory_bytes: u64,
    memory_capacity: u64,
    disk_bytes: u64,
    disk_capacity: u64,
}

impl Reading {
    fn take(metrics: &Metrics, store: &Store) -> Reading {
        let mut r = Reading::default();
        for (i, series) in metrics.per_request.iter().enumerate().take(6) {
            r.requests[i] = series.by_class.iter().map(|c| c.get()).sum();
            r.bytes[i] = series.bytes.get();
            r.client_errors += series.by_class[3].get();
            r.server_errors += series.by_class[4].get();
        }
        for family in metrics.origin_requests.collect() {
            r.origin_requests += (family.get_metric().iter())
                .map(|m| m.get_counter().value() as u64)
                .sum::<u64>();
        }
        for family in metrics.origin_errors.collect() {
            for m in family.get_metric() {
                let kind = (m.get_label().iter())
                    .find(|l| l.name() == "kind")
                    .map_or("", |l| l.value());
                r.origin_errors[error_kind(kind)] += m.get_counter().value() as u64;
            }
        }
        for family in metrics.origin_duration.collect() {
            for m in family.get_metric() {
                let h = m.get_histogram();
                r.origin_count += h.get_sample_count();
                for (i, b) in h.get_bucket().iter().enumerate().take(13) {
                    r.origin_latency[i] += b.cumulative_count();
                }
            }
        }
        for family in metrics.purges.collect() {
            for m in family.get_metric() {
                let source = (m.get_label().iter())
                    .find(|l| l.name() == "source")
                    .map_or("", |l| l.value());
                if let Some(i) = PURGE_SOURCES.iter().position(|s| *s == source) {
                    r.purges[i] += m.get_counter().value() as u64;
                }
            }
        }
        for family in metrics.bus.reach.collect() {
            for m in family.get_metric() {
                let h = m.get_histogram();
                r.reach_count += h.get_sample_count();
                for (i, b) in h.get_bucket().iter().enumerate().take(16) {
                    r.reach[i] += b.cumulative_count();
                }
            }
        }
        let mem = &store.memory;
        let evicted = mem.counters.evicted_size.load(Ordering::Relaxed)
            + mem.counters.evicted_expired.load(Ordering::Relaxed);
        r.evictions = evicted
            + store
                .disk
                .map_or(0, |d| d.counters.evictions.load(Ordering::Relaxed));
        r.memory_bytes = mem.resident_bytes();
        r.memory_capacity = mem.capacity_bytes();
        if let Some(disk) = store.disk {
            r.disk_bytes = disk.resident_bytes();
            r.disk_capacity = disk.config.size;
        }
        r
    }

    /// What happened between `self` (earlier) and `now`.
    fn since(&self, now: &Reading, at: u64) -> Sample {
        let d = |a: u64, b: u64| u32::try_from(b.saturating_sub(a)).unwrap_or(u32::MAX);
        let each = |a: &[u64], b: &[u64], out: &mut [u32]| {
            for ((o, a), b) in out.iter_mut().zip(a).zip(b) {
                *o = d(*a, *b);
            }
        };
        let mut s = Sample {
            at,
            client_errors: d(self.client_errors, now.client_errors),
            server_errors: d(self.server_errors, now.server_errors),
            origin_requests: d(self.origin_requests, now.origin_requests),
            evictions: d(self.evictions, now.evictions),
            memory_bytes: now.memory_bytes,
            memory_capacity: now.memory_capacity,
            disk_bytes: now.disk_bytes,
            disk_capacity: now.disk_capacity,
            ..Sample::default()
        };
        each(&self.requests, &now.requests, &mut s.requests);
        for ((o, a), b) in s.bytes.iter_mut().zip(&self.bytes).zip(&now.bytes) {
            *o = b.saturating_sub(*a);
        }
        each(
            &self.origin_errors,
            &now.origin_errors,
            &mut s.origin_errors,
        );
        each(&self.purges, &now.purges, &mut s.purges);
        s.origin_latency = buckets(
            &self.origin_latency,
            self.origin_count,
            &now.origin_latency,
            now.origin_count,
        );
        s.reach = buckets(&self.reach, self.reach_count, &now.reach, now.reach_count);
        s
    }
}

/// Per-bucket counts between two readings of a cumulative histogram: bucket `i` holds those
/// at most bound `i` and above bound `i - 1`; the last, those above every bound.
fn buckets<const B: usize, const N: usize>(
    before: &[u64; B],
    before_count: u64,
    now: &[u64; B],
    now_count: u64,
) -> [u32; N] {
    let mut out = [0u32; N];
    let cumulative = |i: usize| -> u64 {
        if i < B {
            now[i].saturating_sub(before[i])
        } else {
            now_count.saturating_sub(before_count)
        }
    };
    let mut below = 0;
    for (i, o) in out.iter_mut().enumerate() {
        let upto = cumulative(i);
        *o = u32::try_from(upto.saturating_sub(below)).unwrap_or(u32::MAX);
        below = upto.max(below);
    }
    out
}

/// Which of [`ERROR_KINDS`] a pingora error kind (`ConnectRefused`, `ReadTimedout`...) is.
fn error_kind(kind: &str) -> usize {
    if kind.contains("Timedout") || kind.contains("Timeout") {
        1
    } else if kind.starts_with("Connect") || kind.starts_with("TLS") {
        0
    } else {
        2
    }
}

/// The `q` quantile of the counts in `counts` (per bucket, bounds `bounds`, the last bucket
/// unbounded), by linear interpolation within its bucket as Prometheus'
/// `histogram_quantile` does; `None` with no counts. A quantile in the last bucket is the
/// last bound (the most that can be said).
pub fn quantile(bounds: &[f64], counts: &[u32], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().map(|c| u64::from(*c)).sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut below = 0u64;
    for (i, c) in counts.iter().enumerate() {
        let upto = below + u64::from(*c);
        if (upto as f64) >= rank && *c > 0 {
            let Some(high) = bounds.get(i) else {
                return bounds.last().copied();
            };
            let low = if i == 0 { 0.0 } else { bounds[i - 1] };
            let within = (rank - below as f64) / f64::from(*c);
            return Some(low + (high - low) * within.clamp(0.0, 1.0));
        }
        below = upto;
    }
    bounds.last().copied()
}

pub struct History {
    seconds: VecDeque<Sample>,
    minutes: VecDeque<Sample>,
    /// The minute being gathered from seconds.
    minute: Sample,
    seconds_in_minute: u32,
    /// The counters at the last tick: zero before the first, so that what happened before
    /// it is in the first second.
    last: Reading,
    started: u64,
}

impl Default for History {
    fn default() -> Self {
        History::new()
    }
}

fn unix_now() -> u64 {
    super::top::unix_seconds(SystemTime::now())
}

impl History {
    pub fn new() -> History {
        History {
            seconds: VecDeque::with_capacity(SECONDS),
            minutes: VecDeque::with_capacity(MINUTES),
            minute: Sample::default(),
            seconds_in_minute: 0,
            last: Reading::default(),
            started: unix_now(),
        }
    }

    /// Reads the counters and keeps what happened since the last tick as the newest second;
    /// every 60th also closes a minute, and says so. Called once a second.
    pub fn tick(&mut self, metrics: &Metrics, store: &Store) -> bool {
        let now = Reading::take(metrics, store);
        let second = self.last.since(&now, unix_now());
        self.last = now;
        self.push(second)
    }

    fn push(&mut self, second: Sample) -> bool {
        if self.seconds.len() == SECONDS {
            self.seconds.pop_front();
        }
        self.seconds.push_back(second);
        self.minute.absorb(&second);
        self.seconds_in_minute += 1;
        if self.seconds_in_minute == 60 {
            if self.minutes.len() == MINUTES {
                self.minutes.pop_front();
            }
            self.minutes.push_back(self.minute);
            self.minute = Sample::default();
            self.seconds_in_minute = 0;
            return true;
        }
        false
    }

    /// The last `window` seconds as chart series: per second for a window up to 15 minutes,
    /// per minute beyond (the minute being gathered last). Rates are per second.
    pub fn window(&self, window: u64) -> Value {
        let (step, samples): (u64, Vec<Sample>) = if window <= SECONDS as u64 {
            let skip = self.seconds.len().saturating_sub(window as usize);
            (1, self.seconds.iter().skip(skip).copied().collect())
        } else {
            let wanted = (window / 60) as usize;
            let mut all: Vec<Sample> = self.minutes.iter().copied().collect();
            if self.seconds_in_minute > 0 {
                all.push(self.minute);
            }
            let skip = all.len().saturating_sub(wanted);
            (60, all.split_off(skip))
        };
        series(step, window, self.started, &samples)
    }
}

/// Hits over requests a cache could have served: every request but those Skua answered
/// itself (purges, refusals), as the dashboard's tiles count them.
pub fn hit_ratio(by_status: &[u64; 6]) -> Option<f64> {
    let hits = by_status[Disposition::HitFront.index()] + by_status[Disposition::HitLocal.index()];
    let served: u64 = by_status.iter().sum::<u64>() - by_status[Disposition::IntFront.index()];
    (served > 0).then(|| hits as f64 / served as f64)
}

fn series(step: u64, window: u64, started: u64, samples: &[Sample]) -> Value {
    let per_second = |n: u64| n as f64 / step as f64;
    let column = |f: &dyn Fn(&Sample) -> Option<f64>| -> Vec<Option<f64>> {
        samples.iter().map(f).collect()
    };
    let requests: serde_json::Map<String, Value> = (Disposition::ALL.iter())
        .map(|d| {
            let i = d.index();
            let rates = column(&|s| Some(per_second(u64::from(s.requests[i]))));
            (d.as_str().to_string(), json!(rates))
        })
        .collect();
    let errors: serde_json::Map<String, Value> = (ERROR_KINDS.iter().enumerate())
        .map(|(i, k)| {
            let rates = column(&|s| Some(per_second(u64::from(s.origin_errors[i]))));
            (k.to_string(), json!(rates))
        })
        .collect();
    let purges: serde_json::Map<String, Value> = (PURGE_SOURCES.iter().enumerate())
        .map(|(i, k)| {
            let rates = column(&|s| Some(per_second(u64::from(s.purges[i]))));
            (k.to_string(), json!(rates))
        })
        .collect();
    let fill = |bytes: u64, capacity: u64| (capacity > 0).then(|| bytes as f64 / capacity as f64);
    // The whole window at once, for the tiles.
    let mut total = Sample::default();
    samples.iter().for_each(|s| total.absorb(s));
    let widen = |a: &[u32; 6]| a.map(u64::from);
    json!({
        "step": step,
        "window": window,
        "started": started,
        "at": samples.iter().map(|s| s.at).collect::<Vec<_>>(),
        "hit_ratio": column(&|s| hit_ratio(&widen(&s.requests))),
        "byte_hit_ratio": column(&|s| hit_ratio(&s.bytes)),
        "requests": requests,
        "client_errors": column(&|s| Some(per_second(u64::from(s.client_errors)))),
        "server_errors": column(&|s| Some(per_second(u64::from(s.server_errors)))),
        "origin_requests": column(&|s| Some(per_second(u64::from(s.origin_requests)))),
        "origin_p50": column(&|s| quantile(&ORIGIN_BOUNDS, &s.origin_latency, 0.5)),
        "origin_p99": column(&|s| quantile(&ORIGIN_BOUNDS, &s.origin_latency, 0.99)),
        "origin_errors": errors,
        "purges": purges,
        "purge_reach_p99": column(&|s| quantile(&REACH_BOUNDS, &s.reach, 0.99)),
        "memory_fill": column(&|s| fill(s.memory_bytes, s.memory_capacity)),
        "disk_fill": column(&|s| fill(s.disk_bytes, s.disk_capacity)),
        "evictions": column(&|s| Some(per_second(u64::from(s.evictions)))),
        "totals": {
            "requests": total.requests.iter().map(|n| u64::from(*n)).sum::<u64>(),
            "hit_ratio": hit_ratio(&widen(&total.requests)),
            "byte_hit_ratio": hit_ratio(&total.bytes),
            "origin_requests": total.origin_requests,
            "origin_p99": quantile(&ORIGIN_BOUNDS, &total.origin_latency, 0.99),
            "purges": total.purges.iter().map(|n| u64::from(*n)).sum::<u64>(),
            "seconds": samples.len() as u64 * step,
        },
    })
}

/// The task that ticks [`History`] once a second, for as long as the server runs.
pub struct Sampler {
    pub history: Arc<Mutex<History>>,
    pub metrics: Arc<Metrics>,
    pub store: &'static Store,
}

#[async_trait]
impl BackgroundService for Sampler {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut every_second = tokio::time::interval(Duration::from_secs(1));
        // A late tick is one long second, not a burst of short ones.
        every_second.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every_second.tick() => {
                    let minute_ended = match self.history.lock() {
                        Ok(mut history) => history.tick(&self.metrics, self.store),
                        Err(_) => false,
                    };
                    if minute_ended {
                        self.metrics.top.next_minute();
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_is_the_documented_size() {
        // The module comment and the README promise 288 bytes a sample, 658 KiB for both rings.
        assert_eq!(std::mem::size_of::<Sample>(), 288);
        let bytes = (SECONDS + MINUTES) * std::mem::size_of::<Sample>();
        assert_eq!(bytes / 1024, 658, "{bytes}");
    }

    #[test]
    fn cumulative_buckets_become_counts_per_bucket() {
        let got: [u32; 4] = buckets(&[1, 3, 3], 5, &[2, 6, 7], 10);
        // 1 new at most bound 0, 2 more up to bound 1, 1 more up to bound 2, 1 above.
        assert_eq!(got, [1, 2, 1, 1]);
    }

    #[test]
    fn quantiles_interpolate_within_their_bucket() {
        let bounds = [0.1, 0.2, 0.4];
        assert_eq!(quantile(&bounds, &[0, 0, 0, 0], 0.5), None);
        // 10 in (0.1, 0.2]: the median is halfway through it.
        let p50 = quantile(&bounds, &[0, 10, 0, 0], 0.5).unwrap();
        assert!((p50 - 0.15).abs() < 1e-9, "{p50}");
        // Above the last bound: the last bound.
        assert_eq!(quantile(&bounds, &[0, 0, 0, 3], 0.99), Some(0.4));
    }

    #[test]
    fn a_minute_is_the_sum_of_its_seconds() {
        let mut h = History::new();
        for i in 0..125u32 {
            let mut s = Sample {
                at: u64::from(i),
                memory_bytes: u64::from(i),
                ..Sample::default()
            };
            s.requests[0] = 2;
            s.requests[2] = 1;
            h.push(s);
        }
        assert_eq!(h.minutes.len(), 2);
        assert_eq!(h.minutes[0].requests[0], 120);
        assert_eq!(h.minutes[1].memory_bytes, 119);
        let five_minutes = h.window(300);
        assert_eq!(five_minutes["step"], 1);
        assert_eq!(five_minutes["at"].as_array().unwrap().len(), 125);
        let ratio = five_minutes["totals"]["hit_ratio"].as_f64().unwrap();
        assert!((ratio - 2.0 / 3.0).abs() < 1e-9, "{ratio}");
        let day = h.window(86_400);
        assert_eq!(day["step"], 60);
        // Two whole minutes and the one being gathered.
        assert_eq!(day["at"].as_array().unwrap().len(), 3);
        assert_eq!(day["requests"]["hit-front"][0], 2.0);
    }
}
