//! The life of one HTTP/2 client connection (ALPN `h2` on an HTTPS listener, or a client that
//! opens a plain connection with HTTP/2's preface, RFC 9113 §3.3). Its streams are
//! accepted here: a fresh memory hit is answered at once, by the front door's decision
//! ([`FrontDoor::answer_stream`]) written through pingora's HTTP/2 session; every other stream
//! becomes a pingora session on a task of its own, as pingora's own accept loop makes it.
//! HTTP/2 framing, flow control and HPACK belong to the `h2` crate (through pingora); what a
//! request means belongs to [`crate::proxy`].
//!
//! Why a loop of our own: pingora's spawns a task and builds a proxy session for every stream,
//! which costs a hit more than its answer (benches/README.md §14). It also keeps an idle
//! HTTP/2 connection open forever unless told otherwise; this one closes it after the same
//! idle time as an HTTP/1.1 connection.

use std::cell::Cell;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::BytesMut;
use pingora::apps::HttpServerApp;
use pingora::protocols::http::v2::server::{handshake, H2Accept, HttpSession};
use pingora::protocols::http::ServerSession;
use pingora::protocols::{Digest, Peek, Stream};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

use super::fast::FrontDoor;
use super::progress::{Counted, Writes};
use crate::cache::key::Scheme;
use crate::cache::memory::for_one_request;
use crate::config::ConnectionLimits;

/// Malformed streams (a forbidden byte in `:path`, conflicting `Content-Length`, an ambiguous
/// authority) a connection may send before it is closed: pingora's own accept loop allows 32
/// (`MAX_MALFORMED_STREAMS_PER_CONN`), but counts them only within that loop, so this one
/// counts them itself.
const MAX_MALFORMED_STREAMS: usize = 32;

/// A request cancelled before its answer began, or sooner than this after Skua took it up,
/// counts against `[server.tls] h2_max_rapid_resets` (Varnish's `h2_rapid_reset`): a browser
/// cancels a page's requests when its reader moves on, seldom a hundred a minute. Before its
/// answer began whatever the time: an origin slow to take connections (overloaded) delays
/// when Skua sees the cancel, not the origin's work once the request is sent.
const RAPID_RESET: Duration = Duration::from_secs(1);

/// The period `h2_max_rapid_resets` is counted over (Varnish's `h2_rapid_reset_period`).
const RAPID_RESET_PERIOD: Duration = Duration::from_secs(60);

/// RFC 9113 §7: "ENHANCE_YOUR_CALM (0x0b): The endpoint detected that its peer is exhibiting
/// a behavior that might be generating excessive load." (`h2::Reason` is not re-exported by
/// pingora; it converts from the code.)
const ENHANCE_YOUR_CALM: u32 = 0x0b;

/// How a stream's client went away, if it did ([`note_reset_by_client`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reset {
    No,
    BeforeTheAnswer,
    DuringTheAnswer,
}

tokio::task_local! {
    /// Whether the client reset this stream before its answer was whole: set by the request's
    /// last phase ([`note_reset_by_client`]), read when the stream's task ends.
    static RESET_BY_CLIENT: Cell<Reset>;
}

/// The request's `logging` phase says its client went away before its answer was whole (on
/// HTTP/2: reset its stream), and whether its answer had begun. Nothing outside an HTTP/2
/// stream's task.
pub(super) fn note_reset_by_client(answer_begun: bool) {
    let how = if answer_begun {
        Reset::DuringTheAnswer
    } else {
        Reset::BeforeTheAnswer
    };
    let _ = RESET_BY_CLIENT.try_with(|reset| reset.set(how));
}

/// A connection's budget of rapid resets: `limit` a period, refilled evenly over it (a token
/// bucket, so that a client is not let off at a period's turn).
struct RapidResets {
    limit: usize,
    /// Resets left, and when it was last refilled.
    left: Mutex<(f64, Instant)>,
    /// The budget ran out: the connection is to be closed.
    spent: AtomicBool,
}

impl RapidResets {
    fn new(limit: usize) -> RapidResets {
        RapidResets {
            limit,
            left: Mutex::new((limit as f64, Instant::now())),
            spent: AtomicBool::new(false),
        }
    }

    /// Counts one rapid reset.
    fn record(&self) {
        let Ok(mut left) = self.left.lock() else {
            return;
        };
        let now = Instant::now();
        let refill = now.duration_since(left.1).as_secs_f64() / RAPID_RESET_PERIOD.as_secs_f64();
        left.0 = (left.0 + refill * self.limit as f64).min(self.limit as f64) - 1.0;
        left.1 = now;
        if left.0 < 0.0 {
            self.spent.store(true, Ordering::Relaxed);
        }
    }

