//! Originals taken in on the image port, beside the request flow: `PUT /{model}/{type}/{id}` stores
//! the body as that id's original; `POST` does the same from the body or from `?source=` (the Go
//! server's ingest) and renders `?outputs=` in the background; `DELETE` removes the original and
//! every variant made from it. All three are off unless `upload_token` or `upload_signing_key` is
//! set, and write to `source_store` (with a `source_domain` they answer 405).
//!
//! In order, each step refusing with its own status and `rejected.{reason}` counter:
//! 1. the path names an original (404), uploads are on (405), a `source_store` is set (405);
//! 2. the credentials ([`auth`]: 401, 403), before a byte of the body is read;
//! 3. a place among `max_concurrent_uploads` (503);
//! 4. the body (`body.rs`: 413 by `Content-Length` or while reading, 408 when too slow), or the
//!    `?source=` download through the same guard, host list and limits as a request's;
//! 5. the format, from the bytes (415); the header limits and a full decode through the render pool
//!    (422);
//! 6. under a per-id lock: `If-None-Match: *` / `If-Match` (412), the write (503 when the store
//!    fails), then everything made from the previous original is forgotten
//!    ([`crate::pipeline::Pipeline::forget_original`]) before the answer.
//!
//! A refused upload stores nothing; the store's write is whole or absent. Every answer is
//! `Cache-Control: no-store`.

pub mod auth;
mod body;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::SystemTime;

use bytes::Bytes;
use headers::{ETag, HeaderMapExt, IfMatch, IfNoneMatch};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Body as HttpBody;
use tokio::sync::Semaphore;

use crate::app::App;
use crate::cache::etag_for;
use crate::config::Config;
use crate::error::Error;
use crate::image::ImageError;
use crate::metrics as m;
use crate::request::{query_values, ImageRequest};
use crate::service::Body;
use crate::source::object::ObjectSource;
use crate::source::SourceError;

use self::auth::Credential;

/// Outputs one upload may ask for.
const MAX_OUTPUTS: usize = 32;

/// Why an upload or delete was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UploadError {
    /// Uploads are on but originals come from a `source_domain`: 405.
    #[error("uploads need source_store")]
    NoSourceStore,
    /// No credentials: 401.
    #[error("no credentials")]
    Unauthorized,
    /// Wrong, expired or insufficient credentials: 403.
    #[error("credentials refused")]
    Forbidden,
    /// The body is over `max_upload_bytes`: 413.
    #[error("body over max_upload_bytes")]
    TooLarge,
    /// The body did not arrive within `upload_timeout`: 408.
    #[error("body not received within upload_timeout")]
    Timeout,
    /// The client went away or the stream broke mid-body: 400.
    #[error("body aborted")]
    Aborted,
    /// The bytes are not an image in `upload_formats`: 415.
    #[error("format not accepted")]
    Format,
    /// The image is over a limit or does not decode: 422.
    #[error("image refused: {0}")]
    Invalid(ImageError),
    /// `If-Match` / `If-None-Match` did not hold: 412.
    #[error("precondition failed")]
    Precondition,
    /// The request itself is wrong (no body, a body and `source=`, bad `outputs=`): 400.
    #[error("bad upload request: {0}")]
    BadRequest(&'static str),
    /// `max_concurrent_uploads` are in progress: 503.
    #[error("too many uploads at once")]
    Busy,
    /// The source store failed: 503, nothing left behind.
    #[error("store failed: {0}")]
    Store(String),
    /// `DELETE` of an id that has no original: 404.
    #[error("no such original")]
    Missing,
}

impl UploadError {
    /// What a store failure means for the client: a timeout or an error, both 503.
    fn store(e: SourceError) -> UploadError {
        UploadError::Store(e.to_string())
    }

    /// An image refusal from the checks, as an upload refusal: a format libvips does not load is
    /// 415 like one outside `upload_formats`; running out of room is the server's (503).
    fn from_image(e: ImageError) -> Error {
        match e {
            ImageError::UnsupportedFormat => UploadError::Format.into(),
            ImageError::Overloaded | ImageError::Abandoned | ImageError::Internal(_) => e.into(),
            other => UploadError::Invalid(other).into(),
        }
    }
}

