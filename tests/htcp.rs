//! HTCP CLR purges over real UDP, in both real senders' dialects, and what is refused.

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::*;

/// Captured from a real Squid 5.7 purging `http://127.0.0.1:38128/obj/1k.bin`.
const SQUID_57: &str = "00410001003b4000000000010000000550555247450021687474703a2f2f3132372e302e302e313a33383132382f6f626a2f316b2e62696e0003312f3100000002";

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

async fn start(origin: SocketAddr, htcp_allow: &str) -> (Skua, SocketAddr) {
    let port = free_udp_port();
    let extra = format!("[purge.htcp]\nlisten = \"127.0.0.1:{port}\"\n{htcp_allow}\n");
    let skua = Skua::start(&[origin], &extra).await;
    (skua, format!("127.0.0.1:{port}").parse().unwrap())
}

/// Waits until the metrics show `line`: HTCP is fire-and-forget, so tests wait for its effect.
async fn wait_for_metric(skua: &Skua, line: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut text = String::new();
    while Instant::now() < deadline {
        text = skua.metrics().await;
        if text.contains(line) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("metrics never showed {line:?}:\n{text}");
}

fn cached() -> Reply {
    Reply::ok("object").header("cache-control", "max-age=600")
}

#[tokio::test]
async fn squid_capture_and_mediawiki_packets_purge() {
    let origin = Origin::start(|_| cached()).await;
    let (skua, htcp) = start(origin.addr, "").await;

    // The captured packet names host 127.0.0.1:38128; the key comes from the Host header.
    let squid_host = [("host", "127.0.0.1:38128")];
    get(&skua.url("/obj/1k.bin"), &squid_host).await;
    assert_eq!(
        get(&skua.url("/obj/1k.bin"), &squid_host).await.cache(),
        "hit-front"
    );
    let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
    sender.send_to(&unhex(SQUID_57), htcp).unwrap();
    wait_for_metric(
        &skua,
        "skua_purges_total{result=\"purged\",source=\"htcp\"} 1\n",
    )
    .await;
    assert_eq!(
        get(&skua.url("/obj/1k.bin"), &squid_host).await.cache(),
        "miss"
    );

    // MediaWiki's layout, sent by `skua purge --htcp` as an operator would.
    let pages = ["/wiki/Main_Page", "/wiki/Other"];
    for p in pages {
        get(&skua.url(p), &[]).await;
    }
    let urls: Vec<String> = pages.iter().map(|p| skua.url(p)).collect();
    let out = Command::new(skua_bin())
        .args(["purge", "--htcp", &htcp.to_string()])
        .args(&urls)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for_metric(
        &skua,
        "skua_purges_total{result=\"purged\",source=\"htcp\"} 3\n",
    )
    .await;
    for p in pages {
        assert_eq!(get(&skua.url(p), &[]).await.cache(), "miss", "{p}");
    }
}

#[tokio::test]
async fn malformed_packets_purge_nothing_and_are_counted() {
    let origin = Origin::start(|_| cached()).await;
    let (skua, htcp) = start(origin.addr, "").await;
    let url = skua.url("/kept");
    get(&url, &[]).await;

    let good = skua::purge::htcp::build(&url, 1, skua::purge::htcp::Dialect::MediaWiki);
    let short = good[..19].to_vec();
    let long = {
        let mut p = good.clone();
        p.resize(4097, 0);
        p[0..2].copy_from_slice(&4097u16.to_be_bytes());
        p
    };
    let bad_opcode = {
        let mut p = good.clone();
        p[6] = 0x03; // SET
        p
    };
    let overrun = {
        let mut p = good.clone();
        p[20..22].copy_from_slice(&4000u16.to_be_bytes());
        p
    };
    let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
    for packet in [&short, &long, &bad_opcode, &overrun] {
        sender.send_to(packet, htcp).unwrap();
    }
    wait_for_metric(
        &skua,
        "skua_purges_total{result=\"invalid\",source=\"htcp\"} 4\n",
    )
    .await;
    assert_eq!(get(&url, &[]).await.cache(), "hit-front");
    assert_eq!(origin.count("/kept"), 1);
}

#[tokio::test]
async fn packets_from_a_disallowed_source_purge_nothing() {
    let origin = Origin::start(|_| cached()).await;
    let (skua, htcp) = start(origin.addr, "allow = [\"192.0.2.0/24\"]").await;
    let url = skua.url("/guarded");
    get(&url, &[]).await;
    send_clr(htcp, &url);
    wait_for_metric(
        &skua,
        "skua_purges_total{result=\"denied\",source=\"htcp\"} 1\n",
    )
    .await;
    assert_eq!(get(&url, &[]).await.cache(), "hit-front");
}

/// Sends one CLR for `url` in MediaWiki's layout.
fn send_clr(to: SocketAddr, url: &str) {
    let packet = skua::purge::htcp::build(url, 1, skua::purge::htcp::Dialect::MediaWiki);
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .send_to(&packet, to)
        .unwrap();
}

/// CLRs accounted for: counted by result, or dropped by the kernel before Skua could read them
/// (UDP gives no other guarantee; a small `net.core.rmem_max` and a busy machine make it
/// happen, and the operator sees it in `skua_htcp_dropped_total`).
fn htcp_total(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| {
            (l.starts_with("skua_purges_total{") && l.contains("source=\"htcp\""))
                || l.starts_with("skua_htcp_dropped_total ")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test]
async fn a_50k_purge_storm_during_load_accounts_for_every_clr_and_fails_no_request() {
    let origin = Origin::start(|_| cached()).await;
    let (skua, htcp) = start(origin.addr, "").await;
    let client = client();
    for i in 0..500 {
        send(&client, "GET", &skua.url(&format!("/s/{i}")), &[]).await;
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = tokio::spawn({
        let (client, stop, base) = (client.clone(), stop.clone(), skua.url("/hot/"));
        async move {
            let (mut ok, mut failed) = (0u64, 0u64);
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = client.get(format!("{base}{}", i % 50)).send().await;
                match r {
                    Ok(r) if r.status() == 200 => ok += 1,
                    _ => failed += 1,
                }
                i += 1;
            }
            (ok, failed)
        }
    });
    let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
    for n in 0..50_000u32 {
        let url = if n % 2 == 0 {
            skua.url(&format!("/s/{}", (n / 2) % 500))
        } else {
            skua.url(&format!("/never-cached/{n}"))
        };
        let packet = skua::purge::htcp::build(&url, n, skua::purge::htcp::Dialect::MediaWiki);
        sender.send_to(&packet, htcp).unwrap();
        if n % 25 == 24 {
            // ~25k purges a second: a storm, paced so the kernel's default socket buffer
            // (net.core.rmem_max caps what Skua asks for) is not what is being tested.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut metrics = skua.metrics().await;
    while htcp_total(&metrics) < 50_000 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        metrics = skua.metrics().await;
    }
    assert_eq!(
        htcp_total(&metrics),
        50_000,
        "every CLR accounted for:\n{metrics}"
    );
    eprintln!(
        "storm: dropped by the kernel {}",
        skua.metric("skua_htcp_dropped_total").await
    );
    assert!(metrics.contains("skua_purge_backlog 0\n"), "{metrics}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = load.await.unwrap();
    assert_eq!(
        failed, 0,
        "no request failed during the storm ({ok} succeeded)"
    );
    assert!(ok > 0);
    for i in 0..500 {
        let r = send(&client, "GET", &skua.url(&format!("/s/{i}")), &[]).await;
        assert_eq!(r.cache(), "miss", "/s/{i} was purged");
    }
}

/// A burst of identical CLRs (MediaWiki sends one per CDN-URL per edit, and a template edit
/// sends the same URL from many jobs): while one purge of a URL waits in the queue, others of
/// it are counted as `deduplicated` and not applied again. Every packet is accounted for, and
/// the object is purged once.
#[tokio::test]
async fn a_burst_of_identical_clrs_is_deduplicated_and_applied_once() {
    let origin = Origin::start(|_| cached()).await;
    let (skua, htcp) = start(origin.addr, "").await;
    let url = skua.url("/wiki/Template_user");
    get(&url, &[]).await;
    assert_eq!(get(&url, &[]).await.cache(), "hit-front");
    let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
    let burst = 2_000u32;
    for n in 0..burst {
        let packet = skua::purge::htcp::build(&url, n, skua::purge::htcp::Dialect::MediaWiki);
        sender.send_to(&packet, htcp).unwrap();
        if n % 100 == 99 {
            // Paced below what the socket buffer holds: dropped datagrams are not the subject.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut metrics = skua.metrics().await;
    while htcp_total(&metrics) < burst as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        metrics = skua.metrics().await;
    }
    assert_eq!(
        htcp_total(&metrics),
        burst as u64,
        "every CLR accounted for:\n{metrics}"
    );
    let count = |result: &str| {
        let series = format!("skua_purges_total{{result=\"{result}\",source=\"htcp\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&series))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {series}"))
    };
    eprintln!(
        "burst of {burst}: purged {} not_found {} deduplicated {}",
        count("purged"),
        count("not_found"),
        count("deduplicated")
    );
    assert_eq!(count("purged"), 1, "applied to the cached object once");
    assert!(count("deduplicated") > 0, "no purge was deduplicated");
    assert_eq!(get(&url, &[]).await.cache(), "miss");
    assert_eq!(origin.count("/wiki/Template_user"), 2);
}

/// A receiver that listens on a multicast group, as MediaWiki's `$wgHTCPRouting` sends to one
/// (e.g. 239.128.0.112:4827), joined on the loopback interface so the test stays on this host.
#[tokio::test]
async fn clrs_sent_to_a_multicast_group_purge() {
    let origin = Origin::start(|_| cached()).await;
    let port = free_udp_port();
    let group = std::net::Ipv4Addr::new(239, 255, 72, 17);
    let extra = format!(
        "[purge.htcp]\nlisten = \"{group}:{port}\"\nmulticast_groups = [\"{group}\"]\nmulticast_interface = \"127.0.0.1\"\n"
    );
    let skua = Skua::start(&[origin.addr], &extra).await;
    let url = skua.url("/wiki/Multicast");
    get(&url, &[]).await;
    assert_eq!(get(&url, &[]).await.cache(), "hit-front");
    let sender = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
    sender
        .set_multicast_if_v4(&std::net::Ipv4Addr::LOCALHOST)
        .unwrap();
    sender.set_multicast_loop_v4(true).unwrap();
    let packet = skua::purge::htcp::build(&url, 7, skua::purge::htcp::Dialect::MediaWiki);
    let to: SocketAddr = (group, port).into();
    // The receiver joins the group once its service starts; resend until it has.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        sender.send_to(&packet, &to.into()).unwrap();
        let metrics = skua.metrics().await;
        if metrics.contains("skua_purges_total{result=\"purged\",source=\"htcp\"} 1\n") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no multicast CLR arrived:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(get(&url, &[]).await.cache(), "miss");
}

/// `host_regex` fences which hosts HTCP may purge, matched against the whole host: a packet for
/// another host (even one that contains the allowed name) is refused and counted.
#[tokio::test]
async fn host_regex_fences_which_hosts_htcp_may_purge() {
    let origin = Origin::start(|_| cached()).await;
    let (skua, htcp) = start(origin.addr, "host_regex = 'wiki\\.test'").await;
    let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
    for (i, host) in ["notwiki.test.attacker.example", "other.test", "wiki.test"]
        .iter()
        .enumerate()
    {
        let headers = [("host", *host)];
        get(&skua.url("/wiki/Fenced"), &headers).await;
        assert_eq!(
            get(&skua.url("/wiki/Fenced"), &headers).await.cache(),
            "hit-front"
        );
        let packet = skua::purge::htcp::build(
            &format!("http://{host}/wiki/Fenced"),
            i as u32,
            skua::purge::htcp::Dialect::MediaWiki,
        );
        sender.send_to(&packet, htcp).unwrap();
    }
    wait_for_metric(
        &skua,
        "skua_purges_total{result=\"purged\",source=\"htcp\"} 1\n",
    )
    .await;
    wait_for_metric(
        &skua,
        "skua_purges_total{result=\"denied\",source=\"htcp\"} 2\n",
    )
    .await;
    for (host, expect) in [
        ("notwiki.test.attacker.example", "hit-front"),
        ("other.test", "hit-front"),
        ("wiki.test", "miss"),
    ] {
        assert_eq!(
            get(&skua.url("/wiki/Fenced"), &[("host", host)])
                .await
                .cache(),
            expect,
            "{host}"
        );
    }
}

/// Regression: a second Skua configured with the same HTCP address started without error and,
/// sharing the port, received every CLR meant for the first. Now it refuses to start, naming
/// the key; the first goes on receiving, and says so in /stats, the metrics and /readyz.
#[tokio::test]
async fn a_second_skua_on_the_same_htcp_address_refuses_to_start() {
    let origin = Origin::start(|_| cached()).await;
    let (skua, htcp) = start(origin.addr, "").await;
    wait_for_metric(&skua, "skua_htcp_listening 1\n").await;
    let stats = skua.stats().await;
    assert_eq!(stats["htcp"]["listening"], true, "{stats}");
    assert_eq!(stats["htcp"]["listen"], htcp.to_string());
    skua.wait_ready().await;

    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[server]\nlisten = [\"127.0.0.1:{}\"]\nadmin = \"127.0.0.1:{}\"\nupgrade_sock = \"{}\"\n\n[[origin]]\nname = \"o\"\naddresses = [\"{}\"]\n\n[purge.htcp]\nlisten = \"{htcp}\"\n",
        free_port(),
        free_port(),
        dir.path().join("upgrade.sock").display(),
        origin.addr
    );
    let path = dir.path().join("second.toml");
    std::fs::write(&path, config).unwrap();
    let stderr = serve_refused(&path);
    assert!(
        stderr.contains(&format!("purge.htcp.listen: cannot listen on {htcp}")),
        "{stderr}"
    );

    // The same for a TCP address: the proxy port of the first.
    let taken = std::fs::read_to_string(&path)
        .unwrap()
        .replace(
            &format!("listen = \"{htcp}\""),
            &format!("listen = \"127.0.0.1:{}\"", free_udp_port()),
        )
        .replacen(
            "listen = [\"127.0.0.1:",
            &format!("listen = [\"{}\"]\n#", skua.addr),
            1,
        );
    std::fs::write(&path, taken).unwrap();
    let stderr = serve_refused(&path);
    assert!(
        stderr.contains(&format!("server.listen: cannot listen on {}", skua.addr)),
        "{stderr}"
    );

    // The first still gets the CLRs.
    let url = skua.url("/wiki/Mine");
    get(&url, &[]).await;
    send_clr(htcp, &url);
    wait_for_metric(
        &skua,
        "skua_purges_total{result=\"purged\",source=\"htcp\"} 1\n",
    )
    .await;
    assert_eq!(get(&url, &[]).await.cache(), "miss");
}

/// Every purge source reads a URL through the one canonical key function: for every spelling
/// of one page's URL (host case, default port, trailing dot, escapes, dot segments, an empty
/// query, a fragment, the scheme's case, the other scheme), an HTTP PURGE in absolute form, one
/// in origin form, an HTCP CLR and the admin API each remove the page stored by a plain GET.
#[tokio::test]
async fn every_purge_source_removes_a_page_by_any_spelling_of_its_url() {
    let origin = Origin::start(|_| cached()).await;
    let (skua, htcp) = start(origin.addr, "").await;
    let spellings = [
        "http://wiki.test/wiki/Page",
        "http://WIKI.Test/wiki/Page",
        "http://wiki.test:80/wiki/Page",
        "http://wiki.test./wiki/Page",
        "http://wiki.test/wiki/%50age",
        "http://wiki.test/wiki/./x/../Page",
        "http://wiki.test/wiki/Page?",
        "http://wiki.test/wiki/Page#top",
        "HTTP://wiki.test/wiki/Page",
        "https://wiki.test/wiki/Page",
        "https://wiki.test:443/wiki/Page",
    ];
    let page_url = skua.url("/wiki/Page");
    let page = || get(&page_url, &[("host", "wiki.test")]);
    let mut missed = Vec::new();
    for spelling in spellings {
        let (scheme_and_authority, path) = {
            let after_scheme = spelling.find("://").unwrap() + 3;
            let path_at = spelling[after_scheme..].find('/').unwrap() + after_scheme;
            (&spelling[..path_at], &spelling[path_at..])
        };
        let authority = &scheme_and_authority[scheme_and_authority.find("://").unwrap() + 3..];
        for source in ["absolute", "origin-form", "htcp", "admin"] {
            page().await;
            assert_eq!(
                page().await.cache(),
                "hit-front",
                "{spelling} {source}: stored"
            );
            match source {
                "absolute" => {
                    // `Host` as curl sends it through a proxy (MediaWiki's purges): the
                    // URL's authority. (pingora answers 400 when they differ.)
                    let purge = format!(
                        "PURGE {spelling} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
                    );
                    raw(skua.addr, &purge).await;
                }
                "origin-form" if spelling.starts_with("http://") => {
                    let purge = format!(
                        "PURGE {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
                    );
                    raw(skua.addr, &purge).await;
                }
                "origin-form" => continue,
                "htcp" => {
                    // Until the CLR is counted: any other series changing (a request's) is
                    // no sign it was applied.
                    let before = htcp_purges(&skua.metrics().await);
                    send_clr(htcp, spelling);
                    let deadline = Instant::now() + Duration::from_secs(5);
                    while htcp_purges(&skua.metrics().await) == before && Instant::now() < deadline
                    {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                _ => {
                    let encoded: String = (spelling.bytes()).map(|b| format!("%{b:02X}")).collect();
                    let admin = format!("http://{}/purge?url={encoded}", skua.admin);
                    send(&client(), "POST", &admin, &[("skua-purge", "1")]).await;
                }
            }
            let after = page().await;
            if after.cache() != "miss" {
                missed.push(format!("{source} {spelling}: {}", after.cache()));
            }
        }
    }
    assert!(missed.is_empty(), "not purged:\n{}", missed.join("\n"));
}

/// Every HTCP purge counted in `metrics`, whatever its result.
fn htcp_purges(metrics: &str) -> f64 {
    (metrics.lines())
        .filter(|l| l.starts_with("skua_purges_total{") && l.contains("source=\"htcp\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Regression: during a zero-downtime upgrade the new process could listen for HTCP only once
/// the old one let its socket go (five seconds after SIGQUIT), retrying every 200 ms: CLRs
/// sent in between reached no socket. Every CLR sent across the hand-over is now accounted
/// for by the new process: read by it, or read and relayed by the old one.
#[tokio::test]
async fn no_clr_is_lost_across_a_zero_downtime_upgrade() {
    let origin = Origin::start(|_| cached()).await;
    let (mut skua, htcp) = start(origin.addr, "").await;
    let mut new = skua.hand_over().await;
    // The old process takes SIGQUIT in a moment; from then on it relays.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut sent = 0u64;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut after_exit = 0;
    while after_exit < 100 && Instant::now() < deadline {
        send_clr(htcp, &format!("http://wiki.test/p/{sent}"));
        sent += 1;
        if !skua.alive() {
            after_exit += 1;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(!skua.alive(), "the old process exited");
    let counted = |metrics: &str| -> u64 {
        (metrics.lines())
            .filter(|l| l.starts_with("skua_purges_total{") && l.contains("source=\"handover\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>()
            + htcp_total(metrics)
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut metrics = skua.metrics().await;
    while counted(&metrics) < sent && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        metrics = skua.metrics().await;
    }
    let _ = new.kill();
    let _ = new.wait();
    assert_eq!(counted(&metrics), sent, "{metrics}");
}

/// Regression: on SIGTERM the HTCP reader stopped at once, yet for pingora's grace period the
/// node went on answering on the connections it held, from a cache no longer purged (as the
/// purge bus did). It now reads until the process ends.
#[tokio::test]
async fn a_stopping_node_applies_clrs_while_it_still_answers() {
    let origin = Origin::start(|_| cached()).await;
    let (skua, htcp) = start(origin.addr, "").await;
    let request = "GET /wiki/P HTTP/1.1\r\nHost: wiki.test\r\n\r\n";
    let mut held = tokio::net::TcpStream::connect(skua.addr).await.unwrap();
    let first = exchange(&mut held, request).await;
    assert_eq!(origin.count("/wiki/P"), 1, "{first}");
    skua.signal("TERM");
    // Past the reader's tick (a quarter of a second), within pingora's grace period (a second).
    tokio::time::sleep(Duration::from_millis(500)).await;
    send_clr(htcp, "http://wiki.test/wiki/P");
    tokio::time::sleep(Duration::from_millis(150)).await;
    let answer = exchange(&mut held, request).await;
    assert_eq!(
        origin.count("/wiki/P"),
        2,
        "served from before the CLR: {answer}"
    );
}
