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
    /// The rules that normalise the path, in order, with their index among all rules.
    path: Vec<(usize, Conditions, PathNormalization)>,
    /// The rules that normalise the query, in order, with their index among all rules.
    query: Vec<(usize, Conditions, QueryNormalization)>,
}

impl Canonical {
    pub fn new(aliases: HostAliases, rules: &[Rule]) -> Canonical {
        let path = (rules.iter().enumerate())
            .filter_map(|(i, r)| Some((i, r.when.clone(), r.actions.normalize_path?)))
            .collect();
        let query = (rules.iter().enumerate())
            .filter_map(|(i, r)| Some((i, r.when.clone(), r.actions.normalize_query.clone()?)))
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
            if let Some((_, PathNormalization::MediaWiki)) = self.path_rule(&url) {
                if let std::borrow::Cow::Owned(spelled) = path::mediawiki(&url.path_and_query) {
                    url.path_and_query = spelled;
                }
            }
        }
        // Without a `?` there is no query to normalise: most page views ask nothing more.
        if self.query.is_empty() || super::query_start(&url.path_and_query).is_none() {
            return url;
        }
        let (path, query) = super::path_and_query(&url);
        let how = self.query_rule(&url).map(|(_, how)| how);
        if let Some(normal) = how.and_then(|how| query::normalize(query, how)) {
            // The path as it is, not as the rules read it (`rule_path`).
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

    /// The indices of the rules that normalise `raw`'s path and its query (the query's as
    /// read after the path's normalisation), whether or not they change anything: what
    /// `--explain` names.
    pub fn normalisers(&self, raw: CacheUrl) -> (Option<usize>, Option<usize>) {
        let mut url = self.aliases.canonical(raw);
        let path = self.path_rule(&url);
        if let Some((_, PathNormalization::MediaWiki)) = path {
            if let std::borrow::Cow::Owned(spelled) = path::mediawiki(&url.path_and_query) {
                url.path_and_query = spelled;
            }
        }
        let query = self.query_rule(&url);
        (path.map(|(i, _)| i), query.map(|(i, _)| i))
    }

    /// The first rule with `normalize_path` whose (URL-only, validated) conditions hold.
    fn path_rule(&self, url: &CacheUrl) -> Option<(usize, PathNormalization)> {
        let req = Request::of(url, &Method::GET, &*NO_FIELDS, None);
        (self.path.iter())
            .find(|(_, when, _)| url_conditions_hold(when, &req))
            .map(|(i, _, how)| (*i, *how))
    }

    /// The first rule with `normalize_query` whose (URL-only, validated) conditions hold.
    fn query_rule(&self, url: &CacheUrl) -> Option<(usize, &QueryNormalization)> {
        let req = Request::of(url, &Method::GET, &*NO_FIELDS, None);
        (self.query.iter())
            .find(|(_, when, _)| url_conditions_hold(when, &req))
            .map(|(i, _, how)| (*i, how))
    }
}
