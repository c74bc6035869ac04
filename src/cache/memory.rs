//! The memory tier: a pingora `Storage` on its own index (`tinylfu.rs`: W-TinyLFU admission and
//! eviction), bounded by bytes (headers + bodies).
//!
//! Objects are grouped by primary key into a [`Variants`] holding every Vary variant of one URL,
//! so a purge of a URL drops or expires all its variants in one step and a hit costs one hash
//! lookup. An object keeps its header as the bytes a hit sends (`meta.rs`). Bodies are
//! `Bytes`, so a hit and a Range seek are slices, not copies. It does not decide what is
//! cacheable (see `policy.rs`) and it knows nothing of tiers below it.

use std::any::Any;
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora::cache::key::{CacheHashKey, CompactCacheKey, HashBinary};
use pingora::cache::storage::{
    HandleHit, HandleMiss, MissFinishType, PurgeOutcome, PurgeTarget, PurgeType,
};
use pingora::cache::trace::SpanHandle;
use pingora::cache::{CacheKey, CacheMeta, HitHandler, MissHandler, Storage};
use pingora::{Error, ErrorType, Result};

use super::fields::RequestFields;
use super::key::CacheUrl;
use super::meta::{choose_variant, ObjectMeta, Stamp, StoredMeta};
use super::tags::{TagIndex, Tier};
use super::tinylfu::{Index, Op, Removal};

/// Bytes charged per object on top of its header and body: the family slot, `Arc`s and
/// index's own entry, so that many tiny objects still respect the bound.
const OBJECT_OVERHEAD: usize = 256;

/// One stored response.
#[derive(Debug)]
pub struct StoredObject {
    /// With the object's variant slot among its rare fields ([`ObjectMeta::slot`]).
    pub meta: ObjectMeta,
    pub body: Bytes,
    /// What the request policy read once about the object's URL (`crate::rules`: which
    /// rules' URL conditions hold), so that its hits need not read it again.
    pub url_memo: UrlMemo,
}

impl StoredObject {
    pub fn new(slot: Option<HashBinary>, meta: StoredMeta, body: Bytes) -> StoredObject {
        StoredObject::with(slot, ObjectMeta::encode(meta), body)
    }

    pub fn with(slot: Option<HashBinary>, meta: ObjectMeta, body: Bytes) -> StoredObject {
        StoredObject {
            meta: meta.in_slot(slot),
            body,
            url_memo: UrlMemo::default(),
        }
    }

    /// The same object with a body of its own: for a body that borrows memory the memory
    /// tier must not keep (a view of a disk segment, part of a larger read).
    pub fn copied(&self) -> StoredObject {
        let mut meta = self.meta.clone();
        // A disk record's head is read whole; kept for long, its common lines are shared.
        meta.head = meta.head.to_split();
        StoredObject {
            meta,
            body: Bytes::copy_from_slice(&self.body),
            url_memo: UrlMemo(AtomicU64::new(self.url_memo.0.load(Ordering::Relaxed))),
        }
    }

    fn slot(&self) -> Option<&HashBinary> {
        self.meta.slot()
    }

    /// What the object is charged against the tier's bound. Asked when it is stored.
    fn weight(&self) -> u32 {
        let weight = self.meta.weight() + self.body.len() + OBJECT_OVERHEAD;
        u32::try_from(weight).unwrap_or(u32::MAX)
    }
}

/// One word kept beside a stored object for a layer above this one, which reads it, writes
/// it and says what it means (with its own mark of which writer's word it is). Zero until
/// written.
#[derive(Debug, Default)]
pub struct UrlMemo(pub AtomicU64);

/// Every stored variant of one primary key. Immutable: writers build a new family. Most URLs
/// do not vary, so one object is held without a list around it (the index keeps the value inline in
/// its entry: a family of one costs no allocation of its own).
#[derive(Debug, Clone)]
enum Variants {
    One(Arc<StoredObject>),
    Many(Arc<[Arc<StoredObject>]>),
}

impl Variants {
    fn from_objects(mut objects: Vec<Arc<StoredObject>>) -> Option<Variants> {
        match objects.len() {
            0 => None,
            1 => objects.pop().map(Variants::One),
            _ => Some(Variants::Many(objects.into())),
        }
    }

