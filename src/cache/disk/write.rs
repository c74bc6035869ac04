//! Disk fills: the body's chunks are kept (shared with the memory tier's copy, not copied) as
//! the response streams to the client, then handed whole to the writer, which appends the
//! record with others queued at the same time and indexes it.

use bytes::Bytes;
use pingora::cache::key::HashBinary;
use tokio::sync::oneshot::Sender;

use super::index::Loc;
use super::writer::{Job, ObjectJob};
use super::{DiskTier, QUEUE_MAX};
use crate::cache::meta::ObjectMeta;

impl DiskTier {
    /// Starts collecting a fill's body for the disk.
    pub fn start_write(
        &'static self,
        primary: HashBinary,
        slot: Option<HashBinary>,
        meta: ObjectMeta,
    ) -> DiskWrite {
        DiskWrite {
            tier: self,
            primary,
            slot,
            meta: Some(meta),
            body: Vec::new(),
            len: 0,
        }
    }
}

/// A body being collected while the response streams to the client.
pub struct DiskWrite {
    tier: &'static DiskTier,
    primary: HashBinary,
    slot: Option<HashBinary>,
    /// `None` once abandoned (too large).
    meta: Option<ObjectMeta>,
    body: Vec<Bytes>,
    len: u64,
}

impl DiskWrite {
    pub fn write(&mut self, data: &Bytes) {
        if self.meta.is_none() {
            return;
        }
        self.len += data.len() as u64;
        if self.len > self.tier.config.max_object_size {
            self.meta = None;
            self.body = Vec::new();
            return;
        }
        if !data.is_empty() {
            self.body.push(data.clone());
        }
    }

    /// Hands the body to the writer and waits until it is written and indexed. Returns the
    /// bytes stored, or `None` if nothing was (too large, the writer behind, a write error).
    pub async fn finish(self) -> Option<u64> {
        let (done, written) = tokio::sync::oneshot::channel();
        self.hand_over(Some(done))?;
        let loc = written.await.ok()??;
        Some(u64::from(loc.len))
    }

    /// Hands the body to the writer without waiting for it: for a fill the memory tier holds,
    /// where lookups find it meanwhile. Its place in the writer's queue puts it before any
    /// purge made after this returns, and the writer applies a purge to everything written
    /// before it. Returns the body bytes queued, or `None` if nothing was.
    pub fn queue(self) -> Option<u64> {
        let len = self.len;
        self.hand_over(None)?;
        Some(len)
    }

    fn hand_over(self, done: Option<Sender<Option<Loc>>>) -> Option<()> {
        let tier = self.tier;
        let meta = self.meta?;
        let queued = tier.queue.add(self.len);
        if queued + self.len > QUEUE_MAX {
            tier.queue.remove(self.len);
            tier.write_failed(&std::io::Error::other(
                "the disk writer is behind; this fill is not stored on disk",
            ));
            return None;
        }
        let sent = tier.send(Job::Object(ObjectJob {
            primary: self.primary,
            slot: self.slot,
            meta,
            body: self.body,
            body_len: self.len,
            only_if: None,
            done,
        }));
        if !sent {
            tier.queue.remove(self.len);
            return None;
        }
        Some(())
    }
}
