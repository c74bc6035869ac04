//! The writer: one thread that owns the end of the log. Fills, copies and invalidations reach
//! it as jobs; it appends what has queued up since its last write into one buffer and writes
//! that with one positional write (records larger than the buffer are written in place
//! after it), then indexes what it wrote and answers the jobs. A full segment is closed and a
//! new one started; past the tier's bound the oldest segment is evicted whole, its objects
//! that were read since they were written copied to the end of the log first (second
//! chance), at most half a segment's worth each time. It also writes the checkpoint.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pingora::cache::key::HashBinary;

use super::index::{Loc, SOFT_EPOCH};
use super::pending::PendingFill;
use super::record::{self, BlockCrcs, Kind};
use super::segments::Scan;
use super::{checkpoint, DiskTier};
use crate::cache::meta::ObjectMeta;
use crate::cache::tags::Tier;

/// What is appended in one write: small records queued together go out as one.
pub const AGGREGATE: usize = 1 << 20;
/// How long fills that nobody waits for are gathered before they are written (purges and
/// fills that are waited for are written at once, unless they arrive during a gathering).
const GATHER: Duration = Duration::from_millis(5);
/// How often the index is checkpointed while records are being written.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(30);

pub enum Job {
    Object(ObjectJob),
    /// A purge (`Delete`) or soft purge (`Expire`) of every variant of a URL, at `at` (Unix
    /// nanoseconds). Answered once the record is in the file.
    Invalidate {
        kind: Kind,
        primary: HashBinary,
        at: u64,
        done: tokio::sync::oneshot::Sender<()>,
    },
    /// Writes a checkpoint now (a graceful stop).
    Checkpoint(std::sync::mpsc::Sender<()>),
    /// Evicts the oldest segment to give its space back to the file system, answering
    /// whether there was one: the bans file could not be written.
    FreeSpace(tokio::sync::oneshot::Sender<bool>),
}

impl Job {
    /// Whether a sender waits for this job to be written.
    fn waited_for(&self) -> bool {
        match self {
            Job::Object(job) => job.done.is_some(),
            Job::Invalidate { .. } | Job::Checkpoint(_) | Job::FreeSpace(_) => true,
        }
    }
}

pub struct ObjectJob {
    pub primary: HashBinary,
    pub slot: Option<HashBinary>,
    pub meta: ObjectMeta,
    pub body: Vec<Bytes>,
    pub body_len: u64,
    /// Indexed only if the URL is still at this place (a copy of an object: a 304's new
    /// metadata, a re-admission), whose soft purge the copy keeps unless `refreshed`.
    pub only_if: Option<Loc>,
    /// A 304's new metadata: the origin has confirmed the copy since its soft purge (a 304
    /// a purge overtook is never stored: `proxy::response_cache_filter`), so the copy is
    /// fresh again. Regression: it kept the mark, and every later reader revalidated it.
    pub refreshed: bool,
    /// Answered with where it was written, once indexed (`None`: not stored).
    pub done: Option<tokio::sync::oneshot::Sender<Option<Loc>>>,
    /// Lookups read the fill here until it is indexed.
    pub pending: Option<Arc<PendingFill>>,
}

/// Something written, to index and answer once the write is done.
enum Written {
    Object {
        job: ObjectJob,
        loc: Loc,
    },
    Invalidation {
        kind: Kind,
        primary: HashBinary,
        at: u64,
        position: u64,
        done: tokio::sync::oneshot::Sender<()>,
    },
    /// A purge whose first write failed, written again: applied already, answered once in
    /// the file.
    Rewritten(Unwritten),
}

/// A purge or soft purge whose record is not in the file yet: the disk refused the write.
struct Unwritten {
    kind: Kind,
    primary: HashBinary,
    at: u64,
    done: Option<tokio::sync::oneshot::Sender<()>>,
}

pub struct Writer {
    tier: &'static DiskTier,
    seg: u32,
    file: Arc<File>,
    /// Where `buf` goes in the current segment.
    buf_start: u64,
    buf: Vec<u8>,
    written: Vec<Written>,
    last_checkpoint: Instant,
    /// Records were written since the last checkpoint.
    dirty: bool,
    /// The bytes of every segment but the current one, oldest first.
    closed: BTreeMap<u32, u64>,
    /// A write into the current segment failed part-way: bytes of records never indexed may
    /// lie past `buf_start`. A restart's scan would read a whole one among them after
    /// anything written at `buf_start` since, as newer than it is, so the next record starts a
    /// new segment instead.
    torn: bool,
    /// The file system refused a write for want of space (another program's files, or a
    /// `size` larger than the file system): before the next record the oldest segment is
    /// evicted, so that the tier goes on storing what is requested now within the room there
    /// is, rather than keep what it holds and refuse every new object.
    out_of_space: bool,
    /// Segments evicted because the file system was full, since start.
    space_evictions: u64,
    /// Purges applied in memory whose records the disk refused, oldest first. Until they are
    /// in the log, a restart would bring back what they removed.
    unwritten: Vec<Unwritten>,
}

