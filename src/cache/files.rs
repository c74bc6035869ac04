//! Opening files in directories an operator or another process can also write to (the disk
//! tier's, where the bans file and the purge bus position live too): never through a symbolic
//! link, never blocking on a FIFO or device left in place of a file, and temporary files
//! created afresh, so nothing written there can be redirected elsewhere.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Opens an existing regular file for reading. A symbolic link fails to open (`O_NOFOLLOW`),
/// a FIFO or device opens without waiting (`O_NONBLOCK`) and is then refused: both are
/// `InvalidData`, which callers treat as damage.
pub fn open_regular(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                io::Error::new(io::ErrorKind::InvalidData, "a symbolic link, not a file")
            } else {
                e
            }
        })?;
    regular(file)
}

/// `file` if it is a regular file, else `InvalidData` (a FIFO or device opened where a cache
/// file belongs).
pub fn regular(file: File) -> io::Result<File> {
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a regular file",
        ));
    }
    Ok(file)
}

/// Reads a whole regular file as text (see [`open_regular`]).
pub fn read_regular(path: &Path) -> io::Result<String> {
    let mut text = String::new();
    io::Read::read_to_string(&mut open_regular(path)?, &mut text)?;
    Ok(text)
}

/// Creates `path` for writing, which must not exist yet (`O_EXCL`, not following a link). A
/// leftover of an earlier run (or anything planted there) is unlinked first: unlinking removes
/// a link itself, never what it points to.
pub fn create_fresh(path: &Path) -> io::Result<File> {
    let open = || {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
    };
    match open() {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            std::fs::remove_file(path)?;
            open()
        }
        other => other,
    }
}

/// Appends `bytes` to the regular file `path` in one write (`O_APPEND`), creating it if need
/// be; a link is not followed and anything but a regular file is refused (a FIFO without a
/// reader fails to open instead of blocking).
pub fn append(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let mut file = regular(file)?;
    io::Write::write_all(&mut file, bytes)
}

/// Writes `bytes` to `path` through a fresh temporary `temp` and a rename, so a reader sees
/// the old file or the new one, and a link at either name is replaced, not followed.
pub fn replace(path: &Path, temp: &Path, bytes: &[u8]) -> io::Result<()> {
    replace_with(path, temp, |f| io::Write::write_all(f, bytes))
}

/// [`replace`] for a secret a crash must not lose: readable by Skua's user alone, and the
/// bytes and the rename synced to the disk before it returns.
pub fn replace_secret(path: &Path, temp: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    replace_with(path, temp, |f| {
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        io::Write::write_all(f, bytes)?;
        f.sync_all()
    })?;
    match path.parent() {
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

fn replace_with(
    path: &Path,
    temp: &Path,
    write: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<()> {
    let result = create_fresh(temp)
        .and_then(|mut f| write(&mut f))
        .and_then(|_| std::fs::rename(temp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(temp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_and_fifos_are_refused_and_a_planted_temporary_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        assert_eq!(
            open_regular(&link).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        assert_eq!(
            open_regular(&fifo).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        // A temporary name holding a link to the victim: written through, the victim changes.
        replace(&dir.path().join("out"), &link, b"new").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("out")).unwrap(),
            "new"
        );
    }
}
