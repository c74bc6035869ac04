//! Query strings as the rules read and rewrite them: parameters split on `&` and `=` exactly
//! as sent (after Skua's target normalisation; nothing is percent-decoded, so `a%5Fb` is not
//! `a_b`), and the normalisation `normalize_query` asks for.

use crate::config::rules::QueryNormalization;

/// The parameters of `query` (without its `?`), as (name, value); a parameter without `=` has
/// an empty value.
pub fn parameters(query: &str) -> impl Iterator<Item = (&str, &str)> {
    (query.split('&'))
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
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
    fn parameters_are_read_as_sent() {
        let parsed: Vec<_> = parameters("a=1&flag&&b=x=y&a%5Fb=2").collect();
        assert_eq!(
            parsed,
            [("a", "1"), ("flag", ""), ("b", "x=y"), ("a%5Fb", "2")]
        );
    }
}
