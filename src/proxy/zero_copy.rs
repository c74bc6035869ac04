//! Sending a large disk hit's body from the page cache: `sendfile(2)` from its segment to a
//! plain TCP client, instead of writing the copy that was read to check it. A 256 KiB hit
//! otherwise copies its body twice (into Skua to check it, out to the socket); this keeps the
//! first, which the check needs, and saves the second. TLS connections and HTTP/2 write the
//! checked copy as every other response does.
//!
//! This module holds the crate's only `unsafe` code, two calls: pingora's plain TCP stream
//! offers its socket only as a raw descriptor (`AsRawFd`), and a safe `sendfile` takes a
//! borrowed one; and the head is sent with `MSG_MORE` through libc (rustix's safe `send` is
//! behind a feature that would change the build's recorded dependency set, see
//! `tests/hot_code.rs`).

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use bytes::Bytes;
use pingora::protocols::l4::stream::Stream as TcpStream;
use pingora::protocols::Stream;
use rustix::io::Errno;
use tokio::io::AsyncWriteExt;

use crate::cache::disk::BodyInFile;

/// Bodies smaller than this are written from the checked copy: below it, the system call the
/// head then needs of its own costs about what the copy saves.
pub const MIN_BODY: usize = 64 * 1024;

/// Writes `head`, then `body`, which is `in_file`'s bytes (read and checked moments ago):
/// as much of it as the socket takes now straight from the page cache, the rest from `body`.
/// Returns false, having written nothing, if the connection is not plain TCP.
pub async fn write_from_file(
    stream: &mut Stream,
    head: &[u8],
    body: &Bytes,
    in_file: &BodyInFile,
) -> io::Result<bool> {
    if body.len() < MIN_BODY || stream.as_any().downcast_ref::<TcpStream>().is_none() {
        return Ok(false);
    }
    // pingora's stream buffers writes: what it holds goes first (nothing, between responses).
    stream.flush().await?;
    let (head_sent, sent) = match stream.as_any().downcast_ref::<TcpStream>() {
        Some(tcp) => {
            let head_sent = send_head(tcp, head);
            let sent = if head_sent == head.len() {
                send_now(tcp, in_file, body.len())?
            } else {
                0
            };
            (head_sent, sent)
        }
        None => (0, 0),
    };
    if head_sent < head.len() {
        stream.write_all(&head[head_sent..]).await?;
    }
    if sent < body.len() {
        // The socket is full (it was non-blocking all along): the rest waits for it as any
        // other write does.
        stream.write_all(&body[sent..]).await?;
    }
    Ok(true)
}

/// Sends as much of `head` as the socket takes now, flagged `MSG_MORE`: the kernel holds it
/// to go out with the body, not as a packet of its own (which cost a 256 KiB hit a third more
/// CPU: a second segment for the client to wake for and acknowledge). 0 if it took nothing.
fn send_head(tcp: &TcpStream, head: &[u8]) -> usize {
    // SAFETY: `send` reads `head.len()` bytes from `head.as_ptr()`, a live slice borrowed for
    // the call, and writes nothing of ours; the descriptor is `tcp`'s open socket (borrowed).
    let sent = unsafe {
        libc::send(
            tcp.as_raw_fd(),
            head.as_ptr().cast(),
            head.len(),
            libc::MSG_MORE | libc::MSG_NOSIGNAL,
        )
    };
    usize::try_from(sent).unwrap_or(0)
}

/// Sends up to `len` bytes of `in_file` to the socket without waiting for it to drain.
fn send_now(tcp: &TcpStream, in_file: &BodyInFile, len: usize) -> io::Result<usize> {
    // SAFETY: `borrow_raw` requires the descriptor to stay open for the borrow's lifetime. It
    // is the socket of `tcp`, which this function borrows; the descriptor is closed only when
    // that stream is dropped, and the `BorrowedFd` does not outlive this call.
    let socket = unsafe { BorrowedFd::borrow_raw(tcp.as_raw_fd()) };
    let mut offset = in_file.at;
    let mut sent = 0;
    while sent < len {
        match rustix::fs::sendfile(socket, &*in_file.file, Some(&mut offset), len - sent) {
            Ok(0) => break,
            Ok(n) => sent += n,
            Err(e) if e == Errno::INTR => {}
            Err(e) if e == Errno::AGAIN => break,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(sent)
}
