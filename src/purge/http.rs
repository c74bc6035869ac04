//! HTTP PURGE as MediaWiki sends it for `$wgCdnServers`: absolute form
//! (`PURGE http://host/wiki/X HTTP/1.1`, the form MediaWiki uses) or origin form
//! (`PURGE /wiki/X` with `Host`).

use pingora::http::RequestHeader;

use crate::cache::key::{CacheUrl, KeyError, Scheme};
use crate::cache::PurgeMode;
use crate::purge::Scope;

/// Request header asking for a soft purge: mark stale instead of deleting.
pub const SOFT_PURGE_HEADER: &str = "skua-soft-purge";

/// The URL a PURGE request names.
pub fn target(req: &RequestHeader, scheme: Scheme) -> Result<CacheUrl, KeyError> {
    // pingora keeps only the path and query of an absolute-form target in `uri` (and has
    // checked its authority against `Host`); its scheme is read from the target as sent.
    // Regression: `PURGE https://wiki.test:443/x` was read as `http://wiki.test:443/x`, which
    // names no object (the `:443` of an https URL is no part of its key).
    let raw = req.raw_path();
    if raw.first() != Some(&b'/') {
        if let Ok(target) = std::str::from_utf8(raw) {
            match CacheUrl::parse_absolute(target) {
                Err(KeyError::NotAbsolute) => {}
                parsed => return parsed,
            }
        }
    }
    let uri = &req.uri;
    if let (Some(s), Some(authority)) = (uri.scheme_str(), uri.authority()) {
        let scheme = match s {
            "http" => Scheme::Http,
            "https" => Scheme::Https,
            _ => return Err(KeyError::NotAbsolute),
        };
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        return CacheUrl::new(scheme, authority.as_str(), path);
    }
    let host = req
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .ok_or(KeyError::MissingHost)?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    CacheUrl::new(scheme, host, path)
}

/// What a PURGE request names: tags (`Surrogate-Key`), a prefix (`Skua-Purge-Prefix`) or
/// one URL.
pub fn scope(req: &RequestHeader, scheme: Scheme) -> Result<Scope, KeyError> {
    if let Some(tags) = tag_scope(req) {
        return Ok(tags);
    }
    let url = target(req, scheme)?;
    Ok(if is_prefix_ban(req) {
        Scope::Prefix(url)
    } else {
        Scope::Url(url)
    })
}

/// Request headers that turn a PURGE into a purge by tag: `Surrogate-Key` (Fastly's name)
/// and `xkey-purge` (Varnish's xkey). Their value is a space-separated list of tags.
const TAG_HEADERS: [&str; 2] = ["surrogate-key", "xkey-purge"];

/// The purge by tag a request asks for, if it names tags.
pub fn tag_scope(req: &RequestHeader) -> Option<Scope> {
    tags(req).map(|tags| Scope::Tags(tags.split_ascii_whitespace().map(str::to_string).collect()))
}

/// The tags a PURGE names, if it is a purge by tag.
pub fn tags(req: &RequestHeader) -> Option<String> {
    let mut all = String::new();
    for name in TAG_HEADERS {
        for v in req.headers.get_all(name) {
            if let Ok(v) = v.to_str() {
                all.push(' ');
                all.push_str(v);
            }
        }
    }
    (!all.trim().is_empty()).then_some(all)
}

/// Whether the request carries `Authorization: Bearer <token>`. Compared in constant time, so
/// response timing does not reveal how much of a guess was right.
pub fn bearer_matches(req: &RequestHeader, token: &str) -> bool {
    let Some(given) = req
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    let (a, b) = (given.trim().as_bytes(), token.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Request header turning a PURGE into a ban of everything under the target's host and path
/// (`PURGE / ` with it bans a whole host).
pub const PREFIX_HEADER: &str = "skua-purge-prefix";

pub fn is_prefix_ban(req: &RequestHeader) -> bool {
    matches!(
        req.headers.get(PREFIX_HEADER).map(|v| v.as_bytes()),
        Some(b"1") | Some(b"true")
    )
}

/// Delete, or expire when the request asks for a soft purge.
pub fn mode(req: &RequestHeader) -> PurgeMode {
    match req.headers.get(SOFT_PURGE_HEADER).map(|v| v.as_bytes()) {
        Some(b"1") | Some(b"true") => PurgeMode::Expire,
        _ => PurgeMode::Delete,
    }
}
