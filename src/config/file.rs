//! The configuration file as an operator writes it: TOML mapped by serde, with every field's
//! unit and default documented. Nothing here is validated beyond its TOML type; `validate.rs`
//! turns this into the typed [`super::Config`].

use serde::Deserialize;

/// The whole file. Every table is optional; an empty file is a proxy on 127.0.0.1:8080 in
/// front of an origin on 127.0.0.1:8081.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub server: ServerFile,
    /// Origin pools. The first pool whose `hosts` lists the request's host serves it; a pool
    /// with no `hosts` is the default. Default: one pool `origin` at 127.0.0.1:8081.
    #[serde(default)]
    pub origin: Vec<OriginFile>,
    #[serde(default)]
    pub cache: CacheFile,
    #[serde(default)]
    pub purge: PurgeFile,
    #[serde(default)]
    pub log: LogFile,
    /// Edge policy, in order (see `config/skua.toml`).
    #[serde(default)]
    pub rule: Vec<RuleFile>,
}

/// `[[rule]]`: conditions (`match`, all of which must hold) and actions. For each kind of
/// action the first matching rule that has one applies.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [[rule]] table")]
pub struct RuleFile {
    /// Shown by `skua check --explain` and in logs. Default `rule[N]`.
    #[serde(default)]
    pub name: String,
    /// The conditions; none: every request.
    #[serde(default, rename = "match")]
    pub when: MatchFile,
    /// An `[[origin]]` pool's name: where this request's misses go.
    pub route: Option<String>,
    /// Never cached: neither served from nor stored in the cache.
    #[serde(default)]
    pub pass: bool,
    /// A freshness lifetime (duration) that replaces the origin's, for responses the cache may
    /// store at all.
    pub ttl: Option<String>,
    /// With `ttl`: how long a stale copy may be served while it is refetched, or when the origin
    /// fails (duration).
    pub grace: Option<String>,
    /// Answer with this status and body; the origin is never asked.
    pub deny: Option<DenyFile>,
    /// Answer with a redirect; the origin is never asked.
    pub redirect: Option<RedirectFile>,
    /// Edits to the request the origin receives.
    pub request_headers: Option<HeaderEditsFile>,
    /// Edits to the response the client receives.
    pub response_headers: Option<HeaderEditsFile>,
    /// Path normalisation before the cache key is computed (`"mediawiki"`).
    pub normalize_path: Option<String>,
    /// Query normalisation before the cache key is computed.
    pub normalize_query: Option<QueryFile>,
    /// A token bucket per client (an IPv4 address or an IPv6 /64).
    pub rate_limit: Option<RateLimitFile>,
    /// The largest request body these requests may send, in bytes, in place of `[server]
    /// max_body_bytes` (above or below it); 0: no limit.
    pub max_body_bytes: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "a table of conditions, e.g. { path = [\"/w/api.php\"] }"
)]
pub struct MatchFile {
    /// Any of these hosts (`name`, `*.parent` for every name under it, `*`).
    pub host: Vec<String>,
    /// Any of these exact paths (without the query).
    pub path: Vec<String>,
    /// Any path starting with one of these.
    pub path_prefix: Vec<String>,
    /// Any path one of these regular expressions matches.
    pub path_regex: Vec<String>,
    /// Any of these methods.
    pub method: Vec<String>,
    /// Query parameters and a regular expression each value must match ("" : present).
    pub query: std::collections::BTreeMap<String, String>,
    /// Request header fields and a regular expression a value must match ("" : present).
    pub header: std::collections::BTreeMap<String, String>,
    /// Cookies and a regular expression the value must match ("" : present).
    pub cookie: std::collections::BTreeMap<String, String>,
    /// Any of these client networks (CIDR or address).
    pub client: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a table, e.g. { status = 403, body = \"...\" }"
)]
pub struct DenyFile {
    /// 400 to 599.
    pub status: u16,
    /// Plain text; default: the status's reason phrase.
    #[serde(default)]
    pub body: String,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a table, e.g. { status = 301, location = \"https://{host}{path}{query}\" }"
)]
pub struct RedirectFile {
    /// 301, 302, 303, 307 or 308. Default 301.
    #[serde(default = "default_redirect_status")]
    pub status: u16,
    /// An absolute URL or a path, with `{host}`, `{path}`, `{query}` (with its `?`, or
    /// empty) and `{1}`..`{9}` (the groups of the rule's `path_regex`) filled in.
    pub location: String,
}

fn default_redirect_status() -> u16 {
    301
}

