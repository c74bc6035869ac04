//! Responses Skua writes itself: short, one-line (or the operator's `[server] error_page` for
//! a 5xx), never cached, and marked as Skua's own in `X-Cache-Status` and `Cache-Status` like
//! every other response.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::Result;

use crate::cache::meta::{CACHE_STATUS, X_CACHE_STATUS};
use crate::cache::status::Disposition;

/// A status with a one-line plain-text body.
pub async fn text(name: &str, session: &mut Session, status: u16, line: &str) -> Result<()> {
    let (resp, body) = text_response(status, line)?;
    header(name, session, resp, Some(body)).await
}

/// What fills an error page's blanks: nothing taken from the request but the client's
/// address, so a page cannot be made to show a reader anything an attacker wrote.
pub struct PageFacts<'a> {
    pub status: u16,
    pub message: &'a str,
    pub node: &'a str,
    pub client: Option<std::net::IpAddr>,
    /// The id the request went to the origin with (`[server] request_id`).
    pub request_id: Option<&'a str>,
}

/// A 5xx Skua answers itself: the operator's page (`[server] error_page`) when there is one,
/// else the one-line text.
pub async fn error(session: &mut Session, page: Option<&str>, facts: PageFacts<'_>) -> Result<()> {
    let (resp, body) = error_response(page, &facts)?;
    header(facts.node, session, resp, Some(body)).await
}

/// [`error`] as the bytes written on a connection that then closes (the front door's).
pub fn error_wire(page: Option<&str>, facts: PageFacts<'_>) -> Vec<u8> {
    closing_wire(page, facts, false)
}

/// A connection refused before its request was read (`max_connections`,
/// `max_connections_per_client`): [`error_wire`] with `Retry-After: 1` (RFC 9110 §10.2.3: how
/// long the client is asked to wait before trying again).
pub fn refusal_wire(page: Option<&str>, facts: PageFacts<'_>) -> Vec<u8> {
    closing_wire(page, facts, true)
}

fn closing_wire(page: Option<&str>, facts: PageFacts<'_>, retry: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(1024);
    let Ok((mut resp, body)) = error_response(page, &facts) else {
        return out;
    };
    if retry {
        let _ = resp.insert_header(http::header::RETRY_AFTER, "1");
    }
    wire(facts.node, resp, &body, &mut out);
    out
}

