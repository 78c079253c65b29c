//! Step 3 of the request flow: cache → fetch → render → store, each key rendered once at a time.
//!
//! [`Pipeline::serve`] asks the memory tier, then (inside one shared load per canonical key) the remote
//! result store, then fetches the original (one download per original, kept in a byte-bounded
//! originals cache so ten sizes cost one origin request) and renders it in the bounded pool. The
//! result is returned at once; the remote write is queued in the background. A failure stores nothing
//! except the negative entry for a missing original.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use moka::future::Cache;

use crate::budget::{BudgetConfig, Budgets};
use crate::cache::memory::{MemoryCache, Outcome};
use crate::cache::remote::RemoteStore;
use crate::cache::revision::Revisions;
use crate::cache::{Tier, Variant};
use crate::config::Config;
use crate::error::Error;
use crate::image::{ImageError, Processor, RenderSpec};
use crate::metrics as m;
use crate::popular::Popularity;
use crate::request::{CacheKey, DefaultQuality, Format, ImageRequest, Rules};
use crate::source::guard::SourceGuard;
use crate::source::{Source, SourceError};

mod intake;
mod origin;
mod prerender;

pub use self::origin::Origin;

/// An original's bytes in the originals cache, with the revision the download started at.
type Original = (u64, Bytes);

/// How long a downloaded original stays in memory without being asked for again. Replaced images
/// are dropped at once by `purge`; this bounds staleness when nobody purges.
const ORIGINAL_IDLE_TTL: Duration = Duration::from_secs(600);

/// The orchestration of one image request. Cheap to clone (everything inside is shared).
#[derive(Clone)]
pub struct Pipeline {
    inner: Arc<Inner>,
}

struct Inner {
    config: Arc<Config>,
    defaults: DefaultQuality,
    source: Source,
    processor: Processor,
    memory: MemoryCache,
    remote: Option<RemoteStore>,
    originals: Cache<String, Original>,
    /// Every bound on concurrent work, shared with `processor`.
    budgets: Arc<Budgets>,
    /// The `?source=` override's rules and client; `None` refuses every override.
    overrides: Option<SourceGuard>,
    /// During a store outage every miss fails its read: log the first, then one summary per period.
    store_warning: RateLimitedWarning,
    /// Requesters waiting for each key's load, so a queued render nobody waits for any more is
    /// dropped before it starts.
    waiting: Waiting,
    /// Loads in progress per original, so a render knows whether other versions of its original
    /// are being asked for right now.
    siblings: Siblings,
    /// The versions each class is asked for.
    popularity: Popularity,
    /// `prerender_popular`: versions rendered in the background after a foreground miss.
    prerender_count: usize,
    /// The background lane.
    lane: prerender::Lane,
    /// The URL rules, for the versions the background lane renders.
    rules: Rules,
    /// The originals' revisions (shared with the result store's writer): what was made from a
    /// replaced or deleted original is never served again.
    revisions: Arc<Revisions>,
    /// Uploads' background outputs render one original at a time, so they never hold more than one
    /// place of the render queue that clients' requests need.
    outputs_lane: tokio::sync::Semaphore,
}

/// What answered a request.
#[derive(Clone, Debug)]
pub struct Served {
    /// The variant.
    pub variant: Arc<Variant>,
    /// Which tier had it (`X-Cache`).
    pub tier: Tier,
}

/// Counters the status page shows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PipelineStats {
    /// Renders running now.
    pub processing_current: usize,
    /// Renders started since start-up.
    pub processing_total: u64,
    /// Renders waiting for a pool slot.
    pub queue_depth: usize,
    /// Original downloads running now.
    pub downloads_current: usize,
    /// Original downloads started since start-up.
    pub downloads_total: u64,
    /// Queued renders dropped unstarted because every requester had gone.
    pub abandoned: u64,
    /// Bytes of `max_memory_mb` reserved by renders now.
    pub memory_reserved: u64,
    /// Decode passes since start-up (versions sharing a decode count once).
    pub decodes: u64,
    /// Versions rendered from another version's decode since start-up.
    pub shared: u64,
}

impl PipelineStats {
    /// Sets the gauges these counters feed (the one place they are set).
    pub fn publish(&self) {
        m::gauge(m::PROCESSING_CURRENT, self.processing_current as f64);
        m::gauge(m::QUEUE_DEPTH, self.queue_depth as f64);
        m::gauge(m::DOWNLOADS_CURRENT, self.downloads_current as f64);
    }
}

