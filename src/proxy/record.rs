//! What every answered request leaves behind: one access-log line and the per-request metrics
//! (requests by cache status and status class, duration, body bytes, and for a hit the path
//! that answered it), and the dashboard's count of its URL. The front door and pingora's
//! `logging` phase both call [`ProxyState::record`], so a request is counted and logged the
//! same way whichever answered it. What only a request that reached the origin has (origin
//! latency, compression sizes) is counted in `logging` itself.

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
                host: served.url.map_or_else(|| text("host"), |u| u.host.as_str()),
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

/// The fields of a request head read leniently, a line at a time, for the access log of a
/// head no parser took (its `Host`, `Referer` and `User-Agent`, when it has them).
struct LenientFields<'a>(Vec<(&'a [u8], &'a [u8])>);

impl<'a> LenientFields<'a> {
    fn of(lines: impl Iterator<Item = &'a [u8]>) -> LenientFields<'a> {
        let fields = lines
            .take(MAX_LENIENT_FIELDS)
            .filter_map(|line| {
                let colon = line.iter().position(|b| *b == b':')?;
                Some((line[..colon].trim_ascii(), line[colon + 1..].trim_ascii()))
            })
            .collect();
        LenientFields(fields)
    }
}

/// Lines of a refused head looked at for its fields: enough for a browser's.
const MAX_LENIENT_FIELDS: usize = 128;

impl RequestFields for LenientFields<'_> {
    fn values<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s [u8]> {
        (self.0.iter())
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| *v)
    }
}

impl ProxyState {
    /// Records a request head the connection refused before pingora read it (a malformed one:
    /// Skua's 400, or 505 for another HTTP version), as nginx logs a bad request: its request
    /// line's method and target as sent, and what its fields say of its host and client.
    pub fn record_refused_head(
        &self,
        head: &[u8],
        status: u16,
        body_bytes: u64,
        scheme: Scheme,
        client: &dyn Fn() -> Option<IpAddr>,
    ) {
        let mut lines = (head.split(|b| *b == b'\n'))
            .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
            .take_while(|line| !line.is_empty());
        let request_line = lines.next().unwrap_or_default();
        let mut words = request_line.split(|b| *b == b' ').filter(|w| !w.is_empty());
        let method = String::from_utf8_lossy(words.next().unwrap_or(b"-"));
        let target = String::from_utf8_lossy(words.next().unwrap_or(b"-"));
        let protocol = match words.next() {
            Some(b"HTTP/1.0") => "HTTP/1.0",
            Some(b"HTTP/1.1") => "HTTP/1.1",
            _ => "-",
        };
        let fields = LenientFields::of(lines);
        self.record(&Served {
            client,
            method: &method,
            target: &|| target.clone(),
            protocol,
            scheme,
            url: None,
            headers: &fields,
            status,
            body_bytes,
            disposition: Disposition::IntFront,
            hit_path: None,
            started: Instant::now(),
            origin: None,
            request_id: None,
        });
    }
}
