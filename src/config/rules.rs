//! `[[rule]]`, validated: the edge policy an operator writes instead of VCL, as typed
//! conditions and actions. Every pattern is compiled, every pool name resolved and every
//! combination that cannot mean what it says refused here, with its line, so that a rule set
//! that loads is one the request path can apply without a runtime error. Matching requests
//! against the rules belongs to `crate::rules`.

use std::collections::BTreeMap;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use ipnet::IpNet;
use regex::Regex;

use super::file::{HeaderEditsFile, MatchFile, RuleFile};
use super::literals::Literals;
use super::validate::{compile, networks, Checker, Seg};
use super::OriginPool;

/// One `[[rule]]`.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Its `name`, or `rule[N]`.
    pub name: String,
    /// Its line in the file, when known.
    pub line: Option<usize>,
    pub when: Conditions,
    pub actions: Actions,
}

/// What a request must be for a rule to apply: every list given holds (any of its entries).
#[derive(Debug, Clone, Default)]
pub struct Conditions {
    pub hosts: Vec<HostPattern>,
    pub paths: Vec<PathPattern>,
    pub methods: Vec<Method>,
    /// Parameters that must be present, with a value the pattern matches.
    pub query: Vec<(String, Regex)>,
    /// Fields that must be present, with a value the pattern matches.
    pub headers: Vec<(HeaderName, Regex)>,
    /// Cookies that must be present, with a value the pattern matches.
    pub cookies: Vec<(String, Regex)>,
    pub clients: Vec<IpNet>,
}

impl Conditions {
    /// Whether they read only the URL (host, path, query): what a purge names as well as a
    /// request, so that a decision made on them is the same for both.
    pub fn url_only(&self) -> bool {
        self.methods.is_empty()
            && self.headers.is_empty()
            && self.cookies.is_empty()
            && self.clients.is_empty()
    }
}

/// A host condition, matched against the request's host without its port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// One name, lowercased.
    Exact(String),
    /// `*.parent`: every name that ends with `.parent` (any depth), held as `.parent`.
    Under(String),
    /// `*`.
    Any,
}

impl HostPattern {
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(name) => name == host,
            HostPattern::Under(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
            HostPattern::Any => true,
        }
    }
}

/// A path condition, matched against the path without the query (after Skua's target
/// normalisation, the path the cache key holds).
#[derive(Debug, Clone)]
pub enum PathPattern {
    Exact(String),
    /// An exact path naming a script (`/w/api.php`): it, and it followed by path info
    /// (`/w/api.php/x`), which runs the same script. RFC 3875 §4.1.5: the part of a path
    /// after the script's name is the script's `PATH_INFO`; Apache (`AcceptPathInfo`, on for
    /// script handlers), PHP-FPM behind nginx's `fastcgi_split_path_info` and PHP's own
    /// server all run `api.php` for `/w/api.php/x`, so a limit on the exact path alone would
    /// be passed by any client adding `/x`.
    Script(String),
    Prefix(String),
    Regex(PathRegex),
}

/// What a file name ends in when its server runs it as a script that takes path info.
const SCRIPT_EXTENSIONS: [&str; 9] = [
    ".php", ".phtml", ".cgi", ".fcgi", ".pl", ".py", ".asp", ".aspx", ".jsp",
];

impl PathPattern {
    /// The condition for the exact path `path`: [`PathPattern::Script`] when its last
    /// segment names a script, else [`PathPattern::Exact`].
    pub fn exact(path: String) -> PathPattern {
        let name = path.rsplit('/').next().unwrap_or_default();
        let names_script = SCRIPT_EXTENSIONS.iter().any(|ext| {
            name.len() > ext.len()
                && (name.get(name.len() - ext.len()..)).is_some_and(|e| e.eq_ignore_ascii_case(ext))
        });
        match names_script {
            true => PathPattern::Script(path),
            false => PathPattern::Exact(path),
        }
    }

    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathPattern::Exact(p) => p == path,
            PathPattern::Script(p) => (path.strip_prefix(p.as_str()))
                .is_some_and(|info| info.is_empty() || info.starts_with('/')),
            PathPattern::Prefix(p) => path.starts_with(p.as_str()),
            PathPattern::Regex(re) => re.is_match(path),
        }
    }
}