/// What the upload endpoints share: their places and the per-id locks.
pub struct Uploads {
    places: Arc<Semaphore>,
    locks: Locks,
}

impl Uploads {
    /// Places for `max_concurrent_uploads`.
    pub fn new(config: &Config) -> Uploads {
        Uploads {
            places: Arc::new(Semaphore::new(config.uploads.max_concurrent_uploads)),
            locks: Locks::default(),
        }
    }
}

/// One async lock per id being written, so a conditional write's check and write are one step.
#[derive(Default)]
struct Locks {
    ids: Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
}

impl Locks {
    /// Above this many entries, those no write holds any more are swept on the next call.
    const SWEEP_ABOVE: usize = 256;

    fn of(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        if ids.len() > Self::SWEEP_ABOVE {
            ids.retain(|_, lock| lock.strong_count() > 0);
        }
        if let Some(lock) = ids.get(id).and_then(Weak::upgrade) {
            return lock;
        }
        let lock = Arc::new(tokio::sync::Mutex::new(()));
        ids.insert(id.to_owned(), Arc::downgrade(&lock));
        lock
    }
}

/// Whether `method` is one of the upload endpoints' (CORS preflights included).
pub fn is_upload_method(method: &Method) -> bool {
    matches!(
        *method,
        Method::PUT | Method::POST | Method::DELETE | Method::OPTIONS
    )
}

/// The JSON answer of a stored upload.
#[derive(serde::Serialize)]
struct Stored<'a> {
    id: &'a str,
    width: u32,
    height: u32,
    format: &'a str,
    bytes: usize,
    etag: &'a str,
    outputs: Vec<String>,
}

