//! Compression at the edge: a compressible response the origin sent uncompressed is compressed
//! once on its way into the cache (brotli for the copy brotli clients get, gzip for the other),
//! never a second time, and a client that takes neither gets the stored copy decompressed on
//! its way out. Which copy a client is served is `cache::vary`'s. gzip and decompression are
//! pingora's contexts; brotli is [`BrotliBeforeStoring`] here, because pingora 0.9.1's brotli
//! encoder flushes but never finishes its stream, which strict decoders reject (test
//! `pages_are_stored_compressed_once_and_served_in_what_each_client_takes`). A transformed
//! response's `ETag` is weakened (RFC 9110 §8.8.1: two representations now share it) and it
//! gains `Vary: Accept-Encoding`.

use std::any::Any;

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::modules::http::{HttpModule, HttpModuleBuilder, Module};
use pingora::protocols::http::compression::{Algorithm, ResponseCompressionCtx};
use pingora::proxy::Session;
use pingora::{OrErr, Result};

use crate::cache::fields::RequestFields;
use crate::config::Compress;

/// gzip's default level (zlib's 6): most of the gain, a fraction of level 9's time.
const GZIP_LEVEL: u32 = 6;
/// brotli quality 5: about gzip 6's speed with a smaller result; 11 costs tens of times more.
const BROTLI_LEVEL: u32 = 5;

/// Sets up the upstream context of a request whose response may be stored: gzip when kept,
/// never decompress, weaken a transformed `ETag`. (Brotli is [`BrotliBeforeStoring`]'s.)
pub fn before_storing(upstream: &mut ResponseCompressionCtx, compress: Compress) {
    upstream.adjust_algorithm_level(Algorithm::Gzip, if compress.gzip { GZIP_LEVEL } else { 0 });
    upstream.adjust_algorithm_level(Algorithm::Brotli, 0);
    upstream.adjust_decompression(false);
    upstream.adjust_preserve_etag(false);
}

/// Bodies shorter than this are stored as the origin sent them: compressing saves a few dozen
/// bytes at most (a gzip frame alone is 18), and a compressed copy costs a variant per
/// encoding, a weakened `ETag` and a `Vary: Accept-Encoding` that caches beyond Skua then
/// honour. nginx's `gzip_min_length` is commonly set to about this (its default is 20).
const MIN_LENGTH: usize = 1024;

/// Sets a response's upstream context to store it as sent (nothing worth compressing).
pub fn leave_uncompressed(upstream: &mut ResponseCompressionCtx) {
    upstream.adjust_algorithm_level(Algorithm::Gzip, 0);
}

/// Whether a response is worth compressing: a [`textual`] type, with a body of unknown length or
/// at least [`MIN_LENGTH`] bytes, no content coding yet, and no `no-transform`.
pub fn compressible(resp: &ResponseHeader) -> bool {
    // The cheapest test first: most bytes a wiki serves (images, media) are not textual, and
    // reading `Cache-Control` for `no-transform` costs a miss about 1,500 instructions.
    let textual = resp
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(textual);
    if !textual || resp.headers.contains_key(http::header::CONTENT_ENCODING) {
        return false;
    }
    let length = resp
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok());
    if length.is_some_and(|n| n < MIN_LENGTH) {
        return false;
    }
    !forbids_transform(resp)
}

/// RFC 9111 §5.2.2.6: "The no-transform response directive indicates that an intermediary
/// (regardless of whether it implements a cache) MUST NOT transform the content." A content
/// coding added or removed is a transformation (RFC 9110 §7.7). Read in `CDN-Cache-Control`
/// too, whose directives speak to a CDN as `Cache-Control`'s do (RFC 9213 §2.1).
pub fn forbids_transform(resp: &ResponseHeader) -> bool {
    use crate::cache::directives::Directives;
    [
        http::header::CACHE_CONTROL,
        crate::cache::policy::CDN_CACHE_CONTROL,
    ]
    .iter()
    .any(|name| Directives::of(resp, name).is_some_and(|d| d.no_transform()))
}

