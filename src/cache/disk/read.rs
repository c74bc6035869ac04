//! Disk hits: the index says where the record is; one read fetches it (the whole record up
//! to [`WHOLE_READ_MAX`], else its head). When the page cache holds it, the read is a view of
//! the segment's mapping ([`super::mapped`]: no copy); else it is a positional read asked of
//! the page cache without waiting (`preadv2` with `RWF_NOWAIT`), sent to the blocking pool
//! only when the disk must be waited for. The head is checked, then each body block as it is
//! read: a damaged block is never sent, and its object is dropped and counted.

use std::fs::File;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use pingora::cache::key::HashBinary;
use rustix::io::{Errno, ReadWriteFlags};

use super::index::Loc;
use super::record::{self, Damage, Head, BLOCK};
use super::segments::read_up_to;
use super::DiskTier;
use crate::cache::meta::{ObjectMeta, Stamp};

/// Records up to this size are read whole and their body checked before the hit is served.
pub const WHOLE_READ_MAX: u64 = 1 << 20;
/// A larger record's first read: its head (a response header and a CRC per 64 KiB block).
const HEAD_GUESS: usize = 16 * 1024;
/// Blocks read per read of a large body.
const BLOCKS_PER_READ: u64 = 4;
/// Reads from this size are views of the segment's mapping; smaller ones are copied, which
/// costs about what the `fstat` a view needs does (benches/README.md §20: 1 KiB and 4 KiB
/// hits measured within noise either way, 256 KiB hits 1.2x faster mapped).
const MAP_MIN: usize = 16 * 1024;

/// What a disk lookup found: checked metadata and the body, whole or to stream.
pub struct DiskEntry {
    pub meta: ObjectMeta,
    pub body_len: u64,
    pub body: DiskBody,
}

pub enum DiskBody {
    /// Read and checked.
    Whole(Bytes),
    /// Checked block by block as it streams.
    Stream(DiskHit),
}

