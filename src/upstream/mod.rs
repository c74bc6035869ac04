//! Origin pools: which origin a miss goes to. Each `[[origin]]` pool is a pingora load
//! balancer, round robin or consistent hash of the cache key (a frontend in front of Skua
//! backends, so each object lives on one backend), whose HTTP health check runs as a
//! background service; a failed connection is retried on the next healthy origin (for a
//! consistent pool: the next on the ring, so only the dead origin's keys move), and an origin
//! that failed a request rests for `fail_timeout` ([`resting`]). It does not decide what to
//! fetch or store (that is `proxy` and `cache`).

pub mod resolve;
mod resting;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use pingora::http::RequestHeader;
use pingora::lb::health_check::{HealthObserve, HttpHealthCheck};
use pingora::lb::selection::{BackendIter, BackendSelection, Consistent, RoundRobin};
use pingora::lb::{Backend, LoadBalancer};
use pingora::protocols::l4::socket::SocketAddr as PeerAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType, Result};
use tokio::sync::Semaphore;

use crate::config::{Balance, OriginPool, OriginTls};
use crate::metrics::{Metrics, OriginSeries};
use pingora::protocols::tls::CaType;
use pingora::protocols::ALPN;
use pingora::utils::tls::{parse_x509, WrappedX509};

/// One origin pool, ready to pick origins.
pub struct Pool {
    pub name: Arc<str>,
    hosts: Vec<String>,
    balancer: Balancer,
    connect_timeout: std::time::Duration,
    read_timeout: std::time::Duration,
    size: usize,
    /// How many of the pool's origins the health checks hold down.
    down: Arc<AtomicUsize>,
    /// Lowercased protocols a client may upgrade to through this pool.
    upgrade: Vec<String>,
    /// This pool's origin metrics, made on first use.
    series: std::sync::OnceLock<OriginSeries>,
    tls: Option<PoolTls>,
    /// `[[origin]] max_connections`: the requests in flight to each origin, when bounded.
    in_flight: Option<HashMap<SocketAddr, Arc<Semaphore>>>,
    max_connections: usize,
    /// `[[origin]] fail_timeout`: the origins resting after a failed request.
    resting: resting::Resting,
    /// `[[origin]] retry_statuses`.
    retry_statuses: Vec<u16>,
}

/// A request's place among those in flight to one origin (`[[origin]] max_connections`),
/// given back when dropped.
pub type OriginPermit = tokio::sync::OwnedSemaphorePermit;

/// What [`Pool::claim_now`] found.
pub enum Claim {
    /// An origin, and the request's place among those in flight to it (none: no limit).
    Got(Box<HttpPeer>, Option<OriginPermit>),
    /// Every origin tried is at its limit: each, with its count to wait on (the first
    /// choice first).
    Busy(Vec<(HttpPeer, Arc<Semaphore>)>),
}

/// The error kind of a request that found every origin of its pool at `max_connections` for
/// the whole connect timeout: answered 503, and served stale where the object allows it, as
/// for an origin that cannot be reached.
pub const ORIGIN_BUSY: &str = "origin_busy";

/// How a pool's origins are reached over HTTPS (`[origin.tls]`).
struct PoolTls {
    /// SNI and the verified name; `None`: the request's host.
    name: Option<String>,
    verify: bool,
    /// Authorities to verify against; `None`: the system's roots.
    ca: Option<Arc<CaType>>,
    alpn: ALPN,
}

impl PoolTls {
    fn new(config: &OriginTls) -> PoolTls {
        // Every certificate was parsed when the configuration was checked
        // (`certificate::load_authorities`), so pingora's parse in `WrappedX509::new` holds.
        let ca = config.ca.as_ref().map(|certs| {
            let wrapped: Vec<WrappedX509> = certs
                .iter()
                .map(|der| WrappedX509::new(der.clone(), parse_x509))
                .collect();
            Arc::<CaType>::from(wrapped)
        });
        PoolTls {
            name: config.name.clone(),
            verify: config.verify,
            ca,
            alpn: if config.http2 { ALPN::H2H1 } else { ALPN::H1 },
        }
    }