fn error_response(page: Option<&str>, facts: &PageFacts<'_>) -> Result<(ResponseHeader, Bytes)> {
    let line = format!("skua: {}", facts.message);
    let Some(page) = page else {
        return text_response(facts.status, &line);
    };
    let reason = http::StatusCode::from_u16(facts.status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    let client = facts.client.map(|ip| ip.to_string()).unwrap_or_default();
    let date = pingora::protocols::http::date::get_cached_date();
    let body = Bytes::from(
        page.replace("{{status}}", &facts.status.to_string())
            .replace("{{reason}}", reason)
            .replace("{{message}}", facts.message)
            .replace("{{node}}", facts.node)
            .replace("{{time}}", date.to_str().unwrap_or_default())
            .replace("{{client}}", &client)
            .replace("{{request_id}}", facts.request_id.unwrap_or("-")),
    );
    let mut resp = ResponseHeader::build(facts.status, Some(6))?;
    resp.insert_header("content-type", "text/html; charset=utf-8")?;
    resp.insert_header("content-length", body.len().to_string())?;
    resp.insert_header("cache-control", "no-store")?;
    Ok((resp, body))
}

fn text_response(status: u16, line: &str) -> Result<(ResponseHeader, Bytes)> {
    let body = Bytes::from(format!("{line}\n"));
    let mut resp = ResponseHeader::build(status, Some(6))?;
    resp.insert_header("content-type", "text/plain; charset=utf-8")?;
    resp.insert_header("content-length", body.len().to_string())?;
    resp.insert_header("cache-control", "no-store")?;
    Ok((resp, body))
}

/// A response Skua answers itself, on a connection that then closes, as the wire has it.
fn wire(name: &str, mut resp: ResponseHeader, body: &[u8], out: &mut Vec<u8>) {
    let _ = resp.insert_header(X_CACHE_STATUS, Disposition::IntFront.as_str());
    let _ = resp.insert_header(CACHE_STATUS, format!("{name}; detail=internal"));
    let _ = resp.insert_header(
        http::header::DATE,
        pingora::protocols::http::date::get_cached_date(),
    );
    let _ = resp.insert_header(http::header::CONNECTION, "close");
    head_to_wire(&resp, out);
    out.extend_from_slice(body);
}

/// An HTTP/1.1 response head as written on the wire: status line, fields, blank line.
pub(super) fn head_to_wire(resp: &pingora::http::ResponseHeader, out: &mut Vec<u8>) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(resp.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(resp.get_reason_phrase().unwrap_or_default().as_bytes());
    out.extend_from_slice(b"\r\n");
    resp.header_to_h1_wire(out);
    out.extend_from_slice(b"\r\n");
}

/// A redirect to `location`, with a one-line body saying where.
pub async fn redirect(
    name: &str,
    session: &mut Session,
    status: u16,
    location: &str,
) -> Result<()> {
    let body = Bytes::from(format!("skua: moved to {location}\n"));
    let mut resp = ResponseHeader::build(status, Some(6))?;
    resp.insert_header("location", location)?;
    resp.insert_header("content-type", "text/plain; charset=utf-8")?;
    resp.insert_header("content-length", body.len().to_string())?;
    resp.insert_header("cache-control", "no-store")?;
    header(name, session, resp, Some(body)).await
}

/// 429 Too Many Requests (RFC 6585 §4), with `Retry-After` (RFC 9110 §10.2.3) in whole
/// seconds, at least one.
pub async fn too_many(name: &str, session: &mut Session, wait: std::time::Duration) -> Result<()> {
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let body = Bytes::from_static(b"skua: too many requests\n");
    let mut resp = ResponseHeader::build(429, Some(6))?;
    resp.insert_header("retry-after", seconds.max(1).to_string())?;
    resp.insert_header("content-type", "text/plain; charset=utf-8")?;
    resp.insert_header("content-length", body.len().to_string())?;
    resp.insert_header("cache-control", "no-store")?;
    header(name, session, resp, Some(body)).await
}

/// What a node that is the final recipient of `OPTIONS` or `TRACE` answers (RFC 9110
/// §7.6.2, `Max-Forwards: 0`): `OPTIONS`, 200 with the methods it passes on in `Allow`
/// (§9.3.7); `TRACE`, 405 (§15.5.6) rather than the request reflected back (§9.3.8's
/// "SHOULD", which would show a script the request's credentials: cross-site tracing).
pub async fn final_recipient(name: &str, session: &mut Session) -> Result<()> {
    const ALLOW: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";
    let trace = session.req_header().method.as_str() == "TRACE";
    let mut resp = ResponseHeader::build(if trace { 405 } else { 200 }, Some(6))?;
    resp.insert_header("allow", ALLOW)?;
    resp.insert_header("cache-control", "no-store")?;
    header(name, session, resp, None).await
}

/// Writes `resp` and an optional body, closing the response.
/// `name`: this cache's name in `Cache-Status`.
pub async fn header(
    name: &str,
    session: &mut Session,
    mut resp: ResponseHeader,
    body: Option<Bytes>,
) -> Result<()> {
    if !resp.headers.contains_key(&X_CACHE_STATUS) {
        resp.insert_header(X_CACHE_STATUS, Disposition::IntFront.as_str())?;
        resp.insert_header(CACHE_STATUS, format!("{name}; detail=internal"))?;
    }
    if body.is_none() && resp.status.as_u16() != 204 && resp.status.as_u16() != 304 {
        resp.insert_header("content-length", "0")?;
    }
    if resp.status.as_u16() == 400 {
        // A request Skua could not understand: what follows it on the connection may not be
        // what the client meant to send next, so nothing more is read (RFC 9112 §9.6 lets a
        // server close after any response).
        session.set_keepalive(None);
    }
    let is_head = session.req_header().method == http::Method::HEAD;
    let end = body.is_none() || is_head;
    session.write_response_header(Box::new(resp), end).await?;
    if let (Some(body), false) = (body, is_head) {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}
