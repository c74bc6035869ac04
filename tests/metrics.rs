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