/// Media types that compress: text, the textual application types (JSON, JavaScript, XML and
/// every `+json` / `+xml` kind, WebAssembly), SVG, icons and the font formats that are not
/// compressed already. Everything else (`application/octet-stream`, images, audio, video,
/// archives, WOFF fonts) is as small as it gets: compressing it costs CPU on every fill and,
/// for a client that takes no encoding, a decompression on every hit, for nothing.
fn textual(content_type: &str) -> bool {
    // Compared without case and without allocating: this runs for every response that may be
    // compressed before it is stored.
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .as_bytes();
    let starts = |prefix: &[u8]| {
        essence.len() >= prefix.len() && essence[..prefix.len()].eq_ignore_ascii_case(prefix)
    };
    let ends = |suffix: &[u8]| {
        essence.len() >= suffix.len()
            && essence[essence.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
    };
    starts(b"text/")
        || ends(b"+json")
        || ends(b"+xml")
        || TEXTUAL_TYPES
            .iter()
            .any(|t| essence.eq_ignore_ascii_case(t.as_bytes()))
}

/// The textual media types [`textual`] names one by one.
const TEXTUAL_TYPES: [&str; 14] = [
    "application/json",
    "application/javascript",
    "application/x-javascript",
    "application/ecmascript",
    "application/xml",
    "application/wasm",
    "application/vnd.ms-fontobject",
    "application/x-font-ttf",
    "font/ttf",
    "font/otf",
    "image/svg+xml",
    "image/x-icon",
    "image/vnd.microsoft.icon",
    "image/bmp",
];

/// Brotli before storing, for the brotli clients' copy: an upstream module, so it runs before
/// pingora's gzip context and the cache (which then see `Content-Encoding: br` and leave it).
pub struct BrotliBeforeStoring {
    /// Set per request by [`BrotliBeforeStoring::enable`], before the response arrives.
    wanted: bool,
    encoder: Option<brotli::CompressorWriter<Vec<u8>>>,
    /// Bytes in and out, for `skua_compression_bytes_total`.
    pub sizes: (usize, usize),
}

impl BrotliBeforeStoring {
    /// One enabled from the start, for a response compressed outside pingora's modules
    /// (`proxy::fill`).
    pub fn wanted() -> BrotliBeforeStoring {
        BrotliBeforeStoring {
            wanted: true,
            encoder: None,
            sizes: (0, 0),
        }
    }

    pub fn enable(&mut self) {
        self.wanted = true;
    }

    fn take_output(&mut self) -> Option<Bytes> {
        let out = std::mem::take(self.encoder.as_mut()?.get_mut());
        self.sizes.1 += out.len();
        Some(Bytes::from(out))
    }

    fn finish(&mut self) -> Option<Bytes> {
        let encoder = self.encoder.take()?;
        // `into_inner` writes the last meta-block: the stream is complete.
        let out = encoder.into_inner();
        self.sizes.1 += out.len();
        Some(Bytes::from(out))
    }
}

#[async_trait]
impl HttpModule for BrotliBeforeStoring {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }

    async fn response_header_filter(
        &mut self,
        resp: &mut ResponseHeader,
        end_of_stream: bool,
    ) -> Result<()> {
        let status = resp.status.as_u16();
        if !self.wanted || end_of_stream || resp.status.is_informational() {
            return Ok(());
        }
        if matches!(status, 204 | 206 | 304) || !compressible(resp) {
            self.wanted = false;
            return Ok(());
        }
        use http::header::*;
        resp.insert_header(CONTENT_ENCODING, "br")?;
        resp.remove_header(&CONTENT_LENGTH);
        resp.remove_header(&ACCEPT_RANGES);
        resp.insert_header(TRANSFER_ENCODING, "chunked")?;
        weaken_etag(resp);
        add_vary_accept_encoding(resp);
        self.encoder = Some(brotli::CompressorWriter::new(
            Vec::new(),
            4096,
            BROTLI_LEVEL,
            BROTLI_WINDOW,
        ));
        Ok(())
    }

    fn response_body_filter(
        &mut self,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
    ) -> Result<()> {
        let Some(encoder) = self.encoder.as_mut() else {
            return Ok(());
        };
        if let Some(data) = body.as_ref() {
            self.sizes.0 += data.len();
            std::io::Write::write_all(encoder, data)
                .or_err(pingora::ErrorType::InternalError, "brotli compression")?;
        }
        *body = if end_of_stream {
            let mut out = self.take_output().unwrap_or_default().to_vec();
            out.extend_from_slice(&self.finish().unwrap_or_default());
            Some(Bytes::from(out))
        } else {
            self.take_output()
        };
        Ok(())
    }

    fn response_done_filter(&mut self) -> Result<Option<Bytes>> {
        Ok(self.finish())
    }
}

