//! Edge policy at request time: the validated `[[rule]]`s (`crate::config::rules`) compiled
//! into a [`RuleSet`] that decides, for one request, which rule applies for each kind of action
//! (route, cache, answer, request and response header edits, rate limit), and the one
//! canonical key function ([`canonical::Canonical`]) that applies host aliases and the rules'
//! query normalisation to every URL a request or a purge names. Carrying a decision out
//! (choosing the pool, answering, editing headers, storing with another lifetime) belongs to
//! `crate::proxy`.
//!
//! Order: rules are read top to bottom; for each kind of action, the first rule whose
//! conditions all hold and that has an action of that kind decides it. `deny` and `redirect`
//! are one kind (the edge answers itself), and so are `pass` and `ttl` (how the cache treats
//! the request). Query normalisation is decided by URL alone, in [`canonical`].

pub mod canonical;
pub mod explain;
mod index;
pub mod query;
pub mod rate;

use std::net::IpAddr;
use std::time::Duration;

use http::Method;

use crate::cache::fields::RequestFields;
use crate::cache::key::CacheUrl;
use crate::config::rules::{CacheAction, Conditions, PathPattern, Rule};

/// The request a rule set decides for.
pub struct Request<'a, F: ?Sized> {
    /// The canonical host, lowercased, without its port.
    pub host: &'a str,
    /// The path, without the query.
    pub path: &'a str,
    /// The query, without its `?`.
    pub query: &'a str,
    pub method: &'a Method,
    pub fields: &'a F,
    /// The client's address (the forwarded one, when a trusted proxy relayed the request).
    pub client: Option<IpAddr>,
}

/// `url`'s path, and its query without the `?`.
pub fn path_and_query(url: &CacheUrl) -> (&str, &str) {
    let whole = url.path_and_query.as_str();
    // A plain loop: for a path of a few dozen bytes, cheaper than a vectorised search's setup.
    match whole.bytes().position(|b| b == b'?') {
        // `?` is ASCII, so both sides are on character boundaries.
        Some(at) => (&whole[..at], &whole[at + 1..]),
        None => (whole, ""),
    }
}

impl<'a, F: ?Sized> Request<'a, F> {
    /// The request for `url` (its host name, path and query) with the rest as given.
    pub fn of(
        url: &'a CacheUrl,
        method: &'a Method,
        fields: &'a F,
        client: Option<IpAddr>,
    ) -> Request<'a, F> {
        let (path, query) = path_and_query(url);
        Request {
            host: url.host_name(),
            path,
            query,
            method,
            fields,
            client,
        }
    }
}

/// A field a rule's `response_headers` remove or set, as a hit's written head spells it
/// (`crate::cache::meta::wire_name`).
pub struct FieldLine {
    /// Finds `\r\n<name>:`. Built once here: building one costs more than the search.
    pub finder: memchr::memmem::Finder<'static>,
    /// Its bit in a stored object's [`crate::cache::meta::FieldNames`] (every bit for a field
    /// a hit writes itself, such as `Age`): a head whose names lack it is not searched.
    pub bit: u32,
}

impl FieldLine {
    pub fn new(name: &http::HeaderName) -> FieldLine {
        use crate::cache::meta::{wire_name, FieldNames, WRITTEN_BY_A_HIT};
        let text = format!("\r\n{}:", wire_name(name));
        FieldLine {
            finder: memchr::memmem::Finder::new(text.as_bytes()).into_owned(),
            bit: if WRITTEN_BY_A_HIT.contains(name) {
                u32::MAX
            } else {
                FieldNames::bit(name)
            },
        }
    }
}

/// For each kind of action, the index of the rule that decides it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Decision {
    pub route: Option<u16>,
    pub cache: Option<u16>,
    pub answer: Option<u16>,
    pub request_headers: Option<u16>,
    pub response_headers: Option<u16>,
    pub rate_limit: Option<u16>,
}

impl Decision {
    /// Whether a fast path may answer this request from memory, with the response edits
    /// applied: no rule answers it, limits it or edits the request (whose fields may name
    /// the variant), and `set` does not pass it. A route and a lifetime matter to misses.
    pub fn lets_a_fast_path_answer(&self, set: &RuleSet) -> bool {
        self.answer.is_none()
            && self.rate_limit.is_none()
            && self.request_headers.is_none()
            && !self.passes(set)
    }

    /// The rules that decided something, as `kind:name` (for the `Skua-Debug` explanation).
    pub fn named(&self, set: &RuleSet) -> Vec<String> {
        [
            ("route", self.route),
            ("cache", self.cache),
            ("answer", self.answer),
            ("request_headers", self.request_headers),
            ("response_headers", self.response_headers),
            ("rate_limit", self.rate_limit),
        ]
        .iter()
        .filter_map(|(kind, i)| Some(format!("{kind}:{}", set.rule((*i)?).name)))
        .collect()
    }