    /// Makes `peer` speak TLS to an origin for `host` (the request's, without its port).
    fn apply(&self, peer: &mut HttpPeer, host: &str) {
        // pingora verifies nothing when the SNI is empty (`connectors::tls::rustls`), so an
        // empty name is never sent while verification is asked for.
        let name = self.name.as_deref().unwrap_or(host);
        peer.sni = if name.is_empty() {
            "localhost".into()
        } else {
            name.to_string()
        };
        peer.options.verify_cert = self.verify;
        peer.options.verify_hostname = self.verify;
        peer.options.ca = self.ca.clone();
        peer.options.alpn = self.alpn.clone();
    }
}

/// All pools, in configuration order.
pub struct Pools {
    pools: Vec<Pool>,
    /// Stops the health-check loops of these pools.
    stop: tokio::sync::watch::Sender<bool>,
    checking: AtomicBool,
}

impl Drop for Pools {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// The pools in use, replaced whole by a reload; requests already running keep theirs.
pub type SharedPools = Arc<ArcSwap<Pools>>;

/// The background service that runs the health checks of whatever pools are current.
pub struct HealthChecks(pub SharedPools);

#[async_trait]
impl BackgroundService for HealthChecks {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            self.0.load().start_health_checks();
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// A pool's balancer, by its selection algorithm.
enum Balancer {
    RoundRobin(Arc<LoadBalancer<RoundRobin>>),
    Consistent(Arc<LoadBalancer<Consistent>>),
}

impl Pools {
    /// Builds the pools; their health checks start with [`HealthChecks`].
    pub fn build(config: &[OriginPool]) -> std::io::Result<Pools> {
        Pools::build_after(config, None)
    }

    /// As [`Pools::build`], for a reload: an origin whose pool keeps its name and
    /// `max_connections` keeps its count of requests in flight, so that the requests still
    /// running there are not forgotten (regression: after a reload an origin took up to twice
    /// its `max_connections` until the requests that began before it had ended), and one
    /// resting after a failed request goes on resting.
    pub fn rebuild(config: &[OriginPool], previous: &Pools) -> std::io::Result<Pools> {
        Pools::build_after(config, Some(previous))
    }

    fn build_after(config: &[OriginPool], previous: Option<&Pools>) -> std::io::Result<Pools> {
        let mut pools = Vec::new();
        for pool in config {
            let predecessor = (previous.into_iter())
                .flat_map(|p| &p.pools)
                .find(|old| *old.name == *pool.name);
            let counted = predecessor
                .filter(|old| old.max_connections == pool.max_connections)
                .and_then(|old| old.in_flight.as_ref());
            let in_flight = (pool.max_connections > 0).then(|| {
                (pool.addresses.iter())
                    .map(|a| {
                        let kept = counted.and_then(|c| c.get(a)).cloned();
                        (
                            *a,
                            kept.unwrap_or_else(|| Arc::new(Semaphore::new(pool.max_connections))),
                        )
                    })
                    .collect()
            });
            let down = Arc::new(AtomicUsize::new(0));
            let balancer = match pool.balance {
                Balance::RoundRobin => {
                    Balancer::RoundRobin(Arc::new(load_balancer(pool, down.clone())?))
                }
                Balance::Consistent => {
                    Balancer::Consistent(Arc::new(load_balancer(pool, down.clone())?))
                }
            };
            pools.push(Pool {
                name: pool.name.as_str().into(),
                hosts: pool.hosts.clone(),
                balancer,
                connect_timeout: pool.connect_timeout,
                read_timeout: pool.read_timeout,
                size: pool.addresses.len(),
                down,
                upgrade: pool.upgrade.clone(),
                series: std::sync::OnceLock::new(),
                tls: pool.tls.as_ref().map(PoolTls::new),
                in_flight,
                max_connections: pool.max_connections,
                resting: resting::Resting::new(
                    &pool.addresses,
                    pool.fail_timeout,
                    predecessor.map(|old| &old.resting),
                ),
                retry_statuses: pool.retry_statuses.clone(),
            });
        }
        Ok(Pools {
            pools,
            stop: tokio::sync::watch::channel(false).0,
            checking: AtomicBool::new(false),
        })
    }

