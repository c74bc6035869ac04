//! The front door's miss: a plain `GET` for a URL the memory tier holds nothing of is fetched
//! from the origin, stored and answered from the connection itself, as the front door answers a
//! fresh hit ([`super::fast`]), without pingora's proxy session. It owns the origin exchange of
//! such a request (an HTTP/1.1 connection pool of its own), the cache lock it shares with
//! pingora's path, and writing the answer. Every decision about the response is the full
//! path's own code: the storage policy (`cache::policy`), the variant key (`cache::vary`), the
//! response marks (`hit::mark`), storing (`Store`'s miss handler), the log and metrics
//! (`ProxyState::record`).
//!
//! What it does not do: anything a request could need beyond that. A request declined here,
//! before anything reaches the origin, goes to pingora's path, which answers it fully: `HEAD`,
//! a URL with any copy in memory or on disk (a revalidation, a variant, a disk hit), a cookie or
//! credentials, a `[[rule]]`, an origin over TLS, a fill another request is making (it waits on
//! pingora's cache lock), and a first connection to the origin that fails (pingora's failover
//! takes over).
//!
//! Why: pingora's general proxy path costs about 100,000 instructions a miss before Skua does
//! anything (benches/README.md §24, §25); a miss needs a fraction of them.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use http::header;
use pingora::cache::lock::{CacheKeyLockImpl, LockStatus, Locked, WritePermit};
use pingora::cache::{CacheKey, CacheMeta, CachePhase, NoCacheReason};
use pingora::http::ResponseHeader;
use pingora::protocols::http::compression::ResponseCompressionCtx;
use pingora::protocols::Stream;
use pingora::time::fast_timeout::fast_timeout;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::connection::within;
use super::record::Served;
use super::{guard, hit, Settings};
use crate::cache::fields::RequestFields;
use crate::cache::hit_for_miss::Storability;
use crate::cache::memory::Looked;
use crate::cache::status::{Disposition, Outcome};
use crate::cache::vary;
use crate::upstream::Claim;

/// Idle connections kept per origin address.
const MAX_IDLE_PER_ORIGIN: usize = 128;

/// The most response head this path reads; pingora's client allows the same.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// The most of a chunk's size line (with its extensions) this path buffers before it must end,
/// as pingora's body reader allows (RFC 9112 §7.1.1: "A server ought to limit the total length
/// of chunk extensions received"). Regression: an origin that never ended one grew the buffer
/// without bound.
const MAX_CHUNK_SIZE_LINE: usize = 8 * 1024;

/// The most trailer section (RFC 9112 §7.1.2) this path reads, as pingora's body reader
/// allows: a longer one fails the fill, as it fails pingora's path.
const MAX_TRAILER_SECTION: usize = 64 * 1024;

/// Most fields a response head may have here, as pingora's client allows (regression: a head
/// of 129 to 256 fields failed the fill with a 502 and passed pingora's path).
const MAX_RESPONSE_FIELDS: usize = 256;

/// Fields most response heads stay within: parsed first with room for these only, since the
/// parser's array is set up in full for every miss.
const COMMON_RESPONSE_FIELDS: usize = 64;

/// What became of a request offered to [`super::fast::FrontDoor::fill`].
pub enum Filled {
    /// Nothing was sent anywhere: pingora's path answers the request.
    Declined,
    /// Answered; `close`: the connection ends after it.
    Answered { close: bool },
}

/// Kept-alive connections to origins, by address.
#[derive(Default)]
pub struct IdleOrigins(Mutex<HashMap<SocketAddr, Vec<TcpStream>>>);

impl IdleOrigins {
    /// The most recently used idle connection to `addr` that holds nothing unread. One the
    /// origin wrote to while it sat idle (a `408` some servers send before they close one) or
    /// closed is dropped: what it holds answers no request of ours, and read as the answer to
    /// the next would hand that request someone else's response.
    fn take(&self, addr: &SocketAddr) -> Option<TcpStream> {
        let mut idle = self.0.lock().ok()?;
        let conns = idle.get_mut(addr)?;
        while let Some(conn) = conns.pop() {
            // Free unless the reactor saw the socket readable since it was last drained: a
            // read then, to tell data or its end from a readiness already spent.
            match conn.try_read(&mut [0u8; 1]) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Some(conn),
                _ => continue,
            }
        }
        None
    }

    fn put(&self, addr: SocketAddr, conn: TcpStream) {
        if let Ok(mut idle) = self.0.lock() {
            let conns = idle.entry(addr).or_default();
            if conns.len() < MAX_IDLE_PER_ORIGIN {
                conns.push(conn);
            }
        }
    }
}

/// A request the front door may fill, as far as its head tells.
pub struct FillRequest<'a, F> {
    pub target: &'a str,
    pub close: bool,
    pub fields: &'a F,
    /// The raw fields in order, as the client sent them.
    pub raw: &'a [httparse::Header<'a>],
}

/// How a response's body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    None,
    Length(usize),
    Chunked,
    UntilClose,
}

/// Why the origin exchange failed, named as pingora names it in `skua_origin_errors_total`.
#[derive(Debug, Clone, Copy)]
enum OriginError {
    Timeout,
    Closed,
    Io,
    Malformed,
}

impl OriginError {
    fn as_str(self) -> &'static str {
        match self {
            OriginError::Timeout => "ReadTimedout",
            OriginError::Closed => "ConnectionClosed",
            OriginError::Io => "ReadError",
            OriginError::Malformed => "InvalidHTTPHeader",
        }
    }
}

/// An origin connection with what has been read from it past the response head.
struct Origin {
    conn: TcpStream,
    addr: SocketAddr,
    buf: BytesMut,
    read_timeout: Duration,
}

