//! The least a proxy can do for a miss, to measure what a miss costs any proxy on a machine
//! (`benches/miss_cpu.py --floor`, benches/README.md §25): each request head is read from the
//! client, written unchanged to a kept-alive origin connection, and the origin's response
//! (framed by `Content-Length`) is written back. No cache, no policy, no log: what is left is
//! the system calls and the kernel's work that every proxy pays for a miss, and the little user
//! time that reading and writing them takes. It is not a proxy anyone should run: it trusts
//! both sides to send well-formed HTTP/1.1 with `Content-Length` bodies, as the bench does.
//!
//!     cargo build --release --example miss_floor
//!     target/release/examples/miss_floor LISTEN_PORT ORIGIN_ADDR [BUSY_MICROS]
//!
//! `BUSY_MICROS` spins that long in user space before each response is written, standing for
//! a proxy's own work on a miss: it shows how that work changes the kernel's share too.

use std::cell::RefCell;
use std::rc::Rc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

type Idle = Rc<RefCell<Vec<TcpStream>>>;

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(port), Some(origin)) = (args.next(), args.next()) else {
        eprintln!("usage: miss_floor LISTEN_PORT ORIGIN_ADDR [BUSY_MICROS]");
        std::process::exit(2);
    };
    let busy =
        std::time::Duration::from_micros(args.next().and_then(|b| b.parse().ok()).unwrap_or(0));
    // One thread, as one nginx worker or one Skua worker pinned to a core.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let listener = TcpListener::bind(format!("127.0.0.1:{port}")).await?;
        let idle: Idle = Rc::default();
        loop {
            let (client, _) = listener.accept().await?;
            client.set_nodelay(true)?;
            let (idle, origin) = (idle.clone(), origin.clone());
            tokio::task::spawn_local(async move {
                let _ = serve(client, &origin, &idle, busy).await;
            });
        }
    })
}

async fn serve(
    mut client: TcpStream,
    origin: &str,
    idle: &Idle,
    busy: std::time::Duration,
) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(4096);
    let mut response = Vec::with_capacity(8192);
    loop {
        request.clear();
        if read_message(&mut client, &mut request, false)
            .await?
            .is_none()
        {
            return Ok(());
        }
        let pooled = idle.borrow_mut().pop();
        let mut upstream = match pooled {
            Some(conn) => conn,
            None => {
                let conn = TcpStream::connect(origin).await?;
                conn.set_nodelay(true)?;
                conn
            }
        };
        upstream.write_all(&request).await?;
        response.clear();
        if read_message(&mut upstream, &mut response, true)
            .await?
            .is_none()
        {
            return Ok(());
        }
        idle.borrow_mut().push(upstream);
        let spin = std::time::Instant::now();
        while spin.elapsed() < busy {
            std::hint::spin_loop();
        }
        client.write_all(&response).await?;
    }
}

/// Reads one message into `buf`: its head, and for a response its `Content-Length` body.
/// `None` when the peer closed before a message began.
async fn read_message(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    response: bool,
) -> std::io::Result<Option<()>> {
    let broken = || std::io::Error::from(std::io::ErrorKind::InvalidData);
    let head_end = loop {
        if stream.read_buf(buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(broken())
            };
        }
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
    };
    let mut length = 0;
    if response {
        let mut fields = [httparse::EMPTY_HEADER; 64];
        let mut head = httparse::Response::new(&mut fields);
        head.parse(&buf[..head_end]).map_err(|_| broken())?;
        let field = head
            .headers
            .iter()
            .find(|f| f.name.eq_ignore_ascii_case("content-length"));
        length = field
            .and_then(|f| std::str::from_utf8(f.value).ok()?.trim().parse().ok())
            .ok_or_else(broken)?;
    }
    while buf.len() < head_end + length {
        if stream.read_buf(buf).await? == 0 {
            return Err(broken());
        }
    }
    Ok(Some(()))
}
