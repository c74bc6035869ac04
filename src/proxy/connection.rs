//! The life of one client connection around pingora's HTTP/1 sessions: how many connections
//! may be open at once, how long a client may sit idle between requests, and how long it may
//! take to send a whole request head. Each request head is read here, under those deadlines,
//! and handed to pingora as the start of its session; parsing HTTP and everything about a
//! request once its head is in belong to pingora and to [`crate::proxy`].
//!
//! pingora 0.9.1 bounds each read of a request head separately (60 s), so a client that sends
//! a byte every 59 s holds a connection forever, and it has no connection limit (its
//! connection filter sees accepts, never closes). A connection here is counted from accept to
//! close by wrapping pingora's per-connection entry point.

use std::cell::Cell;
use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::BytesMut;
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::{Stream, ALPN};
use pingora::server::ShutdownWatch;
use pingora::time::fast_timeout::{fast_sleep, fast_timeout};
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::fast::FrontDoor;
use super::fill::Filled;
use super::guard;
use super::proxy_protocol::{self, Refusal};
use super::record::Served;
use super::tls::TlsTerminator;
use super::ProxyState;
use crate::cache::fields::RequestFields;
use crate::cache::key::Scheme;
use crate::cache::memory::for_one_request;
use crate::cache::status::Disposition;
use crate::config::ConnectionLimits;
use crate::metrics::ConnectionMetrics;

/// Set once a PROXY protocol listener has logged a connection refused for its peer, or for its
/// header: the first says what is misconfigured, the counters say how often.
static UNTRUSTED_WARNED: AtomicBool = AtomicBool::new(false);
static MALFORMED_WARNED: AtomicBool = AtomicBool::new(false);

/// pingora's first read buffer for a request head (`INIT_HEADER_BUF_SIZE`).
const HEAD_BUFFER: usize = 4096;

/// The start of HTTP/2's connection preface (RFC 9113 §3.4) up to the blank line that ends it
/// as an HTTP/1 head; `SM\r\n\r\n` and the client's SETTINGS frame follow.
const H2_PREFACE_HEAD: &[u8] = b"PRI * HTTP/2.0\r\n\r\n";

/// Bounds the time spent writing a refusal to a client that does not read.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// Counts open connections; each is held by a [`OpenConnection`] until the connection closes.
struct OpenConnections {
    count: AtomicUsize,
    /// Open connections by client ([`crate::rules::rate::counted_as`]), for
    /// `max_connections_per_client`; a client leaves the table with its last connection.
    by_client: Mutex<HashMap<IpAddr, usize>>,
    metrics: Arc<ConnectionMetrics>,
}

impl OpenConnections {
    fn claim(self: &Arc<Self>, max: usize) -> Option<OpenConnection> {
        if self.count.fetch_add(1, Ordering::AcqRel) >= max {
            self.count.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        self.metrics.open.inc();
        Some(OpenConnection(self.clone()))
    }

    /// A place for one more connection of `client`, unless it holds `max` already.
    fn claim_for(self: &Arc<Self>, client: IpAddr, max: usize) -> Option<ClientConnection> {
        let client = crate::rules::rate::counted_as(client);
        let mut by_client = self.by_client.lock().unwrap_or_else(|p| p.into_inner());
        let open = by_client.entry(client).or_insert(0);
        if *open >= max {
            return None;
        }
        *open += 1;
        Some(ClientConnection {
            open: self.clone(),
            client,
        })
    }
}

/// One of a client's open connections; dropping it frees its place.
struct ClientConnection {
    open: Arc<OpenConnections>,
    client: IpAddr,
}

impl Drop for ClientConnection {
    fn drop(&mut self) {
        let mut by_client = (self.open.by_client.lock()).unwrap_or_else(|p| p.into_inner());
        if let Some(open) = by_client.get_mut(&self.client) {
            *open -= 1;
            if *open == 0 {
                by_client.remove(&self.client);
            }
        }
    }
}

/// One open connection; dropping it (however the connection ends) frees its place.
struct OpenConnection(Arc<OpenConnections>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.open.dec();
    }
}

/// pingora's HTTP application (the proxy), behind the connection limits.
pub struct ConnectionGate<A> {
    app: Arc<A>,
    limits: ConnectionLimits,
    open: Arc<OpenConnections>,
    metrics: Arc<ConnectionMetrics>,
    /// Answers fresh memory hits before pingora sees the request (the proxy's listeners; the
    /// admin port has none).
    front: Option<FrontDoor>,
    /// Set on an HTTPS listener: every connection starts with a TLS handshake.
    tls: Option<Arc<TlsTerminator>>,
    /// Set on a PROXY protocol listener: every connection opens with a balancer's PROXY header
    /// (before TLS, on an HTTPS one).
    proxy_protocol: bool,
}

impl<A> ConnectionGate<A> {
    pub fn new(
        app: A,
        limits: ConnectionLimits,
        metrics: Arc<ConnectionMetrics>,
        front: FrontDoor,
    ) -> Self {
        ConnectionGate::with_front(app, limits, metrics, Some(front))
    }

    /// A gate for the admin port: the proxy's deadlines and head limits, `max_connections` of
    /// its own, counted apart from the proxy's clients (`metrics` unexported: a scrape of
    /// `/metrics` would otherwise count itself).
    pub fn admin(app: A, limits: ConnectionLimits, metrics: Arc<ConnectionMetrics>) -> Self {
        ConnectionGate::with_front(app, limits, metrics, None)
    }

    fn with_front(
        app: A,
        limits: ConnectionLimits,
        metrics: Arc<ConnectionMetrics>,
        front: Option<FrontDoor>,
    ) -> Self {
        ConnectionGate {
            app: Arc::new(app),
            front,
            limits,
            open: Arc::new(OpenConnections {
                count: AtomicUsize::new(0),
                by_client: Mutex::new(HashMap::new()),
                metrics: metrics.clone(),
            }),
            metrics,
            tls: None,
            proxy_protocol: false,
        }
    }

    /// The same gate for the HTTPS listeners: `app` serves the connections `tls` terminates,
    /// within the same connection limit.
    pub fn serving_tls(&self, app: A, tls: Arc<TlsTerminator>) -> ConnectionGate<A> {
        self.sharing_limits(app, Some(tls), false)
    }

    /// The same gate, with `app`, for listeners whose connections open with a PROXY header.
    pub fn expecting_proxy_header(&self, app: A) -> ConnectionGate<A> {
        self.sharing_limits(app, self.tls.clone(), true)
    }

