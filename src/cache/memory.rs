//! The memory tier: a pingora `Storage` on moka, bounded by bytes (headers + bodies).
//!
//! Objects are grouped by primary key into a [`Family`] holding every Vary variant of one URL,
//! so a purge of a URL drops or expires all its variants in one step and a hit costs one hash
//! lookup. Stored metadata is kept decoded (never serialized and re-parsed per hit) and bodies
//! are `Bytes`, so a hit and a Range seek are slices, not copies. It does not decide what is
//! cacheable (see `policy.rs`) and it knows nothing of tiers below it.

use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use moka::ops::compute::Op;
use pingora::cache::key::{CacheHashKey, CompactCacheKey, HashBinary};
use pingora::cache::storage::{
    HandleHit, HandleMiss, MissFinishType, PurgeOutcome, PurgeTarget, PurgeType,
};
use pingora::cache::trace::SpanHandle;
use pingora::cache::{CacheKey, CacheMeta, HitHandler, MissHandler, Storage};
use pingora::http::ResponseHeader;
use pingora::{Error, ErrorType, Result};

use super::vary::variance;

/// Bytes charged per object on top of its header and body: the family slot, `Arc`s and
/// moka's own entry, so that many tiny objects still respect the bound.
const OBJECT_OVERHEAD: usize = 256;

/// Decoded cache metadata: everything `CacheMeta` needs, cheap to copy.
#[derive(Debug, Clone)]
pub struct StoredMeta {
    pub fresh_until: SystemTime,
    pub created: SystemTime,
    /// pingora's tombstone for a URL's variants: a secondary variant admitted before the
    /// primary slot's provenance is not served (see `HttpCache::cache_vary_lookup`).
    pub provenance: SystemTime,
    /// Reference point of Age and freshness: `updated`, or pingora's epoch override.
    pub epoch: SystemTime,
    pub stale_while_revalidate_sec: u32,
    pub stale_if_error_sec: u32,
    pub variance: Option<HashBinary>,
    /// The response header. Once stored it is ready to serve (see [`prepare_for_serving`]):
    /// it ends with `Age`, `X-Cache-Status` and `Cache-Status` entries a hit overwrites.
    pub header: ResponseHeader,
    /// `Cache-Status` members from caches before this one, kept apart from the placeholder.
    pub upstream_cache_status: Option<http::HeaderValue>,
}

impl StoredMeta {
    pub fn from_meta(meta: &CacheMeta) -> StoredMeta {
        StoredMeta {
            fresh_until: meta.fresh_until(),
            created: meta.created(),
            provenance: meta.provenance(),
            epoch: meta.epoch(),
            stale_while_revalidate_sec: meta.stale_while_revalidate_sec(),
            stale_if_error_sec: meta.stale_if_error_sec(),
            variance: meta.variance(),
            header: meta.response_header_copy(),
            upstream_cache_status: joined(meta.response_header(), &CACHE_STATUS),
        }
    }

    /// Rebuilds pingora's metadata. `CacheMeta::new` sets provenance to `created`, so the
    /// primary slot is rebuilt with its provenance there (the tombstone its variants are checked
    /// against) and secondary slots with their own admission time (what is checked). Age and
    /// freshness come from `epoch` either way.
    pub fn to_meta(&self, primary_slot: bool) -> CacheMeta {
        let created = if primary_slot {
            self.provenance
        } else {
            self.created
        };
        let mut meta = CacheMeta::new(
            self.fresh_until,
            created,
            self.stale_while_revalidate_sec,
            self.stale_if_error_sec,
            self.origin_header(),
        );
        if self.epoch != created {
            meta.set_epoch_override(self.epoch);
        }
        if let Some(v) = self.variance {
            meta.set_variance(v);
        }
        meta
    }

    /// The header as the origin sent it (framing normalised), without the hit placeholders:
    /// what pingora's cache state machine expects.
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

    /// What the decoded header occupies: the map's slots (about 100 bytes each, allocated in
    /// powers of two) plus each name and value's own allocation. Measured against RSS with
    /// 10,000 stored pages; an estimate that leaves this out lets the real footprint run to
    /// twice the configured bound.
    fn header_weight(&self) -> usize {
        const SLOT: usize = 100;
        const ALLOCATION: usize = 32;
        let strings: usize = self
            .header
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 2 * ALLOCATION)
            .sum();
        self.header.headers.capacity() * SLOT + strings + 64
    }
}

