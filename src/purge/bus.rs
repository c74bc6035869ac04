//! The fleet's purge bus on NATS JetStream. Every purge this node accepts (HTTP, HTCP, admin)
//! is applied here first and then published once; every node reads the stream through a
//! durable consumer named after its node id and applies what the others published, never
//! publishing it again. It does not decide what a purge removes (that is `cache`).
//!
//! Consistency is weak and eventual, with these bounds:
//! - connected: a purge reaches every node in about one NATS round trip plus the apply time
//!   (`skua_purge_reach_seconds`); an HTTP or admin purge is answered once the stream has
//!   stored it ([`Bus::stored`]), so the node that took it may die the moment after;
//! - a purge lost on its way to a node (nats-server stopped with it unsent) shows as a stream
//!   sequence skipped, at the next purge or, with none, within 0.3 s: the node fetches it by
//!   sequence (`skua_purge_bus_refetched_total`), and a pull that stalled is made again
//!   ([`QUIET_CHECK`]);
//! - a node that was down or cut off replays what it missed before it trusts any object cached
//!   before the gap (it stores its last applied sequence beside its disk cache); if the stream
//!   no longer holds that position (the gap is older than the retention), every object cached
//!   before then is revalidated with the origin before it is served again;
//! - the bus down: each node applies its own purges and queues them; they reach the others
//!   once the client has reconnected, in a round trip (an acknowledgement lost with the old
//!   connection is not waited for; the message ids store a batch sent twice once). The queue is
//!   also written to an outbox file in `outbox_dir`, or beside the disk tier, until it is
//!   published, so a node restarted during the outage still publishes what it took, as does
//!   the other process of an upgrade when one exits with purges unpublished (`outbox`). The
//!   queue is bounded (`max_queued`): a purge past it is not queued, and once the queue is
//!   published the others revalidate everything they cached before ([`Target::Distrust`]).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, consumer, stream};
use async_trait::async_trait;
use futures::StreamExt;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::outbox::{Outbox, ADOPT_EVERY};
use super::{Purge, PurgeResult, Purger, Scope, Source};
use crate::cache::key::CacheUrl;
use crate::cache::{PurgeMode, Store};
use crate::config::{BusAuth, BusConfig};
use crate::metrics::Metrics;

/// One purge as it travels on the bus (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurgeEvent {
    /// Unique per purge; also the JetStream message id, so a publish retried after a lost
    /// acknowledgement is stored once.
    pub id: String,
    /// The node that accepted it.
    pub node: String,
    /// When that node accepted it, Unix microseconds.
    pub at_us: u64,
    #[serde(flatten)]
    pub target: Target,
    /// A soft purge: mark stale instead of removing.
    #[serde(default)]
    pub soft: bool,
}

/// What a purge names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Target {
    /// One URL (every variant, both schemes).
    Url { url: String },
    /// Every object carrying any of these surrogate keys.
    Tags { tags: Vec<String> },
    /// Everything under this URL's host and path (a ban).
    Prefix { url: String },
    /// Purges this node took were not queued (the queue held `max_queued` through a bus
    /// outage): every node revalidates what it cached before this arrives.
    Distrust,
}

impl PurgeEvent {
    /// The purge this event asks for, as a purge from the bus accepted when the publishing
    /// node accepted it; `None` when its target does not parse.
    fn to_purge(&self) -> Option<Purge> {
        let scope = match &self.target {
            Target::Url { url } => Scope::Url(CacheUrl::parse_absolute(url).ok()?),
            Target::Tags { tags } => Scope::Tags(tags.clone()),
            Target::Prefix { url } => Scope::Prefix(CacheUrl::parse_absolute(url).ok()?),
            Target::Distrust => return None,
        };
        let mode = if self.soft {
            PurgeMode::Expire
        } else {
            PurgeMode::Delete
        };
        Some(Purge {
            scope,
            mode,
            source: Source::Bus,
            at: SystemTime::UNIX_EPOCH + Duration::from_micros(self.at_us),
        })
    }
}

/// How long the stream may stay quiet before this node asks it for its last sequence: a purge
/// lost on its way here shows only as a sequence that never arrives, and with no purge after it
/// nothing else would show it. It also bounds a stalled pull. nats-server (2.9.10, Debian's)
/// now and then lets a pull request end without its `408` when a message comes in the same
/// millisecond as the request expires, and sends this consumer nothing more: seen in the purge
/// checker's fleet runs, each stall beginning at a request's expiry, the node serving pages
/// purged elsewhere until the missed heartbeats ended the consumer two seconds later. What the
/// check finds is fetched by sequence and the consumer is made again at once ([`PullStalled`]).
/// A check costs one stream-info request, made only after this long without a message.
const QUIET_CHECK: Duration = Duration::from_millis(250);

/// How long a message the stream holds may still be on its way to this node when a quiet check
/// finds it: found again after this, it was lost or the pull has stalled. Regression: acted on
/// at once, the check made every node's consumer again whenever a purge came just as the
/// checks ran (their timers run together, started by the same messages): a dozen times a
/// minute under the purge checker's load.
const IN_FLIGHT: Duration = Duration::from_millis(50);

/// How long one pull request lasts: each expiry is a chance of the stall above, which the
/// quiet check bounds.
const PULL_EXPIRES: Duration = Duration::from_secs(5);

