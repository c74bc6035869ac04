//! Disk fills: admission (store on the N-th miss), a body streamed to a temporary file as the
//! response goes to the client, then published under its meta (body first, so a meta never
//! names a missing body) and indexed.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use moka::ops::compute::Op;
use pingora::cache::key::HashBinary;
use tokio::io::AsyncWriteExt;

use super::format::{self, MetaFile, ObjectPaths};
use super::{DiskTier, IndexedUrl, IndexedVariant};

impl DiskTier {
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
        let new_slot = IndexedVariant {
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
            Op::Put(Arc::new(IndexedUrl { slots }))
        });
        self.counters.stores.fetch_add(1, Ordering::Relaxed);
        // Apply evictions now, so the bytes on disk stay within the bound.
        self.index.run_pending_tasks();
    }
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
