//! The cache: its key, its storage policy, Vary handling and its storage tiers. It owns what
//! is stored and how it is found and invalidated; it does not see requests or origins (that is
//! `proxy`) nor where purges come from (that is `purge`).
//!
//! [`Store`] is the one pingora `Storage`: memory first, then disk. A disk hit is promoted to
//! memory when it fits; a miss is written to both tiers as it streams (write-through).

pub mod bans;
pub mod date;
pub mod directives;
pub mod disk;
pub mod fields;
pub mod files;
pub mod fills;
pub mod fx;
pub mod head;
pub mod hit_for_miss;
pub mod key;
pub mod keyhash;
pub mod memory;
pub mod meta;
pub mod partial;
pub mod policy;
pub mod purge_times;
pub mod status;
pub mod tags;
pub mod target;
pub mod tinylfu;
pub mod vary;

use std::any::Any;

use async_trait::async_trait;
use pingora::cache::key::{CacheHashKey, HashBinary};
use pingora::cache::storage::{HandleMiss, MissFinishType, PurgeOutcome, PurgeTarget, PurgeType};
use pingora::cache::trace::SpanHandle;
use pingora::cache::{CacheKey, CacheMeta, HitHandler, MissHandler, Storage};
use pingora::Result;

use bans::Invalidations;
use disk::{DiskBody, DiskTier, DiskWrite};
use key::{CacheUrl, Scheme};
use memory::{MemoryHit, MemoryMiss, MemoryTier, StoredObject};
use meta::{MetaTimes, ObjectMeta, Stamp, StoredMeta};
use tags::{TagIndex, Tier};

/// What an invalidation does to the objects it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PurgeMode {
    /// Remove them.
    Delete,
    /// Keep them but mark them stale, so the next request revalidates (soft purge). A stale
    /// copy is served meanwhile only where the response's own `stale-while-revalidate` (or
    /// `[cache] default_grace`) allows it; a response that forbids stale use (`must-revalidate`,
    /// `s-maxage`, `no-cache`: RFC 9111 §4.2.4) makes the next readers wait for the
    /// revalidation, one request to the origin for all of them (the cache lock), which answers
    /// 304 when the page did not change.
    Expire,
}

/// The storage tiers of one Skua process, shared by every request for its lifetime.
pub struct Store {
    pub memory: MemoryTier,
    pub disk: Option<&'static DiskTier>,
    pub tags: &'static TagIndex,
    pub invalidations: Invalidations,
    /// 206 pieces of representations held in no tier (`partial`).
    pub partial: partial::PartialStore,
    /// What fills in progress hold of `[cache] fill_memory`.
    pub fills: fills::FillBudget,
    memory_max_object: usize,
}

impl Store {
    /// A zero-downtime upgrade has begun: the new process owns the disk tier's directory
    /// from now on, and this one leaves its checkpoint and bans file alone.
    pub fn hand_over(&self) {
        self.invalidations.hand_over();
        if let Some(disk) = self.disk {
            disk.hand_over();
        }
    }

    pub fn new(
        memory_bytes: u64,
        memory_max_object: usize,
        max_variants: usize,
        disk: Option<&'static DiskTier>,
        tags: &'static TagIndex,
        ttl_cap: std::time::Duration,
        fill_memory: usize,
    ) -> Store {
        Store {
            memory: MemoryTier::new(memory_bytes, max_variants, Some(tags)),
            disk,
            tags,
            invalidations: Invalidations::new(ttl_cap, disk.map(|d| d.config.path.join("bans"))),
            // Pieces are for representations too large or too rarely read whole to be in a
            // tier; an eighth of the memory tier's bound keeps them from crowding it out.
            partial: partial::PartialStore::new(memory_bytes / 8),
            fills: fills::FillBudget::new(fill_memory),
            memory_max_object,
        }
    }

    /// Invalidates every object carrying any of `tags`, in every tier. Returns how many
    /// objects were affected.
    pub async fn invalidate_tags(&'static self, tags: &[&str], mode: PurgeMode) -> usize {
        let mut affected = 0;
        for tag in tags {
            // Recorded before the index is read, so that a fill still on its way, which the
            // index cannot name yet, sees it when it finishes (`TieredMiss::finish`).
            let now = std::time::SystemTime::now();
            self.invalidations.record_tag_purge(tag, now);
            // Nor can it name what the disk tier holds until its tags are read back after a
            // start: the read-back drops what the purge covers (a soft purge too, as the
            // index cannot tell which variants it would mark). Counted as one, as a ban is.
            if self
                .disk
                .is_some_and(|d| d.tag_purged_while_loading(tag, now))
            {
                affected += 1;
            }
            let primaries = match mode {
                PurgeMode::Delete => self.tags.take(tag),
                PurgeMode::Expire => self.tags.peek(tag),
            };
            for primary in primaries {
                affected += self.invalidate_primary(&primary, mode).await;
            }
        }
        affected
    }

