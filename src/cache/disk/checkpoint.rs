//! The index checkpoint: every entry of the index and the log position it covers, written by
//! the writer every half minute while records are written (and at a graceful stop), so that
//! a restart reads one file and scans only the log written after that position instead of
//! every segment. Written to a temporary file and renamed; one that does not check out is
//! ignored (the segments are scanned whole instead).

use std::io::{self, Write};
use std::path::Path;

use super::index::{Entry, Loc};

const MAGIC: &[u8; 8] = b"SKUACKP2";
/// magic, covered position, entry count
const HEADER: usize = 8 + 8 + 8;
/// primary key, key, segment, offset, length, flags
const ENTRY: usize = 8 + 8 + 4 + 4 + 4 + 4;

pub fn write(path: &Path, covered: u64, entries: &[Entry]) -> io::Result<()> {
    let mut out = Vec::with_capacity(HEADER + entries.len() * ENTRY + 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&covered.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    for e in entries {
        out.extend_from_slice(&e.primary.to_le_bytes());
        out.extend_from_slice(&e.key.to_le_bytes());
        out.extend_from_slice(&e.loc.seg.to_le_bytes());
        out.extend_from_slice(&e.loc.offset.to_le_bytes());
        out.extend_from_slice(&e.loc.len.to_le_bytes());
        out.extend_from_slice(&e.loc.flags().to_le_bytes());
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    let temp = path.with_extension(format!("tmp.{}", std::process::id()));
    let result = crate::cache::files::create_fresh(&temp)
        .and_then(|mut f| f.write_all(&out))
        .and_then(|_| std::fs::rename(&temp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

/// The covered position and the entries, or `None` if there is no checkpoint that checks out.
pub fn read(path: &Path) -> Option<(u64, Vec<Entry>)> {
    let mut bytes = Vec::new();
    let mut file = crate::cache::files::open_regular(path).ok()?;
    io::Read::read_to_end(&mut file, &mut bytes).ok()?;
    if bytes.len() < HEADER + 4 || &bytes[..8] != MAGIC {
        return None;
    }
    let (content, crc) = bytes.split_at(bytes.len() - 4);
    if crc32fast::hash(content) != u32::from_le_bytes(crc.try_into().ok()?) {
        tracing::warn!("the disk cache checkpoint is damaged; scanning every segment instead");
        return None;
    }
    let covered = u64::from_le_bytes(content[8..16].try_into().ok()?);
    let count = usize::try_from(u64::from_le_bytes(content[16..24].try_into().ok()?)).ok()?;
    if content.len() != HEADER + count.checked_mul(ENTRY)? {
        return None;
    }
    let u32_at = |b: &[u8], at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let entries = content[HEADER..]
        .chunks_exact(ENTRY)
        .map(|e| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&e[..8]);
            let primary = u64::from_le_bytes(w);
            w.copy_from_slice(&e[8..16]);
            let key = u64::from_le_bytes(w);
            let loc =
                Loc::new(u32_at(e, 16), u32_at(e, 20), u32_at(e, 24)).with_flags(u32_at(e, 28));
            Entry { primary, key, loc }
        })
        .collect();
    Some((covered, entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_round_trips_and_a_damaged_one_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.ckpt");
        let entries: Vec<Entry> = (0..1000u64)
            .map(|i| Entry {
                primary: i * 3,
                key: i * 7,
                loc: Loc::new(i as u32 % 5, i as u32 * 8, 100).with_flags(i as u32),
            })
            .collect();
        write(&path, 42, &entries).unwrap();
        assert_eq!(read(&path), Some((42, entries)));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[100] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(read(&path), None);
        assert_eq!(read(&dir.path().join("absent")), None);
    }
}
