//! Step 3a: the in-process result cache (moka), asked first.
//!
//! Holds encoded variants keyed by the canonical [`CacheKey`], weighed by their bytes
//! (`memory_cache_mb`); a variant over `memory_cache_max_entry_kb` is answered but not kept. Concurrent
//! misses on one key share one load (moka's `try_get_with`), and the load runs in its own task so a
//! leading client that disconnects does not cancel it for the others (moka's behaviour: a cancelled leader's waiter would run the loader again). Failed loads
//! are shared with the waiters but never stored. Also holds the negative entries for missing originals
//! (`not_found_ttl`): the one failure that is cached.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use moka::future::Cache;

use super::Variant;
use crate::error::Error;
use crate::request::CacheKey;

/// Fixed per-entry overhead counted by the weigher, so a flood of tiny entries is bounded too.
const ENTRY_OVERHEAD: u64 = 256;

/// The memory tier.
#[derive(Clone)]
pub struct MemoryCache {
    variants: Cache<CacheKey, Arc<Variant>>,
    /// Missing originals, with the revision they were found missing at.
    not_found: Cache<String, u64>,
    max_entry_bytes: u64,
    hits: Arc<AtomicU64>,
    misses: Arc<AtomicU64>,
}

/// How a [`MemoryCache::get_or_load`] call was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// This call ran the load.
    Loaded,
    /// Another caller's load answered this one (coalesced).
    Shared,
}

