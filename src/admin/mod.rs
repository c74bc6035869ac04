//! The admin endpoint: `/` (a live dashboard), `/metrics` (Prometheus text), `/stats` (JSON),
//! `/history` (the dashboard's charts, JSON), `/top` (top URLs and misses, recent purges,
//! the fleet; JSON), `/healthz`, `/readyz` and `POST /purge`. It reaches the node through a [`Node`] handle (the
//! tiers and counters to report, the purger to submit purges to) and never the request path's
//! state.

pub mod terminal;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::json;

use arc_swap::ArcSwap;

use crate::cache::key::CacheUrl;
use crate::cache::Store;
use crate::metrics::history::History;
use crate::metrics::{Metrics, OriginState};
use crate::purge::{self, Purge, PurgeAuth, PurgeResult, Purger, Readiness, Scope, Source};
use crate::rules::canonical::Canonical;
use crate::upstream::SharedPools;

/// The live dashboard: one self-contained page (no external assets) polling `/stats`.
const DASHBOARD: &str = include_str!("dashboard.html");

/// What the admin port reaches of a running node, and no more: the tiers and counters it
/// reports (origin health among them), the purger it submits purges to with the rules that
/// authorise them and the canonical key function that names their URLs (both follow reloads), and
/// readiness.
pub struct Node {
    pub name: String,
    pub store: &'static Store,
    pub metrics: Arc<Metrics>,
    pub pools: SharedPools,
    pub purger: Purger,
    pub purge_auth: Arc<ArcSwap<PurgeAuth>>,
    pub canonical: Arc<ArcSwap<Canonical>>,
    pub readiness: Readiness,
    /// The last 24 hours of the counters, sampled by `metrics::history::Sampler`.
    pub history: Arc<Mutex<History>>,
}

pub struct Admin {
    node: Node,
}

impl Admin {
    pub fn new(node: Node) -> Admin {
        Admin { node }
    }

    fn refresh_gauges(&self) {
        let m = &self.node.metrics;
        let mem = &self.node.store.memory;
        m.tier_objects
            .with_label_values(&["memory"])
            .set(mem.object_count() as i64);
        m.tier_bytes
            .with_label_values(&["memory"])
            .set(mem.resident_bytes() as i64);
        m.tier_capacity
            .with_label_values(&["memory"])
            .set(mem.capacity_bytes() as i64);
        m.tier_events.catch_up(
            "memory",
            "lookup",
            mem.counters.lookups.load(Ordering::Relaxed),
        );
        m.tier_events
            .catch_up("memory", "hit", mem.counters.hits.load(Ordering::Relaxed));
        m.tier_events.catch_up(
            "memory",
            "miss",
            mem.counters.misses.load(Ordering::Relaxed),
        );
        let evicted = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        m.evictions
            .catch_up("memory", "size", evicted(&mem.counters.evicted_size));
        m.evictions
            .catch_up("memory", "expired", evicted(&mem.counters.evicted_expired));
        m.evictions.catch_up(
            "memory",
            "variants",
            evicted(&mem.counters.evicted_variants),
        );
        // From the one flag every drain sets (`POST /drain`, or the process handing over).
        m.draining.set(i64::from(self.node.readiness.draining()));
        // Every pool's series, zeros included (a pool whose origins are all down, or whose
        // name resolves to nothing yet, shows `up` 0), and none of a pool a reload removed.
        m.origins.reset();
        for pool in self.node.pools.load().iter() {
            let mut counts = [0; 3];
            for origin in pool.health() {
                counts[OriginState::of(origin.healthy, origin.resting) as usize] += 1;
            }
            for (state, n) in OriginState::ALL.iter().zip(counts) {
                m.origins
                    .with_label_values(&[&*pool.name, state.as_str()])
                    .set(n);
            }
        }
        let tags = self.node.store.tags;
        m.tag_index_bytes.set(tags.bytes() as i64);
        m.tag_index_tags.set(tags.tag_count() as i64);
        let refused = tags.refused.load(Ordering::Relaxed);
        if refused > m.tag_index_refused.get() {
            m.tag_index_refused
                .inc_by(refused - m.tag_index_refused.get());
        }
        if let Some(disk) = self.node.store.disk {
            let c = &disk.counters;
            m.tier_objects
                .with_label_values(&["disk"])
                .set(disk.object_count() as i64);
            m.tier_bytes
                .with_label_values(&["disk"])
                .set(disk.resident_bytes() as i64);
            m.tier_capacity
                .with_label_values(&["disk"])
                .set(disk.config.size as i64);
            for (event, value) in [
                ("hit", &c.hits),
                ("miss", &c.misses),
                ("store", &c.stores),
                ("eviction", &c.evictions),
                ("corrupt", &c.corrupt),
                ("write_error", &c.write_errors),
                ("readmit", &c.readmitted),
                ("read_waited", &c.reads_waited),
                ("read_mapped", &c.reads_mapped),
            ] {
                m.tier_events
                    .catch_up("disk", event, value.load(Ordering::Relaxed));
            }
            // The disk index evicts for room and past `max_variants` (it has no time limit of
            // its own).
            m.evictions.catch_up("disk", "size", evicted(&c.evictions));
            m.evictions
                .catch_up("disk", "variants", disk.displaced_variants());
        }
    }

