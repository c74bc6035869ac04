//! The disk tier: a persistent, bounded store of whole objects under the memory tier.
//!
//! Each object is a meta file and a body file (see `format.rs`). An in-memory index (moka,
//! weighted by file bytes, bounded by the configured size) says what is on disk; it is rebuilt
//! from a directory listing at start-up, in the background, so serving starts at once.
//! Eviction and replaced generations hand file names to a janitor thread, so no request waits
//! on an unlink, and every other file operation runs on tokio's blocking pool. A purge is the
//! exception: it unlinks the meta files itself before it returns, because a purge is
//! acknowledged (a `204`, a purge bus position) only once the copy cannot come back after a
//! crash (regression: a node killed right after applying a purge from the bus listed the
//! still-present meta file at its restart and served the purged page). The tier
//! does not decide what is cacheable, and it does not serve HTTP: `Store` puts it under the
//! memory tier and gives pingora one `Storage`.
//!
//! Here: the index and invalidation (purge, soft purge, a 304's new meta). `read.rs`: hits.
//! `write.rs`: fills. `load.rs`: the start-up listing. `format.rs`: the files themselves.

pub mod format;
mod load;
mod read;
mod write;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use moka::notification::RemovalCause;
use moka::ops::compute::Op;
use pingora::cache::key::HashBinary;
use pingora::cache::CacheMeta;

use super::tags::{TagIndex, Tier};
use format::{ObjectPaths, ReadError};

pub use crate::config::DiskConfig;
pub use read::{DiskEntry, DiskHit, WHOLE_READ_MAX};
pub use write::DiskWrite;

/// Counters of the disk tier, read by the admin endpoint and metrics.
#[derive(Debug, Default)]
pub struct DiskCounters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub stores: AtomicU64,
    pub evictions: AtomicU64,
    pub corrupt: AtomicU64,
    pub write_errors: AtomicU64,
    pub purges: AtomicU64,
}

/// One stored slot (variant) as the index knows it.
#[derive(Debug, Clone)]
struct IndexedVariant {
    slot: Option<HashBinary>,
    gen: u64,
    bytes: u64,
    /// Whole body checked against its CRC since this process started (or written by it).
    verified: Arc<AtomicBool>,
}

#[derive(Debug, Default)]
struct IndexedUrl {
    slots: Vec<IndexedVariant>,
}

impl IndexedUrl {
    fn weight(&self) -> u32 {
        let w: u64 = self.slots.iter().map(|s| s.bytes).sum();
        u32::try_from(w).unwrap_or(u32::MAX)
    }
    fn get(&self, slot: Option<&HashBinary>) -> Option<&IndexedVariant> {
        self.slots.iter().find(|s| s.slot.as_ref() == slot)
    }
}

pub struct DiskTier {
    objects: PathBuf,
    index: moka::sync::Cache<HashBinary, Arc<IndexedUrl>>,
    janitor: mpsc::Sender<PathBuf>,
    pub config: DiskConfig,
    pub counters: Arc<DiskCounters>,
    uses: moka::sync::Cache<HashBinary, u32>,
    unique: AtomicU64,
    process_salt: u64,
    loaded: Arc<AtomicBool>,
    /// URLs purged while the index was loading: the listing may yet find copies of them,
    /// which are unlinked instead of indexed.
    purged_while_loading: std::sync::Mutex<HashSet<HashBinary>>,
    /// How long the start-up index load took, once done.
    pub load_time: Arc<std::sync::Mutex<Option<Duration>>>,
    tags_loaded: AtomicBool,
    tags: &'static TagIndex,
}