/// The longest pause between two attempts to reach nats-server (100 ms more at each attempt
/// up to this). Purges queued through an outage reach the others once every node is back, so
/// this bounds how late they are after it. Regression: with two seconds, the purge checker's
/// fleet with nats-server stopped for 1 to 3 s every few seconds (`NATS_CHAOS=1`) got pages
/// purged during an outage from other nodes up to 0.77 s after nats-server was back, and
/// longer outages would have made it two seconds. An attempt costs a refused connection.
const RECONNECT_MAX_MS: u64 = 500;

/// Why a consumer was made again: the stream went on while it received nothing.
#[derive(Debug)]
struct PullStalled;

impl std::fmt::Display for PullStalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the stream went on while this node's pull received nothing")
    }
}

impl std::error::Error for PullStalled {}

/// How long the answer to an HTTP or admin purge waits for the stream to have stored the purge
/// (a JetStream acknowledgement, about a millisecond when connected). Once stored it reaches
/// the others even if this node dies the next moment; answered before, a node killed right
/// after its answer took the purge with it (a memory-only node for good, a disk node until it
/// was started again). Not waited for while the client is disconnected: the purge is queued
/// as through any outage.
const PUBLISH_WAIT: Duration = Duration::from_secs(1);

/// How long after start a purge's answer still waits for the client's first connection (the
/// client's own connection timeout): a node just started takes purges as soon as its port is
/// open, a moment before it reaches nats-server. Regression: such a purge was answered at once
/// and reached the others only once the node had connected (the purge checker's fleet setup,
/// a backend killed and started again: stale answers elsewhere for the 100 ms in between).
/// After that, a node that has never connected is taken as cut off.
const FIRST_CONNECT_WAIT: Duration = Duration::from_secs(2);

/// A purge waiting to be published, and who waits for the stream to have stored it.
struct Queued {
    event: PurgeEvent,
    stored: Option<oneshot::Sender<()>>,
    /// Written to the outbox file already.
    journaled: bool,
}

impl From<PurgeEvent> for Queued {
    fn from(event: PurgeEvent) -> Queued {
        Queued {
            event,
            stored: None,
            journaled: false,
        }
    }
}

/// More missing purges than this are not fetched one by one: every object cached before now is
/// revalidated instead, as for a gap beyond the retention.
const REFETCH_MAX: u64 = 10_000;

/// The handle the purge sources publish through, and the state the bus service keeps.
pub struct Bus {
    config: BusConfig,
    store: &'static Store,
    metrics: Arc<Metrics>,
    outbox: mpsc::UnboundedSender<Queued>,
    outbox_rx: Mutex<Option<mpsc::UnboundedReceiver<Queued>>>,
    /// What every event id this process makes starts with: the node and when the process
    /// started, so that ids are unique across restarts and upgrades, and a process knows its
    /// own ([`Bus::published_here`]).
    id_prefix: String,
    next_id: AtomicU64,
    /// The stream sequence of the last purge applied here (0: none yet).
    applied: AtomicU64,
    /// Where `applied` is kept across restarts: beside the disk cache whose objects it covers.
    position_file: Option<PathBuf>,
    /// Whether a position was loaded from `position_file`.
    had_position: bool,
    created: SystemTime,
    save_wanted: tokio::sync::Notify,
    /// Counts the client's connections and disconnections: a publish that failed is sent
    /// again as soon as the client is back.
    connection_changes: tokio::sync::watch::Sender<u64>,
    /// Counts the client's disconnections and reconnections: an acknowledgement awaited
    /// across one is lost with the connection it was to come on, or was owed on a connection
    /// already gone. Regression: the first connection counted too, and a purge taken before
    /// it (a node just started, or the new process of an upgrade) was taken as lost when that
    /// connection came, and published again only after a pause: other nodes served the page
    /// from before it meanwhile (the purge checker's fleet run with upgrades,
    /// `publishing purges failed` on each new process).
    disconnections: tokio::sync::watch::Sender<u64>,
    /// Whether the client has connected once: later connections are reconnections.
    connected_once: AtomicBool,
    /// Whether the client is connected now.
    connected: AtomicBool,
    /// Where purges not yet published are kept across a restart.
    outbox_file: Option<Outbox>,
    /// Whether new purges are written to `outbox_file` as they are queued: from the start
    /// until the queue has first been published whole, and again from a failed publish until
    /// the queue is empty.
    journaling: AtomicBool,
    /// Purges not queued since the last [`Target::Distrust`] was queued: the queue was full.
    dropped: AtomicU64,
    /// The other process of a zero-downtime upgrade, to which what the bus brings is relayed
    /// ([`Bus::relaying`]).
    relay: std::sync::OnceLock<Arc<super::handover::Relay>>,
}

