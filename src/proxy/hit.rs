//! Serving a stored object, decided once for every path that serves one. Three paths answer
//! hits: the front door ([`super::fast`], HTTP/1.1 before pingora builds a session), the
//! session's fast path (`serve_fresh_hit` in [`super`], HTTP/1.0 and what the front door
//! declined) and pingora's cache state machine (disk hits, conditional and range requests,
//! stale objects). They differ only in how the bytes reach the socket; this module decides
//! for all three:
//! - whether a request may be answered from a stored copy as it is ([`serves_as_stored`],
//!   [`uses_cache`]);
//! - whether a stored copy may be served: not banned or purged since, and trusted by the
//!   purge bus ([`verdict`]); for the fast paths also fresh for this variant ([`fresh`]);
//! - what a hit's head says: the stored status line and fields, framing, `Age`,
//!   `X-Cache-Status`, `Cache-Status` and the client's `Cache-Control` ([`write_head`] for
//!   the fast paths, [`mark`] for pingora's, both from the same helpers);
//! - and, through [`ProxyState::record`](super::ProxyState::record), how it is counted and
//!   logged.
//!
//! It does not decide what is stored (`cache::policy`) nor how tiers look objects up
//! (`cache::memory`, `cache::disk`).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Method;
use pingora::cache::key::HashBinary;
use pingora::http::ResponseHeader;
use pingora::Result;

use super::{ProxyState, Settings};
use crate::cache::bans::{Invalidations, Trust};
use crate::cache::fields::RequestFields;
use crate::cache::key::CacheUrl;
use crate::cache::memory::{Looked, StoredObject};
use crate::cache::meta::{choose_variant, KeptTimes, ObjectMeta, CACHE_STATUS, X_CACHE_STATUS};
use crate::cache::status::{Disposition, Outcome};

/// Request fields whose meaning only pingora's cache state machine implements for a hit:
/// ranges (RFC 9110 §14) and preconditions (RFC 9110 §13).
pub const NEEDS_CACHE_MACHINE: [HeaderName; 6] = [
    header::RANGE,
    header::IF_RANGE,
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_MATCH,
    header::IF_UNMODIFIED_SINCE,
];

/// Whether a request may be answered with a stored response as it is stored: it [`uses_cache`],
/// and asks for neither a range nor a precondition ([`NEEDS_CACHE_MACHINE`]).
pub fn serves_as_stored(settings: &Settings, method: &Method, headers: &HeaderMap) -> bool {
    uses_cache(settings, method, headers)
        && !NEEDS_CACHE_MACHINE
            .iter()
            .any(|name| headers.contains_key(name))
}

/// Whether a request may use the cache at all (GET or HEAD, no session cookie or
/// `Authorization` that bypasses it).
pub fn uses_cache(settings: &Settings, method: &Method, headers: &HeaderMap) -> bool {
    settings.pass_reason(method, headers).is_none()
}

/// [`uses_cache`] from what the front door noted while it parsed the head: whether it has an
/// `Authorization` field, and its `Cookie` values. The front door asks only this: it declines
/// a request naming any of [`NEEDS_CACHE_MACHINE`] field by field as it parses, so looking
/// them up again would cost six map lookups per hit for nothing.
pub fn uses_cache_noted<'a>(
    settings: &Settings,
    method: &Method,
    authorization: bool,
    cookies: impl IntoIterator<Item = &'a [u8]>,
) -> bool {
    settings
        .pass_reason_of(method, || authorization, cookies)
        .is_none()
}

/// Whether a stored copy of `url`, stored at `created` and last confirmed by the origin at
/// `epoch`, may be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Serve,
    /// A ban or a purge since it was stored: fetch it again.
    Purged,
    /// Not trusted without the origin's word (stored before a restart without a purge bus).
    Revalidate,
    /// Trusted once the purge bus has caught up, which it may wait this long for.
    WaitForCatchUp(Duration),
}

pub fn verdict(
    invalidations: &Invalidations,
    url: &CacheUrl,
    created: SystemTime,
    heard: SystemTime,
) -> Verdict {
    if invalidations.banned(url, created) {
        return Verdict::Purged;
    }
    // Trust dates from when this node last had the origin's word on the object (its fetch, or
    // a 304 since), whatever `Age` that word came with (`AgeWhenHeard`).
    match invalidations.trust(heard) {
        Trust::Yes => Verdict::Serve,
        Trust::Revalidate => Verdict::Revalidate,
        Trust::WaitForCatchUp(timeout) => Verdict::WaitForCatchUp(timeout),
    }
}

