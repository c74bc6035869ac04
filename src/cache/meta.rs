//! What a stored object keeps of its response besides the body: its times ([`MetaTimes`],
//! in compact [`Stamp`]s), and its header encoded once as the bytes a hit sends
//! ([`ObjectMeta::head`]), which the front door copies out as they are and which take a tenth
//! of the memory of a decoded header map; the rarer paths through pingora's cache decode them
//! ([`decode_head`]). [`StoredMeta`] is the decoded form that goes in and comes back out. It
//! does not store anything (`memory.rs`, `disk/`) or decide what is cacheable (`policy.rs`).

use std::time::{Duration, SystemTime};

use pingora::cache::key::HashBinary;
use pingora::cache::CacheMeta;
use pingora::http::ResponseHeader;

use super::fields::RequestFields;
use super::head::{Head, HeadWriter};
use super::vary::variance_for;

/// Decoded cache metadata: everything `CacheMeta` needs. What an object keeps is the compact
/// [`ObjectMeta`]; this is what goes in and comes back out.
#[derive(Debug, Clone)]
pub struct StoredMeta {
    pub times: MetaTimes,
    /// The response header.
    pub header: ResponseHeader,
    /// `Cache-Status` members from caches before this one, kept apart from the placeholder.
    pub upstream_cache_status: Option<http::HeaderValue>,
}

impl StoredMeta {
    pub fn from_meta(meta: &CacheMeta) -> StoredMeta {
        StoredMeta {
            times: MetaTimes::of(meta),
            header: meta.response_header_copy(),
            upstream_cache_status: joined(meta.response_header(), &CACHE_STATUS),
        }
    }

    /// Rebuilds pingora's metadata (see [`MetaTimes::cache_meta`]).
    pub fn to_meta(&self, primary_slot: bool) -> CacheMeta {
        self.times.cache_meta(primary_slot, self.origin_header())
    }

    /// The header as the origin sent it (framing normalised), with the `Cache-Status` of
    /// caches before this one: what pingora's cache state machine expects.
    pub fn origin_header(&self) -> ResponseHeader {
        let mut h = self.header.clone();
        h.remove_header(&http::header::AGE);
        h.remove_header(&X_CACHE_STATUS);
        h.remove_header(&CACHE_STATUS);
        if let Some(upstream) = &self.upstream_cache_status {
            let _ = h.insert_header(CACHE_STATUS, upstream.clone());
        }
        h
    }
}

/// The times and variance of a stored response: what `CacheMeta` is rebuilt from besides the
/// header, kept alike by the decoded [`StoredMeta`] and the compact [`ObjectMeta`], and one
/// fact about the header a hit asks for (kept here, in the struct's padding). Times are
/// [`Stamp`]s, half the size of a `SystemTime`; an object's record keeps only part of them
/// ([`KeptTimes`]).
#[derive(Debug, Clone, Copy)]
pub struct MetaTimes {
    pub fresh_until: Stamp,
    pub created: Stamp,
    /// pingora's tombstone for a URL's variants: a secondary variant admitted before the
    /// primary slot's provenance is not served (see `HttpCache::cache_vary_lookup`).
    pub provenance: Stamp,
    /// Reference point of Age and freshness: `updated`, or pingora's epoch override.
    pub epoch: Stamp,
    /// The `Age` the copy's last word from the origin came with ([`AgeWhenHeard`]).
    pub age_when_heard: AgeWhenHeard,
    pub stale_while_revalidate_sec: u32,
    pub stale_if_error_sec: u32,
    pub variance: Option<HashBinary>,
    /// The header has a `Content-Encoding` field: a fast path checks that the client takes
    /// it before serving the copy as stored; most copies have none and skip that search. Only
    /// [`ObjectMeta::encode`] sets it, from the header it encodes; elsewhere it is `false`.
    pub content_coded: bool,
    /// Which field names the header has, as bits ([`FieldNames`]): a rule's response edit
    /// searches a hit's head only for a name whose bit is set. Set by
    /// [`ObjectMeta::encode`]; elsewhere every bit is set.
    pub field_names: FieldNames,
    /// The origin, offered brotli, answered this copy in another coding: clients that take
    /// brotli share it with the others (`vary::copy_for`). pingora's metadata carries it as
    /// `vary::BrotliDeclined`.
    pub brotli_declined: bool,
}