impl Pipeline {
    /// Builds the pipeline from a validated config, a source, an optional result store and the
    /// `?source=` guard (`None` refuses every override).
    pub fn new(
        config: Arc<Config>,
        source: Source,
        remote: Option<RemoteStore>,
        overrides: Option<SourceGuard>,
    ) -> Pipeline {
        let budgets = Arc::new(Budgets::new(BudgetConfig::from_config(&config)));
        let rules = config.rules();
        // Without a cache to keep them in, background renders would be thrown away.
        let prerender_count = if config.caching.memory_cache_mb.bytes() == 0 && remote.is_none() {
            0
        } else {
            config.prerender.prerender_popular
        };
        let processor = Processor::new(
            budgets.clone(),
            config.decode_limits(),
            config.timeouts.render_timeout,
            config.rendering.max_avif_output_pixels,
        );
        let memory = MemoryCache::new(
            config.caching.memory_cache_mb.bytes(),
            config.caching.memory_cache_max_entry_kb.bytes(),
            config.caching.not_found_ttl,
        );
        let revisions = remote
            .as_ref()
            .map(RemoteStore::revisions)
            .unwrap_or_default();
        let originals = Cache::builder()
            .max_capacity(config.caching.originals_cache_mb.bytes())
            .weigher(|_k: &String, v: &Original| u32::try_from(v.1.len()).unwrap_or(u32::MAX))
            .time_to_idle(ORIGINAL_IDLE_TTL)
            .support_invalidation_closures()
            .build();
        let popularity = Popularity::new(config.prerender.popular_halflife);
        Pipeline {
            inner: Arc::new(Inner {
                defaults: config.default_quality(),
                budgets,
                config,
                source,
                processor,
                memory,
                remote,
                originals,
                overrides,
                store_warning: RateLimitedWarning::default(),
                waiting: Waiting::default(),
                siblings: Siblings::default(),
                popularity,
                prerender_count,
                lane: prerender::Lane::default(),
                rules,
                revisions,
                outputs_lane: tokio::sync::Semaphore::new(1),
            }),
        }
    }

    /// Answers one parsed request rendered as `format` (the URL's, or the one `auto_format` picked).
    pub async fn serve(&self, req: &ImageRequest, format: Format) -> Result<Served, Error> {
        self.serve_from(req, format, &Origin::Configured).await
    }

    /// Like [`Pipeline::serve`], with the original taken from `origin` (a checked `?source=` URL has
    /// caches of its own: see [`Origin`]).
    pub async fn serve_from(
        &self,
        req: &ImageRequest,
        format: Format,
        origin: &Origin,
    ) -> Result<Served, Error> {
        let inner = &self.inner;
        let key = origin.result_key(req, format);
        let revision = inner.revisions.of(&req.model, &req.kind, &req.id);
        if let Some(variant) = inner.memory.get(&key).await {
            if variant.revision == revision {
                m::incr(m::CACHE_MEMORY_HIT);
                return Ok(Served {
                    variant,
                    tier: Tier::Memory,
                });
            }
            // Made from an original replaced since: gone, and loaded again below.
            inner.memory.remove(&key).await;
        }
        m::incr(m::CACHE_MEMORY_MISS);
        // Boxed: everything below (the single-flight wait, the load it may start) would otherwise be
        // part of this future's size, which is moved several times per request on the hit path too.
        Box::pin(self.serve_miss(req, format, origin, key, revision)).await
    }