impl Bus {
    pub fn new(config: BusConfig, store: &'static Store, metrics: Arc<Metrics>) -> Arc<Bus> {
        let (outbox, rx) = mpsc::unbounded_channel();
        let position_file = store
            .disk
            .map(|d| d.config.path.join(format!("bus-position.{}", config.node)));
        let outbox_dir = match config.outbox_dir.as_deref().map(std::fs::create_dir_all) {
            Some(Err(e)) => {
                tracing::error!(error = %e, dir = ?config.outbox_dir, "cannot make [purge.bus] outbox_dir");
                None
            }
            Some(Ok(())) => config.outbox_dir.as_deref(),
            None => store.disk.map(|d| d.config.path.as_path()),
        };
        let started_ms = unix_millis(SystemTime::now());
        let outbox_file = outbox_dir.and_then(|d| {
            Outbox::create(d, &config.node, started_ms)
                .map_err(|e| tracing::error!(error = %e, dir = %d.display(), "cannot make the purge bus's outbox file"))
                .ok()
        });
        if outbox_file.is_none() {
            tracing::warn!("no outbox for the purge bus (no disk tier, no usable [purge.bus] outbox_dir): purges this node takes while nats-server is unreachable are kept in memory only, and lost to the other nodes if it stops before they are published");
        }
        let loaded = position_file
            .as_deref()
            .and_then(|f| crate::cache::files::read_regular(f).ok())
            .and_then(|text| parse_position(&text, &config.stream));
        // Only a disk tier holds objects from before this process started; a memory-only
        // node has nothing to distrust and is ready whether or not the bus is.
        if store.disk.is_some() {
            store
                .invalidations
                .hold_until_caught_up(config.catch_up, config.catch_up_timeout);
        }
        Arc::new(Bus {
            id_prefix: format!("{}-{started_ms}-", config.node),
            config,
            store,
            metrics,
            outbox,
            outbox_rx: Mutex::new(Some(rx)),
            next_id: AtomicU64::new(0),
            applied: AtomicU64::new(loaded.unwrap_or(0)),
            had_position: loaded.is_some(),
            created: SystemTime::now(),
            save_wanted: tokio::sync::Notify::new(),
            connection_changes: tokio::sync::watch::Sender::new(0),
            disconnections: tokio::sync::watch::Sender::new(0),
            connected_once: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            position_file,
            outbox_file,
            journaling: AtomicBool::new(true),
            dropped: AtomicU64::new(0),
            relay: std::sync::OnceLock::new(),
        })
    }

    /// Relays what the bus brings to the other process of a zero-downtime upgrade, as the
    /// purges this process takes are. Regression: the bus applied its purges through a purger
    /// of its own that relayed nothing; the old process, which stops reading the bus once the
    /// new one takes the node's consumer over, served pages purged at other nodes until it
    /// exited (`tests/purge-checker/run.sh fleet` with `CHAOS_NODES=0 UPGRADES=1`: over 3,000
    /// stale answers a minute, each upgrade followed by five seconds of them).
    pub fn relaying(&self, relay: Arc<super::handover::Relay>) {
        let _ = self.relay.set(relay);
    }

    /// Whether purges from `source` go on the bus: never those that came from it, and HTCP
    /// ones only with `publish_htcp` (where multicast does not already reach every node).
    pub fn publishes(&self, source: Source) -> bool {
        match source {
            // A relayed purge was published by the old process that took it.
            Source::Bus | Source::Handover => false,
            Source::Htcp => self.config.publish_htcp,
            Source::Http | Source::Admin => true,
        }
    }

    /// Queues a purge this node has applied for publishing; never waits. Past `max_queued`
    /// the purge is not queued: once the queue is published the others are told to
    /// revalidate everything instead ([`Target::Distrust`]), which covers it. Returns what
    /// [`Bus::stored`] waits on, when the purge was queued.
    pub fn publish(&self, target: Target, mode: PurgeMode) -> Option<oneshot::Receiver<()>> {
        let event = self.event(target, mode == PurgeMode::Expire);
        let queued = usize::try_from(self.metrics.bus.unpublished.get()).unwrap_or(0);
        if queued >= self.config.max_queued {
            self.metrics.bus.dropped.inc();
            if self.dropped.fetch_add(1, Ordering::AcqRel) == 0 {
                // A restart before the queue is published still tells the others.
                self.journal([&self.event(Target::Distrust, false)]);
            }
            return None;
        }
        // Cut off from nats-server, a purge is kept at once. Regression: it was written only
        // once a publish failed, which takes the acknowledgement's timeout (five seconds)
        // when the connection dropped before the publish began; a node killed meanwhile lost
        // it, and no node ever applied it (the purge checker's fleet with nats-server and a
        // backend stopped now and then: a page served from before its edit to the end).
        let journaled =
            self.journaling.load(Ordering::Acquire) || !self.connected.load(Ordering::Acquire);
        if journaled {
            self.journaling.store(true, Ordering::Release);
            self.journal([&event]);
        }
        let (stored, waiter) = oneshot::channel();
        let queued = Queued {
            event,
            stored: Some(stored),
            journaled,
        };
        if self.outbox.send(queued).is_err() {
            return None;
        }
        self.metrics.bus.unpublished.inc();
        Some(waiter)
    }

    /// Waits, at most [`PUBLISH_WAIT`], until the stream has stored a purge [`Bus::publish`]
    /// queued; not at all while the client is disconnected (unless it is still making its
    /// first connection, [`FIRST_CONNECT_WAIT`]), and no longer once it disconnects. Returns
    /// whether it was stored.
    pub async fn stored(&self, waiter: oneshot::Receiver<()>) -> bool {
        let mut disconnections = self.disconnections.subscribe();
        disconnections.mark_unchanged();
        if !self.connected.load(Ordering::Acquire) {
            let starting = !self.connected_once.load(Ordering::Acquire)
                && self.created.elapsed().unwrap_or_default() < FIRST_CONNECT_WAIT;
            if !starting {
                return false;
            }
        }
        tokio::select! {
            stored = tokio::time::timeout(PUBLISH_WAIT, waiter) => matches!(stored, Ok(Ok(()))),
            _ = disconnections.changed() => false,
        }
    }

