//! Step 3b of the request flow (url → cache → **source** → image → store → response): fetch the
//! bytes of an original after every cache tier missed.
//!
//! An original lives either behind an HTTP(S) base URL (`source_domain`, [`http`]) or in an object
//! store (`source_store`, [`object`]); in both cases its location is the `source_path` template
//! (`{model}/{type}/{id}/original.jpg`, the seed's layout) expanded with the request's names.
//! Whatever the backend, a fetch obeys the same [`SourceLimits`] (docs/configuration.md): a connect
//! timeout, a *total* deadline (a trickling origin cannot hold a request past it), and a byte limit
//! enforced while streaming, because a declared `Content-Length` or object size can lie or be absent.
//! Failures are sorted into [`SourceError`] so the service can answer 404 / 422 / 502 / 504.
//!
//! Single-flight per original and the originals memory cache live in the pipeline, not here: this
//! module performs exactly one fetch per call.

pub mod guard;
pub mod http;
pub mod object;
#[cfg(any(test, feature = "test-support"))]
pub mod raw_origin;

use std::error::Error as StdError;
use std::sync::Arc;
use std::time::Duration;

use object_store::path::Path as StorePath;
use object_store::{ClientOptions, ObjectStore, RetryConfig};

use crate::config::{Config, S3Config, SourceDomain, SourcePath, StoreKind, StoreUrl};
use crate::request::ImageRequest;

/// Why an original could not be fetched. Each variant maps to one status (`crate::error`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// The source says the original does not exist (HTTP 404/410, missing object): 404.
    #[error("original not found at the source")]
    NotFound,
    /// The original is larger than `max_source_bytes`: 422, decided before it is all in memory.
    #[error("original larger than max_source_bytes")]
    TooLarge,
    /// The source failed: 5xx or unexpected status, redirect, refused or reset connection,
    /// truncated body, store error: 502. The text is for logs only, never for clients.
    #[error("source failed: {0}")]
    Upstream(String),
    /// The source did not deliver the whole original within `fetch_timeout` (or did not accept the
    /// connection within `connect_timeout`): 504.
    #[error("source timed out")]
    Timeout,
    /// The source is misconfigured (bad URL, bad template); found at start-up: 500.
    #[error("source configuration: {0}")]
    Config(String),
}

/// The limits every fetch obeys, whatever the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceLimits {
    /// `max_source_bytes`: the most bytes one original may have (default 25 MB).
    pub max_bytes: u64,
    /// `connect_timeout`: establishing the connection (default 2 s).
    pub connect_timeout: Duration,
    /// `fetch_timeout`: the total deadline for headers and the whole body (default 5 s). Not an
    /// idle timeout: a source sending one byte every 100 ms still fails at the deadline.
    pub fetch_timeout: Duration,
}

impl SourceLimits {
    /// The limits named by the configuration.
    pub fn from_config(cfg: &Config) -> SourceLimits {
        SourceLimits {
            max_bytes: cfg.limits.max_source_bytes.bytes(),
            connect_timeout: cfg.timeouts.connect_timeout,
            fetch_timeout: cfg.timeouts.fetch_timeout,
        }
    }
}

/// Where originals come from: an HTTP(S) origin or an object store.
#[derive(Debug)]
pub enum Source {
    /// `source_domain` + `source_path`.
    Http(http::HttpSource),
    /// `source_store` + `source_path`.
    Object(object::ObjectSource),
}

impl Source {
    /// The source named by the configuration: `source_domain` or `source_store`, each with the
    /// `source_path` template. Exactly one of the two must be set.
    pub fn from_config(cfg: &Config) -> Result<Source, SourceError> {
        let limits = SourceLimits::from_config(cfg);
        match (&cfg.originals.source_domain, &cfg.originals.source_store) {
            (Some(_), Some(_)) => Err(SourceError::Config(
                "set only one of source_domain and source_store".into(),
            )),
            (Some(base), None) => Source::new_http(
                base.clone(),
                cfg.originals.source_path.clone(),
                limits,
                http::OriginRules {
                    not_found: cfg.originals.source_not_found_statuses.clone(),
                    redirect_hosts: cfg.originals.source_redirect_hosts.clone(),
                },
            ),
            (None, Some(store)) => {
                Source::new_object(store, &cfg.s3, cfg.originals.source_path.clone(), limits)
            }
            (None, None) => Err(SourceError::Config(
                "no source: set source_domain or source_store".into(),
            )),
        }
    }

    /// An HTTP(S) source: originals are at `{base}/{expanded template}`.
    pub fn new_http(
        base: SourceDomain,
        template: SourcePath,
        limits: SourceLimits,
        rules: http::OriginRules,
    ) -> Result<Source, SourceError> {
        http::HttpSource::new(base, template, limits, rules).map(Source::Http)
    }

    /// An object-store source (`file:///dir`, `s3://bucket/prefix`, …): originals are at
    /// `{prefix}/{expanded template}`.
    pub fn new_object(
        store_url: &StoreUrl,
        s3: &S3Config,
        template: SourcePath,
        limits: SourceLimits,
    ) -> Result<Source, SourceError> {
        object::ObjectSource::new(store_url, s3, template, limits).map(Source::Object)
    }