    /// The memory cache did not have `key` at `revision` of its original (read once, by the
    /// caller): negative entry, then a single-flight load.
    async fn serve_miss(
        &self,
        req: &ImageRequest,
        format: Format,
        origin: &Origin,
        key: CacheKey,
        revision: u64,
    ) -> Result<Served, Error> {
        let inner = &self.inner;
        let original = origin.negative_key(req);
        if inner.memory.is_not_found(&original, revision).await {
            return Err(SourceError::NotFound.into());
        }
        // Held until this requester has its answer or goes away (the future is dropped).
        let waiter = inner.waiting.join(&key);
        let mut result = self.shared_load(req, format, origin, &key, &waiter).await;
        for _ in 0..2 {
            match &result {
                // This requester joined a load in the instant it was dropped for having nobody
                // waiting: start one of its own.
                Err(Error::Image(ImageError::Abandoned)) => {}
                // It joined a load (or found an entry) made from the original before a
                // replacement that happened before this request: load the current one.
                Ok((variant, _)) if variant.revision < revision => {
                    inner.memory.remove(&key).await;
                }
                _ => break,
            }
            result = self.shared_load(req, format, origin, &key, &waiter).await;
        }
        drop(waiter);
        match result {
            Ok((variant, outcome)) => {
                if outcome == Outcome::Shared {
                    m::incr(m::COALESCED);
                }
                let tier = variant.loaded_from;
                Ok(Served { variant, tier })
            }
            Err(e) => {
                if e.is_not_found() {
                    inner.memory.mark_not_found(&original, revision).await;
                }
                Err(e)
            }
        }
    }

    /// One coalesced load of `key` (moka's single flight), told who is waiting for it.
    async fn shared_load(
        &self,
        req: &ImageRequest,
        format: Format,
        origin: &Origin,
        key: &CacheKey,
        waiter: &Waiter,
    ) -> Result<(Arc<Variant>, Outcome), Error> {
        let load = Inner::load(
            self.inner.clone(),
            req.clone(),
            format,
            origin.clone(),
            waiter.count.clone(),
        );
        self.inner.memory.get_or_load(key.clone(), load).await
    }

    /// Renders one variant straight into the result store (for `warm`): same keys, same limits.
    /// Returns `Ok(false)` when it was already stored and `force` is off.
    pub async fn warm(&self, req: &ImageRequest, force: bool) -> Result<bool, Error> {
        let inner = &self.inner;
        let Some(remote) = &inner.remote else {
            return Err(Error::Internal("no result_store configured".into()));
        };
        let key = req.cache_key(req.format);
        if !force
            && remote
                .exists(&key)
                .await
                .map_err(|e| Error::Internal(e.to_string()))?
        {
            return Ok(false);
        }
        let variant = inner
            .render(req, req.format, &Origin::Configured, None)
            .await?;
        remote
            .put(&key, &variant)
            .await
            .map_err(|e| Error::Internal(e.to_string()))?;
        Ok(true)
    }