/// Whether [`verdict`] lets a fast path serve a copy with these times without waiting.
fn served_as_is(invalidations: &Invalidations, url: &CacheUrl, times: &KeptTimes) -> bool {
    verdict(invalidations, url, times.created.time(), times.heard()) == Verdict::Serve
}

/// The stored object a fast path may serve as it is, counted as a memory hit: fresh in the
/// memory tier for this request's variant and served by [`verdict`] without waiting. `None`:
/// let pingora's cache decide.
pub fn fresh<F: RequestFields + ?Sized>(
    state: &ProxyState,
    url: &CacheUrl,
    looked: &Looked,
    headers: &F,
    now: SystemTime,
) -> Option<Arc<StoredObject>> {
    let store = state.store;
    let obj = looked.fresh(headers, now)?;
    if !served_as_is(&store.invalidations, url, &obj.meta.times) {
        return None;
    }
    store
        .memory
        .counters
        .hits
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Some(obj)
}

/// The stored object a fast path may serve from the disk tier, read from the page cache
/// without waiting (`DiskTier::read_now`), by the same rules as [`fresh`]: pingora's Vary
/// rules (the primary slot first, then the request's variant, not older than the primary's
/// provenance), fresh, not purged while the index loaded, served by [`verdict`]. The caller
/// promotes it (`Store::promote`) once it answers with it. `None`: let pingora's cache decide (it
/// also reads what the page cache does not hold, on the blocking pool).
pub fn fresh_from_disk<F: RequestFields + ?Sized>(
    state: &ProxyState,
    url: &CacheUrl,
    primary: HashBinary,
    headers: &F,
    now: SystemTime,
) -> Option<Arc<StoredObject>> {
    let store = state.store;
    let disk = store.disk?;
    let first = disk.read_now(&primary, None)?;
    let (slot, (meta, body)) = choose_variant(
        first,
        |(m, _)| m,
        headers,
        |slot| disk.read_now(&primary, Some(slot)),
    )?;
    let times = meta.times;
    if times.fresh_until.time() < now
        || store
            .invalidations
            .deleted_since(&primary, times.created.time())
        || !served_as_is(&store.invalidations, url, &times)
    {
        return None;
    }
    Some(Arc::new(StoredObject::with(slot, meta, body)))
}

/// Whether the client takes the stored copy's content coding (a copy without one, any client).
/// A fast path declines a copy it does not: decompressing is pingora's path's job
/// (`proxy::compress`).
pub fn encoding_acceptable<F: RequestFields + ?Sized>(meta: &ObjectMeta, req: &F) -> bool {
    if !meta.times.content_coded {
        return true;
    }
    // Never one of an object's own lines (`cache::head`): in the leading part.
    let head = meta.head.leading();
    let Some((start, end)) = stored_field(head, &CONTENT_ENCODING_LINE) else {
        return true;
    };
    std::str::from_utf8(&head[start..end])
        .is_ok_and(|coding| crate::cache::vary::accepts(req, coding.trim()))
}

/// RFC 9111 §4: "When a stored response is used to satisfy a request without validation, a
/// cache MUST generate an Age header field": seconds since the origin's last word on it.
pub fn age(epoch: SystemTime, now: SystemTime) -> u64 {
    now.duration_since(epoch).map_or(0, |d| d.as_secs())
}

/// The `Cache-Control` a client gets in place of a stored one that lets shared caches keep the
/// response (`[cache] downstream_cache_control`), if that applies.
fn for_client<'a>(stored: &[u8], downstream: Option<&'a HeaderValue>) -> Option<&'a HeaderValue> {
    downstream.filter(|_| crate::cache::policy::lets_shared_caches_store(stored))
}

/// Appends the members of caches before this one to a `Cache-Status` value, each followed by
/// the separator ours comes after (RFC 9211 §2: "caches SHOULD preserve the existing field
/// value" and the cache nearest the client adds its member last). One line keeps it readable;
/// written in place, so a hit allocates nothing for it.
fn push_upstream_members<'a>(out: &mut Vec<u8>, upstream: impl IntoIterator<Item = &'a [u8]>) {
    for member in upstream {
        out.extend_from_slice(member);
        out.extend_from_slice(b", ");
    }
}

