//! `skua demo`: a sample wiki origin and Skua in front of it, in one process, with no
//! configuration file. It shows the cache working the way a MediaWiki operator would see it.

pub mod origin;

use std::net::SocketAddr;

use pingora::services::listening::Service;

use crate::config::Config;

pub struct DemoOptions {
    pub proxy: SocketAddr,
    pub origin: SocketAddr,
    pub admin: SocketAddr,
    /// `s-maxage` the sample origin sends, in seconds.
    pub s_maxage: u64,
    /// Where the demo receives HTCP CLR purges.
    pub htcp: SocketAddr,
    /// Directory of the demo's disk tier.
    pub cache_dir: std::path::PathBuf,
}

/// The configuration the demo runs with: the defaults, pointed at the sample origin.
pub fn config(opts: &DemoOptions) -> Config {
    let mut config = Config::defaults();
    config.server.listen = vec![opts.proxy];
    config.server.admin = Some(opts.admin);
    config.cache.disk = Some(crate::cache::disk::DiskConfig {
        path: opts.cache_dir.clone(),
        size: 1 << 30,
        max_object_size: 64 << 20,
        min_uses: 1,
    });
    config.purge.htcp = Some(crate::purge::receiver::HtcpConfig {
        listen: opts.htcp,
        allow: config.purge.allow.clone(),
        multicast_groups: Vec::new(),
        host_regex: None,
    });
    if let Some(pool) = config.origins.first_mut() {
        pool.name = "wiki".into();
        pool.addresses = vec![opts.origin];
    }
    config
}

pub fn run(opts: DemoOptions) -> anyhow::Result<()> {
    let config = config(&opts);
    let mut built = crate::server::build(&config)?;
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
    println!(
        "  Cache statistics:        curl -s http://{}/stats",
        opts.admin
    );
    println!(
        "  Prometheus metrics:      curl -s http://{}/metrics",
        opts.admin
    );
    println!();
    println!(
        "Pages are fresh for {} s (s-maxage). Ctrl-C stops.",
        opts.s_maxage
    );
    built.server.run_forever()
}
