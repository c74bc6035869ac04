//! The one canonical key function: every URL a request, an HTTP PURGE, an HTCP CLR or the
//! admin API names goes through [`Canonical::canonical`], so that spellings that are one
//! object are one key: `[cache] host_aliases`, then the first `[[rule]]` with
//! `normalize_path` whose (URL-only) conditions hold, then the first with `normalize_query`.
//! A PURGE of the raw URL and of the normalised one therefore remove the same object.

use http::Method;

use super::{path, query, url_conditions_hold, Request};
use crate::cache::key::{CacheUrl, HostAliases};
use crate::config::rules::{Conditions, PathNormalization, QueryNormalization, Rule};

/// What the conditions of a URL-only rule are read with: no fields.
static NO_FIELDS: std::sync::LazyLock<http::HeaderMap> =
    std::sync::LazyLock::new(http::HeaderMap::new);

#[derive(Debug, Clone, Default)]
pub struct Canonical {
    pub aliases: HostAliases,
    /// The rules that normalise the path, in order.
    path: Vec<(Conditions, PathNormalization)>,
    /// The rules that normalise the query, in order.
    query: Vec<(Conditions, QueryNormalization)>,
}

impl Canonical {
    pub fn new(aliases: HostAliases, rules: &[Rule]) -> Canonical {
        let path = (rules.iter())
            .filter_map(|r| Some((r.when.clone(), r.actions.normalize_path?)))
            .collect();
        let query = (rules.iter())
            .filter_map(|r| Some((r.when.clone(), r.actions.normalize_query.clone()?)))
            .collect();
        Canonical {
            aliases,
            path,
            query,
        }
    }

    pub fn canonical(&self, url: CacheUrl) -> CacheUrl {
        let mut url = self.aliases.canonical(url);
        if !self.path.is_empty() && path::may_respell(&url.path_and_query) {
            let req = Request::of(&url, &Method::GET, &*NO_FIELDS, None);
            // URL-only conditions (validated): nothing else of the request is read.
            let how = (self.path.iter()).find(|(when, _)| url_conditions_hold(when, &req));
            if let Some((_, PathNormalization::MediaWiki)) = how {
                if let std::borrow::Cow::Owned(spelled) = path::mediawiki(&url.path_and_query) {
                    url.path_and_query = spelled;
                }
            }
        }
        // Without a `?` there is no query to normalise: most page views ask nothing more.
        if self.query.is_empty() || super::query_start(&url.path_and_query).is_none() {
            return url;
        }
        // The conditions read the URL only (validated), so the request's other parts are
        // never asked for.
        let req = Request::of(&url, &Method::GET, &*NO_FIELDS, None);
        let how = (self.query.iter()).find(|(when, _)| url_conditions_hold(when, &req));
        if let Some(normal) = how.and_then(|(_, how)| query::normalize(req.query, how)) {
            // The path as it is, not as the rules read it (`rule_path`).
            let (path, _) = super::path_and_query(&url);
            let mut rebuilt = String::with_capacity(path.len() + 1 + normal.len());
            rebuilt.push_str(path);
            if !normal.is_empty() {
                rebuilt.push('?');
                rebuilt.push_str(&normal);
            }
            url.path_and_query = rebuilt;
        }
        url
    }
}
