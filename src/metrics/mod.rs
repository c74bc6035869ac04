//! Prometheus metrics (and, in `access_log.rs`, the access log; in `history.rs`, the
//! dashboard's last 24 hours of them; in `top.rs`, its top URLs): one registry per process, names prefixed `skua_`, base
//! units, label values from closed enums (never a URL, host or IP). It counts; it does not
//! serve HTTP (the admin endpoint renders [`Metrics::render`]).

pub mod access_log;
pub mod history;
pub mod top;

use std::sync::Arc;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::cache::status::Disposition;

/// The purge bus's state (`src/purge/bus.rs`); all zero on a node without a bus.
pub struct BusMetrics {
    pub connected: IntGauge,
    pub lag: IntGauge,
    pub unpublished: IntGauge,
    pub published: IntCounter,
    pub dropped: IntCounter,
    pub gaps: IntCounter,
    pub refetched: IntCounter,
    pub stalls: IntCounter,
    pub reach: Histogram,
}

/// Client connections (`src/proxy/connection.rs`).
pub struct ConnectionMetrics {
    pub open: IntGauge,
    pub refused_max_connections: IntCounter,
    /// A client already holding `max_connections_per_client` connections.
    pub refused_max_connections_per_client: IntCounter,
    pub refused_header_timeout: IntCounter,
    pub refused_head_too_large: IntCounter,
    pub refused_bad_body_framing: IntCounter,
    /// A request head no HTTP/1.1 parser can read (a malformed field name or value, a bare
    /// CR), which pingora refused with a 400 of its own that nothing counted.
    pub refused_malformed_head: IntCounter,
    /// A connection to a PROXY protocol listener from a peer outside `trusted_proxies`.
    pub refused_proxy_untrusted: IntCounter,
    /// A connection to a PROXY protocol listener that did not open with a valid header.
    pub refused_bad_proxy_header: IntCounter,
    /// An HTTP/2 connection closed for cancelling more requests just after sending them than
    /// `[server.tls] h2_max_rapid_resets` allows.
    pub closed_h2_rapid_resets: IntCounter,
}

impl ConnectionMetrics {
    /// Counts kept but not exported: the admin port's own connections, which would otherwise
    /// be counted with the proxy's clients (and a scrape of `/metrics` would count itself).
    pub fn unexported() -> prometheus::Result<ConnectionMetrics> {
        let counter = |name: &str| IntCounter::new(name, "admin port connections");
        Ok(ConnectionMetrics {
            open: IntGauge::new("admin_connections_open", "admin port connections")?,
            refused_max_connections: counter("admin_refused_max_connections")?,
            refused_max_connections_per_client: counter("admin_refused_per_client")?,
            refused_header_timeout: counter("admin_refused_header_timeout")?,
            refused_head_too_large: counter("admin_refused_head_too_large")?,
            refused_bad_body_framing: counter("admin_refused_bad_body_framing")?,
            refused_malformed_head: counter("admin_refused_malformed_head")?,
            refused_proxy_untrusted: counter("admin_refused_proxy_untrusted")?,
            refused_bad_proxy_header: counter("admin_refused_bad_proxy_header")?,
            closed_h2_rapid_resets: counter("admin_closed_h2_rapid_resets")?,
        })
    }
}

/// How a TLS handshake on an HTTPS listener ended (`src/proxy/tls.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeResult {
    Full,
    Resumed,
    /// The client did not finish within `[server.tls] handshake_timeout`.
    Timeout,
    /// The client closed the connection before its handshake was done: a load balancer's TCP
    /// check, or a client that gave up. Apart from `Failed` so that health checks do not read
    /// as broken clients.
    Closed,
    /// A protocol error, an unsupported version or suite, or a reset connection.
    Failed,
}

