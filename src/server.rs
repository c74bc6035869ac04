//! Assembles a pingora server from a validated [`Config`]: the proxy service, the admin
//! service and the origin health checks. `serve` and `demo` both start here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::signal::unix::{signal, SignalKind};

use anyhow::Context;
use pingora::listeners::{L4BufferSettings, ListenerConfig, TcpSocketOptions};
use pingora::proxy::HttpProxy;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;
use pingora::services::background::background_service;
use pingora::services::listening::Service;

use crate::admin::{Admin, Node};
use crate::cache::disk::DiskTier;
use crate::cache::tags::TagIndex;
use crate::cache::Store;
use crate::config::Config;
use crate::metrics::history::{History, Sampler};
use crate::metrics::Metrics;
use crate::proxy::connection::ConnectionGate;
use crate::proxy::fast::FrontDoor;
use crate::proxy::tls::TlsTerminator;
use crate::proxy::{CachingProxy, ProxyState};
use crate::purge::bus::{Bus, BusService};
use crate::purge::handover::{self, HandoverWatch, Inbox, InboxService};
use crate::purge::receiver::HtcpReceiver;
use crate::upstream::{HealthChecks, Pools, SharedPools};
use arc_swap::ArcSwap;

/// A server ready to run, plus the state its services share.
pub struct Built {
    pub server: Server,
    pub shared: Arc<ProxyState>,
}

/// The write buffer of a client connection. pingora writes a response header and its body in
/// separate calls; with its default of 1,460 bytes, a miss of a 4 KiB page left in two
/// `sendto`s, and a send to an idle client is a cross-CPU wake-up (an IPI; a hypervisor exit
/// on a VM). 8 KiB holds a header and a small body, so they leave in one send; larger bodies
/// go straight through after the header. It costs up to 8 KiB per open connection
/// (docs/hardening.md).
const CLIENT_WRITE_BUFFER: usize = 8 * 1024;

/// What [`preflight`] found unusable: the key that names it (`["cache", "disk", "path"]`)
/// and why.
#[derive(Debug)]
pub struct Unusable {
    pub key: &'static [&'static str],
    pub error: anyhow::Error,
}

impl std::fmt::Display for Unusable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {:#}", self.key.join("."), self.error)
    }
}

/// Builds what a configuration needs that validation alone cannot vouch for (the origin pools
/// and their health checks, the disk tier's directory, the access log's file), then drops it.
/// `skua check` and `skua serve` both run it, so that a file `check` passes is one `serve`
/// starts with.
pub fn preflight(config: &Config) -> Result<(), Unusable> {
    let unusable = |key, error| Unusable { key, error };
    Pools::build(&config.origins)
        .context("building origin pools")
        .map_err(|e| unusable(&["origin"], e))?;
    if let Some(disk) = &config.cache.disk {
        disk_dir_usable(&disk.path)
            .with_context(|| format!("{} cannot hold the disk cache", disk.path.display()))
            .map_err(|e| unusable(&["cache", "disk", "path"], e))?;
    }
    if let Some(crate::config::AccessLogConfig {
        destination: crate::config::Destination::File(path),
        ..
    }) = &config.access_log
    {
        log_file_usable(path)
            .with_context(|| format!("cannot write the access log {}", path.display()))
            .map_err(|e| unusable(&["log", "access"], e))?;
    }
    Ok(())
}

