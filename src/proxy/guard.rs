//! What is refused or removed at the edge before a request reaches the cache or an origin:
//! framing that two HTTP parsers could read differently (request smuggling), requests over the
//! configured size limits, hosts this cache does not serve, and request headers a client could
//! use to poison what is cached for everyone. What pingora's parser refuses (obs-fold, bare
//! CR, differing `Content-Length`s, unknown transfer codings) is refused before it, as Skua's
//! answer (`connection::refused_head`); this adds what it lets through.

use std::net::IpAddr;

use pingora::http::RequestHeader;

use crate::cache::key::Scheme;
use crate::config::HeadLimits;
use crate::purge::Acl;

/// Why a request is refused: its status and a line for the client.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: String,
}

fn refuse(status: u16, reason: impl Into<String>) -> Refusal {
    Refusal {
        status,
        reason: reason.into(),
    }
}

/// Checks framing and size. A refusal with status 400 must also close the connection: what
/// follows on it cannot be framed.
pub fn check(req: &RequestHeader, limits: &HeadLimits) -> Result<(), Refusal> {
    let lengths = req.headers.get_all(http::header::CONTENT_LENGTH);
    let mut count = 0;
    for v in lengths.iter() {
        count += 1;
        // RFC 9112 §6.3: a Content-Length that is not a single decimal number is unrecoverable
        // framing; "5, 5" is such a value even though RFC 9110 §8.6 lets a recipient fold it.
        if v.is_empty() || !v.as_bytes().iter().all(u8::is_ascii_digit) {
            return Err(refuse(400, "invalid Content-Length"));
        }
    }
    if count > 1 {
        return Err(refuse(400, "more than one Content-Length"));
    }
    // RFC 9112 §6.1: "A server MAY reject a request that contains both Content-Length and
    // Transfer-Encoding or process such a request in accordance with the Transfer-Encoding
    // alone". Rejecting is the only choice that no server behind us can disagree with.
    if count > 0 && req.headers.contains_key(http::header::TRANSFER_ENCODING) {
        return Err(refuse(
            400,
            "both Content-Length and Transfer-Encoding (RFC 9112 §6.1)",
        ));
    }
    // RFC 9112 §3.2.2: an absolute-form target carries a scheme; the resources Skua serves
    // are http and https ones. (CONNECT's authority form, `host:port`, is refused later with
    // a hint of its own.)
    let absolute = (req.method != http::Method::CONNECT)
        .then(|| absolute_form_scheme(req.raw_path()))
        .flatten();
    if let Some(scheme) = absolute {
        if !scheme.eq_ignore_ascii_case(b"http") && !scheme.eq_ignore_ascii_case(b"https") {
            return Err(refuse(400, "only http and https targets are served"));
        }
    }
    // RFC 9112 §3.2: a target is origin-form (`/path?query`), absolute-form, authority-form
    // (CONNECT's) or asterisk-form (`OPTIONS *`). pingora percent-encodes what a request line
    // should not hold into its target, so `GET  /a` (two spaces) arrived as `%20/a`; a target
    // that is none of the four has no path, and was keyed as the site's root (regression
    // test `a_target_that_is_not_a_path_is_refused_and_never_stored_as_the_root`).
    let target = req.raw_path();
    let some_form = target.first() == Some(&b'/')
        || absolute.is_some()
        || req.method == http::Method::CONNECT
        || (target == b"*" && req.method == http::Method::OPTIONS);
    if !some_form {
        return Err(refuse(
            400,
            "the request target is not a path (RFC 9112 §3.2)",
        ));
    }
    let uri = req.uri.path_and_query().map_or(0, |p| p.as_str().len())
        + req.uri.authority().map_or(0, |a| a.as_str().len());
    if uri > limits.max_uri_bytes {
        return Err(refuse(
            414,
            format!("request target longer than {} bytes", limits.max_uri_bytes),
        ));
    }
    let (count, bytes) = field_size(&req.headers);
    if count > limits.max_headers {
        return Err(refuse(
            431,
            format!("more than {} header fields", limits.max_headers),
        ));
    }
    if bytes > limits.max_header_bytes {
        return Err(refuse(
            431,
            format!("header fields over {} bytes", limits.max_header_bytes),
        ));
    }
    // Answered before the body is read, so pingora closes the connection after it (RFC 9110
    // §10.1.1 allows reading the body or closing); a client waiting for `100 Continue` gets
    // the 413 instead and sends nothing. A body without a declared length is counted as it
    // arrives (`request_body_filter`).
    if let Some(limit) = limits.max_body_bytes {
        if declares_body_over(req, limit) {
            return Err(refuse(
                413,
                format!("request body over {limit} bytes (max_body_bytes)"),
            ));
        }
    }
    Ok(())
}

