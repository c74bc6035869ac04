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

pub mod format;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use moka::notification::RemovalCause;
use moka::ops::compute::Op;
use pingora::cache::key::HashBinary;
use pingora::cache::CacheMeta;
use tokio::io::AsyncWriteExt;

use super::tags::{TagIndex, Tier};
use format::{MetaFile, ObjectPaths, ReadError};

/// Read size for streaming a body from disk.
const CHUNK: usize = 64 * 1024;
/// Bodies at most this large are read whole and checked before a byte is served.
pub use crate::config::DiskConfig;

pub const WHOLE_READ_MAX: u64 = 8 << 20;

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
struct Slot {
    slot: Option<HashBinary>,
    gen: u64,
    bytes: u64,
    /// Whole body checked against its CRC since this process started (or written by it).
    verified: Arc<AtomicBool>,
}

#[derive(Debug, Default)]
struct Family {
    slots: Vec<Slot>,
}

impl Family {
    fn weight(&self) -> u32 {
        let w: u64 = self.slots.iter().map(|s| s.bytes).sum();
        u32::try_from(w).unwrap_or(u32::MAX)
    }
    fn get(&self, slot: Option<&HashBinary>) -> Option<&Slot> {
        self.slots.iter().find(|s| s.slot.as_ref() == slot)
    }
}

pub struct DiskTier {
    objects: PathBuf,
    index: moka::sync::Cache<HashBinary, Arc<Family>>,
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

/// What a disk lookup found: checked metadata and an open body file.
pub struct DiskEntry {
    pub meta: CacheMeta,
    pub file: Arc<File>,
    pub body_len: u64,
    /// The whole body, already checked, for bodies up to [`WHOLE_READ_MAX`].
    pub body: Option<Bytes>,
    gen: u64,
    body_crc: u32,
    verified: Arc<AtomicBool>,
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
            .weigher(|_k: &HashBinary, f: &Arc<Family>| f.weight())
            .eviction_listener(move |key: Arc<HashBinary>, family: Arc<Family>, cause| {
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
            })
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
                    let keep: Vec<Slot> = f
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
                        Op::Put(Arc::new(Family { slots: keep }))
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

