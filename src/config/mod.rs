//! Configuration: the TOML file format (`file.rs`), its validation into typed values
//! (`validate.rs`), and the error report that names key, line and reason for every problem at
//! once. It does not apply configuration; the server, proxy and cache read the typed
//! [`Config`] they are handed.

mod file;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use ipnet::IpNet;
use regex::Regex;

pub use file::FileConfig;

/// The validated configuration every other module reads.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub origins: Vec<OriginPool>,
    pub cache: CacheConfig,
    pub purge: PurgeConfig,
    pub access_log: Option<crate::metrics::access_log::AccessLogConfig>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: Vec<SocketAddr>,
    pub threads: usize,
    pub admin: Option<SocketAddr>,
    pub name: String,
    pub shutdown_grace: Duration,
    pub upgrade_sock: std::path::PathBuf,
    pub limits: crate::proxy::guard::Limits,
    /// Lowercased hosts served; empty: all.
    pub hosts: Vec<String>,
    pub trusted_proxies: Vec<IpNet>,
    pub strip_headers: Vec<http::HeaderName>,
    pub keepalive_timeout: Duration,
    pub body_timeout: Duration,
    pub connections: crate::proxy::connection::ConnectionLimits,
}

#[derive(Debug, Clone)]
pub struct OriginPool {
    pub name: String,
    pub addresses: Vec<SocketAddr>,
    /// Lowercased hosts; empty for the default pool.
    pub hosts: Vec<String>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub health_check: Option<HealthCheck>,
    pub balance: Balance,
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
    pub ttl_cap: Duration,
    pub default_grace: Duration,
    pub honor_must_revalidate: bool,
    pub heuristic_freshness: bool,
    pub heuristic_max: Duration,
    pub lock_timeout: Duration,
    pub bypass_cookies: Vec<Regex>,
    pub bypass_authorization: bool,
    /// Normalised alias host → normalised canonical host.
    pub host_aliases: std::collections::HashMap<String, String>,
    pub disk: Option<crate::cache::disk::DiskConfig>,
}

#[derive(Debug, Clone)]
pub struct PurgeConfig {
    pub allow: Vec<IpNet>,
    pub token: Option<String>,
    pub tag_headers: Vec<http::HeaderName>,
    pub htcp: Option<crate::purge::receiver::HtcpConfig>,
    pub bus: Option<crate::purge::bus::BusConfig>,
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