/// What a fast path's hit head says besides the object.
#[derive(Debug, Clone, Copy)]
pub struct HitFlags {
    /// A `[[rule]]` set the copy's lifetime (`detail=ttl-rule`).
    pub ttl_rule: bool,
    /// The copy came from the disk tier (`hit-local`).
    pub from_disk: bool,
    /// `[server] server_timing`: name the answer and this node in `Server-Timing`.
    pub server_timing: bool,
}

/// The status line and header section of a hit answered by a fast path: the stored head, the
/// framing, `Age`, the two status fields and, with `close`, `Connection: close`, spelled as
/// pingora's writer spells them ([`crate::cache::meta::wire_name`]), then the blank line.
/// `cache_name`: this cache's name in its `Cache-Status` member.
pub fn write_head(
    out: &mut Vec<u8>,
    obj: &StoredObject,
    now: SystemTime,
    cache_name: &str,
    close: bool,
    downstream_cc: Option<&HeaderValue>,
    flags: HitFlags,
) {
    let meta = &obj.meta;
    // Searched for only when an operator configured a replacement.
    // `Cache-Control` is never one of an object's own lines (`cache::head`): it is in the
    // leading part.
    let leading = meta.head.leading();
    let replaced = downstream_cc.and_then(|_| {
        let (start, end) = stored_field(leading, &CACHE_CONTROL_LINE)?;
        for_client(&leading[start..end], downstream_cc).map(|cc| (cc, start, end))
    });
    match replaced {
        Some((cc, start, end)) => {
            out.extend_from_slice(&leading[..start]);
            out.extend_from_slice(cc.as_bytes());
            out.extend_from_slice(&leading[end..]);
        }
        None => out.extend_from_slice(leading),
    }
    meta.head.write_trailing(out);
    meta.write_framing(out, obj.body.len());
    // Written in place: no string per hit.
    let age = age(meta.times.epoch.time(), now);
    field(out, b"Age", itoa::Buffer::new().format(age).as_bytes());
    let fresh_until = meta.times.fresh_until.time();
    let outcome = Outcome {
        ttl_rule: flags.ttl_rule,
        local_hit: flags.from_disk,
        ..Outcome::fast_hit(fresh_until)
    };
    let disposition = outcome.disposition();
    field(
        out,
        X_CACHE_STATUS.as_str().as_bytes(),
        disposition.as_str().as_bytes(),
    );
    if flags.server_timing {
        write_server_timing(out, disposition, cache_name);
    }
    out.extend_from_slice(CACHE_STATUS.as_str().as_bytes());
    out.extend_from_slice(b": ");
    let upstream = meta.upstream_cache_status().map(HeaderValue::as_bytes);
    push_upstream_members(out, upstream);
    outcome.write_cache_status(cache_name, now, out);
    out.extend_from_slice(b"\r\n");
    if gains_vary_accept_encoding(obj) {
        // Where pingora's path writes it: its decoding module appends it last.
        field(out, b"vary", b"accept-encoding");
    }
    if close {
        field(out, b"Connection", b"close");
    }
    out.extend_from_slice(b"\r\n");
}

/// [`super::compress::decoding_makes_it_vary`] for a stored object: a cache beyond Skua must
/// not give a coded copy's bytes to a client that does not take them. Most copies are uncoded
/// (one flag) or vary on `Accept-Encoding` already (their names); the header is decoded only
/// for the rare rest, an origin's coded answer that did not say it varies.
fn gains_vary_accept_encoding(obj: &StoredObject) -> bool {
    let meta = &obj.meta;
    meta.times.content_coded
        && !(meta.vary().iter()).any(|name| name == "accept-encoding" || name == "*")
        && super::compress::decoding_makes_it_vary(&meta.header(obj.body.len()))
}

/// `Server-Timing` (W3C Server Timing) as Wikimedia's edge sends it: how the cache answered
/// (`X-Cache-Status`'s word) and which node, `cache;desc="hit-front", host;desc="skua"`.
/// `[server] name` is a token, so it needs no escaping in a quoted string.
fn write_server_timing(out: &mut Vec<u8>, disposition: Disposition, node: &str) {
    out.extend_from_slice(b"Server-Timing: cache;desc=\"");
    out.extend_from_slice(disposition.as_str().as_bytes());
    out.extend_from_slice(b"\", host;desc=\"");
    out.extend_from_slice(node.as_bytes());
    out.extend_from_slice(b"\"\r\n");
}