    /// Starts every pool's health-check loop on the current runtime, once; they stop when
    /// these pools are dropped (replaced by a reload).
    fn start_health_checks(&self) {
        if self.checking.swap(true, Ordering::AcqRel) {
            return;
        }
        for pool in &self.pools {
            let stop = self.stop.subscribe();
            match &pool.balancer {
                Balancer::RoundRobin(lb) => {
                    let lb = lb.clone();
                    tokio::spawn(async move { lb.start(stop).await });
                }
                Balancer::Consistent(lb) => {
                    let lb = lb.clone();
                    tokio::spawn(async move { lb.start(stop).await });
                }
            }
        }
    }

    /// The pool for a request host: the first listing it, else the first default pool, else
    /// the first pool.
    pub fn for_host(&self, host: &str) -> usize {
        crate::config::default_pool(self.pools.iter().map(|p| p.hosts.as_slice()), host)
    }

    pub fn get(&self, index: usize) -> Option<&Pool> {
        self.pools.get(index)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Pool> {
        self.pools.iter()
    }
}

impl Pool {
    /// `origin` failed a request: it rests for the pool's `fail_timeout`.
    pub fn failed(&self, origin: &SocketAddr) {
        self.resting.failed(origin);
    }

    /// This pool's origin request and latency series in `metrics`.
    pub fn series(&self, metrics: &Metrics) -> &OriginSeries {
        self.series
            .get_or_init(|| metrics.origin_series(&self.name))
    }

    /// Whether a client may switch a connection through this pool to `protocol` (RFC 9110
    /// §7.8; the protocol name before any `/version`).
    pub fn allows_upgrade(&self, protocol: &str) -> bool {
        let name = protocol.split('/').next().unwrap_or("").trim();
        self.upgrade.iter().any(|p| p.eq_ignore_ascii_case(name))
    }

    /// How many origins the pool has: the most connection attempts one request makes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Whether an answer with `status` is tried once more on another origin (`[[origin]]
    /// retry_statuses`), for a request that may be sent twice.
    pub fn retries_on(&self, status: u16) -> bool {
        self.retry_statuses.contains(&status)
    }

    /// The pool's origins are reached over TLS (`[origin.tls]`).
    pub fn uses_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// A healthy origin not in `failed`, as an upstream peer. When the health checks hold
    /// every remaining origin down, one of them is tried anyway, as nginx does: the checks may
    /// be behind (a pool that just started), and a refused connection costs little.
    /// `key` gives the cache key; only a consistent pool asks for it. `host`: the request's
    /// host (without a port), the name an HTTPS origin is asked for unless the pool names one.
    pub fn pick(
        &self,
        key: impl FnOnce() -> String,
        host: &str,
        failed: &[SocketAddr],
    ) -> Result<HttpPeer> {
        self.pick_where(key, host, failed, false)
    }

    /// An origin as [`Self::pick`] finds it, and a place among the requests in flight to it
    /// (`[[origin]] max_connections`): an origin at its limit is passed over for another
    /// healthy one with room; when none has room, the request waits up to the pool's connect
    /// timeout for whichever of them gives a place back first, then fails as [`ORIGIN_BUSY`].
    pub async fn pick_and_claim(
        &self,
        key: impl Fn() -> String,
        host: &str,
        failed: &[SocketAddr],
    ) -> Result<(Box<HttpPeer>, Option<OriginPermit>)> {
        let mut full = match self.claim_now(key, host, failed)? {
            Claim::Got(peer, permit) => return Ok((peer, permit)),
            Claim::Busy(full) => full,
        };
        // Whichever of them gives a place back first.
        let rooms: Vec<Arc<Semaphore>> = full.iter().map(|(_, room)| room.clone()).collect();
        let waits = (rooms.into_iter().enumerate())
            .map(|(i, room)| Box::pin(async move { (i, room.acquire_owned().await) }));
        let first_room = futures::future::select_all(waits);
        match tokio::time::timeout(self.connect_timeout, first_room).await {
            // `i` is an index into `full`, whose waits these are.
            Ok(((i, Ok(permit)), _, _)) => Ok((Box::new(full.swap_remove(i).0), Some(permit))),
            _ => {
                let mut e = Error::explain(
                    ErrorType::Custom(ORIGIN_BUSY),
                    format!(
                        "every origin of pool {} stayed at its max_connections for the connect timeout",
                        self.name
                    ),
                );
                e.esource = pingora::ErrorSource::Upstream;
                Err(e)
            }
        }
    }

