//! File format → typed [`Config`]. Collects every problem instead of stopping at the first,
//! and finds each bad key's line in the source text so the operator can go straight to it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use regex::Regex;
use toml_edit::{ImDocument, TableLike};

use super::file::{
    BusFile, CacheFile, FileConfig, HtcpFile, LogFile, OriginFile, OriginTlsFile, PurgeFile,
    ServerFile, TlsFile,
};
use super::*;

/// A step in a key path: a table key or an array index.
#[derive(Clone, Copy)]
pub(super) enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

pub(super) struct Checker<'a> {
    text: &'a str,
    doc: Option<ImDocument<&'a str>>,
    errors: Vec<ConfigError>,
}

impl<'a> Checker<'a> {
    /// Records a problem with the key at `path`. Only the first problem of a key is kept: a
    /// later check of a value that did not parse would report a consequence, not a cause
    /// (regression: a bad duration also said "must be longer than zero").
    pub(super) fn report(&mut self, path: &[Seg<'_>], reason: impl Into<String>) {
        let key = render_path(path);
        if self.errors.iter().any(|e| e.key == key) {
            return;
        }
        let line = self.line_of(path);
        self.errors.push(ConfigError {
            key,
            line,
            reason: reason.into(),
        });
    }

    /// Walks the parsed document along `path` and returns the line of the deepest part found,
    /// so a missing key still points at its table.
    pub(super) fn line_of(&self, path: &[Seg<'_>]) -> Option<usize> {
        let doc = self.doc.as_ref()?;
        let mut table: Option<&dyn TableLike> = Some(doc.as_table());
        let mut array: Option<&toml_edit::Array> = None;
        let mut tables: Option<&toml_edit::ArrayOfTables> = None;
        let mut span = None;
        for seg in path {
            match *seg {
                Seg::Key(k) => {
                    let Some((key, item)) = table.and_then(|t| t.get_key_value(k)) else {
                        break;
                    };
                    span = key.span().or(span);
                    table = item.as_table_like();
                    array = item.as_array();
                    tables = item.as_array_of_tables();
                }
                Seg::Index(i) => {
                    if let Some(t) = tables.and_then(|a| a.get(i)) {
                        span = t.span().or(span);
                        table = Some(t);
                        array = None;
                    } else if let Some(v) = array.and_then(|a| a.get(i)) {
                        span = v.span().or(span);
                        table = v.as_inline_table().map(|t| t as &dyn TableLike);
                        array = v.as_array();
                    } else {
                        break;
                    }
                    tables = None;
                }
            }
        }
        span.map(|s| line_at(self.text, s.start))
    }

    pub(super) fn duration(&mut self, path: &[Seg<'_>], value: &str) -> Duration {
        match humantime::parse_duration(value.trim()) {
            Ok(d) => d,
            Err(e) => {
                self.report(
                    path,
                    format!("not a duration ({e}): {value:?}; write e.g. \"30s\", \"5m\", \"1d\""),
                );
                Duration::ZERO
            }
        }
    }

    fn socket_addr(&mut self, path: &[Seg<'_>], value: &str) -> Option<SocketAddr> {
        match value.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.report(
                    path,
                    format!("not an ip:port address: {value:?} (e.g. \"127.0.0.1:8080\")"),
                );
                None
            }
        }
    }
}

/// Compiles a regex, reusing an earlier compilation of the same pattern: every reload (and
/// every fuzzing run) meets the same default bypass patterns, and compiling is the costliest
/// part of validation.
pub(super) fn compile(pattern: &str) -> Result<Regex, regex::Error> {
    static COMPILED: std::sync::Mutex<Option<std::collections::HashMap<String, Regex>>> =
        std::sync::Mutex::new(None);
    if let Ok(mut cache) = COMPILED.lock() {
        let cache = cache.get_or_insert_with(Default::default);
        if let Some(re) = cache.get(pattern) {
            return Ok(re.clone());
        }
        let re = Regex::new(pattern)?;
        if cache.len() >= 64 {
            cache.clear();
        }
        cache.insert(pattern.to_string(), re.clone());
        return Ok(re);
    }
    Regex::new(pattern)
}

/// A health check's path must be a request target the check can send as it is: origin form
/// (RFC 9112 §3.2.1), whose characters the request line allows (no spaces or controls).
fn health_check_path(path: &str) -> Result<(), &'static str> {
    if !path.starts_with('/') {
        return Err("must start with '/'");
    }
    match path.parse::<http::uri::PathAndQuery>() {
        Ok(p) if p.as_str() == path => Ok(()),
        _ => Err("not a request target (no spaces, control characters or fragments)"),
    }
}

/// A health check's `Host` must be a host with an optional port (RFC 9110 §7.2), which is
/// also a valid header value.
fn health_check_host(host: &str) -> Result<(), &'static str> {
    let authority = host.parse::<http::uri::Authority>();
    match authority {
        Ok(a) if !host.is_empty() && a.as_str() == host && !host.contains('@') => Ok(()),
        _ => Err("not a host name or host:port"),
    }
}

/// Checks a tier's largest object: positive, within the tier, and small enough for the tiers'
/// indexes, which weigh entries with a u32.
fn object_size(c: &mut Checker<'_>, at: &[Seg<'_>], size: u64, tier: u64, tier_key: &str) {
    let max = u32::MAX as u64 / 2;
    if size == 0 || size > max {
        c.report(at, format!("must be between 1 and {max} bytes, got {size}"));
    } else if size > tier {
        c.report(at, format!("must not exceed {tier_key} ({tier})"));
    }
}

/// Parses a list of CIDR networks (or single addresses), reporting each bad entry.
pub(super) fn networks(c: &mut Checker<'_>, list: &[String], at: &[Seg<'_>]) -> Vec<IpNet> {
    let mut out = Vec::new();
    for (i, net) in list.iter().enumerate() {
        let parsed = net
            .parse::<IpNet>()
            .or_else(|_| net.parse::<std::net::IpAddr>().map(IpNet::from));
        match parsed {
            Ok(n) => out.push(n),
            Err(_) => {
                let mut path = at.to_vec();
                path.push(Seg::Index(i));
                c.report(&path, format!("not a CIDR network or IP address: {net:?}"));
            }
        }
    }
    out
}

/// The line of the key `keys` (`["cache", "disk", "path"]`) in `text`, or of the deepest
/// table on its way that the file holds.
pub(super) fn line_of_key(text: &str, keys: &[&str]) -> Option<usize> {
    let c = Checker {
        text,
        doc: ImDocument::parse(text).ok(),
        errors: Vec::new(),
    };
    let path: Vec<Seg<'_>> = keys.iter().map(|k| Seg::Key(k)).collect();
    c.line_of(&path)
}