/// Whether the access log could be opened at `path` for appending: an existing file this
/// process may write, or a new one in an existing directory it may write in. Regression:
/// `serve` started without any access log when its directory did not exist (one error line
/// in the process log), and `check` passed the file. Nothing is created: a probe file is
/// made and removed in the directory, as for the disk tier.
fn log_file_usable(path: &std::path::Path) -> anyhow::Result<()> {
    if path.exists() {
        std::fs::OpenOptions::new().append(true).open(path)?;
        return Ok(());
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    if !dir.is_dir() {
        anyhow::bail!("{} is not a directory", dir.display());
    }
    let probe = dir.join(format!(".skua-check-{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .with_context(|| format!("cannot write in {}", dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Whether the disk tier could be opened at `path`: it is a directory this process can write
/// in, or could be created below the nearest existing directory (regression: `check` passed a
/// path `serve` could not open, so a systemd `ExecStartPre=skua check` did not catch it).
/// Writability is probed with a file created and removed at once, which the mode bits alone
/// would not tell (the process may run as root, or under another user).
fn disk_dir_usable(path: &std::path::Path) -> anyhow::Result<()> {
    let mut existing = path;
    while !existing.exists() {
        existing = match existing.parent() {
            // A relative path's last ancestor is empty: the working directory, where the
            // tier creates it (regression: `cache/skua` was refused when `cache` was missing).
            Some(parent) if parent.as_os_str().is_empty() => std::path::Path::new("."),
            Some(parent) => parent,
            None => anyhow::bail!("no existing directory above it"),
        };
    }
    if !existing.is_dir() {
        anyhow::bail!("{} is not a directory", existing.display());
    }
    let probe = existing.join(format!(".skua-check-{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .with_context(|| format!("cannot write in {}", existing.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

pub fn build(config: &Config) -> anyhow::Result<Built> {
    build_with(config, false)
}

/// Every client listener, with the key that names it.
fn tcp_listeners(config: &Config) -> Vec<(String, SocketAddr)> {
    let named = |key: &str, addrs: &[SocketAddr]| {
        (addrs.iter())
            .map(|a| (key.to_string(), *a))
            .collect::<Vec<_>>()
    };
    let server = &config.server;
    let mut tcp = named("server.listen", &server.listen);
    tcp.extend(named(
        "server.proxy_protocol_listen",
        &server.proxy_protocol_listen,
    ));
    if let Some(tls) = &server.tls {
        tcp.extend(named("server.tls.listen", &tls.listen));
        tcp.extend(named(
            "server.tls.proxy_protocol_listen",
            &tls.proxy_protocol_listen,
        ));
    }
    tcp
}

/// Fails, naming the key, when an address Skua would listen on is taken by another process.
/// pingora retries a taken TCP address for a while and then gives up in the background, and a
/// taken UDP address was shared (regression: a second Skua with the same HTCP address started
/// and received every CLR while the first served purged pages). A zero-downtime upgrade
/// (`--upgrade`) inherits its listeners and skips this.
pub fn check_addresses_free(config: &Config) -> anyhow::Result<()> {
    let mut tcp = tcp_listeners(config);
    if let Some(admin) = config.server.admin {
        tcp.push(("server.admin".into(), admin));
    }
    for (key, addr) in tcp {
        let bound = (|| {
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM,
                None,
            )?;
            socket.set_reuse_address(true)?;
            socket.set_reuse_port(config.server.reuse_port)?;
            socket.bind(&addr.into())
        })();
        bound.with_context(|| {
            format!("{key}: cannot listen on {addr} (in use by another process?)")
        })?;
    }
    if let Some(htcp) = config
        .purge
        .htcp
        .as_ref()
        .filter(|h| !h.listen.ip().is_multicast())
    {
        std::net::UdpSocket::bind(htcp.listen).with_context(|| {
            format!(
                "purge.htcp.listen: cannot listen on {} (in use by another process?)",
                htcp.listen
            )
        })?;
    }
    Ok(())
}

/// As [`build`]; with `upgrade`, the listening sockets are taken over from a running Skua
/// through `upgrade_sock` (it hands them over on SIGQUIT) instead of being bound anew.
pub fn build_with(config: &Config, upgrade: bool) -> anyhow::Result<Built> {
    if !upgrade {
        check_addresses_free(config)?;
    }
    let conf = ServerConf {
        upgrade_sock: config.server.upgrade_sock.display().to_string(),
        threads: config.server.threads,
        // A second between pingora's shutdown signal and the runtimes' end, in which the
        // services finish what they hold: the HTCP reader reads what the kernel queued on its
        // socket and the purge queue applies it (relaying it during an upgrade). With none, the
        // runtimes were cancelled at once and a CLR read at that moment was lost (regression
        // test `no_clr_is_lost_across_a_zero_downtime_upgrade`, about one run in five).
        grace_period_seconds: Some(1),
        graceful_shutdown_timeout_seconds: Some(config.server.shutdown_grace.as_secs().max(1)),
        pid_file: String::new(),
        ..Default::default()
    };
    let opt = Opt {
        upgrade,
        ..Default::default()
    };
    raise_open_file_limit();
    // Bound before the listeners are asked for: the old process relays the purges it takes
    // from the moment it hands them over (`purge::handover`).
    let inbox = upgrade
        .then(|| Inbox::bind(&config.server.upgrade_sock))
        .transpose()
        .with_context(|| {
            let path = handover::socket_path(&config.server.upgrade_sock);
            format!(
                "server.upgrade_sock: cannot listen for relayed purges at {}",
                path.display()
            )
        })?;
    let mut server = Server::new_with_opt_and_conf(Some(opt), conf);
    server.bootstrap();
    let shared = add_node(&mut server, config)?;
    if upgrade {
        // The listeners are this process's now (`bootstrap` waited for them); the old process
        // still takes connections for a while, and gets the purges taken here.
        if let Some(relay) = &shared.purger.relay {
            relay.took_over(config.server.shutdown_grace);
        }
    }
    if let Some(inbox) = inbox {
        server.add_service(background_service(
            "relayed purges",
            InboxService {
                inbox: Mutex::new(Some(inbox)),
                purger: shared.purger.clone(),
                readiness: shared.readiness.clone(),
            },
        ));
    }
    Ok(Built { server, shared })
}

/// Raises the soft limit on open files to the hard one, as Go's runtime does for every
/// program: a shell's usual soft limit (1,024) is a tenth of `max_connections`' default, and a
/// process out of descriptors cannot accept a connection even to refuse it: clients past it
/// waited unanswered while pingora retried `accept` once a second.
fn raise_open_file_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let (Some(soft), Some(hard)) = (limit.current, limit.maximum) else {
        return;
    };
    if soft < hard {
        let raised = Rlimit {
            current: Some(hard),
            maximum: Some(hard),
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(soft, hard, error = %e, "could not raise the open-file limit");
        }
    }
}

/// The client connections the open-file limit leaves room for: a quarter of the descriptors
/// (at least 64) is kept for everything else (origin connections, disk segments, listeners,
/// logs, the bus). `None`: no limit.
fn connections_the_file_limit_allows() -> Option<usize> {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current?;
    let kept = (limit / 4).max(64);
    usize::try_from(limit.saturating_sub(kept)).ok()
}

/// `[server] max_connections`, lowered to what the open-file limit allows (with a warning
/// naming both), so that clients past it are answered 503 rather than left unaccepted.
fn client_connection_limit(configured: usize) -> usize {
    match connections_the_file_limit_allows() {
        Some(allowed) if allowed < configured => {
            tracing::warn!(
                max_connections = configured,
                allowed,
                "server.max_connections is more than this process's open-file limit allows \
                 (ulimit -n, or LimitNOFILE= under systemd): connections past {allowed} are \
                 answered 503"
            );
            allowed
        }
        _ => configured,
    }
}

/// Connections the admin port keeps open at once: scrapes, dashboards and purge clients.
const ADMIN_MAX_CONNECTIONS: usize = 256;

/// Adds one Skua node's services (proxy, health checks, HTCP, purge bus, admin) to `server`.
/// A process normally runs one; the demo runs several side by side.
pub fn add_node(server: &mut Server, config: &Config) -> anyhow::Result<Arc<ProxyState>> {
    // The store lives as long as the process: pingora's storage API takes `&'static`.
    let tags: &'static TagIndex = Box::leak(Box::new(TagIndex::new(
        config.purge.tag_headers.clone(),
        config.purge.tag_index_size,
    )));
    let disk = match &config.cache.disk {
        Some(d) => Some(
            DiskTier::open(d.clone(), tags)
                .with_context(|| format!("opening the disk cache at {}", d.path.display()))?,
        ),
        None => None,
    };
    let store: &'static Store = Box::leak(Box::new(Store::new(
        config.cache.memory_size,
        config.cache.max_object_size,
        config.cache.max_variants,
        disk,
        tags,
        config.cache.ttl_cap,
        config.cache.fill_memory,
    )));
    if config.purge.bus.is_none()
        && config
            .cache
            .disk
            .as_ref()
            .is_some_and(|d| d.revalidate_after_restart)
    {
        // Purges sent while this node was down reached nobody, and nothing can replay them:
        // what the disk holds from before now is checked with the origin before it is served.
        store
            .invalidations
            .revalidate_all_before(std::time::SystemTime::now());
    }
    let origins = crate::upstream::resolve::resolve(&config.origins, None);
    let pools: SharedPools = Arc::new(ArcSwap::from_pointee(
        Pools::build(&origins).context("building origin pools")?,
    ));
    let metrics = Arc::new(Metrics::new().context("registering metrics")?);
    crate::purge::register_series(&metrics);
    let bus = config
        .purge
        .bus
        .clone()
        .map(|b| Bus::new(b, store, metrics.clone()));
    let shared = Arc::new(ProxyState::new(
        config,
        store,
        (origins, pools),
        metrics,
        bus.clone(),
    ));

    let mut connections = config.server.connections;
    connections.max_connections = client_connection_limit(connections.max_connections);
    let gate = ConnectionGate::new(
        proxy_app(server, &shared, config),
        connections,
        shared.metrics.connections.clone(),
        FrontDoor::new(shared.clone()),
    );
    if let Some(tls) = &config.server.tls {
        let terminator = Arc::new(
            TlsTerminator::new(tls, shared.metrics.tls.clone())
                .context("setting up [server.tls]")?,
        );
        shared.set_tls(terminator.clone());
        let https_gate = gate.serving_tls(proxy_app(server, &shared, config), terminator);
        if !tls.proxy_protocol_listen.is_empty() {
            let gate = https_gate.expecting_proxy_header(proxy_app(server, &shared, config));
            let mut https = Service::new("skua https (PROXY protocol)".to_string(), gate);
            for addr in &tls.proxy_protocol_listen {
                https.add_listener(client_listener(*addr, &config.server));
            }
            server.add_service(https);
        }
        if !tls.listen.is_empty() {
            let mut https = Service::new("skua https".to_string(), https_gate);
            for addr in &tls.listen {
                https.add_listener(client_listener(*addr, &config.server));
            }
            server.add_service(https);
        }
    }
    if !config.server.proxy_protocol_listen.is_empty() {
        let gate = gate.expecting_proxy_header(proxy_app(server, &shared, config));
        let mut proxy = Service::new("skua proxy (PROXY protocol)".to_string(), gate);
        for addr in &config.server.proxy_protocol_listen {
            proxy.add_listener(client_listener(*addr, &config.server));
        }
        server.add_service(proxy);
    }
    if !config.server.listen.is_empty() {
        let mut proxy = Service::new("skua proxy".to_string(), gate);
        for addr in &config.server.listen {
            proxy.add_listener(client_listener(*addr, &config.server));
        }
        server.add_service(proxy);
    }
    let history = Arc::new(Mutex::new(History::new()));
    server.add_service(background_service(
        "dashboard history",
        Sampler {
            history: history.clone(),
            metrics: shared.metrics.clone(),
            store: shared.store,
        },
    ));
    server.add_service(background_service(
        "origin health checks",
        HealthChecks(shared.pools.clone()),
    ));
    server.add_service(background_service(
        "origin names",
        OriginNames(shared.clone()),
    ));
    server.add_service(background_service(
        "access log reopen",
        LogReopener(shared.clone()),
    ));
    if let Some(relay) = shared.purger.relay.clone() {
        let watch = HandoverWatch {
            relay,
            purger: shared.purger.clone(),
            readiness: shared.readiness.clone(),
        };
        server.add_service(background_service("upgrade watch", watch));
    }
    if let Some(disk) = shared.store.disk {
        server.add_service(background_service(
            "disk cache checkpoint",
            DiskCheckpoint(disk),
        ));
    }
    if let Some(htcp) = &config.purge.htcp {
        let receiver = HtcpReceiver::new(
            htcp.clone(),
            shared.purger.clone(),
            shared.canonical.clone(),
            shared.metrics.clone(),
        );
        let mut service = background_service("htcp receiver", receiver);
        // One thread drains the socket while the other applies queued purges, so a storm
        // is read as fast as it arrives.
        service.threads = Some(2);
        server.add_service(service);
    }
    if let Some(bus) = bus {
        server.add_service(background_service("purge bus", BusService(bus)));
    }
    if let Some(admin_addr) = config.server.admin {
        // The proxy's deadlines and head limits hold on the admin port too, with a connection
        // limit of its own: a client that can reach it (a monitoring network) must not hold
        // connections without end, nor take the descriptors the proxy needs.
        let mut limits = config.server.connections;
        limits.max_connections = ADMIN_MAX_CONNECTIONS;
        let metrics = Arc::new(
            crate::metrics::ConnectionMetrics::unexported().context("admin connection counts")?,
        );
        let app = Admin::new(Node {
            name: shared.name.clone(),
            store: shared.store,
            metrics: shared.metrics.clone(),
            pools: shared.pools.clone(),
            purger: shared.purger.clone(),
            purge_auth: shared.purge_auth.clone(),
            canonical: shared.canonical.clone(),
            readiness: shared.readiness.clone(),
            history: history.clone(),
        });
        let mut admin = Service::new(
            "skua admin".to_string(),
            ConnectionGate::admin(app, limits, metrics),
        );
        admin.add_tcp_with_settings(&admin_addr.to_string(), listen_options(&config.server));
        server.add_service(admin);
    }
    Ok(shared)
}