/// How many fields `fields` are, and how many bytes, as an HTTP/1.1 head would carry them:
/// the `Cookie` fields as the one they are joined into (RFC 9113 §8.2.3: an HTTP/2 client may
/// send each cookie as a field of its own, and browsers do, for header compression; they reach
/// the origin as one). Regression: a browser's 150 cookies over HTTP/2 got 431 "more than 100
/// header fields", where the same request over HTTP/1.1 was served.
pub fn field_size(fields: &http::HeaderMap) -> (usize, usize) {
    let (mut count, mut bytes, mut cookies) = (0, 0, 0);
    for (name, value) in fields {
        if name == http::header::COOKIE {
            cookies += 1;
            if cookies > 1 {
                bytes += value.len() + 2;
                continue;
            }
        }
        count += 1;
        bytes += name.as_str().len() + value.len() + 4;
    }
    (count, bytes)
}

/// The scheme of an absolute-form request target (`http://host/x` → `http`), as sent: pingora
/// parses only its path and query into the request's `uri`. Origin form (`/x`), asterisk form
/// (`*`) and anything without a `scheme:` prefix give `None`.
pub fn absolute_form_scheme(target: &[u8]) -> Option<&[u8]> {
    if target.first() == Some(&b'/') {
        return None;
    }
    let colon = target.iter().position(|b| *b == b':')?;
    let scheme = &target[..colon];
    // RFC 3986 §3.1: scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )
    let well_formed = scheme.first().is_some_and(u8::is_ascii_alphabetic)
        && scheme
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    well_formed.then_some(scheme)
}

/// Whether `req` declares a body longer than `limit` bytes (`max_body_bytes`). A
/// `Content-Length` that is no number was refused earlier in [`check`]; one past `u64` is over
/// any limit.
pub fn declares_body_over(req: &RequestHeader, limit: u64) -> bool {
    declared_length(req).is_some_and(|n| n.is_none_or(|n| n > limit))
}

/// The body length a request declares in `Content-Length`: `None` without the field,
/// `Some(None)` for one that is no number.
pub fn declared_length(req: &RequestHeader) -> Option<Option<u64>> {
    let value = req.headers.get(http::header::CONTENT_LENGTH)?;
    Some(
        value
            .to_str()
            .ok()
            .and_then(|n| n.trim().parse::<u64>().ok()),
    )
}

/// Why `Content-Length` values give no one length.
#[derive(Debug, PartialEq, Eq)]
pub enum BadLength {
    /// A value (or a list member) that is no number: `Content-Length = 1*DIGIT`, no sign, no
    /// space inside.
    Invalid,
    /// Numbers that differ.
    Differing,
}

/// The one length a message's `Content-Length` values give, `None` without one. RFC 9110
/// §8.6: a list of identical values (`4, 4`, or the field twice) may be taken as that value;
/// any other list, or a value that is no number, is framing two parsers may read differently
/// (RFC 9112 §6.3: "an unrecoverable error").
pub fn agreed_length<'a>(
    values: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Option<u64>, BadLength> {
    let mut length = None;
    for value in values {
        for part in value.split(|b| *b == b',') {
            let digits = part.trim_ascii();
            if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
                return Err(BadLength::Invalid);
            }
            let n = std::str::from_utf8(digits)
                .ok()
                .and_then(|d| d.parse::<u64>().ok())
                .ok_or(BadLength::Invalid)?;
            if length.is_some_and(|l| l != n) {
                return Err(BadLength::Differing);
            }
            length = Some(n);
        }
    }
    Ok(length)
}

/// Whether a raw request head names a Content-Length field. pingora drops Content-Length
/// when Transfer-Encoding is present (RFC 9112 §6.3's other permitted reading), so a request
/// carrying both is recognised from its raw bytes; only requests with Transfer-Encoding are
/// looked at.
pub fn raw_has_content_length(raw: &[u8]) -> bool {
    const NAME: &[u8] = b"\ncontent-length:";
    raw.windows(NAME.len())
        .any(|w| w.eq_ignore_ascii_case(NAME))
}

