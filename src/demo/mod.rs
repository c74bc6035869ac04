//! `skua demo`: a sample wiki origin and Skua in front of it, in one process, with no
//! configuration file. It shows the cache working the way a MediaWiki operator would see it.

pub mod origin;

use std::net::SocketAddr;

use pingora::services::listening::Service;

use crate::config::certificate::{self, Certificate};
use crate::config::Config;

pub struct DemoOptions {
    pub proxy: SocketAddr,
    pub origin: SocketAddr,
    pub admin: SocketAddr,
    /// Where the demo serves HTTPS (node a only), with a self-signed certificate it makes.
    pub https: SocketAddr,
    /// `s-maxage` the sample origin sends, in seconds.
    pub s_maxage: u64,
    /// Where the demo receives HTCP CLR purges.
    pub htcp: SocketAddr,
    /// Directory of the demo's disk tier.
    pub cache_dir: std::path::PathBuf,
    /// How many Skua nodes: 1, or a fleet linked by a purge bus, each node 10 ports above
    /// the one before (proxy and admin).
    pub nodes: usize,
    /// The fleet's NATS server; without it the demo starts `nats-server` from PATH.
    pub nats: Option<String>,
}

/// Where the demo's own nats-server listens.
const DEMO_NATS_PORT: u16 = 4222;

fn shifted(addr: SocketAddr, by: usize) -> SocketAddr {
    SocketAddr::new(addr.ip(), addr.port() + (by as u16) * 10)
}

/// Node `i` of a demo fleet: its own ports, disk and bus id; requests for any node's address
/// share node 0's cache keys, so the origin's purges (which name node 0) match everywhere.
fn node_config(opts: &DemoOptions, certificate: &Certificate, i: usize, nats: &str) -> Config {
    let mut config = config(opts, certificate);
    config.server.listen = vec![shifted(opts.proxy, i)];
    config.server.admin = Some(shifted(opts.admin, i));
    config.server.name = format!("skua-{}", node_name(i));
    if let Some(disk) = config.cache.disk.as_mut() {
        disk.path = opts.cache_dir.join(format!("node-{}", node_name(i)));
    }
    if i > 0 {
        config.purge.htcp = None;
        config.server.tls = None;
    }
    for j in 1..opts.nodes {
        config
            .cache
            .host_aliases
            .insert(shifted(opts.proxy, j).to_string(), opts.proxy.to_string());
    }
    config.purge.bus = Some(crate::config::BusConfig {
        servers: vec![nats.to_string()],
        stream: "SKUA_DEMO_PURGE".into(),
        subject: "skua.demo.purge".into(),
        node: node_name(i),
        retention: config.cache.ttl_cap,
        catch_up: crate::config::CatchUpPolicy::Wait,
        catch_up_timeout: std::time::Duration::from_secs(10),
        publish_htcp: true,
        max_queued: crate::config::BUS_MAX_QUEUED,
        outbox_dir: None,
        auth: crate::config::BusAuth::None,
        tls: crate::config::BusTls::default(),
    });
    config
}

fn node_name(i: usize) -> String {
    char::from(b'a' + (i % 26) as u8).to_string()
}

/// Starts `nats-server` with JetStream, stored under the demo's cache directory.
fn start_nats(opts: &DemoOptions) -> anyhow::Result<(String, std::process::Child)> {
    let store = opts.cache_dir.join("nats");
    std::fs::create_dir_all(&store)?;
    let child = std::process::Command::new("nats-server")
        .args(["-js", "-a", "127.0.0.1", "-p", &DEMO_NATS_PORT.to_string(), "-sd"])
        .arg(&store)
        .arg("-l")
        .arg(opts.cache_dir.join("nats.log"))
        .stdout(std::process::Stdio::null())
        .spawn()
        .map_err(|e| {
            anyhow::anyhow!(
                "skua demo --nodes {} needs nats-server on PATH (apt-get install nats-server) or --nats URL: {e}",
                opts.nodes
            )
        })?;
    Ok((format!("nats://127.0.0.1:{DEMO_NATS_PORT}"), child))
}

/// The configuration the demo runs with: the defaults, pointed at the sample origin, and
/// HTTPS with the demo's own certificate.
pub fn config(opts: &DemoOptions, certificate: &Certificate) -> Config {
    let mut config = Config::defaults();
    config.server.listen = vec![opts.proxy];
    config.server.admin = Some(opts.admin);
    // What a reader sees when the sample origin is stopped: the example page operators start
    // from (`[server] error_page`).
    config.server.error_page = Some(include_str!("../../config/error.html").into());
    config.server.tls = Some(crate::config::TlsConfig {
        listen: vec![opts.https],
        proxy_protocol_listen: Vec::new(),
        certificates: vec![certificate.clone()],
        handshake_timeout: std::time::Duration::from_secs(10),
        http2: true,
        h2_max_concurrent_streams: 100,
        h2_max_pending_resets: 20,
        h2_max_rapid_resets: crate::config::H2_DEFAULT_RAPID_RESETS,
        redirect_http: Vec::new(),
    });
    // The sample origin purges a page under the proxy's address only, as MediaWiki names
    // pages by one host: a page read over HTTPS, or as `localhost`, must be keyed on it too,
    // or an edit never reaches its readers (README, "copies stored under another name").
    let site = opts.proxy.to_string();
    let aliases = &mut config.cache.host_aliases;
    aliases.insert(opts.https.to_string(), site.clone());
    aliases.insert("localhost".into(), site);
    config.cache.downstream_cache_control = Some(http::HeaderValue::from_static(
        "private, s-maxage=0, max-age=0, must-revalidate",
    ));
    config.cache.disk = Some(crate::cache::disk::DiskConfig {
        path: opts.cache_dir.clone(),
        size: 1 << 30,
        max_object_size: 64 << 20,
        min_uses: 1,
        revalidate_after_restart: true,
        max_variants: config.cache.max_variants,
    });
    config.purge.htcp = Some(crate::config::HtcpConfig {
        listen: opts.htcp,
        allow: config.purge.allow.clone(),
        multicast_groups: Vec::new(),
        multicast_interface: None,
        host_regex: None,
    });
    if let Some(pool) = config.origins.first_mut() {
        pool.name = "wiki".into();
        pool.targets = vec![crate::config::OriginTarget::Address(opts.origin)];
        pool.addresses = vec![opts.origin];
    }
    config
}

