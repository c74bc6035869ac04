//! The segment files: the disk tier's log, cut into files of one size, named by a sequence
//! number that only grows (`0000002a.seg`), so the oldest is the one evicted next and a name
//! is never reused. Each file is opened once and shared by every reader and the writer
//! (positional reads and writes, no seeking), and mapped into memory on its first hit
//! ([`super::mapped`]). [`Scan`] walks a file's records in order.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use super::mapped::Mapping;
use super::record::{self, Damage, Fixed, Head};

pub struct Segments {
    dir: PathBuf,
    open: RwLock<BTreeMap<u32, Arc<File>>>,
    /// Each segment's mapping, made on its first read; `None`: it could not be mapped, and its
    /// reads use `pread`.
    mapped: RwLock<BTreeMap<u32, Option<Arc<Mapping>>>>,
}

impl Segments {
    /// Opens every segment file in `dir` (creating `dir`). Anything else there is left alone;
    /// a link or a special file named like a segment is refused (not opened, not followed).
    pub fn open(dir: &Path) -> io::Result<Segments> {
        std::fs::create_dir_all(dir)?;
        let mut open = BTreeMap::new();
        for entry in std::fs::read_dir(dir)?.flatten() {
            let name = entry.file_name();
            let Some(seq) = name.to_str().and_then(parse_name) else {
                continue;
            };
            match open_segment(&entry.path(), false) {
                Ok(file) => {
                    open.insert(seq, Arc::new(file));
                }
                Err(e) => {
                    tracing::warn!(file = %entry.path().display(), error = %e, "skipping a disk cache segment")
                }
            }
        }
        Ok(Segments {
            dir: dir.to_path_buf(),
            open: RwLock::new(open),
            mapped: RwLock::default(),
        })
    }

    fn path(&self, seq: u32) -> PathBuf {
        self.dir.join(format!("{seq:08x}.seg"))
    }

    pub fn get(&self, seq: u32) -> Option<Arc<File>> {
        self.read().get(&seq).cloned()
    }

    /// Segment `seq` mapped into memory (at least `min_len` bytes of it, so that the segment
    /// being written grows into its mapping), made on the first call.
    /// `in_memory`: the file system keeps its files in memory ([`Mapping`]).
    pub fn mapping(&self, seq: u32, min_len: u64, in_memory: bool) -> Option<Arc<Mapping>> {
        if let Some(made) = lock_read(&self.mapped).get(&seq) {
            return made.clone();
        }
        let file = self.get(seq)?;
        let len = file.metadata().map_or(0, |m| m.len()).max(min_len);
        let made = match Mapping::new(file, len, in_memory) {
            Ok(map) => Some(Arc::new(map)),
            Err(e) => {
                tracing::warn!(segment = seq, error = %e, "a disk cache segment could not be mapped; its hits are read with pread");
                None
            }
        };
        let mut mapped = lock_write(&self.mapped);
        // Removed meanwhile: `remove` has dropped its mapping already or will (it takes this
        // lock after forgetting the file).
        if !self.read().contains_key(&seq) {
            return None;
        }
        mapped.entry(seq).or_insert(made).clone()
    }

    /// The sequence numbers of the segments, oldest first.
    pub fn list(&self) -> Vec<u32> {
        self.read().keys().copied().collect()
    }

    pub fn newest(&self) -> Option<u32> {
        self.read().keys().next_back().copied()
    }

    /// Creates the first segment numbered `first` or after whose name no file holds, and
    /// returns its number. A name taken is skipped, never replaced: during a zero-downtime
    /// upgrade the old process and the new one write beside each other, each to segments of
    /// its own, and the old one's next segment may already be the new one's (replacing it cut
    /// the new process's records, its purges' among them, from the log a restart reads).
    pub fn create_from(&self, first: u32) -> io::Result<(u32, Arc<File>)> {
        let mut seq = first;
        for _ in 0..CREATE_ATTEMPTS {
            match open_segment(&self.path(seq), true) {
                Ok(file) => {
                    let file = Arc::new(file);
                    self.write().insert(seq, file.clone());
                    lock_write(&self.mapped).remove(&seq);
                    return Ok((seq, file));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => seq = seq.wrapping_add(1),
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::other(format!(
            "{CREATE_ATTEMPTS} segment names after {first:08x} are taken"
        )))
    }

    /// Forgets segment `seq` and unlinks its file. Readers holding it (or a view of its
    /// mapping) finish their reads.
    pub fn remove(&self, seq: u32) {
        self.write().remove(&seq);
        lock_write(&self.mapped).remove(&seq);
        let _ = std::fs::remove_file(self.path(seq));
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u32, Arc<File>>> {
        lock_read(&self.open)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<u32, Arc<File>>> {
        lock_write(&self.open)
    }
}

fn lock_read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn lock_write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn parse_name(name: &str) -> Option<u32> {
    let hex = name.strip_suffix(".seg")?;
    if hex.len() != 8 {
        return None;
    }
    u32::from_str_radix(hex, 16).ok()
}

/// Names tried by [`Segments::create_from`] before it gives up.
const CREATE_ATTEMPTS: u32 = 64;

/// Opens a segment for reading and writing (`create`: a new file, failing if the name is
/// taken): never through a link, never a FIFO or device.
fn open_segment(path: &Path, create: bool) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(create)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    crate::cache::files::regular(file)
}

/// Reads a segment's records in order, a window at a time, stopping at the first place that
/// holds no whole record: the end of what was written, or a torn write.
pub struct Scan<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
    window: Vec<u8>,
    window_start: u64,
}

/// Bytes read at a time: many small records per read, and a large body is skipped.
const WINDOW: usize = 1 << 20;

impl<'a> Scan<'a> {
    pub fn new(file: &'a File, from: u64) -> io::Result<Scan<'a>> {
        let end = file.metadata()?.len();
        Ok(Scan {
            file,
            pos: from,
            end,
            window: Vec::new(),
            window_start: 0,
        })
    }

    /// Bytes `[at, at + len)` of the file, from the window (read anew when it does not hold
    /// them).
    fn bytes(&mut self, at: u64, len: usize) -> io::Result<&[u8]> {
        let within = at >= self.window_start
            && at + len as u64 <= self.window_start + self.window.len() as u64;
        if !within {
            let want = len.max(WINDOW).min((self.end - at) as usize);
            self.window.resize(want, 0);
            let got = read_up_to(self.file, &mut self.window, at)?;
            self.window.truncate(got);
            self.window_start = at;
        }
        let from = (at - self.window_start) as usize;
        self.window.get(from..from + len).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "segment shorter than its length",
            )
        })
    }

