//! The compiled matcher agrees with reading every rule in order, over random rule sets and
//! requests (#22's property test).

use std::net::IpAddr;

use http::{HeaderMap, HeaderValue, Method};
use proptest::prelude::*;

use super::*;
use crate::config::rules::{
    Actions, CacheAction, Conditions, HeaderEdits, HostPattern, PathPattern,
};

const HOSTS: [&str; 4] = ["en.wiki.test", "de.wiki.test", "wiki.test", "other.test"];
const PATHS: [&str; 13] = [
    "/wiki/A",
    "/wiki/B",
    "/w/api.php",
    "/w/load.php",
    "/",
    "/wiki",
    "/wp-admin.php",
    "/x/.git/config",
    "*",
    "//w//api.php",
    "/wiki//B",
    "/w/api.php/A",
    "/wp-admin.php/",
];

fn host_pattern() -> impl Strategy<Value = HostPattern> {
    prop_oneof![
        (0..HOSTS.len()).prop_map(|i| HostPattern::Exact(HOSTS[i].to_string())),
        Just(HostPattern::Under(".wiki.test".to_string())),
        Just(HostPattern::Any),
    ]
}

fn path_pattern() -> impl Strategy<Value = PathPattern> {
    prop_oneof![
        (0..PATHS.len()).prop_map(|i| PathPattern::exact(PATHS[i].to_string())),
        Just(PathPattern::Prefix("/wiki/".to_string())),
        Just(PathPattern::Prefix("/w/".to_string())),
        Just(PathPattern::Prefix("/wp-admin".to_string())),
        Just(PathPattern::Prefix("/".to_string())),
        Just(PathPattern::Regex(crate::config::rules::PathRegex::new(
            regex::Regex::new("^/w/[a-z]+\\.php$").unwrap()
        ))),
        Just(PathPattern::Regex(crate::config::rules::PathRegex::new(
            regex::Regex::new("/\\.(git|svn)").unwrap()
        ))),
        Just(PathPattern::Regex(crate::config::rules::PathRegex::new(
            regex::Regex::new("^/wiki").unwrap()
        ))),
    ]
}

fn rule() -> impl Strategy<Value = Rule> {
    let when = (
        proptest::collection::vec(host_pattern(), 0..3),
        proptest::collection::vec(path_pattern(), 0..2),
        proptest::option::of(prop_oneof![Just(Method::GET), Just(Method::POST)]),
        any::<bool>(),
        0..3u8,
        any::<bool>(),
        any::<bool>(),
    );
    let actions = (
        any::<bool>(),
        0..3u8,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    );
    (when, actions).prop_map(
        |((hosts, paths, method, header, client, raw, cookie), actions)| {
            let (route, cache, answer, edits, limit) = actions;
            let when = Conditions {
                hosts,
                paths,
                methods: method.into_iter().collect(),
                headers: if header {
                    vec![(http::header::USER_AGENT, regex::Regex::new("bot").unwrap())]
                } else {
                    vec![]
                },
                cookies: if cookie {
                    vec![(
                        "session".to_string(),
                        regex::Regex::new("^[0-9]+$").unwrap(),
                    )]
                } else {
                    vec![]
                },
                query: if raw {
                    vec![("action".to_string(), regex::Regex::new("^raw$").unwrap())]
                } else {
                    vec![]
                },
                clients: match client {
                    1 => vec!["10.0.0.0/8".parse().unwrap()],
                    2 => vec![
                        "2001:db8::/32".parse().unwrap(),
                        "10.1.2.0/24".parse().unwrap(),
                    ],
                    _ => vec![],
                },
            };
            let mut a = Actions {
                route: route.then_some(1),
                cache: match cache {
                    1 => Some(CacheAction::Pass),
                    2 => Some(CacheAction::Ttl {
                        ttl: Duration::from_secs(60),
                        grace: None,
                    }),
                    _ => None,
                },
                response_headers: edits.then(HeaderEdits::default),
                rate_limit: limit.then_some(crate::config::rules::RateLimit {
                    per_second: 1.0,
                    burst: 1,
                    origin_only: false,
                }),
                ..Actions::default()
            };
            if answer {
                a.answer = Some(crate::config::rules::Answer::Deny {
                    status: 403,
                    body: "no".into(),
                });
            }
            Rule {
                name: String::new(),
                line: None,
                when,
                actions: a,
            }
        },
    )
}

