//! `[[rule]]`: edge policy against the real binary. Routing, pass, TTL overrides, deny,
//! redirects, header edits both ways, query normalisation (purged by the raw URL), rate limits,
//! reloads under load, and a bad rule refused with its line.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::*;

/// An origin that says which one it is and echoes what it was asked.
async fn named_origin(name: &'static str, cache_control: &'static str) -> Origin {
    Origin::start(move |seen| {
        Reply::ok(format!("{name} {}", seen.path))
            .header("cache-control", cache_control)
            .header("x-powered-by", "PHP/8.2")
    })
    .await
}

/// A second `[[origin]]` pool named `name` at `origin`.
fn pool(name: &str, origin: &Origin) -> String {
    format!(
        "[[origin]]\nname = \"{name}\"\naddresses = [\"{}\"]\n[origin.health_check]\nenabled = false\n",
        origin.addr
    )
}

#[tokio::test]
async fn rules_route_by_host_and_path_to_named_pools() {
    let pages = named_origin("pages", "max-age=600").await;
    let api = named_origin("api", "max-age=600").await;
    let media = named_origin("media", "max-age=600").await;
    let rules = format!(
        r#"{}{}
[[rule]]
name = "api"
match = {{ path_prefix = ["/w/api.php"] }}
route = "api"

[[rule]]
name = "media"
match = {{ host = ["upload.wiki.test"] }}
route = "media"
"#,
        pool("api", &api),
        pool("media", &media)
    );
    let skua = Skua::start(&[pages.addr], &rules).await;
    let page = get(&skua.url("/wiki/A"), &[("host", "en.wiki.test")]).await;
    assert_eq!(page.text(), "pages /wiki/A");
    let query = get(
        &skua.url("/w/api.php?action=query"),
        &[("host", "en.wiki.test")],
    )
    .await;
    assert_eq!(query.text(), "api /w/api.php?action=query");
    let image = get(&skua.url("/a/b.png"), &[("host", "upload.wiki.test")]).await;
    assert_eq!(image.text(), "media /a/b.png");
    // Hits stay hits whichever pool filled them.
    let again = get(
        &skua.url("/w/api.php?action=query"),
        &[("host", "en.wiki.test")],
    )
    .await;
    assert_eq!(again.cache(), "hit-front");
    assert_eq!(
        (
            pages.count("/wiki/A"),
            api.count("/w/api.php?action=query"),
            media.count("/a/b.png")
        ),
        (1, 1, 1)
    );
    assert_eq!(pages.count("/w/api.php?action=query"), 0);
}

#[tokio::test]
async fn a_pass_rule_never_caches_and_a_ttl_rule_overrides_the_origin() {
    // The origin says every response must be revalidated; the rule knows better for
    // load.php, and never caches Special: pages.
    let origin = named_origin("o", "no-cache, max-age=0").await;
    let rules = r#"
[[rule]]
name = "special pages"
match = { path_prefix = ["/wiki/Special:"] }
pass = true

[[rule]]
name = "resource loader"
match = { path = ["/w/load.php"] }
ttl = "5m"
grace = "1m"
"#;
    let skua = Skua::start(&[origin.addr], rules).await;
    for _ in 0..2 {
        let special = get(&skua.url("/wiki/Special:Random"), &[]).await;
        assert_eq!(special.cache(), "pass");
        assert!(
            special.header("cache-status").contains("detail=rule"),
            "{special:?}"
        );
    }
    assert_eq!(origin.count("/wiki/Special:Random"), 2);

    let first = get(&skua.url("/w/load.php"), &[]).await;
    assert_eq!(first.cache(), "miss");
    assert!(first.header("cache-status").contains("stored"), "{first:?}");
    assert!(
        first.header("cache-status").contains("detail=ttl-rule"),
        "{first:?}"
    );
    let hit = get(&skua.url("/w/load.php"), &[]).await;
    assert_eq!(hit.cache(), "hit-front");
    let status = hit.header("cache-status");
    assert!(status.contains("detail=ttl-rule"), "{status}");
    let ttl: i64 = status
        .split("ttl=")
        .nth(1)
        .and_then(|t| t.split(';').next())
        .and_then(|t| t.trim().parse().ok())
        .expect("a ttl");
    assert!((290..=300).contains(&ttl), "{status}");
    assert_eq!(origin.count("/w/load.php"), 1);
    // Without a rule, the origin's word stands: revalidated every time.
    get(&skua.url("/wiki/Other"), &[]).await;
    get(&skua.url("/wiki/Other"), &[]).await;
    assert_eq!(origin.count("/wiki/Other"), 2);
}

#[tokio::test]
async fn deny_and_every_redirect_kind_answer_without_the_origin() {
    let origin = named_origin("o", "max-age=600").await;
    let rules = r#"
[[rule]]
name = "no xmlrpc"
match = { path = ["/xmlrpc.php"], method = ["POST", "GET"] }
deny = { status = 403, body = "not here" }

[[rule]]
match = { path_regex = ["^/moved/(.*)$"] }
redirect = { location = "/wiki/{1}{query}" }

[[rule]]
match = { path = ["/found"] }
redirect = { status = 302, location = "https://{host}/elsewhere" }

[[rule]]
match = { path = ["/see"] }
redirect = { status = 303, location = "/other{query}" }

[[rule]]
match = { path = ["/temp"] }
redirect = { status = 307, location = "{path}/" }

[[rule]]
match = { path_prefix = ["/old/"] }
redirect = { status = 308, location = "https://new.wiki.test{path}{query}" }
"#;
    let skua = Skua::start(&[origin.addr], rules).await;
    let denied = get(&skua.url("/xmlrpc.php"), &[]).await;
    assert_eq!(denied.status, 403);
    assert_eq!(denied.text(), "not here\n");
    assert_eq!(denied.cache(), "int-front");
    for (path, status, location) in [
        (
            "/moved/Main_Page?action=raw",
            301,
            "/wiki/Main_Page?action=raw",
        ),
        ("/found", 302, "https://wiki.test/elsewhere"),
        ("/see?x=1", 303, "/other?x=1"),
        ("/temp", 307, "/temp/"),
        ("/old/a/b?c=d", 308, "https://new.wiki.test/old/a/b?c=d"),
    ] {
        let resp = get(&skua.url(path), &[("host", "wiki.test")]).await;
        assert_eq!(resp.status, status, "{path}");
        assert_eq!(resp.header("location"), location, "{path}");
    }
    let posted = send(&client(), "POST", &skua.url("/xmlrpc.php"), &[]).await;
    assert_eq!(posted.status, 403);
    assert_eq!(origin.count_starting("/"), 0, "the origin was never asked");
    assert_eq!(
        skua.metric("skua_rule_answers_total{answer=\"denied\"}")
            .await,
        2.0
    );
    assert_eq!(
        skua.metric("skua_rule_answers_total{answer=\"redirected\"}")
            .await,
        5.0
    );
}