impl App {
    /// Answers `PUT`, `POST`, `DELETE` and `OPTIONS` on the image port.
    pub(crate) async fn upload<B>(&self, req: Request<B>) -> Result<Response<Body>, Error>
    where
        B: HttpBody<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let cfg = &self.config.uploads;
        if !cfg.enabled() {
            return Err(Error::MethodNotAllowed);
        }
        let original = ImageRequest::parse_original(req.uri().path())?;
        if req.method() == Method::OPTIONS {
            return self.preflight(req.headers());
        }
        let store = self
            .pipeline
            .source()
            .object()
            .ok_or(UploadError::NoSourceStore)?;
        if self
            .shutting_down
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return Err(Error::ShuttingDown);
        }
        let credential = auth::authorize(
            cfg,
            req.method(),
            req.uri().path(),
            req.uri().query(),
            req.headers(),
            SystemTime::now(),
        )?;
        if req.method() == Method::DELETE {
            return self.delete(store, &original, req.headers()).await;
        }
        self.store_upload(store, original, credential, req).await
    }

    /// `PUT` and `POST`: read, check, store, forget the old original, answer, render outputs.
    async fn store_upload<B>(
        &self,
        store: &ObjectSource,
        original: ImageRequest,
        credential: Credential,
        req: Request<B>,
    ) -> Result<Response<Body>, Error>
    where
        B: HttpBody<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let cfg = &self.config.uploads;
        let (parts, body) = req.into_parts();
        let query = parts.uri.query();
        let outputs = self.outputs(&original, query)?;
        let sources = query_values(query, "source");
        if parts.method != Method::POST && !sources.is_empty() {
            return Err(UploadError::BadRequest("source= is for POST").into());
        }
        let _place = self
            .uploads
            .places
            .clone()
            .try_acquire_owned()
            .map_err(|_| UploadError::Busy)?;
        let max = cfg.max_upload_bytes.bytes();
        let bytes = match sources.as_slice() {
            [] => {
                body::check_declared(&parts.headers, max)?;
                body::read(body, max, cfg.upload_timeout).await?
            }
            [raw] => {
                // Checked by `authorize` too: a signed URL does not cover `source=`.
                if credential != Credential::Token {
                    return Err(UploadError::Forbidden.into());
                }
                if body::declared_length(&parts.headers).is_some_and(|n| n > 0) {
                    return Err(UploadError::BadRequest("a body and source= both").into());
                }
                if !self.config.security.allow_source_override {
                    return Err(Error::SourceRefused);
                }
                let guard = self.pipeline.source_guard().ok_or(Error::SourceRefused)?;
                let url = guard.check(raw)?;
                let fetched = guard.fetch(&url).await?;
                if fetched.len() as u64 > max {
                    return Err(UploadError::TooLarge.into());
                }
                fetched
            }
            _ => return Err(UploadError::BadRequest("source= repeated").into()),
        };
        if bytes.is_empty() {
            return Err(UploadError::BadRequest("empty body").into());
        }
        let format = crate::image::vips::detect_format(&bytes)
            .filter(|f| cfg.upload_formats.contains(f))
            .ok_or(UploadError::Format)?;
        let (_, size) = self
            .pipeline
            .check_original(bytes.clone())
            .await
            .map_err(UploadError::from_image)?;

        let id = original.original_id();
        let lock = self.uploads.locks.of(&id);
        let _writing = lock.lock().await;
        let existed = self.precondition(store, &original, &parts.headers).await?;
        store
            .store(&original, bytes.clone())
            .await
            .map_err(UploadError::store)?;
        // The new original is in place: nothing made from the old one may be served again.
        self.pipeline
            .forget_original(&id)
            .await
            .map_err(|e| UploadError::Store(e.to_string()))?;
        let names = outputs.iter().map(|r| r.canonical_name(r.format)).collect();
        self.pipeline.render_outputs(outputs, bytes.clone());
        let etag = etag_for(&bytes);
        let (status, outcome) = if existed {
            (StatusCode::OK, "replaced")
        } else {
            (StatusCode::CREATED, "created")
        };
        m::incr_with(m::UPLOAD, outcome);
        tracing::info!(id = %id, bytes = bytes.len(), outcome, "original stored");
        let json = serde_json::to_vec(&Stored {
            id: &id,
            width: size.width,
            height: size.height,
            format: format.ext(),
            bytes: bytes.len(),
            etag: &etag,
            outputs: names,
        })
        .map_err(|e| Error::Internal(format!("upload answer: {e}")))?;
        let mut response = Response::new(Body::new(Bytes::from(json)));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Ok(value) = HeaderValue::from_str(&etag) {
            headers.insert(header::ETAG, value);
        }
        if let Ok(value) = HeaderValue::from_str(&format!("/{id}")) {
            headers.insert(header::LOCATION, value);
        }
        Ok(response)
    }

    /// `DELETE`: the original, then everything made from it. 204, or 404 when there was none.
    async fn delete(
        &self,
        store: &ObjectSource,
        original: &ImageRequest,
        headers: &HeaderMap,
    ) -> Result<Response<Body>, Error> {
        let id = original.original_id();
        let lock = self.uploads.locks.of(&id);
        let _writing = lock.lock().await;
        if headers.contains_key(header::IF_MATCH) || headers.contains_key(header::IF_NONE_MATCH) {
            self.precondition(store, original, headers).await?;
        }
        let removed = store.remove(original).await.map_err(UploadError::store)?;
        if !removed {
            return Err(UploadError::Missing.into());
        }
        self.pipeline
            .forget_original(&id)
            .await
            .map_err(|e| UploadError::Store(e.to_string()))?;
        m::incr_with(m::UPLOAD, "deleted");
        tracing::info!(id = %id, "original deleted");
        let mut response = Response::new(Body::default());
        *response.status_mut() = StatusCode::NO_CONTENT;
        Ok(response)
    }

    /// `If-None-Match: *` (create only) and `If-Match` (replace only that version, by the ETag an
    /// upload answered with), checked against the original in the store. Returns whether there is
    /// one.
    async fn precondition(
        &self,
        store: &ObjectSource,
        original: &ImageRequest,
        headers: &HeaderMap,
    ) -> Result<bool, Error> {
        // The `headers` crate's typed validators, as for GETs (`crate::conditional`); one that
        // does not parse is a precondition that cannot hold.
        let if_match = headers
            .typed_try_get::<IfMatch>()
            .map_err(|_| UploadError::Precondition)?;
        let create_only = headers
            .typed_try_get::<IfNoneMatch>()
            .map_err(|_| UploadError::Precondition)?
            .is_some_and(|inm| inm == IfNoneMatch::any());
        let exists = match &if_match {
            // Only If-Match needs the bytes, to compare their ETag.
            Some(if_match) => {
                let current = store
                    .current(original, self.config.uploads.max_upload_bytes.bytes())
                    .await
                    .map_err(UploadError::store)?;
                let holds = current
                    .as_ref()
                    .and_then(|bytes| etag_for(bytes).parse::<ETag>().ok())
                    .is_some_and(|etag| if_match.precondition_passes(&etag));
                if !holds {
                    return Err(UploadError::Precondition.into());
                }
                true
            }
            None => store.exists(original).await.map_err(UploadError::store)?,
        };
        if create_only && exists {
            return Err(UploadError::Precondition.into());
        }
        Ok(exists)
    }

    /// The versions to render after this upload: `?outputs=` (comma-separated, named versions or
    /// version files), else `upload_outputs`, else every named version. Each must be a version the
    /// URL rules serve (400 otherwise); at most [`MAX_OUTPUTS`], each once.
    fn outputs(
        &self,
        original: &ImageRequest,
        query: Option<&str>,
    ) -> Result<Vec<ImageRequest>, Error> {
        let given: Vec<String> = query_values(query, "outputs")
            .iter()
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
            .collect();
        let names = if !given.is_empty() {
            given
        } else if !self.config.uploads.upload_outputs.is_empty() {
            self.config.uploads.upload_outputs.clone()
        } else {
            self.config
                .requests
                .named_versions
                .keys()
                .cloned()
                .collect()
        };
        let mut outputs: Vec<ImageRequest> = Vec::new();
        for name in names {
            let path = format!(
                "/{}/{}/{}/{name}",
                original.model, original.kind, original.id
            );
            let req = ImageRequest::parse(&path, &self.rules)
                .map_err(|_| UploadError::BadRequest("outputs= names a version not served"))?;
            if !outputs
                .iter()
                .any(|o| o.cache_key(o.format) == req.cache_key(req.format))
            {
                outputs.push(req);
            }
        }
        if outputs.len() > MAX_OUTPUTS {
            return Err(UploadError::BadRequest("too many outputs").into());
        }
        Ok(outputs)
    }

    /// A CORS preflight for a signed upload from a page on an origin in `upload_cors_origins`.
    fn preflight(&self, headers: &HeaderMap) -> Result<Response<Body>, Error> {
        let origin = self.cors_origin(headers).ok_or(UploadError::Forbidden)?;
        let method = headers
            .get(header::ACCESS_CONTROL_REQUEST_METHOD)
            .and_then(|m| m.to_str().ok());
        if !matches!(method, Some("PUT" | "POST" | "DELETE")) {
            return Err(UploadError::Forbidden.into());
        }
        let mut response = Response::new(Body::default());
        *response.status_mut() = StatusCode::NO_CONTENT;
        let h = response.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("PUT, POST, DELETE"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("content-type, if-match, if-none-match"),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
        Ok(response)
    }

    /// The request's `Origin` when it is in `upload_cors_origins` (the value to allow).
    pub(crate) fn cors_origin(&self, headers: &HeaderMap) -> Option<HeaderValue> {
        let origin = headers.get(header::ORIGIN)?;
        let text = origin.to_str().ok()?.to_ascii_lowercase();
        self.config
            .uploads
            .upload_cors_origins
            .contains(&text)
            .then(|| origin.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_are_shared_per_id_and_swept_when_unused() {
        let locks = Locks::default();
        let a = locks.of("p/i/1");
        let b = locks.of("p/i/1");
        assert!(Arc::ptr_eq(&a, &b), "one lock per id");
        assert!(!Arc::ptr_eq(&a, &locks.of("p/i/2")));
        drop((a, b));
        for i in 0..=Locks::SWEEP_ABOVE + 1 {
            drop(locks.of(&format!("p/i/x{i}")));
        }
        let held = locks.ids.lock().map(|ids| ids.len()).unwrap_or(usize::MAX);
        assert!(held <= Locks::SWEEP_ABOVE + 1, "{held} entries kept");
    }

    #[test]
    fn upload_methods() {
        for m in [Method::PUT, Method::POST, Method::DELETE, Method::OPTIONS] {
            assert!(is_upload_method(&m));
        }
        for m in [Method::GET, Method::HEAD, Method::PATCH, Method::TRACE] {
            assert!(!is_upload_method(&m));
        }
    }
}