/// One stored response.
#[derive(Debug)]
pub struct StoredObject {
    /// The variant slot: `None` for the primary slot, else the lookup key's variance.
    slot: Option<HashBinary>,
    pub meta: StoredMeta,
    pub body: Bytes,
    weight: usize,
}

impl StoredObject {
    pub fn new(slot: Option<HashBinary>, mut meta: StoredMeta, body: Bytes) -> StoredObject {
        meta.header = prepare_for_serving(&meta.header, body.len());
        let weight = meta.header_weight() + body.len() + OBJECT_OVERHEAD;
        StoredObject {
            slot,
            meta,
            body,
            weight,
        }
    }
}

/// Every stored variant of one primary key. Immutable: writers build a new family.
#[derive(Debug, Default)]
pub struct Family {
    objects: Vec<Arc<StoredObject>>,
}

impl Family {
    /// How long from `now` some object of the family can still be served: fresh, stale within
    /// its stale-while-revalidate / stale-if-error window, or revalidated if it has a
    /// validator.
    fn useful_for(&self, now: SystemTime) -> Duration {
        self.objects
            .iter()
            .map(|o| {
                let m = &o.meta;
                let grace = m.stale_while_revalidate_sec.max(m.stale_if_error_sec);
                let has_validator = m.header.headers.contains_key(http::header::ETAG)
                    || m.header.headers.contains_key(http::header::LAST_MODIFIED);
                let keep = if has_validator {
                    KEEP_FOR_REVALIDATION
                } else {
                    Duration::ZERO
                };
                let until = m.fresh_until + Duration::from_secs(grace.into()) + keep;
                until.duration_since(now).unwrap_or(Duration::ZERO)
            })
            .max()
            .unwrap_or(Duration::ZERO)
    }

    fn weight(&self) -> u32 {
        let w: usize = self.objects.iter().map(|o| o.weight).sum();
        u32::try_from(w).unwrap_or(u32::MAX)
    }

    fn get(&self, slot: Option<&HashBinary>) -> Option<&Arc<StoredObject>> {
        self.objects.iter().find(|o| o.slot.as_ref() == slot)
    }

    fn with(&self, obj: Arc<StoredObject>) -> Family {
        let mut objects: Vec<_> = self
            .objects
            .iter()
            .filter(|o| o.slot != obj.slot)
            .cloned()
            .collect();
        objects.push(obj);
        Family { objects }
    }

    fn without(&self, slot: Option<&HashBinary>) -> Family {
        Family {
            objects: self
                .objects
                .iter()
                .filter(|o| o.slot.as_ref() != slot)
                .cloned()
                .collect(),
        }
    }

    fn expired_at(&self, slot: Option<Option<&HashBinary>>, at: SystemTime) -> Family {
        Family {
            objects: self
                .objects
                .iter()
                .map(|o| {
                    let hit = slot.is_none_or(|s| o.slot.as_ref() == s);
                    if hit {
                        let mut meta = o.meta.clone();
                        meta.fresh_until = meta.fresh_until.min(at);
                        meta.stale_while_revalidate_sec = meta
                            .stale_while_revalidate_sec
                            .max(super::SOFT_PURGE_GRACE_SECS);
                        Arc::new(StoredObject::new(o.slot, meta, o.body.clone()))
                    } else {
                        o.clone()
                    }
                })
                .collect(),
        }
    }
}

/// Counters of the memory tier, read by the admin endpoint and metrics.
#[derive(Debug, Default)]
pub struct TierCounters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub stores: AtomicU64,
    pub purges: AtomicU64,
    /// Objects evicted to make room.
    pub evicted_size: AtomicU64,
    /// Objects dropped once nothing could serve them any more (see [`Family::useful_for`]).
    pub evicted_expired: AtomicU64,
}

/// How long an object is kept past its freshness and stale windows when it has a validator
/// (`ETag` or `Last-Modified`): a conditional request can still turn it into a cheap 304.
pub const KEEP_FOR_REVALIDATION: Duration = Duration::from_secs(86400);

/// Drops a family when none of its objects can be served any more, not even stale.
struct UsefulLife;

impl moka::Expiry<HashBinary, Arc<Family>> for UsefulLife {
    fn expire_after_create(
        &self,
        _key: &HashBinary,
        family: &Arc<Family>,
        _at: std::time::Instant,
    ) -> Option<Duration> {
        Some(family.useful_for(SystemTime::now()))
    }

