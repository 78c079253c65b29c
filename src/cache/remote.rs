//! Step 3b (read) and the last step after answering (write): the remote result store shared by every
//! instance (docs/operations.md), through `object_store` (S3-compatible, GCS, Azure, local directory, memory).
//!
//! Objects live at `{prefix}/{model}/{type}/{id}/{canonical}` with Content-Type, Cache-Control and the
//! generation time set on them where the backend supports attributes. Reads are bounded by
//! `store_timeout` so a slow store costs a request no more than a miss. Writes are queued in a bounded
//! backlog (`upload_backlog`) and drained by at most `upload_concurrency` writers in the background; a
//! full backlog drops the write and counts it, so a dead store never delays or fails a response.
//! `put` is atomic in every backend (S3 PUT, local temp file + rename): a reader never sees half an object.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{Attribute, Attributes, ObjectStore, ObjectStoreExt, PutOptions, PutPayload};
use tokio::sync::{mpsc, Notify, Semaphore};

use super::revision::{self, Revisions};
use super::{Tier, Variant};
use crate::metrics as m;
use crate::request::{CacheKey, Format};

/// User metadata key holding the generation time (RFC 3339 seconds since epoch).
const GENERATED_AT: &str = "generated-at";

/// Why the store could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store answered with an error, or the connection failed.
    #[error("result store unavailable: {0}")]
    Unavailable(String),
    /// The store did not answer within `store_timeout`.
    #[error("result store timed out")]
    Timeout,
}

struct Write {
    key: CacheKey,
    variant: Arc<Variant>,
}

/// The remote tier.
#[derive(Clone)]
pub struct RemoteStore {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    timeout: Duration,
    attributes: bool,
    cache_control: String,
    tx: mpsc::Sender<Write>,
    stats: Arc<Stats>,
    /// The originals' revisions: a queued write made from a replaced original is skipped, and one
    /// that lands after the replacement is deleted again.
    revisions: Arc<Revisions>,
}

#[derive(Default)]
struct Stats {
    hits: AtomicU64,
    misses: AtomicU64,
    writes: AtomicU64,
    write_fails: AtomicU64,
    pending: AtomicUsize,
    idle: Notify,
}

impl RemoteStore {
    /// Wraps a store. `attributes` says whether the backend accepts object attributes (S3, GCS, Azure
    /// and memory do; the local filesystem does not). Spawns the writer task: call inside a runtime.
    pub fn new(
        store: Arc<dyn ObjectStore>,
        prefix: Path,
        attributes: bool,
        cache_control: String,
        timeout: Duration,
        upload_concurrency: usize,
        backlog: usize,
    ) -> RemoteStore {
        let (tx, rx) = mpsc::channel(backlog.max(1));
        let remote = RemoteStore {
            store,
            prefix,
            timeout,
            attributes,
            cache_control,
            tx,
            stats: Arc::new(Stats::default()),
            revisions: Arc::new(Revisions::default()),
        };
        tokio::spawn(remote.clone().writer(rx, upload_concurrency.max(1)));
        remote
    }

    /// The originals' revisions this store's writer checks (the pipeline shares them).
    pub fn revisions(&self) -> Arc<Revisions> {
        self.revisions.clone()
    }

    /// The object path of a key.
    pub fn path(&self, key: &CacheKey) -> Path {
        self.join(key.as_str())
    }

    fn join(&self, rel: &str) -> Path {
        let prefix = self.prefix.as_ref();
        if prefix.is_empty() {
            Path::from(rel)
        } else {
            Path::from(format!("{prefix}/{rel}"))
        }
    }