    fn objects(&self) -> &[Arc<StoredObject>] {
        match self {
            Variants::One(obj) => std::slice::from_ref(obj),
            Variants::Many(objects) => objects,
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
        self.objects().iter().find(|o| o.slot() == slot)
    }

    /// The family with `obj` in its slot, newest last; when that makes more than `max`, the
    /// oldest variants go (how many is returned). The primary slot stays: pingora finds a
    /// URL's variants through it, and its provenance is their tombstone.
    fn with(&self, obj: Arc<StoredObject>, max: usize) -> (Variants, usize) {
        let mut objects: Vec<_> = self
            .objects()
            .iter()
            .filter(|o| o.slot() != obj.slot())
            .cloned()
            .collect();
        let over = (objects.len() + 1).saturating_sub(max.max(2));
        let mut left = over;
        if over > 0 {
            objects.retain(|o| {
                let goes = left > 0 && o.slot().is_some();
                left -= usize::from(goes);
                !goes
            });
        }
        let displaced = over - left;
        if objects.is_empty() {
            return (Variants::One(obj), displaced);
        }
        objects.push(obj);
        (Variants::Many(objects.into()), displaced)
    }

    /// The family without one slot; `None` if nothing is left.
    fn without(&self, slot: Option<&HashBinary>) -> Option<Variants> {
        Variants::from_objects(
            self.objects()
                .iter()
                .filter(|o| o.slot() != slot)
                .cloned()
                .collect(),
        )
    }

    fn expired_at(&self, slot: Option<Option<&HashBinary>>, at: SystemTime) -> Variants {
        let expire = |o: &Arc<StoredObject>| {
            if slot.is_some_and(|s| o.slot() != s) {
                return o.clone();
            }
            let mut meta = o.meta.clone();
            // Its stale windows stay what its own directives (or `default_grace`) allowed:
            // see `PurgeMode::Expire`.
            meta.times.fresh_until = meta.times.fresh_until.min(Stamp::of(at));
            Arc::new(StoredObject::with(o.slot().copied(), meta, o.body.clone()))
        };
        match self {
            Variants::One(o) => Variants::One(expire(o)),
            Variants::Many(objects) => Variants::Many(objects.iter().map(expire).collect()),
        }
    }
}

tokio::task_local! {
    /// The memory lookup one request has made, so that the phases after it (the front door,
    /// `request_filter`, pingora's lookup of the primary slot and then of the variant) read
    /// one snapshot instead of looking the URL up again each (RFC-neutral: a snapshot taken
    /// when the request arrived). Set by [`for_one_request`].
    static THIS_REQUEST: RefCell<Option<Looked>>;
}

/// Runs one request's handling with `looked` (what the front door found, if it looked) as
/// its memory lookup of that URL.
pub async fn for_one_request<F: std::future::Future>(
    looked: Option<Looked>,
    request: F,
) -> F::Output {
    THIS_REQUEST.scope(RefCell::new(looked), request).await
}

/// What a memory lookup of one URL found: every stored variant, as of the lookup.
#[derive(Debug, Clone)]
pub struct Looked {
    primary: HashBinary,
    /// The URL's change stripe when it was looked up.
    version: u64,
    family: Option<Variants>,
    /// The URL `primary` is the hash of, when the looker said ([`Looked::of_url`]).
    url: Option<Arc<CacheUrl>>,
}

/// The hash storage indexes `url` by: this request's earlier lookup's, when it was of the
/// same URL (the front door declined the request), else hashed now. Saves the second of two
/// hashings of every request the front door hands to pingora's path (a miss's: about 1.3 % of
/// its instructions).
pub fn primary_hash_of(url: &CacheUrl) -> HashBinary {
    let seen = THIS_REQUEST.try_with(|seen| {
        (seen.borrow().as_ref())
            .filter(|l| l.url.as_deref() == Some(url))
            .map(|l| l.primary)
    });
    match seen {
        Ok(Some(primary)) => primary,
        _ => url.primary_hash(),
    }
}

impl Looked {
    /// This lookup, known to be of `url` (whose [`CacheUrl::primary_hash`] it was made with).
    pub fn of_url(mut self, url: CacheUrl) -> Looked {
        self.url = Some(Arc::new(url));
        self
    }

    /// The URL this lookup was of, when the looker said ([`Looked::of_url`]).
    pub fn url(&self) -> Option<&CacheUrl> {
        self.url.as_deref()
    }

    /// The primary key hash the lookup was made with.
    pub fn primary(&self) -> HashBinary {
        self.primary
    }

