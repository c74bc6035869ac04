//! The memory tier: a pingora `Storage` on moka, bounded by bytes (headers + bodies).
//!
//! Objects are grouped by primary key into a [`Family`] holding every Vary variant of one URL,
//! so a purge of a URL drops or expires all its variants in one step and a hit costs one hash
//! lookup. An object keeps its header as the bytes a hit sends ([`ObjectMeta::head`]): the
//! front door copies them out as they are, and they take a tenth of the memory of a decoded
//! header map; the rarer paths through pingora's cache decode them. Bodies are `Bytes`, so a
//! hit and a Range seek are slices, not copies. It does not decide what is
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

use super::tags::{TagIndex, Tier};
use super::vary::variance_for;

/// Bytes charged per object on top of its header and body: the family slot, `Arc`s and
/// moka's own entry, so that many tiny objects still respect the bound.
const OBJECT_OVERHEAD: usize = 256;

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
            times: MetaTimes {
                fresh_until: Stamp::of(meta.fresh_until()),
                created: Stamp::of(meta.created()),
                provenance: Stamp::of(meta.provenance()),
                epoch: Stamp::of(meta.epoch()),
                stale_while_revalidate_sec: meta.stale_while_revalidate_sec(),
                stale_if_error_sec: meta.stale_if_error_sec(),
                variance: meta.variance(),
            },
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
/// header, kept alike by the decoded [`StoredMeta`] and the compact [`ObjectMeta`]. Times are
/// [`Stamp`]s: with 16-byte `SystemTime`s an object's record would take mimalloc's 224-byte
/// block instead of the 160-byte one.
#[derive(Debug, Clone, Copy)]
pub struct MetaTimes {
    pub fresh_until: Stamp,
    pub created: Stamp,
    /// pingora's tombstone for a URL's variants: a secondary variant admitted before the
    /// primary slot's provenance is not served (see `HttpCache::cache_vary_lookup`).
    pub provenance: Stamp,
    /// Reference point of Age and freshness: `updated`, or pingora's epoch override.
    pub epoch: Stamp,
    pub stale_while_revalidate_sec: u32,
    pub stale_if_error_sec: u32,
    pub variance: Option<HashBinary>,
}

impl MetaTimes {
    /// `CacheMeta::new` sets provenance to `created`, so the primary slot is rebuilt with its
    /// provenance there (the tombstone its variants are checked against) and secondary slots
    /// with their own admission time (what is checked). Age and freshness come from `epoch`
    /// either way.
    fn cache_meta(self, primary_slot: bool, header: ResponseHeader) -> CacheMeta {
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
        if let Some(v) = self.variance {
            meta.set_variance(v);
        }
        meta
    }
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
}

/// What a stored object keeps of its metadata: the times, and the header as it is served.
#[derive(Debug, Clone)]
pub struct ObjectMeta {
    pub times: MetaTimes,
    /// The status line and header fields a hit sends, each line ending in CRLF, without the
    /// framing fields that follow from the body ([`ObjectMeta::write_framing`]), the fields a
    /// hit adds (`Age`, `X-Cache-Status`, `Cache-Status`) and the blank line. See
    /// [`encode_head`].
    pub head: Box<[u8]>,
    /// What most responses do not have, behind one pointer: with the times above this keeps
    /// an object's record in mimalloc's 160-byte blocks.
    uncommon: Option<Box<Uncommon>>,
}

#[derive(Debug, Clone)]
struct Uncommon {
    /// The names the response varies on, lowercased, sorted, without duplicates.
    vary: Box<[String]>,
    /// `Cache-Status` members from caches before this one.
    upstream_cache_status: Option<http::HeaderValue>,
}

impl ObjectMeta {
    fn encode(meta: StoredMeta) -> ObjectMeta {
        let mut vary: Vec<String> = super::policy::vary_names(&meta.header).collect();
        vary.sort();
        vary.dedup();
        let uncommon = (!vary.is_empty() || meta.upstream_cache_status.is_some()).then(|| {
            Box::new(Uncommon {
                vary: exact_size(vary),
                upstream_cache_status: meta.upstream_cache_status,
            })
        });
        ObjectMeta {
            times: meta.times,
            head: encode_head(&meta.header),
            uncommon,
        }
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
        self.head.split(|b| *b == b'\n').skip(1).any(|line| {
            let name = line.split(|b| *b == b':').next().unwrap_or_default();
            name.eq_ignore_ascii_case(b"etag") || name.eq_ignore_ascii_case(b"last-modified")
        })
    }