/// A set of field names as 32 bits, one per name (by a hash of its lowercase spelling): a
/// name whose bit is clear is certainly absent, one whose bit is set may be present. An
/// object's head has about ten names, so about a quarter of the bits are set and three
/// searches in four for a name it lacks are skipped. Kept in [`MetaTimes`]' padding, so the
/// object's record does not grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldNames(u32);

impl FieldNames {
    /// May have any name: what is known when nothing was looked at.
    pub const ANY: FieldNames = FieldNames(u32::MAX);

    /// The names in `headers`.
    pub fn of(headers: &http::HeaderMap) -> FieldNames {
        FieldNames(headers.keys().fold(0, |bits, name| bits | Self::bit(name)))
    }

    /// The bit of `name`: FNV-1a of its lowercase spelling (how `HeaderName` holds it).
    pub fn bit(name: &http::HeaderName) -> u32 {
        let hash = (name.as_str().bytes()).fold(0x811c_9dc5u32, |hash, b| {
            (hash ^ u32::from(b)).wrapping_mul(0x0100_0193)
        });
        1 << (hash % 32)
    }

    /// The set as its bits (how the disk tier writes it).
    pub fn bits(self) -> u32 {
        self.0
    }

    pub fn from_bits(bits: u32) -> FieldNames {
        FieldNames(bits)
    }

    /// Whether a name of `bits` (from [`FieldNames::bit`]) may be here.
    pub fn may_have(self, bits: u32) -> bool {
        self.0 & bits != 0
    }
}

impl MetaTimes {
    /// pingora's times, with nothing known of the header.
    pub fn of(meta: &CacheMeta) -> MetaTimes {
        MetaTimes {
            fresh_until: Stamp::of(meta.fresh_until()),
            created: Stamp::of(meta.created()),
            provenance: Stamp::of(meta.provenance()),
            epoch: Stamp::of(meta.epoch()),
            age_when_heard: AgeWhenHeard::of_meta(meta),
            stale_while_revalidate_sec: meta.stale_while_revalidate_sec(),
            stale_if_error_sec: meta.stale_if_error_sec(),
            variance: meta.variance(),
            content_coded: false,
            field_names: FieldNames::ANY,
            brotli_declined: super::vary::brotli_declined(meta),
        }
    }

    /// `CacheMeta::new` sets provenance to `created`, so the primary slot is rebuilt with its
    /// provenance there (the tombstone its variants are checked against) and secondary slots
    /// with their own admission time (what is checked). Age and freshness come from `epoch`
    /// either way.
    pub(super) fn cache_meta(self, primary_slot: bool, header: ResponseHeader) -> CacheMeta {
        let created = if primary_slot {
            self.provenance
        } else {
            self.created
        };
        let mut meta = CacheMeta::new(
            self.fresh_until.time(),
            created.time(),
            self.stale_while_revalidate_sec,
            self.stale_if_error_sec,
            header,
        );
        if self.epoch != created {
            meta.set_epoch_override(self.epoch.time());
        }
        if self.age_when_heard != AgeWhenHeard::NONE {
            meta.extensions_mut().insert(self.age_when_heard);
        }
        if let Some(v) = self.variance {
            meta.set_variance(v);
        }
        if self.brotli_declined {
            meta.extensions_mut().insert(super::vary::BrotliDeclined);
        }
        meta
    }
}

/// pingora's Vary rules for a fast path's lookup, whichever tier holds the objects: the
/// primary slot's object first; if it varies and the request wants another variant, that
/// variant's slot (`other`), whose object must not predate the primary slot's provenance (see
/// `HttpCache::cache_vary_lookup`). Returns the object and the slot it was found in.
pub fn choose_variant<T, F: RequestFields + ?Sized>(
    first: T,
    meta: impl Fn(&T) -> &ObjectMeta,
    req: &F,
    other: impl FnOnce(&HashBinary) -> Option<T>,
) -> Option<(Option<HashBinary>, T)> {
    let primary = meta(&first);
    let Some(stored) = primary.variance() else {
        return Some((None, first));
    };
    let wanted = primary.variance_of(req)?;
    if wanted == stored {
        return Some((None, first));
    }
    let provenance = primary.provenance();
    let found = other(&wanted)?;
    (meta(&found).times.created >= provenance).then_some((Some(wanted), found))
}

