//! The front door: a fresh memory hit for a plain HTTP/1.1 `GET` or `HEAD` is answered from the
//! connection itself ([`super::connection`]), and one for an HTTP/2 stream as the stream is
//! accepted (`proxy/h2.rs`), from the stored header and body, before pingora builds a session.
//! The `[[rule]]`s are decided here as on the full path: a hit a rule answers, limits, passes
//! or whose request it edits is left to pingora; response edits are applied. Everything else
//! — a request this path is not sure about, a miss, a stale or untrusted object, conditional
//! and range requests, purges, bodies — returns `None` and goes through pingora
//! ([`crate::proxy`]), which answers it fully. A hit answered here is counted and logged
//! exactly as one answered there.
//!
//! Why: pingora's per-request session and proxy phases cost about as much CPU as the whole
//! answer (`benches/README.md`); a hit needs none of them.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Method;
use pingora::http::{RequestHeader, ResponseHeader};

use super::record::Served;
use super::{hit, ProxyState, Settings};
use crate::cache::fields::RequestFields;
use crate::cache::key::{CacheUrl, Scheme};
use crate::cache::memory::{Looked, StoredObject};
use crate::cache::meta::decode_head;
use crate::cache::status::Disposition;
use crate::config::HeadLimits;
use crate::metrics::HitPath;

/// Most request header fields this path parses; a request with more takes the full path.
const MAX_FIELDS: usize = 48;

/// Bodies up to this size are copied behind the header so the answer leaves in one write.
const COALESCE_BODY: usize = 16 * 1024;

/// A response ready to write.
pub struct Answer {
    /// Status line and header section, and the body too when it is small.
    pub head: Vec<u8>,
    /// A body too large to copy, written after `head`.
    pub body: Option<Bytes>,
    /// The client asked to close the connection after this response.
    pub close: bool,
}

/// Largest answer buffer a thread keeps for the next answer: a coalesced body and its head.
const SPARE_ANSWER_MAX: usize = 2 * COALESCE_BODY;

thread_local! {
    /// The buffer of the last answer this thread wrote, emptied, for the next one to fill.
    /// A 1 KiB hit's answer is about 1.4 KB, and mimalloc serves every block over 1 KiB
    /// through its generic path: about 250 instructions to allocate and free one, 4 % of the
    /// front door's work for such a hit (`benches/README.md` §29). One buffer per worker
    /// thread, not per connection: an idle connection holds none.
    static SPARE_ANSWER: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// An empty buffer of at least `capacity` bytes, the thread's spare one if it has it.
fn answer_buffer(capacity: usize) -> Vec<u8> {
    let mut out = SPARE_ANSWER
        .try_with(std::cell::Cell::take)
        .unwrap_or_default();
    out.reserve(capacity);
    out
}

impl Drop for Answer {
    /// Hands the buffer back to the thread that drops the answer (after it was written, or
    /// when writing it failed), unless it grew past [`SPARE_ANSWER_MAX`].
    fn drop(&mut self) {
        let mut spare = std::mem::take(&mut self.head);
        if spare.capacity() <= SPARE_ANSWER_MAX {
            spare.clear();
            let _ = SPARE_ANSWER.try_with(|slot| slot.set(spare));
        }
    }
}

/// A hit for an HTTP/2 stream, as pingora's HTTP/2 session writes it.
pub struct StreamAnswer {
    pub head: ResponseHeader,
    /// `None` for `HEAD`.
    pub body: Option<Bytes>,
}

#[derive(Clone)]
pub struct FrontDoor {
    shared: Arc<ProxyState>,
    /// Kept-alive origin connections of the misses the front door fills (`proxy/fill.rs`).
    pub(super) idle: Arc<super::fill::IdleOrigins>,
}

/// What a request says, once it is known to suit this path, whichever protocol carried it.
struct Plain<'a, S> {
    method: Method,
    target: &'a str,
    host: &'a str,
    close: bool,
    /// A `Cookie` field is among `fields`.
    cookie: bool,
    /// An `Authorization` field is among `fields`.
    authorization: bool,
    /// The first `X-Forwarded-Proto` field's value.
    forwarded_proto: Option<&'a [u8]>,
    fields: Fields<S>,
}