    fn event(&self, target: Target, soft: bool) -> PurgeEvent {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        PurgeEvent {
            id: format!("{}{n}", self.id_prefix),
            node: self.config.node.clone(),
            at_us: unix_micros(SystemTime::now()),
            target,
            soft,
        }
    }

    /// Appends `events` to the outbox file.
    fn journal<'a>(&self, events: impl IntoIterator<Item = &'a PurgeEvent>) {
        if let Some(outbox) = &self.outbox_file {
            outbox.write(events);
        }
    }

    /// Applies one event published by another node, through the same dispatch as every
    /// other purge source.
    async fn apply(&self, event: &PurgeEvent) -> PurgeResult {
        if event.target == Target::Distrust {
            tracing::warn!(node = %event.node, "a node could not queue every purge it took while the bus was down");
            self.distrust_everything_cached();
            return PurgeResult::Purged;
        }
        let Some(purge) = event.to_purge() else {
            return PurgeResult::Invalid;
        };
        let mut purger = Purger::new(self.store, None, self.metrics.clone());
        if let Some(relay) = self.relay.get() {
            purger = purger.relaying(relay.clone());
        }
        let result = PurgeResult::applied(purger.apply(&purge).await);
        (self.metrics.top).node_seen(&event.node, SystemTime::now(), purge.at);
        result
    }

    /// Whether this process published `event`.
    fn published_here(&self, event: &PurgeEvent) -> bool {
        event.node == self.config.node && event.id.starts_with(&self.id_prefix)
    }

    /// Saves the position reached. Returns false when it must wait: while the disk index is
    /// loading, a purge applied here may name copies the listing has not reached yet, which
    /// are unlinked only when it does; a position saved before then could skip the purge at
    /// the next start while the copy is still on disk.
    fn save_position(&self) -> bool {
        if self.store.disk.is_some_and(|d| !d.loaded()) {
            return false;
        }
        if self.store.invalidations.handed_over() {
            // The process taking over keeps the position file from now on.
            return true;
        }
        let Some(file) = &self.position_file else {
            return true;
        };
        let text = format!(
            "{} {}\n",
            self.config.stream,
            self.applied.load(Ordering::Acquire)
        );
        let temp = file.with_extension("tmp");
        if let Err(e) = crate::cache::files::replace(file, &temp, text.as_bytes()) {
            tracing::warn!(error = %e, "could not save the purge bus position");
        }
        true
    }

    fn stream_config(&self) -> stream::Config {
        stream::Config {
            name: self.config.stream.clone(),
            subjects: vec![self.config.subject.clone()],
            max_age: self.config.retention,
            storage: stream::StorageType::File,
            duplicate_window: Duration::from_secs(120).min(self.config.retention),
            ..Default::default()
        }
    }

    /// Publishes queued events in order, pipelined in batches; a batch that fails is sent
    /// again after a pause (the message ids make the retry idempotent).
    async fn run_publisher(
        self: Arc<Self>,
        js: jetstream::Context,
        mut rx: mpsc::UnboundedReceiver<Queued>,
    ) {
        let mut batch: VecDeque<Queued> = VecDeque::new();
        // Test hook (`SKUA_TEST_BUS_PUBLISH_DELAY_MS`): each batch waits this long before it
        // is sent, as under a slow nats-server.
        let delay = crate::test_hooks::delay("SKUA_TEST_BUS_PUBLISH_DELAY_MS");
        let mut pause = Backoff::new();
        let mut connection_changes = self.connection_changes.subscribe();
        let mut adopt = tokio::time::interval(ADOPT_EVERY);
        adopt.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if batch.is_empty() {
                tokio::select! {
                    next = rx.recv() => match next {
                        Some(e) => batch.push_back(e),
                        None => return,
                    },
                    _ = adopt.tick() => {
                        self.take_over_orphans().await;
                        continue;
                    }
                }
            }
            while batch.len() < 512 {
                match rx.try_recv() {
                    Ok(e) => batch.push_back(e),
                    Err(_) => break,
                }
            }
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            match self.publish_batch(&js, &batch).await {
                Ok(()) => {
                    tracing::debug!(purges = batch.len(), last = %batch.back().map_or("", |q| q.event.id.as_str()), "published");
                    let n = batch.len() as i64;
                    self.metrics.bus.unpublished.sub(n);
                    self.metrics.bus.published.inc_by(n as u64);
                    for queued in batch.drain(..) {
                        if let Some(stored) = queued.stored {
                            let _ = stored.send(());
                        }
                    }
                    pause.reset();
                    if rx.is_empty() && self.dropped.swap(0, Ordering::AcqRel) > 0 {
                        // Sent after every purge that was queued, and after every one that
                        // was not: the others revalidate what they cached before it arrives.
                        batch.push_back(self.event(Target::Distrust, false).into());
                        self.metrics.bus.unpublished.inc();
                        continue;
                    }
                    if rx.is_empty() && self.journaling.swap(false, Ordering::AcqRel) {
                        // Everything queued is published: the file is emptied. (A purge
                        // queued meanwhile that still wrote to it is published twice after a
                        // restart: the stream keeps it once, or a node applies it twice.)
                        if let Some(outbox) = &self.outbox_file {
                            outbox.clear();
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, queued = batch.len(), "publishing purges failed; will retry");
                    // From here purges are written as they are queued; those queued before
                    // are written now.
                    self.journaling.store(true, Ordering::Release);
                    while let Ok(event) = rx.try_recv() {
                        batch.push_back(event);
                    }
                    self.journal(batch.iter().filter(|q| !q.journaled).map(|q| &q.event));
                    for queued in batch.iter_mut() {
                        queued.journaled = true;
                    }
                    // Sent again at once when the client reconnects, not after a pause that
                    // has grown through the outage (up to 2 s).
                    connection_changes.mark_unchanged();
                    tokio::select! {
                        _ = tokio::time::sleep(pause.next()) => {}
                        _ = connection_changes.changed() => {}
                    }
                }
            }
        }
    }

    /// Applies and queues the purges processes of this node that have ended left unpublished
    /// in their outbox files: an earlier run (as the bus service starts), or the old process
    /// of an upgrade during a bus outage (checked every [`ADOPT_EVERY`]). They are applied here
    /// too, with the times they were taken: the others apply them only once they are
    /// published, and until then this node's backends (in a fleet of two tiers) still serve
    /// their copies from before them, which only a purge recorded here keeps from being
    /// stored. Regression: a frontend killed during a bus outage and started again stored a
    /// backend's copy from before a purge it had taken, and served it after the backend
    /// applied the purge (`tests/purge-checker/run.sh fleet` with `NATS_CHAOS=1
    /// CHAOS_NODES=0,1,2`).
    async fn take_over_orphans(&self) {
        let Some(outbox) = &self.outbox_file else {
            return;
        };
        let adopted = outbox.adopt_orphans();
        if adopted.is_empty() {
            return;
        }
        // They are in this process's file now, which is emptied once the queue is published.
        self.journaling.store(true, Ordering::Release);
        for event in adopted {
            let result = self.apply(&event).await;
            tracing::debug!(id = %event.id, target = ?event.target, result = result.as_str(), "applied a purge a process of this node that has ended left unpublished");
            let queued = Queued {
                journaled: true,
                ..event.into()
            };
            if self.outbox.send(queued).is_ok() {
                self.metrics.bus.unpublished.inc();
            }
        }
    }

    async fn publish_batch(
        &self,
        js: &jetstream::Context,
        batch: &VecDeque<Queued>,
    ) -> anyhow::Result<()> {
        let mut disconnections = self.disconnections.subscribe();
        disconnections.mark_unchanged();
        let mut acks = Vec::with_capacity(batch.len());
        for Queued { event, .. } in batch {
            let payload = serde_json::to_vec(event)?;
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", event.id.as_str());
            let ack = js
                .publish_with_headers(self.config.subject.clone(), headers, payload.into())
                .await?;
            acks.push(ack);
        }
        for ack in acks {
            // An acknowledgement owed when the connection dropped never comes: the batch is
            // sent again once the client is back (the message ids keep it stored once)
            // rather than after the timeout. Regression: every purge made in the five
            // seconds after nats-server came back queued behind that timeout.
            tokio::select! {
                acked = tokio::time::timeout(Duration::from_secs(5), ack) => {
                    acked??;
                }
                _ = disconnections.changed() => {
                    anyhow::bail!("the connection to NATS dropped before the acknowledgements came");
                }
            }
        }
        Ok(())
    }

    /// Where this node starts reading the stream, and whether it resumes from a position it
    /// kept: just after its last applied purge; or, if the stream no longer holds that, from
    /// the stream's start with every older object to be revalidated; or, with no position,
    /// from this process's start (a disk node then revalidates what it found on disk).
    fn start_position(&self, state: &stream::State) -> (consumer::DeliverPolicy, bool) {
        let applied = self.applied.load(Ordering::Acquire);
        let resuming = applied > 0 || self.had_position;
        let deliver = if !resuming {
            // Purges published before this process started are not read: on a memory-only node
            // they cannot name anything it holds. A disk node without a position (a first
            // start over an existing cache, or killed before it first reached the bus) may hold
            // older objects that missed them, so those are revalidated.
            if self.position_file.is_some() {
                self.store.invalidations.revalidate_all_before(self.created);
            }
            // A second of slack for clocks.
            consumer::DeliverPolicy::ByStartTime {
                start_time: time::OffsetDateTime::from(self.created - Duration::from_secs(1)),
            }
        } else if state.last_sequence < applied || state.first_sequence > applied + 1 {
            // The stream has dropped purges this node never saw (older than the retention,
            // or the stream was recreated).
            tracing::warn!(
                applied,
                first = state.first_sequence,
                last = state.last_sequence,
                "the purge bus no longer holds every purge missed here"
            );
            self.distrust_everything_cached();
            consumer::DeliverPolicy::ByStartSequence {
                start_sequence: state.first_sequence.max(1),
            }
        } else {
            consumer::DeliverPolicy::ByStartSequence {
                start_sequence: applied + 1,
            }
        };
        (deliver, resuming)
    }

    /// Reads the stream from just after the last applied position until the connection fails
    /// (then the caller starts again from the position reached) or the process ends: through
    /// pingora's shutdown signal too.
    async fn consume(
        &self,
        js: &jetstream::Context,
        shutdown: &mut ShutdownWatch,
        pause: &mut Backoff,
    ) -> anyhow::Result<std::convert::Infallible> {
        let mut stream = js.get_or_create_stream(self.stream_config()).await?;
        let state = stream.info().await?.state.clone();
        let (deliver, resuming) = self.start_position(&state);
        // The stream sequence to apply next, from which a skipped one shows; unknown until the
        // first message when reading from a start time.
        let mut expected = match deliver {
            consumer::DeliverPolicy::ByStartSequence { start_sequence } => Some(start_sequence),
            _ => None,
        };
        // The consumer is recreated at our own position: the position on disk, kept with the
        // objects it covers, is the one that counts.
        let _ = stream.delete_consumer(&self.config.node).await;
        let mut consumer: consumer::PullConsumer = stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some(self.config.node.clone()),
                deliver_policy: deliver,
                ack_policy: consumer::AckPolicy::None,
                ..Default::default()
            })
            .await?;
        let pending = consumer.info().await?.num_pending;
        if !resuming && pending == 0 {
            // Nothing since this process started is waiting, so everything up to the stream's
            // last sequence is behind this node: a position it can keep now, before any purge
            // arrives (regression: a node stopped before it applied one restarted without a
            // position and revalidated everything it held).
            self.applied
                .fetch_max(state.last_sequence, Ordering::AcqRel);
            expected = Some(state.last_sequence + 1);
            // While the disk index loads this waits for the saver's next round.
            self.save_position();
        }
        self.metrics.bus.lag.set(pending as i64);
        if pending == 0 {
            self.store.invalidations.caught_up();
        }
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(1000)
            .heartbeat(Duration::from_secs(1))
            .expires(PULL_EXPIRES)
            .messages()
            .await?;
        self.metrics.bus.connected.set(1);
        pause.reset();
        let mut stopping = *shutdown.borrow();
        // A request to the stream (its state, a message by sequence) sent as the connection
        // drops is never answered, and would hold this loop for the client's request timeout
        // (five seconds): it is given up at the disconnection, and the consumer is made again
        // once the client is back. Regression: a quiet check made as nats-server stopped held
        // a node that long after the bus was back.
        let mut disconnections = self.disconnections.subscribe();
        disconnections.mark_unchanged();
        let dropped = || anyhow::anyhow!("the connection to NATS dropped");
        // The stream's last sequence, when a quiet check found it beyond what had come here.
        let mut missing = None;
        loop {
            let quiet = if missing.is_some() {
                IN_FLIGHT
            } else {
                QUIET_CHECK
            };
            let message = tokio::select! {
                m = messages.next() => m,
                () = tokio::time::sleep(quiet) => {
                    let Some(next) = expected else { continue };
                    tokio::select! {
                        checked = self.quiet_check(&stream, next, &mut missing) => checked?,
                        _ = disconnections.changed() => return Err(dropped()),
                    }
                    continue;
                }
                // pingora's shutdown signal comes a grace period before the runtimes end, and
                // until then this node still answers on the connections it holds: it goes on
                // applying what the bus brings until the process ends. Regression: it stopped
                // reading here, and a frontend's pooled connections to a stopping backend got
                // pages purged elsewhere.
                _ = shutdown.changed(), if !stopping => {
                    stopping = true;
                    continue;
                }
            };
            let Some(message) = message else {
                anyhow::bail!("the purge stream ended");
            };
            let message = message?;
            let info = message.info().map_err(|e| anyhow::anyhow!("{e}"))?;
            let (sequence, pending) = (info.stream_sequence, info.pending);
            match expected {
                // Sent again (the server's record of what it delivered went back, as when it
                // restarts): applied already.
                Some(next) if sequence < next => continue,
                Some(next) if sequence > next => tokio::select! {
                    refetched = self.refetch(&stream, next, sequence) => refetched?,
                    _ = disconnections.changed() => return Err(dropped()),
                },
                _ => {}
            }
            self.handle(sequence, &message.payload).await;
            self.applied.store(sequence, Ordering::Release);
            expected = Some(sequence + 1);
            self.reached(pending);
            if stopping {
                // The end may come before the saver's next round.
                self.save_wanted.notify_one();
            }
        }
    }

    /// After [`QUIET_CHECK`] without a message: notes in `missing` the stream's last sequence
    /// if it holds more than came here. Found still missing [`IN_FLIGHT`] later: fetches it
    /// by sequence and fails with [`PullStalled`].
    async fn quiet_check(
        &self,
        stream: &stream::Stream,
        next: u64,
        missing: &mut Option<u64>,
    ) -> anyhow::Result<()> {
        if let Some(last) = missing.take().filter(|&last| last >= next) {
            self.refetch(stream, next, last + 1).await?;
            self.reached(0);
            return Err(PullStalled.into());
        }
        let last = stream.get_info().await?.state.last_sequence;
        if last >= next {
            *missing = Some(last);
        }
        Ok(())
    }

    /// Purges this node missed are gone from the stream: whatever they named, every object
    /// cached before now is revalidated before it is served again (counted as a gap).
    fn distrust_everything_cached(&self) {
        tracing::warn!("revalidating every object cached before now");
        self.metrics.bus.gaps.inc();
        let now = SystemTime::now();
        self.store.invalidations.revalidate_all_before(now);
        if let Some(relay) = self.relay.get() {
            relay.relay_distrust(now);
        }
    }

    /// Notes that this node has applied everything up to the stream's last sequence but
    /// `pending`.
    fn reached(&self, pending: u64) {
        self.metrics.bus.lag.set(pending as i64);
        if pending == 0 {
            // A burst is over: have its end saved now (the saver also runs every 250 ms
            // during long bursts; a stop may not give this service time to save).
            self.save_wanted.notify_one();
            if !self.store.invalidations.is_caught_up() {
                self.store.invalidations.caught_up();
            }
        }
    }

    /// Fetches by sequence and applies the purges `from..to`, which were delivered to this
    /// node's consumer but never arrived. With no acknowledgements asked, JetStream counts a
    /// message delivered once it is sent, and never sends it again; one still in
    /// nats-server's write buffer when it stops is lost to this consumer, and shows only as
    /// a sequence that never comes.
    async fn refetch(&self, stream: &stream::Stream, from: u64, to: u64) -> anyhow::Result<()> {
        tracing::warn!(
            from,
            to,
            "purges delivered to this node never arrived; fetching them from the stream"
        );
        let mut gone = to - from > REFETCH_MAX;
        if !gone {
            for sequence in from..to {
                match stream.get_raw_message(sequence).await {
                    Ok(message) => {
                        self.handle(sequence, &message.payload).await;
                        self.metrics.bus.refetched.inc();
                    }
                    Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => {
                        gone = true;
                    }
                    Err(e) => return Err(e.into()),
                }
                self.applied.store(sequence, Ordering::Release);
            }
        }
        if gone {
            // Deleted from the stream (by its age limit or an operator), or too many to fetch
            // one by one: whatever they purged, nothing cached before now is trusted.
            tracing::warn!(
                from,
                to,
                "the purge bus no longer holds purges this node missed"
            );
            self.distrust_everything_cached();
            self.applied.store(to - 1, Ordering::Release);
        }
        Ok(())
    }

    /// Applies one message of the stream, unless this process published it (it applied it
    /// as it took it). Another process of this node may have: during a zero-downtime upgrade
    /// two or three serve side by side, and what one takes reaches the others by the relay
    /// only along the chain of upgrades; the bus reaches them all. Regression: a process
    /// handing over relayed its purges to the socket path of the next process, which a third,
    /// started for another upgrade, had bound anew; the second never applied them and served
    /// pages from before them (`tests/purge-checker/run.sh fleet` with `UPGRADES=1
    /// NATS_CHAOS=1 CHAOS_NODES=0,1,2`).
    async fn handle(&self, sequence: u64, payload: &[u8]) {
        match serde_json::from_slice::<PurgeEvent>(payload) {
            Ok(event) if self.published_here(&event) => {}
            Ok(event) => {
                let result = self.apply(&event).await;
                tracing::debug!(sequence, id = %event.id, target = ?event.target, result = result.as_str(), "applied a purge from the bus");
                super::count(&self.metrics, Source::Bus, result);
                let reached = unix_micros(SystemTime::now()).saturating_sub(event.at_us);
                self.metrics.bus.reach.observe(reached as f64 / 1e6);
            }
            Err(e) => {
                tracing::warn!(error = %e, sequence, "ignored a malformed purge on the bus");
                super::count(&self.metrics, Source::Bus, PurgeResult::Invalid);
            }
        }
    }
}