/// brotli's window: 2^19 bytes, as pingora's encoder and most servers use.
const BROTLI_WINDOW: u32 = 19;

/// RFC 9110 §8.8.1: after a transformation, a strong validator becomes weak; a malformed one
/// is dropped (as nginx's gzip filter does).
fn weaken_etag(resp: &mut ResponseHeader) {
    let Some(etag) = resp.headers.get(http::header::ETAG) else {
        return;
    };
    let bytes = etag.as_bytes();
    if bytes.starts_with(b"W/") {
        return;
    }
    if bytes.starts_with(b"\"") {
        let mut weak = b"W/".to_vec();
        weak.extend_from_slice(bytes);
        if let Ok(value) = http::HeaderValue::from_bytes(&weak) {
            let _ = resp.insert_header(http::header::ETAG, value);
            return;
        }
    }
    resp.remove_header(&http::header::ETAG);
}

fn add_vary_accept_encoding(resp: &mut ResponseHeader) {
    let present = resp
        .headers
        .get_all(http::header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|n| {
            let n = n.trim();
            n == "*" || n.eq_ignore_ascii_case("accept-encoding")
        });
    if !present {
        let _ = resp.append_header(http::header::VARY, "Accept-Encoding");
    }
}

/// The upstream module that installs [`BrotliBeforeStoring`] (off until enabled) on every
/// request.
pub struct BrotliBuilder;

impl HttpModuleBuilder for BrotliBuilder {
    fn init(&self) -> Module {
        Box::new(BrotliBeforeStoring {
            wanted: false,
            encoder: None,
            sizes: (0, 0),
        })
    }
}

/// The `(encoding, input, output)` bytes of what was compressed before storing, if anything.
pub fn stored_sizes(
    upstream: &ResponseCompressionCtx,
    brotli: Option<&BrotliBeforeStoring>,
) -> Option<(&'static str, usize, usize)> {
    if let Some(b) = brotli.filter(|b| b.sizes.0 > 0) {
        return Some(("br", b.sizes.0, b.sizes.1));
    }
    upstream
        .get_info()
        .filter(|(algorithm, ..)| *algorithm == "gzip")
        .map(|(algorithm, input, output, _)| (algorithm, input, output))
}

/// Decompresses a response for a client that does not take its encoding; otherwise leaves
/// it alone (it never compresses: what is worth compressing was compressed before storing),
/// as it leaves a response marked `no-transform` ([`forbids_transform`]).
struct Decompress {
    ctx: ResponseCompressionCtx,
    /// The response forbids transformation, or has no body to decode: its body, if any, goes
    /// out as it is.
    as_sent: bool,
    /// The request is a HEAD.
    head: bool,
}

/// Whether the stored response `resp` reaches this client decoded (a copy compressed before
/// storing, for a client that does not take its encoding). A byte range of it would be
/// counted in the compressed bytes, so none is served from it: the client gets the whole
/// decoded representation (RFC 9110 §14.2 lets a server ignore `Range`). Regression: a
/// client without `Accept-Encoding` asking for `bytes=0-9` got `Content-Range: bytes 0-9/77`
/// and what ten gzip bytes decode to.
pub fn decoded_for_client(session: &Session, resp: &ResponseHeader) -> bool {
    (session.downstream_modules_ctx.get::<Decompress>())
        .is_some_and(|d| d.ctx.will_decompress(resp) && !forbids_transform(resp))
}