    fn spent(&self) -> bool {
        self.spent.load(Ordering::Relaxed)
    }
}

/// Serves the HTTP/2 connection `stream` (TLS done and `h2` negotiated, or `already_read`
/// holding the start of the client's preface, read as an HTTP/1 head) until the client closes
/// it, it stays idle past `limits.idle_timeout`, it stops taking an answer for
/// `limits.send_timeout`, or the server shuts down (then after a GOAWAY, once the streams
/// already started are answered, RFC 9113 §6.8).
pub async fn serve<A>(
    app: &Arc<A>,
    front: &FrontDoor,
    stream: Stream,
    already_read: BytesMut,
    scheme: Scheme,
    limits: &ConnectionLimits,
    shutdown: &ShutdownWatch,
) where
    A: HttpServerApp + Send + Sync + 'static,
{
    let digest = Arc::new(Digest {
        ssl_digest: stream.get_ssl_digest(),
        timing_digest: stream.get_timing_digest(),
        proxy_digest: stream.get_proxy_digest(),
        socket_digest: stream.get_socket_digest(),
    });
    let client_ip: Option<IpAddr> = (digest.socket_digest.as_ref())
        .and_then(|d| d.peer_addr())
        .and_then(crate::purge::peer_ip);
    let stream: Stream = if already_read.is_empty() {
        stream
    } else {
        Box::new(Replayed {
            inner: stream,
            already_read,
        })
    };
    let writes = Arc::new(Writes::default());
    let stream: Stream = Box::new(Counted::new(stream, writes.clone()));
    let Ok(mut conn) = handshake(stream, app.h2_options()).await else {
        return;
    };
    let mut shutdown = shutdown.clone();
    let mut closing = *shutdown.borrow();
    if closing {
        conn.graceful_shutdown();
    }
    let idle_timeout = limits.idle_timeout;
    let send_timeout = limits.send_timeout;
    let mut wait = idle_timeout;
    let mut writes_seen = 0;
    let mut malformed = 0;
    let active = Arc::new(ActiveStreams::default());
    let rapid_resets = limits
        .h2_max_rapid_resets
        .map(|n| Arc::new(RapidResets::new(n)));
    loop {
        let accepted = if closing {
            HttpSession::from_h2_conn(&mut conn, digest.clone()).await
        } else {
            tokio::select! {
                // The shutdown signal first, so that one that comes with a stream is seen.
                biased;
                _ = shutdown.changed() => {
                    conn.graceful_shutdown();
                    closing = true;
                    continue;
                }
                accepted = HttpSession::from_h2_conn(&mut conn, digest.clone()) => accepted,
                // Restarted by every stream accepted, once the ones running have ended.
                () = active.idle_for(wait) => {
                    // The front door's answers go to `h2` whole: one still going out keeps
                    // the connection busy, not idle, while the client takes bytes of it
                    // within each `send_timeout` (regression: a large hit read slowly was
                    // cut off at the idle timeout).
                    let written = std::mem::replace(&mut writes_seen, writes.count());
                    if !conn.has_streams() || written == writes_seen {
                        return;
                    }
                    wait = send_timeout;
                    continue;
                }
            }
        };
        wait = idle_timeout;
        writes_seen = writes.count();
        let mut session = match accepted {
            // The client cut the connection, or broke HTTP/2 framing.
            Err(_) | Ok(None) => return,
            Ok(Some(H2Accept::Rejected)) => {
                malformed += 1;
                if malformed >= MAX_MALFORMED_STREAMS {
                    return;
                }
                continue;
            }
            Ok(Some(H2Accept::Session(session))) => session,
        };
        if !closing && rapid_resets.as_ref().is_some_and(|r| r.spent()) {
            // Cancelled too many requests just after sending them: each cancelled one's
            // origin work goes on, so the client is asked to calm down and is closed
            // (RFC 9113 §7: ENHANCE_YOUR_CALM), as Varnish and Traffic Server do.
            front
                .state()
                .metrics
                .connections
                .closed_h2_rapid_resets
                .inc();
            drop(session);
            conn.abrupt_shutdown(ENHANCE_YOUR_CALM.into());
            closing = true;
            continue;
        }
        if !closing && front.state().readiness.draining() {
            // Drained by an operator (`POST /drain`): this stream is answered, then GOAWAY
            // (RFC 9113 §6.8), so the client's next requests go through its load balancer.
            conn.graceful_shutdown();
            closing = true;
        }
        let mut looked = None;
        if session.is_body_empty() {
            let head = session.req_header();
            if let Some(answer) = front.answer_stream(head, scheme, || client_ip, &mut looked) {
                // Both writes queue frames that `accept` sends as flow control allows; the
                // body is the stored `Bytes`, never copied.
                let end = answer.body.is_none();
                if session
                    .write_response_header(Box::new(answer.head), end)
                    .is_ok()
                {
                    let writer = session.take_response_body_writer();
                    if let (Some(body), Some(mut writer)) = (answer.body, writer) {
                        let _ = writer.send_data(body, true);
                    }
                }
                continue;
            }
        }
        let running = active.start();
        let app = app.clone();
        let shutdown = shutdown.clone();
        let rapid_resets = rapid_resets.clone();
        tokio::spawn(async move {
            let _running = running;
            // A stream the client reset before its turn came (the "rapid reset" attack cancels
            // each at once) costs nothing more, and never reaches the origin.
            let reset = std::future::poll_fn(|cx| {
                Poll::Ready(Pin::new(&mut session.idle()).poll(cx).is_ready())
            });
            if reset.await {
                return;
            }
            // The request's later phases read the front door's lookup instead of their own.
            let has_body = !session.is_body_empty();
            let mut session = ServerSession::new_http2(session);
            session.set_write_timeout(Some(send_timeout));
            let request = for_one_request(looked, app.process_new_http(session, &shutdown));
            let taken_up = Instant::now();
            let reset = RESET_BY_CLIENT.scope(Cell::new(Reset::No), async {
                if has_body {
                    super::body_watch::run_watched(request).await;
                } else {
                    request.await;
                }
                RESET_BY_CLIENT.with(Cell::get)
            });
            let rapid = match reset.await {
                Reset::No => false,
                Reset::BeforeTheAnswer => true,
                Reset::DuringTheAnswer => taken_up.elapsed() < RAPID_RESET,
            };
            if rapid {
                if let Some(resets) = rapid_resets {
                    resets.record();
                }
            }
        });
    }
}

