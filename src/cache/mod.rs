//! The cache: its key, its storage policy, Vary handling and its storage tiers. It owns what
//! is stored and how it is found and invalidated; it does not see requests or origins (that is
//! `proxy`) nor where purges come from (that is `purge`).

pub mod key;
pub mod memory;
pub mod policy;
pub mod status;
pub mod vary;

use key::{CacheUrl, Scheme};
use memory::MemoryTier;

/// What an invalidation does to the objects it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PurgeMode {
    /// Remove them.
    Delete,
    /// Keep them but mark them stale, so the next request revalidates (soft purge).
    Expire,
}

/// The storage tiers of one Skua process, shared by every request for its lifetime.
pub struct Store {
    pub memory: MemoryTier,
}

impl Store {
    pub fn new(memory_bytes: u64) -> Store {
        Store {
            memory: MemoryTier::new(memory_bytes),
        }
    }

    /// Invalidates every variant of `url` under both schemes, in every tier. Returns how many
    /// objects were affected.
    pub fn invalidate(&self, url: &CacheUrl, mode: PurgeMode) -> usize {
        [Scheme::Http, Scheme::Https]
            .into_iter()
            .map(|scheme| {
                let primary = url.with_scheme(scheme).primary_hash();
                match mode {
                    PurgeMode::Delete => self.memory.purge_all(&primary),
                    PurgeMode::Expire => self.memory.expire_all(&primary),
                }
            })
            .sum()
    }
}