/// Request headers no client may set for the origin to trust: they change what the origin
/// thinks the URL, host, port, path prefix, method or scheme is (so a response for one URL is
/// cached under another) or route it through a proxy (httpoxy, CVE-2016-5385).
/// `x-forwarded-proto` and `x-forwarded-for` are kept only from trusted proxies.
pub const UNTRUSTED_HEADERS: [&str; 20] = [
    "x-forwarded-host",
    "x-forwarded-scheme",
    // The scheme under the other names frameworks read it by (Rack and gunicorn's
    // `X-Forwarded-Ssl: on`, gunicorn's `X-Forwarded-Protocol: ssl`, Tornado's `X-Scheme`,
    // `X-Url-Scheme`, IIS and Exchange's `Front-End-Https: on`): an origin told a plain request
    // was HTTPS answers it as one (no redirect to HTTPS, `https` links) under the `http` key.
    // Skua keys the scheme by `X-Forwarded-Proto` alone, which it sets.
    "x-forwarded-ssl",
    "x-forwarded-protocol",
    "x-scheme",
    "x-url-scheme",
    "front-end-https",
    "x-forwarded-server",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-host",
    "x-original-host",
    "x-original-url",
    "x-rewrite-url",
    // A method override under each name frameworks read it by: the origin would answer a
    // GET as another method, under the GET's key.
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "forwarded",
    "proxy",
    // Not a forwarding header at all, and the origin never needs it.
    "proxy-authorization",
];

/// Headers only a trusted proxy in front of Skua may set: the client's scheme, the request's
/// id, and the client's address under every name an origin or a web server in front of it
/// may read it by (nginx's `real_ip_header`, PHP applications' `HTTP_X_REAL_IP`, CDNs' own
/// names). Regression: a
/// client's `X-Real-IP: 9.9.9.9` reached the origin as the client's address, past IP blocks
/// and rate limits that trust the proxy in front.
const PROXY_HEADERS: [&str; 12] = [
    "x-forwarded-for",
    // Read by PHP's common client-address lookups (`HTTP_X_FORWARDED`, `HTTP_FORWARDED_FOR`,
    // beside `HTTP_CLIENT_IP` and `HTTP_X_CLUSTER_CLIENT_IP` below).
    "x-forwarded",
    "forwarded-for",
    "x-forwarded-proto",
    // An id a balancer in front gave the request (`proxy::request_id`).
    "x-request-id",
    "x-real-ip",
    "x-client-ip",
    "client-ip",
    "x-cluster-client-ip",
    "true-client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
];

/// Request headers that control Skua itself (purge modes); meaningless on anything but a
/// PURGE and never sent on to an origin.
const OWN_PREFIX: &str = "skua-";

/// Whether a request header is removed before the request goes to an origin. A name spelled
/// with underscores counts as its dashed form and is always removed: CGI and PHP turn both
/// `X_Forwarded_Host` and `X-Forwarded-Host` into `HTTP_X_FORWARDED_HOST`, and no proxy sends
/// the underscore spelling.
pub fn is_stripped(
    name: &http::HeaderName,
    extra: &[http::HeaderName],
    from_trusted_proxy: bool,
) -> bool {
    let n = name.as_str();
    if n.contains('_') {
        let dashed = n.replace('_', "-");
        return UNTRUSTED_HEADERS.contains(&dashed.as_str())
            || PROXY_HEADERS.contains(&dashed.as_str())
            || dashed.starts_with(OWN_PREFIX)
            || extra.iter().any(|e| e.as_str() == dashed);
    }
    UNTRUSTED_HEADERS.contains(&n)
        || (!from_trusted_proxy && PROXY_HEADERS.contains(&n))
        || n.starts_with(OWN_PREFIX)
        || extra.contains(name)
}

/// Removes the headers above from a request about to be proxied. `from_trusted_proxy`: the
/// connection comes from a configured trusted proxy, whose forwarding headers are kept.
pub fn strip(req: &mut RequestHeader, extra: &[http::HeaderName], from_trusted_proxy: bool) {
    // Every request passes here: one look at its few headers, and removals only when
    // something is there to remove.
    let stripped = |name: &http::HeaderName| is_stripped(name, extra, from_trusted_proxy);
    if !req.headers.keys().any(stripped) {
        return;
    }
    let names: Vec<http::HeaderName> = req
        .headers
        .keys()
        .filter(|n| stripped(n))
        .cloned()
        .collect();
    for name in names {
        req.remove_header(&name);
    }
}

