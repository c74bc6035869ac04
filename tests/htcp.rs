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

fn udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start(origin: SocketAddr, htcp_allow: &str) -> (Skua, SocketAddr) {
    let port = udp_port();
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
    let packet = skua::purge::htcp::build(&url, 1, skua::purge::htcp::Dialect::MediaWiki);
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .send_to(&packet, htcp)
        .unwrap();
    wait_for_metric(
        &skua,
        "skua_purges_total{result=\"denied\",source=\"htcp\"} 1\n",
    )
    .await;
    assert_eq!(get(&url, &[]).await.cache(), "hit-front");
}
