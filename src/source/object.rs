//! Step 3b of the request flow (url → cache → **source** → image → store → response), object-store
//! backend: fetch an original from `source_store` (`file:///dir`, `s3://bucket/prefix`, `gs://…`,
//! `az://…`), keyed by the same `source_path` template as the HTTP backend.
//!
//! The same limits as HTTP apply: one `fetch_timeout` deadline over the whole read, the object's
//! size checked before any byte is read, and the byte limit enforced again while streaming (a store
//! can return more than its listing said, e.g. when the object is replaced mid-read).

use std::error::Error as StdError;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt};

use super::{error_chain, expand_template, object_store_from_url, probe_request};
use super::{join_chunks, SourceError, SourceLimits};
use crate::config::{S3Config, SourcePath, StoreUrl};
use crate::request::ImageRequest;

/// Originals in an object store.
#[derive(Debug, Clone)]
pub struct ObjectSource {
    store: Arc<dyn ObjectStore>,
    prefix: StorePath,
    /// The store URL as configured (credentials are refused in it), for logs.
    described: String,
    template: SourcePath,
    limits: SourceLimits,
}

impl ObjectSource {
    /// Builds the store from its URL (both checked when the configuration loaded).
    pub fn new(
        store_url: &StoreUrl,
        s3: &S3Config,
        template: SourcePath,
        limits: SourceLimits,
    ) -> Result<ObjectSource, SourceError> {
        // One HTTP request to the store may take the whole fetch deadline; retries stay inside it.
        let (store, prefix) =
            object_store_from_url(store_url, s3, limits.fetch_timeout, limits.connect_timeout)?;
        let source = ObjectSource {
            store,
            prefix,
            described: describe_url(store_url.as_str()),
            template,
            limits,
        };
        // Prove at start-up that the template forms a valid key; fetch() relies on it.
        source.key_for(&probe_request())?;
        Ok(source)
    }

    /// The key of `req`'s original: `{prefix}/{expanded template}`.
    fn key_for(&self, req: &ImageRequest) -> Result<StorePath, SourceError> {
        let expanded = expand_template(&self.template, req);
        let rel = expanded.trim_matches('/');
        let full = if self.prefix.is_root() {
            rel.to_owned()
        } else {
            format!("{}/{rel}", self.prefix)
        };
        StorePath::parse(&full)
            .map_err(|e| SourceError::Config(format!("source key {full:?}: {e}")))
    }

    /// Fetches `req`'s original within the limits.
    pub async fn fetch(&self, req: &ImageRequest) -> Result<Bytes, SourceError> {
        let key = self.key_for(req)?;
        let read = self.read(&key, self.limits.max_bytes);
        match tokio::time::timeout(self.limits.fetch_timeout, read).await {
            Ok(result) => result,
            Err(_elapsed) => Err(SourceError::Timeout),
        }
    }