/// Streams an HTTP/2 connection may make Skua reset before it is closed.
const H2_MAX_LOCAL_RESETS: usize = 1024;

/// pingora's HTTP application around the request path.
fn proxy_app(
    server: &Server,
    shared: &Arc<ProxyState>,
    config: &Config,
) -> HttpProxy<CachingProxy> {
    let mut app =
        pingora::proxy::http_proxy(&server.configuration, CachingProxy::new(shared.clone()));
    // CONNECT reaches `request_filter`, which refuses it with a message that says why
    // (pingora's own refusal is a bare 405).
    let mut options = pingora::apps::HttpServerOptions::default();
    options.allow_connect_method_proxying = true;
    app.server_options = Some(options);
    // Every listener's: a plain one serves HTTP/2 to a client with prior knowledge too.
    app.h2_options = Some(h2_options(config));
    app
}

/// HTTP/2 limits per client connection (`[server.tls]`, which holds them for plain listeners
/// too; without it, their defaults): streams at once, the size of a request's header list,
/// and streams reset before their request was read (RFC 9113 §6.4; the 2023 "rapid reset"
/// attack opens and cancels streams as fast as it can). Regression: a plain listener's
/// HTTP/2 (prior knowledge) kept pingora's and h2's own limits whatever the configuration said.
fn h2_options(config: &Config) -> pingora::protocols::http::v2::server::H2Options {
    let (streams, resets) = (config.server.tls.as_ref()).map_or(
        (
            crate::config::H2_DEFAULT_STREAMS,
            crate::config::H2_DEFAULT_PENDING_RESETS,
        ),
        |tls| (tls.h2_max_concurrent_streams, tls.h2_max_pending_resets),
    );
    let mut options = pingora::protocols::http::v2::server::default_h2_options();
    options
        .max_concurrent_streams(streams)
        .max_header_list_size(h2_header_list(config))
        .max_pending_accept_reset_streams(resets)
        // Streams the server itself had to reset (a client that cancels what it asked for
        // leaves pingora an unreadable body, which it resets): past this many the connection
        // ends with ENHANCE_YOUR_CALM. h2's default, set here so that an upgrade of h2 cannot
        // silently lift it (tests/tls.rs, rapid reset).
        .max_local_error_reset_streams(Some(H2_MAX_LOCAL_RESETS));
    options
}

