//! The disk tier's `key` file: the secret its records' primary keys were hashed with
//! ([`crate::cache::keyhash`]). Without it the records cannot be found again (the tier keeps
//! no URLs), so it is written, and made durable, before the first record, and a tier whose
//! file is missing or damaged starts empty.
//!
//! Layout: magic `SKUAKEY1`, the 16-byte secret, a CRC-32 of both (little-endian): 28 bytes.

use std::io;
use std::path::Path;

use crate::cache::files;
use crate::cache::keyhash::KeySecret;

const MAGIC: &[u8; 8] = b"SKUAKEY1";
const LEN: usize = 8 + 16 + 4;
pub const NAME: &str = "key";

/// The secret in `dir`, or `None` when there is no key file or it is not a whole, intact one
/// (a link or a FIFO in its place counts as damage: [`files::open_regular`]).
pub fn read(dir: &Path) -> io::Result<Option<KeySecret>> {
    let mut bytes = Vec::with_capacity(LEN);
    match files::open_regular(&dir.join(NAME)) {
        Ok(mut file) => io::Read::read_to_end(&mut file, &mut bytes)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::InvalidData => return Ok(None),
        Err(e) => return Err(e),
    };
    let Ok(bytes) = <[u8; LEN]>::try_from(bytes.as_slice()) else {
        return Ok(None);
    };
    let (body, crc) = bytes.split_at(LEN - 4);
    if &body[..8] != MAGIC || crc32fast::hash(body).to_le_bytes() != crc {
        return Ok(None);
    }
    let mut secret = [0u8; 16];
    secret.copy_from_slice(&body[8..]);
    Ok(Some(KeySecret(secret)))
}

/// Writes `secret` to `dir` durably and readable by Skua's user alone (whoever reads it could
/// pick URLs that share a key): a crash leaves the old file or the new one, whole.
pub fn write(dir: &Path, secret: KeySecret) -> io::Result<()> {
    let mut bytes = Vec::with_capacity(LEN);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&secret.0);
    bytes.extend_from_slice(&crc32fast::hash(&bytes).to_le_bytes());
    let temporary = dir.join(format!(".{NAME}.tmp"));
    files::replace_secret(&dir.join(NAME), &temporary, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_secret_reads_back_and_damage_reads_as_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), None);
        let secret = KeySecret([7; 16]);
        write(dir.path(), secret).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Some(secret));
        let path = dir.path().join(NAME);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[10] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(read(dir.path()).unwrap(), None);
        std::fs::write(&path, &bytes[..LEN - 1]).unwrap();
        assert_eq!(read(dir.path()).unwrap(), None);
        // A link in its place is not followed, and writing replaces the link itself.
        let elsewhere = dir.path().join("elsewhere");
        write(dir.path(), secret).unwrap();
        std::fs::rename(&path, &elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &path).unwrap();
        let kept = std::fs::read(&elsewhere).unwrap();
        assert_eq!(read(dir.path()).unwrap(), None);
        write(dir.path(), KeySecret([8; 16])).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Some(KeySecret([8; 16])));
        assert_eq!(
            std::fs::read(&elsewhere).unwrap(),
            kept,
            "the link's target is left alone"
        );
    }
}
