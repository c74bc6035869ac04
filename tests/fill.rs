//! The front door's fill (`src/proxy/fill.rs`): a plain HTTP/1.1 GET for a URL memory holds
//! nothing of is fetched from the origin, stored and answered without pingora's proxy path.
//! It must look exactly like a miss the proxy path fills, store what that path stores, and hand
//! everything it cannot do to that path before anything reaches the origin.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

const FILLS: &str = "skua_front_door_fills_total";

async fn fills(skua: &Skua) -> f64 {
    skua.metric(FILLS).await
}

/// The same response filled by the front door (HTTP/1.1) and by pingora's proxy path
/// (HTTP/1.0 always takes it): the client sees the same status and fields and body, the origin
/// the same request, both copies are stored and answer the next request at the front door.
/// A request's `X-Request-Id` field with its value, a new UUID for each request, as one
/// placeholder: two requests alike but for it compare equal, and one without it does not.
fn one_request_id(field: &str) -> String {
    match field.strip_prefix("x-request-id: ") {
        Some(id) if id.len() == 36 && id.matches('-').count() == 4 => {
            "x-request-id: (a new id)".to_string()
        }
        _ => field.to_string(),
    }
}

#[tokio::test]
async fn a_miss_the_front_door_fills_looks_like_one_the_proxy_path_fills() {
    let origin = Origin::start(|_| {
        Reply::ok("page body")
            .header("cache-control", "max-age=600")
            .header("etag", "\"e1\"")
            .header("x-wiki", "yes")
            // Hop-by-hop: about the origin's connection, never passed on.
            .header("keep-alive", "timeout=5")
    })
    .await;
    let skua = Skua::start(&[origin.addr], "").await;
    let request = |version: &str, path: &str| {
        format!(
            "GET {path} HTTP/{version}\r\nHost: wiki.test\r\nUser-Agent: t\r\nX-Forwarded-For: 10.1.1.1\r\nAccept-Encoding: br\r\nConnection: close\r\n\r\n"
        )
    };
    let front = raw(skua.addr, &request("1.1", "/wiki/A")).await;
    assert_eq!(fills(&skua).await, 1.0, "the front door filled /wiki/A");
    let full = raw(skua.addr, &request("1.0", "/wiki/B")).await;
    assert_eq!(fills(&skua).await, 1.0, "the proxy path filled /wiki/B");

    let (front_status, mut front_fields, front_body) = split(&front);
    let (full_status, mut full_fields, full_body) = split(&full);
    assert_eq!(front_status, "HTTP/1.1 200 OK");
    assert!(full_status.ends_with(" 200 OK"), "{full_status}");
    assert_eq!(
        (front_body.as_str(), full_body.as_str()),
        ("page body", "page body")
    );
    assert_eq!(front_fields["x-cache-status"], "miss");
    assert_eq!(front_fields["connection"], "close");
    assert_eq!(front_fields["accept-ranges"], "bytes");
    assert!(!front_fields.contains_key("keep-alive"), "{front}");
    assert!(front_fields["cache-status"].starts_with("skua; fwd=uri-miss; stored; ttl="));
    for f in [&mut front_fields, &mut full_fields] {
        for volatile in ["cache-status", "connection", "date"] {
            f.remove(volatile);
        }
    }
    assert_eq!(front_fields, full_fields);

    // What the origin received: the same fields for both.
    let seen = |path| {
        let r = origin.requests(path).pop().expect("reached the origin");
        let mut fields: Vec<_> = r
            .headers
            .iter()
            .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap_or("?")))
            .map(|field| one_request_id(&field))
            .collect();
        fields.sort();
        fields
    };
    // The node adds its `Via` entry (RFC 9110 §7.6.3), naming the version each request came
    // in; the rest is alike.
    let to_origin = seen("/wiki/A");
    let from_http10 = seen("/wiki/B");
    let via = |fields: &[String]| -> Vec<String> {
        fields
            .iter()
            .filter(|f| f.starts_with("via: "))
            .cloned()
            .collect()
    };
    let (via_11, via_10) = (via(&to_origin), via(&from_http10));
    assert!(
        via_11.len() == 1 && via_11[0].starts_with("via: 1.1 skua-"),
        "{via_11:?}"
    );
    assert_eq!(via_10, [via_11[0].replacen("1.1", "1.0", 1)]);
    let to_origin: Vec<String> = (to_origin.into_iter())
        .filter(|f| !f.starts_with("via: "))
        .collect();
    let rest_10: Vec<String> = (from_http10.into_iter())
        .filter(|f| !f.starts_with("via: "))
        .collect();
    assert_eq!(to_origin, rest_10);
    // The client is no trusted proxy: its `X-Forwarded-For` is dropped, and the origin is
    // asked for the copy the key names, with an id of Skua's own.
    assert_eq!(
        to_origin,
        [
            "accept-encoding: br, gzip",
            "host: wiki.test",
            "user-agent: t",
            "x-forwarded-for: 127.0.0.1",
            "x-request-id: (a new id)"
        ]
    );

    for path in ["/wiki/A", "/wiki/B"] {
        let hit = get(&skua.url(path), &[("host", "wiki.test")]).await;
        assert_eq!(
            (hit.status, hit.cache(), hit.text()),
            (200, "hit-front", "page body".into())
        );
        assert_eq!(origin.count(path), 1, "{path}");
    }
}

/// Reads from `conn` into `buf` until `buf` holds a whole request head, and takes the head out
/// of it. `None`: the connection ended first.
async fn next_request_head(conn: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
            buf.drain(..end + 4);
            return Some(head);
        }
        match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// What the raw origins answer Skua's health checks (`/_health`).
const HEALTH_ANSWER: &str = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

/// A raw origin that reads each connection's first request head, answers Skua's health checks
/// itself and hands every other connection, its head read, to `answer`.
async fn answering_origin<F, Fut>(answer: F) -> std::net::SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let Some(head) = next_request_head(&mut conn, &mut Vec::new()).await else {
                    return;
                };
                if head.starts_with("GET /_health ") {
                    let _ = conn.write_all(HEALTH_ANSWER.as_bytes()).await;
                    return;
                }
                answer(conn).await;
            });
        }
    });
    addr
}

/// An origin speaking raw HTTP/1.1: `/chunked` in chunks (with an extension and a trailer),
/// `/until-close` an HTTP/1.0 body ended by closing the connection. Counts the requests.
async fn raw_origin() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let counted = count.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                continue;
            };
            let counted = counted.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some(head) = next_request_head(&mut conn, &mut buf).await {
                    if !head.starts_with("GET /_health ") {
                        counted.fetch_add(1, Ordering::SeqCst);
                    }
                    if head.starts_with("GET /chunked ") {
                        let reply = "HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nTransfer-Encoding: chunked\r\n\r\n\
                                     5;ext=1\r\nfirst\r\n7\r\n, then \r\n4\r\nlast\r\n0\r\nX-Trailer: t\r\n\r\n";
                        if conn.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                    } else if head.starts_with("GET /_health ") {
                        if conn.write_all(HEALTH_ANSWER.as_bytes()).await.is_err() {
                            return;
                        }
                    } else {
                        let reply = "HTTP/1.0 200 Fine\r\nCache-Control: max-age=600\r\n\r\nuntil the origin closes";
                        let _ = conn.write_all(reply.as_bytes()).await;
                        return;
                    }
                }
            });
        }
    });
    (addr, count)
}

/// Bodies without a `Content-Length` are relayed in chunks, stored whole, and served from
/// memory with their length.
#[tokio::test]
async fn front_door_fill_stores_chunked_and_close_delimited_bodies() {
    let (addr, count) = raw_origin().await;
    let skua = Skua::start(&[addr], "").await;
    for (n, (path, body)) in [
        ("/chunked", "first, then last"),
        ("/until-close", "until the origin closes"),
    ]
    .into_iter()
    .enumerate()
    {
        let miss = raw(
            skua.addr,
            &format!("GET {path} HTTP/1.1\r\nHost: wiki.test\r\nConnection: close\r\n\r\n"),
        )
        .await;
        let (status, fields, _) = split(&miss);
        assert!(status.starts_with("HTTP/1.1 200 "), "{miss}");
        assert_eq!(fields["transfer-encoding"], "chunked", "{miss}");
        assert_eq!(fields["x-cache-status"], "miss", "{miss}");
        assert_eq!(fills(&skua).await, (n + 1) as f64);
        let hit = get(&skua.url(path), &[("host", "wiki.test")]).await;
        assert_eq!(
            (hit.status, hit.cache(), hit.text()),
            (200, "hit-front", body.into())
        );
        assert_eq!(hit.header("content-length"), body.len().to_string());
        assert_eq!(count.load(Ordering::SeqCst), n + 1, "{path} fetched once");
    }
}

