//! The front door (`src/proxy/fast.rs`): fresh memory hits for plain HTTP/1.1 GET and HEAD are
//! answered before pingora builds a session. They must look exactly like hits answered by the
//! full path, and anything the front door is not sure about must reach the full path.

use std::collections::BTreeMap;

use crate::support::*;

const HOST: (&str, &str) = ("host", "wiki.test");

async fn page_origin() -> Origin {
    Origin::start(|_| {
        Reply::ok("page body")
            .header("cache-control", "max-age=600")
            .header("etag", "\"e1\"")
            .header("vary", "Accept-Encoding")
            .header("x-wiki", "yes")
            // Hop-by-hop: about the origin's connection, never served from the cache.
            .header("keep-alive", "timeout=5")
    })
    .await
}

/// `fields` without those about this connection and this moment.
fn steady(mut fields: BTreeMap<String, String>) -> BTreeMap<String, String> {
    for volatile in ["age", "connection", "date"] {
        fields.remove(volatile);
    }
    // The ttl counts down between the two answers.
    if let Some(cs) = fields.get_mut("cache-status") {
        *cs = cs
            .split("; ")
            .filter(|p| !p.starts_with("ttl="))
            .collect::<Vec<_>>()
            .join("; ");
    }
    fields
}

/// The same object, answered by the front door, by pingora's cache state machine (a
/// precondition that does not match sends a request there) and, after a restart, as a disk hit:
/// the status line, the header fields and the body agree, and the hit-path counters show which
/// code answered each.
#[tokio::test]
async fn a_front_door_hit_looks_like_a_cache_path_hit_and_a_disk_hit() {
    let origin = page_origin().await;
    let dir = tempfile::tempdir().unwrap();
    let port = Port::reserve();
    let mut skua = Skua::start_disk_on(&port, &[origin.addr], dir.path(), "", "").await;
    assert_eq!(get(&skua.url("/wiki/Page"), &[HOST]).await.cache(), "miss");

    for method in ["GET", "HEAD"] {
        let before = skua.hit_paths().await;
        let front = raw(
            skua.addr,
            &format!(
                "{method} /wiki/Page HTTP/1.1\r\nHost: wiki.test\r\nConnection: close\r\n\r\n"
            ),
        )
        .await;
        let after_front = skua.hit_paths().await;
        assert_eq!(
            after_front[0],
            before[0] + 1,
            "{method}: the front door answered"
        );
        let cache = raw(
            skua.addr,
            &format!("{method} /wiki/Page HTTP/1.1\r\nHost: wiki.test\r\nIf-None-Match: \"other\"\r\nConnection: close\r\n\r\n"),
        )
        .await;
        let after_cache = skua.hit_paths().await;
        assert_eq!(
            after_cache[2],
            after_front[2] + 1,
            "{method}: pingora's cache answered"
        );
        let (front_status, front_fields, front_body) = split(&front);
        let (cache_status, cache_fields, cache_body) = split(&cache);
        assert_eq!(front_status, "HTTP/1.1 200 OK", "{method}");
        assert_eq!(cache_status, front_status, "{method}");
        assert_eq!(front_fields["x-cache-status"], "hit-front");
        assert_eq!(front_fields["connection"], "close");
        assert_eq!(steady(cache_fields), steady(front_fields), "{method}");
        let body = if method == "GET" { "page body" } else { "" };
        assert_eq!((front_body.as_str(), cache_body.as_str()), (body, body));
    }

    // A matching precondition: 304 from the cache path, with the validators and no body.
    let not_modified = raw(
        skua.addr,
        "GET /wiki/Page HTTP/1.1\r\nHost: wiki.test\r\nIf-None-Match: \"e1\"\r\nConnection: close\r\n\r\n",
    )
    .await;
    let (status, fields, body) = split(&not_modified);
    assert_eq!(status, "HTTP/1.1 304 Not Modified");
    assert_eq!(fields["etag"], "\"e1\"");
    assert_eq!(fields["x-cache-status"], "hit-front");
    assert_eq!(fields["cache-control"], "max-age=600");
    assert!(fields.contains_key("age"));
    assert_eq!(body, "");

    // After a restart the memory tier is empty: the disk tier answers, through pingora's
    // cache (a request with a precondition) and, after another restart, at the front door
    // (the page cache holds the record), with the same fields apart from the tier named in
    // the cache status.
    let plain = "GET /wiki/Page HTTP/1.1\r\nHost: wiki.test\r\nConnection: close\r\n\r\n";
    let front = raw(skua.addr, plain).await;
    let mut disk_hits = Vec::new();
    for (request, paths, path) in [
        (
            "GET /wiki/Page HTTP/1.1\r\nHost: wiki.test\r\nIf-None-Match: \"other\"\r\nConnection: close\r\n\r\n",
            [0, 0, 1],
            "pingora's cache",
        ),
        (plain, [1, 0, 0], "the front door"),
    ] {
        skua.stop();
        skua = Skua::start_disk_on(&port, &[origin.addr], dir.path(), "", "").await;
        let disk = raw(skua.addr, request).await;
        assert_eq!(skua.hit_paths().await, paths, "{path} answered the disk hit");
        disk_hits.push(disk);
    }
    let (_, mut front_fields, _) = split(&front);
    front_fields.remove("x-cache-status");
    for disk in &disk_hits {
        let (disk_status, mut disk_fields, disk_body) = split(disk);
        assert_eq!(disk_status, "HTTP/1.1 200 OK");
        assert_eq!(disk_body, "page body");
        assert_eq!(disk_fields["x-cache-status"], "hit-local");
        disk_fields.remove("x-cache-status");
        assert_eq!(steady(disk_fields), steady(front_fields.clone()));
    }
    assert_eq!(origin.count("/wiki/Page"), 1);
}