impl DiskTier {
    /// Opens (creating) the directory and starts loading its index in the background.
    pub fn open(config: DiskConfig, tags: &'static TagIndex) -> std::io::Result<&'static DiskTier> {
        let objects = config.path.join("objects");
        std::fs::create_dir_all(&objects)?;
        let (janitor, rx) = mpsc::channel::<PathBuf>();
        std::thread::Builder::new()
            .name("skua-disk-janitor".into())
            .spawn(move || {
                for path in rx {
                    let _ = std::fs::remove_file(&path);
                }
            })?;
        let counters = Arc::new(DiskCounters::default());
        let evicted_janitor = janitor.clone();
        let evicted_counters = counters.clone();
        let evict_objects = objects.clone();
        let index = moka::sync::Cache::builder()
            .max_capacity(config.size)
            .weigher(|_k: &HashBinary, f: &Arc<IndexedUrl>| f.weight())
            .eviction_listener(
                move |key: Arc<HashBinary>, family: Arc<IndexedUrl>, cause| {
                    // Replaced and explicitly removed families are handled by whoever replaced or
                    // removed them; only evictions for space or age are the index's own doing.
                    if matches!(cause, RemovalCause::Size | RemovalCause::Expired) {
                        tags.forget(&key, Tier::Disk);
                        for s in &family.slots {
                            evicted_counters.evictions.fetch_add(1, Ordering::Relaxed);
                            let paths = ObjectPaths::new(&evict_objects, &key, s.slot.as_ref());
                            let _ = evicted_janitor.send(paths.meta());
                            let _ = evicted_janitor.send(paths.body(s.gen));
                        }
                    }
                },
            )
            .build();
        let salt = {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u32(std::process::id());
            h.write_u128(
                SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos()),
            );
            h.finish()
        };
        let tier: &'static DiskTier = Box::leak(Box::new(DiskTier {
            objects,
            index,
            janitor,
            config,
            counters,
            uses: moka::sync::Cache::builder()
                .max_capacity(1 << 20)
                .time_to_idle(Duration::from_secs(3600))
                .build(),
            unique: AtomicU64::new(1),
            process_salt: salt,
            loaded: Arc::new(AtomicBool::new(false)),
            purged_while_loading: std::sync::Mutex::new(HashSet::new()),
            load_time: Arc::new(std::sync::Mutex::new(None)),
            tags_loaded: AtomicBool::new(false),
            tags,
        }));
        std::thread::Builder::new()
            .name("skua-disk-index".into())
            .spawn(move || tier.load_index())?;
        Ok(tier)
    }

    /// The index is loaded (objects on disk are servable).
    pub fn loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// The tags of the objects on disk are indexed too.
    pub fn tags_loaded(&self) -> bool {
        self.tags_loaded.load(Ordering::Acquire)
    }

    pub fn object_count(&self) -> u64 {
        self.index.run_pending_tasks();
        self.index.iter().map(|(_, f)| f.slots.len() as u64).sum()
    }

    pub fn resident_bytes(&self) -> u64 {
        self.index.run_pending_tasks();
        self.index.weighted_size()
    }

    /// A name never used before, by this or any other process.
    fn next_unique(&self) -> u64 {
        let n = self.unique.fetch_add(1, Ordering::Relaxed);
        self.process_salt ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }

    fn paths(&self, primary: &HashBinary, slot: Option<&HashBinary>) -> ObjectPaths {
        ObjectPaths::new(&self.objects, primary, slot)
    }

    fn forget(&self, primary: &HashBinary, slot: Option<&HashBinary>, gen: Option<u64>) {
        self.index
            .entry(*primary)
            .and_compute_with(|old| match old {
                Some(e) => {
                    let f = e.into_value();
                    let keep: Vec<IndexedVariant> = f
                        .slots
                        .iter()
                        .filter(|s| !(s.slot.as_ref() == slot && gen.is_none_or(|g| g == s.gen)))
                        .cloned()
                        .collect();
                    if keep.len() == f.slots.len() {
                        Op::Nop
                    } else if keep.is_empty() {
                        Op::Remove
                    } else {
                        Op::Put(Arc::new(IndexedUrl { slots: keep }))
                    }
                }
                None => Op::Nop,
            });
    }

    /// Drops a damaged entry: counted, unlinked, forgotten.
    fn drop_corrupt(&self, primary: &HashBinary, slot: Option<&HashBinary>, gen: u64, why: &str) {
        tracing::warn!(reason = why, "dropping a damaged disk cache entry");
        self.counters.corrupt.fetch_add(1, Ordering::Relaxed);
        let paths = self.paths(primary, slot);
        let _ = self.janitor.send(paths.meta());
        let _ = self.janitor.send(paths.body(gen));
        self.forget(primary, slot, None);
    }

    /// Whether any variant of `primary` is indexed.
    pub fn holds(&self, primary: &HashBinary) -> bool {
        self.index.get(primary).is_some()
    }

    /// Removes every variant of a URL from disk, its meta files unlinked before this returns
    /// (see the module note). Returns how many were removed.
    pub async fn purge_all(&'static self, primary: &HashBinary) -> usize {
        let (removed, metas) = self.unindex(primary);
        if !metas.is_empty() {
            let _ = tokio::task::spawn_blocking(move || unlink_all(&metas)).await;
        }
        removed
    }

    /// [`Self::purge_all`] for a thread that may block.
    fn purge_all_blocking(&self, primary: &HashBinary) -> usize {
        let (removed, metas) = self.unindex(primary);
        unlink_all(&metas);
        removed
    }

    /// Takes every variant of `primary` out of the index: their bodies go to the janitor,
    /// their meta files are returned for the caller to unlink.
    fn unindex(&self, primary: &HashBinary) -> (usize, Vec<PathBuf>) {
        if !self.loaded() {
            // Before the removal, so the loader, which checks this set under the entry's
            // lock, either inserted its copy before the removal or sees the purge.
            if let Ok(mut purged) = self.purged_while_loading.lock() {
                purged.insert(*primary);
            }
        }
        let Some(family) = self.index.remove(primary) else {
            return (0, Vec::new());
        };
        let mut metas = Vec::with_capacity(family.slots.len());
        for s in &family.slots {
            let paths = self.paths(primary, s.slot.as_ref());
            metas.push(paths.meta());
            let _ = self.janitor.send(paths.body(s.gen));
        }
        self.counters
            .purges
            .fetch_add(family.slots.len() as u64, Ordering::Relaxed);
        (family.slots.len(), metas)
    }

    /// Marks every variant of a URL stale on disk by rewriting its meta (soft purge).
    pub async fn expire_all(&'static self, primary: &HashBinary) -> usize {
        if !self.loaded() {
            // Copies the listing has not reached yet cannot be marked: they are dropped
            // instead (a miss where a revalidation would have done).
            if let Ok(mut purged) = self.purged_while_loading.lock() {
                purged.insert(*primary);
            }
        }
        let Some(family) = self.index.get(primary) else {
            return 0;
        };
        let mut marked = 0;
        let now = SystemTime::now();
        for s in &family.slots {
            let rewritten = self
                .rewrite_meta(primary, s.slot.as_ref(), move |meta| {
                    // Stale now, with the stale windows its own directives allowed (see
                    // `PurgeMode::Expire`); Age keeps counting from the original fetch.
                    let epoch = meta.epoch();
                    let fresh_until = meta.fresh_until().min(now);
                    let swr = meta.stale_while_revalidate_sec();
                    let sie = meta.stale_if_error_sec();
                    meta.update_freshness(fresh_until, swr, sie);
                    meta.set_epoch_override(epoch);
                })
                .await;
            if rewritten {
                marked += 1;
            }
        }
        marked
    }

    /// Replaces a slot's metadata (a 304 refresh): only the meta file is rewritten.
    pub async fn update_meta(
        &'static self,
        primary: &HashBinary,
        slot: Option<&HashBinary>,
        meta: &CacheMeta,
    ) -> bool {
        let Ok((internal, header)) = meta.serialize() else {
            return false;
        };
        self.rewrite_meta(primary, slot, move |m| {
            if let Ok(new) = CacheMeta::deserialize(&internal, &header) {
                *m = new;
            }
        })
        .await
    }

    async fn rewrite_meta(
        &'static self,
        primary: &HashBinary,
        slot: Option<&HashBinary>,
        change: impl FnOnce(&mut CacheMeta) + Send + 'static,
    ) -> bool {
        if self
            .index
            .get(primary)
            .and_then(|f| f.get(slot).cloned())
            .is_none()
        {
            return false;
        }
        let paths = self.paths(primary, slot);
        let temp = paths.temp("meta", self.next_unique());
        let done = tokio::task::spawn_blocking(move || -> Result<(), ReadError> {
            let mut file = format::read_meta(&paths.meta())?;
            let mut meta = CacheMeta::deserialize(&file.internal, &file.header)
                .map_err(|_| ReadError::Corrupt("metadata does not decode"))?;
            change(&mut meta);
            let (internal, header) = meta
                .serialize()
                .map_err(|_| ReadError::Corrupt("metadata does not encode"))?;
            file.internal = internal;
            file.header = header;
            format::write_atomic(&paths.meta(), &temp, &file.encode()).map_err(ReadError::Io)
        })
        .await;
        matches!(done, Ok(Ok(())))
    }
}

/// Unlinks files that may already be gone.
fn unlink_all(paths: &[PathBuf]) {
    for path in paths {
        let _ = std::fs::remove_file(path);
    }
}