/// A kept-alive origin connection the origin closed while it sat idle is retried on a new
/// one: the client gets the page, not an error.
#[tokio::test]
async fn front_door_fill_retries_an_origin_connection_closed_while_idle() {
    let origin =
        Origin::start(|_| Reply::ok("page body").header("cache-control", "max-age=600")).await;
    let skua = Skua::start(&[origin.addr], "").await;
    let host = [("host", "wiki.test")];
    assert_eq!(get(&skua.url("/wiki/A"), &host).await.cache(), "miss");
    origin.stop();
    origin.restart().await;
    let after = get(&skua.url("/wiki/B"), &host).await;
    assert_eq!(
        (after.status, after.cache(), after.text()),
        (200, "miss", "page body".into())
    );
    assert_eq!(fills(&skua).await, 2.0);
    assert_eq!(origin.count("/wiki/B"), 1);
}

/// An origin slower than `read_timeout`: 504 from Skua, counted as the origin's error, and
/// nothing stored (the next request reaches the origin again), on either path alike.
#[tokio::test]
async fn front_door_fill_answers_an_origin_timeout_with_504_and_stores_nothing() {
    let origin = Origin::start(|_| {
        Reply::ok("late")
            .header("cache-control", "max-age=600")
            .delay(Duration::from_millis(1500))
    })
    .await;
    let skua = Skua::start_tables(&[origin.addr], ["", "read_timeout = \"500ms\"", ""], "").await;
    let mut answers = Vec::new();
    for version in ["1.1", "1.0", "1.1"] {
        let answer = raw(
            skua.addr,
            &format!("GET /slow HTTP/{version}\r\nHost: wiki.test\r\n\r\n"),
        )
        .await;
        let (status, mut fields, body) = split(&answer);
        assert!(status.ends_with(" 504 Gateway Timeout"), "{answer}");
        assert_eq!(fields["x-cache-status"], "int-front", "{answer}");
        assert_eq!(fields["connection"], "close", "{answer}");
        fields.remove("date");
        answers.push((fields, body));
    }
    assert_eq!(answers[0], answers[1], "both paths answer alike");
    assert_eq!(fills(&skua).await, 2.0);
    assert_eq!(origin.count("/slow"), 3, "nothing was stored");
    assert_eq!(
        skua.metric("skua_origin_errors_total{kind=\"ReadTimedout\",pool=\"test\"}")
            .await,
        3.0
    );
}

/// The body of a raw HTTP/1.1 response in chunks, unchunked.
fn dechunk(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = body;
    while let Some(line_end) = rest.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&rest[..line_end]).into_owned();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = line_end + 2;
        out.extend_from_slice(&rest[start..start + size]);
        rest = &rest[start + size + 2..];
    }
    out
}

/// Status, fields and body of a raw response read as bytes (a compressed body is no text).
async fn raw_bytes(
    addr: std::net::SocketAddr,
    request: &str,
) -> (String, BTreeMap<String, String>, Vec<u8>) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await;
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head")
        + 4;
    let (status, fields, _) = split(&String::from_utf8_lossy(&buf[..end]));
    let body = if fields
        .get("transfer-encoding")
        .is_some_and(|te| te == "chunked")
    {
        dechunk(&buf[end..])
    } else {
        buf[end..].to_vec()
    };
    (status, fields, body)
}

/// A compressible page is compressed before it is stored, as on the proxy path: the client
/// that takes gzip gets the gzip copy, the same bytes either path stores, with a weakened
/// `ETag` and `Vary: Accept-Encoding`; a client that takes no encoding gets it decoded.
#[tokio::test]
async fn a_page_the_front_door_fills_is_compressed_as_the_proxy_path_compresses_it() {
    let page = "<p>a wiki page, long enough to be worth compressing</p>\n".repeat(100);
    let served = page.clone();
    let origin = Origin::start(move |_| {
        Reply::ok(served.clone())
            .header("content-type", "text/html; charset=UTF-8")
            .header("cache-control", "max-age=600")
            .header("etag", "\"p1\"")
    })
    .await;
    let skua = Skua::start(&[origin.addr], "").await;
    let request = |version: &str, path: &str, encoding: &str| {
        format!(
            "GET {path} HTTP/{version}\r\nHost: wiki.test\r\n{encoding}Connection: close\r\n\r\n"
        )
    };
    let gzip = "Accept-Encoding: gzip\r\n";
    let (front_status, mut front, front_body) =
        raw_bytes(skua.addr, &request("1.1", "/wiki/A", gzip)).await;
    assert_eq!(fills(&skua).await, 1.0, "the front door filled /wiki/A");
    let (_, mut full, full_body) = raw_bytes(skua.addr, &request("1.0", "/wiki/B", gzip)).await;
    assert_eq!(fills(&skua).await, 1.0, "the proxy path filled /wiki/B");
    assert_eq!(front_status, "HTTP/1.1 200 OK");
    assert_eq!(front["content-encoding"], "gzip");
    assert_eq!(front["etag"], "W/\"p1\"");
    assert!(
        front["vary"].eq_ignore_ascii_case("accept-encoding"),
        "{front:?}"
    );
    // gzip streams, not byte for byte the same: each path flushes the encoder where the
    // origin's body arrived in pieces. What they decode to is checked below, through Skua.
    for body in [&front_body, &full_body] {
        assert!(body.starts_with(&[0x1f, 0x8b]), "a gzip stream");
        assert!(body.len() < page.len() / 4, "{} bytes", body.len());
    }
    for f in [&mut front, &mut full] {
        for volatile in [
            "cache-status",
            "connection",
            "date",
            "transfer-encoding",
            "content-length",
        ] {
            f.remove(volatile);
        }
    }
    assert_eq!(front, full);

    // Each stored copy is what its miss sent, and decodes to the page.
    for (path, sent) in [("/wiki/A", &front_body), ("/wiki/B", &full_body)] {
        let (_, hit, body) = raw_bytes(skua.addr, &request("1.1", path, gzip)).await;
        assert_eq!(hit["x-cache-status"], "hit-front", "{path}");
        assert_eq!(&body, sent, "{path}");
        let (_, plain, body) = raw_bytes(skua.addr, &request("1.1", path, "")).await;
        assert!(!plain.contains_key("content-encoding"), "{path}: {plain:?}");
        assert_eq!(String::from_utf8_lossy(&body), page, "{path}");
        assert_eq!(origin.count(path), 1, "{path}");
    }
    // The fill decoded its own answer for a client that takes no encoding.
    let (_, fields, body) = raw_bytes(skua.addr, &request("1.1", "/wiki/C", "")).await;
    assert_eq!(fields["x-cache-status"], "miss");
    assert!(!fields.contains_key("content-encoding"), "{fields:?}");
    assert_eq!(String::from_utf8_lossy(&body), page);
    assert_eq!(fills(&skua).await, 2.0);
}

/// With a disk tier, a miss the front door fills is written to disk as well: after a restart
/// (memory empty) the page is a disk hit, and the origin was asked once.
#[tokio::test]
async fn a_miss_the_front_door_fills_is_kept_on_disk_too() {
    let origin =
        Origin::start(|_| Reply::ok("page body").header("cache-control", "max-age=600")).await;
    let dir = tempfile::tempdir().unwrap();
    let port = Port::reserve();
    let mut skua = Skua::start_disk_on(&port, &[origin.addr], dir.path(), "", "").await;
    skua.wait_disk_index().await;
    let host = [("host", "wiki.test")];
    let miss = get(&skua.url("/wiki/Disk"), &host).await;
    assert_eq!((miss.status, miss.cache()), (200, "miss"));
    assert_eq!(fills(&skua).await, 1.0, "the front door filled it");
    skua.wait_disk_writes().await;
    skua.stop();
    let skua = Skua::start_disk_on(&port, &[origin.addr], dir.path(), "", "").await;
    skua.wait_disk_index().await;
    let hit = get(&skua.url("/wiki/Disk"), &host).await;
    assert_eq!(
        (hit.status, hit.cache(), hit.text()),
        (200, "hit-local", "page body".into())
    );
    assert_eq!(origin.count("/wiki/Disk"), 1);
}

