//! The request path. Before any of it, `connection.rs` reads the request head under the
//! connection limits and `fast.rs` answers fresh memory hits for plain HTTP/1.1 GET/HEAD
//! requests from the connection itself; every other request takes this path, in the order
//! pingora calls it:
//!
//! 1. `request_filter`: PURGE (authorised, answered here), refusals, the request's cache URL;
//! 2. `request_cache_filter`: GET/HEAD only, session-cookie and Authorization bypass, then the
//!    cache is enabled with the cache lock (one origin fetch per object);
//! 3. `cache_key_callback` / `cache_vary_filter` / `cache_hit_filter`: the canonical key, Vary,
//!    and whether a stored copy may be served (`hit::verdict`);
//! 4. on a miss: `upstream_peer` (origin pool), `upstream_request_filter`,
//!    `upstream_response_filter` (RFC 9111 §4.4 invalidation), `response_cache_filter` (policy);
//! 5. `response_filter`: `Age`, `Cache-Status`, `X-Cache-Status` (`hit::mark`);
//! 6. `logging`: metrics and the access log (`record`).
//!
//! A hit is decided in `hit.rs` whichever code answers it: the front door, `serve_fresh_hit`
//! here, or pingora's cache state machine.
//!
//! It owns the flow; what is cacheable, how objects are stored and which origin is chosen are
//! decided in `cache` and `upstream`.

mod body_watch;
pub mod compress;
pub mod connection;
mod debug;
mod delegate;
mod edit;
pub mod fast;
pub mod fill;
pub mod guard;
mod h2;
pub mod hit;
mod http10;
mod progress;
pub mod proxy_protocol;
mod record;
pub mod request_id;
mod respond;
pub mod tls;
pub mod via;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::header::HeaderValue;
use http::{header, Method};
use pingora::cache::key::HashBinary;
use pingora::cache::lock::{CacheKeyLockImpl, CacheLock};
use pingora::cache::{
    CacheKey, CacheMeta, CacheOptionOverrides, CachePhase, ForcedFreshness, HitHandler,
    NoCacheReason, RespCacheable,
};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorSource, ErrorType, OrErr, Result};

use crate::cache::disk::DiskHit;
use crate::cache::hit_for_miss::Storability;
use crate::cache::key::{CacheUrl, HostAliases, Scheme};
use crate::cache::memory::MemoryHit;
use crate::cache::meta::{decode_head, AgeWhenHeard, CACHE_STATUS, X_CACHE_STATUS};
use crate::cache::partial::{self, ByteRange};
use crate::cache::policy::StoragePolicy;
use crate::cache::status::{Disposition, Outcome, PassReason};
use crate::cache::{vary, PurgeMode, Store};
use crate::config::rules::Answer;
use crate::config::{Config, OriginPool, UnsafeInvalidation};
use crate::metrics::access_log::AccessLog;
use crate::metrics::RuleAnswer;
use crate::metrics::{HitPath, Metrics};
use crate::purge::{self, peer_ip, Acl, Purge, PurgeAuth, PurgeResult, Scope, Source};
use crate::rules::canonical::Canonical;
use crate::rules::{self, RuleSet};
use crate::upstream::{self, Pools, SharedPools};

/// The path on the proxy port that answers whether this node is ready to serve (200) or not
/// (503, with the reason), for a load balancer or a frontend Skua's health checks. It is
/// answered here, never forwarded nor cached, and not counted as client traffic (a frontend
/// checking every second would otherwise show as misses on every backend's dashboard).
pub const HEALTH_PATH: &str = "/_skua/health";

/// Everything the request path reads, built once at start-up.
pub struct ProxyState {
    pub name: String,
    /// This node's `Via` entry on what it forwards, and how it knows a request it forwarded.
    pub via: via::Via,
    pub store: &'static Store,
    /// Applies purges here and publishes them to the fleet.
    pub purger: purge::Purger,
    lock: &'static CacheKeyLockImpl,
    /// The URLs whose misses skip the lock: their last answer could not be stored.
    pub hit_for_miss: crate::cache::hit_for_miss::HitForMiss,
    /// What a SIGHUP reload may change, swapped whole so a request sees one version.
    settings: ArcSwap<Settings>,
    /// The canonical key function (`[cache] host_aliases`, the rules' `normalize_query`),
    /// which a reload may change too; shared with the HTCP receiver and the admin port.
    pub canonical: Arc<ArcSwap<Canonical>>,
    pub pools: SharedPools,
    /// The `[[origin]]` pools as last resolved (`upstream::resolve`): what `pools` were built
    /// from. A reload and a new DNS answer each replace both, one at a time.
    origins: ArcSwap<Vec<OriginPool>>,
    origins_changing: std::sync::Mutex<()>,
    pub metrics: Arc<Metrics>,
    access_log: Option<AccessLog>,
    /// `[purge] allow` and `token`, which a reload may change too; shared with the admin port.
    pub purge_auth: Arc<ArcSwap<PurgeAuth>>,
    /// Whether this node can tell purged copies from current ones yet; shared with the admin
    /// port.
    pub readiness: purge::Readiness,
    /// The HTTPS listeners' TLS (`[server.tls]`), whose certificates a reload replaces.
    tls: std::sync::OnceLock<Arc<tls::TlsTerminator>>,
}

impl ProxyState {
    /// Opens the access log file again (SIGUSR1, after a rotation).
    pub fn reopen_access_log(&self) {
        if let Some(log) = &self.access_log {
            log.reopen();
        }
    }

    pub fn new(
        config: &Config,
        store: &'static Store,
        (origins, pools): (Vec<OriginPool>, SharedPools),
        metrics: Arc<Metrics>,
        bus: Option<Arc<purge::bus::Bus>>,
    ) -> ProxyState {
        // pingora's storage and lock APIs take `&'static`; both live as long as the process.
        let lock: &'static CacheLock = Box::leak(CacheLock::new_boxed(config.cache.lock_timeout));
        let relay = Arc::new(purge::handover::Relay::new(&config.server.upgrade_sock));
        if let Some(bus) = &bus {
            bus.relaying(relay.clone());
        }
        ProxyState {
            name: config.server.name.clone(),
            via: via::Via::new(&config.server.name),
            store,
            purger: purge::Purger::new(store, bus, metrics.clone()).relaying(relay),
            lock,
            hit_for_miss: Default::default(),
            settings: ArcSwap::from_pointee(Settings::from(config)),
            canonical: Arc::new(ArcSwap::from_pointee(canonical(config))),
            access_log: config.access_log.as_ref().and_then(|c| {
                AccessLog::open(c, metrics.access_log_dropped.clone())
                    .map_err(|e| tracing::error!(error = %e, "cannot open the access log"))
                    .ok()
            }),
            purge_auth: Arc::new(ArcSwap::from_pointee(purge_auth(config))),
            readiness: purge::Readiness::new(
                store,
                config
                    .purge
                    .htcp
                    .as_ref()
                    .map(|h| (h.listen, metrics.htcp_listening.clone())),
            ),
            pools,
            origins: ArcSwap::from_pointee(origins),
            origins_changing: std::sync::Mutex::new(()),
            metrics,
            tls: std::sync::OnceLock::new(),
        }
    }

    /// The TLS terminator of the HTTPS listeners, for reloads to give new certificates to.
    pub fn set_tls(&self, terminator: Arc<tls::TlsTerminator>) {
        let _ = self.tls.set(terminator);
    }
}

/// `[purge] allow` and `token`, with the proxies whose forwarded client is judged instead.
fn purge_auth(config: &Config) -> PurgeAuth {
    PurgeAuth::new(
        config.purge.allow.clone(),
        config.purge.token.clone(),
        config.server.trusted_proxies.clone(),
    )
}

/// The canonical key function `config` asks for.
fn canonical(config: &Config) -> Canonical {
    Canonical::new(
        HostAliases(config.cache.host_aliases.clone()),
        &config.rules,
    )
}

/// The parts of the configuration a reload (SIGHUP) applies in place besides the origin pools:
/// storage policy (TTL cap, grace, heuristics), bypass rules, host aliases, purge ACL and
/// token, how long requests wait for another's fetch. Listeners, tiers, HTCP and the purge bus
/// need a restart (or pingora's graceful upgrade).
pub struct Settings {
    lock_wait: LockWait,
    policy: StoragePolicy,
    bypass_cookies: Vec<regex::Regex>,
    bypass_authorization: bool,
    /// `[server]`'s head limits, with `max_body_bytes` the largest any request may send (a
    /// rule's `max_body_bytes` may raise it): what is refused before the rules are read.
    limits: crate::config::HeadLimits,
    /// `[server] max_body_bytes`: a request body's limit where no rule gives one.
    max_body_bytes: Option<u64>,
    hosts: Vec<String>,
    trusted_proxies: Acl,
    strip_headers: Vec<http::HeaderName>,
    /// `[server] server_timing`: answers name how the cache answered in `Server-Timing`.
    server_timing: bool,
    /// `[server] error_page`.
    error_page: Option<Arc<str>>,
    /// `[server] request_id`.
    request_id: bool,
    vary_cookies: Vec<String>,
    keepalive_secs: u64,
    invalidate_on_unsafe: UnsafeInvalidation,
    body_timeout: std::time::Duration,
    /// `[server] body_min_rate`.
    body_min_rate: Option<u64>,
    /// `[cache] downstream_cache_control`.
    downstream_cache_control: Option<HeaderValue>,
    /// `[cache] compress`.
    compress: crate::config::Compress,
    /// `[server.tls] redirect_http`.
    https_redirect: Option<HttpsRedirect>,
    /// `[[rule]]`, compiled.
    rules: Arc<RuleSet>,
}

/// Which hosts' plain-HTTP requests are sent to https, and the port that serves it.
struct HttpsRedirect {
    hosts: Vec<String>,
    port: u16,
}

impl Settings {
    /// Where a plain-HTTP request for `url` is sent instead (`[server.tls] redirect_http`):
    /// the same path and query over https, on the HTTPS listener's port.
    fn https_location(&self, url: &CacheUrl) -> Option<String> {
        let redirect = self.https_redirect.as_ref()?;
        if url.scheme != Scheme::Http {
            return None;
        }
        let bare = url.host_name();
        let redirected = redirect
            .hosts
            .iter()
            .any(|p| p == "*" || crate::config::certificate::covers(p, bare));
        if !redirected {
            return None;
        }
        let port = match redirect.port {
            443 => String::new(),
            port => format!(":{port}"),
        };
        Some(format!("https://{bare}{port}{}", url.path_and_query))
    }

    fn pass_reason(&self, method: &Method, headers: &http::HeaderMap) -> Option<PassReason> {
        let cookies = headers.get_all(header::COOKIE).into_iter();
        self.pass_reason_of(
            method,
            || headers.contains_key(header::AUTHORIZATION),
            cookies.map(http::HeaderValue::as_bytes),
        )
    }

    /// [`Settings::pass_reason`] from what a parser noted of the head: whether it has an
    /// `Authorization` field, and its `Cookie` field values (the front door notes both while
    /// it parses, rather than look them up in a map again).
    fn pass_reason_of<'a>(
        &self,
        method: &Method,
        authorization: impl FnOnce() -> bool,
        cookies: impl IntoIterator<Item = &'a [u8]>,
    ) -> Option<PassReason> {
        if !matches!(*method, Method::GET | Method::HEAD) {
            return Some(PassReason::Method);
        }
        if self.bypass_authorization && authorization() {
            return Some(PassReason::Authorization);
        }
        let session_cookie = cookies.into_iter().any(|v| {
            let v = String::from_utf8_lossy(v);
            self.bypass_cookies.iter().any(|re| re.is_match(&v))
        });
        session_cookie.then_some(PassReason::Cookie)
    }

    /// Whether `[server] hosts` lets this cache serve `host` (port ignored).
    fn serves_host(&self, host: &str) -> bool {
        if self.hosts.is_empty() {
            return true;
        }
        let bare = crate::config::host::without_port(host);
        self.hosts.iter().any(|h| h == bare)
    }
}

impl Settings {
    /// The `[[rule]]`s' decision for a request to `url`, and the client address they judged
    /// it by (behind `[server] trusted_proxies`; asked of `peer` only when a rule reads it).
    /// `None` when no rule acts on requests. The one decision the front door and the full
    /// path both act on. `found`: the stored object the front door serves, which keeps what
    /// the rules' URL conditions said of its URL ([`rules::RuleSet::decide_remembering`]), and
    /// whether the request has a `Cookie` field at all.
    fn decide_rules<F: crate::cache::fields::RequestFields + ?Sized>(
        &self,
        url: &CacheUrl,
        method: &Method,
        fields: &F,
        peer: impl FnOnce() -> Option<IpAddr>,
        found: Option<(&crate::cache::memory::UrlMemo, bool)>,
    ) -> Option<(rules::Decision, Option<IpAddr>)> {
        let set = &self.rules;
        if !set.acts() {
            return None;
        }
        let client = (set.reads_client())
            .then(|| purge::client_behind(&self.trusted_proxies, peer(), fields))
            .flatten();
        let decision = match found {
            Some((memo, cookies)) => {
                let asked = rules::Asked {
                    method,
                    fields,
                    client,
                    cookies,
                };
                set.decide_remembering(memo, url, &asked)
            }
            None => set.decide(&rules::Request::of(url, method, fields, client)),
        };
        Some((decision, client))
    }
}