    /// The tier holds no variant of the URL, fresh or not.
    pub fn holds_nothing(&self) -> bool {
        self.family.is_none()
    }

    /// The stored object a request would be served, if it is fresh at `now`: the fast path's
    /// lookup. Follows the same Vary rules as pingora's lookup (primary slot first, then the
    /// request's variant, which must not predate the primary's provenance). `None` means "let
    /// pingora's cache state machine decide", never "not cached".
    pub fn fresh<F: RequestFields + ?Sized>(
        &self,
        req: &F,
        now: SystemTime,
    ) -> Option<Arc<StoredObject>> {
        let family = self.family.as_ref()?;
        let first = family.get(None)?;
        let (_, obj) = choose_variant(first, |o| &o.meta, req, |slot| family.get(Some(slot)))?;
        (obj.meta.times.fresh_until.time() >= now).then(|| obj.clone())
    }
}

/// Counters of the memory tier, read by the admin endpoint and metrics.
#[derive(Debug, Default)]
pub struct TierCounters {
    /// Lookups of a URL in the index (one per request that reaches the cache, plus the
    /// re-check of a miss after it takes the cache lock).
    pub lookups: AtomicU64,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub stores: AtomicU64,
    pub purges: AtomicU64,
    /// Objects evicted to make room.
    pub evicted_size: AtomicU64,
    /// Objects dropped once nothing could serve them any more (see [`Variants::useful_for`]).
    pub evicted_expired: AtomicU64,
    /// A URL's oldest variants, replaced past `[cache] max_variants`.
    pub evicted_variants: AtomicU64,
}

/// How long an object is kept past its freshness and stale windows when it has a validator
/// (`ETag` or `Last-Modified`): a conditional request can still turn it into a cheap 304.
pub const KEEP_FOR_REVALIDATION: Duration = Duration::from_secs(86400);

/// How long a family stays: until none of its objects can be served any more, not even
/// stale.
fn useful_life(family: &Variants) -> Duration {
    family.useful_for(SystemTime::now())
}

pub struct MemoryTier {
    families: Index<Variants>,
    capacity: u64,
    pub counters: Arc<TierCounters>,
    /// How often the variants of the URLs in each stripe were changed (stored, purged,
    /// expired, refreshed): a request reuses its earlier lookup of a URL only while the URL's
    /// stripe has not moved, so the reuse sees exactly what a new lookup would (a request
    /// that waited on another's fill sees the fill).
    changes: Box<[AtomicU64]>,
    /// `[cache] max_variants`.
    max_variants: usize,
}

/// Stripes of [`MemoryTier::changes`]: 32 KiB; two URLs in one stripe only cost an extra
/// lookup now and then.
const CHANGE_STRIPES: usize = 4096;

impl MemoryTier {
    /// `tags`: told when a family leaves for space or age, so its tags can let go of it.
    pub fn new(
        capacity_bytes: u64,
        max_variants: usize,
        tags: Option<&'static TagIndex>,
    ) -> MemoryTier {
        let counters = Arc::new(TierCounters::default());
        let evictions = counters.clone();
        let families = Index::new(
            capacity_bytes,
            Variants::Many(Arc::from(Vec::new())),
            Variants::weight,
            useful_life,
            Some(Box::new(
                move |primary: &HashBinary, family: Variants, why: Removal| {
                    let n = family.objects().len() as u64;
                    if let Some(tags) = tags {
                        tags.forget(primary, Tier::Memory);
                    }
                    match why {
                        Removal::Size => evictions.evicted_size.fetch_add(n, Ordering::Relaxed),
                        Removal::Expired => {
                            evictions.evicted_expired.fetch_add(n, Ordering::Relaxed)
                        }
                    };
                },
            )),
        );
        MemoryTier {
            families,
            capacity: capacity_bytes,
            counters,
            changes: (0..CHANGE_STRIPES).map(|_| AtomicU64::new(0)).collect(),
            max_variants,
        }
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.capacity
    }

    /// Bytes held.
    pub fn resident_bytes(&self) -> u64 {
        self.families.weight()
    }

    /// Stored objects (all variants).
    pub fn object_count(&self) -> u64 {
        let mut objects = 0;
        self.families
            .for_each(|f| objects += f.objects().len() as u64);
        objects
    }

