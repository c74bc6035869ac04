//! Skua's integration tests: one binary, the real proxy over real TCP.

mod support;

mod cache;
mod chaos;
mod config;
mod dashboard;
mod debug;
mod demo;
mod disk;
mod edge;
mod fill;
mod fleet;
mod front;
mod hot_code;
mod htcp;
mod layers;
mod mediawiki;
mod metrics;
mod proxy_protocol;
mod purge;
mod reload;
mod rules;
mod tls;