/// `X-Forwarded-For`, as a name built once: a lookup by `&str` parses the name first.
pub const X_FORWARDED_FOR: http::HeaderName = http::HeaderName::from_static("x-forwarded-for");

/// Appends `ip` to an `X-Forwarded-For` value as `Display` writes it, on either path: IPv4 by
/// hand, since every miss writes the client's address and `Display` costs about 1,200 of a
/// miss's instructions (`benches/instructions.py`).
pub fn push_address(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            let mut digits = itoa::Buffer::new();
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                out.extend_from_slice(digits.format(octet).as_bytes());
            }
        }
        IpAddr::V6(v6) => out.extend_from_slice(v6.to_string().as_bytes()),
    }
}

/// `X-Forwarded-Proto`, as a name built once: a lookup by `&str` parses the name first.
/// As text, for the front door's loop over every field: a `HeaderName` constant of a custom
/// name is built and dropped (an indirect call) wherever it is compared.
pub const X_FORWARDED_PROTO_NAME: &str = "x-forwarded-proto";
pub const X_FORWARDED_PROTO: http::HeaderName =
    http::HeaderName::from_static(X_FORWARDED_PROTO_NAME);

/// The scheme a request was made with, which is part of its cache key (RFC 9110 §4.2: an
/// http and an https URL name different resources): the listener's, unless a trusted proxy
/// in front (a TLS terminator) names another in `X-Forwarded-Proto`. From anyone else the
/// header is not believed (and `strip` removes it). Of a list, the first member is the scheme
/// the client used; a value that is neither `http` nor `https` is ignored.
pub fn request_scheme(
    listener: Scheme,
    forwarded_proto: Option<&[u8]>,
    from_trusted_proxy: impl FnOnce() -> bool,
) -> Scheme {
    let Some(value) = forwarded_proto else {
        return listener;
    };
    let first = value.split(|b| *b == b',').next().unwrap_or(b"");
    let said = match first.trim_ascii() {
        s if s.eq_ignore_ascii_case(b"https") => Scheme::Https,
        s if s.eq_ignore_ascii_case(b"http") => Scheme::Http,
        _ => return listener,
    };
    if said != listener && from_trusted_proxy() {
        said
    } else {
        listener
    }
}

/// What `Max-Forwards` asks of this node (RFC 9110 §7.6.2): "An intermediary that receives a
/// TRACE or OPTIONS request containing a Max-Forwards header field MUST check and update its
/// value prior to forwarding the request. If the received value is zero (0), the intermediary
/// MUST NOT forward the request; instead, the intermediary MUST respond as the final
/// recipient." Other methods ignore it ("A recipient MAY ignore a Max-Forwards header field
/// received with any other request method"), as does a value that is not a number.
#[derive(Debug, PartialEq, Eq)]
pub enum MaxForwards {
    Absent,
    Zero,
    /// Forward with this value instead.
    Next(u64),
}

pub fn max_forwards(req: &RequestHeader) -> MaxForwards {
    if !matches!(req.method.as_str(), "OPTIONS" | "TRACE") {
        return MaxForwards::Absent;
    }
    let Some(value) = req.headers.get(http::header::MAX_FORWARDS) else {
        return MaxForwards::Absent;
    };
    // `Max-Forwards = 1*DIGIT`; a value too long for a u64 is still far from zero.
    let digits = value.as_bytes().trim_ascii();
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return MaxForwards::Absent;
    }
    match std::str::from_utf8(digits)
        .ok()
        .and_then(|d| d.parse::<u64>().ok())
    {
        Some(0) => MaxForwards::Zero,
        Some(n) => MaxForwards::Next(n - 1),
        None => MaxForwards::Next(u64::MAX),
    }
}

/// Whether `ip` is one of the proxies whose forwarding headers are believed.
pub fn trusted(proxies: &Acl, ip: Option<IpAddr>) -> bool {
    ip.is_some_and(|ip| proxies.allows(ip))
}