    /// The status code, from the status line.
    pub fn status(&self) -> u16 {
        self.head
            .get(9..12)
            .and_then(|code| std::str::from_utf8(code).ok()?.parse().ok())
            .unwrap_or(200)
    }

    /// The framing fields of a stored response with a body of `body_len` bytes. They follow
    /// from the status and the body, so they are written per hit rather than kept: 44 bytes
    /// less per object, and for a typical head a smaller mimalloc block.
    pub fn write_framing(&self, out: &mut Vec<u8>, body_len: usize) {
        let status = self.status();
        // RFC 9110 §8.6: no Content-Length in a 1xx, 204 or 304 response.
        if !(status < 200 || status == 204 || status == 304) {
            let _ = std::io::Write::write_fmt(out, format_args!("content-length: {body_len}\r\n"));
        }
        // RFC 9110 §14.3: a stored full response can serve any byte range of itself.
        if status == 200 {
            out.extend_from_slice(b"accept-ranges: bytes\r\n");
        }
    }

    /// The header as served with a body of `body_len` bytes, decoded (for the paths that need
    /// a `ResponseHeader`).
    pub fn header(&self, body_len: usize) -> ResponseHeader {
        let mut wire = Vec::with_capacity(self.head.len() + 64);
        wire.extend_from_slice(&self.head);
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
        self.times.cache_meta(primary_slot, header)
    }

    /// The variant key a request would be stored under, if the response varies.
    pub fn variance_of(&self, req: &http::HeaderMap) -> Option<HashBinary> {
        variance_for(self.vary(), req)
    }

    fn weight(&self) -> usize {
        const ALLOCATION: usize = 32;
        let uncommon = self.uncommon.as_ref().map_or(0, |u| {
            let vary: usize = u.vary.iter().map(|n| n.len() + ALLOCATION).sum();
            let upstream = u.upstream_cache_status.as_ref().map_or(0, |v| v.len());
            std::mem::size_of::<Uncommon>() + ALLOCATION + vary + upstream
        });
        self.head.len() + ALLOCATION + uncommon + std::mem::size_of::<ObjectMeta>()
    }
}

/// One stored response.
#[derive(Debug)]
pub struct StoredObject {
    /// The variant slot: `None` for the primary slot, else the lookup key's variance.
    slot: Option<HashBinary>,
    pub meta: ObjectMeta,
    pub body: Bytes,
}

impl StoredObject {
    pub fn new(slot: Option<HashBinary>, meta: StoredMeta, body: Bytes) -> StoredObject {
        StoredObject::with(slot, ObjectMeta::encode(meta), body)
    }

    fn with(slot: Option<HashBinary>, meta: ObjectMeta, body: Bytes) -> StoredObject {
        StoredObject { slot, meta, body }
    }

    /// What the object is charged against the tier's bound. Asked when it is stored.
    fn weight(&self) -> u32 {
        let weight = self.meta.weight() + self.body.len() + OBJECT_OVERHEAD;
        u32::try_from(weight).unwrap_or(u32::MAX)
    }
}

/// Every stored variant of one primary key. Immutable: writers build a new family. Most URLs
/// do not vary, so one object is held without a list around it (moka keeps the value inline in
/// its entry: a family of one costs no allocation of its own).
#[derive(Debug, Clone)]
enum Family {
    One(Arc<StoredObject>),
    Variants(Arc<[Arc<StoredObject>]>),
}

impl Family {
    fn from_objects(mut objects: Vec<Arc<StoredObject>>) -> Option<Family> {
        match objects.len() {
            0 => None,
            1 => objects.pop().map(Family::One),
            _ => Some(Family::Variants(objects.into())),
        }
    }

    fn objects(&self) -> &[Arc<StoredObject>] {
        match self {
            Family::One(obj) => std::slice::from_ref(obj),
            Family::Variants(objects) => objects,
        }
    }

    /// How long from `now` some object of the family can still be served: fresh, stale within
    /// its stale-while-revalidate / stale-if-error window, or revalidated if it has a
    /// validator.
    fn useful_for(&self, now: SystemTime) -> Duration {
        self.objects()
            .iter()
            .map(|o| {
                let m = &o.meta;
                let grace = m
                    .times
                    .stale_while_revalidate_sec
                    .max(m.times.stale_if_error_sec);
                let keep = if m.has_validator() {
                    KEEP_FOR_REVALIDATION
                } else {
                    Duration::ZERO
                };
                let until = m.times.fresh_until.time() + Duration::from_secs(grace.into()) + keep;
                until.duration_since(now).unwrap_or(Duration::ZERO)
            })
            .max()
            .unwrap_or(Duration::ZERO)
    }