/// How requests wait for another's fetch of the same object (pingora's cache lock).
///
/// A fetch that has not answered within `[cache] lock_timeout` lets one waiting request fetch
/// too (the lock's age, set when the lock is made; nginx's `proxy_cache_lock_age`): a slow
/// page costs the origin one more fetch per `lock_timeout`. The others go on waiting, on the
/// newest fetch's lock, and look again when it answers or ages (so they may find the page a
/// little after an older fetch stored it), for as long as a fetch can take to answer or fail
/// (the slowest pool's `connect_timeout` plus `read_timeout`) past `lock_timeout`; only then
/// does each fetch for itself. Regression: the wait ended with the lock's age, so when a page
/// took longer than `lock_timeout` every waiting request went to the origin at the same
/// moment (20 readers of a heavy page being parsed, 20 parses).
#[derive(Clone, Copy)]
struct LockWait {
    wait: std::time::Duration,
    /// How many times a request may look again after a wait ends (a fetch answered, failed or
    /// aged past `lock_timeout`) before it fetches for itself: enough for the whole `wait`.
    retries: usize,
}

impl LockWait {
    fn of(config: &Config) -> LockWait {
        let age = config
            .cache
            .lock_timeout
            .max(std::time::Duration::from_millis(1));
        let slowest_fetch = (config.origins.iter())
            .map(|pool| pool.connect_timeout.saturating_add(pool.read_timeout))
            .max()
            .unwrap_or_default();
        let wait = age.saturating_add(slowest_fetch);
        let ages = wait.as_millis().div_ceil(age.as_millis());
        LockWait {
            wait,
            retries: usize::try_from(ages)
                .unwrap_or(usize::MAX)
                .saturating_add(2),
        }
    }
}

impl From<&Config> for Settings {
    fn from(config: &Config) -> Settings {
        let rules = RuleSet::new(config.rules.clone());
        let max_body_bytes = config.server.limits.max_body_bytes;
        Settings {
            lock_wait: LockWait::of(config),
            policy: StoragePolicy::from(&config.cache),
            bypass_cookies: config.cache.bypass_cookies.clone(),
            bypass_authorization: config.cache.bypass_authorization,
            limits: crate::config::HeadLimits {
                max_body_bytes: rules.body_ceiling(max_body_bytes),
                ..config.server.limits
            },
            max_body_bytes,
            hosts: config.server.hosts.clone(),
            trusted_proxies: Acl::new(config.server.trusted_proxies.clone()),
            strip_headers: config.server.strip_headers.clone(),
            server_timing: config.server.server_timing,
            error_page: config.server.error_page.clone(),
            request_id: config.server.request_id,
            vary_cookies: config.cache.vary_cookies.clone(),
            keepalive_secs: config.server.keepalive_timeout.as_secs().max(1),
            invalidate_on_unsafe: config.cache.invalidate_on_unsafe,
            downstream_cache_control: config.cache.downstream_cache_control.clone(),
            compress: config.cache.compress,
            body_timeout: config.server.body_timeout,
            body_min_rate: config.server.body_min_rate,
            https_redirect: config.server.tls.as_ref().and_then(|tls| {
                let port = tls.listen.first()?.port();
                (!tls.redirect_http.is_empty()).then(|| HttpsRedirect {
                    hosts: tls.redirect_http.clone(),
                    port,
                })
            }),
            rules: Arc::new(rules),
        }
    }
}

impl ProxyState {
    /// Whether a purge from `ip` carrying `req`'s headers is allowed: the purge networks, and
    /// the bearer token when one is configured.
    pub fn purge_allowed(&self, ip: Option<IpAddr>, req: &RequestHeader) -> bool {
        self.purge_auth.load().allows(ip, req)
    }

    /// Why a request may not use the cache at all, if it may not.
    pub fn pass_reason(&self, method: &Method, headers: &http::HeaderMap) -> Option<PassReason> {
        self.settings.load().pass_reason(method, headers)
    }

    /// `url` with its host replaced by the canonical one when it is an alias.
    pub fn canonical(&self, url: CacheUrl) -> CacheUrl {
        self.canonical.load().canonical(url)
    }

    /// Applies a reloaded configuration's rules and origin pools; requests already running
    /// keep theirs. Everything is built before anything is swapped in, so a configuration
    /// that fails to build changes nothing.
    pub fn reload(&self, config: &Config) -> anyhow::Result<()> {
        let _changing = (self.origins_changing.lock()).unwrap_or_else(PoisonError::into_inner);
        let origins = upstream::resolve::resolve(&config.origins, Some(&self.origins.load()));
        let pools = Pools::rebuild(&origins, &self.pools.load())?;
        let settings = Settings::from(config);
        // Certificates were read and checked with the configuration; new handshakes use them.
        let tls = match (self.tls.get(), &config.server.tls) {
            (Some(terminator), Some(tls)) => Some((terminator, terminator.prepare(tls)?)),
            _ => None,
        };
        if let Some((terminator, prepared)) = tls {
            terminator.apply(prepared);
        }
        self.pools.store(Arc::new(pools));
        self.origins.store(Arc::new(origins));
        self.settings.store(Arc::new(settings));
        self.store
            .invalidations
            .keep_for_at_least(config.cache.ttl_cap);
        self.store.fills.set_limit(config.cache.fill_memory);
        self.canonical.store(Arc::new(canonical(config)));
        self.purge_auth.store(Arc::new(purge_auth(config)));
        Ok(())
    }

    /// How long until the origins' DNS names are looked up again: the shortest
    /// `resolve_interval` of a pool that names one; `None` when no pool does.
    pub fn resolve_interval(&self) -> Option<std::time::Duration> {
        let origins = self.origins.load();
        (origins.iter())
            .filter(|p| upstream::resolve::names_origins(p))
            .map(|p| p.resolve_interval)
            .min()
    }

    /// Looks the origins' DNS names up again; when an answer changed a pool's origins, the
    /// pools are rebuilt as a reload rebuilds them (requests in flight keep theirs; an origin
    /// kept keeps its count of requests in flight and its rest).
    pub async fn resolve_origins_again(&self) {
        let current = self.origins.load_full();
        if !upstream::resolve::any_names(&current) {
            return;
        }
        let looked_up = current.clone();
        // The system's resolver blocks (getaddrinfo).
        let fresh = tokio::task::spawn_blocking(move || {
            upstream::resolve::resolve(&looked_up, Some(&looked_up))
        })
        .await;
        let Ok(fresh) = fresh else {
            return;
        };
        let unchanged = |(a, b): (&OriginPool, &OriginPool)| a.resolved == b.resolved;
        if current.iter().zip(fresh.iter()).all(unchanged) {
            return;
        }
        let _changing = (self.origins_changing.lock()).unwrap_or_else(PoisonError::into_inner);
        if !Arc::ptr_eq(&self.origins.load(), &current) {
            // A reload came in between and resolved its own pools.
            return;
        }
        if upstream::resolve::same_addresses(&current, &fresh) {
            // A name failed (or came back) with the addresses it had: nothing to rebuild.
            self.origins.store(Arc::new(fresh));
            return;
        }
        match Pools::rebuild(&fresh, &self.pools.load()) {
            Ok(pools) => {
                self.pools.store(Arc::new(pools));
                self.origins.store(Arc::new(fresh));
            }
            Err(e) => tracing::error!(error = %e, "origin pools not rebuilt for new DNS answers"),
        }
    }
}

/// The proxy: one value shared by every request.
pub struct CachingProxy {
    shared: Arc<ProxyState>,
}

impl CachingProxy {
    /// An answer of Skua's own for a failure: the operator's page for a 5xx
    /// (`[server] error_page`), else one line of text.
    async fn error(
        &self,
        session: &mut Session,
        (status, request_id): (u16, Option<&str>),
        message: &str,
    ) -> Result<()> {
        if status < 500 {
            let line = format!("skua: {message}");
            return respond::text(&self.shared.name, session, status, &line).await;
        }
        let page = self.shared.settings.load().error_page.clone();
        let facts = respond::PageFacts {
            status,
            message,
            node: &self.shared.name,
            client: client_ip(session),
            request_id,
        };
        respond::error(session, page.as_deref(), facts).await
    }
    /// How long a request waits on another's fetch of the same object before it fetches.
    fn lock_overrides(&self) -> CacheOptionOverrides {
        let LockWait { wait, retries } = self.shared.settings.load().lock_wait;
        let mut overrides = CacheOptionOverrides::default();
        overrides.wait_timeout = Some(wait);
        overrides.max_lock_retries = Some(retries);
        overrides
    }

    pub fn new(shared: Arc<ProxyState>) -> CachingProxy {
        CachingProxy { shared }
    }
}

/// The scheme of the listener a request arrived on: https when Skua terminated TLS for it.
fn listener_scheme(session: &Session) -> Scheme {
    let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
    if tls {
        Scheme::Https
    } else {
        Scheme::Http
    }
}

/// Set once a forwarding loop has been logged: each request of a loop comes back, and one line
/// says what is wrong (the counter says how often).
static LOOP_WARNED: AtomicBool = AtomicBool::new(false);

/// Per-request state.
pub struct RequestCtx {
    started: Instant,
    url: Option<CacheUrl>,
    /// `url`'s primary key hash, computed once (pingora's `CacheKey` would hash it again at
    /// every storage and lock call).
    primary: Option<HashBinary>,
    /// The URL's last answer could not be stored: a miss goes to the origin without the cache
    /// lock; a copy found takes the lock back (`cache::hit_for_miss`).
    hit_for_miss: bool,
    pass: Option<PassReason>,
    internal: bool,
    fast_hit: bool,
    local_hit: bool,
    stored: bool,
    fresh_until: Option<SystemTime>,
    fwd_status: Option<u16>,
    pool: usize,
    /// A `[[rule]]`'s lifetime and grace for what this request stores.
    ttl_rule: Option<(std::time::Duration, Option<std::time::Duration>)>,
    /// The rules this request was decided by, and the one whose `response_headers` apply.
    response_edits: Option<(Arc<RuleSet>, u16)>,
    /// A rule's `rate_limit` with `origin_only`, and the client it counts: taken from only
    /// when the request goes to the origin.
    rate_limit_at_origin: Option<(Arc<RuleSet>, u16, Option<IpAddr>)>,
    failed_origins: Vec<SocketAddr>,
    /// The origin this request's current attempt went to.
    origin_addr: Option<SocketAddr>,
    /// The request was sent once more after an origin's answer with one of its pool's
    /// `retry_statuses` (once at most).
    retried_on_status: bool,
    /// This request's place among those in flight to its origin (`[[origin]]
    /// max_connections`), held until the origin's response has been read.
    origin_permit: Option<crate::upstream::OriginPermit>,
    /// The request body's limit (`[server] max_body_bytes`, or a rule's) and the bytes of it read
    /// so far.
    request_body: (Option<u64>, u64),
    /// The body of a `GET` or `HEAD` whose answer may be stored is read and not sent on.
    request_body_withheld: bool,
    /// The body was read whole before the origin was asked ([`pre_reads`]).
    body_pre_read: bool,
    /// An HTTP/2 stream's body, watched while pingora streams it to the origin.
    body_watch: Option<Arc<body_watch::BodyWatch>>,
    /// The id the request went to the origin with (`[server] request_id`).
    request_id: Option<String>,
    /// `body_timeout` and `body_min_rate` for this request's body, and when its first bytes
    /// came.
    body_pace: (std::time::Duration, Option<u64>, Option<Instant>),
    /// When the request to the origin was sent (the last attempt).
    upstream_sent: Option<SystemTime>,
    /// The origin's status and how long its response header took.
    origin_response: Option<(u16, std::time::Duration)>,
    /// A request for [`HEALTH_PATH`]: answered locally and not counted.
    health: bool,
    /// The protocol (lowercased) this request may switch to, when it asked and its pool allows.
    upgrade: Option<String>,
    /// The fields of a 304 the origin answered a revalidation with, to update the stored
    /// header (RFC 9111 §4.3.4).
    not_modified: Option<http::HeaderMap>,
    /// What the request's `Cache-Control` asks of a miss (`no-store`, `only-if-cached`).
    asks: crate::cache::directives::RequestAsks,
    /// The response is to be brotli-compressed before it is stored (`proxy::compress`).
    brotli_before_storing: bool,
    /// The response is to be gzip-compressed before it is stored, if compressible.
    gzip_before_storing: bool,
    /// A Range request for a URL no tier holds: it goes to the origin with its Range, and a
    /// 206 that may be stored becomes a piece (`cache::partial`).
    range_fetch: bool,
    /// The piece being received, and its length by its `Content-Range`.
    piece: Option<(partial::Piece, BytesMut, usize)>,
    /// What the body being stored (a fill's, or `piece`) holds of `[cache] fill_memory`.
    fill_hold: Option<crate::cache::fills::FillHold>,
    /// The client's answer is a 304 or 204, which has no content (RFC 9110 §15.4.5, §15.3.5),
    /// though what the origin sent to fill the cache may follow it.
    answer_without_content: bool,
    /// A client the purge rules allow asked `Skua-Debug: 1`: what the explanation needs.
    debug: Option<debug::Facts>,
}