    /// The read itself, at most `max` bytes, without the deadline (the caller owns it).
    async fn read(&self, key: &StorePath, max: u64) -> Result<Bytes, SourceError> {
        let result = self.store.get(key).await.map_err(map_store)?;
        // The size comes with the GET's own response, so this refuses before reading the body.
        if result.meta.size > max {
            return Err(SourceError::TooLarge);
        }
        let expected = result.meta.size;
        let range = result.range.clone();
        let result = match result.payload {
            object_store::GetResultPayload::File(file, path) => {
                // A local file: one blocking read of the (already size-checked) range. Streaming it
                // costs one blocking-pool round trip per 8 KiB chunk (~250 for a 2 MB photo), and
                // object_store's own whole-range read zero-fills the buffer before reading into it
                // (1 % of a W1 render's CPU, with the page faults).
                let bytes = tokio::task::spawn_blocking(move || read_file_range(file, range))
                    .await
                    .map_err(|e| SourceError::Upstream(format!("file read task: {e}")))?
                    .map_err(|e| {
                        SourceError::Upstream(format!("reading {}: {e}", path.display()))
                    })?;
                if bytes.len() as u64 != expected {
                    return Err(SourceError::Upstream(format!(
                        "object changed or truncated: {} of {expected} bytes",
                        bytes.len()
                    )));
                }
                return Ok(bytes);
            }
            payload => object_store::GetResult {
                payload,
                range,
                ..result
            },
        };
        let mut stream = result.into_stream();
        let mut chunks: Vec<Bytes> = Vec::new();
        let mut total: u64 = 0;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(map_store)?;
            total = total.saturating_add(chunk.len() as u64);
            if total > max {
                return Err(SourceError::TooLarge);
            }
            chunks.push(chunk);
        }
        if total != expected {
            return Err(SourceError::Upstream(format!(
                "object changed or truncated: {total} of {expected} bytes"
            )));
        }
        Ok(join_chunks(chunks, total))
    }

    /// The current original of `req`, or `None` when there is none (uploads: conditional writes
    /// compare its ETag). The upload limit applies, not `max_source_bytes`: an original stored by
    /// an earlier upload may be up to `max_bytes`.
    pub async fn current(
        &self,
        req: &ImageRequest,
        max_bytes: u64,
    ) -> Result<Option<Bytes>, SourceError> {
        let key = self.key_for(req)?;
        let read = self.read(&key, max_bytes.max(self.limits.max_bytes));
        match tokio::time::timeout(self.limits.fetch_timeout, read).await {
            Err(_elapsed) => Err(SourceError::Timeout),
            Ok(Err(SourceError::NotFound)) => Ok(None),
            Ok(result) => result.map(Some),
        }
    }

    /// Stores `bytes` as `req`'s original, whole or not at all: one PUT to an object store, a
    /// temporary file renamed into place on a filesystem.
    pub async fn store(&self, req: &ImageRequest, bytes: Bytes) -> Result<(), SourceError> {
        let key = self.key_for(req)?;
        let put = self
            .store
            .put(&key, object_store::PutPayload::from_bytes(bytes));
        match tokio::time::timeout(self.limits.fetch_timeout, put).await {
            Err(_elapsed) => Err(SourceError::Timeout),
            Ok(result) => result.map(drop).map_err(map_store),
        }
    }

    /// Whether `req` has an original.
    pub async fn exists(&self, req: &ImageRequest) -> Result<bool, SourceError> {
        let key = self.key_for(req)?;
        match tokio::time::timeout(self.limits.fetch_timeout, self.store.head(&key)).await {
            Err(_elapsed) => Err(SourceError::Timeout),
            Ok(Ok(_)) => Ok(true),
            Ok(Err(object_store::Error::NotFound { .. })) => Ok(false),
            Ok(Err(e)) => Err(map_store(e)),
        }
    }

    /// Deletes `req`'s original; `false` when there was none.
    pub async fn remove(&self, req: &ImageRequest) -> Result<bool, SourceError> {
        let key = self.key_for(req)?;
        let delete = async {
            match self.store.head(&key).await {
                Err(object_store::Error::NotFound { .. }) => return Ok(false),
                Err(e) => return Err(map_store(e)),
                Ok(_) => {}
            }
            match self.store.delete(&key).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(true),
                Err(e) => Err(map_store(e)),
            }
        };
        match tokio::time::timeout(self.limits.fetch_timeout, delete).await {
            Err(_elapsed) => Err(SourceError::Timeout),
            Ok(result) => result,
        }
    }

    /// The store URL (`file:///srv/originals`, `s3://bucket/prefix`).
    pub fn describe(&self) -> String {
        self.described.clone()
    }
}

/// The store URL for logs: without a trailing slash, unless that would leave `memory:`.
fn describe_url(url: &str) -> String {
    let trimmed = url.trim_end_matches('/');
    if trimmed.ends_with(':') {
        url.to_owned()
    } else {
        trimmed.to_owned()
    }
}

/// Reads `range` of `file` into a buffer that is not zeroed first (`read_to_end` reads into the
/// spare capacity). At most `range`'s length is read: a file that grew since it was measured is cut
/// there, and one that shrank comes back short (the caller compares the length).
fn read_file_range(mut file: std::fs::File, range: std::ops::Range<u64>) -> std::io::Result<Bytes> {
    use std::io::{Read, Seek, SeekFrom};
    let len = range.end.saturating_sub(range.start);
    file.seek(SeekFrom::Start(range.start))?;
    let mut buf = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.take(len).read_to_end(&mut buf)?;
    Ok(Bytes::from(buf))
}

/// Sorts a store error: missing is 404, a timed-out HTTP request to the store is 504, anything
/// else (refused, 5xx, denied, I/O) is 502.
fn map_store(err: object_store::Error) -> SourceError {
    if let object_store::Error::NotFound { .. } = err {
        return SourceError::NotFound;
    }
    if is_timeout(&err) {
        return SourceError::Timeout;
    }
    SourceError::Upstream(error_chain(&err))
}