    /// A gate for other listeners of the same service: one count of open connections.
    fn sharing_limits(
        &self,
        app: A,
        tls: Option<Arc<TlsTerminator>>,
        proxy_protocol: bool,
    ) -> ConnectionGate<A> {
        ConnectionGate {
            app: Arc::new(app),
            front: self.front.clone(),
            limits: self.limits,
            open: self.open.clone(),
            metrics: self.metrics.clone(),
            tls,
            proxy_protocol,
        }
    }

    /// Refuses a connection over a limit with a 503: on the proxy's listeners, the operator's
    /// `[server] error_page` when there is one, as for Skua's other 5xx answers (regression: a
    /// node too busy to take a connection answered one line of text, whatever page was set).
    async fn refuse_busy(&self, stream: &mut Stream, why: &str) {
        let Some(state) = self.front.as_ref().map(FrontDoor::state) else {
            refuse(stream, "503 Service Unavailable", why, true).await;
            return;
        };
        let page = state.settings.load().error_page.clone();
        let facts = super::respond::PageFacts {
            status: 503,
            message: why,
            node: &state.name,
            client: (stream.get_socket_digest())
                .and_then(|d| d.peer_addr().and_then(crate::purge::peer_ip)),
            request_id: None,
        };
        let answer = super::respond::refusal_wire(page.as_deref(), facts);
        write_and_close(stream, &answer).await;
    }

    /// A place for `stream` among its client's connections (`max_connections_per_client`):
    /// `Ok(None)` where none is counted (no limit, the admin port, a trusted proxy's
    /// connection to a listener without the PROXY protocol), `Err` when the client has none
    /// left.
    fn claim_for_client(&self, stream: &Stream) -> Result<Option<ClientConnection>, ()> {
        let (Some(max), Some(front)) = (self.limits.max_per_client, self.front.as_ref()) else {
            return Ok(None);
        };
        let Some(client) = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(crate::purge::peer_ip))
        else {
            return Ok(None);
        };
        if !self.proxy_protocol
            && super::guard::trusted(&front.state().settings.load().trusted_proxies, Some(client))
        {
            // Many clients behind one address, each judged by its forwarded address later.
            return Ok(None);
        }
        self.open.claim_for(client, max).map(Some).ok_or(())
    }

    /// Reads the PROXY header that opens `stream`, from a trusted balancer only: the stream
    /// after it, with the client's address as its peer, and whether the client reached the
    /// balancer over TLS. `None`: the connection is closed (and counted).
    async fn behind_balancer(&self, stream: Stream) -> Option<(Stream, bool)> {
        let peer = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(crate::purge::peer_ip));
        let trusted = self.front.as_ref().is_some_and(|front| {
            super::guard::trusted(&front.state().settings.load().trusted_proxies, peer)
        });
        if !trusted {
            // Anyone else could name any address, and be judged by it.
            self.metrics.refused_proxy_untrusted.inc();
            if !UNTRUSTED_WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    peer = ?peer,
                    "closed a connection to a PROXY protocol listener from outside [server] trusted_proxies (logged once; counted in skua_connections_refused_total{{reason=\"proxy_untrusted\"}})"
                );
            }
            return None;
        }
        match proxy_protocol::accept(stream, self.limits.header_timeout).await {
            Ok(proxied) => Some((proxied.stream, proxied.client_tls)),
            Err(Refusal::Closed) => None,
            Err(Refusal::TimedOut) => {
                self.metrics.refused_header_timeout.inc();
                None
            }
            Err(Refusal::Malformed) => {
                self.metrics.refused_bad_proxy_header.inc();
                if !MALFORMED_WARNED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        peer = ?peer,
                        "closed a connection to a PROXY protocol listener that did not open with a valid PROXY header: a client reaching it directly, or a balancer not set to send one (logged once; counted in skua_connections_refused_total{{reason=\"bad_proxy_header\"}})"
                    );
                }
                None
            }
        }
    }
}

/// How reading a request head ended.
#[derive(Debug)]
enum HeadRead {
    /// The head is complete (the buffer may also hold the start of a body).
    Complete(BytesMut),
    /// The client closed, or stayed idle past the keep-alive timeout: close quietly.
    Gone,
    /// The head was not whole within `header_timeout`; what of it had arrived.
    TimedOut(BytesMut),
    /// The head grew past `max_head_bytes`; what of it had arrived.
    TooLarge(BytesMut),
    /// The head announces a chunked body and the body bytes already read break its framing.
    BadBodyFraming(BytesMut),
}

impl<A> ConnectionGate<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    /// Writes a head refused here to the access log ([`record_refused_head`]), on the proxy's
    /// listeners (the admin port keeps no access log).
    fn record_refused(
        &self,
        head: &[u8],
        refusal: (&str, &str),
        scheme: Scheme,
        peer: &std::cell::OnceCell<Option<IpAddr>>,
        stream: &Stream,
    ) {
        if let Some(front) = self.front.as_ref() {
            let client = || peer_ip(peer, stream);
            record_refused_head(front.state(), head, refusal, scheme, &client);
        }
    }

    /// Serves `stream` as an HTTP/2 connection ([`super::h2::serve`]), `already_read` holding
    /// what of it the HTTP/1 loop read (a plain connection's preface) or nothing (ALPN `h2`).
    async fn serve_h2(
        &self,
        front: &FrontDoor,
        stream: Stream,
        already_read: BytesMut,
        scheme: Scheme,
        shutdown: &ShutdownWatch,
    ) {
        let limits = &self.limits;
        // Boxed, as TLS is: kilobytes of state that every plain HTTP/1 connection's future
        // would otherwise carry.
        let h2 = super::h2::serve(
            &self.app,
            front,
            stream,
            already_read,
            scheme,
            limits,
            shutdown,
        );
        Box::pin(h2).await;
    }
}