/// RFC 9110 §15.4.5: a 304 carries the `ETag` and `Vary` the 200 to the same request would.
/// For a coded copy that 200 says it varies on `Accept-Encoding` (the copy is decoded for a
/// client that does not take its coding; the decoding context adds the field), and to such a
/// client it is the decoded copy, whose `ETag` is weakened. Regression: a 304 had the strong
/// `ETag` of coded bytes the client never gets, and no `Vary`.
pub fn not_modified_with_the_fields_of_its_200(
    session: &Session,
    stored: &ResponseHeader,
    resp: &mut ResponseHeader,
) {
    if decoding_makes_it_vary(stored) {
        add_vary_accept_encoding(resp);
    }
    if decoded_for_client(session, stored) {
        weaken_etag(resp);
    }
}

/// Whether every answer of the stored copy `stored` says `Vary: Accept-Encoding` though the
/// origin did not: a coded copy is decoded for a client that does not take its coding
/// (RFC 9110 §12.5.5), unless it forbids transformation (never decoded) or has no content. The
/// decoding context adds the field to a GET's answer on pingora's path; a front-door hit
/// (`hit::write_head`) and a 304 add it by this.
pub fn decoding_makes_it_vary(stored: &ResponseHeader) -> bool {
    stored.headers.contains_key(http::header::CONTENT_ENCODING)
        && !matches!(stored.status.as_u16(), 204 | 304)
        && !crate::cache::policy::vary_names(stored).any(|n| n == "accept-encoding" || n == "*")
        && !forbids_transform(stored)
}

#[async_trait]
impl HttpModule for Decompress {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }

    async fn request_header_filter(&mut self, req: &mut RequestHeader) -> Result<()> {
        self.head = req.method == http::Method::HEAD;
        if let Some(asked) = accepted_by(&req.headers) {
            self.ctx.request_filter(asked);
        }
        Ok(())
    }

    async fn response_header_filter(
        &mut self,
        resp: &mut ResponseHeader,
        end_of_stream: bool,
    ) -> Result<()> {
        self.as_sent = forbids_transform(resp);
        if self.as_sent {
            return Ok(());
        }
        if self.head {
            // RFC 9110 §9.3.2: a HEAD is answered with the header a GET would get. pingora's
            // context leaves a response without a body alone, so a HEAD said `Content-Encoding:
            // gzip` and the compressed length to a client whose GET is decoded, and lacked
            // the `Vary: Accept-Encoding` a GET's coded answer gains. The header is filtered
            // as a GET's; no body reaches the client to decode (on a miss, the GET's that
            // filled the cache is dropped before this module: `response_body_filter`).
            let bodyless_for_a_get = matches!(resp.status.as_u16(), 204 | 304);
            self.ctx.response_header_filter(resp, bodyless_for_a_get);
            self.as_sent = true;
            return Ok(());
        }
        self.ctx.response_header_filter(resp, end_of_stream);
        Ok(())
    }

    fn response_body_filter(
        &mut self,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
    ) -> Result<()> {
        if self.as_sent {
            return Ok(());
        }
        if let Some(plain) = decode(&mut self.ctx, body.as_ref(), end_of_stream)? {
            *body = Some(plain);
        }
        Ok(())
    }

    fn response_done_filter(&mut self) -> Result<Option<Bytes>> {
        if self.as_sent {
            return Ok(None);
        }
        decode(&mut self.ctx, None, true)
    }
}

/// `piece` (`None`: the end) decoded through `ctx`, a [`downstream_context`] after its
/// response header filter: `Ok(None)` when it decodes nothing (the client takes the stored
/// encoding). A body that does not decode (not gzip after all, cut short, bytes past its
/// end) is an error, so the client's answer is cut off before its end, as one the origin cut
/// short: pingora's context logs it and gives up silently, and a client that takes no
/// encoding got an empty page, or the gzip bytes without their `Content-Encoding`, as a
/// complete `200`. An answer whose head is not out yet is a 502 instead (test
/// `a_gzip_body_that_does_not_decode_is_a_502_or_cut_off_for_a_client_that_takes_no_encoding`).
pub fn decode(
    ctx: &mut ResponseCompressionCtx,
    piece: Option<&Bytes>,
    end: bool,
) -> Result<Option<Bytes>> {
    if !ctx.is_enabled() || ctx.is_header_phase() {
        return Ok(None);
    }
    match ctx.response_body_filter(piece, end) {
        Some(plain) => Ok(Some(plain)),
        None => Err(pingora::Error::create(
            pingora::ErrorType::Custom(BAD_CONTENT_ENCODING),
            pingora::ErrorSource::Upstream,
            Some(UNDECODABLE.into()),
            None,
        )),
    }
}