/// An origin speaking raw HTTP/1.1 that answers each request with `reply(path)` and then keeps
/// the connection open whatever its answer said (the worst case for a client that ignores
/// `Connection: close`), but after an HTTP/1.0 answer, whose body ends with the connection.
/// Records each request as (connection number, path).
async fn scripted_origin(
    reply: fn(&str) -> &'static str,
) -> (
    std::net::SocketAddr,
    Arc<std::sync::Mutex<Vec<(usize, String)>>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let recorded = seen.clone();
    tokio::spawn(async move {
        for connection in 0.. {
            let Ok((mut conn, _)) = listener.accept().await else {
                continue;
            };
            let recorded = recorded.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some(head) = next_request_head(&mut conn, &mut buf).await {
                    let path = head.split(' ').nth(1).unwrap_or("").to_string();
                    let answer = if path == "/_health" {
                        HEALTH_ANSWER
                    } else {
                        recorded.lock().unwrap().push((connection, path.clone()));
                        reply(&path)
                    };
                    if conn.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                    if answer.starts_with("HTTP/1.0") || answer.contains("Connection: close\r\n") {
                        // The body (of HTTP/1.0, or of a coding other than chunked) ends when
                        // the connection does.
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// Regression: the fill removed the origin's hop-by-hop fields before it read them, so an
/// origin's `Connection: close` went unseen and the connection was kept for the next miss.
/// RFC 9112 §9.6: a client that receives "close" "MUST cease sending requests on that
/// connection"; an origin that then stops reading made that miss wait for `read_timeout`.
#[tokio::test]
async fn front_door_fill_sends_nothing_more_on_a_connection_the_origin_closes() {
    let (addr, seen) = scripted_origin(|_| {
        "HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nContent-Length: 4\r\nConnection: close\r\n\r\npage"
    })
    .await;
    let skua = Skua::start_tables(&[addr], ["", "read_timeout = \"3s\"", ""], "").await;
    let host = [("host", "wiki.test")];
    for path in ["/wiki/A", "/wiki/B", "/wiki/C"] {
        let miss = get(&skua.url(path), &host).await;
        assert_eq!(
            (miss.status, miss.cache(), miss.text()),
            (200, "miss", "page".into())
        );
    }
    assert_eq!(fills(&skua).await, 3.0);
    let seen = seen.lock().unwrap().clone();
    let connections: Vec<usize> = seen.iter().map(|(c, _)| *c).collect();
    let mut distinct = connections.clone();
    distinct.dedup();
    assert_eq!(
        connections, distinct,
        "a request followed a close: {seen:?}"
    );
    assert_eq!(seen.len(), 3, "{seen:?}");
}

/// Regression: the fill read a response whose `Content-Length` was invalid or conflicting
/// until the origin closed and stored it, where pingora's path (and RFC 9112 §6.3: "the proxy
/// MUST close the connection to the server, discard the received response, and send a 502")
/// refuses it; and it read one with the same length twice (`4, 4`, which RFC 9110 §8.6 lets
/// a recipient take as one) until close too, waiting out `read_timeout` on an origin that
/// keeps its connection open.
#[tokio::test]
async fn front_door_fill_refuses_a_response_of_invalid_length_as_the_proxy_path_does() {
    let (addr, seen) = scripted_origin(|path| match path {
        "/bad" => "HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nContent-Length: 4x\r\n\r\npage",
        "/plus" => "HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nContent-Length: +4\r\n\r\npage",
        "/conflict" => "HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\npage",
        "/twice" => "HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\npage",
        _ => "HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nContent-Length: 4, 4\r\n\r\npage",
    })
    .await;
    let skua = Skua::start_tables(&[addr], ["", "read_timeout = \"3s\"", ""], "").await;
    let count = |path: &str| {
        seen.lock()
            .unwrap()
            .iter()
            .filter(|(_, p)| p == path)
            .count()
    };
    for path in ["/bad", "/plus", "/conflict"] {
        let mut answers = Vec::new();
        // The front door (HTTP/1.1) and pingora's path (HTTP/1.0), then the front door again:
        // nothing was stored.
        for version in ["1.1", "1.0", "1.1"] {
            let answer = raw(
                skua.addr,
                &format!("GET {path} HTTP/{version}\r\nHost: wiki.test\r\n\r\n"),
            )
            .await;
            let (status, _, body) = split(&answer);
            assert!(status.ends_with(" 502 Bad Gateway"), "{path}: {answer}");
            assert!(!body.contains("page"), "{path}: {answer}");
            answers.push(status);
        }
        assert_eq!(count(path), 3, "{path}: nothing was stored");
    }
    for path in ["/twice", "/list"] {
        let started = std::time::Instant::now();
        let miss = get(&skua.url(path), &[("host", "wiki.test")]).await;
        assert_eq!(
            (miss.status, miss.cache(), miss.text()),
            (200, "miss", "page".into()),
            "{path}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{path}: waited for a close"
        );
        let hit = get(&skua.url(path), &[("host", "wiki.test")]).await;
        assert_eq!(
            (hit.status, hit.cache(), hit.text()),
            (200, "hit-front", "page".into()),
            "{path}"
        );
        assert_eq!(hit.header("content-length"), "4", "{path}");
        assert_eq!(count(path), 1, "{path}");
    }
}

/// Regression: a chunked response that also carried `Content-Length` reached the client with
/// both fields, so a client (or a proxy in front of Skua) that believed the length read the
/// chunk framing as body and the rest as its next response. RFC 9112 §6.3 item 3: the
/// chunking overrides the length, and a sender "MUST remove the received Content-Length
/// field prior to forwarding such a message downstream".
#[tokio::test]
async fn front_door_fill_forwards_no_content_length_beside_transfer_encoding() {
    let (addr, seen) = scripted_origin(|_| {
        "HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n4\r\npage\r\n0\r\n\r\n"
    })
    .await;
    let skua = Skua::start(&[addr], "").await;
    // The front door's fill, then pingora's path (a cookie: the front door declines it).
    for cookie in ["", "Cookie: session=1\r\n"] {
        let miss = raw(
            skua.addr,
            &format!("GET /both HTTP/1.1\r\nHost: wiki.test\r\n{cookie}Connection: close\r\n\r\n"),
        )
        .await;
        let (status, fields, body) = split(&miss);
        assert!(status.starts_with("HTTP/1.1 200 "), "{miss}");
        assert_eq!(fields["transfer-encoding"], "chunked", "{miss}");
        assert!(!fields.contains_key("content-length"), "{miss}");
        assert_eq!(dechunk(body.as_bytes()), b"page", "{miss}");
    }
    let hit = get(&skua.url("/both"), &[("host", "wiki.test")]).await;
    assert_eq!(
        (hit.status, hit.cache(), hit.text()),
        (200, "hit-front", "page".into())
    );
    assert_eq!(hit.header("content-length"), "4");
    assert_eq!(seen.lock().unwrap().len(), 2);
}

/// Regression: an origin that sent `103 Early Hints` (RFC 8297) before its answer failed
/// every miss the front door filled with a 502. Now, on either path, the client gets the hints
/// and then the page, which is stored; an HTTP/1.0 client gets the page alone.
#[tokio::test]
async fn early_hints_before_the_answer_reach_the_client_and_the_page_is_stored() {
    let (addr, seen) = scripted_origin(|_| {
        "HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n\
         HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nContent-Length: 4\r\n\r\npage"
    })
    .await;
    let skua = Skua::start(&[addr], "").await;
    // The front door's fill, then pingora's path (a cookie: the front door declines it).
    for (path, cookie) in [("/front", ""), ("/full", "Cookie: session=1\r\n")] {
        let miss = raw(
            skua.addr,
            &format!("GET {path} HTTP/1.1\r\nHost: wiki.test\r\n{cookie}Connection: close\r\n\r\n"),
        )
        .await;
        let (hints, answer) = miss.split_once("\r\n\r\n").expect("two heads");
        assert!(
            hints.starts_with("HTTP/1.1 103 Early Hints\r\n"),
            "{path}: {miss}"
        );
        assert!(
            hints.contains("\r\nLink: </style.css>; rel=preload"),
            "{path}: {miss}"
        );
        let (status, _, body) = split(answer);
        assert_eq!(
            (status.as_str(), body.as_str()),
            ("HTTP/1.1 200 OK", "page"),
            "{path}: {miss}"
        );
    }
    assert_eq!(fills(&skua).await, 1.0);
    let hit = get(&skua.url("/front"), &[("host", "wiki.test")]).await;
    assert_eq!(
        (hit.status, hit.cache(), hit.text()),
        (200, "hit-front", "page".into())
    );
    assert_eq!(seen.lock().unwrap().len(), 2);
    // RFC 9110 §15.2: "a server MUST NOT send a 1xx response to an HTTP/1.0 client", which
    // reads the first head as the answer and the page's head as its body. Regression: it got
    // the hints first.
    let http10 = raw(skua.addr, "GET /old HTTP/1.0\r\nHost: wiki.test\r\n\r\n").await;
    let (status, _, body) = split(&http10);
    assert_eq!(
        (status.as_str(), body.as_str()),
        ("HTTP/1.1 200 OK", "page"),
        "{http10}"
    );
}

/// An answer as the differential tests compare it: the status (without the version, which
/// pingora's path keeps from an HTTP/1.0 origin), the fields in order without those that
/// differ from one answer to the next whichever path gives it (`Date`, `Age`, and the `ttl=`
/// of `Cache-Status`, by when the second turned), and the body.
fn comparable(answer: &str) -> (String, Vec<String>, Vec<u8>) {
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((answer, ""));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status = status_line
        .split_once(' ')
        .map_or("", |(_, s)| s)
        .to_string();
    let fields = lines
        .filter(|l| {
            let name = l.split(':').next().unwrap_or("").to_ascii_lowercase();
            name != "date" && name != "age"
        })
        .map(|l| {
            l.split("; ")
                .filter(|p| !p.starts_with("ttl="))
                .collect::<Vec<_>>()
                .join("; ")
        })
        .collect();
    (status, fields, body.as_bytes().to_vec())
}

/// Origin answers for [`a_miss_is_answered_and_stored_alike_on_both_paths`], by path.
fn varied_answer(path: &str) -> &'static str {
    match path.rsplit_once('/').map_or(path, |(case, _)| case) {
        "/length" => "HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nETag: \"e\"\r\nContent-Length: 4\r\n\r\npage",
        "/chunked" => "HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nTransfer-Encoding: chunked\r\n\r\n4\r\npage\r\n0\r\n\r\n",
        "/empty" => "HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nContent-Length: 0\r\n\r\n",
        "/not-found" => "HTTP/1.1 404 Not Found\r\nCache-Control: max-age=60\r\nContent-Length: 4\r\n\r\ngone",
        "/error" => "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\noops",
        "/moved" => "HTTP/1.1 301 Moved Permanently\r\nLocation: /elsewhere\r\nCache-Control: max-age=600\r\nContent-Length: 0\r\n\r\n",
        "/no-content" => "HTTP/1.1 204 No Content\r\nCache-Control: max-age=600\r\n\r\n",
        "/private" => "HTTP/1.1 200 OK\r\nCache-Control: private, max-age=600\r\nContent-Length: 4\r\n\r\npage",
        "/no-store" => "HTTP/1.1 200 OK\r\nCache-Control: no-store\r\nContent-Length: 4\r\n\r\npage",
        "/cookie" => "HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nSet-Cookie: s=1\r\nContent-Length: 4\r\n\r\npage",
        "/vary-star" => "HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nVary: *\r\nContent-Length: 4\r\n\r\npage",
        "/vary" => "HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nVary: Accept-Language\r\nContent-Length: 4\r\n\r\npage",
        "/expired" => "HTTP/1.1 200 OK\r\nExpires: Thu, 01 Jan 1970 00:00:00 GMT\r\nContent-Length: 4\r\n\r\npage",
        "/max-age-0" => "HTTP/1.1 200 OK\r\nCache-Control: max-age=0\r\nETag: \"e\"\r\nContent-Length: 4\r\n\r\npage",
        "/s-maxage" => "HTTP/1.1 200 OK\r\nCache-Control: s-maxage=600, max-age=0\r\nContent-Length: 4\r\n\r\npage",
        "/cdn" => "HTTP/1.1 200 OK\r\nCDN-Cache-Control: max-age=600\r\nCache-Control: no-cache\r\nContent-Length: 4\r\n\r\npage",
        "/aged" => "HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nAge: 100\r\nContent-Length: 4\r\n\r\npage",
        "/heuristic" => "HTTP/1.1 200 OK\r\nLast-Modified: Thu, 01 Jan 2026 00:00:00 GMT\r\nContent-Length: 4\r\n\r\npage",
        "/nothing" => "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\npage",
        "/tagged" => "HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nSurrogate-Key: a b\r\nContent-Length: 4\r\n\r\npage",
        "/close" => "HTTP/1.0 200 OK\r\nCache-Control: max-age=600\r\n\r\npage",
        "/short" => "HTTP/1.0 200 OK\r\nCache-Control: max-age=600\r\nContent-Length: 10\r\n\r\npage",
        "/unasked-304" => "HTTP/1.1 304 Not Modified\r\nCache-Control: max-age=600\r\nETag: \"e\"\r\n\r\n",
        "/unasked-206" => "HTTP/1.1 206 Partial Content\r\nCache-Control: max-age=600\r\nContent-Range: bytes 0-3/10\r\nContent-Length: 4\r\n\r\npage",
        "/no-length-chunked-gzip" => "HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nTransfer-Encoding: gzip, chunked\r\n\r\n4\r\npage\r\n0\r\n\r\n",
        // RFC 9112 §5.1, §5.2: a proxy removes whitespace before a field's colon and replaces
        // an obs-fold with SP (regression: the front door answered both 502).
        "/space-before-colon" => "HTTP/1.1 200 OK\r\nCache-Control : max-age=600\r\nContent-Length: 4\r\n\r\npage",
        "/obs-fold" => "HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nX-Note: one\r\n  two\r\nContent-Length: 4\r\n\r\npage",
        "/te-identity" => "HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nTransfer-Encoding: identity\r\nContent-Length: 4\r\nConnection: close\r\n\r\npage",
        "/length-list" => "HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nContent-Length: 4, 4\r\n\r\npage",
        "/length-twice" => "HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\npage",
        // RFC 9110 §8.6: no Content-Length on a 204, whatever the origin sent.
        "/no-content-length" => "HTTP/1.1 204 No Content\r\nCache-Control: max-age=600\r\nContent-Length: 4\r\n\r\n",
        _ => "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
    }
}

/// The front door fills a miss itself; pingora's path fills the ones it declines. For every
/// kind of origin answer, both must answer the client alike (status, fields, body) and store
/// alike (what the next request finds, at the front door and on pingora's path). A request with more fields than the front door parses
/// (49) takes pingora's path and means the same to the origin.
#[tokio::test]
async fn a_miss_is_answered_and_stored_alike_on_both_paths() {
    let (addr, _) = scripted_origin(varied_answer).await;
    let skua = Skua::start(&[addr], "").await;
    let padding: String = (0..49).map(|i| format!("X-Pad-{i}: 1\r\n")).collect();
    let cases = [
        "/length",
        "/chunked",
        "/empty",
        "/not-found",
        "/error",
        "/moved",
        "/no-content",
        "/private",
        "/no-store",
        "/cookie",
        "/vary-star",
        "/vary",
        "/expired",
        "/max-age-0",
        "/s-maxage",
        "/cdn",
        "/aged",
        "/heuristic",
        "/nothing",
        "/tagged",
        "/close",
        "/short",
        "/unasked-304",
        "/unasked-206",
        "/no-length-chunked-gzip",
        "/space-before-colon",
        "/obs-fold",
        "/te-identity",
        "/length-list",
        "/length-twice",
        "/no-content-length",
    ];
    let mut differences = Vec::new();
    let ask = |path: &str, padding: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: wiki.test\r\nAccept-Language: en\r\n{padding}Connection: close\r\n\r\n")
    };
    for case in cases {
        let (front_path, full_path) = (format!("{case}/front"), format!("{case}/full"));
        let fills_before = fills(&skua).await;
        let front = comparable(&raw(skua.addr, &ask(&front_path, "")).await);
        assert_eq!(
            fills(&skua).await,
            fills_before + 1.0,
            "{case}: the front door filled it"
        );
        let full = comparable(&raw(skua.addr, &ask(&full_path, &padding)).await);
        assert_eq!(
            fills(&skua).await,
            fills_before + 1.0,
            "{case}: pingora's path filled it"
        );
        if front != full {
            differences.push(format!(
                "{case} first answer:\n  front door {front:?}\n  pingora    {full:?}"
            ));
        }
        // The next plain request for each: a hit where it was stored, whoever stored it.
        let again_front = comparable(&raw(skua.addr, &ask(&front_path, "")).await);
        let again_full = comparable(&raw(skua.addr, &ask(&full_path, "")).await);
        if again_front != again_full {
            differences.push(format!(
                "{case} second answer:\n  after the front door {again_front:?}\n  after pingora        {again_full:?}"
            ));
        }
        // And the third, on pingora's path: a hit (or not) there as at the front door.
        let third = comparable(&raw(skua.addr, &ask(&front_path, &padding)).await);
        if third != again_front {
            differences.push(format!(
                "{case} third answer:\n  front door {again_front:?}\n  pingora    {third:?}"
            ));
        }
    }
    assert!(differences.is_empty(), "{}", differences.join("\n"));
    // RFC 9110 §8.6: no Content-Length on a 204, whatever the origin sent, on either path's
    // miss (regression: both passed the origin's on).
    for (path, more) in [
        ("/no-content-length/a", ""),
        ("/no-content-length/b", &*padding),
    ] {
        let miss = raw(skua.addr, &ask(path, more)).await;
        assert!(miss.starts_with("HTTP/1.1 204 "), "{miss}");
        assert!(miss.contains("x-cache-status: miss"), "{miss}");
        assert!(
            !miss.to_ascii_lowercase().contains("content-length"),
            "{miss}"
        );
    }
}

/// Regression: the front door's fill held an answer's head and body until 64 KiB or the end
/// of the body, so a page the origin flushes early, or an event stream, reached the client
/// only when it was over. Now, on either path, what the origin has sent reaches the client
/// before the origin sends more.
#[tokio::test]
async fn a_slow_answer_reaches_the_client_as_the_origin_sends_it() {
    let go_on = Arc::new(tokio::sync::Notify::new());
    let origin_go_on = go_on.clone();
    let addr = answering_origin(move |mut conn| {
        let go_on = origin_go_on.clone();
        async move {
                let first = "HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n";
                let _ = conn.write_all(first.as_bytes()).await;
                let _ = tokio::time::timeout(Duration::from_secs(10), go_on.notified()).await;
                let _ = conn.write_all(b"4\r\nlast\r\n0\r\n\r\n").await;
        }
    })
    .await;
    let skua = Skua::start(&[addr], "").await;
    let padding: String = (0..49).map(|i| format!("X-Pad-{i}: 1\r\n")).collect();
    for (path, padding) in [("/front", ""), ("/full", padding.as_str())] {
        let fills_before = fills(&skua).await;
        let mut client = tokio::net::TcpStream::connect(skua.addr).await.unwrap();
        let ask =
            format!("GET {path} HTTP/1.1\r\nHost: wiki.test\r\n{padding}Connection: close\r\n\r\n");
        client.write_all(ask.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        let first = tokio::time::timeout(Duration::from_secs(5), async {
            while !String::from_utf8_lossy(&got).contains("first") {
                match client.read(&mut chunk).await {
                    Ok(n) if n > 0 => got.extend_from_slice(&chunk[..n]),
                    _ => break,
                }
            }
        })
        .await;
        let text = String::from_utf8_lossy(&got).into_owned();
        assert!(first.is_ok() && text.contains("first"), "{path}: {text:?}");
        assert!(!text.contains("last"), "{path}: {text:?}");
        go_on.notify_one();
        let _ = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut got)).await;
        let (status, _, body) = split(&String::from_utf8_lossy(&got));
        assert_eq!(status, "HTTP/1.1 200 OK", "{path}");
        assert_eq!(dechunk(body.as_bytes()), b"firstlast", "{path}");
        let expected_fills = fills_before + if path == "/front" { 1.0 } else { 0.0 };
        assert_eq!(fills(&skua).await, expected_fills, "{path}");
    }
}

/// A chunked answer whose chunk size line or trailer section never ends (or not within
/// pingora's bounds, 8 KiB and 64 KiB): the client's answer ends unfinished, nothing is
/// stored, on either path. Regression: the fill buffered either without bound, and stored
/// an answer whose trailers ran past pingora's bound.
#[tokio::test]
async fn a_chunk_line_or_trailer_section_past_the_bounds_fails_the_fill_as_pingoras_path() {
    fn answer(path: &str) -> &'static str {
        static LONG_TRAILERS: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        static LONG_EXTENSION: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let head = "HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n";
        if path.starts_with("/trailers") {
            LONG_TRAILERS.get_or_init(|| {
                format!(
                    "{head}0\r\n{}\r\n",
                    "X-Trailer: 0123456789012345678901234567890123456789\r\n".repeat(2000)
                )
            })
        } else {
            LONG_EXTENSION.get_or_init(|| format!("{head}4;{}", "x".repeat(20_000)))
        }
    }
    let (addr, seen) = scripted_origin(answer).await;
    let skua = Skua::start_tables(&[addr], ["", "read_timeout = \"2s\"", ""], "").await;
    for case in ["/trailers", "/extension"] {
        for version in ["1.1", "1.0", "1.1"] {
            let started = std::time::Instant::now();
            let answer = raw(
                skua.addr,
                &format!("GET {case} HTTP/{version}\r\nHost: wiki.test\r\n\r\n"),
            )
            .await;
            assert!(answer.contains("first"), "{case} {version}: {answer:.300}");
            assert!(
                !answer.ends_with("0\r\n\r\n"),
                "{case} {version}: ended as if whole"
            );
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "{case} {version}: waited"
            );
        }
        let count = seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, p)| p == case)
            .count();
        assert_eq!(count, 3, "{case}: nothing was stored");
    }
}