/// Whether a store error was caused by a request timeout somewhere down its cause chain (the
/// store's client timeout can fire just before our own deadline).
fn is_timeout(err: &(dyn StdError + 'static)) -> bool {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(h) = e.downcast_ref::<object_store::client::HttpError>() {
            if matches!(h.kind(), object_store::client::HttpErrorKind::Timeout) {
                return true;
            }
        }
        if let Some(r) = e.downcast_ref::<reqwest::Error>() {
            if r.is_timeout() {
                return true;
            }
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return true;
            }
        }
        cur = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::source::raw_origin::{Behaviour, RawOrigin};

    fn limits(max_bytes: u64) -> SourceLimits {
        SourceLimits {
            max_bytes,
            connect_timeout: Duration::from_millis(500),
            fetch_timeout: Duration::from_secs(2),
        }
    }

    fn req(id: &str) -> ImageRequest {
        ImageRequest {
            model: "product".into(),
            kind: "image".into(),
            id: id.into(),
            ..probe_request()
        }
    }

    fn store(url: &str) -> StoreUrl {
        StoreUrl::parse(url).expect("store URL")
    }

    fn template(t: &str) -> SourcePath {
        SourcePath::parse(t).expect("template")
    }

    /// A `file://` source over a temporary directory holding product/image/1/original.jpg.
    fn file_source(max_bytes: u64) -> (tempfile::TempDir, ObjectSource) {
        let dir = tempfile::tempdir().expect("tempdir");
        let orig = dir.path().join("originals/product/image/1");
        std::fs::create_dir_all(&orig).expect("mkdir");
        std::fs::write(orig.join("original.jpg"), b"0123456789").expect("write");
        let url = url::Url::from_directory_path(dir.path().join("originals")).expect("url");
        let source = ObjectSource::new(
            &store(url.as_str()),
            &S3Config::default(),
            template("{model}/{type}/{id}/original.jpg"),
            limits(max_bytes),
        )
        .expect("source");
        (dir, source)
    }

    #[tokio::test]
    async fn file_found() {
        let (_dir, s) = file_source(100);
        assert_eq!(
            s.fetch(&req("1")).await,
            Ok(Bytes::from_static(b"0123456789"))
        );
        assert!(s.describe().starts_with("file:///"), "{}", s.describe());
    }

    /// The local-file read takes exactly the range it was given: a file that grew since it was
    /// measured is cut at the range's end, one that shrank comes back short (and `read` refuses it).
    #[test]
    fn file_range_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
        std::fs::write(&path, &data).expect("write");
        let open = || std::fs::File::open(&path).expect("open");
        let whole = read_file_range(open(), 0..300_000).expect("read");
        assert_eq!(&whole[..], &data[..]);
        let middle = read_file_range(open(), 1000..201_000).expect("read");
        assert_eq!(&middle[..], &data[1000..201_000]);
        let past_end = read_file_range(open(), 299_990..300_100).expect("read");
        assert_eq!(&past_end[..], &data[299_990..]);
    }

    #[tokio::test]
    async fn file_shrunk_since_measured_reads_short() {
        let (dir, s) = file_source(100);
        let key = s.key_for(&req("1")).expect("key");
        let got = s.store.get(&key).await.expect("get");
        // Shrink the file between the GET (which measured 10 bytes) and the read.
        let path = dir.path().join("originals/product/image/1/original.jpg");
        std::fs::write(&path, b"01234").expect("rewrite");
        let object_store::GetResultPayload::File(file, _) = got.payload else {
            panic!("a local store returns a file payload");
        };
        let short = read_file_range(file, got.range).expect("read");
        assert_eq!(&short[..], b"01234");
        // And through fetch, a file that is whole again reads whole.
        std::fs::write(&path, b"0123456789").expect("rewrite");
        assert_eq!(
            s.fetch(&req("1")).await,
            Ok(Bytes::from_static(b"0123456789"))
        );
    }

    #[tokio::test]
    async fn file_missing_is_not_found() {
        let (_dir, s) = file_source(100);
        assert_eq!(s.fetch(&req("2")).await, Err(SourceError::NotFound));
    }

    #[tokio::test]
    async fn file_too_large() {
        let (_dir, s) = file_source(9);
        assert_eq!(s.fetch(&req("1")).await, Err(SourceError::TooLarge));
        let (_dir, s) = file_source(10);
        assert!(
            s.fetch(&req("1")).await.is_ok(),
            "exactly at the limit is fine"
        );
    }

    #[tokio::test]
    async fn memory_store_with_prefix() {
        let s = ObjectSource::new(
            &store("memory://originals"),
            &S3Config::default(),
            template("{model}/{id}.jpg"),
            limits(100),
        )
        .expect("source");
        s.store
            .put(
                &StorePath::from("originals/product/7.jpg"),
                Bytes::from_static(b"abc").into(),
            )
            .await
            .expect("put");
        assert_eq!(s.fetch(&req("7")).await, Ok(Bytes::from_static(b"abc")));
    }

    fn s3_at(addr: std::net::SocketAddr) -> S3Config {
        S3Config {
            endpoint: Some(format!("http://{addr}")),
            region: "us-east-1".into(),
            allow_http: true,
            access_key_id: Some("key".into()),
            secret_access_key: Some("secret".into()),
        }
    }

    /// The object source `s3://bucket/p` (template `{id}`) on the S3 endpoint at `addr`.
    fn s3_source(addr: std::net::SocketAddr, max_bytes: u64) -> ObjectSource {
        ObjectSource::new(
            &store("s3://bucket/p"),
            &s3_at(addr),
            template("{id}"),
            limits(max_bytes),
        )
        .expect("source")
    }

    /// A minimal S3-compatible GET endpoint on a loopback port: `/bucket/p/1` holds `abc`,
    /// everything else is 404; `silent` makes it accept and never answer.
    async fn fake_s3(silent: bool) -> (std::net::SocketAddr, RawOrigin) {
        let behaviour = if silent {
            Behaviour::Silent
        } else {
            Behaviour::Route(Arc::new(|head: &str| {
                if head.starts_with("get /bucket/p/1 ") {
                    b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\netag: \"e\"\r\n\
                      last-modified: Tue, 15 Nov 1994 08:12:31 GMT\r\nconnection: close\r\n\r\nabc"
                        .to_vec()
                } else {
                    b"HTTP/1.1 404 Not Found\r\ncontent-length: 35\r\nconnection: close\r\n\r\n\
                      <Error><Code>NoSuchKey</Code></Error>"
                        .to_vec()
                }
            }))
        };
        let origin = RawOrigin::start("127.0.0.1", behaviour).await;
        (origin.addr, origin)
    }

    #[tokio::test]
    async fn s3_found_and_missing() {
        let (addr, raw) = fake_s3(false).await;
        let s = s3_source(addr, 100);
        assert_eq!(s.fetch(&req("1")).await, Ok(Bytes::from_static(b"abc")));
        assert_eq!(s.fetch(&req("2")).await, Err(SourceError::NotFound));
        let heads = raw.heads();
        // Path-style (an endpoint is set) and signed with the configured key.
        assert!(
            heads[0].contains("authorization: aws4-hmac-sha256 credential=key/"),
            "{}",
            heads[0]
        );
        let s = s3_source(addr, 2);
        assert_eq!(s.fetch(&req("1")).await, Err(SourceError::TooLarge));
        assert_eq!(s.describe(), "s3://bucket/p");
        assert_eq!(describe_url("s3://bucket/p/"), "s3://bucket/p");
        assert_eq!(describe_url("memory://"), "memory://");
    }

    #[tokio::test]
    async fn unreachable_s3_fails_fast_as_upstream() {
        // A refused endpoint must not sit in object_store's default retry loop (minutes).
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let s = s3_source(addr, 100);
        let start = Instant::now();
        let got = s.fetch(&req("1")).await;
        assert!(matches!(got, Err(SourceError::Upstream(_))), "{got:?}");
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
    }

    #[tokio::test]
    async fn silent_s3_times_out() {
        // Accepts connections and never answers: the fetch deadline must win over retries.
        let (addr, _) = fake_s3(true).await;
        let mut l = limits(100);
        l.fetch_timeout = Duration::from_millis(300);
        let s = ObjectSource::new(&store("s3://bucket"), &s3_at(addr), template("{id}"), l)
            .expect("source");
        let start = Instant::now();
        assert_eq!(s.fetch(&req("1")).await, Err(SourceError::Timeout));
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
    }
}
