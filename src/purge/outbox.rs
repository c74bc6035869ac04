//! The purge bus's outbox: the file a process keeps the purges it has queued and not yet
//! published in, so that they outlive it, and the taking over of the files other processes of
//! the node left. It does not decide when a purge is written or published (that is `bus`).
//!
//! Each process writes a file of its own, `bus-outbox.<node>.<started>-<pid>`, and holds a
//! lock on it (`flock`) for as long as it runs; the kernel lets the lock go when the process
//! ends, however it ends. A file whose lock is free belongs to no running process, and another
//! process of the node takes its purges over: at start, and every [`ADOPT_EVERY`] after.
//! Regression: the processes of a node shared one file. During a zero-downtime upgrade, a
//! purge the old process took while nats-server was unreachable was written after the new
//! process had read the file at its start; the new process published what it had read and
//! removed the file, and the old one exited before nats-server was back: no node ever
//! applied that purge.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::bus::PurgeEvent;

/// How often a running process looks for outbox files other processes of its node left.
pub const ADOPT_EVERY: Duration = Duration::from_secs(1);

/// This process's outbox file, locked while the process runs.
pub struct Outbox {
    dir: PathBuf,
    node: String,
    path: PathBuf,
    file: File,
}

impl Outbox {
    /// Makes this process's file in `dir` and locks it. `started_ms` (when this process
    /// started) tells its file from those of earlier processes of `node` with the same pid.
    pub fn create(dir: &Path, node: &str, started_ms: u64) -> std::io::Result<Outbox> {
        let path = dir.join(format!(
            "{}{started_ms}-{}",
            file_prefix(node),
            std::process::id()
        ));
        let file = OpenOptions::new()
            .append(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)?;
        file.try_lock().map_err(|e| match e {
            TryLockError::Error(e) => e,
            TryLockError::WouldBlock => std::io::Error::other("locked by another process"),
        })?;
        Ok(Outbox {
            dir: dir.to_path_buf(),
            node: node.to_owned(),
            path,
            file,
        })
    }

    #[cfg(test)]
    fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `events`, one JSON line each, in one write.
    pub fn write<'a>(&self, events: impl IntoIterator<Item = &'a PurgeEvent>) {
        let mut lines = Vec::new();
        for event in events {
            if serde_json::to_writer(&mut lines, event).is_ok() {
                lines.push(b'\n');
            }
        }
        if lines.is_empty() {
            return;
        }
        if let Err(e) = (&self.file).write_all(&lines) {
            tracing::warn!(error = %e, file = %self.path.display(), "could not keep queued purges in the outbox");
        }
    }

    /// Empties the file: everything written to it is published.
    pub fn clear(&self) {
        if let Err(e) = self.file.set_len(0) {
            tracing::warn!(error = %e, file = %self.path.display(), "could not empty the outbox");
        }
    }

    /// Takes over the outbox files of this node that no running process holds (earlier runs,
    /// the other process of an upgrade once it has exited, and the one shared file of
    /// versions before this one): their purges are written to this process's file, then
    /// their files removed. Returns those purges, each once.
    pub fn adopt_orphans(&self) -> Vec<PurgeEvent> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut adopted = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path == self.path || !is_outbox_of(&entry.file_name(), &self.node) {
                continue;
            }
            // Held until the file is removed: a process that opened it meanwhile finds it
            // unlinked once it has the lock.
            let Some((_held, events)) = take(&path) else {
                continue;
            };
            let events: Vec<PurgeEvent> = events
                .into_iter()
                .filter(|e| seen.insert(e.id.clone()))
                .collect();
            if !events.is_empty() {
                tracing::info!(purges = events.len(), file = %path.display(), "taking over purges another process of this node queued and did not publish");
            }
            self.write(&events);
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(error = %e, file = %path.display(), "could not remove an outbox taken over; its purges will be published again");
            }
            adopted.extend(events);
        }
        adopted
    }
}

