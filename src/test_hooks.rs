//! Delays the integration tests ask for through the environment (`SKUA_TEST_*_MS`), to make a
//! slow disk, a slow nats-server or a busy process happen on demand. Each is read once, where
//! the work it slows starts; unset or unreadable means no delay. Nothing here is configuration:
//! an operator never sets these.

use std::time::Duration;

/// The delay named by the environment variable `name`, in milliseconds.
pub(crate) fn delay(name: &str) -> Option<Duration> {
    std::env::var(name)
        .ok()
        .and_then(|ms| ms.parse().ok())
        .map(Duration::from_millis)
}
