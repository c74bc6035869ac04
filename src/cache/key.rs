//! The one canonical cache key. Lookups, HTTP PURGE (both request forms) and every later
//! purge source build keys here and nowhere else, so a purge always names the object a reader
//! was served.
//!
//! The key is `scheme://host/path?query` with the host lowercased, its trailing dot and the
//! scheme's default port removed. The method is not in the key: HEAD is answered from the GET
//! entry (pingora turns a cacheable HEAD into a GET towards the origin).

use pingora::cache::key::HashBinary;
use pingora::cache::CacheKey;
use thiserror::Error;

use crate::config::host;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }

    fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("request has no host")]
    MissingHost,
    #[error("invalid host: {0:?}")]
    BadHost(String),
    #[error("path must start with '/' and hold no spaces or control characters")]
    BadPath,
    #[error("not an absolute http(s) URL")]
    NotAbsolute,
}

/// `[cache] host_aliases`: hosts that serve the same site as another (`wiki.example` and
/// `www.wiki.example`), so every spelling finds, and purges, one object. Keys and values are
/// normalised hosts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostAliases(pub std::collections::HashMap<String, String>);

impl HostAliases {
    /// `url` with its host replaced by the canonical one when it is an alias. An alias
    /// without a port matches its host on any port, as `[server] hosts` does (regression:
    /// `localhost` did not cover `localhost:8080`, which kept a copy no purge reached).
    pub fn canonical(&self, mut url: CacheUrl) -> CacheUrl {
        if self.0.is_empty() {
            return url;
        }
        let found = self.0.get(&url.host).or_else(|| {
            let (bare, port) = url.host.rsplit_once(':')?;
            let is_port = !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit());
            is_port.then(|| self.0.get(bare)).flatten()
        });
        if let Some(canonical) = found {
            url.host.clone_from(canonical);
        }
        url
    }
}

/// A request target reduced to what identifies a cached object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheUrl {
    pub scheme: Scheme,
    pub host: String,
    pub path_and_query: String,
}

impl CacheUrl {
    /// From a request's scheme, authority (URI authority or `Host` header) and target.
    pub fn new(scheme: Scheme, authority: &str, path_and_query: &str) -> Result<Self, KeyError> {
        let host = normalize_host(scheme, authority)?;
        if !path_and_query.starts_with('/') {
            return Err(KeyError::BadPath);
        }
        // The rules of a request target (RFC 9112 §3.2: no whitespace, RFC 3986: no control
        // characters), for every purge source too: the admin API percent-decodes its `url=`,
        // and a decoded line feed once planted a line of its own in the bans file.
        // A fragment never reaches a server (RFC 9110 §4.2.5) and is no part of the key: it
        // is looked for in the same pass.
        let mut fragment = None;
        for (at, b) in path_and_query.bytes().enumerate() {
            if b <= b' ' || b == 0x7f {
                return Err(KeyError::BadPath);
            }
            if b == b'#' && fragment.is_none() {
                fragment = Some(at);
            }
        }
        let path_and_query = fragment.map_or(path_and_query, |at| &path_and_query[..at]);
        Ok(CacheUrl {
            scheme,
            host,
            path_and_query: super::target::normalize(path_and_query).into_owned(),
        })
    }

