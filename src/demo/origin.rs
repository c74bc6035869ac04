//! A sample wiki origin that answers the way MediaWiki does behind a CDN: `/wiki/<Title>`
//! pages with `Cache-Control: s-maxage=N, must-revalidate, max-age=0`, `Vary: Accept-Encoding,
//! Cookie`, ETag and Last-Modified, 304s for conditional requests, and on `POST /wiki/<Title>`
//! an edit followed by `PURGE http://<server>/wiki/<Title>` to every CDN server, as MediaWiki
//! does for `$wgCdnServers`. `GET /_origin/stats` returns what it served, as JSON.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Requests the origin answered for one path.
#[derive(Debug, Default, Clone, Serialize)]
pub struct PathCounts {
    /// Every request for the path.
    pub requests: u64,
    /// Full responses (200) to GET or HEAD.
    pub fetches: u64,
    /// 304 answers to conditional requests.
    pub not_modified: u64,
    /// Edits (POST).
    pub edits: u64,
    /// Who made the last edit, as MediaWiki would credit it.
    pub last_editor: Option<String>,
}

struct Page {
    text: String,
    revision: u64,
    modified: SystemTime,
}

pub struct WikiOrigin {
    /// `host:port` readers use: the URL MediaWiki calls `$wgServer`, named in purges.
    server_name: String,
    /// Where PURGEs go: MediaWiki's `$wgCdnServers`.
    cdn_servers: Vec<SocketAddr>,
    s_maxage: u64,
    pages: Mutex<HashMap<String, Page>>,
    counts: Mutex<BTreeMap<String, PathCounts>>,
    total: Mutex<u64>,
}

const MAX_EDIT_BYTES: usize = 1 << 20;

impl WikiOrigin {
    pub fn new(server_name: String, cdn_servers: Vec<SocketAddr>, s_maxage: u64) -> WikiOrigin {
        WikiOrigin {
            server_name,
            cdn_servers,
            s_maxage,
            pages: Mutex::new(HashMap::new()),
            counts: Mutex::new(BTreeMap::new()),
            total: Mutex::new(0),
        }
    }

    /// Whom an edit is credited to, as MediaWiki decides it: the last address in
    /// `X-Forwarded-For` when the connecting address is one of its CDN servers (compared as
    /// addresses, as MediaWiki compares `$wgCdnServersNoPurge` entries), else the connecting
    /// address itself.
    fn editor(&self, peer: Option<IpAddr>, req: &pingora::http::RequestHeader) -> String {
        let Some(peer) = peer else {
            return String::from("unknown");
        };
        if !self.cdn_servers.iter().any(|cdn| cdn.ip() == peer) {
            return peer.to_string();
        }
        req.headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .last()
            .and_then(|ip| ip.trim().parse::<IpAddr>().ok())
            .unwrap_or(peer)
            .to_string()
    }

    fn count(&self, path: &str, f: impl FnOnce(&mut PathCounts)) {
        if let Ok(mut counts) = self.counts.lock() {
            f(counts.entry(path.to_string()).or_default());
        }
    }

    /// The page as stored, created on first view so every title exists in the demo.
    fn page(&self, title: &str) -> (String, u64, SystemTime) {
        let mut pages = match self.pages.lock() {
            Ok(p) => p,
            Err(p) => p.into_inner(),
        };
        let page = pages.entry(title.to_string()).or_insert_with(|| Page {
            text: format!(
                "This is the wiki page {}, served by the sample origin.",
                title.replace('_', " ")
            ),
            revision: 1,
            // Whole seconds: HTTP dates carry no fractions, and If-Modified-Since compares them.
            modified: SystemTime::UNIX_EPOCH
                + Duration::from_secs(
                    SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs()),
                ),
        });
        (page.text.clone(), page.revision, page.modified)
    }

    fn edit(&self, title: &str, text: String) {
        self.page(title);
        if let Ok(mut pages) = self.pages.lock() {
            if let Some(p) = pages.get_mut(title) {
                p.text = text;
                p.revision += 1;
                p.modified = SystemTime::now().max(p.modified + Duration::from_secs(1));
            }
        }
    }

    /// Sends `PURGE http://<server>/wiki/<Title> HTTP/1.1` to each CDN server and returns the
    /// status lines, as MediaWiki's CdnCacheUpdate does.
    async fn purge(&self, path: &str) -> Vec<String> {
        let mut results = Vec::new();
        for cdn in &self.cdn_servers {
            let request = format!(
                "PURGE http://{server}{path} HTTP/1.1\r\nHost: {server}\r\nUser-Agent: skua-demo-origin\r\nConnection: close\r\n\r\n",
                server = self.server_name
            );
            let result = async {
                let mut stream = TcpStream::connect(cdn).await?;
                stream.write_all(request.as_bytes()).await?;
                let mut buf = Vec::new();
                stream.read_to_end(&mut buf).await?;
                let text = String::from_utf8_lossy(&buf);
                Ok::<_, std::io::Error>(text.lines().next().unwrap_or("").to_string())
            };
            match tokio::time::timeout(Duration::from_secs(5), result).await {
                Ok(Ok(status)) => results.push(format!("{cdn}: {status}")),
                Ok(Err(e)) => results.push(format!("{cdn}: {e}")),
                Err(_) => results.push(format!("{cdn}: timed out")),
            }
        }
        results
    }

    fn stats(&self) -> Vec<u8> {
        let counts = self.counts.lock().map(|c| c.clone()).unwrap_or_default();
        let total = self.total.lock().map(|t| *t).unwrap_or(0);
        serde_json::to_vec_pretty(&serde_json::json!({"requests": total, "paths": counts}))
            .unwrap_or_default()
    }
}