/// Regression: an origin answer of more than 128 fields (pingora's client takes 256) failed
/// the front door's fill with a 502 where pingora's path served it.
#[tokio::test]
async fn an_answer_of_two_hundred_fields_is_filled_as_pingoras_path_fills_it() {
    fn answer(_: &str) -> &'static str {
        static MANY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        MANY.get_or_init(|| {
            let fields: String = (0..200).map(|i| format!("X-Field-{i}: {i}\r\n")).collect();
            format!("HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\n{fields}Content-Length: 4\r\n\r\npage")
        })
    }
    let (addr, _) = scripted_origin(answer).await;
    let skua = Skua::start(&[addr], "").await;
    for (path, version) in [("/front", "1.1"), ("/full", "1.0")] {
        let answer = raw(
            skua.addr,
            &format!("GET {path} HTTP/{version}\r\nHost: wiki.test\r\nConnection: close\r\n\r\n"),
        )
        .await;
        let (status, fields, body) = split(&answer);
        assert!(status.ends_with(" 200 OK"), "{path}: {answer:.300}");
        assert_eq!(
            (fields["x-field-199"].as_str(), body.as_str()),
            ("199", "page"),
            "{path}"
        );
    }
    assert_eq!(fills(&skua).await, 1.0);
}

/// What the origin receives for a miss must not depend on which path fills it: for requests
/// of many shapes (encodings, odd field case, repeated and empty fields, hosts with ports and
/// dots, odd targets, forwarding fields), the front door's fill and pingora's path send the
/// same target and fields, and so does pingora's path for the same request over HTTP/2 (but
/// for `Via`'s protocol version). Regressions: over HTTP/2 the origin was asked for the host
/// as spelled (`/port`, `/dot`), and got an empty `Host` for a target Skua normalises (`/q`,
/// `/a/../b/./c`).
#[tokio::test]
async fn the_origin_gets_the_same_request_from_either_path() {
    let origin = Origin::start(|_| Reply::ok("page").header("cache-control", "max-age=600")).await;
    let skua = Skua::start_tables(
        &[origin.addr],
        ["trusted_proxies = [\"127.0.0.0/8\"]", "", ""],
        "",
    )
    .await;
    let padding: String = (0..49).map(|i| format!("X-Pad-{i}: 1\r\n")).collect();
    let shapes: [(&str, &str, &str); 15] = [
        ("/plain", "wiki.test", ""),
        (
            "/enc",
            "wiki.test",
            "Accept-Encoding: gzip;q=0.5, br;q=1.0, *;q=0\r\n",
        ),
        (
            "/enc2",
            "wiki.test",
            "Accept-Encoding: identity\r\nAccept-Encoding: deflate\r\n",
        ),
        (
            "/case",
            "wiki.test",
            "uSeR-aGeNt: Mixed/1\r\nACCEPT: */*\r\n",
        ),
        (
            "/repeat",
            "wiki.test",
            "Accept-Language: en\r\nAccept-Language: de\r\n",
        ),
        ("/empty", "wiki.test", "X-Empty:\r\nX-Space:   \r\n"),
        ("/port", "WIKI.test:80", ""),
        ("/dot", "wiki.test.", ""),
        ("/q?b=2&a=1&a=%41", "wiki.test", ""),
        ("/a/../b/./c", "wiki.test", ""),
        ("/p%2Fq%20r", "wiki.test", ""),
        (
            "/fwd",
            "wiki.test",
            "X-Forwarded-For: 10.1.1.1\r\nX-Forwarded-Proto: https\r\n",
        ),
        (
            "/fwd2",
            "wiki.test",
            "X-Forwarded-For: 10.1.1.1\r\nX-Forwarded-For: 10.2.2.2, 10.3.3.3\r\n",
        ),
        (
            "/strip",
            "wiki.test",
            // (`Forwarded` takes a request to pingora's path: from a trusted balancer it
            // names the client.)
            "X-Forwarded-Host: evil\r\nX-Original-URL: /x\r\nProxy: x\r\n",
        ),
        (
            "/nocache",
            "wiki.test",
            "Cache-Control: no-cache\r\nPragma: no-cache\r\n",
        ),
    ];
    let tcp = TcpStream::connect(skua.addr).await.unwrap();
    let (h2, connection) = h2::client::handshake(tcp).await.unwrap();
    let _driver = tokio::spawn(connection);
    let mut differences = Vec::new();
    for (i, (target, host, fields)) in shapes.into_iter().enumerate() {
        let (path, query) = target
            .split_once('?')
            .map_or((target, None), |(p, q)| (p, Some(q)));
        let with = |which: &str| match query {
            Some(q) => format!("/{i}{which}{path}?{q}"),
            None => format!("/{i}{which}{path}"),
        };
        let fills_before = fills(&skua).await;
        for (which, pad) in [("front", ""), ("full", padding.as_str())] {
            let answer = raw(
                skua.addr,
                &format!(
                    "GET {} HTTP/1.1\r\nHost: {host}\r\n{fields}{pad}Connection: close\r\n\r\n",
                    with(which)
                ),
            )
            .await;
            assert!(
                answer.contains(" 200 OK\r\n"),
                "{target} {which}: {answer:.300}"
            );
        }
        assert_eq!(fills(&skua).await, fills_before + 1.0, "{target}");
        // HTTP/2 field values have no surrounding whitespace (RFC 9113 §8.2.1), as an HTTP/1.1
        // parser leaves them.
        let mut req = http::Request::get(format!("http://{host}{}", with("h2")));
        for line in fields.split("\r\n").filter(|l| !l.is_empty()) {
            let (name, value) = line.split_once(':').unwrap();
            req = req.header(name, value.trim());
        }
        let mut send = h2.clone().ready().await.unwrap();
        let (answer, _) = send.send_request(req.body(()).unwrap(), true).unwrap();
        assert_eq!(answer.await.unwrap().status(), 200, "{target} h2");
        let seen = origin.all_requests();
        let received = |which: &str| {
            let r = seen
                .iter()
                .find(|r| r.target.starts_with(&format!("/{i}{which}")))
                .unwrap_or_else(|| panic!("{target} {which}: not at the origin"));
            let mut lines: Vec<String> = r
                .headers
                .iter()
                .filter(|(k, _)| !k.as_str().starts_with("x-pad-"))
                .map(|(k, v)| format!("{k}: {}", String::from_utf8_lossy(v.as_bytes())))
                .map(|field| one_request_id(&field))
                .collect();
            lines.sort();
            (r.target.replacen(which, "", 1), lines)
        };
        let (front, full) = (received("front"), received("full"));
        if front != full {
            differences.push(format!(
                "{target}:\n  front door {front:?}\n  pingora    {full:?}"
            ));
        }
        let (target_h2, mut fields_h2) = received("h2");
        for field in fields_h2.iter_mut() {
            if let Some(node) = field.strip_prefix("via: 2 ") {
                *field = format!("via: 1.1 {node}");
            }
        }
        fields_h2.sort();
        let h2 = (target_h2, fields_h2);
        if front != h2 {
            differences.push(format!(
                "{target}:\n  front door {front:?}\n  HTTP/2     {h2:?}"
            ));
        }
    }
    assert!(differences.is_empty(), "{}", differences.join("\n"));
}

