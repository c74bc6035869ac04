//! The built-in dashboard in a real browser (headless Chromium), and the admin endpoints it
//! draws from (`/history`, `/top`): what it charts is what was sent and what `/metrics`
//! counts. Set SKUA_UPDATE_SCREENSHOT=1 to refresh `docs/dashboard.png`.

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

/// The value of attribute `name` on the element with id `id` in a dumped DOM, unescaped.
fn attribute(dom: &str, id: &str, name: &str) -> String {
    let after = dom
        .split(&format!("id=\"{id}\""))
        .nth(1)
        .unwrap_or_else(|| panic!("no #{id} in the rendered page:\n{dom}"));
    let tag = after.split('>').next().unwrap_or("");
    let value = (tag.split(&format!("{name}=\"")).nth(1))
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no {name} on #{id}: {tag}"));
    value
        .replace("&quot;", "\"")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// Runs headless Chromium on `url` at `width`×`height` with `args` (`--dump-dom`,
/// `--screenshot=...`); returns what it printed and the page's console messages.
async fn chromium_on(url: &str, width: u32, height: u32, args: &[String]) -> (String, String) {
    let chromium = chromium().expect("checked by the caller");
    let profile = tempfile::tempdir().unwrap();
    let mut cmd = browser(&chromium, profile.path());
    cmd.arg(format!("--window-size={width},{height}"))
        .args(["--enable-logging=stderr", "--v=0"])
        .args(args)
        .arg(url);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let console: String = (String::from_utf8_lossy(&out.stderr).lines())
        .filter(|l| l.contains("CONSOLE"))
        .collect::<Vec<_>>()
        .join("\n");
    (String::from_utf8_lossy(&out.stdout).into_owned(), console)
}

/// Traffic of a known shape (cache hits, then a second later only passes) drawn by the
/// dashboard in a real browser: the charted requests by cache status add up to what
/// `/metrics` counts, the charted hit ratio falls from the first phase to the second, the
/// window's tile shows `/metrics`' ratio, and the top-URL table names the two URLs with
/// their counts; the page logs nothing to the console and fits a phone's width.
/// `SKUA_UPDATE_SCREENSHOT=1` refreshes `docs/dashboard.png` (1366×768).
#[tokio::test]
async fn dashboard_charts_the_traffic_sent_and_metrics_agree() {
    if chromium().is_none() {
        prerequisite_missing("no Chromium (apt-get install chromium)");
        return;
    }
    let origin = Origin::start(|req| match req.path.as_str() {
        "/p" => Reply::ok("private").header("cache-control", "no-store"),
        _ => Reply::ok("cached page").header("cache-control", "max-age=600"),
    })
    .await;
    let skua = Skua::start(&[origin.addr], "").await;
    for _ in 0..20 {
        get(&skua.url("/a"), &[]).await;
    }
    // The counters are sampled each second: the second phase lands in later samples.
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    for _ in 0..20 {
        get(&skua.url("/p"), &[]).await;
    }
    let history_url = format!("http://{}/history?window=300", skua.admin);
    for _ in 0..50 {
        let history: serde_json::Value =
            serde_json::from_str(&get(&history_url, &[]).await.text()).unwrap();
        if history["totals"]["requests"] == 40 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let text = skua.metrics().await;
    let expected = hit_ratio_from_metrics(&text);
    assert!(
        (expected - 19.0 / 40.0).abs() < 1e-9,
        "19 hits of 40: {expected}"
    );

    let dashboard = format!("http://{}/", skua.admin);
    let (dom, console) = chromium_on(&dashboard, 1366, 768, &["--dump-dom".into()]).await;
    assert!(console.is_empty(), "console messages:\n{console}");

    let requests: serde_json::Value =
        serde_json::from_str(&attribute(&dom, "chart-requests", "data-series")).unwrap();
    let charted = |status: &str| -> f64 {
        (requests[status].as_array().unwrap().iter())
            .map(|v| v.as_f64().unwrap_or(0.0))
            .sum()
    };
    let counted = |status: &str| -> f64 {
        let line =
            format!("skua_requests_total{{cache_status=\"{status}\",status_class=\"2xx\"}} ");
        (text.lines())
            .find_map(|l| l.strip_prefix(line.as_str()))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    for status in ["hit-front", "miss", "pass"] {
        assert_eq!(
            charted(status),
            counted(status),
            "{status}: charted vs /metrics"
        );
    }
    assert_eq!((charted("hit-front"), charted("pass")), (19.0, 20.0));

    let ratios: serde_json::Value =
        serde_json::from_str(&attribute(&dom, "chart-hit-ratio", "data-series")).unwrap();
    let ratios: Vec<f64> = (ratios["requests"].as_array().unwrap().iter())
        .filter_map(|v| v.as_f64())
        .collect();
    assert!(
        ratios.first().is_some_and(|r| *r >= 0.9) && ratios.last() == Some(&0.0),
        "the hit ratio falls from the hits to the passes: {ratios:?}"
    );
    let shown: f64 = attribute(&dom, "hit-ratio", "data-ratio").parse().unwrap();
    assert!(
        (shown - expected).abs() < 1e-9,
        "tile {shown} vs metrics {expected}"
    );
    assert!(dom.contains("47.5 %"), "the ratio is displayed");

    let table = dom.split("id=\"top-urls\"").nth(1).unwrap_or("");
    let table = table.split("</table>").next().unwrap_or("");
    for path in ["/a", "/p"] {
        let row = format!("http://{}{path}</td><td class=\"n\">20</td>", skua.addr);
        assert!(table.contains(&row), "{row} in the top URLs: {table}");
    }

    let (phone, console) = chromium_on(&dashboard, 390, 844, &["--dump-dom".into()]).await;
    assert!(
        console.is_empty(),
        "console messages at phone width:\n{console}"
    );
    assert!(
        phone.contains("data-fits=\"true\""),
        "no horizontal scrolling at a phone's width"
    );

    let shots = tempfile::tempdir().unwrap();
    let shot = shots.path().join("dashboard.png");
    chromium_on(
        &dashboard,
        1366,
        768,
        &[format!("--screenshot={}", shot.display())],
    )
    .await;
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

/// `/history` and `/top` report the traffic sent: the window's totals and hit ratio, the
/// requests by cache status, the most requested and most missed URLs, and a purge.
#[tokio::test]
async fn history_and_top_report_the_traffic_sent() {
    let origin = Origin::start(|req| match req.path.as_str() {
        "/p" => Reply::ok("private").header("cache-control", "no-store"),
        _ => Reply::ok("cached page").header("cache-control", "max-age=600"),
    })
    .await;
    let skua = Skua::start(&[origin.addr], "").await;
    for _ in 0..30 {
        get(&skua.url("/a"), &[]).await;
    }
    for _ in 0..10 {
        get(&skua.url("/p"), &[]).await;
    }
    let admin = |path: &str| format!("http://{}{path}", skua.admin);
    // The counters are sampled once a second: wait until a sample holds all 40.
    let mut history = serde_json::Value::Null;
    for _ in 0..50 {
        history =
            serde_json::from_str(&get(&admin("/history?window=300"), &[]).await.text()).unwrap();
        if history["totals"]["requests"] == 40 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(history["totals"]["requests"], 40, "{history}");
    assert_eq!(history["step"], 1);
    let ratio = history["totals"]["hit_ratio"].as_f64().unwrap();
    assert!((ratio - 29.0 / 40.0).abs() < 1e-9, "29 hits of 40: {ratio}");
    let summed = |status: &str| -> f64 {
        let rates = history["requests"][status].as_array().unwrap();
        rates.iter().map(|r| r.as_f64().unwrap()).sum()
    };
    assert_eq!(
        (summed("hit-front"), summed("miss"), summed("pass")),
        (29.0, 1.0, 10.0)
    );
    let origin_requests: f64 = (history["origin_requests"].as_array().unwrap().iter())
        .map(|r| r.as_f64().unwrap())
        .sum();
    assert_eq!(origin_requests, 11.0, "one miss and ten passes reached it");

    let top: serde_json::Value =
        serde_json::from_str(&get(&admin("/top"), &[]).await.text()).unwrap();
    let a = format!("http://{}/a", skua.addr);
    let p = format!("http://{}/p", skua.addr);
    assert_eq!(
        top["requests"],
        serde_json::json!([
            {"key": a, "count": 30, "at_least": 30},
            {"key": p, "count": 10, "at_least": 10}
        ])
    );
    assert_eq!(
        top["misses"],
        serde_json::json!([{"key": a, "count": 1, "at_least": 1}])
    );

    let purged = send(&client(), "PURGE", &skua.url("/a"), &[]).await;
    assert_eq!(purged.status, 204);
    let top: serde_json::Value =
        serde_json::from_str(&get(&admin("/top"), &[]).await.text()).unwrap();
    assert_eq!(top["purges"][0]["what"], a.as_str(), "{top}");
    assert_eq!(top["purges"][0]["source"], "http");
    assert_eq!(top["purges"][0]["objects"], 1);
    // Skua's own answer to the purge is not a URL clients read.
    assert_eq!(top["requests"][0]["count"], 30);
}