impl Origin {
    async fn read_more(&mut self) -> Result<usize, OriginError> {
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(16 * 1024);
        }
        match fast_timeout(self.read_timeout, self.conn.read_buf(&mut self.buf)).await {
            Ok(Ok(n)) => Ok(n),
            Ok(Err(_)) => Err(OriginError::Io),
            Err(_) => Err(OriginError::Timeout),
        }
    }

    /// Reads the next final response head (or a `101`, which the caller refuses); returns it
    /// and its length in `buf`. Interim answers before it (RFC 9110 §15.2): `100 Continue` is
    /// dropped (a `GET` sent no body to continue, and its client expected nothing); any other,
    /// such as `103 Early Hints` (RFC 8297), goes to the `client` at once, as pingora's path
    /// sends it: "A proxy MUST forward 1xx responses unless the proxy itself requested the
    /// generation of the 1xx response" (regression: it failed the miss with a 502).
    async fn read_head(
        &mut self,
        client: &mut Downstream<'_>,
    ) -> Result<(ResponseHeader, usize), OriginError> {
        loop {
            let parsed = parse_head(&self.buf)?;
            match parsed {
                Some((mut head, n)) if head.status.is_informational() && head.status != 101 => {
                    let _ = self.buf.split_to(n);
                    if head.status != 100 {
                        crate::cache::policy::strip_hop_by_hop(&mut head);
                        let mut wire = Vec::with_capacity(n + 16);
                        super::respond::head_to_wire(&head, &mut wire);
                        // A client gone is found out when the final answer is written.
                        client.send(&wire).await;
                    }
                }
                Some(done) => return Ok(done),
                None => {
                    if self.buf.len() > MAX_RESPONSE_HEAD {
                        return Err(OriginError::Malformed);
                    }
                    if self.read_more().await? == 0 {
                        return Err(OriginError::Closed);
                    }
                }
            }
        }
    }

    /// The next piece of a body framed by `framing`, `None` at its end. `left` counts what a
    /// `Content-Length` or the current chunk still owes. What `client` holds is sent before
    /// this waits on the origin.
    async fn next_piece(
        &mut self,
        framing: Framing,
        left: &mut usize,
        client: &mut ToClient<'_, '_>,
    ) -> Result<Option<Bytes>, OriginError> {
        loop {
            match framing {
                Framing::None => return Ok(None),
                Framing::Length(_) if *left == 0 => return Ok(None),
                Framing::Length(_) | Framing::Chunked if *left > 0 && !self.buf.is_empty() => {
                    let n = self.buf.len().min(*left);
                    *left -= n;
                    return Ok(Some(self.buf.split_to(n).freeze()));
                }
                Framing::UntilClose if !self.buf.is_empty() => {
                    return Ok(Some(self.buf.split().freeze()));
                }
                Framing::Chunked if *left == 0 => {
                    if let Some(next) = self.chunk_boundary()? {
                        match next {
                            Some(size) => *left = size,
                            None => return Ok(None),
                        }
                        continue;
                    }
                }
                _ => {}
            }
            client.send().await;
            if self.read_more().await? == 0 {
                return if framing == Framing::UntilClose {
                    Ok(None)
                } else {
                    Err(OriginError::Closed)
                };
            }
        }
    }

    /// At a chunk boundary (RFC 9112 §7.1): consumes the CRLF ending the previous chunk's data,
    /// if any, and the next size line. `Some(Some(size))`: a chunk follows; `Some(None)`: the
    /// last chunk and its trailer section were consumed; `None`: more bytes are needed.
    fn chunk_boundary(&mut self) -> Result<Option<Option<usize>>, OriginError> {
        let mut at = 0;
        while self.buf.get(at).is_some_and(|b| *b == b'\r' || *b == b'\n') && at < 2 {
            at += 1;
        }
        let rest = &self.buf[at..];
        let size = match httparse::parse_chunk_size(rest) {
            Ok(httparse::Status::Complete((n, size))) => (n, size),
            Ok(httparse::Status::Partial) if rest.len() > MAX_CHUNK_SIZE_LINE => {
                return Err(OriginError::Malformed)
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err(OriginError::Malformed),
        };
        let (line, size) = size;
        let size = usize::try_from(size).map_err(|_| OriginError::Malformed)?;
        if size > 0 {
            let _ = self.buf.split_to(at + line);
            return Ok(Some(Some(size)));
        }
        // The last chunk: trailer fields up to an empty line (RFC 9112 §7.1.2), dropped as
        // pingora drops them.
        let trailers = &self.buf[at + line..];
        let end = if trailers.starts_with(b"\r\n") {
            Some(2)
        } else if trailers.starts_with(b"\n") {
            Some(1)
        } else {
            memchr::memmem::find(trailers, b"\r\n\r\n").map(|i| i + 4)
        };
        match end {
            Some(end) => {
                let _ = self.buf.split_to(at + line + end);
                Ok(Some(None))
            }
            None if trailers.len() > MAX_TRAILER_SECTION => Err(OriginError::Malformed),
            None => Ok(None),
        }
    }
}

/// The client's connection, and how long a write to it may wait for the client to read
/// (`[server] send_timeout`).
pub struct Downstream<'a> {
    pub stream: &'a mut Stream,
    pub send_timeout: Duration,
}

impl Downstream<'_> {
    /// Writes and flushes `bytes`: false when the client is gone, or stopped reading for the
    /// send timeout.
    async fn send(&mut self, bytes: &[u8]) -> bool {
        let timeout = self.send_timeout;
        within(timeout, self.stream.write_all(bytes)).await.is_ok()
            && within(timeout, self.stream.flush()).await.is_ok()
    }
}

/// What the client has yet to be sent of a fill's answer. Sent when it outgrows
/// [`SEND_AT`] and whenever the fill is about to wait on the origin: an answer that arrives
/// whole leaves in one write, and one the origin sends slowly (a page flushed early, an event
/// stream) reaches the client as it comes (regression: the head and body were held until
/// 64 KiB or the end of the body).
struct ToClient<'a, 'b> {
    out: Vec<u8>,
    downstream: &'a mut Downstream<'b>,
    /// No write to the client has failed.
    ok: bool,
    /// Some of the answer (its head first) has been written.
    begun: bool,
}

/// Bytes of the answer after which they are sent without waiting for more.
const SEND_AT: usize = 64 * 1024;

impl ToClient<'_, '_> {
    async fn send(&mut self) {
        if self.ok && !self.out.is_empty() {
            self.begun = true;
            self.ok = self.downstream.send(&self.out).await;
        }
        self.out.clear();
    }
}

/// A complete response head at the start of `buf` and its length, `None` if more is needed.
/// Not async: the parser's field array stays on this call's stack, out of the fill's future.
fn parse_head(buf: &[u8]) -> Result<Option<(ResponseHeader, usize)>, OriginError> {
    parse_head_within::<COMMON_RESPONSE_FIELDS>(buf).or_else(|error| match error {
        Some(error) => Err(error),
        None => parse_long_head(buf),
    })
}

/// [`parse_head`] for a head of more than [`COMMON_RESPONSE_FIELDS`] fields.
#[inline(never)]
fn parse_long_head(buf: &[u8]) -> Result<Option<(ResponseHeader, usize)>, OriginError> {
    parse_head_within::<MAX_RESPONSE_FIELDS>(buf).map_err(|e| e.unwrap_or(OriginError::Malformed))
}