    /// [`Pipeline::warm`] for several versions of one original (`reqs` share model, type and id):
    /// one download and, where the versions allow, one decode for all. Results in the order of
    /// `reqs`.
    pub async fn warm_versions(
        &self,
        reqs: &[ImageRequest],
        force: bool,
    ) -> Vec<Result<bool, Error>> {
        let inner = &self.inner;
        let Some(remote) = &inner.remote else {
            let none = Error::Internal("no result_store configured".into());
            return vec![Err(none); reqs.len()];
        };
        let mut results: Vec<Option<Result<bool, Error>>> = vec![None; reqs.len()];
        let mut todo = Vec::new();
        for (i, req) in reqs.iter().enumerate() {
            let key = req.cache_key(req.format);
            if !force {
                match remote.exists(&key).await {
                    Ok(true) => {
                        results[i] = Some(Ok(false));
                        continue;
                    }
                    Ok(false) => {}
                    Err(e) => {
                        results[i] = Some(Err(Error::Internal(e.to_string())));
                        continue;
                    }
                }
            }
            if req.format == Format::Avif {
                results[i] = Some(self.warm(req, true).await);
            } else {
                todo.push(i);
            }
        }
        if !todo.is_empty() {
            let chosen: Vec<ImageRequest> = todo.iter().map(|&i| reqs[i].clone()).collect();
            let rendered = inner.render_many(&chosen).await;
            for (i, variant) in todo.into_iter().zip(rendered) {
                let outcome = match variant {
                    Ok(variant) => remote
                        .put(&reqs[i].cache_key(reqs[i].format), &variant)
                        .await
                        .map(|()| true)
                        .map_err(|e| Error::Internal(e.to_string())),
                    Err(e) => Err(e),
                };
                results[i] = Some(outcome);
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or(Err(Error::Internal("not warmed".into()))))
            .collect()
    }

    /// Counts a version as asked for by a client (after an image answer; background renders and
    /// `warm` never call this).
    pub fn record(&self, req: &ImageRequest, format: Format) {
        self.inner.record(req, format);
    }

    /// The versions asked for, per class (the status port's `/versions`).
    pub fn popularity(&self) -> &Popularity {
        &self.inner.popularity
    }

    /// The `?source=` guard, when overrides are enabled.
    pub fn source_guard(&self) -> Option<&SourceGuard> {
        self.inner.overrides.as_ref()
    }

    /// The memory tier (status page, purge).
    pub fn memory(&self) -> &MemoryCache {
        &self.inner.memory
    }

    /// The remote tier, if configured.
    pub fn remote(&self) -> Option<&RemoteStore> {
        self.inner.remote.as_ref()
    }

    /// Applies the originals cache's pending bookkeeping, so [`Pipeline::originals_usage`] is exact
    /// (moka updates its counts lazily: a fresh download would otherwise show as 0 entries).
    pub async fn sync_originals(&self) {
        self.inner.originals.run_pending_tasks().await;
    }

    /// The originals cache: entries and bytes.
    pub fn originals_usage(&self) -> (u64, u64) {
        (
            self.inner.originals.entry_count(),
            self.inner.originals.weighted_size(),
        )
    }

    /// Drops everything held in memory for one original (variants, original bytes, negative entry).
    pub fn purge_memory(&self, original: &str) -> Result<(), Error> {
        self.inner.memory.invalidate_original(original)?;
        let exact = original.to_owned();
        self.inner
            .originals
            .invalidate_entries_if(move |k, _| *k == exact)
            .map_err(|e| Error::Internal(format!("invalidate: {e}")))?;
        Ok(())
    }

    /// The source in use.
    pub fn source(&self) -> &Source {
        &self.inner.source
    }

    /// Pool and download counters.
    pub fn stats(&self) -> PipelineStats {
        self.inner.stats()
    }
}

impl Inner {
    fn stats(&self) -> PipelineStats {
        let b = &self.budgets;
        PipelineStats {
            processing_current: b.running(),
            processing_total: self.processor.total(),
            queue_depth: b.queued(),
            downloads_current: b.downloads_current(),
            downloads_total: b.downloads_total(),
            abandoned: self.processor.abandoned(),
            memory_reserved: b.memory_reserved(),
            decodes: self.processor.decodes(),
            shared: self.processor.shared(),
        }
    }

    /// The shared load for one key: the remote store, else fetch + render + queue the remote write.
    async fn load(
        this: Arc<Inner>,
        req: ImageRequest,
        format: Format,
        origin: Origin,
        waiters: Arc<AtomicUsize>,
    ) -> Result<Arc<Variant>, Error> {
        let key = origin.result_key(&req, format);
        // Taken before anything is read: a replacement from here on makes this load's result stale.
        let revision = this.revisions.of(&req.model, &req.kind, &req.id);
        let _sibling = this.siblings.enter(origin.originals_key(&req));
        if let Some(remote) = &this.remote {
            match remote.get(&key).await {
                Ok(Some(variant)) => return Ok(Arc::new(variant.with_revision(revision))),
                Ok(None) => {}
                // A broken store costs a miss, never the response.
                Err(e) => this.store_warning.warn(&e),
            }
        }
        let variant = this.render(&req, format, &origin, Some(&waiters)).await?;
        let variant = Arc::new(variant.with_revision(revision));
        if let Some(remote) = &this.remote {
            remote.enqueue(key, variant.clone());
        }
        if origin == Origin::Configured {
            this.after_miss(&req, format).await;
        }
        Ok(variant)
    }

