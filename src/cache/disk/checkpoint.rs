//! The index checkpoint: every entry of the index and the log position it covers, written by
//! the writer every half minute while records are written (and at a graceful stop), so that
//! a restart reads one file and scans only the log written after that position instead of
//! every segment. Written to a temporary file and renamed; one that does not check out is
//! ignored (the segments are scanned whole instead).

use std::io::{self, Write};
use std::path::Path;

use super::index::{Entry, Index, Loc};

const MAGIC: &[u8; 8] = b"SKUACKP2";
/// magic, covered position
const HEADER: usize = 8 + 8;
/// primary key, key, segment, offset, length, flags
const ENTRY: usize = 8 + 8 + 4 + 4 + 4 + 4;
/// entry count, CRC-32 of everything before it
const TRAILER: usize = 8 + 4;

/// Writes every entry of `index` and the position it covers, a shard at a time (nothing the
/// size of the index is built in memory).
pub fn write(path: &Path, covered: u64, index: &Index) -> io::Result<()> {
    let temp = path.with_extension(format!("tmp.{}", std::process::id()));
    let result = crate::cache::files::create_fresh(&temp).and_then(|file| {
        let mut out = Crc(
            io::BufWriter::with_capacity(1 << 20, file),
            crc32fast::Hasher::new(),
        );
        out.write_all(MAGIC)?;
        out.write_all(&covered.to_le_bytes())?;
        let mut count = 0u64;
        let mut failed = Ok(());
        index.for_each(|e| {
            if failed.is_ok() {
                failed = out.write_all(&encode(&e));
                count += 1;
            }
        });
        failed?;
        out.write_all(&count.to_le_bytes())?;
        let crc = out.1.clone().finalize();
        out.0.write_all(&crc.to_le_bytes())?;
        out.0.flush()
    });
    let result = result.and_then(|_| std::fs::rename(&temp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

fn encode(e: &Entry) -> [u8; ENTRY] {
    let mut out = [0u8; ENTRY];
    out[..8].copy_from_slice(&e.primary.to_le_bytes());
    out[8..16].copy_from_slice(&e.key.to_le_bytes());
    out[16..20].copy_from_slice(&e.loc.seg.to_le_bytes());
    out[20..24].copy_from_slice(&e.loc.offset.to_le_bytes());
    out[24..28].copy_from_slice(&e.loc.len.to_le_bytes());
    out[28..32].copy_from_slice(&e.loc.flags().to_le_bytes());
    out
}

/// A writer that keeps the CRC of what went through it.
struct Crc<W>(W, crc32fast::Hasher);

impl<W: Write> Crc<W> {
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.1.update(bytes);
        self.0.write_all(bytes)
    }
}

/// Reads a checkpoint: hands each entry to `found` and returns the position it covers, or
/// `None` (and hands nothing) if there is none that checks out.
pub fn read(path: &Path, mut found: impl FnMut(Entry)) -> Option<u64> {
    let mut bytes = Vec::new();
    let mut file = crate::cache::files::open_regular(path).ok()?;
    io::Read::read_to_end(&mut file, &mut bytes).ok()?;
    if bytes.len() < HEADER + TRAILER || &bytes[..8] != MAGIC {
        return None;
    }
    let (content, crc) = bytes.split_at(bytes.len() - 4);
    if crc32fast::hash(content) != u32::from_le_bytes(crc.try_into().ok()?) {
        tracing::warn!("the disk cache checkpoint is damaged; scanning every segment instead");
        return None;
    }
    let covered = u64::from_le_bytes(content[8..16].try_into().ok()?);
    let (entries, count) = content[HEADER..].split_at(content.len() - HEADER - 8);
    let count = u64::from_le_bytes(count.try_into().ok()?);
    if entries.len() % ENTRY != 0 || (entries.len() / ENTRY) as u64 != count {
        return None;
    }
    let u32_at = |b: &[u8], at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let u64_at = |b: &[u8], at: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[at..at + 8]);
        u64::from_le_bytes(w)
    };
    for e in entries.chunks_exact(ENTRY) {
        let loc = Loc::new(u32_at(e, 16), u32_at(e, 20), u32_at(e, 24)).with_flags(u32_at(e, 28));
        found(Entry {
            primary: u64_at(e, 0),
            key: u64_at(e, 8),
            loc,
        });
    }
    Some(covered)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_round_trips_and_a_damaged_one_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.ckpt");
        let index = Index::default();
        for i in 0..1000u32 {
            let mut url = [0u8; 16];
            url[..4].copy_from_slice(&i.to_le_bytes());
            let slot = (i % 3 == 0).then_some([i as u8; 16]);
            index.insert(&url, slot.as_ref(), Loc::new(i % 5, i * 8, 100), None);
        }
        write(&path, 42, &index).unwrap();
        let mut entries = Vec::new();
        assert_eq!(read(&path, |e| entries.push(e)), Some(42));
        let mut expected = index.entries();
        let key = |e: &Entry| (e.primary, e.key);
        expected.sort_by_key(key);
        entries.sort_by_key(key);
        assert_eq!(entries, expected);
        assert_eq!(entries.len(), 1000);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[100] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(
            read(&path, |_| panic!("a damaged checkpoint's entry")),
            None
        );
        assert_eq!(read(&dir.path().join("absent"), |_| {}), None);
    }
}