#[tokio::test]
async fn header_edits_reach_the_origin_and_the_client_on_misses_and_on_every_hit_path() {
    let origin = Origin::start(|seen| {
        Reply::ok(format!(
            "edge={} debug={} via={}",
            seen.header("x-edge").unwrap_or("-"),
            seen.header("x-debug").unwrap_or("-"),
            seen.headers
                .get_all("x-via")
                .iter()
                .map(|v| v.to_str().unwrap())
                .collect::<Vec<_>>()
                .join(",")
        ))
        .header("cache-control", "max-age=600")
        .header("x-powered-by", "PHP/8.2")
    })
    .await;
    let rules = r#"
[[rule]]
name = "to the origin"
request_headers = { set = { "X-Edge" = "skua" }, append = { "X-Via" = "edge" }, remove = ["X-Debug"] }
response_headers = { set = { "Strict-Transport-Security" = "max-age=31536000" }, remove = ["X-Powered-By"], append = { "X-Served-By" = "skua" } }
"#;
    let skua = Skua::start(&[origin.addr], rules).await;
    let sent = [("x-debug", "1"), ("x-via", "client")];
    let miss = get(&skua.url("/wiki/A"), &sent).await;
    assert_eq!(miss.cache(), "miss");
    assert_eq!(miss.text(), "edge=skua debug=- via=client,edge");
    // A rule that edits the request leaves hits to pingora's path (the edits may name the
    // variant); the response edits apply on every path.
    let hit = get(&skua.url("/wiki/A"), &sent).await;
    assert_eq!(hit.cache(), "hit-front");
    for resp in [&miss, &hit] {
        assert_eq!(resp.header("strict-transport-security"), "max-age=31536000");
        assert_eq!(resp.header("x-served-by"), "skua");
        assert!(!resp.headers.contains_key("x-powered-by"), "{resp:?}");
    }

    // Response edits alone: hits from the front door, over HTTP/1.0 (the session's fast path)
    // and from pingora's cache (a conditional request) carry them alike.
    let origin = named_origin("o", "max-age=600").await;
    let rules = r#"
[[rule]]
response_headers = { set = { "X-Frame-Options" = "DENY" }, remove = ["X-Powered-By"] }
"#;
    let skua = Skua::start(&[origin.addr], rules).await;
    let host = [("host", "wiki.test")];
    get(&skua.url("/wiki/B"), &host).await;
    let before = skua.hit_paths().await;
    let front = get(&skua.url("/wiki/B"), &host).await;
    let old = raw(skua.addr, "GET /wiki/B HTTP/1.0\r\nHost: wiki.test\r\n\r\n").await;
    let ranged = get(&skua.url("/wiki/B"), &[host[0], ("range", "bytes=0-1")]).await;
    assert_eq!(ranged.status, 206);
    let after = skua.hit_paths().await;
    assert_eq!(
        after,
        [before[0] + 1, before[1] + 1, before[2] + 1],
        "one hit on each path"
    );
    for resp in [&front, &ranged] {
        assert_eq!(resp.header("x-frame-options"), "DENY", "{resp:?}");
        assert!(!resp.headers.contains_key("x-powered-by"), "{resp:?}");
    }
    let old = old.to_ascii_lowercase();
    assert!(old.contains("x-frame-options: deny"), "{old}");
    assert!(!old.contains("x-powered-by"), "{old}");
}

#[tokio::test]
async fn a_normalised_query_is_one_key_and_a_purge_of_the_raw_url_removes_it() {
    let origin = named_origin("o", "max-age=600").await;
    let rules = r#"
[[rule]]
name = "tracking"
normalize_query = { drop = ["utm_*", "fbclid"], sort = true }
"#;
    let skua = Skua::start(&[origin.addr], rules).await;
    let first = get(&skua.url("/wiki/A?utm_source=mail&title=X&action=raw"), &[]).await;
    assert_eq!(first.cache(), "miss");
    assert_eq!(
        first.text(),
        "o /wiki/A?action=raw&title=X",
        "the origin is asked for the normalised URL"
    );
    for spelling in [
        "/wiki/A?action=raw&title=X",
        "/wiki/A?title=X&fbclid=9&action=raw",
    ] {
        assert_eq!(
            get(&skua.url(spelling), &[]).await.cache(),
            "hit-front",
            "{spelling}"
        );
    }
    assert_eq!(origin.count_starting("/wiki/A"), 1);
    // MediaWiki purges the URL as it knows it; any spelling removes the one object.
    let purge = send(
        &client(),
        "PURGE",
        &skua.url("/wiki/A?title=X&utm_campaign=z&action=raw"),
        &[],
    )
    .await;
    assert_eq!(purge.header("skua-purged"), "1 purged", "{purge:?}");
    let after = get(&skua.url("/wiki/A?action=raw&title=X"), &[]).await;
    assert_eq!(after.cache(), "miss");
    assert_eq!(origin.count_starting("/wiki/A"), 2);
}