    /// From an absolute URL such as MediaWiki puts in `PURGE http://host/wiki/X` and in
    /// HTCP CLR packets.
    pub fn parse_absolute(url: &str) -> Result<Self, KeyError> {
        let (scheme, rest) = if let Some(rest) = strip_prefix_ci(url, "http://") {
            (Scheme::Http, rest)
        } else if let Some(rest) = strip_prefix_ci(url, "https://") {
            (Scheme::Https, rest)
        } else {
            return Err(KeyError::NotAbsolute);
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_string()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_string()),
        };
        CacheUrl::new(scheme, authority, &path)
    }

    /// The host without its port: the name a certificate, `[server] hosts` or a redirect
    /// names.
    pub fn host_name(&self) -> &str {
        host::without_port(&self.host)
    }

    /// The primary key text, e.g. `http://en.wiki.test/wiki/Main_Page`.
    pub fn primary(&self) -> String {
        let mut s = String::with_capacity(
            self.scheme.as_str().len() + 3 + self.host.len() + self.path_and_query.len(),
        );
        s.push_str(self.scheme.as_str());
        s.push_str("://");
        s.push_str(&self.host);
        s.push_str(&self.path_and_query);
        s
    }

    /// pingora's key for this URL, carrying [`CacheUrl::primary_hash`] as its hash.
    pub fn cache_key(&self) -> CacheKey {
        self.cache_key_hashed(self.primary_hash())
    }

    /// [`CacheUrl::cache_key`], given the URL's `primary_hash` made earlier.
    pub fn cache_key_hashed(&self, primary: HashBinary) -> CacheKey {
        let mut key = CacheKey::new(self.primary(), "");
        key.set_primary_bin_override(primary);
        key
    }

    /// The hash storage indexes objects by ([`super::keyhash`]): `cache_key().primary_bin()`,
    /// without building the key. The parts join unambiguously: the host holds no `/` and the
    /// path starts with one.
    pub fn primary_hash(&self) -> HashBinary {
        super::keyhash::hash_parts(&[
            self.scheme.as_str().as_bytes(),
            b"://",
            self.host.as_bytes(),
            self.path_and_query.as_bytes(),
        ])
    }

    /// The same URL under the other scheme: a purge names both, since MediaWiki sends
    /// `http://` purges for pages readers fetch over https behind a TLS terminator.
    pub fn with_scheme(&self, scheme: Scheme) -> CacheUrl {
        CacheUrl {
            scheme,
            ..self.clone()
        }
    }
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    if s.len() >= prefix.len()
        && s.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
    {
        Some(&s[prefix.len()..])
    } else {
        None
    }
}