    /// The next record's offset and fixed part, or `None` at the end of the whole records.
    pub fn next_record(&mut self) -> Option<(u64, Fixed)> {
        if self.pos + record::FIXED as u64 > self.end {
            return None;
        }
        let at = self.pos;
        let fixed = record::parse_fixed(self.bytes(at, record::FIXED).ok()?).ok()?;
        if at + u64::from(fixed.head_len) + fixed.body_len > self.end {
            return None;
        }
        self.pos = at + fixed.total_len();
        Some((at, fixed))
    }

    /// Whether the scan stopped at what was meant to be a record (its magic is there) but is
    /// not a whole one: a torn write, or damage.
    pub fn stopped_at_damage(&mut self) -> bool {
        let at = self.pos;
        at + 8 <= self.end
            && self
                .bytes(at, 8)
                .is_ok_and(|magic| magic == record::MAGIC.as_slice())
    }

    /// The checked head of the record at `at`.
    pub fn head(&mut self, at: u64, fixed: &Fixed) -> Result<Head, Damage> {
        let bytes = self
            .bytes(at, fixed.head_len as usize)
            .map_err(|_| Damage::Truncated)?;
        record::parse_head(bytes)
    }

    /// The whole record at `at` (head and body), for copying it elsewhere.
    pub fn whole(&mut self, at: u64, fixed: &Fixed) -> io::Result<Vec<u8>> {
        let len = (u64::from(fixed.head_len) + fixed.body_len) as usize;
        let mut out = vec![0u8; len];
        self.file.read_exact_at(&mut out, at)?;
        Ok(out)
    }
}

/// Reads as much of `buf` as the file holds from `at`.
pub fn read_up_to(file: &File, buf: &mut [u8], at: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], at + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::disk::record::{invalidation, Kind};

    #[test]
    fn a_scan_stops_at_a_torn_record_and_names_follow_the_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let segments = Segments::open(dir.path()).unwrap();
        let (seq, file) = segments.create_from(0x2a).unwrap();
        assert_eq!(seq, 0x2a);
        assert!(dir.path().join("0000002a.seg").exists());
        let a = invalidation(Kind::Delete, &[1; 16], 1);
        let b = invalidation(Kind::Expire, &[2; 16], 2);
        file.write_all_at(&a, 0).unwrap();
        file.write_all_at(&b, a.len() as u64).unwrap();
        // A torn third record: half its bytes.
        let c = invalidation(Kind::Delete, &[3; 16], 3);
        file.write_all_at(&c[..c.len() / 2], (a.len() + b.len()) as u64)
            .unwrap();
        let mut scan = Scan::new(&file, 0).unwrap();
        let (at, first) = scan.next_record().unwrap();
        assert_eq!((at, first.kind), (0, Kind::Delete));
        assert!(scan.head(at, &first).is_ok());
        let (at, second) = scan.next_record().unwrap();
        assert_eq!((at, second.kind), (a.len() as u64, Kind::Expire));
        assert!(scan.next_record().is_none());

        std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
        std::os::unix::fs::symlink(
            dir.path().join("notes.txt"),
            dir.path().join("00000001.seg"),
        )
        .unwrap();
        let again = Segments::open(dir.path()).unwrap();
        assert_eq!(again.list(), vec![0x2a]);
        again.remove(0x2a);
        assert!(!dir.path().join("0000002a.seg").exists());
    }

    /// Regression: a segment named as the next one (another process's, during an upgrade)
    /// was unlinked and made anew, cutting that process's records from the log.
    #[test]
    fn a_taken_name_is_skipped_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let segments = Segments::open(dir.path()).unwrap();
        std::fs::write(dir.path().join("00000005.seg"), "the other process's").unwrap();
        std::os::unix::fs::symlink(
            dir.path().join("elsewhere"),
            dir.path().join("00000006.seg"),
        )
        .unwrap();
        let (seq, _) = segments.create_from(5).unwrap();
        assert_eq!(seq, 7);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("00000005.seg")).unwrap(),
            "the other process's"
        );
        assert!(!dir.path().join("elsewhere").exists(), "no link followed");
        assert_eq!(segments.list(), vec![7]);
    }
}
