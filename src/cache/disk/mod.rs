//! The disk tier: a persistent, bounded store of whole objects under the memory tier, as a
//! log of records in a few large segment files (`docs/disk-format.md`).
//!
//! An in-memory index ([`index`]: 24 bytes of table per object) says where each object's
//! record is; a hit is one positional read of it, tried without blocking first (a page-cache
//! read is answered on the spot) and sent to the blocking pool only when the disk must be
//! waited for ([`read`]). Its body is checked block by block as it is read. One writer thread
//! ([`writer`]) appends fills, copies and invalidations in aggregated writes and evicts whole
//! segments, oldest first, giving objects read since they were written a second chance. A
//! restart reads the index's checkpoint and scans the log written since ([`load`]): serving
//! starts at once, and lookups wait (briefly) for the index rather than missing.
//!
//! A purge is acknowledged only once it cannot be undone by a crash: the index forgets the
//! URL and a purge record is in the segment file (in the kernel's hands, as an unlink was)
//! before it returns; a restart's scan applies it to everything written before it. The tier
//! does not decide what is cacheable and does not serve HTTP: `Store` puts it under the memory
//! tier and gives pingora one `Storage`.

mod admission;
mod checkpoint;
pub mod index;
mod keyfile;
mod load;
mod mapped;
mod pending;
mod read;
pub mod record;
mod segments;
mod write;
mod writer;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use moka::ops::compute::Op;
use pingora::cache::key::HashBinary;
use pingora::cache::CacheMeta;

use super::meta::ObjectMeta;
use super::tags::TagIndex;
use index::{Index, Loc};
use record::Kind;
use segments::Segments;
use writer::{Job, ObjectJob};

pub use crate::config::DiskConfig;
pub use read::{DiskBody, DiskEntry, DiskHit, ReadMode};
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
    /// Objects copied to the end of the log when their segment was evicted.
    pub readmitted: AtomicU64,
    /// Reads the page cache could not answer at once, sent to the blocking pool.
    pub reads_waited: AtomicU64,
    /// Reads answered by a view of a mapped segment (no copy).
    pub reads_mapped: AtomicU64,
}

/// Objects handed to the writer and not yet written (or dropped), and their body bytes.
#[derive(Debug, Default)]
struct WriteQueue {
    objects: AtomicU64,
    bytes: AtomicU64,
}