    /// Removes every copy of `primary` from both tiers and its tags from the index: a copy
    /// that must not be served (overtaken by a purge, or unindexable when the tag index is
    /// full).
    async fn drop_everywhere(&'static self, primary: &HashBinary) {
        if let Some(disk) = self.disk {
            disk.purge_all(primary).await;
        }
        self.memory.purge_all(primary);
        self.partial.purge(primary);
        self.tags.forget_everywhere(primary);
    }

    /// Whether a tier holds a complete copy of `primary` (any variant, fresh or not): then a
    /// Range request is served from it, or it is revalidated, and no piece is fetched.
    pub fn holds_complete(&self, primary: &HashBinary) -> bool {
        self.memory.holds(primary) || self.disk.is_some_and(|d| d.holds(primary))
    }

    /// Stores the whole representation its pieces combined into (RFC 9111 §3.4) as a
    /// complete `200` in the memory tier.
    pub fn store_combined(
        &self,
        primary: HashBinary,
        pieces: &partial::Partial,
        body: bytes::Bytes,
    ) {
        let mut header = pieces.head.clone();
        if header.set_status(200).is_err() {
            return;
        }
        let created = Stamp::of(pieces.created);
        let meta = StoredMeta {
            times: MetaTimes {
                fresh_until: Stamp::of(pieces.fresh_until),
                created,
                provenance: created,
                epoch: created,
                age_when_heard: pieces.age_when_heard,
                stale_while_revalidate_sec: 0,
                stale_if_error_sec: 0,
                variance: None,
                content_coded: false,
                field_names: crate::cache::meta::FieldNames::ANY,
                brotli_declined: false,
            },
            header,
            upstream_cache_status: None,
        };
        self.memory
            .insert(primary, StoredObject::new(None, meta, body));
    }

    /// Puts a disk hit being served into the memory tier when it fits. An object not yet
    /// trusted (the purge bus is catching up) stays on disk only, so a purge the catch-up
    /// applies cannot miss a copy promoted meanwhile.
    ///
    /// The memory tier keeps a copy of the body: a disk hit's body may be a view of a mapped
    /// segment (`disk::mapped`), which the memory tier must not hold (regression: it would
    /// keep an evicted segment's file, unlinked, taking disk space past the tier's bound, and
    /// a memory hit could then wait for the disk to read its pages back).
    ///
    /// Nor does a copy purged since the origin last vouched for it: a soft purge leaves it on
    /// disk marked stale, and a read may have found it before the mark, fresh (regression:
    /// promoted fresh, a soft-purged page was served from memory until it expired).
    ///
    /// The copy is named in the tag index as held in memory (regression: only its disk copy
    /// was, and once the disk let go of the URL a tag purge found nothing while the memory
    /// tier went on serving it); one the full index cannot name stays on disk.
    pub fn promote(&self, primary: HashBinary, obj: &StoredObject) {
        let times = &obj.meta.times;
        let vouched = times.epoch.time();
        let purged_since = |tags: &[String]| {
            self.invalidations.purged_since(&primary, vouched)
                || self.invalidations.tags_purged_since(tags, vouched)
        };
        if self.invalidations.trust(times.heard()) != bans::Trust::Yes
            || obj.body.len() > self.memory_max_object
        {
            return;
        }
        let tags = self.tags.tags_of_stored(&obj.meta, obj.body.len());
        if purged_since(&tags) || !self.tags.record_tags(primary, Tier::Memory, &tags) {
            return;
        }
        self.memory
            .insert_shared(primary, std::sync::Arc::new(obj.copied()));
        // A purge between the check and the insert looked for the copy before it was there.
        if purged_since(&tags) {
            self.memory.purge_all(&primary);
        }
    }

    /// The largest object any tier stores: pingora's per-request size limit.
    pub fn max_object_size(&self) -> usize {
        let disk = self.disk.map_or(0, |d| d.config.max_object_size as usize);
        self.memory_max_object.max(disk)
    }

    /// Bans everything under `url`'s host and path. A ban the file system refuses (another
    /// program filled it) is saved once the oldest disk segments give their space back: a
    /// restart that did not know it would serve what it covers from disk.
    pub async fn ban(&self, url: &CacheUrl) {
        if self.invalidations.ban_url(url) {
            return;
        }
        let Some(disk) = self.disk else {
            return;
        };
        while !self.invalidations.save_missing_bans() {
            if !disk.free_space().await {
                // No segment is left for the ban to cover.
                return;
            }
        }
    }