/// A plain connection whose first bytes (HTTP/2's preface, and what came with it) were read
/// as an HTTP/1 request head: they are read again from here, then the connection.
#[derive(Debug)]
struct Replayed {
    inner: Stream,
    already_read: BytesMut,
}

super::delegate::delegate_all_but_read_to_inner!(Replayed);

impl AsyncRead for Replayed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.already_read.is_empty() {
            return Pin::new(&mut *self.inner).poll_read(cx, buf);
        }
        let n = self.already_read.len().min(buf.remaining());
        buf.put_slice(&self.already_read.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Replayed {
    super::delegate::writes_to_inner!();
    super::delegate::flush_and_shutdown_to_inner!();
}

super::delegate::ssl_of_inner!(Replayed);

#[async_trait]
impl Peek for Replayed {}

/// The streams of one connection that pingora's sessions are serving.
#[derive(Default)]
struct ActiveStreams {
    count: AtomicUsize,
    ended: Notify,
}

impl ActiveStreams {
    fn start(self: &Arc<Self>) -> RunningStream {
        self.count.fetch_add(1, Ordering::AcqRel);
        RunningStream(self.clone())
    }

    /// Returns once no stream has run for `timeout`.
    async fn idle_for(&self, timeout: Duration) {
        loop {
            let ended = self.ended.notified();
            if self.count.load(Ordering::Acquire) == 0 {
                break;
            }
            ended.await;
        }
        tokio::time::sleep(timeout).await;
    }
}

/// One stream a pingora session is serving; dropping it ends it.
struct RunningStream(Arc<ActiveStreams>);

impl Drop for RunningStream {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.ended.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rapid_reset_budget_is_spent_past_its_limit_and_refills_over_the_period() {
        let resets = RapidResets::new(3);
        for _ in 0..3 {
            resets.record();
        }
        assert!(!resets.spent(), "three of three are within the limit");
        resets.record();
        assert!(resets.spent());
        // A period after, the budget is whole again (the connection was closed by then).
        let quiet = RapidResets::new(3);
        for _ in 0..3 {
            quiet.record();
        }
        if let Ok(mut left) = quiet.left.lock() {
            left.1 -= RAPID_RESET_PERIOD;
        }
        for _ in 0..3 {
            quiet.record();
        }
        assert!(!quiet.spent());
    }
}