    fn weight(&self) -> u32 {
        self.objects()
            .iter()
            .fold(0u32, |sum, o| sum.saturating_add(o.weight()))
    }

    fn get(&self, slot: Option<&HashBinary>) -> Option<&Arc<StoredObject>> {
        self.objects().iter().find(|o| o.slot.as_ref() == slot)
    }

    fn with(&self, obj: Arc<StoredObject>) -> Family {
        let mut objects: Vec<_> = self
            .objects()
            .iter()
            .filter(|o| o.slot != obj.slot)
            .cloned()
            .collect();
        if objects.is_empty() {
            return Family::One(obj);
        }
        objects.push(obj);
        Family::Variants(objects.into())
    }

    /// The family without one slot; `None` if nothing is left.
    fn without(&self, slot: Option<&HashBinary>) -> Option<Family> {
        Family::from_objects(
            self.objects()
                .iter()
                .filter(|o| o.slot.as_ref() != slot)
                .cloned()
                .collect(),
        )
    }

    fn expired_at(&self, slot: Option<Option<&HashBinary>>, at: SystemTime) -> Family {
        let expire = |o: &Arc<StoredObject>| {
            if slot.is_some_and(|s| o.slot.as_ref() != s) {
                return o.clone();
            }
            let mut meta = o.meta.clone();
            // Its stale windows stay what its own directives (or `default_grace`) allowed:
            // see `PurgeMode::Expire`.
            meta.times.fresh_until = meta.times.fresh_until.min(Stamp::of(at));
            Arc::new(StoredObject::with(o.slot, meta, o.body.clone()))
        };
        match self {
            Family::One(o) => Family::One(expire(o)),
            Family::Variants(objects) => Family::Variants(objects.iter().map(expire).collect()),
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

impl moka::Expiry<HashBinary, Family> for UsefulLife {
    fn expire_after_create(
        &self,
        _key: &HashBinary,
        family: &Family,
        _at: std::time::Instant,
    ) -> Option<Duration> {
        Some(family.useful_for(SystemTime::now()))
    }

    fn expire_after_update(
        &self,
        _key: &HashBinary,
        family: &Family,
        _at: std::time::Instant,
        _left: Option<Duration>,
    ) -> Option<Duration> {
        Some(family.useful_for(SystemTime::now()))
    }
}

pub struct MemoryTier {
    families: moka::sync::Cache<HashBinary, Family>,
    capacity: u64,
    pub counters: Arc<TierCounters>,
}

impl MemoryTier {
    /// `tags`: told when a family leaves for space or age, so its tags can let go of it.
    pub fn new(capacity_bytes: u64, tags: Option<&'static TagIndex>) -> MemoryTier {
        let counters = Arc::new(TierCounters::default());
        let evictions = counters.clone();
        let families = moka::sync::Cache::builder()
            .max_capacity(capacity_bytes)
            .weigher(|_k: &HashBinary, f: &Family| f.weight())
            .expire_after(UsefulLife)
            .eviction_listener(move |primary: Arc<HashBinary>, family: Family, cause| {
                let n = family.objects().len() as u64;
                if matches!(
                    cause,
                    moka::notification::RemovalCause::Size
                        | moka::notification::RemovalCause::Expired
                ) {
                    if let Some(tags) = tags {
                        tags.forget(&primary, Tier::Memory);
                    }
                }
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
            .map(|(_, f)| f.objects().len() as u64)
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
        let obj = match first.meta.times.variance {
            None => first,
            Some(stored) => {
                let wanted = first.meta.variance_of(req)?;
                if wanted == stored {
                    first
                } else {
                    let other = family.get(Some(&wanted))?;
                    if other.meta.times.created < first.meta.times.provenance {
                        return None;
                    }
                    other
                }
            }
        };
        (obj.meta.times.fresh_until.time() >= now).then(|| obj.clone())
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
                None => Family::One(obj),
            };
            Op::Put(family)
        });
        self.counters.stores.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether any variant of `primary` is stored, fresh or not.
    pub fn holds(&self, primary: &HashBinary) -> bool {
        self.families.contains_key(primary)
    }

    /// Removes every variant of a URL. Returns how many objects were removed.
    pub fn purge_all(&self, primary: &HashBinary) -> usize {
        let removed = self
            .families
            .remove(primary)
            .map_or(0, |f| f.objects().len());
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
                        .objects()
                        .iter()
                        .filter(|o| slot.is_none_or(|s| o.slot.as_ref() == s))
                        .count();
                    if marked == 0 {
                        Op::Nop
                    } else {
                        Op::Put(f.expired_at(slot, now))
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
                    match f.without(slot) {
                        Some(rest) => Op::Put(rest),
                        None => Op::Remove,
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
                let meta = obj.meta.to_meta(obj.slot.is_none(), obj.body.len());
                Ok(Some((meta, Box::new(hit))))
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
                            Op::Put(f.with(Arc::new(fresh)))
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
        let weight = obj.weight();
        self.tier.insert(self.primary, obj);
        Some(weight as usize)
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

/// The whole body is known once stored, so the header is encoded ready to serve: HTTP/1.1, a
/// length instead of chunked framing, `Accept-Ranges` on 200s (hits are seekable), no
/// hop-by-hop fields, and none of the fields each hit sets itself. Names are lowercase.
fn encode_head(stored: &ResponseHeader) -> Box<[u8]> {
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
    let mut out = Vec::with_capacity(64 + stored.headers.len() * 40);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("Unknown").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut field = |name: &[u8], value: &[u8]| {
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    };
    for (name, value) in stored.headers.iter() {
        if !skip.contains(&name) {
            field(name.as_str().as_bytes(), value.as_bytes());
        }
    }
    exact_size(out)
}

/// The items in an allocation of their own size, for what a stored object keeps for hours.
/// `Vec::into_boxed_slice` alone is not that: mimalloc shrinks a block in place while the new
/// size is at least half of it, so a 251-byte head built in a 424-byte buffer kept all 448
/// bytes of its size class (about 1.9 MiB over 10,000 pages; see benches/README.md §3). The
/// items are moved, not cloned.
fn exact_size<T>(mut items: Vec<T>) -> Box<[T]> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn meta(body_note: &str) -> StoredMeta {
        let now = SystemTime::now();
        let mut header = ResponseHeader::build(200, None).unwrap();
        header.append_header("x-note", body_note).unwrap();
        StoredMeta {
            times: MetaTimes {
                fresh_until: Stamp::of(now + Duration::from_secs(60)),
                created: Stamp::of(now),
                provenance: Stamp::of(now),
                epoch: Stamp::of(now),
                stale_while_revalidate_sec: 0,
                stale_if_error_sec: 0,
                variance: None,
            },
            header,
            upstream_cache_status: None,
        }
    }

    /// As [`meta`], with a validator: a soft purge keeps such an object for revalidation.
    fn revalidatable(body_note: &str) -> StoredMeta {
        let mut m = meta(body_note);
        m.header.append_header("etag", "\"v1\"").unwrap();
        m
    }

    #[test]
    fn variants_share_a_family_and_purge_together() {
        let tier = MemoryTier::new(1 << 20, None);
        let p = [1u8; 16];
        tier.insert(
            p,
            StoredObject::new(None, revalidatable("a"), Bytes::from_static(b"gzip")),
        );
        tier.insert(
            p,
            StoredObject::new(
                Some([2; 16]),
                revalidatable("b"),
                Bytes::from_static(b"plain"),
            ),
        );
        assert_eq!(tier.get(&p, None).unwrap().body, "gzip");
        assert_eq!(tier.get(&p, Some(&[2; 16])).unwrap().body, "plain");
        assert_eq!(tier.expire_all(&p), 2);
        assert!(tier.get(&p, None).unwrap().meta.times.fresh_until.time() <= SystemTime::now());
        assert_eq!(tier.purge_all(&p), 2);
        assert!(tier.get(&p, None).is_none());
        assert_eq!(tier.purge_all(&p), 0);
    }

    #[test]
    fn removing_one_variant_keeps_the_other_and_removing_both_drops_the_url() {
        let tier = MemoryTier::new(1 << 20, None);
        let p = [3u8; 16];
        let (a, b) = ([4u8; 16], [5u8; 16]);
        tier.insert(
            p,
            StoredObject::new(Some(a), revalidatable("a"), Bytes::from_static(b"A")),
        );
        tier.insert(
            p,
            StoredObject::new(Some(b), revalidatable("b"), Bytes::from_static(b"B")),
        );
        assert_eq!(tier.object_count(), 2);
        assert!(tier.remove_slot(&p, Some(&a)));
        assert!(tier.get(&p, Some(&a)).is_none());
        assert_eq!(tier.get(&p, Some(&b)).unwrap().body, "B");
        assert_eq!(tier.expire(&p, Some(Some(&b))), 1);
        assert!(
            tier.get(&p, Some(&b))
                .unwrap()
                .meta
                .times
                .fresh_until
                .time()
                <= SystemTime::now()
        );
        assert!(tier.remove_slot(&p, Some(&b)));
        assert!(!tier.remove_slot(&p, Some(&b)));
        assert_eq!(tier.object_count(), 0);
    }

    #[test]
    fn meta_round_trips_through_cache_meta() {
        let mut m = meta("x");
        m.times.epoch = Stamp::of(m.times.created.time() + Duration::from_secs(5));
        m.times.variance = Some([9; 16]);
        let back = StoredMeta::from_meta(&m.to_meta(false));
        assert_eq!(back.times.epoch, m.times.epoch);
        assert_eq!(back.times.fresh_until, m.times.fresh_until);
        assert_eq!(back.times.variance, m.times.variance);
        assert_eq!(back.header.headers.get("x-note").unwrap(), "x");
    }

    #[test]
    fn stored_times_round_trip_exactly_and_clamp_outside_their_range() {
        let mut m = meta("x");
        m.times.created = Stamp::of(m.times.created.time() - Duration::from_nanos(123_456_789));
        m.times.epoch = Stamp::of(m.times.created.time() + Duration::from_nanos(7));
        m.times.variance = Some([9; 16]);
        let obj = StoredObject::new(None, m.clone(), Bytes::from_static(b"x"));
        let back = StoredMeta::from_meta(&obj.meta.to_meta(false, obj.body.len()));
        assert_eq!(back.times.created, m.times.created);
        assert_eq!(back.times.epoch, m.times.epoch);
        assert_eq!(back.times.fresh_until, m.times.fresh_until);
        assert_eq!(back.times.variance, m.times.variance);
        let before_1970 = SystemTime::UNIX_EPOCH - Duration::from_secs(1);
        assert_eq!(Stamp::of(before_1970).time(), SystemTime::UNIX_EPOCH);
        assert!(
            Stamp::of(SystemTime::UNIX_EPOCH + Duration::from_secs(1 << 40)).time()
                > m.times.fresh_until.time()
        );
    }

    #[test]
    fn a_stored_head_is_served_as_is_and_decodes_to_the_same_fields() {
        let mut origin = ResponseHeader::build(200, None).unwrap();
        origin.append_header("Content-Type", "text/html").unwrap();
        origin.append_header("Set-Cookie", "a=1").unwrap();
        origin.append_header("Set-Cookie", "b=2").unwrap();
        origin
            .append_header("Vary", "Cookie, Accept-Encoding")
            .unwrap();
        origin
            .append_header("Transfer-Encoding", "chunked")
            .unwrap();
        origin.append_header("Connection", "keep-alive").unwrap();
        origin.append_header("ETag", "\"e\"").unwrap();
        let mut m = meta("x");
        m.header = origin;
        let obj = StoredObject::new(None, m, Bytes::from_static(b"hello"));
        assert_eq!(
            &obj.meta.head[..],
            &b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\nset-cookie: a=1\r\nset-cookie: b=2\r\n\
               vary: Cookie, Accept-Encoding\r\netag: \"e\"\r\n"[..]
        );
        assert_eq!(obj.meta.status(), 200);
        let back = obj.meta.header(obj.body.len());
        assert_eq!(back.status, 200);
        let cookies: Vec<_> = back.headers.get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["a=1", "b=2"]);
        assert_eq!(back.headers.get("content-length").unwrap(), "5");
        assert_eq!(back.headers.get("accept-ranges").unwrap(), "bytes");
        assert!(back.headers.get("connection").is_none());
        assert!(obj.meta.has_validator());
        assert_eq!(obj.meta.vary(), ["accept-encoding", "cookie"]);
    }

    #[test]
    fn validators_are_read_from_the_head_by_field_name() {
        let stored = |name: &'static str| {
            let mut m = meta("x");
            m.header.append_header(name, "\"v\"").unwrap();
            StoredObject::new(None, m, Bytes::new())
                .meta
                .has_validator()
        };
        assert!(stored("ETag"));
        assert!(stored("Last-Modified"));
        assert!(!stored("X-ETag"));
        assert!(!stored("Etag-Note"));
    }

    /// Regression guard for the memory cost per object (benches/README.md §3): with its `Arc`
    /// counts the record must fit mimalloc's 160-byte block.
    #[test]
    fn a_stored_record_fits_a_160_byte_block() {
        assert!(std::mem::size_of::<StoredObject>() + 16 <= 160);
    }

    #[test]
    fn bound_holds() {
        let tier = MemoryTier::new(1 << 20, None);
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
