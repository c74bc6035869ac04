//! Configuration: the TOML file format (`file.rs`), its validation into typed values
//! (`validate.rs`), the typed values themselves (here), host syntax (`host.rs`), and the error
//! report that names key, line and reason for every problem at once. It is the bottom layer:
//! it imports no other module of Skua, and it does not apply configuration; the server, proxy,
//! cache and purge modules read the typed [`Config`] they are handed.

pub mod certificate;
mod file;
pub mod host;
pub mod literals;
pub mod network;
pub mod rules;
mod validate;

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use regex::Regex;

pub use file::{
    FileConfig, H2_DEFAULT_PENDING_RESETS, H2_DEFAULT_RAPID_RESETS, H2_DEFAULT_STREAMS,
};

/// The validated configuration every other module reads.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub origins: Vec<OriginPool>,
    pub cache: CacheConfig,
    pub purge: PurgeConfig,
    pub access_log: Option<AccessLogConfig>,
    /// `[[rule]]`, in order.
    pub rules: Vec<rules::Rule>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: Vec<SocketAddr>,
    /// Plain listeners whose connections open with a PROXY protocol header.
    pub proxy_protocol_listen: Vec<SocketAddr>,
    /// `SO_REUSEPORT` on the proxy and admin listeners.
    pub reuse_port: bool,
    pub threads: usize,
    pub admin: Option<SocketAddr>,
    pub name: String,
    pub shutdown_grace: Duration,
    pub upgrade_sock: std::path::PathBuf,
    pub limits: HeadLimits,
    /// Lowercased hosts served; empty: all.
    pub hosts: Vec<String>,
    pub trusted_proxies: Vec<IpNet>,
    pub strip_headers: Vec<http::HeaderName>,
    /// `[server] server_timing`.
    pub server_timing: bool,
    /// `[server] error_page`: the page's template, read from its file.
    pub error_page: Option<std::sync::Arc<str>>,
    /// `[server] request_id`.
    pub request_id: bool,
    pub keepalive_timeout: Duration,
    pub body_timeout: Duration,
    /// `[server] body_min_rate` in bytes per second; `None`: no minimum.
    pub body_min_rate: Option<u64>,
    pub connections: ConnectionLimits,
    pub tls: Option<TlsConfig>,
}

/// The pool that serves `host` when no rule routes it elsewhere: the first whose `hosts` lists
/// it (without its port), else the first with no `hosts`, else the first.
/// `hosts_by_pool`: each pool's `hosts`, in order.
pub fn default_pool<'a, I>(hosts_by_pool: I, host: &str) -> usize
where
    I: IntoIterator<Item = &'a [String]>,
    I::IntoIter: Clone,
{
    let host = host::without_port(host);
    let pools = hosts_by_pool.into_iter();
    (pools.clone())
        .position(|hosts| hosts.iter().any(|h| h == host))
        .or_else(|| pools.clone().position(<[String]>::is_empty))
        .unwrap_or(0)
}

/// `[server.tls]`, validated: its certificates are loaded and checked.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub listen: Vec<SocketAddr>,
    /// HTTPS listeners whose connections open with a PROXY protocol header, before TLS.
    pub proxy_protocol_listen: Vec<SocketAddr>,
    pub certificates: Vec<certificate::Certificate>,
    pub handshake_timeout: Duration,
    pub http2: bool,
    pub h2_max_concurrent_streams: u32,
    pub h2_max_pending_resets: usize,
    pub h2_max_rapid_resets: usize,
    /// Lowercased host patterns redirected from http to https: names, `*.parent`, or `*`.
    pub redirect_http: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct OriginPool {
    pub name: String,
    /// What `addresses` names, in order.
    pub targets: Vec<OriginTarget>,
    /// The origins' addresses: the targets' own, and what each DNS name resolved to
    /// (`crate::upstream::resolve`; nothing for a name until it has).
    pub addresses: Vec<SocketAddr>,
    /// What each target resolved to last, beside `targets` (empty until resolved).
    pub resolved: Vec<Resolved>,
    /// How often DNS names among the targets are looked up again.
    pub resolve_interval: Duration,
    /// Lowercased hosts; empty for the default pool.
    pub hosts: Vec<String>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub health_check: Option<HealthCheck>,
    pub balance: Balance,
    /// Lowercased protocols `Upgrade` may switch to (`[[origin]] upgrade`); empty: none.
    pub upgrade: Vec<String>,
    /// `[origin.tls]`: HTTPS to the origins.
    pub tls: Option<OriginTls>,
    /// Most requests in flight to each origin; 0: no limit.
    pub max_connections: usize,
    /// How long an origin that failed a request is passed over; zero: never.
    pub fail_timeout: Duration,
    /// 5xx statuses on which a GET or HEAD is sent once more, to another origin.
    pub retry_statuses: Vec<u16>,
}