#[tokio::test]
async fn a_front_door_hit_looks_like_a_full_path_hit() {
    let origin = page_origin().await;
    let skua = Skua::start(&[origin.addr], "").await;
    assert_eq!(get(&skua.url("/wiki/Page"), &[HOST]).await.cache(), "miss");
    // HTTP/1.1: the front door. HTTP/1.0: always the full path.
    let fast = raw(
        skua.addr,
        "GET /wiki/Page HTTP/1.1\r\nHost: wiki.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    let full = raw(
        skua.addr,
        "GET /wiki/Page HTTP/1.0\r\nHost: wiki.test\r\n\r\n",
    )
    .await;
    let (fast_status, mut fast_fields, fast_body) = split(&fast);
    let (full_status, mut full_fields, full_body) = split(&full);
    assert_eq!(fast_status, "HTTP/1.1 200 OK");
    assert!(full_status.ends_with("200 OK"), "{full_status}");
    assert_eq!(fast_body, "page body");
    assert_eq!(full_body, "page body");
    assert_eq!(fast_fields["x-cache-status"], "hit-front");
    assert_eq!(fast_fields["content-length"], "9");
    assert!(fast_fields["cache-status"].starts_with("skua; hit; ttl="));
    assert!(fast_fields.contains_key("age"));
    assert!(!fast_fields.contains_key("keep-alive"), "{fast}");
    assert!(!full_fields.contains_key("keep-alive"), "{full}");
    // The same fields, apart from those about this connection and this moment.
    for f in [&mut fast_fields, &mut full_fields] {
        for volatile in ["age", "cache-status", "connection", "date"] {
            f.remove(volatile);
        }
    }
    assert_eq!(fast_fields, full_fields);
    assert_eq!(origin.count("/wiki/Page"), 1);
    assert_eq!(
        skua.metric("skua_requests_total{cache_status=\"hit-front\",status_class=\"2xx\"}")
            .await,
        2.0
    );
}