/// Regression: a kept-alive origin connection on which the origin wrote while it sat idle (a
/// `408 Request Timeout` some servers send before they close one) was reused, and what it held
/// was read as the answer to the next miss: the client got the 408. A connection with unread
/// bytes, or closed, is not reused (pingora's pool watches its idle connections the same way).
#[tokio::test]
async fn an_origin_connection_written_to_while_idle_is_not_reused() {
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    let addr = answering_origin(move |mut conn| {
        let counted = counted.clone();
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
            let page =
                "HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nContent-Length: 4\r\n\r\npage";
            let _ = conn.write_all(page.as_bytes()).await;
            // Idle for a moment: then a timeout answer nobody asked for, and the end.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let late =
                "HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
            let _ = conn.write_all(late.as_bytes()).await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    })
    .await;
    let skua = Skua::start(&[addr], "").await;
    let host = [("host", "wiki.test")];
    let first = get(&skua.url("/wiki/A"), &host).await;
    assert_eq!((first.status, first.cache()), (200, "miss"));
    tokio::time::sleep(Duration::from_millis(600)).await;
    let second = get(&skua.url("/wiki/B"), &host).await;
    assert_eq!(
        (second.status, second.cache(), second.text()),
        (200, "miss", "page".into())
    );
    assert_eq!(fills(&skua).await, 2.0);
    assert_eq!(
        connections.load(Ordering::SeqCst),
        2,
        "each miss on a connection of its own"
    );
}