#[async_trait]
impl<A> ServerApp for ConnectionGate<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let Some(_slot) = self.open.claim(self.limits.max_connections) else {
            self.metrics.refused_max_connections.inc();
            self.refuse_busy(&mut stream, "too many connections").await;
            return None;
        };
        let (mut stream, tls_at_balancer) = if self.proxy_protocol {
            Box::pin(self.behind_balancer(stream)).await?
        } else {
            (stream, false)
        };
        // After the PROXY header: its client is the one counted, not the balancer.
        let Ok(_client_slot) = self.claim_for_client(&stream) else {
            self.metrics.refused_max_connections_per_client.inc();
            self.refuse_busy(&mut stream, "too many connections from this client")
                .await;
            return None;
        };
        let (mut stream, scheme) = match &self.tls {
            // Boxed, as is HTTP/2's (`serve_h2`): each is kilobytes of state that every plain
            // HTTP/1 connection's future would otherwise carry.
            Some(tls) => (Box::pin(tls.accept(stream)).await?, Scheme::Https),
            None if tls_at_balancer => (stream, Scheme::Https),
            None => (stream, Scheme::Http),
        };
        if let Some(front) = self.front.as_ref() {
            if stream.selected_alpn_proto() == Some(ALPN::H2) {
                self.serve_h2(front, stream, BytesMut::new(), scheme, shutdown)
                    .await;
                return None;
            }
        }
        let mut settings = None;
        // Bytes read past the end of the previous request: the start of the next one, when a
        // client pipelines (RFC 9112 §9.3.2: every request is answered, in order). Empty, the
        // next head is read into the thread's spare buffer (`FirstBytes`).
        let mut carry = BytesMut::new();
        // The peer's address, read from the socket once per connection, when a request first
        // needs it (each read clones and drops the socket digest's `Arc`).
        let peer = std::cell::OnceCell::new();
        let mut first_head = true;
        let mut idle = IdleWait::new(self.limits.idle_timeout);
        loop {
            let mut head = match read_head(&mut stream, &self.limits, &mut carry, &mut idle).await {
                HeadRead::Complete(head) => head,
                HeadRead::Gone => break,
                HeadRead::TimedOut(part) => {
                    self.metrics.refused_header_timeout.inc();
                    let refusal = ("408 Request Timeout", "request head too slow");
                    self.record_refused(&part, refusal, scheme, &peer, &stream);
                    refuse(&mut stream, refusal.0, refusal.1, true).await;
                    break;
                }
                HeadRead::TooLarge(part) => {
                    self.metrics.refused_head_too_large.inc();
                    let refusal = (
                        "431 Request Header Fields Too Large",
                        "request head too large",
                    );
                    self.record_refused(&part, refusal, scheme, &peer, &stream);
                    refuse(&mut stream, refusal.0, refusal.1, true).await;
                    break;
                }
                HeadRead::BadBodyFraming(head) => {
                    self.metrics.refused_bad_body_framing.inc();
                    let refusal = ("400 Bad Request", "malformed chunked body");
                    self.record_refused(&head, refusal, scheme, &peer, &stream);
                    refuse(&mut stream, refusal.0, refusal.1, false).await;
                    break;
                }
            };
            let first = std::mem::replace(&mut first_head, false);
            // Stopping, or drained by an operator: each answer asks the client to close, so
            // that its next request goes through the load balancer again.
            let draining = (self.front.as_ref()).is_some_and(|f| f.state().readiness.draining());
            let closing = *shutdown.borrow() || draining;
            let mut looked = None;
            let answered = self.front.as_ref().and_then(|front| {
                let client = || peer_ip(&peer, &stream);
                front.answer(&head, scheme, client, closing, &mut looked)
            });
            if let Some(answer) = answered {
                let send_timeout = self.limits.send_timeout;
                let written = async {
                    let body = answer.body.as_deref().unwrap_or_default();
                    write_both(&mut stream, &answer.head, body, send_timeout).await?;
                    within(send_timeout, stream.flush()).await
                };
                if written.await.is_err() || answer.close {
                    break;
                }
                reuse_head_buffer(&carry, head);
                continue;
            }
            let front = self.front.as_ref();
            if let Some((front, found)) = front.zip(looked.as_ref().filter(|l| l.holds_nothing())) {
                let ip = peer_ip(&peer, &stream);
                // Boxed: the fill's state (parse buffers, the origin exchange) would otherwise
                // be part of every connection's future, idle ones included (test
                // `half_sent_request_heads_do_not_cost_a_64_kib_buffer_each`).
                let client = move || ip;
                let mut downstream = super::fill::Downstream {
                    stream: &mut stream,
                    send_timeout: self.limits.send_timeout,
                };
                let fill = front.try_fill(&head, scheme, &client, closing, found, &mut downstream);
                let filled = Box::pin(fill).await;
                if let Filled::Answered { close } = filled {
                    if close {
                        break;
                    }
                    reuse_head_buffer(&carry, head);
                    continue;
                }
            }
            // RFC 9113 §3.3: a client that knows the server speaks HTTP/2 opens a plain
            // connection with its preface, whose first line reads as an HTTP/1 head.
            if let Some(front) = self.front.as_ref().filter(|_| first) {
                // What follows it is in the head (HTTP/2.0 is no version an HTTP/1 head's
                // framing is read for) or carried.
                if head.starts_with(H2_PREFACE_HEAD) {
                    let mut already_read = head;
                    already_read.unsplit(std::mem::take(&mut carry));
                    self.serve_h2(front, stream, already_read, scheme, shutdown)
                        .await;
                    return None;
                }
            }
            // The front door declined it: a head pingora's parser would refuse outright is
            // refused here, counted, as Skua's own answer.
            if let Some((status, why)) = refused_head(&mut head) {
                self.metrics.refused_malformed_head.inc();
                self.record_refused(&head, (status, why), scheme, &peer, &stream);
                refuse(&mut stream, status, why, false).await;
                break;
            }
            let mut session = ServerSession::new_http1(stream);
            session.set_write_timeout(Some(self.limits.send_timeout));
            session.set_keepalive(if closing || *shutdown.borrow() {
                None
            } else {
                Some(self.limits.idle_timeout.as_secs().max(1))
            });
            if let Some(previous) = settings.take() {
                pingora::apps::HttpPersistentSettings::apply_to_session(previous, &mut session);
            }
            // pingora parses this before reading the stream again. Its own pipelining stays
            // off: a request without a body hands pingora its head alone (what follows stays
            // in `carry`); one with a body hands over what was read of the body too, and a
            // request pipelined behind a body ends the connection after its answer, which
            // RFC 9112 §9.3.2 lets a client retry.
            session.set_pipelined_prefix(head);
            // The request's later phases read the front door's lookup instead of their own.
            let reused =
                for_one_request(looked, self.app.process_new_http(session, shutdown)).await?;
            let (next, next_settings) = reused.consume();
            stream = next;
            settings = next_settings;
        }
        if self.tls.is_some() {
            // RFC 8446 §6.1: close_notify, so that the client can tell the end of the
            // connection from a cut one (OpenSSL reports "unexpected eof" without it).
            // Bounded: a client that reads nothing would otherwise hold the write.
            let close_notify = pingora::protocols::Shutdown::shutdown(stream.as_mut());
            let _ = fast_timeout(REFUSAL_WRITE_TIMEOUT, close_notify).await;
        }
        None
    }

    async fn cleanup(&self) {
        self.app.cleanup().await;
    }
}

