//! What every answered request leaves behind: one access-log line and the per-request metrics
//! (requests by cache status and status class, duration, body bytes, and for a hit the path
//! that answered it), and the dashboard's count of its URL. The front door, pingora's `logging`
//! phase and the connection (for a head it refused) all call [`ProxyState::record`], so a
//! request is counted and logged the same way whichever answered it. What only a request that
//! reached the origin has (origin latency, compression sizes) is counted in `logging` itself.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::ProxyState;
use crate::cache::fields::RequestFields;
use crate::cache::key::{CacheUrl, Scheme};
use crate::cache::status::Disposition;
use crate::metrics::access_log::Entry;
use crate::metrics::HitPath;

/// One answered request, as recorded.
pub struct Served<'a, F: RequestFields + ?Sized> {
    /// The client's address, asked for only when the access log writes it.
    pub client: &'a dyn Fn() -> Option<IpAddr>,
    pub method: &'a str,
    /// The request target as logged, made only when the access log writes it.
    pub target: &'a dyn Fn() -> Cow<'a, str>,
    pub protocol: &'static str,
    pub scheme: Scheme,
    /// The canonical URL, when the request named one: its host is logged, and it is counted
    /// for the dashboard's top URLs.
    pub url: Option<&'a CacheUrl>,
    /// The request's fields, for `Referer`, `User-Agent` and, without a URL, `Host`.
    pub headers: &'a F,
    /// The authority its target names (HTTP/2's `:authority`): without a URL, the host logged
    /// when no `Host` field names one.
    pub authority: Option<&'a str>,
    pub status: u16,
    pub body_bytes: u64,
    pub disposition: Disposition,
    /// Which code answered a hit.
    pub hit_path: Option<HitPath>,
    pub started: Instant,
    /// The origin that answered and how long its answer's head took, when one answered.
    pub origin: Option<(SocketAddr, Duration)>,
    /// The id the request went to the origin with (`[server] request_id`).
    pub request_id: Option<&'a str>,
}

impl ProxyState {
    pub fn record<F: RequestFields + ?Sized>(&self, served: &Served<'_, F>) {
        let duration = served.started.elapsed();
        if let Some(log) = &self.access_log {
            let text = |name: &'static str| {
                let value = served.headers.values(name).next();
                value
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .unwrap_or("")
            };
            let client = (served.client)()
                .map(|ip| ip.to_string())
                .unwrap_or_default();
            let target = (served.target)();
            log.log(&Entry {
                client: &client,
                method: served.method,
                target: &target,
                protocol: served.protocol,
                scheme: served.scheme.as_str(),
                // A request refused before its URL was made (a host not served, a target
                // that is no path) is logged with the host it asked for.
                host: served.url.map_or_else(
                    || {
                        Some(text("host"))
                            .filter(|h| !h.is_empty())
                            .or(served.authority)
                            .unwrap_or("")
                    },
                    |u| u.host.as_str(),
                ),
                status: served.status,
                bytes: served.body_bytes,
                referer: text("referer"),
                user_agent: text("user-agent"),
                cache_status: served.disposition.as_str(),
                duration,
                origin: served.origin,
                request_id: served.request_id,
            });
        }
        if let Some(url) = served.url {
            // Skua's own answers (purges, refusals) are not what clients read.
            if served.disposition != Disposition::IntFront {
                (self.metrics.top).observe(url, served.disposition == Disposition::Miss);
            }
        }
        if let Some(path) = served.hit_path {
            self.metrics.hit_paths[path as usize].inc();
        }
        self.metrics.observe_request(
            served.disposition,
            served.status,
            duration.as_secs_f64(),
            served.body_bytes,
        );
    }
}