    /// Fetches the original (shared) and renders it in the pool. `waiters`: the requesters of this
    /// render (`None` for `warm`, which always wants it); when none is left before the download or
    /// before the render starts, it is dropped ([`ImageError::Abandoned`]).
    async fn render(
        &self,
        req: &ImageRequest,
        format: Format,
        origin: &Origin,
        waiters: Option<&AtomicUsize>,
    ) -> Result<Variant, Error> {
        let wanted = || waiters.is_none_or(|w| w.load(Ordering::Acquire) > 0);
        // Admission first: a request the full pool would refuse (503) must not cost a download.
        let mut ticket = self.budgets.admit(format).map_err(ImageError::from)?;
        ticket.stage().await;
        if !wanted() {
            return Err(ImageError::Abandoned.into());
        }
        let original = self.original(req, origin).await?;
        let spec = self.spec(req, format);
        let company = self.siblings.count(&origin.originals_key(req)) > 1;
        let started = Instant::now();
        let rendered = self
            .processor
            .render_admitted(ticket, original, spec, &wanted, company)
            .await;
        m::time(m::TIME_PROCESS, started.elapsed());
        self.stats().publish();
        let rendered = match rendered {
            Ok(r) => r,
            Err(e) => {
                // A failed request leaves nothing behind: not even the original's bytes.
                self.originals.invalidate(&origin.originals_key(req)).await;
                return Err(e.into());
            }
        };
        if rendered.bytes.is_empty() {
            // The seed served 0-byte files after a failed convert; an empty encode is a failure.
            return Err(Error::Internal("encoder produced no bytes".into()));
        }
        m::incr(m::IMAGE_REQUEST);
        m::incr_with(m::IMAGE_REQUEST, format.ext());
        Ok(Variant::new(
            rendered.bytes,
            rendered.format,
            SystemTime::now(),
            Tier::Miss,
        ))
    }

    /// Renders several versions of one original (for `warm`): one download, one slot, one decode
    /// where the versions allow it.
    async fn render_many(&self, reqs: &[ImageRequest]) -> Vec<Result<Variant, Error>> {
        let all = |e: Error| vec![Err(e); reqs.len()];
        let Some(first) = reqs.first() else {
            return Vec::new();
        };
        let mut ticket = match self.budgets.admit(first.format) {
            Ok(ticket) => ticket,
            Err(e) => return all(ImageError::from(e).into()),
        };
        ticket.stage().await;
        let original = match self.original(first, &Origin::Configured).await {
            Ok(original) => original,
            Err(e) => return all(e),
        };
        let specs: Vec<RenderSpec> = reqs.iter().map(|r| self.spec(r, r.format)).collect();
        let started = Instant::now();
        let rendered = self
            .processor
            .render_many(ticket, original.clone(), &specs)
            .await;
        m::time(m::TIME_PROCESS, started.elapsed());
        let rendered = match rendered {
            Ok(rendered) => rendered,
            Err(e) => {
                self.originals
                    .invalidate(&Origin::Configured.originals_key(first))
                    .await;
                return all(e.into());
            }
        };
        rendered
            .into_iter()
            .map(|r| {
                let r = r?;
                if r.bytes.is_empty() {
                    return Err(Error::Internal("encoder produced no bytes".into()));
                }
                m::incr(m::IMAGE_REQUEST);
                m::incr_with(m::IMAGE_REQUEST, r.format.ext());
                Ok(Variant::new(
                    r.bytes,
                    r.format,
                    SystemTime::now(),
                    Tier::Miss,
                ))
            })
            .collect()
    }

    /// What a render of `req` as `format` is asked to make.
    fn spec(&self, req: &ImageRequest, format: Format) -> RenderSpec {
        RenderSpec {
            version: req.version,
            format,
            quality: req.effective_quality(format, &self.defaults),
            gravity: self.config.rendering.crop_gravity,
            enlarge: self.config.rendering.enlarge,
            background: self.config.rendering.background,
            progressive: self.config.rendering.progressive_jpeg,
            avif_effort: self.config.rendering.avif_effort,
        }
    }

    /// The original's bytes: from the originals cache, or one download shared by every caller. Bytes
    /// kept from before a replacement of the original are dropped and fetched again.
    async fn original(&self, req: &ImageRequest, origin: &Origin) -> Result<Bytes, Error> {
        let id = origin.originals_key(req);
        for _ in 0..2 {
            let revision = self.revisions.of(&req.model, &req.kind, &req.id);
            let (made_at, bytes) = self.fetch_original(req, origin, &id, revision).await?;
            if made_at == revision {
                return Ok(bytes);
            }
            self.originals.invalidate(&id).await;
        }
        // Replaced twice while fetching: serve what was fetched; it is never cached as current.
        let revision = self.revisions.of(&req.model, &req.kind, &req.id);
        Ok(self.fetch_original(req, origin, &id, revision).await?.1)
    }