/// A trusted balancer's `Forwarded` (RFC 7239) as the `X-Forwarded-For` and
/// `X-Forwarded-Proto` values it stands for, when it sent no `X-Forwarded-For` (HAProxy's
/// `option forwarded` sends only this): each element's `for=` in order (§5.2: an address, an
/// address and port, or an identifier such as `unknown`, which names no address and is
/// judged as such), and the first element's `proto=` (§5.4: the scheme the client used).
/// `None` when there is nothing to read.
pub fn forwarded_as_x_headers(headers: &http::HeaderMap) -> Option<(String, Option<Scheme>)> {
    if headers.contains_key(X_FORWARDED_FOR) || !headers.contains_key(FORWARDED) {
        return None;
    }
    let mut chain = Vec::new();
    let mut scheme = None;
    let lines = headers.get_all(FORWARDED).iter();
    let elements = lines
        .filter_map(|line| line.to_str().ok())
        .flat_map(|line| line.split(','));
    for (i, element) in elements.enumerate() {
        for pair in element.split(';') {
            let Some((name, value)) = pair.split_once('=') else {
                continue;
            };
            let value = value.trim().trim_matches('"');
            match name.trim().to_ascii_lowercase().as_str() {
                "for" if !value.is_empty() => chain.push(value.to_string()),
                "proto" if i == 0 => {
                    scheme = match value.to_ascii_lowercase().as_str() {
                        "https" => Some(Scheme::Https),
                        "http" => Some(Scheme::Http),
                        _ => None,
                    }
                }
                _ => {}
            }
        }
    }
    (!chain.is_empty()).then(|| (chain.join(", "), scheme))
}