    /// Invalidates every variant of `url` under both schemes, in every tier, disk first so the
    /// memory tier cannot be refilled from a stale disk copy. Returns how many objects were
    /// affected (an object in both tiers counts once per tier).
    pub async fn invalidate(&'static self, url: &CacheUrl, mode: PurgeMode) -> usize {
        let mut affected = 0;
        for scheme in [Scheme::Http, Scheme::Https] {
            let primary = url.with_scheme(scheme).primary_hash();
            affected += self.invalidate_primary(&primary, mode).await;
        }
        affected
    }

    async fn invalidate_primary(&'static self, primary: &HashBinary, mode: PurgeMode) -> usize {
        let now = std::time::SystemTime::now();
        self.invalidations.record_purge(*primary, now);
        if mode == PurgeMode::Delete {
            self.invalidations.record_delete(*primary, now);
        }
        let on_disk = match (self.disk, mode) {
            (Some(d), PurgeMode::Delete) => d.purge_all(primary).await,
            (Some(d), PurgeMode::Expire) => d.expire_all(primary).await,
            (None, _) => 0,
        };
        let in_memory = match mode {
            PurgeMode::Delete => self.memory.purge_all(primary),
            PurgeMode::Expire => self.memory.expire_all(primary),
        };
        // Pieces are never revalidated (`partial`): a soft purge drops them too.
        let pieces = self.partial.purge(primary);
        if mode == PurgeMode::Delete {
            self.tags.forget_everywhere(primary);
        }
        on_disk + in_memory + pieces
    }
}

#[async_trait]
impl Storage for Store {
    async fn lookup(
        &'static self,
        key: &CacheKey,
        trace: &SpanHandle,
    ) -> Result<Option<(CacheMeta, HitHandler)>> {
        if let Some(found) = self.memory.lookup(key, trace).await? {
            return Ok(Some(found));
        }
        let Some(disk) = self.disk else {
            return Ok(None);
        };
        let primary = key.primary_bin();
        let slot = key.variance_bin();
        let Some(entry) = disk.lookup(&primary, slot.as_ref()).await else {
            return Ok(None);
        };
        let served = entry.meta.to_meta(slot.is_none(), entry.body_len as usize);
        // A purge applied while the disk index was still loading (a restarted node replaying
        // the purge bus), or a tag purge while its tags were, found nothing to remove; its
        // time is recorded, and an entry fetched before it is dropped here instead of being
        // served.
        let vouched = entry.meta.times.epoch.time();
        if (self.invalidations).deleted_since(&primary, entry.meta.times.created.time())
            || disk.purged_by_tag_while_loading(served.response_header(), vouched)
        {
            disk.purge_all(&primary).await;
            return Ok(None);
        }
        match entry.body {
            DiskBody::Whole(body) => {
                let hit = Box::new(MemoryHit::new(body.clone(), true));
                self.promote(primary, &StoredObject::with(slot, entry.meta, body));
                Ok(Some((served, hit)))
            }
            DiskBody::Stream(hit) => Ok(Some((served, Box::new(hit)))),
        }
    }

    async fn get_miss_handler(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        _trace: &SpanHandle,
    ) -> Result<MissHandler> {
        let primary = key.primary_bin();
        let slot = key.variance_bin();
        self.invalidations.cover(usable_for(meta));
        let stored = ObjectMeta::encode_cache_meta(meta);
        let disk = self
            .disk
            .filter(|d| d.admit(&primary))
            .map(|d| d.start_write(primary, slot, stored.clone()));
        let memory = self
            .memory
            .miss(primary, slot, stored, self.memory_max_object);
        // `created` is when the request was sent less the response's `Age` (regression: a
        // frontend purged before its backend stored the backend's copy from before the edit
        // when that copy was under a second old, `Age: 0`).
        let fetched =
            policy::allowing_for_whole_seconds(meta.created(), &meta.response_header().headers);
        Ok(Box::new(TieredMiss {
            memory,
            disk,
            primary,
            fetched,
            tags: self.tags.tags_of(meta.response_header()),
            store: self,
        }))
    }

    async fn purge(
        &'static self,
        target: PurgeTarget<'_>,
        purge_type: PurgeType,
        trace: &SpanHandle,
    ) -> Result<PurgeOutcome> {
        let key = target.key();
        if key.variance.is_none() {
            if let Some(disk) = self.disk {
                disk.purge_all(&key.primary).await;
            }
            self.tags.forget_everywhere(&key.primary);
        }
        self.memory.purge(target, purge_type, trace).await
    }