/// The protocol a request asks to switch to (`Upgrade`, RFC 9110 §7.8), when `pool` allows
/// it. Otherwise the request loses its `Upgrade` field and the `upgrade` option of
/// `Connection`, so it reaches the origin as an ordinary request and cannot become a tunnel.
fn upgrade_asked(req: &mut RequestHeader, pool: Option<&crate::upstream::Pool>) -> Option<String> {
    let asked = req
        .headers
        .get(header::UPGRADE)?
        .to_str()
        .ok()
        .map(|v| v.trim().to_string());
    if let Some(protocol) =
        asked.filter(|p| !p.contains(',') && pool.is_some_and(|pool| pool.allows_upgrade(p)))
    {
        return Some(
            protocol
                .split('/')
                .next()
                .unwrap_or("")
                .to_ascii_lowercase(),
        );
    }
    req.remove_header(&header::UPGRADE);
    let options: Option<String> = req
        .headers
        .get(header::CONNECTION)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|o| !o.eq_ignore_ascii_case("upgrade") && !o.is_empty())
                .collect::<Vec<_>>()
                .join(", ")
        });
    match options {
        Some(rest) if rest.is_empty() => {
            req.remove_header(&header::CONNECTION);
        }
        Some(rest) => {
            let _ = req.insert_header(header::CONNECTION, rest);
        }
        None => {}
    }
    None
}

/// Gives a request the `Host` its origin gets: the key's spelling of the host (`respelled`,
/// when the client spelled it otherwise). An HTTP/2 request names its host in `:authority`,
/// the URI's authority, from which pingora writes the `Host` an HTTP/1.1 origin gets whatever
/// the field says, and which an origin-form target (a normalised one) drops: the authority is
/// respelled too, and copied to `Host`. Regressions: over HTTP/2, `:authority: WIKI.test.`
/// reached the origin as spelled while the answer was stored for `wiki.test`, and a request
/// whose target Skua normalised reached it with an empty `Host`.
fn host_for_origin(req: &mut RequestHeader, respelled: Option<String>) -> Result<()> {
    let authority = (req.version == http::Version::HTTP_2)
        .then(|| req.uri.authority().cloned())
        .flatten();
    match (respelled, authority) {
        (Some(host), Some(_)) => {
            let mut parts = req.uri.clone().into_parts();
            parts.authority = Some(host.parse().or_err(
                ErrorType::InvalidHTTPHeader,
                "the key's host is no URI authority",
            )?);
            req.set_uri(http::Uri::from_parts(parts).or_err(
                ErrorType::InvalidHTTPHeader,
                "the key's host is no URI authority",
            )?);
            req.insert_header(header::HOST, host)
        }
        (Some(host), None) => req.insert_header(header::HOST, host),
        (None, Some(authority)) if !req.headers.contains_key(header::HOST) => {
            req.insert_header(header::HOST, authority.as_str())
        }
        _ => Ok(()),
    }
}

/// The most of a body read before the origin is asked: pingora's retry buffer, which keeps
/// what is read to send it on, holds 64 KiB (`BODY_BUF_LIMIT`); a longer body would be cut.
/// Most of a wiki's POSTs (an edit's text, an API call, a login) are within it.
const PRE_READ_MAX: u64 = 64 * 1024;

/// Whether a request's body is read whole before the origin is asked: it declares a length,
/// within [`PRE_READ_MAX`]. A chunked body of unknown length streams, as larger ones do,
/// within `body_min_rate`.
fn pre_reads(req: &RequestHeader) -> bool {
    guard::declared_length(req)
        .flatten()
        .is_some_and(|len| (1..=PRE_READ_MAX).contains(&len))
        && !req.headers.contains_key(header::TRANSFER_ENCODING)
}

/// Reads a small body whole before the origin is asked (nginx's `proxy_request_buffering`):
/// a client that trickles it holds one of Skua's connections, never an origin's worker.
/// pingora's retry buffer keeps what is read and sends it on once the origin is connected.
/// An `Expect: 100-continue` is answered here (the origin is not asked until the body is
/// in; `upstream_request_filter` drops the field).
async fn read_body_before_the_origin(session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
    if session
        .req_header()
        .headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
    {
        session.write_continue_response().await?;
    }
    session.as_mut().enable_retry_buffering();
    let mut read = 0u64;
    let silence = ctx.body_pace.0;
    while !session.is_body_done() {
        // pingora bounds each read of an HTTP/1.1 body by the session's read timeout (set to
        // `body_timeout`), but not an HTTP/2 stream's: a client that declared a body and sent
        // none of it held the stream open for ever.
        let chunk = tokio::time::timeout(silence, session.read_request_body())
            .await
            .map_err(|_| {
                Error::explain(ErrorType::ReadTimedout, "no request body for body_timeout")
                    .into_down()
            })?;
        let Some(chunk) = chunk.map_err(|e| e.into_down())? else {
            break;
        };
        read += chunk.len() as u64;
        body_on_pace(&mut ctx.body_pace, read)?;
    }
    ctx.body_pre_read = true;
    Ok(())
}

impl CachingProxy {
    /// What records this request as answered 408 (nothing sent) if its HTTP/2 body stalls
    /// while pingora streams it to the origin ([`body_watch`]): the line its `logging` phase
    /// would have written, which never runs for a request dropped mid-way.
    fn record_cut_for_its_body(
        &self,
        session: &Session,
        ctx: &RequestCtx,
    ) -> body_watch::RecordCut {
        let shared = self.shared.clone();
        let req = session.req_header();
        let method = req.method.clone();
        let target = String::from_utf8_lossy(req.raw_path()).into_owned();
        let protocol = crate::metrics::access_log::protocol(req.version);
        let headers = req.headers.clone();
        let authority = req.uri.authority().map(|a| a.as_str().to_owned());
        let url = ctx.url.clone();
        let scheme = url
            .as_ref()
            .map_or_else(|| listener_scheme(session), |u| u.scheme);
        let client = client_ip(session);
        let disposition = self.outcome(session, ctx).disposition();
        let (started, request_id) = (ctx.started, ctx.request_id.clone());
        Box::new(move || {
            shared.record(&record::Served {
                client: &|| client,
                method: method.as_str(),
                target: &|| std::borrow::Cow::Borrowed(target.as_str()),
                protocol,
                scheme,
                url: url.as_ref(),
                headers: &headers,
                authority: authority.as_deref(),
                status: 408,
                body_bytes: 0,
                disposition,
                hit_path: None,
                started,
                origin: None,
                request_id: request_id.as_deref(),
            });
        })
    }
}

/// Refuses a body slower than `body_min_rate` (with 408): from its first bytes, it must be
/// whole within `body_timeout` plus a second per `body_min_rate` bytes (`read` so far).
fn body_on_pace(
    (timeout, rate, first): &mut (std::time::Duration, Option<u64>, Option<Instant>),
    read: u64,
) -> Result<()> {
    let Some(rate) = *rate else {
        return Ok(());
    };
    let first = *first.get_or_insert_with(Instant::now);
    if first.elapsed() > *timeout + std::time::Duration::from_secs(read / rate) {
        return Err(Error::explain(
            ErrorType::HTTPStatus(408),
            "request body slower than body_min_rate",
        )
        .into_down());
    }
    Ok(())
}

/// The one byte range of a GET that may use the cache, when pieces could serve it: no
/// `If-Range` (left to the complete-object path) and one `bytes` range.
fn piece_range(req: &RequestHeader, settings: &Settings) -> Option<ByteRange> {
    // Range first: most requests carry none, and the pass check reads every cookie.
    let mut ranges = req.headers.get_all(header::RANGE).iter();
    let (range, more) = (ranges.next()?, ranges.next());
    if more.is_some()
        || req.method != Method::GET
        || req.headers.contains_key(header::IF_RANGE)
        || settings.pass_reason(&req.method, &req.headers).is_some()
    {
        return None;
    }
    ByteRange::parse(range.as_bytes())
}

/// Makes the request what the origin receives (beyond the hop-by-hop handling pingora and
/// `upstream_request_filter` do): the client's address appended to `X-Forwarded-For`, and on a
/// request that may use the cache, only the cookies the key accounts for
/// (`vary::kept_cookies`); over TLS Skua terminated, `X-Forwarded-Proto: https`, so that the
/// origin builds https links (MediaWiki reads it from a proxy in `$wgCdnServers`).
///
/// `rule_pass`: a rule passes the request, which then keeps every cookie, as any request that
/// passes does. Regression: config/mediawiki.toml's pass for the `mf_useformat` cookie sent
/// the request to the origin without the cookie, so MediaWiki never saw the mobile preview
/// it was passed for.
fn as_forwarded(session: &mut Session, settings: &Settings, rule_pass: bool) -> Result<()> {
    let client = client_ip(session);
    let over_tls = listener_scheme(session) == Scheme::Https;
    let req = session.req_header_mut();
    if over_tls {
        req.insert_header(guard::X_FORWARDED_PROTO, "https")?;
    }
    if req.headers.contains_key(header::COOKIE) {
        if !rule_pass && settings.pass_reason(&req.method, &req.headers).is_none() {
            let kept = vary::kept_cookies(&req.headers, &settings.vary_cookies);
            req.remove_header(&header::COOKIE);
            if let Some(kept) = kept {
                req.insert_header(header::COOKIE, kept)?;
            }
        } else if let Some(joined) = one_cookie_field(&req.headers) {
            req.insert_header(header::COOKIE, joined)?;
        }
    }
    if let Some(ip) = client {
        // A trusted proxy's lines, in order, are one list (RFC 9110 §5.3) that ends with the
        // address it saw (HAProxy adds a line of its own rather than extending the client's).
        let mut xff = Vec::new();
        for prev in req.headers.get_all(guard::X_FORWARDED_FOR) {
            xff.extend_from_slice(prev.as_bytes());
            xff.extend_from_slice(b", ");
        }
        guard::push_address(&mut xff, ip);
        req.insert_header(guard::X_FORWARDED_FOR, xff)?;
    }
    Ok(())
}

/// The request's `Cookie` fields as one, when it has several: an HTTP/2 client sends each
/// cookie as a field of its own (RFC 9113 §8.2.3 allows it, for header compression), and
/// "these MUST be concatenated into a single octet string using the two-octet delimiter of
/// 0x3b, 0x20 ("; ") before being passed into a non-HTTP/2 context such as an HTTP/1.1
/// connection". Regression: they went to the origin as several lines, which Apache and PHP join
/// with ", ": MediaWiki read `enwiki_session` as "abc, theme=dark", and a logged-in reader
/// over HTTP/2 was logged out.
fn one_cookie_field(fields: &http::HeaderMap) -> Option<http::HeaderValue> {
    let mut values = fields.get_all(header::COOKIE).iter();
    let first = values.next()?;
    let mut rest = values.peekable();
    rest.peek()?;
    let mut joined = first.as_bytes().to_vec();
    for value in rest {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(value.as_bytes());
    }
    http::HeaderValue::from_bytes(&joined).ok()
}

/// The reason at the root of a chain of pingora errors (the outer ones name the peer).
fn first_reason(e: &Error) -> Option<&str> {
    let root = e.root_cause().downcast_ref::<Error>()?;
    root.context.as_ref().map(|c| c.as_str())
}

fn client_ip(session: &Session) -> Option<IpAddr> {
    session.client_addr().and_then(peer_ip)
}