/// A point in time as a stored object keeps it: nanoseconds since the Unix epoch. Half the
/// size of a `SystemTime`, and exact for every time from 1970 to 2554 (earlier clamps to
/// 1970, later to 2554).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Stamp(u64);

impl Stamp {
    pub fn of(t: SystemTime) -> Stamp {
        Stamp(match t.duration_since(SystemTime::UNIX_EPOCH) {
            Ok(d) => u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
            Err(_) => 0,
        })
    }

    pub fn time(self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_nanos(self.0)
    }

    /// Nanoseconds since the Unix epoch: how the disk tier writes it.
    pub fn nanos(self) -> u64 {
        self.0
    }

    pub fn from_nanos(nanos: u64) -> Stamp {
        Stamp(nanos)
    }
}

/// How old a copy already was when this node last had the origin's word on it: the `Age` its
/// fetch, or its last 304, came with (an upstream cache had held it that long; RFC 9111
/// §4.2.3). `epoch` is that instant less the `Age`, the reference for the copy's own age;
/// `epoch` plus this is the instant itself, by this node's clock, which is what restarts and
/// purge-bus gaps are compared with ([`KeptTimes::heard`]): a copy an upstream cache had held
/// for a day, fetched a second ago, was not stored before this morning's restart.
///
/// Two bytes, so that it fits what was padding: whole seconds below 2^15 (nine hours), whole
/// minutes above (to 22 days), rounded down and saturating. An instant read from it is never
/// later than the true one: at worst a copy is thought up to a minute older than it is, which
/// can only make one heard in the minute after a restart be checked with the origin again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AgeWhenHeard(u16);

impl AgeWhenHeard {
    /// A copy heard from the origin itself, or from a cache with `Age: 0`.
    pub const NONE: AgeWhenHeard = AgeWhenHeard(0);
    const IN_MINUTES: u16 = 0x8000;

    pub fn of(age: Duration) -> AgeWhenHeard {
        let seconds = age.as_secs();
        AgeWhenHeard(match u16::try_from(seconds) {
            Ok(s) if s < Self::IN_MINUTES => s,
            _ => {
                Self::IN_MINUTES
                    | u16::try_from(seconds / 60)
                        .unwrap_or(u16::MAX)
                        .min(!Self::IN_MINUTES)
            }
        })
    }

    /// What pingora's metadata carries (none: heard without `Age`).
    pub fn of_meta(meta: &CacheMeta) -> AgeWhenHeard {
        meta.extensions()
            .get::<AgeWhenHeard>()
            .copied()
            .unwrap_or_default()
    }

    /// When this node heard the copy whose age reference is `epoch`.
    pub fn heard(self, epoch: SystemTime) -> SystemTime {
        epoch + self.age()
    }

    /// When this node heard the copy pingora's metadata describes.
    pub fn heard_in(meta: &CacheMeta) -> SystemTime {
        Self::of_meta(meta).heard(meta.epoch())
    }

    pub fn age(self) -> Duration {
        Duration::from_secs(if self.0 & Self::IN_MINUTES == 0 {
            u64::from(self.0)
        } else {
            u64::from(self.0 & !Self::IN_MINUTES) * 60
        })
    }

    /// As stored on disk (`disk::record`).
    pub fn bits(self) -> u16 {
        self.0
    }

    pub fn from_bits(bits: u16) -> AgeWhenHeard {
        AgeWhenHeard(bits)
    }
}