    /// Looks `primary` up in the index (counted as a lookup). Within a request's scope
    /// ([`for_one_request`]) the result is what that request's later reads of `primary` see.
    pub fn look(&self, primary: &HashBinary) -> Looked {
        self.look_at(primary, Instant::now())
    }

    /// [`Self::look`] by a clock read at `at` (the request's start): a hit reads the clock
    /// once, not once per step.
    pub fn look_at(&self, primary: &HashBinary, at: Instant) -> Looked {
        self.counters.lookups.fetch_add(1, Ordering::Relaxed);
        // Read before the index: a change in between makes the lookup look outdated, never
        // the other way round.
        let version = self.stripe(primary).load(Ordering::Acquire);
        let looked = Looked {
            primary: *primary,
            version,
            family: self.families.get_at(primary, at),
            url: None,
        };
        let _ = THIS_REQUEST.try_with(|seen| *seen.borrow_mut() = Some(looked.clone()));
        looked
    }

    fn stripe(&self, primary: &HashBinary) -> &AtomicU64 {
        let at = u16::from_le_bytes([primary[0], primary[1]]) as usize % CHANGE_STRIPES;
        &self.changes[at]
    }

    /// Called after every change to `primary`'s variants (see [`MemoryTier::changes`]).
    fn changed(&self, primary: &HashBinary) {
        self.stripe(primary).fetch_add(1, Ordering::Release);
    }

    /// What this request already looked up for `primary`, if nothing changed since, or a
    /// lookup now.
    pub fn recall(&self, primary: &HashBinary) -> Looked {
        let seen = THIS_REQUEST.try_with(|seen| {
            seen.borrow()
                .as_ref()
                .filter(|l| {
                    l.primary == *primary
                        && l.version == self.stripe(primary).load(Ordering::Acquire)
                })
                .cloned()
        });
        match seen {
            Ok(Some(looked)) => looked,
            _ => self.look(primary),
        }
    }

    pub fn get(
        &self,
        primary: &HashBinary,
        slot: Option<&HashBinary>,
    ) -> Option<Arc<StoredObject>> {
        self.recall(primary).family?.get(slot).cloned()
    }

    /// [`Looked::fresh`] on what this request has looked up, or on a lookup now.
    pub fn fresh_object(
        &self,
        primary: &HashBinary,
        req: &http::HeaderMap,
        now: SystemTime,
    ) -> Option<Arc<StoredObject>> {
        self.recall(primary).fresh(req, now)
    }

    /// A writer for one response; it gives up (stores nothing) past `limit` body bytes.
    /// A fill's handler, with the metadata the object keeps (encoded once per fill, by the
    /// caller, which may store it in another tier too).
    pub(crate) fn miss(
        &'static self,
        primary: HashBinary,
        slot: Option<HashBinary>,
        meta: ObjectMeta,
        limit: usize,
    ) -> MemoryMiss {
        MemoryMiss {
            tier: self,
            primary,
            slot,
            meta,
            body: BytesMut::new(),
            chunks: Vec::new(),
            len: 0,
            limit,
        }
    }

    pub fn insert(&self, primary: HashBinary, obj: StoredObject) {
        self.insert_shared(primary, Arc::new(obj));
    }

    /// [`Self::insert`] of an object already shared (a disk hit being served).
    pub fn insert_shared(&self, primary: HashBinary, obj: Arc<StoredObject>) {
        let mut displaced = 0;
        self.families.compute(&primary, |old| {
            Op::Put(match old {
                Some(family) => {
                    let (family, gone) = family.with(obj, self.max_variants);
                    displaced = gone;
                    family
                }
                None => Variants::One(obj),
            })
        });
        self.changed(&primary);
        self.counters.stores.fetch_add(1, Ordering::Relaxed);
        if displaced > 0 {
            (self.counters.evicted_variants).fetch_add(displaced as u64, Ordering::Relaxed);
        }
    }

    /// Whether any variant of `primary` is stored, fresh or not.
    pub fn holds(&self, primary: &HashBinary) -> bool {
        self.families.contains(primary)
    }

    /// Removes every variant of a URL. Returns how many objects were removed.
    pub fn purge_all(&self, primary: &HashBinary) -> usize {
        let removed = self
            .families
            .remove(primary)
            .map_or(0, |f| f.objects().len());
        self.changed(primary);
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
        self.families.compute(primary, |old| match old {
            Some(f) => {
                marked = f
                    .objects()
                    .iter()
                    .filter(|o| slot.is_none_or(|s| o.slot() == s))
                    .count();
                if marked == 0 {
                    Op::Nop
                } else {
                    Op::Put(f.expired_at(slot, now))
                }
            }
            None => Op::Nop,
        });
        self.changed(primary);
        marked
    }