impl DiskTier {
    /// Looks a slot up on disk. Damaged entries are removed and reported as absent.
    pub async fn lookup(
        &'static self,
        primary: &HashBinary,
        slot: Option<&HashBinary>,
    ) -> Option<DiskEntry> {
        // A pending fill is newer than what the index holds for its slot (regression: a page
        // banned and fetched again was a miss until the writer indexed the new copy).
        if let Some(fill) = self.pending.get(primary, slot) {
            self.counters.hits.fetch_add(1, Ordering::Relaxed);
            return Some(DiskEntry {
                meta: fill.meta.clone(),
                body_len: fill.body_len,
                body: DiskBody::Whole(fill.whole_body()),
            });
        }
        let found = if self.wait_loaded().await {
            self.index.get(primary, slot)
        } else {
            None
        };
        let Some(loc) = found else {
            self.counters.misses.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        match self.read_entry(primary, slot, loc).await {
            Ok(entry) => {
                self.counters.hits.fetch_add(1, Ordering::Relaxed);
                Some(entry)
            }
            Err(ReadFailure::Gone) => {
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
            Err(ReadFailure::Damaged(why)) => {
                self.drop_corrupt(primary, slot, loc, &why.to_string());
                None
            }
            Err(ReadFailure::Io(e)) => {
                tracing::warn!(error = %e, "disk cache read failed");
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    async fn read_entry(
        &'static self,
        primary: &HashBinary,
        slot: Option<&HashBinary>,
        loc: Loc,
    ) -> Result<DiskEntry, ReadFailure> {
        // Evicted since the index was read (or about to be written again elsewhere).
        let file = self.segments.get(loc.seg).ok_or(ReadFailure::Gone)?;
        let whole = u64::from(loc.len) <= WHOLE_READ_MAX;
        let first = if whole {
            loc.len as usize
        } else {
            HEAD_GUESS.min(loc.len as usize)
        };
        let mut bytes = self
            .read_at(loc.seg, &file, first, u64::from(loc.offset))
            .await?;
        if bytes.len() < first {
            return Err(ReadFailure::Damaged(Damage::Truncated));
        }
        let fixed = record::parse_fixed(&bytes)?;
        if fixed.head_len as usize > bytes.len() {
            bytes = self
                .read_at(
                    loc.seg,
                    &file,
                    fixed.head_len as usize,
                    u64::from(loc.offset),
                )
                .await?;
        }
        let (fixed, meta, block_crcs) = checked_head(&bytes, primary, slot, loc)?;
        let body = if whole {
            DiskBody::Whole(checked_body(&bytes, &fixed, &block_crcs)?)
        } else {
            // A segment cut short (a torn write, a damaged file) is a miss now rather than a
            // response cut short later.
            let record_end = u64::from(loc.offset) + u64::from(loc.len);
            if file.metadata()?.len() < record_end {
                return Err(ReadFailure::Damaged(Damage::Truncated));
            }
            let mut hit = DiskHit {
                tier: self,
                seg: loc.seg,
                primary: *primary,
                slot: slot.copied(),
                loc,
                file,
                body_start: u64::from(loc.offset) + u64::from(fixed.head_len),
                block_crcs: block_crcs.into(),
                pos: 0,
                end: fixed.body_len,
                total: fixed.body_len,
                first: None,
            };
            // The first blocks are read and checked before the hit is answered: damage there
            // is a miss, not a response that stops.
            hit.first = hit.read_checked().await?;
            DiskBody::Stream(hit)
        };
        Ok(DiskEntry {
            meta,
            body_len: fixed.body_len,
            body,
        })
    }

    /// An object stored whole in a record up to [`WHOLE_READ_MAX`], if the page cache holds it
    /// now: read and checked on this thread, never waiting for the disk (a fast path's
    /// lookup). `None` otherwise (and for damage, which is dropped and counted).
    pub fn read_now(
        &'static self,
        primary: &HashBinary,
        slot: Option<&HashBinary>,
    ) -> Option<(ObjectMeta, Bytes)> {
        // A newer copy waits for the writer: the full path reads it.
        if !self.loaded() || self.read_delay.is_some() || self.pending.has(primary, slot) {
            return None;
        }
        let loc = self.index.get(primary, slot)?;
        if u64::from(loc.len) > WHOLE_READ_MAX {
            return None;
        }
        let file = self.segments.get(loc.seg)?;
        let len = loc.len as usize;
        let read = match self.read_without_waiting(loc.seg, &file, len, u64::from(loc.offset))? {
            Ok(buf) if buf.len() == len => Ok(buf),
            Ok(_) => Err(ReadFailure::Damaged(Damage::Truncated)),
            Err(e) => Err(ReadFailure::Io(e)),
        };
        let found = read.and_then(|bytes| {
            let (fixed, meta, crcs) = checked_head(&bytes, primary, slot, loc)?;
            Ok((meta, checked_body(&bytes, &fixed, &crcs)?))
        });
        match found {
            Ok(found) => {
                self.counters.hits.fetch_add(1, Ordering::Relaxed);
                Some(found)
            }
            Err(ReadFailure::Damaged(why)) => {
                self.drop_corrupt(primary, slot, loc, &why.to_string());
                None
            }
            Err(_) => None,
        }
    }

    /// A whole body, checked (a 304's refresh writes it again).
    pub(super) async fn read_body_whole(
        &'static self,
        primary: &HashBinary,
        slot: Option<&HashBinary>,
        loc: Loc,
    ) -> Option<Bytes> {
        match self.read_entry(primary, slot, loc).await {
            Ok(DiskEntry {
                body: DiskBody::Whole(body),
                ..
            }) => Some(body),
            Ok(DiskEntry {
                body: DiskBody::Stream(mut hit),
                body_len,
                ..
            }) => {
                let mut body = Vec::with_capacity(body_len as usize);
                while let Ok(Some(chunk)) = hit.read().await {
                    body.extend_from_slice(&chunk);
                }
                (body.len() as u64 == body_len).then(|| body.into())
            }
            Err(ReadFailure::Damaged(why)) => {
                self.drop_corrupt(primary, slot, loc, &why.to_string());
                None
            }
            Err(_) => None,
        }
    }

    /// `len` bytes at `at` of segment `seg`, or fewer at the end of the file: from the page
    /// cache on this thread when it holds them, else on the blocking pool.
    async fn read_at(&self, seg: u32, file: &Arc<File>, len: usize, at: u64) -> io::Result<Bytes> {
        if self.read_delay.is_none() {
            if let Some(done) = self.read_without_waiting(seg, file, len, at) {
                return done;
            }
        }
        let mut buf = vec![0u8; len];
        self.counters.reads_waited.fetch_add(1, Ordering::Relaxed);
        let file = file.clone();
        let delay = self.read_delay;
        tokio::task::spawn_blocking(move || {
            if let Some(delay) = delay {
                std::thread::sleep(delay);
            }
            let got = read_up_to(&file, &mut buf, at)?;
            buf.truncate(got);
            Ok(Bytes::from(buf))
        })
        .await
        .map_err(io::Error::other)?
    }
}

/// The checked head of the record read into `bytes` (from `loc`), which must be the object
/// asked for, with its soft purge applied to its times.
fn checked_head(
    bytes: &[u8],
    primary: &HashBinary,
    slot: Option<&HashBinary>,
    loc: Loc,
) -> Result<(record::Fixed, ObjectMeta, Vec<u32>), ReadFailure> {
    let Head {
        fixed,
        mut meta,
        block_crcs,
    } = record::parse_head(bytes)?;
    if fixed.kind != record::Kind::Object
        || fixed.primary != *primary
        || fixed.slot.as_ref() != slot
    {
        // Another URL sharing the index key replaced this one's entry: not damage.
        return Err(ReadFailure::Gone);
    }
    if u64::from(fixed.head_len) + fixed.body_len != u64::from(loc.len) {
        return Err(ReadFailure::Damaged(Damage::HeadLayout));
    }
    if let Some(expired) = loc.expired_at() {
        let at = Stamp::from_nanos(expired.saturating_mul(1_000_000_000));
        meta.times.fresh_until = meta.times.fresh_until.min(at);
    }
    Ok((fixed, meta, block_crcs))
}

/// The body of a whole record, every block checked.
fn checked_body(bytes: &Bytes, fixed: &record::Fixed, crcs: &[u32]) -> Result<Bytes, Damage> {
    let body = bytes.slice(fixed.head_len as usize..);
    for (i, block) in body.chunks(BLOCK).enumerate() {
        record::check_block(crcs, i, block)?;
    }
    Ok(body)
}

/// How a read that the page cache may answer is made, decided once per process from the
/// segments' file system (and changed once if the kernel turns out not to support it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadMode {
    /// `preadv2` with `RWF_NOWAIT`: answered from the page cache on the calling thread, or
    /// refused (`EAGAIN`) when the disk would have to be waited for.
    NoWait,
    /// A plain `pread` on the calling thread: the file system keeps its files in memory
    /// (tmpfs, ramfs), so no read waits for a disk. (tmpfs refuses `RWF_NOWAIT`.)
    Inline,
    /// Every read on the blocking pool: the kernel cannot say whether a read would wait.
    Pool,
}

impl ReadMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ReadMode::NoWait => "nowait",
            ReadMode::Inline => "inline",
            ReadMode::Pool => "pool",
        }
    }

    /// The mode for files on the file system holding `file`.
    pub fn for_file(file: &File) -> ReadMode {
        // statfs(2)'s f_type for tmpfs and ramfs (linux/magic.h).
        const TMPFS_MAGIC: u64 = 0x0102_1994;
        const RAMFS_MAGIC: u64 = 0x8584_58f6;
        match rustix::fs::fstatfs(file) {
            Ok(fs) if [TMPFS_MAGIC, RAMFS_MAGIC].contains(&(fs.f_type as u64)) => ReadMode::Inline,
            _ => ReadMode::NoWait,
        }
    }

    fn encode(self) -> u8 {
        self as u8
    }

    fn decode(v: u8) -> ReadMode {
        match v {
            0 => ReadMode::NoWait,
            1 => ReadMode::Inline,
            _ => ReadMode::Pool,
        }
    }
}

impl DiskTier {
    pub fn read_mode(&self) -> ReadMode {
        ReadMode::decode(self.read_mode.load(Ordering::Relaxed))
    }