/// A request's fields as the protocol's parser left them (`S`), with its `Cookie` fields
/// replaced by the cookies the cache keeps (`vary::kept_cookies`) once those are known: what
/// the full path's decisions read from the request it forwards, without building a
/// `HeaderMap` for every hit.
struct Fields<S> {
    parsed: S,
    /// `Some` once the `Cookie` fields are replaced: the kept cookies, if any were kept.
    kept_cookie: Option<Option<HeaderValue>>,
}

impl<S: RequestFields> RequestFields for Fields<S> {
    fn values<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s [u8]> {
        let replaced = (self.kept_cookie.as_ref())
            .filter(|_| name.eq_ignore_ascii_case(header::COOKIE.as_str()));
        let parsed = replaced
            .is_none()
            .then(|| self.parsed.values(name))
            .into_iter()
            .flatten();
        parsed.chain(replaced.and_then(Option::as_ref).map(HeaderValue::as_bytes))
    }
}

/// An HTTP/1.1 head's fields, as httparse left them.
struct Parsed<'a>(&'a [httparse::Header<'a>]);

impl RequestFields for Parsed<'_> {
    fn values<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s [u8]> {
        (self.0.iter())
            .filter(move |f| f.name.eq_ignore_ascii_case(name))
            .map(|f| f.value)
    }
}

/// A fresh memory hit found for a request.
struct Hit {
    obj: Arc<StoredObject>,
    url: CacheUrl,
    now: SystemTime,
    /// The `[[rule]]` whose `response_headers` apply.
    response_edits: Option<u16>,
    /// A rule set the copy's lifetime.
    ttl_rule: bool,
    /// The copy came from the disk tier.
    local: bool,
}

impl FrontDoor {
    pub fn new(shared: Arc<ProxyState>) -> FrontDoor {
        FrontDoor {
            shared,
            idle: Arc::default(),
        }
    }

    pub(super) fn state(&self) -> &ProxyState {
        &self.shared
    }

    /// Fetches, stores and answers `head`, a request [`Self::answer`] declined after finding
    /// nothing of its URL in memory (`looked`), when it is a miss the front door fills
    /// (`proxy/fill.rs`): a plain HTTP/1.1 `GET` without cookies or credentials, with no
    /// `[[rule]]` configured.
    pub async fn try_fill(
        &self,
        head: &[u8],
        scheme: Scheme,
        client: &impl Fn() -> Option<IpAddr>,
        closing: bool,
        looked: &Looked,
        downstream: &mut super::fill::Downstream<'_>,
    ) -> super::fill::Filled {
        use super::fill::{FillRequest, Filled};
        let started = Instant::now();
        let settings = self.shared.settings.load();
        if scheme != Scheme::Http
            || !looked.holds_nothing()
            || settings.rules.acts()
            || self.may_be_on_disk(looked)
        {
            return Filled::Declined;
        }
        let mut parsed = [httparse::EMPTY_HEADER; MAX_FIELDS];
        let Some(req) = plain(head, &mut parsed, &settings.limits) else {
            return Filled::Declined;
        };
        if req.method != Method::GET || req.cookie || req.authorization {
            return Filled::Declined;
        }
        // A request that has been here before is a loop, which pingora's path answers (508).
        if self.shared.via.names_this_node(req.fields.values("via")) {
            return Filled::Declined;
        }
        let request = FillRequest {
            target: req.target,
            close: req.close,
            fields: &req.fields,
            raw: req.fields.parsed.0,
        };
        self.fill(
            request, &settings, looked, client, closing, started, downstream,
        )
        .await
    }

