//! `/metrics` after known traffic: exact lines, as a dashboard would read them.

use std::time::{Duration, Instant};

use crate::support::*;

#[tokio::test]
async fn metrics_count_known_traffic_exactly() {
    let origin = Origin::start(|req| match req.path.as_str() {
        "/m" => Reply::ok(vec![b'x'; 1000]).header("cache-control", "max-age=600"),
        _ => Reply::ok("p").header("cache-control", "no-store"),
    })
    .await;
    let skua = Skua::start(&[origin.addr], "").await;
    for _ in 0..3 {
        get(&skua.url("/m"), &[]).await;
    }
    get(&skua.url("/p"), &[]).await;
    assert_eq!(
        send(&client(), "PURGE", &skua.url("/m"), &[]).await.status,
        204
    );

    let expected = [
        "skua_requests_total{cache_status=\"miss\",status_class=\"2xx\"} 1\n",
        "skua_requests_total{cache_status=\"hit-front\",status_class=\"2xx\"} 2\n",
        "skua_requests_total{cache_status=\"pass\",status_class=\"2xx\"} 1\n",
        "skua_requests_total{cache_status=\"int-front\",status_class=\"2xx\"} 1\n",
        "skua_requests_total{cache_status=\"hit-front\",status_class=\"5xx\"} 0\n",
        "skua_response_body_bytes_total{cache_status=\"miss\"} 1000\n",
        "skua_response_body_bytes_total{cache_status=\"hit-front\"} 2000\n",
        "skua_response_body_bytes_total{cache_status=\"pass\"} 1\n",
        "skua_uncacheable_total{reason=\"no-store\"} 1\n",
        "skua_purges_total{result=\"purged\",source=\"http\"} 1\n",
        "skua_cache_tier_events_total{event=\"hit\",tier=\"memory\"} 2\n",
        "skua_cache_objects{tier=\"memory\"} 0\n",
        "skua_request_duration_seconds_count{cache_status=\"hit-front\"} 2\n",
        "skua_origin_requests_total{pool=\"test\",status_class=\"2xx\"} 2\n",
        "skua_origin_response_seconds_count{pool=\"test\"} 2\n",
        "skua_coalesced_requests_total 0\n",
    ];
    // Requests are counted as they finish logging, just after the response: allow a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut text = skua.metrics().await;
    while expected.iter().any(|l| !text.contains(l)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        text = skua.metrics().await;
    }
    for line in expected {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
}

#[tokio::test]
async fn access_log_records_each_request_with_its_cache_status() {
    let origin = logged_origin().await;
    let (skua, log, _dir) = logging_skua(&origin, "combined").await;
    get(&skua.url("/logged?x=1"), &[("user-agent", "skua-test")]).await;
    get(&skua.url("/logged?x=1"), &[("user-agent", "skua-test")]).await;
    let text = logged_lines(&log, 2).await;
    // Each request came on its own connection, so their lines may be in either order.
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines.iter().all(|l| l.starts_with("127.0.0.1 - - [")),
        "{text}"
    );
    let common = "\"GET /logged?x=1 HTTP/1.1\" 200 6 \"-\" \"skua-test\" ";
    assert!(
        lines.iter().any(|l| l.contains(&format!("{common}miss "))),
        "{text}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&format!("{common}hit-front "))),
        "{text}"
    );
}