fn render_path(path: &[Seg<'_>]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

fn line_at(text: &str, offset: usize) -> usize {
    text.as_bytes()
        .iter()
        .take(offset)
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Parses TOML text into a validated [`Config`], or every problem found.
pub(super) fn parse(text: &str) -> Result<Config, Vec<ConfigError>> {
    // serde stops at the first wrong type or unknown key. To report every one, each is
    // recorded and its line blanked (its length kept, so spans and line numbers stay), and
    // the file is read again; a syntax error ends the search.
    let mut errors: Vec<ConfigError> = Vec::new();
    let mut working = text.to_string();
    let file: FileConfig = loop {
        match toml::from_str(&working) {
            Ok(f) => break f,
            Err(e) => {
                let start = e.span().map(|s| s.start);
                let line = start.map(|s| line_at(text, s));
                let data_error = is_data_error(e.message());
                let key = start
                    .map(|s| key_at(text, s))
                    .unwrap_or_else(|| "(syntax)".into());
                // A required key whose line was blanked for its wrong value is "missing" only
                // because of that: the value's own error says it.
                let blanked_before = missing_field(e.message())
                    .is_some_and(|field| errors.iter().any(|e| e.key == format!("{key}.{field}")));
                if (data_error || errors.is_empty()) && !blanked_before {
                    errors.push(ConfigError {
                        key,
                        line,
                        reason: e.message().trim().to_string(),
                    });
                }
                // A table that lacks a required key is left out whole, so that the tables after
                // it are still read.
                let blanked = start
                    .filter(|_| data_error && errors.len() < 100)
                    .and_then(|s| blank_line(&working, s).or_else(|| blank_table(&working, s)));
                match blanked {
                    Some(next) if next != working => working = next,
                    _ => return Err(errors),
                }
            }
        }
    };
    let mut c = Checker {
        text,
        doc: ImDocument::parse(text).ok(),
        errors: Vec::new(),
    };
    let config = check(&mut c, file);
    // A table one of whose lines was blanked for a wrong value is checked without it: what the
    // checks then find wrong with the table as a whole ("has no action") follows from that.
    let blanked: Vec<String> = errors.iter().map(|e| e.key.clone()).collect();
    let follows_from_blanked = |key: &str| {
        blanked.iter().any(|b| {
            b.strip_prefix(key)
                .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
        })
    };
    c.errors.retain(|e| !follows_from_blanked(&e.key));
    errors.append(&mut c.errors);
    if errors.is_empty() {
        Ok(config)
    } else {
        errors.sort_by_key(|e| e.line.unwrap_or(usize::MAX));
        Err(errors)
    }
}

/// The field a "missing field `name`" message names.
fn missing_field(message: &str) -> Option<&str> {
    let rest = message.split_once("missing field `")?.1;
    rest.split_once('`').map(|(field, _)| field)
}

/// Whether serde's message is about a value or key (a wrong type, an unknown or duplicate
/// key, a missing field) rather than the file's syntax.
fn is_data_error(message: &str) -> bool {
    [
        "invalid type",
        "unknown field",
        "invalid value",
        "missing field",
        "duplicate",
    ]
    .iter()
    .any(|m| message.contains(m))
}

/// The key at byte `at`, as the checks after parsing name keys (`server.threads`,
/// `origin[1].health_check.path`, `rule[0].match.path`): the table the line is in, each array
/// of tables with the index of its entry, then the keys leading to `at` on the line, inside
/// inline tables too.
fn key_at(text: &str, at: usize) -> String {
    let (start, end) = line_bounds(text, at);
    let line = text[start..end].trim();
    if line.starts_with('[') {
        return table_key(text, start, header_name(line));
    }
    let table = text[..start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(header_name);
    let at_line = &text[start..at.clamp(start, end)];
    let mut own = keys_before(at_line);
    if own.is_empty() {
        own = line
            .split_once('=')
            .map_or(line, |(k, _)| k)
            .trim()
            .to_string();
    }
    let own = own.trim_matches('"');
    match table {
        Some(name) => format!("{}.{own}", table_key(text, start, name)),
        None => own.to_string(),
    }
}

/// `origin.health_check` for a header line `[origin.health_check]` or `[[origin]]`.
fn header_name(line: &str) -> &str {
    let inner = line.trim_start_matches('[');
    inner.split(']').next().unwrap_or_default().trim()
}

/// A table's dotted name with the index of each array-of-tables entry it is in (`origin[1]`
/// for the second `[[origin]]`), counting the `[[...]]` headers up to the line at `start`.
fn table_key(text: &str, start: usize, name: &str) -> String {
    let above = &text[..text[start..].find('\n').map_or(text.len(), |i| start + i)];
    let mut out = String::new();
    for (i, part) in name.split('.').enumerate() {
        if i > 0 {
            out.push('.');
        }
        out.push_str(part.trim());
        let prefix: String = name.split('.').take(i + 1).collect::<Vec<_>>().join(".");
        let entries = (above.lines())
            .filter(|l| l.trim().starts_with("[[") && header_name(l.trim()) == prefix)
            .count();
        if entries > 0 {
            out.push_str(&format!("[{}]", entries - 1));
        }
    }
    out
}

/// The keys leading to the end of `prefix`, the start of a line up to a position on it:
/// `match.path` for `match = { path = `. What strings hold is no key; a position inside an
/// array is the array's key.
fn keys_before(prefix: &str) -> String {
    let mut open: Vec<String> = Vec::new();
    let mut current: Option<String> = None;
    let mut word = String::new();
    let mut in_string = None;
    for ch in prefix.chars() {
        if let Some(quote) = in_string {
            if ch == quote {
                in_string = None;
            } else {
                word.push(ch);
            }
            continue;
        }
        match ch {
            '"' | '\'' => {
                in_string = Some(ch);
                word.clear();
            }
            '=' => {
                current = Some(std::mem::take(&mut word).trim().to_string());
            }
            '{' => {
                open.push(current.take().unwrap_or_default());
                word.clear();
            }
            '}' => {
                open.pop();
                current = None;
                word.clear();
            }
            ',' if !open.is_empty() => {
                current = None;
                word.clear();
            }
            '#' => break,
            _ => word.push(ch),
        }
    }
    open.into_iter()
        .chain(current)
        .filter(|k| !k.is_empty())
        .collect::<Vec<_>>()
        .join(".")
}

/// Where the line holding byte `at` starts and ends (before its newline).
fn line_bounds(text: &str, at: usize) -> (usize, usize) {
    let at = at.min(text.len());
    let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let end = text[at..].find('\n').map_or(text.len(), |i| at + i);
    (start, end)
}

/// `text` with the line holding byte `at` replaced by spaces (newlines kept, so every other
/// line and offset stays where it was). `None` for a table header: blanking it would move its
/// keys to another table.
fn blank_line(text: &str, at: usize) -> Option<String> {
    let (start, end) = line_bounds(text, at);
    if text[start..end].trim_start().starts_with('[') {
        return None;
    }
    let mut out = String::with_capacity(text.len());
    out.push_str(&text[..start]);
    out.extend(std::iter::repeat_n(' ', text[start..end].chars().count()));
    out.push_str(&text[end..]);
    Some(out)
}

/// `text` with the table whose header is on the line holding byte `at` replaced by spaces,
/// with the sub-tables that follow it (`[origin.health_check]` after `[[origin]]`): each line
/// keeps its length, so every other line and offset stays where it was.
fn blank_table(text: &str, at: usize) -> Option<String> {
    let (start, end) = line_bounds(text, at);
    let name = header_name(text[start..end].trim());
    let mut stop = text.len();
    let mut next = end;
    while next < text.len() {
        let (line_start, line_end) = line_bounds(text, next + 1);
        let line = text[line_start..line_end].trim();
        let sub_table = header_name(line)
            .strip_prefix(name)
            .is_some_and(|rest| rest.starts_with('.'));
        if line.starts_with('[') && !sub_table {
            stop = line_start;
            break;
        }
        next = line_end;
    }
    let blanked: String = (text[start..stop].chars())
        .map(|ch| if ch == '\n' { ch } else { ' ' })
        .collect();
    Some(format!("{}{blanked}{}", &text[..start], &text[stop..]))
}

fn check(c: &mut Checker<'_>, file: FileConfig) -> Config {
    let server = check_server(c, file.server);
    let origins = check_origins(c, file.origin);
    let cache = check_cache(c, file.cache);
    // The bus keeps purges as long as an object can live, unless told otherwise.
    let purge = check_purge(c, &file.purge, cache.ttl_cap);
    let rules = super::rules::check(c, file.rule, &origins);
    Config {
        server,
        origins,
        cache,
        access_log: check_log(c, &file.log),
        purge,
        rules,
    }
}

/// `[server]`.
fn check_server(c: &mut Checker<'_>, s: ServerFile) -> ServerConfig {
    use Seg::{Index, Key};
    let listen = socket_addrs(c, &s.listen, &[Key("server"), Key("listen")]);
    let proxy_protocol_listen = socket_addrs(
        c,
        &s.proxy_protocol_listen,
        &[Key("server"), Key("proxy_protocol_listen")],
    );
    if s.listen.is_empty() && s.proxy_protocol_listen.is_empty() {
        c.report(
            &[Key("server"), Key("listen")],
            "needs at least one address (here or in proxy_protocol_listen)",
        );
    }
    if s.threads == 0 {
        c.report(&[Key("server"), Key("threads")], "must be at least 1");
    }
    let admin = if s.admin.is_empty() {
        None
    } else {
        c.socket_addr(&[Key("server"), Key("admin")], &s.admin)
    };
    if s.name.is_empty()
        || !s
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        c.report(
            &[Key("server"), Key("name")],
            format!(
                "must be a token of letters, digits, '-', '_' or '.': {:?}",
                s.name
            ),
        );
    }
    let shutdown_grace = c.duration(&[Key("server"), Key("shutdown_grace")], &s.shutdown_grace);
    for (key, value, least) in [
        ("max_uri_bytes", s.max_uri_bytes, 64),
        ("max_header_bytes", s.max_header_bytes, 1024),
        ("max_headers", s.max_headers, 8),
        ("max_connections", s.max_connections, 1),
    ] {
        if value < least {
            c.report(
                &[Key("server"), Key(key)],
                format!("must be at least {least}, got {value}"),
            );
        }
    }
    let trusted_proxies = networks(
        c,
        &s.trusted_proxies,
        &[Key("server"), Key("trusted_proxies")],
    );
    if s.trusted_proxies.is_empty() {
        // Believing a PROXY header from anyone would let any client name its own address
        // (to the purge ACL, the rules, the origin's X-Forwarded-For).
        let tls = s.tls.as_ref();
        let plain = [Key("server"), Key("proxy_protocol_listen")];
        let over_tls = [Key("server"), Key("tls"), Key("proxy_protocol_listen")];
        for (path, addresses) in [
            (&plain[..], s.proxy_protocol_listen.len()),
            (
                &over_tls[..],
                tls.map_or(0, |t| t.proxy_protocol_listen.len()),
            ),
        ] {
            if addresses > 0 {
                c.report(
                    path,
                    "needs [server] trusted_proxies: the networks of the balancers whose PROXY header is believed",
                );
            }
        }
    }
    let mut strip_headers = Vec::new();
    for (i, name) in s.strip_headers.iter().enumerate() {
        match http::HeaderName::from_bytes(name.as_bytes()) {
            Ok(n) => strip_headers.push(n),
            Err(_) => c.report(
                &[Key("server"), Key("strip_headers"), Index(i)],
                format!("not a header name: {name:?}"),
            ),
        }
    }
    let keepalive_timeout = c.duration(
        &[Key("server"), Key("keepalive_timeout")],
        &s.keepalive_timeout,
    );
    let tls = s.tls.as_ref().map(|t| check_tls(c, t, &s.hosts));
    let body_timeout = c.duration(&[Key("server"), Key("body_timeout")], &s.body_timeout);
    let header_timeout = c.duration(&[Key("server"), Key("header_timeout")], &s.header_timeout);
    let send_timeout = c.duration(&[Key("server"), Key("send_timeout")], &s.send_timeout);
    for (key, d) in [
        ("keepalive_timeout", keepalive_timeout),
        ("body_timeout", body_timeout),
        ("header_timeout", header_timeout),
        ("send_timeout", send_timeout),
    ] {
        if d < Duration::from_secs(1) {
            c.report(&[Key("server"), Key(key)], "must be at least 1s");
        }
    }
    same_address_twice(c, &s);
    ServerConfig {
        listen,
        proxy_protocol_listen,
        reuse_port: s.reuse_port,
        threads: s.threads.max(1),
        admin,
        name: s.name,
        shutdown_grace,
        upgrade_sock: s.upgrade_sock.into(),
        limits: HeadLimits {
            max_uri_bytes: s.max_uri_bytes,
            max_header_bytes: s.max_header_bytes,
            max_headers: s.max_headers,
            max_body_bytes: (s.max_body_bytes > 0).then_some(s.max_body_bytes),
        },
        hosts: s.hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
        trusted_proxies,
        strip_headers,
        server_timing: s.server_timing,
        error_page: error_page(c, &s.error_page),
        request_id: s.request_id,
        keepalive_timeout,
        body_timeout,
        body_min_rate: (s.body_min_rate > 0).then_some(s.body_min_rate),
        connections: ConnectionLimits {
            max_connections: s.max_connections,
            max_per_client: (s.max_connections_per_client > 0)
                .then_some(s.max_connections_per_client),
            idle_timeout: keepalive_timeout,
            header_timeout,
            send_timeout,
            // Room for the longest allowed request line and header section, so the exact
            // 414/431 answers stay with the guard.
            max_head_bytes: s.max_uri_bytes + s.max_header_bytes + 1024,
            h2_max_rapid_resets: Some(
                tls.as_ref()
                    .map_or(crate::config::H2_DEFAULT_RAPID_RESETS, |t| {
                        t.h2_max_rapid_resets
                    }),
            )
            .filter(|&n| n > 0),
        },
        tls,
    }
}

/// The largest `[server] error_page` read: a page, not a site.
const ERROR_PAGE_MAX: u64 = 256 * 1024;

/// `[server] error_page`'s template, read from its file.
fn error_page(c: &mut Checker<'_>, path: &str) -> Option<std::sync::Arc<str>> {
    use Seg::Key;
    if path.is_empty() {
        return None;
    }
    let at = [Key("server"), Key("error_page")];
    let read = std::fs::metadata(path).and_then(|m| {
        if m.len() > ERROR_PAGE_MAX {
            return Err(std::io::Error::other(format!(
                "{} bytes, more than {ERROR_PAGE_MAX}",
                m.len()
            )));
        }
        std::fs::read_to_string(path)
    });
    match read {
        Ok(page) => Some(page.into()),
        Err(e) => {
            c.report(&at, format!("cannot read {path}: {e}"));
            None
        }
    }
}

/// Reports a listener address given twice (in one list or two, or as the admin port's): the
/// second bind would fail at start, or, with `reuse_port`, two kinds of listener would share
/// its connections.
fn same_address_twice(c: &mut Checker<'_>, s: &ServerFile) {
    use Seg::{Index, Key};
    let none = Vec::new();
    let tls = s.tls.as_ref();
    let lists: [(&[Seg<'_>], &Vec<String>); 4] = [
        (&[Key("server"), Key("listen")], &s.listen),
        (
            &[Key("server"), Key("proxy_protocol_listen")],
            &s.proxy_protocol_listen,
        ),
        (
            &[Key("server"), Key("tls"), Key("listen")],
            tls.map_or(&none, |t| &t.listen),
        ),
        (
            &[Key("server"), Key("tls"), Key("proxy_protocol_listen")],
            tls.map_or(&none, |t| &t.proxy_protocol_listen),
        ),
    ];
    let mut seen: Vec<(SocketAddr, String)> = Vec::new();
    if let Ok(admin) = s.admin.parse::<SocketAddr>() {
        seen.push((admin, "server.admin".into()));
    }
    for (path, list) in lists {
        for (i, text) in list.iter().enumerate() {
            let Ok(addr) = text.parse::<SocketAddr>() else {
                continue;
            };
            let at = [path, &[Index(i)]].concat();
            let name = render_path(&at);
            match seen.iter().find(|(a, _)| *a == addr) {
                Some((_, first)) => c.report(&at, format!("{addr} is already {first}")),
                None => seen.push((addr, name)),
            }
        }
    }
}

/// Each of `list` (`ip:port`), reported by its index under `path` when it is not one.
/// An `[[origin]] addresses` entry: `ip:port` (`[v6]:port`), or `name:port` with a DNS name
/// (labels of letters, digits, `-` and `_` as container and service names have them, each
/// 1–63 bytes, 253 in all; RFC 1123 §2.1), lowercased.
fn origin_target(text: &str) -> Result<OriginTarget, &'static str> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(OriginTarget::Address(addr));
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err("not an ip:port or name:port address");
    };
    let Ok(port) = port.parse::<u16>() else {
        return Err("not a port number after the last ':'");
    };
    if port == 0 {
        return Err("port 0 is no origin's");
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    let label_ok = |label: &str| {
        (1..=63).contains(&label.len())
            && !label.starts_with('-')
            && !label.ends_with('-')
            && (label.bytes()).all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err("not an ip:port address, nor a DNS name and port");
    }
    Ok(OriginTarget::Name {
        host: name.to_ascii_lowercase(),
        port,
    })
}

fn socket_addrs(c: &mut Checker<'_>, list: &[String], path: &[Seg<'_>]) -> Vec<SocketAddr> {
    let mut addrs = Vec::new();
    for (i, a) in list.iter().enumerate() {
        let at = [path, &[Seg::Index(i)]].concat();
        if let Some(addr) = c.socket_addr(&at, a) {
            addrs.push(addr);
        }
    }
    addrs
}

/// `[server.tls]`: its addresses, and every certificate read and checked now (see
/// [`certificate::load`]); `hosts` (`[server] hosts`) must each be covered by one.
fn check_tls(c: &mut Checker<'_>, t: &TlsFile, hosts: &[String]) -> TlsConfig {
    use Seg::{Index, Key};
    let at = |key| [Key("server"), Key("tls"), Key(key)];
    let listen = socket_addrs(c, &t.listen, &at("listen"));
    let proxy_protocol_listen =
        socket_addrs(c, &t.proxy_protocol_listen, &at("proxy_protocol_listen"));
    if t.listen.is_empty() && t.proxy_protocol_listen.is_empty() {
        c.report(
            &at("listen"),
            "needs at least one address (here or in proxy_protocol_listen)",
        );
    }
    if t.certificate.is_empty() {
        c.report(
            &at("certificate"),
            "needs at least one [[server.tls.certificate]] (chain and key files)",
        );
    }
    let now = std::time::SystemTime::now();
    let mut certificates = Vec::new();
    for (i, file) in t.certificate.iter().enumerate() {
        let path = |key| {
            [
                Key("server"),
                Key("tls"),
                Key("certificate"),
                Index(i),
                Key(key),
            ]
        };
        let loaded = certificate::load(Path::new(&file.chain), Path::new(&file.key), now);
        let mut cert = match loaded {
            Ok(cert) => cert,
            Err(certificate::CertificateError::Chain(why)) => {
                c.report(&path("chain"), why);
                continue;
            }
            Err(certificate::CertificateError::Key(why)) => {
                c.report(&path("key"), why);
                continue;
            }
        };
        if let Some(names) = &file.names {
            cert.names.clear();
            for (j, name) in names.iter().enumerate() {
                let name = name.trim_end_matches('.').to_ascii_lowercase();
                let covered = cert.covers.iter().any(|p| certificate::covers(p, &name));
                if !covered {
                    let at = [
                        Key("server"),
                        Key("tls"),
                        Key("certificate"),
                        Index(i),
                        Key("names"),
                        Index(j),
                    ];
                    c.report(
                        &at,
                        format!(
                            "{name:?} is not a name the certificate covers (it covers {})",
                            cert.covers.join(", ")
                        ),
                    );
                }
                cert.names.push(name);
            }
        }
        cert.default = file.default;
        certificates.push(cert);
    }
    if t.certificate.iter().filter(|f| f.default).count() > 1 {
        c.report(
            &at("certificate"),
            "more than one certificate says default = true",
        );
    }
    if !certificates.iter().any(|cert| cert.default) {
        if let Some(first) = certificates.first_mut() {
            first.default = true;
        }
    }
    if !certificates.is_empty() {
        for (i, host) in hosts.iter().enumerate() {
            let host = host.to_ascii_lowercase();
            let bare = super::host::without_port(&host);
            let covered = certificates
                .iter()
                .any(|cert| cert.names.iter().any(|p| certificate::covers(p, bare)));
            if !covered {
                c.report(
                    &[Key("server"), Key("hosts"), Index(i)],
                    format!("{bare:?} is served over TLS, but no certificate covers it"),
                );
            }
        }
    }
    let handshake_timeout = c.duration(&at("handshake_timeout"), &t.handshake_timeout);
    if handshake_timeout < Duration::from_secs(1) {
        c.report(&at("handshake_timeout"), "must be at least 1s");
    }
    if t.h2_max_concurrent_streams == 0 {
        c.report(&at("h2_max_concurrent_streams"), "must be at least 1");
    }
    let mut redirect_http = Vec::new();
    for (i, pattern) in t.redirect_http.iter().enumerate() {
        let pattern = pattern.trim_end_matches('.').to_ascii_lowercase();
        let name = pattern.strip_prefix("*.").unwrap_or(&pattern);
        let valid =
            pattern == "*" || super::host::normalize_host(name, 80).is_ok_and(|h| h == name);
        if !valid {
            c.report(
                &[Key("server"), Key("tls"), Key("redirect_http"), Index(i)],
                format!("not a host, *.parent or *: {pattern:?}"),
            );
        }
        redirect_http.push(pattern);
    }
    TlsConfig {
        listen,
        proxy_protocol_listen,
        certificates,
        handshake_timeout,
        http2: t.http2,
        h2_max_concurrent_streams: t.h2_max_concurrent_streams.max(1),
        h2_max_pending_resets: t.h2_max_pending_resets,
        h2_max_rapid_resets: t.h2_max_rapid_resets,
        redirect_http,
    }
}

/// `[[origin]]`: every pool, or the default one when there is none.
fn check_origins(c: &mut Checker<'_>, origin_tables: Vec<OriginFile>) -> Vec<OriginPool> {
    use Seg::{Index, Key};
    let mut origins = Vec::new();
    let pools: Vec<OriginFile> = if origin_tables.is_empty() {
        vec![OriginFile {
            name: "origin".into(),
            addresses: vec!["127.0.0.1:8081".into()],
            resolve_interval: "10s".into(),
            hosts: vec![],
            connect_timeout: "2s".into(),
            read_timeout: "30s".into(),
            health_check: Default::default(),
            balance: "round_robin".into(),
            upgrade: Vec::new(),
            tls: None,
            max_connections: 0,
            fail_timeout: "10s".into(),
            retry_statuses: vec![503],
        }]
    } else {
        origin_tables
    };
    for (i, o) in pools.into_iter().enumerate() {
        let at = |k: &'static str| [Key("origin"), Index(i), Key(k)];
        if o.name.is_empty() {
            c.report(&at("name"), "must not be empty");
        }
        if origins.iter().any(|p: &OriginPool| p.name == o.name) {
            c.report(&at("name"), format!("duplicate pool name {:?}", o.name));
        }
        let mut targets = Vec::new();
        for (j, a) in o.addresses.iter().enumerate() {
            match origin_target(a) {
                Ok(target) => targets.push(target),
                Err(why) => c.report(
                    &[Key("origin"), Index(i), Key("addresses"), Index(j)],
                    format!("{why}: {a:?} (e.g. \"127.0.0.1:8080\" or \"mediawiki:80\")"),
                ),
            }
        }
        if o.addresses.is_empty() {
            c.report(&at("addresses"), "needs at least one origin address");
        }
        let addresses = (targets.iter())
            .filter_map(|t| match t {
                OriginTarget::Address(a) => Some(*a),
                OriginTarget::Name { .. } => None,
            })
            .collect();
        let resolve_interval = c.duration(&at("resolve_interval"), &o.resolve_interval);
        if resolve_interval < Duration::from_secs(1) {
            c.report(&at("resolve_interval"), "must be at least 1s");
        }
        let connect_timeout = c.duration(&at("connect_timeout"), &o.connect_timeout);
        let read_timeout = c.duration(&at("read_timeout"), &o.read_timeout);
        let fail_timeout = c.duration(&at("fail_timeout"), &o.fail_timeout);
        for (j, status) in o.retry_statuses.iter().enumerate() {
            if !(500..=599).contains(status) {
                c.report(
                    &[Key("origin"), Index(i), Key("retry_statuses"), Index(j)],
                    format!("must be a 5xx status, got {status}"),
                );
            }
        }
        let balance = match o.balance.as_str() {
            "round_robin" => Balance::RoundRobin,
            "consistent" => Balance::Consistent,
            other => {
                c.report(
                    &at("balance"),
                    format!("must be \"round_robin\" or \"consistent\", got {other:?}"),
                );
                Balance::RoundRobin
            }
        };
        let hc = o.health_check;
        let hc_at = |k: &'static str| [Key("origin"), Index(i), Key("health_check"), Key(k)];
        let interval = c.duration(&hc_at("interval"), &hc.interval);
        if hc.enabled && interval.is_zero() {
            c.report(&hc_at("interval"), "must be longer than zero");
        }
        if let Err(reason) = health_check_path(&hc.path) {
            c.report(&hc_at("path"), format!("{reason}: {:?}", hc.path));
        }
        if let Err(reason) = health_check_host(&hc.host) {
            c.report(&hc_at("host"), format!("{reason}: {:?}", hc.host));
        }
        if hc.failures == 0 || hc.successes == 0 {
            c.report(
                &hc_at("failures"),
                "failures and successes must be at least 1",
            );
        }
        let health_check = hc.enabled.then(|| HealthCheck {
            path: hc.path,
            host: hc.host,
            interval,
            failures: hc.failures.max(1),
            successes: hc.successes.max(1),
        });
        let tls = o.tls.as_ref().map(|t| check_origin_tls(c, i, t));
        origins.push(OriginPool {
            tls,
            name: o.name,
            resolved: Vec::new(),
            targets,
            addresses,
            resolve_interval,
            hosts: o.hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
            connect_timeout,
            read_timeout,
            health_check,
            balance,
            upgrade: o.upgrade.iter().map(|p| p.to_ascii_lowercase()).collect(),
            max_connections: o.max_connections,
            fail_timeout,
            retry_statuses: o.retry_statuses,
        });
    }
    origins
}

/// `[origin.tls]` of pool `i`: its name a host, its CA file readable PEM certificates.
fn check_origin_tls(c: &mut Checker<'_>, i: usize, t: &OriginTlsFile) -> OriginTls {
    use Seg::{Index, Key};
    let at = |key| [Key("origin"), Index(i), Key("tls"), Key(key)];
    let name = (!t.name.is_empty()).then(|| t.name.trim_end_matches('.').to_ascii_lowercase());
    if let Some(name) = &name {
        if super::host::normalize_host(name, 443).map_or(true, |h| h != *name) {
            c.report(&at("name"), format!("not a host name: {name:?}"));
        }
    }
    let ca = (!t.ca_file.is_empty()).then(|| {
        certificate::load_authorities(Path::new(&t.ca_file)).unwrap_or_else(|why| {
            c.report(&at("ca_file"), why);
            Vec::new()
        })
    });
    OriginTls {
        name,
        verify: t.verify,
        ca,
        http2: t.http2,
    }
}

/// `[cache]`, with its `[cache.bypass]` and `[cache.disk]` tables.
fn check_cache(c: &mut Checker<'_>, k: CacheFile) -> CacheConfig {
    use Seg::{Index, Key};
    let at = |key: &'static str| [Key("cache"), Key(key)];
    if k.memory_size < 1 << 20 {
        c.report(
            &at("memory_size"),
            format!(
                "must be at least 1048576 bytes (1 MiB), got {}",
                k.memory_size
            ),
        );
    }
    // A default larger than a small tier is the tier's size, not an error about a key the
    // file does not hold.
    let max_object_size = k.max_object_size.unwrap_or(k.memory_size.min(8 << 20));
    object_size(
        c,
        &at("max_object_size"),
        max_object_size,
        k.memory_size,
        "cache.memory_size",
    );
    let reported = c.errors.len();
    let ttl_cap = c.duration(&at("ttl_cap"), &k.ttl_cap);
    // A value that is not a duration was reported already; only a real zero is reported here.
    if ttl_cap.is_zero() && c.errors.len() == reported {
        c.report(&at("ttl_cap"), "must be longer than zero");
    }
    if k.max_variants < 2 {
        c.report(
            &at("max_variants"),
            format!("must be at least 2, got {}", k.max_variants),
        );
    }
    let ttl_cap_404 = c.duration(&at("ttl_cap_404"), &k.ttl_cap_404);
    if !(0.0..=0.5).contains(&k.ttl_jitter) {
        c.report(
            &at("ttl_jitter"),
            format!("must be between 0 and 0.5, got {}", k.ttl_jitter),
        );
    }
    let default_grace = c.duration(&at("default_grace"), &k.default_grace);
    let stale_if_error = c.duration(&at("stale_if_error"), &k.stale_if_error);
    let heuristic_max = c.duration(&at("heuristic_max"), &k.heuristic_max);
    let lock_timeout = c.duration(&at("lock_timeout"), &k.lock_timeout);
    let mut vary_cookies = Vec::new();
    for (i, name) in k.vary_cookies.iter().enumerate() {
        // RFC 6265 §4.1.1: cookie-name = token.
        if http::HeaderName::from_bytes(name.as_bytes()).is_ok() && !name.is_empty() {
            vary_cookies.push(name.clone());
        } else {
            c.report(
                &[Key("cache"), Key("vary_cookies"), Index(i)],
                format!("{name:?} is not a cookie name (RFC 6265: a token)"),
            );
        }
    }
    vary_cookies.sort();
    vary_cookies.dedup();
    let mut bypass_cookies = Vec::new();
    for (i, r) in k.bypass.cookies.iter().enumerate() {
        match compile(r) {
            Ok(re) => bypass_cookies.push(re),
            Err(e) => c.report(
                &[Key("cache"), Key("bypass"), Key("cookies"), Index(i)],
                format!(
                    "not a valid regex: {}",
                    e.to_string().lines().last().unwrap_or("")
                ),
            ),
        }
    }
    let mut host_aliases = std::collections::HashMap::new();
    for (alias, canonical) in &k.host_aliases {
        // Aliases are matched against a request's key host, normalised as for `http`.
        let host = |h: &str| super::host::normalize_host(h, 80).ok();
        match (host(alias), host(canonical)) {
            (Some(a), Some(c)) => {
                host_aliases.insert(a, c);
            }
            _ => c.report(
                &[Key("cache"), Key("host_aliases"), Key(alias)],
                format!("not a host[:port] pair: {alias:?} = {canonical:?}"),
            ),
        }
    }
    let d = &k.disk;
    let disk_at = |key: &'static str| [Key("cache"), Key("disk"), Key(key)];
    let disk = if d.path.is_empty() {
        None
    } else {
        if d.size < 1 << 20 {
            c.report(
                &disk_at("size"),
                format!("must be at least 1048576 bytes (1 MiB), got {}", d.size),
            );
        }
        let largest_on_disk = d.max_object_size.unwrap_or(d.size.min(64 << 20));
        object_size(
            c,
            &disk_at("max_object_size"),
            largest_on_disk,
            d.size,
            "cache.disk.size",
        );
        if d.min_uses == 0 {
            c.report(&disk_at("min_uses"), "must be at least 1");
        }
        let revalidate_after_restart = match d.after_restart.as_str() {
            "revalidate" => true,
            "serve" => false,
            other => {
                c.report(
                    &disk_at("after_restart"),
                    format!("must be \"revalidate\" or \"serve\", got {other:?}"),
                );
                true
            }
        };
        Some(DiskConfig {
            path: d.path.clone().into(),
            size: d.size,
            max_object_size: largest_on_disk,
            min_uses: d.min_uses.max(1),
            revalidate_after_restart,
            max_variants: k.max_variants.max(2),
        })
    };
    // Room for at least one fill of the largest object either tier stores, or that object
    // could never be stored.
    let largest = disk
        .as_ref()
        .map_or(max_object_size, |d| d.max_object_size.max(max_object_size));
    let fill_memory = match k.fill_memory {
        Some(n) if n < largest => {
            c.report(
                &at("fill_memory"),
                format!(
                    "must be at least the largest object stored ({largest} bytes, from \
                     max_object_size), got {n}"
                ),
            );
            largest
        }
        Some(n) => n,
        None => largest.max(256 << 20),
    };
    let invalidate_on_unsafe = match k.invalidate_on_unsafe.as_str() {
        "any" => UnsafeInvalidation::Any,
        "purgers" => UnsafeInvalidation::Purgers,
        "session" => UnsafeInvalidation::Session,
        other => {
            c.report(
                &at("invalidate_on_unsafe"),
                format!("must be \"any\", \"purgers\" or \"session\", got {other:?}"),
            );
            UnsafeInvalidation::Any
        }
    };
    let downstream_cache_control = if k.downstream_cache_control.is_empty() {
        None
    } else {
        match http::HeaderValue::from_str(&k.downstream_cache_control) {
            Ok(v) => Some(v),
            Err(_) => {
                c.report(
                    &at("downstream_cache_control"),
                    "not a header value (control characters?)",
                );
                None
            }
        }
    };
    let mut compress = Compress::default();
    for (i, name) in k.compress.iter().enumerate() {
        match name.as_str() {
            "br" => compress.brotli = true,
            "gzip" => compress.gzip = true,
            other => c.report(
                &[Key("cache"), Key("compress"), Index(i)],
                format!("must be \"br\" or \"gzip\", got {other:?}"),
            ),
        }
    }
    CacheConfig {
        memory_size: k.memory_size,
        max_object_size: max_object_size as usize,
        fill_memory: usize::try_from(fill_memory).unwrap_or(usize::MAX),
        ttl_cap,
        ttl_cap_404,
        ttl_jitter: k.ttl_jitter.clamp(0.0, 0.5),
        default_grace,
        stale_if_error,
        store_server_errors: k.store_server_errors,
        compress,
        honor_must_revalidate: k.honor_must_revalidate,
        heuristic_freshness: k.heuristic_freshness,
        heuristic_max,
        lock_timeout,
        bypass_cookies,
        vary_cookies,
        max_variants: k.max_variants.max(2),
        bypass_authorization: k.bypass.authorization,
        invalidate_on_unsafe,
        downstream_cache_control,
        host_aliases,
        disk,
    }
}

/// `[purge]`, with its `[purge.htcp]` and `[purge.bus]` tables. `ttl_cap` is the bus's
/// default retention.
fn check_purge(c: &mut Checker<'_>, purge: &PurgeFile, ttl_cap: Duration) -> PurgeConfig {
    use Seg::{Index, Key};
    let allow = networks(c, &purge.allow, &[Key("purge"), Key("allow")]);
    let mut tag_headers = Vec::new();
    for (i, name) in purge.tag_headers.iter().enumerate() {
        match http::HeaderName::from_bytes(name.as_bytes()) {
            Ok(n) => tag_headers.push(n),
            Err(_) => c.report(
                &[Key("purge"), Key("tag_headers"), Index(i)],
                format!("not a header name: {name:?}"),
            ),
        }
    }
    if purge.tag_index_size < 1 << 16 && !tag_headers.is_empty() {
        c.report(
            &[Key("purge"), Key("tag_index_size")],
            format!("must be at least 65536 bytes, got {}", purge.tag_index_size),
        );
    }
    let htcp = check_htcp(c, &purge.htcp);
    let bus = check_bus(c, &purge.bus, ttl_cap);
    PurgeConfig {
        allow,
        token: (!purge.token.is_empty()).then(|| purge.token.clone()),
        tag_headers,
        tag_index_size: purge.tag_index_size,
        htcp,
        bus,
    }
}

/// `[purge.htcp]`: the HTCP receiver, if it listens.
fn check_htcp(c: &mut Checker<'_>, h: &HtcpFile) -> Option<HtcpConfig> {
    use Seg::{Index, Key};
    let htcp_at = |key: &'static str| [Key("purge"), Key("htcp"), Key(key)];
    if h.listen.is_empty() {
        None
    } else {
        let listen = c.socket_addr(&htcp_at("listen"), &h.listen);
        let allow = networks(c, &h.allow, &htcp_at("allow"));
        let mut multicast_groups = Vec::new();
        for (i, g) in h.multicast_groups.iter().enumerate() {
            match g.parse::<std::net::Ipv4Addr>() {
                Ok(a) if a.is_multicast() => multicast_groups.push(a),
                _ => c.report(
                    &[Key("purge"), Key("htcp"), Key("multicast_groups"), Index(i)],
                    format!("not an IPv4 multicast group (224.0.0.0/4): {g:?}"),
                ),
            }
        }
        let host_regex = if h.host_regex.is_empty() {
            None
        } else {
            // Anchored: the pattern must match the whole host, so `wiki\.test` does not accept
            // `notwiki.test.attacker.example` (an unanchored match would).
            match compile(&format!("^(?:{})$", h.host_regex)) {
                Ok(re) => Some(re),
                Err(e) => {
                    c.report(
                        &htcp_at("host_regex"),
                        format!(
                            "not a valid regex: {}",
                            e.to_string().lines().last().unwrap_or("")
                        ),
                    );
                    None
                }
            }
        };
        let multicast_interface = if h.multicast_interface.is_empty() {
            None
        } else {
            match h.multicast_interface.parse::<std::net::Ipv4Addr>() {
                Ok(a) if !a.is_multicast() => Some(a),
                _ => {
                    c.report(
                        &htcp_at("multicast_interface"),
                        format!(
                            "not the IPv4 address of an interface: {:?}",
                            h.multicast_interface
                        ),
                    );
                    None
                }
            }
        };
        listen.map(|listen| HtcpConfig {
            listen,
            multicast_interface,
            allow,
            multicast_groups,
            host_regex,
        })
    }
}

/// `[purge.bus]`: the fleet's purge bus, if any. Its retention defaults to `ttl_cap`.
fn check_bus(c: &mut Checker<'_>, b: &BusFile, ttl_cap: Duration) -> Option<BusConfig> {
    use Seg::{Index, Key};
    let bus_at = |key: &'static str| [Key("purge"), Key("bus"), Key(key)];
    if b.servers.is_empty() {
        None
    } else {
        for (i, url) in b.servers.iter().enumerate() {
            if url.parse::<async_nats::ServerAddr>().is_err() {
                c.report(
                    &[Key("purge"), Key("bus"), Key("servers"), Index(i)],
                    format!("not a NATS URL: {url:?} (e.g. \"nats://127.0.0.1:4222\")"),
                );
            }
        }
        let token_ok = |v: &str| {
            !v.is_empty()
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if !token_ok(&b.node) {
            c.report(
                &bus_at("node"),
                format!(
                    "must be a non-empty id of letters, digits, '-' and '_', got {:?}",
                    b.node
                ),
            );
        }
        if !token_ok(&b.stream) {
            c.report(
                &bus_at("stream"),
                format!("must be letters, digits, '-' and '_', got {:?}", b.stream),
            );
        }
        if b.subject.is_empty() || b.subject.contains([' ', '*', '>']) {
            c.report(
                &bus_at("subject"),
                format!(
                    "must be a NATS subject without wildcards, got {:?}",
                    b.subject
                ),
            );
        }
        let retention = if b.retention.is_empty() {
            ttl_cap
        } else {
            c.duration(&bus_at("retention"), &b.retention)
        };
        let catch_up = match b.catch_up.as_str() {
            "wait" => CatchUpPolicy::Wait,
            "revalidate" => CatchUpPolicy::Revalidate,
            other => {
                c.report(
                    &bus_at("catch_up"),
                    format!("must be \"wait\" or \"revalidate\", got {other:?}"),
                );
                CatchUpPolicy::Wait
            }
        };
        let catch_up_timeout = c.duration(&bus_at("catch_up_timeout"), &b.catch_up_timeout);
        let mut readable = |key: &'static str, path: &str, what: &str| -> Option<PathBuf> {
            if path.is_empty() {
                return None;
            }
            match std::fs::read_to_string(path) {
                Ok(text) if text.contains(what) => Some(PathBuf::from(path)),
                Ok(_) => {
                    c.report(&bus_at(key), format!("{path}: no {what} in this file"));
                    None
                }
                Err(e) => {
                    c.report(&bus_at(key), format!("cannot read {path}: {e}"));
                    None
                }
            }
        };
        let credentials = readable(
            "credentials_file",
            &b.credentials_file,
            "-----BEGIN NATS USER JWT-----",
        );
        let nkey = readable("nkey_seed_file", &b.nkey_seed_file, "SU");
        let ca = readable("tls_ca", &b.tls_ca, "-----BEGIN CERTIFICATE-----");
        let cert = readable("tls_cert", &b.tls_cert, "-----BEGIN CERTIFICATE-----");
        let key = readable("tls_key", &b.tls_key, "PRIVATE KEY-----");
        if let Some(path) = &nkey {
            let seed = std::fs::read_to_string(path).unwrap_or_default();
            if nkeys::KeyPair::from_seed(seed.trim()).is_err() {
                c.report(
                    &bus_at("nkey_seed_file"),
                    format!("{}: not a user NKey seed (SU...)", path.display()),
                );
            }
        }
        let auth = match (credentials, nkey) {
            (Some(_), Some(_)) => {
                c.report(
                    &bus_at("nkey_seed_file"),
                    "give credentials_file or nkey_seed_file, not both",
                );
                BusAuth::None
            }
            (Some(file), None) => BusAuth::CredentialsFile(file),
            (None, Some(file)) => BusAuth::NkeySeedFile(file),
            (None, None) => BusAuth::None,
        };
        if b.tls_cert.is_empty() != b.tls_key.is_empty() {
            let missing = if b.tls_cert.is_empty() {
                "tls_cert"
            } else {
                "tls_key"
            };
            c.report(&bus_at(missing), "tls_cert and tls_key go together");
        }
        let tls = BusTls {
            ca,
            client: cert.zip(key),
        };
        if b.max_queued == 0 {
            c.report(&bus_at("max_queued"), "must be at least 1, got 0");
        }
        let outbox_dir = (!b.outbox_dir.is_empty()).then(|| PathBuf::from(&b.outbox_dir));
        // Made at start when missing, as the disk tier's directory is.
        if let Some(dir) = outbox_dir.as_deref().filter(|d| d.exists() && !d.is_dir()) {
            c.report(
                &bus_at("outbox_dir"),
                format!("{}: not a directory", dir.display()),
            );
        }
        Some(BusConfig {
            servers: b.servers.clone(),
            stream: b.stream.clone(),
            subject: b.subject.clone(),
            node: b.node.clone(),
            retention,
            catch_up,
            catch_up_timeout,
            publish_htcp: b.publish_htcp,
            max_queued: b.max_queued,
            outbox_dir,
            auth,
            tls,
        })
    }
}

/// `[log]`: the access log, if any.
fn check_log(c: &mut Checker<'_>, log: &LogFile) -> Option<AccessLogConfig> {
    use Seg::Key;
    let format = match log.format.as_str() {
        "combined" => Format::Combined,
        "json" => Format::Json,
        other => {
            c.report(
                &[Key("log"), Key("format")],
                format!("must be \"combined\" or \"json\", got {other:?}"),
            );
            Format::Combined
        }
    };
    match log.access.as_str() {
        "" => None,
        "stdout" => Some(AccessLogConfig {
            destination: Destination::Stdout,
            format,
        }),
        path => Some(AccessLogConfig {
            destination: Destination::File(path.into()),
            format,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_valid() {
        let c = parse("").expect("defaults valid");
        assert_eq!(c.server.listen, vec!["127.0.0.1:8080".parse().unwrap()]);
        assert_eq!(c.cache.ttl_cap, Duration::from_secs(86400));
        assert_eq!(c.origins.len(), 1);
    }

    #[test]
    fn a_disk_tier_revalidates_after_a_restart_unless_told_to_serve() {
        let disk = |lines: &str| {
            parse(&format!(
                "[cache.disk]\npath = \"/var/cache/skua\"\n{lines}"
            ))
            .expect("valid")
            .cache
            .disk
            .expect("a disk tier")
            .revalidate_after_restart
        };
        assert!(disk(""));
        assert!(!disk("after_restart = \"serve\"\n"));
        let errs = parse("[cache.disk]\npath = \"/x\"\nafter_restart = \"trust\"\n").unwrap_err();
        assert_eq!(
            (errs[0].key.as_str(), errs[0].line),
            ("cache.disk.after_restart", Some(3))
        );
    }

    /// With `reuse_port` a proxy listener on the admin port's address would bind beside it,
    /// and the two services would share its connections; without, the second bind fails late.
    #[test]
    fn a_listener_address_given_twice_names_both_keys() {
        let errs = parse(
            "[server]\nadmin = \"127.0.0.1:9000\"\nreuse_port = true\nlisten = [\"127.0.0.1:9000\", \"127.0.0.1:9001\"]\ntrusted_proxies = [\"10.0.0.0/8\"]\nproxy_protocol_listen = [\"127.0.0.1:9001\"]\n",
        )
        .unwrap_err();
        let said: Vec<(String, Option<usize>, String)> = (errs.iter())
            .map(|e| (e.key.clone(), e.line, e.reason.clone()))
            .collect();
        assert_eq!(
            said,
            [
                (
                    "server.listen[0]".to_string(),
                    Some(4),
                    "127.0.0.1:9000 is already server.admin".to_string()
                ),
                (
                    "server.proxy_protocol_listen[0]".to_string(),
                    Some(6),
                    "127.0.0.1:9001 is already server.listen[1]".to_string()
                ),
            ]
        );
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let errs = parse("[server]\nthreads = 1\n\n[cache]\nmemroy_size = 5\n").unwrap_err();
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].line, Some(5));
        assert!(errs[0].reason.contains("memroy_size"), "{:?}", errs[0]);
    }

    fn keys_and_lines(errs: &[ConfigError]) -> Vec<(String, Option<usize>)> {
        errs.iter().map(|e| (e.key.clone(), e.line)).collect()
    }

    #[test]
    fn every_bad_value_is_reported_with_its_line() {
        let text = "[server]\nlisten = [\"nope\"]\n\n[[origin]]\nname = \"a\"\naddresses = [\"127.0.0.1:1\", \"bad\"]\nconnect_timeout = \"fast\"\n\n[cache]\nttl_cap = \"0s\"\n";
        let errs = parse(text).unwrap_err();
        let got = keys_and_lines(&errs);
        assert_eq!(
            got,
            vec![
                ("server.listen[0]".to_string(), Some(2)),
                ("origin[0].addresses[1]".to_string(), Some(6)),
                ("origin[0].connect_timeout".to_string(), Some(7)),
                ("cache.ttl_cap".to_string(), Some(10)),
            ]
        );
    }

    #[test]
    fn a_bus_queue_of_no_purges_is_refused_with_its_line() {
        let text =
            "[purge.bus]\nservers = [\"nats://127.0.0.1:4222\"]\nnode = \"a\"\nmax_queued = 0\n";
        let errs = parse(text).unwrap_err();
        assert_eq!(
            keys_and_lines(&errs),
            vec![("purge.bus.max_queued".to_string(), Some(4))]
        );
        assert!(errs[0].reason.contains("at least 1"), "{errs:?}");
    }

    #[test]
    fn a_bus_outbox_dir_that_is_a_file_is_refused_with_its_line() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let text = format!(
            "[purge.bus]\nservers = [\"nats://127.0.0.1:4222\"]\nnode = \"a\"\noutbox_dir = \"{}\"\n",
            file.path().display()
        );
        let errs = parse(&text).unwrap_err();
        assert_eq!(
            keys_and_lines(&errs),
            vec![("purge.bus.outbox_dir".to_string(), Some(4))]
        );
        assert!(errs[0].reason.contains("not a directory"), "{errs:?}");
    }

    #[test]
    fn health_check_path_and_host_must_be_sendable() {
        let text = "[[origin]]\nname = \"a\"\naddresses = [\"127.0.0.1:1\"]\n[origin.health_check]\npath = \"/a b\"\nhost = \"wiki\\u0001.test\"\n";
        let errs = parse(text).unwrap_err();
        let got = keys_and_lines(&errs);
        assert_eq!(
            got,
            vec![
                ("origin[0].health_check.path".to_string(), Some(5)),
                ("origin[0].health_check.host".to_string(), Some(6)),
            ]
        );
        let good = "[[origin]]\nname = \"a\"\naddresses = [\"127.0.0.1:1\"]\n[origin.health_check]\npath = \"/wiki/Main_Page?action=raw\"\nhost = \"wiki.test:8080\"\n";
        assert!(parse(good).is_ok());
    }

    #[test]
    fn a_vary_cookie_must_be_a_cookie_name() {
        let errs = parse("[cache]\nvary_cookies = [\"lang\", \"a b\", \"\"]\n").unwrap_err();
        let got = keys_and_lines(&errs);
        assert_eq!(
            got,
            vec![
                ("cache.vary_cookies[1]".to_string(), Some(2)),
                ("cache.vary_cookies[2]".to_string(), Some(2)),
            ]
        );
        assert!(parse("[cache]\nvary_cookies = [\"lang\", \"skin\"]\n").is_ok());
    }

    #[test]
    fn bad_regex_is_reported() {
        let errs = parse("[cache.bypass]\ncookies = [\"(\"]\n").unwrap_err();
        assert_eq!(errs[0].key, "cache.bypass.cookies[0]");
        assert_eq!(errs[0].line, Some(2));
    }

    #[test]
    fn an_origin_is_an_address_or_a_dns_name_and_port() {
        let name = |host: &str, port| OriginTarget::Name {
            host: host.into(),
            port,
        };
        assert_eq!(
            origin_target("[::1]:8080"),
            Ok(OriginTarget::Address("[::1]:8080".parse().unwrap()))
        );
        assert_eq!(origin_target("mediawiki:80"), Ok(name("mediawiki", 80)));
        assert_eq!(
            origin_target("App_1.Internal.:8080"),
            Ok(name("app_1.internal", 8080))
        );
        for bad in [
            "mediawiki",
            "mediawiki:http",
            "mediawiki:0",
            "-bad:80",
            "a..b:80",
            "has space:80",
            "::1:80",
            ":80",
        ] {
            assert!(origin_target(bad).is_err(), "{bad}");
        }
    }
}