#[tokio::test]
async fn a_rate_limit_answers_429_with_retry_after_and_recovers() {
    let origin = named_origin("o", "max-age=600").await;
    let rules = r#"
[[rule]]
name = "api clients"
match = { path_prefix = ["/w/api.php"] }
rate_limit = { per_second = 4, burst = 2 }
"#;
    let skua = Skua::start(&[origin.addr], rules).await;
    let url = skua.url("/w/api.php?action=query");
    for _ in 0..2 {
        assert_eq!(get(&url, &[]).await.status, 200);
    }
    let limited = get(&url, &[]).await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.header("retry-after"), "1");
    assert_eq!(limited.cache(), "int-front");
    // Other paths are not limited.
    assert_eq!(get(&skua.url("/wiki/A"), &[]).await.status, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get(&url, &[]).await.status, 200, "a token came back at 4/s");
    assert_eq!(
        skua.metric("skua_rule_answers_total{answer=\"rate_limited\"}")
            .await,
        1.0
    );
}

/// `origin_only`: only requests that go to the origin take from the client's bucket, as
/// Wikimedia's edge limits misses and passes alone. A client reading cached pages at any
/// rate is answered; one whose requests reach the origin is limited, on both paths (the
/// front door's hits, pingora's misses and passes).
#[tokio::test]
async fn a_rate_limit_on_the_origin_only_lets_hits_through() {
    let origin = Origin::start(|seen| {
        let cc = if seen.path.contains("private") {
            "private"
        } else {
            "max-age=600"
        };
        Reply::ok("answer").header("cache-control", cc)
    })
    .await;
    let rules = r#"
[[rule]]
name = "api clients"
match = { path_prefix = ["/w/api.php"] }
rate_limit = { per_second = 0.01, burst = 2, origin_only = true }
"#;
    let skua = Skua::start(&[origin.addr], rules).await;
    let cached = skua.url("/w/api.php?action=query&maxage=600");
    for i in 0..10 {
        let got = get(&cached, &[]).await;
        assert_eq!(got.status, 200, "read {i}");
    }
    assert_eq!(origin.count_starting("/w/api.php"), 1);
    // One token left: one request to the origin, then 429.
    let private = skua.url("/w/api.php?action=query&private=1");
    assert_eq!(get(&private, &[]).await.status, 200);
    let limited = get(&private, &[]).await;
    assert_eq!((limited.status, limited.cache()), (429, "int-front"));
    assert!(!limited.header("retry-after").is_empty());
    assert_eq!(origin.count_starting("/w/api.php"), 2);
    // Hits are still answered.
    assert_eq!(get(&cached, &[]).await.status, 200);
    assert_eq!(
        skua.metric("skua_rule_answers_total{answer=\"rate_limited\"}")
            .await,
        1.0
    );
}

/// Skua behind a trusted proxy (loopback), with the API limited to one request per client,
/// then `more` rules.
async fn api_limited_behind_a_proxy(more: &str) -> (Origin, Skua) {
    let origin = named_origin("o", "max-age=600").await;
    let rules = format!(
        r#"
[[rule]]
name = "api clients"
match = {{ path_prefix = ["/w/api.php"] }}
rate_limit = {{ per_second = 0.01, burst = 1 }}
{more}"#
    );
    let skua = Skua::start_tables(
        &[origin.addr],
        ["trusted_proxies = [\"127.0.0.0/8\"]", "", ""],
        &rules,
    )
    .await;
    (origin, skua)
}

/// A request's `X-Forwarded-For`, as the trusted proxy in front sends it.
fn from(client: &'static str) -> [(&'static str, &'static str); 1] {
    [("x-forwarded-for", client)]
}

/// Regression: a bucket was kept per IPv6 address, and a client holds a whole /64 (2^64
/// addresses: privacy addresses rotate through it, and any host can take more), so a new
/// source address per request was a fresh bucket and never limited. An IPv6 client is now
/// its /64; an IPv4-mapped address is the IPv4 client.
#[tokio::test]
async fn a_rate_limit_holds_for_every_address_of_an_ipv6_client() {
    let (_origin, skua) = api_limited_behind_a_proxy("").await;
    let url = skua.url("/w/api.php?action=query");
    assert_eq!(get(&url, &from("2001:db8:1:2::1")).await.status, 200);
    for other in ["2001:db8:1:2::2", "2001:db8:1:2:a:b:c:d"] {
        assert_eq!(get(&url, &from(other)).await.status, 429, "{other}");
    }
    // The next /64 is another client.
    assert_eq!(get(&url, &from("2001:db8:1:3::1")).await.status, 200);
    assert_eq!(get(&url, &from("198.51.100.7")).await.status, 200);
    assert_eq!(get(&url, &from("::ffff:198.51.100.7")).await.status, 429);
}

/// Some load balancers (Azure Application Gateway among them) write each `X-Forwarded-For`
/// entry with its port: `a.b.c.d:port`, `[v6]:port`. Regression: such an entry was no address,
/// so every client behind the balancer shared one rate-limit bucket (one client's burst
/// limited all of them) and matched no `client` condition.
#[tokio::test]
async fn a_forwarded_address_with_a_port_is_its_client() {
    let office = r#"
[[rule]]
name = "office"
match = { client = ["192.0.2.0/24"] }
deny = { status = 403, body = "not from here" }
"#;
    let (_origin, skua) = api_limited_behind_a_proxy(office).await;
    let url = skua.url("/w/api.php?action=query");
    assert_eq!(get(&url, &from("198.51.100.7:40001")).await.status, 200);
    assert_eq!(get(&url, &from("198.51.100.7:40002")).await.status, 429);
    assert_eq!(get(&url, &from("198.51.100.8:40001")).await.status, 200);
    assert_eq!(get(&url, &from("[2001:db8::1]:40001")).await.status, 200);
    assert_eq!(get(&url, &from("[2001:db8::2]:40001")).await.status, 429);
    let page = skua.url("/wiki/A");
    assert_eq!(get(&page, &from("192.0.2.9:5000")).await.status, 403);
    assert_eq!(get(&page, &from("198.51.100.7:5000")).await.status, 200);
}