impl HandshakeResult {
    pub const ALL: [HandshakeResult; 5] = [
        HandshakeResult::Full,
        HandshakeResult::Resumed,
        HandshakeResult::Timeout,
        HandshakeResult::Closed,
        HandshakeResult::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeResult::Full => "full",
            HandshakeResult::Resumed => "resumed",
            HandshakeResult::Timeout => "timeout",
            HandshakeResult::Closed => "closed",
            HandshakeResult::Failed => "failed",
        }
    }
}

/// TLS versions a handshake may end with: Skua offers these two only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    Tls12,
    Tls13,
}

impl TlsVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsVersion::Tls12 => "TLSv1.2",
            TlsVersion::Tls13 => "TLSv1.3",
        }
    }
}

/// TLS handshakes (`src/proxy/tls.rs`), their series resolved once.
pub struct TlsMetrics {
    handshakes: [IntCounter; HandshakeResult::ALL.len()],
    versions: [IntCounter; 2],
    http2: IntCounter,
}

impl TlsMetrics {
    pub fn handshake(&self, result: HandshakeResult) {
        self.handshakes[result as usize].inc();
    }

    /// A completed handshake's version, and whether it chose HTTP/2.
    pub fn established(&self, version: TlsVersion, http2: bool) {
        self.versions[version as usize].inc();
        if http2 {
            self.http2.inc();
        }
    }
}

pub struct Metrics {
    registry: Registry,
    pub connections: Arc<ConnectionMetrics>,
    pub tls: Arc<TlsMetrics>,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub response_bytes: IntCounterVec,
    pub purges: IntCounterVec,
    pub uncacheable: IntCounterVec,
    pub origin_errors: IntCounterVec,
    pub origin_requests: IntCounterVec,
    pub origin_duration: HistogramVec,
    pub coalesced: IntCounter,
    /// Misses sent to the origin without waiting on another reader's fetch: their URL's last
    /// answer could not be stored (`cache::hit_for_miss`).
    pub hit_for_miss: IntCounter,
    /// Bytes compressed before storing, by encoding (`br`, `gzip`) and side (`in`: as the
    /// origin sent them, `out`: as stored); `in` minus `out` is what compression saved.
    pub compression_bytes: IntCounterVec,
    pub purge_backlog: IntGauge,
    pub access_log_dropped: IntCounter,
    /// Requests answered 508: they carried this node's own `Via` entry (`proxy/via.rs`).
    pub forwarding_loops: IntCounter,
    pub purge_apply_delay: HistogramVec,
    pub bus: BusMetrics,
    pub tier_objects: IntGaugeVec,
    pub tier_bytes: IntGaugeVec,
    pub tier_capacity: IntGaugeVec,
    /// Lookups, stores, evictions and dropped entries per tier, from the tiers' own counters.
    pub tier_events: TierEvents,
    /// Objects evicted, by tier and reason (`size`: to make room; `expired`: nothing could
    /// serve them any more).
    pub evictions: TierEvents,
    /// The surrogate-key index: estimated bytes, distinct tags, responses refused when full.
    pub tag_index_bytes: IntGauge,
    pub tag_index_tags: IntGauge,
    pub tag_index_refused: IntCounter,
    /// Each pool's origins by state ([`OriginState`]), read from the pools at each scrape.
    pub origins: IntGaugeVec,
    pub build_info: IntGauge,
    /// 1 while the HTCP receiver's socket is bound; 0 when it is not (or HTCP is off).
    pub htcp_listening: IntGauge,
    /// 1 while this node drains (`POST /drain`, or an upgrade from a draining process), else 0;
    /// read from the readiness flag at each scrape.
    pub draining: IntGauge,
    pub htcp_dropped: IntCounter,
    /// SIGHUP reloads: `applied` (the new configuration runs) and `rejected` (the old one stays).
    pub reloads_applied: IntCounter,
    pub reloads_rejected: IntCounter,
    /// Hits by the code that answered them, indexed by [`HitPath`].
    pub hit_paths: [IntCounter; 3],
    /// Misses the front door fetched, stored and answered itself (`proxy/fill.rs`).
    pub front_door_fills: IntCounter,
    /// Responses `[[rule]]`s made, indexed by [`RuleAnswer`].
    pub rule_answers: [IntCounter; RuleAnswer::ALL.len()],
    /// Series of the per-request metrics resolved once, so counting a request hashes no labels.
    per_request: Vec<RequestSeries>,
    /// The dashboard's top URLs, top misses and recent purges (never metric labels).
    pub top: top::Top,
}