    /// Looks a slot up on disk. Damaged entries are removed and reported as absent.
    pub async fn lookup(
        &'static self,
        primary: &HashBinary,
        slot: Option<&HashBinary>,
    ) -> Option<DiskEntry> {
        let Some(found) = self.index.get(primary).and_then(|f| f.get(slot).cloned()) else {
            self.counters.misses.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let paths = self.paths(primary, slot);
        // One trip to the blocking pool per lookup: meta, body length, and (for bodies up to
        // WHOLE_READ_MAX) the body itself with its checksum checked.
        let read = tokio::task::spawn_blocking(move || -> Result<Loaded, (ReadError, u64)> {
            let meta_file = format::read_meta(&paths.meta()).map_err(|e| (e, found.gen))?;
            let gen = meta_file.gen;
            let file =
                crate::cache::files::open_regular(&paths.body(gen)).map_err(|e| (e.into(), gen))?;
            let len = file.metadata().map_err(|e| (e.into(), gen))?.len();
            if len != meta_file.body_len {
                return Err((ReadError::Corrupt("body length differs from its meta"), gen));
            }
            let meta = CacheMeta::deserialize(&meta_file.internal, &meta_file.header)
                .map_err(|_| (ReadError::Corrupt("metadata does not decode"), gen))?;
            let body = if len <= WHOLE_READ_MAX {
                let mut buf = vec![0u8; len as usize];
                file.read_exact_at(&mut buf, 0)
                    .map_err(|e| (e.into(), gen))?;
                if crc32fast::hash(&buf) != meta_file.body_crc {
                    return Err((ReadError::Corrupt("body checksum mismatch"), gen));
                }
                Some(Bytes::from(buf))
            } else {
                None
            };
            Ok(Loaded {
                meta,
                file,
                body,
                gen,
                body_len: len,
                body_crc: meta_file.body_crc,
            })
        })
        .await;
        let loaded = match read {
            Ok(Ok(v)) => v,
            Ok(Err((ReadError::Missing, gen))) => {
                // Removed by another process sharing the directory, or mid-replacement.
                self.forget(primary, slot, Some(gen));
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            Ok(Err((ReadError::Corrupt(why), gen))) => {
                self.drop_corrupt(primary, slot, gen, why);
                return None;
            }
            Ok(Err((ReadError::Io(e), _))) => {
                tracing::warn!(error = %e, "disk cache read failed");
                return None;
            }
            Err(_) => return None,
        };
        let verified = if loaded.gen == found.gen {
            found.verified
        } else {
            Arc::new(AtomicBool::new(false))
        };
        if loaded.body.is_some() {
            verified.store(true, Ordering::Relaxed);
        }
        self.counters.hits.fetch_add(1, Ordering::Relaxed);
        Some(DiskEntry {
            meta: loaded.meta,
            file: Arc::new(loaded.file),
            body_len: loaded.body_len,
            body: loaded.body,
            gen: loaded.gen,
            body_crc: loaded.body_crc,
            verified,
        })
    }

    /// Checks a large body's checksum by reading it through once, unless already checked.
    pub async fn verify(
        &'static self,
        primary: &HashBinary,
        slot: Option<&HashBinary>,
        entry: &DiskEntry,
    ) -> bool {
        if entry.verified.load(Ordering::Relaxed) {
            return true;
        }
        let file = entry.file.clone();
        let len = entry.body_len;
        let crc = tokio::task::spawn_blocking(move || -> std::io::Result<u32> {
            let mut hasher = crc32fast::Hasher::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut pos = 0u64;
            while pos < len {
                let n = ((len - pos) as usize).min(buf.len());
                file.read_exact_at(&mut buf[..n], pos)?;
                hasher.update(&buf[..n]);
                pos += n as u64;
            }
            Ok(hasher.finalize())
        })
        .await;
        match crc {
            Ok(Ok(c)) if c == entry.body_crc => {
                entry.verified.store(true, Ordering::Relaxed);
                true
            }
            _ => {
                self.drop_corrupt(primary, slot, entry.gen, "body checksum mismatch");
                false
            }
        }
    }

    /// Whether a miss for this key should be written to disk now (admission: N-th miss).
    pub fn admit(&self, primary: &HashBinary) -> bool {
        if self.config.min_uses <= 1 {
            return true;
        }
        let mut seen = 0;
        self.uses.entry(*primary).and_compute_with(|old| {
            seen = old.map_or(0, |e| e.into_value()) + 1;
            Op::Put(seen)
        });
        seen >= self.config.min_uses
    }

    /// Starts writing a body to a temporary file.
    pub async fn start_write(
        &'static self,
        primary: HashBinary,
        slot: Option<HashBinary>,
    ) -> Option<DiskWrite> {
        let paths = self.paths(&primary, slot.as_ref());
        let gen = self.next_unique();
        let temp = paths.temp("body", gen);
        if let Err(e) = tokio::fs::create_dir_all(&paths.dir).await {
            self.write_failed(&e);
            return None;
        }
        let fresh = {
            let temp = temp.clone();
            tokio::task::spawn_blocking(move || crate::cache::files::create_fresh(&temp))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)))
                .map(tokio::fs::File::from_std)
        };
        match fresh {
            Ok(file) => Some(DiskWrite {
                tier: self,
                primary,
                slot,
                paths,
                gen,
                temp,
                file: Some(file),
                hasher: crc32fast::Hasher::new(),
                len: 0,
                failed: false,
            }),
            Err(e) => {
                self.write_failed(&e);
                None
            }
        }
    }

    fn write_failed(&self, e: &std::io::Error) {
        let before = self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
        // A full disk fails every write: log the 1st, 2nd, 4th, 8th... failure, not each one
        // (every one is counted in skua_cache_tier_events_total{event="write_error"}).
        let failures = before + 1;
        if failures.is_power_of_two() {
            tracing::warn!(error = %e, failures, "disk cache write failed; serving from memory");
        }
    }