    /// [`Self::pick_and_claim`] without the wait: `Busy` when no healthy origin has room.
    pub fn claim_now(
        &self,
        key: impl Fn() -> String,
        host: &str,
        failed: &[SocketAddr],
    ) -> Result<Claim> {
        let first = self.pick(&key, host, failed)?;
        let Some(in_flight) = &self.in_flight else {
            return Ok(Claim::Got(Box::new(first), None));
        };
        let limit = |peer: &HttpPeer| {
            (peer._address.as_inet())
                .and_then(|a| in_flight.get(a))
                .cloned()
        };
        let mut passed = failed.to_vec();
        let mut full = Vec::new();
        let mut candidate = Some(first);
        while let Some(peer) = candidate {
            let Some(room) = limit(&peer) else {
                return Ok(Claim::Got(Box::new(peer), None));
            };
            if let Ok(permit) = room.clone().try_acquire_owned() {
                return Ok(Claim::Got(Box::new(peer), Some(permit)));
            }
            passed.extend(peer._address.as_inet().copied());
            full.push((peer, room));
            candidate = self.pick_where(&key, host, &passed, true).ok();
        }
        Ok(Claim::Busy(full))
    }

    /// [`Self::pick`]; with `healthy_only`, never an origin the health checks hold down.
    fn pick_where(
        &self,
        key: impl FnOnce() -> String,
        host: &str,
        failed: &[SocketAddr],
        healthy_only: bool,
    ) -> Result<HttpPeer> {
        let untried = |b: &Backend| b.addr.as_inet().is_none_or(|a| !failed.contains(a));
        let key = match &self.balancer {
            Balancer::Consistent(_) => key(),
            Balancer::RoundRobin(_) => String::new(),
        };
        let select = |accept: &dyn Fn(&Backend, bool) -> bool| match &self.balancer {
            Balancer::RoundRobin(lb) => lb.select_with(b"", 256, |b, h| accept(b, h)),
            Balancer::Consistent(lb) => lb.select_with(key.as_bytes(), 256, |b, h| accept(b, h)),
        };
        // pingora's search for a healthy origin walks all its 256 steps, hashing each, when
        // there is none: 140,000 instructions on every request of an outage (callgrind), more
        // than a whole miss otherwise costs. It is not made when the checks hold every origin
        // down. A resting origin is picked only when no other healthy one is left.
        let healthy = (!self.all_down())
            .then(|| match self.resting.now_if_any() {
                None => select(&|b, healthy| healthy && untried(b)),
                Some(now) => {
                    let awake =
                        |b: &Backend| b.addr.as_inet().is_none_or(|a| !self.resting.rests(a, now));
                    select(&|b, healthy| healthy && untried(b) && awake(b))
                        .or_else(|| select(&|b, healthy| healthy && untried(b)))
                }
            })
            .flatten();
        let backend = healthy
            .or_else(|| {
                (!healthy_only)
                    .then(|| select(&|b, _| untried(b)))
                    .flatten()
            })
            .ok_or_else(|| {
                let mut e = Error::explain(
                    ErrorType::ConnectNoRoute,
                    format!("every origin in pool {} failed", self.name),
                );
                e.esource = pingora::ErrorSource::Upstream;
                e
            })?;
        let addr = *backend.addr.as_inet().ok_or_else(|| {
            Error::explain(ErrorType::InternalError, "origin is not an inet address")
        })?;
        let mut peer = HttpPeer::new(addr, self.tls.is_some(), String::new());
        if let Some(tls) = &self.tls {
            tls.apply(&mut peer, host);
        }
        peer.options.connection_timeout = Some(self.connect_timeout);
        peer.options.total_connection_timeout = Some(self.connect_timeout);
        peer.options.read_timeout = Some(self.read_timeout);
        Ok(peer)
    }