    /// The answer to the request whose complete head (and nothing more) is `head`, if it is a
    /// fresh memory hit this path can serve exactly as the full path would.
    /// `scheme`: the listener's (https on a TLS connection). `client` gives the client's address
    /// (for the access log, and to believe a trusted proxy's `X-Forwarded-Proto`); `closing`: the
    /// server is shutting down, so the connection closes after this answer. `looked` receives
    /// the memory lookup made, if one was, for the full path to reuse.
    pub fn answer(
        &self,
        head: &[u8],
        scheme: Scheme,
        client: impl Fn() -> Option<IpAddr>,
        closing: bool,
        looked: &mut Option<Looked>,
    ) -> Option<Answer> {
        let started = Instant::now();
        let settings = self.shared.settings.load();
        let mut parsed = [httparse::EMPTY_HEADER; MAX_FIELDS];
        let mut req = plain(head, &mut parsed, &settings.limits)?;
        let hit = self.find(&settings, &mut req, scheme, &client, looked, started)?;
        let Hit { ref obj, now, .. } = hit;

        let close = req.close || closing;
        let with_body = req.method != Method::HEAD;
        let coalesce = with_body && obj.body.len() <= COALESCE_BODY;
        let edits = (hit.response_edits).map(|i| settings.rules.wire_edits(i));
        let added = edits.map_or(0, |edits| edits.added.len());
        let mut out = answer_buffer(
            obj.meta.head.len() + 160 + added + if coalesce { obj.body.len() } else { 0 },
        );
        hit::write_head(
            &mut out,
            obj,
            now,
            &self.shared.name,
            close,
            settings.downstream_cache_control.as_ref(),
            hit::HitFlags {
                ttl_rule: hit.ttl_rule,
                from_disk: hit.local,
                server_timing: settings.server_timing,
            },
        );
        if let Some(edits) = edits {
            super::edit::wire(&mut out, 0, edits, obj.meta.times.field_names);
        }
        let body = if coalesce {
            out.extend_from_slice(&obj.body);
            None
        } else {
            with_body.then(|| obj.body.clone())
        };
        self.record(&req, &hit, "HTTP/1.1", &client, started);
        Some(Answer {
            head: out,
            body,
            close,
        })
    }

    /// The answer to an HTTP/2 stream's request `head`, whose body is known to be empty, if it
    /// is a fresh memory hit: the same decision as [`Self::answer`] makes for HTTP/1.1, and the
    /// same head, written by pingora's HTTP/2 session as it writes every other response.
    pub fn answer_stream(
        &self,
        head: &RequestHeader,
        scheme: Scheme,
        client: impl Fn() -> Option<IpAddr>,
        looked: &mut Option<Looked>,
    ) -> Option<StreamAnswer> {
        let started = Instant::now();
        let settings = self.shared.settings.load();
        let mut req = stream_request(head, &settings.limits)?;
        let hit = self.find(&settings, &mut req, scheme, &client, looked, started)?;
        let obj = &hit.obj;
        let mut wire = Vec::with_capacity(obj.meta.head.len() + 160);
        let downstream = settings.downstream_cache_control.as_ref();
        let name = &self.shared.name;
        hit::write_head(
            &mut wire,
            obj,
            hit.now,
            name,
            false,
            downstream,
            hit::HitFlags {
                ttl_rule: hit.ttl_rule,
                from_disk: hit.local,
                server_timing: settings.server_timing,
            },
        );
        let mut head = decode_head(&wire);
        if let Some(edits) = hit.response_edits.and_then(|i| rule_edits(&settings, i)) {
            super::edit::response(&mut head, edits).ok()?;
        }
        let body = (req.method != Method::HEAD).then(|| obj.body.clone());
        self.record(&req, &hit, "HTTP/2.0", &client, started);
        Some(StreamAnswer { head, body })
    }