proptest! {
    #[test]
    fn the_query_is_found_where_a_byte_search_finds_it(target in "[/a-z?=&%.]{0,40}") {
        prop_assert_eq!(query_start(&target), target.bytes().position(|b| b == b'?'));
    }

    #[test]
    fn the_index_decides_as_reading_every_rule_in_order(
        rules in proptest::collection::vec(rule(), 0..12),
        other_rules in proptest::collection::vec(rule(), 0..6),
        host in 0..HOSTS.len() + 1,
        path in 0..PATHS.len(),
        post in any::<bool>(),
        bot in any::<bool>(),
        client in 0..4usize,
        raw in any::<bool>(),
        session in any::<bool>(),
    ) {
        let set = RuleSet::new(rules);
        let mut fields = HeaderMap::new();
        if bot {
            fields.insert(http::header::USER_AGENT, HeaderValue::from_static("a bot/1.0"));
        }
        if session {
            fields.insert(http::header::COOKIE, HeaderValue::from_static("theme=dark; session=42"));
        }
        let client: IpAddr = ["10.1.2.3", "192.0.2.7", "2001:db8::7", "2001:db9::7"][client]
            .parse()
            .unwrap();
        let req = Request {
            // One host no rule names exactly.
            host: HOSTS.get(host).copied().unwrap_or("fr.wiki.test"),
            path: rule_path(PATHS[path]),
            query: if raw { "action=raw" } else { "oldid=3" },
            method: if post { &Method::POST } else { &Method::GET },
            fields: &fields,
            client: Some(client),
        };
        let every_rule = set.decide_every_rule(&req);
        prop_assert_eq!(set.decide(&req), every_rule);
        // A stored object's memo: written by the first hit, read by the next.
        // A stored object has a URL; `*` (OPTIONS) is never one.
        let target = format!("{}?{}", req.path, req.query);
        let Ok(url) = CacheUrl::new(crate::cache::key::Scheme::Http, req.host, &target) else {
            prop_assert_eq!(req.path.as_ref(), "*");
            return Ok(());
        };
        let of_url = Request::of(&url, req.method, &fields, req.client);
        prop_assert_eq!(
            (of_url.host, of_url.path.as_ref(), of_url.query),
            (req.host, req.path.as_ref(), req.query)
        );
        let asked = Asked {
            method: req.method,
            fields: &fields,
            client: req.client,
            cookies: fields.contains_key(http::header::COOKIE),
        };
        let memo = UrlMemo::default();
        prop_assert_eq!(set.decide_remembering(&memo, &url, &asked), every_rule);
        prop_assert_eq!(set.decide_remembering(&memo, &url, &asked), every_rule);
        // A memo written by the rule set before a reload is not read by the next one.
        let reloaded = RuleSet::new(other_rules);
        prop_assert_eq!(
            reloaded.decide_remembering(&memo, &url, &asked),
            reloaded.decide_every_rule(&req)
        );
    }
}

/// A rule for one exact path, with `actions`.
fn rule_for_path(path: &str, actions: Actions) -> Rule {
    Rule {
        name: String::new(),
        line: None,
        when: Conditions {
            paths: vec![PathPattern::exact(path.to_string())],
            ..Conditions::default()
        },
        actions,
    }
}

#[test]
fn a_rule_set_too_large_to_remember_decides_as_reading_every_rule() {
    let deny = |path: &str| {
        let answer = crate::config::rules::Answer::Deny {
            status: 403,
            body: "no".into(),
        };
        rule_for_path(
            path,
            Actions {
                answer: Some(answer),
                ..Actions::default()
            },
        )
    };
    let rules: Vec<Rule> = (0..URL_MATCH_RULES + 5)
        .map(|i| deny(&format!("/{i}")))
        .collect();
    let set = RuleSet::new(rules);
    let fields = HeaderMap::new();
    let memo = UrlMemo::default();
    for i in [0, URL_MATCH_RULES - 1, URL_MATCH_RULES + 3] {
        let url = CacheUrl::new(
            crate::cache::key::Scheme::Http,
            "wiki.test",
            &format!("/{i}"),
        );
        let asked = Asked {
            method: &Method::GET,
            fields: &fields,
            client: None,
            cookies: false,
        };
        let decision = set.decide_remembering(&memo, &url.unwrap(), &asked);
        assert_eq!(decision.answer, Some(i as u16));
    }
}