    /// Whether a rule says this request is never cached.
    pub fn passes(&self, set: &RuleSet) -> bool {
        (self.cache).is_some_and(|i| set.rule(i).actions.cache == Some(CacheAction::Pass))
    }

    /// The lifetime and grace a rule gives what this request stores, if one does.
    pub fn ttl(&self, set: &RuleSet) -> Option<(Duration, Option<Duration>)> {
        match set.rule(self.cache?).actions.cache {
            Some(CacheAction::Ttl { ttl, grace }) => Some((ttl, grace)),
            _ => None,
        }
    }
}

const ROUTE: u8 = 1;
const CACHE: u8 = 2;
const ANSWER: u8 = 4;
const REQUEST_HEADERS: u8 = 8;
const RESPONSE_HEADERS: u8 = 16;
const RATE_LIMIT: u8 = 32;

/// The kinds of action (other than query normalisation) `rule` has.
fn kinds_of(rule: &Rule) -> u8 {
    let a = &rule.actions;
    [
        (a.route.is_some(), ROUTE),
        (a.cache.is_some(), CACHE),
        (a.answer.is_some(), ANSWER),
        (a.request_headers.is_some(), REQUEST_HEADERS),
        (a.response_headers.is_some(), RESPONSE_HEADERS),
        (a.rate_limit.is_some(), RATE_LIMIT),
    ]
    .iter()
    .filter(|(has, _)| *has)
    .fold(0, |all, (_, kind)| all | kind)
}

/// The rules, compiled: their kinds of action, and an index of the rules a request can match
/// by its host and its path ([`index::Index`]).
pub struct RuleSet {
    rules: Vec<Rule>,
    kinds: Vec<u8>,
    /// Every kind some rule has.
    all_kinds: u8,
    index: index::Index,
    /// Some rule's conditions read the client's address.
    reads_client: bool,
    /// For each rule, the second bytes its path conditions allow.
    gates: Vec<PathGate>,
    /// For each rule, the fields its `response_headers` remove or set, for a hit's written head.
    field_lines: Vec<Vec<FieldLine>>,
    limiter: rate::Limiter,
}

impl RuleSet {
    pub fn new(rules: Vec<Rule>) -> RuleSet {
        let kinds: Vec<u8> = rules.iter().map(kinds_of).collect();
        let all_kinds = kinds.iter().fold(0, |all, k| all | k);
        let index = index::Index::new(&rules, |i| kinds[i] != 0);
        let reads_client =
            (rules.iter()).any(|r| !r.when.clients.is_empty() || r.actions.rate_limit.is_some());
        let field_lines = (rules.iter())
            .map(|rule| {
                let edits = rule.actions.response_headers.iter();
                let names = edits.flat_map(|e| e.remove.iter().chain(e.set.iter().map(|(n, _)| n)));
                names.map(FieldLine::new).collect()
            })
            .collect();
        let gates = rules.iter().map(|r| PathGate::of(&r.when.paths)).collect();
        RuleSet {
            gates,
            rules,
            kinds,
            all_kinds,
            index,
            reads_client,
            field_lines,
            limiter: rate::Limiter::new(),
        }
    }

    /// Whether some rule acts on requests (query normalisation aside, which the canonical key
    /// function applies): without one, [`RuleSet::decide`] decides nothing.
    pub fn acts(&self) -> bool {
        self.all_kinds != 0
    }