/// A self-signed certificate for `localhost` and `127.0.0.1`, made now and written under
/// `dir` (its files are what `[server.tls]` reads), and its SHA-256 fingerprint.
fn demo_certificate(dir: &std::path::Path) -> anyhow::Result<(Certificate, String)> {
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let made = rcgen::generate_simple_self_signed(names)?;
    std::fs::create_dir_all(dir)?;
    let chain = dir.join("demo-certificate.pem");
    let key = dir.join("demo-key.pem");
    std::fs::write(&chain, made.cert.pem())?;
    std::fs::write(&key, made.signing_key.serialize_pem())?;
    let loaded = certificate::load(&chain, &key, std::time::SystemTime::now())
        .map_err(|e| anyhow::anyhow!("the demo's certificate: {e:?}"))?;
    let digest = ring::digest::digest(&ring::digest::SHA256, made.cert.der());
    let fingerprint: Vec<String> = digest.as_ref().iter().map(|b| format!("{b:02X}")).collect();
    Ok((loaded, fingerprint.join(":")))
}

pub fn run(opts: DemoOptions) -> anyhow::Result<()> {
    let (certificate, fingerprint) = demo_certificate(&opts.cache_dir.join("tls"))?;
    let mut nats_child = None;
    let mut built = if opts.nodes <= 1 {
        crate::server::build(&config(&opts, &certificate))?
    } else {
        let nats = match &opts.nats {
            Some(url) => url.clone(),
            None => {
                let (url, child) = start_nats(&opts)?;
                nats_child = Some(child);
                url
            }
        };
        let mut built = crate::server::build(&node_config(&opts, &certificate, 0, &nats))?;
        for i in 1..opts.nodes {
            let node = node_config(&opts, &certificate, i, &nats);
            crate::server::add_node(&mut built.server, &node)?;
        }
        built
    };
    if let Some(child) = nats_child {
        built
            .server
            .add_service(pingora::services::background::background_service(
                "demo nats-server",
                NatsChild(std::sync::Mutex::new(child)),
            ));
    }
    let wiki = origin::WikiOrigin::new(opts.proxy.to_string(), vec![opts.proxy], opts.s_maxage);
    let mut origin = Service::new("sample wiki origin".to_string(), wiki);
    origin.add_tcp(&opts.origin.to_string());
    built.server.add_service(origin);

    println!("Skua demo: a sample wiki origin with Skua in front of it.");
    println!();
    println!(
        "  Read through the cache:  curl -si http://{}/wiki/Main_Page",
        opts.proxy
    );
    println!(
        "  Over HTTPS and HTTP/2:   curl -ski https://{}/wiki/Main_Page",
        opts.https
    );
    println!("                           (its certificate, made at start: SHA-256 {fingerprint})");
    println!(
        "  Edit a page (purges it): curl -X POST --data 'new text' http://{}/wiki/Main_Page",
        opts.origin
    );
    println!(
        "  Purge over HTCP:         skua purge --htcp {} http://{}/wiki/Main_Page",
        opts.htcp, opts.proxy
    );
    println!(
        "  What the origin served:  curl -s http://{}/_origin/stats",
        opts.origin
    );
    println!("  Live dashboard:          http://{}/", opts.admin);
    println!("  In the terminal:         skua top --admin {}", opts.admin);
    println!(
        "  Cache statistics:        curl -s http://{}/stats",
        opts.admin
    );
    println!(
        "  Prometheus metrics:      curl -s http://{}/metrics",
        opts.admin
    );
    for i in 1..opts.nodes {
        println!(
            "  Node {}:                  curl -si http://{}/wiki/Main_Page   (dashboard http://{}/)",
            node_name(i),
            shifted(opts.proxy, i),
            shifted(opts.admin, i)
        );
    }
    if opts.nodes > 1 {
        println!("  Edits purge node a only; the purge bus carries them to the others.");
    }
    println!();
    println!(
        "Pages are fresh for {} s (s-maxage). Ctrl-C stops.",
        opts.s_maxage
    );
    built.server.run_forever()
}

/// Stops the demo's nats-server with the demo.
struct NatsChild(std::sync::Mutex<std::process::Child>);

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for NatsChild {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        let _ = shutdown.changed().await;
        if let Ok(mut child) = self.0.lock() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