/// What an object's record keeps of its [`MetaTimes`]: those every object has. The variance
/// and the provenance (which only a response that varies uses) are kept with the rare fields
/// ([`ObjectMeta::times`] puts them back). Forty bytes where all of [`MetaTimes`] is 64: with
/// them an object's record takes mimalloc's 128-byte block instead of the 160-byte one.
#[derive(Debug, Clone, Copy)]
pub struct KeptTimes {
    pub fresh_until: Stamp,
    pub created: Stamp,
    /// Reference point of Age and freshness: `updated`, or pingora's epoch override.
    pub epoch: Stamp,
    /// As [`MetaTimes::age_when_heard`]; two bytes, in what would be padding.
    pub age_when_heard: AgeWhenHeard,
    pub stale_while_revalidate_sec: u32,
    pub stale_if_error_sec: u32,
    /// As [`MetaTimes::content_coded`].
    pub content_coded: bool,
    /// As [`MetaTimes::field_names`].
    pub field_names: FieldNames,
    /// As [`MetaTimes::brotli_declined`].
    pub brotli_declined: bool,
}

impl KeptTimes {
    /// When this node last had the origin's word on the copy, by its own clock (see
    /// [`AgeWhenHeard`]).
    pub fn heard(&self) -> SystemTime {
        self.age_when_heard.heard(self.epoch.time())
    }
}

/// What a stored object keeps of its metadata: the times, and the header as it is served.
#[derive(Debug, Clone)]
pub struct ObjectMeta {
    pub times: KeptTimes,
    /// The status line and header fields a hit sends, each line ending in CRLF, without the
    /// framing fields that follow from the body ([`ObjectMeta::write_framing`]), the fields a
    /// hit adds (`Age`, `X-Cache-Status`, `Cache-Status`) and the blank line. See
    /// [`encode_head`]. Its lines most objects share are kept once ([`Head`]).
    pub head: Head,
    /// What most responses do not have, behind one pointer: with the times above this keeps
    /// an object's record in mimalloc's 128-byte blocks.
    uncommon: Option<Box<Uncommon>>,
}

#[derive(Debug, Clone, Default)]
struct Uncommon {
    /// The names the response varies on, lowercased, sorted, without duplicates.
    vary: Box<[String]>,
    /// `Cache-Status` members from caches before this one.
    upstream_cache_status: Option<http::HeaderValue>,
    /// The response's variance and its provenance. The provenance is kept only beside a
    /// variance: pingora reads it only as the tombstone of a URL's variants
    /// (`HttpCache::cache_vary_lookup`), so for a response that does not vary it is
    /// `created`, which changes nothing pingora does.
    varies: Option<(HashBinary, Stamp)>,
    /// The memory tier's variant slot the object is in (`memory::StoredObject::slot`).
    slot: Option<HashBinary>,
}

impl Uncommon {
    fn is_empty(&self) -> bool {
        self.vary.is_empty()
            && self.upstream_cache_status.is_none()
            && self.varies.is_none()
            && self.slot.is_none()
    }
}

impl ObjectMeta {
    pub(super) fn encode(meta: StoredMeta) -> ObjectMeta {
        ObjectMeta::encode_parts(meta.times, &meta.header, meta.upstream_cache_status)
    }

    /// [`Self::encode`] of what `StoredMeta::from_meta` would make of `meta`, reading its
    /// header where it is instead of copying it first.
    pub(super) fn encode_cache_meta(meta: &CacheMeta) -> ObjectMeta {
        let header = meta.response_header();
        let upstream = joined(header, &CACHE_STATUS);
        ObjectMeta::encode_parts(MetaTimes::of(meta), header, upstream)
    }

    fn encode_parts(
        times: MetaTimes,
        header: &ResponseHeader,
        upstream_cache_status: Option<http::HeaderValue>,
    ) -> ObjectMeta {
        let mut vary: Vec<String> = super::policy::vary_names(header).collect();
        vary.sort();
        vary.dedup();
        let times = MetaTimes {
            content_coded: header.headers.contains_key(http::header::CONTENT_ENCODING),
            field_names: FieldNames::of(&header.headers),
            ..times
        };
        ObjectMeta::kept(times, encode_head(header), vary, upstream_cache_status)
    }