/// The client's address, read from the socket the first time a request needs it.
fn peer_ip(peer: &std::cell::OnceCell<Option<IpAddr>>, stream: &Stream) -> Option<IpAddr> {
    *peer.get_or_init(|| {
        let digest = stream.get_socket_digest()?;
        crate::purge::peer_ip(digest.peer_addr()?)
    })
}

/// After a request without pipelined bytes behind it, hands its head buffer back to the
/// thread for the next head it reads, on any connection.
fn reuse_head_buffer(carry: &BytesMut, head: BytesMut) {
    if carry.is_empty() {
        give_back_head_buffer(head);
    }
}

/// Keeps `buf`, emptied, as the thread's spare head buffer: no allocation per request, and
/// none held by a connection between requests. One grown by a large head is let go.
#[inline]
fn give_back_head_buffer(mut buf: BytesMut) {
    if buf.capacity() <= 2 * HEAD_BUFFER {
        buf.clear();
        let _ = SPARE_HEAD.try_with(|slot| slot.set(Some(buf)));
    }
}

thread_local! {
    /// The buffer this thread reads the next request head into, whichever connection sends
    /// it. Keep-alive connections spend most of their life waiting for a request; with a
    /// buffer of their own each would hold 4 KiB meanwhile (39 MiB for 10,000 browsers).
    static SPARE_HEAD: Cell<Option<BytesMut>> = const { Cell::new(None) };
}

/// A keep-alive connection's wait for its next request (`keepalive_timeout`), on one timer
/// kept from request to request. pingora's coarse timer (10 ms buckets on its own clock
/// thread) is used, not tokio's: a tokio timer armed while the runtime has none wakes the
/// runtime's own event loop through its eventfd, one extra system call and poll per request.
/// Arming pingora's costs a lock and a search of its tree of buckets (about 500
/// instructions); armed afresh for each wait, it was 6 % of a memory hit's instructions. Kept
/// across waits, it is armed about once per `keepalive_timeout` of a busy connection: one
/// armed for an earlier wait fires early and is armed again for what is left of this one.
struct IdleWait {
    timeout: Duration,
    /// The timer and the instant it was armed for; `None` once it has fired.
    timer: Option<(Instant, Timer)>,
}

/// One of pingora's coarse timers ([`fast_sleep`]).
type Timer = Pin<Box<dyn Future<Output = ()> + Send>>;

impl IdleWait {
    fn new(timeout: Duration) -> IdleWait {
        IdleWait {
            timeout,
            timer: None,
        }
    }

    /// Returns `timeout` after its first poll: the start of the wait, read from the clock only
    /// when the wait is real.
    async fn elapsed(&mut self) {
        // A timeout past the clock's range never ends the wait.
        let Some(deadline) = Instant::now().checked_add(self.timeout) else {
            return std::future::pending().await;
        };
        loop {
            let (armed_for, timer) = self.timer.get_or_insert_with(|| {
                let left = deadline.saturating_duration_since(Instant::now());
                (deadline, Box::pin(fast_sleep(left)))
            });
            let armed_for = *armed_for;
            timer.as_mut().await;
            self.timer = None;
            if armed_for >= deadline {
                return;
            }
        }
    }
}

/// Waits for the first bytes of a request head and reads them into the thread's spare
/// buffer. Between polls it holds no buffer: a read that finds nothing returns the buffer to
/// the thread, and the socket's readiness (registered by that read) wakes it.
struct FirstBytes<'a> {
    stream: &'a mut Stream,
}

impl Future for FirstBytes<'_> {
    type Output = std::io::Result<BytesMut>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let stream = &mut *self.get_mut().stream;
        let mut buf = SPARE_HEAD
            .try_with(Cell::take)
            .ok()
            .flatten()
            .unwrap_or_default();
        buf.reserve(HEAD_BUFFER);
        // tokio's `read_buf` is cancel-safe: a poll that returns `Pending` has read nothing.
        let polled = std::pin::pin!(stream.read_buf(&mut buf)).poll(cx);
        match polled {
            Poll::Ready(Ok(_)) => Poll::Ready(Ok(buf)),
            Poll::Ready(Err(e)) => {
                give_back_head_buffer(buf);
                Poll::Ready(Err(e))
            }
            Poll::Pending => {
                give_back_head_buffer(buf);
                Poll::Pending
            }
        }
    }
}

