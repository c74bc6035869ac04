//! `skua check --explain URL`: what the rules would do with one request, without a server —
//! its cache key (and the rules that normalised its path and query), every rule that matches
//! it and which kinds of action each one decides, and the pool its misses would reach.

use std::fmt::Write;
use std::net::IpAddr;

use http::{HeaderMap, Method};

use super::canonical::Canonical;
use super::{matches, Decision, Request, RuleSet};
use crate::cache::key::CacheUrl;
use crate::config::rules::{Answer, CacheAction};
use crate::config::{default_pool, Config};

/// The request to explain: an absolute URL, and what else the rules may read.
pub struct Asked<'a> {
    pub url: &'a str,
    pub method: Method,
    pub headers: HeaderMap,
    pub client: Option<IpAddr>,
}

/// The explanation as text, one fact per line; an error when the URL is not one Skua keys.
pub fn explain(config: &Config, asked: &Asked<'_>) -> Result<String, String> {
    let raw = CacheUrl::parse_absolute(asked.url)
        .map_err(|e| format!("not an absolute http(s) URL ({e}): {}", asked.url))?;
    let canonical = Canonical::new(
        crate::cache::key::HostAliases(config.cache.host_aliases.clone()),
        &config.rules,
    );
    let url = canonical.canonical(raw.clone());
    let set = RuleSet::new(config.rules.clone());
    let req = Request::of(&url, &asked.method, &asked.headers, asked.client);
    let mut out = String::new();
    let _ = writeln!(out, "{} {}", asked.method, asked.url);
    let _ = writeln!(out, "cache key: {}", url.primary());
    let (raw_path, raw_query) = super::path_and_query(&raw);
    let (path, query) = super::path_and_query(&url);
    // The rules the key function chose (`Canonical::normalisers`), and a line naming each
    // whose part of the URL it changed.
    let (path_normaliser, normaliser) = canonical.normalisers(raw.clone());
    for (part, rule, changed) in [
        ("path", path_normaliser, path != raw_path),
        ("query", normaliser, query != raw_query),
    ] {
        if let (Some(i), true) = (rule, changed) {
            let rule = describe(&config.rules[i], None);
            let _ = writeln!(out, "  {part} normalised by {rule}");
        }
    }
    let decision = set.decide_every_rule(&req);
    debug_assert_eq!(decision, set.decide(&req));
    let mut any = false;
    for (i, rule) in set.rules().iter().enumerate() {
        if !matches(&rule.when, &req) {
            continue;
        }
        any = true;
        let mut decides = decided_by(&set, &decision, i as u16);
        if path_normaliser == Some(i) {
            decides.push("normalize_path".to_string());
        }
        if normaliser == Some(i) {
            decides.push("normalize_query".to_string());
        }
        let decides = if decides.is_empty() {
            "decides nothing: earlier rules did".to_string()
        } else {
            decides.join(", ")
        };
        let _ = writeln!(out, "matches {}: {decides}", describe(rule, Some(i)));
    }
    if !any {
        let _ = writeln!(out, "no rule matches");
    }
    let pool = match decision.route.and_then(|r| set.rule(r).actions.route) {
        Some(routed) => routed,
        None => default_pool(config.origins.iter().map(|p| p.hosts.as_slice()), &url.host),
    };
    if let Some(pool) = config.origins.get(pool) {
        let _ = writeln!(
            out,
            "pool: {} ({} addresses)",
            pool.name,
            pool.targets.len()
        );
    }
    Ok(out)
}

fn describe(rule: &crate::config::rules::Rule, index: Option<usize>) -> String {
    let line = rule
        .line
        .map(|l| format!(" (line {l})"))
        .unwrap_or_default();
    let index = index.map(|i| format!("rule[{i}] ")).unwrap_or_default();
    format!("{index}{:?}{line}", rule.name)
}

/// What rule `index` decides in `decision`, in words.
fn decided_by(set: &RuleSet, decision: &Decision, index: u16) -> Vec<String> {
    let actions = &set.rule(index).actions;
    let mut out = Vec::new();
    if decision.route == Some(index) {
        out.push("route".to_string());
    }
    if decision.cache == Some(index) {
        out.push(match actions.cache {
            Some(CacheAction::Pass) => "pass".to_string(),
            Some(CacheAction::Ttl { ttl, .. }) => {
                format!("ttl {}", humantime::format_duration(ttl))
            }
            None => "cache".to_string(),
        });
    }
    if decision.answer == Some(index) {
        out.push(match &actions.answer {
            Some(Answer::Deny { status, .. }) => format!("deny {status}"),
            Some(Answer::Redirect { status, .. }) => format!("redirect {status}"),
            None => "answer".to_string(),
        });
    }
    if decision.request_headers == Some(index) {
        out.push("request_headers".to_string());
    }
    if decision.response_headers == Some(index) {
        out.push("response_headers".to_string());
    }
    if decision.rate_limit == Some(index) {
        let origin_only = actions.rate_limit.is_some_and(|l| l.origin_only);
        out.push(
            if origin_only {
                "rate_limit (origin only)"
            } else {
                "rate_limit"
            }
            .to_string(),
        );
    }
    if decision.max_body_bytes == Some(index) {
        out.push(match actions.max_body_bytes.and_then(|l| l.bytes) {
            Some(bytes) => format!("max_body_bytes {bytes}"),
            None => "max_body_bytes unlimited".to_string(),
        });
    }
    out
}