/// Credentials and TLS for nats-server, read from their files now (a rotated file is used
/// from the next start).
async fn connect_options(config: &BusConfig) -> std::io::Result<async_nats::ConnectOptions> {
    let mut options = match &config.auth {
        BusAuth::None => async_nats::ConnectOptions::new(),
        BusAuth::CredentialsFile(path) => {
            async_nats::ConnectOptions::with_credentials_file(path).await?
        }
        BusAuth::NkeySeedFile(path) => {
            let seed = tokio::fs::read_to_string(path).await?;
            async_nats::ConnectOptions::with_nkey(seed.trim().to_string())
        }
    };
    if let Some(ca) = &config.tls.ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let Some((cert, key)) = &config.tls.client {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    Ok(options)
}

/// The bus as a pingora background service: connects (retrying forever), publishes, consumes,
/// and keeps the position file current.
pub struct BusService(pub Arc<Bus>);

#[async_trait]
impl BackgroundService for BusService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let bus = self.0.clone();
        bus.take_over_orphans().await;
        // Test hook (`SKUA_TEST_BUS_CONNECT_DELAY_MS`): the first connection is made this much
        // later, as to a distant nats-server.
        if let Some(delay) = crate::test_hooks::delay("SKUA_TEST_BUS_CONNECT_DELAY_MS") {
            tokio::time::sleep(delay).await;
        }
        let options = match connect_options(&bus.config).await {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the purge bus credentials; purges stay local");
                return;
            }
        };
        let events = bus.clone();
        let client = options
            .name(format!("skua {}", bus.config.node))
            .event_callback(move |event| {
                let bus = events.clone();
                async move {
                    let lost = match event {
                        async_nats::Event::Disconnected => {
                            bus.connected.store(false, Ordering::Release);
                            true
                        }
                        async_nats::Event::Connected => {
                            bus.connected.store(true, Ordering::Release);
                            bus.connected_once.swap(true, Ordering::AcqRel)
                        }
                        _ => false,
                    };
                    if lost {
                        bus.disconnections.send_modify(|n| *n += 1);
                    }
                    if matches!(
                        event,
                        async_nats::Event::Connected | async_nats::Event::Disconnected
                    ) {
                        bus.connection_changes.send_modify(|n| *n += 1);
                    }
                }
            })
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(2))
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((100 * attempts as u64).min(RECONNECT_MAX_MS))
            })
            .connect(bus.config.servers.clone())
            .await;
        let client = match client {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the purge bus client; purges stay local");
                return;
            }
        };
        let js = jetstream::new(client.clone());
        if let Some(rx) = bus.outbox_rx.lock().ok().and_then(|mut r| r.take()) {
            tokio::spawn(bus.clone().run_publisher(js.clone(), rx));
        }
        let saver = bus.clone();
        let watcher = tokio::spawn(async move {
            let mut saved = saver.applied.load(Ordering::Acquire);
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    _ = saver.save_wanted.notified() => {}
                }
                let connected =
                    client.connection_state() == async_nats::connection::State::Connected;
                saver.metrics.bus.connected.set(connected as i64);
                let now = saver.applied.load(Ordering::Acquire);
                if now != saved {
                    let bus = saver.clone();
                    if let Ok(true) = tokio::task::spawn_blocking(move || bus.save_position()).await
                    {
                        saved = now;
                    }
                }
            }
        });
        let mut pause = Backoff::new();
        let mut connection_changes = bus.connection_changes.subscribe();
        loop {
            connection_changes.mark_unchanged();
            match bus.consume(&js, &mut shutdown, &mut pause).await {
                Err(e) if bus.store.invalidations.handed_over() => {
                    // The process taking over has made this node's consumer its own (it is
                    // named after the node): recreating it here would take it back, and both
                    // would keep taking it from each other until this one exits.
                    tracing::info!(error = %e, "purge bus consumer handed over to the new process");
                    break;
                }
                Err(e) if e.is::<PullStalled>() => {
                    bus.metrics.bus.stalls.inc();
                    tracing::warn!(error = %e, "purge bus consumer made again");
                    // Also while stopping: the node still answers.
                    continue;
                }
                Err(e) => {
                    bus.metrics.bus.connected.set(0);
                    tracing::warn!(error = %e, "purge bus consumer stopped; reconnecting");
                    // Made again as soon as the client is back, not after a pause grown
                    // through an outage (regression: a quiet check failing at once through an
                    // outage grew the pause to two seconds, and purges reached this node that
                    // late once the bus was back).
                    tokio::select! {
                        _ = tokio::time::sleep(pause.next()) => {}
                        _ = connection_changes.changed() => {}
                        _ = shutdown.changed() => break,
                    }
                }
            }
            if *shutdown.borrow() {
                break;
            }
        }
        watcher.abort();
        if !bus.save_position() {
            tracing::warn!("stopped before the disk index loaded; the purge bus position stays where it was, and purges since are read again at the next start");
        }
    }
}

