//! The access log: one line per request, NCSA combined plus cache status and duration, or
//! JSON lines, to stdout or a file. Lines are handed to a writer thread through a bounded
//! channel; when the writer cannot keep up, lines are dropped and counted rather than making
//! a request wait on disk I/O. A log file follows its path across rotation: the writer opens
//! the path again when it names another file (logrotate's rename, or a deletion) and on
//! SIGUSR1 (nginx's signal for it, which `postrotate` scripts send).

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

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
    /// The origin that answered, and how long its answer's head took after the request was
    /// sent (nginx's `$upstream_addr` and `$upstream_header_time`), when one answered. JSON
    /// lines carry them; the combined format stays as GoAccess and AWStats read it.
    pub origin: Option<(SocketAddr, Duration)>,
    /// The id the request went to the origin with (`[server] request_id`), in JSON lines.
    pub request_id: Option<&'a str>,
}

const QUEUE: usize = 65_536;

/// How often the writer asks whether its path still names the file it writes: a stat a
/// second, and a rotated log's lines go to the new file within a second of the rename.
const ROTATION_CHECK: Duration = Duration::from_secs(1);

pub struct AccessLog {
    tx: SyncSender<String>,
    format: Format,
    dropped: IntCounter,
    /// Set to have the writer open the file again at once (SIGUSR1).
    reopen: Arc<AtomicBool>,
}

/// Where the writer puts lines.
enum Sink {
    Stdout(BufWriter<std::io::Stdout>),
    File(LogFile),
}

/// A log file and which file it is (device and inode), to tell when its path has moved on.
struct LogFile {
    path: PathBuf,
    out: BufWriter<File>,
    id: (u64, u64),
    checked: Instant,
}

impl LogFile {
    fn open(path: &Path) -> std::io::Result<LogFile> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let meta = file.metadata()?;
        Ok(LogFile {
            path: path.to_path_buf(),
            out: BufWriter::with_capacity(64 << 10, file),
            id: (meta.dev(), meta.ino()),
            checked: Instant::now(),
        })
    }

    /// Opens the path again when asked to, or when it names another file than the one
    /// written (renamed or deleted by a rotation). A file that cannot be opened keeps the
    /// lines going to the old one, and is tried again at the next check.
    fn follow_rotation(&mut self, asked: bool) {
        if !asked && self.checked.elapsed() < ROTATION_CHECK {
            return;
        }
        self.checked = Instant::now();
        let moved = std::fs::metadata(&self.path).map_or(true, |m| (m.dev(), m.ino()) != self.id);
        if !asked && !moved {
            return;
        }
        let _ = self.out.flush();
        match LogFile::open(&self.path) {
            Ok(next) => {
                *self = next;
                tracing::info!(path = %self.path.display(), "access log opened again");
            }
            Err(e) => tracing::error!(
                path = %self.path.display(),
                error = %e,
                "cannot open the access log again; lines still go to the file open before"
            ),
        }
    }
}

impl Sink {
    fn out(&mut self) -> &mut dyn Write {
        match self {
            Sink::Stdout(out) => out,
            Sink::File(file) => &mut file.out,
        }
    }
}

impl AccessLog {
    pub fn open(config: &AccessLogConfig, dropped: IntCounter) -> std::io::Result<AccessLog> {
        let mut sink = match &config.destination {
            Destination::Stdout => {
                Sink::Stdout(BufWriter::with_capacity(64 << 10, std::io::stdout()))
            }
            Destination::File(path) => Sink::File(LogFile::open(path)?),
        };
        let reopen = Arc::new(AtomicBool::new(false));
        let asked = reopen.clone();
        let (tx, rx) = mpsc::sync_channel::<String>(QUEUE);
        std::thread::Builder::new()
            .name("skua-access-log".into())
            .spawn(move || loop {
                let received = rx.recv_timeout(Duration::from_millis(200));
                if let Sink::File(file) = &mut sink {
                    file.follow_rotation(asked.swap(false, Ordering::Relaxed));
                }
                match received {
                    Ok(line) => {
                        let _ = sink.out().write_all(line.as_bytes());
                    }
                    Err(RecvTimeoutError::Timeout) => {
                        let _ = sink.out().flush();
                    }
                    Err(RecvTimeoutError::Disconnected) => {
                        let _ = sink.out().flush();
                        return;
                    }
                }
            })?;
        Ok(AccessLog {
            tx,
            format: config.format,
            dropped,
            reopen,
        })
    }

    /// Has the writer open its file again within 200 ms (SIGUSR1, after a rotation).
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::Relaxed);
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

/// Milliseconds to the microsecond.
fn milliseconds(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
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
        "duration_ms": milliseconds(e.duration),
        "origin": e.origin.map(|(addr, _)| addr.to_string()),
        "origin_ms": e.origin.map(|(_, waited)| milliseconds(waited)),
        "request_id": e.request_id,
    })
    .to_string();
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
            origin: None,
            request_id: None,
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
        assert_eq!(
            (&v["origin"], &v["origin_ms"]),
            (&json!(null), &json!(null))
        );
        let miss = Entry {
            cache_status: "miss",
            origin: Some((
                "10.0.0.5:8080".parse().unwrap(),
                Duration::from_micros(12_345),
            )),
            ..entry("ua")
        };
        let v: serde_json::Value = serde_json::from_str(&json(&miss, SystemTime::now())).unwrap();
        assert_eq!(
            (&v["origin"], &v["origin_ms"]),
            (&json!("10.0.0.5:8080"), &json!(12.345))
        );
    }
}
