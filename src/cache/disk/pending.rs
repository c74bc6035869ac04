//! Fills handed to the writer and not yet indexed, readable meanwhile. A fill does not wait
//! for the writer (two thread wake-ups per miss, on the proxy's core), but the requests that
//! waited on its cache lock look it up as soon as it finishes: for an object the memory tier
//! does not hold, this is where they find it, for the few milliseconds until the writer has
//! indexed it. A purge removes a URL's pending fills with its index entries.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use pingora::cache::key::HashBinary;

use crate::cache::meta::ObjectMeta;

pub struct PendingFill {
    pub meta: ObjectMeta,
    pub body: Vec<Bytes>,
    pub body_len: u64,
}

impl PendingFill {
    /// The body in one piece (a copy only if it came in several).
    pub fn whole_body(&self) -> Bytes {
        match self.body.as_slice() {
            [] => Bytes::new(),
            [one] => one.clone(),
            chunks => {
                let mut whole = BytesMut::with_capacity(self.body_len as usize);
                for chunk in chunks {
                    whole.extend_from_slice(chunk);
                }
                whole.freeze()
            }
        }
    }
}

type Slots = Vec<(Option<HashBinary>, Arc<PendingFill>)>;

#[derive(Default)]
pub struct Pending {
    by_url: Mutex<HashMap<HashBinary, Slots>>,
    /// Fills held: a lookup skips the lock when there are none.
    count: AtomicUsize,
}

impl Pending {
    fn urls(&self) -> std::sync::MutexGuard<'_, HashMap<HashBinary, Slots>> {
        self.by_url
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn insert(&self, primary: HashBinary, slot: Option<HashBinary>, fill: Arc<PendingFill>) {
        let mut urls = self.urls();
        let slots = urls.entry(primary).or_default();
        match slots.iter_mut().find(|(s, _)| *s == slot) {
            Some(held) => held.1 = fill,
            None => {
                slots.push((slot, fill));
                self.count.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn get(&self, primary: &HashBinary, slot: Option<&HashBinary>) -> Option<Arc<PendingFill>> {
        if self.count.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let urls = self.urls();
        let slots = urls.get(primary)?;
        let (_, fill) = slots.iter().find(|(s, _)| s.as_ref() == slot)?;
        Some(fill.clone())
    }

    /// Whether the slot has a pending fill (no `Arc` taken: a fast hit's check).
    pub fn has(&self, primary: &HashBinary, slot: Option<&HashBinary>) -> bool {
        self.count.load(Ordering::Relaxed) > 0
            && self
                .urls()
                .get(primary)
                .is_some_and(|slots| slots.iter().any(|(s, _)| s.as_ref() == slot))
    }

    /// Whether any variant of `primary` is pending.
    pub fn holds(&self, primary: &HashBinary) -> bool {
        self.count.load(Ordering::Relaxed) > 0 && self.urls().contains_key(primary)
    }

    /// Removes `fill` once the writer is done with it (a later fill of the slot stays).
    pub fn remove(&self, primary: &HashBinary, slot: Option<&HashBinary>, fill: &Arc<PendingFill>) {
        let mut urls = self.urls();
        let Some(slots) = urls.get_mut(primary) else {
            return;
        };
        let before = slots.len();
        slots.retain(|(s, f)| !(s.as_ref() == slot && Arc::ptr_eq(f, fill)));
        self.count
            .fetch_sub(before - slots.len(), Ordering::Relaxed);
        if slots.is_empty() {
            urls.remove(primary);
        }
    }

    /// Removes every pending fill of a URL (a purge); returns how many there were.
    pub fn remove_all(&self, primary: &HashBinary) -> usize {
        if self.count.load(Ordering::Relaxed) == 0 {
            return 0;
        }
        let Some(slots) = self.urls().remove(primary) else {
            return 0;
        };
        self.count.fetch_sub(slots.len(), Ordering::Relaxed);
        slots.len()
    }
}