struct RequestSeries {
    by_class: [IntCounter; 5],
    duration: Histogram,
    bytes: IntCounter,
}

/// Counters mirrored from atomics the tiers keep themselves.
pub struct TierEvents(IntCounterVec);

impl TierEvents {
    /// Brings the counter up to `total` (the tier's own monotonic count).
    pub fn catch_up(&self, tier: &str, event: &str, total: u64) {
        let c = self.0.with_label_values(&[tier, event]);
        let seen = c.get();
        if total > seen {
            c.inc_by(total - seen);
        }
    }
}

/// What a `[[rule]]` answered instead of the cache or the origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleAnswer {
    Denied,
    Redirected,
    RateLimited,
}

impl RuleAnswer {
    pub const ALL: [RuleAnswer; 3] = [
        RuleAnswer::Denied,
        RuleAnswer::Redirected,
        RuleAnswer::RateLimited,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RuleAnswer::Denied => "denied",
            RuleAnswer::Redirected => "redirected",
            RuleAnswer::RateLimited => "rate_limited",
        }
    }
}

/// An origin's state, as `skua_origins` counts it (and `/stats` shows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginState {
    /// Its health checks pass (or there are none) and it has not failed a request lately.
    Up,
    /// Its health checks pass, but it failed a request within `fail_timeout`: passed over
    /// while another origin of the pool is up.
    Resting,
    /// Its health checks fail.
    Down,
}

impl OriginState {
    pub const ALL: [OriginState; 3] = [OriginState::Up, OriginState::Resting, OriginState::Down];

    pub fn of(healthy: bool, resting: bool) -> OriginState {
        match (healthy, resting) {
            (false, _) => OriginState::Down,
            (true, true) => OriginState::Resting,
            (true, false) => OriginState::Up,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            OriginState::Up => "up",
            OriginState::Resting => "resting",
            OriginState::Down => "down",
        }
    }
}

/// The code path that answered a hit: the request path has more than one, and they must
/// answer alike (`tests/front.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HitPath {
    /// `proxy::fast`, from the connection, before pingora builds a session.
    FrontDoor,
    /// `proxy::serve_fresh_hit`, in pingora's request phase.
    Session,
    /// pingora's cache state machine.
    Cache,
}

impl HitPath {
    pub const ALL: [HitPath; 3] = [HitPath::FrontDoor, HitPath::Session, HitPath::Cache];

    pub fn as_str(self) -> &'static str {
        match self {
            HitPath::FrontDoor => "front_door",
            HitPath::Session => "session",
            HitPath::Cache => "cache",
        }
    }
}

const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The response status class label: `1xx` … `5xx` (0, no response, counts as 5xx).
pub fn status_class(status: u16) -> &'static str {
    STATUS_CLASSES[class_index(status)]
}