#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "a table, e.g. { set = { \"X-A\" = \"1\" }, remove = [\"X-B\"] }"
)]
pub struct HeaderEditsFile {
    /// Fields set to a value, replacing any already there.
    pub set: std::collections::BTreeMap<String, String>,
    /// Fields added after any already there.
    pub append: std::collections::BTreeMap<String, String>,
    /// Fields removed.
    pub remove: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "a table, e.g. { drop = [\"utm_*\"], sort = true }"
)]
pub struct QueryFile {
    /// Parameters dropped: names, or a prefix ending in `*` (`utm_*`).
    pub drop: Vec<String>,
    /// Sort the parameters that stay (by name, then value; stable for repeated names).
    pub sort: bool,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a table, e.g. { per_second = 10, burst = 20 }"
)]
pub struct RateLimitFile {
    /// Requests per second a client may make, on average.
    pub per_second: f64,
    /// Requests a client may make at once after being idle. Default: `per_second`, at least 1.
    pub burst: Option<u32>,
    /// Only requests that go to the origin (misses and passes) take from the bucket; a hit
    /// is answered whatever the rate, as Wikimedia's edge limits misses and passes only.
    /// Default false: every request the rule matches counts.
    #[serde(default)]
    pub origin_only: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a [log] table")]
pub struct LogFile {
    /// Access log: "stdout", a file path, or "" (the default) for none.
    pub access: String,
    /// "combined" (NCSA combined plus cache status and milliseconds; the default) or "json".
    pub format: String,
}

impl Default for LogFile {
    fn default() -> Self {
        LogFile {
            access: String::new(),
            format: "combined".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a [server] table")]
pub struct ServerFile {
    /// Addresses the proxy listens on (`ip:port`). Default `["127.0.0.1:8080"]`.
    pub listen: Vec<String>,
    /// Addresses where every connection opens with a PROXY protocol header (HAProxy's,
    /// version 1 or 2) from a balancer in `trusted_proxies`, then plain HTTP: the header's
    /// source is the client's address. A connection from any other peer, or without a valid
    /// header, is closed. Default none.
    pub proxy_protocol_listen: Vec<String>,
    /// Listen with `SO_REUSEPORT` (the proxy and admin addresses): several processes may then
    /// listen on one port, and one that holds the port bound keeps it reserved for Skua
    /// across restarts. Default false: a taken address is an error at start.
    pub reuse_port: bool,
    /// Worker threads for the proxy service. Default 2.
    pub threads: usize,
    /// Address of the admin endpoint (`/stats`, `/metrics`, `/healthz`). Default
    /// `127.0.0.1:8082`; the empty string turns it off.
    pub admin: String,
    /// Name of this cache in the `Cache-Status` response header (RFC 9211). Default `skua`.
    pub name: String,
    /// How long a stopping server keeps serving open connections (duration). Default `5s`.
    pub shutdown_grace: String,
    /// Unix socket over which a new Skua takes the listening sockets of a running one
    /// (`skua serve --upgrade`, then SIGQUIT to the old process). Default
    /// `/tmp/skua-upgrade.sock`.
    pub upgrade_sock: String,
    /// Longest request target in bytes; longer ones get 414. Default 8192.
    pub max_uri_bytes: usize,
    /// Most bytes of request header fields; more gets 431. Default 32768.
    pub max_header_bytes: usize,
    /// Most request header fields; more gets 431. Default 100.
    pub max_headers: usize,
    /// Largest request body in bytes: a larger one, by its `Content-Length` or as it arrives,
    /// gets 413 and never reaches an origin whole. 0: no limit. Default 104857600 (100 MiB,
    /// MediaWiki's default upload limit).
    pub max_body_bytes: u64,
    /// Hosts this cache serves (exact, case-insensitive, port ignored); any other host gets
    /// 421 without touching the cache. Default empty: every host.
    pub hosts: Vec<String>,
    /// Networks (CIDR) of proxies in front of Skua (TLS terminators, load balancers) whose
    /// `X-Forwarded-For` and `X-Forwarded-Proto` are passed on; from anyone else they are
    /// dropped. Default none.
    pub trusted_proxies: Vec<String>,
    /// How long an idle keep-alive connection waits for its next request (duration). Default
    /// `60s`.
    pub keepalive_timeout: String,
    /// Longest wait for the next bytes of a request body (duration). Default `30s`.
    pub body_timeout: String,
    /// The slowest a request body may arrive on average, in bytes per second: from its first
    /// bytes, a body must be whole within `body_timeout` plus a second per `body_min_rate`
    /// bytes received (Apache's `mod_reqtimeout` `MinRate`); a slower one gets 408 and is
    /// closed. `body_timeout` alone restarts at every byte, so a client trickling one a
    /// minute held an origin connection (a PHP worker) as long as it liked. Default 500;
    /// 0: no minimum.
    pub body_min_rate: u64,
    /// Longest time from the first byte of a request head to its end (duration); a slower
    /// client gets 408 and is closed. Default `10s`.
    pub header_timeout: String,
    /// Longest a client may take to accept any more bytes of a response being sent (duration):
    /// one that stops reading is closed. Default `60s`.
    pub send_timeout: String,
    /// Client connections open at once; the next is answered 503 and closed. Default 10000.
    pub max_connections: usize,
    /// Connections one client (an IPv4 address, or an IPv6 /64) may hold open to the proxy's
    /// listeners at once; the next is answered 503 and closed, so that one client cannot take
    /// every place `max_connections` allows (nginx's `limit_conn`). Connections from
    /// `trusted_proxies` are not counted, except on a PROXY protocol listener, where the
    /// client its header names is. Default 1000; 0: no limit.
    pub max_connections_per_client: usize,
    /// Request headers removed before a request goes to an origin, besides the built-in list
    /// (`X-Forwarded-Host`, `X-Original-URL`, `X-Rewrite-URL`, `Forwarded`, `Proxy`, ...).
    pub strip_headers: Vec<String>,
    /// Send `Server-Timing: cache;desc="<X-Cache-Status>", host;desc="<name>"` on every
    /// answer, as Wikimedia's edge does, for browsers' developer tools and real-user
    /// monitoring (MediaWiki's NavigationTiming reads it). Default false.
    pub server_timing: bool,
    /// An HTML page (a file's path) sent in place of Skua's one-line text when it answers 5xx
    /// itself: an origin down or timing out (502, 504), every origin busy (503), a forwarding
    /// loop (508). `{{status}}`, `{{reason}}`, `{{message}}`, `{{node}}` (`name`), `{{time}}`,
    /// `{{client}}` (the client's address) and `{{request_id}}` (see `request_id`) are filled
    /// in; nothing the request says is.
    /// Read at start and on reload (at most 256 KiB). `config/error.html` is a starting
    /// point. Default "" (plain text).
    pub error_page: String,
    /// Give each request that goes to an origin an id in `X-Request-Id` (a random UUID, or a
    /// trusted proxy's own), logged in the JSON access log and shown on the error page, as
    /// Wikimedia's edge does for MediaWiki (`$wgAllowExternalReqID`). A client's own
    /// `X-Request-Id` is never passed on. Default true.
    pub request_id: bool,
    /// HTTPS listeners (`[server.tls]`). Default none.
    pub tls: Option<TlsFile>,
}

/// `[server.tls]`: Skua terminates TLS (1.2 and 1.3 only) on these addresses.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [server.tls] table")]
pub struct TlsFile {
    /// Addresses for HTTPS (`ip:port`). At least one, here or in `proxy_protocol_listen`.
    #[serde(default)]
    pub listen: Vec<String>,
    /// Addresses for HTTPS where every connection opens with a PROXY protocol header from a
    /// balancer in `[server] trusted_proxies`, then the TLS handshake (a balancer that passes
    /// TLS through). Default none.
    #[serde(default)]
    pub proxy_protocol_listen: Vec<String>,
    /// Certificates, chosen by the name a client asks for (SNI). Required, at least one.
    pub certificate: Vec<CertificateFile>,
    /// Longest time from a new connection to the end of its TLS handshake (duration); a
    /// client that sends nothing, or half a handshake, is closed. Default `10s`.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout: String,
    /// Offer HTTP/2 (ALPN `h2`) besides HTTP/1.1. Default true.
    #[serde(default = "default_true")]
    pub http2: bool,
    /// HTTP/2: most streams a client may have open at once on one connection. Default 100.
    #[serde(default = "default_h2_streams")]
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2: streams a client may reset before their request is read, per connection, before
    /// the connection is closed (the 2023 "rapid reset" attack). Default 20.
    #[serde(default = "default_h2_resets")]
    pub h2_max_pending_resets: usize,
    /// HTTP/2: requests a client may cancel (reset their stream) after Skua took them up,
    /// before their answer began or within a second, per minute and connection; past it the
    /// connection is closed (GOAWAY `ENHANCE_YOUR_CALM`). A cancelled request's origin work
    /// goes on (an origin does not stop a page it is rendering when its client leaves), so
    /// without a bound one connection could keep any number of requests working at the
    /// origins, whatever `h2_max_concurrent_streams` says. 0: no limit. Default 100 (as
    /// Varnish's `h2_rapid_reset_limit`).
    #[serde(default = "default_h2_rapid_resets")]
    pub h2_max_rapid_resets: usize,
    /// Hosts whose plain-HTTP requests are redirected to https (301 for GET and HEAD, 308 for
    /// other methods, to the same path and query; PURGE is never redirected). Exact names,
    /// `*.example.org` for its subdomains, or `"*"` for every host. Default none.
    #[serde(default)]
    pub redirect_http: Vec<String>,
}

/// `[[server.tls.certificate]]`: one certificate chain and its private key, PEM files.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [[server.tls.certificate]] table")]
pub struct CertificateFile {
    /// The certificate, then its intermediates (PEM). Required.
    pub chain: String,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1). Required.
    pub key: String,
    /// Names (SNI) this certificate is chosen for; each must be one the certificate covers.
    /// Default: every DNS name in the certificate, wildcards included.
    #[serde(default)]
    pub names: Option<Vec<String>>,
    /// The certificate for clients that send no name, or one no certificate covers. Default:
    /// the first certificate.
    #[serde(default)]
    pub default: bool,
}

fn default_handshake_timeout() -> String {
    "10s".into()
}

fn default_true() -> bool {
    true
}

/// `[server.tls] h2_max_concurrent_streams` unless set, and for a plain listener's HTTP/2
/// without `[server.tls]`.
pub const H2_DEFAULT_STREAMS: u32 = 100;
/// `[server.tls] h2_max_pending_resets` unless set (see [`H2_DEFAULT_STREAMS`]).
pub const H2_DEFAULT_PENDING_RESETS: usize = 20;
/// `[server.tls] h2_max_rapid_resets` unless set (see [`H2_DEFAULT_STREAMS`]).
pub const H2_DEFAULT_RAPID_RESETS: usize = 100;

fn default_h2_streams() -> u32 {
    H2_DEFAULT_STREAMS
}

fn default_h2_resets() -> usize {
    H2_DEFAULT_PENDING_RESETS
}

fn default_h2_rapid_resets() -> usize {
    H2_DEFAULT_RAPID_RESETS
}

impl Default for ServerFile {
    fn default() -> Self {
        ServerFile {
            listen: vec!["127.0.0.1:8080".into()],
            proxy_protocol_listen: Vec::new(),
            reuse_port: false,
            threads: 2,
            admin: "127.0.0.1:8082".into(),
            name: "skua".into(),
            shutdown_grace: "5s".into(),
            upgrade_sock: "/tmp/skua-upgrade.sock".into(),
            max_uri_bytes: 8192,
            max_header_bytes: 32768,
            max_headers: 100,
            max_body_bytes: 100 << 20,
            hosts: Vec::new(),
            trusted_proxies: Vec::new(),
            strip_headers: Vec::new(),
            keepalive_timeout: "60s".into(),
            body_timeout: "30s".into(),
            body_min_rate: 500,
            header_timeout: "10s".into(),
            send_timeout: "60s".into(),
            max_connections: 10_000,
            max_connections_per_client: 1000,
            server_timing: false,
            error_page: String::new(),
            request_id: true,
            tls: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an [[origin]] table")]
pub struct OriginFile {
    /// Pool name, used in logs and metric labels. Required, unique.
    pub name: String,
    /// Origin servers (`ip:port`, or `name:port` for a DNS name, every address of which is an
    /// origin), balanced round robin. Required, at least one.
    pub addresses: Vec<String>,
    /// How often the DNS names in `addresses` are looked up again (duration); a name that
    /// fails to resolve keeps the addresses it had. Default `10s`.
    #[serde(default = "default_resolve_interval")]
    pub resolve_interval: String,
    /// Hosts this pool serves (exact, case-insensitive). Empty: the default pool.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Time to establish a TCP connection to an origin (duration). Default `2s`.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: String,
    /// Longest wait for the next bytes of an origin's response (duration). Default `30s`.
    #[serde(default = "default_read_timeout")]
    pub read_timeout: String,
    #[serde(default)]
    pub health_check: HealthCheckFile,
    /// How a miss picks an origin: `"round_robin"` (the default), or `"consistent"`: by a
    /// consistent hash of the cache key, so that each object lives on one origin (a pool of
    /// Skua backends behind a Skua frontend); a dead origin's keys move to the next on the
    /// ring and no others move.
    #[serde(default = "default_balance")]
    pub balance: String,
    /// Protocols a client may switch this pool's connections to with `Upgrade`, e.g.
    /// `["websocket"]`. Default none: `Upgrade` is removed from requests, and a
    /// `101 Switching Protocols` from an origin is refused with 502.
    #[serde(default)]
    pub upgrade: Vec<String>,
    /// HTTPS to this pool's origins (`[origin.tls]`). Default: plain HTTP.
    #[serde(default)]
    pub tls: Option<OriginTlsFile>,
    /// Most requests in flight to each origin of this pool (its PHP workers, say): an origin
    /// at its limit is passed over for another with room; when none has room, a request waits
    /// up to `connect_timeout`, then is answered stale where the object allows it, else 503.
    /// Health checks are not counted. Default 0: no limit.
    #[serde(default)]
    pub max_connections: usize,
    /// How long an origin that failed a request (refused or dropped the connection, or said
    /// nothing for `read_timeout`) is passed over while another origin of the pool is healthy
    /// (nginx's `fail_timeout`) (duration). `"0s"`: only the health checks take an origin out.
    /// Default `10s`.
    #[serde(default = "default_fail_timeout")]
    pub fail_timeout: String,
    /// Statuses (5xx) on which a GET or HEAD is sent once more, to another origin of the pool
    /// that passes its health checks (with none, the answer goes on), before its answer goes
    /// to the client (nginx's `proxy_next_upstream http_503`). Default
    /// `[503]`, as Wikimedia's edge retries a 503 once; `[]` passes every answer on.
    #[serde(default = "default_retry_statuses")]
    pub retry_statuses: Vec<u16>,
}

fn default_resolve_interval() -> String {
    "10s".into()
}

fn default_fail_timeout() -> String {
    "10s".into()
}

fn default_retry_statuses() -> Vec<u16> {
    vec![503]
}

/// `[origin.tls]`: the pool's origins speak HTTPS. A certificate that does not verify is a
/// 502 (counted in `skua_origin_errors_total`), never a fall-back to plain HTTP.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an [origin.tls] table")]
pub struct OriginTlsFile {
    /// The name sent (SNI) and verified in the origin's certificate. Default: the request's
    /// host (and the health check's `host` for checks).
    #[serde(default)]
    pub name: String,
    /// Verify the origin's certificate chain and name. Default true; turn it off only for an
    /// origin whose certificate cannot be verified, knowing that anyone on the path can then
    /// answer for it.
    #[serde(default = "default_true")]
    pub verify: bool,
    /// PEM file of the authorities the origin's certificate is verified against. Default: the
    /// system's roots (`SSL_CERT_FILE` / `SSL_CERT_DIR` are honoured).
    #[serde(default)]
    pub ca_file: String,
    /// Offer HTTP/2 to the origin (ALPN); it is used when the origin chooses it. Default true.
    #[serde(default = "default_true")]
    pub http2: bool,
}

fn default_balance() -> String {
    "round_robin".into()
}

fn default_connect_timeout() -> String {
    "2s".into()
}
fn default_read_timeout() -> String {
    "30s".into()
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "an [origin.health_check] table"
)]
pub struct HealthCheckFile {
    /// Run the check. Default true. Without it every origin counts as healthy.
    pub enabled: bool,
    /// Path of the `GET` the check sends; any 2xx or 3xx is healthy. Default `/`.
    pub path: String,
    /// `Host` header of the check. Default `localhost`.
    pub host: String,
    /// Time between checks (duration). Default `2s`.
    pub interval: String,
    /// Failed checks in a row before an origin is taken out. Default 1.
    pub failures: usize,
    /// Good checks in a row before it is put back. Default 1.
    pub successes: usize,
}

impl Default for HealthCheckFile {
    fn default() -> Self {
        HealthCheckFile {
            enabled: true,
            path: "/".into(),
            host: "localhost".into(),
            interval: "2s".into(),
            failures: 1,
            successes: 1,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a [cache] table")]
pub struct CacheFile {
    /// Memory tier capacity in bytes (headers and bodies). Default 268435456 (256 MiB).
    pub memory_size: u64,
    /// Largest object stored, in bytes; larger responses stream through unstored.
    /// Default 8388608 (8 MiB), or `memory_size` when that is smaller.
    pub max_object_size: Option<u64>,
    /// Bytes of response bodies that fills in progress (misses being stored) hold, all
    /// together: a fill keeps its body until it ends, so clients asking at once for many large
    /// objects not yet stored would otherwise make Skua hold their sum. A fill that would go
    /// past it streams on unstored. Default 268435456 (256 MiB), or the largest
    /// `max_object_size` (memory or disk) when that is larger; at least that largest size.
    pub fill_memory: Option<u64>,
    /// No object stays fresh longer than this, whatever the origin says (duration). Default `1d`.
    pub ttl_cap: String,
    /// No 404 stays fresh longer than this, whatever the origin says (duration): a page
    /// created since is found even if its creation's purge was lost (Wikimedia's edge caps
    /// 404s at 10 minutes). Default `10m`.
    pub ttl_cap_404: String,
    /// Lifetimes of a minute or more are shortened by a random fraction up to this, so that
    /// objects stored together (after a restart, a purge of many pages) do not all expire,
    /// and go back to the origin, together (Wikimedia's edge cuts them by up to 5%).
    /// 0 to 0.5; default 0.05; 0 keeps every lifetime as the origin gives it.
    pub ttl_jitter: f64,
    /// Stale-while-revalidate and stale-if-error window for responses that name none
    /// (duration). Default `0s`.
    pub default_grace: String,
    /// How stale a copy may be served when the origin fails (cannot be reached, times out,
    /// hangs up before answering), for responses that name no `stale-if-error` and do not
    /// forbid stale use (RFC 9111 §4.2.4, RFC 5861 §4) (duration). Default `5m`.
    pub stale_if_error: String,
    /// Store 5xx responses from the origin when they say how long they are fresh, as RFC 9111
    /// allows. Default true; false never stores an origin's 5xx.
    pub store_server_errors: bool,
    /// Encodings Skua compresses compressible responses (text, JSON, SVG...) to before
    /// storing them, when the origin sent them uncompressed: `"br"` for clients that take
    /// brotli, `"gzip"` for the rest. Default `["br", "gzip"]`; `[]` stores what the origin
    /// sends.
    pub compress: Vec<String>,
    /// Honour `must-revalidate`, `proxy-revalidate` and `s-maxage` as RFC 9111 §4.2.4 asks: no
    /// default grace for such responses. `false` serves MediaWiki pages stale on origin errors,
    /// as Wikimedia's edge does. Default true.
    pub honor_must_revalidate: bool,
    /// Cache responses without explicit freshness for 10% of their Last-Modified age
    /// (RFC 9111 §4.2.2). Default true.
    pub heuristic_freshness: bool,
    /// Upper bound of a heuristic lifetime (duration). Default `1d`.
    pub heuristic_max: String,
    /// How long a fetch may go unanswered before one of the requests waiting for the same
    /// object fetches too (duration); the others keep waiting, up to the slowest pool's
    /// `connect_timeout` + `read_timeout` beyond it, then fetch for themselves. Default `10s`.
    pub lock_timeout: String,
    /// Who may drop a cached page by sending an unsafe request (POST, PUT, DELETE...) that the
    /// origin answers with success (RFC 9111 §4.4): `"any"` client (the default, as the RFC
    /// asks), `"purgers"` (clients in `[purge] allow`), or `"session"` (requests carrying a
    /// cookie that `[cache.bypass] cookies` matches: a logged-in editor).
    pub invalidate_on_unsafe: String,
    /// `Cache-Control` sent to clients in place of one that lets shared caches keep the
    /// response (`s-maxage` above 0), since caches beyond Skua (a corporate proxy, a second
    /// CDN) never see its purges. Wikimedia's edge sends `"private, s-maxage=0, max-age=0,
    /// must-revalidate"`. Applied after Skua has used the origin's header, never to what it
    /// stores. Default "" (the origin's header is passed on).
    pub downstream_cache_control: String,
    /// Cookie names the cache key accounts for: on a request that may use the cache, only
    /// these cookies are sent to the origin, and a response with `Vary: Cookie` is stored
    /// once per combination of their values. Every other cookie stays between the browser and
    /// Skua, so an origin that reflects one (a preference, a tracking id) cannot share one
    /// reader's value with everyone. Requests that pass (`[cache.bypass]`) keep all their
    /// cookies. Default `[]`.
    pub vary_cookies: Vec<String>,
    /// Most variants of one URL kept (a response's `Vary`: each distinct value of a header it
    /// names is a copy); storing one more replaces the URL's oldest, so that a client sending
    /// a new `User-Agent` or `Accept-Language` with every request cannot fill the tier with
    /// copies of one page or make its hits search through them (Traffic Server's `max_alts`).
    /// Default 32.
    pub max_variants: usize,
    #[serde(default)]
    pub bypass: BypassFile,
    /// Hosts that name the same site, mapped to the one the cache key uses, e.g.
    /// `{ "wiki.example" = "www.wiki.example" }`: their requests share objects and one purge
    /// covers them. Default none.
    #[serde(default)]
    pub host_aliases: std::collections::BTreeMap<String, String>,
    /// The disk tier. Off unless `path` is set.
    #[serde(default)]
    pub disk: DiskFile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a [cache.disk] table")]
pub struct DiskFile {
    /// Directory of the disk tier; created if missing. Empty (the default): no disk tier.
    pub path: String,
    /// Disk tier capacity in bytes (bodies and metadata). Default 1073741824 (1 GiB).
    pub size: u64,
    /// Largest object stored on disk, in bytes. Default 67108864 (64 MiB), or `size` when
    /// that is smaller.
    pub max_object_size: Option<u64>,
    /// Store an object on disk on its N-th miss; 1 stores on the first while the tier has room
    /// and on the second recent one once it is full (`cache::disk::admission`). Default 1.
    pub min_uses: u32,
    /// What a node without a purge bus does with objects it finds on disk at start, which
    /// may have been purged while it was down: `"revalidate"` (the default: each is checked
    /// with the origin on first use, a 304 where it has not changed) or `"serve"` (trusted as
    /// they are, for origins that never purge). With a bus, `[purge.bus] catch_up` decides.
    pub after_restart: String,
}

impl Default for DiskFile {
    fn default() -> Self {
        DiskFile {
            path: String::new(),
            size: 1 << 30,
            max_object_size: None,
            min_uses: 1,
            after_restart: "revalidate".into(),
        }
    }
}

impl Default for CacheFile {
    fn default() -> Self {
        CacheFile {
            memory_size: 256 << 20,
            max_object_size: None,
            fill_memory: None,
            ttl_cap: "1d".into(),
            ttl_cap_404: "10m".into(),
            ttl_jitter: 0.05,
            default_grace: "0s".into(),
            stale_if_error: "5m".into(),
            store_server_errors: true,
            compress: vec!["br".into(), "gzip".into()],
            honor_must_revalidate: true,
            heuristic_freshness: true,
            heuristic_max: "1d".into(),
            lock_timeout: "10s".into(),
            invalidate_on_unsafe: "any".into(),
            downstream_cache_control: String::new(),
            vary_cookies: Vec::new(),
            max_variants: 32,
            bypass: BypassFile::default(),
            host_aliases: Default::default(),
            disk: DiskFile::default(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a [cache.bypass] table")]
pub struct BypassFile {
    /// Regexes matched against the whole `Cookie` request header; a match passes the request
    /// to the origin uncached. Default: MediaWiki's session and token cookies and its
    /// `UseCDNCache=false` opt-out.
    pub cookies: Vec<String>,
    /// Pass requests that carry `Authorization`. Default true.
    pub authorization: bool,
}

impl Default for BypassFile {
    fn default() -> Self {
        BypassFile {
            cookies: vec!["([sS]ession|Token)=".into(), "UseCDNCache=false".into()],
            authorization: true,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a [purge] table")]
pub struct PurgeFile {
    /// Networks (CIDR) allowed to send PURGE. Default loopback only.
    pub allow: Vec<String>,
    /// If set, an HTTP PURGE must also carry `Authorization: Bearer <token>`. Default empty.
    pub token: String,
    /// Response headers whose space-separated values tag an object for purge by tag.
    /// Default `["Surrogate-Key", "xkey"]`; `[]` turns tags off.
    pub tag_headers: Vec<String>,
    /// Most bytes the surrogate-key index may use (an estimate of its maps). When it is full,
    /// a tagged response is not stored (`skua_tag_index_refused_total`). Default 134217728
    /// (128 MiB, about a million tags on a million objects).
    pub tag_index_size: usize,
    /// The HTCP CLR receiver (MediaWiki's `$wgHTCPRouting`, Squid's `htcp_port`).
    pub htcp: HtcpFile,
    /// The fleet's purge bus on NATS JetStream.
    pub bus: BusFile,
}

impl Default for PurgeFile {
    fn default() -> Self {
        PurgeFile {
            allow: vec!["127.0.0.0/8".into(), "::1/128".into()],
            token: String::new(),
            tag_headers: vec!["Surrogate-Key".into(), "xkey".into()],
            tag_index_size: 128 << 20,
            htcp: HtcpFile::default(),
            bus: BusFile::default(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a [purge.htcp] table")]
pub struct HtcpFile {
    /// UDP address to receive CLR packets on, e.g. "0.0.0.0:4827". Empty (the default): off.
    pub listen: String,
    /// Networks (CIDR) whose packets are applied. Default loopback only.
    pub allow: Vec<String>,
    /// IPv4 multicast groups to join, e.g. ["239.128.0.112"]. Default none.
    pub multicast_groups: Vec<String>,
    /// IPv4 address of the interface to join `multicast_groups` on. Default: the listen
    /// address when it is a unicast address, else the interface the kernel routes the group to.
    /// To receive a group's packets, listen on the group address or on 0.0.0.0.
    pub multicast_interface: String,
    /// Only purge URLs whose whole host matches this regex (it is anchored at both ends).
    /// Empty (the default): every host.
    pub host_regex: String,
}

impl Default for HtcpFile {
    fn default() -> Self {
        HtcpFile {
            listen: String::new(),
            allow: vec!["127.0.0.0/8".into(), "::1/128".into()],
            multicast_groups: Vec::new(),
            multicast_interface: String::new(),
            host_regex: String::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a [purge.bus] table")]
pub struct BusFile {
    /// NATS server URLs, e.g. ["nats://127.0.0.1:4222"]. Empty (the default): no bus; each
    /// node only applies the purges sent to it, and a missed purge lasts up to the TTL cap.
    pub servers: Vec<String>,
    /// JetStream stream holding the purges; created if missing. Default `SKUA_PURGE`.
    pub stream: String,
    /// Subject purges are published on. Default `skua.purge`.
    pub subject: String,
    /// This node's id: unique in the fleet, stable across restarts (it names the node's
    /// durable consumer). Required with `servers`.
    pub node: String,
    /// How long the stream keeps purges (duration). Default: `cache.ttl_cap`, after which
    /// every object a purge could name has expired anyway.
    pub retention: String,
    /// What a starting node does with objects cached before it started, until it has applied
    /// the purges it missed: `"wait"` (the default: requests for them wait for the catch-up,
    /// at most `catch_up_timeout`, then revalidate) or `"revalidate"` (serve them only after
    /// revalidating with the origin).
    pub catch_up: String,
    /// Longest a request waits for the catch-up (duration). Default `10s`.
    pub catch_up_timeout: String,
    /// Publish purges received over HTCP too. Default true; turn it off where HTCP multicast
    /// already reaches every node.
    pub publish_htcp: bool,
    /// Most purges queued for publishing while the bus is down. Default 100,000 (about 25 MB
    /// of memory, and as much beside the disk tier). Past it a purge is not queued, and the
    /// other nodes are told to revalidate everything they cached before then instead.
    pub max_queued: usize,
    /// Directory the queue of purges not yet published is kept in (`bus-outbox.<node>.*`), so
    /// that a node stopped or killed while nats-server is unreachable publishes them when it
    /// starts again. Default: the disk tier's directory; a memory-only node without it keeps
    /// the queue in memory only.
    pub outbox_dir: String,
    /// A NATS credentials file (user JWT and NKey seed, as `nsc` writes it). Default none.
    pub credentials_file: String,
    /// A file holding a user NKey seed (`SU...`), for a server that lists the user's public
    /// NKey. Default none; not together with `credentials_file`.
    pub nkey_seed_file: String,
    /// PEM file of the CA that signed nats-server's certificate: the bus then connects over
    /// TLS only, and checks the server against it. Default none: the system's roots, TLS only
    /// when the server asks for it.
    pub tls_ca: String,
    /// PEM certificate chain and key this node presents to a server that asks for client
    /// certificates (both or neither). Default none.
    pub tls_cert: String,
    pub tls_key: String,
}

impl Default for BusFile {
    fn default() -> Self {
        BusFile {
            servers: Vec::new(),
            stream: "SKUA_PURGE".into(),
            subject: "skua.purge".into(),
            node: String::new(),
            retention: String::new(),
            catch_up: "wait".into(),
            catch_up_timeout: "10s".into(),
            publish_htcp: true,
            max_queued: super::BUS_MAX_QUEUED,
            outbox_dir: String::new(),
            credentials_file: String::new(),
            nkey_seed_file: String::new(),
            tls_ca: String::new(),
            tls_cert: String::new(),
            tls_key: String::new(),
        }
    }
}
