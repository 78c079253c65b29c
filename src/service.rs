//! Steps 2 and 4 of the request flow on the image port: routing, and turning a result or an
//! [`Error`] into a response.
//!
//! This is the one place that records per-request metrics and writes the per-request log line. Image
//! responses carry the validators and cache headers CDNs rely on (docs/urls.md); errors carry a fixed
//! plain-text line and a Cache-Control that never lets a CDN keep a 5xx or a 401/403. The status
//! port's routes are in [`crate::status`].

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use headers::{ContentRange, HeaderMapExt};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Body as HttpBody;

use crate::app::App;
use crate::cache::Tier;
use crate::conditional::{self, Answer};
use crate::error::Error;
use crate::metrics as m;
use crate::pipeline::{Origin, Served};
use crate::request::{Format, ImageRequest};
use crate::source::guard::{Refusal, SourceUrl};
use crate::upload::UploadError;

/// `X-Cache`: which tier answered (`memory`, `remote`, `miss`).
const X_CACHE: header::HeaderName = header::HeaderName::from_static("x-cache");
/// `Surrogate-Key` (Fastly) and `Cache-Tag` (Cloudflare): the original's id, for purging by tag.
const SURROGATE_KEY: header::HeaderName = header::HeaderName::from_static("surrogate-key");
const CACHE_TAG: header::HeaderName = header::HeaderName::from_static("cache-tag");
const NOSNIFF: HeaderValue = HeaderValue::from_static("nosniff");
const TEXT_PLAIN: &str = "text/plain; charset=utf-8";
/// The body of a 416 (a range past the end of the image).
const RANGE_NOT_SATISFIABLE_BODY: &str = "range not satisfiable\n";

/// A path as logged: only when it is bounded and printable ASCII (so a hostile path cannot forge or
/// flood log lines), else `-`.
fn shown_path(path: &str) -> &str {
    if path.len() <= 256 && path.bytes().all(|b| b.is_ascii_graphic()) {
        path
    } else {
        "-"
    }
}

/// The response body type of both ports.
pub type Body = Full<Bytes>;