    /// The fresh memory hit `req` may be served, decided as the full path decides
    /// (`request_filter`, then `serve_fresh_hit`): the same scheme, canonical URL, hosts,
    /// redirect, bypasses and variant.
    fn find<S: RequestFields>(
        &self,
        settings: &Settings,
        req: &mut Plain<'_, S>,
        scheme: Scheme,
        client: &impl Fn() -> Option<IpAddr>,
        looked: &mut Option<Looked>,
        started: Instant,
    ) -> Option<Hit> {
        let shared = &self.shared;
        let scheme = super::guard::request_scheme(scheme, req.forwarded_proto, || {
            super::guard::trusted(&settings.trusted_proxies, client())
        });
        let url = shared.canonical(CacheUrl::new(scheme, req.host, req.target).ok()?);
        let cookies = req.cookie.then(|| req.fields.values("cookie"));
        let cookies = cookies.into_iter().flatten();
        if !settings.serves_host(&url.host)
            || !hit::uses_cache_noted(settings, &req.method, req.authorization, cookies)
            || settings.https_location(&url).is_some()
        {
            return None;
        }
        // Variants are keyed on the cookies the full path forwards (`as_forwarded`). Without
        // a `Cookie` field there are none, and a rule's cookie condition need not look for one.
        req.fields.kept_cookie = Some(if req.cookie {
            crate::cache::vary::kept_cookies(&req.fields, &settings.vary_cookies)
        } else {
            None
        });
        let now = SystemTime::now();
        // Looked up before the rules are read: the object keeps which rules its URL matches.
        let primary = url.primary_hash();
        let found = shared.store.memory.look_at(&primary, started);
        // Declined from here on, the full path reads this lookup instead of making another.
        let from_memory = hit::fresh(shared, &url, &found, &req.fields, now);
        // A URL the memory tier holds nothing of may be on disk, in the page cache.
        let from_disk = || {
            found
                .holds_nothing()
                .then(|| hit::fresh_from_disk(shared, &url, primary, &req.fields, now))
                .flatten()
        };
        let (obj, local) = match from_memory {
            Some(obj) => (obj, false),
            None => match from_disk() {
                Some(obj) => (obj, true),
                None => {
                    *looked = Some(found.of_url(url));
                    return None;
                }
            },
        };
        if !hit::encoding_acceptable(&obj.meta, &req.fields) {
            *looked = Some(found.of_url(url));
            return None;
        }
        let (mut response_edits, mut ttl_rule) = (None, false);
        let memo = Some((&obj.url_memo, req.cookie));
        if let Some((decision, _)) =
            settings.decide_rules(&url, &req.method, &req.fields, client, memo)
        {
            let set = &settings.rules;
            // The full path answers, limits, passes or edits the request.
            if !decision.lets_a_fast_path_answer(set) {
                *looked = Some(found.of_url(url));
                return None;
            }
            response_edits = decision.response_headers;
            ttl_rule = decision.ttl(set).is_some();
        }
        if local {
            shared.store.promote(primary, &obj);
        }
        Some(Hit {
            obj,
            url,
            now,
            response_edits,
            ttl_rule,
            local,
        })
    }

    fn record<S: RequestFields>(
        &self,
        req: &Plain<'_, S>,
        hit: &Hit,
        protocol: &'static str,
        client: &impl Fn() -> Option<IpAddr>,
        started: Instant,
    ) {
        let (url, obj) = (&hit.url, &hit.obj);
        let body_bytes = if req.method == Method::HEAD {
            0
        } else {
            obj.body.len() as u64
        };
        self.shared.record(&Served {
            origin: None,
            request_id: None,
            client,
            method: req.method.as_str(),
            target: &|| Cow::Borrowed(req.target),
            protocol,
            scheme: url.scheme,
            url: Some(url),
            headers: &req.fields,
            authority: None,
            status: obj.meta.status(),
            body_bytes,
            disposition: if hit.local {
                Disposition::HitLocal
            } else {
                Disposition::HitFront
            },
            hit_path: Some(HitPath::FrontDoor),
            started,
        });
    }
}