/// [`parse_head`] with room for `FIELDS` fields; `Err(None)`: the head has more.
fn parse_head_within<const FIELDS: usize>(
    buf: &[u8],
) -> Result<Option<(ResponseHeader, usize)>, Option<OriginError>> {
    let mut fields = [httparse::EMPTY_HEADER; FIELDS];
    let mut resp = httparse::Response::new(&mut fields);
    // As pingora's path reads a response head. RFC 9112 §5.1: a proxy "MUST remove any such
    // whitespace [between a field name and its colon] from a response message before
    // forwarding"; §5.2: it may replace each obs-fold with SP ([`unfolded`]). Regression:
    // the front door answered such an origin 502 where pingora's path served the page.
    let mut parser = httparse::ParserConfig::default();
    parser.allow_spaces_after_header_name_in_responses(true);
    parser.allow_obsolete_multiline_headers_in_responses(true);
    match parser.parse_response(&mut resp, buf) {
        Ok(httparse::Status::Complete(n)) => {
            Ok(Some((to_header(&resp, &buf[..n]).map_err(Some)?, n)))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(None),
        Err(_) => Err(Some(OriginError::Malformed)),
    }
}

/// The origin's response head as pingora's header type, the names in the case they came in.
/// `head` is the head's bytes, which `resp` was read from: its names and values are slices of
/// one copy of them, two allocations per field fewer than a copy of each (benches/README.md
/// §50).
fn to_header(
    resp: &httparse::Response<'_, '_>,
    head: &[u8],
) -> Result<ResponseHeader, OriginError> {
    let status = resp.code.ok_or(OriginError::Malformed)?;
    let mut header = ResponseHeader::build(status, Some(resp.headers.len()))
        .map_err(|_| OriginError::Malformed)?;
    if let Some(reason) = resp.reason {
        let _ = header.set_reason_phrase(Some(reason));
    }
    let copy = Bytes::copy_from_slice(head);
    // httparse's names and values all lie in `head`; one that did not would be no head.
    let slice_of = |part: &[u8]| {
        let at = (part.as_ptr() as usize).checked_sub(head.as_ptr() as usize);
        let range = at.and_then(|at| Some(at..at.checked_add(part.len())?));
        range
            .filter(|range| range.end <= copy.len())
            .map(|range| copy.slice(range))
            .ok_or(OriginError::Malformed)
    };
    for f in resp.headers.iter() {
        let value = match unfolded(f.value) {
            std::borrow::Cow::Borrowed(value) => {
                http::HeaderValue::from_maybe_shared(slice_of(value)?)
            }
            std::borrow::Cow::Owned(value) => http::HeaderValue::from_bytes(&value),
        }
        .map_err(|_| OriginError::Malformed)?;
        let name = slice_of(f.name.as_bytes())?;
        header
            .append_header(name, value)
            .map_err(|_| OriginError::Malformed)?;
    }
    Ok(header)
}

/// A field value with each obs-fold (a line break followed by spaces or tabs, RFC 9112 §5.2)
/// replaced by one SP, as pingora's path reads it. Not pingora's `header_value_from_slice`,
/// which does the same but builds the value unchecked (its undefined behaviour on bytes its
/// parser did not vouch for); the value here goes through `HeaderValue::from_bytes`.
fn unfolded(value: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if !value.contains(&b'\n') {
        return std::borrow::Cow::Borrowed(value);
    }
    let mut out = Vec::with_capacity(value.len());
    for line in value.split(|b| *b == b'\n') {
        let line = line.trim_ascii();
        if line.is_empty() {
            continue;
        }
        if !out.is_empty() {
            out.push(b' ');
        }
        out.extend_from_slice(line);
    }
    std::borrow::Cow::Owned(out)
}

/// How a response's body is delimited (RFC 9112 §6.3), and whether the connection can carry
/// another request after it; `Err` for a `Content-Length` that cannot frame it.
fn framing_of(resp: &ResponseHeader, http10: bool) -> Result<(Framing, bool), OriginError> {
    let status = resp.status.as_u16();
    // RFC 9112 §9.6: a client that receives "close" "MUST cease sending requests on that
    // connection".
    let keepalive = !http10
        && !resp.headers.get_all(header::CONNECTION).iter().any(|v| {
            v.as_bytes()
                .split(|b| *b == b',')
                .any(|o| o.trim_ascii().eq_ignore_ascii_case(b"close"))
        });
    if (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok((Framing::None, keepalive));
    }
    // §6.3 item 4: chunked when it is the final coding, read until close otherwise.
    if let Some(chunked) = chunked_last(&resp.headers) {
        return Ok(if chunked {
            (Framing::Chunked, keepalive)
        } else {
            (Framing::UntilClose, false)
        });
    }
    Ok(match content_length(&resp.headers)? {
        Some(n) => (Framing::Length(n), keepalive),
        None => (Framing::UntilClose, false),
    })
}

/// Whether `chunked` is the last transfer coding (the last field's last, as pingora's path
/// reads it); `None` without `Transfer-Encoding`.
fn chunked_last(headers: &http::HeaderMap) -> Option<bool> {
    let te = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .next_back()?;
    let last = te.as_bytes().rsplit(|b| *b == b',').next();
    Some(last.is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked")))
}

/// A list of identical `Content-Length` values (`4, 4`, or the field twice) made the one
/// value it means (RFC 9110 §8.6), as the front door sends it: pingora's path passed the list
/// on, which a strict client may refuse as the "unrecoverable error" RFC 9112 §6.3 calls it,
/// and its range filter could not read it. And none on a `204` (§8.6: "A server MUST NOT
/// send a Content-Length header field in any response with a status code of ... 204"), which
/// both paths passed on.
pub(super) fn one_content_length(resp: &mut ResponseHeader) {
    if resp.status == http::StatusCode::NO_CONTENT {
        resp.remove_header(&header::CONTENT_LENGTH);
        return;
    }
    if single_length_field(&resp.headers) || resp.headers.contains_key(header::TRANSFER_ENCODING) {
        return;
    }
    if let Ok(Some(n)) = content_length(&resp.headers) {
        let _ = resp.insert_header(header::CONTENT_LENGTH, n);
    }
}

/// Whether `Content-Length` is one field of digits alone, as most origins send it, or absent:
/// nothing to rewrite.
fn single_length_field(headers: &http::HeaderMap) -> bool {
    let mut fields = headers.get_all(header::CONTENT_LENGTH).iter();
    let one = fields.next();
    fields.next().is_none() && one.is_none_or(|v| v.as_bytes().iter().all(u8::is_ascii_digit))
}

/// The length every `Content-Length` value gives, `None` without one
/// ([`guard::agreed_length`]). RFC 9112 §6.3 item 5: for any other, invalid or conflicting, the
/// proxy "MUST close the connection to the server, discard the received response, and send a
/// 502".
fn content_length(headers: &http::HeaderMap) -> Result<Option<usize>, OriginError> {
    let values = headers.get_all(header::CONTENT_LENGTH).iter();
    match guard::agreed_length(values.map(|v| v.as_bytes())) {
        Ok(n) => n
            .map(usize::try_from)
            .transpose()
            .map_err(|_| OriginError::Malformed),
        Err(_) => Err(OriginError::Malformed),
    }
}

impl super::fast::FrontDoor {
    /// Whether the disk tier may hold something of the URL memory holds nothing of (`looked`):
    /// a disk hit is the full path's, and until the disk tier has listed its segments, nothing
    /// is known of what it holds. Asked first, before the request is parsed again, as every
    /// disk hit comes this way.
    pub(super) fn may_be_on_disk(&self, looked: &Looked) -> bool {
        let primary = looked.primary();
        self.state()
            .store
            .disk
            .is_some_and(|disk| !disk.loaded() || disk.holds(&primary))
    }

    /// Fetches, stores and answers a miss the front door's lookup found nothing for, when
    /// this path can do all of it as pingora's path would (module documentation). `looked`:
    /// the front door's lookup; `client`, `closing`: as for [`Self::answer`].
    #[allow(clippy::too_many_arguments)]
    pub async fn fill<F: RequestFields>(
        &self,
        req: FillRequest<'_, F>,
        settings: &Settings,
        looked: &Looked,
        client: &impl Fn() -> Option<IpAddr>,
        closing: bool,
        started: Instant,
        downstream: &mut Downstream<'_>,
    ) -> Filled {
        let shared = self.state();
        let Some(url) = looked.url() else {
            return Filled::Declined;
        };
        if closing || url.path_and_query.starts_with(super::HEALTH_PATH) {
            return Filled::Declined;
        }
        // `no-store` and `only-if-cached` are pingora's path's to honour.
        if crate::cache::directives::RequestAsks::of(req.fields).any() {
            return Filled::Declined;
        }
        let pools = shared.pools.load();
        let Some(pool) = pools.get(pools.for_host(&url.host)) else {
            return Filled::Declined;
        };
        if pool.uses_tls() {
            return Filled::Declined;
        }
        let primary = looked.primary();
        let key = url.cache_key_hashed(primary);
        // A URL whose last answer could not be stored is fetched without the lock: the lock
        // would only queue concurrent readers one answer head apart (`cache::hit_for_miss`).
        let hit_for_miss = shared.hit_for_miss.remembered(&primary);
        let mut permit = if hit_for_miss {
            None
        } else {
            match shared.lock.lock(&key, false) {
                Locked::Write(permit) => Some(permit),
                Locked::Read(_) => return Filled::Declined,
            }
        };
        // A fill that landed between the front door's lookup and the lock (pingora's path
        // looks again at this point too, `proxy_upstream_filter`).
        if !shared.store.memory.look(&primary).holds_nothing() || self.may_be_on_disk(looked) {
            release(shared.lock, &key, permit, LockStatus::Done);
            return Filled::Declined;
        }
        let primary_text = || url.primary();
        let from_proxy = guard::trusted(&settings.trusted_proxies, client());
        let request_id = settings.request_id.then(|| {
            let given = req.fields.values(super::request_id::X_REQUEST_ID_NAME);
            super::request_id::for_request(given, from_proxy)
        });
        // What names the request in its log line and on an error page.
        let ids = (url, request_id.as_deref());
        let (request, forwarded_for) = upstream_request(
            &req,
            (url.scheme, url.path_and_query.as_str()),
            settings,
            (from_proxy, request_id.as_deref()),
            client(),
            &shared.via,
        );

        // The origins this request failed on, each before a byte of its answer arrived: as on
        // pingora's path (`error_while_proxy`), each other origin of the pool is tried once.
        let mut failed: Vec<SocketAddr> = Vec::new();
        let mut last_error = None;
        let mut retried_on_status = false;
        let exchanged = 'origins: loop {
            // Every origin at its `max_connections`: pingora's path waits for room, or serves a
            // stale copy, or answers 503.
            let claim = pool.claim_now(primary_text, url.host_name(), &failed);
            let (addr, peer, origin_room) = match claim {
                Ok(Claim::Got(peer, room)) => match peer._address.as_inet().copied() {
                    Some(addr) => (addr, peer, room),
                    None => break 'origins None,
                },
                _ => break 'origins None,
            };
            let read_timeout = peer.options.read_timeout.unwrap_or(Duration::from_secs(60));
            let connect_timeout = peer
                .options
                .connection_timeout
                .unwrap_or(Duration::from_secs(10));
            // Sent on a kept-alive connection first; one the origin closed meanwhile is retried
            // on a new one, as pingora retries a reused connection that fails before any answer.
            let mut pooled = self.idle.take(&addr);
            let sent = SystemTime::now();
            let error = loop {
                let reused = pooled.is_some();
                let conn = match pooled.take() {
                    Some(conn) => conn,
                    None => match fast_timeout(connect_timeout, TcpStream::connect(addr)).await {
                        Ok(Ok(conn)) => {
                            let _ = conn.set_nodelay(true);
                            conn
                        }
                        // After a retry (`retry_statuses`) the first origin has had the
                        // request: a failure here is the answer, or pingora's path would send
                        // it there again.
                        Ok(Err(_)) if retried_on_status => break OriginError::Io,
                        Err(_) if retried_on_status => break OriginError::Timeout,
                        // Nothing was sent: pingora's path tries the pool's other origins.
                        // After an origin failed here, its failure is the answer instead.
                        _ => break 'origins None,
                    },
                };
                let mut origin = Origin {
                    conn,
                    addr,
                    buf: BytesMut::with_capacity(8 * 1024),
                    read_timeout,
                };
                if origin.conn.write_all(&request).await.is_err() {
                    if reused {
                        continue;
                    }
                    break OriginError::Io;
                }
                match origin.read_head(downstream).await {
                    // As pingora's path (`retry_on_status`): an answer with one of the pool's
                    // `retry_statuses` is dropped, with its connection, and the request sent
                    // once more to another origin.
                    Ok((resp, _))
                        if !retried_on_status
                            && pool.retries_on(resp.status.as_u16())
                            && pool.another_healthy(&[failed.as_slice(), &[addr]].concat()) =>
                    {
                        retried_on_status = true;
                        let waited = SystemTime::now().duration_since(sent).unwrap_or_default();
                        pool.series(&shared.metrics)
                            .observe(resp.status.as_u16(), waited);
                        failed.push(addr);
                        continue 'origins;
                    }
                    Ok((resp, n)) => break 'origins Some((origin, resp, n, sent, origin_room)),
                    Err(OriginError::Closed | OriginError::Io)
                        if reused && origin.buf.is_empty() =>
                    {
                        continue
                    }
                    // Closed, reset or silent before a byte of the answer: the request may be
                    // sent on (a GET, RFC 9110 §9.2.2).
                    Err(e @ (OriginError::Closed | OriginError::Io | OriginError::Timeout))
                        if origin.buf.is_empty() =>
                    {
                        break e
                    }
                    Err(e) => {
                        release(shared.lock, &key, permit, LockStatus::TransientError);
                        shared.metrics.origin_error(&pool.name, e.as_str());
                        self.origin_failed(e, &req, ids, client, started, downstream)
                            .await;
                        return Filled::Answered { close: true };
                    }
                }
            };
            failed.push(addr);
            pool.failed(&addr);
            shared.metrics.origin_error(&pool.name, error.as_str());
            last_error = Some(error);
        };
        let Some((mut origin, resp, head_len, sent, _origin_room)) = exchanged else {
            release(shared.lock, &key, permit, LockStatus::TransientError);
            let Some(error) = last_error else {
                return Filled::Declined;
            };
            self.origin_failed(error, &req, ids, client, started, downstream)
                .await;
            return Filled::Answered { close: true };
        };
        let waited = SystemTime::now().duration_since(sent).unwrap_or_default();
        pool.series(&shared.metrics)
            .observe(resp.status.as_u16(), waited);
        let http10 = origin.buf.starts_with(b"HTTP/1.0");
        let _ = origin.buf.split_to(head_len);
        let mut resp = resp;
        // Read before the hop-by-hop fields go (regression: an origin's `Connection: close`
        // was removed unseen, and its connection kept for the next miss).
        let framing = framing_of(&resp, http10);
        // RFC 9110 §7.6.1: what the origin addressed to its own connection goes no further.
        crate::cache::policy::strip_hop_by_hop(&mut resp);
        let status = resp.status.as_u16();
        let (framing, origin_keepalive) = match framing {
            Ok(framing) => framing,
            Err(error) => {
                release(shared.lock, &key, permit, LockStatus::TransientError);
                shared.metrics.origin_error(&pool.name, error.as_str());
                self.origin_failed(error, &req, ids, client, started, downstream)
                    .await;
                return Filled::Answered { close: true };
            }
        };
        // The length the body is framed by, once, as the client gets it; RFC 9112 §6.3 item 3:
        // with `Transfer-Encoding`, a sender "MUST remove the received Content-Length field".
        match framing {
            Framing::Length(n) if !single_length_field(&resp.headers) => {
                let _ = resp.insert_header(header::CONTENT_LENGTH, n);
            }
            Framing::Chunked | Framing::UntilClose => {
                resp.remove_header(&header::CONTENT_LENGTH);
            }
            Framing::None => one_content_length(&mut resp),
            Framing::Length(_) => {}
        }
        if status == 101 {
            // A switch of protocols nobody asked for (the front door declines `Upgrade`): the
            // origin's error, as on pingora's path. `read_head` passed every other interim
            // answer on.
            release(shared.lock, &key, permit, LockStatus::TransientError);
            let error = OriginError::Malformed;
            shared.metrics.origin_error(&pool.name, error.as_str());
            self.origin_failed(error, &req, ids, client, started, downstream)
                .await;
            return Filled::Answered { close: true };
        }
        // Counted before the client can read a byte of the answer: whoever reads the metric
        // after the response (a test, an operator's scrape) sees this fill.
        shared.metrics.front_door_fills.inc();
        if hit_for_miss {
            shared.metrics.hit_for_miss.inc();
        }

        // A compressible response is compressed once, before it is stored, as pingora's path
        // does it (`proxy::compress`): brotli for the brotli clients' copy, gzip otherwise.
        let mut before_storing = BeforeStoring::new(settings, req.fields, &mut resp, framing).await;

        // What is stored, decided as `response_cache_filter` decides it.
        let mut stored_head = resp.clone();
        let decided = settings.policy.decide(&mut stored_head, false, sent, None);
        let declared = resp.headers.get(header::CONTENT_LENGTH).and_then(|v| {
            std::str::from_utf8(v.as_bytes())
                .ok()?
                .trim()
                .parse::<usize>()
                .ok()
        });
        let max = shared.store.max_object_size();
        let refused = decided.as_ref().err().copied();
        // As on pingora's path (`response_cache_filter`): a copy a ban may have been meant for
        // is not stored, and speaks for this moment only, not for the URL (no hit-for-miss
        // mark).
        let invalidations = &shared.store.invalidations;
        let banned = (decided.as_ref())
            .is_ok_and(|f| invalidations.banned_before_storing(url, f.created, &resp.headers));
        let storable = match decided {
            Ok(_) if banned => None,
            Ok(f) => Some(f),
            Err(reason) => {
                shared
                    .metrics
                    .uncacheable
                    .with_label_values(&[reason.as_str()])
                    .inc();
                None
            }
        };
        // pingora's path reports a storable response whose declared length is past the largest
        // object as a miss it does not store (`ResponseTooLarge`), without ranges.
        let too_large = declared.is_some_and(|n| n > max);
        let meta = storable.as_ref().filter(|_| !too_large).map(|f| {
            let mut meta = CacheMeta::new(
                f.fresh_until,
                f.created,
                f.stale_while_revalidate_sec,
                f.stale_if_error_sec,
                stored_head,
            );
            meta.extensions_mut().insert(f.age_when_heard);
            let as_forwarded = AsForwarded {
                fields: req.fields,
                forwarded_for: forwarded_for.clone().and_then(|r| request.get(r)),
                settings,
                from_proxy,
            };
            // Nothing is stored for the URL (else pingora's path fills it): no stale copy.
            let brotli_declined = vary::mark_brotli_declined(&mut meta, &as_forwarded, None);
            let stored = meta.response_header();
            if let Some(variance) = vary::variance(stored, brotli_declined, &as_forwarded) {
                meta.set_variance_key(variance);
            }
            meta
        });
        let outcome = Outcome {
            phase: if meta.is_some() {
                CachePhase::Miss
            } else if too_large && storable.is_some() {
                CachePhase::Disabled(NoCacheReason::ResponseTooLarge)
            } else {
                CachePhase::Disabled(NoCacheReason::Custom("uncacheable"))
            },
            fast_hit: false,
            local_hit: false,
            pass: None,
            internal: false,
            stored: storable.is_some(),
            fresh_until: storable.as_ref().map(|f| f.fresh_until),
            ttl_rule: false,
            fwd_status: None,
        };

        // The client's head, as pingora's path writes it.
        if status == 200 && declared.is_some() && !too_large {
            // pingora's range filter, which runs on every response to a request that could use
            // the cache: a 200 of known length may be served in ranges (as nginx announces).
            let _ = resp.insert_header(header::ACCEPT_RANGES, "bytes");
        }
        // A body of unknown length goes to the client in chunks, announced where pingora's
        // path announces it, before the cache's marks.
        if framing != Framing::None
            && !resp.headers.contains_key(header::TRANSFER_ENCODING)
            && !resp.headers.contains_key(header::CONTENT_LENGTH)
        {
            let _ = resp.insert_header(header::TRANSFER_ENCODING, "chunked");
        }
        let now = SystemTime::now();
        let disposition = outcome.disposition();
        let marked = hit::mark(
            &mut resp,
            disposition,
            outcome.cache_status(&shared.name, now),
            settings.downstream_cache_control.as_ref(),
            None,
            now,
            settings.server_timing.then_some(&*shared.name),
        );
        // A copy in an encoding the client does not take is decoded on its way out, by the
        // context pingora's path runs as a downstream module (`compress::DecompressBuilder`).
        let mut decode = (resp.headers.contains_key(header::CONTENT_ENCODING)
            && !super::compress::forbids_transform(&resp))
        .then(|| super::compress::accepted_by(req.fields))
        .flatten()
        .map(|asked| {
            let mut ctx = Box::new(super::compress::downstream_context());
            ctx.request_filter(asked);
            ctx.response_header_filter(&mut resp, framing == Framing::None);
            ctx
        })
        .filter(|ctx| ctx.is_enabled());
        // A transfer coding other than chunked last (`identity`, which RFC 9112 dropped) frames
        // the body by the connection's close, as the origin sent it and as pingora's path
        // passes it on. Regression: its body went out in chunks the head did not announce.
        let unchunked_coding = chunked_last(&resp.headers) == Some(false);
        let close = req.close || marked.is_err() || unchunked_coding;
        // As pingora's HTTP/1 server writes every response head: its own `Date`, `Connection`,
        // and chunks for a body of unknown length.
        let _ = resp.insert_header(
            header::DATE,
            pingora::protocols::http::date::get_cached_date(),
        );
        let _ = resp.insert_header(
            header::CONNECTION,
            if close { "close" } else { "keep-alive" },
        );
        let chunked_out = framing != Framing::None
            && !unchunked_coding
            && (resp.headers.contains_key(header::TRANSFER_ENCODING)
                || !resp.headers.contains_key(header::CONTENT_LENGTH));
        if chunked_out && !resp.headers.contains_key(header::TRANSFER_ENCODING) {
            let _ = resp.insert_header(header::TRANSFER_ENCODING, "chunked");
        }
        let mut out = Vec::with_capacity(512);
        super::respond::head_to_wire(&resp, &mut out);
        let mut client_out = ToClient {
            out,
            downstream,
            ok: true,
            begun: false,
        };

        // A piece (`None`: the end) as the client gets it (decoded if it must be), framed;
        // the bytes it adds. Once the body fails to decode, no more of it goes to the client.
        let to_client = |decode: &mut Option<Box<ResponseCompressionCtx>>,
                         undecodable: &mut bool,
                         piece: Option<&Bytes>,
                         out: &mut Vec<u8>|
         -> u64 {
            let data = match decode {
                _ if *undecodable => None,
                Some(ctx) => {
                    super::compress::decode(ctx, piece, piece.is_none()).unwrap_or_else(|_| {
                        *undecodable = true;
                        None
                    })
                }
                None => piece.cloned(),
            };
            match data.filter(|d| !d.is_empty()) {
                Some(data) => {
                    push_body(out, &data, chunked_out);
                    data.len() as u64
                }
                None => 0,
            }
        };
        // The body, streamed to the client as it comes and kept for storing.
        let mut kept = Kept {
            pieces: meta.as_ref().map(|_| Vec::new()),
            len: 0,
            hold: shared.store.fills.hold(),
        };
        let mut left = match framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        let mut body_bytes = 0u64;
        let mut complete = true;
        // The body does not decode for this client (`compress::decode`).
        let mut undecodable = false;
        // Nothing to store: those waiting on the lock go to the origin now, as on pingora's
        // path, not when the body ends; and the next misses on the URL take no lock.
        if kept.pieces.is_none() {
            release(shared.lock, &key, permit.take(), LockStatus::GiveUp);
            let storability = match refused {
                Some(reason) => Some(Storability::Refused(reason, status)),
                None if banned => None,
                None => Some(Storability::TooLarge),
            };
            if let Some(storability) = storability {
                shared.hit_for_miss.answered(&primary, storability);
            }
        }
        loop {
            let piece = origin.next_piece(framing, &mut left, &mut client_out);
            let piece = match piece.await {
                Ok(piece) => piece,
                Err(e) => {
                    complete = false;
                    shared.metrics.origin_error(&pool.name, e.as_str());
                    None
                }
            };
            let Some(piece) = piece else { break };
            let Some(piece) = before_storing.piece(Some(piece), false).await else {
                continue;
            };
            let out = &mut client_out.out;
            body_bytes += to_client(&mut decode, &mut undecodable, Some(&piece), out);
            if kept.keep(max, piece) {
                // Too large: nobody stores it, so nobody waits. No room: one waiting request
                // fetches in this one's place, and may store it.
                let status = if kept.no_room() {
                    shared.metrics.no_room_to_fill();
                    LockStatus::TransientError
                } else {
                    LockStatus::GiveUp
                };
                release(shared.lock, &key, permit.take(), status);
            }
            if client_out.out.len() >= SEND_AT {
                client_out.send().await;
            }
            if !client_out.ok {
                // The rest of the body stays unread: neither stored nor the connection kept.
                complete = false;
                break;
            }
        }
        let out = &mut client_out.out;
        if complete {
            if let Some(last) = before_storing.piece(None, true).await {
                body_bytes += to_client(&mut decode, &mut undecodable, Some(&last), out);
                if kept.keep(max, last) && kept.no_room() {
                    shared.metrics.no_room_to_fill();
                }
            }
            before_storing.count(&shared.metrics);
            body_bytes += to_client(&mut decode, &mut undecodable, None, out);
            if chunked_out && !undecodable {
                out.extend_from_slice(b"0\r\n\r\n");
            }
        }
        let mut answered = (status, body_bytes, disposition);
        if undecodable {
            // The origin's answer is stored as it came (a client that takes its encoding gets
            // what the origin sent, as from any cache). This client's answer, if not begun, is
            // a 502, as on pingora's path; one begun ends with what decoded, the connection
            // closed before the body's end, so the client knows its page is incomplete.
            let kind = super::compress::BAD_CONTENT_ENCODING;
            shared.metrics.origin_error(&pool.name, kind);
            if !client_out.begun {
                let facts = super::respond::PageFacts {
                    status: 502,
                    message: super::compress::UNDECODABLE,
                    node: &shared.name,
                    client: client(),
                    request_id: ids.1,
                };
                let page = settings.error_page.as_deref();
                client_out.out = super::respond::error_wire(page, facts);
                answered = (502, 0, Disposition::IntFront);
            }
        }
        // Stored before the client reads the end of the body: a client that has the whole
        // answer finds it stored when it asks again, and those waiting on the lock go sooner.
        // A body the client stopped reading partway is incomplete here and is not stored.
        let streamed_too_large = meta.is_some() && kept.pieces.is_none() && !kept.no_room();
        let stored = match (kept.pieces, meta, complete) {
            (Some(pieces), Some(meta), true) => store(shared.store, &key, &meta, pieces).await,
            _ => false,
        };
        // What was kept is in a tier now (bounded by its own size) or dropped.
        kept.hold.release();
        if stored {
            shared
                .hit_for_miss
                .answered(&primary, Storability::Storable);
        } else if streamed_too_large {
            shared
                .hit_for_miss
                .answered(&primary, Storability::TooLarge);
        }
        release(
            shared.lock,
            &key,
            permit,
            if stored {
                LockStatus::Done
            } else if complete {
                LockStatus::GiveUp
            } else {
                LockStatus::TransientError
            },
        );
        client_out.send().await;
        if complete && origin_keepalive && origin.buf.is_empty() {
            self.idle.put(origin.addr, origin.conn);
        }
        self.log(
            &req,
            ids,
            client,
            started,
            answered,
            Some((origin.addr, waited)),
        );
        Filled::Answered {
            close: close || !complete || !client_out.ok || undecodable,
        }
    }

    /// The access log's line and the metrics of an answered fill: status, body bytes sent
    /// and how it was answered.
    fn log<F: RequestFields>(
        &self,
        req: &FillRequest<'_, F>,
        (url, request_id): (&crate::cache::key::CacheUrl, Option<&str>),
        client: &impl Fn() -> Option<IpAddr>,
        started: Instant,
        (status, body_bytes, disposition): (u16, u64, Disposition),
        origin: Option<(std::net::SocketAddr, std::time::Duration)>,
    ) {
        self.state().record(&Served {
            client,
            method: "GET",
            target: &|| std::borrow::Cow::Borrowed(req.target),
            protocol: "HTTP/1.1",
            scheme: url.scheme,
            url: Some(url),
            headers: req.fields,
            authority: None,
            status,
            body_bytes,
            disposition,
            hit_path: None,
            started,
            origin,
            request_id,
        });
    }

    /// Answers a request whose origin failed before its response head arrived, as
    /// `fail_to_proxy` does: 504 for a timeout, 502 otherwise, and the connection closed. The
    /// failure is counted where it happened (`Metrics::origin_error`).
    async fn origin_failed<F: RequestFields>(
        &self,
        error: OriginError,
        req: &FillRequest<'_, F>,
        (url, request_id): (&crate::cache::key::CacheUrl, Option<&str>),
        client: &impl Fn() -> Option<IpAddr>,
        started: Instant,
        downstream: &mut Downstream<'_>,
    ) {
        let shared = self.state();
        shared.metrics.front_door_fills.inc();
        let (status, message) = match error {
            OriginError::Timeout => (504, "origin timed out"),
            _ => (502, "origin unreachable or failed"),
        };
        let page = shared.settings.load().error_page.clone();
        let facts = super::respond::PageFacts {
            status,
            message,
            node: &shared.name,
            client: client(),
            request_id,
        };
        let wire = super::respond::error_wire(page.as_deref(), facts);
        downstream.send(&wire).await;
        self.log(
            req,
            (url, request_id),
            client,
            started,
            (status, 0, Disposition::IntFront),
            None,
        );
    }
}

/// What the fill keeps of the body for storing, and the room it holds in `[cache]
/// fill_memory` (`cache::fills`).
struct Kept {
    pieces: Option<Vec<Bytes>>,
    len: usize,
    hold: crate::cache::fills::FillHold,
}

impl Kept {
    /// Adds a piece of the body, until it outgrows the largest object or finds no room.
    /// Returns whether this piece made the fill drop what it kept.
    fn keep(&mut self, max: usize, piece: Bytes) -> bool {
        let Some(pieces) = self.pieces.as_mut() else {
            return false;
        };
        self.len += piece.len();
        if self.len > max || !self.hold.grow(piece.len()) {
            self.pieces = None;
            self.hold.release();
            return true;
        }
        pieces.push(piece);
        false
    }

    /// Dropped for want of room, not size: the next miss on the URL may store it.
    fn no_room(&self) -> bool {
        self.hold.refused()
    }
}

/// The compression a response gets before it is stored, in the order pingora's path runs it:
/// the brotli upstream module, then pingora's gzip context (which leaves a body brotli encoded).
/// Both boxed: a brotli encoder's state is kilobytes, and the fill's future would carry it on
/// every miss, compressed or not.
struct BeforeStoring {
    brotli: Option<Box<super::compress::BrotliBeforeStoring>>,
    gzip: Option<Box<pingora::protocols::http::compression::ResponseCompressionCtx>>,
}

impl BeforeStoring {
    async fn new<F: RequestFields>(
        settings: &Settings,
        fields: &F,
        resp: &mut ResponseHeader,
        framing: Framing,
    ) -> BeforeStoring {
        use pingora::modules::http::HttpModule;
        let compress = settings.compress;
        let mut none = BeforeStoring {
            brotli: None,
            gzip: None,
        };
        if !(compress.gzip || compress.brotli) || !super::compress::compressible(resp) {
            return none;
        }
        let end = framing == Framing::None;
        let copy = vary::normalize_accept_encoding(fields);
        if compress.brotli && copy == vary::Encoding::Brotli {
            let mut brotli = Box::new(super::compress::BrotliBeforeStoring::wanted());
            if brotli.response_header_filter(resp, end).await.is_ok() {
                none.brotli = Some(brotli);
            }
        }
        let mut gzip = Box::new(
            pingora::protocols::http::compression::ResponseCompressionCtx::new(0, false, false),
        );
        super::compress::before_storing(&mut gzip, compress);
        if let Ok(mut asked) = pingora::http::RequestHeader::build("GET", b"/", None) {
            let _ = asked.insert_header(
                header::ACCEPT_ENCODING,
                vary::upstream_accept_encoding(copy, compress.brotli),
            );
            gzip.request_filter(&asked);
        }
        gzip.response_header_filter(resp, end);
        none.gzip = Some(gzip).filter(|g| g.is_enabled());
        none
    }

    /// A piece of the origin's body (`None` and `end` after the last) as it is stored.
    async fn piece(&mut self, data: Option<Bytes>, end: bool) -> Option<Bytes> {
        use pingora::modules::http::HttpModule;
        let mut data = data;
        if let Some(brotli) = self.brotli.as_mut() {
            if brotli.response_body_filter(&mut data, end).is_err() {
                data = None;
            }
        }
        match self.gzip.as_mut() {
            Some(gzip) => match (data.as_ref(), end) {
                (None, false) => None,
                (data, end) => gzip.response_body_filter(data, end),
            },
            None => data,
        }
        .filter(|d| !d.is_empty())
    }

    /// `skua_compression_bytes_total`, as pingora's path counts a stored compressed copy.
    fn count(&self, metrics: &crate::metrics::Metrics) {
        let sizes = match &self.gzip {
            Some(gzip) => super::compress::stored_sizes(gzip, self.brotli.as_deref()),
            None => self
                .brotli
                .as_ref()
                .filter(|b| b.sizes.0 > 0)
                .map(|b| ("br", b.sizes.0, b.sizes.1)),
        };
        if let Some((encoding, input, output)) = sizes {
            metrics
                .compression_bytes
                .with_label_values(&[encoding, "in"])
                .inc_by(input as u64);
            metrics
                .compression_bytes
                .with_label_values(&[encoding, "out"])
                .inc_by(output as u64);
        }
    }
}

/// Appends a piece of the client's body, as a chunk when the body is chunked.
fn push_body(out: &mut Vec<u8>, data: &[u8], chunked: bool) {
    if chunked {
        let mut size = [0u8; 16];
        let digits = hex_digits(data.len(), &mut size);
        out.extend_from_slice(digits);
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
    } else {
        out.extend_from_slice(data);
    }
}

fn hex_digits(mut n: usize, buf: &mut [u8; 16]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b"0123456789abcdef"[n % 16];
        n /= 16;
        if n == 0 {
            return &buf[at..];
        }
    }
}