    fn expire_after_update(
        &self,
        _key: &HashBinary,
        family: &Arc<Family>,
        _at: std::time::Instant,
        _left: Option<Duration>,
    ) -> Option<Duration> {
        Some(family.useful_for(SystemTime::now()))
    }
}

pub struct MemoryTier {
    families: moka::sync::Cache<HashBinary, Arc<Family>>,
    capacity: u64,
    pub counters: Arc<TierCounters>,
}

impl MemoryTier {
    pub fn new(capacity_bytes: u64) -> MemoryTier {
        let counters = Arc::new(TierCounters::default());
        let evictions = counters.clone();
        let families = moka::sync::Cache::builder()
            .max_capacity(capacity_bytes)
            .weigher(|_k: &HashBinary, f: &Arc<Family>| f.weight())
            .expire_after(UsefulLife)
            .eviction_listener(move |_k, family: Arc<Family>, cause| {
                let n = family.objects.len() as u64;
                match cause {
                    moka::notification::RemovalCause::Size => {
                        evictions.evicted_size.fetch_add(n, Ordering::Relaxed);
                    }
                    moka::notification::RemovalCause::Expired => {
                        evictions.evicted_expired.fetch_add(n, Ordering::Relaxed);
                    }
                    _ => {}
                }
            })
            .build();
        MemoryTier {
            families,
            capacity: capacity_bytes,
            counters,
        }
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.capacity
    }

    /// Bytes held, after moka has applied pending evictions.
    pub fn resident_bytes(&self) -> u64 {
        self.families.run_pending_tasks();
        self.families.weighted_size()
    }

    /// Stored objects (all variants), after pending evictions.
    pub fn object_count(&self) -> u64 {
        self.families.run_pending_tasks();
        self.families
            .iter()
            .map(|(_, f)| f.objects.len() as u64)
            .sum()
    }

    pub fn get(
        &self,
        primary: &HashBinary,
        slot: Option<&HashBinary>,
    ) -> Option<Arc<StoredObject>> {
        self.families
            .get(primary)
            .and_then(|f| f.get(slot).cloned())
    }

    /// The stored object a request would be served, if it is fresh at `now`: the fast path's
    /// lookup. Follows the same Vary rules as pingora's lookup (primary slot first, then the
    /// request's variant, which must not predate the primary's provenance). `None` means "let
    /// pingora's cache state machine decide", never "not cached".
    pub fn fresh_object(
        &self,
        primary: &HashBinary,
        req: &http::HeaderMap,
        now: SystemTime,
    ) -> Option<Arc<StoredObject>> {
        let family = self.families.get(primary)?;
        let first = family.get(None)?;
        let obj = match first.meta.variance {
            None => first,
            Some(stored) => {
                let wanted = variance(&first.meta.header, req)?;
                if wanted == stored {
                    first
                } else {
                    let other = family.get(Some(&wanted))?;
                    if other.meta.created < first.meta.provenance {
                        return None;
                    }
                    other
                }
            }
        };
        (obj.meta.fresh_until >= now).then(|| obj.clone())
    }

    /// A writer for one response; it gives up (stores nothing) past `limit` body bytes.
    pub(crate) fn miss(
        &'static self,
        primary: HashBinary,
        slot: Option<HashBinary>,
        meta: &CacheMeta,
        limit: usize,
    ) -> MemoryMiss {
        MemoryMiss {
            tier: self,
            primary,
            slot,
            meta: StoredMeta::from_meta(meta),
            body: BytesMut::new(),
            chunks: Vec::new(),
            len: 0,
            limit,
        }
    }

    pub fn insert(&self, primary: HashBinary, obj: StoredObject) {
        let obj = Arc::new(obj);
        self.families.entry(primary).and_compute_with(|old| {
            let family = match old {
                Some(e) => e.into_value().with(obj),
                None => Family { objects: vec![obj] },
            };
            Op::Put(Arc::new(family))
        });
        self.counters.stores.fetch_add(1, Ordering::Relaxed);
    }

    /// Removes every variant of a URL. Returns how many objects were removed.
    pub fn purge_all(&self, primary: &HashBinary) -> usize {
        let removed = self.families.remove(primary).map_or(0, |f| f.objects.len());
        self.counters
            .purges
            .fetch_add(removed as u64, Ordering::Relaxed);
        removed
    }

