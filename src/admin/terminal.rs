//! `skua top`: the dashboard's headline figures and top URLs in a terminal, for an operator on
//! SSH (in the spirit of `varnishstat` and `traffic_top`), redrawn every second from a running
//! node's admin port (`/stats`, `/history`, `/top`). It reads those endpoints and renders
//! text; it never reaches a node any other way. Plain ANSI (clear, home) is all it asks of
//! the terminal.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::Value;

/// Draws the view every second until interrupted; with `once`, prints it one time without
/// clearing the screen (for scripts). A node that cannot be reached is said so on screen and
/// asked again the next second.
pub fn run(admin: SocketAddr, once: bool) -> Result<(), String> {
    loop {
        let text = match read_all(admin) {
            Ok((stats, history, top)) => render(admin, &stats, &history, &top, width()),
            Err(why) if once => return Err(why),
            Err(why) => format!("skua top: cannot read {admin}: {why}\n(retrying every second)\n"),
        };
        let mut out = std::io::stdout().lock();
        let written = if once {
            out.write_all(text.as_bytes())
        } else {
            // Home and clear, then the view: one write, so it does not flicker.
            out.write_all(format!("\x1b[H\x1b[2J{text}").as_bytes())
        };
        written
            .and_then(|()| out.flush())
            .map_err(|e| e.to_string())?;
        if once {
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn width() -> usize {
    (std::env::var("COLUMNS").ok())
        .and_then(|c| c.parse().ok())
        .filter(|w| *w >= 40)
        .unwrap_or(100)
}

fn read_all(admin: SocketAddr) -> Result<(Value, Value, Value), String> {
    Ok((
        get(admin, "/stats")?,
        get(admin, "/history?window=300")?,
        get(admin, "/top")?,
    ))
}

/// One GET on the admin port, its JSON body.
fn get(admin: SocketAddr, path: &str) -> Result<Value, String> {
    let mut conn =
        TcpStream::connect_timeout(&admin, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    conn.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
    conn.write_all(request.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    conn.read_to_end(&mut response).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP response")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("{path}: {}", head.lines().next().unwrap_or("")));
    }
    serde_json::from_str(body).map_err(|e| format!("{path}: {e}"))
}

fn number(n: f64) -> String {
    if !n.is_finite() {
        return "–".into();
    }
    let whole = n.round() as u64;
    if n >= 10.0 || n == whole as f64 {
        let digits = whole.to_string();
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(c);
        }
        out
    } else {
        format!("{n:.1}")
    }
}

fn percent(ratio: Option<f64>) -> String {
    ratio.map_or("–".into(), |r| format!("{:.1} %", 100.0 * r))
}

fn seconds(s: Option<f64>) -> String {
    match s {
        None => "–".into(),
        Some(s) if s < 1.0 => format!("{:.1} ms", s * 1000.0),
        Some(s) => format!("{s:.2} s"),
    }
}

fn bytes(n: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", units[unit])
}

/// The mean of the last (up to) ten values of a per-second series.
fn recent(series: &Value) -> f64 {
    let values: Vec<f64> = (series.as_array().into_iter().flatten())
        .filter_map(Value::as_f64)
        .collect();
    let last = &values[values.len().saturating_sub(10)..];
    if last.is_empty() {
        0.0
    } else {
        last.iter().sum::<f64>() / last.len() as f64
    }
}

/// The view, as text lines at most `width` wide.
pub fn render(
    admin: SocketAddr,
    stats: &Value,
    history: &Value,
    top: &Value,
    width: usize,
) -> String {
    let mut lines = Vec::new();
    let name = stats["name"].as_str().unwrap_or("?");
    let now = history["at"]
        .as_array()
        .and_then(|a| a.last())
        .and_then(Value::as_u64)
        .map_or(String::new(), clock);
    lines.push(format!(
        "Skua {name} · admin {admin} · {now} · every second, Ctrl-C quits"
    ));
    lines.push(String::new());

    let statuses = [
        "hit-front",
        "hit-local",
        "miss",
        "revalidated",
        "pass",
        "int-front",
    ];
    let rps: f64 = statuses
        .iter()
        .map(|s| recent(&history["requests"][s]))
        .sum();
    let totals = &history["totals"];
    let since_start = stats["hit_ratio"].as_f64();
    lines.push(format!(
        "Requests/s (last 10 s) {:>10}    Hit ratio, last 5 min  {:>8}  (bytes {})",
        number(rps),
        percent(totals["hit_ratio"].as_f64()),
        percent(totals["byte_hit_ratio"].as_f64()),
    ));
    lines.push(format!(
        "Origin requests/s      {:>10}    Hit ratio, since start {:>8}",
        number(recent(&history["origin_requests"])),
        percent(since_start),
    ));
    let last_quantile =
        |key: &str| (history[key].as_array().into_iter().flatten().rev()).find_map(Value::as_f64);
    lines.push(format!(
        "Origin p50 / p99 (last second with a response) {} / {}    p99, last 5 min {}",
        seconds(last_quantile("origin_p50")),
        seconds(last_quantile("origin_p99")),
        seconds(totals["origin_p99"].as_f64()),
    ));
    lines.push(format!(
        "Answers 4xx/s {}  5xx/s {}    Purges, last 5 min {}    backlog {}    bus {}",
        number(recent(&history["client_errors"])),
        number(recent(&history["server_errors"])),
        number(totals["purges"].as_f64().unwrap_or(0.0)),
        stats["purge_backlog"],
        match &stats["purge_bus"] {
            Value::Null => "off".to_string(),
            bus => format!(
                "{}, lag {}",
                if bus["connected"] == true {
                    "connected"
                } else {
                    "DOWN"
                },
                bus["lag"]
            ),
        },
    ));
    let mut tiers = Vec::new();
    for tier in ["memory", "disk"] {
        let t = &stats["tiers"][tier];
        if t.is_null() {
            continue;
        }
        let used = t["bytes"].as_f64().unwrap_or(0.0);
        let capacity = t["capacity_bytes"].as_f64().unwrap_or(0.0);
        let fill = (capacity > 0.0).then(|| used / capacity);
        tiers.push(format!(
            "{tier} {} of {} ({}), {} objects",
            bytes(used),
            bytes(capacity),
            percent(fill),
            number(t["objects"].as_f64().unwrap_or(0.0))
        ));
    }
    lines.push(tiers.join("    "));
    lines.push(String::new());
    lines.push("Requests/s by cache status (last 10 s)".into());
    lines.push(
        (statuses.iter())
            .map(|s| format!("  {s} {}", number(recent(&history["requests"][s]))))
            .collect::<String>(),
    );
    for (title, key, unit) in [
        ("Top URLs, last 5 min", "requests", "requests"),
        ("Top misses, last 5 min", "misses", "misses"),
    ] {
        lines.push(String::new());
        lines.push(format!(
            "{title:<w$}{unit:>12}",
            w = width.saturating_sub(12)
        ));
        let entries = top[key].as_array().cloned().unwrap_or_default();
        if entries.is_empty() {
            lines.push("  none yet".into());
        }
        for entry in entries {
            let key = entry["key"].as_str().unwrap_or("");
            let count = number(entry["count"].as_f64().unwrap_or(0.0));
            let room = width.saturating_sub(14);
            let shown: String = if key.chars().count() > room {
                let cut: String = key.chars().take(room.saturating_sub(1)).collect();
                cut + "…"
            } else {
                key.to_string()
            };
            lines.push(format!("  {shown:<room$}{count:>12}"));
        }
    }
    let mut text = String::new();
    for line in lines {
        let fitted: String = line.chars().take(width).collect();
        text.push_str(&fitted);
        text.push('\n');
    }
    text
}

/// `HH:MM:SS` (UTC) of a Unix time.
fn clock(unix: u64) -> String {
    let day = unix % 86_400;
    format!("{:02}:{:02}:{:02} UTC", day / 3600, day / 60 % 60, day % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_grouped_and_small_rates_keep_a_decimal() {
        assert_eq!(number(1_234_567.0), "1,234,567");
        assert_eq!(number(12.4), "12");
        assert_eq!(number(2.5), "2.5");
        assert_eq!(number(3.0), "3");
        assert_eq!(bytes(1536.0), "1.5 KiB");
        assert_eq!(clock(3_723), "01:02:03 UTC");
    }
}