/// Stores a complete response through the storage's miss handler, as pingora's path does.
async fn store(
    store: &'static crate::cache::Store,
    key: &CacheKey,
    meta: &CacheMeta,
    pieces: Vec<Bytes>,
) -> bool {
    use pingora::cache::storage::Storage;
    let span = pingora::cache::trace::Span::inactive().handle();
    let Ok(mut miss) = store.get_miss_handler(key, meta, &span).await else {
        return false;
    };
    for piece in pieces {
        if miss.write_body(piece, false).await.is_err() {
            return false;
        }
    }
    miss.finish().await.is_ok()
}

/// Fields about the client's connection with Skua, which pingora never forwards (its
/// `strip_standard_hop_by_hop_headers`; RFC 9110 §7.6.1). `Transfer-Encoding`, `TE` and
/// `Upgrade` never get here: the front door declines a request with them.
const HOP_BY_HOP_REQUEST: [header::HeaderName; 7] = [
    header::CONNECTION,
    header::HeaderName::from_static("keep-alive"),
    header::HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRAILER,
    header::HeaderName::from_static("http2-settings"),
];

/// The request head the origin receives, as pingora's path makes it (`request_filter`'s
/// stripping and `as_forwarded`, `upstream_request_filter`): the target in Skua's canonical
/// spelling; the client's fields but the ones stripped from untrusted clients and those the
/// key decides; `X-Forwarded-For` with the client's address; `Accept-Encoding` the copy the
/// key names.
fn upstream_request<F: RequestFields>(
    req: &FillRequest<'_, F>,
    (scheme, target): (crate::cache::key::Scheme, &str),
    settings: &Settings,
    (from_proxy, request_id): (bool, Option<&str>),
    client: Option<IpAddr>,
    via: &super::via::Via,
) -> (Vec<u8>, Option<std::ops::Range<usize>>) {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(b"GET ");
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    // A trusted proxy's `X-Forwarded-For` lines, in order: one list (RFC 9110 §5.3) that
    // ends with the address the proxy saw.
    let mut forwarded_for: Vec<&[u8]> = Vec::new();
    let mut via_lines: Vec<&[u8]> = Vec::new();
    let mut encoding_sent = false;
    for f in req.raw {
        let Ok(name) = http::HeaderName::from_bytes(f.name.as_bytes()) else {
            continue;
        };
        if name == header::ACCEPT_ENCODING {
            // The copy the key names, where the client put its own (as pingora rewrites it).
            if !encoding_sent {
                push_accept_encoding(&mut out, req.fields, settings);
                encoding_sent = true;
            }
            continue;
        }
        if guard::is_stripped(&name, &settings.strip_headers, from_proxy)
            || HOP_BY_HOP_REQUEST.contains(&name)
        {
            continue;
        }
        if name == guard::X_FORWARDED_FOR {
            forwarded_for.push(f.value);
            continue;
        }
        if name == header::VIA {
            via_lines.push(f.value);
            continue;
        }
        if name == super::request_id::X_REQUEST_ID && request_id.is_some() {
            // Written once below, a trusted proxy's or a new one.
            continue;
        }
        if name == header::HOST {
            // The host the key names, in its one spelling, as on pingora's path.
            let sent = std::str::from_utf8(f.value)
                .ok()
                .and_then(|raw| crate::cache::key::normalize_host(scheme, raw).ok());
            if let Some(host) = sent {
                out.extend_from_slice(b"host: ");
                out.extend_from_slice(host.as_bytes());
                out.extend_from_slice(b"\r\n");
                continue;
            }
        }
        out.extend_from_slice(f.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(f.value);
        out.extend_from_slice(b"\r\n");
    }
    let mut forwarded = None;
    if client.is_some() || !forwarded_for.is_empty() {
        out.extend_from_slice(b"x-forwarded-for: ");
        let start = out.len();
        for (i, prev) in forwarded_for.iter().enumerate() {
            if i > 0 {
                out.extend_from_slice(b", ");
            }
            out.extend_from_slice(prev);
        }
        if let Some(ip) = client {
            if !forwarded_for.is_empty() {
                out.extend_from_slice(b", ");
            }
            guard::push_address(&mut out, ip);
        }
        forwarded = Some(start..out.len());
        out.extend_from_slice(b"\r\n");
    }
    if !encoding_sent {
        push_accept_encoding(&mut out, req.fields, settings);
    }
    if let Some(id) = request_id {
        out.extend_from_slice(b"x-request-id: ");
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    // This node's entry after the client's, in one line, as on pingora's path.
    out.extend_from_slice(b"via: ");
    out.extend_from_slice(&via.after(via_lines.into_iter(), http::Version::HTTP_11));
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(b"\r\n");
    (out, forwarded)
}

/// The request's fields as pingora's path keys a variant on them (RFC 9111 §4.1: the request
/// the origin answered): after `request_filter`, without the fields stripped from untrusted
/// clients and with the `X-Forwarded-For` the origin received. `Accept-Encoding` stays the
/// client's: the key normalises it either way.
struct AsForwarded<'a, F> {
    fields: &'a F,
    forwarded_for: Option<&'a [u8]>,
    settings: &'a Settings,
    from_proxy: bool,
}

impl<F: RequestFields> RequestFields for AsForwarded<'_, F> {
    fn values<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s [u8]> {
        let forwarded = name.eq_ignore_ascii_case(guard::X_FORWARDED_FOR.as_str());
        let gone = forwarded
            || http::HeaderName::from_bytes(name.as_bytes()).is_ok_and(|n| {
                guard::is_stripped(&n, &self.settings.strip_headers, self.from_proxy)
            });
        let own = (!gone).then(|| self.fields.values(name));
        own.into_iter()
            .flatten()
            .chain(self.forwarded_for.filter(|_| forwarded))
    }
}