    fn kept(
        times: MetaTimes,
        head: Head,
        vary: Vec<String>,
        upstream_cache_status: Option<http::HeaderValue>,
    ) -> ObjectMeta {
        let uncommon = Uncommon {
            vary: exact_size(vary),
            upstream_cache_status,
            varies: times.variance.map(|v| (v, times.provenance)),
            slot: None,
        };
        ObjectMeta {
            times: KeptTimes {
                fresh_until: times.fresh_until,
                created: times.created,
                epoch: times.epoch,
                age_when_heard: times.age_when_heard,
                stale_while_revalidate_sec: times.stale_while_revalidate_sec,
                stale_if_error_sec: times.stale_if_error_sec,
                content_coded: times.content_coded,
                field_names: times.field_names,
                brotli_declined: times.brotli_declined,
            },
            head,
            uncommon: (!uncommon.is_empty()).then(|| Box::new(uncommon)),
        }
    }

    /// All of its times, with the variance and provenance kept apart put back.
    pub fn times(&self) -> MetaTimes {
        let t = self.times;
        MetaTimes {
            fresh_until: t.fresh_until,
            created: t.created,
            provenance: self.provenance(),
            epoch: t.epoch,
            age_when_heard: t.age_when_heard,
            stale_while_revalidate_sec: t.stale_while_revalidate_sec,
            stale_if_error_sec: t.stale_if_error_sec,
            variance: self.variance(),
            content_coded: t.content_coded,
            field_names: t.field_names,
            brotli_declined: t.brotli_declined,
        }
    }

    /// The variant key of the response, if it varies.
    pub fn variance(&self) -> Option<HashBinary> {
        Some(self.uncommon.as_ref()?.varies?.0)
    }

    /// pingora's tombstone for the URL's variants (see [`MetaTimes::provenance`]).
    pub fn provenance(&self) -> Stamp {
        (self.uncommon.as_ref())
            .and_then(|u| u.varies)
            .map_or(self.times.created, |(_, provenance)| provenance)
    }

    /// The memory tier's variant slot: `None` for the primary slot, else the lookup key's
    /// variance.
    pub fn slot(&self) -> Option<&HashBinary> {
        self.uncommon.as_ref()?.slot.as_ref()
    }

    /// The same metadata kept for the variant slot `slot`.
    pub fn in_slot(mut self, slot: Option<HashBinary>) -> ObjectMeta {
        if self.slot() == slot.as_ref() {
            return self;
        }
        let mut uncommon = self.uncommon.take().map(|u| *u).unwrap_or_default();
        uncommon.slot = slot;
        self.uncommon = (!uncommon.is_empty()).then(|| Box::new(uncommon));
        self
    }

    /// An object's metadata as [`Self::encode`] made it, from its parts (the disk tier keeps
    /// them as they are, so reading them back decodes no header).
    pub fn from_parts(
        times: MetaTimes,
        head: Box<[u8]>,
        vary: Vec<String>,
        upstream_cache_status: Option<http::HeaderValue>,
    ) -> ObjectMeta {
        ObjectMeta::kept(times, Head::whole(head), vary, upstream_cache_status)
    }

    /// The names the response varies on, lowercased, sorted, without duplicates.
    pub fn vary(&self) -> &[String] {
        self.uncommon.as_ref().map_or(&[], |u| &u.vary)
    }

    /// `Cache-Status` members from caches before this one.
    pub fn upstream_cache_status(&self) -> Option<&http::HeaderValue> {
        self.uncommon.as_ref()?.upstream_cache_status.as_ref()
    }

    /// It has a validator (`ETag` or `Last-Modified`), so it can be revalidated when stale.
    /// Read from the head: asked when an object is stored, never on a hit.
    pub fn has_validator(&self) -> bool {
        // Asked when an object is stored and when the tier weighs its life, never on a hit.
        self.head.has_field(b"etag") || self.head.has_field(b"last-modified")
    }

    /// The status code, from the status line.
    pub fn status(&self) -> u16 {
        // Read twice per hit (framing, access log): three digits, not a string parse.
        match self.head.leading().get(9..12) {
            Some(&[a, b, c]) if [a, b, c].iter().all(u8::is_ascii_digit) => {
                u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0')
            }
            _ => 200,
        }
    }