/// The positive control of the two tests above: misses one after another go over one kept-alive
/// origin connection when the origin keeps it open and writes nothing unasked.
#[tokio::test]
async fn front_door_fills_reuse_a_kept_alive_origin_connection() {
    let (addr, seen) = scripted_origin(|_| {
        "HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nContent-Length: 4\r\n\r\npage"
    })
    .await;
    let skua = Skua::start(&[addr], "").await;
    for path in ["/wiki/A", "/wiki/B", "/wiki/C"] {
        let miss = get(&skua.url(path), &[("host", "wiki.test")]).await;
        assert_eq!((miss.status, miss.cache()), (200, "miss"), "{path}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(fills(&skua).await, 3.0);
    let connections: Vec<usize> = seen.lock().unwrap().iter().map(|(c, _)| *c).collect();
    assert_eq!(connections.len(), 3);
    assert!(
        connections.iter().all(|c| *c == connections[0]),
        "{connections:?}"
    );
}

/// Stored objects for [`a_hit_is_answered_alike_by_the_front_door_and_pingoras_path`], by the
/// kind in the first segment of the path.
fn stored_answer(path: &str) -> &'static str {
    match path.split('/').nth(1).unwrap_or("") {
        "page" => "HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nETag: \"v1\"\r\nLast-Modified: Thu, 01 Jan 2026 00:00:00 GMT\r\nContent-Type: application/octet-stream\r\nX-Multi: a\r\nX-Multi: b\r\nContent-Length: 10\r\n\r\n0123456789",
        "html" => "HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nETag: \"h1\"\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: 40\r\n\r\n<p>wiki wiki wiki wiki wiki wiki wiki</p>",
        "vary" => "HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nVary: Accept-Language\r\nETag: \"l1\"\r\nContent-Length: 4\r\n\r\npage",
        "public" => "HTTP/1.1 200 OK\r\nCache-Control: public, max-age=600\r\nContent-Length: 4\r\n\r\npage",
        "revalidate" => "HTTP/1.1 200 OK\r\nCache-Control: max-age=600, must-revalidate\r\nETag: \"r1\"\r\nContent-Length: 4\r\n\r\npage",
        _ => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
    }
}

/// A stored object answers a request the same whichever path takes it: the front door (which
/// answers plain hits itself and hands the rest to pingora) and pingora's path (a request of
/// more fields than the front door parses). For every kind of request a client may send for a
/// stored object (conditional, ranges, client cache directives, encodings, versions, hosts,
/// credentials), both give the same status, fields and body, and send the origin the same
/// number of requests.
#[tokio::test]
async fn a_hit_is_answered_alike_by_the_front_door_and_pingoras_path() {
    let (addr, seen) = scripted_origin(stored_answer).await;
    let skua = Skua::start(&[addr], "").await;
    let padding: String = (0..49).map(|i| format!("X-Pad-{i}: 1\r\n")).collect();
    // (object kind, method and version, Host, fields)
    let cases: &[(&str, &str, &str, &str)] = &[
        ("page", "GET 1.1", "wiki.test", ""),
        ("page", "HEAD 1.1", "wiki.test", ""),
        ("page", "GET 1.0", "wiki.test", ""),
        ("page", "GET 1.1", "WIKI.TEST:80", ""),
        ("page", "GET 1.1", "wiki.test", "If-None-Match: \"v1\"\r\n"),
        ("page", "HEAD 1.1", "wiki.test", "If-None-Match: \"v1\"\r\n"),
        (
            "page",
            "GET 1.1",
            "wiki.test",
            "If-None-Match: W/\"v1\"\r\n",
        ),
        (
            "page",
            "GET 1.1",
            "wiki.test",
            "If-None-Match: \"v0\", \"v1\"\r\n",
        ),
        ("page", "GET 1.1", "wiki.test", "If-None-Match: \"v0\"\r\n"),
        ("page", "GET 1.1", "wiki.test", "If-None-Match: *\r\n"),
        (
            "page",
            "GET 1.1",
            "wiki.test",
            "If-Modified-Since: Fri, 02 Jan 2026 00:00:00 GMT\r\n",
        ),
        (
            "page",
            "GET 1.1",
            "wiki.test",
            "If-Modified-Since: Wed, 31 Dec 2025 00:00:00 GMT\r\n",
        ),
        (
            "page",
            "GET 1.1",
            "wiki.test",
            "If-Modified-Since: yesterday\r\n",
        ),
        (
            "page",
            "GET 1.1",
            "wiki.test",
            "If-None-Match: \"v0\"\r\nIf-Modified-Since: Fri, 02 Jan 2026 00:00:00 GMT\r\n",
        ),
        ("page", "GET 1.1", "wiki.test", "If-Match: \"v0\"\r\n"),
        (
            "page",
            "GET 1.1",
            "wiki.test",
            "If-Unmodified-Since: Wed, 31 Dec 2025 00:00:00 GMT\r\n",
        ),
        ("page", "GET 1.1", "wiki.test", "Range: bytes=0-3\r\n"),
        ("page", "HEAD 1.1", "wiki.test", "Range: bytes=0-3\r\n"),
        ("page", "GET 1.1", "wiki.test", "Range: bytes=-3\r\n"),
        ("page", "GET 1.1", "wiki.test", "Range: bytes=8-\r\n"),
        ("page", "GET 1.1", "wiki.test", "Range: bytes=5-100\r\n"),
        ("page", "GET 1.1", "wiki.test", "Range: bytes=20-30\r\n"),
        ("page", "GET 1.1", "wiki.test", "Range: bytes=x\r\n"),
        ("page", "GET 1.1", "wiki.test", "Range: items=0-3\r\n"),
        (
            "page",
            "GET 1.1",
            "wiki.test",
            "Range: bytes=0-3\r\nIf-Range: \"v1\"\r\n",
        ),
        (
            "page",
            "GET 1.1",
            "wiki.test",
            "Range: bytes=0-3\r\nIf-Range: \"v0\"\r\n",
        ),
        (
            "page",
            "GET 1.1",
            "wiki.test",
            "Range: bytes=0-3\r\nIf-Range: Thu, 01 Jan 2026 00:00:00 GMT\r\n",
        ),
        (
            "page",
            "GET 1.1",
            "wiki.test",
            "Cache-Control: no-cache\r\n",
        ),
        (
            "page",
            "GET 1.1",
            "wiki.test",
            "Cache-Control: max-age=0\r\n",
        ),
        ("page", "GET 1.1", "wiki.test", "Pragma: no-cache\r\n"),
        (
            "page",
            "GET 1.1",
            "wiki.test",
            "Cache-Control: only-if-cached\r\n",
        ),
        (
            "page",
            "GET 1.1",
            "wiki.test",
            "Cache-Control: min-fresh=1000\r\n",
        ),
        (
            "page",
            "GET 1.1",
            "wiki.test",
            "Cache-Control: max-stale\r\n",
        ),
        (
            "page",
            "GET 1.1",
            "wiki.test",
            "Cache-Control: no-store\r\n",
        ),
        ("page", "GET 1.1", "wiki.test", "Expect: 100-continue\r\n"),
        ("page", "GET 1.1", "wiki.test", "Content-Length: 0\r\n"),
        (
            "page",
            "GET 1.1",
            "wiki.test",
            "Authorization: Bearer secret\r\n",
        ),
        (
            "public",
            "GET 1.1",
            "wiki.test",
            "Authorization: Bearer secret\r\n",
        ),
        (
            "revalidate",
            "GET 1.1",
            "wiki.test",
            "Authorization: Bearer secret\r\n",
        ),
        ("page", "GET 1.1", "wiki.test", "Accept-Encoding: gzip\r\n"),
        ("html", "GET 1.1", "wiki.test", ""),
        ("html", "GET 1.1", "wiki.test", "Accept-Encoding: gzip\r\n"),
        (
            "html",
            "GET 1.1",
            "wiki.test",
            "Accept-Encoding: gzip, br\r\n",
        ),
        (
            "html",
            "GET 1.1",
            "wiki.test",
            "Accept-Encoding: gzip;q=0, identity\r\n",
        ),
        ("html", "GET 1.1", "wiki.test", "If-None-Match: \"h1\"\r\n"),
        (
            "html",
            "GET 1.1",
            "wiki.test",
            "If-None-Match: W/\"h1\"\r\nAccept-Encoding: gzip\r\n",
        ),
        ("html", "GET 1.1", "wiki.test", "Range: bytes=0-3\r\n"),
        ("vary", "GET 1.1", "wiki.test", ""),
        ("vary", "GET 1.1", "wiki.test", "Accept-Language: en\r\n"),
        ("vary", "GET 1.1", "wiki.test", "Accept-Language: fr\r\n"),
        ("vary", "GET 1.1", "wiki.test", "If-None-Match: \"l1\"\r\n"),
    ];
    let origin_requests = |path: &str| {
        seen.lock()
            .unwrap()
            .iter()
            .filter(|(_, p)| p == path)
            .count()
    };
    let mut differences = Vec::new();
    for (i, (kind, method_version, host, fields)) in cases.iter().enumerate() {
        let (method, version) = method_version.split_once(' ').unwrap();
        let path = |which: &str| format!("/{kind}/{i}/{which}");
        let mut answers = Vec::new();
        for (which, pad) in [("front", ""), ("full", padding.as_str())] {
            let warm = raw(
                skua.addr,
                &format!(
                    "GET {} HTTP/1.1\r\nHost: wiki.test\r\nConnection: close\r\n\r\n",
                    path(which)
                ),
            )
            .await;
            assert!(
                warm.starts_with("HTTP/1.1 200 OK\r\n"),
                "{i} {which}: {warm:.300}"
            );
            let front_door_hits = skua.hit_paths().await[0];
            let answer = raw(
                skua.addr,
                &format!(
                    "{method} {} HTTP/{version}\r\nHost: {host}\r\n{fields}{pad}Connection: close\r\n\r\n",
                    path(which)
                ),
            )
            .await;
            let front_door_answered = skua.hit_paths().await[0] > front_door_hits;
            assert!(
                !(which == "full" && front_door_answered)
                    && (i > 0 || which == "full" || front_door_answered),
                "{i} {which}: the front door answered? {front_door_answered}"
            );
            answers.push((comparable(&answer), origin_requests(&path(which))));
        }
        if answers[0] != answers[1] {
            differences.push(format!(
                "{i}: {kind} {method_version} Host: {host} {fields:?}\n  front door {:?}\n  pingora    {:?}",
                answers[0], answers[1]
            ));
        }
    }
    assert!(differences.is_empty(), "{}", differences.join("\n"));
}

/// Regression: a fill whose answer would not be stored held the cache lock until its body
/// ended, so a reader that came meanwhile waited out the whole slow transfer before going to
/// the origin itself (pingora's path lets such readers go at the answer's head). The second
/// reader comes before the head, so no mark of the URL lets it skip the lock.
#[tokio::test]
async fn a_reader_waiting_on_a_fill_that_stores_nothing_goes_at_its_head() {
    let arrivals = Arc::new(AtomicUsize::new(0));
    let counted = arrivals.clone();
    let origin = answering_origin(move |mut conn| {
        counted.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_millis(1000)).await;
            let head = "HTTP/1.1 200 OK\r\nCache-Control: private\r\nContent-Length: 8000\r\n\r\n";
            if conn.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            for _ in 0..8 {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if conn.write_all(&[b'x'; 1000]).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    let skua = Skua::start(&[origin], "").await;
    let url = skua.url("/slow-private");
    let first = get_in_flight(&url, &[]);
    wait_until("the first reader reaches the origin", || {
        arrivals.load(Ordering::SeqCst) == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let second = get_in_flight(&url, &[]);
    wait_until("the second reader reaches the origin", || {
        arrivals.load(Ordering::SeqCst) == 2
    })
    .await;
    // It came before the answer's head (1 s), and waited for it: not for the 4 s body after.
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "the second reader waited {:?} for a 4 s body it could not use",
        started.elapsed()
    );
    for reader in [first, second] {
        let got = reader.await.unwrap();
        assert_eq!((got.status, got.body.len()), (200, 8000));
    }
}

/// Regression: a fill keeps its body until the body ends, and fills in progress had no bound
/// together: clients asking at once for many large objects not yet stored made Skua hold
/// their sum (30 fills of 40 MiB: 960 MiB resident, with `memory_size` at 256 MiB). Now they
/// hold at most `[cache] fill_memory`, on either path: a fill that finds no room streams on
/// unstored (counted), every client gets its whole answer, and the next miss stores the URL.
#[tokio::test]
async fn fills_in_progress_hold_no_more_than_fill_memory_together() {
    const BODY: usize = 3 << 20;
    const FIRST_PART: usize = BODY - 4096;
    const FILLS: usize = 24;
    let released = Arc::new(tokio::sync::Semaphore::new(0));
    let asked = counter();
    let (origin_released, origin_asked) = (released.clone(), asked.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let (released, asked) = (origin_released.clone(), origin_asked.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some(head) = next_request_head(&mut conn, &mut buf).await {
                    if head.starts_with("GET /_health ") {
                        let _ = conn.write_all(HEALTH_ANSWER.as_bytes()).await;
                        continue;
                    }
                    let path = head.split(' ').nth(1).unwrap_or("").to_string();
                    *asked.lock().unwrap().entry(path.clone()).or_default() += 1;
                    let body = path.as_bytes().iter().cycle().take(BODY).copied();
                    let body: Vec<u8> = body.collect();
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nContent-Length: {BODY}\r\n\r\n"
                    );
                    let _ = conn.write_all(head.as_bytes()).await;
                    let _ = conn.write_all(&body[..FIRST_PART]).await;
                    // Paused until the test has looked at Skua's memory; open afterwards.
                    let _ = released.acquire().await.map(|p| p.forget());
                    released.add_permits(1);
                    if conn.write_all(&body[FIRST_PART..]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    // The origin pauses until every body's first part is through (longer than the default
    // `read_timeout` on a loaded machine).
    let skua = Skua::start_tables(
        &[addr],
        [
            "",
            "read_timeout = \"60s\"",
            "memory_size = 134217728\nmax_object_size = 4194304\nfill_memory = 4194304",
        ],
        "",
    )
    .await;
    // Half by the front door, half by pingora's path (HTTP/1.0 always takes it).
    let ask = |i: usize| {
        let version = if i.is_multiple_of(2) { "1.1" } else { "1.0" };
        format!("GET /big/{i} HTTP/{version}\r\nHost: wiki.test\r\nConnection: close\r\n\r\n")
    };
    let resident_before = resident_kib(skua.pid());
    let received = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for i in 0..FILLS {
        let (request, received) = (ask(i), received.clone());
        let addr = skua.addr;
        clients.push(tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut got = Vec::new();
            let mut chunk = vec![0u8; 64 * 1024];
            loop {
                match stream.read(&mut chunk).await {
                    Ok(n) if n > 0 => {
                        got.extend_from_slice(&chunk[..n]);
                        received.fetch_add(n, Ordering::Relaxed);
                    }
                    _ => return got,
                }
            }
        }));
    }
    // Every fill has had its first part through Skua (the clients have it).
    wait_until("every client has the first part of its body", || {
        received.load(Ordering::Relaxed) >= FILLS * FIRST_PART
    })
    .await;
    let grown_kib = resident_kib(skua.pid()) - resident_before;
    let fills = skua.stats().await["fills"].clone();
    let held = fills["bytes"].as_u64().unwrap();
    assert!(held > 0 && held <= 4 << 20, "{fills}");
    assert_eq!(fills["capacity_bytes"], 4 << 20);
    released.add_permits(1);
    for (i, client) in clients.into_iter().enumerate() {
        let got = client.await.unwrap();
        let head_end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let head = String::from_utf8_lossy(&got[..head_end]);
        assert!(head.contains(" 200 "), "{i}: {head}");
        assert_eq!(got.len() - head_end, BODY, "{i}: {head}");
        let path = format!("/big/{i}");
        assert!(got[head_end..].starts_with(path.as_bytes()), "{i}");
    }
    // 24 bodies of 3 MiB went through at once; without the bound Skua held them all
    // (and pingora's path a second copy for its memory tier): about 60 MiB.
    assert!(
        grown_kib < 32 * 1024,
        "resident memory grew {grown_kib} KiB with {FILLS} fills of 3 MiB in progress"
    );
    let refused = skua
        .metric(r#"skua_uncacheable_total{reason="fill-memory"}"#)
        .await;
    assert!(refused >= 8.0, "{refused} fills found no room");
    // What found no room is stored by its next miss; then every URL is a hit.
    for round in 0..2 {
        for i in 0..FILLS {
            let (status, fields, body) = raw_bytes(skua.addr, &ask(i)).await;
            assert!(status.contains(" 200 "), "{round} {i}: {status}");
            assert_eq!(body.len(), BODY, "{round} {i}");
            if round == 1 {
                assert!(
                    fields["x-cache-status"].starts_with("hit-"),
                    "{i}: {fields:?}"
                );
            }
        }
    }
    let fetched: usize = asked.lock().unwrap().values().sum();
    assert!(
        fetched <= 2 * FILLS && fetched as f64 == FILLS as f64 + refused,
        "{fetched} fetches, {refused} refused"
    );
}