    /// Fetches the original of `req`, whole, within the limits.
    pub async fn fetch(&self, req: &ImageRequest) -> Result<bytes::Bytes, SourceError> {
        match self {
            Source::Http(s) => s.fetch(req).await,
            Source::Object(s) => s.fetch(req).await,
        }
    }

    /// The object store of originals, when originals come from one (uploads write there).
    pub fn object(&self) -> Option<&object::ObjectSource> {
        match self {
            Source::Object(s) => Some(s),
            Source::Http(_) => None,
        }
    }

    /// Where originals come from, without credentials or query, for logs and the status page
    /// (`http://host/base`, `file:///dir`, `s3://bucket/prefix`).
    pub fn describe(&self) -> String {
        match self {
            Source::Http(s) => s.describe(),
            Source::Object(s) => s.describe(),
        }
    }
}

/// Expands a `source_path` template (checked when the configuration loaded, [`SourcePath`]):
/// `{model}`, `{type}` and `{id}` become the request's names.
///
/// The names are safe to paste into a URL path or an object key as they are: the URL parser only
/// lets `[A-Za-z0-9_-]` through, so no escaping is needed and no `..` can appear.
pub fn expand_template(template: &str, req: &ImageRequest) -> String {
    template
        .replace("{model}", &req.model)
        .replace("{type}", &req.kind)
        .replace("{id}", &req.id)
}

/// A request with names that exercise the template at start-up, so a template that cannot form a
/// valid URL or key fails then rather than on the first request.
pub(crate) fn probe_request() -> ImageRequest {
    ImageRequest {
        model: "model".into(),
        kind: "type".into(),
        id: "id".into(),
        version: crate::request::Version::FullSize,
        quality: None,
        format: crate::request::Format::Jpeg,
    }
}

/// Builds an object store and its key prefix from an object-store URL, checked when the
/// configuration loaded ([`StoreUrl`], docs/configuration.md):
///
/// - `file:///dir`: the local filesystem below `dir` (created if missing);
/// - `memory://`: an in-process store (tests);
/// - `s3://bucket/prefix`: S3 or an S3-compatible server (`s3_endpoint`, path-style then);
/// - `gs://bucket/prefix`, `az://container/prefix`: credentials from the providers' standard
///   environment variables.
///
/// The URL's path is the key prefix returned beside the store. `timeout` bounds one HTTP request
/// and `connect_timeout` one connection. Retries are kept short (one retry, within `timeout`):
/// object_store's default of 10 retries over 3 minutes would hold a request far beyond its
/// deadline. Shared with the result store (`cache::remote`).
pub fn object_store_from_url(
    url: &StoreUrl,
    s3: &S3Config,
    timeout: Duration,
    connect_timeout: Duration,
) -> Result<(Arc<dyn ObjectStore>, StorePath), SourceError> {
    let prefix = url.prefix().clone();
    let retry = RetryConfig {
        max_retries: 1,
        retry_timeout: timeout,
        backoff: object_store::BackoffConfig {
            init_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(500),
            base: 2.0,
        },
    };
    let client = ClientOptions::new()
        .with_timeout(timeout)
        .with_connect_timeout(connect_timeout);
    let build_err = |e: object_store::Error| SourceError::Config(format!("object store: {e}"));

    match url.kind() {
        StoreKind::File(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| {
                SourceError::Config(format!("cannot create {}: {e}", dir.display()))
            })?;
            let store =
                object_store::local::LocalFileSystem::new_with_prefix(dir).map_err(build_err)?;
            Ok((Arc::new(store), StorePath::default()))
        }
        StoreKind::Memory => Ok((Arc::new(object_store::memory::InMemory::new()), prefix)),
        StoreKind::S3 { bucket } => {
            let store = s3_builder(bucket, s3, client)
                .with_retry(retry)
                .build()
                .map_err(build_err)?;
            Ok((Arc::new(store), prefix))
        }
        StoreKind::Gcs { bucket } => {
            // GCS has no keys of its own in our config: the provider's standard environment
            // (GOOGLE_SERVICE_ACCOUNT, GOOGLE_APPLICATION_CREDENTIALS, …) supplies credentials.
            let store = object_store::gcp::GoogleCloudStorageBuilder::from_env()
                .with_bucket_name(bucket)
                .with_retry(retry)
                // The builder's own default allows http (its metadata-server credentials);
                // replacing the options must keep that.
                .with_client_options(client.with_allow_http(true))
                .build()
                .map_err(build_err)?;
            Ok((Arc::new(store), prefix))
        }
        StoreKind::Azure { container } => {
            // Likewise AZURE_STORAGE_ACCOUNT_NAME / AZURE_STORAGE_ACCOUNT_KEY / … from the environment.
            let store = object_store::azure::MicrosoftAzureBuilder::from_env()
                .with_container_name(container)
                .with_retry(retry)
                .with_client_options(client)
                .build()
                .map_err(build_err)?;
            Ok((Arc::new(store), prefix))
        }
    }
}