    /// The framing fields of a stored response with a body of `body_len` bytes. They follow
    /// from the status and the body, so they are written per hit rather than kept: 44 bytes
    /// less per object, and for a typical head a smaller mimalloc block.
    pub fn write_framing(&self, out: &mut Vec<u8>, body_len: usize) {
        let status = self.status();
        // RFC 9110 §8.6: no Content-Length in a 1xx, 204 or 304 response.
        if !(status < 200 || status == 204 || status == 304) {
            out.extend_from_slice(b"Content-Length: ");
            out.extend_from_slice(itoa::Buffer::new().format(body_len).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        // RFC 9110 §14.3: a stored full response can serve any byte range of itself.
        if status == 200 {
            out.extend_from_slice(b"Accept-Ranges: bytes\r\n");
        }
    }

    /// The header as served with a body of `body_len` bytes, decoded (for the paths that need
    /// a `ResponseHeader`).
    pub fn header(&self, body_len: usize) -> ResponseHeader {
        let mut wire = Vec::with_capacity(self.head.len() + 64);
        self.head.write_to(&mut wire);
        self.write_framing(&mut wire, body_len);
        decode_head(&wire)
    }

    /// pingora's metadata for a hit. The stored head holds none of the fields a hit adds, so
    /// unlike [`StoredMeta::to_meta`] there is nothing to strip: the header is decoded once.
    pub fn to_meta(&self, primary_slot: bool, body_len: usize) -> CacheMeta {
        let mut header = self.header(body_len);
        if let Some(upstream) = self.upstream_cache_status() {
            let _ = header.insert_header(CACHE_STATUS, upstream.clone());
        }
        self.times().cache_meta(primary_slot, header)
    }

    /// The variant key a request would be stored under, if the response varies.
    pub fn variance_of<F: RequestFields + ?Sized>(&self, req: &F) -> Option<HashBinary> {
        variance_for(self.vary(), self.times.brotli_declined, req)
    }

    pub(super) fn weight(&self) -> usize {
        const ALLOCATION: usize = 32;
        let uncommon = self.uncommon.as_ref().map_or(0, |u| {
            let vary: usize = u.vary.iter().map(|n| n.len() + ALLOCATION).sum();
            let upstream = u.upstream_cache_status.as_ref().map_or(0, |v| v.len());
            std::mem::size_of::<Uncommon>() + ALLOCATION + vary + upstream
        });
        // The shared lines are charged in full to every object that holds them: the tier's
        // bound then holds however few objects share them.
        self.head.len() + ALLOCATION + uncommon + std::mem::size_of::<ObjectMeta>()
    }
}

/// `X-Cache-Status` (Wikimedia's vocabulary).
pub const X_CACHE_STATUS: http::HeaderName = http::HeaderName::from_static("x-cache-status");
/// RFC 9211 `Cache-Status`.
pub const CACHE_STATUS: http::HeaderName = http::HeaderName::from_static("cache-status");

/// The fields a hit's head gets from `write_framing` and `crate::proxy::hit::write_head`,
/// whatever the stored header has.
pub const WRITTEN_BY_A_HIT: [http::HeaderName; 6] = [
    http::header::CONTENT_LENGTH,
    http::header::ACCEPT_RANGES,
    http::header::AGE,
    X_CACHE_STATUS,
    CACHE_STATUS,
    http::header::CONNECTION,
];

/// All values of a header joined into one list value.
fn joined(header: &ResponseHeader, name: &http::HeaderName) -> Option<http::HeaderValue> {
    let mut values = header.headers.get_all(name).iter();
    let first = values.next()?.clone();
    let mut out = first.as_bytes().to_vec();
    for v in values {
        out.extend_from_slice(b", ");
        out.extend_from_slice(v.as_bytes());
    }
    http::HeaderValue::from_bytes(&out).ok()
}

/// The whole body is known once stored, so the header is encoded ready to serve: HTTP/1.1, a
/// length instead of chunked framing, `Accept-Ranges` on 200s (hits are seekable), no
/// hop-by-hop fields, and none of the fields each hit sets itself. Names are spelled as
/// [`wire_name`] spells them.
fn encode_head(stored: &ResponseHeader) -> Head {
    use http::header::{
        ACCEPT_RANGES, AGE, CONNECTION, CONTENT_LENGTH, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
    };
    // RFC 9110 §7.6.1: hop-by-hop fields describe the origin's connection, not the response;
    // RFC 9111 §3.1 lets a cache drop them before storing.
    let keep_alive = http::HeaderName::from_static("keep-alive");
    let proxy_connection = http::HeaderName::from_static("proxy-connection");
    let skip = [
        &TRANSFER_ENCODING,
        &CONTENT_LENGTH,
        &ACCEPT_RANGES,
        &AGE,
        &X_CACHE_STATUS,
        &CACHE_STATUS,
        &CONNECTION,
        &keep_alive,
        &proxy_connection,
        &TE,
        &TRAILER,
        &UPGRADE,
    ];
    let status = stored.status;
    let reason = status.canonical_reason().unwrap_or("Unknown");
    let status_line = [
        b"HTTP/1.1 ",
        status.as_str().as_bytes(),
        b" ",
        reason.as_bytes(),
        b"\r\n",
    ];
    let mut head = HeadWriter::new(&status_line, 64 + stored.headers.len() * 40);
    for (name, value) in stored.headers.iter() {
        if !skip.contains(&name) {
            head.field(name, wire_name(name).as_bytes(), value.as_bytes());
        }
    }
    head.finish()
}

/// A field name as a hit's head spells it on the wire: the way pingora's HTTP/1 writer spells
/// a header it holds no original case for (`pingora-http`, `titled_header_name_str`): these
/// twelve in title case, every other name in lower case. Field names are case-insensitive
/// (RFC 9110 §5.1); spelling them one way means a hit's head is the same bytes whichever path
/// answers it (`tests/front.rs` compares them byte for byte, so a pingora that spells them
/// otherwise fails that test).
pub fn wire_name(name: &http::HeaderName) -> &str {
    use http::header::*;
    match *name {
        ACCEPT_RANGES => "Accept-Ranges",
        AGE => "Age",
        CACHE_CONTROL => "Cache-Control",
        CONNECTION => "Connection",
        CONTENT_TYPE => "Content-Type",
        CONTENT_ENCODING => "Content-Encoding",
        CONTENT_LENGTH => "Content-Length",
        DATE => "Date",
        TRANSFER_ENCODING => "Transfer-Encoding",
        HOST => "Host",
        SERVER => "Server",
        SET_COOKIE => "Set-Cookie",
        _ => name.as_str(),
    }
}

/// The items in an allocation of their own size, for what a stored object keeps for hours.
/// `Vec::into_boxed_slice` alone is not that: mimalloc shrinks a block in place while the new
/// size is at least half of it, so a 251-byte head built in a 424-byte buffer kept all 448
/// bytes of its size class (about 1.9 MiB over 10,000 pages; see benches/README.md §3). The
/// items are moved, not cloned.
pub(super) fn exact_size<T>(mut items: Vec<T>) -> Box<[T]> {
    if items.len() == items.capacity() {
        return items.into_boxed_slice();
    }
    let mut exact = Vec::with_capacity(items.len());
    exact.append(&mut items);
    exact.into_boxed_slice()
}

/// The header [`encode_head`] wrote. Every line was written from a valid `HeaderName` and
/// `HeaderValue`, so a line that does not decode cannot occur; it would be skipped.
pub fn decode_head(head: &[u8]) -> ResponseHeader {
    let mut lines = head
        .split(|b| *b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = lines
        .next()
        .and_then(|l| l.get(9..12))
        .and_then(|code| http::StatusCode::from_bytes(code).ok())
        .unwrap_or(http::StatusCode::OK);
    for line in lines {
        let Some(colon) = memchr::memchr(b':', line) else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii_start());
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(name),
            http::HeaderValue::from_bytes(value),
        ) {
            parts.headers.append(name, value);
        }
    }
    ResponseHeader::from(parts)
}
