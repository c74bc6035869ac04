//! On-disk layout of one stored object: two files in `objects/<first byte of the key>/`.
//!
//! - `<key>-<slot>-<gen>.body`: the body bytes, written once under a temporary name and renamed
//!   into place. `gen` is unique per write, so a file name is never reused and a late unlink of
//!   an evicted generation can never remove a newer one.
//! - `<key>-<slot>.meta`: which body generation is current, its length and CRC-32, and
//!   pingora's serialized `CacheMeta`, followed by a CRC-32 of everything before it. Replaced
//!   atomically (temporary file + rename) on every store, 304 refresh and soft purge, so
//!   refreshing metadata never rewrites the body.
//!
//! A reader trusts nothing it has not checked: a meta file whose checksum or length is wrong,
//! or a body whose length or checksum disagrees with its meta, is corrupt.

use std::io::{self, Read};
use std::path::{Path, PathBuf};

use pingora::cache::key::HashBinary;

const META_MAGIC: &[u8; 8] = b"SKUAMET1";
/// magic, gen, body_len, body_crc, internal_len, header_len
const META_FIXED: usize = 8 + 8 + 8 + 4 + 4 + 4;
/// Meta files are small; anything larger is not one of ours.
pub const META_MAX: u64 = 1 << 20;

/// The decoded meta file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaFile {
    pub gen: u64,
    pub body_len: u64,
    pub body_crc: u32,
    /// `CacheMeta::serialize()` output.
    pub internal: Vec<u8>,
    pub header: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("not found")]
    Missing,
    #[error("corrupt: {0}")]
    Corrupt(&'static str),
    #[error(transparent)]
    Io(io::Error),
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::NotFound => ReadError::Missing,
            // A link, FIFO or device where a cache file belongs (`cache::files`).
            io::ErrorKind::InvalidData => ReadError::Corrupt("not a regular file"),
            _ => ReadError::Io(e),
        }
    }
}

impl MetaFile {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(META_FIXED + self.internal.len() + self.header.len() + 4);
        out.extend_from_slice(META_MAGIC);
        out.extend_from_slice(&self.gen.to_le_bytes());
        out.extend_from_slice(&self.body_len.to_le_bytes());
        out.extend_from_slice(&self.body_crc.to_le_bytes());
        out.extend_from_slice(&(self.internal.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.header.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.internal);
        out.extend_from_slice(&self.header);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<MetaFile, ReadError> {
        if bytes.len() < META_FIXED + 4 {
            return Err(ReadError::Corrupt("meta file truncated"));
        }
        let (content, crc) = bytes.split_at(bytes.len() - 4);
        let crc = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
        if crc32fast::hash(content) != crc {
            return Err(ReadError::Corrupt("meta checksum mismatch"));
        }
        if &content[..8] != META_MAGIC {
            return Err(ReadError::Corrupt("not a meta file"));
        }
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&content[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let u32_at = |at: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&content[at..at + 4]);
            u32::from_le_bytes(b)
        };
        let gen = u64_at(8);
        let body_len = u64_at(16);
        let body_crc = u32_at(24);
        let internal_len = u32_at(28) as usize;
        let header_len = u32_at(32) as usize;
        if META_FIXED + internal_len + header_len != content.len() {
            return Err(ReadError::Corrupt("meta lengths disagree"));
        }
        let internal = content[META_FIXED..META_FIXED + internal_len].to_vec();
        let header = content[META_FIXED + internal_len..].to_vec();
        Ok(MetaFile {
            gen,
            body_len,
            body_crc,
            internal,
            header,
        })
    }
}

pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

pub fn unhex(s: &str) -> Option<HashBinary> {
    if s.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The slot part of a file name: `0` for the primary slot, else the variance in hex.
pub fn slot_name(slot: Option<&HashBinary>) -> String {
    slot.map_or_else(|| "0".to_string(), |v| hex(v))
}

pub fn parse_slot(s: &str) -> Option<Option<HashBinary>> {
    if s == "0" {
        Some(None)
    } else {
        unhex(s).map(Some)
    }
}

/// Where one object's files live.
#[derive(Debug, Clone)]
pub struct ObjectPaths {
    pub dir: PathBuf,
    pub stem: String,
}

impl ObjectPaths {
    pub fn new(objects: &Path, primary: &HashBinary, slot: Option<&HashBinary>) -> ObjectPaths {
        ObjectPaths {
            dir: objects.join(format!("{:02x}", primary[0])),
            stem: format!("{}-{}", hex(primary), slot_name(slot)),
        }
    }

    pub fn meta(&self) -> PathBuf {
        self.dir.join(format!("{}.meta", self.stem))
    }

    pub fn body(&self, gen: u64) -> PathBuf {
        self.dir.join(format!("{}-{gen:016x}.body", self.stem))
    }

    /// A temporary name no other writer (this process or another sharing the directory during
    /// an upgrade) can be using.
    pub fn temp(&self, what: &str, unique: u64) -> PathBuf {
        self.dir.join(format!(
            ".{}.{what}.{}.{unique:016x}.tmp",
            self.stem,
            std::process::id()
        ))
    }
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, then rename.
pub fn write_atomic(path: &Path, temp: &Path, bytes: &[u8]) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    crate::cache::files::replace(path, temp, bytes)
}

pub fn read_meta(path: &Path) -> Result<MetaFile, ReadError> {
    let mut f = crate::cache::files::open_regular(path)?;
    let len = f.metadata()?.len();
    if len > META_MAX {
        return Err(ReadError::Corrupt("meta file too large"));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    f.read_to_end(&mut bytes)?;
    MetaFile::decode(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_round_trip_and_damage() {
        let m = MetaFile {
            gen: 7,
            body_len: 1234,
            body_crc: 99,
            internal: b"internal".to_vec(),
            header: b"header bytes".to_vec(),
        };
        let bytes = m.encode();
        assert_eq!(MetaFile::decode(&bytes).unwrap(), m);
        for i in 0..bytes.len() {
            let mut flipped = bytes.clone();
            flipped[i] ^= 0x10;
            assert!(
                MetaFile::decode(&flipped).is_err(),
                "flip at {i} undetected"
            );
        }
        assert!(MetaFile::decode(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn names_round_trip() {
        let p = [0xab; 16];
        assert_eq!(unhex(&hex(&p)), Some(p));
        assert_eq!(parse_slot(&slot_name(None)), Some(None));
        assert_eq!(parse_slot(&slot_name(Some(&p))), Some(Some(p)));
        let paths = ObjectPaths::new(Path::new("/x"), &p, None);
        assert_eq!(
            paths.meta(),
            Path::new(&format!("/x/ab/{}-0.meta", hex(&p)))
        );
    }
}
