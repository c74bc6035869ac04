//! `skua demo` end to end, as the README tells a newcomer to try it.

use std::process::{Child, Command, Stdio};

use crate::support::*;

struct Demo {
    child: Child,
    proxy: String,
    origin: String,
    https: String,
    admin: String,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_demo(cache_dir: &std::path::Path) -> Demo {
    start_demo_on((free_port(), free_port(), free_port()), cache_dir).await
}

async fn start_demo_on(ports: (u16, u16, u16), cache_dir: &std::path::Path) -> Demo {
    let demo = spawn_demo(ports, cache_dir, &[]);
    wait_listening(demo.proxy.parse().unwrap()).await;
    wait_listening(demo.origin.parse().unwrap()).await;
    demo
}

/// `skua demo` on the given proxy, origin and admin ports, with `extra` arguments.
fn spawn_demo((p, o, a): (u16, u16, u16), cache_dir: &std::path::Path, extra: &[&str]) -> Demo {
    let https = format!("127.0.0.1:{}", free_port());
    let child = Command::new(skua_bin())
        .arg("demo")
        .args(extra)
        .args(["--proxy", &format!("127.0.0.1:{p}")])
        .args(["--origin", &format!("127.0.0.1:{o}")])
        .args(["--admin", &format!("127.0.0.1:{a}")])
        .args(["--htcp", &format!("127.0.0.1:{}", free_port())])
        .args(["--https", &https])
        .arg("--cache-dir")
        .arg(cache_dir)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    Demo {
        child,
        proxy: format!("127.0.0.1:{p}"),
        origin: format!("127.0.0.1:{o}"),
        https,
        admin: format!("127.0.0.1:{a}"),
    }
}

/// A client of the demo's HTTPS listener that takes the certificate the demo made, as
/// `curl -k`.
fn demo_certificate_trusting_client() -> reqwest::Client {
    reqwest::Client::builder()
        .use_rustls_tls()
        .danger_accept_invalid_certs(true)
        .build()
        .unwrap()
}

/// #19: the demo serves HTTPS and HTTP/2 with the certificate it made at start (a client that
/// does not verify it, as `curl -k`), from the same cache as plain HTTP's listener.
#[tokio::test]
async fn the_demo_serves_https_and_http2() {
    let dir = tempfile::tempdir().unwrap();
    let demo = start_demo(dir.path()).await;
    wait_listening(demo.https.parse().unwrap()).await;
    let client = demo_certificate_trusting_client();
    let url = format!("https://{}/wiki/Main_Page", demo.https);
    let first = client.get(&url).send().await.unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(first.version(), reqwest::Version::HTTP_2);
    assert_eq!(first.headers()["x-cache-status"], "miss");
    assert!(first.text().await.unwrap().contains("Main Page"));
    let again = client.get(&url).send().await.unwrap();
    assert_eq!(again.headers()["x-cache-status"], "hit-front");
    assert!(dir.path().join("tls/demo-certificate.pem").is_file());
}

/// Regression: the demo's origin purges the page under the proxy's address (as MediaWiki
/// names pages by one host), and a page read over the demo's HTTPS address, or as
/// `localhost`, was keyed on a host no purge named: after an edit those readers got the old
/// page for its whole `s-maxage`.
#[tokio::test]
async fn an_edit_reaches_the_demo_s_https_and_localhost_readers() {
    let dir = tempfile::tempdir().unwrap();
    let demo = start_demo(dir.path()).await;
    wait_listening(demo.https.parse().unwrap()).await;
    let tls = demo_certificate_trusting_client();
    let port = |addr: &str| addr.rsplit_once(':').unwrap().1.to_string();
    let readers = [
        format!("https://{}/wiki/Sandbox", demo.https),
        format!("https://localhost:{}/wiki/Sandbox", port(&demo.https)),
        format!("http://localhost:{}/wiki/Sandbox", port(&demo.proxy)),
    ];
    let read = |url: String| {
        let tls = tls.clone();
        async move {
            let answer = tls.get(&url).send().await.unwrap();
            let cache = answer.headers()["x-cache-status"]
                .to_str()
                .unwrap()
                .to_string();
            (cache, answer.text().await.unwrap())
        }
    };
    for url in &readers {
        read(url.clone()).await;
        assert_eq!(read(url.clone()).await.0, "hit-front", "{url}");
    }
    let edit = post_edit(
        &client(),
        &format!("http://{}/wiki/Sandbox", demo.origin),
        &[],
        "after the edit",
    )
    .await;
    assert!(edit.contains("204"), "{edit}");
    for url in &readers {
        let (cache, page) = read(url.clone()).await;
        assert!(page.contains("after the edit"), "{url} ({cache}): {page}");
    }
}

/// Edits a page of the sample wiki with `POST`, as a reader would; returns the origin's report.
async fn post_edit(
    client: &reqwest::Client,
    url: &str,
    headers: &[(&str, &str)],
    text: &str,
) -> String {
    let mut req = client.post(url).body(text.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap().text().await.unwrap()
}

async fn origin_stats(demo: &Demo, path: &str) -> serde_json::Value {
    let body = get(&format!("http://{}/_origin/stats", demo.origin), &[])
        .await
        .text();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["paths"][path].clone()
}

#[tokio::test]
async fn demo_miss_hit_and_edit() {
    let dir = tempfile::tempdir().unwrap();
    let demo = start_demo(dir.path()).await;
    let url = format!("http://{}/wiki/Main_Page", demo.proxy);
    let first = get(&url, &[]).await;
    assert_eq!((first.status, first.cache()), (200, "miss"));
    let second = get(&url, &[]).await;
    assert_eq!(second.cache(), "hit-front");
    assert!(second.headers.contains_key("age"));
    assert!(second.header("cache-status").starts_with("skua; hit"));
    // As Wikimedia's edge does: no shared lifetime for caches Skua's purges cannot reach.
    assert_eq!(
        second.header("cache-control"),
        "private, s-maxage=0, max-age=0, must-revalidate"
    );
    assert_eq!(origin_stats(&demo, "/wiki/Main_Page").await["fetches"], 1);

    let edit = post_edit(
        &client(),
        &format!("http://{}/wiki/Main_Page", demo.origin),
        &[],
        "new text",
    )
    .await;
    assert!(
        edit.contains("204"),
        "the origin's PURGE was accepted: {edit}"
    );
    let after = get(&url, &[]).await;
    assert_eq!(after.cache(), "miss");
    assert!(after.text().contains("new text"), "{}", after.text());
}

/// Regression (MediaWiki's `$wgCdnServers = ['127.0.0.1:8080']`): every edit was credited to
/// the cache's address. The demo's origin credits edits as MediaWiki does with README's
/// settings: the forwarded client when the edit comes through Skua, and never a forwarded
/// address from anyone else.
#[tokio::test]
async fn edits_through_skua_are_credited_to_the_reader() {
    let dir = tempfile::tempdir().unwrap();
    let demo = start_demo(dir.path()).await;
    let from = |ip: [u8; 4]| {
        reqwest::Client::builder()
            .local_address(std::net::IpAddr::from(ip))
            .build()
            .unwrap()
    };
    let page = |at: &str| format!("http://{at}/wiki/Credited");
    let through_skua = post_edit(&from([127, 0, 0, 2]), &page(&demo.proxy), &[], "an edit").await;
    assert!(through_skua.contains("as 127.0.0.2;"), "{through_skua}");
    let forged = post_edit(
        &from([127, 0, 0, 3]),
        &page(&demo.origin),
        &[("x-forwarded-for", "203.0.113.9")],
        "another edit",
    )
    .await;
    assert!(forged.contains("as 127.0.0.3;"), "{forged}");
    assert_eq!(
        origin_stats(&demo, "/wiki/Credited").await["last_editor"],
        "127.0.0.3"
    );
}

#[tokio::test]
async fn demo_collapses_200_cold_requests() {
    let dir = tempfile::tempdir().unwrap();
    let demo = start_demo(dir.path()).await;
    let url = format!("http://{}/wiki/Cold_Page", demo.proxy);
    let client = client();
    let all = futures::future::join_all((0..200).map(|_| send(&client, "GET", &url, &[]))).await;
    assert!(all.iter().all(|r| r.status == 200));
    assert_eq!(origin_stats(&demo, "/wiki/Cold_Page").await["fetches"], 1);
}

#[tokio::test]
async fn restarted_demo_serves_from_its_disk_cache_after_one_revalidation() {
    let dir = tempfile::tempdir().unwrap();
    let ports = (free_port(), free_port(), free_port());
    let demo = start_demo_on(ports, dir.path()).await;
    let url = format!("http://{}/wiki/Persistent", demo.proxy);
    assert_eq!(get(&url, &[]).await.cache(), "miss");
    // Stored (the commit ends after the response's last byte): a hit says so.
    wait_until_async_hit(&url).await;
    // Held in memory, the fill does not wait for the disk writer: the kill -9 below must not
    // come before it wrote the page.
    let admin = format!("http://{}/stats", demo.admin);
    for _ in 0..500 {
        let stats = get(&admin, &[]).await.text();
        let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
        if stats["tiers"]["disk"]["write_queue_objects"] == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    drop(demo);
    let demo = start_demo_on(ports, dir.path()).await;
    // The index loads in the background; it is quick for one page, but allow for it.
    let mut status = String::new();
    for _ in 0..50 {
        let r = get(&url, &[]).await;
        status = r.cache().to_string();
        if status != "miss" {
            assert!(r.text().contains("Persistent"));
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Purges sent while it was down reached nobody, so the copy from before the restart is
    // checked first: the origin answers 304 and the body comes from disk.
    assert_eq!(status, "revalidated");
    let stats = origin_stats(&demo, "/wiki/Persistent").await;
    assert_eq!(
        (stats["fetches"].as_u64(), stats["not_modified"].as_u64()),
        (Some(0), Some(1))
    );
    // Confirmed, it is trusted again.
    assert!(get(&url, &[]).await.cache().starts_with("hit-"));
}

async fn wait_until_async_hit(url: &str) {
    for _ in 0..100 {
        if get(url, &[]).await.cache().starts_with("hit-") {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("{url} was never stored");
}

/// A base port whose +10 and +20 neighbours are free too (the demo fleet's layout).
fn free_port_run() -> u16 {
    loop {
        let p = free_port();
        if p < 60000
            && [p + 10, p + 20]
                .iter()
                .all(|q| std::net::TcpListener::bind(("127.0.0.1", *q)).is_ok())
        {
            return p;
        }
    }
}

#[tokio::test]
async fn demo_fleet_carries_an_edit_from_node_a_to_every_node() {
    let nats = Nats::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (p, o, a) = (free_port_run(), free_port(), free_port_run());
    let nats_url = nats.url();
    let demo = spawn_demo(
        (p, o, a),
        dir.path(),
        &["--nodes", "3", "--nats", &nats_url],
    );
    let nodes: Vec<String> = (0..3)
        .map(|i| format!("127.0.0.1:{}", p + 10 * i))
        .collect();
    for node in &nodes {
        wait_listening(node.parse().unwrap()).await;
    }
    wait_listening(demo.origin.parse().unwrap()).await;
    for node in &nodes {
        let url = format!("http://{node}/wiki/Fleet");
        get(&url, &[]).await;
        assert_eq!(get(&url, &[]).await.cache(), "hit-front", "{node}");
    }
    let edit_url = format!("http://{}/wiki/Fleet", demo.origin);
    let edit = send(&client(), "POST", &edit_url, &[]).await;
    assert_eq!(edit.status, 200);
    // The origin purged node a only; b and c hear of it over the bus.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    for node in &nodes {
        loop {
            let got = get(&format!("http://{node}/wiki/Fleet"), &[]).await;
            if got.cache() == "miss" {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{node} still serves the old page"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

/// #19: a browser (headless Chromium) loads the demo's page over HTTPS, negotiates HTTP/2, and
/// its second visit is a memory hit: the page and the `X-Cache-Status` it was served with, as
/// Chromium's own network log recorded them.
#[tokio::test]
async fn a_browser_reads_the_demo_over_https_and_http2_from_the_cache() {
    let Some(chromium) = crate::dashboard::chromium() else {
        prerequisite_missing("no Chromium (apt-get install chromium)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let demo = start_demo(&dir.path().join("cache")).await;
    wait_listening(demo.https.parse().unwrap()).await;
    let url = format!("https://{}/wiki/Main_Page", demo.https);
    let cache_status = regex::Regex::new(r#""x-cache-status: ([a-z-]+)""#).unwrap();
    let mut statuses = Vec::new();
    for visit in 0..2 {
        let net_log = dir.path().join(format!("net-{visit}.json"));
        let profile = dir.path().join(format!("profile-{visit}"));
        let (chromium, url, log) = (chromium.clone(), url.clone(), net_log.clone());
        let out = tokio::task::spawn_blocking(move || {
            crate::dashboard::browser(&chromium, &profile)
                // The demo's certificate is self-signed, made at start (as `curl -k`).
                .arg("--ignore-certificate-errors")
                .arg(format!("--log-net-log={}", log.display()))
                .arg("--dump-dom")
                .arg(&url)
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let page = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            page.contains("<h1>Main Page</h1>"),
            "visit {visit}:\n{page}"
        );
        let log = std::fs::read_to_string(&net_log).unwrap();
        assert!(
            log.contains("\"negotiated_protocol\":\"h2\""),
            "visit {visit} did not use HTTP/2"
        );
        let status = cache_status
            .captures(&log)
            .map(|c| c[1].to_string())
            .unwrap_or_default();
        statuses.push(status);
    }
    assert_eq!(statuses, ["miss", "hit-front"]);
}

/// #21: `skua top` in a terminal (tmux, read back with capture-pane) against a running demo
/// shows the node's hit ratio over the last five minutes and since start, and the page read
/// most with its count, redrawn as traffic comes.
#[tokio::test]
async fn skua_top_under_tmux_shows_the_demo_s_hit_ratio_and_top_urls() {
    if Command::new("tmux").arg("-V").output().is_err() {
        prerequisite_missing("no tmux (apt-get install tmux)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let demo = start_demo(&dir.path().join("cache")).await;
    wait_listening(demo.admin.parse().unwrap()).await;
    let page = format!("http://{}/wiki/Main_Page", demo.proxy);
    for _ in 0..5 {
        assert_eq!(get(&page, &[]).await.status, 200);
    }
    // A tmux server of this test's own (its socket in the temp dir), so nothing is shared.
    let socket = dir.path().join("tmux.sock");
    let tmux = |args: &[&str]| {
        Command::new("tmux")
            .arg("-S")
            .arg(&socket)
            .args(args)
            .output()
            .unwrap()
    };
    let command = format!("{} top --admin {}", skua_bin().display(), demo.admin);
    let started = tmux(&[
        "new-session",
        "-d",
        "-x",
        "120",
        "-y",
        "40",
        "-s",
        "top",
        &command,
    ]);
    assert!(started.status.success(), "{started:?}");
    let mut screen = String::new();
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let captured = tmux(&["capture-pane", "-p", "-t", "top"]);
        screen = String::from_utf8_lossy(&captured.stdout).into_owned();
        if words(&screen).contains("Hit ratio, last 5 min 80.0 %") {
            break;
        }
    }
    tmux(&["kill-server"]);
    // One miss, then four hits.
    assert!(
        words(&screen).contains("Hit ratio, last 5 min 80.0 %"),
        "the window's hit ratio:\n{screen}"
    );
    assert!(
        words(&screen).contains("Hit ratio, since start 80.0 %"),
        "since start:\n{screen}"
    );
    let row = (screen.lines())
        .skip_while(|l| !l.starts_with("Top URLs"))
        .find(|l| l.contains("/wiki/Main_Page"))
        .unwrap_or_else(|| panic!("Main_Page among the top URLs:\n{screen}"));
    assert!(row.trim_end().ends_with(" 5"), "read five times: {row}");
}

/// `text` with every run of spaces as one: what a reader sees of a column layout.
fn words(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
