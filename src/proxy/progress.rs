//! A client connection that counts its successful writes, so that the HTTP/2 connection loop
//! (`proxy/h2.rs`) can tell a client still taking the answers queued for it from one that
//! stopped reading: the front door hands an HTTP/2 answer to the `h2` crate whole, and only
//! the socket's writes show how far it has got. What the connection carries, and every
//! decision about closing it, are the loop's.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use async_trait::async_trait;
use pingora::protocols::{Peek, Stream};
use tokio::io::AsyncWrite;

/// How many writes to the client have sent bytes, shared with the connection's loop.
#[derive(Debug, Default)]
pub struct Writes(AtomicU64);

impl Writes {
    pub fn count(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// `inner`, counting into `writes` each write that sends at least one byte.
#[derive(Debug)]
pub struct Counted {
    inner: Stream,
    writes: Arc<Writes>,
}

impl Counted {
    pub fn new(inner: Stream, writes: Arc<Writes>) -> Counted {
        Counted { inner, writes }
    }

    fn counted(&self, written: Poll<std::io::Result<usize>>) -> Poll<std::io::Result<usize>> {
        if let Poll::Ready(Ok(n)) = written {
            if n > 0 {
                self.writes.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        written
    }
}

super::delegate::delegate_to_inner!(Counted);

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut *self.inner).poll_write(cx, buf);
        self.counted(written)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut *self.inner).poll_write_vectored(cx, bufs);
        self.counted(written)
    }

    super::delegate::flush_and_shutdown_to_inner!();
}

super::delegate::ssl_of_inner!(Counted);

#[async_trait]
impl Peek for Counted {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}