    /// Reads a variant; `Ok(None)` when the store does not have it.
    pub async fn get(&self, key: &CacheKey) -> Result<Option<Variant>, StoreError> {
        let format = key
            .as_str()
            .rsplit_once('.')
            .and_then(|(_, ext)| Format::from_ext(ext))
            .ok_or_else(|| StoreError::Unavailable("key without a format".into()))?;
        let path = self.path(key);
        let read = async {
            let got = self.store.get(&path).await?;
            let generated = got
                .attributes
                .get(&Attribute::Metadata(GENERATED_AT.into()))
                .and_then(|v| v.as_ref().parse::<u64>().ok())
                .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s));
            let modified: SystemTime = got.meta.last_modified.into();
            let bytes = got.bytes().await?;
            Ok::<_, object_store::Error>((bytes, generated.unwrap_or(modified)))
        };
        let result = match tokio::time::timeout(self.timeout, read).await {
            Err(_) => Err(StoreError::Timeout),
            Ok(Err(object_store::Error::NotFound { .. })) => Ok(None),
            Ok(Err(e)) => Err(StoreError::Unavailable(e.to_string())),
            // A zero-byte object is never a valid image: treat it as absent rather than serve it.
            Ok(Ok((bytes, _))) if bytes.is_empty() => Ok(None),
            Ok(Ok((bytes, generated))) => {
                Ok(Some(Variant::new(bytes, format, generated, Tier::Remote)))
            }
        };
        match &result {
            Ok(Some(_)) => {
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                m::incr(m::CACHE_REMOTE_HIT);
            }
            _ => {
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                m::incr(m::CACHE_REMOTE_MISS);
            }
        }
        result
    }

    /// Queues a background write; never waits. A full backlog drops the write and counts it.
    pub fn enqueue(&self, key: CacheKey, variant: Arc<Variant>) {
        self.stats.pending.fetch_add(1, Ordering::AcqRel);
        if self.tx.try_send(Write { key, variant }).is_err() {
            self.finish_one();
            self.stats.write_fails.fetch_add(1, Ordering::Relaxed);
            m::incr(m::CACHE_REMOTE_WRITE_FAIL);
            tracing::warn!("result store backlog full: write dropped");
        }
    }

    fn finish_one(&self) {
        if self.stats.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.stats.idle.notify_waiters();
        }
    }

    async fn writer(self, mut rx: mpsc::Receiver<Write>, concurrency: usize) {
        let permits = Arc::new(Semaphore::new(concurrency));
        while let Some(write) = rx.recv().await {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                break;
            };
            let this = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let original = revision::original_of(write.key.as_str());
                let current = || this.revisions.of_id(original) == write.variant.revision;
                if !current() {
                    // Made from an original replaced since: never stored.
                    this.finish_one();
                    return;
                }
                match this.put(&write.key, &write.variant).await {
                    Ok(()) if !current() => {
                        // The original was replaced while this write ran, and the replacement's
                        // purge may have listed the store before it landed: take it back.
                        let _ = this.store.delete(&this.path(&write.key)).await;
                    }
                    Ok(()) => {
                        this.stats.writes.fetch_add(1, Ordering::Relaxed);
                        m::incr(m::CACHE_REMOTE_WRITE);
                    }
                    Err(e) => {
                        this.stats.write_fails.fetch_add(1, Ordering::Relaxed);
                        m::incr(m::CACHE_REMOTE_WRITE_FAIL);
                        tracing::warn!(key = %write.key, error = %e, "result store write failed");
                    }
                }
                this.finish_one();
            });
        }
    }

    /// Writes one variant now (the background writers and `warm` use this).
    pub async fn put(&self, key: &CacheKey, variant: &Variant) -> Result<(), StoreError> {
        let mut attributes = Attributes::new();
        if self.attributes {
            attributes.insert(Attribute::ContentType, variant.format.mime().into());
            attributes.insert(Attribute::CacheControl, self.cache_control.clone().into());
            let secs = variant
                .last_modified
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            attributes.insert(
                Attribute::Metadata(GENERATED_AT.into()),
                secs.to_string().into(),
            );
        }
        let opts = PutOptions {
            attributes,
            ..PutOptions::default()
        };
        let path = self.path(key);
        let payload = PutPayload::from_bytes(variant.bytes.clone());
        let put = self.store.put_opts(&path, payload, opts);
        match tokio::time::timeout(self.timeout, put).await {
            Err(_) => Err(StoreError::Timeout),
            Ok(Err(e)) => Err(StoreError::Unavailable(e.to_string())),
            Ok(Ok(_)) => Ok(()),
        }
    }

    /// True when the variant exists in the store (used by `warm` to skip).
    pub async fn exists(&self, key: &CacheKey) -> Result<bool, StoreError> {
        match tokio::time::timeout(self.timeout, self.store.head(&self.path(key))).await {
            Err(_) => Err(StoreError::Timeout),
            Ok(Ok(_)) => Ok(true),
            Ok(Err(object_store::Error::NotFound { .. })) => Ok(false),
            Ok(Err(e)) => Err(StoreError::Unavailable(e.to_string())),
        }
    }

    /// Reachability check for `/ready`: a HEAD of a key that need not exist.
    pub async fn check(&self) -> Result<(), StoreError> {
        let probe = self.join(".ready-probe");
        match tokio::time::timeout(self.timeout, self.store.head(&probe)).await {
            Err(_) => Err(StoreError::Timeout),
            Ok(Ok(_)) | Ok(Err(object_store::Error::NotFound { .. })) => Ok(()),
            Ok(Err(e)) => Err(StoreError::Unavailable(e.to_string())),
        }
    }

    /// Deletes every stored variant of one original (`{model}/{type}/{id}`); returns their keys.
    pub async fn delete_original(&self, original: &str) -> Result<Vec<String>, StoreError> {
        let dir = self.join(original);
        let listed: Vec<_> = self
            .store
            .list(Some(&dir))
            .try_collect()
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let mut deleted = Vec::new();
        for meta in listed {
            self.store
                .delete(&meta.location)
                .await
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
            deleted.push(meta.location.to_string());
        }
        Ok(deleted)
    }

    /// Waits until every queued write has finished, or `deadline` passes. Returns whether it drained.
    pub async fn flush(&self, deadline: Duration) -> bool {
        let wait = async {
            loop {
                let idle = self.stats.idle.notified();
                if self.stats.pending.load(Ordering::Acquire) == 0 {
                    return;
                }
                idle.await;
            }
        };
        tokio::time::timeout(deadline, wait).await.is_ok()
    }

    /// Reads that found a variant.
    pub fn hits(&self) -> u64 {
        self.stats.hits.load(Ordering::Relaxed)
    }

    /// Reads that did not.
    pub fn misses(&self) -> u64 {
        self.stats.misses.load(Ordering::Relaxed)
    }

    /// Successful writes.
    pub fn writes(&self) -> u64 {
        self.stats.writes.load(Ordering::Relaxed)
    }

    /// Failed or dropped writes.
    pub fn write_fails(&self) -> u64 {
        self.stats.write_fails.load(Ordering::Relaxed)
    }

    /// Writes queued or running.
    pub fn pending(&self) -> usize {
        self.stats.pending.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::{ImageRequest, Rules};
    use bytes::Bytes;
    use object_store::memory::InMemory;

    fn key(p: &str) -> CacheKey {
        let r = ImageRequest::parse(p, &Rules::default()).expect("valid");
        r.cache_key(r.format)
    }

    fn remote(store: Arc<dyn ObjectStore>, attributes: bool, backlog: usize) -> RemoteStore {
        RemoteStore::new(
            store,
            Path::from("results"),
            attributes,
            "public, max-age=60".into(),
            Duration::from_secs(2),
            2,
            backlog,
        )
    }

    #[tokio::test]
    async fn write_then_read_back_with_metadata() {
        let mem = Arc::new(InMemory::new());
        let r = remote(mem.clone(), true, 10);
        let k = key("/p/i/1/w10.webp");
        assert!(r.get(&k).await.expect("reachable").is_none());
        let generated = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let v = Arc::new(Variant::new(
            Bytes::from_static(b"RIFFxxxxWEBP"),
            Format::Webp,
            generated,
            Tier::Miss,
        ));
        r.enqueue(k.clone(), v.clone());
        assert!(r.flush(Duration::from_secs(2)).await);
        assert_eq!(r.writes(), 1);
        let got = r.get(&k).await.expect("reachable").expect("stored");
        assert_eq!(got.bytes, v.bytes);
        assert_eq!(got.etag, v.etag);
        assert_eq!(got.format, Format::Webp);
        assert_eq!(got.last_modified, generated);
        assert_eq!(got.loaded_from, Tier::Remote);
        let meta = mem
            .get(&Path::from("results/p/i/1/w10.webp"))
            .await
            .expect("object at the documented key");
        assert_eq!(
            meta.attributes
                .get(&Attribute::ContentType)
                .map(|v| v.as_ref().to_owned()),
            Some("image/webp".to_owned())
        );
        assert!(r.exists(&k).await.expect("reachable"));
        r.check().await.expect("ready");
    }

    #[tokio::test]
    async fn purge_deletes_exactly_one_original() {
        let mem = Arc::new(InMemory::new());
        let r = remote(mem, false, 10);
        for p in ["/p/i/1/w10.jpg", "/p/i/1/x20.png", "/p/i/12/w10.jpg"] {
            let v = Variant::new(
                Bytes::from_static(b"x"),
                Format::Jpeg,
                SystemTime::now(),
                Tier::Miss,
            );
            r.put(&key(p), &v).await.expect("put");
        }
        let mut deleted = r.delete_original("p/i/1").await.expect("purge");
        deleted.sort();
        assert_eq!(
            deleted,
            vec!["results/p/i/1/20x20.png", "results/p/i/1/w10.jpg"]
        );
        assert!(!r.exists(&key("/p/i/1/w10.jpg")).await.expect("reachable"));
        assert!(r.exists(&key("/p/i/12/w10.jpg")).await.expect("reachable"));
    }

    #[tokio::test]
    async fn a_full_backlog_drops_and_counts_without_waiting() {
        // The test runtime is single-threaded: the writer cannot run while this loop enqueues, so the
        // backlog of 2 fills and the rest must be dropped at once, not awaited.
        let mem = Arc::new(InMemory::new());
        let r = RemoteStore::new(
            mem,
            Path::from("r"),
            false,
            String::new(),
            Duration::from_secs(30),
            1,
            2,
        );
        let v = Arc::new(Variant::new(
            Bytes::from_static(b"x"),
            Format::Jpeg,
            SystemTime::now(),
            Tier::Miss,
        ));
        let started = std::time::Instant::now();
        for i in 0..1000 {
            r.enqueue(key(&format!("/p/i/{i}/w10.jpg")), v.clone());
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(r.flush(Duration::from_secs(5)).await);
        assert_eq!(r.writes() + r.write_fails(), 1000);
        assert!(r.write_fails() > 0, "some writes were dropped");
    }
}
