//! Disk hits: a lookup reads and checks the meta file, opens the body, and for bodies up to
//! [`WHOLE_READ_MAX`] reads and checks it whole before a byte is served; larger bodies are
//! checked once by [`DiskTier::verify`] and then streamed in [`CHUNK`]s. Damage is dropped,
//! never served.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use pingora::cache::key::HashBinary;
use pingora::cache::CacheMeta;

use super::format::{self, ReadError};
use super::DiskTier;

/// Read size for streaming a body from disk.
const CHUNK: usize = 64 * 1024;
/// Bodies at most this large are read whole and checked before a byte is served.
pub const WHOLE_READ_MAX: u64 = 8 << 20;

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
