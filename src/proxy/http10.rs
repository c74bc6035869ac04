//! HTTP/1.0 clients get no chunked framing. RFC 9112 §6.1: "A server MUST NOT send a
//! response containing Transfer-Encoding unless the corresponding request indicates HTTP/1.1
//! (or later minor revisions)." pingora's HTTP/1 server frames a body of unknown length in
//! chunks whatever the request's version, so an HTTP/1.0 client (ApacheBench, old monitoring
//! probes and proxies) read the chunk lines as part of the page: a stored copy decoded for it,
//! or an origin's chunked answer passed on. Such a body is sent as it is and ended by closing
//! the connection (RFC 9112 §6.3), which pingora does for a body without a length, and
//! which the head announces ([`close_after_unframed_body`]). Nor do they get an origin's
//! interim answers ([`no_interim_answers`]).
//!
//! A downstream module, run after every other one (the decoding of a compressed copy
//! chunks its body). The front door serves HTTP/1.1 only.

use std::any::Any;

use async_trait::async_trait;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::modules::http::{HttpModule, HttpModuleBuilder, Module};
use pingora::proxy::Session;
use pingora::Result;

struct Http10Framing {
    http10: bool,
}

#[async_trait]
impl HttpModule for Http10Framing {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }

    async fn request_header_filter(&mut self, req: &mut RequestHeader) -> Result<()> {
        self.http10 = req.version == http::Version::HTTP_10;
        Ok(())
    }

    async fn response_header_filter(
        &mut self,
        resp: &mut ResponseHeader,
        _end_of_stream: bool,
    ) -> Result<()> {
        if self.http10 && !resp.status.is_informational() {
            resp.remove_header(&http::header::TRANSFER_ENCODING);
        }
        Ok(())
    }
}

/// Before a response head goes to an HTTP/1.0 client: when its body will have no length
/// (an origin's chunked answer, or a stored copy decoded for the client), the connection
/// closes after it and the head says so, where pingora would have said `keep-alive` to a
/// client that asked for it.
pub fn close_after_unframed_body(session: &mut Session, resp: &ResponseHeader) {
    if session.req_header().version == http::Version::HTTP_10
        && (resp.headers.contains_key(http::header::TRANSFER_ENCODING)
            || super::compress::decoded_for_client(session, resp))
    {
        session.set_keepalive(None);
    }
}

/// RFC 9110 §15.2: "Since HTTP/1.0 did not define any 1xx status codes, a server MUST NOT
/// send a 1xx response to an HTTP/1.0 client." pingora passes an origin's interim answers
/// (`103 Early Hints`) on whatever the request's version: an HTTP/1.0 client read the hints
/// as the answer and the page's head as its body. Its session now drops them.
pub fn no_interim_answers(session: &mut Session) {
    if session.req_header().version == http::Version::HTTP_10 {
        session.as_downstream_mut().set_ignore_info_resp(true);
    }
}

/// Installs [`Http10Framing`] on every request.
pub struct Http10FramingBuilder;

impl HttpModuleBuilder for Http10FramingBuilder {
    fn init(&self) -> Module {
        Box::new(Http10Framing { http10: false })
    }

    fn order(&self) -> i16 {
        // The last to run: pingora sorts by the negated order, so not `i16::MIN` itself.
        i16::MIN + 1
    }
}