    /// Whether the health checks hold every origin of the pool down.
    pub fn all_down(&self) -> bool {
        self.down.load(Ordering::Relaxed) >= self.size
    }

    /// Whether an origin not in `tried` passes its health checks: somewhere a request its
    /// first origin answered with one of `retry_statuses` may be sent instead. Not one that
    /// is down: that would trade the origin's answer for a failed connection.
    pub fn another_healthy(&self, tried: &[SocketAddr]) -> bool {
        if self.all_down() {
            return false;
        }
        let backends = match &self.balancer {
            Balancer::RoundRobin(lb) => lb.backends(),
            Balancer::Consistent(lb) => lb.backends(),
        };
        backends
            .get_backend()
            .iter()
            .any(|b| b.addr.as_inet().is_some_and(|a| !tried.contains(a)) && backends.ready(b))
    }

    /// Every origin's state (health checks, resting), for the admin endpoint.
    pub fn health(&self) -> Vec<OriginHealth> {
        let backends = match &self.balancer {
            Balancer::RoundRobin(lb) => lb.backends(),
            Balancer::Consistent(lb) => lb.backends(),
        };
        let now = self.resting.now_if_any();
        backends
            .get_backend()
            .iter()
            .map(|b| OriginHealth {
                address: addr_string(&b.addr),
                healthy: backends.ready(b),
                resting: (b.addr.as_inet())
                    .is_some_and(|a| now.is_some_and(|n| self.resting.rests(a, n))),
            })
            .collect()
    }
}

/// One origin's state, for `/stats` and the dashboard.
pub struct OriginHealth {
    pub address: String,
    /// The health checks pass (or there are none).
    pub healthy: bool,
    /// It failed a request within `fail_timeout`, and is passed over while another is healthy.
    pub resting: bool,
}

/// Counts a pool's origins as its health check flips them (pingora starts every origin
/// healthy and reports each flip once).
struct DownCount(Arc<AtomicUsize>);

#[async_trait]
impl HealthObserve for DownCount {
    async fn observe(&self, _origin: &Backend, healthy: bool) {
        if healthy {
            // Never below zero, whatever order flips were reported in.
            let _ =
                (self.0).fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        } else {
            self.0.fetch_add(1, Ordering::AcqRel);
        }
    }
}

/// A pool's load balancer with its health check set up; `down` counts the origins it holds
/// down.
fn load_balancer<S>(pool: &OriginPool, down: Arc<AtomicUsize>) -> std::io::Result<LoadBalancer<S>>
where
    S: BackendSelection + 'static,
    S::Iter: BackendIter,
{
    let mut lb = LoadBalancer::<S>::try_from_iter(pool.addresses.iter().copied())?;
    if let Some(hc) = &pool.health_check {
        // The host goes into the request below, where a bad value is an error, not a panic
        // (pingora's constructor unwraps it).
        let mut check = HttpHealthCheck::new("", false);
        if let Some(tls) = &pool.tls {
            let mut peer = HttpPeer::new("0.0.0.0:1", true, String::new());
            PoolTls::new(tls).apply(&mut peer, &hc.host);
            check.peer_template = peer;
        }
        let mut req = RequestHeader::build("GET", hc.path.as_bytes(), None)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        req.insert_header("Host", hc.host.as_str())
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        req.insert_header("User-Agent", "skua-health-check")
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        check.req = req;
        check.health_changed_callback = Some(Box::new(DownCount(down)));
        check.consecutive_failure = hc.failures;
        check.consecutive_success = hc.successes;
        check.peer_template.options.connection_timeout = Some(pool.connect_timeout);
        check.peer_template.options.read_timeout = Some(pool.read_timeout.min(hc.interval * 2));
        check.validator = Some(Box::new(|resp| {
            if resp.status.is_success() || resp.status.is_redirection() {
                Ok(())
            } else {
                Error::e_explain(
                    ErrorType::CustomCode("unhealthy status", resp.status.as_u16()),
                    "health check answered with an error status",
                )
            }
        }));
        lb.set_health_check(Box::new(check));
        lb.health_check_frequency = Some(hc.interval);
        lb.parallel_health_check = true;
    }
    Ok(lb)
}

fn addr_string(addr: &PeerAddr) -> String {
    match addr.as_inet() {
        Some(a) => a.to_string(),
        None => format!("{addr:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{HealthCheck, OriginTarget};
    use std::sync::atomic::AtomicU16;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An origin on a loopback port that answers every request with `status`.
    async fn origin(status: Arc<AtomicU16>) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let status = status.load(Ordering::Relaxed);
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = conn.read(&mut buf).await;
                    let answer = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n");
                    let _ = conn.write_all(answer.as_bytes()).await;
                });
            }
        });
        addr
    }

    fn pool_at(addresses: Vec<SocketAddr>, balance: Balance) -> OriginPool {
        OriginPool {
            name: "wiki".into(),
            targets: addresses
                .iter()
                .copied()
                .map(OriginTarget::Address)
                .collect(),
            addresses,
            resolved: Vec::new(),
            resolve_interval: Duration::from_secs(10),
            hosts: Vec::new(),
            connect_timeout: Duration::from_secs(1),
            read_timeout: Duration::from_secs(1),
            health_check: Some(HealthCheck {
                path: "/_health".into(),
                host: "wiki.test".into(),
                interval: Duration::from_secs(3600),
                failures: 1,
                successes: 1,
            }),
            balance,
            upgrade: Vec::new(),
            tls: None,
            max_connections: 0,
            fail_timeout: Duration::ZERO,
            retry_statuses: Vec::new(),
        }
    }

    fn address(peer: &HttpPeer) -> SocketAddr {
        *peer._address.as_inet().unwrap()
    }

    /// `max_connections`: an origin at its limit is passed over for one with room; with no
    /// room anywhere a request waits for a place to be given back, and fails as busy after the
    /// connect timeout.
    #[tokio::test]
    async fn a_full_origin_is_passed_over_then_waited_for() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let mut config = pool_at(vec![a, b], Balance::RoundRobin);
        config.max_connections = 1;
        config.connect_timeout = Duration::from_millis(200);
        let pools = Pools::build(&[config]).unwrap();
        let pool = pools.get(0).unwrap();
        let key = String::new;
        let (one, held_one) = pool.pick_and_claim(key, "wiki.test", &[]).await.unwrap();
        let (two, held_two) = pool.pick_and_claim(key, "wiki.test", &[]).await.unwrap();
        assert!(held_one.is_some() && held_two.is_some());
        assert_ne!(
            address(&one),
            address(&two),
            "the full origin was passed over"
        );
        assert!(matches!(
            pool.claim_now(key, "wiki.test", &[]),
            Ok(Claim::Busy(_))
        ));

        // Room given back while a request waits: it gets the place.
        let waiting = pool.pick_and_claim(key, "wiki.test", &[]);
        let give_back = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(held_one);
        };
        let ((third, held_three), ()) = tokio::join!(async { waiting.await.unwrap() }, give_back);
        assert!(held_three.is_some());
        assert_eq!(address(&third), address(&one));

        // None given back: busy after the connect timeout.
        let started = std::time::Instant::now();
        let busy = pool
            .pick_and_claim(key, "wiki.test", &[])
            .await
            .unwrap_err();
        assert_eq!(busy.etype(), &ErrorType::Custom(ORIGIN_BUSY));
        assert!(started.elapsed() >= Duration::from_millis(200));
        drop((held_two, held_three));
        assert!(matches!(
            pool.claim_now(key, "wiki.test", &[]),
            Ok(Claim::Got(_, Some(_)))
        ));
    }

    /// A reload keeps each origin's count of requests in flight where its pool keeps its name
    /// and limit, and starts a new count where the limit changed.
    #[tokio::test]
    async fn a_reload_keeps_the_requests_in_flight_to_each_origin() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mut config = pool_at(vec![a], Balance::RoundRobin);
        config.max_connections = 1;
        let before = Pools::build(std::slice::from_ref(&config)).unwrap();
        let key = String::new;
        let held = before.get(0).unwrap().claim_now(key, "wiki.test", &[]);
        assert!(matches!(held, Ok(Claim::Got(_, Some(_)))));
        let after = Pools::rebuild(std::slice::from_ref(&config), &before).unwrap();
        assert!(
            matches!(
                after.get(0).unwrap().claim_now(key, "wiki.test", &[]),
                Ok(Claim::Busy(_))
            ),
            "the request running since before the reload still counts"
        );
        config.max_connections = 2;
        let raised = Pools::rebuild(&[config], &after).unwrap();
        assert!(matches!(
            raised.get(0).unwrap().claim_now(key, "wiki.test", &[]),
            Ok(Claim::Got(_, Some(_)))
        ));
        drop(held);
    }

    async fn check(pool: &Pool) {
        match &pool.balancer {
            Balancer::RoundRobin(lb) => lb.backends().run_health_check(false).await,
            Balancer::Consistent(lb) => lb.backends().run_health_check(false).await,
        }
    }

    /// An origin that failed a request is passed over while it rests, unless it is the only
    /// one left.
    #[test]
    fn a_failed_origin_rests_while_another_is_healthy() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let mut config = pool_at(vec![a, b], Balance::RoundRobin);
        config.fail_timeout = Duration::from_secs(60);
        let pools = Pools::build(&[config]).unwrap();
        let pool = pools.get(0).unwrap();
        pool.failed(&a);
        for _ in 0..4 {
            let picked = pool.pick(String::new, "wiki.test", &[]).unwrap();
            assert_eq!(address(&picked), b);
        }
        let last = pool.pick(String::new, "wiki.test", &[b]).unwrap();
        assert_eq!(
            address(&last),
            a,
            "the resting origin when none other is left"
        );
    }

    /// The pool knows when its checks hold every origin down (so that a pick skips pingora's
    /// fruitless search for a healthy one), and still picks one of them then.
    #[tokio::test]
    async fn a_pool_knows_when_every_origin_is_down_and_still_tries_one() {
        for balance in [Balance::RoundRobin, Balance::Consistent] {
            let first = Arc::new(AtomicU16::new(200));
            let second = Arc::new(AtomicU16::new(200));
            let addresses = vec![origin(first.clone()).await, origin(second.clone()).await];
            let pools = Pools::build(&[pool_at(addresses.clone(), balance)]).unwrap();
            let pool = pools.get(0).unwrap();
            let pick = || pool.pick(|| "/page".into(), "wiki.test", &[]).unwrap();
            check(pool).await;
            assert!(!pool.all_down());

            first.store(500, Ordering::Relaxed);
            check(pool).await;
            assert!(!pool.all_down(), "one origin is still up");
            for _ in 0..4 {
                assert_eq!(pick()._address.as_inet(), Some(&addresses[1]));
            }

            second.store(503, Ordering::Relaxed);
            check(pool).await;
            assert!(pool.all_down());
            let tried = pick()._address.as_inet().copied().unwrap();
            assert!(addresses.contains(&tried), "an origin is tried anyway");
            let other = pool.pick(|| "/page".into(), "wiki.test", &[tried]).unwrap();
            assert_ne!(other._address.as_inet(), Some(&tried), "then the other one");

            first.store(200, Ordering::Relaxed);
            check(pool).await;
            assert!(!pool.all_down());
            assert_eq!(pick()._address.as_inet(), Some(&addresses[0]));
        }
    }
}
