//! The start-up index load: the directory listed in the background (serving starts at once),
//! objects indexed oldest first, orphans and stale temporary files handed to the janitor, and
//! copies purged while the listing ran unlinked instead of indexed. Then the tags of what was
//! found are read back into the tag index.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use moka::ops::compute::Op;
use pingora::cache::key::HashBinary;
use pingora::cache::CacheMeta;

use super::format;
use super::{unlink_all, DiskTier, IndexedUrl, IndexedVariant};
use crate::cache::tags::Tier;

impl DiskTier {
    /// Rebuilds the index from the directory: names and sizes only, oldest first so that the
    /// least recently written objects are the first evicted. Entries that appear while loading
    /// (new writes) win over what the listing found.
    pub(super) fn load_index(&'static self) {
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
            let loaded = IndexedVariant {
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
                    Op::Put(Arc::new(IndexedUrl { slots }))
                }
                None => Op::Put(Arc::new(IndexedUrl {
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

/// A URL's primary key and variant slot.
type SlotKey = (HashBinary, Option<HashBinary>);

fn parse_stem(stem: &str) -> Option<SlotKey> {
    let (primary, slot) = stem.split_once('-')?;
    Some((format::unhex(primary)?, format::parse_slot(slot)?))
}