    fn stats(&self) -> serde_json::Value {
        let mem = &self.node.store.memory;
        let c = &mem.counters;
        let origins: Vec<_> = self
            .node
            .pools
            .load()
            .iter()
            .flat_map(|p| {
                p.health().into_iter().map(move |o| {
                    let state = OriginState::of(o.healthy, o.resting).as_str();
                    json!({"pool": &*p.name, "address": o.address, "healthy": o.healthy, "resting": o.resting, "state": state})
                })
            })
            .collect();
        let disk = self.node.store.disk.map(|d| {
            let c = &d.counters;
            json!({
                "objects": d.object_count(),
                "bytes": d.resident_bytes(),
                "capacity_bytes": d.config.size,
                "hits": c.hits.load(Ordering::Relaxed),
                "misses": c.misses.load(Ordering::Relaxed),
                "stores": c.stores.load(Ordering::Relaxed),
                "evictions": c.evictions.load(Ordering::Relaxed),
                "corrupt_dropped": c.corrupt.load(Ordering::Relaxed),
                "write_errors": c.write_errors.load(Ordering::Relaxed),
                "readmitted": c.readmitted.load(Ordering::Relaxed),
                "reads_waited": c.reads_waited.load(Ordering::Relaxed),
                "reads_mapped": c.reads_mapped.load(Ordering::Relaxed),
                "write_queue_objects": d.write_queue().0,
                "write_queue_bytes": d.write_queue().1,
                "purged": c.purges.load(Ordering::Relaxed),
                "index_loaded": d.loaded(),
                "read_mode": d.read_mode().as_str(),
                "tags_loaded": d.tags_loaded(),
                "index_load_seconds": d.load_time.lock().ok().and_then(|t| t.map(|t| t.as_secs_f64())),
            })
        });
        let m = &self.node.metrics;
        let totals = m.totals_by_disposition();
        let requests: serde_json::Map<String, serde_json::Value> = totals
            .iter()
            .map(|(d, r, _)| (d.to_string(), json!(r)))
            .collect();
        let mut by_status = [0u64; 6];
        for (slot, (_, requests, _)) in by_status.iter_mut().zip(&totals) {
            *slot = *requests;
        }
        let response_bytes: serde_json::Map<String, serde_json::Value> = totals
            .iter()
            .map(|(d, _, b)| (d.to_string(), json!(b)))
            .collect();
        json!({
            "name": self.node.name,
            "pid": std::process::id(),
            "requests": requests,
            "response_bytes": response_bytes,
            // Since start, by the one definition the dashboard's windows use.
            "hit_ratio": crate::metrics::history::hit_ratio(&by_status),
            "purges_total": m.purges_total(),
            "tag_index": {
                "bytes": self.node.store.tags.bytes(),
                "limit_bytes": self.node.store.tags.limit_bytes(),
                "tags": self.node.store.tags.tag_count(),
                "refused": self.node.store.tags.refused.load(Ordering::Relaxed),
            },
            "purge_backlog": m.purge_backlog.get(),
            "purge_bus": self.node.purger.bus.as_ref().map(|_| json!({
                "connected": m.bus.connected.get() == 1,
                "lag": m.bus.lag.get(),
                "unpublished": m.bus.unpublished.get(),
                "caught_up": self.node.store.invalidations.is_caught_up(),
            })),
            "version": env!("CARGO_PKG_VERSION"),
            "draining": self.node.readiness.draining(),
            "htcp": self.node.readiness.htcp().map(|addr| json!({
                "listen": addr.to_string(),
                "listening": m.htcp_listening.get() == 1,
            })),
            "config": {
                "reloads_applied": m.reloads_applied.get(),
                "reloads_rejected": m.reloads_rejected.get(),
            },
            "tiers": {
                "memory": {
                    "objects": mem.object_count(),
                    "bytes": mem.resident_bytes(),
                    "capacity_bytes": mem.capacity_bytes(),
                    "hits": c.hits.load(Ordering::Relaxed),
                    "misses": c.misses.load(Ordering::Relaxed),
                    "stores": c.stores.load(Ordering::Relaxed),
                    "purged": c.purges.load(Ordering::Relaxed),
                },
                "disk": disk,
            },
            // Bodies of misses being stored, not yet in a tier (`[cache] fill_memory`).
            "fills": {
                "bytes": self.node.store.fills.held(),
                "capacity_bytes": self.node.store.fills.limit(),
            },
            "origins": origins,
        })
    }
}

