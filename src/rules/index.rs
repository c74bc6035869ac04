//! Which rules a request can match before any is tried: by its host (the names rules list
//! exactly) and then by the first segment of its path (`w` in `/w/load.php`), when a rule's
//! path conditions pin that segment. A MediaWiki rule set names a dozen paths under `/w/` and
//! `/wiki/`; a request for `/static/x.css` then tries only the rules that can see any path,
//! not all thirty (benches/README.md §15). Deciding which candidate applies belongs to
//! `super::RuleSet`; matching a condition, to `super::matches`.

use std::collections::{BTreeSet, HashMap};
use std::hash::BuildHasherDefault;

use crate::cache::fx::FxLike;

use crate::config::rules::{HostPattern, PathPattern, Rule};

type FxLikeMap<V> = HashMap<Box<str>, V, BuildHasherDefault<FxLike>>;

pub struct Index {
    by_host: FxLikeMap<Paths>,
    /// For every host no rule names exactly.
    other_hosts: Paths,
}

/// Rules, in order, by the first segment of the path.
struct Paths {
    by_segment: FxLikeMap<Vec<u16>>,
    /// For every path whose first segment no rule pins (and for a path without a `/`).
    other_segments: Vec<u16>,
}

impl Index {
    /// The index of the rules for which `acting` holds (the others decide nothing).
    pub fn new(rules: &[Rule], acting: impl Fn(usize) -> bool) -> Index {
        let exact = |rule: &Rule| -> Vec<String> {
            let hosts = rule.when.hosts.iter();
            let names = hosts.filter_map(|h| match h {
                HostPattern::Exact(name) => Some(name.clone()),
                _ => None,
            });
            names.collect()
        };
        // A rule that lists only exact names can apply to those hosts alone.
        let only_exact = |rule: &Rule| {
            !rule.when.hosts.is_empty()
                && (rule.when.hosts.iter()).all(|h| matches!(h, HostPattern::Exact(_)))
        };
        let other_hosts: Vec<u16> = (0..rules.len())
            .filter(|i| acting(*i) && !only_exact(&rules[*i]))
            .map(|i| i as u16)
            .collect();
        let mut by_host = FxLikeMap::default();
        for name in rules.iter().flat_map(exact) {
            if by_host.contains_key(name.as_str()) {
                continue;
            }
            let applicable = (0..rules.len())
                .filter(|i| {
                    let hosts = &rules[*i].when.hosts;
                    acting(*i) && (hosts.is_empty() || hosts.iter().any(|h| h.matches(&name)))
                })
                .map(|i| i as u16)
                .collect();
            by_host.insert(name.into_boxed_str(), Paths::new(rules, applicable));
        }
        Index {
            by_host,
            other_hosts: Paths::new(rules, other_hosts),
        }
    }

    /// The rules, in order, that a request for `path` at `host` (lowercased, without its port)
    /// can match: every other rule fails on its host or its path.
    pub fn candidates(&self, host: &str, path: &str) -> &[u16] {
        let paths = self.by_host.get(host).unwrap_or(&self.other_hosts);
        let listed = first_segment(path).and_then(|s| paths.by_segment.get(s));
        listed.unwrap_or(&paths.other_segments)
    }
}

impl Paths {
    fn new(rules: &[Rule], candidates: Vec<u16>) -> Paths {
        let pinned: Vec<Option<Vec<&str>>> = (candidates.iter())
            .map(|i| pinned_segments(&rules[*i as usize].when.paths))
            .collect();
        let names: BTreeSet<&str> = pinned.iter().flatten().flatten().copied().collect();
        let for_segment = |name: Option<&str>| -> Vec<u16> {
            (candidates.iter().zip(&pinned))
                .filter(|(_, pins)| match (pins, name) {
                    (None, _) => true,
                    (Some(segments), Some(name)) => segments.contains(&name),
                    (Some(_), None) => false,
                })
                .map(|(i, _)| *i)
                .collect()
        };
        Paths {
            by_segment: (names.iter())
                .map(|name| (Box::from(*name), for_segment(Some(name))))
                .collect(),
            other_segments: for_segment(None),
        }
    }
}

/// The first segment of `path`: what lies between its leading `/` and the next (`""` for
/// `/`). `None` for a path that does not start with `/` (`*` of `OPTIONS *`).
fn first_segment(path: &str) -> Option<&str> {
    let rest = path.strip_prefix('/')?;
    let end = (rest.bytes()).position(|b| b == b'/').unwrap_or(rest.len());
    Some(&rest[..end])
}

/// The first segments a path must have for one of `paths` to match it; `None` when a path
/// with any first segment may match (no path condition, or one that does not pin it, as the
/// prefix `/wp-admin` does not: `/wp-admin.php` has another segment).
fn pinned_segments(paths: &[PathPattern]) -> Option<Vec<&str>> {
    if paths.is_empty() {
        return None;
    }
    (paths.iter())
        .map(|p| match p {
            PathPattern::Exact(path) | PathPattern::Script(path) => first_segment(path),
            PathPattern::Prefix(prefix) => segment_of_prefix(prefix),
            PathPattern::Regex(regex) => segment_of_prefix(regex.prefix()),
        })
        .collect()
}

/// The first segment of every path that starts with `prefix`, when `prefix` says it: it has
/// a `/` after its first.
fn segment_of_prefix(prefix: &str) -> Option<&str> {
    let rest = prefix.strip_prefix('/')?;
    let end = memchr::memchr(b'/', rest.as_bytes())?;
    Some(&rest[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_segment_is_pinned_only_when_every_matching_path_has_it() {
        assert_eq!(first_segment("/w/load.php"), Some("w"));
        assert_eq!(first_segment("/wiki"), Some("wiki"));
        assert_eq!(first_segment("/"), Some(""));
        assert_eq!(first_segment("*"), None);
        assert_eq!(segment_of_prefix("/w/"), Some("w"));
        assert_eq!(segment_of_prefix("/wiki/Special:"), Some("wiki"));
        assert_eq!(segment_of_prefix("/wp-admin"), None);
        assert_eq!(segment_of_prefix("/"), None);
        assert_eq!(segment_of_prefix(""), None);
    }
}