/// The `Server-Timing` field [`write_server_timing`] writes, as a value.
fn server_timing_value(disposition: Disposition, node: &str) -> String {
    format!(
        "cache;desc=\"{}\", host;desc=\"{node}\"",
        disposition.as_str()
    )
}

/// The same fields on a response pingora's path sends (a hit from its cache state machine, and
/// every other response too): `X-Cache-Status`, the client's `Cache-Control`, `Cache-Status`
/// after the members already there, for a hit `Age` from the stored copy's `epoch`, and with
/// `server_timing` (this node's name) `Server-Timing`.
pub fn mark(
    resp: &mut ResponseHeader,
    disposition: Disposition,
    cache_status: String,
    downstream_cc: Option<&HeaderValue>,
    hit_epoch: Option<SystemTime>,
    now: SystemTime,
    server_timing: Option<&str>,
) -> Result<()> {
    if let Some(epoch) = hit_epoch {
        resp.insert_header(header::AGE, age(epoch, now))?;
    }
    resp.insert_header(
        X_CACHE_STATUS,
        HeaderValue::from_static(disposition.as_str()),
    )?;
    if let Some(node) = server_timing {
        // After any metrics of the origin's own, as a hit's head has them.
        resp.append_header("server-timing", server_timing_value(disposition, node))?;
    }
    let replaced = resp
        .headers
        .get(header::CACHE_CONTROL)
        .and_then(|cc| for_client(cc.as_bytes(), downstream_cc))
        .cloned();
    if let Some(cc) = replaced {
        resp.insert_header(header::CACHE_CONTROL, cc)?;
    }
    if !resp.headers.contains_key(CACHE_STATUS) {
        resp.insert_header(CACHE_STATUS, cache_status)?;
        return Ok(());
    }
    let mut value = Vec::with_capacity(128);
    let upstream = resp.headers.get_all(CACHE_STATUS).iter();
    push_upstream_members(&mut value, upstream.map(HeaderValue::as_bytes));
    value.extend_from_slice(cache_status.as_bytes());
    resp.insert_header(CACHE_STATUS, value)?;
    Ok(())
}

/// Where the value of one field of a stored head is. The stored head writes one field per line
/// with names spelled by [`crate::cache::meta::wire_name`], so a search for
/// `\r\n<Name>: ` finds it; the finders are built once, not on every hit.
fn stored_field(head: &[u8], line_start: &memchr::memmem::Finder<'_>) -> Option<(usize, usize)> {
    let start = line_start.find(head)? + line_start.needle().len();
    let end = memchr::memchr(b'\r', &head[start..]).map_or(head.len(), |e| start + e);
    Some((start, end))
}

static CONTENT_ENCODING_LINE: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\r\nContent-Encoding: "));
static CACHE_CONTROL_LINE: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\r\nCache-Control: "));

fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The finders search names as `wire_name` spells them: a change to one without the other
    /// would let a compressed copy reach a client that cannot read it.
    #[test]
    fn the_finders_search_names_as_the_stored_head_spells_them() {
        use crate::cache::meta::wire_name;
        for (finder, name) in [
            (&CONTENT_ENCODING_LINE, header::CONTENT_ENCODING),
            (&CACHE_CONTROL_LINE, header::CACHE_CONTROL),
        ] {
            let line = format!("\r\n{}: ", wire_name(&name));
            assert_eq!(finder.needle(), line.as_bytes());
        }
    }

    #[test]
    fn cache_status_members_keep_their_order_and_ours_comes_last() {
        let upstream: [&[u8]; 2] = [b"origin; hit", b"edge; fwd=uri-miss"];
        let mut joined = Vec::new();
        push_upstream_members(&mut joined, upstream);
        joined.extend_from_slice(b"skua; hit");
        assert_eq!(joined, b"origin; hit, edge; fwd=uri-miss, skua; hit");
        let mut alone = Vec::new();
        push_upstream_members(&mut alone, []);
        alone.extend_from_slice(b"skua; hit");
        assert_eq!(alone, b"skua; hit");
    }
}