const FORWARDED: http::HeaderName = http::header::FORWARDED;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_written_as_display_writes_it() {
        for ip in [
            "127.0.0.1",
            "0.0.0.0",
            "10.20.255.9",
            "255.255.255.255",
            "::1",
            "2001:db8::7",
        ] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            let mut out = b"x".to_vec();
            push_address(&mut out, ip);
            assert_eq!(out, format!("x{ip}").into_bytes());
        }
    }

    #[test]
    fn an_absolute_form_targets_scheme_is_found() {
        assert_eq!(absolute_form_scheme(b"http://h/x"), Some(&b"http"[..]));
        assert_eq!(absolute_form_scheme(b"HTTPS://h"), Some(&b"HTTPS"[..]));
        assert_eq!(
            absolute_form_scheme(b"foo+bar://h/x"),
            Some(&b"foo+bar"[..])
        );
        for not_absolute in [&b"/x"[..], b"/a:b", b"*", b"", b"1abc://h", b":x"] {
            assert_eq!(absolute_form_scheme(not_absolute), None);
        }
    }

    #[test]
    fn max_forwards_is_counted_down_on_options_and_trace_only() {
        let req = |method: &str, value: Option<&str>| {
            let mut r = RequestHeader::build(method, b"/x", None).unwrap();
            if let Some(v) = value {
                r.insert_header("max-forwards", v).unwrap();
            }
            max_forwards(&r)
        };
        assert_eq!(req("OPTIONS", Some("0")), MaxForwards::Zero);
        assert_eq!(req("TRACE", Some(" 0 ")), MaxForwards::Zero);
        assert_eq!(req("OPTIONS", Some("5")), MaxForwards::Next(4));
        assert_eq!(
            req("OPTIONS", Some("99999999999999999999999")),
            MaxForwards::Next(u64::MAX)
        );
        for ignored in [
            req("GET", Some("0")),
            req("OPTIONS", None),
            req("OPTIONS", Some("-1")),
            req("OPTIONS", Some("")),
            req("TRACE", Some("1e3")),
        ] {
            assert_eq!(ignored, MaxForwards::Absent);
        }
    }

    #[test]
    fn the_scheme_is_the_listeners_unless_a_trusted_proxy_says_otherwise() {
        let value = |v: &'static str| v.as_bytes();
        let trusted = || true;
        assert_eq!(request_scheme(Scheme::Http, None, trusted), Scheme::Http);
        for https in ["https", "HTTPS", " https , http", "https,https"] {
            let v = value(https);
            assert_eq!(
                request_scheme(Scheme::Http, Some(v), trusted),
                Scheme::Https,
                "{https}"
            );
            assert_eq!(
                request_scheme(Scheme::Http, Some(v), || false),
                Scheme::Http
            );
        }
        for ignored in ["", "ftp", "http", "wss, https"] {
            let v = value(ignored);
            assert_eq!(
                request_scheme(Scheme::Http, Some(v), trusted),
                Scheme::Http,
                "{ignored}"
            );
        }
        let v = value("http");
        assert_eq!(
            request_scheme(Scheme::Https, Some(v), trusted),
            Scheme::Http
        );
    }

    const LIMITS: HeadLimits = HeadLimits {
        max_uri_bytes: 100,
        max_header_bytes: 1000,
        max_headers: 10,
        max_body_bytes: Some(1000),
    };

    fn req(headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("POST", b"/x", None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        let status = |h: &[(&str, &str)]| check(&req(h), &LIMITS).err().map(|r| r.status);
        assert_eq!(status(&[("content-length", "5")]), None);
        assert_eq!(status(&[("transfer-encoding", "chunked")]), None);
        assert_eq!(
            status(&[("content-length", "5"), ("transfer-encoding", "chunked")]),
            Some(400)
        );
        assert_eq!(
            status(&[("content-length", "5"), ("content-length", "5")]),
            Some(400)
        );
        assert_eq!(status(&[("content-length", "5, 5")]), Some(400));
        assert_eq!(status(&[("content-length", "+5")]), Some(400));
        assert_eq!(status(&[("content-length", "")]), Some(400));
    }

    #[test]
    fn content_length_is_found_in_a_raw_head() {
        assert!(raw_has_content_length(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-LENGTH: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        ));
        assert!(!raw_has_content_length(
            b"POST / HTTP/1.1\r\nHost: a\r\nX-Content-Length: 5\r\n\r\n"
        ));
    }

    #[test]
    fn limits_give_414_and_431() {
        let mut long = RequestHeader::build("GET", "/a".repeat(60).as_bytes(), None).unwrap();
        assert_eq!(check(&long, &LIMITS).unwrap_err().status, 414);
        long.set_uri("/short".parse().unwrap());
        assert!(check(&long, &LIMITS).is_ok());
        let many: Vec<(String, String)> = (0..11).map(|i| (format!("x-{i}"), "v".into())).collect();
        let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(check(&req(&many), &LIMITS).unwrap_err().status, 431);
        let big = "v".repeat(1000);
        assert_eq!(
            check(&req(&[("x", &big)]), &LIMITS).unwrap_err().status,
            431
        );
    }

    #[test]
    fn a_declared_body_is_measured_against_max_body_bytes() {
        let status = |len: &str| check(&req(&[("content-length", len)]), &LIMITS).err();
        assert_eq!(status("1000"), None);
        assert_eq!(status("1001").map(|r| r.status), Some(413));
        assert_eq!(
            status("99999999999999999999999").map(|r| r.status),
            Some(413)
        );
        assert!(check(&req(&[("transfer-encoding", "chunked")]), &LIMITS).is_ok());
        let unlimited = HeadLimits {
            max_body_bytes: None,
            ..LIMITS
        };
        assert!(check(&req(&[("content-length", "1001")]), &unlimited).is_ok());
    }

    #[test]
    fn forwarded_stands_for_the_x_headers_only_where_they_are_absent() {
        let of = |fields: &[(&str, &str)]| forwarded_as_x_headers(&req(fields).headers);
        assert_eq!(
            of(&[
                ("forwarded", "for=192.0.2.60;proto=HTTPS;by=203.0.113.43"),
                ("forwarded", "For=\"[2001:db8:cafe::17]:4711\", for=unknown"),
            ]),
            Some((
                "192.0.2.60, [2001:db8:cafe::17]:4711, unknown".to_string(),
                Some(Scheme::Https)
            ))
        );
        // The scheme is the client's, the first element's; a later hop's is no answer.
        assert_eq!(
            of(&[("forwarded", "for=192.0.2.60, for=10.0.0.1;proto=https")]),
            Some(("192.0.2.60, 10.0.0.1".to_string(), None))
        );
        assert_eq!(of(&[("forwarded", "proto=https")]), None);
        assert_eq!(
            of(&[
                ("forwarded", "for=192.0.2.60"),
                ("x-forwarded-for", "192.0.2.61")
            ]),
            None
        );
        assert_eq!(of(&[]), None);
    }

    #[test]
    fn poisoning_headers_are_stripped() {
        let mut r = req(&[
            ("x-forwarded-host", "evil.example"),
            ("x-original-url", "/admin"),
            ("proxy", "http://evil:8080"),
            ("forwarded", "host=evil"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-real-ip", "1.2.3.4"),
            ("true-client-ip", "1.2.3.4"),
            ("skua-soft-purge", "1"),
            ("accept", "text/html"),
        ]);
        strip(&mut r, &[], false);
        let left: Vec<&str> = r.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["accept"]);
        let mut r = req(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-real-ip", "1.2.3.4"),
            ("x-forwarded-host", "e"),
        ]);
        strip(&mut r, &[], true);
        let left: Vec<&str> = r.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["x-forwarded-for", "x-real-ip"]);
    }
}