/// The purges in the outbox file at `path` and the file, locked, if no running process holds
/// it and no other process has taken it over already.
fn take(path: &Path) -> Option<(File, Vec<PurgeEvent>)> {
    let mut file = crate::cache::files::open_regular(path).ok()?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => return None,
        Err(TryLockError::Error(e)) => {
            tracing::warn!(error = %e, file = %path.display(), "could not lock an outbox file");
            return None;
        }
    }
    // Another process took it over and removed it between our open and our lock.
    if file.metadata().ok()?.nlink() == 0 {
        return None;
    }
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    let events = parse(&text);
    Some((file, events))
}

/// One JSON event a line; a line that does not parse (cut short by a crash) is skipped.
fn parse(text: &str) -> Vec<PurgeEvent> {
    text.lines()
        .filter_map(|line| serde_json::from_str::<PurgeEvent>(line).ok())
        .collect()
}

fn file_prefix(node: &str) -> String {
    format!("bus-outbox.{node}.")
}

/// Whether `name` is an outbox file of `node`: `bus-outbox.<node>.<started>-<pid>`, or the one
/// file earlier versions shared, `bus-outbox.<node>`. Another node's name that begins with
/// this one's and a dot (`a.b` beside `a`) is not taken for one of `a`'s.
fn is_outbox_of(name: &std::ffi::OsStr, node: &str) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    if name.strip_prefix("bus-outbox.") == Some(node) {
        return true;
    }
    let Some(rest) = name.strip_prefix(&file_prefix(node)) else {
        return false;
    };
    rest.split_once('-').is_some_and(|(started, pid)| {
        !started.is_empty()
            && !pid.is_empty()
            && started.bytes().all(|b| b.is_ascii_digit())
            && pid.bytes().all(|b| b.is_ascii_digit())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::purge::bus::Target;

    fn event(id: &str) -> PurgeEvent {
        PurgeEvent {
            id: id.into(),
            node: "a".into(),
            at_us: 1,
            target: Target::Url {
                url: "http://wiki.test/wiki/A".into(),
            },
            soft: false,
        }
    }

    #[test]
    fn outbox_names_are_told_apart_by_node() {
        let of = |name: &str, node: &str| is_outbox_of(std::ffi::OsStr::new(name), node);
        assert!(of("bus-outbox.a.1700000000000-42", "a"));
        assert!(of("bus-outbox.a", "a"));
        assert!(!of("bus-outbox.a.b.1700000000000-42", "a"));
        assert!(of("bus-outbox.a.b.1700000000000-42", "a.b"));
        assert!(!of("bus-outbox.ab.1-2", "a"));
        assert!(!of("bus-outbox.a.1-", "a"));
        assert!(!of("bus-outbox.a.x-2", "a"));
        assert!(!of("bus-position.a", "a"));
    }

    #[test]
    fn a_locked_outbox_is_left_to_its_process_and_a_free_one_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let mine = Outbox::create(dir.path(), "a", 2).unwrap();
        let running = Outbox::create(dir.path(), "a", 1).unwrap();
        running.write([&event("a-1-0")]);
        assert!(mine.adopt_orphans().is_empty(), "its process still runs");
        // An earlier run's file: nobody holds its lock.
        std::fs::write(
            dir.path().join("bus-outbox.a.0-1"),
            format!(
                "{}\n{{\"cut short",
                serde_json::to_string(&event("a-0-0")).unwrap()
            ),
        )
        .unwrap();
        drop(running);
        let adopted = mine.adopt_orphans();
        let mut ids: Vec<&str> = adopted.iter().map(|e| e.id.as_str()).collect();
        ids.sort();
        assert_eq!(ids, ["a-0-0", "a-1-0"]);
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(
            left,
            [mine.path().to_path_buf()],
            "the files taken over are gone"
        );
        let kept = parse(&std::fs::read_to_string(mine.path()).unwrap());
        assert_eq!(
            kept.len(),
            2,
            "what was taken over is kept in this process's file"
        );
        mine.clear();
        assert_eq!(std::fs::read(mine.path()).unwrap().len(), 0);
        mine.write([&event("a-2-0")]);
        assert_eq!(
            parse(&std::fs::read_to_string(mine.path()).unwrap()).len(),
            1,
            "written from the start again after clearing"
        );
    }
}