    /// Marks every variant of a URL stale as of now (soft purge). Returns how many objects
    /// were marked.
    pub fn expire_all(&self, primary: &HashBinary) -> usize {
        self.expire(primary, None)
    }

    fn expire(&self, primary: &HashBinary, slot: Option<Option<&HashBinary>>) -> usize {
        let now = SystemTime::now();
        let mut marked = 0;
        self.families
            .entry(*primary)
            .and_compute_with(|old| match old {
                Some(e) => {
                    let f = e.into_value();
                    marked = f
                        .objects
                        .iter()
                        .filter(|o| slot.is_none_or(|s| o.slot.as_ref() == s))
                        .count();
                    if marked == 0 {
                        Op::Nop
                    } else {
                        Op::Put(Arc::new(f.expired_at(slot, now)))
                    }
                }
                None => Op::Nop,
            });
        marked
    }

    fn remove_slot(&self, primary: &HashBinary, slot: Option<&HashBinary>) -> bool {
        let mut removed = false;
        self.families
            .entry(*primary)
            .and_compute_with(|old| match old {
                Some(e) => {
                    let f = e.into_value();
                    if f.get(slot).is_none() {
                        return Op::Nop;
                    }
                    removed = true;
                    let rest = f.without(slot);
                    if rest.objects.is_empty() {
                        Op::Remove
                    } else {
                        Op::Put(Arc::new(rest))
                    }
                }
                None => Op::Nop,
            });
        removed
    }
}

/// The slot a pingora key addresses within its family.
fn slot_of(key: &CompactCacheKey) -> Option<&HashBinary> {
    key.variance.as_deref()
}

#[async_trait]
impl Storage for MemoryTier {
    async fn lookup(
        &'static self,
        key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<Option<(CacheMeta, HitHandler)>> {
        let variance = key.variance_bin();
        match self.get(&key.primary_bin(), variance.as_ref()) {
            Some(obj) => {
                self.counters.hits.fetch_add(1, Ordering::Relaxed);
                let hit = MemoryHit::new(obj.body.clone(), false);
                Ok(Some((obj.meta.to_meta(obj.slot.is_none()), Box::new(hit))))
            }
            None => {
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
                Ok(None)
            }
        }
    }

    async fn get_miss_handler(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        _trace: &SpanHandle,
    ) -> Result<MissHandler> {
        Ok(Box::new(self.miss(
            key.primary_bin(),
            key.variance_bin(),
            meta,
            usize::MAX,
        )))
    }

    async fn purge(
        &'static self,
        target: PurgeTarget<'_>,
        _purge_type: PurgeType,
        _trace: &SpanHandle,
    ) -> Result<PurgeOutcome> {
        let key = target.key();
        if self.remove_slot(&key.primary, slot_of(key)) {
            self.counters.purges.fetch_add(1, Ordering::Relaxed);
            Ok(PurgeOutcome::Purged(None))
        } else {
            Ok(PurgeOutcome::NotFound)
        }
    }

    async fn expire(
        &'static self,
        target: PurgeTarget<'_>,
        _trace: &SpanHandle,
    ) -> Result<PurgeOutcome> {
        let key = target.key();
        if self.expire(&key.primary, Some(slot_of(key))) > 0 {
            Ok(PurgeOutcome::Expired)
        } else {
            Ok(PurgeOutcome::NotFound)
        }
    }

    /// A 304 from the origin refreshed the metadata; the body stays as stored.
    async fn update_meta(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        _trace: &SpanHandle,
    ) -> Result<bool> {
        let primary = key.primary_bin();
        let slot = key.variance_bin();
        let mut updated = false;
        self.families
            .entry(primary)
            .and_compute_with(|old| match old {
                Some(e) => {
                    let f = e.into_value();
                    match f.get(slot.as_ref()) {
                        Some(obj) => {
                            updated = true;
                            let fresh = StoredObject::new(
                                slot,
                                StoredMeta::from_meta(meta),
                                obj.body.clone(),
                            );
                            Op::Put(Arc::new(f.with(Arc::new(fresh))))
                        }
                        None => Op::Nop,
                    }
                }
                None => Op::Nop,
            });
        if updated {
            Ok(true)
        } else {
            Error::e_explain(
                ErrorType::InternalError,
                "update_meta: object no longer stored",
            )
        }
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync + 'static) {
        self
    }
}

/// A hit served from memory: a slice of the stored body, seekable for Range requests.
pub struct MemoryHit {
    body: Bytes,
    start: usize,
    end: usize,
    done: bool,
    /// Read from the disk tier for this request (and promoted to memory).
    pub from_disk: bool,
}

impl MemoryHit {
    pub fn new(body: Bytes, from_disk: bool) -> MemoryHit {
        let end = body.len();
        MemoryHit {
            body,
            start: 0,
            end,
            done: false,
            from_disk,
        }
    }
}

#[async_trait]
impl HandleHit for MemoryHit {
    async fn read_body(&mut self) -> Result<Option<Bytes>> {
        if self.done {
            return Ok(None);
        }
        self.done = true;
        Ok(Some(self.body.slice(self.start..self.end)))
    }

