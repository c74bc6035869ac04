//! Skua: a caching reverse proxy for wikis, on pingora.
//!
//! - [`config`]: the TOML file and its validation;
//! - [`proxy`]: the request path;
//! - [`cache`]: key, policy, Vary and storage tiers;
//! - [`rules`]: edge policy (`[[rule]]`) at request time, and the canonical key function;
//! - [`purge`]: who may purge and how targets are read;
//! - [`upstream`]: origin pools and health checks;
//! - [`metrics`] and [`admin`]: what Skua shows operators;
//! - [`server`]: assembling the services; [`demo`]: the sample wiki;
//! - `test_hooks`: delays the integration tests set through the environment.

// `deny`, not `forbid`, so that one module may allow it: src/cache/disk/mapped.rs maps the disk
// tier's segments, and its opening comment says why that is sound. Nothing else may.
#![deny(unsafe_code)]

pub mod admin;
pub mod cache;
pub mod config;
pub mod demo;
pub mod metrics;
pub mod proxy;
pub mod purge;
pub mod rules;
pub mod server;
mod test_hooks;
pub mod upstream;