    /// Publishes a finished body under its meta and indexes it.
    fn publish(
        &self,
        primary: HashBinary,
        slot: Option<HashBinary>,
        gen: u64,
        body_bytes: u64,
        meta_bytes: u64,
    ) {
        let new_slot = Slot {
            slot,
            gen,
            bytes: body_bytes + meta_bytes,
            // Not trusted for having been written by this process: the file can be damaged
            // after it is written (another process, the disk), so a large body's first hit
            // reads it through once against its checksum, as after a restart.
            verified: Arc::new(AtomicBool::new(false)),
        };
        let janitor = &self.janitor;
        let objects = &self.objects;
        self.index.entry(primary).and_compute_with(|old| {
            let mut slots = old
                .map(|e| e.into_value().slots.clone())
                .unwrap_or_default();
            if let Some(pos) = slots.iter().position(|s| s.slot == slot) {
                let replaced = slots.remove(pos);
                if replaced.gen != gen {
                    let _ = janitor.send(
                        ObjectPaths::new(objects, &primary, slot.as_ref()).body(replaced.gen),
                    );
                }
            }
            slots.push(new_slot);
            Op::Put(Arc::new(Family { slots }))
        });
        self.counters.stores.fetch_add(1, Ordering::Relaxed);
        // Apply evictions now, so the bytes on disk stay within the bound.
        self.index.run_pending_tasks();
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

    /// Rebuilds the index from the directory: names and sizes only, oldest first so that the
    /// least recently written objects are the first evicted. Entries that appear while loading
    /// (new writes) win over what the listing found.
    fn load_index(&'static self) {
        let started = Instant::now();
        let mut metas: HashMap<SlotKey, (u64, SystemTime)> = HashMap::new();
        let mut bodies: HashMap<SlotKey, Vec<(u64, u64)>> = HashMap::new();
        let stale_temp = SystemTime::now() - Duration::from_secs(3600);
        let Ok(dirs) = std::fs::read_dir(&self.objects) else {
            self.finish_load(started);
            return;
        };
        for dir in dirs.flatten() {
            let Ok(entries) = std::fs::read_dir(dir.path()) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name();
                let Some(name) = name.to_str() else { continue };
                let Ok(md) = entry.metadata() else { continue };
                let mtime = md.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                if name.starts_with('.') {
                    if name.ends_with(".tmp") && mtime < stale_temp {
                        let _ = self.janitor.send(entry.path());
                    }
                    continue;
                }
                if let Some(stem) = name.strip_suffix(".meta") {
                    if let Some(key) = parse_stem(stem) {
                        metas.insert(key, (md.len(), mtime));
                    }
                } else if let Some(stem) = name.strip_suffix(".body") {
                    if let Some((stem, gen)) = stem.rsplit_once('-') {
                        if let (Some(key), Ok(gen)) =
                            (parse_stem(stem), u64::from_str_radix(gen, 16))
                        {
                            bodies.entry(key).or_default().push((gen, md.len()));
                        }
                    }
                }
            }
        }
        let mut found: Vec<_> = metas.into_iter().collect();
        found.sort_by_key(|(_, (_, mtime))| *mtime);
        for ((primary, slot), (meta_len, _)) in found {
            let Some(gens) = bodies.remove(&(primary, slot)) else {
                // A meta whose body is gone: never servable.
                let _ = self
                    .janitor
                    .send(self.paths(&primary, slot.as_ref()).meta());
                continue;
            };
            let current = if gens.len() == 1 {
                gens[0].0
            } else {
                match format::read_meta(&self.paths(&primary, slot.as_ref()).meta()) {
                    Ok(m) => m.gen,
                    Err(_) => continue,
                }
            };
            for (gen, _) in gens.iter().filter(|(g, _)| *g != current) {
                let _ = self
                    .janitor
                    .send(self.paths(&primary, slot.as_ref()).body(*gen));
            }
            let Some(&(gen, body_len)) = gens.iter().find(|(g, _)| *g == current) else {
                continue;
            };
            let loaded = Slot {
                slot,
                gen,
                bytes: body_len + meta_len,
                verified: Arc::new(AtomicBool::new(false)),
            };
            let mut purged = false;
            self.index.entry(primary).and_compute_with(|old| match old {
                Some(e) if e.value().get(slot.as_ref()).is_some() => Op::Nop,
                _ if self.was_purged_while_loading(&primary) => {
                    purged = true;
                    Op::Nop
                }
                Some(e) => {
                    let mut slots = e.into_value().slots.clone();
                    slots.push(loaded);
                    Op::Put(Arc::new(Family { slots }))
                }
                None => Op::Put(Arc::new(Family {
                    slots: vec![loaded],
                })),
            });
            if purged {
                let paths = self.paths(&primary, slot.as_ref());
                unlink_all(&[paths.meta()]);
                let _ = self.janitor.send(paths.body(gen));
            }
        }
        self.index.run_pending_tasks();
        self.finish_load(started);
        if let Ok(mut purged) = self.purged_while_loading.lock() {
            *purged = HashSet::new();
        }
        if self.tags.is_enabled() {
            self.load_tags();
        }
        self.tags_loaded.store(true, Ordering::Release);
    }

