//! `skua demo` end to end, as the README tells a newcomer to try it.

use std::process::{Child, Command, Stdio};

use crate::support::*;

struct Demo {
    child: Child,
    proxy: String,
    origin: String,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_demo() -> Demo {
    let (p, o, a) = (free_port(), free_port(), free_port());
    let child = Command::new(skua_bin())
        .args([
            "demo",
            "--proxy",
            &format!("127.0.0.1:{p}"),
            "--origin",
            &format!("127.0.0.1:{o}"),
        ])
        .args(["--admin", &format!("127.0.0.1:{a}")])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let demo = Demo {
        child,
        proxy: format!("127.0.0.1:{p}"),
        origin: format!("127.0.0.1:{o}"),
    };
    wait_listening(demo.proxy.parse().unwrap()).await;
    wait_listening(demo.origin.parse().unwrap()).await;
    demo
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
    let demo = start_demo().await;
    let url = format!("http://{}/wiki/Main_Page", demo.proxy);
    let first = get(&url, &[]).await;
    assert_eq!((first.status, first.cache()), (200, "miss"));
    let second = get(&url, &[]).await;
    assert_eq!(second.cache(), "hit-front");
    assert!(second.headers.contains_key("age"));
    assert!(second.header("cache-status").starts_with("skua; hit"));
    assert_eq!(origin_stats(&demo, "/wiki/Main_Page").await["fetches"], 1);

    let client = client();
    let edit = client
        .post(format!("http://{}/wiki/Main_Page", demo.origin))
        .body("new text")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        edit.contains("204"),
        "the origin's PURGE was accepted: {edit}"
    );
    let after = get(&url, &[]).await;
    assert_eq!(after.cache(), "miss");
    assert!(after.text().contains("new text"), "{}", after.text());
}

#[tokio::test]
async fn demo_collapses_200_cold_requests() {
    let demo = start_demo().await;
    let url = format!("http://{}/wiki/Cold_Page", demo.proxy);
    let client = client();
    let all = futures::future::join_all((0..200).map(|_| send(&client, "GET", &url, &[]))).await;
    assert!(all.iter().all(|r| r.status == 200));
    assert_eq!(origin_stats(&demo, "/wiki/Cold_Page").await["fetches"], 1);
}