/// An S3 builder from our keys. Credentials: `s3_access_key_id`/`s3_secret_access_key`,
/// else `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`); else the builder
/// falls back to instance metadata, as any AWS client does. Only these variables are read, so a
/// stray `AWS_ENDPOINT` in the environment cannot redirect the store behind the config's back.
fn s3_builder(
    bucket: &str,
    s3: &S3Config,
    client: ClientOptions,
) -> object_store::aws::AmazonS3Builder {
    // Client options first: `with_client_options` replaces them wholesale, and `with_allow_http`
    // is stored inside them, so the other order would silently forbid http:// endpoints.
    let mut b = object_store::aws::AmazonS3Builder::new()
        .with_client_options(client)
        .with_bucket_name(bucket)
        .with_region(if s3.region.is_empty() {
            "us-east-1"
        } else {
            s3.region.as_str()
        })
        .with_allow_http(s3.allow_http);
    if let Some(endpoint) = s3.endpoint.as_deref().filter(|e| !e.is_empty()) {
        // S3-compatible servers (SeaweedFS, MinIO, …) rarely have wildcard DNS for buckets.
        b = b
            .with_endpoint(endpoint)
            .with_virtual_hosted_style_request(false);
    }
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let (key, secret, token) = match (&s3.access_key_id, &s3.secret_access_key) {
        (Some(k), Some(s)) => (
            Some(k.expose().to_owned()),
            Some(s.expose().to_owned()),
            None,
        ),
        _ => (
            env("AWS_ACCESS_KEY_ID"),
            env("AWS_SECRET_ACCESS_KEY"),
            env("AWS_SESSION_TOKEN"),
        ),
    };
    if let (Some(k), Some(s)) = (key, secret) {
        b = b.with_access_key_id(k).with_secret_access_key(s);
        if let Some(t) = token {
            b = b.with_token(t);
        }
    }
    b
}

/// Joins the chunks of a body into one buffer, copying only when there is more than one (a small
/// original usually arrives as a single chunk). `total` is their summed length, at most
/// `max_source_bytes`.
pub(crate) fn join_chunks(mut chunks: Vec<bytes::Bytes>, total: u64) -> bytes::Bytes {
    if chunks.len() == 1 {
        return chunks.pop().unwrap_or_default();
    }
    let mut buf = bytes::BytesMut::with_capacity(usize::try_from(total).unwrap_or(0));
    for c in chunks {
        buf.extend_from_slice(&c);
    }
    buf.freeze()
}

/// A log-friendly description of an error and its causes (`a: b: c`), so a log line says "connection
/// refused" rather than only "error sending request".
pub(crate) fn error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        // Some layers repeat their cause in their own message; keep the line short.
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(model: &str, kind: &str, id: &str) -> ImageRequest {
        ImageRequest {
            model: model.into(),
            kind: kind.into(),
            id: id.into(),
            ..probe_request()
        }
    }

    #[test]
    fn expands_every_placeholder() {
        let r = req("product", "image", "10855050");
        assert_eq!(
            expand_template("{model}/{type}/{id}/original.jpg", &r),
            "product/image/10855050/original.jpg"
        );
        assert_eq!(
            expand_template("originals/{id}-{id}.{type}", &r),
            "originals/10855050-10855050.image"
        );
    }

    #[test]
    fn join_chunks_keeps_order() {
        use bytes::Bytes;
        assert_eq!(join_chunks(Vec::new(), 0), Bytes::new());
        assert_eq!(
            join_chunks(vec![Bytes::from_static(b"one")], 3),
            Bytes::from_static(b"one")
        );
        let parts = vec![Bytes::from_static(b"ab"), Bytes::from_static(b"cd")];
        assert_eq!(join_chunks(parts, 4), Bytes::from_static(b"abcd"));
    }

    fn s3() -> S3Config {
        S3Config {
            endpoint: Some("http://127.0.0.1:1".into()),
            region: "us-east-1".into(),
            allow_http: true,
            access_key_id: Some("key".into()),
            secret_access_key: Some("secret".into()),
        }
    }

    const T: Duration = Duration::from_secs(1);

    /// Store URLs are checked by the configuration ([`StoreUrl`]); building gives the store its prefix.
    #[test]
    fn store_urls_give_store_and_prefix() {
        let url = |s: &str| StoreUrl::parse(s).expect("store URL");
        let (_, p) =
            object_store_from_url(&url("s3://bucket/some/prefix/"), &s3(), T, T).expect("s3");
        assert_eq!(p.as_ref(), "some/prefix");
        let (_, p) = object_store_from_url(&url("s3://bucket"), &s3(), T, T).expect("s3");
        assert!(p.is_root());
        let (_, p) = object_store_from_url(&url("memory://results"), &s3(), T, T).expect("memory");
        assert_eq!(p.as_ref(), "results");
        let dir = tempfile::tempdir().expect("tempdir");
        let sub = dir.path().join("made/by/us");
        let file = url::Url::from_directory_path(&sub).expect("url");
        object_store_from_url(&url(file.as_str()), &s3(), T, T).expect("file");
        assert!(sub.is_dir(), "file:// store creates its directory");
    }
}