/// RFC 9110 §4.2.3: the host is case-insensitive and an explicit default port is the same as
/// none; a trailing dot names the same DNS host (RFC 1034 §3.1). See [`host::normalize_host`].
pub fn normalize_host(scheme: Scheme, authority: &str) -> Result<String, KeyError> {
    if authority.is_empty() {
        return Err(KeyError::MissingHost);
    }
    host::normalize_host(authority, scheme.default_port())
        .map_err(|_| KeyError::BadHost(authority.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `cache_key` fuzz target: ".." canonicalised to ".", which canonicalised
    /// to something else again.
    /// Found by the `cache_key` fuzz target: a fragment was kept by `new` but dropped by
    /// `parse_absolute`, so the same URL had two keys.
    #[test]
    fn an_alias_without_a_port_covers_every_port_of_its_host() {
        let aliases = HostAliases(
            [
                ("localhost".to_string(), "wiki.example".to_string()),
                ("[::1]".to_string(), "wiki.example".to_string()),
                ("other:8080".to_string(), "wiki.example".to_string()),
            ]
            .into(),
        );
        let host = |authority: &str| {
            aliases
                .canonical(CacheUrl::new(Scheme::Http, authority, "/").unwrap())
                .host
        };
        assert_eq!(host("localhost"), "wiki.example");
        assert_eq!(host("localhost:8080"), "wiki.example");
        assert_eq!(host("[::1]:8080"), "wiki.example");
        assert_eq!(host("other:8080"), "wiki.example");
        assert_eq!(
            host("other:9090"),
            "other:9090",
            "a port named is that port only"
        );
        assert_eq!(host("stranger:8080"), "stranger:8080");
    }

    #[test]
    fn regression_fragment_is_no_part_of_the_key() {
        let url = CacheUrl::new(Scheme::Http, "h", "/a?b#c#d").unwrap();
        assert_eq!(url.path_and_query, "/a?b");
        assert_eq!(CacheUrl::parse_absolute(&url.primary()).unwrap(), url);
    }

    #[test]
    fn regression_empty_dns_labels_are_not_a_host() {
        for host in ["..", ".", ".a", "a..b", "a.b..", "...:80"] {
            assert!(
                CacheUrl::new(Scheme::Http, host, "/").is_err(),
                "{host:?} was accepted"
            );
        }
        let url = CacheUrl::new(Scheme::Http, "Wiki.Test.:080", "/").unwrap();
        assert_eq!(url.host, "wiki.test");
        assert!(CacheUrl::new(Scheme::Http, "a:0", "/").is_err());
        assert!(CacheUrl::new(Scheme::Http, "a:99999", "/").is_err());
    }

    fn key(scheme: Scheme, host: &str, path: &str) -> String {
        CacheUrl::new(scheme, host, path).unwrap().primary()
    }

    #[test]
    fn host_is_normalised() {
        let want = "http://en.wiki.test/wiki/Main_Page";
        assert_eq!(key(Scheme::Http, "EN.Wiki.Test", "/wiki/Main_Page"), want);
        assert_eq!(key(Scheme::Http, "en.wiki.test.", "/wiki/Main_Page"), want);
        assert_eq!(
            key(Scheme::Http, "en.wiki.test:80", "/wiki/Main_Page"),
            want
        );
        assert_eq!(key(Scheme::Http, "en.wiki.test:", "/wiki/Main_Page"), want);
        assert_eq!(
            key(Scheme::Http, "en.wiki.test:8080", "/w?a=1"),
            "http://en.wiki.test:8080/w?a=1"
        );
        assert_eq!(
            key(Scheme::Https, "en.wiki.test:443", "/"),
            "https://en.wiki.test/"
        );
        assert_eq!(key(Scheme::Http, "[::1]:80", "/"), "http://[::1]/");
        assert_eq!(key(Scheme::Http, "a.test:080", "/"), "http://a.test/");
        assert_eq!(
            key(Scheme::Http, "a.test:08080", "/"),
            "http://a.test:8080/"
        );
        assert_eq!(
            key(Scheme::Http, "a.test:65535", "/"),
            "http://a.test:65535/"
        );
        assert_eq!(key(Scheme::Http, "a.test:1", "/"), "http://a.test:1/");
    }

    #[test]
    fn host_name_drops_the_port_and_keeps_ipv6_brackets() {
        for (authority, name) in [
            ("En.Wiki.Test:8080", "en.wiki.test"),
            ("wiki.test", "wiki.test"),
            ("[::1]:8080", "[::1]"),
            ("[::1]", "[::1]"),
        ] {
            let url = CacheUrl::new(Scheme::Http, authority, "/").unwrap();
            assert_eq!(url.host_name(), name, "{authority}");
        }
    }

    #[test]
    fn purge_url_matches_request_key() {
        let from_request = CacheUrl::new(Scheme::Http, "En.Wiki.Test:80", "/wiki/A?x=1").unwrap();
        let from_purge = CacheUrl::parse_absolute("HTTP://en.wiki.test./wiki/A?x=1#frag").unwrap();
        assert_eq!(from_request, from_purge);
        assert_eq!(
            CacheUrl::parse_absolute("http://h?q").unwrap().primary(),
            "http://h/?q"
        );
    }

    #[test]
    fn primary_hash_is_pingoras_primary_bin() {
        use pingora::cache::key::CacheHashKey;
        let url = CacheUrl::parse_absolute("http://h/wiki/A").unwrap();
        assert_eq!(url.primary_hash(), url.cache_key().primary_bin());
        assert_eq!(
            url.primary_hash(),
            crate::cache::keyhash::hash_parts(&[url.primary().as_bytes()])
        );
    }

    #[test]
    fn bad_hosts_are_rejected() {
        assert_eq!(
            CacheUrl::new(Scheme::Http, "", "/"),
            Err(KeyError::MissingHost)
        );
        assert!(CacheUrl::new(Scheme::Http, "a b", "/").is_err());
        assert!(CacheUrl::new(Scheme::Http, "user@host", "/").is_err());
        assert!(CacheUrl::new(Scheme::Http, "host:99999x", "/").is_err());
        assert!(CacheUrl::new(Scheme::Http, "host", "nopath").is_err());
        assert!(CacheUrl::parse_absolute("ftp://host/").is_err());
    }

    #[test]
    fn a_dns_label_holds_letters_digits_hyphens_and_underscores_and_nothing_else() {
        for byte in 0..=u8::MAX {
            let Ok(text) = std::str::from_utf8(&[b'a', byte, b'z']).map(str::to_string) else {
                continue;
            };
            // `.` and `:` split labels and ports: `a.z` and `a:z` say other things.
            if byte == b'.' || byte == b':' {
                continue;
            }
            let allowed = byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_';
            assert_eq!(
                CacheUrl::new(Scheme::Http, &text, "/").is_ok(),
                allowed,
                "{text:?}"
            );
        }
    }
}