#[tokio::test]
async fn rules_reload_under_load_without_a_failed_request_and_a_bad_rule_keeps_the_old() {
    let origin = named_origin("o", "max-age=600").await;
    let first = r#"
[[rule]]
name = "marker"
response_headers = { set = { "X-Rules" = "one" } }
"#;
    let skua = Skua::start(&[origin.addr], first).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn({
        let (stop, base) = (stop.clone(), skua.url("/wiki/"));
        async move {
            let client = client();
            let (mut ok, mut failed) = (0u64, 0u64);
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let resp = client.get(format!("{base}{}", i % 10)).send().await;
                match resp {
                    Ok(r) if r.status() == 200 && r.headers().contains_key("x-rules") => ok += 1,
                    _ => failed += 1,
                }
                i += 1;
            }
            (ok, failed)
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let applied = skua
        .reload_and_wait(|text| text.replace("\"one\"", "\"two\""))
        .await;
    assert!(applied);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut now = String::new();
    while now != "two" && Instant::now() < deadline {
        now = get(&skua.url("/wiki/1"), &[])
            .await
            .header("x-rules")
            .to_string();
    }
    assert_eq!(now, "two");

    // A rule routing to a pool that does not exist is refused, and the rules stay.
    let rejected = skua
        .reload_and_wait(|text| format!("{text}\n[[rule]]\nroute = \"nowhere\"\n"))
        .await;
    assert!(!rejected);
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = load.await.unwrap();
    assert_eq!(
        failed, 0,
        "no request failed across the reloads ({ok} succeeded)"
    );
    assert_eq!(
        get(&skua.url("/wiki/2"), &[]).await.header("x-rules"),
        "two"
    );
}

/// A hit remembers which rules its URL meets, for the rule set that read them: a reload that
/// moves a rule from one path to another applies to objects cached before it.
#[tokio::test]
async fn a_reload_moving_a_rule_to_another_path_applies_to_hits_cached_before_it() {
    let origin = named_origin("o", "max-age=600").await;
    let rules = r#"
[[rule]]
name = "marked"
match = { path_prefix = ["/wiki/A"] }
response_headers = { set = { "X-Marked" = "yes" } }
"#;
    let skua = Skua::start(&[origin.addr], rules).await;
    let marked = |path: &'static str| {
        let url = skua.url(path);
        async move {
            let resp = get(&url, &[]).await;
            (
                resp.cache().to_string(),
                resp.header("x-marked").to_string(),
            )
        }
    };
    for _ in 0..2 {
        marked("/wiki/A").await;
        marked("/wiki/B").await;
    }
    assert_eq!(marked("/wiki/A").await, ("hit-front".into(), "yes".into()));
    assert_eq!(marked("/wiki/B").await, ("hit-front".into(), "".into()));
    let applied = skua
        .reload_and_wait(|text| text.replace("\"/wiki/A\"", "\"/wiki/B\""))
        .await;
    assert!(applied);
    assert_eq!(marked("/wiki/A").await, ("hit-front".into(), "".into()));
    assert_eq!(marked("/wiki/B").await, ("hit-front".into(), "yes".into()));
    let fetched = origin.count("/wiki/A") + origin.count("/wiki/B");
    assert_eq!(fetched, 2, "both pages stayed cached across the reload");
}

/// `skua check` names each bad rule's key and line, and `--explain` says what the rules do
/// with one request, without a server.
#[test]
fn skua_check_refuses_bad_rules_by_line_and_explains_a_request() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("skua.toml");
    let bad = r#"[[origin]]
name = "pages"
addresses = ["127.0.0.1:9"]

[[rule]]
match = { path_regex = ["^/wiki/(unclosed"] }
pass = true

[[rule]]
route = "api"

[[rule]]
match = { header = { "User-Agent" = "bot" } }
normalize_query = { drop = ["utm_*"] }

[[rule]]
deny = { status = 200 }
redirect = { location = "/x/{2}" }

[[rule]]
normalize_path = "apache"

[[rule]]
match = { cookie = { "session" = "" } }
normalize_path = "mediawiki"
"#;
    std::fs::write(&path, bad).unwrap();
    let out = std::process::Command::new(skua_bin())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let text = String::from_utf8_lossy(&out.stderr);
    for expected in [
        ":6: rule[0].match.path_regex[0]: not a regular expression",
        ":10: rule[1].route: no [[origin]] pool is named \"api\"",
        ":14: rule[2].normalize_query: a rule that normalises the query may match on host, path and query only",
        ":17: rule[3].deny.status: must be 400 to 599, got 200",
        ":18: rule[3].redirect.location: {2}: the rule's path_regex has 0 group(s)",
        ":21: rule[4].normalize_path: must be \"mediawiki\" (the one spelling Skua knows), got \"apache\"",
        ":25: rule[5].normalize_path: a rule that normalises the path may match on host, path and query only",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }

    let good = r#"[[origin]]
name = "pages"
addresses = ["127.0.0.1:9"]
[[origin]]
name = "api"
addresses = ["127.0.0.1:10"]

[[rule]]
name = "tracking"
normalize_query = { drop = ["utm_*"], sort = true }

[[rule]]
name = "api"
match = { host = ["*.wiki.test"], path_prefix = ["/w/api.php"] }
route = "api"
pass = true

[[rule]]
name = "bots"
match = { header = { "User-Agent" = "(?i)bot" } }
rate_limit = { per_second = 1 }

[[rule]]
name = "titles"
match = { path_prefix = ["/wiki/"] }
normalize_path = "mediawiki"
"#;
    std::fs::write(&path, good).unwrap();
    let explain = |args: &[&str]| {
        let out = std::process::Command::new(skua_bin())
            .args(["check", "--config"])
            .arg(&path)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let api = explain(&[
        "--explain",
        "http://en.wiki.test/w/api.php?utm_source=x&b=2&a=1",
        "--header",
        "User-Agent: SomeBot/1.0",
    ]);
    for expected in [
        "cache key: http://en.wiki.test/w/api.php?a=1&b=2",
        "query normalised by \"tracking\" (line 8)",
        "matches rule[1] \"api\" (line 12): route, pass",
        "matches rule[2] \"bots\" (line 18): rate_limit",
        "pool: api",
    ] {
        assert!(api.contains(expected), "missing {expected:?} in:\n{api}");
    }
    let page = explain(&["--explain", "http://en.wiki.test/wiki/Main_Page"]);
    assert!(page.contains("pool: pages"), "{page}");
    assert!(!page.contains("\"api\""), "{page}");
    assert!(!page.contains("normalised"), "{page}");
    let title = explain(&[
        "--explain",
        "http://en.wiki.test/wiki/Rock_'n'_roll_%28music%29?utm_source=x",
    ]);
    for expected in [
        "cache key: http://en.wiki.test/wiki/Rock_%27n%27_roll_(music)\n",
        "path normalised by \"titles\" (line 23)",
        "query normalised by \"tracking\" (line 8)",
        "matches rule[3] \"titles\" (line 23): normalize_path",
    ] {
        assert!(
            title.contains(expected),
            "missing {expected:?} in:\n{title}"
        );
    }
}

/// A request (method, path, header fields) and the status it gets.
type Case = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
    u16,
);