#[tokio::test]
async fn evictions_are_counted_by_reason() {
    let origin = Origin::start(|req| match req.path.as_str() {
        // No stale window of its own, and none from `[cache] stale_if_error` either.
        "/short" => Reply::ok("brief").header("cache-control", "max-age=1, stale-if-error=0"),
        "/kept" => Reply::ok("kept")
            .header("cache-control", "max-age=1")
            .header("etag", "\"k\""),
        _ => Reply::ok(vec![b'b'; 100_000]).header("cache-control", "max-age=600"),
    })
    .await;
    let skua = Skua::start(&[origin.addr], "").await;
    get(&skua.url("/short"), &[]).await;
    get(&skua.url("/kept"), &[]).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    // 250 objects of 100 kB into a 16 MiB tier: about a third are evicted for room.
    for i in 0..250 {
        get(&skua.url(&format!("/big/{i}")), &[]).await;
    }
    let value = |text: &str, series: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0)
    };
    let text = skua.metrics().await;
    let expired = value(
        &text,
        "skua_cache_evictions_total{reason=\"expired\",tier=\"memory\"}",
    );
    let size = value(
        &text,
        "skua_cache_evictions_total{reason=\"size\",tier=\"memory\"}",
    );
    let objects = value(&text, "skua_cache_objects{tier=\"memory\"}");
    // `/short` had nothing left to serve; `/kept` is kept for revalidation, or evicted for
    // room, never counted as expired.
    assert_eq!(expired, 1, "{text}");
    assert!(size >= 15, "{text}");
    assert_eq!(
        size + expired + objects,
        252,
        "every stored object is still there or counted"
    );
}