/// The largest header list an HTTP/2 request may send: the head's limits, target and fields.
/// Set on the connection once, at start.
fn h2_header_list(config: &Config) -> u32 {
    let limits = &config.server.limits;
    u32::try_from(limits.max_header_bytes + limits.max_uri_bytes).unwrap_or(u32::MAX)
}

/// A client listener on `addr`, plain or (when its service terminates TLS) HTTPS.
fn client_listener(addr: SocketAddr, server: &crate::config::ServerConfig) -> ListenerConfig {
    // No L4 read buffer (pingora's default is 64 KiB per connection, zeroed at accept):
    // every reader above it reads into a buffer of its own (the head reader in
    // `proxy::connection`, pingora's header and body buffers, rustls's), so it would only add
    // a copy, and 640 MiB of memory to 10,000 idle keep-alive connections.
    let buffers = L4BufferSettings::default()
        .read(0)
        .write(CLIENT_WRITE_BUFFER);
    ListenerConfig::tcp(addr.to_string())
        .l4_buffer(buffers)
        .tcp_socket_options(listen_options(server))
}

/// Socket options of the proxy and admin listeners.
fn listen_options(server: &crate::config::ServerConfig) -> TcpSocketOptions {
    let mut options = TcpSocketOptions::default();
    options.so_reuseport = Some(server.reuse_port);
    options
}

