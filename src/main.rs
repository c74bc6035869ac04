//! The `skua` command: parses arguments and hands over to the library.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use skua::config::{Config, ConfigErrors};

// Measured in benches/README.md: mimalloc takes malloc/free from ~15% of a hit's
// instructions (glibc) to a few percent, and returns freed memory to the OS sooner.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// sysexits.h EX_CONFIG: "configuration error".
const EXIT_CONFIG: u8 = 78;

/// sysexits.h EX_USAGE: "the command was used incorrectly".
const EXIT_USAGE: u8 = 64;

#[derive(Parser)]
#[command(name = "skua", version, about = "A caching reverse proxy for wikis")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Serve {
        /// Configuration file (TOML).
        #[arg(short, long)]
        config: PathBuf,
        /// Take over the listening sockets of a running Skua (zero-downtime upgrade): start
        /// this, then send SIGQUIT to the old process.
        #[arg(long)]
        upgrade: bool,
    },
    /// Validate a configuration file: exit 0, or print every problem and exit 78.
    Check {
        #[arg(short, long)]
        config: PathBuf,
        /// Also say what the `[[rule]]`s would do with a request for this absolute URL: its
        /// cache key, the rules it matches and the pool its misses reach.
        #[arg(long, value_name = "URL")]
        explain: Option<String>,
        /// With --explain: the request's method.
        #[arg(long, default_value = "GET", requires = "explain")]
        method: String,
        /// With --explain: a request header, `Name: value` (repeatable).
        #[arg(long = "header", value_name = "NAME: VALUE", requires = "explain")]
        headers: Vec<String>,
        /// With --explain: the client's address.
        #[arg(long, value_name = "IP", requires = "explain")]
        client: Option<std::net::IpAddr>,
    },
    /// Send purges: one HTCP CLR per URL, as MediaWiki does for `$wgHTCPRouting`.
    Purge {
        /// UDP address of an HTCP receiver (e.g. 127.0.0.1:4827 or a multicast group).
        #[arg(long, value_name = "ADDR")]
        htcp: SocketAddr,
        /// Write packets the way Squid 5.7 does instead of MediaWiki's.
        #[arg(long)]
        squid: bool,
        /// Absolute URLs to purge.
        #[arg(required = true, value_name = "URL")]
        urls: Vec<String>,
    },
    /// The dashboard's figures and top URLs in the terminal, redrawn every second.
    Top {
        /// The node's admin address (`[server] admin`; the demo's is the default).
        #[arg(long, default_value = "127.0.0.1:8082")]
        admin: SocketAddr,
        /// Print the view once and exit, without clearing the screen.
        #[arg(long)]
        once: bool,
    },
    /// A sample wiki origin with Skua in front of it; no configuration needed.
    Demo {
        /// Where Skua listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        proxy: SocketAddr,
        /// Where the sample wiki origin listens.
        #[arg(long, default_value = "127.0.0.1:8081")]
        origin: SocketAddr,
        /// Where the admin endpoint (stats, metrics) listens.
        #[arg(long, default_value = "127.0.0.1:8082")]
        admin: SocketAddr,
        /// Where Skua serves HTTPS and HTTP/2, with a certificate made at start.
        #[arg(long, default_value = "127.0.0.1:8443")]
        https: SocketAddr,
        /// Seconds pages stay fresh (the origin's s-maxage).
        #[arg(long, default_value_t = 300)]
        s_maxage: u64,
        /// Where the demo listens for HTCP CLR purges (UDP).
        #[arg(long, default_value = "127.0.0.1:4827")]
        htcp: SocketAddr,
        /// Directory of the demo's disk tier; a demo restarted with the same directory serves
        /// what it cached before from disk.
        #[arg(long, default_value = "./skua-demo-cache")]
        cache_dir: PathBuf,
        /// Run a fleet of this many nodes (proxy ports 8080, 8090, 8100, ...; admin ports
        /// 8082, 8092, ...) linked by a purge bus.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=10))]
        nodes: u16,
        /// The fleet's NATS server (with JetStream); default: start nats-server from PATH.
        #[arg(long)]
        nats: Option<String>,
    },
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // pingora-cache warns on every start that no header compression dictionary is set;
        // Skua stores headers without one on purpose.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,pingora_cache::meta=error"));
    // Colour codes only on a terminal: a log written to a file or journald stays plain text.
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(terminal)
        .init();
}

