//! Storage policy: may a response be stored, for how long, and how long may it be served
//! stale. Implements RFC 9111 §3 (storing), §4.2 (freshness) and RFC 9213 (`CDN-Cache-Control`)
//! over the directives `directives.rs` reads. It does not decide whether a *request* may use the
//! cache; that is the proxy's bypass logic.

use std::time::{Duration, SystemTime};

use http::header;
use pingora::http::ResponseHeader;

use super::directives::Directives;
use super::meta::AgeWhenHeard;
use crate::config::CacheConfig;

/// Why a response was not stored. A closed vocabulary: used in logs and metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Uncacheable {
    NoStore,
    Private,
    SetCookie,
    VaryStar,
    Status,
    NoFreshness,
    Authorization,
    /// The request said `no-store` (RFC 9111 §5.2.1.5).
    RequestNoStore,
    /// Storable, but fills in progress held all of `[cache] fill_memory` (`fills`).
    FillMemory,
}

impl Uncacheable {
    pub fn as_str(self) -> &'static str {
        match self {
            Uncacheable::NoStore => "no-store",
            Uncacheable::Private => "private",
            Uncacheable::SetCookie => "set-cookie",
            Uncacheable::VaryStar => "vary-star",
            Uncacheable::Status => "status",
            Uncacheable::NoFreshness => "no-freshness",
            Uncacheable::Authorization => "authorization",
            Uncacheable::RequestNoStore => "request-no-store",
            Uncacheable::FillMemory => "fill-memory",
        }
    }
}

/// How long a stored response is fresh and how long past that it may be served stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Freshness {
    /// When the response was generated, by our clock: now minus the origin's `Age`.
    pub created: SystemTime,
    /// The `Age` it came with: `created` plus this is when this node heard it.
    pub age_when_heard: AgeWhenHeard,
    pub fresh_until: SystemTime,
    pub stale_while_revalidate_sec: u32,
    pub stale_if_error_sec: u32,
    /// What set the lifetime (for the `Skua-Debug` explanation).
    pub from: LifetimeFrom,
    /// The cap that cut the lifetime, if one did.
    pub capped: Option<LifetimeCap>,
    /// What `[cache] ttl_jitter` took off the lifetime.
    pub jitter: Duration,
}

/// What a stored response's freshness lifetime came from (RFC 9111 §4.2.1, in its order of
/// precedence), as a closed vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LifetimeFrom {
    /// A `[[rule]]`'s `ttl`, in place of the response's fields.
    Rule,
    /// `no-cache`: stored, checked before every reuse (§5.2.2.4).
    NoCache,
    SMaxAge,
    MaxAge,
    Expires,
    /// A fraction of the time since `Last-Modified` (§4.2.2).
    Heuristic,
}

/// Which `[cache]` cap cut a stored response's lifetime (for the `Skua-Debug` explanation),
/// named by its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LifetimeCap {
    TtlCap,
    /// A 404's, when shorter than `ttl_cap`.
    TtlCap404,
}

impl LifetimeCap {
    pub fn as_str(self) -> &'static str {
        match self {
            LifetimeCap::TtlCap => "ttl_cap",
            LifetimeCap::TtlCap404 => "ttl_cap_404",
        }
    }
}

impl LifetimeFrom {
    pub fn as_str(self) -> &'static str {
        match self {
            LifetimeFrom::Rule => "rule",
            LifetimeFrom::NoCache => "no-cache",
            LifetimeFrom::SMaxAge => "s-maxage",
            LifetimeFrom::MaxAge => "max-age",
            LifetimeFrom::Expires => "expires",
            LifetimeFrom::Heuristic => "heuristic",
        }
    }
}

/// The parts of [`CacheConfig`] that decide storage, copied so the hot path holds no lock.
#[derive(Debug, Clone)]
pub struct StoragePolicy {
    pub ttl_cap: Duration,
    pub ttl_cap_404: Duration,
    pub ttl_jitter: f64,
    pub default_grace: Duration,
    pub stale_if_error: Duration,
    pub store_server_errors: bool,
    pub honor_must_revalidate: bool,
    pub heuristic_freshness: bool,
    pub heuristic_max: Duration,
}