/// `io`, failed as timed out when it makes no progress for `send_timeout` (`[server]
/// send_timeout`: a client that stops reading). No timer is set when it completes at once, as
/// writes to a client that reads do.
pub async fn within<T>(
    send_timeout: Duration,
    io: impl Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    // Polled once before the timeout is made: making one reads the clock (pingora checks
    // that its clock thread runs), twice a hit.
    let mut io = std::pin::pin!(io);
    if let Poll::Ready(done) = futures::poll!(io.as_mut()) {
        return done;
    }
    fast_timeout(send_timeout, io)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// Writes `head` then `body` with as few system calls as the socket allows (one `writev` when
/// it takes everything), each write allowed `send_timeout`.
async fn write_both(
    stream: &mut Stream,
    head: &[u8],
    body: &[u8],
    send_timeout: Duration,
) -> std::io::Result<()> {
    let mut written = 0;
    let total = head.len() + body.len();
    while written < total {
        let n = if written < head.len() {
            let parts = [
                std::io::IoSlice::new(&head[written..]),
                std::io::IoSlice::new(body),
            ];
            within(send_timeout, stream.write_vectored(&parts)).await?
        } else {
            within(send_timeout, stream.write(&body[written - head.len()..])).await?
        };
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        written += n;
    }
    Ok(())
}

/// Reads until the blank line that ends a request head: the first byte within the idle
/// timeout, the whole head within the header timeout of that first byte. `carry` holds bytes
/// already read past the previous request (a pipelined client), which are used first; what
/// follows a head without a body is left in it for the next request.
///
/// Empty lines before the request line (RFC 9112 §2.2: a server "SHOULD ignore at least one
/// empty line (CRLF) received prior to the request-line") are dropped here, and count towards
/// the same deadline and size limit as the head (regression: a head sent after leading blank
/// lines escaped both, handed to pingora as a head of its own).
async fn read_head(
    stream: &mut Stream,
    limits: &ConnectionLimits,
    carry: &mut BytesMut,
    idle: &mut IdleWait,
) -> HeadRead {
    let mut buf = std::mem::take(carry);
    if buf.is_empty() {
        let first = tokio::select! {
            // The read first: a request already there needs neither the clock nor the timer.
            biased;
            first = FirstBytes { stream } => first,
            () = idle.elapsed() => return HeadRead::Gone,
        };
        buf = match first {
            Ok(first) if !first.is_empty() => first,
            Ok(nothing) => {
                give_back_head_buffer(nothing);
                return HeadRead::Gone;
            }
            Err(_) => return HeadRead::Gone,
        };
    }
    // Read from the clock only when the head needs a second read: most heads arrive whole.
    let mut deadline = None;
    let mut scanned = 0;
    let mut skipped = 0;
    loop {
        if scanned == 0 {
            let blank = buf
                .iter()
                .take_while(|b| matches!(b, b'\r' | b'\n'))
                .count();
            if blank > 0 {
                let _ = buf.split_to(blank);
                skipped += blank;
            }
        }
        if !buf.is_empty() {
            if let Some(end) = head_end(&buf, scanned) {
                // Only bytes past the head need a decision (and a second parse of it): a
                // lone request, the common case, costs nothing here.
                if buf.len() > end {
                    match body_framing(&buf[..end]) {
                        BodyFraming::None => *carry = buf.split_off(end),
                        BodyFraming::Chunked if !chunks_well_formed(&buf[end..]) => {
                            return HeadRead::BadBodyFraming(buf)
                        }
                        BodyFraming::Chunked | BodyFraming::Other => {}
                    }
                }
                return HeadRead::Complete(buf);
            }
        }
        if skipped + buf.len() > limits.max_head_bytes {
            return HeadRead::TooLarge(buf);
        }
        // A terminator may straddle two reads: look again from the last two bytes.
        scanned = buf.len().saturating_sub(2);
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(HEAD_BUFFER);
        }
        let deadline = *deadline.get_or_insert_with(|| Instant::now() + limits.header_timeout);
        let left = deadline.saturating_duration_since(Instant::now());
        match fast_timeout(left, stream.read_buf(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            Ok(_) => return HeadRead::Gone,
            Err(_) => return HeadRead::TimedOut(buf),
        }
    }
}

/// What pingora would refuse a request head for, with a `400` of its own (`Server: Pingora`,
/// no body) that no metric counted, as Skua's answer: its status line and the reason.
///
/// As pingora's parser (httparse) finds it, a head no HTTP/1.1 parser reads (RFC 9112 §5: a
/// field name is a token followed by its colon, a field value holds no control character but
/// HTAB, every line ends with CRLF or LF), or a request line it cannot read even after it
/// percent-encodes what a target should not hold; as pingora then validates a parsed head
/// (`HttpSession::validate_request`), framing or an authority it refuses.
///
/// RFC 9110 §2.5: a request of a later HTTP/1 minor version (`HTTP/1.2`) is processed "as if
/// it were in the highest minor version within that major version to which the recipient is
/// conformant": its version is rewritten to `HTTP/1.1` in `head`, which httparse then reads.
/// More fields than are looked at here are left to pingora's field limits.
///
/// RFC 9112 §3.2.2: "When a proxy receives a request with an absolute-form of
/// request-target, the proxy MUST ignore the received Host header field (if any) and instead
/// replace it with the host information of the request-target"; pingora refuses a `Host`
/// that differs from the target's authority by a byte (`WIKI.test` for `http://wiki.test/`),
/// so `head` is given the target's authority as its `Host` here ([`with_host_of_target`]).
fn refused_head(head: &mut BytesMut) -> Option<(&'static str, &'static str)> {
    let mut fields = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut fields);
    let bad = |why| Some((BAD_REQUEST, why));
    let rewritten = match req.parse(head) {
        Err(httparse::Error::HeaderName) => return bad("malformed request header field name"),
        Err(httparse::Error::HeaderValue) => return bad("malformed request header field value"),
        Err(httparse::Error::NewLine) => return bad("malformed line ending in the request head"),
        Err(httparse::Error::Version | httparse::Error::Token) => {
            return unreadable_request_line(head)
        }
        Ok(httparse::Status::Complete(end)) => {
            if let Some(why) = unframeable(&req) {
                return bad(why);
            }
            with_host_of_target(&req, head, end)
        }
        _ => None,
    };
    if let Some(rewritten) = rewritten {
        *head = rewritten;
    }
    None
}

/// `head` (parsed as `req`, its fields ending at `end`) with the absolute-form target's
/// authority as its one `Host`, when its `Host` differs (in any byte) or, in HTTP/1.0, is
/// missing; `None` when it needs no change. An HTTP/1.1 request without `Host` is left to be
/// refused (RFC 9112 §3.2: a server "MUST respond with a 400").
fn with_host_of_target(req: &httparse::Request, head: &[u8], end: usize) -> Option<BytesMut> {
    use pingora::protocols::http::authority::{self, RawTargetAuthority};
    if req.method == Some("CONNECT") {
        return None;
    }
    let target = req.path.unwrap_or_default().as_bytes();
    let RawTargetAuthority::Absolute {
        scheme, authority, ..
    } = authority::raw_target_authority(target)
    else {
        return None;
    };
    let is_host = |f: &&httparse::Header| f.name.eq_ignore_ascii_case("host");
    let host = req.headers.iter().find(is_host).map(|f| f.value);
    let replaced = match host {
        Some(host) => host != authority,
        None => req.version == Some(0),
    };
    if !replaced || !authority::is_http_family_scheme(scheme) {
        return None;
    }
    let request_line_end = head.iter().position(|b| *b == b'\n')? + 1;
    let mut rewritten = BytesMut::with_capacity(head.len() + authority.len() + 8);
    rewritten.extend_from_slice(&head[..request_line_end]);
    rewritten.extend_from_slice(b"Host: ");
    rewritten.extend_from_slice(authority);
    rewritten.extend_from_slice(b"\r\n");
    for field in req.headers.iter().filter(|f| !is_host(f)) {
        rewritten.extend_from_slice(field.name.as_bytes());
        rewritten.extend_from_slice(b": ");
        rewritten.extend_from_slice(field.value);
        rewritten.extend_from_slice(b"\r\n");
    }
    rewritten.extend_from_slice(b"\r\n");
    // What was read past the head: a body's first bytes.
    rewritten.extend_from_slice(&head[end..]);
    Some(rewritten)
}

const BAD_REQUEST: &str = "400 Bad Request";