    /// Re-reads the tags of every indexed object from its stored header. Runs after the index
    /// is loaded (objects are servable meanwhile); a tag purge before it finishes misses only
    /// objects not yet re-read.
    fn load_tags(&self) {
        for (primary, family) in self.index.iter() {
            for s in &family.slots {
                let paths = self.paths(&primary, s.slot.as_ref());
                let Ok(meta_file) = format::read_meta(&paths.meta()) else {
                    continue;
                };
                if let Ok(meta) = CacheMeta::deserialize(&meta_file.internal, &meta_file.header) {
                    if !self
                        .tags
                        .record(*primary, Tier::Disk, meta.response_header())
                    {
                        // The tag index is full: a copy a tag purge could not find is dropped.
                        self.purge_all_blocking(&primary);
                        break;
                    }
                }
            }
        }
    }

    fn was_purged_while_loading(&self, primary: &HashBinary) -> bool {
        self.purged_while_loading
            .lock()
            .is_ok_and(|purged| purged.contains(primary))
    }

    fn finish_load(&self, started: Instant) {
        let took = started.elapsed();
        if let Ok(mut t) = self.load_time.lock() {
            *t = Some(took);
        }
        self.loaded.store(true, Ordering::Release);
        tracing::info!(
            objects = self.index.entry_count(),
            ms = took.as_millis() as u64,
            "disk cache index loaded"
        );
    }
}

/// What the blocking half of a lookup read.
struct Loaded {
    meta: CacheMeta,
    file: File,
    body: Option<Bytes>,
    gen: u64,
    body_len: u64,
    body_crc: u32,
}

/// A URL's primary key and variant slot.
type SlotKey = (HashBinary, Option<HashBinary>);

/// Unlinks files that may already be gone.
fn unlink_all(paths: &[PathBuf]) {
    for path in paths {
        let _ = std::fs::remove_file(path);
    }
}

fn parse_stem(stem: &str) -> Option<SlotKey> {
    let (primary, slot) = stem.split_once('-')?;
    Some((format::unhex(primary)?, format::parse_slot(slot)?))
}

/// A body being written to disk while the response streams to the client.
pub struct DiskWrite {
    tier: &'static DiskTier,
    primary: HashBinary,
    slot: Option<HashBinary>,
    paths: ObjectPaths,
    gen: u64,
    temp: PathBuf,
    file: Option<tokio::fs::File>,
    hasher: crc32fast::Hasher,
    len: u64,
    failed: bool,
}

impl DiskWrite {
    pub async fn write(&mut self, data: &[u8]) {
        if self.failed {
            return;
        }
        self.len += data.len() as u64;
        if self.len > self.tier.config.max_object_size {
            self.abandon();
            return;
        }
        self.hasher.update(data);
        if let Some(file) = self.file.as_mut() {
            if let Err(e) = file.write_all(data).await {
                self.tier.write_failed(&e);
                self.abandon();
            }
        }
    }