impl Admin {
    /// The 403 for a request that changes state (`doing`: what it would do) and that a web
    /// page could have made a browser send ([`not_cross_site`]) or that comes from outside the
    /// purge networks or without the purge token; `None` when it may go on.
    fn refused(&self, session: &ServerSession, doing: &str) -> Option<Response<Vec<u8>>> {
        let req = session.req_header();
        if let Err(why) = not_cross_site(req, session.server_addr()) {
            return Some(reply(
                403,
                "text/plain",
                format!("skua: {why}\n").into_bytes(),
            ));
        }
        let ip = session.client_addr().and_then(crate::purge::peer_ip);
        if !self.node.purge_auth.load().allows(ip, req) {
            let body = format!("skua: {doing} is not allowed from here\n");
            return Some(reply(403, "text/plain", body.into_bytes()));
        }
        None
    }

    /// `POST /drain` takes this node out of its load balancer's rotation without stopping
    /// it: `/readyz` and the proxy port's health path answer 503 `draining`, every request is
    /// still answered, and each answer asks its client to close the connection (HTTP/1.1:
    /// `Connection: close`; HTTP/2: GOAWAY after it), so
    /// clients move to other nodes as their load balancer notices. `DELETE /drain` ends it.
    /// Guarded as `/purge` is (a form on another site cannot send it; purge networks and
    /// token), since it turns a node's traffic away.
    async fn drain(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let on = match session.req_header().method {
            http::Method::POST => true,
            http::Method::DELETE => false,
            _ => return reply(405, "text/plain", b"use POST or DELETE\n".to_vec()),
        };
        if let Some(refused) = self.refused(session, "draining") {
            return refused;
        }
        self.node.readiness.set_draining(on);
        tracing::warn!(
            draining = on,
            "an operator {} draining",
            if on { "started" } else { "ended" }
        );
        let state: &[u8] = if on { b"draining\n" } else { b"not draining\n" };
        reply(200, "text/plain", state.to_vec())
    }

    /// `POST /purge?url=<absolute URL>[&url=…]`, or with `Surrogate-Key:` naming tags; the
    /// same headers as HTTP PURGE (`Skua-Soft-Purge`, `Skua-Purge-Prefix`) and the same rules
    /// (purge networks, bearer token). Answers JSON with how many objects were affected.
    async fn purge(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let m = &self.node.metrics;
        let req = session.req_header().clone();
        if req.method != http::Method::POST {
            return reply(405, "text/plain", b"use POST\n".to_vec());
        }
        if let Some(refused) = self.refused(session, "purging") {
            purge::count(m, Source::Admin, PurgeResult::Denied);
            return refused;
        }
        // Every target is read before any is applied: a request with one bad URL purges
        // nothing.
        let mut scopes = Vec::new();
        scopes.extend(purge::http::tag_scope(&req));
        let query = req.uri.query().unwrap_or("");
        for value in query.split('&').filter_map(|kv| kv.strip_prefix("url=")) {
            let decoded = percent_decode(value);
            let Ok(url) =
                CacheUrl::parse_absolute(&decoded).map(|u| self.node.canonical.load().canonical(u))
            else {
                purge::count(m, Source::Admin, PurgeResult::Invalid);
                return reply(
                    400,
                    "text/plain",
                    format!("skua: not an absolute URL: {decoded}\n").into_bytes(),
                );
            };
            scopes.push(if purge::http::is_prefix_ban(&req) {
                Scope::Prefix(url)
            } else {
                Scope::Url(url)
            });
        }
        if scopes.is_empty() {
            return reply(
                400,
                "text/plain",
                b"skua: name ?url=... or Surrogate-Key: ...\n".to_vec(),
            );
        }
        let mode = purge::http::mode(&req);
        let mut affected = 0;
        for scope in scopes {
            let purge = Purge::new(scope, mode, Source::Admin);
            affected += self.node.purger.apply(&purge).await;
        }
        purge::count(m, Source::Admin, PurgeResult::applied(affected));
        let body = serde_json::to_vec(&json!({ "affected": affected })).unwrap_or_default();
        reply(
            if affected > 0 { 200 } else { 404 },
            "application/json",
            body,
        )
    }
}

/// The header an admin purge carries to show it is not a form some web page made a browser
/// send: a page can make a browser send a plain form `POST` anywhere without asking, but not
/// one with a header of its own, which needs a CORS preflight the admin port never approves.
pub const PURGE_REQUEST_HEADER: &str = "skua-purge";

