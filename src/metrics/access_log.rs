//! The access log: one line per request, NCSA combined plus cache status and duration, or
//! JSON lines, to stdout or a file. Lines are handed to a writer thread through a bounded
//! channel; when the writer cannot keep up, lines are dropped and counted rather than making
//! a request wait on disk I/O.

use std::fs::OpenOptions;
use std::io::{BufWriter, Write};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, SystemTime};

use prometheus::IntCounter;

use crate::config::{AccessLogConfig, Destination, Format};

/// What one request leaves in the log.
pub struct Entry<'a> {
    pub client: &'a str,
    pub method: &'a str,
    pub target: &'a str,
    /// The request's protocol as the request line names it, e.g. `HTTP/1.0`.
    pub protocol: &'static str,
    /// `http` or `https`: the scheme of the resource asked for.
    pub scheme: &'static str,
    pub host: &'a str,
    pub status: u16,
    pub bytes: u64,
    pub referer: &'a str,
    pub user_agent: &'a str,
    pub cache_status: &'a str,
    pub duration: Duration,
}

const QUEUE: usize = 65_536;

pub struct AccessLog {
    tx: SyncSender<String>,
    format: Format,
    dropped: IntCounter,
}

impl AccessLog {
    pub fn open(config: &AccessLogConfig, dropped: IntCounter) -> std::io::Result<AccessLog> {
        let out: Box<dyn Write + Send> = match &config.destination {
            Destination::Stdout => Box::new(std::io::stdout()),
            Destination::File(path) => {
                Box::new(OpenOptions::new().create(true).append(true).open(path)?)
            }
        };
        let (tx, rx) = mpsc::sync_channel::<String>(QUEUE);
        std::thread::Builder::new()
            .name("skua-access-log".into())
            .spawn(move || {
                let mut out = BufWriter::with_capacity(64 << 10, out);
                loop {
                    match rx.recv_timeout(Duration::from_millis(200)) {
                        Ok(line) => {
                            let _ = out.write_all(line.as_bytes());
                        }
                        Err(RecvTimeoutError::Timeout) => {
                            let _ = out.flush();
                        }
                        Err(RecvTimeoutError::Disconnected) => {
                            let _ = out.flush();
                            return;
                        }
                    }
                }
            })?;
        Ok(AccessLog {
            tx,
            format: config.format,
            dropped,
        })
    }

    pub fn log(&self, e: &Entry<'_>) {
        let line = match self.format {
            Format::Combined => combined(e, SystemTime::now()),
            Format::Json => json(e, SystemTime::now()),
        };
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }
}

/// Quotes a value for a combined-log field: no quote or control byte may end the field early.
fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c == '"' || c.is_control() { '_' } else { c })
        .collect()
}

fn dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

/// The protocol of a request line, for the log.
pub fn protocol(version: http::Version) -> &'static str {
    match version {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_2 => "HTTP/2.0",
        http::Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

/// NCSA's time stamp, `01/Dec/2026:03:18:33 +0000` (UTC), which log analysers (GoAccess,
/// AWStats, Apache's own tools) read as the `%t` of the combined format.
fn ncsa_time(now: SystemTime) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let t = time::OffsetDateTime::from(now);
    format!(
        "{:02}/{}/{}:{:02}:{:02}:{:02} +0000",
        t.day(),
        MONTHS[usize::from(u8::from(t.month())) - 1],
        t.year(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// NCSA combined (`%h %l %u %t "%r" %>s %b "%{Referer}i" "%{User-agent}i"`), then the cache
/// status and the duration in milliseconds, which analysers reading combined ignore.
pub fn combined(e: &Entry<'_>, now: SystemTime) -> String {
    format!(
        "{} - - [{}] \"{} {} {}\" {} {} \"{}\" \"{}\" {} {:.3}\n",
        e.client,
        ncsa_time(now),
        clean(e.method),
        clean(e.target),
        e.protocol,
        e.status,
        e.bytes,
        clean(dash(e.referer)),
        clean(dash(e.user_agent)),
        e.cache_status,
        e.duration.as_secs_f64() * 1000.0,
    )
}

pub fn json(e: &Entry<'_>, now: SystemTime) -> String {
    let mut line = serde_json::json!({
        "time": httpdate::fmt_http_date(now),
        "client": e.client,
        "method": e.method,
        "protocol": e.protocol,
        "scheme": e.scheme,
        "host": e.host,
        "target": e.target,
        "status": e.status,
        "bytes": e.bytes,
        "referer": e.referer,
        "user_agent": e.user_agent,
        "cache_status": e.cache_status,
        "duration_ms": (e.duration.as_secs_f64() * 1e6).round() / 1e3,
    })
    .to_string();
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry<'a>(ua: &'a str) -> Entry<'a> {
        Entry {
            client: "127.0.0.1",
            method: "GET",
            target: "/wiki/Main_Page",
            protocol: "HTTP/1.0",
            scheme: "https",
            host: "en.wiki.test",
            status: 200,
            bytes: 1234,
            referer: "",
            user_agent: ua,
            cache_status: "hit-front",
            duration: Duration::from_micros(1500),
        }
    }

    #[test]
    fn combined_line() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let line = combined(&entry("curl/8 \"evil\""), now);
        assert_eq!(
            line,
            "127.0.0.1 - - [14/Nov/2023:22:13:20 +0000] \"GET /wiki/Main_Page HTTP/1.0\" 200 1234 \"-\" \"curl/8 _evil_\" hit-front 1.500\n"
        );
    }

    #[test]
    fn json_line() {
        let v: serde_json::Value =
            serde_json::from_str(&json(&entry("ua"), SystemTime::now())).unwrap();
        assert_eq!(v["cache_status"], "hit-front");
        assert_eq!(v["scheme"], "https");
        assert_eq!(v["duration_ms"], 1.5);
        assert_eq!(v["status"], 200);
    }
}