    /// Whether a decision may need the client's address, which is then worth finding.
    pub fn reads_client(&self) -> bool {
        self.reads_client
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn rule(&self, index: u16) -> &Rule {
        &self.rules[index as usize]
    }

    /// The fields rule `index`'s `response_headers` remove or set, in the order of `remove`
    /// then `set`.
    pub fn field_lines(&self, index: u16) -> &[FieldLine] {
        &self.field_lines[index as usize]
    }

    /// Which rule decides each kind of action for `req`.
    pub fn decide<F: RequestFields + ?Sized>(&self, req: &Request<'_, F>) -> Decision {
        if self.all_kinds == 0 {
            return Decision::default();
        }
        let candidates = self.index.candidates(req.host, req.path);
        self.first_of_each_kind(candidates.iter().copied(), req, true)
    }

    /// [`RuleSet::decide`] without the index: every rule, in order. What `decide` must agree
    /// with (the property test below), and what `skua check --explain` shows.
    pub fn decide_every_rule<F: RequestFields + ?Sized>(&self, req: &Request<'_, F>) -> Decision {
        self.first_of_each_kind(0..self.rules.len() as u16, req, false)
    }

    fn first_of_each_kind<F: RequestFields + ?Sized>(
        &self,
        candidates: impl Iterator<Item = u16>,
        req: &Request<'_, F>,
        gated: bool,
    ) -> Decision {
        let mut decision = Decision::default();
        let mut decided = 0u8;
        for i in candidates {
            let kinds = self.kinds[i as usize];
            let gate = || !gated || self.gates[i as usize].admits(req.path);
            if kinds & !decided == 0 || !gate() || !matches(&self.rules[i as usize].when, req) {
                continue;
            }
            let slots = [
                (ROUTE, &mut decision.route),
                (CACHE, &mut decision.cache),
                (ANSWER, &mut decision.answer),
                (REQUEST_HEADERS, &mut decision.request_headers),
                (RESPONSE_HEADERS, &mut decision.response_headers),
                (RATE_LIMIT, &mut decision.rate_limit),
            ];
            for (kind, slot) in slots {
                if kinds & kind != 0 && decided & kind == 0 {
                    *slot = Some(i);
                }
            }
            decided |= kinds;
            if decided == self.all_kinds {
                break;
            }
        }
        decision
    }

    /// How long a client limited by rule `index` must wait, if it must: one token of its
    /// bucket is taken otherwise.
    pub fn limited(&self, index: u16, client: Option<IpAddr>) -> Option<Duration> {
        let limit = self.rule(index).actions.rate_limit?;
        // A request with no address (never over TCP) shares one bucket.
        let client = client.unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
        self.limiter.take(index, client, limit)
    }
}

/// The second byte a path must have for one of a rule's path conditions to hold (`w` of the
/// prefix `/wp-admin`), as a set of 256 bits: one test turns away a path the conditions' few
/// comparisons each would. `None` when a condition allows any, or a path of one byte.
struct PathGate(Option<[u64; 4]>);

impl PathGate {
    fn of(paths: &[PathPattern]) -> PathGate {
        if paths.is_empty() {
            return PathGate(None);
        }
        let mut bits = [0u64; 4];
        for path in paths {
            let literal = match path {
                PathPattern::Exact(p) | PathPattern::Prefix(p) => p.as_str(),
                PathPattern::Regex(re) => re.prefix(),
            };
            let Some(&second) = literal.as_bytes().get(1) else {
                return PathGate(None);
            };
            bits[usize::from(second >> 6)] |= 1 << (second & 63);
        }
        PathGate(Some(bits))
    }

    fn admits(&self, path: &str) -> bool {
        let Some(bits) = &self.0 else { return true };
        (path.as_bytes().get(1)).is_some_and(|b| bits[usize::from(b >> 6)] >> (b & 63) & 1 == 1)
    }
}

/// Whether every condition in `when` holds for `req`.
pub fn matches<F: RequestFields + ?Sized>(when: &Conditions, req: &Request<'_, F>) -> bool {
    (when.hosts.is_empty() || when.hosts.iter().any(|h| h.matches(req.host)))
        && (when.paths.is_empty() || when.paths.iter().any(|p| p.matches(req.path)))
        && (when.methods.is_empty() || when.methods.contains(req.method))
        && (when.clients.is_empty()
            || req
                .client
                .is_some_and(|ip| when.clients.iter().any(|net| net.contains(&ip))))
        && when.query.iter().all(|(name, value)| {
            query::parameters(req.query).any(|(n, v)| n == name && value.is_match(v))
        })
        && when.headers.iter().all(|(name, value)| {
            (req.fields.values(name.as_str()))
                .any(|v| std::str::from_utf8(v).is_ok_and(|v| value.is_match(v)))
        })
        && when
            .cookies
            .iter()
            .all(|(name, value)| cookies(req.fields).any(|(n, v)| n == name && value.is_match(v)))
}

/// The groups of the first path regex of `when` that matches `path`: what a redirect's
/// `{1}`..`{9}` are.
pub fn path_groups<'p>(when: &Conditions, path: &'p str) -> Vec<&'p str> {
    let regex = when.paths.iter().find_map(|p| match p {
        PathPattern::Regex(re) => re.regex.captures(path),
        _ => None,
    });
    regex.map_or_else(Vec::new, |caps| {
        (caps.iter().map(|g| g.map_or("", |m| m.as_str()))).collect()
    })
}

/// Every cookie of the request's `Cookie` fields, as (name, value).
fn cookies<F: RequestFields + ?Sized>(fields: &F) -> impl Iterator<Item = (&str, &str)> {
    (fields.values("cookie"))
        .filter_map(|v| std::str::from_utf8(v).ok())
        .flat_map(|line| line.split(';'))
        .map(|pair| {
            let pair = pair.trim();
            pair.split_once('=').unwrap_or((pair, ""))
        })
}

#[cfg(test)]
mod tests;
