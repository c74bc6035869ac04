//! Query strings as the rules read and rewrite them: parameters read as the application
//! behind reads them (decoded as a form is, names also as PHP reads them), and the
//! normalisation `normalize_query` asks for, which works on the parameters as sent.

use std::borrow::Cow;

use crate::config::rules::QueryNormalization;

/// The parameters of `query` (without its `?`) as the application reads them, as (name,
/// value): `+` a space and `%XX` its byte (WHATWG URL §5.1, application/x-www-form-urlencoded
/// parsing: how PHP, Python and Java servlets decode a query); a parameter without `=` has an
/// empty value. A rule that names `search` and reads `?+search=x` as ` search`, or
/// `action=%65dit%00` as sent, is bypassed by a spelling the application takes as the one it names.
pub fn parameters(query: &str) -> impl Iterator<Item = (Cow<'_, str>, Cow<'_, str>)> {
    form_urlencoded::parse(query.as_bytes())
}

/// Whether a parameter decoded as `decoded` is the one called `name`: by its decoded name, or
/// by the name PHP gives it (MediaWiki reads `$_GET`): leading spaces dropped, cut at a NUL,
/// `a[...]` the array `a`, and ` `, `.` and `[` otherwise read as `_`
/// (`php_register_variable_ex`; measured with PHP 8's `parse_str`: `+search`, `%20search`,
/// `search%00x` and `search[]` are all `search`).
pub fn names(decoded: &str, name: &str) -> bool {
    decoded == name || php_name(decoded) == name
}

fn php_name(decoded: &str) -> Cow<'_, str> {
    let name = decoded.trim_start_matches(' ');
    let name = name.split('\0').next().unwrap_or_default();
    let base = match name.split_once('[') {
        Some((base, rest)) if rest.contains(']') => base,
        _ => name,
    };
    if base.contains([' ', '.', '[']) {
        Cow::Owned(base.replace([' ', '.', '['], "_"))
    } else {
        Cow::Borrowed(base)
    }
}

/// `query` as `how` normalises it: the parameters it drops removed, the rest sorted by name
/// and then value when it sorts, empty pieces (`a&&b`) removed. `None` when that leaves it
/// as it was.
pub fn normalize(query: &str, how: &QueryNormalization) -> Option<String> {
    let mut kept: Vec<&str> = (query.split('&'))
        .filter(|p| !p.is_empty())
        .filter(|p| {
            let name = p.split_once('=').map_or(*p, |(n, _)| n);
            !how.drop.iter().any(|d| d.matches(name))
        })
        .collect();
    if how.sort {
        // By name, then value: `b=2&a=1&b=1` and `a=1&b=1&b=2` are one key. Reordering
        // repeated names changes what some applications read; an operator who sorts says
        // theirs does not care.
        kept.sort_by(|a, b| {
            let split = |p: &'_ str| -> (String, String) {
                let (n, v) = p.split_once('=').unwrap_or((p, ""));
                (n.to_string(), v.to_string())
            };
            split(a).cmp(&split(b))
        });
    }
    let joined = kept.join("&");
    (joined != query).then_some(joined)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::rules::ParamPattern;

    fn how(drop: &[&str], sort: bool) -> QueryNormalization {
        let drop = drop.iter().map(|d| match d.strip_suffix('*') {
            Some(p) => ParamPattern::Prefix(p.to_string()),
            None => ParamPattern::Name(d.to_string()),
        });
        QueryNormalization {
            drop: drop.collect(),
            sort,
        }
    }

    #[test]
    fn tracking_parameters_are_dropped_and_the_rest_sorted() {
        let tracking = how(&["utm_*", "fbclid"], true);
        assert_eq!(
            normalize(
                "title=X&utm_source=a&action=raw&fbclid=1&utm_medium=b",
                &tracking
            ),
            Some("action=raw&title=X".into())
        );
        assert_eq!(
            normalize("b=2&a=1&b=1", &tracking),
            Some("a=1&b=1&b=2".into())
        );
        assert_eq!(normalize("a=1&b=2", &tracking), None, "already normal");
        assert_eq!(normalize("utm_source=x", &tracking), Some(String::new()));
        assert_eq!(normalize("a&&b", &how(&[], false)), Some("a&b".into()));
        // A name that only starts like a dropped one stays.
        assert_eq!(normalize("fbclidx=1", &tracking), None);
    }

    #[test]
    fn parameters_are_read_as_the_application_reads_them() {
        let parsed: Vec<_> = parameters("a=1&flag&&b=x=y&c+d=%65dit+%2B&bad=%zz")
            .map(|(n, v)| (n.into_owned(), v.into_owned()))
            .collect();
        let expected = [
            ("a", "1"),
            ("flag", ""),
            ("b", "x=y"),
            ("c d", "edit +"),
            ("bad", "%zz"),
        ];
        let expected: Vec<_> = (expected.iter())
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        assert_eq!(parsed, expected);
    }

    /// What PHP 8's `parse_str` made of each name (the same parser fills `$_GET`).
    #[test]
    fn names_are_also_read_as_php_reads_them() {
        for (sent, php) in [
            (" search", "search"),
            ("search\0x", "search"),
            ("search[]", "search"),
            ("search[a]", "search"),
            ("search.a", "search_a"),
            ("search ", "search_"),
            ("search[a", "search_a"),
            ("a[b[c", "a_b_c"),
            ("a[b[c]", "a"),
            ("\tsearch", "\tsearch"),
            ("Search", "Search"),
        ] {
            assert_eq!(php_name(sent), php, "{sent:?}");
            assert!(names(sent, php), "{sent:?}");
        }
        assert!(
            names("filter.x", "filter.x"),
            "the name as decoded names it too"
        );
        assert!(!names("searches", "search"));
        assert!(!names("xsearch", "search"));
    }
}