fn push_accept_encoding<F: RequestFields>(out: &mut Vec<u8>, fields: &F, settings: &Settings) {
    let copy = vary::normalize_accept_encoding(fields);
    out.extend_from_slice(b"accept-encoding: ");
    out.extend_from_slice(
        vary::upstream_accept_encoding(copy, settings.compress.brotli).as_bytes(),
    );
    out.extend_from_slice(b"\r\n");
}

/// Ends the fill's claim on the cache lock with `status`, if it took one (the fill of a
/// hit-for-miss URL takes none).
fn release(
    lock: &CacheKeyLockImpl,
    key: &CacheKey,
    permit: Option<WritePermit>,
    status: LockStatus,
) {
    if let Some(permit) = permit {
        lock.release(key, permit, status);
    }
}

#[cfg(test)]
mod tests {
    use super::{framing_of, Framing};
    use pingora::http::ResponseHeader;

    fn framing(fields: &[(&str, &str)]) -> Option<(Framing, bool)> {
        let mut resp = ResponseHeader::build(200, None).unwrap();
        for (name, value) in fields {
            resp.append_header(name.to_string(), *value).unwrap();
        }
        framing_of(&resp, false).ok()
    }

    #[test]
    fn a_response_is_framed_as_rfc_9112_section_6_3_says() {
        let length = |n| Some((Framing::Length(n), true));
        assert_eq!(framing(&[("content-length", "4")]), length(4));
        assert_eq!(framing(&[("content-length", " 4 , 4")]), length(4));
        assert_eq!(
            framing(&[("content-length", "4"), ("content-length", "4")]),
            length(4)
        );
        for invalid in [
            "4x",
            "+4",
            "-4",
            "",
            "4 4",
            "4, 5",
            "99999999999999999999999",
        ] {
            assert_eq!(framing(&[("content-length", invalid)]), None, "{invalid:?}");
        }
        assert_eq!(
            framing(&[("content-length", "4"), ("content-length", "5")]),
            None
        );
        // Chunking overrides any length; only as the final coding of the last field.
        let chunked = Some((Framing::Chunked, true));
        assert_eq!(
            framing(&[
                ("transfer-encoding", "gzip, chunked"),
                ("content-length", "x")
            ]),
            chunked
        );
        let te_twice = [
            ("transfer-encoding", "chunked"),
            ("transfer-encoding", "gzip"),
        ];
        assert_eq!(framing(&te_twice), Some((Framing::UntilClose, false)));
        assert_eq!(framing(&[]), Some((Framing::UntilClose, false)));
        assert_eq!(
            framing(&[("content-length", "4"), ("connection", "keep-alive, Close")]),
            Some((Framing::Length(4), false))
        );
    }
}
