//! The start-up index load, in the background (serving starts at once; lookups wait for it):
//! the checkpoint's entries whose segments still exist, then the log written after the
//! checkpoint's position scanned in order, objects indexed and purges applied as they were
//! written. Without a checkpoint every segment is scanned. Purges made while this ran are
//! applied again at its end, then the tags of what was found are read back.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::MutexGuard;
use std::time::{Instant, SystemTime};

use pingora::http::ResponseHeader;

use super::index::{self, keys, Entry, Loc};
use super::record::Kind;
use super::segments::Scan;
use super::{checkpoint, read, writer, DiskTier};
use crate::cache::tags::Tier;

impl DiskTier {
    pub(super) fn load_index(&'static self) {
        let started = Instant::now();
        let old: Vec<u32> = self
            .segments
            .list()
            .into_iter()
            .filter(|s| *s < self.first_new_segment)
            .collect();
        let mut from = (0u32, 0u64);
        let present: std::collections::HashSet<u32> = old.iter().copied().collect();
        // Tables sized once for what the checkpoint holds: growing them entry by entry would
        // leave every smaller table they outgrew resident in the allocator.
        let checkpoint = checkpoint::read(
            &self.checkpoint_path(),
            |count| self.index.reserve(count),
            |entry| {
                if present.contains(&entry.loc.seg) {
                    self.index.insert_found(entry);
                }
            },
        );
        if let Some(covered) = checkpoint {
            from = ((covered >> 32) as u32, covered & 0xffff_ffff);
        }
        let mut scanned = 0u64;
        let to_scan: Vec<u32> = old.iter().copied().filter(|s| *s >= from.0).collect();
        for (i, seg) in to_scan.iter().copied().enumerate() {
            let Some(file) = self.segments.get(seg) else {
                continue;
            };
            let start = if seg == from.0 { from.1 } else { 0 };
            let Ok(mut scan) = Scan::new(&file, start) else {
                continue;
            };
            while let Some((at, fixed)) = scan.next_record() {
                scanned += 1;
                let position = (u64::from(seg) << 32) | at;
                match fixed.kind {
                    Kind::Object => {
                        // A torn or damaged head is not indexed; a body is checked when read.
                        if let Err(why) = scan.head(at, &fixed) {
                            self.found_damaged(&why.to_string());
                            continue;
                        }
                        let (primary, key) = keys(&fixed.primary, fixed.slot.as_ref());
                        let len = u32::try_from(u64::from(fixed.head_len) + fixed.body_len);
                        if let Ok(len) = len {
                            self.index.insert_found(Entry {
                                primary,
                                key,
                                loc: Loc::new(seg, at as u32, len),
                            });
                        }
                    }
                    kind => {
                        writer::apply_invalidation(self, kind, &fixed.primary, fixed.at, position)
                    }
                }
            }
            if scan.stopped_at_damage() {
                self.found_damaged("a record cut short (a torn write)");
            }
            if checkpoint.is_none() && i == 0 {
                // Without a checkpoint the count is not known: the first segment's, times
                // the segments, sizes the tables once rather than step by step.
                let segments = to_scan.len() as u64;
                self.index
                    .reserve(self.index.count().saturating_mul(segments));
            }
        }
        let took = started.elapsed();
        if let Ok(mut t) = self.load_time.lock() {
            *t = Some(took);
        }
        // Purges made meanwhile may have been looked for before the load indexed their URLs;
        // everything the load indexed was written before this process's first segment. Under
        // the list's lock, so that a purge either is in the list or sees the flag.
        let before = u64::from(self.first_new_segment) << 32;
        {
            let mut made = self
                .invalidated_while_loading
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            for (kind, primary, at) in made.drain(..) {
                writer::apply_invalidation(self, kind, &primary, at, before);
            }
            self.loaded.send_replace(true);
        }
        tracing::info!(
            objects = self.index.count(),
            records_scanned = scanned,
            ms = took.as_millis() as u64,
            "disk cache index loaded"
        );
        if self.tags.is_enabled() {
            self.load_tags();
        }
        // Under the list's lock, so that a tag purge either is in the list (and was applied
        // to what the read-back had not reached) or finds every object in the tag index.
        let mut purges = self.tag_purges_lock();
        *purges = None;
        self.tags_loaded.store(true, Ordering::Release);
    }

    fn tag_purges_lock(&self) -> MutexGuard<'_, Option<HashMap<String, SystemTime>>> {
        (self.tag_purges_while_loading.lock()).unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A purge of `tag` made at `at`. `true` while the tags of the objects on disk are still
    /// being read back: the tag index cannot name those objects yet, so the read-back drops
    /// each one the purge covers as it reaches it, and a lookup meanwhile does not serve it
    /// ([`DiskTier::purged_by_tag_while_loading`]). Regression: a tag purge made in the first
    /// moments after a restart found nothing (404) and the pages stayed on disk, served.
    pub fn tag_purged_while_loading(&self, tag: &str, at: SystemTime) -> bool {
        match self.tag_purges_lock().as_mut() {
            Some(purges) => {
                let latest = purges.entry(tag.to_string()).or_insert(at);
                *latest = (*latest).max(at);
                true
            }
            None => false,
        }
    }

    /// Whether a tag purge made while the tags on disk were being read back covers a stored
    /// response with `header` that the origin last vouched for at `vouched`. Always `false`
    /// once they are read back (then the tag index names every object).
    pub fn purged_by_tag_while_loading(
        &self,
        header: &ResponseHeader,
        vouched: SystemTime,
    ) -> bool {
        if self.tags_loaded() {
            return false;
        }
        let purges = self.tag_purges_lock();
        let Some(purges) = purges.as_ref().filter(|p| !p.is_empty()) else {
            return false;
        };
        (self.tags.tags_of(header).iter())
            .any(|tag| purges.get(tag).is_some_and(|at| *at >= vouched))
    }

    fn found_damaged(&self, why: &str) {
        tracing::warn!(reason = why, "dropping a damaged disk cache entry");
        self.counters.corrupt.fetch_add(1, Ordering::Relaxed);
    }

    /// Re-reads the tags of every indexed object from its stored header. Runs after the index
    /// is loaded (objects are servable meanwhile); a tag purge made before it finishes is
    /// applied to the objects it had not re-read yet ([`DiskTier::tag_purged_while_loading`]).
    fn load_tags(&'static self) {
        let tag_bits = self.tags.field_bits();
        for shard in 0..index::SHARDS {
            for entry in self.index.shard_entries(shard) {
                let Some(file) = self.segments.get(entry.loc.seg) else {
                    continue;
                };
                if let Some(delay) = self.read_delay {
                    std::thread::sleep(delay);
                }
                let Ok(head) = read::read_head_blocking(&file, entry.loc) else {
                    continue;
                };
                // Most objects carry no tag field: their header is not decoded.
                if !head.meta.times.field_names.may_have(tag_bits) {
                    continue;
                }
                let primary = head.fixed.primary;
                let header = head.meta.header(head.fixed.body_len as usize);
                let vouched = head.meta.times.epoch.time();
                if self.purged_by_tag_while_loading(&header, vouched)
                    || !self.tags.record(primary, Tier::Disk, &header)
                {
                    // Purged by a tag before the index could name it, or the tag index is
                    // full (a copy a tag purge could not find): dropped.
                    self.index.remove_all(&primary, u64::MAX);
                    let (done, _) = tokio::sync::oneshot::channel();
                    self.send(super::writer::Job::Invalidate {
                        kind: Kind::Delete,
                        primary,
                        at: writer::now_nanos(),
                        done,
                    });
                }
            }
        }
    }
}