fn respond(status: u16, headers: &[(&str, String)], body: Vec<u8>) -> Response<Vec<u8>> {
    let mut b = Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(*k, v.as_str());
    }
    b.header("content-length", body.len())
        .body(body)
        .unwrap_or_else(|_| Response::new(Vec::new()))
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[async_trait]
impl ServeHttp for WikiOrigin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        if let Ok(mut t) = self.total.lock() {
            *t += 1;
        }
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let editor = self.editor(peer, session.req_header());
        let req = session.req_header();
        let method = req.method.clone();
        let path = req.uri.path().to_string();
        let if_none_match = req
            .headers
            .get("if-none-match")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let if_modified_since = req
            .headers
            .get("if-modified-since")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v).ok());

        if path == "/_origin/stats" {
            return respond(
                200,
                &[
                    ("content-type", "application/json".into()),
                    ("cache-control", "no-store".into()),
                ],
                self.stats(),
            );
        }
        if path == "/" {
            return respond(
                302,
                &[
                    ("location", "/wiki/Main_Page".into()),
                    ("cache-control", "no-store".into()),
                ],
                Vec::new(),
            );
        }
        let Some(title) = path
            .strip_prefix("/wiki/")
            .filter(|t| !t.is_empty() && !t.contains('/'))
        else {
            return respond(
                404,
                &[
                    ("content-type", "text/plain".into()),
                    ("cache-control", "s-maxage=60".into()),
                ],
                b"no such page\n".to_vec(),
            );
        };
        self.count(&path, |c| c.requests += 1);

        match method.as_str() {
            "GET" | "HEAD" => {
                let (text, revision, modified) = self.page(title);
                let etag = format!("\"r{revision}\"");
                let last_modified = httpdate::fmt_http_date(modified);
                let headers = [
                    ("content-type", "text/html; charset=UTF-8".to_string()),
                    (
                        "cache-control",
                        format!("s-maxage={}, must-revalidate, max-age=0", self.s_maxage),
                    ),
                    ("vary", "Accept-Encoding, Cookie".to_string()),
                    ("surrogate-key", format!("wiki page:{title}")),
                    ("etag", etag.clone()),
                    ("last-modified", last_modified),
                ];
                // RFC 9110 §13.2.2: If-None-Match is evaluated first and, when present,
                // If-Modified-Since is ignored.
                let not_modified = match (&if_none_match, if_modified_since) {
                    // RFC 9110 §13.1.2: If-None-Match compares weakly, so a cache that
                    // compressed the page (and weakened its tag) still gets its 304.
                    (Some(inm), _) => inm.split(',').any(|t| {
                        let t = t.trim();
                        t.strip_prefix("W/").unwrap_or(t) == etag || t == "*"
                    }),
                    (None, Some(since)) => modified <= since,
                    (None, None) => false,
                };
                if not_modified {
                    self.count(&path, |c| c.not_modified += 1);
                    return respond(304, &headers, Vec::new());
                }
                self.count(&path, |c| c.fetches += 1);
                let body = format!(
                    "<!DOCTYPE html>\n<html><head><title>{t}</title></head>\n<body><h1>{t}</h1>\n<p>{text}</p>\n<p>Revision {revision}.</p></body></html>\n",
                    t = html_escape(&title.replace('_', " ")),
                    text = html_escape(&text),
                );
                respond(200, &headers, body.into_bytes())
            }
            "POST" => {
                let mut body = Vec::new();
                loop {
                    match session.read_request_body().await {
                        Ok(Some(chunk)) => {
                            body.extend_from_slice(&chunk);
                            if body.len() > MAX_EDIT_BYTES {
                                return respond(
                                    413,
                                    &[("content-type", "text/plain".into())],
                                    b"edit too large\n".to_vec(),
                                );
                            }
                        }
                        Ok(None) => break,
                        Err(_) => {
                            return respond(
                                400,
                                &[("content-type", "text/plain".into())],
                                b"bad request body\n".to_vec(),
                            )
                        }
                    }
                }
                let text = String::from_utf8_lossy(&body).trim().to_string();
                self.edit(title, text);
                self.count(&path, |c| {
                    c.edits += 1;
                    c.last_editor = Some(editor.clone());
                });
                let purges = self.purge(&path).await;
                let report = format!(
                    "edited {title} as {editor}; purges: {}\n",
                    purges.join("; ")
                );
                respond(
                    200,
                    &[
                        ("content-type", "text/plain".into()),
                        ("cache-control", "no-store".into()),
                    ],
                    report.into_bytes(),
                )
            }
            _ => respond(
                405,
                &[("allow", "GET, HEAD, POST".into())],
                b"method not allowed\n".to_vec(),
            ),
        }
    }
}