impl MemoryCache {
    /// A cache of at most `capacity_bytes`, keeping entries up to `max_entry_bytes`, with negative
    /// entries living `not_found_ttl`.
    pub fn new(capacity_bytes: u64, max_entry_bytes: u64, not_found_ttl: Duration) -> MemoryCache {
        let variants = Cache::builder()
            .max_capacity(capacity_bytes)
            .weigher(|k: &CacheKey, v: &Arc<Variant>| {
                let w = v.bytes.len() as u64 + k.as_str().len() as u64 + ENTRY_OVERHEAD;
                u32::try_from(w).unwrap_or(u32::MAX)
            })
            .support_invalidation_closures()
            .build();
        let not_found = Cache::builder()
            .max_capacity(100_000)
            .time_to_live(not_found_ttl.max(Duration::from_millis(1)))
            .support_invalidation_closures()
            .build();
        MemoryCache {
            variants,
            not_found,
            max_entry_bytes,
            hits: Arc::new(AtomicU64::new(0)),
            misses: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The variant if it is in memory.
    pub async fn get(&self, key: &CacheKey) -> Option<Arc<Variant>> {
        let found = self.variants.get(key).await;
        if found.is_some() {
            self.hits.fetch_add(1, Ordering::Relaxed);
        } else {
            self.misses.fetch_add(1, Ordering::Relaxed);
        }
        found
    }

    /// Whether `key` is in memory, without counting a hit or a miss (the background pre-render
    /// asks).
    pub fn contains(&self, key: &CacheKey) -> bool {
        self.variants.contains_key(key)
    }

    /// Drops one entry (a stale one, made from a replaced original).
    pub async fn remove(&self, key: &CacheKey) {
        self.variants.invalidate(key).await;
    }

    /// Keeps a variant rendered outside a request (the background pre-render), unless it is over
    /// `memory_cache_max_entry_kb`.
    pub async fn insert(&self, key: CacheKey, variant: Arc<Variant>) {
        if variant.bytes.len() as u64 <= self.max_entry_bytes {
            self.variants.insert(key, variant).await;
        }
    }

    /// Returns the cached variant or runs `load` once for all concurrent callers of this key.
    ///
    /// The load runs in a spawned task: if every caller goes away it still completes and fills the
    /// cache; a failed load is returned to every waiter and not stored.
    pub async fn get_or_load<F>(
        &self,
        key: CacheKey,
        load: F,
    ) -> Result<(Arc<Variant>, Outcome), Error>
    where
        F: Future<Output = Result<Arc<Variant>, Error>> + Send + 'static,
    {
        let ran = Arc::new(AtomicBool::new(false));
        let ran_in_task = ran.clone();
        let variants = self.variants.clone();
        let task_key = key.clone();
        let task = tokio::spawn(async move {
            variants
                .try_get_with(task_key, async move {
                    ran_in_task.store(true, Ordering::Release);
                    load.await
                })
                .await
        });
        let variant = match task.await {
            Ok(Ok(v)) => v,
            Ok(Err(shared)) => return Err((*shared).clone()),
            Err(e) => return Err(Error::Internal(format!("load task: {e}"))),
        };
        if variant.bytes.len() as u64 > self.max_entry_bytes {
            // Answered to every waiter, but too big to keep: it would push out many small entries.
            self.variants.invalidate(&key).await;
        }
        let outcome = if ran.load(Ordering::Acquire) {
            Outcome::Loaded
        } else {
            Outcome::Shared
        };
        Ok((variant, outcome))
    }

    /// True while `original` is negatively cached as missing at `revision` (an entry from before
    /// an upload does not count).
    pub async fn is_not_found(&self, original: &str, revision: u64) -> bool {
        self.not_found.get(original).await == Some(revision)
    }

    /// Remembers for `not_found_ttl` that `original` was missing at `revision`.
    pub async fn mark_not_found(&self, original: &str, revision: u64) {
        self.not_found.insert(original.to_owned(), revision).await;
    }

    /// Drops every variant and negative entry of one original (`{model}/{type}/{id}`), for purge.
    pub fn invalidate_original(&self, original: &str) -> Result<(), Error> {
        let prefix = format!("{original}/");
        let p2 = prefix.clone();
        self.variants
            .invalidate_entries_if(move |k, _| k.as_str().starts_with(&prefix))
            .map_err(|e| Error::Internal(format!("invalidate: {e}")))?;
        let exact = original.to_owned();
        self.not_found
            .invalidate_entries_if(move |k, _| *k == exact || k.starts_with(&p2))
            .map_err(|e| Error::Internal(format!("invalidate: {e}")))?;
        Ok(())
    }

    /// Entries held now (approximate until moka runs its pending tasks).
    pub fn entry_count(&self) -> u64 {
        self.variants.entry_count()
    }

    /// Bytes held now (weighted size).
    pub fn weighted_size(&self) -> u64 {
        self.variants.weighted_size()
    }

    /// Lookups that found a variant.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Lookups that did not.
    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }

    /// Runs moka's pending maintenance (tests and the status page want exact counts).
    pub async fn sync(&self) {
        self.variants.run_pending_tasks().await;
        self.not_found.run_pending_tasks().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Tier;
    use crate::request::{Format, ImageRequest, Rules};
    use bytes::Bytes;
    use std::sync::atomic::AtomicUsize;
    use std::time::SystemTime;

    fn key(p: &str) -> CacheKey {
        let r = ImageRequest::parse(p, &Rules::default()).expect("valid");
        r.cache_key(r.format)
    }

    fn variant(n: usize) -> Arc<Variant> {
        Arc::new(Variant::new(
            Bytes::from(vec![7u8; n]),
            Format::Jpeg,
            SystemTime::now(),
            Tier::Miss,
        ))
    }

    #[tokio::test]
    async fn concurrent_misses_share_one_load() {
        let cache = MemoryCache::new(1 << 20, 1 << 20, Duration::from_secs(60));
        let loads = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let cache = cache.clone();
            let loads = loads.clone();
            tasks.push(tokio::spawn(async move {
                cache
                    .get_or_load(key("/p/i/1/w10.jpg"), async move {
                        loads.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok(variant(10))
                    })
                    .await
            }));
        }
        let mut loaded = 0;
        for t in tasks {
            let (v, outcome) = t.await.expect("join").expect("load");
            assert_eq!(v.bytes.len(), 10);
            if outcome == Outcome::Loaded {
                loaded += 1;
            }
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        assert_eq!(loaded, 1);
    }

    #[tokio::test]
    async fn failures_are_not_cached() {
        let cache = MemoryCache::new(1 << 20, 1 << 20, Duration::from_secs(60));
        let k = key("/p/i/1/w10.jpg");
        let err = cache
            .get_or_load(k.clone(), async { Err(Error::Timeout) })
            .await
            .expect_err("fails");
        assert_eq!(err, Error::Timeout);
        assert!(cache.get(&k).await.is_none());
        let (v, _) = cache
            .get_or_load(k.clone(), async { Ok(variant(5)) })
            .await
            .expect("second load runs");
        assert_eq!(v.bytes.len(), 5);
        assert!(cache.get(&k).await.is_some());
    }

    #[tokio::test]
    async fn oversized_entries_are_answered_not_kept() {
        let cache = MemoryCache::new(1 << 20, 100, Duration::from_secs(60));
        let k = key("/p/i/1/w10.jpg");
        let (v, _) = cache
            .get_or_load(k.clone(), async { Ok(variant(1000)) })
            .await
            .expect("load");
        assert_eq!(v.bytes.len(), 1000);
        assert!(cache.get(&k).await.is_none());
    }

    #[tokio::test]
    async fn a_cancelled_leader_does_not_cancel_the_load() {
        let cache = MemoryCache::new(1 << 20, 1 << 20, Duration::from_secs(60));
        let loads = Arc::new(AtomicUsize::new(0));
        let k = key("/p/i/1/w10.jpg");
        let l = loads.clone();
        let leader = {
            let cache = cache.clone();
            let k = k.clone();
            tokio::spawn(async move {
                cache
                    .get_or_load(k, async move {
                        l.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Ok(variant(3))
                    })
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        leader.abort();
        let l = loads.clone();
        let (v, _) = cache
            .get_or_load(k, async move {
                l.fetch_add(1, Ordering::SeqCst);
                Ok(variant(4))
            })
            .await
            .expect("load");
        assert_eq!(v.bytes.len(), 3, "the first load finished and was shared");
        assert_eq!(loads.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn negative_entries_expire_and_purge_drops_one_original() {
        let cache = MemoryCache::new(1 << 20, 1 << 20, Duration::from_millis(100));
        cache.mark_not_found("p/i/9", 3).await;
        assert!(cache.is_not_found("p/i/9", 3).await);
        assert!(
            !cache.is_not_found("p/i/9", 4).await,
            "an upload since (a later revision) makes the entry void"
        );
        assert!(!cache.is_not_found("p/i/90", 3).await);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(!cache.is_not_found("p/i/9", 3).await);

        for p in ["/p/i/1/w10.jpg", "/p/i/1/w20.jpg", "/p/i/12/w10.jpg"] {
            cache
                .get_or_load(key(p), async { Ok(variant(1)) })
                .await
                .expect("load");
        }
        cache.invalidate_original("p/i/1").expect("purge");
        cache.sync().await;
        assert!(cache.get(&key("/p/i/1/w10.jpg")).await.is_none());
        assert!(cache.get(&key("/p/i/1/w20.jpg")).await.is_none());
        assert!(cache.get(&key("/p/i/12/w10.jpg")).await.is_some());
    }
}