impl Built {
    /// Re-reads `path` on SIGHUP and applies what can change in place (see
    /// [`crate::proxy::Settings`]). A file that does not validate is rejected with a log line and
    /// the running configuration stays.
    /// `running` is the configuration the server was built from.
    pub fn reload_on_sighup(&mut self, path: PathBuf, running: Config) {
        let reloader = Reloader {
            path,
            shared: self.shared.clone(),
            started_with: running,
        };
        self.server
            .add_service(background_service("config reload", reloader));
    }
}

struct Reloader {
    path: PathBuf,
    shared: Arc<ProxyState>,
    /// What the listeners, tiers, HTCP receiver and purge bus were built from: a reload
    /// cannot change those, and says so when a file tries.
    started_with: Config,
}

/// What of `[server.tls]` is built once: its listeners and the HTTP/2 limits. Certificates,
/// `http2` and `handshake_timeout` reload.
fn tls_fixed(config: &Config) -> Option<(&[SocketAddr], &[SocketAddr], [usize; 3])> {
    let tls = config.server.tls.as_ref()?;
    Some((
        &tls.listen,
        &tls.proxy_protocol_listen,
        [
            tls.h2_max_concurrent_streams as usize,
            tls.h2_max_pending_resets,
            tls.h2_max_rapid_resets,
        ],
    ))
}

