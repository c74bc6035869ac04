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
pub mod path;
pub mod query;
pub mod rate;

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use http::Method;

use crate::cache::fields::RequestFields;
use crate::cache::key::CacheUrl;
use crate::cache::memory::UrlMemo;
use crate::config::network::Network;
use crate::config::rules::{CacheAction, Conditions, PathPattern, Rule};

/// The request a rule set decides for.
pub struct Request<'a, F: ?Sized> {
    /// The canonical host, lowercased, without its port.
    pub host: &'a str,
    /// The path, without the query, as the rules read it ([`rule_path`]).
    pub path: Cow<'a, str>,
    /// The query, without its `?`.
    pub query: &'a str,
    pub method: &'a Method,
    pub fields: &'a F,
    /// The client's address (the forwarded one, when a trusted proxy relayed the request).
    pub client: Option<IpAddr>,
}

/// What a request asks besides its URL: what the conditions other than host, path and query
/// read.
pub struct Asked<'a, F: ?Sized> {
    pub method: &'a Method,
    pub fields: &'a F,
    /// As [`Request::client`].
    pub client: Option<IpAddr>,
    /// `false` when the request is known to carry no `Cookie` field: no cookie condition
    /// holds, and none is looked for.
    pub cookies: bool,
}

/// Where the first `?` of a request target is, eight bytes at a time: a page's path is a few
/// dozen bytes, too short for a vectorised search's setup to pay and long enough for a loop
/// over its bytes to cost (both measured, benches/README.md §16).
pub fn query_start(target: &str) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH_BITS: u64 = 0x8080_8080_8080_8080;
    let mut words = target.as_bytes().chunks_exact(8);
    let mut at = 0;
    for word in &mut words {
        let mut eight = [0u8; 8];
        eight.copy_from_slice(word);
        // A `?` byte becomes zero; of the bytes marked, the lowest (the first in the target)
        // is always one that was zero (a borrow only marks bytes above it).
        let x = u64::from_le_bytes(eight) ^ (ONES * u64::from(b'?'));
        let zeros = x.wrapping_sub(ONES) & !x & HIGH_BITS;
        if zeros != 0 {
            return Some(at + (zeros.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    (words.remainder().iter())
        .position(|&b| b == b'?')
        .map(|i| at + i)
}

/// `path` as every rule's path condition reads it: an encoded slash (`%2F`) as `/`, then each
/// run of `/` as one. nginx (`merge_slashes`, on by default), Apache and PHP's server all map
/// `//w//api.php` to what serves `/w/api.php`, and nginx and PHP's server decode `/w%2Fapi.php`
/// to it too (with the dot segments a decoded slash may make, `/w/x%2F..%2Fapi.php`), so a
/// rule that limits, routes or denies `/w/api.php` must see it there too. Regressions: against
/// such an origin `//w/api.php`, then `/w%2Fapi.php`, passed config/mediawiki.toml's API rate
/// limit and went to the readers' pool. The key and what the origin is sent keep the slashes
/// and the escapes (`cache::target`).
pub fn rule_path(path: &str) -> Cow<'_, str> {
    let bytes = path.as_bytes();
    let encoded_slash = memchr::memchr(b'%', bytes).is_some()
        && bytes
            .windows(3)
            .any(|w| w[0] == b'%' && w[1] == b'2' && w[2].eq_ignore_ascii_case(&b'f'));
    if !encoded_slash && memchr::memmem::find(bytes, b"//").is_none() {
        return Cow::Borrowed(path);
    }
    let decoded: Cow<'_, str> = if encoded_slash {
        let slashes = path.replace("%2F", "/").replace("%2f", "/");
        Cow::Owned(crate::cache::target::normalize(&slashes).into_owned())
    } else {
        Cow::Borrowed(path)
    };
    let mut merged = String::with_capacity(decoded.len());
    for c in decoded.chars() {
        if !(c == '/' && merged.ends_with('/')) {
            merged.push(c);
        }
    }
    Cow::Owned(merged)
}

/// `url`'s path, and its query without the `?`.
pub fn path_and_query(url: &CacheUrl) -> (&str, &str) {
    let whole = url.path_and_query.as_str();
    match query_start(whole) {
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
            path: rule_path(path),
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

/// A rule's `response_headers` as a hit's written head takes them (`crate::proxy::edit::wire`).
pub struct WireEdits {
    /// The fields removed or replaced: of `remove`, then of `set`.
    pub lines: Vec<FieldLine>,
    /// The lines `set` then `append` add, `Name: value\r\n` each, and the blank line that
    /// ends the head, written once here.
    pub added: Vec<u8>,
}

impl WireEdits {
    pub fn new(edits: Option<&crate::config::rules::HeaderEdits>) -> WireEdits {
        let Some(edits) = edits else {
            return WireEdits {
                lines: Vec::new(),
                added: b"\r\n".to_vec(),
            };
        };
        let replaced = edits.remove.iter().chain(edits.set.iter().map(|(n, _)| n));
        let mut added = Vec::new();
        for (name, value) in edits.set.iter().chain(&edits.append) {
            added.extend_from_slice(crate::cache::meta::wire_name(name).as_bytes());
            added.extend_from_slice(b": ");
            added.extend_from_slice(value.as_bytes());
            added.extend_from_slice(b"\r\n");
        }
        added.extend_from_slice(b"\r\n");
        WireEdits {
            lines: replaced.map(FieldLine::new).collect(),
            added,
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
    pub max_body_bytes: Option<u16>,
}

impl Decision {
    /// Whether a fast path may answer this request from memory, with the response edits
    /// applied: no rule answers it, limits its hits or edits the request (whose fields may
    /// name the variant), and `set` does not pass it. A route, a lifetime and a limit on
    /// what goes to the origin matter to misses.
    pub fn lets_a_fast_path_answer(&self, set: &RuleSet) -> bool {
        self.answer.is_none()
            && self.limits_at_origin_only(set)
            && self.request_headers.is_none()
            && !self.passes(set)
    }

    /// Whether the rate limit deciding this request (if any) counts only requests that go
    /// to the origin (`origin_only`), so that a hit is answered whatever the rate.
    pub fn limits_at_origin_only(&self, set: &RuleSet) -> bool {
        self.rate_limit
            .is_none_or(|i| (set.rule(i).actions.rate_limit).is_none_or(|limit| limit.origin_only))
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
            ("max_body_bytes", self.max_body_bytes),
        ]
        .iter()
        .filter_map(|(kind, i)| Some(format!("{kind}:{}", set.rule((*i)?).name)))
        .collect()
    }

    /// Whether a rule says this request is never cached.
    pub fn passes(&self, set: &RuleSet) -> bool {
        (self.cache).is_some_and(|i| set.rule(i).actions.cache == Some(CacheAction::Pass))
    }

    /// Where the rule deciding `kind` (one of the kinds below) goes.
    fn slot(&mut self, kind: u8) -> &mut Option<u16> {
        match kind {
            ROUTE => &mut self.route,
            CACHE => &mut self.cache,
            ANSWER => &mut self.answer,
            REQUEST_HEADERS => &mut self.request_headers,
            RESPONSE_HEADERS => &mut self.response_headers,
            RATE_LIMIT => &mut self.rate_limit,
            // BODY_LIMIT
            _ => &mut self.max_body_bytes,
        }
    }

    /// The lifetime and grace a rule gives what this request stores, if one does.
    pub fn ttl(&self, set: &RuleSet) -> Option<(Duration, Option<Duration>)> {
        match set.rule(self.cache?).actions.cache {
            Some(CacheAction::Ttl { ttl, grace }) => Some((ttl, grace)),
            _ => None,
        }
    }

    /// The request body's limit: the deciding rule's `max_body_bytes`, else `server`'s
    /// (`[server] max_body_bytes`); `None`: no limit.
    pub fn max_body_bytes(&self, set: &RuleSet, server: Option<u64>) -> Option<u64> {
        match self
            .max_body_bytes
            .and_then(|i| set.rule(i).actions.max_body_bytes)
        {
            Some(limit) => limit.bytes,
            None => server,
        }
    }
}

const ROUTE: u8 = 1;
const CACHE: u8 = 2;
const ANSWER: u8 = 4;
const REQUEST_HEADERS: u8 = 8;
const RESPONSE_HEADERS: u8 = 16;
const RATE_LIMIT: u8 = 32;
const BODY_LIMIT: u8 = 64;

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
        (a.max_body_bytes.is_some(), BODY_LIMIT),
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
    /// For each rule, its `response_headers` for a hit's written head.
    wire_edits: Vec<WireEdits>,
    /// For each rule, its conditions on the request itself, if it has some.
    asked: Vec<Option<AskedConditions>>,
    /// The mark of this rule set's words in a stored object's [`UrlMemo`], if it can keep one.
    generation: Option<u64>,
    limiter: rate::Limiter,
}

// Which rules' URL conditions (host, path, query) hold for one stored object's URL is kept
// beside the object (its `UrlMemo`) by the rule set that read them: a hit of that object then
// reads only the rules whose URL conditions hold, and of those only the conditions on the
// request itself (method, fields, client). Most rules of a wiki's set name paths; their
// conditions are read once per object and rule set, not once per hit.
//
// The word: the rule set's generation in the high `GENERATION_BITS`, and a bit per rule in
// the rest, so that a rule set of up to `URL_MATCH_RULES` rules can keep one. A word written
// by another rule set (the one before a reload) is not read; nor is a word of a generation
// that wrapped round, unless the object outlived a million reloads of the rules.

const GENERATION_BITS: u32 = 20;
const URL_MATCH_RULES: usize = 64 - GENERATION_BITS as usize;
const URL_MATCH_MASK: u64 = (1 << URL_MATCH_RULES) - 1;

/// The next rule set's generation, 1 ..= 2^20 - 1 (0 is an object's word before any rule set
/// wrote one).
fn next_generation() -> u64 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    u64::from(n % ((1 << GENERATION_BITS) - 1)) + 1
}

/// A rule's conditions on the request itself (not its URL), for the rules that have some.
struct AskedConditions {
    methods: Box<[Method]>,
    /// The `client` networks, as masks.
    nets: Box<[Network]>,
    /// Header conditions, read from the rule's `Conditions`.
    headers: bool,
    /// Cookie conditions, read from the rule's `Conditions`.
    cookies: bool,
}

impl AskedConditions {
    fn of(when: &Conditions) -> Option<AskedConditions> {
        let (headers, cookies) = (!when.headers.is_empty(), !when.cookies.is_empty());
        let any = !when.methods.is_empty() || !when.clients.is_empty() || headers || cookies;
        any.then(|| AskedConditions {
            methods: when.methods.clone().into(),
            nets: when.clients.iter().map(Network::of).collect(),
            headers,
            cookies,
        })
    }
}

impl RuleSet {
    pub fn new(rules: Vec<Rule>) -> RuleSet {
        let kinds: Vec<u8> = rules.iter().map(kinds_of).collect();
        let all_kinds = kinds.iter().fold(0, |all, k| all | k);
        let index = index::Index::new(&rules, |i| kinds[i] != 0);
        let reads_client =
            (rules.iter()).any(|r| !r.when.clients.is_empty() || r.actions.rate_limit.is_some());
        let wire_edits = (rules.iter())
            .map(|rule| WireEdits::new(rule.actions.response_headers.as_ref()))
            .collect();
        let gates = rules.iter().map(|r| PathGate::of(&r.when.paths)).collect();
        let asked = rules.iter().map(|r| AskedConditions::of(&r.when)).collect();
        let generation = (rules.len() <= URL_MATCH_RULES).then(next_generation);
        RuleSet {
            gates,
            asked,
            generation,
            rules,
            kinds,
            all_kinds,
            index,
            reads_client,
            wire_edits,
            limiter: rate::Limiter::new(),
        }
    }

    /// Whether some rule acts on requests (query normalisation aside, which the canonical key
    /// function applies): without one, [`RuleSet::decide`] decides nothing.
    pub fn acts(&self) -> bool {
        self.all_kinds != 0
    }

    /// The largest request body any request may send: `server`'s limit (`[server]
    /// max_body_bytes`) or a rule's above it; `None`: some request may send any. A body
    /// declared past it is refused before the rules are read.
    pub fn body_ceiling(&self, server: Option<u64>) -> Option<u64> {
        let mut ceiling = server?;
        for limit in self.rules.iter().filter_map(|r| r.actions.max_body_bytes) {
            ceiling = ceiling.max(limit.bytes?);
        }
        Some(ceiling)
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

    /// Rule `index`'s `response_headers`, for a hit's written head.
    pub fn wire_edits(&self, index: u16) -> &WireEdits {
        &self.wire_edits[index as usize]
    }

    /// Which rule decides each kind of action for `req`.
    pub fn decide<F: RequestFields + ?Sized>(&self, req: &Request<'_, F>) -> Decision {
        if self.all_kinds == 0 {
            return Decision::default();
        }
        let candidates = self.index.candidates(req.host, &req.path);
        let asked = Asked {
            method: req.method,
            fields: req.fields,
            client: req.client,
            cookies: true,
        };
        self.first_of_each_kind(candidates.iter().copied(), |i| {
            self.gates[i as usize].admits(&req.path)
                && url_conditions_hold(&self.rules[i as usize].when, req)
                && self.asked_conditions_hold(i, &asked)
        })
    }

    /// [`RuleSet::decide`] for a request of `url` whose stored object keeps `memo`: the rules'
    /// URL conditions are read from `memo` when this rule set wrote it (else read, and written
    /// there), and only the request's own conditions (method, fields, client) are read.
    pub fn decide_remembering<F: RequestFields + ?Sized>(
        &self,
        memo: &UrlMemo,
        url: &CacheUrl,
        asked: &Asked<'_, F>,
    ) -> Decision {
        let request = || Request::of(url, asked.method, asked.fields, asked.client);
        let Some(generation) = self.generation else {
            return self.decide(&request());
        };
        if self.all_kinds == 0 {
            return Decision::default();
        }
        // Relaxed: the word is whole in itself, and any rule set writes the same bits for one
        // URL; which of two racing writers wins does not matter.
        let held = memo.0.load(Ordering::Relaxed);
        let matched = if held >> URL_MATCH_RULES == generation {
            held & URL_MATCH_MASK
        } else {
            let matched = self.url_matches(&request());
            memo.0
                .store(generation << URL_MATCH_RULES | matched, Ordering::Relaxed);
            matched
        };
        self.first_of_each_kind(Bits(matched), |i| self.asked_conditions_hold(i, asked))
    }

    /// One bit per rule (of a set of at most [`URL_MATCH_RULES`]) that acts and whose URL
    /// conditions hold for `req`.
    fn url_matches<F: RequestFields + ?Sized>(&self, req: &Request<'_, F>) -> u64 {
        let candidates = self.index.candidates(req.host, &req.path).iter();
        (candidates)
            .filter(|&&i| {
                self.kinds[i as usize] != 0
                    && self.gates[i as usize].admits(&req.path)
                    && url_conditions_hold(&self.rules[i as usize].when, req)
            })
            .fold(0, |bits, &i| bits | 1 << i)
    }

    /// [`RuleSet::decide`] without the index: every rule, in order. What `decide` must agree
    /// with (the property test below), and what `skua check --explain` shows.
    pub fn decide_every_rule<F: RequestFields + ?Sized>(&self, req: &Request<'_, F>) -> Decision {
        self.first_of_each_kind(0..self.rules.len() as u16, |i| {
            matches(&self.rules[i as usize].when, req)
        })
    }

    /// Whether rule `i`'s conditions on the request itself hold, as [`matches`] reads them.
    // Inlined into the loop over the rules: called apart, saving and restoring registers
    // was a quarter of its cost per rule (callgrind, benches/README.md §16).
    #[inline(always)]
    fn asked_conditions_hold<F: RequestFields + ?Sized>(
        &self,
        i: u16,
        asked: &Asked<'_, F>,
    ) -> bool {
        let Some(conditions) = &self.asked[i as usize] else {
            return true;
        };
        let AskedConditions {
            methods,
            nets,
            headers,
            cookies,
        } = conditions;
        let when = || &self.rules[i as usize].when;
        (methods.is_empty() || methods.contains(asked.method))
            && (nets.is_empty()
                || (asked.client).is_some_and(|ip| nets.iter().any(|net| net.contains(ip))))
            && (!headers || headers_hold(when(), asked.fields))
            && (!cookies || asked.cookies && cookies_hold(when(), asked.fields))
    }

    /// For each kind of action, the first of `candidates` (in rule order) that has it and
    /// for which `holds`.
    fn first_of_each_kind(
        &self,
        candidates: impl Iterator<Item = u16>,
        holds: impl Fn(u16) -> bool,
    ) -> Decision {
        let mut decision = Decision::default();
        let mut decided = 0u8;
        for i in candidates {
            let undecided = self.kinds[i as usize] & !decided;
            if undecided == 0 || !holds(i) {
                continue;
            }
            let mut left = undecided;
            while left != 0 {
                let kind = left & left.wrapping_neg();
                *decision.slot(kind) = Some(i);
                left &= left - 1;
            }
            decided |= undecided;
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
                PathPattern::Exact(p) | PathPattern::Script(p) | PathPattern::Prefix(p) => {
                    p.as_str()
                }
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

/// The rule numbers whose bits are set, lowest first.
struct Bits(u64);

impl Iterator for Bits {
    type Item = u16;

    fn next(&mut self) -> Option<u16> {
        if self.0 == 0 {
            return None;
        }
        let i = self.0.trailing_zeros() as u16;
        self.0 &= self.0 - 1;
        Some(i)
    }
}

/// Whether every condition in `when` holds for `req`.
pub fn matches<F: RequestFields + ?Sized>(when: &Conditions, req: &Request<'_, F>) -> bool {
    url_conditions_hold(when, req)
        && (when.methods.is_empty() || when.methods.contains(req.method))
        && (when.clients.is_empty()
            || req
                .client
                .is_some_and(|ip| when.clients.iter().any(|net| net.contains(&ip))))
        && fields_hold(when, req.fields)
}

/// Whether the conditions of `when` on the URL (host, path, query) hold for `req`.
fn url_conditions_hold<F: RequestFields + ?Sized>(when: &Conditions, req: &Request<'_, F>) -> bool {
    (when.hosts.is_empty() || when.hosts.iter().any(|h| h.matches(req.host)))
        && (when.paths.is_empty() || when.paths.iter().any(|p| p.matches(&req.path)))
        && when.query.iter().all(|(name, value)| {
            query::parameters(req.query).any(|(n, v)| query::names(&n, name) && value.is_match(&v))
        })
}

/// Whether the conditions of `when` on the request's fields (headers, cookies) hold.
fn fields_hold<F: RequestFields + ?Sized>(when: &Conditions, fields: &F) -> bool {
    headers_hold(when, fields) && cookies_hold(when, fields)
}

fn headers_hold<F: RequestFields + ?Sized>(when: &Conditions, fields: &F) -> bool {
    when.headers.iter().all(|(name, value)| {
        (fields.values(name.as_str()))
            .any(|v| std::str::from_utf8(v).is_ok_and(|v| value.is_match(v)))
    })
}

fn cookies_hold<F: RequestFields + ?Sized>(when: &Conditions, fields: &F) -> bool {
    (when.cookies.iter())
        .all(|(name, value)| cookies(fields).any(|(n, v)| n == name && value.is_match(v)))
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