    pub(super) fn set_read_mode(&self, mode: ReadMode) {
        self.read_mode.store(mode.encode(), Ordering::Relaxed);
    }

    /// `len` bytes at `at` of segment `seg` (fewer at the end of the file) if that cannot
    /// wait for the disk: from [`MAP_MIN`] bytes, a view of the segment's mapping when the
    /// page cache holds every page; else read on this thread as the [`ReadMode`] allows.
    /// `None` if the disk would have to be waited for (the caller reads on the blocking pool).
    fn read_without_waiting(
        &self,
        seg: u32,
        file: &File,
        len: usize,
        at: u64,
    ) -> Option<io::Result<Bytes>> {
        if len >= MAP_MIN {
            let in_memory = self.read_mode() == ReadMode::Inline;
            let mapped = self.segments.mapping(seg, self.segment_size, in_memory);
            if let Some(view) = mapped.and_then(|map| map.view(at, len)) {
                self.counters.reads_mapped.fetch_add(1, Ordering::Relaxed);
                return Some(Ok(view));
            }
        }
        self.read_copied(file, len, at)
            .map(|read| read.map(Bytes::from))
    }

    /// [`Self::read_without_waiting`] into a buffer of Skua's.
    fn read_copied(&self, file: &File, len: usize, at: u64) -> Option<io::Result<Vec<u8>>> {
        match self.read_mode() {
            ReadMode::Inline => Some(read_inline(file, len, at)),
            ReadMode::Pool => None,
            ReadMode::NoWait => {
                let mut buf = vec![0u8; len];
                match rustix::io::preadv2(
                    file,
                    &mut [io::IoSliceMut::new(&mut buf)],
                    at,
                    ReadWriteFlags::NOWAIT,
                ) {
                    Ok(n) if n == len || n == 0 => {
                        buf.truncate(n);
                        Some(Ok(buf))
                    }
                    // Part of it cached: the rest needs the disk.
                    Ok(_) => None,
                    Err(e) if e == Errno::AGAIN => None,
                    Err(e) if e == Errno::OPNOTSUPP || e == Errno::NOSYS || e == Errno::INVAL => {
                        tracing::warn!(
                            error = %e,
                            "the kernel cannot read the disk cache without waiting (RWF_NOWAIT); every disk read now goes to the blocking pool"
                        );
                        self.set_read_mode(ReadMode::Pool);
                        None
                    }
                    Err(e) => Some(Err(e.into())),
                }
            }
        }
    }
}

/// `len` bytes at `at` (fewer at the end of the file), read into a buffer that is not zeroed
/// first: a 256 KiB hit saves clearing what the read overwrites.
fn read_inline(file: &File, len: usize, at: u64) -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        let from = at + buf.len() as u64;
        let got = rustix::io::pread(file, rustix::buffer::spare_capacity(&mut buf), from);
        match got {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e == Errno::INTR => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(buf)
}

/// The head of the record at `loc`, checked (the start-up tag pass).
pub fn read_head_blocking(file: &File, loc: Loc) -> Result<Head, Damage> {
    let mut bytes = vec![0u8; HEAD_GUESS.min(loc.len as usize)];
    let got = read_up_to(file, &mut bytes, u64::from(loc.offset)).map_err(|_| Damage::Truncated)?;
    bytes.truncate(got);
    let fixed = record::parse_fixed(&bytes)?;
    if fixed.head_len as usize > bytes.len() {
        bytes.resize(fixed.head_len as usize, 0);
        let got =
            read_up_to(file, &mut bytes, u64::from(loc.offset)).map_err(|_| Damage::Truncated)?;
        bytes.truncate(got);
    }
    record::parse_head(&bytes)
}

#[derive(Debug)]
enum ReadFailure {
    Gone,
    Damaged(Damage),
    Io(io::Error),
}

impl std::fmt::Display for ReadFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadFailure::Gone => f.write_str("the record is gone"),
            ReadFailure::Damaged(why) => write!(f, "{why}"),
            ReadFailure::Io(e) => write!(f, "{e}"),
        }
    }
}