    async fn finish(
        self: Box<Self>,
        _storage: &'static (dyn Storage + Sync),
        _key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<()> {
        Ok(())
    }

    fn can_seek(&self) -> bool {
        true
    }

    fn seek(&mut self, start: usize, end: Option<usize>) -> Result<()> {
        let len = self.body.len();
        if start >= len && len > 0 {
            return Error::e_explain(
                ErrorType::InternalError,
                format!("seek start {start} beyond body of {len} bytes"),
            );
        }
        self.start = start.min(len);
        self.end = end.map_or(len, |e| e.min(len)).max(self.start);
        self.done = false;
        Ok(())
    }

    fn get_eviction_weight(&self) -> usize {
        self.body.len()
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        self
    }

    fn as_any_mut(&mut self) -> &mut (dyn Any + Send + Sync) {
        self
    }
}

/// Collects a response body from the origin and publishes it on `finish`. A handler dropped
/// before `finish` (origin error, client gone) publishes nothing.
pub(crate) struct MemoryMiss {
    tier: &'static MemoryTier,
    primary: HashBinary,
    slot: Option<HashBinary>,
    meta: StoredMeta,
    body: BytesMut,
    /// The first chunk, kept as received until a second one arrives.
    chunks: Vec<Bytes>,
    len: usize,
    limit: usize,
}

impl MemoryMiss {
    /// Whether the body is still within the memory tier's object limit.
    pub(crate) fn within_limit(&self) -> bool {
        self.len <= self.limit
    }

    pub(crate) fn write(&mut self, data: Bytes) {
        self.len = self.len.saturating_add(data.len());
        if !self.within_limit() {
            self.chunks = Vec::new();
            self.body = BytesMut::new();
            return;
        }
        if data.is_empty() {
            return;
        }
        if self.chunks.is_empty() && self.body.is_empty() {
            self.chunks.push(data);
        } else {
            for c in self.chunks.drain(..) {
                self.body.extend_from_slice(&c);
            }
            self.body.extend_from_slice(&data);
        }
    }

    /// Stores the object; returns its weight, or `None` if it was over the limit.
    pub(crate) fn publish(self) -> Option<usize> {
        if !self.within_limit() {
            return None;
        }
        // A chunk may be a slice of a larger read buffer; storing it would pin the whole
        // buffer, so the body is copied to an allocation of its own size (once per fill).
        let body = match self.chunks.into_iter().next() {
            Some(only) => Bytes::copy_from_slice(&only),
            None if self.body.len() == self.body.capacity() => self.body.freeze(),
            None => Bytes::copy_from_slice(&self.body),
        };
        let obj = StoredObject::new(self.slot, self.meta, body);
        let weight = obj.weight;
        self.tier.insert(self.primary, obj);
        Some(weight)
    }
}

#[async_trait]
impl HandleMiss for MemoryMiss {
    async fn write_body(&mut self, data: Bytes, _eof: bool) -> Result<()> {
        self.write(data);
        Ok(())
    }

