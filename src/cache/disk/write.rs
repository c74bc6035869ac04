//! Disk fills: the body's chunks are kept (shared with the memory tier's copy, not copied) as
//! the response streams to the client, then handed whole to the writer, which appends the
//! record with others queued at the same time and indexes it. The fill does not wait for that
//! ([`super::pending`]).

use std::sync::Arc;

use bytes::Bytes;
use pingora::cache::key::HashBinary;

use super::pending::PendingFill;
use super::writer::{Job, ObjectJob};
use super::{DiskTier, QUEUE_MAX};
use crate::cache::meta::ObjectMeta;
use crate::cache::tags::Tier;

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

    /// Hands the body to the writer without waiting for it. Lookups find it meanwhile in the
    /// memory tier or, with `readable` (a fill the memory tier does not hold), among the
    /// tier's pending fills. Its place in the writer's queue puts it before any purge made
    /// after this returns, and the writer applies a purge to everything written before it.
    /// Returns the body bytes queued, or `None` if nothing was (then the tags the fill
    /// recorded for the disk tier are forgotten, as the writer does when it stores nothing).
    pub fn queue(self, readable: bool) -> Option<u64> {
        let tier = self.tier;
        let meta = self.meta?;
        let pending = readable.then(|| {
            let fill = Arc::new(PendingFill {
                meta: meta.clone(),
                body: self.body.clone(),
                body_len: self.len,
            });
            tier.pending.insert(self.primary, self.slot, fill.clone());
            fill
        });
        let queued = tier.queue.add(self.len);
        let forget = |tier: &DiskTier| {
            if let Some(fill) = &pending {
                tier.pending.remove(&self.primary, self.slot.as_ref(), fill);
            }
            if !tier.holds(&self.primary) {
                tier.tags.forget(&self.primary, Tier::Disk);
            }
        };
        if queued + self.len > QUEUE_MAX {
            forget(tier);
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
            refreshed: false,
            done: None,
            pending: pending.clone(),
        }));
        if !sent {
            forget(tier);
            tier.queue.remove(self.len);
            return None;
        }
        Some(self.len)
    }
}