/// The keys whose change a reload cannot apply: they are built once (listeners, tiers, the
/// HTCP receiver, the purge bus, the access log) and need a restart or a zero-downtime upgrade.
fn needs_restart(running: &Config, new: &Config) -> Vec<&'static str> {
    let differs =
        |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
    let (r, n) = (running, new);
    let (rc, nc) = (&r.server.connections, &n.server.connections);
    [
        ("server.listen", differs(&r.server.listen, &n.server.listen)),
        (
            "server.proxy_protocol_listen",
            differs(
                &r.server.proxy_protocol_listen,
                &n.server.proxy_protocol_listen,
            ),
        ),
        (
            "server.tls (added, removed, listen or h2_*)",
            differs(&tls_fixed(r), &tls_fixed(n)),
        ),
        (
            "server.reuse_port",
            r.server.reuse_port != n.server.reuse_port,
        ),
        ("server.admin", differs(&r.server.admin, &n.server.admin)),
        ("server.threads", r.server.threads != n.server.threads),
        ("server.name", r.server.name != n.server.name),
        (
            "server.shutdown_grace",
            r.server.shutdown_grace != n.server.shutdown_grace,
        ),
        (
            "server.upgrade_sock",
            r.server.upgrade_sock != n.server.upgrade_sock,
        ),
        (
            // They size the connection's head buffer and HTTP/2's header list, both set once.
            // Lowered, they apply: the head's own checks refuse what the connection let in.
            "server.max_uri_bytes / max_header_bytes raised",
            h2_header_list(n) > h2_header_list(r),
        ),
        (
            "server.max_connections",
            rc.max_connections != nc.max_connections,
        ),
        (
            "server.max_connections_per_client",
            rc.max_per_client != nc.max_per_client,
        ),
        (
            "server.keepalive_timeout",
            rc.idle_timeout != nc.idle_timeout,
        ),
        (
            "server.header_timeout",
            rc.header_timeout != nc.header_timeout,
        ),
        ("server.send_timeout", rc.send_timeout != nc.send_timeout),
        (
            "cache.memory_size",
            r.cache.memory_size != n.cache.memory_size,
        ),
        (
            "cache.max_object_size",
            r.cache.max_object_size != n.cache.max_object_size,
        ),
        (
            "cache.max_variants",
            r.cache.max_variants != n.cache.max_variants,
        ),
        (
            // The cache lock's age is set when the lock is made; the wait derived from it
            // changes at once.
            "cache.lock_timeout",
            r.cache.lock_timeout != n.cache.lock_timeout,
        ),
        ("cache.disk", differs(&r.cache.disk, &n.cache.disk)),
        (
            "purge.tag_headers",
            differs(&r.purge.tag_headers, &n.purge.tag_headers),
        ),
        (
            "purge.tag_index_size",
            r.purge.tag_index_size != n.purge.tag_index_size,
        ),
        ("purge.htcp", differs(&r.purge.htcp, &n.purge.htcp)),
        ("purge.bus", differs(&r.purge.bus, &n.purge.bus)),
        ("log", differs(&r.access_log, &n.access_log)),
    ]
    .into_iter()
    .filter_map(|(key, changed)| changed.then_some(key))
    .collect()
}