/// A request line that pingora's parser refuses, once it has percent-encoded the target: a
/// method that is no token, a version other than HTTP/1.0 and HTTP/1.1. A later HTTP/1 minor
/// version is made `HTTP/1.1` instead (see [`refused_head`]).
fn unreadable_request_line(head: &mut [u8]) -> Option<(&'static str, &'static str)> {
    let end = head.iter().position(|b| *b == b'\n')?;
    let line = &mut head[..end];
    let line = match line.last() {
        Some(b'\r') => {
            let n = line.len() - 1;
            &mut line[..n]
        }
        _ => line,
    };
    let method = line.split(|b| *b == b' ').next().unwrap_or_default();
    // `tchar` strictly: pingora's parser takes no byte past ASCII in a method.
    let tchar = |b: &u8| b.is_ascii() && crate::cache::directives::is_token_byte(*b);
    if method.is_empty() || !method.iter().all(tchar) {
        return Some((BAD_REQUEST, "malformed request method"));
    }
    let version_at = line.iter().rposition(|b| *b == b' ')? + 1;
    match &mut line[version_at..] {
        // A target with a byte a request line should not hold: pingora percent-encodes it.
        [b'H', b'T', b'T', b'P', b'/', b'1', b'.', b'0' | b'1'] => None,
        [b'H', b'T', b'T', b'P', b'/', b'1', b'.', minor] if minor.is_ascii_digit() => {
            *minor = b'1';
            None
        }
        // RFC 9110 §15.6.6: 505 for a major version the server does not support.
        [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
            if major.is_ascii_digit() && minor.is_ascii_digit() =>
        {
            Some(("505 HTTP Version Not Supported", "HTTP/1.1 is served here"))
        }
        _ => Some((BAD_REQUEST, "malformed request line")),
    }
}

/// What pingora refuses in a head it parsed: framing a recipient must not guess at (RFC 9112
/// §6.1, §6.3) and an authority that is not one (RFC 9112 §3.2, RFC 9110 §4.2.4), checked as
/// pingora checks them.
fn unframeable(req: &httparse::Request) -> Option<&'static str> {
    let named = |name: &'static str| {
        (req.headers.iter())
            .filter(move |f| f.name.eq_ignore_ascii_case(name))
            .map(|f| f.value)
    };
    let mut hosts = named("host");
    let host = hosts.next();
    if hosts.next().is_some() {
        return Some("more than one Host field (RFC 9112 §3.2)");
    }
    if host.is_some_and(|h| h.contains(&b'@')) {
        return Some("userinfo in the Host field (RFC 9110 §4.2.4)");
    }
    let target = req.path.unwrap_or_default().as_bytes();
    if req.method != Some("CONNECT") {
        use pingora::protocols::http::authority::{self, RawTargetAuthority};
        match authority::raw_target_authority(target) {
            RawTargetAuthority::None => {}
            RawTargetAuthority::AmbiguousAuthority => {
                return Some("ambiguous absolute-form request target");
            }
            RawTargetAuthority::Absolute {
                scheme, authority, ..
            } => {
                if authority::is_http_family_scheme(scheme)
                    && http::uri::Authority::try_from(authority).is_err()
                {
                    return Some("unreadable authority in the request target");
                }
                if authority.contains(&b'@') {
                    return Some("userinfo in the request target (RFC 9110 §4.2.4)");
                }
            }
        }
    }
    if let Some(last) = named("transfer-encoding").next_back() {
        // RFC 9112 §6.1: "A server that receives a request message with a transfer coding it
        // does not understand SHOULD respond with 501"; a final coding other than chunked
        // leaves the body unframed (§6.3), and HTTP/1.0 has no transfer codings.
        if req.version == Some(0) {
            return Some("Transfer-Encoding in an HTTP/1.0 request (RFC 9112 §6.1)");
        }
        let final_coding = last.rsplit(|b| *b == b',').next().unwrap_or_default();
        if !final_coding.trim_ascii().eq_ignore_ascii_case(b"chunked") {
            return Some("a transfer coding other than chunked last (RFC 9112 §6.3)");
        }
        return None;
    }
    match guard::agreed_length(named("content-length")) {
        Err(guard::BadLength::Invalid) => Some("invalid Content-Length (RFC 9112 §6.3)"),
        Err(guard::BadLength::Differing) => Some("differing Content-Length values (RFC 9112 §6.3)"),
        Ok(_) => None,
    }
}

/// What a request head says about a body that follows it (RFC 9112 §6.3).
enum BodyFraming {
    /// No `Transfer-Encoding`, and no `Content-Length` other than 0.
    None,
    /// `Transfer-Encoding` whose final coding is `chunked`.
    Chunked,
    /// A `Content-Length` body, another coding, or a head that cannot be parsed: its bytes go
    /// to pingora whole and are framed (or refused) there.
    Other,
}

fn body_framing(head: &[u8]) -> BodyFraming {
    let mut fields = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut fields);
    if !matches!(req.parse(head), Ok(httparse::Status::Complete(_))) {
        return BodyFraming::Other;
    }
    let mut framing = BodyFraming::None;
    for field in req.headers.iter() {
        if field.name.eq_ignore_ascii_case("transfer-encoding") {
            let last = field
                .value
                .rsplit(|b| *b == b',')
                .next()
                .unwrap_or_default();
            if !last.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                return BodyFraming::Other;
            }
            framing = BodyFraming::Chunked;
        } else if field.name.eq_ignore_ascii_case("content-length")
            && field.value.trim_ascii() != b"0"
        {
            return BodyFraming::Other;
        }
    }
    framing
}

/// Whether the start of a chunked body, as far as it has arrived with its head, keeps to
/// RFC 9112 §7.1: `chunk-size [chunk-ext] CRLF chunk-data CRLF`, ending with a zero-size
/// chunk. A body whose framing is already broken here is refused before its head goes to an
/// origin (regression: `POST` with chunk size `zz` reached the origin as a head, its body
/// aborted later). Bytes still on their way are framed by pingora as they stream.
fn chunks_well_formed(mut body: &[u8]) -> bool {
    /// A chunk size that would not fit in 64 bits is a framing error, not a large body.
    const MAX_SIZE_DIGITS: usize = 15;
    loop {
        let line_end = memchr::memchr(b'\n', body);
        let line = &body[..line_end.unwrap_or(body.len())];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
        let rest = &line[digits..];
        let extension_ok = rest.is_empty() || matches!(rest[0], b';' | b' ' | b'\t');
        if digits > MAX_SIZE_DIGITS || !extension_ok {
            return false;
        }
        let Some(lf) = line_end else {
            // An unfinished size line: right so far, unless a terminator could never come.
            return line.len() < 4096;
        };
        if digits == 0 {
            return false;
        }
        let size = line[..digits].iter().fold(0usize, |n, d| {
            n * 16 + (*d as char).to_digit(16).unwrap_or(0) as usize
        });
        body = &body[lf + 1..];
        if size == 0 {
            // Trailer fields follow; pingora reads them.
            return true;
        }
        if body.len() < size {
            return true;
        }
        body = &body[size..];
        match body {
            [] | [b'\r'] => return true,
            [b'\r', b'\n', rest @ ..] | [b'\n', rest @ ..] => body = rest,
            _ => return false,
        }
    }
}