impl CachingProxy {
    /// Answers PURGE: 204 when something was purged, 404 when nothing was cached, 403 from
    /// outside the allowed networks (nothing purged), 400 for a target that names no URL.
    async fn purge(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
        ctx.internal = true;
        let metrics = &self.shared.metrics;
        let allowed = self
            .shared
            .purge_allowed(client_ip(session), session.req_header());
        if !allowed {
            purge::count(metrics, Source::Http, PurgeResult::Denied);
            let who = client_ip(session).map_or("unknown".to_string(), |ip| ip.to_string());
            return respond::text(
                &self.shared.name,
                session,
                403,
                &format!("skua: PURGE is not allowed from {who}"),
            )
            .await;
        }
        let mode = purge::http::mode(session.req_header());
        let scope = match purge::http::scope(session.req_header(), Scheme::Http) {
            Ok(scope) => scope.map_urls(|url| self.shared.canonical(url)),
            Err(e) => {
                purge::count(metrics, Source::Http, PurgeResult::Invalid);
                return respond::text(
                    &self.shared.name,
                    session,
                    400,
                    &format!("skua: bad PURGE target: {e}"),
                )
                .await;
            }
        };
        // The access log names the purged URL's host, whichever form the request took.
        if let Scope::Url(url) | Scope::Prefix(url) = &scope {
            ctx.url = Some(url.clone());
        }
        let purge = Purge::new(scope, mode, Source::Http);
        let affected = self.shared.purger.apply(&purge).await;
        purge::count(metrics, Source::Http, PurgeResult::applied(affected));
        if let Scope::Prefix(_) = purge.scope {
            let mut resp = ResponseHeader::build(204, Some(2))?;
            resp.insert_header("skua-purged", purge.scope.describe())?;
            return respond::header(&self.shared.name, session, resp, None).await;
        }
        if affected > 0 {
            let verb = match mode {
                PurgeMode::Delete => "purged",
                PurgeMode::Expire => "expired",
            };
            let mut resp = ResponseHeader::build(204, Some(2))?;
            resp.insert_header("skua-purged", format!("{affected} {verb}"))?;
            respond::header(&self.shared.name, session, resp, None).await
        } else {
            let what = purge.scope.describe();
            respond::text(
                &self.shared.name,
                session,
                404,
                &format!("skua: nothing cached for {what}"),
            )
            .await
        }
    }

    /// `peer` failed this request: it rests for its pool's `fail_timeout`.
    fn rest(&self, peer: &HttpPeer, ctx: &RequestCtx) {
        if let (Some(addr), Some(pool)) = (
            peer._address.as_inet(),
            self.shared.pools.load().get(ctx.pool),
        ) {
            pool.failed(addr);
        }
    }

    /// Marks `peer` as failed for this request; whether an origin of its pool remains that
    /// this request has not failed on.
    fn another_origin_remains(&self, peer: &HttpPeer, ctx: &mut RequestCtx) -> bool {
        self.another_origin_than(peer._address.as_inet().copied(), ctx)
    }

    /// [`Self::another_origin_remains`], for the origin at `addr`.
    fn another_origin_than(&self, addr: Option<SocketAddr>, ctx: &mut RequestCtx) -> bool {
        if let Some(addr) = addr {
            ctx.failed_origins.push(addr);
        }
        let pool_size = self
            .shared
            .pools
            .load()
            .get(ctx.pool)
            .map_or(1, |p| p.size());
        ctx.failed_origins.len() < pool_size
    }

    /// Whether an origin's answer with `status` is dropped and the request sent once more, to
    /// another origin of the pool (`[[origin]] retry_statuses`, nginx's `proxy_next_upstream
    /// http_503`): for a request that may be sent twice (RFC 9110 §9.2.2), once. The dropped
    /// answer is counted among the pool's origin answers. The origin is not passed over
    /// afterwards: a 503 may speak for one page (MediaWiki's PoolCounter) as well as for the
    /// server.
    fn retry_on_status(
        &self,
        session: &Session,
        (status, waited): (u16, std::time::Duration),
        ctx: &mut RequestCtx,
    ) -> bool {
        if ctx.retried_on_status
            || !session.req_header().method.is_idempotent()
            || session.as_ref().retry_buffer_truncated()
        {
            return false;
        }
        let pools = self.shared.pools.load();
        let Some(pool) = pools.get(ctx.pool).filter(|p| p.retries_on(status)) else {
            return false;
        };
        // Only to an origin that passes its health checks: a down one would trade this
        // answer for a failed connection (and a GET sent to this origin twice).
        let mut tried = ctx.failed_origins.clone();
        tried.extend(ctx.origin_addr);
        if !pool.another_healthy(&tried) {
            return false;
        }
        ctx.failed_origins = tried;
        ctx.retried_on_status = true;
        pool.series(&self.shared.metrics).observe(status, waited);
        true
    }

    /// Answers a request over its rule's `rate_limit`: 429, with how long until a token.
    async fn rate_limited(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        wait: std::time::Duration,
    ) -> Result<()> {
        ctx.internal = true;
        self.shared.metrics.rule_answers[RuleAnswer::RateLimited as usize].inc();
        respond::too_many(&self.shared.name, session, wait).await
    }

    /// One failed attempt at an origin: each retried one here, the last in `fail_to_proxy`.
    fn count_origin_error(&self, ctx: &RequestCtx, e: &Error) {
        (self.shared.metrics).origin_error(&self.pool_name(ctx), e.etype().as_str());
    }

    /// The name of the origin pool this request uses, for metric labels.
    fn pool_name(&self, ctx: &RequestCtx) -> Arc<str> {
        self.shared
            .pools
            .load()
            .get(ctx.pool)
            .map_or_else(|| Arc::from(""), |p| p.name.clone())
    }

    /// Why this request may not use the cache at all, if it may not.
    fn pass_reason(&self, req: &RequestHeader) -> Option<PassReason> {
        self.shared.pass_reason(&req.method, &req.headers)
    }

    /// Answers a Range request from stored pieces of a fresh representation, if they hold the
    /// range (RFC 9111 §3.3: a stored partial response may satisfy a request it covers).
    async fn serve_piece(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        range: ByteRange,
    ) -> Result<bool> {
        let (Some(url), Some(primary)) = (&ctx.url, ctx.primary) else {
            return Ok(false);
        };
        let store = self.shared.store;
        let now = SystemTime::now();
        let Some((pieces, first, last, bytes)) = store.partial.get(&primary, range, now) else {
            return Ok(false);
        };
        if store.invalidations.banned(url, pieces.created) {
            store.partial.purge(&primary);
            return Ok(false);
        }
        ctx.fast_hit = true;
        ctx.fresh_until = Some(pieces.fresh_until);
        let ours = Outcome::fast_hit(pieces.fresh_until).cache_status(&self.shared.name, now);
        let age = now
            .duration_since(pieces.created)
            .map_or(0, |d| d.as_secs());
        let mut resp = pieces.head.clone();
        resp.set_status(206)?;
        let complete = pieces.complete_length;
        resp.insert_header(
            header::CONTENT_RANGE,
            format!("bytes {first}-{last}/{complete}"),
        )?;
        resp.insert_header(header::CONTENT_LENGTH, bytes.len())?;
        resp.insert_header(header::AGE, age)?;
        resp.insert_header(X_CACHE_STATUS, Disposition::HitFront.as_str())?;
        resp.insert_header(CACHE_STATUS, ours)?;
        session.write_response_header(Box::new(resp), false).await?;
        session.write_response_body(Some(bytes), true).await?;
        Ok(true)
    }

    /// A piece of a body pingora is storing takes its room in `[cache] fill_memory`
    /// (`cache::fills`). Without room the fill stops, as pingora stops one that outgrows
    /// `max_object_size`: what it kept is dropped, the response streams on to its client
    /// unstored, and one request waiting on the cache lock fetches in its place.
    fn take_room_to_store(&self, session: &mut Session, ctx: &mut RequestCtx, n: usize) {
        let filling = matches!(
            session.cache.phase(),
            CachePhase::Miss | CachePhase::Expired
        ) && session.cache.miss_handler().is_some();
        if !filling {
            return;
        }
        let store = self.shared.store;
        let hold = ctx.fill_hold.get_or_insert_with(|| store.fills.hold());
        if hold.grow(n) {
            return;
        }
        session.cache.disable(NoCacheReason::StorageError);
        ctx.stored = false;
        self.shared.metrics.no_room_to_fill();
    }

    /// Starts receiving a piece when `resp` is a single-part 206 to a Range fetch that may be
    /// stored: no `Vary`, no surrogate keys, and what the storage policy allows of any status.
    /// A 200 is the whole representation (RFC 9110 §14.2: an origin may ignore Range): it is
    /// kept as the one piece that covers it, which [`partial`] makes a complete object, as a
    /// fill would have stored it. Regression: an origin that ignores Range had each Range
    /// request for a URL not yet cached passed to it, and the whole answer was thrown away
    /// each time (Varnish, Traffic Server and nginx store it).
    fn start_piece(&self, resp: &ResponseHeader, authorization: bool, ctx: &mut RequestCtx) {
        if resp.headers.contains_key(header::VARY) {
            return;
        }
        let range = match resp.status.as_u16() {
            206 => (resp.headers.get(header::CONTENT_RANGE))
                .and_then(|v| partial::content_range(v.as_bytes())),
            // A coded body would be stored as if it were not (`content_coded`).
            200 if !resp.headers.contains_key(header::CONTENT_ENCODING)
                && !resp.headers.contains_key(header::TRANSFER_ENCODING) =>
            {
                let lengths = resp.headers.get_all(header::CONTENT_LENGTH).iter();
                (guard::agreed_length(lengths.map(|v| v.as_bytes())).ok())
                    .flatten()
                    .filter(|length| *length > 0)
                    .map(|length| (0, length - 1, length))
            }
            _ => None,
        };
        let Some((first, last, complete)) = range else {
            return;
        };
        let store = self.shared.store;
        if !store.tags.tags_of(resp).is_empty()
            || (last - first) as usize >= store.max_object_size()
        {
            return;
        }
        let mut head = resp.clone();
        let now = SystemTime::now();
        let settings = self.shared.settings.load();
        // The tiers refuse a 206 (it is no complete response); a piece is judged as the
        // representation it is part of.
        if head.set_status(200).is_err() {
            return;
        }
        let Ok(freshness) = settings
            .policy
            .decide(&mut head, authorization, now, ctx.ttl_rule)
        else {
            return;
        };
        for framing in [
            header::CONTENT_RANGE,
            header::CONTENT_LENGTH,
            header::TRANSFER_ENCODING,
        ] {
            head.remove_header(&framing);
        }
        let piece = partial::Piece {
            head,
            first,
            complete_length: complete,
            body: Bytes::new(),
            created: freshness.created,
            age_when_heard: freshness.age_when_heard,
            fresh_until: freshness.fresh_until,
        };
        let length = (last - first + 1) as usize;
        // Its room is taken whole now: the buffer is made for the whole piece.
        let mut hold = store.fills.hold();
        if !hold.grow(length) {
            self.shared.metrics.no_room_to_fill();
            return;
        }
        ctx.stored = true;
        ctx.fresh_until = Some(freshness.fresh_until);
        ctx.fill_hold = Some(hold);
        ctx.piece = Some((piece, BytesMut::with_capacity(length), length));
    }

    /// The fast path for requests the front door (`fast.rs`) left to pingora (HTTP/1.0, a
    /// fill that landed after the lookup): a fresh memory hit for a plain GET or HEAD is
    /// answered here, from the stored header and a slice of the stored body, without running
    /// pingora's cache state machine (which costs a third of a hit's time). Anything else
    /// (Range, conditional requests, stale objects, variants the request does not match)
    /// returns `false` and takes the full path, which handles it. What may be served and the
    /// head it gets are `hit`'s. `look_again`: read the index now rather than what this
    /// request looked up before (the re-check after the cache lock).
    async fn serve_fresh_hit(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        look_again: bool,
    ) -> Result<bool> {
        let req = session.req_header();
        let settings = self.shared.settings.load();
        // An explained hit goes through pingora's cache phases, which say what they did.
        if ctx.pass.is_some()
            || ctx.debug.is_some()
            || !hit::serves_as_stored(&settings, &req.method, &req.headers)
        {
            return Ok(false);
        }
        let (Some(url), Some(primary)) = (&ctx.url, ctx.primary) else {
            return Ok(false);
        };
        let now = SystemTime::now();
        let memory = &self.shared.store.memory;
        let looked = if look_again {
            memory.look(&primary)
        } else {
            memory.recall(&primary)
        };
        let Some(obj) = hit::fresh(&self.shared, url, &looked, &req.headers, now) else {
            return Ok(false);
        };
        let head = req.method == Method::HEAD;
        ctx.fast_hit = true;
        ctx.fresh_until = Some(obj.meta.times.fresh_until.time());
        // The same head the front door sends, as pingora's session wants it.
        let mut wire = Vec::with_capacity(obj.meta.head.len() + 160);
        let downstream = settings.downstream_cache_control.as_ref();
        let ttl_rule = ctx.ttl_rule.is_some();
        hit::write_head(
            &mut wire,
            &obj,
            now,
            &self.shared.name,
            false,
            downstream,
            hit::HitFlags {
                ttl_rule,
                from_disk: false,
                server_timing: settings.server_timing,
            },
        );
        drop(settings);
        let mut resp = decode_head(&wire);
        if let Some((set, i)) = &ctx.response_edits {
            if let Some(edits) = &set.rule(*i).actions.response_headers {
                edit::response(&mut resp, edits)?;
            }
        }
        http10::close_after_unframed_body(session, &resp);
        session.write_response_header(Box::new(resp), head).await?;
        if !head {
            session
                .write_response_body(Some(obj.body.clone()), true)
                .await?;
        }
        Ok(true)
    }