/// A path regex, with the literal text its matches start with, end with or contain when the
/// pattern says so (`^/(w/)?(info|test)\.php$` ends with `.php`): a comparison of a few bytes
/// turns away most paths before the regex runs ([`Literals`]).
#[derive(Debug, Clone)]
pub struct PathRegex {
    pub regex: Regex,
    /// Boxed: a path condition is an enum of three, and this is larger than the other two.
    literals: Box<Literals>,
}

impl PathRegex {
    pub fn new(regex: Regex) -> PathRegex {
        let literals = Box::new(Literals::of(regex.as_str()));
        PathRegex { regex, literals }
    }

    pub fn is_match(&self, path: &str) -> bool {
        self.literals.admit(path) && self.regex.is_match(path)
    }

    /// The text every match starts with (perhaps empty).
    pub fn prefix(&self) -> &str {
        &self.literals.prefix
    }
}

/// What a rule does. Each is a kind of its own: for each kind, the first matching rule that
/// has one decides it.
#[derive(Debug, Clone, Default)]
pub struct Actions {
    /// Index of the `[[origin]]` pool misses go to.
    pub route: Option<usize>,
    pub cache: Option<CacheAction>,
    pub answer: Option<Answer>,
    pub request_headers: Option<HeaderEdits>,
    pub response_headers: Option<HeaderEdits>,
    pub normalize_path: Option<PathNormalization>,
    pub normalize_query: Option<QueryNormalization>,
    pub rate_limit: Option<RateLimit>,
    pub max_body_bytes: Option<BodyLimit>,
}

/// A rule's `max_body_bytes`: the request body's limit in place of `[server] max_body_bytes`,
/// as nginx's `client_max_body_size` in a `location`: a wiki takes uploads of 100 MB at
/// `Special:Upload` and the API, and needs no more than an edit's 2 MiB of wikitext elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyLimit {
    /// `None`: no limit (0 in the file).
    pub bytes: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheAction {
    /// Never served from nor stored in the cache.
    Pass,
    /// The freshness lifetime, and the stale windows when `grace` is given, replace what the
    /// origin's fields say: a deliberate deviation from RFC 9111 §4.2.1, which `Cache-Status`
    /// names (`detail=ttl-rule`).
    Ttl {
        ttl: Duration,
        grace: Option<Duration>,
    },
}

/// A response Skua makes itself, without asking the origin.
#[derive(Debug, Clone)]
pub enum Answer {
    Deny { status: u16, body: String },
    Redirect { status: u16, location: Location },
}

/// A redirect's target, with the parts a request fills in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location(pub Vec<LocationPart>);