/// Every kind of condition, each rule denying with a status of its own: a wildcard host,
/// a query parameter's presence and value, a request header, a cookie, the client's network
/// (the forwarded one, behind a trusted proxy), and all of a rule's conditions together.
#[tokio::test]
async fn every_kind_of_condition_matches_what_it_names_and_nothing_else() {
    let origin = named_origin("o", "max-age=600").await;
    let rules = r#"
[[rule]]
match = { host = ["*.blocked.test"] }
deny = { status = 451 }

[[rule]]
match = { query = { diff = "" } }
deny = { status = 410 }

[[rule]]
match = { query = { action = "^(raw|history)$" } }
deny = { status = 409 }

[[rule]]
match = { header = { "User-Agent" = "(?i)evilbot" } }
deny = { status = 418 }

[[rule]]
match = { cookie = { "blocked" = "^yes$" } }
deny = { status = 423 }

[[rule]]
match = { client = ["192.0.2.0/24"] }
deny = { status = 403 }

[[rule]]
match = { path_prefix = ["/both/"], method = ["HEAD"] }
deny = { status = 405 }
"#;
    let skua = Skua::start_tables(
        &[origin.addr],
        ["trusted_proxies = [\"127.0.0.1/32\"]", "", ""],
        rules,
    )
    .await;
    let cases: [Case; 14] = [
        ("GET", "/wiki/A", &[("host", "en.blocked.test")], 451),
        ("GET", "/wiki/A", &[("host", "a.b.blocked.test")], 451),
        ("GET", "/wiki/A", &[("host", "blocked.test")], 200),
        ("GET", "/wiki/A?diff", &[], 410),
        ("GET", "/wiki/A?diff=12&oldid=3", &[], 410),
        ("GET", "/wiki/A?nodiff=1", &[], 200),
        ("GET", "/wiki/A?action=history", &[], 409),
        ("GET", "/wiki/A?action=view", &[], 200),
        (
            "GET",
            "/wiki/A",
            &[("user-agent", "Mozilla/5.0 EvilBot/2")],
            418,
        ),
        ("GET", "/wiki/A", &[("cookie", "a=1; blocked=yes")], 423),
        ("GET", "/wiki/A", &[("cookie", "blocked=no")], 200),
        ("GET", "/wiki/A", &[("x-forwarded-for", "192.0.2.9")], 403),
        ("HEAD", "/both/x", &[], 405),
        ("GET", "/both/x", &[], 200),
    ];
    for (method, path, headers, status) in cases {
        let resp = send(&client(), method, &skua.url(path), headers).await;
        assert_eq!(resp.status, status, "{method} {path} {headers:?}");
    }
    // Without a trusted proxy, X-Forwarded-For is the client's word and proves nothing.
    let untrusted = Skua::start(&[origin.addr], rules).await;
    let resp = get(
        &untrusted.url("/wiki/A"),
        &[("x-forwarded-for", "192.0.2.9")],
    )
    .await;
    assert_eq!(resp.status, 200);
}

/// config/mediawiki.toml's `normalize_path = "mediawiki"` rule: every escaping of a title is
/// the one object the wiki's purge names, and the rules after it read the title as MediaWiki
/// does. Regression: `/wiki/Special%3ASearch` (MediaWiki serves search for it) matched no
/// `/wiki/Special:` rule, so the search rate limit and the special-page pass did not apply.
#[tokio::test]
async fn an_escaped_title_is_the_page_mediawiki_names_for_keys_purges_and_rules() {
    let origin = named_origin("o", "max-age=600").await;
    let rules = r#"
[[rule]]
name = "page titles"
match = { path_prefix = ["/wiki/"] }
normalize_path = "mediawiki"

[[rule]]
name = "search"
match = { path_prefix = ["/wiki/Special:Search"] }
rate_limit = { per_second = 0.01, burst = 1 }
pass = true
"#;
    let skua = Skua::start(&[origin.addr], rules).await;
    let first = get(&skua.url("/wiki/Rock_'n'_roll_%28music%29"), &[]).await;
    assert_eq!(first.cache(), "miss");
    assert_eq!(
        first.text(),
        "o /wiki/Rock_%27n%27_roll_(music)",
        "the origin is asked for MediaWiki's spelling"
    );
    for spelling in [
        "/wiki/Rock_%27n%27_roll_(music)",
        "/wiki/Rock_%27n%27_roll_%28music%29",
        "/wiki/Rock_%27n%27_roll_%28music%29",
    ] {
        assert_eq!(
            get(&skua.url(spelling), &[]).await.cache(),
            "hit-front",
            "{spelling}"
        );
    }
    // MediaWiki's purge, in its own spelling, removes the one object.
    let purge = send(
        &client(),
        "PURGE",
        &skua.url("/wiki/Rock_%27n%27_roll_(music)"),
        &[],
    )
    .await;
    assert_eq!(purge.header("skua-purged"), "1 purged", "{purge:?}");
    let after = get(&skua.url("/wiki/Rock_'n'_roll_(music)"), &[]).await;
    assert_eq!(after.cache(), "miss");
    assert_eq!(origin.count_starting("/wiki/Rock"), 2);

    let search = get(&skua.url("/wiki/Special:Search?search=a"), &[]).await;
    assert_eq!((search.status, search.cache()), (200, "pass"));
    let escaped = get(&skua.url("/wiki/Special%3ASearch?search=b"), &[]).await;
    assert_eq!(
        escaped.status, 429,
        "the escaped colon is the same special page"
    );
    assert_eq!(origin.count_starting("/wiki/Special"), 1);
}