    async fn expire(
        &'static self,
        target: PurgeTarget<'_>,
        trace: &SpanHandle,
    ) -> Result<PurgeOutcome> {
        let key = target.key();
        if let Some(disk) = self.disk {
            if key.variance.is_none() {
                disk.expire_all(&key.primary).await;
            }
        }
        self.memory.expire(target, trace).await
    }

    async fn update_meta(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        trace: &SpanHandle,
    ) -> Result<bool> {
        self.invalidations.cover(usable_for(meta));
        let on_disk = match self.disk {
            Some(d) => {
                d.update_meta(&key.primary_bin(), key.variance_bin().as_ref(), meta)
                    .await
            }
            None => false,
        };
        let in_memory = self.memory.update_meta(key, meta, trace).await?;
        // A 304 may bring new surrogate keys: the index names the object under them too.
        let primary = key.primary_bin();
        let mut indexed = true;
        for (held, tier) in [(on_disk, Tier::Disk), (in_memory, Tier::Memory)] {
            if held {
                indexed &= self.tags.record(primary, tier, meta.response_header());
            }
        }
        // The proxy refuses a 304 a purge overtook (`response_cache_filter`); one that lands
        // while the tiers are written is caught here, or the refresh would undo it.
        let overtaken = self.invalidations.purged_since(&primary, meta.updated());
        if !indexed || overtaken {
            self.drop_everywhere(&primary).await;
            return Ok(false);
        }
        Ok(on_disk || in_memory)
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync + 'static) {
        self
    }
}

/// How long from now a response stored with `meta` may be served without asking the origin:
/// fresh, then stale within its stale-while-revalidate or stale-if-error window. A ban must
/// last that long to cover it.
fn usable_for(meta: &CacheMeta) -> std::time::Duration {
    let window = meta
        .stale_while_revalidate_sec()
        .max(meta.stale_if_error_sec());
    let since_now = meta
        .fresh_until()
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    since_now.saturating_add(std::time::Duration::from_secs(window.into()))
}

/// Write-through: the body goes to memory (while it fits) and to a disk file as it streams.
struct TieredMiss {
    memory: MemoryMiss,
    disk: Option<DiskWrite>,
    primary: HashBinary,
    /// When the origin request for this response was sent.
    fetched: std::time::SystemTime,
    tags: Vec<String>,
    store: &'static Store,
}

#[async_trait]
impl HandleMiss for TieredMiss {
    async fn write_body(&mut self, data: bytes::Bytes, _eof: bool) -> Result<()> {
        if let Some(disk) = self.disk.as_mut() {
            disk.write(&data);
        }
        self.memory.write(data);
        Ok(())
    }

    async fn finish(self: Box<Self>) -> Result<MissFinishType> {
        let this = *self;
        let invalidations = &this.store.invalidations;
        let overtaken = || {
            invalidations.purged_since(&this.primary, this.fetched)
                || invalidations.tags_purged_since(&this.tags, this.fetched)
        };
        if overtaken() {
            // Purged while this response was on its way: the origin may have sent the page
            // as it was before the edit. Nothing is stored (the disk write is dropped).
            return Ok(MissFinishType::Created(0));
        }
        let tags = &this.store.tags;
        let in_memory = this.memory.publish().unwrap_or(0);
        let mut indexed =
            in_memory == 0 || tags.record_tags(this.primary, Tier::Memory, &this.tags);
        let mut weight = in_memory;
        if let Some(disk) = this.disk.filter(|_| indexed) {
            // The fill does not wait for the writer (two thread wake-ups per miss): lookups
            // find it in memory or, if it is only on disk, among the disk's pending fills. Its
            // tags are recorded first: a tag purge made from here on finds the URL, and its
            // purge record follows the object in the log. The writer forgets them if it
            // stores nothing.
            indexed &= tags.record_tags(this.primary, Tier::Disk, &this.tags);
            if indexed {
                weight += disk.queue(in_memory == 0).unwrap_or(0) as usize;
            }
        }
        if !indexed {
            // The tag index is full: a copy a tag purge could not find must not be served.
            this.store.drop_everywhere(&this.primary).await;
            return Ok(MissFinishType::Created(0));
        }
        if overtaken() {
            // A purge arrived while the copy was being committed and may have looked for it
            // before it was in place (or, for a tag purge, before the index named it). A purge
            // records its time before it removes anything, and the copy and its tags are in
            // place before this second look, so either that purge removes it or this look
            // sees the purge and removes it here.
            this.store.drop_everywhere(&this.primary).await;
            return Ok(MissFinishType::Created(0));
        }
        Ok(MissFinishType::Created(weight))
    }
}