impl Location {
    /// The target for a request to `host` (its name, without the port), `path` and `query`
    /// (without its `?`); `groups`: the path regex's groups (`groups[0]` is the whole match).
    pub fn fill(&self, host: &str, path: &str, query: &str, groups: &[&str]) -> String {
        let mut out = String::with_capacity(64);
        for part in &self.0 {
            match part {
                LocationPart::Text(text) => out.push_str(text),
                LocationPart::Host => out.push_str(host),
                LocationPart::Path => out.push_str(path),
                LocationPart::Query if !query.is_empty() => {
                    out.push('?');
                    out.push_str(query);
                }
                LocationPart::Query => {}
                LocationPart::Group(n) => out.push_str(groups.get(*n).copied().unwrap_or("")),
            }
        }
        out
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocationPart {
    Text(String),
    Host,
    Path,
    /// The query with its `?`, or nothing.
    Query,
    /// A group of the rule's first `path_regex` that matched.
    Group(usize),
}

#[derive(Debug, Clone, Default)]
pub struct HeaderEdits {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub append: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

/// How `normalize_path` spells a path (`rules::path`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathNormalization {
    /// As MediaWiki's `wfUrlencode` writes a page's URL.
    MediaWiki,
}

#[derive(Debug, Clone, Default)]
pub struct QueryNormalization {
    pub drop: Vec<ParamPattern>,
    pub sort: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParamPattern {
    Name(String),
    /// `utm_*`, held as `utm_`.
    Prefix(String),
}

impl ParamPattern {
    pub fn matches(&self, name: &str) -> bool {
        match self {
            ParamPattern::Name(n) => n == name,
            ParamPattern::Prefix(p) => name.starts_with(p.as_str()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
    /// Only requests that go to the origin count (`origin_only`).
    pub origin_only: bool,
}

/// Fields a rule may not edit: they frame the message or belong to one connection (RFC 9110
/// §7.6.1), and Skua and pingora set them for each hop.
const FRAMING: [HeaderName; 6] = [
    http::header::CONTENT_LENGTH,
    http::header::TRANSFER_ENCODING,
    http::header::CONNECTION,
    http::header::TE,
    http::header::UPGRADE,
    http::header::TRAILER,
];

const MAX_RULES: usize = u16::MAX as usize;

/// Validates every `[[rule]]`; `pools` are the validated `[[origin]]` pools routes name.
pub(super) fn check(c: &mut Checker<'_>, files: Vec<RuleFile>, pools: &[OriginPool]) -> Vec<Rule> {
    use Seg::{Index, Key};
    if files.len() > MAX_RULES {
        c.report(&[Key("rule")], format!("at most {MAX_RULES} rules"));
        return Vec::new();
    }
    let mut rules = Vec::new();
    for (i, file) in files.into_iter().enumerate() {
        let at = |k: &'static str| [Key("rule"), Index(i), Key(k)];
        let line = c.line_of(&[Key("rule"), Index(i)]);
        let name = if file.name.is_empty() {
            format!("rule[{i}]")
        } else {
            file.name.clone()
        };
        if !file.name.is_empty() && rules.iter().any(|r: &Rule| r.name == file.name) {
            c.report(&at("name"), format!("duplicate rule name {:?}", file.name));
        }
        let when = conditions(c, i, &file.when);
        let actions = actions(c, i, &file, &when, pools);
        // What the file asks for, valid or not: a bad action is reported as itself.
        let does_something = file.route.is_some()
            || file.pass
            || file.ttl.is_some()
            || file.deny.is_some()
            || file.redirect.is_some()
            || file.request_headers.is_some()
            || file.response_headers.is_some()
            || file.normalize_path.is_some()
            || file.normalize_query.is_some()
            || file.rate_limit.is_some()
            || file.max_body_bytes.is_some();
        if !does_something {
            c.report(
                &[Key("rule"), Index(i)],
                "has no action (route, pass, ttl, deny, redirect, request_headers, \
                 response_headers, normalize_path, normalize_query, rate_limit or \
                 max_body_bytes)",
            );
        }
        rules.push(Rule {
            name,
            line,
            when,
            actions,
        });
    }
    rules
}

fn conditions(c: &mut Checker<'_>, i: usize, m: &MatchFile) -> Conditions {
    use Seg::{Index, Key};
    let at = |k: &'static str| [Key("rule"), Index(i), Key("match"), Key(k)];
    let item = |k: &'static str, j: usize| [Key("rule"), Index(i), Key("match"), Key(k), Index(j)];
    let mut when = Conditions::default();
    for (j, host) in m.host.iter().enumerate() {
        let host = host.trim().to_ascii_lowercase();
        let pattern = if host == "*" {
            Some(HostPattern::Any)
        } else if let Some(parent) = host.strip_prefix("*.") {
            (super::host::normalize_host(parent, 0).ok())
                .map(|p| HostPattern::Under(format!(".{p}")))
        } else {
            (super::host::normalize_host(&host, 0).ok()).map(HostPattern::Exact)
        };
        match pattern {
            Some(p) if !host.contains(':') => when.hosts.push(p),
            _ => c.report(
                &item("host", j),
                format!("not a host name, \"*.parent\" or \"*\" (without a port): {host:?}"),
            ),
        }
    }
    for (j, path) in m.path.iter().enumerate() {
        match path_text(path) {
            Ok(()) => when.paths.push(PathPattern::exact(path.clone())),
            Err(why) => c.report(&item("path", j), why),
        }
    }
    for (j, prefix) in m.path_prefix.iter().enumerate() {
        match path_text(prefix) {
            Ok(()) => when.paths.push(PathPattern::Prefix(prefix.clone())),
            Err(why) => c.report(&item("path_prefix", j), why),
        }
    }
    for (j, pattern) in m.path_regex.iter().enumerate() {
        match compile(pattern) {
            Ok(re) => when.paths.push(PathPattern::Regex(PathRegex::new(re))),
            Err(e) => c.report(
                &item("path_regex", j),
                format!("not a regular expression: {e}"),
            ),
        }
    }
    for (j, method) in m.method.iter().enumerate() {
        match Method::from_bytes(method.as_bytes()) {
            Ok(parsed) if !method.is_empty() => when.methods.push(parsed),
            _ => c.report(&item("method", j), format!("not a method: {method:?}")),
        }
    }
    when.query = patterns(c, i, "query", &m.query, |name| {
        (!name.is_empty() && !name.contains(['&', '=', '#', ' '])).then(|| name.to_string())
    });
    when.headers = patterns(c, i, "header", &m.header, |name| {
        HeaderName::from_bytes(name.as_bytes()).ok()
    });
    when.cookies = patterns(c, i, "cookie", &m.cookie, |name| {
        let token = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b));
        token.then(|| name.to_string())
    });
    when.clients = networks(c, &m.client, &at("client"));
    when
}

/// A table of names and value patterns (`"" `: present with any value).
fn patterns<N>(
    c: &mut Checker<'_>,
    i: usize,
    kind: &'static str,
    table: &BTreeMap<String, String>,
    name_of: impl Fn(&str) -> Option<N>,
) -> Vec<(N, Regex)> {
    use Seg::{Index, Key};
    let mut out = Vec::new();
    for (name, pattern) in table {
        let at = [Key("rule"), Index(i), Key("match"), Key(kind), Key(name)];
        let Some(parsed) = name_of(name) else {
            c.report(&at, format!("not a {kind} name: {name:?}"));
            continue;
        };
        match compile(pattern) {
            Ok(re) => out.push((parsed, re)),
            Err(e) => c.report(&at, format!("not a regular expression: {e}")),
        }
    }
    out
}

fn path_text(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("must start with '/': {path:?}"));
    }
    if path.contains('?') || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(format!(
            "a path without query, spaces or control characters: {path:?}"
        ));
    }
    Ok(())
}

fn actions(
    c: &mut Checker<'_>,
    i: usize,
    file: &RuleFile,
    when: &Conditions,
    pools: &[OriginPool],
) -> Actions {
    use Seg::{Index, Key};
    let at = |k: &'static str| [Key("rule"), Index(i), Key(k)];
    let mut actions = Actions::default();
    if let Some(route) = &file.route {
        actions.route = pools.iter().position(|p| &p.name == route);
        if actions.route.is_none() {
            let names: Vec<&str> = pools.iter().map(|p| p.name.as_str()).collect();
            c.report(
                &at("route"),
                format!("no [[origin]] pool is named {route:?} (pools: {names:?})"),
            );
        }
    }
    let ttl = file.ttl.as_ref().map(|t| c.duration(&at("ttl"), t));
    let grace = file.grace.as_ref().map(|g| c.duration(&at("grace"), g));
    actions.cache = match (file.pass, ttl) {
        (true, Some(_)) => {
            c.report(
                &at("ttl"),
                "a rule that passes stores nothing: drop pass or ttl",
            );
            None
        }
        (true, None) => Some(CacheAction::Pass),
        (false, Some(ttl)) => Some(CacheAction::Ttl { ttl, grace }),
        (false, None) => None,
    };
    if grace.is_some() && ttl.is_none() {
        c.report(&at("grace"), "applies with ttl only");
    }
    if let Some(deny) = &file.deny {
        if !(400..=599).contains(&deny.status) {
            c.report(
                &[Key("rule"), Index(i), Key("deny"), Key("status")],
                format!("must be 400 to 599, got {}", deny.status),
            );
        }
        let body = if deny.body.is_empty() {
            http::StatusCode::from_u16(deny.status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("denied")
                .to_string()
        } else {
            deny.body.clone()
        };
        actions.answer = Some(Answer::Deny {
            status: deny.status,
            body,
        });
    }
    if let Some(redirect) = &file.redirect {
        let status_at = [Key("rule"), Index(i), Key("redirect"), Key("status")];
        if ![301, 302, 303, 307, 308].contains(&redirect.status) {
            c.report(
                &status_at,
                format!("must be 301, 302, 303, 307 or 308, got {}", redirect.status),
            );
        }
        let location_at = [Key("rule"), Index(i), Key("redirect"), Key("location")];
        let groups = (when.paths.iter())
            .find_map(|p| match p {
                PathPattern::Regex(re) => Some(re.regex.captures_len() - 1),
                _ => None,
            })
            .unwrap_or(0);
        match location(&redirect.location, groups) {
            Ok(location) if actions.answer.is_none() => {
                actions.answer = Some(Answer::Redirect {
                    status: redirect.status,
                    location,
                });
            }
            Ok(_) => c.report(&at("redirect"), "a rule either denies or redirects"),
            Err(why) => c.report(&location_at, why),
        }
    }
    actions.request_headers =
        (file.request_headers.as_ref()).map(|edits| header_edits(c, i, "request_headers", edits));
    actions.response_headers =
        (file.response_headers.as_ref()).map(|edits| header_edits(c, i, "response_headers", edits));
    // A purge names the URL alone, and must find what the request stored: a rule that
    // normalises it may match on host, path and query only.
    let url_only = |c: &mut Checker<'_>, action: &'static str, part: &str| {
        if !when.url_only() {
            c.report(
                &at(action),
                format!(
                    "a rule that normalises the {part} may match on host, path and query only: \
                     a purge names the URL alone, and must find what the request stored"
                ),
            );
        }
    };
    if let Some(how) = &file.normalize_path {
        url_only(c, "normalize_path", "path");
        match how.as_str() {
            "mediawiki" => actions.normalize_path = Some(PathNormalization::MediaWiki),
            _ => c.report(
                &at("normalize_path"),
                format!("must be \"mediawiki\" (the one spelling Skua knows), got {how:?}"),
            ),
        }
    }
    if let Some(query) = &file.normalize_query {
        url_only(c, "normalize_query", "query");
        let mut drop = Vec::new();
        for (j, name) in query.drop.iter().enumerate() {
            let pattern = match name.strip_suffix('*') {
                Some(prefix) => ParamPattern::Prefix(prefix.to_string()),
                None => ParamPattern::Name(name.clone()),
            };
            if name.is_empty() || name == "*" || name[..name.len() - 1].contains(['*', '&', '=']) {
                c.report(
                    &[
                        Key("rule"),
                        Index(i),
                        Key("normalize_query"),
                        Key("drop"),
                        Index(j),
                    ],
                    format!("a parameter name, or a prefix ending in '*': {name:?}"),
                );
            } else {
                drop.push(pattern);
            }
        }
        actions.normalize_query = Some(QueryNormalization {
            drop,
            sort: query.sort,
        });
    }
    if let Some(limit) = &file.rate_limit {
        let limit_at = |k| [Key("rule"), Index(i), Key("rate_limit"), Key(k)];
        let per_second = limit.per_second;
        if !(per_second.is_finite() && per_second > 0.0 && per_second <= 1e6) {
            c.report(
                &limit_at("per_second"),
                format!("must be above 0 and at most 1000000, got {per_second}"),
            );
        }
        let burst = limit.burst.unwrap_or(per_second.ceil().max(1.0) as u32);
        if burst == 0 {
            c.report(&limit_at("burst"), "must be at least 1");
        }
        actions.rate_limit = Some(RateLimit {
            per_second,
            burst,
            origin_only: limit.origin_only,
        });
    }
    actions.max_body_bytes = (file.max_body_bytes).map(|n| BodyLimit {
        bytes: (n > 0).then_some(n),
    });
    actions
}

fn header_edits(
    c: &mut Checker<'_>,
    i: usize,
    kind: &'static str,
    file: &HeaderEditsFile,
) -> HeaderEdits {
    use Seg::{Index, Key};
    let mut edits = HeaderEdits::default();
    let field = |c: &mut Checker<'_>, at: &[Seg<'_>], name: &str| match HeaderName::from_bytes(
        name.as_bytes(),
    ) {
        Ok(n) if FRAMING.contains(&n) => {
            c.report(
                at,
                format!("{name} frames the message; Skua sets it itself"),
            );
            None
        }
        Ok(n) => Some(n),
        Err(_) => {
            c.report(at, format!("not a header name: {name:?}"));
            None
        }
    };
    for (op, table) in [("set", &file.set), ("append", &file.append)] {
        for (name, value) in table {
            let at = [Key("rule"), Index(i), Key(kind), Key(op), Key(name)];
            let Some(n) = field(c, &at, name) else {
                continue;
            };
            match HeaderValue::from_str(value) {
                Ok(v) if op == "set" => edits.set.push((n, v)),
                Ok(v) => edits.append.push((n, v)),
                Err(_) => c.report(&at, format!("not a header value: {value:?}")),
            }
        }
    }
    for (j, name) in file.remove.iter().enumerate() {
        let at = [Key("rule"), Index(i), Key(kind), Key("remove"), Index(j)];
        if let Some(n) = field(c, &at, name) {
            edits.remove.push(n);
        }
    }
    edits
}

/// Parses a redirect's location template; `groups`: how many groups the rule's path regex has.
fn location(text: &str, groups: usize) -> Result<Location, String> {
    let absolute = text.starts_with("https://") || text.starts_with("http://");
    if !absolute && !text.starts_with('/') && !text.starts_with("{path}") {
        return Err(format!(
            "must be an absolute http(s) URL or start with '/': {text:?}"
        ));
    }
    let mut parts = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find('{') {
        if open > 0 {
            parts.push(LocationPart::Text(rest[..open].to_string()));
        }
        let close = rest[open..]
            .find('}')
            .ok_or_else(|| format!("an unclosed '{{' in {text:?}"))?;
        let name = &rest[open + 1..open + close];
        parts.push(match name {
            "host" => LocationPart::Host,
            "path" => LocationPart::Path,
            "query" => LocationPart::Query,
            digits => match digits.parse::<usize>() {
                Ok(n) if (1..=groups).contains(&n) => LocationPart::Group(n),
                Ok(n) => {
                    return Err(format!(
                        "{{{n}}}: the rule's path_regex has {groups} group(s)"
                    ))
                }
                Err(_) => {
                    return Err(format!(
                        "{{{name}}} is not one of {{host}}, {{path}}, {{query}} or {{1}}..{{9}}"
                    ))
                }
            },
        });
        rest = &rest[open + close + 1..];
    }
    if !rest.is_empty() {
        parts.push(LocationPart::Text(rest.to_string()));
    }
    let literal: String = (parts.iter())
        .filter_map(|p| match p {
            LocationPart::Text(t) => Some(t.as_str()),
            _ => None,
        })
        .collect();
    if literal.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(format!("no spaces or control characters: {text:?}"));
    }
    Ok(Location(parts))
}
