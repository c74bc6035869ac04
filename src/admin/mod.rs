//! The admin endpoint: `/` (a live dashboard), `/metrics` (Prometheus text), `/stats` (JSON),
//! `/healthz` and `/readyz`. It reads the shared state and never touches the request path's
//! hot data beyond counters.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::json;

use crate::proxy::Shared;

/// The live dashboard: one self-contained page (no external assets) polling `/stats`.
const DASHBOARD: &str = include_str!("dashboard.html");

pub struct Admin {
    shared: Arc<Shared>,
}

impl Admin {
    pub fn new(shared: Arc<Shared>) -> Admin {
        Admin { shared }
    }

    fn refresh_gauges(&self) {
        let m = &self.shared.metrics;
        let mem = &self.shared.store.memory;
        m.tier_objects
            .with_label_values(&["memory"])
            .set(mem.object_count() as i64);
        m.tier_bytes
            .with_label_values(&["memory"])
            .set(mem.resident_bytes() as i64);
        m.tier_capacity
            .with_label_values(&["memory"])
            .set(mem.capacity_bytes() as i64);
        m.tier_events
            .catch_up("memory", "hit", mem.counters.hits.load(Ordering::Relaxed));
        m.tier_events.catch_up(
            "memory",
            "miss",
            mem.counters.misses.load(Ordering::Relaxed),
        );
        if let Some(disk) = self.shared.store.disk {
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
            ] {
                m.tier_events
                    .catch_up("disk", event, value.load(Ordering::Relaxed));
            }
        }
    }

    fn stats(&self) -> serde_json::Value {
        let mem = &self.shared.store.memory;
        let c = &mem.counters;
        let origins: Vec<_> = self
            .shared
            .pools
            .iter()
            .flat_map(|p| {
                p.health().into_iter().map(move |(addr, healthy)| {
                    json!({"pool": p.name, "address": addr, "healthy": healthy})
                })
            })
            .collect();
        let disk = self.shared.store.disk.map(|d| {
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
                "purged": c.purges.load(Ordering::Relaxed),
                "index_loaded": d.loaded(),
                "tags_loaded": d.tags_loaded(),
                "index_load_seconds": d.load_time.lock().ok().and_then(|t| t.map(|t| t.as_secs_f64())),
            })
        });
        let m = &self.shared.metrics;
        let totals = m.totals_by_disposition();
        let requests: serde_json::Map<String, serde_json::Value> = totals
            .iter()
            .map(|(d, r, _)| (d.to_string(), json!(r)))
            .collect();
        let response_bytes: serde_json::Map<String, serde_json::Value> = totals
            .iter()
            .map(|(d, _, b)| (d.to_string(), json!(b)))
            .collect();
        json!({
            "name": self.shared.name,
            "requests": requests,
            "response_bytes": response_bytes,
            "purges_total": m.purges_total(),
            "purge_backlog": m.purge_backlog.get(),
            "version": env!("CARGO_PKG_VERSION"),
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
            "origins": origins,
        })
    }
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
        let path = session.req_header().uri.path().to_string();
        match path.as_str() {
            "/metrics" => {
                self.refresh_gauges();
                reply(
                    200,
                    "text/plain; version=0.0.4",
                    self.shared.metrics.render().into_bytes(),
                )
            }
            "/stats" => {
                let body = serde_json::to_vec_pretty(&self.stats()).unwrap_or_default();
                reply(200, "application/json", body)
            }
            "/healthz" => reply(200, "text/plain", b"ok\n".to_vec()),
            // Ready once objects on disk are servable (the index loads in the background).
            "/readyz" => match self.shared.store.disk {
                Some(d) if !d.loaded() => {
                    reply(503, "text/plain", b"loading the disk index\n".to_vec())
                }
                _ => reply(200, "text/plain", b"ready\n".to_vec()),
            },
            "/" => reply(
                200,
                "text/html; charset=utf-8",
                DASHBOARD.as_bytes().to_vec(),
            ),
            _ => reply(
                404,
                "text/plain",
                b"skua admin: / (dashboard), /metrics, /stats, /healthz, /readyz\n".to_vec(),
            ),
        }
    }
}