    fn remove_slot(&self, primary: &HashBinary, slot: Option<&HashBinary>) -> bool {
        let mut removed = false;
        self.families.compute(primary, |old| match old {
            Some(f) => {
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
        self.changed(primary);
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
                let meta = obj.meta.to_meta(obj.slot().is_none(), obj.body.len());
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
            ObjectMeta::encode_cache_meta(meta),
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
        self.families.compute(&primary, |old| match old {
            Some(f) => match f.get(slot.as_ref()) {
                Some(obj) => {
                    updated = true;
                    let fresh =
                        StoredObject::new(slot, StoredMeta::from_meta(meta), obj.body.clone());
                    Op::Put(f.with(Arc::new(fresh), self.max_variants).0)
                }
                None => Op::Nop,
            },
            None => Op::Nop,
        });
        self.changed(&primary);
        // Not held is no error: a purge since took it, or the copy was read from the disk
        // tier and not promoted (one a soft purge marked stale), whose refresh is the disk
        // tier's. Regression: an error here made pingora log a warning and the tiered store
        // skip the surrogate keys of the disk tier's refreshed copy.
        Ok(updated)
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
    meta: ObjectMeta,
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
        let obj = StoredObject::with(self.slot, self.meta, body);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::meta::{AgeWhenHeard, MetaTimes};
    use pingora::http::ResponseHeader;
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
                age_when_heard: AgeWhenHeard::NONE,
                stale_while_revalidate_sec: 0,
                stale_if_error_sec: 0,
                variance: None,
                content_coded: false,
                field_names: crate::cache::meta::FieldNames::ANY,
                brotli_declined: false,
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
        let tier = MemoryTier::new(1 << 20, 32, None);
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

    /// Regression: a URL kept every variant its `Vary` made, each new one copying the list
    /// and each hit searching it, so a client sending a new `User-Agent` per request to a
    /// page with `Vary: User-Agent` grew one family without bound.
    #[test]
    fn a_url_keeps_at_most_max_variants_and_the_oldest_go_first() {
        let tier = MemoryTier::new(1 << 20, 3, None);
        let p = [1u8; 16];
        // The primary slot (the first response, through which pingora finds the others)
        // stays whatever goes.
        tier.insert(
            p,
            StoredObject::new(None, revalidatable("v"), "first".into()),
        );
        for n in 0..4u8 {
            let body = Bytes::from(vec![b'a' + n]);
            tier.insert(
                p,
                StoredObject::new(Some([n; 16]), revalidatable("v"), body),
            );
        }
        assert_eq!(tier.get(&p, None).unwrap().body, "first");
        assert!(tier.get(&p, Some(&[0; 16])).is_none());
        assert!(tier.get(&p, Some(&[1; 16])).is_none());
        for n in 2..4u8 {
            assert_eq!(tier.get(&p, Some(&[n; 16])).unwrap().body, vec![b'a' + n]);
        }
        assert_eq!(tier.object_count(), 3);
        assert_eq!(tier.counters.evicted_variants.load(Ordering::Relaxed), 2);
        // Storing a variant again replaces it in place: nothing else goes.
        tier.insert(
            p,
            StoredObject::new(Some([2; 16]), revalidatable("v"), "c2".into()),
        );
        assert_eq!(tier.object_count(), 3);
        assert_eq!(tier.get(&p, Some(&[2; 16])).unwrap().body, "c2");
    }

    /// Within one request the lookup it made is read again, not repeated; any change to the
    /// URL since (a fill it waited on, a purge) makes the next read a real lookup.
    #[tokio::test]
    async fn a_request_rereads_its_lookup_until_the_url_changes() {
        let tier: &'static MemoryTier = Box::leak(Box::new(MemoryTier::new(1 << 20, 32, None)));
        let (p, other) = ([1u8; 16], [9u8; 16]);
        let lookups = || tier.counters.lookups.load(Ordering::Relaxed);
        for_one_request(None, async {
            assert!(tier.get(&p, None).is_none());
            assert!(tier.get(&p, None).is_none());
            assert_eq!(lookups(), 1, "read again, not looked up again");
            tier.insert(
                p,
                StoredObject::new(None, meta("a"), Bytes::from_static(b"a")),
            );
            assert_eq!(tier.get(&p, None).unwrap().body, "a", "the fill is seen");
            assert_eq!(lookups(), 2);
            assert!(tier.get(&other, None).is_none());
            assert_eq!(tier.get(&p, None).unwrap().body, "a");
            assert_eq!(lookups(), 4, "one lookup remembered at a time");
            tier.purge_all(&p);
            assert!(tier.get(&p, None).is_none(), "the purge is seen");
            assert!(tier
                .look(&p)
                .fresh(&http::HeaderMap::new(), SystemTime::now())
                .is_none());
        })
        .await;
        // Outside a request every read looks up.
        let before = lookups();
        tier.get(&p, None);
        tier.get(&p, None);
        assert_eq!(lookups(), before + 2);
    }

    #[test]
    fn removing_one_variant_keeps_the_other_and_removing_both_drops_the_url() {
        let tier = MemoryTier::new(1 << 20, 32, None);
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
        assert_eq!(back.times.age_when_heard, AgeWhenHeard::NONE);
        m.times.age_when_heard = AgeWhenHeard::of(Duration::from_secs(600));
        let stored = StoredObject::new(None, m.clone(), Bytes::from_static(b"x"));
        let back = StoredMeta::from_meta(&m.to_meta(false));
        assert_eq!(back.times.age_when_heard, m.times.age_when_heard);
        assert_eq!(
            stored.meta.times.heard(),
            m.times.epoch.time() + Duration::from_secs(600)
        );
    }

    #[test]
    fn an_age_when_heard_is_exact_to_nine_hours_then_never_later_by_a_minute() {
        let kept = |secs: u64| AgeWhenHeard::of(Duration::from_secs(secs)).age().as_secs();
        for secs in [0, 1, 59, 600, 3_600, 32_767] {
            assert_eq!(kept(secs), secs);
        }
        for secs in [32_768, 86_399, 86_400, 7 * 86_400 + 59] {
            assert!(
                kept(secs) <= secs && secs - kept(secs) < 60,
                "{secs}: {}",
                kept(secs)
            );
        }
        let most = kept(u64::MAX);
        assert!(
            most >= 22 * 86_400 && most == kept(most + 3_600),
            "saturates: {most}"
        );
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
    fn the_rare_times_and_the_slot_kept_apart_come_back() {
        let mut m = meta("x");
        m.times.provenance = Stamp::of(m.times.created.time() - Duration::from_secs(3600));
        m.times.variance = Some([9; 16]);
        let varied = StoredObject::new(Some([9; 16]), m.clone(), Bytes::from_static(b"x"));
        assert_eq!(varied.slot(), Some(&[9; 16]));
        assert_eq!(varied.meta.times().provenance, m.times.provenance);
        assert_eq!(varied.meta.variance(), Some([9; 16]));
        let primary = StoredMeta::from_meta(&varied.meta.to_meta(true, 1));
        assert_eq!(primary.times.created, m.times.provenance);
        // Without a variance pingora never reads the provenance: it is not kept.
        m.times.variance = None;
        let plain = StoredObject::new(None, m.clone(), Bytes::from_static(b"x"));
        assert_eq!(plain.slot(), None);
        assert_eq!(plain.meta.times().provenance, m.times.created);
        assert_eq!(plain.meta.times().variance, None);
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
        // The lines most objects share first, then this object's own (`cache::head`).
        assert_eq!(
            &obj.meta.head.to_vec()[..],
            &b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nvary: Cookie, Accept-Encoding\r\n\
               Set-Cookie: a=1\r\nSet-Cookie: b=2\r\netag: \"e\"\r\n"[..]
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

    /// Regression guard for the memory cost per object (benches/README.md §23): with its `Arc`
    /// counts the record must fit mimalloc's 128-byte block.
    #[test]
    fn a_stored_record_fits_a_128_byte_block() {
        assert!(std::mem::size_of::<StoredObject>() + 16 <= 128);
    }

    /// A family is two words, so that the index's slot stays 48 bytes (`cache::tinylfu`).
    #[test]
    fn a_family_is_two_words() {
        assert_eq!(std::mem::size_of::<Variants>(), 16);
    }

    #[test]
    fn bound_holds() {
        let tier = MemoryTier::new(1 << 20, 32, None);
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