/// What one target of a pool resolved to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolved {
    pub addresses: Vec<SocketAddr>,
    /// Its last lookup failed (`addresses` are from before): warned of once, not every round.
    pub failing: bool,
}

/// One entry of `[[origin]] addresses`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginTarget {
    Address(SocketAddr),
    /// A DNS name and port (`mediawiki:80`, a container's or a service's name), looked up at
    /// start, on reload and every `resolve_interval`.
    Name {
        host: String,
        port: u16,
    },
}

/// `[origin.tls]`, validated.
#[derive(Debug, Clone)]
pub struct OriginTls {
    /// SNI and the verified name; `None`: the request's host.
    pub name: Option<String>,
    pub verify: bool,
    /// The authorities to verify against (DER, each parsed); `None`: the system's roots.
    pub ca: Option<Vec<Vec<u8>>>,
    pub http2: bool,
}

/// Which encodings Skua compresses stored responses to (`[cache] compress`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Compress {
    pub brotli: bool,
    pub gzip: bool,
}

/// Who may invalidate a cached page with an unsafe request (`[cache] invalidate_on_unsafe`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnsafeInvalidation {
    Any,
    Purgers,
    Session,
}

/// How a pool picks the origin for a miss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    RoundRobin,
    /// By consistent hash of the cache key.
    Consistent,
}

#[derive(Debug, Clone)]
pub struct HealthCheck {
    pub path: String,
    pub host: String,
    pub interval: Duration,
    pub failures: usize,
    pub successes: usize,
}

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub memory_size: u64,
    pub max_object_size: usize,
    /// `[cache] fill_memory`: the bytes of bodies fills in progress hold, all together.
    pub fill_memory: usize,
    pub ttl_cap: Duration,
    /// `[cache] ttl_cap_404`: the longest a 404 stays fresh.
    pub ttl_cap_404: Duration,
    /// `[cache] ttl_jitter`: the largest fraction a lifetime of a minute or more is cut by.
    pub ttl_jitter: f64,
    pub default_grace: Duration,
    pub stale_if_error: Duration,
    pub store_server_errors: bool,
    pub compress: Compress,
    pub honor_must_revalidate: bool,
    pub heuristic_freshness: bool,
    pub heuristic_max: Duration,
    pub lock_timeout: Duration,
    pub bypass_cookies: Vec<Regex>,
    /// `[cache] vary_cookies`: sorted cookie names, each a token.
    pub vary_cookies: Vec<String>,
    /// `[cache] max_variants`: most variants of one URL kept, at least 2.
    pub max_variants: usize,
    pub bypass_authorization: bool,
    pub invalidate_on_unsafe: UnsafeInvalidation,
    /// `[cache] downstream_cache_control`, when set.
    pub downstream_cache_control: Option<http::HeaderValue>,
    /// Normalised alias host → normalised canonical host.
    pub host_aliases: std::collections::HashMap<String, String>,
    pub disk: Option<DiskConfig>,
}

#[derive(Debug, Clone)]
pub struct PurgeConfig {
    pub allow: Vec<IpNet>,
    pub token: Option<String>,
    pub tag_headers: Vec<http::HeaderName>,
    pub tag_index_size: usize,
    pub htcp: Option<HtcpConfig>,
    pub bus: Option<BusConfig>,
}

/// Where the access log goes (`[log] access`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Stdout,
    File(PathBuf),
}

/// The access log's line format (`[log] format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// NCSA combined, then the cache status and the duration in milliseconds.
    Combined,
    /// One JSON object per line.
    Json,
}

/// `[log]`, validated.
#[derive(Debug, Clone)]
pub struct AccessLogConfig {
    pub destination: Destination,
    pub format: Format,
}

/// What to do with objects cached before a start, until the purge bus has caught up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatchUpPolicy {
    /// The request waits (up to a timeout, then revalidates).
    Wait,
    /// The object is revalidated with the origin before it is served.
    Revalidate,
}

/// `[cache.disk]`, validated.
#[derive(Debug, Clone)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub size: u64,
    pub max_object_size: u64,
    /// Store an object on its N-th miss (1: the first).
    pub min_uses: u32,
    /// Without a purge bus: revalidate objects found at start before serving them.
    pub revalidate_after_restart: bool,
    /// `[cache] max_variants`: most variants of one URL indexed.
    pub max_variants: usize,
}