#[tokio::test]
async fn a_front_door_head_has_no_body_and_close_closes() {
    let origin = page_origin().await;
    let skua = Skua::start(&[origin.addr], "").await;
    get(&skua.url("/wiki/Page"), &[HOST]).await;
    // raw() reads until the server closes: it returns only because Skua closes.
    let head = raw(
        skua.addr,
        "HEAD /wiki/Page HTTP/1.1\r\nHost: wiki.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    let (status, fields, body) = split(&head);
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(fields["content-length"], "9");
    assert_eq!(fields["x-cache-status"], "hit-front");
    assert_eq!(fields["connection"], "close");
    assert_eq!(body, "");
}

#[tokio::test]
async fn requests_the_front_door_is_not_sure_about_reach_the_full_path() {
    let origin = page_origin().await;
    let skua = Skua::start(&[origin.addr], "").await;
    get(&skua.url("/wiki/Page"), &[HOST]).await;
    // A validator the stored ETag matches: the full path answers 304.
    let conditional = get(
        &skua.url("/wiki/Page"),
        &[HOST, ("if-none-match", "\"e1\"")],
    )
    .await;
    assert_eq!(conditional.status, 304);
    // A range: the full path answers 206 with the slice.
    let range = get(&skua.url("/wiki/Page"), &[HOST, ("range", "bytes=0-3")]).await;
    assert_eq!(range.status, 206);
    assert_eq!(range.text(), "page");
    // A session cookie bypasses the cache (MediaWiki's default rule).
    let session = get(
        &skua.url("/wiki/Page"),
        &[HOST, ("cookie", "enwikiSession=abc")],
    )
    .await;
    assert_eq!(session.cache(), "pass");
    // Another Vary variant (the brotli clients' copy) is not served the stored one.
    let brotli = get(&skua.url("/wiki/Page"), &[HOST, ("accept-encoding", "br")]).await;
    assert_eq!(brotli.cache(), "miss");
    assert_eq!(origin.count("/wiki/Page"), 3);
}

/// A raw response's head as sent, minus the lines that belong to the moment it was sent
/// (`Date`, `Age`) and the `ttl=` of its Cache-Status, which counts down like `Age`.
fn head_bytes(response: &str) -> String {
    let head = response.split("\r\n\r\n").next().unwrap_or("");
    head.split("\r\n")
        .filter(|line| {
            let name = line.split(':').next().unwrap_or("").to_ascii_lowercase();
            name != "date" && name != "age"
        })
        .map(|line| {
            line.split("; ")
                .filter(|member| !member.starts_with("ttl="))
                .collect::<Vec<_>>()
                .join("; ")
        })
        .collect::<Vec<_>>()
        .join("\r\n")
}

/// #16: one hit module. The same requests (HTTP/1.1 and 1.0, GET and HEAD, two Vary variants)
/// answered by the fast paths (the front door for HTTP/1.1, the session's for 1.0) and by
/// pingora's cache path (a precondition that does not match sends them there) get the same
/// head, byte for byte, `Date` and `Age` aside; so does a disk hit after a restart, at the
/// front door and through pingora's cache, the tier's name aside.
#[tokio::test]
async fn a_hit_has_the_same_head_byte_for_byte_on_every_path() {
    let origin = Origin::start(|seen| {
        let french = seen
            .headers
            .get("accept-language")
            .is_some_and(|l| l.as_bytes() == b"fr");
        Reply::ok(if french {
            "page en français"
        } else {
            "page in English"
        })
        .header("cache-control", "max-age=600")
        .header("etag", if french { "\"fr\"" } else { "\"en\"" })
        .header("vary", "Accept-Language")
        .header("content-language", if french { "fr" } else { "en" })
        .header("x-wiki", "yes")
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let port = Port::reserve();
    let mut skua = Skua::start_disk_on(&port, &[origin.addr], dir.path(), "", "").await;
    for lang in ["en", "fr"] {
        let first = get(&skua.url("/wiki/Page"), &[HOST, ("accept-language", lang)]).await;
        assert_eq!(first.cache(), "miss", "{lang}");
    }
    let ask = |method: &str, version: &str, lang: &str, precondition: bool| {
        let mut head = format!(
            "{method} /wiki/Page HTTP/{version}\r\nHost: wiki.test\r\nAccept-Language: {lang}\r\n"
        );
        if precondition {
            head.push_str("If-None-Match: \"other\"\r\n");
        }
        if version == "1.1" {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        head
    };
    let mut front_en_get = String::new();
    for lang in ["en", "fr"] {
        for version in ["1.1", "1.0"] {
            for method in ["GET", "HEAD"] {
                let what = format!("{method} HTTP/{version} {lang}");
                let before = skua.hit_paths().await;
                let fast = raw(skua.addr, &ask(method, version, lang, false)).await;
                let cache = raw(skua.addr, &ask(method, version, lang, true)).await;
                let after = skua.hit_paths().await;
                let fast_path = if version == "1.1" { 0 } else { 1 };
                assert_eq!(after[fast_path], before[fast_path] + 1, "{what}: fast path");
                assert_eq!(after[2], before[2] + 1, "{what}: pingora's cache path");
                assert!(
                    fast.contains(if lang == "fr" {
                        "content-language: fr"
                    } else {
                        "content-language: en"
                    }),
                    "{what}:\n{fast}"
                );
                assert_eq!(
                    head_bytes(&cache),
                    head_bytes(&fast),
                    "{what}:\n{fast}\n---\n{cache}"
                );
                let (_, _, fast_body) = split(&fast);
                let (_, _, cache_body) = split(&cache);
                assert_eq!(fast_body, cache_body, "{what}");
                if lang == "en" && version == "1.1" && method == "GET" {
                    front_en_get = fast;
                }
            }
        }
    }
    assert_eq!(origin.count("/wiki/Page"), 2);

    // After a restart the disk tier answers: at the front door (the page cache holds the
    // record), and after another through pingora's cache (a precondition sends it there),
    // the same bytes.
    for (precondition, paths) in [(false, [1, 0, 0]), (true, [0, 0, 1])] {
        skua.stop();
        skua = Skua::start_disk_on(&port, &[origin.addr], dir.path(), "", "").await;
        let disk = raw(skua.addr, &ask("GET", "1.1", "en", precondition)).await;
        assert_eq!(skua.hit_paths().await, paths, "the disk hit's path");
        assert_eq!(
            head_bytes(&disk).replace("hit-local", "hit-front"),
            head_bytes(&front_en_get),
            "\n{front_en_get}\n---\n{disk}"
        );
    }
    assert_eq!(origin.count("/wiki/Page"), 2);
}

/// `[server] server_timing`: every answer names how the cache answered and which node in
/// `Server-Timing`, after the origin's own metrics, as Wikimedia's edge sends it for
/// browsers' developer tools and MediaWiki's NavigationTiming: the front door's fill and hit,
/// and pingora's path (a request with a cookie) alike. Off by default.
#[tokio::test]
async fn server_timing_names_the_answer_and_the_node_on_every_path() {
    let origin = Origin::start(|_| {
        Reply::ok("page body")
            .header("cache-control", "max-age=600")
            .header("server-timing", "app;dur=12")
    })
    .await;
    let timing = |got: &Got| -> Vec<String> {
        got.headers
            .get_all("server-timing")
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect()
    };
    let ours = |answer: &str| format!("cache;desc=\"{answer}\", host;desc=\"skua\"");
    let skua = Skua::start_tables(&[origin.addr], ["server_timing = true", "", ""], "").await;
    let url = skua.url("/wiki/Timed");
    let miss = get(&url, &[]).await;
    assert_eq!(miss.cache(), "miss");
    assert_eq!(timing(&miss), ["app;dur=12".to_string(), ours("miss")]);
    let hit = get(&url, &[]).await;
    assert_eq!(hit.cache(), "hit-front");
    assert_eq!(timing(&hit), ["app;dur=12".to_string(), ours("hit-front")]);
    let full = get(&url, &[("cookie", "theme=dark")]).await;
    assert_eq!(full.cache(), "hit-front");
    assert_eq!(timing(&full), ["app;dur=12".to_string(), ours("hit-front")]);
    let passed = get(&url, &[("cookie", "wiki_session=abc")]).await;
    assert_eq!(timing(&passed), ["app;dur=12".to_string(), ours("pass")]);

    let quiet = Skua::start(&[origin.addr], "").await;
    let url = quiet.url("/wiki/Timed");
    get(&url, &[]).await;
    assert_eq!(timing(&get(&url, &[]).await), ["app;dur=12".to_string()]);
}

/// Regression: a client that opens a plain connection with HTTP/2's preface (RFC 9113 §3.3,
/// "prior knowledge": `curl --http2-prior-knowledge`, `h2load http://`, a balancer speaking
/// h2c to its backends) got an empty reply, or pingora's own `400`. It is now served HTTP/2:
/// a miss from the origin, the hit by the front door, a POST through pingora's path, on one
/// connection, while HTTP/1.1 clients are served on the same port as before.
#[tokio::test]
async fn a_plain_connection_opened_with_the_http2_preface_is_served_http2() {
    let origin = page_origin().await;
    let skua = Skua::start(&[origin.addr], "").await;
    let h2c = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let url = skua.url("/wiki/Page");
    let mut caches = Vec::new();
    for _ in 0..2 {
        let answer = h2c.get(&url).send().await.unwrap();
        assert_eq!(answer.version(), reqwest::Version::HTTP_2);
        assert_eq!(answer.status(), 200);
        caches.push(
            answer.headers()["x-cache-status"]
                .to_str()
                .unwrap()
                .to_owned(),
        );
        assert_eq!(answer.text().await.unwrap(), "page body");
    }
    assert_eq!(caches, ["miss", "hit-front"]);
    let posted = h2c.post(skua.url("/w/api.php")).body("x=1");
    let posted = posted.send().await.unwrap();
    assert_eq!(posted.version(), reqwest::Version::HTTP_2);
    assert_eq!(posted.status(), 200);
    assert_eq!(origin.count("/w/api.php"), 1);
    assert_eq!(origin.count("/wiki/Page"), 1);
    let over_http11 = get(&url, &[]).await;
    assert_eq!(over_http11.cache(), "hit-front");
    assert_eq!(over_http11.text(), "page body");
}