impl App {
    /// Answers one request on the image port. Never fails: every error becomes a response.
    pub async fn handle<B>(self: Arc<Self>, req: Request<B>) -> Response<Body>
    where
        B: HttpBody<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let started = Instant::now();
        m::incr(m::REQUEST);
        let mut negotiable = false;
        if crate::upload::is_upload_method(req.method()) {
            return self.handle_upload(req, started).await;
        }
        let result = self.answer(&req, &mut negotiable).await;
        let (mut response, tier, kind) = match result {
            Ok((response, tier)) => (response, Some(tier), None),
            Err(err) => {
                m::incr_with(m::REJECTED, err.kind());
                // The cause chain, once, at the boundary (one place logs it). 4xx causes are the client's
                // or the original's and their kind on the request line below says all there is.
                if err.status().is_server_error() {
                    tracing::warn!(error = %err, kind = err.kind(), "request failed");
                }
                (
                    self.error_response(&err, req.method() == Method::HEAD),
                    None,
                    Some(err.kind()),
                )
            }
        };
        if negotiable {
            // The answer, error or not, was chosen knowing `Accept` (another `Accept` could have
            // rendered another format, and failed or not differently): a cache must key on it.
            response
                .headers_mut()
                .insert(header::VARY, HeaderValue::from_static("Accept"));
        }
        self.finish(
            req.method(),
            req.uri().path(),
            response,
            started,
            tier,
            kind,
        )
    }

    /// Uploads, deletes and their CORS preflights ([`crate::upload`]): never stored by a cache, and
    /// allowed to the pages of `upload_cors_origins`.
    async fn handle_upload<B>(&self, req: Request<B>, started: Instant) -> Response<Body>
    where
        B: HttpBody<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        // What the log line and CORS need, before the request (and its body) is taken.
        let (method, uri) = (req.method().clone(), req.uri().clone());
        let cors = self.cors_origin(req.headers());
        let result = self.upload(req).await;
        let (mut response, kind) = match result {
            Ok(response) => (response, None),
            Err(err) => {
                m::incr_with(m::REJECTED, err.kind());
                if err.status().is_server_error() {
                    tracing::warn!(error = %err, kind = err.kind(), "upload failed");
                }
                let mut response = self.error_response(&err, false);
                let headers = response.headers_mut();
                match &err {
                    Error::Upload(UploadError::Unauthorized) => {
                        headers
                            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                    }
                    // The body was not read (or not all of it): the connection cannot be reused.
                    Error::Upload(
                        UploadError::TooLarge | UploadError::Timeout | UploadError::Aborted,
                    ) => {
                        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
                    }
                    _ => {}
                }
                (response, Some(err.kind()))
            }
        };
        let headers = response.headers_mut();
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(origin) = cors {
            headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
            headers.insert(
                header::ACCESS_CONTROL_EXPOSE_HEADERS,
                HeaderValue::from_static("etag, location"),
            );
            headers.append(header::VARY, HeaderValue::from_static("Origin"));
        }
        if !response.headers().contains_key(header::CONTENT_LENGTH) {
            let len = response.body().size_hint().exact().unwrap_or(0);
            response
                .headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        }
        self.finish(&method, uri.path(), response, started, None, kind)
    }

    /// The common end of every image-port answer: hand-over, counters, the log line.
    fn finish(
        &self,
        method: &Method,
        path: &str,
        mut response: Response<Body>,
        started: Instant,
        tier: Option<Tier>,
        kind: Option<&'static str>,
    ) -> Response<Body> {
        if self.handing_over.load(Ordering::Acquire) {
            // A successor serves new connections: this one closes after this answer.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        let status = response.status();
        // Decided by the status actually sent (`image_request_fail`: "answered with an error status"), so a
        // response that failed to build and became a 500 counts too, and a 304 never does.
        if status.as_u16() >= 400 {
            m::incr(m::IMAGE_REQUEST_FAIL);
        }
        m::incr_with(m::RESPONSE_STATUS, status.as_str());
        m::time(m::TIME_TOTAL, started.elapsed());
        // (The field expressions are only evaluated when the line is logged.)
        tracing::info!(
            method = %method,
            path = shown_path(path),
            status = status.as_u16(),
            bytes = %response
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("0"),
            cache = tier.map(Tier::as_str).unwrap_or("-"),
            error = kind.unwrap_or("-"),
            ms = started.elapsed().as_millis() as u64,
            "request"
        );
        response
    }

    /// The answer to one image request; sets `negotiable` once the answer depends on `Accept`.
    async fn answer<B>(
        &self,
        req: &Request<B>,
        negotiable: &mut bool,
    ) -> Result<(Response<Body>, Tier), Error> {
        let head = match *req.method() {
            Method::GET => false,
            Method::HEAD => true,
            _ => return Err(Error::MethodNotAllowed),
        };
        if self.shutting_down.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        let parsed = ImageRequest::parse(req.uri().path(), &self.rules)?;
        *negotiable = self.negotiable(&parsed);
        if let Some(key) = &self.config.security.url_signing_key {
            crate::signature::verify(key.expose(), req.uri().path(), req.uri().query())?;
        }
        let source = self.source_override(req.uri().query())?;
        let (format, negotiated) = self.pick_format(&parsed, req.headers());
        let origin = match source {
            Some(url) => Origin::Override(url),
            None => Origin::Configured,
        };
        let serve = self.pipeline.serve_from(&parsed, format, &origin);
        let served = tokio::time::timeout(self.config.timeouts.request_timeout, serve)
            .await
            .map_err(|_| Error::Timeout)??;
        if origin == Origin::Configured {
            self.pipeline.record(&parsed, format);
        }
        let tier = served.tier;
        Ok((
            self.image_response(&parsed, served, negotiated, req.headers(), head),
            tier,
        ))
    }

    /// `?source=` (docs/urls.md): `None` when absent; 403 when overrides are off, the parameter is repeated,
    /// or the URL breaks the guard's rules (the rest are enforced while fetching).
    fn source_override(&self, query: Option<&str>) -> Result<Option<SourceUrl>, Error> {
        let values = crate::request::query_values(query, "source");
        let [raw] = values.as_slice() else {
            return if values.is_empty() {
                Ok(None)
            } else {
                Err(Refusal::Malformed.into())
            };
        };
        if !self.config.security.allow_source_override {
            return Err(Error::SourceRefused);
        }
        let guard = self.pipeline.source_guard().ok_or(Error::SourceRefused)?;
        Ok(Some(guard.check(raw)?))
    }

    /// Whether `auto_format` applies to this request, so its answer depends on `Accept`.
    fn negotiable(&self, req: &ImageRequest) -> bool {
        self.config.rendering.auto_format && matches!(req.format, Format::Jpeg | Format::Png)
    }

    /// `auto_format`: a `jpg`/`png` request whose `Accept` lists AVIF or WebP (q > 0) gets the best of
    /// them that is whitelisted. Returns the format and whether the answer depends on `Accept`.
    fn pick_format(&self, req: &ImageRequest, headers: &HeaderMap) -> (Format, bool) {
        if !self.negotiable(req) {
            return (req.format, false);
        }
        let accept = headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(",");
        for candidate in [Format::Avif, Format::Webp] {
            if self.rules.whitelist.contains(&candidate) && accepts(&accept, candidate.mime()) {
                return (candidate, true);
            }
        }
        (req.format, true)
    }

    fn image_response(
        &self,
        req: &ImageRequest,
        served: Served,
        negotiated: bool,
        headers: &HeaderMap,
        head: bool,
    ) -> Response<Body> {
        let v = &served.variant;
        // Built on the map directly with typed names and values: the builder re-parses every name
        // and value, and this runs on every memory hit (docs/urls.md lists the headers).
        let mut map = HeaderMap::with_capacity(16);
        map.insert(header::ETAG, v.etag_header.clone());
        map.insert(header::LAST_MODIFIED, v.last_modified_header.clone());
        map.insert(header::CACHE_CONTROL, self.cache_control.clone());
        map.insert(header::X_CONTENT_TYPE_OPTIONS, NOSNIFF);
        map.insert(X_CACHE, HeaderValue::from_static(served.tier.as_str()));
        match HeaderValue::try_from(req.original_id()) {
            Ok(tag) => {
                map.insert(SURROGATE_KEY, tag.clone());
                map.insert(CACHE_TAG, tag);
            }
            Err(e) => {
                return self.error_response(&Error::Internal(format!("response: {e}")), head);
            }
        }
        if negotiated {
            map.insert(header::VARY, HeaderValue::from_static("Accept"));
        }
        let len = v.bytes.len() as u64;
        let answer = conditional::decide(headers, &v.etag, v.last_modified, len);
        if answer != Answer::NotModified {
            map.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        }
        let (status, body) = match answer {
            Answer::NotModified => (StatusCode::NOT_MODIFIED, Body::default()),
            Answer::Unsatisfiable => {
                // Short and never stored: it describes the client's request, not the image.
                map.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                map.typed_insert(ContentRange::unsatisfied_bytes(len));
                map.insert(header::CONTENT_TYPE, HeaderValue::from_static(TEXT_PLAIN));
                let body = RANGE_NOT_SATISFIABLE_BODY;
                map.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
                let body = if head {
                    Body::default()
                } else {
                    Body::new(Bytes::from_static(body.as_bytes()))
                };
                (StatusCode::RANGE_NOT_SATISFIABLE, body)
            }
            Answer::Whole | Answer::Part { .. } => {
                map.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(v.format.mime()),
                );
                let (status, bytes) = match answer {
                    Answer::Part { first, last } => {
                        match ContentRange::bytes(first..=last, len) {
                            Ok(range) => map.typed_insert(range),
                            Err(_) => {
                                let e = Error::Internal("response: content range".into());
                                return self.error_response(&e, head);
                            }
                        }
                        // `first..=last` lies inside the body (`conditional::decide`).
                        let part = v.bytes.slice(first as usize..=last as usize);
                        (StatusCode::PARTIAL_CONTENT, part)
                    }
                    _ => (StatusCode::OK, v.bytes.clone()),
                };
                map.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
                let body = if head {
                    Body::default()
                } else {
                    Body::new(bytes)
                };
                (status, body)
            }
        };
        let mut response = Response::new(body);
        *response.status_mut() = status;
        *response.headers_mut() = map;
        response
    }

    /// The response for an error: status, fixed text, and cache headers by class.
    pub fn error_response(&self, err: &Error, head: bool) -> Response<Body> {
        let status = err.status();
        let body = err.public_message();
        let mut builder = Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, TEXT_PLAIN)
            .header(header::CONTENT_LENGTH, body.len())
            .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff");
        // 5xx are passing trouble; 401/403 depend on credentials or a signature a shared cache must
        // never answer another client with.
        let private = status.is_server_error()
            || status == StatusCode::FORBIDDEN
            || status == StatusCode::UNAUTHORIZED;
        builder = if private {
            builder.header(header::CACHE_CONTROL, "no-store")
        } else {
            builder.header(header::CACHE_CONTROL, self.error_cache_control.clone())
        };
        match err {
            Error::MethodNotAllowed | Error::Upload(UploadError::NoSourceStore) => {
                builder = builder.header(header::ALLOW, "GET, HEAD")
            }
            Error::ShuttingDown => builder = builder.header(header::CONNECTION, "close"),
            _ => {}
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            builder = builder.header(header::RETRY_AFTER, "1");
        }
        let body = if head {
            Body::default()
        } else {
            Body::new(Bytes::from_static(body.as_bytes()))
        };
        builder.body(body).unwrap_or_else(|_| {
            let mut r = Response::new(Body::default());
            *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            r
        })
    }
}

/// Whether an `Accept` header lists `mime` with q > 0 (exact type only: `image/*` and `*/*` say
/// nothing about AVIF or WebP support, browsers that have it list it by name).
fn accepts(accept: &str, mime: &str) -> bool {
    accept.split(',').any(|item| {
        let mut parts = item.split(';');
        let ty = parts.next().unwrap_or("").trim();
        if !ty.eq_ignore_ascii_case(mime) {
            return false;
        }
        for p in parts {
            if let Some(q) = p.trim().strip_prefix("q=") {
                return q.trim().parse::<f32>().map(|q| q > 0.0).unwrap_or(false);
            }
        }
        true
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_negotiation() {
        assert!(accepts("image/avif,image/webp,*/*", "image/avif"));
        assert!(accepts("image/webp;q=0.8", "image/webp"));
        assert!(!accepts("image/webp;q=0", "image/webp"));
        assert!(!accepts("image/*,*/*;q=0.8", "image/webp"));
        assert!(!accepts("", "image/webp"));
        assert!(!accepts("image/webpx", "image/webp"));
    }
}
