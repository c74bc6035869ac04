//! The literal text every match of a `path_regex` must have, read from the pattern when it
//! says so plainly: what it starts with (after `^`), what it ends with (before `$`), and, for
//! a pattern not anchored at its start, the text its matches contain. Comparing a few bytes
//! turns away most paths before the regex runs, which costs a few hundred instructions a time
//! (benches/README.md §15). It does not match paths; `PathRegex` in `super::rules` does, and
//! the rule index (`crate::rules::index`) reads `prefix` to know which paths a rule can see.
//!
//! Anything this reader does not follow (a top-level `|`, inline flags such as `(?i)` that
//! change what a letter matches) gives no literals: less filtering, never a wrong answer.

#[derive(Debug, Clone, Default)]
pub struct Literals {
    /// Every match starts with this: the pattern begins with `^`.
    pub prefix: String,
    /// Every match ends with this: the pattern ends with `$`.
    pub suffix: String,
    /// Every match contains this: the text the pattern begins with, when that is not `^`.
    pub inner: String,
}

impl Literals {
    pub fn of(pattern: &str) -> Literals {
        let Some(tokens) = tokens(pattern) else {
            return Literals::default();
        };
        let anchored = tokens.first() == Some(&Token::Start);
        let body = if anchored { &tokens[1..] } else { &tokens[..] };
        let leading = leading(body);
        let suffix = match tokens.split_last() {
            Some((Token::End, before)) => trailing(before),
            _ => String::new(),
        };
        let (prefix, inner) = match anchored {
            true => (leading, String::new()),
            false => (String::new(), leading),
        };
        Literals {
            prefix,
            suffix,
            inner,
        }
    }

    /// Whether `path` has every literal: `false` means the regex cannot match it.
    pub fn admit(&self, path: &str) -> bool {
        path.starts_with(self.prefix.as_str())
            && path.ends_with(self.suffix.as_str())
            && contains(path.as_bytes(), self.inner.as_bytes())
    }
}

/// Whether `needle` occurs in `hay`. A path is short and the needle's first byte rare in it
/// (`/.` in `/wiki/Main_Page`): a plain loop and a compare at each of its few places costs a
/// tenth of setting up a substring searcher.
fn contains(hay: &[u8], needle: &[u8]) -> bool {
    let Some((first, _)) = needle.split_first() else {
        return true;
    };
    (0..hay.len()).any(|at| hay[at] == *first && hay[at..].starts_with(needle))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    /// A character matched as itself.
    Literal(char),
    /// `?`, `*` or `{m,n}`: the atom before may be absent.
    MaybeNone,
    /// `+`: the atom before is there at least once, perhaps more.
    OneOrMore,
    /// `^` first in the pattern.
    Start,
    /// `$`.
    End,
    /// Anything else: a class, `.`, a group's bracket, an escape such as `\d`, an anchor
    /// elsewhere.
    Other,
}

/// The pattern as tokens, or `None` when a literal reading would be unsafe: a `|` outside
/// every group, or an inline flag (`(?i)`, `(?x)`...).
fn tokens(pattern: &str) -> Option<Vec<Token>> {
    let mut out = Vec::new();
    let mut chars = pattern.chars().peekable();
    let mut depth = 0i32;
    while let Some(c) = chars.next() {
        let token = match c {
            '\\' => match chars.next()? {
                escaped if escaped.is_ascii_punctuation() => Token::Literal(escaped),
                // `\x41`, `\u{e9}`, `\pL`, `\p{Greek}`: the argument is part of the escape.
                kind @ ('x' | 'u' | 'U' | 'p' | 'P') => {
                    if chars.peek() == Some(&'{') {
                        for c in chars.by_ref() {
                            if c == '}' {
                                break;
                            }
                        }
                    } else {
                        let digits = match kind {
                            'x' => 2,
                            'u' => 4,
                            'U' => 8,
                            _ => 1,
                        };
                        for _ in 0..digits {
                            chars.next()?;
                        }
                    }
                    Token::Other
                }
                _ => Token::Other,
            },
            '[' => {
                skip_class(&mut chars)?;
                Token::Other
            }
            '(' => {
                if chars.peek() == Some(&'?') {
                    chars.next();
                    // Non-capturing and named groups only; anything else sets flags.
                    if !matches!(chars.peek(), Some(':' | 'P' | '<')) {
                        return None;
                    }
                }
                depth += 1;
                Token::Other
            }
            ')' => {
                depth -= 1;
                Token::Other
            }
            '|' if depth == 0 => return None,
            '|' | '.' => Token::Other,
            '?' | '*' => Token::MaybeNone,
            '+' => Token::OneOrMore,
            '{' => {
                for c in chars.by_ref() {
                    if c == '}' {
                        break;
                    }
                }
                Token::MaybeNone
            }
            '^' if out.is_empty() => Token::Start,
            '^' => Token::Other,
            '$' => Token::End,
            c => Token::Literal(c),
        };
        out.push(token);
    }
    Some(out)
}