impl From<&CacheConfig> for StoragePolicy {
    fn from(c: &CacheConfig) -> Self {
        StoragePolicy {
            ttl_cap: c.ttl_cap,
            ttl_cap_404: c.ttl_cap_404,
            ttl_jitter: c.ttl_jitter,
            default_grace: c.default_grace,
            stale_if_error: c.stale_if_error,
            store_server_errors: c.store_server_errors,
            honor_must_revalidate: c.honor_must_revalidate,
            heuristic_freshness: c.heuristic_freshness,
            heuristic_max: c.heuristic_max,
        }
    }
}

/// RFC 9110 §15.1: "Responses with status codes that are defined as heuristically cacheable
/// (e.g., 200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, and 501 in this
/// specification) can be reused by a cache with heuristic expiration". 206 is left out because
/// the cache stores whole objects only.
fn heuristically_cacheable(status: u16) -> bool {
    matches!(
        status,
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// RFC 9111 §3: any final status may be stored when the response says how long it is fresh
/// (or is `public`); which ones get a heuristic lifetime is [`heuristically_cacheable`]. Not
/// stored: 206 (only whole objects are kept), 304 (it updates a stored response; §4.3.4), 101
/// and 1xx (not final), and 5xx when `[cache] store_server_errors` is off. Skua's own answers
/// to an origin failure (502, 504) never reach storage.
fn storable_status(status: u16, store_server_errors: bool) -> bool {
    (200..600).contains(&status)
        && !matches!(status, 206 | 304)
        && (store_server_errors || status < 500)
}

/// Lifetimes shorter than this are kept as they are: cutting a few seconds spreads nothing.
const JITTER_FROM: Duration = Duration::from_secs(60);

/// `lifetime` cut by a fraction below `jitter`, drawn from the sub-second part of `now` (the
/// instant the request went to the origin): responses stored in the same second get cuts
/// spread over the whole range, without a random source to share between threads. A cache
/// may always treat a response as stale earlier than its origin allows (RFC 9111 §4.2.1
/// bounds how long it may reuse one, not how soon it must revalidate).
fn jittered(lifetime: Duration, jitter: f64, now: SystemTime) -> Duration {
    if jitter <= 0.0 || lifetime < JITTER_FROM {
        return lifetime;
    }
    let nanos = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    // Fibonacci hashing spreads neighbouring instants over the whole range.
    let draw =
        (u64::from(nanos).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as f64 / (1u64 << 53) as f64;
    lifetime.mul_f64(1.0 - jitter * draw)
}

/// RFC 9111 §1.2.2: a delta-seconds value too large to represent is taken as 2^31.
const DELTA_SECONDS_OVERFLOW: u64 = 1 << 31;

/// RFC 9111 §3.1: "the Connection header field and fields whose names are listed in it are
/// required by Section 7.6.1 of [HTTP] to be removed before forwarding the message. This MAY
/// be implemented by doing so before storage." Done here, so that every tier stores (and every
/// hit serves) the same fields; regression: a disk hit served the origin's `Keep-Alive`.
pub fn strip_hop_by_hop(resp: &mut ResponseHeader) {
    for name in connection_nominated(&resp.headers) {
        resp.remove_header(&name);
    }
    // One look at the response's few fields; removals (two maps each) only when one is there.
    while let Some(name) = resp
        .headers
        .keys()
        .find(|k| HOP_BY_HOP.contains(k))
        .cloned()
    {
        resp.remove_header(&name);
    }
}

/// The hop-by-hop fields of RFC 9110 §7.6.1 (and the obsolete `Proxy-Connection`).
const HOP_BY_HOP: [header::HeaderName; 6] = [
    header::CONNECTION,
    header::HeaderName::from_static("keep-alive"),
    header::HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

/// RFC 9213's targeted field, as a name built once (a lookup by `&str` parses it first).
pub const CDN_CACHE_CONTROL: http::HeaderName = http::HeaderName::from_static("cdn-cache-control");

/// Whether `CDN-Cache-Control` holds a valid Structured Field dictionary (RFC 9213 §2.1, RFC
/// 8941 §4.2) whose lifetimes are non-negative Integers: "If a targeted field in a given
/// response is empty, or a parsing error is encountered, that field SHOULD be ignored by the
/// cache". Regression: `max-age=10000, &&&&&` and `max-age="10000"` were used as lifetimes.
fn targeted_field_is_valid(headers: &http::HeaderMap) -> bool {
    let mut joined = Vec::new();
    for (i, line) in headers.get_all(&CDN_CACHE_CONTROL).iter().enumerate() {
        if i > 0 {
            joined.extend_from_slice(b", ");
        }
        joined.extend_from_slice(line.as_bytes());
    }
    if joined.trim_ascii().is_empty() {
        return false;
    }
    let Ok(dictionary) = sfv::Parser::parse_dictionary(&joined) else {
        return false;
    };
    const LIFETIMES: [&str; 4] = [
        "max-age",
        "s-maxage",
        "stale-while-revalidate",
        "stale-if-error",
    ];
    dictionary.iter().all(|(name, entry)| {
        !LIFETIMES.contains(&name.as_str())
            || matches!(
                entry,
                sfv::ListEntry::Item(sfv::Item {
                    bare_item: sfv::BareItem::Integer(n),
                    ..
                }) if *n >= 0
            )
    })
}

/// The `Age` a response arrived with (RFC 9111 §5.1): delta-seconds; of a list (several
/// caches appended theirs, or repeated lines), the first member; an invalid value is ignored
/// (regression: `Age: 7200, 0` was read as 0, and a two-hour-old response served as fresh).
fn age(headers: &http::HeaderMap) -> u64 {
    headers
        .get(header::AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(str::trim)
        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
        .map_or(0, |v| v.parse::<u64>().unwrap_or(DELTA_SECONDS_OVERFLOW))
        .min(DELTA_SECONDS_OVERFLOW)
}

/// The earliest instant a response may speak for the resource, to compare with purges: when
/// its request was sent, less the `Age` it arrived with (allowing for whole seconds, below).
pub fn vouched_at(sent: SystemTime, headers: &http::HeaderMap) -> SystemTime {
    let born = sent
        .checked_sub(Duration::from_secs(age(headers)))
        .unwrap_or(SystemTime::UNIX_EPOCH);
    allowing_for_whole_seconds(born, headers)
}

/// `at`, derived from a response's `Age`, a second earlier when it has one: `Age` counts
/// whole seconds (RFC 9111 §5.1), so a copy another cache sent with `Age: 0` may be most of a
/// second older than the request for it. A purge since the earlier instant may have been meant
/// for it.
pub fn allowing_for_whole_seconds(at: SystemTime, headers: &http::HeaderMap) -> SystemTime {
    if !headers.contains_key(header::AGE) {
        return at;
    }
    at.checked_sub(Duration::from_secs(1))
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// Updates a stored header with the fields of the 304 that validated it (RFC 9111 §4.3.4:
/// "the cache MUST ... use other header fields provided in the 304 (Not Modified) response to
/// replace all instances of the corresponding header fields in the stored response"; §3.2
/// excepts `Content-Length`, fields excluded from storage and fields processed by the
/// recipient). Regression: only `Cache-Control`, `Expires` and `ETag` were taken.
pub fn update_from_304(stored: &mut ResponseHeader, not_modified: &http::HeaderMap) {
    let nominated = connection_nominated(not_modified);
    let excepted = |name: &http::HeaderName| {
        nominated.contains(name)
            || [
                header::CONTENT_LENGTH,
                header::TRANSFER_ENCODING,
                header::CONNECTION,
                header::TE,
                header::TRAILER,
                header::UPGRADE,
                header::AGE,
                header::CONTENT_ENCODING,
                header::CONTENT_RANGE,
            ]
            .contains(name)
            || matches!(
                name.as_str(),
                "keep-alive" | "proxy-connection" | "x-cache-status" | "cache-status"
            )
    };
    for name in not_modified.keys() {
        if excepted(name) {
            continue;
        }
        stored.remove_header(name);
        for value in not_modified.get_all(name) {
            let _ = stored.append_header(name.clone(), value.clone());
        }
    }
}

/// The fields a message's `Connection` header names (RFC 9110 §7.6.1: "a proxy or gateway MUST
/// parse a received Connection header field before a message is forwarded and, for each
/// connection-option in this field, remove any header or trailer field(s) from the message with
/// the same name"). The framing fields are left to the HTTP layer, which rewrites them.
pub fn connection_nominated(headers: &http::HeaderMap) -> Vec<http::HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| http::HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .filter(|name| {
            ![
                header::TRANSFER_ENCODING,
                header::CONTENT_LENGTH,
                header::UPGRADE,
                header::CONNECTION,
            ]
            .contains(name)
        })
        .collect()
}

impl StoragePolicy {
    /// Decides whether `resp` may be stored, at `now`. Strips headers named by
    /// `private="…"`/`no-cache="…"` from `resp` when it is stored. `ttl_rule`: a `[[rule]]`'s
    /// lifetime and grace, which replace what the response's fields say once it is known to
    /// be storable at all (a rule never stores what `no-store`, `private`, `Set-Cookie` or
    /// the status forbid).
    pub fn decide(
        &self,
        resp: &mut ResponseHeader,
        authorization_present: bool,
        now: SystemTime,
        ttl_rule: Option<(Duration, Option<Duration>)>,
    ) -> Result<Freshness, Uncacheable> {
        let status = resp.status.as_u16();
        if !storable_status(status, self.store_server_errors) {
            return Err(Uncacheable::Status);
        }
        // RFC 9110 §6.6.1: "A recipient with a clock that receives a response message without
        // a Date header field MUST record the time it was received and append a corresponding
        // Date header field to the message's header section if it is cached or forwarded
        // downstream." Regression: a hit of such a response went out without one.
        if !resp.headers.contains_key(header::DATE) {
            let _ = resp.insert_header(header::DATE, httpdate::fmt_http_date(now));
        }
        // A cookie set for one reader must never be handed to another.
        if resp.headers.contains_key(header::SET_COOKIE) {
            return Err(Uncacheable::SetCookie);
        }
        // RFC 9111 §4.1: "A stored response with a Vary header field value containing a member
        // "*" always fails to match."
        if vary_names(resp).any(|n| n == "*") {
            return Err(Uncacheable::VaryStar);
        }
        // RFC 9213 §2.1: a cache that uses a targeted field ignores Cache-Control. The field is
        // a Structured Field dictionary; one that does not parse as such is ignored whole.
        let targeted = if targeted_field_is_valid(&resp.headers) {
            Directives::of(resp, &CDN_CACHE_CONTROL)
        } else {
            None
        };
        let is_targeted = targeted.is_some();
        let cc = targeted.or_else(|| Directives::of(resp, &header::CACHE_CONTROL));
        if let Some(cc) = &cc {
            if cc.no_store() {
                return Err(Uncacheable::NoStore);
            }
            if cc.private() {
                return Err(Uncacheable::Private);
            }
        }
        // RFC 9111 §3.5: a shared cache stores a response to a request with Authorization
        // only if it carries must-revalidate, public or s-maxage.
        if authorization_present {
            let allowed = cc
                .as_ref()
                .is_some_and(|cc| cc.public() || cc.must_revalidate() || cc.s_maxage().is_some());
            if !allowed {
                return Err(Uncacheable::Authorization);
            }
        }

        if let Some((ttl, grace)) = ttl_rule {
            for name in cc.map(|cc| cc.listed_fields()).unwrap_or_default() {
                resp.remove_header(&name);
            }
            strip_hop_by_hop(resp);
            // A deliberate deviation from RFC 9111 §4.2.1 the operator asked for: the
            // lifetime counts from now, whatever `Age` the origin sent.
            let grace = grace.map_or_else(|| secs_u32(self.default_grace), secs_u32);
            return Ok(Freshness {
                created: now,
                age_when_heard: AgeWhenHeard::NONE,
                fresh_until: now.checked_add(ttl).unwrap_or(now),
                stale_while_revalidate_sec: grace,
                stale_if_error_sec: grace.max(secs_u32(self.stale_if_error)),
                from: LifetimeFrom::Rule,
                capped: None,
                jitter: Duration::ZERO,
            });
        }
        // RFC 9111 §4.2.3: the response was already `Age` seconds old when it arrived.
        let origin_age = age(&resp.headers);
        let created = now
            .checked_sub(Duration::from_secs(origin_age))
            .unwrap_or(now);

        let no_cache = cc.as_ref().is_some_and(|cc| cc.no_cache());
        let s_maxage = cc.as_ref().and_then(Directives::s_maxage);
        let seconds = |s: u32| Duration::from_secs(s.into());
        let explicit = if no_cache {
            // RFC 9111 §5.2.2.4: no-cache: store, but validate before every reuse.
            Some((Duration::ZERO, LifetimeFrom::NoCache))
        } else {
            (s_maxage.map(|s| (seconds(s), LifetimeFrom::SMaxAge)))
                .or_else(|| {
                    let max_age = cc.as_ref().and_then(Directives::max_age);
                    max_age.map(|s| (seconds(s), LifetimeFrom::MaxAge))
                })
                .or_else(|| {
                    if is_targeted {
                        None
                    } else {
                        expires_lifetime(resp, now).map(|l| (l, LifetimeFrom::Expires))
                    }
                })
        };
        let (lifetime, from) = match explicit {
            Some(explicit) => explicit,
            None => match self.heuristic_lifetime(resp, cc.as_ref(), now) {
                Some(l) => (l, LifetimeFrom::Heuristic),
                None => return Err(Uncacheable::NoFreshness),
            },
        };
        let (cap, which) = if status == 404 && self.ttl_cap_404 < self.ttl_cap {
            (self.ttl_cap_404, LifetimeCap::TtlCap404)
        } else {
            (self.ttl_cap, LifetimeCap::TtlCap)
        };
        let capped = (lifetime > cap).then_some(which);
        let before_jitter = lifetime.min(cap);
        let lifetime = jittered(before_jitter, self.ttl_jitter, now);
        let jitter = before_jitter.saturating_sub(lifetime);
        let explicit = explicit.map(|(l, _)| l);
        let fresh_until = if lifetime.is_zero() {
            // pingora compares `fresh_until >= now`; one second back makes it stale at once.
            created
                .checked_sub(Duration::from_secs(1))
                .unwrap_or(created)
        } else {
            created.checked_add(lifetime).unwrap_or(created)
        };

        // RFC 9111 §4.2.4: "A cache MUST NOT generate a stale response if it is prohibited by an
        // explicit in-protocol directive (e.g., by a no-cache response directive, a
        // must-revalidate response directive, or an applicable s-maxage or proxy-revalidate
        // response directive)". Explicit stale-* directives (RFC 5861) are the origin's own
        // permission and are honoured as given.
        // An explicit lifetime of zero (`max-age=0`, `s-maxage=0`, an `Expires` not after
        // `Date`) asks for a check on every reuse: the configured grace does not override it,
        // though a `stale-while-revalidate` the origin sends with it is its own permission.
        let forbids_stale = no_cache
            || explicit == Some(Duration::ZERO)
            || (self.honor_must_revalidate
                && cc.as_ref().is_some_and(|cc| {
                    cc.must_revalidate() || cc.proxy_revalidate() || s_maxage.is_some()
                }));
        let grace = if forbids_stale {
            0
        } else {
            secs_u32(self.default_grace)
        };
        let swr = cc
            .as_ref()
            .and_then(Directives::stale_while_revalidate)
            .unwrap_or(grace);
        // On origin failure, `[cache] stale_if_error` (or the grace, if longer) where the
        // response allows stale use at all.
        let on_error = if forbids_stale {
            0
        } else {
            grace.max(secs_u32(self.stale_if_error))
        };
        let sie = cc
            .as_ref()
            .and_then(Directives::stale_if_error)
            .unwrap_or(on_error);

        for name in cc.map(|cc| cc.listed_fields()).unwrap_or_default() {
            resp.remove_header(&name);
        }
        strip_hop_by_hop(resp);
        Ok(Freshness {
            created,
            age_when_heard: AgeWhenHeard::of(Duration::from_secs(origin_age)),
            fresh_until,
            stale_while_revalidate_sec: swr,
            stale_if_error_sec: sie,
            from,
            capped,
            jitter,
        })
    }

    /// RFC 9111 §4.2.2: "a typical setting of this fraction might be 10%" of the time since
    /// Last-Modified.
    /// §4.2.2: only for a heuristically cacheable status, or a response "marked explicitly
    /// cacheable (e.g., with a public response directive)".
    fn heuristic_lifetime(
        &self,
        resp: &ResponseHeader,
        cc: Option<&Directives<'_>>,
        now: SystemTime,
    ) -> Option<Duration> {
        let public = cc.is_some_and(|cc| cc.public());
        if !self.heuristic_freshness || !(heuristically_cacheable(resp.status.as_u16()) || public) {
            return None;
        }
        let last_modified = http_date(resp, header::LAST_MODIFIED)?;
        let date = http_date(resp, header::DATE).unwrap_or(now);
        let since = date.duration_since(last_modified).ok()?;
        Some((since / 10).min(self.heuristic_max))
    }
}

/// RFC 9111 §4.2.1: freshness lifetime from Expires minus Date. An invalid Expires (such as
/// "0") means already expired (§5.3).
fn expires_lifetime(resp: &ResponseHeader, now: SystemTime) -> Option<Duration> {
    let raw = resp.headers.get(header::EXPIRES)?;
    let expires = match raw.to_str().ok().and_then(super::date::parse) {
        Some(t) => t,
        None => return Some(Duration::ZERO),
    };
    let date = http_date(resp, header::DATE).unwrap_or(now);
    Some(expires.duration_since(date).unwrap_or(Duration::ZERO))
}

fn http_date(resp: &ResponseHeader, name: header::HeaderName) -> Option<SystemTime> {
    super::date::parse(resp.headers.get(name)?.to_str().ok()?)
}

fn secs_u32(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

/// Lowercased field names listed in the response's `Vary` headers.
pub fn vary_names(resp: &ResponseHeader) -> impl Iterator<Item = String> + '_ {
    resp.headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_through_a_cache_vouches_from_up_to_a_second_before_its_age() {
        let sent = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let with = |age: Option<&str>| {
            let mut h = http::HeaderMap::new();
            if let Some(a) = age {
                h.insert(header::AGE, a.parse().unwrap());
            }
            sent.duration_since(vouched_at(sent, &h)).unwrap().as_secs()
        };
        assert_eq!(with(None), 0, "from the origin: when it was asked");
        assert_eq!(with(Some("0")), 1);
        assert_eq!(with(Some("30")), 31);
        assert_eq!(
            with(Some("x")),
            1,
            "an invalid Age still says a cache sent it"
        );
    }

    fn policy() -> StoragePolicy {
        StoragePolicy {
            ttl_cap: Duration::from_secs(86400),
            ttl_cap_404: Duration::from_secs(600),
            ttl_jitter: 0.0,
            default_grace: Duration::from_secs(60),
            stale_if_error: Duration::from_secs(300),
            store_server_errors: true,
            honor_must_revalidate: true,
            heuristic_freshness: true,
            heuristic_max: Duration::from_secs(86400),
        }
    }

    fn resp(status: u16, headers: &[(&str, &str)]) -> ResponseHeader {
        let mut r = ResponseHeader::build(status, None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    #[test]
    fn hop_by_hop_fields_and_those_connection_lists_are_not_stored() {
        let mut r = resp(
            200,
            &[
                ("cache-control", "max-age=60"),
                ("connection", "keep-alive, X-Origin-Secret"),
                ("keep-alive", "timeout=5"),
                ("x-origin-secret", "1"),
                ("x-wiki", "yes"),
            ],
        );
        policy()
            .decide(&mut r, false, SystemTime::now(), None)
            .unwrap();
        let names: Vec<&str> = r.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["cache-control", "x-wiki", "date"]);
    }

    fn ttl(f: &Freshness) -> u64 {
        f.fresh_until
            .duration_since(f.created)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }

    #[test]
    fn s_maxage_wins_over_max_age() {
        let now = SystemTime::now();
        let mut r = resp(
            200,
            &[("cache-control", "s-maxage=300, must-revalidate, max-age=0")],
        );
        let f = policy().decide(&mut r, false, now, None).unwrap();
        assert_eq!(ttl(&f), 300);
        // must-revalidate and s-maxage forbid the default grace.
        assert_eq!(f.stale_if_error_sec, 0);
    }

    #[test]
    fn a_cdn_cache_control_that_is_no_structured_dictionary_is_ignored_whole() {
        for bad in [
            "max-age=10000, &&&&&",
            "max-age=\"10000\"",
            "max-age=-5",
            "",
        ] {
            let mut r = resp(
                200,
                &[("cache-control", "max-age=30"), ("cdn-cache-control", bad)],
            );
            let f = policy()
                .decide(&mut r, false, SystemTime::now(), None)
                .unwrap();
            assert_eq!(ttl(&f), 30, "{bad:?}: Cache-Control should rule");
        }
        let mut r = resp(
            200,
            &[
                ("cache-control", "max-age=30"),
                ("cdn-cache-control", "max-age=50, public"),
            ],
        );
        assert_eq!(
            ttl(&policy()
                .decide(&mut r, false, SystemTime::now(), None)
                .unwrap()),
            50
        );
    }

    #[test]
    fn cdn_cache_control_overrides_cache_control() {
        let mut r = resp(
            200,
            &[
                ("cache-control", "no-store"),
                ("cdn-cache-control", "max-age=50"),
            ],
        );
        let f = policy()
            .decide(&mut r, false, SystemTime::now(), None)
            .unwrap();
        assert_eq!(ttl(&f), 50);
    }

    #[test]
    fn refusals() {
        let p = policy();
        let now = SystemTime::now();
        type Case<'a> = (u16, &'a [(&'a str, &'a str)], Uncacheable);
        let cases: &[Case<'_>] = &[
            (
                200,
                &[("cache-control", "no-store, max-age=60")],
                Uncacheable::NoStore,
            ),
            (
                200,
                &[("cache-control", "private, max-age=60")],
                Uncacheable::Private,
            ),
            (
                200,
                &[("cache-control", "max-age=60"), ("set-cookie", "a=b")],
                Uncacheable::SetCookie,
            ),
            (
                200,
                &[("cache-control", "max-age=60"), ("vary", "Accept, *")],
                Uncacheable::VaryStar,
            ),
            (206, &[("cache-control", "max-age=60")], Uncacheable::Status),
            (503, &[], Uncacheable::NoFreshness),
            (200, &[], Uncacheable::NoFreshness),
        ];
        for (status, headers, want) in cases {
            let mut r = resp(*status, headers);
            assert_eq!(
                p.decide(&mut r, false, now, None),
                Err(*want),
                "{headers:?}"
            );
        }
        let mut r = resp(200, &[("cache-control", "max-age=60")]);
        assert_eq!(
            p.decide(&mut r, true, now, None),
            Err(Uncacheable::Authorization)
        );
        let no_errors = StoragePolicy {
            store_server_errors: false,
            ..policy()
        };
        let mut r = resp(503, &[("cache-control", "max-age=60")]);
        assert_eq!(
            no_errors.decide(&mut r, false, now, None),
            Err(Uncacheable::Status)
        );
    }

    #[test]
    fn any_final_status_with_explicit_freshness_is_stored() {
        let now = SystemTime::now();
        for status in [299, 303, 400, 499, 500, 599] {
            let mut r = resp(status, &[("cache-control", "max-age=3600")]);
            let f = policy().decide(&mut r, false, now, None);
            assert_eq!(f.map(|f| ttl(&f)), Ok(3600), "{status}");
        }
        // No heuristic lifetime for a status that is not heuristically cacheable...
        let lm = httpdate::fmt_http_date(now - Duration::from_secs(10_000));
        let mut r = resp(302, &[("last-modified", lm.as_str())]);
        assert_eq!(
            policy().decide(&mut r, false, now, None),
            Err(Uncacheable::NoFreshness)
        );
        // ...unless the response is marked public (RFC 9111 §4.2.2).
        let mut r = resp(
            302,
            &[("last-modified", lm.as_str()), ("cache-control", "public")],
        );
        assert_eq!(
            policy().decide(&mut r, false, now, None).map(|f| ttl(&f)),
            Ok(1000)
        );
    }

    #[test]
    fn ttl_cap_and_age() {
        let now = SystemTime::now();
        let mut r = resp(
            200,
            &[("cache-control", "max-age=999999999"), ("age", "100")],
        );
        let f = policy().decide(&mut r, false, now, None).unwrap();
        assert_eq!(ttl(&f), 86400);
        assert_eq!(now.duration_since(f.created).unwrap().as_secs(), 100);
        // Explicit stale directives are honoured; the default grace applies otherwise.
        assert_eq!(f.stale_while_revalidate_sec, 60);
        let mut r = resp(
            200,
            &[("cache-control", "max-age=5, stale-while-revalidate=7")],
        );
        assert_eq!(
            policy()
                .decide(&mut r, false, now, None)
                .unwrap()
                .stale_while_revalidate_sec,
            7
        );
    }

    #[test]
    fn a_404_stays_fresh_no_longer_than_ttl_cap_404() {
        let now = SystemTime::now();
        let cc = [(
            "cache-control",
            "s-maxage=1209600, must-revalidate, max-age=0",
        )];
        let missing = policy()
            .decide(&mut resp(404, &cc), false, now, None)
            .unwrap();
        assert_eq!(
            (ttl(&missing), missing.capped),
            (600, Some(LifetimeCap::TtlCap404))
        );
        let page = policy()
            .decide(&mut resp(200, &cc), false, now, None)
            .unwrap();
        assert_eq!(ttl(&page), 86400);
        let short = [("cache-control", "max-age=30")];
        let missing = policy().decide(&mut resp(404, &short), false, now, None);
        assert_eq!(missing.map(|f| (ttl(&f), f.capped)), Ok((30, None)));
    }

    #[test]
    fn lifetimes_of_a_minute_or_more_are_cut_by_up_to_ttl_jitter() {
        let mut jittery = policy();
        jittery.ttl_jitter = 0.05;
        let cc = [("cache-control", "max-age=86400")];
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let ttls: Vec<u64> = (0..1000u64)
            .map(|i| {
                let now = start + Duration::from_nanos(i * 999_983);
                ttl(&jittery
                    .decide(&mut resp(200, &cc), false, now, None)
                    .unwrap())
            })
            .collect();
        assert!(ttls.iter().all(|t| (82080..=86400).contains(t)), "{ttls:?}");
        // Spread over the range: each fifth of it gets some of a thousand responses.
        for fifth in 0..5 {
            let low = 82080 + fifth * 864;
            let some = ttls
                .iter()
                .filter(|t| (low..low + 864).contains(*t))
                .count();
            assert!(some > 100, "{some} in [{low}, {})", low + 864);
        }
        let short = [("cache-control", "max-age=59")];
        let f = jittery.decide(&mut resp(200, &short), false, start, None);
        assert_eq!(f.map(|f| ttl(&f)), Ok(59), "under a minute: as given");
    }

    #[test]
    fn heuristic_from_last_modified() {
        let now = SystemTime::now();
        let lm = httpdate::fmt_http_date(now - Duration::from_secs(1000));
        let date = httpdate::fmt_http_date(now);
        let mut r = resp(200, &[("last-modified", &lm), ("date", &date)]);
        let f = policy().decide(&mut r, false, now, None).unwrap();
        assert_eq!(ttl(&f), 100);
        let mut off = policy();
        off.heuristic_freshness = false;
        let mut r = resp(200, &[("last-modified", &lm)]);
        assert_eq!(
            off.decide(&mut r, false, now, None),
            Err(Uncacheable::NoFreshness)
        );
    }

    #[test]
    fn invalid_expires_is_stale_but_stored() {
        let now = SystemTime::now();
        let mut r = resp(200, &[("expires", "0")]);
        let f = policy().decide(&mut r, false, now, None).unwrap();
        assert!(f.fresh_until < now);
    }
}

/// Whether a `Cache-Control` value lets shared caches keep the response for a while: an
/// `s-maxage` above 0 (RFC 9111 §5.2.2.10). What `[cache] downstream_cache_control` replaces
/// for clients, so that caches beyond Skua, which its purges never reach, do not keep pages.
pub fn lets_shared_caches_store(cache_control: &[u8]) -> bool {
    cache_control.split(|b| *b == b',').any(|directive| {
        let directive = directive.trim_ascii();
        directive.len() > 9
            && directive[..9].eq_ignore_ascii_case(b"s-maxage=")
            && directive[9..]
                .iter()
                .filter(|b| **b != b'"')
                .any(|b| (b'1'..=b'9').contains(b))
    })
}

#[cfg(test)]
mod age_field {
    use super::age;

    #[test]
    fn the_first_member_of_a_list_counts_and_nonsense_is_ignored() {
        let of = |values: &[&str]| {
            let mut h = http::HeaderMap::new();
            for v in values {
                h.append(http::header::AGE, v.parse().unwrap());
            }
            age(&h)
        };
        assert_eq!(of(&["7200, 0"]), 7200);
        assert_eq!(of(&["7200", "0"]), 7200);
        assert_eq!(of(&[" 60 "]), 60);
        assert_eq!(of(&["-5"]), 0);
        assert_eq!(of(&["1.5"]), 0);
        assert_eq!(of(&["99999999999999999999999"]), 1 << 31);
        assert_eq!(of(&[]), 0);
    }
}

#[cfg(test)]
mod shared_caches {
    use super::lets_shared_caches_store as shared;

    #[test]
    fn only_a_positive_s_maxage_lets_shared_caches_store() {
        assert!(shared(b"s-maxage=86400, must-revalidate, max-age=0"));
        assert!(shared(b"public,S-MAXAGE=\"60\""));
        assert!(!shared(b"s-maxage=0, max-age=0"));
        assert!(!shared(b"private, max-age=600"));
        assert!(!shared(b"max-age=600"));
    }
}