/// Where the head ends: the index just past its blank line, looking from `from`. RFC 9112
/// §2.2 lets a recipient accept a bare LF as a line terminator (pingora's parser does), so
/// both `\n\r\n` and `\n\n` end a head.
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    // A look at every line's end: cheaper than two whole-head `memmem` searches for the short
    // heads most clients send (callgrind, `benches/instructions.py`).
    let mut at = from;
    while let Some(i) = memchr::memchr(b'\n', &buf[at..]) {
        let lf = at + i;
        match buf.get(lf + 1) {
            Some(b'\n') => return Some(lf + 2),
            Some(b'\r') if buf.get(lf + 2) == Some(&b'\n') => return Some(lf + 3),
            Some(_) => at = lf + 1,
            None => return None,
        }
    }
    None
}

/// Answers a connection that will not be served and closes it, without waiting on a client
/// that does not read.
async fn refuse(stream: &mut Stream, status: &str, why: &str, retry: bool) {
    let body = refusal_body(why);
    let retry_after = if retry { "Retry-After: 1\r\n" } else { "" };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\
         {retry_after}Connection: close\r\n\r\n{body}",
        body.len()
    );
    write_and_close(stream, response.as_bytes()).await;
}

/// The fields of a request head read leniently, a line at a time, for the access log of a
/// head no parser took (its `Host`, `Referer` and `User-Agent`, when it has them).
struct LenientFields<'a>(Vec<(&'a [u8], &'a [u8])>);

impl<'a> LenientFields<'a> {
    fn of(lines: impl Iterator<Item = &'a [u8]>) -> LenientFields<'a> {
        let fields = lines
            .take(MAX_LENIENT_FIELDS)
            .filter_map(|line| {
                let colon = line.iter().position(|b| *b == b':')?;
                Some((line[..colon].trim_ascii(), line[colon + 1..].trim_ascii()))
            })
            .collect();
        LenientFields(fields)
    }
}

/// Lines of a refused head looked at for its fields: enough for a browser's.
const MAX_LENIENT_FIELDS: usize = 128;

impl RequestFields for LenientFields<'_> {
    fn values<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s [u8]> {
        (self.0.iter())
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| *v)
    }
}

/// Records a request head refused here (malformed, [`refused_head`]: Skua's 400, or 505 for
/// another HTTP version; too slow, 408; too large, 431; a chunked body already broken, 400) as
/// nginx logs a bad request: its request line's method and target as sent, and what its
/// fields say of its host and client, as far as they arrived; `refusal` is the status line and
/// reason [`refuse`] answers with.
fn record_refused_head(
    state: &ProxyState,
    head: &[u8],
    (status, why): (&str, &str),
    scheme: Scheme,
    client: &dyn Fn() -> Option<IpAddr>,
) {
    let mut lines = (head.split(|b| *b == b'\n'))
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .take_while(|line| !line.is_empty());
    let request_line = lines.next().unwrap_or_default();
    let mut words = request_line.split(|b| *b == b' ').filter(|w| !w.is_empty());
    let method = String::from_utf8_lossy(words.next().unwrap_or(b"-"));
    let target = String::from_utf8_lossy(words.next().unwrap_or(b"-"));
    let protocol = match words.next() {
        Some(b"HTTP/1.0") => "HTTP/1.0",
        Some(b"HTTP/1.1") => "HTTP/1.1",
        _ => "-",
    };
    state.record(&Served {
        client,
        method: &method,
        target: &|| target.clone(),
        protocol,
        scheme,
        url: None,
        headers: &LenientFields::of(lines),
        authority: None,
        status: status.get(..3).and_then(|c| c.parse().ok()).unwrap_or(400),
        body_bytes: refusal_body(why).len() as u64,
        disposition: Disposition::IntFront,
        hit_path: None,
        started: Instant::now(),
        origin: None,
        request_id: None,
    });
}

/// The body of a refusal that says `why`.
fn refusal_body(why: &str) -> String {
    format!("skua: {why}\n")
}