impl From<Damage> for ReadFailure {
    fn from(d: Damage) -> Self {
        ReadFailure::Damaged(d)
    }
}

impl From<io::Error> for ReadFailure {
    fn from(e: io::Error) -> Self {
        ReadFailure::Io(e)
    }
}

/// A large body streamed from its segment, each block checked before any of it is sent;
/// seekable for Range requests.
pub struct DiskHit {
    tier: &'static DiskTier,
    seg: u32,
    primary: HashBinary,
    slot: Option<HashBinary>,
    loc: Loc,
    file: Arc<File>,
    /// Where the body starts in the segment.
    body_start: u64,
    block_crcs: Arc<[u32]>,
    pos: u64,
    end: u64,
    total: u64,
    /// The body's first chunk, read by the lookup, until a seek moves elsewhere.
    first: Option<Bytes>,
}

impl DiskHit {
    pub async fn read(&mut self) -> io::Result<Option<Bytes>> {
        if let Some(first) = self.first.take() {
            return Ok(Some(first));
        }
        match self.read_checked().await {
            Ok(chunk) => Ok(chunk),
            Err(ReadFailure::Io(e)) => Err(e),
            Err(why) => {
                self.tier.drop_corrupt(
                    &self.primary,
                    self.slot.as_ref(),
                    self.loc,
                    &why.to_string(),
                );
                Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a damaged disk cache block",
                ))
            }
        }
    }

    /// The next chunk, its blocks checked.
    async fn read_checked(&mut self) -> Result<Option<Bytes>, ReadFailure> {
        if self.pos >= self.end {
            return Ok(None);
        }
        let block = BLOCK as u64;
        let first_block = self.pos / block;
        let from = first_block * block;
        let to = ((first_block + BLOCKS_PER_READ) * block).min(self.total);
        let data = self
            .tier
            .read_at(
                self.seg,
                &self.file,
                (to - from) as usize,
                self.body_start + from,
            )
            .await?;
        if data.len() as u64 != to - from {
            return Err(ReadFailure::Damaged(Damage::Truncated));
        }
        for (i, block) in data.chunks(BLOCK).enumerate() {
            record::check_block(&self.block_crcs, first_block as usize + i, block)?;
        }
        let upto = to.min(self.end);
        let chunk = data.slice((self.pos - from) as usize..(upto - from) as usize);
        self.pos = upto;
        Ok(Some(chunk))
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
        self.first = None;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn an_inline_read_returns_what_the_file_holds_and_stops_at_its_end() {
        let mut file = tempfile::tempfile().unwrap();
        let bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        file.write_all(&bytes).unwrap();
        assert_eq!(read_inline(&file, 1000, 5).unwrap(), bytes[5..1005]);
        assert_eq!(read_inline(&file, 262_144, 1).unwrap(), bytes[1..262_145]);
        assert_eq!(read_inline(&file, 100, 299_950).unwrap(), bytes[299_950..]);
        assert!(read_inline(&file, 10, 400_000).unwrap().is_empty());
    }

    #[test]
    fn files_in_memory_are_read_inline_and_others_without_waiting() {
        // /dev/shm is tmpfs on Linux systems that have it.
        if let Ok(dir) = tempfile::tempdir_in("/dev/shm") {
            let file = tempfile::tempfile_in(dir.path()).unwrap();
            assert_eq!(ReadMode::for_file(&file), ReadMode::Inline);
        }
        let here = tempfile::tempfile_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let mode = ReadMode::for_file(&here);
        assert!(
            matches!(mode, ReadMode::NoWait | ReadMode::Inline),
            "{mode:?}"
        );
    }
}