    async fn finish(self: Box<Self>) -> Result<MissFinishType> {
        Ok(MissFinishType::Created(self.publish().unwrap_or(0)))
    }
}

/// `X-Cache-Status` (Wikimedia's vocabulary).
pub const X_CACHE_STATUS: http::HeaderName = http::HeaderName::from_static("x-cache-status");
/// RFC 9211 `Cache-Status`.
pub const CACHE_STATUS: http::HeaderName = http::HeaderName::from_static("cache-status");

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

/// The whole body is known once stored, so the header is made ready to serve as is: a length
/// instead of chunked framing, HTTP/1.1, and `Accept-Ranges` on 200s (hits are seekable). It is
/// rebuilt without pingora's header-case map, which would double what every hit clones, and
/// ends with the three headers a hit sets (`Age`, `X-Cache-Status`, `Cache-Status`), so a hit
/// overwrites them in place instead of growing a cloned map.
fn prepare_for_serving(stored: &ResponseHeader, body_len: usize) -> ResponseHeader {
    use http::header::{
        ACCEPT_RANGES, AGE, CONNECTION, CONTENT_LENGTH, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
    };
    // RFC 9110 §7.6.1: hop-by-hop fields describe the origin's connection, not the response;
    // RFC 9111 §3.1 lets a cache drop them before storing.
    let keep_alive = http::HeaderName::from_static("keep-alive");
    let proxy_connection = http::HeaderName::from_static("proxy-connection");
    let status = stored.status.as_u16();
    let no_body = matches!(status, 204 | 304) || stored.status.is_informational();
    let mut header =
        match ResponseHeader::build_no_case(stored.status, Some(stored.headers.len() + 5)) {
            Ok(h) => h,
            Err(_) => return stored.clone(),
        };
    for (name, value) in stored.headers.iter() {
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
        if skip.contains(&name) {
            continue;
        }
        // Copied, not cloned: a parsed header's names and values share the buffer the whole
        // response head was read into, and storing them would pin that buffer per object.
        let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(name.as_str().as_bytes()),
            http::HeaderValue::from_bytes(value.as_bytes()),
        ) else {
            continue;
        };
        let _ = header.append_header(name, value);
    }
    if !no_body {
        let _ = header.insert_header(CONTENT_LENGTH, body_len);
    }
    if status == 200 {
        let _ = header.insert_header(ACCEPT_RANGES, http::HeaderValue::from_static("bytes"));
    }
    let _ = header.insert_header(AGE, http::HeaderValue::from_static("0"));
    let _ = header.insert_header(X_CACHE_STATUS, http::HeaderValue::from_static("hit-front"));
    let _ = header.insert_header(CACHE_STATUS, http::HeaderValue::from_static("-"));
    header
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn meta(body_note: &str) -> StoredMeta {
        let now = SystemTime::now();
        let mut header = ResponseHeader::build(200, None).unwrap();
        header.append_header("x-note", body_note).unwrap();
        StoredMeta {
            fresh_until: now + Duration::from_secs(60),
            created: now,
            provenance: now,
            epoch: now,
            stale_while_revalidate_sec: 0,
            stale_if_error_sec: 0,
            variance: None,
            header,
            upstream_cache_status: None,
        }
    }

    #[test]
    fn variants_share_a_family_and_purge_together() {
        let tier = MemoryTier::new(1 << 20);
        let p = [1u8; 16];
        tier.insert(
            p,
            StoredObject::new(None, meta("a"), Bytes::from_static(b"gzip")),
        );
        tier.insert(
            p,
            StoredObject::new(Some([2; 16]), meta("b"), Bytes::from_static(b"plain")),
        );
        assert_eq!(tier.get(&p, None).unwrap().body, "gzip");
        assert_eq!(tier.get(&p, Some(&[2; 16])).unwrap().body, "plain");
        assert_eq!(tier.expire_all(&p), 2);
        assert!(tier.get(&p, None).unwrap().meta.fresh_until <= SystemTime::now());
        assert_eq!(tier.purge_all(&p), 2);
        assert!(tier.get(&p, None).is_none());
        assert_eq!(tier.purge_all(&p), 0);
    }

    #[test]
    fn meta_round_trips_through_cache_meta() {
        let mut m = meta("x");
        m.epoch = m.created + Duration::from_secs(5);
        m.variance = Some([9; 16]);
        let back = StoredMeta::from_meta(&m.to_meta(false));
        assert_eq!(back.epoch, m.epoch);
        assert_eq!(back.fresh_until, m.fresh_until);
        assert_eq!(back.variance, m.variance);
        assert_eq!(back.header.headers.get("x-note").unwrap(), "x");
    }

    #[test]
    fn bound_holds() {
        let tier = MemoryTier::new(1 << 20);
        for i in 0..100u32 {
            let mut p = [0u8; 16];
            p[..4].copy_from_slice(&i.to_be_bytes());
            tier.insert(
                p,
                StoredObject::new(None, meta("x"), Bytes::from(vec![0u8; 20_000])),
            );
        }
        assert!(tier.resident_bytes() <= 1 << 20);
    }
}