/// 100 ms doubling to 2 s.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Backoff {
        Backoff(Duration::from_millis(100))
    }
    fn next(&mut self) -> Duration {
        let now = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(2));
        now
    }
    fn reset(&mut self) {
        self.0 = Duration::from_millis(100);
    }
}

fn parse_position(text: &str, stream: &str) -> Option<u64> {
    let mut parts = text.split_ascii_whitespace();
    (parts.next()? == stream)
        .then(|| parts.next()?.parse().ok())
        .flatten()
}

fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `t` in Unix microseconds, as purges carry their time on the bus and on the upgrade relay.
pub(super) fn unix_micros(t: SystemTime) -> u64 {
    let since = t.duration_since(SystemTime::UNIX_EPOCH);
    since.map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_as_json() {
        let event = PurgeEvent {
            id: "a-1-0".into(),
            node: "a".into(),
            at_us: 1_700_000_000_000_000,
            target: Target::Tags {
                tags: vec!["page:1".into(), "page:2".into()],
            },
            soft: true,
        };
        let text = serde_json::to_string(&event).unwrap();
        assert_eq!(
            text,
            r#"{"id":"a-1-0","node":"a","at_us":1700000000000000,"kind":"tags","tags":["page:1","page:2"],"soft":true}"#
        );
        assert_eq!(serde_json::from_str::<PurgeEvent>(&text).unwrap(), event);
        assert!(serde_json::from_str::<PurgeEvent>(
            r#"{"id":"x","node":"b","at_us":1,"kind":"nope"}"#
        )
        .is_err());
    }

    #[test]
    fn position_names_its_stream() {
        assert_eq!(parse_position("SKUA_PURGE 42\n", "SKUA_PURGE"), Some(42));
        assert_eq!(parse_position("OTHER 42\n", "SKUA_PURGE"), None);
        assert_eq!(parse_position("SKUA_PURGE x\n", "SKUA_PURGE"), None);
        assert_eq!(parse_position("", "SKUA_PURGE"), None);
    }
}