    /// Decides the `[[rule]]`s for this request and carries out what applies before the
    /// cache: a rate limit or an answer of Skua's own (then `ctx.internal` is set and the
    /// response written), request header edits, pass; and notes for later phases the
    /// lifetime a rule gives what is stored and the response edits.
    async fn apply_rules(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        settings: &Settings,
        url: &CacheUrl,
    ) -> Result<rules::Decision> {
        let set = &settings.rules;
        let req = session.req_header();
        let peer = || client_ip(session);
        let Some((decision, client)) =
            settings.decide_rules(url, &req.method, &req.headers, peer, None)
        else {
            return Ok(rules::Decision::default());
        };
        if let Some(facts) = &mut ctx.debug {
            facts.rules = decision.named(set);
        }
        let (path, query) = rules::path_and_query(url);
        let name = &self.shared.name;
        if let Some(i) = decision.rate_limit {
            if decision.limits_at_origin_only(set) {
                // Counted if and when the request goes to the origin (`proxy_upstream_filter`).
                ctx.rate_limit_at_origin = Some((set.clone(), i, client));
            } else if let Some(wait) = set.limited(i, client) {
                self.rate_limited(session, ctx, wait).await?;
                return Ok(decision);
            }
        }
        if let Some(rule) = decision.answer.map(|i| set.rule(i)) {
            ctx.internal = true;
            match &rule.actions.answer {
                Some(Answer::Deny { status, body }) => {
                    self.shared.metrics.rule_answers[RuleAnswer::Denied as usize].inc();
                    respond::text(name, session, *status, body).await?;
                }
                Some(Answer::Redirect { status, location }) => {
                    self.shared.metrics.rule_answers[RuleAnswer::Redirected as usize].inc();
                    // The path the rule matched, and took its groups from.
                    let path = rules::rule_path(path);
                    let groups = rules::path_groups(&rule.when, &path);
                    let target = location.fill(url.host_name(), &path, query, &groups);
                    respond::redirect(name, session, *status, &target).await?;
                }
                None => {}
            }
            return Ok(decision);
        }
        // The body's limit is the rule's, where one gives it: only a body over the largest
        // limit of any was refused before the rules were read (`guard::check`).
        let body_limit = decision.max_body_bytes(set, settings.max_body_bytes);
        ctx.request_body.0 = body_limit;
        if let Some(limit) = body_limit {
            if guard::declares_body_over(session.req_header(), limit) {
                ctx.internal = true;
                let rule = decision.max_body_bytes.map(|i| &set.rule(i).name);
                let whose = rule.map_or("max_body_bytes".to_string(), |name| {
                    format!("max_body_bytes of rule {name:?}")
                });
                let line = format!("skua: request body over {limit} bytes ({whose})");
                respond::text(name, session, 413, &line).await?;
                return Ok(decision);
            }
        }
        if let Some(i) = decision.request_headers {
            if let Some(edits) = &set.rule(i).actions.request_headers {
                edit::request(session.req_header_mut(), edits)?;
            }
        }
        if decision.passes(set) {
            ctx.pass = Some(PassReason::Rule);
        }
        ctx.ttl_rule = decision.ttl(set);
        ctx.response_edits = decision.response_headers.map(|i| (set.clone(), i));
        Ok(decision)
    }

    /// The `Skua-Debug` field for this response (`debug.rs`).
    fn explain(
        &self,
        session: &Session,
        ctx: &RequestCtx,
        facts: &debug::Facts,
        disposition: Disposition,
        now: SystemTime,
    ) -> String {
        let meta = session.cache.maybe_cache_meta();
        let served_a_copy = matches!(
            session.cache.phase(),
            CachePhase::Hit
                | CachePhase::Stale
                | CachePhase::StaleUpdating
                | CachePhase::Revalidated
                | CachePhase::RevalidatedNoCache(_)
        );
        let copy = meta.filter(|_| served_a_copy).map(|meta| {
            // What set the copy's lifetime, read again from its stored header as of when it
            // was made (a rule's lifetime cannot be told from the header).
            let policy = &self.shared.settings.load().policy;
            let mut header = meta.response_header_copy();
            let from = (policy.decide(&mut header, false, meta.epoch(), None).ok())
                .map(|f| (f.from.as_str(), f.capped.map(|cap| cap.as_str())));
            let from = if ctx.ttl_rule.is_some() {
                Some(("rule", None))
            } else {
                from
            };
            debug::Copy {
                made: meta.epoch(),
                fresh_until: meta.fresh_until(),
                from,
            }
        });
        let variant = meta.and_then(CacheMeta::variance).map(|v| {
            v.iter().fold(String::new(), |mut hex, b| {
                let _ = std::fmt::Write::write_fmt(&mut hex, format_args!("{b:02x}"));
                hex
            })
        });
        let invalidations = &self.shared.store.invalidations;
        debug::explain(&debug::Answer {
            key: ctx.url.as_ref().map(CacheUrl::primary),
            variant,
            disposition: disposition.as_str(),
            phase: session.cache.phase().as_str(),
            pass: ctx.pass.map(PassReason::as_str),
            copy,
            purged_at: ctx.primary.and_then(|p| invalidations.purged_at(&p)),
            banned: (ctx.url.as_ref()).is_some_and(|url| {
                invalidations.banned(
                    url,
                    SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1),
                )
            }),
            now,
            facts,
        })
    }

    fn outcome(&self, session: &Session, ctx: &RequestCtx) -> Outcome {
        Outcome {
            phase: session.cache.phase(),
            fast_hit: ctx.fast_hit,
            local_hit: ctx.local_hit,
            pass: ctx.pass,
            internal: ctx.internal,
            stored: ctx.stored,
            fresh_until: ctx.fresh_until,
            ttl_rule: ctx.ttl_rule.is_some(),
            fwd_status: ctx.fwd_status,
        }
    }

    /// Whether this unsafe request may invalidate what it names (`[cache]
    /// invalidate_on_unsafe`): any client may make it a cheap miss by default, as RFC 9111 §4.4
    /// asks; an operator can keep that to purgers or to logged-in sessions.
    fn may_invalidate(&self, session: &Session) -> bool {
        let settings = self.shared.settings.load();
        match settings.invalidate_on_unsafe {
            UnsafeInvalidation::Any => true,
            UnsafeInvalidation::Purgers => self
                .shared
                .purge_allowed(client_ip(session), session.req_header()),
            UnsafeInvalidation::Session => session
                .req_header()
                .headers
                .get_all(header::COOKIE)
                .iter()
                .any(|v| {
                    let v = String::from_utf8_lossy(v.as_bytes());
                    settings.bypass_cookies.iter().any(|re| re.is_match(&v))
                }),
        }
    }

    /// RFC 9111 §4.4: "A cache MUST invalidate the target URI when it receives a non-error
    /// status code in response to an unsafe request method", and may invalidate the URIs in
    /// `Location` and `Content-Location` when they share the target's host.
    async fn invalidate_after_unsafe(&self, ctx: &RequestCtx, resp: &ResponseHeader) {
        let Some(target) = &ctx.url else { return };
        self.shared
            .store
            .invalidate(target, PurgeMode::Delete)
            .await;
        for name in [header::LOCATION, header::CONTENT_LOCATION] {
            let Some(value) = resp.headers.get(&name).and_then(|v| v.to_str().ok()) else {
                continue;
            };
            let other = if value.starts_with('/') {
                CacheUrl::new(target.scheme, &target.host, value).ok()
            } else {
                CacheUrl::parse_absolute(value).ok()
            };
            if let Some(other) = other.filter(|o| o.host == target.host) {
                self.shared
                    .store
                    .invalidate(&other, PurgeMode::Delete)
                    .await;
            }
        }
    }
}

#[async_trait]
impl ProxyHttp for CachingProxy {
    type CTX = RequestCtx;