    fn abandon(&mut self) {
        self.failed = true;
        self.file = None;
        let _ = self.tier.janitor.send(self.temp.clone());
    }

    /// Publishes the body and its meta. Returns the bytes written, or `None` if the write
    /// failed (nothing is published then).
    pub async fn finish(mut self, internal: Vec<u8>, header: Vec<u8>) -> Option<u64> {
        if self.failed {
            return None;
        }
        let mut file = self.file.take()?;
        if let Err(e) = file.flush().await {
            self.tier.write_failed(&e);
            self.abandon();
            return None;
        }
        drop(file);
        let meta_file = MetaFile {
            gen: self.gen,
            body_len: self.len,
            body_crc: self.hasher.clone().finalize(),
            internal,
            header,
        };
        let encoded = meta_file.encode();
        let meta_len = encoded.len() as u64;
        let paths = self.paths.clone();
        let temp = self.temp.clone();
        let gen = self.gen;
        let meta_temp = paths.temp("meta", self.tier.next_unique());
        let published = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            // Body first: a meta never names a body that is not in place.
            std::fs::rename(&temp, paths.body(gen))?;
            format::write_atomic(&paths.meta(), &meta_temp, &encoded)
        })
        .await;
        match published {
            Ok(Ok(())) => {
                self.tier
                    .publish(self.primary, self.slot, self.gen, self.len, meta_len);
                self.failed = true; // published: nothing to clean up on drop
                Some(self.len)
            }
            Ok(Err(e)) => {
                self.tier.write_failed(&e);
                self.abandon();
                let _ = self.tier.janitor.send(self.paths.body(self.gen));
                None
            }
            Err(_) => {
                self.abandon();
                None
            }
        }
    }
}

impl Drop for DiskWrite {
    fn drop(&mut self) {
        if !self.failed {
            let _ = self.tier.janitor.send(self.temp.clone());
        }
    }
}

#[async_trait::async_trait]
impl pingora::cache::storage::HandleHit for DiskHit {
    async fn read_body(&mut self) -> pingora::Result<Option<Bytes>> {
        self.read().await.map_err(|e| {
            pingora::Error::because(
                pingora::ErrorType::ReadError,
                "reading a disk cache body",
                e,
            )
        })
    }

    async fn finish(
        self: Box<Self>,
        _storage: &'static (dyn pingora::cache::Storage + Sync),
        _key: &pingora::cache::CacheKey,
        _trace: &pingora::cache::trace::SpanHandle,
    ) -> pingora::Result<()> {
        Ok(())
    }

    fn can_seek(&self) -> bool {
        true
    }

    fn seek(&mut self, start: usize, end: Option<usize>) -> pingora::Result<()> {
        let len = self.total;
        if start as u64 >= len && len > 0 {
            return pingora::Error::e_explain(
                pingora::ErrorType::InternalError,
                "seek beyond body",
            );
        }
        self.pos = (start as u64).min(len);
        self.end = end.map_or(len, |e| (e as u64).min(len));
        Ok(())
    }

    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }

    fn as_any_mut(&mut self) -> &mut (dyn std::any::Any + Send + Sync) {
        self
    }
}

/// A hit streamed from a disk body, seekable for Range requests.
pub struct DiskHit {
    file: Arc<File>,
    pos: u64,
    end: u64,
    total: u64,
}

impl DiskHit {
    pub fn new(entry: &DiskEntry) -> DiskHit {
        DiskHit {
            file: entry.file.clone(),
            pos: 0,
            end: entry.body_len,
            total: entry.body_len,
        }
    }

    pub async fn read(&mut self) -> std::io::Result<Option<Bytes>> {
        if self.pos >= self.end {
            return Ok(None);
        }
        let n = ((self.end - self.pos) as usize).min(CHUNK);
        let file = self.file.clone();
        let pos = self.pos;
        let buf = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
            let mut buf = vec![0u8; n];
            file.read_exact_at(&mut buf, pos)?;
            Ok(buf)
        })
        .await
        .map_err(std::io::Error::other)??;
        self.pos += n as u64;
        Ok(Some(Bytes::from(buf)))
    }
}