/// Loads, validates and pre-builds a configuration the same way for `check` and `serve`;
/// on failure, prints every problem and gives EX_CONFIG.
fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    let config = Config::load(path).map_err(|errors| {
        eprintln!("{errors}");
        ExitCode::from(EXIT_CONFIG)
    })?;
    skua::server::preflight(&config).map_err(|unusable| {
        let reason = format!("{:#}", unusable.error);
        eprintln!("{}", ConfigErrors::at_key(path, unusable.key, reason));
        ExitCode::from(EXIT_CONFIG)
    })?;
    Ok(config)
}

/// `skua check --explain`: the request from the command line, explained.
fn explain_request(
    config: &Config,
    url: &str,
    method: &str,
    headers: &[String],
    client: Option<std::net::IpAddr>,
) -> Result<String, String> {
    let method = http::Method::from_bytes(method.as_bytes())
        .map_err(|_| format!("--method: not a method: {method:?}"))?;
    let mut fields = http::HeaderMap::new();
    for header in headers {
        let parsed = header.split_once(':').and_then(|(name, value)| {
            let name = http::HeaderName::from_bytes(name.trim().as_bytes()).ok()?;
            let value = http::HeaderValue::from_str(value.trim()).ok()?;
            Some((name, value))
        });
        let (name, value) =
            parsed.ok_or_else(|| format!("--header: not \"Name: value\": {header:?}"))?;
        fields.append(name, value);
    }
    let asked = skua::rules::explain::Asked {
        url,
        method,
        headers: fields,
        client,
    };
    skua::rules::explain::explain(config, &asked)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check {
            config: path,
            explain,
            method,
            headers,
            client,
        } => match load(&path) {
            Ok(config) => {
                println!("{}: ok", path.display());
                for name in skua::upstream::resolve::unresolved(&config.origins) {
                    eprintln!(
                        "{}: warning: {name}; skua serve starts without its addresses and looks it up again every resolve_interval",
                        path.display()
                    );
                }
                let Some(url) = explain else {
                    return ExitCode::SUCCESS;
                };
                match explain_request(&config, &url, &method, &headers, client) {
                    Ok(text) => {
                        print!("{text}");
                        ExitCode::SUCCESS
                    }
                    Err(why) => {
                        eprintln!("{why}");
                        ExitCode::from(EXIT_USAGE)
                    }
                }
            }
            Err(code) => code,
        },
        Command::Top { admin, once } => match skua::admin::terminal::run(admin, once) {
            Ok(()) => ExitCode::SUCCESS,
            Err(why) => {
                eprintln!("skua top: {admin}: {why}");
                ExitCode::FAILURE
            }
        },
        Command::Serve { config, upgrade } => {
            let path = config;
            let config = match load(&path) {
                Ok(c) => c,
                Err(code) => return code,
            };
            init_logging();
            match skua::server::build_with(&config, upgrade) {
                Ok(mut built) => {
                    built.reload_on_sighup(path, config);
                    built.server.run_forever()
                }
                Err(e) => {
                    eprintln!("skua: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Purge { htcp, squid, urls } => {
            // Every URL is checked before anything is sent: a packet for a URL no cache key can
            // match would purge nothing and look like it worked.
            let bad: Vec<&String> = urls
                .iter()
                .filter(|u| skua::cache::key::CacheUrl::parse_absolute(u).is_err())
                .collect();
            if !bad.is_empty() {
                for u in bad {
                    eprintln!("skua: not an absolute http(s) URL: {u:?}");
                }
                return ExitCode::from(EXIT_USAGE);
            }
            let dialect = if squid {
                skua::purge::htcp::Dialect::Squid
            } else {
                skua::purge::htcp::Dialect::MediaWiki
            };
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("skua: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(skua::purge::receiver::send(htcp, &urls, dialect)) {
                Ok(()) => {
                    println!("sent {} HTCP CLR packet(s) to {htcp}", urls.len());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("skua: sending HTCP to {htcp}: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Demo {
            proxy,
            origin,
            admin,
            https,
            s_maxage,
            htcp,
            cache_dir,
            nodes,
            nats,
        } => {
            init_logging();
            let opts = skua::demo::DemoOptions {
                proxy,
                origin,
                admin,
                https,
                s_maxage,
                htcp,
                cache_dir,
                nodes: nodes as usize,
                nats,
            };
            match skua::demo::run(opts) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("skua: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