fn class_index(status: u16) -> usize {
    match status {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}

/// One origin pool's series, looked up once per pool rather than by label on every miss.
pub struct OriginSeries {
    by_class: [IntCounter; 5],
    duration: prometheus::Histogram,
}

impl OriginSeries {
    /// Counts one origin response with status `status` that took `waited` to arrive.
    pub fn observe(&self, status: u16, waited: std::time::Duration) {
        self.by_class[class_index(status)].inc();
        self.duration.observe(waited.as_secs_f64());
    }
}

impl Metrics {
    /// One failed attempt at an origin of `pool`, by pingora's name for the error `kind`
    /// (`skua_origin_errors_total`).
    pub fn origin_error(&self, pool: &str, kind: &str) {
        self.origin_errors.with_label_values(&[pool, kind]).inc();
    }

    /// A storable response not stored: fills in progress held all of `[cache] fill_memory`.
    pub fn no_room_to_fill(&self) {
        let reason = crate::cache::policy::Uncacheable::FillMemory.as_str();
        self.uncacheable.with_label_values(&[reason]).inc();
    }

    /// The series of origin pool `pool`.
    pub fn origin_series(&self, pool: &str) -> OriginSeries {
        OriginSeries {
            by_class: STATUS_CLASSES
                .map(|class| self.origin_requests.with_label_values(&[pool, class])),
            duration: self.origin_duration.with_label_values(&[pool]),
        }
    }

    pub fn new() -> prometheus::Result<Metrics> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "skua_requests_total",
                "Client requests answered, by cache status and status class.",
            ),
            &["cache_status", "status_class"],
        )?;
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "skua_request_duration_seconds",
                "Time from request to the end of the response, by cache status.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
            &["cache_status"],
        )?;
        let response_bytes = IntCounterVec::new(
            Opts::new(
                "skua_response_body_bytes_total",
                "Response body bytes sent to clients, by cache status.",
            ),
            &["cache_status"],
        )?;
        let purges = IntCounterVec::new(
            Opts::new("skua_purges_total", "Purge requests, by source and result."),
            &["source", "result"],
        )?;
        let uncacheable = IntCounterVec::new(
            Opts::new(
                "skua_uncacheable_total",
                "Origin responses not stored, by reason.",
            ),
            &["reason"],
        )?;
        let origin_errors = IntCounterVec::new(
            Opts::new(
                "skua_origin_errors_total",
                "Failed attempts at an origin (each origin a request was tried on), by pool and pingora error kind.",
            ),
            &["pool", "kind"],
        )?;
        let origin_requests = IntCounterVec::new(
            Opts::new(
                "skua_origin_requests_total",
                "Responses from origins, by pool and status class.",
            ),
            &["pool", "status_class"],
        )?;
        let origin_duration = HistogramVec::new(
            HistogramOpts::new(
                "skua_origin_response_seconds",
                "Time from sending a request to an origin to its response header, by pool.",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["pool"],
        )?;
        let coalesced = IntCounter::new(
            "skua_coalesced_requests_total",
            "Requests that waited for another request's fetch of the same object instead of going to the origin.",
        )?;
        registry.register(Box::new(origin_requests.clone()))?;
        registry.register(Box::new(origin_duration.clone()))?;
        registry.register(Box::new(coalesced.clone()))?;
        let hit_for_miss = IntCounter::new(
            "skua_hit_for_miss_total",
            "Misses sent to the origin at once, not queued behind another request's fetch, because their URL's last answer could not be stored.",
        )?;
        registry.register(Box::new(hit_for_miss.clone()))?;
        let compression_bytes = IntCounterVec::new(
            Opts::new(
                "skua_compression_bytes_total",
                "Bytes of responses compressed before storing, by encoding (br, gzip) and side (in: from the origin, out: stored).",
            ),
            &["encoding", "side"],
        )?;
        registry.register(Box::new(compression_bytes.clone()))?;
        for encoding in ["br", "gzip"] {
            for side in ["in", "out"] {
                compression_bytes.with_label_values(&[encoding, side]);
            }
        }
        let access_log_dropped = IntCounter::new(
            "skua_access_log_dropped_total",
            "Access log lines dropped because the writer fell behind.",
        )?;
        registry.register(Box::new(access_log_dropped.clone()))?;
        let forwarding_loops = IntCounter::new(
            "skua_forwarding_loops_total",
            "Requests answered 508 Loop Detected: their Via showed they had passed through this node already (an origin pool that leads back to it).",
        )?;
        registry.register(Box::new(forwarding_loops.clone()))?;
        let purge_backlog = IntGauge::new(
            "skua_purge_backlog",
            "Purges received and waiting to be applied.",
        )?;
        let purge_apply_delay = HistogramVec::new(
            HistogramOpts::new(
                "skua_purge_apply_delay_seconds",
                "Time from receiving a queued purge to applying it, by source.",
            )
            .buckets(vec![0.0001, 0.001, 0.01, 0.1, 1.0, 10.0]),
            &["source"],
        )?;
        let bus = BusMetrics {
            connected: IntGauge::new(
                "skua_purge_bus_connected",
                "1 while this node is connected to the purge bus (NATS), else 0.",
            )?,
            lag: IntGauge::new(
                "skua_purge_bus_lag",
                "Purges on the bus not yet applied here (newest stream sequence minus last applied).",
            )?,
            unpublished: IntGauge::new(
                "skua_purge_bus_unpublished",
                "Purges applied here and waiting to be published to the bus.",
            )?,
            published: IntCounter::new(
                "skua_purge_bus_published_total",
                "Purges published to the bus and acknowledged by it.",
            )?,
            dropped: IntCounter::new(
                "skua_purge_bus_dropped_total",
                "Purges not queued for the bus because the queue held max_queued already; the other nodes were told to revalidate what they cached before instead.",
            )?,
            gaps: IntCounter::new(
                "skua_purge_bus_gaps_total",
                "Times the bus no longer held every purge this node missed, or another node could not queue every purge it took through a bus outage (max_queued), so objects cached before were marked for revalidation.",
            )?,
            refetched: IntCounter::new(
                "skua_purge_bus_refetched_total",
                "Purges the bus delivered to this node's consumer but that never arrived (lost on the way, as when nats-server stops), fetched again from the stream by sequence.",
            )?,
            stalls: IntCounter::new(
                "skua_purge_bus_stalls_total",
                "Times this node's bus consumer was made again because the stream went on while it received nothing for a quarter of a second (what it missed was fetched by sequence).",
            )?,
            reach: Histogram::with_opts(
                HistogramOpts::new(
                    "skua_purge_reach_seconds",
                    "Time from a purge being accepted by another node to its application here.",
                )
                .buckets(vec![
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    0.5, 1.0, 2.5, 10.0, 60.0,
                ]),
            )?,
        };
        registry.register(Box::new(bus.connected.clone()))?;
        registry.register(Box::new(bus.lag.clone()))?;
        registry.register(Box::new(bus.unpublished.clone()))?;
        registry.register(Box::new(bus.published.clone()))?;
        registry.register(Box::new(bus.dropped.clone()))?;
        registry.register(Box::new(bus.gaps.clone()))?;
        registry.register(Box::new(bus.refetched.clone()))?;
        registry.register(Box::new(bus.stalls.clone()))?;
        registry.register(Box::new(bus.reach.clone()))?;
        let connections_open =
            IntGauge::new("skua_connections_open", "Client connections open now.")?;
        registry.register(Box::new(connections_open.clone()))?;
        let refused = IntCounterVec::new(
            Opts::new(
                "skua_connections_refused_total",
                "Client connections answered and closed before a request was served, by reason (max_connections, max_connections_per_client, header_timeout, head_too_large, bad_body_framing, malformed_head, proxy_untrusted, bad_proxy_header), and HTTP/2 connections closed for cancelling too many requests at once (h2_rapid_resets).",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(refused.clone()))?;
        let connections = Arc::new(ConnectionMetrics {
            open: connections_open,
            refused_max_connections: refused.with_label_values(&["max_connections"]),
            refused_max_connections_per_client: refused
                .with_label_values(&["max_connections_per_client"]),
            refused_header_timeout: refused.with_label_values(&["header_timeout"]),
            refused_head_too_large: refused.with_label_values(&["head_too_large"]),
            refused_bad_body_framing: refused.with_label_values(&["bad_body_framing"]),
            refused_malformed_head: refused.with_label_values(&["malformed_head"]),
            refused_proxy_untrusted: refused.with_label_values(&["proxy_untrusted"]),
            refused_bad_proxy_header: refused.with_label_values(&["bad_proxy_header"]),
            closed_h2_rapid_resets: refused.with_label_values(&["h2_rapid_resets"]),
        });
        let handshakes = IntCounterVec::new(
            Opts::new(
                "skua_tls_handshakes_total",
                "TLS handshakes on the HTTPS listeners, by result (full, resumed, timeout, closed, failed).",
            ),
            &["result"],
        )?;
        registry.register(Box::new(handshakes.clone()))?;
        let versions = IntCounterVec::new(
            Opts::new(
                "skua_tls_connections_total",
                "TLS connections established, by protocol version.",
            ),
            &["version"],
        )?;
        registry.register(Box::new(versions.clone()))?;
        let http2 = IntCounter::new(
            "skua_tls_http2_connections_total",
            "TLS connections that chose HTTP/2 by ALPN.",
        )?;
        registry.register(Box::new(http2.clone()))?;
        let tls = Arc::new(TlsMetrics {
            handshakes: HandshakeResult::ALL.map(|r| handshakes.with_label_values(&[r.as_str()])),
            versions: [TlsVersion::Tls12, TlsVersion::Tls13]
                .map(|v| versions.with_label_values(&[v.as_str()])),
            http2,
        });
        let tier_objects = IntGaugeVec::new(
            Opts::new("skua_cache_objects", "Objects stored, by tier."),
            &["tier"],
        )?;
        let tier_bytes = IntGaugeVec::new(
            Opts::new("skua_cache_bytes", "Bytes stored, by tier."),
            &["tier"],
        )?;
        let tier_capacity = IntGaugeVec::new(
            Opts::new("skua_cache_capacity_bytes", "Configured capacity, by tier."),
            &["tier"],
        )?;
        let tier_events = TierEvents(IntCounterVec::new(
            Opts::new(
                "skua_cache_tier_events_total",
                "Cache tier events (lookup, hit, miss, store, eviction, corrupt, write_error; for disk also readmit: a hot object copied forward when its segment was evicted, read_waited: a read the page cache could not answer at once, read_mapped: a read answered by a view of a mapped segment), by tier.",
            ),
            &["tier", "event"],
        )?);
        registry.register(Box::new(tier_events.0.clone()))?;
        let evictions = TierEvents(IntCounterVec::new(
            Opts::new(
                "skua_cache_evictions_total",
                "Objects evicted, by tier and reason (size: to make room; expired: past every freshness, stale and revalidation window; variants: a URL's oldest variant, replaced past [cache] max_variants).",
            ),
            &["tier", "reason"],
        )?);
        registry.register(Box::new(evictions.0.clone()))?;
        for tier in ["memory", "disk"] {
            for reason in ["size", "expired", "variants"] {
                evictions.catch_up(tier, reason, 0);
            }
        }
        let tag_index_bytes = IntGauge::new(
            "skua_tag_index_bytes",
            "Estimated bytes held by the surrogate-key index (bounded by [purge] tag_index_size).",
        )?;
        let tag_index_tags =
            IntGauge::new("skua_tag_index_tags", "Distinct surrogate keys indexed.")?;
        let tag_index_refused = IntCounter::new(
            "skua_tag_index_refused_total",
            "Tagged responses not stored because the surrogate-key index was full.",
        )?;
        for g in [&tag_index_bytes, &tag_index_tags] {
            registry.register(Box::new(g.clone()))?;
        }
        registry.register(Box::new(tag_index_refused.clone()))?;
        let origins = IntGaugeVec::new(
            Opts::new(
                "skua_origins",
                "Origins of each pool by state: up (its health checks pass), resting (it failed a request within fail_timeout), down (its health checks fail).",
            ),
            &["pool", "state"],
        )?;
        registry.register(Box::new(origins.clone()))?;
        let build_info = IntGauge::with_opts(
            Opts::new("skua_build_info", "Always 1; the labels name the build.")
                .const_label("version", env!("CARGO_PKG_VERSION")),
        )?;
        build_info.set(1);
        let reloads = IntCounterVec::new(
            Opts::new(
                "skua_config_reloads_total",
                "Configuration reloads (SIGHUP), by result (applied, rejected).",
            ),
            &["result"],
        )?;
        registry.register(Box::new(reloads.clone()))?;
        let reloads_applied = reloads.with_label_values(&["applied"]);
        let htcp_listening = IntGauge::new(
            "skua_htcp_listening",
            "1 while the HTCP receiver is listening; 0 when it cannot bind its address (or HTCP is off).",
        )?;
        registry.register(Box::new(htcp_listening.clone()))?;
        let draining = IntGauge::new(
            "skua_draining",
            "1 while an operator drains this node (POST /drain on the admin port): its health says 503 and every answer closes its connection.",
        )?;
        registry.register(Box::new(draining.clone()))?;
        let htcp_dropped = IntCounter::new(
            "skua_htcp_dropped_total",
            "HTCP datagrams the kernel dropped because the receive buffer was full (Linux only; raise net.core.rmem_max if this grows).",
        )?;
        registry.register(Box::new(htcp_dropped.clone()))?;
        let hit_path = IntCounterVec::new(
            Opts::new(
                "skua_hits_by_path_total",
                "Cache hits by the code that answered them (front_door: from the connection, before pingora; session: in pingora's request phase; cache: pingora's cache state machine).",
            ),
            &["path"],
        )?;
        registry.register(Box::new(hit_path.clone()))?;
        let hit_paths = HitPath::ALL.map(|p| hit_path.with_label_values(&[p.as_str()]));
        let front_door_fills = IntCounter::new(
            "skua_front_door_fills_total",
            "Requests for URLs memory held nothing of that the front door sent to the origin and answered itself, without pingora's proxy path (the rest of the misses and passes take that path).",
        )?;
        registry.register(Box::new(front_door_fills.clone()))?;
        let rule_answer = IntCounterVec::new(
            Opts::new(
                "skua_rule_answers_total",
                "Requests a [[rule]] answered itself, by answer (denied, redirected, rate_limited).",
            ),
            &["answer"],
        )?;
        registry.register(Box::new(rule_answer.clone()))?;
        let rule_answers = RuleAnswer::ALL.map(|a| rule_answer.with_label_values(&[a.as_str()]));
        let reloads_rejected = reloads.with_label_values(&["rejected"]);
        for c in [
            &requests,
            &response_bytes,
            &purges,
            &uncacheable,
            &origin_errors,
        ] {
            registry.register(Box::new(c.clone()))?;
        }
        registry.register(Box::new(request_duration.clone()))?;
        registry.register(Box::new(purge_backlog.clone()))?;
        registry.register(Box::new(purge_apply_delay.clone()))?;
        for g in [&tier_objects, &tier_bytes, &tier_capacity] {
            registry.register(Box::new(g.clone()))?;
        }
        registry.register(Box::new(build_info.clone()))?;
        // Every series of the closed vocabulary exists from the start (dashboards see zeros),
        // resolved once.
        let per_request = Disposition::ALL
            .iter()
            .map(|d| RequestSeries {
                by_class: STATUS_CLASSES.map(|c| requests.with_label_values(&[d.as_str(), c])),
                duration: request_duration.with_label_values(&[d.as_str()]),
                bytes: response_bytes.with_label_values(&[d.as_str()]),
            })
            .collect();
        Ok(Metrics {
            registry,
            connections,
            tls,
            requests,
            request_duration,
            response_bytes,
            purges,
            uncacheable,
            origin_errors,
            purge_backlog,
            origin_requests,
            origin_duration,
            coalesced,
            hit_for_miss,
            compression_bytes,
            access_log_dropped,
            forwarding_loops,
            purge_apply_delay,
            bus,
            tier_objects,
            tier_bytes,
            tier_capacity,
            tier_events,
            evictions,
            tag_index_bytes,
            tag_index_tags,
            tag_index_refused,
            origins,
            build_info,
            reloads_applied,
            reloads_rejected,
            htcp_listening,
            draining,
            htcp_dropped,
            hit_paths,
            front_door_fills,
            rule_answers,
            per_request,
            top: top::Top::new(),
        })
    }

    /// Requests and response body bytes so far, by cache status (for `/stats`).
    pub fn totals_by_disposition(&self) -> Vec<(&'static str, u64, u64)> {
        Disposition::ALL
            .iter()
            .zip(&self.per_request)
            .map(|(d, s)| {
                let requests = s.by_class.iter().map(|c| c.get()).sum();
                (d.as_str(), requests, s.bytes.get())
            })
            .collect()
    }

    /// Purges received from every source, whatever their result.
    pub fn purges_total(&self) -> u64 {
        use prometheus::core::Collector;
        self.purges
            .collect()
            .iter()
            .flat_map(|family| family.get_metric())
            .map(|m| m.get_counter().value() as u64)
            .sum()
    }

    /// Counts one answered request.
    pub fn observe_request(
        &self,
        disposition: Disposition,
        status: u16,
        seconds: f64,
        body_bytes: u64,
    ) {
        if let Some(series) = self.per_request.get(disposition.index()) {
            series.by_class[class_index(status)].inc();
            series.duration.observe(seconds);
            series.bytes.inc_by(body_bytes);
        }
    }

    /// Prometheus text exposition of Skua's metrics followed by pingora's own (the default
    /// registry).
    pub fn render(&self) -> String {
        let mut families = self.registry.gather();
        families.extend(prometheus::gather());
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&families, &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every metric the shipped Grafana dashboard queries exists, so no panel is silently empty.
    #[test]
    fn grafana_dashboard_queries_only_metrics_that_exist() {
        let m = Metrics::new().unwrap();
        m.origin_errors
            .with_label_values(&["p", "ConnectRefused"])
            .inc();
        m.origin_requests.with_label_values(&["p", "2xx"]).inc();
        m.origin_duration.with_label_values(&["p"]).observe(0.01);
        m.purge_apply_delay
            .with_label_values(&["htcp"])
            .observe(0.001);
        m.uncacheable.with_label_values(&["no-store"]).inc();
        m.purges.with_label_values(&["http", "purged"]).inc();
        m.origins.with_label_values(&["p", "up"]).set(1);
        m.tier_events.catch_up("memory", "hit", 1);
        for g in [&m.tier_objects, &m.tier_bytes, &m.tier_capacity] {
            g.with_label_values(&["memory"]).set(1);
        }
        let text = m.render();
        let dashboard = include_str!("../../config/grafana/skua-dashboard.json");
        let mut checked = 0;
        for (i, _) in dashboard.match_indices("skua_") {
            let name: String = dashboard[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(&name);
            if family == "skua_" || family.starts_with("skua_overview") {
                continue;
            }
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "dashboard uses {name}, which Skua does not export"
            );
            checked += 1;
        }
        assert!(checked > 10);
    }

    #[test]
    fn renders_exact_lines() {
        let m = Metrics::new().unwrap();
        m.requests.with_label_values(&["hit-front", "2xx"]).inc();
        m.purges.with_label_values(&["http", "purged"]).inc_by(2);
        let text = m.render();
        assert!(
            text.contains(
                "skua_requests_total{cache_status=\"hit-front\",status_class=\"2xx\"} 1\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("skua_purges_total{result=\"purged\",source=\"http\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("skua_build_info{version=\""), "{text}");
        assert!(
            text.contains("skua_response_body_bytes_total{cache_status=\"miss\"} 0\n"),
            "{text}"
        );
    }
}