/// Parses `head` if it is a request this path can answer: HTTP/1.1 `GET` or `HEAD` of an
/// origin-form target, one `Host`, no body, nothing after the head, within the configured
/// limits, and none of the fields that need the full path.
fn plain<'a>(
    head: &'a [u8],
    fields: &'a mut [httparse::Header<'a>],
    limits: &HeadLimits,
) -> Option<Plain<'a, Parsed<'a>>> {
    let mut parsed = httparse::Request::new(fields);
    match parsed.parse(head) {
        Ok(httparse::Status::Complete(n)) if n == head.len() => {}
        _ => return None,
    }
    let method = match parsed.method? {
        "GET" => Method::GET,
        "HEAD" => Method::HEAD,
        _ => return None,
    };
    if parsed.version? != 1 {
        return None;
    }
    let target = parsed.path?;
    if !target.starts_with('/') || target.len() > limits.max_uri_bytes {
        return None;
    }
    if parsed.headers.len() > limits.max_headers {
        return None;
    }
    let mut host = None;
    let mut close = false;
    let mut cookie = false;
    let mut authorization = false;
    let mut forwarded_proto = None;
    let mut field_bytes = 0;
    for f in parsed.headers.iter() {
        field_bytes += f.name.len() + f.value.len() + 4;
        // httparse has checked the name is a token (RFC 9110 §5.1), so it is compared as
        // text, case-insensitively, rather than parsed into a `HeaderName` (a copy and a
        // table walk per field).
        let name = f.name;
        if name.eq_ignore_ascii_case(header::HOST.as_str()) {
            if host.is_some() {
                return None;
            }
            host = Some(std::str::from_utf8(f.value).ok()?);
        } else if name.eq_ignore_ascii_case(header::COOKIE.as_str()) {
            cookie = true;
        } else if name.eq_ignore_ascii_case(header::AUTHORIZATION.as_str()) {
            authorization = true;
        } else if name.eq_ignore_ascii_case(super::guard::X_FORWARDED_PROTO_NAME) {
            forwarded_proto = forwarded_proto.or(Some(f.value));
        } else if name.eq_ignore_ascii_case(header::CONNECTION.as_str()) {
            // RFC 9112 §9.3: `close` ends the connection after this response; any other
            // option (upgrades, hop-by-hop field lists) takes the full path.
            let value = std::str::from_utf8(f.value).ok()?.trim();
            if value.eq_ignore_ascii_case("close") {
                close = true;
            } else if !value.eq_ignore_ascii_case("keep-alive") {
                return None;
            }
        } else if is_full_path_name(name) {
            return None;
        }
    }
    if field_bytes > limits.max_header_bytes {
        return None;
    }
    Some(Plain {
        method,
        target,
        host: host?,
        close,
        cookie,
        authorization,
        forwarded_proto,
        fields: Fields {
            parsed: Parsed(parsed.headers),
            kept_cookie: None,
        },
    })
}

/// Reads an HTTP/2 stream's request head if it is one this path can answer: `GET` or `HEAD`
/// of an origin-form path, within the configured limits, and none of the fields that need the
/// full path. pingora has checked the pseudo-fields (RFC 9113 §8.3.1) and `Host` against
/// `:authority`.
fn stream_request<'a>(
    head: &'a RequestHeader,
    limits: &HeadLimits,
) -> Option<Plain<'a, &'a HeaderMap>> {
    let method = match head.method {
        Method::GET => Method::GET,
        Method::HEAD => Method::HEAD,
        _ => return None,
    };
    let target = std::str::from_utf8(head.raw_path()).ok()?;
    let authority = head.uri.authority().map(|a| a.as_str());
    let fields = &head.headers;
    // RFC 9113 §8.3.1: `:authority` in place of `Host`; the full path reads it the same way.
    let host = match authority {
        Some(authority) => authority,
        None => fields.get(header::HOST)?.to_str().ok()?,
    };
    let (field_count, field_bytes) = super::guard::field_size(fields);
    if !target.starts_with('/')
        || target.len() + authority.map_or(0, str::len) > limits.max_uri_bytes
        || field_count > limits.max_headers
    {
        return None;
    }
    let mut forwarded_proto = None;
    for (name, value) in fields {
        if needs_full_path(name) {
            return None;
        }
        if forwarded_proto.is_none() && name.as_str() == super::guard::X_FORWARDED_PROTO_NAME {
            forwarded_proto = Some(value.as_bytes());
        }
    }
    if field_bytes > limits.max_header_bytes {
        return None;
    }
    Some(Plain {
        method,
        target,
        host,
        close: false,
        cookie: fields.contains_key(header::COOKIE),
        authorization: fields.contains_key(header::AUTHORIZATION),
        forwarded_proto,
        fields: Fields {
            parsed: fields,
            kept_cookie: None,
        },
    })
}