impl Writer {
    pub fn new(tier: &'static DiskTier, seg: u32, file: Arc<File>) -> Writer {
        let closed = tier
            .segments
            .list()
            .into_iter()
            .filter(|s| *s != seg)
            .filter_map(|s| Some((s, tier.segments.get(s)?.metadata().ok()?.len())))
            .collect();
        let writer = Writer {
            tier,
            seg,
            file,
            buf_start: 0,
            buf: Vec::with_capacity(AGGREGATE),
            written: Vec::new(),
            last_checkpoint: Instant::now(),
            dirty: false,
            closed,
            torn: false,
            out_of_space: false,
            space_evictions: 0,
            unwritten: Vec::new(),
        };
        writer.update_used();
        writer
    }

    pub fn run(mut self, jobs: Receiver<Job>) {
        loop {
            let wait = CHECKPOINT_EVERY.saturating_sub(self.last_checkpoint.elapsed());
            match jobs.recv_timeout(wait) {
                Ok(job) => {
                    let waited_for = job.waited_for();
                    self.take(job);
                    if !waited_for {
                        // Fills that nobody waits for gather for a moment, so that a busy
                        // writer is woken (and writes) once per several rather than per fill:
                        // while it sleeps, senders do not wake it.
                        std::thread::sleep(GATHER);
                    }
                    while self.buf.len() < AGGREGATE {
                        match jobs.try_recv() {
                            Ok(job) => self.take(job),
                            Err(_) => break,
                        }
                    }
                    self.flush();
                    self.write_unwritten();
                }
                Err(RecvTimeoutError::Timeout) => {
                    if self.dirty && self.tier.loaded() {
                        self.checkpoint();
                    } else {
                        self.last_checkpoint = Instant::now();
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.flush();
                    self.write_unwritten();
                    return;
                }
            }
        }
    }

    /// The log position of the next byte written.
    fn position(&self) -> u64 {
        (u64::from(self.seg) << 32) | (self.buf_start + self.buf.len() as u64)
    }

    fn take(&mut self, job: Job) {
        match job {
            Job::Object(job) => self.append_object(job),
            Job::Invalidate {
                kind,
                primary,
                at,
                done,
            } => {
                let bytes = record::invalidation(kind, &primary, at);
                if !self.make_room(bytes.len() as u64) {
                    self.unwritten.push(Unwritten {
                        kind,
                        primary,
                        at,
                        done: Some(done),
                    });
                    return;
                }
                let position = self.position();
                self.buf.extend_from_slice(&bytes);
                self.written.push(Written::Invalidation {
                    kind,
                    primary,
                    at,
                    position,
                    done,
                });
            }
            Job::Checkpoint(done) => {
                self.flush();
                self.write_unwritten();
                self.checkpoint();
                let _ = done.send(());
            }
            Job::FreeSpace(done) => {
                self.flush();
                let _ = done.send(self.evict_for_space());
            }
        }
    }

    fn append_object(&mut self, job: ObjectJob) {
        let tier = self.tier;
        if let Some(expected) = job.only_if {
            // Not copied if the original is gone or replaced: the copy would bring it back.
            let current = tier.index.peek(&job.primary, job.slot.as_ref());
            if current.map(|c| c.position()) != Some(expected.position()) {
                finish_object(tier, job, None);
                return;
            }
        }
        let mut crcs = BlockCrcs::default();
        for chunk in &job.body {
            crcs.update(chunk);
        }
        let head = record::object_head(
            &job.primary,
            job.slot.as_ref(),
            now_nanos(),
            &job.meta,
            job.body_len,
            &crcs.finish(),
        );
        let len = head.len() as u64 + job.body_len;
        let Ok(len32) = u32::try_from(len) else {
            finish_object(tier, job, None);
            return;
        };
        let total = record::aligned(len);
        if !self.make_room(total) {
            finish_object(tier, job, None);
            return;
        }
        if total as usize > AGGREGATE {
            // Large: written in place behind what is buffered, not copied into the buffer.
            self.flush();
            if self.torn {
                finish_object(tier, job, None);
                return;
            }
            let offset = self.buf_start;
            let mut at = offset;
            let mut result = self.file.write_all_at(&head, at);
            at += head.len() as u64;
            for chunk in &job.body {
                if result.is_err() {
                    break;
                }
                result = self.file.write_all_at(chunk, at);
                at += chunk.len() as u64;
            }
            if let Err(e) = result {
                self.write_failed(&e);
                finish_object(tier, job, None);
                return;
            }
            self.buf_start = offset + total;
            self.dirty = true;
            let loc = placed(&job, self.seg, offset as u32, len32);
            self.index_object(job, loc);
            return;
        }
        let offset = self.buf_start + self.buf.len() as u64;
        self.buf.extend_from_slice(&head);
        for chunk in &job.body {
            self.buf.extend_from_slice(chunk);
        }
        self.buf.resize(self.buf.len() + (total - len) as usize, 0);
        let loc = placed(&job, self.seg, offset as u32, len32);
        self.written.push(Written::Object { job, loc });
    }

    /// Makes room for a record of `total` bytes: in the current segment if it fits, else in a
    /// new one (a record larger than a segment gets one of its own), evicting the oldest
    /// segments until the tier's bound holds with the new one full. False if the record can
    /// never fit the bound or no segment can be started.
    fn make_room(&mut self, total: u64) -> bool {
        let tier = self.tier;
        if std::mem::take(&mut self.out_of_space) {
            self.evict_for_space();
        }
        if total > tier.config.size || total > u64::from(u32::MAX) {
            return false;
        }
        let end = self.buf_start + self.buf.len() as u64;
        if !self.torn && end + total <= tier.segment_size {
            return true;
        }
        if end > 0 || self.torn {
            self.flush();
            match tier.segments.create_from(self.seg.wrapping_add(1)) {
                Ok((next, file)) => {
                    // Not if it was evicted to make space for a purge's record.
                    if tier.segments.get(self.seg).is_some() {
                        let len = self.file.metadata().map_or(0, |m| m.len());
                        self.closed.insert(self.seg, len.max(self.buf_start));
                    }
                    self.seg = next;
                    self.file = file;
                    self.buf_start = 0;
                    self.torn = false;
                }
                Err(e) => {
                    tier.write_failed(&e);
                    return false;
                }
            }
        }
        let mut copies = Vec::new();
        let need = total.max(tier.segment_size);
        while self.closed.values().sum::<u64>() + need > tier.config.size {
            let Some((&oldest, _)) = self.closed.first_key_value() else {
                break;
            };
            self.evict(oldest, &mut copies, tier.segment_size / 2);
            self.closed.remove(&oldest);
        }
        self.update_used();
        for copy in copies {
            // Copies go behind the eviction; one that no longer fits is dropped (a copy never
            // starts another segment, so an eviction never leads to another).
            let head = copy.meta.head.len() + record::blocks(copy.body_len) * 4 + 1024;
            let room = record::aligned(copy.body_len + head as u64);
            let end = self.buf_start + self.buf.len() as u64;
            if end + total + room <= tier.segment_size {
                self.append_object(copy);
            } else {
                finish_object(tier, copy, None);
            }
        }
        true
    }

    /// Evicts segment `seq`: objects read since they were written are copied (into `copies`,
    /// appended by the caller) up to `budget` bytes, the others leave the index, and the file
    /// is unlinked.
    fn evict(&mut self, seq: u32, copies: &mut Vec<ObjectJob>, mut budget: u64) {
        let tier = self.tier;
        // Entries from the listing must not be indexed into a segment after it is evicted.
        tier.wait_loaded_blocking();
        let Some(file) = tier.segments.get(seq) else {
            return;
        };
        if let Ok(mut scan) = Scan::new(&file, 0) {
            while let Some((at, fixed)) = scan.next_record() {
                if fixed.kind != Kind::Object {
                    continue;
                }
                let here = Loc::new(seq, at as u32, 0);
                let Some(current) = tier.index.peek(&fixed.primary, fixed.slot.as_ref()) else {
                    continue;
                };
                if current.position() != here.position() {
                    continue;
                }
                let size = u64::from(fixed.head_len) + fixed.body_len;
                if current.touched() && size <= budget {
                    if let Some(copy) = copy_of(&mut scan, at, &fixed, current) {
                        budget -= size;
                        tier.queue.add(copy.body_len);
                        tier.counters.readmitted.fetch_add(1, Ordering::Relaxed);
                        copies.push(copy);
                        continue;
                    }
                }
                let (removed, none_left) =
                    tier.index
                        .remove_at(&fixed.primary, fixed.slot.as_ref(), current);
                if removed {
                    tier.counters.evictions.fetch_add(1, Ordering::Relaxed);
                    if none_left {
                        tier.tags.forget(&fixed.primary, Tier::Disk);
                    }
                }
            }
        }
        // Entries the scan could not reach (a damaged tail) go with the file.
        tier.index.drop_segment(seq);
        tier.segments.remove(seq);
    }

    /// Writes what is buffered, then indexes and answers what it held. If the write fails,
    /// the fills in it are not stored and its purges wait in `unwritten`.
    fn flush(&mut self) {
        if !self.buf.is_empty() {
            let result = self.file.write_all_at(&self.buf, self.buf_start);
            if let Err(e) = result {
                self.write_failed(&e);
                self.buf.clear();
                for written in std::mem::take(&mut self.written) {
                    match written {
                        Written::Object { job, .. } => finish_object(self.tier, job, None),
                        Written::Invalidation {
                            kind,
                            primary,
                            at,
                            done,
                            ..
                        } => self.unwritten.push(Unwritten {
                            kind,
                            primary,
                            at,
                            done: Some(done),
                        }),
                        Written::Rewritten(unwritten) => self.unwritten.push(unwritten),
                    }
                }
                return;
            }
            self.buf_start += self.buf.len() as u64;
            self.buf.clear();
            self.dirty = true;
        }
        for written in std::mem::take(&mut self.written) {
            match written {
                Written::Object { job, loc } => self.index_object(job, loc),
                Written::Invalidation {
                    kind,
                    primary,
                    at,
                    position,
                    done,
                } => {
                    apply_invalidation(self.tier, kind, &primary, at, position);
                    let _ = done.send(());
                }
                // Not applied by position: the index has gained fresher copies since the
                // purge, which it must not remove. (A restart's replay does remove copies
                // written before this record: a miss, never an old page.)
                Written::Rewritten(unwritten) => {
                    if let Some(done) = unwritten.done {
                        let _ = done.send(());
                    }
                }
            }
        }
        self.update_used();
    }

    /// A write into the current segment failed: counted, and remembered for what it leaves
    /// in the file and whether the file system is out of room.
    fn write_failed(&mut self, e: &std::io::Error) {
        self.tier.write_failed(e);
        self.torn = self.written_past_end();
        self.out_of_space |= matches!(
            e.kind(),
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
        );
    }

    /// Whether the file holds bytes past the end of the records: a write that failed
    /// part-way.
    fn written_past_end(&self) -> bool {
        self.file
            .metadata()
            .map_or(true, |m| m.len() > self.buf_start)
    }

    /// Writes the records of purges the disk refused (a full file system: another program's
    /// files took the space). If it still refuses them, the oldest segment is evicted, which
    /// gives its space back, and they are tried again: losing cached objects costs misses, a
    /// purge lost at a restart serves an old page (bans likewise, [`Job::FreeSpace`]).
    /// Returns once every one is written or no segment is left that one could apply to. A
    /// purge is answered once its record is in the file, as when the disk takes it at once.
    fn write_unwritten(&mut self) {
        while !self.unwritten.is_empty() {
            for unwritten in std::mem::take(&mut self.unwritten) {
                let bytes = record::invalidation(unwritten.kind, &unwritten.primary, unwritten.at);
                if self.make_room(bytes.len() as u64) {
                    self.buf.extend_from_slice(&bytes);
                    self.written.push(Written::Rewritten(unwritten));
                } else {
                    self.unwritten.push(unwritten);
                }
            }
            self.flush();
            if self.unwritten.is_empty() {
                return;
            }
            if !self.evict_for_space() {
                for unwritten in std::mem::take(&mut self.unwritten) {
                    if let Some(done) = unwritten.done {
                        let _ = done.send(());
                    }
                }
                return;
            }
        }
    }

    /// Evicts the oldest segment (the current one when it is the last) to give its space back
    /// to the file system. False if no segment holds a byte (a new, empty one is not evicted:
    /// that would only make another).
    fn evict_for_space(&mut self) -> bool {
        // Nothing is copied: there is no room for it.
        let mut none = Vec::new();
        if let Some((&oldest, _)) = self.closed.first_key_value() {
            self.evict(oldest, &mut none, 0);
            self.closed.remove(&oldest);
        } else if (self.buf_start > 0 || self.written_past_end())
            && self.tier.segments.get(self.seg).is_some()
        {
            self.evict(self.seg, &mut none, 0);
            // Its file is unlinked; its space returns once a new segment replaces it.
            self.torn = true;
            self.make_room(0);
        } else {
            return false;
        }
        // A file system that stays full evicts a segment each time the tier fills again: the
        // 1st, 2nd, 4th, 8th... are logged.
        self.space_evictions += 1;
        if self.space_evictions.is_power_of_two() {
            tracing::warn!(
                evictions = self.space_evictions,
                "the file system is full; evicted the oldest disk cache segment to give its space back"
            );
        }
        self.update_used();
        true
    }

    fn index_object(&mut self, job: ObjectJob, loc: Loc) {
        let tier = self.tier;
        let indexed = tier
            .index
            .insert(&job.primary, job.slot.as_ref(), loc, job.only_if);
        if indexed {
            tier.counters.stores.fetch_add(1, Ordering::Relaxed);
        }
        finish_object(tier, job, indexed.then_some(loc));
    }

    /// What the tier's files hold: the closed segments' lengths (each start begins a new
    /// segment, so most are not full) and the current one's.
    fn update_used(&self) {
        let tier = self.tier;
        let closed: u64 = self.closed.values().sum();
        tier.used_bytes.store(
            closed + self.buf_start + self.buf.len() as u64,
            Ordering::Relaxed,
        );
    }

    fn checkpoint(&mut self) {
        self.last_checkpoint = Instant::now();
        if self.tier.handed_over() {
            return;
        }
        let covered = self.position();
        match checkpoint::write(&self.tier.checkpoint_path(), covered, &self.tier.index) {
            Ok(()) => self.dirty = false,
            Err(e) => tracing::warn!(error = %e, "writing the disk cache checkpoint failed"),
        }
    }
}

/// Where a record written at `offset` is indexed: a copy keeps the original's soft purge,
/// a refreshed one does not.
fn placed(job: &ObjectJob, seg: u32, offset: u32, len: u32) -> Loc {
    match job.only_if {
        Some(original) if !job.refreshed => original.moved_to(seg, offset, len),
        _ => Loc::new(seg, offset, len),
    }
}

fn finish_object(tier: &DiskTier, job: ObjectJob, loc: Option<Loc>) {
    if let Some(fill) = &job.pending {
        tier.pending.remove(&job.primary, job.slot.as_ref(), fill);
    }
    // Last: a queue seen empty (the stats, a test waiting for the writer) means every fill
    // handed over is read from the index now, not from the pending fills.
    tier.queue.remove(job.body_len);
    match job.done {
        Some(done) => {
            let _ = done.send(loc);
        }
        // Nobody waits to learn that nothing was stored: a fill that did not wait recorded
        // its tags for the disk tier, which must not name a URL it does not hold.
        None if loc.is_none() && !tier.index.holds(&job.primary) => {
            tier.tags.forget(&job.primary, Tier::Disk);
        }
        None => {}
    }
}

/// Applies a purge or soft purge written at `position` to what was written before it.
pub fn apply_invalidation(
    tier: &DiskTier,
    kind: Kind,
    primary: &HashBinary,
    at: u64,
    position: u64,
) {
    match kind {
        Kind::Delete => {
            tier.index.remove_all(primary, position);
        }
        Kind::Expire => {
            tier.index.expire_all(primary, position, at / 1_000_000_000);
        }
        Kind::Object => {}
    }
}

/// A hot object's copy: its record read back and checked, its soft purge applied to its
/// times so the copy means the same after a restart.
fn copy_of(scan: &mut Scan<'_>, at: u64, fixed: &record::Fixed, current: Loc) -> Option<ObjectJob> {
    let bytes = Bytes::from(scan.whole(at, fixed).ok()?);
    let head = record::parse_head(&bytes).ok()?;
    let body = bytes.slice(fixed.head_len as usize..);
    for (i, block) in body.chunks(record::BLOCK).enumerate() {
        record::check_block(&head.block_crcs, i, block).ok()?;
    }
    let mut meta = head.meta;
    if let Some(expired) = current.expired_at() {
        let at = crate::cache::meta::Stamp::from_nanos(expired.max(SOFT_EPOCH) * 1_000_000_000);
        meta.times.fresh_until = meta.times.fresh_until.min(at);
    }
    Some(ObjectJob {
        primary: fixed.primary,
        slot: fixed.slot,
        meta,
        body_len: body.len() as u64,
        body: vec![body],
        only_if: Some(current),
        refreshed: false,
        done: None,
        pending: None,
    })
}

pub fn now_nanos() -> u64 {
    crate::cache::meta::Stamp::of(std::time::SystemTime::now()).nanos()
}