/// The rules the spelling tests hold requests to: the API's rate limit (one request, then
/// 429), the installer's deny and index.php's path-info redirect.
const SPELLING_RULES: &str = r#"
[[rule]]
name = "API"
match = { path = ["/w/api.php"] }
rate_limit = { per_second = 0.01, burst = 1 }

[[rule]]
name = "installer closed"
match = { path_prefix = ["/w/mw-config"] }
deny = { status = 403, body = "forbidden" }

[[rule]]
name = "index.php path info"
match = { path_regex = ["^/w/index\\.php/(.+)$"] }
redirect = { status = 301, location = "/wiki/{1}" }
"#;

fn get_request(target: &str) -> String {
    format!("GET {target} HTTP/1.1\r\nHost: wiki.test\r\nConnection: close\r\n\r\n")
}

/// After one API request as the rule spells it, each of `limited` gets the API's 429 and each
/// of `denied` the installer's 403.
async fn spellings_meet_the_rules(skua: &Skua, limited: &[&str], denied: &[&str]) {
    let first = raw(skua.addr, &get_request("/w/api.php?action=query")).await;
    assert!(first.starts_with("HTTP/1.1 200 "), "{first}");
    for spelling in limited {
        let answer = raw(skua.addr, &get_request(spelling)).await;
        assert!(answer.starts_with("HTTP/1.1 429 "), "{spelling}: {answer}");
    }
    for spelling in denied {
        let answer = raw(skua.addr, &get_request(spelling)).await;
        assert!(answer.starts_with("HTTP/1.1 403 "), "{spelling}: {answer}");
    }
}

/// Regression: a rule read the path as sent, so `//w/api.php` or `/w//api.php` (which nginx,
/// Apache and PHP's server all serve as `/w/api.php`) passed the API's rate limit and route,
/// and `//w/mw-config/` a deny. A rule now reads each run of `/` as one; the key and what
/// the origin receives keep them.
#[tokio::test]
async fn doubled_slashes_do_not_slip_past_a_rule() {
    let origin = named_origin("o", "no-store").await;
    let skua = Skua::start(&[origin.addr], SPELLING_RULES).await;
    spellings_meet_the_rules(
        &skua,
        &[
            "//w/api.php?action=query",
            "/w//api.php?action=query",
            "/w/api.php?x=//",
        ],
        &["//w/mw-config/", "/w//mw-config/index.php"],
    )
    .await;
    let moved = raw(skua.addr, &get_request("//w/index.php/Main_Page")).await;
    assert!(moved.starts_with("HTTP/1.1 301 "), "{moved}");
    assert!(
        moved.contains("\r\nLocation: /wiki/Main_Page\r\n")
            || moved.contains("\r\nlocation: /wiki/Main_Page\r\n"),
        "{moved}"
    );
    assert_eq!(
        origin.count_starting("/w"),
        1,
        "{:?}",
        origin
            .all_requests()
            .iter()
            .map(|r| r.target.clone())
            .collect::<Vec<_>>()
    );
}

/// Regression: a rule read `%2F` in a path as sent, so `/w%2Fapi.php` (which nginx and PHP's
/// server decode to `/w/api.php`, and `/w/x%2F..%2Fapi.php` with it) passed the API's rate
/// limit, and `/w%2Fmw-config/` a deny. A rule now reads an encoded slash as `/`; the key and
/// what the origin receives keep the escape.
#[tokio::test]
async fn an_encoded_slash_does_not_slip_past_a_rule() {
    let origin = named_origin("o", "no-store").await;
    let skua = Skua::start(&[origin.addr], SPELLING_RULES).await;
    spellings_meet_the_rules(
        &skua,
        &[
            "/w%2Fapi.php?action=query",
            "/w%2fapi.php?action=query",
            "/w/x%2F..%2Fapi.php?action=query",
            "/%2Fw/api.php?action=query",
        ],
        &["/w%2Fmw-config/", "/w/x%2F..%2Fmw-config/index.php"],
    )
    .await;
    // What is not the rule's path still goes to the origin, its escape as sent.
    let other = raw(skua.addr, &get_request("/wiki/AC%2FDC")).await;
    assert!(other.starts_with("HTTP/1.1 200 "), "{other}");
    assert_eq!(origin.count_starting("/w/api.php"), 1);
    assert_eq!(origin.count("/wiki/AC%2FDC"), 1);
}

/// Regression: a rule on the exact path `/w/api.php` was passed by `/w/api.php/x`, which
/// Apache, PHP-FPM and PHP's own server run as `api.php` with path info `/x` (RFC 3875
/// §4.1.5), so any client could step past the API's limit or a deny. An exact path naming a
/// script now also matches it followed by path info; any other exact path stays exact.
#[tokio::test]
async fn path_info_does_not_slip_past_a_rule_on_its_script() {
    let origin = named_origin("o", "no-store").await;
    let rules = r#"
[[rule]]
name = "API closed"
match = { path = ["/w/api.php"] }
deny = { status = 403, body = "forbidden" }

[[rule]]
name = "bare wiki"
match = { path = ["/wiki"] }
deny = { status = 403, body = "forbidden" }
"#;
    let skua = Skua::start(&[origin.addr], rules).await;
    for denied in [
        "/w/api.php?action=query",
        "/w/api.php/x?action=query",
        "/w/api.php/?action=query",
        "/w/api.php//x",
        "/w%2Fapi.php/x",
        "/wiki",
    ] {
        let answer = raw(skua.addr, &get_request(denied)).await;
        assert!(answer.starts_with("HTTP/1.1 403 "), "{denied}: {answer}");
    }
    for served in ["/w/api.phpx", "/w/api.php.txt", "/wiki/Main_Page"] {
        let answer = raw(skua.addr, &get_request(served)).await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{served}: {answer}");
    }
    let reached: Vec<_> = (origin.all_requests().iter())
        .map(|r| r.target.clone())
        .collect();
    assert_eq!(
        reached,
        ["/w/api.phpx", "/w/api.php.txt", "/wiki/Main_Page"]
    );
}