/// Refuses a purge a web page could have made a browser send (cross-site request forgery,
/// RFC 6454 §7.3 for `Origin`): it must carry `Skua-Purge: 1` or a bearer token (either
/// needs a preflight), and an `Origin`, if any, must be the admin port's own.
fn not_cross_site(
    req: &pingora::http::RequestHeader,
    server: Option<&pingora::protocols::l4::socket::SocketAddr>,
) -> Result<(), String> {
    let marked = req
        .headers
        .get(PURGE_REQUEST_HEADER)
        .is_some_and(|v| v.as_bytes() == b"1")
        || req.headers.contains_key(http::header::AUTHORIZATION);
    if !marked {
        return Err(format!(
            "an admin purge or drain needs the header `{}: 1` (or a bearer token), which a web page cannot make a browser send",
            "Skua-Purge"
        ));
    }
    if let Some(origin) = req.headers.get(http::header::ORIGIN) {
        let own = server
            .and_then(|a| a.as_inet())
            .map(|a| format!("http://{a}"));
        if own.as_deref().map(str::as_bytes) != Some(origin.as_bytes()) {
            return Err("a purge or drain from another site's page is refused".into());
        }
    }
    Ok(())
}

/// `%XX` decoding for query values (`+` is a space in forms; URLs here rarely have either).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn reply(status: u16, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("content-length", body.len())
        .header("cache-control", "no-store")
        .body(body)
        .unwrap_or_else(|_| Response::new(Vec::new()))
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        // RFC 9112 §9.3: an HTTP/1.0 request keeps its connection open only when it asks to
        // with `Connection: keep-alive`. pingora's app loop sets every session kept alive
        // (honouring only an explicit `close`), so an HTTP/1.0 health check that reads to the
        // end of the connection (Nagios' check_http) waited out the idle timeout and failed.
        let req = session.req_header();
        let asks_keepalive = (req.headers.get(http::header::CONNECTION))
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(',')
                    .any(|o| o.trim().eq_ignore_ascii_case("keep-alive"))
            });
        if req.version == http::Version::HTTP_10 && !asks_keepalive {
            session.set_keepalive(None);
        }
        let path = session.req_header().uri.path().to_string();
        match path.as_str() {
            "/metrics" => {
                self.refresh_gauges();
                reply(
                    200,
                    "text/plain; version=0.0.4",
                    self.node.metrics.render().into_bytes(),
                )
            }
            "/stats" => {
                let body = serde_json::to_vec_pretty(&self.stats()).unwrap_or_default();
                reply(200, "application/json", body)
            }
            // `?window=300|3600|86400` (seconds; 300 when absent or not a number).
            "/history" => {
                let query = session.req_header().uri.query().unwrap_or("");
                let window = (query.split('&'))
                    .find_map(|p| p.strip_prefix("window="))
                    .and_then(|w| w.parse::<u64>().ok())
                    .unwrap_or(300)
                    .clamp(60, 86_400);
                let series = match self.node.history.lock() {
                    Ok(history) => history.window(window),
                    Err(_) => json!({}),
                };
                reply(
                    200,
                    "application/json",
                    serde_json::to_vec(&series).unwrap_or_default(),
                )
            }
            "/top" => {
                let body = serde_json::to_vec(&self.node.metrics.top.report(10));
                reply(200, "application/json", body.unwrap_or_default())
            }
            "/purge" => self.purge(session).await,
            "/drain" => self.drain(session).await,
            "/healthz" => reply(200, "text/plain", b"ok\n".to_vec()),
            // Ready once objects on disk are servable (the index loads in the background).
            "/readyz" => match self.node.readiness.check() {
                Ok(()) => reply(200, "text/plain", b"ready\n".to_vec()),
                Err(why) => reply(503, "text/plain", format!("{why}\n").into_bytes()),
            },
            "/" => reply(
                200,
                "text/html; charset=utf-8",
                DASHBOARD.as_bytes().to_vec(),
            ),
            _ => reply(
                404,
                "text/plain",
                b"skua admin: / (dashboard), /metrics, /stats, /history, /top, /healthz, /readyz, /purge, /drain\n"
                    .to_vec(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn percent_decoding() {
        assert_eq!(
            percent_decode("http%3A%2F%2Fh%2Fwiki%2FA"),
            "http://h/wiki/A"
        );
        assert_eq!(percent_decode("plain"), "plain");
        assert_eq!(percent_decode("bad%zz%"), "bad%zz%");
        assert_eq!(percent_decode("%e2%82%ac"), "€");
        assert_eq!(percent_decode("%é1"), "%é1");
    }
}