impl WriteQueue {
    /// Returns the bytes queued before these.
    fn add(&self, bytes: u64) -> u64 {
        self.objects.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed)
    }

    fn remove(&self, bytes: u64) {
        self.bytes.fetch_sub(bytes, Ordering::Relaxed);
        self.objects.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How long a lookup waits for the start-up index load before it counts as a miss.
const LOAD_WAIT: Duration = Duration::from_secs(5);
/// Most body bytes waiting for the writer: past it, fills are not written to disk.
const QUEUE_MAX: u64 = 256 << 20;

pub struct DiskTier {
    pub config: DiskConfig,
    pub counters: Arc<DiskCounters>,
    index: Index,
    segments: Segments,
    jobs: mpsc::Sender<Job>,
    segment_size: u64,
    /// Objects handed to the writer and not yet written.
    queue: WriteQueue,
    /// Fills not yet indexed, readable meanwhile ([`pending`]).
    pending: pending::Pending,
    /// Bytes of the segments in use.
    used_bytes: AtomicU64,
    uses: moka::sync::Cache<HashBinary, u32>,
    /// Recent misses a full log did not write ([`admission`]).
    ghosts: admission::Ghosts,
    loaded: tokio::sync::watch::Sender<bool>,
    /// The first segment this process writes: the start-up load reads only those before it.
    first_new_segment: u32,
    /// Purges and soft purges made while the index was loading, applied again once it is.
    invalidated_while_loading: Mutex<Vec<(Kind, HashBinary, u64)>>,
    /// How long the start-up index load took, once done.
    pub load_time: Arc<Mutex<Option<Duration>>>,
    tags_loaded: AtomicBool,
    /// Tag purges made before the tags of the objects on disk were read back (`None` once
    /// they are): the tag index cannot name those objects yet, so the read-back and lookups
    /// meanwhile drop what a purge covers ([`DiskTier::tag_purged_while_loading`]). The
    /// latest such purge of each tag.
    tag_purges_while_loading: Mutex<Option<HashMap<String, std::time::SystemTime>>>,
    tags: &'static TagIndex,
    /// How reads the page cache may answer are made ([`ReadMode`]).
    read_mode: std::sync::atomic::AtomicU8,
    /// Test hook (`SKUA_TEST_DISK_READ_DELAY_MS`): every read waits on the blocking pool this
    /// long, as on a slow disk, and so does each head the start-up tag pass reads back.
    read_delay: Option<Duration>,
    /// A zero-downtime upgrade has handed the directory to a new process ([`Self::hand_over`]).
    handed_over: AtomicBool,
}

impl DiskTier {
    /// Opens (creating) the directory, starts the writer and starts loading the index in the
    /// background.
    pub fn open(config: DiskConfig, tags: &'static TagIndex) -> std::io::Result<&'static DiskTier> {
        std::fs::create_dir_all(&config.path)?;
        discard_unusable(&config.path)?;
        let segments = Segments::open(&config.path.join("segments"))?;
        let after_newest = segments.newest().map_or(0, |s| s.wrapping_add(1));
        let (first_new_segment, file) = segments.create_from(after_newest)?;
        let segment_size = segment_size(&config);
        let read_mode = ReadMode::for_file(&file);
        if let Ok(fs) = rustix::fs::fstatvfs(&*file) {
            let file_system_bytes = fs.f_blocks.saturating_mul(fs.f_frsize);
            if config.size > file_system_bytes {
                tracing::warn!(
                    size = config.size,
                    file_system_bytes,
                    "[cache.disk] size is larger than its file system: the tier will hold what fits, evicting its oldest objects whenever the file system is full"
                );
            }
        }
        tracing::info!(
            read_mode = read_mode.as_str(),
            segment_bytes = segment_size,
            "disk cache opened"
        );
        let (jobs, rx) = mpsc::channel();
        let read_delay = crate::test_hooks::delay("SKUA_TEST_DISK_READ_DELAY_MS");
        let ghosts = admission::Ghosts::for_size(config.size);
        let index = Index::new(config.max_variants);
        let tier: &'static DiskTier = Box::leak(Box::new(DiskTier {
            config,
            counters: Arc::new(DiskCounters::default()),
            index,
            segments,
            jobs,
            segment_size,
            queue: WriteQueue::default(),
            pending: pending::Pending::default(),
            used_bytes: AtomicU64::new(0),
            // Counts, not a cache: least recently used go first. moka's default admission
            // (TinyLFU) would turn every new URL away once a million had missed in an hour,
            // and with `min_uses` above 1 none would be written again.
            uses: moka::sync::Cache::builder()
                .max_capacity(1 << 20)
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .time_to_idle(Duration::from_secs(3600))
                .build(),
            ghosts,
            loaded: tokio::sync::watch::Sender::new(false),
            first_new_segment,
            invalidated_while_loading: Mutex::new(Vec::new()),
            load_time: Arc::new(Mutex::new(None)),
            tags_loaded: AtomicBool::new(false),
            tag_purges_while_loading: Mutex::new(Some(HashMap::new())),
            tags,
            read_mode: std::sync::atomic::AtomicU8::new(0),
            read_delay,
            handed_over: AtomicBool::new(false),
        }));
        tier.set_read_mode(read_mode);
        let writer = writer::Writer::new(tier, first_new_segment, file);
        std::thread::Builder::new()
            .name("skua-disk-writer".into())
            .spawn(move || writer.run(rx))?;
        std::thread::Builder::new()
            .name("skua-disk-index".into())
            .spawn(move || tier.load_index())?;
        Ok(tier)
    }

    /// The index is loaded (objects on disk are servable).
    pub fn loaded(&self) -> bool {
        *self.loaded.borrow()
    }

    /// The tags of the objects on disk are indexed too.
    pub fn tags_loaded(&self) -> bool {
        self.tags_loaded.load(Ordering::Acquire)
    }

    /// Variants let go past `[cache] max_variants`.
    pub fn displaced_variants(&self) -> u64 {
        self.index.displaced.load(Ordering::Relaxed)
    }

    pub fn object_count(&self) -> u64 {
        self.index.count()
    }

    pub fn resident_bytes(&self) -> u64 {
        self.used_bytes.load(Ordering::Relaxed)
    }

    /// Objects waiting for the writer, and their body bytes.
    pub fn write_queue(&self) -> (u64, u64) {
        let q = &self.queue;
        (
            q.objects.load(Ordering::Relaxed),
            q.bytes.load(Ordering::Relaxed),
        )
    }

    fn checkpoint_path(&self) -> PathBuf {
        self.config.path.join("index.ckpt")
    }

    /// Waits (a bounded time) for the start-up index load, so that an object stored before
    /// the restart is a hit, not fetched again.
    async fn wait_loaded(&self) -> bool {
        if self.loaded() {
            return true;
        }
        let mut rx = self.loaded.subscribe();
        tokio::time::timeout(LOAD_WAIT, rx.wait_for(|loaded| *loaded))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    fn wait_loaded_blocking(&self) {
        while !self.loaded() {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Evicts the oldest segment, giving its space back to the file system (the bans file
    /// beside the segments could not be written). False if there was none.
    pub async fn free_space(&self) -> bool {
        let (done, freed) = tokio::sync::oneshot::channel();
        self.send(Job::FreeSpace(done)) && freed.await.unwrap_or(false)
    }

    fn send(&self, job: Job) -> bool {
        self.jobs.send(job).is_ok()
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

    /// Drops a damaged object: counted, forgotten, and a purge record written so that a
    /// restart does not index it again.
    fn drop_corrupt(&self, primary: &HashBinary, slot: Option<&HashBinary>, loc: Loc, why: &str) {
        tracing::warn!(reason = why, "dropping a damaged disk cache entry");
        self.counters.corrupt.fetch_add(1, Ordering::Relaxed);
        self.index.remove_at(primary, slot, loc);
        let (done, _) = tokio::sync::oneshot::channel();
        self.send(Job::Invalidate {
            kind: Kind::Delete,
            primary: *primary,
            at: writer::now_nanos(),
            done,
        });
    }

    /// Whether any variant of `primary` is indexed or waiting for the writer.
    pub fn holds(&self, primary: &HashBinary) -> bool {
        self.index.holds(primary) || self.pending.holds(primary)
    }

    /// Notes a purge or soft purge made while the index is loading, for the load to apply
    /// again at its end (it may index the URL after the purge looked for it). Called before
    /// the purge changes the index: then either the load sees it or the load was over.
    fn note_while_loading(&self, kind: Kind, primary: &HashBinary, at: u64) {
        if self.loaded() {
            return;
        }
        let mut made = self
            .invalidated_while_loading
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if !self.loaded() {
            made.push((kind, *primary, at));
        }
    }

    /// Writes a purge or soft purge record and waits until it is in the file.
    async fn write_invalidation(&self, kind: Kind, primary: &HashBinary, at: u64) {
        let (done, written) = tokio::sync::oneshot::channel();
        if self.send(Job::Invalidate {
            kind,
            primary: *primary,
            at,
            done,
        }) {
            let _ = written.await;
        }
    }

    /// Removes every variant of a URL from disk; returns once a restart cannot bring them
    /// back (see the module note). Returns how many were removed.
    pub async fn purge_all(&'static self, primary: &HashBinary) -> usize {
        let at = writer::now_nanos();
        self.note_while_loading(Kind::Delete, primary, at);
        let pending = self.pending.remove_all(primary);
        let removed = self.index.remove_all(primary, u64::MAX).len().max(pending);
        self.write_invalidation(Kind::Delete, primary, at).await;
        self.counters
            .purges
            .fetch_add(removed as u64, Ordering::Relaxed);
        removed
    }

    /// Marks every variant of a URL stale on disk (soft purge): stale from now, with the
    /// stale windows its own directives allow (see `PurgeMode::Expire`), Age still counting
    /// from the original fetch.
    pub async fn expire_all(&'static self, primary: &HashBinary) -> usize {
        let at = writer::now_nanos();
        self.note_while_loading(Kind::Expire, primary, at);
        // A pending fill has no index entry to mark: it is dropped (the writer still writes
        // it, and the soft purge's record, written after it, marks it).
        self.pending.remove_all(primary);
        let marked = self.index.expire_all(primary, u64::MAX, at / 1_000_000_000);
        self.write_invalidation(Kind::Expire, primary, at).await;
        marked
    }

    /// Replaces a slot's metadata (a 304 refresh): the object is written again with it, and
    /// indexed only if nothing replaced or purged it meanwhile.
    pub async fn update_meta(
        &'static self,
        primary: &HashBinary,
        slot: Option<&HashBinary>,
        meta: &CacheMeta,
    ) -> bool {
        if !self.wait_loaded().await {
            return false;
        }
        let Some(loc) = self.index.peek(primary, slot) else {
            return false;
        };
        let Some(body) = self.read_body_whole(primary, slot, loc).await else {
            return false;
        };
        let body_len = body.len() as u64;
        let (done, written) = tokio::sync::oneshot::channel();
        self.queue.add(body_len);
        let sent = self.send(Job::Object(ObjectJob {
            primary: *primary,
            slot: slot.copied(),
            meta: ObjectMeta::encode_cache_meta(meta),
            body: vec![body],
            body_len,
            only_if: Some(loc),
            refreshed: true,
            done: Some(done),
            pending: None,
        }));
        sent && matches!(written.await, Ok(Some(_)))
    }

    /// Leaves the index checkpoint to the process taking over from this one (a zero-downtime
    /// upgrade). Both write segments for a while, each to its own; a checkpoint written here
    /// would cover the new process's segments numbered below this one's last, and a restart
    /// would not scan them for the purges recorded there.
    pub fn hand_over(&self) {
        self.handed_over.store(true, Ordering::Release);
    }

    fn handed_over(&self) -> bool {
        self.handed_over.load(Ordering::Acquire)
    }

    /// Writes a checkpoint of the index now, for a quick next start.
    pub fn checkpoint_now(&self) {
        let (done, written) = mpsc::channel();
        if self.send(Job::Checkpoint(done)) {
            let _ = written.recv_timeout(Duration::from_secs(10));
        }
    }

    /// Whether a miss for this key should be written to disk now: its `min_uses`-th miss, or,
    /// once the log is full, its second recent one ([`admission`]).
    pub fn admit(&self, primary: &HashBinary) -> bool {
        if self.config.min_uses <= 1 {
            return !self.full() || self.ghosts.seen_again(primary, self.index.count());
        }
        let mut seen = 0;
        self.uses.entry(*primary).and_compute_with(|old| {
            seen = old.map_or(0, |e| e.into_value()) + 1;
            Op::Put(seen)
        });
        seen >= self.config.min_uses
    }

    /// The next segment the writer starts evicts the oldest.
    fn full(&self) -> bool {
        self.used_bytes.load(Ordering::Relaxed) + self.segment_size > self.config.size
    }
}

/// The size of a segment: about a sixteenth of the bound, between 64 KiB and 256 MiB. A
/// record larger than that gets a segment of its own.
fn segment_size(config: &DiskConfig) -> u64 {
    (config.size / 16)
        .clamp(64 * 1024, 256 << 20)
        .min(config.size)
}

/// Sets aside what this process cannot read, with a line in the log, and makes sure the key
/// file is in place before any record is written. What cannot be read: the first format's
/// files (two per object under `objects/`), and records whose key secret is lost (no usable
/// key file) or is not this process's (another disk tier in the process fixed it first). What
/// is set aside is removed in the background (there may be a million files); a removal cut
/// short by a stop is finished at the next start.
fn discard_unusable(dir: &std::path::Path) -> std::io::Result<()> {
    const ASIDE: &str = ".discarded.";
    let set_aside = |name: &str| {
        let from = dir.join(name);
        let aside = dir.join(format!("{ASIDE}{name}.{}", std::process::id()));
        from.exists() && std::fs::rename(&from, &aside).is_ok()
    };
    if set_aside("objects") {
        tracing::warn!(
            dir = %dir.display(),
            "the disk cache was written in an older format (a file per object); it is discarded and refilled"
        );
    }
    let stored = keyfile::read(dir)?;
    let in_force = match stored {
        Some(stored) => crate::cache::keyhash::adopt(stored),
        None => crate::cache::keyhash::secret(),
    };
    if stored != Some(in_force) {
        let why = match stored {
            Some(_) => "its records were keyed with another secret than this process's",
            None => {
                "it has no usable key file (an older format, or the file was removed or damaged)"
            }
        };
        let records = ["segments", "index.ckpt"].map(set_aside);
        if records.contains(&true) {
            tracing::warn!(dir = %dir.display(), "the disk cache cannot be read: {why}; it is discarded and refilled");
        }
        keyfile::write(dir, in_force)?;
    }
    let doomed: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            // `.objects-old-format.`: where an earlier Skua set the old format aside.
            name.starts_with(ASIDE) || name.starts_with(".objects-old-format.")
        })
        .map(|e| e.path())
        .collect();
    if !doomed.is_empty() {
        let _ = std::thread::Builder::new()
            .name("skua-disk-discard".into())
            .spawn(move || {
                for path in doomed {
                    let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
                }
            });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::keyhash::{self, KeySecret};

    /// Records keyed with a secret other than the one this process hashes with cannot be
    /// found: they are set aside (and removed), and the directory takes the process's secret.
    #[test]
    fn records_under_another_secret_are_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let in_force = keyhash::secret();
        let other = KeySecret(in_force.0.map(|b| !b));
        keyfile::write(dir.path(), other).unwrap();
        std::fs::create_dir(dir.path().join("segments")).unwrap();
        std::fs::write(dir.path().join("segments").join("00000001.seg"), b"old").unwrap();
        discard_unusable(dir.path()).unwrap();
        assert!(!dir.path().join("segments").exists());
        assert_eq!(keyfile::read(dir.path()).unwrap(), Some(in_force));
        // Under the secret in force, nothing is set aside.
        std::fs::create_dir(dir.path().join("segments")).unwrap();
        discard_unusable(dir.path()).unwrap();
        assert!(dir.path().join("segments").is_dir());
    }
}
