//! Purges: who may send them, how their targets are read, and how they reach the fleet.
//! Sources: HTTP PURGE (`http.rs`), HTCP CLR (`htcp.rs` for the packets, `receiver.rs` for the
//! listener, `queue.rs` for bursts), the admin API and the purge bus (`bus.rs`). Each builds
//! one typed [`Purge`] and applies it through [`Purger::apply`] (`dispatch.rs`), which also
//! publishes it on the bus when it did not come from there. It does not store anything itself.

mod auth;
pub mod bus;
mod dispatch;
pub mod handover;
pub mod htcp;
pub mod http;
mod outbox;
pub mod queue;
mod ready;
pub mod receiver;

pub use auth::{client_behind, peer_ip, Acl, PurgeAuth};
pub use dispatch::{Purge, PurgeResult, Purger, Scope, Source};
pub use ready::Readiness;

use crate::metrics::Metrics;

/// Counts one purge request in `skua_purges_total`.
pub fn count(metrics: &Metrics, source: Source, result: PurgeResult) {
    metrics
        .purges
        .with_label_values(&[source.as_str(), result.as_str()])
        .inc();
}

/// Makes every series of the closed source × result vocabulary exist from the start, so
/// dashboards (and tests) see zeros rather than a missing series.
pub fn register_series(metrics: &Metrics) {
    for source in Source::ALL {
        for result in PurgeResult::ALL {
            metrics
                .purges
                .with_label_values(&[source.as_str(), result.as_str()]);
        }
    }
}
