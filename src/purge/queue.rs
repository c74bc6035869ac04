//! The purge queue: purges that arrive in bursts (HTCP storms after a template edit) are
//! queued by the receiver's thread and applied by a worker task, so that draining the socket
//! never waits for the store. The queue is bounded (a full queue makes the receiver wait
//! rather than drop) and de-duplicating: a URL already
//! waiting is not queued again, since applying the waiting purge covers both. The backlog and
//! the time from receipt to application are metrics.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::mpsc;

use super::{Purge, PurgeResult, Purger, Scope, Source};
use crate::cache::key::CacheUrl;
use crate::cache::PurgeMode;
use crate::metrics::Metrics;

/// Purges waiting at most; past this, receivers wait for room.
pub const CAPACITY: usize = 1 << 20;

struct Queued {
    url: CacheUrl,
    received: Instant,
}

#[derive(Clone)]
pub struct PurgeQueue {
    tx: mpsc::Sender<Queued>,
    pending: Arc<Mutex<HashSet<String>>>,
    metrics: Arc<Metrics>,
    source: Source,
}

impl PurgeQueue {
    /// Starts the worker on the current runtime. `source` labels the metrics.
    pub fn start(purger: Purger, metrics: Arc<Metrics>, source: Source) -> PurgeQueue {
        let (tx, mut rx) = mpsc::channel::<Queued>(CAPACITY);
        let pending: Arc<Mutex<HashSet<String>>> = Arc::new(Mutex::new(HashSet::new()));
        let queue = PurgeQueue {
            tx,
            pending: pending.clone(),
            metrics: metrics.clone(),
            source,
        };
        tokio::spawn(async move {
            while let Some(q) = rx.recv().await {
                let key = q.url.primary();
                if let Ok(mut p) = pending.lock() {
                    p.remove(&key);
                }
                metrics.purge_backlog.dec();
                let purge = Purge::new(Scope::Url(q.url), PurgeMode::Delete, source);
                let affected = purger.apply(&purge).await;
                super::count(&metrics, source, PurgeResult::applied(affected));
                metrics
                    .purge_apply_delay
                    .with_label_values(&[source.as_str()])
                    .observe(q.received.elapsed().as_secs_f64());
            }
        });
        queue
    }

    /// Queues a purge of `url`, blocking while the queue is full. Called from a plain thread
    /// (the HTCP reader), never from async code: tokio forbids blocking a runtime thread.
    pub fn push(&self, url: CacheUrl) {
        let fresh = match self.pending.lock() {
            Ok(mut p) => p.insert(url.primary()),
            Err(_) => true,
        };
        if !fresh {
            super::count(&self.metrics, self.source, PurgeResult::Deduplicated);
            return;
        }
        self.metrics.purge_backlog.inc();
        let queued = Queued {
            url,
            received: Instant::now(),
        };
        if self.tx.blocking_send(queued).is_err() {
            self.metrics.purge_backlog.dec();
        }
    }
}
