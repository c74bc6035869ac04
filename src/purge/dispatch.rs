//! One purge, whatever sent it: what it names ([`Scope`]), whether it deletes or marks stale
//! ([`PurgeMode`]), where it came from ([`Source`]) and when it was accepted. Every source
//! (HTTP PURGE, HTCP CLR, the admin API, the purge bus) builds a [`Purge`] and hands it to
//! [`Purger::apply`], the one place that applies it to every tier and publishes it to the
//! fleet. The sources own parsing and authorisation; this file owns the dispatch.

use std::sync::Arc;
use std::time::SystemTime;

use super::bus::{Bus, Target};
use super::handover::Relay;
use crate::cache::bans::ban_path;
use crate::cache::key::CacheUrl;
use crate::cache::{PurgeMode, Store};
use crate::metrics::top::RecentPurge;
use crate::metrics::Metrics;

/// Where a purge came from: a metric label and the rule for publishing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `PURGE` on the proxy port (`$wgCdnServers`).
    Http,
    /// An HTCP CLR datagram (`$wgHTCPRouting`).
    Htcp,
    /// `POST /purge` on the admin port.
    Admin,
    /// Published by another node.
    Bus,
    /// Taken by the process this one took over from, during a zero-downtime upgrade.
    Handover,
}

impl Source {
    pub const ALL: [Source; 5] = [
        Source::Http,
        Source::Htcp,
        Source::Admin,
        Source::Bus,
        Source::Handover,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Source::Http => "http",
            Source::Htcp => "htcp",
            Source::Admin => "admin",
            Source::Bus => "bus",
            Source::Handover => "handover",
        }
    }
}

/// What became of a purge request: the `result` label of `skua_purges_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PurgeResult {
    /// Applied, and something was affected.
    Purged,
    /// Applied; nothing stored matched.
    NotFound,
    /// Refused: the sender may not purge.
    Denied,
    /// Refused: the request or packet could not be read.
    Invalid,
    /// Not applied: the same purge was already waiting (HTCP storms).
    Deduplicated,
}

impl PurgeResult {
    pub const ALL: [PurgeResult; 5] = [
        PurgeResult::Purged,
        PurgeResult::NotFound,
        PurgeResult::Denied,
        PurgeResult::Invalid,
        PurgeResult::Deduplicated,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PurgeResult::Purged => "purged",
            PurgeResult::NotFound => "not_found",
            PurgeResult::Denied => "denied",
            PurgeResult::Invalid => "invalid",
            PurgeResult::Deduplicated => "deduplicated",
        }
    }

    /// The result of a purge applied with `affected` objects affected.
    pub fn applied(affected: usize) -> PurgeResult {
        if affected > 0 {
            PurgeResult::Purged
        } else {
            PurgeResult::NotFound
        }
    }
}

/// What a purge names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every variant of one URL, under both schemes.
    Url(CacheUrl),
    /// Every object carrying any of these surrogate keys.
    Tags(Vec<String>),
    /// Everything under this URL's host and path (a ban).
    Prefix(CacheUrl),
}

impl Scope {
    /// `scope` with every URL in it passed through `canonical` (host aliases).
    pub fn map_urls(self, canonical: impl Fn(CacheUrl) -> CacheUrl) -> Scope {
        match self {
            Scope::Url(url) => Scope::Url(canonical(url)),
            Scope::Prefix(url) => Scope::Prefix(canonical(url)),
            tags => tags,
        }
    }

    /// What the scope names, for replies and logs.
    pub fn describe(&self) -> String {
        match self {
            Scope::Url(url) => url.primary(),
            Scope::Tags(tags) => format!("tags {}", tags.join(" ")),
            Scope::Prefix(url) => format!("ban {}{}", url.host, ban_path(url)),
        }
    }
}

/// One purge, ready to apply.
#[derive(Debug, Clone)]
pub struct Purge {
    pub scope: Scope,
    pub mode: PurgeMode,
    pub source: Source,
    /// When it was accepted (by this node, or by the node that published it).
    pub at: SystemTime,
}

impl Purge {
    /// A purge accepted now.
    pub fn new(scope: Scope, mode: PurgeMode, source: Source) -> Purge {
        Purge {
            scope,
            mode,
            source,
            at: SystemTime::now(),
        }
    }
}

/// Applies purges to this node's tiers and publishes them to the fleet.
#[derive(Clone)]
pub struct Purger {
    pub store: &'static Store,
    pub bus: Option<Arc<Bus>>,
    /// Where the dashboard's recent purges are kept.
    pub(super) metrics: Arc<Metrics>,
    /// The other process of a zero-downtime upgrade, while one runs.
    pub relay: Option<Arc<Relay>>,
}

impl Purger {
    pub fn new(store: &'static Store, bus: Option<Arc<Bus>>, metrics: Arc<Metrics>) -> Purger {
        Purger {
            store,
            bus,
            metrics,
            relay: None,
        }
    }

    /// As [`Purger::new`], relaying what it applies to the other process of an upgrade.
    pub fn relaying(mut self, relay: Arc<Relay>) -> Purger {
        self.relay = Some(relay);
        self
    }

    /// Applies `purge` to every tier, then publishes it unless it came from the bus (or from
    /// HTCP where `publish_htcp` is off), and relays it to the other process of a zero-downtime
    /// upgrade while one runs ([`Relay::relay`]). An HTTP or admin purge returns once the bus
    /// has stored it ([`Bus::stored`]). Returns how many objects were affected here; a ban
    /// counts as one.
    pub async fn apply(&self, purge: &Purge) -> usize {
        let store = self.store;
        let affected = match &purge.scope {
            Scope::Url(url) => store.invalidate(url, purge.mode).await,
            Scope::Tags(tags) => {
                let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
                store.invalidate_tags(&tags, purge.mode).await
            }
            Scope::Prefix(url) => {
                store.ban(url).await;
                1
            }
        };
        let mut published = None;
        if let Some(bus) = self.bus.as_ref().filter(|b| b.publishes(purge.source)) {
            let target = match &purge.scope {
                Scope::Url(url) => Target::Url { url: url.primary() },
                Scope::Tags(tags) => Target::Tags { tags: tags.clone() },
                Scope::Prefix(url) => Target::Prefix { url: url.primary() },
            };
            published = bus.publish(target, purge.mode).map(|waiter| (bus, waiter));
        }
        if let Some(relay) = &self.relay {
            relay.relay(purge).await;
        }
        // An answered HTTP or admin purge is one the fleet gets even if this node dies next:
        // its answer waits for the stream to have stored it. HTCP has no answer to hold, and
        // waiting would hold back the next packet.
        if let Some((bus, waiter)) = published {
            if matches!(purge.source, Source::Http | Source::Admin) {
                bus.stored(waiter).await;
            }
        }
        self.metrics.top.purged(RecentPurge {
            what: purge.scope.describe(),
            source: purge.source.as_str(),
            at: crate::metrics::top::unix_seconds(SystemTime::now()),
            objects: Some(affected as u64),
        });
        affected
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: the dashboard's history kept a list of source names of its own, which left
    /// out `handover`: those purges were in `/metrics` but never charted.
    #[test]
    fn the_dashboard_charts_every_purge_source() {
        assert_eq!(
            Source::ALL.map(Source::as_str),
            crate::metrics::history::PURGE_SOURCES
        );
    }
}