/// Regression: a rule read query parameters as sent, so `?+search=x`, `?%20search=x`,
/// `?search%00=x` and `?search%5B%5D=x`, each a search to MediaWiki (PHP reads them all as
/// `search`), passed a rate limit on `search`, and `title=Special%3ASearch` a rule on
/// `Special:Search`. Names and values are now read decoded, names also as PHP reads them.
#[tokio::test]
async fn query_spellings_the_application_reads_alike_do_not_slip_past_a_rule() {
    let origin = named_origin("o", "no-store").await;
    let rules = r#"
[[rule]]
name = "search"
match = { query = { search = "" } }
rate_limit = { per_second = 0.01, burst = 1 }

[[rule]]
name = "no special pages"
match = { query = { title = "^Special:" } }
deny = { status = 403, body = "forbidden" }
"#;
    let skua = Skua::start(&[origin.addr], rules).await;
    let request = |target: &str| {
        format!("GET {target} HTTP/1.1\r\nHost: wiki.test\r\nConnection: close\r\n\r\n")
    };
    let first = raw(skua.addr, &request("/w/index.php?search=x")).await;
    assert!(first.starts_with("HTTP/1.1 200 "), "{first}");
    for spelling in [
        "/w/index.php?+search=x",
        "/w/index.php?%20search=y",
        "/w/index.php?search%00=x",
        "/w/index.php?search%5B%5D=x",
        "/w/index.php?%73earch=x",
        "/w/index.php?title=T&search=x+y",
    ] {
        let limited = raw(skua.addr, &request(spelling)).await;
        assert!(
            limited.starts_with("HTTP/1.1 429 "),
            "{spelling}: {limited}"
        );
    }
    for spelling in [
        "/w/index.php?title=Special:Version",
        "/w/index.php?title=Special%3AVersion",
        "/w/index.php?+title=Special%3aVersion",
    ] {
        let denied = raw(skua.addr, &request(spelling)).await;
        assert!(denied.starts_with("HTTP/1.1 403 "), "{spelling}: {denied}");
    }
    for other in ["/w/index.php?searches=x", "/w/index.php?title=Main_Page"] {
        let served = raw(skua.addr, &request(other)).await;
        assert!(served.starts_with("HTTP/1.1 200 "), "{other}: {served}");
    }
    let reached: Vec<_> = (origin.all_requests().iter())
        .map(|r| r.target.clone())
        .collect();
    assert_eq!(
        reached,
        [
            "/w/index.php?search=x",
            "/w/index.php?searches=x",
            "/w/index.php?title=Main_Page"
        ]
    );
}

/// config/mediawiki.toml's limits hold for every spelling a real MediaWiki serves the same
/// (each checked against MediaWiki 1.39 under PHP's server, 2026-12-04). Regression: its search
/// limit matched `/wiki/Special:Search` alone, while MediaWiki's own search box sends
/// `/w/index.php?search=…`, and `special:search` or `Special%3ASearch` are the same page;
/// its API limit and route missed `//w/api.php`; its pass for relative diffs missed the short
/// URL `/wiki/A?diff=cur` (where its own redirect sends `/w/index.php/A?diff=cur`), which
/// MediaWiki sends with `s-maxage` as it does `/w/index.php/A?diff=cur`, and never purges (a
/// diff an hour stale).
#[test]
fn the_mediawiki_example_limits_every_spelling_mediawiki_serves_alike() {
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/config/mediawiki.toml");
    let explain = |url: &str| {
        let out = std::process::Command::new(skua_bin())
            .args(["check", "--config", config, "--explain", url])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for url in [
        "/wiki/Special:Search?search=x",
        "/wiki/special:search?search=x",
        "/wiki/Special%3ASearch?search=x",
        "/w/index.php?search=x&title=Special%3ASearch",
        "/w/index.php?title=special:search&search=x&fulltext=1",
        "/w/index.php?+search=x&title=Special%3ASearch",
    ] {
        let text = explain(&format!("https://en.wiki.example{url}"));
        assert!(text.contains("\"search\" (line "), "{url}:\n{text}");
        assert!(text.contains("): pass, rate_limit\n"), "{url}:\n{text}");
    }
    for url in [
        "/w/api.php?action=query",
        "//w/api.php?action=query",
        "/w//api.php",
        "/w/api.php/x?action=query",
        "/w/rest.php/v1/page/A",
    ] {
        let text = explain(&format!("https://en.wiki.example{url}"));
        assert!(text.contains("\"API clients\" (line "), "{url}:\n{text}");
        assert!(text.contains("pool: api "), "{url}:\n{text}");
    }
    // A relative diff and a page action, however the title is given: MediaWiki 1.39 sends
    // `/w/index.php/A?diff=cur` with `s-maxage` (so too the short URL, rewritten to
    // index.php) and never purges it.
    for url in [
        "/w/index.php?title=A&diff=cur&oldid=3",
        "/w/index.php/A?diff=cur&oldid=3",
        "/wiki/A?diff=prev&oldid=3",
    ] {
        let text = explain(&format!("https://en.wiki.example{url}"));
        assert!(text.contains("\"relative diffs\" (line "), "{url}:\n{text}");
        assert!(text.contains("): pass\n"), "{url}:\n{text}");
    }
    for url in [
        "/w/index.php?title=A&action=delete",
        "/w/index.php/A?action=delete",
        "/wiki/A?action=delete",
    ] {
        let text = explain(&format!("https://en.wiki.example{url}"));
        assert!(
            text.contains("\"editing and page actions\" (line "),
            "{url}:\n{text}"
        );
    }
    // Title suggestions are the API's, and stay cacheable.
    let suggestions = explain("https://en.wiki.example/w/api.php?action=opensearch&search=x");
    assert!(!suggestions.contains("\"search\""), "{suggestions}");
}

/// A `POST` of `len` bytes to `path`, declared by `Content-Length`: what Skua answers.
async fn post(skua: &Skua, path: &str, len: usize) -> String {
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: wiki.test\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n{}",
        "b".repeat(len)
    );
    raw(skua.addr, &request).await
}