/// Fields whose meaning only the full path implements: a balancer's `Forwarded`, framing and
/// bodies, upgrades, and what only pingora's cache state machine answers (conditional and range requests,
/// [`hit::NEEDS_CACHE_MACHINE`]).
const FULL_PATH_FIELDS: [HeaderName; 6] = [
    header::FORWARDED,
    header::CONTENT_LENGTH,
    header::TRANSFER_ENCODING,
    header::TE,
    header::UPGRADE,
    header::EXPECT,
];

/// [`needs_full_path`]'s names as text, for a request's fields as httparse left them: a
/// `HeaderName`'s text is a table lookup per name (about 150 instructions a field to compare
/// with them all).
const FULL_PATH_NAMES: [&str; 13] = [
    // From a trusted balancer it names the client (`guard::forwarded_as_x_headers`).
    "forwarded",
    "content-length",
    "transfer-encoding",
    "te",
    "upgrade",
    "expect",
    "range",
    "if-range",
    "if-none-match",
    "if-modified-since",
    "if-match",
    "if-unmodified-since",
    super::debug::NAME,
];

/// Bit `n` is set when a name in [`FULL_PATH_NAMES`] is `n` bytes long. Most fields a client
/// sends (`User-Agent`, `Accept-Language`, `Referer`...) have lengths none of them has, and
/// are told apart by one test instead of a dozen comparisons.
const FULL_PATH_NAME_LENGTHS: u64 = {
    let mut lengths = 0u64;
    let mut i = 0;
    while i < FULL_PATH_NAMES.len() {
        assert!(FULL_PATH_NAMES[i].len() < 64);
        lengths |= 1 << FULL_PATH_NAMES[i].len();
        i += 1;
    }
    lengths
};

/// Whether a request field `name` (a token, any case) is one of [`FULL_PATH_NAMES`].
fn is_full_path_name(name: &str) -> bool {
    name.len() < 64
        && FULL_PATH_NAME_LENGTHS & (1 << name.len()) != 0
        && FULL_PATH_NAMES
            .iter()
            .any(|full| name.eq_ignore_ascii_case(full))
}

/// [`FULL_PATH_FIELDS`], [`hit::NEEDS_CACHE_MACHINE`] or `Skua-Debug`.
fn needs_full_path(name: &HeaderName) -> bool {
    FULL_PATH_FIELDS.contains(name)
        || hit::NEEDS_CACHE_MACHINE.contains(name)
        // `Skua-Debug`: the explanation is written by the full path, which knows the purge
        // rules. Compared as text: a custom `HeaderName` in the list above would be built and
        // dropped (an indirect call) for every field of every request.
        || name.as_str() == super::debug::NAME
}

/// The response edits of rule `index`.
fn rule_edits(settings: &Settings, index: u16) -> Option<&crate::config::rules::HeaderEdits> {
    settings.rules.rule(index).actions.response_headers.as_ref()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_full_path_names_as_text_are_the_full_path_fields() {
        let mut names: Vec<&str> = (FULL_PATH_FIELDS.iter())
            .chain(&hit::NEEDS_CACHE_MACHINE)
            .map(HeaderName::as_str)
            .chain([crate::proxy::debug::NAME])
            .collect();
        let mut text = FULL_PATH_NAMES.to_vec();
        names.sort_unstable();
        text.sort_unstable();
        assert_eq!(names, text);
    }

    #[test]
    fn a_field_needs_the_full_path_by_its_name_in_any_case_and_by_no_other() {
        for name in FULL_PATH_NAMES {
            assert!(is_full_path_name(name), "{name}");
            assert!(is_full_path_name(&name.to_ascii_uppercase()), "{name}");
        }
        // Lengths shared with a full-path name (`Accept` with `Expect`, `User-Agent` with
        // `Skua-Debug`), lengths none has, and one past the mask's 64 bits.
        let long = "x".repeat(200);
        for name in [
            "accept",
            "user-agent",
            "referer",
            "accept-language",
            "host",
            &long,
        ] {
            assert!(!is_full_path_name(name), "{name}");
        }
    }
}