/// Writes `answer` and closes, without waiting on a client that does not read.
async fn write_and_close(stream: &mut Stream, answer: &[u8]) {
    let _ = fast_timeout(REFUSAL_WRITE_TIMEOUT, async {
        stream.write_all(answer).await?;
        stream.shutdown().await
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::{body_framing, chunks_well_formed, head_end, refused_head, BodyFraming};
    use bytes::BytesMut;
    use proptest::prelude::*;

    /// Asserts that each head `sent` is not refused and goes on to pingora as `given`.
    fn passed_on_as(cases: &[(&str, &str)]) {
        for (sent, given) in cases {
            let mut head = BytesMut::from(*sent);
            assert_eq!(refused_head(&mut head), None, "{sent:?}");
            assert_eq!(head, given.as_bytes(), "{sent:?}");
        }
    }

    #[test]
    fn heads_pingora_serves_are_not_refused_and_a_later_minor_version_is_read_as_http11() {
        let unchanged = [
            "GET /a HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /a b HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET http://a/x HTTP/1.1\r\nHost: a\r\n\r\n",
            "POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 2, 2\r\n\r\nab",
            "POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nab",
            "POST /a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        ];
        passed_on_as(&unchanged.map(|head| (head, head)));
        passed_on_as(&[(
            "GET /a HTTP/1.2\r\nHost: a\r\n\r\n",
            "GET /a HTTP/1.1\r\nHost: a\r\n\r\n",
        )]);
    }

    /// RFC 9112 §3.2.2: an absolute-form target's authority replaces `Host`.
    #[test]
    fn an_absolute_form_targets_authority_becomes_the_host_field() {
        passed_on_as(&[
            (
                "GET http://a/x HTTP/1.1\r\nHost: A\r\nX-B: c\r\n\r\n",
                "GET http://a/x HTTP/1.1\r\nHost: a\r\nX-B: c\r\n\r\n",
            ),
            (
                "POST http://a:8080/x HTTP/1.1\nX-B: c\nhost: b\nContent-Length: 2\n\nab",
                "POST http://a:8080/x HTTP/1.1\nHost: a:8080\r\nX-B: c\r\nContent-Length: 2\r\n\r\nab",
            ),
            (
                "GET http://a/x HTTP/1.0\r\n\r\n",
                "GET http://a/x HTTP/1.0\r\nHost: a\r\n\r\n",
            ),
            // Left alone: HTTP/1.1 without Host (refused later), a scheme Skua does not
            // serve (refused later), CONNECT.
            (
                "GET http://a/x HTTP/1.1\r\n\r\n",
                "GET http://a/x HTTP/1.1\r\n\r\n",
            ),
            (
                "GET ftp://a/x HTTP/1.1\r\nHost: b\r\n\r\n",
                "GET ftp://a/x HTTP/1.1\r\nHost: b\r\n\r\n",
            ),
            (
                "CONNECT a:443 HTTP/1.1\r\nHost: b\r\n\r\n",
                "CONNECT a:443 HTTP/1.1\r\nHost: b\r\n\r\n",
            ),
        ]);
    }

    /// Field lines of request heads, well and badly formed.
    const FIELDS: [&str; 12] = [
        "Host: a",
        "Content-Length: 0",
        "Content-Length: 5",
        "Transfer-Encoding: chunked",
        "X:",
        "X: v\tw",
        " folded",
        "Bad Name: v",
        "X: a\0b",
        "X: a\rb",
        ":",
        "",
    ];

    /// Line ends, with the ones parsers disagree on (the good ones more often, so that many
    /// heads are whole).
    const LINE_ENDS: [&str; 9] = [
        "\r\n", "\r\n", "\r\n", "\n", "\n", "\r", "\r\r\n", "\n\r", "",
    ];

    /// What a client may send after a head: nothing, a pipelined request, a body.
    const AFTER: [&str; 5] = [
        "",
        "GET /next HTTP/1.1\r\nHost: a\r\n\r\n",
        "\r\nGET /next HTTP/1.1\n\n",
        "hello",
        "5\r\nhello\r\n0\r\n\r\n",
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        /// Regression guard for request smuggling: the front door cuts each head itself, keeps
        /// what follows for the next request (`carry`) and hands pingora the head alone. Were
        /// its cut not where pingora's parser (httparse) ends the head, the two would read
        /// different requests from the same bytes.
        #[test]
        fn a_head_ends_where_pingoras_parser_ends_it(
            request_line in r"(\r?\n)?(GET|POST) /a\?b HTTP/1\.[01]",
            lines in proptest::collection::vec(
                (proptest::sample::select(LINE_ENDS.to_vec()), proptest::sample::select(FIELDS.to_vec())),
                0..6,
            ),
            last in proptest::sample::select(LINE_ENDS.to_vec()),
            blank in proptest::sample::select(LINE_ENDS.to_vec()),
            after in proptest::sample::select(AFTER.to_vec()),
        ) {
            let mut joined = request_line;
            for (line_end, field) in lines {
                joined.push_str(line_end);
                joined.push_str(field);
            }
            joined.push_str(last);
            joined.push_str(blank);
            joined.push_str(after);
            // `read_head` drops leading empty lines before it looks for the end.
            let buf = joined.trim_start_matches(['\r', '\n']).as_bytes();
            let end = head_end(buf, 0);
            let mut fields = [httparse::EMPTY_HEADER; 64];
            match httparse::Request::new(&mut fields).parse(buf) {
                Ok(httparse::Status::Complete(n)) => prop_assert_eq!(end, Some(n)),
                Ok(httparse::Status::Partial) => prop_assert_eq!(end, None),
                // pingora refuses the head (or rewrites its request line and parses it again,
                // `escape_illegal_request_line`): `body_framing` cannot parse it either, so the
                // bytes after it go to pingora with it, never into `carry`.
                Err(_) => {
                    if let Some(end) = end {
                        prop_assert!(matches!(body_framing(&buf[..end]), BodyFraming::Other));
                    }
                }
            }
            // Read in two parts, the second scan starts two bytes before the first one's end.
            for split in 0..buf.len() {
                if head_end(&buf[..split], 0).is_none() {
                    prop_assert_eq!(head_end(buf, split.saturating_sub(2)), end);
                }
            }
            // A head with no body keeps what follows for the next request: pingora, given
            // the head alone, must agree that no body follows it (RFC 9112 §6.3).
            if let Some(end) = end {
                if matches!(body_framing(&buf[..end]), BodyFraming::None) {
                    let mut fields = [httparse::EMPTY_HEADER; 64];
                    let mut req = httparse::Request::new(&mut fields);
                    prop_assert_eq!(req.parse(&buf[..end]), Ok(httparse::Status::Complete(end)));
                    for field in req.headers.iter() {
                        prop_assert!(!field.name.eq_ignore_ascii_case("transfer-encoding"));
                        if field.name.eq_ignore_ascii_case("content-length") {
                            prop_assert_eq!(field.value.trim_ascii(), b"0");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn chunked_framing_is_judged_on_what_has_arrived() {
        assert!(chunks_well_formed(b"5\r\nhello\r\n0\r\n\r\n"));
        assert!(chunks_well_formed(b"5;name=v\r\nhello\r\n0\r\n\r\n"));
        assert!(chunks_well_formed(b"5\nhello\n0\n\n"));
        // Cut anywhere, the beginning of a good body is good.
        let good = b"a\r\n0123456789\r\n3\r\nabc\r\n0\r\n\r\n";
        for cut in 0..good.len() {
            assert!(chunks_well_formed(&good[..cut]), "cut at {cut}");
        }
        assert!(!chunks_well_formed(b"zz\r\nhello\r\n0\r\n\r\n"));
        assert!(!chunks_well_formed(b"\r\nhello\r\n"));
        assert!(!chunks_well_formed(b"5\r\nhelloXX0\r\n\r\n"));
        assert!(!chunks_well_formed(b"-5\r\nhello\r\n"));
        assert!(!chunks_well_formed(b"1000000000000000\r\n"));
        assert!(!chunks_well_formed(b"0x5\r\nhello\r\n"));
    }

    #[test]
    fn a_head_ends_at_its_blank_line_with_crlf_or_bare_lf() {
        assert_eq!(
            head_end(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody", 0),
            Some(27)
        );
        assert_eq!(head_end(b"GET / HTTP/1.1\nHost: a\n\n", 0), Some(24));
        // Whichever blank line comes first ends the head.
        let mixed = b"GET / HTTP/1.1\r\nHost: a\n\nbody\r\n\r\n";
        assert_eq!(head_end(mixed, 0), Some(25));
        let mixed = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nX\n\n";
        assert_eq!(head_end(mixed, 0), Some(27));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n", 0), None);
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n\r", 0), None);
        // The scan may resume two bytes before the end of what was already searched.
        let buf = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(head_end(buf, buf.len() - 4), Some(buf.len()));
    }
}
