//! The built-in dashboard in a real browser (headless Chromium): the hit ratio it shows is the
//! one `/metrics` gives. Set SKUA_UPDATE_SCREENSHOT=1 to refresh `docs/dashboard.png`.

use std::path::PathBuf;
use std::process::Command;

use crate::support::*;

pub fn chromium() -> Option<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

pub fn browser(chromium: &PathBuf, profile: &std::path::Path) -> Command {
    let mut cmd = Command::new(chromium);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1100,650",
        "--virtual-time-budget=3000",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    cmd
}

/// Hits over everything but Skua's own answers, from the rendered `/metrics`.
fn hit_ratio_from_metrics(text: &str) -> f64 {
    let (mut hits, mut served) = (0.0, 0.0);
    for line in text
        .lines()
        .filter(|l| l.starts_with("skua_requests_total{"))
    {
        let value: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        if line.contains("cache_status=\"int-front\"") {
            continue;
        }
        served += value;
        if line.contains("cache_status=\"hit-") {
            hits += value;
        }
    }
    hits / served
}

#[tokio::test]
async fn dashboard_shows_the_hit_ratio_metrics_give() {
    let Some(chromium) = chromium() else {
        prerequisite_missing("no Chromium (apt-get install chromium)");
        return;
    };
    let origin = Origin::start(|req| match req.path.as_str() {
        "/p" => Reply::ok("private").header("cache-control", "no-store"),
        _ => Reply::ok("cached page").header("cache-control", "max-age=600"),
    })
    .await;
    let skua = Skua::start(&[origin.addr], "").await;
    for _ in 0..10 {
        get(&skua.url("/a"), &[]).await;
    }
    for _ in 0..5 {
        get(&skua.url("/p"), &[]).await;
    }
    // Requests are counted as they finish logging, just after the response: wait for all 15.
    let mut text = skua.metrics().await;
    for _ in 0..100 {
        if text.contains("skua_requests_total{cache_status=\"pass\",status_class=\"2xx\"} 5\n")
            && text.contains(
                "skua_requests_total{cache_status=\"hit-front\",status_class=\"2xx\"} 9\n",
            )
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        text = skua.metrics().await;
    }
    let expected = hit_ratio_from_metrics(&text);
    assert!((expected - 0.6).abs() < 1e-9, "9 hits of 15: {expected}");

    let profile = tempfile::tempdir().unwrap();
    let dashboard = format!("http://{}/", skua.admin);
    let out = tokio::task::spawn_blocking({
        let (chromium, profile, url) = (
            chromium.clone(),
            profile.path().to_path_buf(),
            dashboard.clone(),
        );
        move || {
            browser(&chromium, &profile)
                .arg("--dump-dom")
                .arg(url)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout);
    let shown: f64 = dom
        .split("id=\"hit-ratio\"")
        .nth(1)
        .and_then(|rest| rest.split("data-ratio=\"").nth(1))
        .and_then(|rest| rest.split('"').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no hit ratio in the rendered page:\n{dom}"));
    assert!(
        (shown - expected).abs() < 1e-9,
        "dashboard {shown} vs metrics {expected}"
    );
    assert!(dom.contains("60.0 %"), "the ratio is displayed:\n{dom}");

    let shot = profile.path().join("dashboard.png");
    let status = tokio::task::spawn_blocking({
        let (chromium, dir, shot, url) = (
            chromium,
            tempfile::tempdir().unwrap(),
            shot.clone(),
            dashboard,
        );
        move || {
            browser(&chromium, dir.path())
                .arg(format!("--screenshot={}", shot.display()))
                .arg(url)
                .status()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(status.success());
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a real screenshot"
    );
    if std::env::var_os("SKUA_UPDATE_SCREENSHOT").is_some() {
        let docs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs");
        std::fs::create_dir_all(&docs).unwrap();
        std::fs::write(docs.join("dashboard.png"), png).unwrap();
    }
}
