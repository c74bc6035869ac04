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

/// Reads a checkpoint: checks it whole (one pass for its CRC), then tells `count` how many
/// entries it holds, hands each to `found` (a second pass) and returns the position it covers.
/// `None`, and nothing handed, if there is no checkpoint that checks out. Read in pieces: a
/// million entries never sit in memory twice.
pub fn read(path: &Path, count: impl FnOnce(u64), mut found: impl FnMut(Entry)) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    let file = crate::cache::files::open_regular(path).ok()?;
    let len = file.metadata().ok()?.len();
    if len < (HEADER + TRAILER) as u64 {
        return None;
    }
    let mut header = [0u8; HEADER];
    file.read_exact_at(&mut header, 0).ok()?;
    let mut trailer = [0u8; TRAILER];
    file.read_exact_at(&mut trailer, len - TRAILER as u64)
        .ok()?;
    let entries = u64::from_le_bytes(trailer[..8].try_into().ok()?);
    let expected = entries
        .checked_mul(ENTRY as u64)
        .and_then(|b| b.checked_add((HEADER + TRAILER) as u64));
    if &header[..8] != MAGIC || expected != Some(len) {
        return None;
    }
    let mut crc = crc32fast::Hasher::new();
    let mut chunk = vec![0u8; 1 << 20];
    let mut at = 0u64;
    let covered_end = len - 4;
    while at < covered_end {
        let n = ((covered_end - at) as usize).min(chunk.len());
        file.read_exact_at(&mut chunk[..n], at).ok()?;
        crc.update(&chunk[..n]);
        at += n as u64;
    }
    if crc.finalize() != u32::from_le_bytes(trailer[8..].try_into().ok()?) {
        tracing::warn!("the disk cache checkpoint is damaged; scanning every segment instead");
        return None;
    }
    count(entries);
    let u32_at = |b: &[u8], at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let u64_at = |b: &[u8], at: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[at..at + 8]);
        u64::from_le_bytes(w)
    };
    let per_chunk = chunk.len() / ENTRY;
    let mut left = entries as usize;
    let mut at = HEADER as u64;
    while left > 0 {
        let n = left.min(per_chunk);
        let bytes = &mut chunk[..n * ENTRY];
        file.read_exact_at(bytes, at).ok()?;
        for e in bytes.chunks_exact(ENTRY) {
            let loc =
                Loc::new(u32_at(e, 16), u32_at(e, 20), u32_at(e, 24)).with_flags(u32_at(e, 28));
            found(Entry {
                primary: u64_at(e, 0),
                key: u64_at(e, 8),
                loc,
            });
        }
        at += (n * ENTRY) as u64;
        left -= n;
    }
    Some(u64::from_le_bytes(header[8..16].try_into().ok()?))
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
        let mut counted = 0;
        assert_eq!(read(&path, |n| counted = n, |e| entries.push(e)), Some(42));
        assert_eq!(counted, 1000);
        let mut expected = index.entries();
        let key = |e: &Entry| (e.primary, e.key);
        expected.sort_by_key(key);
        entries.sort_by_key(key);
        assert_eq!(entries, expected);
        assert_eq!(entries.len(), 1000);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[100] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let refused = read(&path, |_| panic!("counted"), |_| panic!("an entry handed"));
        assert_eq!(refused, None);
        assert_eq!(read(&dir.path().join("absent"), |_| {}, |_| {}), None);
        std::fs::write(&path, &bytes[..bytes.len() - 40]).unwrap();
        assert_eq!(read(&path, |_| {}, |_| {}), None, "cut short");
    }
}