    /// pingora's range handling, with the zero-length suffixes it misreads left out of the
    /// request's `Range` first ([`ByteRange::without_empty_suffixes`]), no range of a copy the
    /// client gets decoded ([`compress::decoded_for_client`]), and no range for an
    /// `If-Range` holding a weak entity tag, which pingora compared byte for byte. RFC 9110
    /// §13.1.5: the condition holds only for a "strong match", which a weak tag never is; the
    /// answer is the whole representation. (Skua weakens the tag of each copy it compresses:
    /// a download resumed across two such copies would have joined different bytes.)
    fn range_header_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        _ctx: &mut RequestCtx,
    ) -> pingora::proxy::RangeType {
        // pingora's own default: a multipart answer of at most 200 ranges.
        const MAX_RANGES: Option<usize> = Some(200);
        let Some(range) = session.req_header().headers.get(header::RANGE) else {
            return pingora::proxy::range_header_filter(session.req_header(), resp, MAX_RANGES);
        };
        if compress::decoded_for_client(session, resp) {
            return pingora::proxy::RangeType::None;
        }
        let req = session.req_header();
        let weak_if_range = (req.headers.get(header::IF_RANGE))
            .is_some_and(|tag| tag.as_bytes().starts_with(b"W/"));
        let cleaned = ByteRange::without_empty_suffixes(range.as_bytes());
        if !weak_if_range && cleaned.is_none() {
            return pingora::proxy::range_header_filter(req, resp, MAX_RANGES);
        }
        let mut req = req.clone();
        match cleaned {
            Some(range) if !weak_if_range => {
                if req.insert_header(header::RANGE, range).is_err() {
                    req.remove_header(&header::RANGE);
                }
            }
            _ => {
                req.remove_header(&header::RANGE);
            }
        }
        pingora::proxy::range_header_filter(&req, resp, MAX_RANGES)
    }

    fn init_upstream_modules(&self, modules: &mut pingora::modules::http::HttpModules) {
        modules.add_module(Box::new(compress::BrotliBuilder));
    }

    async fn adjust_upstream_modules(
        &self,
        session: &mut Session,
        upstream_response: &ResponseHeader,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if !ctx.gzip_before_storing && !ctx.brotli_before_storing {
            return Ok(());
        }
        if !compress::compressible(upstream_response) {
            // pingora's gzip context has a threshold of its own (20 bytes); Skua's applies.
            compress::leave_uncompressed(&mut session.upstream_compression);
            return Ok(());
        }
        if ctx.brotli_before_storing {
            if let Some(brotli) = session
                .upstream_modules_ctx
                .get_mut::<compress::BrotliBeforeStoring>()
            {
                brotli.enable();
            }
        }
        Ok(())
    }

    fn init_downstream_modules(&self, modules: &mut pingora::modules::http::HttpModules) {
        // In place of pingora's default (disabled) compression module: a stored compressed
        // copy is decompressed for a client that does not take its encoding.
        modules.add_module(Box::new(compress::DecompressBuilder));
        modules.add_module(Box::new(http10::Http10FramingBuilder));
    }

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            started: Instant::now(),
            url: None,
            primary: None,
            hit_for_miss: false,
            pass: None,
            internal: false,
            fast_hit: false,
            local_hit: false,
            stored: false,
            fresh_until: None,
            fwd_status: None,
            pool: 0,
            ttl_rule: None,
            response_edits: None,
            rate_limit_at_origin: None,
            failed_origins: Vec::new(),
            origin_addr: None,
            retried_on_status: false,
            origin_permit: None,
            request_body: (None, 0),
            request_body_withheld: false,
            body_pre_read: false,
            body_watch: None,
            request_id: None,
            body_pace: (std::time::Duration::ZERO, None, None),
            upstream_sent: None,
            origin_response: None,
            health: false,
            upgrade: None,
            not_modified: None,
            asks: Default::default(),
            brotli_before_storing: false,
            gzip_before_storing: false,
            range_fetch: false,
            piece: None,
            fill_hold: None,
            answer_without_content: false,
            debug: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        http10::no_interim_answers(session);
        if session.req_header().uri.path() == HEALTH_PATH
            && matches!(session.req_header().method, Method::GET | Method::HEAD)
        {
            ctx.health = true;
            let (status, line) = match self.shared.readiness.check() {
                Ok(()) => (200, "ready"),
                Err(why) => (503, why),
            };
            respond::text(&self.shared.name, session, status, line).await?;
            return Ok(true);
        }
        let settings = self.shared.settings.load();
        // Read before anything judges the client: from a trusted balancer, `Forwarded` stands
        // for `X-Forwarded-For` and `X-Forwarded-Proto` (the front door leaves such requests
        // to this path).
        if let Some((chain, scheme)) = guard::forwarded_as_x_headers(&session.req_header().headers)
            .filter(|_| guard::trusted(&settings.trusted_proxies, client_ip(session)))
        {
            let req = session.req_header_mut();
            req.insert_header(guard::X_FORWARDED_FOR, chain)?;
            if let Some(scheme) =
                scheme.filter(|_| !req.headers.contains_key(guard::X_FORWARDED_PROTO))
            {
                req.insert_header(guard::X_FORWARDED_PROTO, scheme.as_str())?;
            }
        }
        let mut verdict = guard::check(session.req_header(), &settings.limits);
        if verdict.is_ok()
            && session
                .req_header()
                .headers
                .contains_key(header::TRANSFER_ENCODING)
            && session
                .as_downstream()
                .as_http1()
                .is_some_and(|h1| guard::raw_has_content_length(&h1.get_headers_raw_bytes()))
        {
            verdict = Err(guard::Refusal {
                status: 400,
                reason: "both Content-Length and Transfer-Encoding (RFC 9112 §6.1)".into(),
            });
        }
        // pingora keeps an HTTP/1.1 connection open forever between requests and waits 60 s
        // for each read: bound both.
        if session.get_keepalive().is_some() {
            session.set_keepalive(Some(settings.keepalive_secs));
        }
        session.set_read_timeout(Some(settings.body_timeout));
        // Set for an HTTP/2 stream with a body (`h2` watches no other).
        ctx.body_watch = body_watch::BodyWatch::current();
        ctx.request_body = (settings.limits.max_body_bytes, 0);
        ctx.body_pace = (settings.body_timeout, settings.body_min_rate, None);
        if let Err(refusal) = verdict {
            ctx.internal = true;
            if refusal.status == 400 {
                // The rest of the connection cannot be framed safely.
                session.set_keepalive(None);
            }
            let line = format!("skua: {}", refusal.reason);
            respond::text(&self.shared.name, session, refusal.status, &line).await?;
            return Ok(true);
        }
        let headers = &session.req_header().headers;
        let via = headers.get_all(header::VIA).iter().map(|v| v.as_bytes());
        if self.shared.via.names_this_node(via) {
            ctx.internal = true;
            self.shared.metrics.forwarding_loops.inc();
            if !LOOP_WARNED.swap(true, Ordering::Relaxed) {
                tracing::error!(
                    "a request came back through this node (its Via names this node): an origin pool leads back here; answered 508 (counted in skua_forwarding_loops_total)"
                );
            }
            let line = "forwarding loop: this request has already passed through this node (Via); an origin pool leads back to it";
            self.error(session, (508, None), line).await?;
            return Ok(true);
        }
        // RFC 9110 §9.3.7: `OPTIONS *` asks about the server itself, not a resource of a
        // site (it has no URL to key or route): answered here, as with `Max-Forwards: 0`.
        // Regression: refused with 400 "path must start with '/'".
        if session.req_header().method == Method::OPTIONS && session.req_header().raw_path() == b"*"
        {
            ctx.internal = true;
            respond::final_recipient(&self.shared.name, session).await?;
            return Ok(true);
        }
        match guard::max_forwards(session.req_header()) {
            guard::MaxForwards::Absent => {}
            guard::MaxForwards::Zero => {
                ctx.internal = true;
                respond::final_recipient(&self.shared.name, session).await?;
                return Ok(true);
            }
            guard::MaxForwards::Next(next) => {
                session
                    .req_header_mut()
                    .insert_header(header::MAX_FORWARDS, next.to_string())?;
            }
        }
        // Only for a client that may purge: the explanation names keys, rules and purges.
        if debug::asked(&session.req_header().headers)
            && (self.shared).purge_allowed(client_ip(session), session.req_header())
        {
            ctx.debug = Some(debug::Facts::default());
        }
        let method = session.req_header().method.clone();
        if method.as_str() == "PURGE" {
            self.purge(session, ctx).await?;
            return Ok(true);
        }
        if method == Method::CONNECT {
            ctx.internal = true;
            session.set_keepalive(None);
            respond::text(&self.shared.name, session,
                405,
                "skua: CONNECT is not supported: Skua is a reverse proxy, not a tunnel. MediaWiki sends CONNECT when $wgInternalServer is an https:// URL; set it to http:// so its PURGEs reach Skua",
            )
            .await?;
            return Ok(true);
        }
        let req = session.req_header();
        // RFC 9112 §3.2.2: an absolute-form target's authority overrides Host.
        let authority = req
            .uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| req.headers.get(header::HOST).and_then(|h| h.to_str().ok()))
            .unwrap_or_default();
        let path = req.uri.path_and_query().map_or("/", |p| p.as_str());
        let from_proxy = guard::trusted(&settings.trusted_proxies, client_ip(session));
        // The listener's scheme, unless a trusted TLS terminator in front says otherwise.
        let scheme = guard::request_scheme(
            listener_scheme(session),
            req.headers
                .get(guard::X_FORWARDED_PROTO)
                .map(http::HeaderValue::as_bytes),
            || from_proxy,
        );
        // pingora parses an absolute-form target's path into `uri` and keeps the raw target to
        // send on; the scheme was checked by `guard::check`, the authority matches Host.
        let absolute_form = guard::absolute_form_scheme(req.raw_path()).is_some();
        match CacheUrl::new(scheme, authority, path) {
            Ok(url) => {
                // RFC 9110 §4.2.3: `WIKI.test`, `wiki.test.` and `wiki.test:80` are one host,
                // and one key; the origin is asked for it in the key's spelling, so that what
                // is stored is the answer for the host every reader gets. Regression: the
                // origin was sent `Host: wiki.test.`, which a name-based virtual host does not
                // match (Apache answers with its first site), and that answer was stored for
                // `wiki.test`.
                let respelled_host = (url.host != authority).then(|| url.host.clone());
                let url = self.shared.canonical(url);
                // Skua's one spelling of the target, or a rule's normalised query.
                let target_normalised = url.path_and_query != path;
                host_for_origin(session.req_header_mut(), respelled_host)?;
                if !settings.serves_host(&url.host) {
                    ctx.internal = true;
                    let line = format!("skua: this cache does not serve host {}", url.host_name());
                    respond::text(&self.shared.name, session, 421, &line).await?;
                    return Ok(true);
                }
                if let Some(location) = settings.https_location(&url) {
                    ctx.internal = true;
                    // RFC 9110 §15.4.2 and §15.4.9: 301 may turn a POST into a GET; 308 keeps
                    // the method and body.
                    let status = match method {
                        Method::GET | Method::HEAD => 301,
                        _ => 308,
                    };
                    return respond::redirect(&self.shared.name, session, status, &location)
                        .await
                        .map(|()| true);
                }
                let decision = self.apply_rules(session, ctx, &settings, &url).await?;
                if ctx.internal {
                    return Ok(true);
                }
                guard::strip(
                    session.req_header_mut(),
                    &settings.strip_headers,
                    from_proxy,
                );
                // From here on the request is what the origin will receive, so a variant key
                // computed on it agrees with the response it names (RFC 9111 §4.1).
                as_forwarded(session, &settings, ctx.pass.is_some())?;
                let pools = self.shared.pools.load();
                let routed = decision
                    .route
                    .and_then(|i| settings.rules.rule(i).actions.route);
                ctx.pool = routed.unwrap_or_else(|| pools.for_host(&url.host));
                ctx.upgrade = upgrade_asked(session.req_header_mut(), pools.get(ctx.pool));
                if target_normalised || absolute_form {
                    // The origin answers for the target the key names (`cache::target`), in
                    // origin form (RFC 9112 §3.2.1), with the authority in Host.
                    // (`Host` carries the authority the origin form drops: `host_for_origin`.)
                    if let Ok(normal) = url.path_and_query.parse::<http::Uri>() {
                        session.req_header_mut().set_uri(normal);
                    }
                }
                let piece_range = piece_range(session.req_header(), &settings);
                let primary = crate::cache::memory::primary_hash_of(&url);
                let holds_complete = piece_range
                    .is_some()
                    .then(|| self.shared.store.holds_complete(&primary));
                ctx.url = Some(url);
                ctx.primary = Some(primary);
                if let Some(range) = piece_range {
                    if holds_complete == Some(false) {
                        if self.serve_piece(session, ctx, range).await? {
                            return Ok(true);
                        }
                        ctx.range_fetch = true;
                        return Ok(false);
                    }
                }
                self.serve_fresh_hit(session, ctx, false).await
            }
            Err(e) => {
                ctx.internal = true;
                respond::text(
                    &self.shared.name,
                    session,
                    400,
                    &format!("skua: bad request: {e}"),
                )
                .await?;
                Ok(true)
            }
        }
    }

    fn request_cache_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
        ctx.asks = crate::cache::directives::RequestAsks::of(&session.req_header().headers);
        if ctx.pass.is_some() {
            // A rule's `pass`, decided in `request_filter`.
            return Ok(());
        }
        if let Some(reason) = self.pass_reason(session.req_header()) {
            ctx.pass = Some(reason);
            return Ok(());
        }
        if ctx.range_fetch {
            // pingora's cache would drop the Range and store what comes back as complete.
            return Ok(());
        }
        ctx.hit_for_miss = (ctx.primary.as_ref())
            .is_some_and(|primary| self.shared.hit_for_miss.remembered(primary));
        // A request whose answer will not be stored (`no-store`) makes nobody wait for it.
        let locks = !ctx.hit_for_miss && !ctx.asks.no_store;
        session.cache.enable(
            self.shared.store,
            None,
            None,
            locks.then_some(self.shared.lock),
            Some(self.lock_overrides()),
        );
        session
            .cache
            .set_max_file_size_bytes(self.shared.store.max_object_size());
        Ok(())
    }

    fn cache_miss(&self, session: &mut Session, ctx: &mut RequestCtx) {
        if ctx.hit_for_miss {
            self.shared.metrics.hit_for_miss.inc();
        }
        session.cache.cache_miss();
    }

    fn cache_key_callback(&self, _session: &Session, ctx: &mut RequestCtx) -> Result<CacheKey> {
        match &ctx.url {
            Some(url) => Ok(match ctx.primary {
                Some(primary) => url.cache_key_hashed(primary),
                None => url.cache_key(),
            }),
            None => Error::e_explain(
                ErrorType::InternalError,
                "cache enabled without a request URL",
            ),
        }
    }

    fn cache_vary_filter(
        &self,
        meta: &CacheMeta,
        _ctx: &mut RequestCtx,
        req: &RequestHeader,
    ) -> Option<HashBinary> {
        vary::variance(
            meta.response_header(),
            vary::brotli_declined(meta),
            &req.headers,
        )
    }

    async fn cache_hit_filter(
        &self,
        session: &mut Session,
        meta: &CacheMeta,
        hit_handler: &mut HitHandler,
        _is_fresh: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<pingora::cache::ForcedFreshness>> {
        ctx.fresh_until = Some(meta.fresh_until());
        if std::mem::take(&mut ctx.hit_for_miss) {
            // A copy to serve or revalidate: concurrent readers of it wait on one fetch, as
            // for any other URL. Its lock is taken just after this filter.
            session
                .cache
                .set_cache_lock(Some(self.shared.lock), Some(self.lock_overrides()));
        }
        if let Some(url) = &ctx.url {
            let invalidations = &self.shared.store.invalidations;
            let heard = AgeWhenHeard::heard_in(meta);
            match hit::verdict(invalidations, url, meta.created(), heard) {
                hit::Verdict::Serve => {}
                hit::Verdict::Purged => return Ok(Some(ForcedFreshness::ForceMiss)),
                hit::Verdict::Revalidate => return Ok(Some(ForcedFreshness::ForceExpired)),
                hit::Verdict::WaitForCatchUp(timeout) => {
                    if !invalidations.wait_caught_up(timeout).await {
                        return Ok(Some(ForcedFreshness::ForceExpired));
                    }
                    // The catch-up may have purged this very object while we held it.
                    let primary = ctx.primary.unwrap_or_else(|| url.primary_hash());
                    if invalidations.purged_since(&primary, meta.created())
                        || invalidations.banned(url, meta.created())
                    {
                        return Ok(Some(ForcedFreshness::ForceMiss));
                    }
                }
            }
        }
        let any = hit_handler.as_any();
        ctx.local_hit =
            any.is::<DiskHit>() || any.downcast_ref::<MemoryHit>().is_some_and(|h| h.from_disk);
        Ok(None)
    }

    async fn proxy_upstream_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<bool> {
        // pingora takes the cache lock after its storage lookup missed, so a fill that lands
        // between the two makes this request a second writer. Looking again here (the one
        // second lookup a miss makes) closes that window: 200 simultaneous requests for a
        // cold URL make exactly one origin fetch.
        if session.cache.phase() == CachePhase::Miss
            && self.serve_fresh_hit(session, ctx, true).await?
        {
            return Ok(false);
        }
        // RFC 9111 §5.2.1.7: nothing stored answers it, so "a 504 (Gateway Timeout)". A
        // stale-while-revalidate refresh in the background is Skua's own request, not it.
        if ctx.asks.only_if_cached && session.subrequest_ctx.is_none() {
            ctx.internal = true;
            let line = "skua: not in the cache, and the request asked for a cached answer only (only-if-cached)";
            respond::text(&self.shared.name, session, 504, line).await?;
            return Ok(false);
        }
        // A rule's `rate_limit` with `origin_only`: this request is a miss or a pass, and
        // takes from its client's bucket now (hits and requests served by another's fetch
        // took nothing).
        if let Some((set, i, client)) = ctx.rate_limit_at_origin.take() {
            if let Some(wait) = set.limited(i, client) {
                self.rate_limited(session, ctx, wait).await?;
                return Ok(false);
            }
        }
        if ctx.request_id.is_none() && self.shared.settings.load().request_id {
            // What is left of `X-Request-Id` after `guard::strip` is a trusted proxy's.
            let given = session
                .req_header()
                .headers
                .get_all(&request_id::X_REQUEST_ID);
            let id = request_id::for_request(given.iter().map(|v| v.as_bytes()), true);
            session
                .req_header_mut()
                .insert_header(request_id::X_REQUEST_ID, id.as_str())?;
            ctx.request_id = Some(id);
        }
        if !ctx.body_pre_read && pre_reads(session.req_header()) {
            read_body_before_the_origin(session, ctx).await?;
        }
        Ok(true)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let pools = self.shared.pools.load();
        // A reload between this request's start and now may have renumbered the pools.
        let pool = match (pools.get(ctx.pool), &ctx.url) {
            (Some(pool), _) => pool,
            (None, Some(url)) => {
                ctx.pool = pools.for_host(&url.host);
                pools
                    .get(ctx.pool)
                    .ok_or_else(|| Error::explain(ErrorType::InternalError, "no origin pool"))?
            }
            (None, None) => return Error::e_explain(ErrorType::InternalError, "no origin pool"),
        };
        let key = || ctx.url.as_ref().map(CacheUrl::primary).unwrap_or_default();
        let host = ctx.url.as_ref().map_or("", CacheUrl::host_name);
        let (peer, permit) = pool.pick_and_claim(key, host, &ctx.failed_origins).await?;
        // A retry's pick gives back the place the failed attempt held.
        ctx.origin_permit = permit;
        ctx.origin_addr = peer._address.as_inet().copied();
        Ok(peer)
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        self.rest(peer, ctx);
        if self.another_origin_remains(peer, ctx) {
            self.count_origin_error(ctx, &e);
            e.set_retry(true);
        }
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        // An origin that closed the connection, or did not answer within `read_timeout`,
        // before a byte of its answer arrived has answered nothing this request could be
        // served from. A pooled connection it had closed while idle is no such failure.
        let timed_out = matches!(
            e.etype(),
            ErrorType::ReadTimedout | ErrorType::WriteTimedout
        );
        let dropped = matches!(
            e.etype(),
            ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError
        );
        let failed_before_answering = (timed_out || dropped)
            && e.esource() == &ErrorSource::Upstream
            && ctx.origin_response.is_none()
            && session.response_written().is_none();
        if failed_before_answering && (timed_out || !client_reused) {
            self.rest(peer, ctx);
        }
        // pingora's rule first: only a request that can be sent again whole (RFC 9110 §9.2.2,
        // idempotent methods) is, and a pooled connection the origin had already closed is
        // retried on the same origin.
        if !session.req_header().method.is_idempotent() || session.as_ref().retry_buffer_truncated()
        {
            e.set_retry(false);
            return e;
        }
        e.retry.decide_reuse(client_reused);
        if e.retry() {
            return e;
        }
        // nginx's `proxy_next_upstream error timeout`: each other origin of the pool is tried
        // once before the client gets 502/504 (or a stale copy).
        if failed_before_answering && self.another_origin_remains(peer, ctx) {
            self.count_origin_error(ctx, &e);
            e.set_retry(true);
        }
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.upstream_sent = Some(SystemTime::now());
        // RFC 9110 §7.6.3: a gateway adds its own entry to every request it forwards, after
        // the client's, in one line (an origin may read only the first of several).
        let via = self.shared.via.after(
            upstream
                .headers
                .get_all(header::VIA)
                .iter()
                .map(|v| v.as_bytes()),
            session.req_header().version,
        );
        upstream.insert_header(header::VIA, via)?;
        // RFC 9110 §7.6.1, towards the origin: what the client addressed to its connection
        // with Skua is not forwarded.
        for name in crate::cache::policy::connection_nominated(&session.req_header().headers) {
            upstream.remove_header(&name);
        }
        if session.cache.enabled() {
            // The origin must produce the copy the key names (see `vary.rs`), and what it sends
            // uncompressed is compressed once, before it is stored (`proxy::compress`).
            let compress = self.shared.settings.load().compress;
            let copy = vary::normalize_accept_encoding(&session.req_header().headers);
            let asked = vary::upstream_accept_encoding(copy, compress.brotli);
            upstream.insert_header(header::ACCEPT_ENCODING, asked)?;
            compress::before_storing(&mut session.upstream_compression, compress);
            ctx.brotli_before_storing = compress.brotli && copy == vary::Encoding::Brotli;
            ctx.gzip_before_storing = compress.gzip;
        }
        if ctx.body_pre_read {
            // Answered already (`read_body_before_the_origin`): the body is all there.
            upstream.remove_header(&header::EXPECT);
        }
        // RFC 9110 §9.3.1: content in a GET "has no generally defined semantics, cannot alter
        // the meaning or target of the request". What may be stored for every reader of the
        // URL is asked for without it: an origin that read a body would have its answer to one
        // client's body served to all (a "fat GET" poisons the cache). `Content-Length: 0`,
        // since pingora frames a request without either field as chunked when the client sent a
        // body. Regression: `GET /page` with the body `action=evil` was stored with the answer
        // to it.
        let may_store = session.cache.enabled() || ctx.range_fetch;
        if may_store
            && matches!(session.req_header().method, Method::GET | Method::HEAD)
            && !session.is_body_empty()
        {
            upstream.remove_header(&header::TRANSFER_ENCODING);
            upstream.remove_header(&header::EXPECT);
            upstream.insert_header(header::CONTENT_LENGTH, "0")?;
            ctx.request_body_withheld = true;
        }
        if let Some(watch) = &ctx.body_watch {
            if !session.is_body_done() {
                watch.expect(ctx.body_pace.0, self.record_cut_for_its_body(session, ctx));
            }
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(watch) = &ctx.body_watch {
            // The origin has answered (an interim answer says it still waits for the body):
            // what pingora reads of the body from here on is no origin's worker's wait.
            if !resp.status.is_informational() {
                watch.done();
            }
        }
        if resp.status == http::StatusCode::SWITCHING_PROTOCOLS {
            // A 101 turns the connection into a raw tunnel to the origin, past every rule here:
            // only for a protocol this request asked for and its pool allows (RFC 9110 §15.2.2:
            // the server switches "to the protocol(s) defined by the response's Upgrade").
            let switched = resp
                .headers
                .get(header::UPGRADE)
                .and_then(|v| v.to_str().ok());
            let asked = ctx.upgrade.as_deref();
            if asked.is_none()
                || switched.map(|s| s.trim().to_ascii_lowercase()).as_deref() != asked
            {
                let mut e = Error::explain(
                    ErrorType::InvalidHTTPHeader,
                    "the origin switched protocols without being asked to",
                );
                e.esource = ErrorSource::Upstream;
                return Err(e);
            }
        }
        fill::one_content_length(resp);
        let status = resp.status.as_u16();
        // How long the origin took to answer (not counting what this filter does next).
        let waited = ctx
            .upstream_sent
            .and_then(|sent| SystemTime::now().duration_since(sent).ok())
            .unwrap_or_default();
        if self.retry_on_status(session, (status, waited), ctx) {
            let mut e = Error::explain(
                ErrorType::HTTPStatus(status),
                "sent to another origin of the pool (retry_statuses)",
            );
            e.esource = ErrorSource::Upstream;
            e.set_retry(true);
            return Err(e);
        }
        // RFC 9110 §7.6.1: what the origin addressed to its own connection goes no further
        // (the stored copy drops the same fields). Regression: a miss passed the origin's
        // `Keep-Alive` to the client.
        crate::cache::policy::strip_hop_by_hop(resp);
        let method = &session.req_header().method;
        let unsafe_method = !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
            && method.as_str() != "TRACE";
        if unsafe_method && (200..400).contains(&status) && self.may_invalidate(session) {
            self.invalidate_after_unsafe(ctx, resp).await;
        }
        ctx.origin_response = Some((status, waited));
        if status == 304 && session.cache.enabled() {
            ctx.fwd_status = Some(304);
            ctx.not_modified = Some(resp.headers.clone());
        }
        if ctx.range_fetch {
            let authorization = session
                .req_header()
                .headers
                .contains_key(header::AUTHORIZATION);
            self.start_piece(resp, authorization, ctx);
        }
        Ok(())
    }

    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // After a 101 the bytes are the new protocol's, through a tunnel, not a body.
        if session.was_upgraded() {
            return Ok(());
        }
        let (limit, read) = &mut ctx.request_body;
        *read += body.as_ref().map_or(0, |chunk| chunk.len() as u64);
        if let Some(limit) = limit {
            if *read > *limit {
                // Before this chunk is sent on: the origin never receives the body whole.
                return Err(Error::explain(
                    ErrorType::HTTPStatus(413),
                    "request body over max_body_bytes",
                )
                .into_down());
            }
        }
        if body.is_some() {
            // Before this chunk is sent on, as for `max_body_bytes`.
            body_on_pace(&mut ctx.body_pace, ctx.request_body.1)?;
        }
        if let Some(watch) = &ctx.body_watch {
            if end_of_stream {
                watch.done();
            } else {
                watch.arrived();
            }
        }
        if ctx.request_body_withheld && body.is_some() {
            // Nothing is written: an empty chunk is skipped, and the last one is no chunk at
            // all (an empty one would be written to a body already ended by its
            // `Content-Length: 0`, and pingora logs a warning for each such request).
            *body = (!end_of_stream).then(Bytes::new);
        }
        Ok(())
    }

    fn upstream_response_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<std::time::Duration>> {
        if end_of_stream {
            // The origin's part is over: its place goes to the next request.
            ctx.origin_permit = None;
        }
        if let Some(chunk) = body.as_ref().filter(|c| !c.is_empty()) {
            self.take_room_to_store(session, ctx, chunk.len());
        }
        let Some((_, received, length)) = ctx.piece.as_mut() else {
            return Ok(None);
        };
        if let Some(chunk) = body {
            received.extend_from_slice(chunk);
        }
        if received.len() > *length {
            // The origin sent more than its Content-Range said: nothing is stored.
            ctx.piece = None;
            return Ok(None);
        }
        if !end_of_stream {
            return Ok(None);
        }
        let (Some((mut piece, received, length)), Some(url)) = (ctx.piece.take(), &ctx.url) else {
            return Ok(None);
        };
        if received.len() != length {
            return Ok(None);
        }
        piece.body = received.freeze();
        let primary = ctx.primary.unwrap_or_else(|| url.primary_hash());
        let store = self.shared.store;
        // As for a whole response (`TieredMiss::finish`): a piece fetched before a purge of
        // its URL may be of the page before the edit (regression: it was stored, and ranges
        // inside it served the old file). Bans are read where pieces are served.
        let sent = ctx.upstream_sent.unwrap_or(SystemTime::UNIX_EPOCH);
        let vouched = crate::cache::policy::vouched_at(sent, &piece.head.headers);
        if store.invalidations.purged_since(&primary, vouched) {
            return Ok(None);
        }
        if let Some((pieces, whole)) = store.partial.add(primary, piece) {
            store.store_combined(primary, &pieces, whole);
        }
        Ok(None)
    }

    fn response_cache_filter(
        &self,
        session: &Session,
        resp: &ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<RespCacheable> {
        let mut stored = resp.clone();
        let sent = ctx.upstream_sent.unwrap_or_else(SystemTime::now);
        if let Some(fields) = ctx.not_modified.take() {
            // A 304 speaks for the page as it was when it was decided: a purge since then (a
            // soft one leaves the copy in place, stale) must not be undone by refreshing the
            // stored copy. The client that asked is answered with it; nothing stored is
            // updated. Regression: a soft purge racing a revalidation, here or at a backend
            // that had not applied it yet, was undone by the 304 and the old page served
            // fresh.
            let vouched = crate::cache::policy::vouched_at(sent, &fields);
            let invalidations = &self.shared.store.invalidations;
            if ctx
                .primary
                .is_some_and(|p| invalidations.purged_since(&p, vouched))
            {
                return Ok(RespCacheable::Uncacheable(NoCacheReason::Custom(
                    "purged-while-revalidating",
                )));
            }
            // pingora merges only a few fields of a 304 into the stored header; RFC 9111
            // §4.3.4 asks for all of them.
            crate::cache::policy::update_from_304(&mut stored, &fields);
        }
        let authorization = session
            .req_header()
            .headers
            .contains_key(header::AUTHORIZATION);
        // RFC 9111 §4.2.3: age counts from when the request was sent (response_delay is part
        // of it), which is also the instant a later purge must be compared with.
        let decided = if ctx.asks.no_store {
            // RFC 9111 §5.2.1.5: "a cache MUST NOT store any part of either this request or
            // any response to it".
            Err(crate::cache::policy::Uncacheable::RequestNoStore)
        } else {
            let policy = &self.shared.settings.load().policy;
            policy.decide(&mut stored, authorization, sent, ctx.ttl_rule)
        };
        let invalidations = &self.shared.store.invalidations;
        match decided {
            // A copy a ban may have been meant for (`banned_before_storing`): passed on, not
            // stored, and no hit-for-miss mark (it speaks for this moment, not the URL).
            Ok(f)
                if (ctx.url.as_ref()).is_some_and(|url| {
                    invalidations.banned_before_storing(url, f.created, &resp.headers)
                }) =>
            {
                Ok(RespCacheable::Uncacheable(NoCacheReason::Custom(
                    "banned-while-fetching",
                )))
            }
            Ok(f) => {
                ctx.stored = true;
                ctx.fresh_until = Some(f.fresh_until);
                if let Some(primary) = &ctx.primary {
                    // One past the largest object is marked when pingora drops it (`logging`).
                    self.shared
                        .hit_for_miss
                        .answered(primary, Storability::Storable);
                }
                if let Some(facts) = &mut ctx.debug {
                    // pingora drops a body past the largest object as it streams; a declared
                    // length says so now.
                    let declared = (resp.headers.get(header::CONTENT_LENGTH))
                        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
                    if declared.is_some_and(|n| n > self.shared.store.max_object_size()) {
                        facts.not_stored = Some("too-large");
                    } else {
                        let lifetime = f.fresh_until.duration_since(f.created).unwrap_or_default();
                        facts.stored = Some(debug::Stored {
                            lifetime,
                            from: f.from.as_str(),
                            capped: f.capped.map(|cap| cap.as_str()),
                            jitter: f.jitter,
                        });
                    }
                }
                let mut meta = CacheMeta::new(
                    f.fresh_until,
                    f.created,
                    f.stale_while_revalidate_sec,
                    f.stale_if_error_sec,
                    stored,
                );
                // Always, so that a revalidation's metadata replaces the stored copy's
                // (pingora keeps the old extensions the new one lacks).
                meta.extensions_mut().insert(f.age_when_heard);
                // Which clients the copy serves (`vary::copy_for`).
                let stale = session.cache.maybe_cache_meta();
                vary::mark_brotli_declined(&mut meta, &session.req_header().headers, stale);
                Ok(RespCacheable::Cacheable(meta))
            }
            Err(reason) => {
                ctx.stored = false;
                if let Some(facts) = &mut ctx.debug {
                    facts.not_stored = Some(reason.as_str());
                }
                if let Some(primary) = &ctx.primary {
                    let refused = Storability::Refused(reason, resp.status.as_u16());
                    self.shared.hit_for_miss.answered(primary, refused);
                }
                self.shared
                    .metrics
                    .uncacheable
                    .with_label_values(&[reason.as_str()])
                    .inc();
                Ok(RespCacheable::Uncacheable(NoCacheReason::Custom(
                    reason.as_str(),
                )))
            }
        }
    }

    fn should_serve_stale(
        &self,
        session: &mut Session,
        _ctx: &mut RequestCtx,
        error: Option<&Error>,
    ) -> bool {
        // Called only once the object's own stale-while-revalidate / stale-if-error window
        // (RFC 5861, from the response or the configured grace) allows it.
        match error {
            None => true,
            Some(e) if e.esource() != &ErrorSource::Upstream => false,
            Some(e) => {
                // After an origin that could not be reached (not one that answered 5xx),
                // pingora reuses no client connection, whatever the stale answer says: it
                // says `Connection: close` (RFC 9112 §9.6), so that the client does not send
                // its next request down a connection about to close.
                if !matches!(e.etype(), ErrorType::HTTPStatus(_)) {
                    session.set_keepalive(None);
                }
                true
            }
        }
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        http10::close_after_unframed_body(session, resp);
        ctx.answer_without_content = matches!(resp.status.as_u16(), 204 | 304);
        if resp.status == http::StatusCode::NOT_MODIFIED {
            if let Some(meta) = session.cache.maybe_cache_meta() {
                compress::not_modified_with_the_fields_of_its_200(
                    session,
                    meta.response_header(),
                    resp,
                );
            }
        }
        let outcome = self.outcome(session, ctx);
        let disposition = outcome.disposition();
        let now = SystemTime::now();
        // A stored copy served from pingora's cache, as it is or stale.
        let hit_epoch = match session.cache.phase() {
            CachePhase::Hit | CachePhase::Stale | CachePhase::StaleUpdating => {
                session.cache.maybe_cache_meta().map(CacheMeta::epoch)
            }
            _ => None,
        };
        let settings = self.shared.settings.load();
        hit::mark(
            resp,
            disposition,
            outcome.cache_status(&self.shared.name, now),
            settings.downstream_cache_control.as_ref(),
            hit_epoch,
            now,
            settings.server_timing.then_some(&*self.shared.name),
        )?;
        // Last, so that a rule may also replace or remove what Skua adds.
        if let Some((set, i)) = &ctx.response_edits {
            if let Some(edits) = &set.rule(*i).actions.response_headers {
                edit::response(resp, edits)?;
            }
        }
        if let Some(facts) = &ctx.debug {
            let explained = self.explain(session, ctx, facts, disposition, now);
            resp.insert_header(debug::SKUA_DEBUG, explained)?;
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<std::time::Duration>> {
        // RFC 9110 §9.3.2: the answer to HEAD has no content, nor has a 304 (§15.4.5). To
        // fill the cache pingora asks the origin with GET and without the client's
        // conditions, and answers the client from what comes back (what is stored was taken
        // before this filter); its HTTP/1.1 writer drops the body that follows such an answer,
        // its HTTP/2 writer sent it as DATA, which clients refuse by resetting the stream.
        // Regressions: over HTTP/2, a HEAD, or a GET whose `If-None-Match` matched, for
        // anything not yet cached failed (`curl -I https://…`).
        if ctx.answer_without_content || session.req_header().method == http::Method::HEAD {
            *body = None;
            return Ok(None);
        }
        Ok(None)
    }

    /// A client that goes away, resets its stream or breaks the protocol is the client's
    /// business, not an error for the operator's log: logged there, a client resetting streams
    /// as fast as it can (the HTTP/2 "rapid reset" attack) would write a line per stream. It is
    /// logged at debug level; the request's access-log line and status still count it.
    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, error: &Error) -> bool {
        let downstream = error.esource() == &ErrorSource::Downstream;
        if downstream {
            tracing::debug!("client error: {error}");
        }
        downstream
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let (code, message) = match e.etype() {
            ErrorType::HTTPStatus(413) => (
                413,
                "request body larger than this cache accepts (max_body_bytes)",
            ),
            ErrorType::HTTPStatus(408) => (
                408,
                "request body too slow: it must arrive within body_timeout plus a second per body_min_rate bytes",
            ),
            ErrorType::HTTPStatus(code) => (*code, "request refused"),
            ErrorType::Custom(compress::BAD_CONTENT_ENCODING) => (502, compress::UNDECODABLE),
            ErrorType::Custom(crate::upstream::ORIGIN_BUSY) => (
                503,
                "every origin of the pool is at its max_connections; try again shortly",
            ),
            // The client's body stopped coming for `body_timeout`.
            ErrorType::ReadTimedout if e.esource() == &ErrorSource::Downstream => (
                408,
                "request body too slow: nothing of it came for body_timeout",
            ),
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
                (504, "origin timed out")
            }
            // Never a fall-back to plain HTTP: the operator asked for TLS to this origin.
            ErrorType::TLSHandshakeFailure
            | ErrorType::TLSHandshakeTimedout
            | ErrorType::InvalidCert
            | ErrorType::HandshakeError => (
                502,
                "TLS to the origin failed (its certificate did not verify, or it does not speak TLS)",
            ),
            _ => match e.esource() {
                ErrorSource::Upstream => (502, "origin unreachable or failed"),
                ErrorSource::Downstream => match e.etype() {
                    ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => {
                        (0, "")
                    }
                    // What pingora found wrong in the request, for its sender: "protected
                    // header cannot be nominated by the Connection header" for
                    // `Connection: X-Forwarded-For`, which would drop the address Skua adds.
                    ErrorType::InvalidHTTPHeader => (400, first_reason(e).unwrap_or("bad request")),
                    _ => (400, "bad request"),
                },
                ErrorSource::Internal | ErrorSource::Unset => (500, "internal error"),
            },
        };
        if e.esource() == &ErrorSource::Upstream {
            self.count_origin_error(ctx, e);
        }
        // A response whose head is already out cannot be followed by another on the same
        // connection (RFC 9112 §9.3: the client would read it as part of this one's body); the
        // connection is closed instead, which tells the client the body is incomplete. pingora
        // reports a client that hangs up mid-body as a write error without a source.
        let code = if session.response_written().is_some() {
            0
        } else {
            code
        };
        if code > 0 {
            ctx.internal = true;
            ctx.stored = false;
            // pingora closes the connection after a failed proxy attempt (what the origin
            // sent of a body may be half read): say so, or the client reads "keep-alive" and
            // then finds the socket closed.
            session.set_keepalive(None);
            // `respond` marks it as Skua's own answer (`int-front`) in both status headers.
            let _ = self
                .error(session, (code, ctx.request_id.as_deref()), message)
                .await;
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        if ctx.health {
            return;
        }
        if e.is_some_and(|e| *e.esource() == ErrorSource::Downstream) {
            // On HTTP/2: the client reset its stream (`h2_max_rapid_resets`).
            h2::note_reset_by_client(session.response_written().is_some());
        }
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let disposition = self.outcome(session, ctx).disposition();
        let m = &self.shared.metrics;
        if let Some((origin_status, waited)) = ctx.origin_response {
            if let Some(pool) = self.shared.pools.load().get(ctx.pool) {
                pool.series(m).observe(origin_status, waited);
            }
        }
        let compressed = (ctx.gzip_before_storing || ctx.brotli_before_storing)
            .then(|| {
                let brotli = session
                    .upstream_modules_ctx
                    .get::<compress::BrotliBeforeStoring>();
                compress::stored_sizes(&session.upstream_compression, brotli)
            })
            .flatten();
        if let Some((encoding, input, output)) = compressed {
            m.compression_bytes
                .with_label_values(&[encoding, "in"])
                .inc_by(input as u64);
            m.compression_bytes
                .with_label_values(&[encoding, "out"])
                .inc_by(output as u64);
        }
        if session.cache.lock_duration().is_some() && ctx.origin_response.is_none() {
            m.coalesced.inc();
        }
        if let (CachePhase::Disabled(NoCacheReason::ResponseTooLarge), Some(primary)) =
            (session.cache.phase(), &ctx.primary)
        {
            self.shared
                .hit_for_miss
                .answered(primary, Storability::TooLarge);
        }
        let req = session.req_header();
        // A purge names the URL it purges, host included, as MediaWiki sends it (pingora
        // hands over an absolute-form target in origin form).
        let as_sent = || match &ctx.url {
            Some(url) if req.method.as_str() == "PURGE" => url.primary().into(),
            _ => String::from_utf8_lossy(req.raw_path()),
        };
        let hit_path = match disposition {
            Disposition::HitFront | Disposition::HitLocal if ctx.fast_hit => Some(HitPath::Session),
            Disposition::HitFront | Disposition::HitLocal => Some(HitPath::Cache),
            _ => None,
        };
        self.shared.record(&record::Served {
            client: &|| client_ip(session),
            method: req.method.as_str(),
            target: &as_sent,
            protocol: crate::metrics::access_log::protocol(req.version),
            scheme: ctx
                .url
                .as_ref()
                .map_or_else(|| listener_scheme(session), |u| u.scheme),
            url: ctx.url.as_ref(),
            headers: &req.headers,
            authority: req.uri.authority().map(|a| a.as_str()),
            status,
            // What the client was sent (nginx's `$body_bytes_sent`), counted by the session as
            // it wrote: past pingora's decoding of a stored coded copy for a client that takes
            // none, which the body filter runs before, and past Skua's own answers, written
            // whole. A HEAD's answer has none.
            body_bytes: if req.method == Method::HEAD {
                0
            } else {
                session.body_bytes_sent() as u64
            },
            disposition,
            hit_path,
            started: ctx.started,
            origin: ctx
                .origin_addr
                .zip(ctx.origin_response.map(|(_, waited)| waited)),
            request_id: ctx.request_id.as_deref(),
        });
    }
}