/// Regression: an absolute-form PURGE (`PURGE http://wiki.test/wiki/X`, as MediaWiki sends
/// it) was logged with an empty host.
#[tokio::test]
async fn the_access_log_names_the_host_of_an_absolute_form_purge() {
    let origin = logged_origin().await;
    let (skua, log, _dir) = logging_skua(&origin, "json").await;
    let answer = raw(
        skua.addr,
        "PURGE http://wiki.test/wiki/X HTTP/1.1\r\nHost: wiki.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    let (text, lines) = logged_json(&log, 1).await;
    let line = &lines[0];
    assert_eq!(line["method"], "PURGE");
    assert_eq!(line["host"], "wiki.test", "{text}");
    assert_eq!(line["cache_status"], "int-front");
    // Regression: a request refused before its URL was made (here a target that is no path)
    // was logged with an empty host.
    let refused = raw(
        skua.addr,
        "GET nopath HTTP/1.1\r\nHost: other.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(refused.starts_with("HTTP/1.1 400"), "{refused}");
    let (text, lines) = logged_json(&log, 2).await;
    assert_eq!(lines[1]["host"], "other.test", "{text}");
}

/// Regression: Skua's own answers (a refusal, a PURGE's, `only-if-cached`'s 504) were logged
/// with `0` bytes though each has a body, and a HEAD that missed with the length of the body
/// the origin sent, which the client never got: the access log's bytes are the body bytes
/// the client was sent, as nginx's `$body_bytes_sent`.
#[tokio::test]
async fn the_access_log_counts_the_body_bytes_each_client_was_sent() {
    let origin = logged_origin().await;
    let (skua, log, _dir) = logging_skua(&origin, "json").await;
    let uncached = get(&skua.url("/none"), &[("cache-control", "only-if-cached")]).await;
    assert_eq!(uncached.status, 504);
    let purged = send(&client(), "PURGE", &skua.url("/none"), &[]).await;
    assert_eq!(purged.status, 404);
    let refused = get(&skua.url("/p"), &[("connection", "x-forwarded-for")]).await;
    assert_eq!(refused.status, 400);
    let head = send(&client(), "HEAD", &skua.url("/head"), &[]).await;
    assert_eq!(head.cache(), "miss");
    let (text, lines) = logged_json(&log, 4).await;
    let logged = |method: &str, status: u64| {
        (lines.iter())
            .find(|l| l["method"] == method && l["status"] == status)
            .unwrap_or_else(|| panic!("no {method} {status} line: {text}"))["bytes"]
            .as_u64()
    };
    for (method, got) in [("GET", &uncached), ("PURGE", &purged), ("GET", &refused)] {
        assert!(!got.body.is_empty());
        let sent = Some(got.body.len() as u64);
        assert_eq!(logged(method, u64::from(got.status)), sent, "{text}");
    }
    assert_eq!(logged("HEAD", 200), Some(0), "{text}");
}

/// A request head refused before pingora read it (malformed: 400, another HTTP version: 505) is
/// logged as nginx logs a bad request: its method and target as sent, its host and client.
/// Regression: counted in `skua_connections_refused_total` but never logged, so an operator
/// could not see which clients were refused, or for what.
#[tokio::test]
async fn a_malformed_request_head_is_in_the_access_log() {
    let origin = logged_origin().await;
    let (skua, log, _dir) = logging_skua(&origin, "json").await;
    let bad_field =
        "GET /a HTTP/1.1\r\nHost: wiki.test\r\nUser-Agent: probe/1\r\nX-A: b\x00c\r\n\r\n";
    let answer = raw(skua.addr, bad_field).await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    let answer = raw(skua.addr, "GET /b HTTP/3.0\r\nHost: wiki.test\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 505 "), "{answer}");
    let (text, lines) = logged_json(&log, 2).await;
    let (bad, version) = (&lines[0], &lines[1]);
    assert_eq!(
        (&bad["method"], &bad["target"], &bad["status"], &bad["host"]),
        (
            &"GET".into(),
            &"/a".into(),
            &400.into(),
            &"wiki.test".into()
        ),
        "{text}"
    );
    assert_eq!(bad["user_agent"], "probe/1", "{text}");
    assert_eq!(bad["client"], "127.0.0.1", "{text}");
    assert_eq!(bad["cache_status"], "int-front", "{text}");
    let body = answer.split_once("\r\n\r\n").map_or(0, |(_, b)| b.len());
    assert_eq!(version["bytes"], body as u64, "{text}");
    assert_eq!(
        (&version["target"], &version["status"]),
        (&"/b".into(), &505.into())
    );
}

/// A request head refused for what arrived of it (too slow: 408, too large: 431, a chunked body
/// already broken: 400) is logged as a malformed one is, with as much of its request line and
/// fields as arrived. Regression: counted in `skua_connections_refused_total` only, so an
/// operator could not tell which clients sent oversized or trickled heads.
#[tokio::test]
async fn a_request_head_too_slow_too_large_or_with_a_broken_body_is_in_the_access_log() {
    let origin = logged_origin().await;
    let (skua, log, _dir) = logging_skua_with(&origin, "json", "header_timeout = \"1s\"").await;
    let slow = "GET /slow HTTP/1.1\r\nHost: wiki.test\r\nUser-Agent: slow/1\r\n";
    let answer = raw(skua.addr, slow).await;
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    logged_lines(&log, 1).await; // before the next, which could log first
    let large = format!(
        "GET /large HTTP/1.1\r\nHost: wiki.test\r\nUser-Agent: large/1\r\nX-Big: {}\r\n\r\n",
        "b".repeat(64 * 1024)
    );
    let answer = raw(skua.addr, &large).await;
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
    logged_lines(&log, 2).await; // before the next, which could log first
    let broken = "POST /broken HTTP/1.1\r\nHost: wiki.test\r\nUser-Agent: broken/1\r\n\
                  Transfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n";
    let answer = raw(skua.addr, broken).await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    let (text, lines) = logged_json(&log, 3).await;
    let logged: Vec<_> = (lines.iter())
        .map(|l| {
            (
                l["method"].as_str().unwrap_or_default(),
                l["target"].as_str().unwrap_or_default(),
                l["status"].as_u64().unwrap_or_default(),
                l["host"].as_str().unwrap_or_default(),
                l["user_agent"].as_str().unwrap_or_default(),
                l["client"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        logged,
        [
            ("GET", "/slow", 408, "wiki.test", "slow/1", "127.0.0.1"),
            ("GET", "/large", 431, "wiki.test", "large/1", "127.0.0.1"),
            ("POST", "/broken", 400, "wiki.test", "broken/1", "127.0.0.1"),
        ],
        "{text}"
    );
    assert_eq!(origin.count("/slow") + origin.count("/large"), 0);
}

/// A request refused before its URL was made (here for a host this cache does not serve) is
/// logged with the host it asked for, over HTTP/2 too, where `:authority` names it.
/// Regression: over HTTP/2 its host was logged empty (it was read from `Host` alone).
#[tokio::test]
async fn a_request_for_a_host_not_served_is_logged_with_its_host_over_http2_too() {
    let origin = logged_origin().await;
    let (skua, log, _dir) = logging_skua_with(&origin, "json", "hosts = [\"wiki.test\"]").await;
    let answer = raw(
        skua.addr,
        "GET /one HTTP/1.1\r\nHost: other.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 421 "), "{answer}");
    let tcp = tokio::net::TcpStream::connect(skua.addr).await.unwrap();
    let (send, connection) = h2::client::handshake(tcp).await.unwrap();
    let _driver = tokio::spawn(connection);
    let req = http::Request::get("http://other.test/two")
        .body(())
        .unwrap();
    let (answer, _) = send.ready().await.unwrap().send_request(req, true).unwrap();
    assert_eq!(answer.await.unwrap().status(), 421);
    let (text, lines) = logged_json(&log, 2).await;
    let logged: Vec<_> = (lines.iter())
        .map(|l| {
            (
                l["target"].as_str(),
                l["status"].as_u64(),
                l["host"].as_str(),
            )
        })
        .collect();
    assert_eq!(
        logged,
        [
            (Some("/one"), Some(421), Some("other.test")),
            (Some("/two"), Some(421), Some("other.test")),
        ],
        "{text}"
    );
}

/// Regression: a stored copy in a coding the client does not take is decoded on its way out,
/// and the access log (and `skua_response_body_bytes_total`) counted the stored, compressed
/// bytes: a 4,400-byte page a client was sent was logged as 475. Bytes are what the client
/// was sent, as nginx's `$body_bytes_sent`, whichever path answered.
#[tokio::test]
async fn the_access_log_counts_a_decoded_answer_as_sent_not_as_stored() {
    let page = "<p>The wiki page text, much like the next paragraph.</p>\n".repeat(80);
    let gzipped = gzip(&page);
    let origin = Origin::start(move |req| {
        let reply = if req.path.starts_with("/gzip") {
            Reply::ok(gzipped.clone()).header("content-encoding", "gzip")
        } else {
            Reply::ok(page.clone())
        };
        (reply.header("content-type", "text/html"))
            .header("cache-control", "max-age=600")
            .header("vary", "Accept-Encoding")
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let extra = format!("[log]\naccess = \"{}\"\nformat = \"json\"\n", log.display());
    let skua = Skua::start(&[origin.addr], &extra).await;
    let identity = [("accept-encoding", "identity")];
    let mut answers = Vec::new();
    for (path, headers) in [
        ("/gzip", &identity[..]), // the origin's gzip, decoded on a miss
        ("/gzip", &identity[..]), // and on a hit
        ("/plain", &[("accept-encoding", "gzip")]), // stored as gzip
        ("/plain", &identity[..]), // decoded on a hit
        ("/plain", &[("skua-soft-purge", "1")]), // soft purge: the next is revalidated
        ("/plain", &identity[..]), // decoded after the origin's answer
    ] {
        let method = if headers[0].0 == "skua-soft-purge" {
            "PURGE"
        } else {
            "GET"
        };
        let got = send(&client(), method, &skua.url(path), headers).await;
        assert!(got.status < 300, "{path}: {}", got.status);
        answers.push((
            got.header("x-cache-status").to_string(),
            got.body.len() as u64,
        ));
        // A line is written after its answer: the next request could log first.
        logged_lines(&log, answers.len()).await;
    }
    let (text, lines) = logged_json(&log, answers.len()).await;
    let logged: Vec<_> = (lines.iter())
        .map(|l| {
            (
                l["cache_status"].as_str().unwrap_or("").to_string(),
                l["bytes"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(logged, answers, "{text}");
    assert!(answers.iter().any(|(_, sent)| *sent > 4000), "{answers:?}");
}

/// A JSON access line names the origin that answered and how long its answer's head took
/// (nginx's `$upstream_addr`, `$upstream_header_time`), on both paths a miss takes (the front
/// door's fill for a GET, pingora's for a POST), and nothing for a hit.
#[tokio::test]
async fn the_json_access_log_names_the_origin_that_answered_and_its_wait() {
    let origin = Origin::start(|seen| {
        let reply = Reply::ok("logged").header("cache-control", "max-age=60");
        if seen.path == "/slow" {
            reply.delay(Duration::from_millis(150))
        } else {
            reply
        }
    })
    .await;
    let (skua, log, _dir) = logging_skua(&origin, "json").await;
    assert_eq!(get(&skua.url("/slow"), &[]).await.cache(), "miss");
    assert_eq!(get(&skua.url("/slow"), &[]).await.cache(), "hit-front");
    let posted = send(&client(), "POST", &skua.url("/slow"), &[]).await;
    assert_eq!(posted.status, 200);
    let (text, lines) = logged_json(&log, 3).await;
    // A line is written after its answer went out, so they may come in another order.
    let line = |status: &str| {
        (lines.iter())
            .find(|l| l["cache_status"] == status)
            .unwrap_or_else(|| panic!("no {status} line: {text}"))
    };
    let addr = origin.addr.to_string();
    for (method, status) in [("GET", "miss"), ("POST", "pass")] {
        let line = line(status);
        assert_eq!(line["method"], method, "{text}");
        assert_eq!(line["origin"].as_str(), Some(addr.as_str()), "{text}");
        let waited = line["origin_ms"].as_f64().unwrap_or(0.0);
        assert!((150.0..5000.0).contains(&waited), "{text}");
        assert!(
            line["duration_ms"].as_f64().unwrap_or(0.0) >= waited,
            "{text}"
        );
    }
    let hit = line("hit-front");
    assert!(
        hit["origin"].is_null() && hit["origin_ms"].is_null(),
        "{text}"
    );
}

/// `[server] request_id`: each request that goes to an origin carries an id in `X-Request-Id`
/// (a new UUID; a trusted balancer's own), the same id in its JSON access-log line and on the
/// error page; a hit has none; a client's own is never passed on. On both paths a miss takes
/// (the front door's fill; pingora's path, for a POST).
#[tokio::test]
async fn each_request_to_an_origin_carries_an_id_the_log_and_the_error_page_name() {
    let origin = Origin::start(|seen| {
        Reply::ok(format!("id {}", seen.header("x-request-id").unwrap_or("-")))
            .header("cache-control", "max-age=60")
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let page = dir.path().join("error.html");
    std::fs::write(&page, "request {{request_id}}").unwrap();
    let extra = format!("[log]\naccess = \"{}\"\nformat = \"json\"\n", log.display());
    let server = format!("error_page = \"{}\"", page.display());
    let skua = Skua::start_tables(&[origin.addr], [&server, "", ""], &extra).await;
    let claimed = [("x-request-id", "forged-by-client")];
    let miss = get(&skua.url("/id"), &claimed).await;
    let hit = get(&skua.url("/id"), &claimed).await;
    let posted = send(&client(), "POST", &skua.url("/id"), &claimed).await;
    let (miss_id, posted_id) = (miss.text(), posted.text());
    for id in [&miss_id, &posted_id] {
        let id = id.strip_prefix("id ").unwrap();
        assert_eq!(id.len(), 36, "{id}");
        assert_eq!(id.matches('-').count(), 4, "{id}");
    }
    assert_ne!(miss_id, posted_id);
    assert_eq!(hit.text(), miss_id, "a hit is the stored answer");
    let (text, lines) = logged_json(&log, 3).await;
    let logged = |status: &str| {
        let line = (lines.iter())
            .find(|l| l["cache_status"] == status)
            .unwrap_or_else(|| panic!("no {status} line: {text}"));
        line["request_id"].as_str().map(|id| format!("id {id}"))
    };
    assert_eq!(logged("miss"), Some(miss_id));
    assert_eq!(logged("pass"), Some(posted_id));
    assert_eq!(logged("hit-front"), None);

    // The error page names the id the log has for the failed request.
    origin.stop();
    let failed = get(&skua.url("/down"), &[]).await;
    assert_eq!(failed.status, 502);
    let shown = failed.text();
    let id = shown.strip_prefix("request ").unwrap();
    assert_eq!(id.len(), 36, "{shown}");
    let text = logged_lines(&log, 4).await;
    assert!(text.contains(&format!("\"request_id\":\"{id}\"")), "{text}");
    origin.restart().await;

    // A trusted balancer's id is passed on, on both paths.
    let behind = Skua::start_tables(
        &[origin.addr],
        ["trusted_proxies = [\"127.0.0.0/8\"]", "", ""],
        "",
    )
    .await;
    let given = [("x-request-id", "lb-7f3a")];
    for method in ["GET", "POST"] {
        let got = send(&client(), method, &behind.url("/lb"), &given).await;
        assert_eq!(got.text(), "id lb-7f3a", "{method}");
    }
}

/// An origin whose every page may be stored for a minute.
async fn logged_origin() -> Origin {
    Origin::start(|_| Reply::ok("logged").header("cache-control", "max-age=60")).await
}

/// A Skua in front of `origin` writing its access log in `format` ("combined" or "json") to
/// a temporary directory: the Skua, the log's path, and the directory (kept while it runs).
async fn logging_skua(
    origin: &Origin,
    format: &str,
) -> (Skua, std::path::PathBuf, tempfile::TempDir) {
    logging_skua_with(origin, format, "").await
}

/// [`logging_skua`] with `server` lines in its `[server]` table.
async fn logging_skua_with(
    origin: &Origin,
    format: &str,
    server: &str,
) -> (Skua, std::path::PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let extra = format!(
        "[log]\naccess = \"{}\"\nformat = \"{format}\"\n",
        log.display()
    );
    let skua = Skua::start_tables(&[origin.addr], [server, "", ""], &extra).await;
    (skua, log, dir)
}

/// [`logged_lines`] as JSON objects, with the text they came from.
async fn logged_json(log: &std::path::Path, n: usize) -> (String, Vec<serde_json::Value>) {
    let text = logged_lines(log, n).await;
    let lines = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (text, lines)
}

/// The access log at `log` once it has `n` lines (waited for up to 10 s: a writer thread
/// writes them).
async fn logged_lines(log: &std::path::Path, n: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.lines().count() >= n {
            return text;
        }
        assert!(Instant::now() < deadline, "{n} lines not logged: {text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `skua_origins{pool,state}`: each pool's origins by state, read at each scrape, so that an
/// alert can fire on a pool with none up. Before, only `/stats` and the dashboard said so.
#[tokio::test]
async fn each_pools_origins_are_counted_by_state() {
    let origin = Origin::start(|_| Reply::ok("up")).await;
    // Nothing listens on port 1: its health checks fail.
    let dead: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
    let skua = Skua::start(&[origin.addr, dead], "").await;
    let series = |state: &str| format!("skua_origins{{pool=\"test\",state=\"{state}\"}}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while skua.metric(&series("down")).await < 1.0 {
        assert!(Instant::now() < deadline, "{}", skua.metrics().await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(skua.metric(&series("up")).await, 1.0);
    assert_eq!(skua.metric(&series("resting")).await, 0.0);
    assert_eq!(skua.metric(&series("down")).await, 1.0);
    // `/stats` says the same of each origin.
    let stats = skua.stats().await;
    let state_of = |addr: std::net::SocketAddr| {
        let origins = stats["origins"].as_array().cloned().unwrap_or_default();
        (origins.iter())
            .find(|o| o["address"] == addr.to_string())
            .map(|o| o["state"].clone())
    };
    assert_eq!(
        state_of(origin.addr),
        Some(serde_json::json!("up")),
        "{stats}"
    );
    assert_eq!(state_of(dead), Some(serde_json::json!("down")), "{stats}");
}

/// `skua purge --htcp` refuses what is not an absolute URL instead of sending a packet that
/// purges nothing.
#[test]
fn skua_purge_refuses_a_url_that_is_not_absolute() {
    let receiver = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let out = std::process::Command::new(skua_bin())
        .args(["purge", "--htcp"])
        .arg(receiver.local_addr().unwrap().to_string())
        .args(["http://wiki.test/wiki/Good", "not-a-url"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not an absolute http(s) URL: \"not-a-url\""),
        "{stderr}"
    );
    receiver.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 1500];
    assert!(receiver.recv(&mut buf).is_err(), "a packet was sent");
}

/// Regression: the "combined" log had an HTTP date (`[Tue, 01 Dec 2026 03:18:33 GMT]`) and
/// always `HTTP/1.1`, so log analysers rejected every line. GoAccess, reading it with its
/// stock COMBINED format, must accept every line Skua writes.
#[tokio::test]
async fn goaccess_reads_the_combined_access_log_unchanged() {
    if std::process::Command::new("goaccess")
        .arg("--version")
        .output()
        .is_err()
    {
        return prerequisite_missing("goaccess (apt-get install goaccess)");
    }
    let origin = Origin::start(|_| Reply::ok("logged").header("cache-control", "max-age=60")).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let skua = Skua::start(
        &[origin.addr],
        &format!("[log]\naccess = \"{}\"\n", log.display()),
    )
    .await;
    get(&skua.url("/wiki/A"), &[("user-agent", "skua-test")]).await;
    get(&skua.url("/wiki/A"), &[("referer", "http://wiki.test/")]).await;
    raw(skua.addr, "GET /wiki/A HTTP/1.0\r\nHost: wiki.test\r\n\r\n").await;
    // As MediaWiki sends it: absolute form. The log keeps the target as sent.
    raw(
        skua.addr,
        "PURGE http://wiki.test/wiki/A HTTP/1.1\r\nHost: wiki.test\r\nUser-Agent: MediaWiki/1.39\r\nConnection: close\r\n\r\n",
    )
    .await;
    let mut text = String::new();
    wait_until("four log lines", || {
        text = std::fs::read_to_string(&log).unwrap_or_default();
        text.lines().count() >= 4
    })
    .await;
    assert!(text.contains("\"GET /wiki/A HTTP/1.0\" 200 "), "{text}");
    assert!(
        text.contains("\"PURGE http://wiki.test/wiki/A HTTP/1.1\" 204 "),
        "{text}"
    );
    let report = dir.path().join("report.json");
    let out = std::process::Command::new("goaccess")
        .arg(&log)
        .args(["--log-format=COMBINED", "--no-global-config", "-o"])
        .arg(&report)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "goaccess: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let general = &report["general"];
    assert_eq!(
        (
            general["valid_requests"].as_u64(),
            general["failed_requests"].as_u64()
        ),
        (Some(4), Some(0)),
        "{text}"
    );
}

/// Regression: the access log was opened once. After logrotate renamed it, every later line
/// went to the renamed file (and, once that was deleted, to no file at all, the disk space
/// held until a restart); SIGUSR1, which `postrotate` scripts written for nginx send, ended
/// the process. Now the path is followed: a rename is noticed within a second, and SIGUSR1
/// opens the file again at once.
#[tokio::test]
async fn the_access_log_follows_its_path_across_a_rotation_and_sigusr1_reopens_it() {
    let origin = Origin::start(|_| Reply::ok("logged").header("cache-control", "max-age=60")).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let mut skua = Skua::start(
        &[origin.addr],
        &format!("[log]\naccess = \"{}\"\n", log.display()),
    )
    .await;
    let logged = |path: &std::path::Path, what: &str| {
        std::fs::read_to_string(path).is_ok_and(|text| text.contains(what))
    };
    get(&skua.url("/before"), &[]).await;
    wait_until("/before logged", || logged(&log, "/before")).await;

    // logrotate without a postrotate script: rename, and nothing told.
    let first = dir.path().join("access.log.1");
    std::fs::rename(&log, &first).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    get(&skua.url("/after-rename"), &[]).await;
    wait_until("/after-rename in the new file", || {
        logged(&log, "/after-rename")
    })
    .await;
    assert!(!logged(&first, "/after-rename"));
    assert!(logged(&first, "/before"));

    // With nginx's postrotate: rename, then SIGUSR1 at once.
    let second = dir.path().join("access.log.2");
    std::fs::rename(&log, &second).unwrap();
    skua.signal("USR1");
    tokio::time::sleep(Duration::from_millis(400)).await;
    get(&skua.url("/after-usr1"), &[]).await;
    wait_until("/after-usr1 in the new file", || {
        logged(&log, "/after-usr1")
    })
    .await;
    assert!(!logged(&second, "/after-usr1"));
    assert!(skua.alive(), "SIGUSR1 ended the process");
}