    /// One shared download into the originals cache, marked with the revision it started at.
    async fn fetch_original(
        &self,
        req: &ImageRequest,
        origin: &Origin,
        id: &str,
        revision: u64,
    ) -> Result<Original, Error> {
        let fetch = async {
            // Under the caller's staging place, which bounds how many downloads run.
            let download = self.budgets.download().await;
            self.stats().publish();
            let started = Instant::now();
            let result = match (origin, &self.overrides) {
                (Origin::Configured, _) => self.source.fetch(req).await.map_err(Error::from),
                (Origin::Override(s), Some(guard)) => guard.fetch(s).await,
                // The service checks first; this keeps a missing guard fail-closed.
                (Origin::Override(_), None) => Err(Error::SourceRefused),
            };
            drop(download);
            self.stats().publish();
            m::time(m::TIME_FETCH, started.elapsed());
            match result {
                Ok(bytes) => {
                    m::incr(m::ORIGINAL_DOWNLOADED);
                    Ok((revision, bytes))
                }
                Err(err) => {
                    // Missing (404/410), failed (5xx, reset, truncated) or too slow: the source could
                    // not deliver. Over max_source_bytes is the original's fault, not the source's.
                    if err.is_original_unavailable() {
                        m::incr(m::ORIGINAL_UNAVAILABLE);
                    }
                    Err(err)
                }
            }
        };
        self.originals
            .try_get_with(id.to_owned(), fetch)
            .await
            .map_err(|shared| (*shared).clone())
    }
}

/// Loads in progress per original (its originals-cache key).
#[derive(Default)]
struct Siblings {
    counts: Mutex<HashMap<String, usize>>,
}

/// One load's place in [`Siblings`], given up on drop.
struct Sibling<'a> {
    siblings: &'a Siblings,
    key: String,
}

impl Siblings {
    fn enter(&self, key: String) -> Sibling<'_> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        *counts.entry(key.clone()).or_default() += 1;
        Sibling {
            siblings: self,
            key,
        }
    }

    fn count(&self, key: &str) -> usize {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.get(key).copied().unwrap_or(0)
    }
}

impl Drop for Sibling<'_> {
    fn drop(&mut self) {
        let mut counts = self
            .siblings
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// Requesters waiting for each key's load. Entries are shared by the requesters of a key and the
/// load serving them; the map holds them weakly, so it only ever names loads in progress.
#[derive(Default)]
struct Waiting {
    keys: Mutex<HashMap<CacheKey, Weak<AtomicUsize>>>,
}

/// One requester's place among a key's waiters, given up on drop.
struct Waiter {
    count: Arc<AtomicUsize>,
}

impl Waiting {
    /// Above this many entries, dead ones (loads finished after their last requester left) are
    /// swept on the next join.
    const SWEEP_ABOVE: usize = 1024;

    fn join(&self, key: &CacheKey) -> Waiter {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        if keys.len() > Self::SWEEP_ABOVE {
            keys.retain(|_, w| w.strong_count() > 0);
        }
        let count = match keys.get(key).and_then(Weak::upgrade) {
            Some(count) => count,
            None => {
                let count = Arc::new(AtomicUsize::new(0));
                keys.insert(key.clone(), Arc::downgrade(&count));
                count
            }
        };
        count.fetch_add(1, Ordering::AcqRel);
        Waiter { count }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A warning logged at most once per [`RateLimitedWarning::PERIOD`], with the number suppressed in
/// between, so an outage of the result store cannot flood the log with one line per request.
#[derive(Default)]
struct RateLimitedWarning {
    last_secs: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimitedWarning {
    const PERIOD: Duration = Duration::from_secs(10);

    fn warn(&self, error: &crate::cache::remote::StoreError) {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let last = self.last_secs.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= Self::PERIOD.as_secs()
            && self
                .last_secs
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            let suppressed = self.suppressed.swap(0, Ordering::AcqRel);
            tracing::warn!(error = %error, suppressed, "result store read failed; rendering");
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::remote::StoreError;

    #[test]
    fn store_warnings_are_rate_limited() {
        let w = RateLimitedWarning::default();
        for _ in 0..100 {
            w.warn(&StoreError::Timeout);
        }
        // The first call logged (and reset the count); the other 99 were held back.
        assert_eq!(w.suppressed.load(Ordering::Relaxed), 99);
        assert!(w.last_secs.load(Ordering::Relaxed) > 0);
    }
}