/// The reason of the 502 that answers it when nothing of the answer is out yet.
pub const UNDECODABLE: &str = "the origin's body does not decode as its Content-Encoding says";

/// The origin error kind (`skua_origin_errors_total{kind}`) of a body that does not decode
/// for a client that takes no encoding: counted at each answer it cuts off.
pub const BAD_CONTENT_ENCODING: &str = "BadContentEncoding";

/// The client's `Accept-Encoding` as the decompression context is to read it: a request
/// header naming only the stored codings the client accepts ([`crate::cache::vary::accepts`]),
/// made once for each of the four sets, not per request. pingora's context reads every coding
/// a client names as accepted, `gzip;q=0` too (RFC 9110 §12.5.3: a qvalue of 0 means "not
/// acceptable"); regression: a client that refused gzip was sent the gzip copy.
pub fn accepted_by<F: RequestFields + ?Sized>(fields: &F) -> Option<&'static RequestHeader> {
    static HEADERS: std::sync::LazyLock<[Option<RequestHeader>; 4]> =
        std::sync::LazyLock::new(|| {
            ["identity", "gzip", "br", "gzip, br"].map(|codings| {
                let mut req = RequestHeader::build("GET", b"/", None).ok()?;
                req.insert_header(http::header::ACCEPT_ENCODING, codings)
                    .ok()?;
                Some(req)
            })
        });
    use crate::cache::vary::accepts;
    let set = usize::from(accepts(fields, "gzip")) | usize::from(accepts(fields, "br")) << 1;
    HEADERS[set].as_ref()
}

/// The downstream module that installs [`Decompress`] on every request.
pub struct DecompressBuilder;

/// The context that decodes a stored copy for a client that does not take its encoding.
pub fn downstream_context() -> ResponseCompressionCtx {
    // Level 0: no compression; decompression on; a decompressed ETag is weakened.
    ResponseCompressionCtx::new(0, true, false)
}

impl HttpModuleBuilder for DecompressBuilder {
    fn init(&self) -> Module {
        Box::new(Decompress {
            ctx: downstream_context(),
            as_sent: false,
            head: false,
        })
    }

    fn order(&self) -> i16 {
        // After other response filters, as pingora's own compression module runs.
        i16::MIN / 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(content_type: &str) -> ResponseHeader {
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.insert_header("content-type", content_type).unwrap();
        resp.insert_header("content-length", "4096").unwrap();
        resp
    }

    #[test]
    fn no_transform_in_either_field_forbids_compressing() {
        let with = |name: &str, value: &str| {
            let mut resp = response("text/html");
            resp.insert_header(name.to_string(), value).unwrap();
            resp
        };
        assert!(compressible(&with("cache-control", "max-age=60")));
        for (name, value) in [
            ("cache-control", "max-age=60, No-Transform"),
            ("cdn-cache-control", "no-transform"),
        ] {
            assert!(forbids_transform(&with(name, value)), "{name}: {value}");
            assert!(!compressible(&with(name, value)), "{name}: {value}");
        }
    }

    #[test]
    fn textual_types_are_compressed_and_binary_ones_are_not() {
        for yes in [
            "text/html; charset=UTF-8",
            "text/css",
            "text/javascript",
            "application/json",
            "application/x-suggestions+json",
            "application/rss+xml",
            "Application/XML",
            "image/svg+xml",
        ] {
            assert!(compressible(&response(yes)), "{yes}");
        }
        for no in [
            "application/octet-stream",
            "application/zip",
            "application/gzip",
            "application/pdf",
            "image/png",
            "image/jpeg",
            "video/mp4",
            "font/woff2",
        ] {
            assert!(!compressible(&response(no)), "{no}");
        }
    }
}