/// What bounds a client connection (`[server]` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections open at once; the next one is answered 503 and closed.
    pub max_connections: usize,
    /// Connections one client (an IPv4 address or an IPv6 /64) may hold open to the proxy's
    /// listeners; `None`: no limit.
    pub max_per_client: Option<usize>,
    /// How long a connection may wait for the first byte of its next request.
    pub idle_timeout: Duration,
    /// How long a request head may take from its first byte to its blank line.
    pub header_timeout: Duration,
    /// How long a response write may wait for the client to accept more bytes.
    pub send_timeout: Duration,
    /// Most bytes a request head may have before it is refused with 431 here; heads under it
    /// reach [`crate::proxy::guard`], which applies the exact 414/431 limits.
    pub max_head_bytes: usize,
    /// HTTP/2 requests a client may cancel before their answer began or within a second, per
    /// minute and connection (`[server.tls] h2_max_rapid_resets`); `None`: no limit.
    pub h2_max_rapid_resets: Option<usize>,
}

/// Size limits on a request head (`[server] max_uri_bytes`, `max_header_bytes`,
/// `max_headers`) and on the body it declares or sends (`max_body_bytes`), applied by
/// `proxy::guard`.
#[derive(Debug, Clone, Copy)]
pub struct HeadLimits {
    pub max_uri_bytes: usize,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    /// `None`: no limit.
    pub max_body_bytes: Option<u64>,
}

/// `[purge.htcp]`, validated: what the HTCP receiver listens on and accepts.
#[derive(Debug, Clone)]
pub struct HtcpConfig {
    pub listen: SocketAddr,
    pub allow: Vec<IpNet>,
    pub multicast_groups: Vec<Ipv4Addr>,
    /// The interface to join the groups on; `None`: the listen address when it is a unicast
    /// one, else the kernel's choice.
    pub multicast_interface: Option<Ipv4Addr>,
    pub host_regex: Option<Regex>,
}

/// `[purge.bus] max_queued`'s default: about 25 MB of queued purges.
pub const BUS_MAX_QUEUED: usize = 100_000;

/// `[purge.bus]`, validated.
#[derive(Debug, Clone)]
pub struct BusConfig {
    pub servers: Vec<String>,
    pub stream: String,
    pub subject: String,
    pub node: String,
    pub retention: Duration,
    pub catch_up: CatchUpPolicy,
    pub catch_up_timeout: Duration,
    pub publish_htcp: bool,
    /// Most purges queued for publishing; past it the others are told to revalidate instead.
    pub max_queued: usize,
    /// Where the queue of unpublished purges is kept; `None`: the disk tier's directory, if any.
    pub outbox_dir: Option<std::path::PathBuf>,
    pub auth: BusAuth,
    pub tls: BusTls,
}

/// How a node proves who it is to nats-server. The files are named here and read at connect
/// time, so no secret sits in the config value (which is logged and compared on reload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusAuth {
    /// Nothing, or a user and password inside a server URL.
    None,
    CredentialsFile(std::path::PathBuf),
    NkeySeedFile(std::path::PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BusTls {
    /// With a CA, TLS is required and the server is checked against it.
    pub ca: Option<std::path::PathBuf>,
    /// A client certificate chain and its key.
    pub client: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted key path, e.g. `cache.ttl_cap` or `origin[1].addresses[0]`.
    pub key: String,
    /// 1-based line of the key in the file, when it appears there.
    pub line: Option<usize>,
    pub reason: String,
}

/// Every problem found in one file, reported together.
#[derive(Debug, Clone)]
pub struct ConfigErrors {
    pub source: String,
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            match e.line {
                Some(line) => write!(f, "{}:{}: {}: {}", self.source, line, e.key, e.reason)?,
                None => write!(f, "{}: {}: {}", self.source, e.key, e.reason)?,
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl ConfigErrors {
    /// A problem found once the file was valid (a path the process cannot use), named by its
    /// key (`["cache", "disk", "path"]`) and that key's line in the file at `path`.
    pub fn at_key(path: &Path, keys: &[&str], reason: String) -> ConfigErrors {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        ConfigErrors {
            source: path.display().to_string(),
            errors: vec![ConfigError {
                key: keys.join("."),
                line: validate::line_of_key(&text, keys),
                reason,
            }],
        }
    }
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let source = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
            source: source.clone(),
            errors: vec![ConfigError {
                key: "(file)".into(),
                line: None,
                reason: format!("cannot read: {e}"),
            }],
        })?;
        Config::parse(&text, &source)
    }

    /// Parses and validates configuration text; `source` names it in error messages.
    pub fn parse(text: &str, source: &str) -> Result<Config, ConfigErrors> {
        validate::parse(text).map_err(|errors| ConfigErrors {
            source: source.to_string(),
            errors,
        })
    }

    /// The configuration an empty file gives.
    pub fn defaults() -> Config {
        match validate::parse("") {
            Ok(config) => config,
            // The defaults are constants checked by the unit test `empty_file_is_valid`.
            Err(errors) => unreachable!("built-in defaults are invalid: {errors:?}"),
        }
    }
}