#[test]
fn the_first_rule_of_each_kind_decides_it() {
    let pass = |hosts: Vec<HostPattern>| Rule {
        name: String::new(),
        line: None,
        when: Conditions {
            hosts,
            ..Conditions::default()
        },
        actions: Actions {
            cache: Some(CacheAction::Pass),
            ..Actions::default()
        },
    };
    let mut routed = pass(vec![HostPattern::Under(".wiki.test".into())]);
    routed.actions.route = Some(2);
    let set = RuleSet::new(vec![
        pass(vec![HostPattern::Exact("de.wiki.test".into())]),
        routed,
        pass(vec![]),
    ]);
    let fields = HeaderMap::new();
    let req = |host| Request {
        host,
        path: "/".into(),
        query: "",
        method: &Method::GET,
        fields: &fields,
        client: None,
    };
    let de = set.decide(&req("de.wiki.test"));
    assert_eq!((de.cache, de.route), (Some(0), Some(1)));
    let en = set.decide(&req("en.wiki.test"));
    assert_eq!((en.cache, en.route), (Some(1), Some(1)));
    let other = set.decide(&req("other.test"));
    assert_eq!((other.cache, other.route), (Some(2), None));
}

#[test]
fn a_rule_reads_an_encoded_slash_as_a_slash_and_each_run_of_slashes_as_one() {
    assert!(matches!(rule_path("/w/api.php"), Cow::Borrowed(_)));
    for (path, read) in [
        ("//w//api.php", "/w/api.php"),
        ("/w///api.php", "/w/api.php"),
        ("//", "/"),
        ("/a//", "/a/"),
        ("/wiki/A//B", "/wiki/A/B"),
        ("/w%2Fapi.php", "/w/api.php"),
        ("/w%2fapi.php", "/w/api.php"),
        ("%2Fw/api.php", "/w/api.php"),
        ("/w/x%2F..%2Fapi.php", "/w/api.php"),
        ("/w/x%2F%2E%2E%2Fapi.php", "/w/api.php"),
        ("/w/100%2", "/w/100%2"),
    ] {
        assert_eq!(rule_path(path), read, "{path}");
    }
    assert!(matches!(rule_path("/wiki/Caf%C3%A9"), Cow::Borrowed(_)));
}

#[test]
fn a_rules_body_limit_replaces_the_servers_and_the_largest_of_all_is_refused_first() {
    use crate::config::rules::BodyLimit;
    let limit = |path: &str, bytes: Option<u64>| {
        let actions = Actions {
            max_body_bytes: Some(BodyLimit { bytes }),
            ..Actions::default()
        };
        rule_for_path(path, actions)
    };
    let set = RuleSet::new(vec![
        limit("/upload", Some(100_000)),
        limit("/api", Some(10)),
    ]);
    assert_eq!(set.body_ceiling(Some(1000)), Some(100_000));
    assert_eq!(set.body_ceiling(None), None, "the server sets no limit");
    let unlimited = RuleSet::new(vec![limit("/upload", None), limit("/api", Some(10))]);
    assert_eq!(unlimited.body_ceiling(Some(1000)), None);
    assert_eq!(
        RuleSet::new(Vec::new()).body_ceiling(Some(1000)),
        Some(1000)
    );

    let fields = HeaderMap::new();
    let for_path = |path: &'static str| {
        let req = Request {
            host: "wiki.test",
            path: rule_path(path),
            query: "",
            method: &Method::POST,
            fields: &fields,
            client: None,
        };
        set.decide(&req).max_body_bytes(&set, Some(1000))
    };
    assert_eq!(for_path("/api"), Some(10));
    assert_eq!(for_path("/upload"), Some(100_000));
    assert_eq!(for_path("/wiki/Page"), Some(1000));
}