impl Reloader {
    /// Loads, validates and applies the file; counts the result, so a test (or an operator)
    /// can tell a reload ran without reading the log.
    fn reload(&self) {
        let metrics = &self.shared.metrics;
        let config = match Config::load(&self.path) {
            Ok(config) => config,
            Err(errors) => {
                metrics.reloads_rejected.inc();
                tracing::error!("reload rejected, the running configuration stays:\n{errors}");
                return;
            }
        };
        // A panic while building (a bug: validation should have refused the file) must not
        // end this loop, or every later SIGHUP would be ignored.
        let applied =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.shared.reload(&config)));
        match applied {
            Ok(Ok(())) => {
                metrics.reloads_applied.inc();
                let pending = needs_restart(&self.started_with, &config);
                if pending.is_empty() {
                    tracing::warn!(path = %self.path.display(), "configuration reloaded");
                } else {
                    tracing::warn!(
                        path = %self.path.display(),
                        "configuration reloaded, except {}: those need a restart or a zero-downtime upgrade (skua serve --upgrade)",
                        pending.join(", ")
                    );
                }
            }
            Ok(Err(e)) => {
                metrics.reloads_rejected.inc();
                tracing::error!(error = %format!("{e:#}"), "reload rejected, the running configuration stays");
            }
            Err(_) => {
                metrics.reloads_rejected.inc();
                tracing::error!(
                    "reload rejected after an internal error; the running configuration stays"
                );
            }
        }
    }
}

/// Looks the DNS names among the origins' addresses up again, every pool's
/// `resolve_interval` (`upstream::resolve`).
struct OriginNames(Arc<ProxyState>);

#[async_trait]
impl BackgroundService for OriginNames {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            // A reload may add or remove names: asked again each round.
            let interval = self.0.resolve_interval();
            tokio::select! {
                _ = tokio::time::sleep(interval.unwrap_or(std::time::Duration::from_secs(10))) => {}
                _ = shutdown.changed() => return,
            }
            if interval.is_some() {
                self.0.resolve_origins_again().await;
            }
        }
    }
}