/// A rule's `max_body_bytes` replaces `[server] max_body_bytes` for the requests it matches,
/// above it (uploads where the wiki takes them) and below it, declared or counted as the body
/// arrives; the server's holds everywhere else. Before, one limit held for every path, so a
/// wiki that took 100 MiB uploads took 100 MiB bodies on every page.
#[tokio::test]
async fn a_rules_max_body_bytes_replaces_the_servers_for_the_requests_it_matches() {
    let origin = Origin::start(|_| Reply::ok("taken").header("cache-control", "no-store")).await;
    let rules = r#"
[[rule]]
name = "uploads"
match = { path = ["/upload"], method = ["POST"] }
max_body_bytes = 0

[[rule]]
name = "api"
match = { path = ["/api"] }
max_body_bytes = 100
"#;
    let skua = Skua::start_tables(&[origin.addr], ["max_body_bytes = 1000", "", ""], rules).await;

    let upload = post(&skua, "/upload", 50_000).await;
    assert!(upload.starts_with("HTTP/1.1 200 "), "{upload}");
    let seen = origin.requests("/upload");
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].body.len(),
        50_000,
        "the upload reached the origin whole"
    );

    let page = post(&skua, "/wiki/Page", 5_000).await;
    assert!(page.starts_with("HTTP/1.1 413 "), "{page}");
    assert!(page.contains("over 1000 bytes (max_body_bytes)"), "{page}");
    assert_eq!(origin.count("/wiki/Page"), 0);

    let api = post(&skua, "/api", 500).await;
    assert!(api.starts_with("HTTP/1.1 413 "), "{api}");
    assert!(
        api.contains("over 100 bytes (max_body_bytes of rule \"api\")"),
        "{api}"
    );
    assert_eq!(origin.count("/api"), 0);
    let at_the_limit = post(&skua, "/api", 100).await;
    assert!(at_the_limit.starts_with("HTTP/1.1 200 "), "{at_the_limit}");

    // A chunked body is counted against the rule's limit as it arrives.
    let chunk = format!("3c\r\n{}\r\n", "c".repeat(60));
    let chunked = raw(
        skua.addr,
        &format!(
            "POST /api HTTP/1.1\r\nHost: wiki.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{chunk}{chunk}{chunk}0\r\n\r\n"
        ),
    )
    .await;
    assert!(chunked.starts_with("HTTP/1.1 413 "), "{chunked}");
    for seen in origin.requests("/api") {
        assert!(
            seen.body.len() <= 100,
            "a body over the rule's limit reached the origin"
        );
    }
}

/// On a dual-stack listener (`listen = ["[::]:80"]`) the kernel gives an IPv4 client as
/// `::ffff:a.b.c.d`. Regression: such a client slipped past a rule's `client` network (a
/// `deny` for 127.0.0.0/8 answered it 200), and the origin was told `X-Forwarded-For:
/// ::ffff:127.0.0.1`, an address no IPv4 block on the wiki matches.
#[tokio::test]
async fn an_ipv4_client_of_a_dual_stack_listener_is_judged_by_its_ipv4_address() {
    if std::net::TcpListener::bind("[::]:0").is_err() {
        eprintln!("skipped: this kernel offers no IPv6 socket");
        return;
    }
    let origin = Origin::start(|_| Reply::ok("page").header("cache-control", "no-store")).await;
    let rules = format!(
        r#"{DUAL_STACK}
[[rule]]
name = "blocked network"
match = {{ path_prefix = ["/w/index.php"], client = ["127.0.0.0/8"] }}
deny = {{ status = 403, body = "blocked" }}
"#
    );
    let skua = Skua::start(&[origin.addr], &rules).await;
    let denied = get(&skua.url("/w/index.php?title=A&action=edit"), &[]).await;
    assert_eq!((denied.status, denied.text().trim()), (403, "blocked"));
    assert_eq!(origin.count_starting("/w/index.php"), 0);

    let page = get(&skua.url("/wiki/A"), &[]).await;
    assert_eq!(page.status, 200);
    let seen = origin.requests("/wiki/A");
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header("x-forwarded-for"), Some("127.0.0.1"));
}

/// A request a rule passes keeps every cookie on its way to the origin, as one passed for a
/// session cookie does; a cacheable one keeps only those the key accounts for. Regression:
/// config/mediawiki.toml's pass for the `mf_useformat` cookie sent the request without the
/// cookie, so MediaWiki never saw the mobile preview it was passed for.
#[tokio::test]
async fn a_request_a_rule_passes_keeps_its_cookies() {
    let origin = named_origin("o", "max-age=600").await;
    let rules = r#"
[[rule]]
name = "mobile preview cookie"
match = { cookie = { "mf_useformat" = "" } }
pass = true

[[rule]]
name = "special pages"
match = { path_prefix = ["/wiki/Special:"] }
pass = true
"#;
    let skua = Skua::start(&[origin.addr], rules).await;
    let cookie = ("cookie", "mf_useformat=true; theme=dark");
    for path in ["/wiki/Main_Page", "/wiki/Special:Random"] {
        let got = get(&skua.url(path), &[cookie]).await;
        assert_eq!((got.status, got.cache()), (200, "pass"), "{path}");
    }
    let plain = get(&skua.url("/wiki/Other"), &[("cookie", "theme=dark")]).await;
    assert_eq!(plain.cache(), "miss");
    let cookies = |path: &str| {
        let seen = origin.requests(path);
        seen[0].header("cookie").map(str::to_string)
    };
    assert_eq!(cookies("/wiki/Main_Page").as_deref(), Some(cookie.1));
    assert_eq!(cookies("/wiki/Special:Random").as_deref(), Some(cookie.1));
    assert_eq!(cookies("/wiki/Other"), None);
}
