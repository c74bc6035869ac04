//! `body_timeout` for an HTTP/2 request body that pingora streams to the origin. pingora bounds
//! each read of an HTTP/1.1 body by the session's read timeout (answered 408), but its HTTP/2
//! session has no such bound: a client that declared a body and stopped sending it held the
//! origin's connection, and the application worker reading the body behind it, until the
//! origin's `read_timeout` (and once more per retry). Bodies read whole before the origin is
//! asked are bounded where they are read (`read_body_before_the_origin`); this watches the rest.
//!
//! The stream's task ([`super::h2`]) runs the request beside [`BodyWatch::stalled`]; the request's
//! phases say when the body is awaited, when a piece of it arrives and when it no longer
//! matters. When it stalls, the request is dropped: `h2` resets the stream, the origin's
//! connection is closed, and the request is recorded as answered 408, as nginx logs a
//! `client_body_timeout`. The wait is measured between the pieces pingora takes, as an
//! HTTP/1.1 read timeout is: an origin that took a body slower than one piece per
//! `body_timeout` would have it cut too. It does not read bodies or decide their limits.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

tokio::task_local! {
    /// The watch of the HTTP/2 stream this task serves.
    static STREAM_BODY: Arc<BodyWatch>;
}

/// Runs `request` (one HTTP/2 stream's, with a body) until it ends, or until its body has stalled: then
/// `request` is dropped and the request recorded as the phase that awaited the body said.
pub async fn run_watched<F: std::future::Future>(request: F) {
    let watch = Arc::new(BodyWatch::default());
    tokio::select! {
        _ = STREAM_BODY.scope(watch.clone(), request) => {}
        () = watch.stalled() => watch.cut(),
    }
}

/// Records a request cut for a stalled body.
pub type RecordCut = Box<dyn FnOnce() + Send>;

#[derive(Default)]
pub struct BodyWatch {
    state: Mutex<Awaited>,
    awaited: Notify,
}

#[derive(Default)]
struct Awaited {
    /// When the body is cut unless more of it arrives; `None`: not awaited.
    deadline: Option<Instant>,
    timeout: Duration,
    record: Option<RecordCut>,
}

impl BodyWatch {
    /// The watch of the HTTP/2 stream this task serves; `None` on an HTTP/1 connection, whose
    /// reads pingora bounds itself.
    pub fn current() -> Option<Arc<BodyWatch>> {
        STREAM_BODY.try_with(Arc::clone).ok()
    }

    /// The body is awaited from now: cut if nothing of it comes for `timeout`.
    pub fn expect(&self, timeout: Duration, record: RecordCut) {
        {
            let mut state = self.lock();
            state.deadline = Some(Instant::now() + timeout);
            state.timeout = timeout;
            state.record = Some(record);
        }
        self.awaited.notify_waiters();
    }

    /// A piece of the body arrived: the wait starts again.
    pub fn arrived(&self) {
        let mut state = self.lock();
        if state.deadline.is_some() {
            state.deadline = Some(Instant::now() + state.timeout);
        }
    }

    /// The body is whole, or no longer awaited (the origin answered).
    pub fn done(&self) {
        let mut state = self.lock();
        state.deadline = None;
        state.record = None;
    }

    /// Returns once the body has been awaited past its deadline.
    async fn stalled(&self) {
        loop {
            let awaited = self.awaited.notified();
            let deadline = self.lock().deadline;
            match deadline {
                None => awaited.await,
                Some(at) if Instant::now() >= at => return,
                Some(at) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {}
                        () = awaited => {}
                    }
                }
            }
        }
    }

    fn cut(&self) {
        let record = self.lock().record.take();
        if let Some(record) = record {
            record();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Awaited> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn recorder() -> (Arc<AtomicBool>, RecordCut) {
        let cut = Arc::new(AtomicBool::new(false));
        let flag = cut.clone();
        (cut, Box::new(move || flag.store(true, Ordering::SeqCst)))
    }

    #[tokio::test]
    async fn a_body_that_stops_coming_is_cut_and_one_that_keeps_coming_is_not() {
        let ms = Duration::from_millis;
        let (cut, record) = recorder();
        let request = async {
            let watch = BodyWatch::current().expect("inside a watched stream");
            watch.expect(ms(300), record);
            for _ in 0..5 {
                tokio::time::sleep(ms(100)).await;
                watch.arrived();
            }
            tokio::time::sleep(ms(60_000)).await;
        };
        let started = Instant::now();
        run_watched(request).await;
        assert!(cut.load(Ordering::SeqCst));
        let took = started.elapsed();
        assert!(
            took >= ms(800) && took < ms(5000),
            "pieces for 500 ms, then 300 ms of silence: {took:?}"
        );

        let (cut, record) = recorder();
        run_watched(async {
            let watch = BodyWatch::current().expect("inside a watched stream");
            watch.expect(ms(100), record);
            watch.done();
            tokio::time::sleep(ms(500)).await;
        })
        .await;
        assert!(
            !cut.load(Ordering::SeqCst),
            "a body no longer awaited is never cut"
        );
        assert!(BodyWatch::current().is_none());
    }
}