/// Checkpoints the disk tier's index at a graceful stop, so the next start reads it instead
/// of scanning the log written since the last periodic checkpoint.
struct DiskCheckpoint(&'static DiskTier);

#[async_trait]
impl BackgroundService for DiskCheckpoint {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let disk = self.0;
        // Waits on a blocking thread, not as a task: with no grace period pingora shuts the
        // runtimes down as soon as it signals the stop, which cancels a task not yet woken
        // by the signal (regression: the checkpoint was sometimes not written), but it waits
        // for blocking threads (up to `shutdown_grace`).
        let waiting = tokio::task::spawn_blocking(move || {
            let _ = tokio::runtime::Handle::current().block_on(shutdown.changed());
            disk.checkpoint_now();
        });
        let _ = waiting.await;
    }
}

#[async_trait]
impl BackgroundService for Reloader {
    async fn start(&self, shutdown: ShutdownWatch) {
        on_signal(
            SignalKind::hangup(),
            "SIGHUP; reloads are off",
            shutdown,
            || self.reload(),
        )
        .await;
    }
}

/// SIGUSR1 opens the access log file again, as nginx does for `postrotate` scripts (the
/// writer also notices a rotated file by itself within a second). Without a handler the
/// signal's default action would end the process.
struct LogReopener(Arc<ProxyState>);

#[async_trait]
impl BackgroundService for LogReopener {
    async fn start(&self, shutdown: ShutdownWatch) {
        on_signal(SignalKind::user_defined1(), "SIGUSR1", shutdown, || {
            self.0.reopen_access_log()
        })
        .await;
    }
}

/// Runs `action` on each `kind` signal until the server stops. `what` names the signal (and
/// what is lost) in the log line when it cannot be listened for.
async fn on_signal(kind: SignalKind, what: &str, mut shutdown: ShutdownWatch, action: impl Fn()) {
    let mut signals = match signal(kind) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for {what}");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = signals.recv() => action(),
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (found by the `config_load` fuzz target): a relative disk path whose
    /// directories do not exist yet was refused ("no existing directory above it"), though
    /// the tier creates them under the working directory.
    #[test]
    fn a_relative_disk_path_under_missing_directories_is_usable() {
        let missing = std::path::Path::new("skua-test-not-made/cache/skua");
        assert!(!missing.exists());
        assert!(disk_dir_usable(missing).is_ok());
        assert!(!std::path::Path::new("skua-test-not-made").exists());
    }

    /// Regression: a SIGHUP that changed the listen or HTCP address logged "configuration
    /// reloaded" as if it had applied.
    #[test]
    fn a_reload_names_the_changes_it_cannot_apply() {
        let running = Config::parse(
            "[server]\nlisten = [\"127.0.0.1:8080\"]\n[purge.htcp]\nlisten = \"127.0.0.1:4827\"\n[cache]\nttl_cap = \"1d\"\n",
            "a.toml",
        )
        .unwrap();
        let new = Config::parse(
            "[server]\nlisten = [\"127.0.0.1:9090\"]\nshutdown_grace = \"7s\"\nmax_header_bytes = 100000\n[purge.htcp]\nlisten = \"127.0.0.1:4828\"\n[cache]\nttl_cap = \"1h\"\nmax_variants = 3\nlock_timeout = \"3s\"\n",
            "b.toml",
        )
        .unwrap();
        assert_eq!(
            needs_restart(&running, &new),
            vec![
                "server.listen",
                "server.shutdown_grace",
                "server.max_uri_bytes / max_header_bytes raised",
                "cache.max_variants",
                "cache.lock_timeout",
                "purge.htcp"
            ]
        );
        assert!(needs_restart(&running, &running.clone()).is_empty());
        // Lowered, the head's limits apply at once.
        let lower = Config::parse(
            "[server]\nlisten = [\"127.0.0.1:8080\"]\nmax_header_bytes = 4096\n[purge.htcp]\nlisten = \"127.0.0.1:4827\"\n[cache]\nttl_cap = \"1d\"\n",
            "c.toml",
        )
        .unwrap();
        assert!(needs_restart(&running, &lower).is_empty());
    }
}