/// Consumes a bracketed class up to its closing `]` (nested classes and escapes included).
fn skip_class(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> Option<()> {
    let mut depth = 1;
    // A `]` first in a class (after an optional `^`) is a literal.
    if chars.peek() == Some(&'^') {
        chars.next();
    }
    if chars.peek() == Some(&']') {
        chars.next();
    }
    while depth > 0 {
        match chars.next()? {
            '\\' => {
                chars.next()?;
            }
            '[' => depth += 1,
            ']' => depth -= 1,
            _ => {}
        }
    }
    Some(())
}

/// The literal characters `tokens` begin with that every match has.
fn leading(tokens: &[Token]) -> String {
    let mut text = String::new();
    for (i, token) in tokens.iter().enumerate() {
        let Token::Literal(c) = token else { break };
        match tokens.get(i + 1) {
            Some(Token::MaybeNone) => break,
            // There at least once; what follows may be another repeat of it.
            Some(Token::OneOrMore) => {
                text.push(*c);
                break;
            }
            _ => text.push(*c),
        }
    }
    text
}

/// The literal characters `tokens` end with. A quantifier follows its atom, so a run of
/// literals read backwards from the end holds none that is quantified.
fn trailing(tokens: &[Token]) -> String {
    let run = tokens
        .iter()
        .rev()
        .map_while(|t| match t {
            Token::Literal(c) => Some(*c),
            _ => None,
        })
        .collect::<Vec<char>>();
    run.into_iter().rev().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use regex::Regex;

    #[test]
    fn literals_are_what_every_match_has() {
        for (pattern, prefix, suffix, inner) in [
            ("^/w/index\\.php/(.+)$", "/w/index.php/", "", None),
            ("^/diff/([0-9]+)$", "/diff/", "", None),
            ("^/(w/)?(phpinfo|test)\\.php$", "/", ".php", None),
            (
                "^/wiki/Portal:Old_name(/.*)?$",
                "/wiki/Portal:Old_name",
                "",
                None,
            ),
            ("/\\.(git|svn|env|ht)", "", "", Some("/.")),
            ("^/ab?c", "/a", "", None),
            ("^/ab*c", "/a", "", None),
            ("^/ab{0,2}", "/a", "", None),
            ("^/ab+c", "/ab", "", None),
            ("^/a.b", "/a", "", None),
            ("^/a|/b", "", "", None),
            ("^/a[|]b", "/a", "", None),
            ("^(?i)/wiki", "", "", None),
            ("(?i)\\.php$", "", "", None),
            ("^/a(?:b|c)d$", "/a", "d", None),
            ("^/x[]a]y$", "/x", "y", None),
            ("ab*$", "", "", Some("a")),
            ("\\.php$", "", ".php", Some(".php")),
            ("x\\d$", "", "", Some("x")),
            ("^/a\\x41$", "/a", "", None),
            ("^/a\\x{41}b$", "/a", "b", None),
            ("^/\\pLx$", "/", "x", None),
            ("^/\\p{Greek}x$", "/", "x", None),
        ] {
            let got = Literals::of(pattern);
            assert_eq!(got.prefix, prefix, "{pattern}");
            assert_eq!(got.suffix, suffix, "{pattern}");
            assert_eq!(got.inner, inner.unwrap_or(""), "{pattern}");
        }
    }

    /// Patterns over a small alphabet, so that random paths often match them.
    fn pattern() -> impl Strategy<Value = String> {
        let atom = prop_oneof![
            Just("a"),
            Just("b"),
            Just("/"),
            Just("\\."),
            Just("."),
            Just("[ab]"),
            Just("(a|b)"),
            Just("(?:ab)"),
            Just("\\d"),
            Just("\\x61"),
            Just("\\x{2f}"),
            Just("\\pL"),
        ];
        let quantifier = prop_oneof![
            Just(""),
            Just(""),
            Just("?"),
            Just("*"),
            Just("+"),
            Just("{1,2}")
        ];
        let piece = (atom, quantifier).prop_map(|(a, q)| format!("{a}{q}"));
        (
            any::<bool>(),
            proptest::collection::vec(piece, 0..6),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(start, pieces, alternation, end)| {
                let body = pieces.concat();
                let body = if alternation {
                    format!("{body}|b")
                } else {
                    body
                };
                format!(
                    "{}{body}{}",
                    if start { "^" } else { "" },
                    if end { "$" } else { "" }
                )
            })
    }

    proptest! {
        /// A path the literals turn away is one the regex does not match.
        #[test]
        fn literals_never_turn_away_a_match(pattern in pattern(), path in "[ab/.1]{0,8}") {
            let regex = Regex::new(&pattern).unwrap();
            if regex.is_match(&path) {
                prop_assert!(Literals::of(&pattern).admit(&path), "{pattern} on {path}");
            }
        }
    }
}
