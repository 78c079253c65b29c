//! Step 3c of the request flow: rendering, off the async runtime.
//!
//! Owns the bounded processing pool (docs/architecture.md): at most `processing_concurrency` renders run at once on
//! tokio's blocking threads, at most `queue_size` more wait, and beyond that a request is refused with
//! [`ImageError::Overloaded`] (503) instead of queueing without bound; of those waiting, at most
//! `download_concurrency` fetch and hold their original ([`Processor::stage`]). AVIF encodes also take a
//! permit from their own small pool so AVIF traffic cannot starve JPEG traffic. The libvips calls themselves
//! live in [`vips`] (the only file that touches libvips); the pure size arithmetic in [`geometry`]; the
//! SIMD resize of decoded 8-bit pixels in [`resample`].

pub mod cost;
#[cfg(any(test, feature = "test-support"))]
pub mod fixtures;
pub mod geometry;
pub mod jpeg;
pub mod markers;
pub mod render;
pub mod resample;
pub mod vips;
pub mod webp;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Semaphore;

use crate::request::{Format, Version};

/// Where the crop window sits when a cover resize cuts the image (`crop_gravity`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Gravity {
    /// The centre (default).
    #[default]
    Centre,
    /// libvips `attention` smart crop.
    Attention,
    /// libvips `entropy` smart crop.
    Entropy,
}

/// Everything libvips needs to turn an original into one variant.
#[derive(Clone, Debug, PartialEq)]
pub struct RenderSpec {
    /// The geometry.
    pub version: Version,
    /// The output format.
    pub format: Format,
    /// Encoder quality 1..=100 (ignored by PNG and GIF).
    pub quality: u8,
    /// Crop position for cover resizes.
    pub gravity: Gravity,
    /// When false the result never exceeds the original's size.
    pub enlarge: bool,
    /// Background RGB that alpha is flattened onto for JPEG.
    pub background: [u8; 3],
    /// Progressive JPEG output.
    pub progressive: bool,
    /// AVIF encoder effort 0..=9 (lower is faster).
    pub avif_effort: u8,
}

/// Limits checked on the header, before any pixel is decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeLimits {
    /// `max_source_pixels`: width × height (× frames for animations).
    pub max_pixels: u64,
    /// `max_source_side`: the longer side.
    pub max_side: u32,
    /// `accept_avif_input`: whether HEIF/AVIF originals are loaded.
    pub accept_avif_input: bool,
    /// `max_jpeg_scans`: scans a JPEG may have.
    pub max_jpeg_scans: u32,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_pixels: 50_000_000,
            max_side: 16_384,
            accept_avif_input: false,
            max_jpeg_scans: 100,
        }
    }
}

/// When a render must stop (`render_timeout` after it got its slot), checked from inside the decoders
/// and libvips' evaluation. [`Deadline::none`] never passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadline(Option<Instant>);

impl Deadline {
    /// A deadline `after` from now.
    pub fn after(after: Duration) -> Deadline {
        Deadline(Instant::now().checked_add(after))
    }

    /// No deadline.
    pub fn none() -> Deadline {
        Deadline(None)
    }

    /// Time left (zero once passed), or `None` without a deadline.
    pub fn remaining(&self) -> Option<Duration> {
        self.0
            .map(|at| at.saturating_duration_since(Instant::now()))
    }

    /// Whether the deadline has passed.
    pub fn passed(&self) -> bool {
        self.0.is_some_and(|at| Instant::now() >= at)
    }
}

/// One encoded variant.
#[derive(Clone, Debug)]
pub struct Rendered {
    /// The encoded bytes.
    pub bytes: Bytes,
    /// The format they are in.
    pub format: Format,
    /// Output width in pixels.
    pub width: u32,
    /// Output height in pixels.
    pub height: u32,
}

/// Why a render failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    /// Header dimensions over `max_source_pixels` / `max_source_side`: 422, nothing decoded.
    #[error("original over the pixel or side limit")]
    SourceTooLarge,
    /// The bytes are not an image of an allowed format (SVG, PDF, TIFF, HTML, …): 422.
    #[error("original format not allowed")]
    UnsupportedFormat,
    /// The original is damaged or truncated: 422.
    #[error("original not decodable")]
    Undecodable,
    /// A JPEG original with more scans than `max_jpeg_scans`: 422, nothing decoded.
    #[error("JPEG original over the scan limit")]
    TooManyScans,
    /// The render's memory estimate exceeds all of `max_memory_mb`: 422, nothing decoded.
    #[error("render over the memory budget")]
    OverMemoryBudget,
    /// An AVIF output over `max_avif_output_pixels`: 406.
    #[error("AVIF output over the pixel limit")]
    AvifTooLarge,
    /// The render ran past `render_timeout` and was stopped: 504.
    #[error("render deadline exceeded")]
    Timeout,
    /// The pool and its queue are full: 503.
    #[error("processing queue full")]
    Overloaded,
    /// A queued render dropped before it started because every requester had gone. Nobody is left
    /// to answer; a requester that arrived at that very moment tries once more.
    #[error("render abandoned by its requesters")]
    Abandoned,
    /// libvips failed while resizing or encoding: 500. The detail is logged, never sent.
    #[error("render failed: {0}")]
    Internal(String),
}

/// How the pool is sized (from the configuration).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// `processing_concurrency`: renders at once.
    pub concurrency: usize,
    /// `queue_size`: renders waiting for a slot (every format but AVIF).
    pub queue_size: usize,
    /// `download_concurrency`: admitted renders that may fetch and hold their original while waiting.
    pub staged: usize,
    /// `avif_concurrency`: AVIF encodes at once.
    pub avif_concurrency: usize,
    /// `avif_queue_size`: AVIF renders waiting for an AVIF slot.
    pub avif_queue_size: usize,
    /// `max_memory_mb`, in bytes: what all renders may reserve at once.
    pub memory_bytes: u64,
    /// `render_timeout`: how long a render may run once it has its slot.
    pub render_timeout: Duration,
    /// `max_avif_output_pixels`.
    pub max_avif_pixels: u64,
}

impl PoolConfig {
    /// A pool of `concurrency` slots and otherwise default sizes (tests, benches).
    pub fn with_concurrency(concurrency: usize) -> PoolConfig {
        PoolConfig {
            concurrency,
            queue_size: 4 * concurrency,
            staged: 16,
            avif_concurrency: 1,
            avif_queue_size: 4,
            memory_bytes: 1 << 30,
            render_timeout: Duration::from_secs(8),
            max_avif_pixels: 2048 * 2048,
        }
    }
}

/// The memory budget is counted in KiB permits: a `u32` of them covers 4 TiB, and a KiB is far below
/// any estimate's precision.
const MEMORY_UNIT: u64 = 1024;

/// The bounded processing pool.
#[derive(Debug)]
pub struct Processor {
    permits: Arc<Semaphore>,
    /// Admitted renders that may hold (or be fetching) their original while they wait for the pool;
    /// see [`Processor::stage`].
    staging: Arc<Semaphore>,
    avif_permits: Arc<Semaphore>,
    /// `max_memory_mb` in [`MEMORY_UNIT`] permits; see [`cost`].
    memory: Arc<Semaphore>,
    memory_units: u64,
    limits: DecodeLimits,
    /// Renders admitted to the shared queue (running, waiting, or fetching their original); bounded
    /// by `concurrency + queue_size`.
    admitted: Arc<AtomicUsize>,
    capacity: usize,
    /// AVIF renders admitted to their own queue; bounded by `avif_concurrency + avif_queue_size`.
    avif_admitted: Arc<AtomicUsize>,
    avif_capacity: usize,
    concurrency: usize,
    render_timeout: Duration,
    max_avif_pixels: u64,
    total: AtomicU64,
    abandoned: AtomicU64,
}

/// One admitted place in the pool's queue, taken before the original is fetched (so a request that
/// would be refused with 503 costs no download) and released on drop, so a cancelled request frees
/// its place.
#[derive(Debug)]
pub struct Admission(Arc<AtomicUsize>);

impl Drop for Admission {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A staging place ([`Processor::stage`]), released on drop.
#[derive(Debug)]
pub struct Staged {
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Processor {
    /// A pool sized by `pool`, refusing originals beyond `limits`.
    pub fn new(pool: PoolConfig, limits: DecodeLimits) -> Processor {
        let concurrency = pool.concurrency.max(1);
        let avif_concurrency = pool.avif_concurrency.max(1);
        let memory_units = (pool.memory_bytes / MEMORY_UNIT).clamp(1, u64::from(u32::MAX));
        Processor {
            permits: Arc::new(Semaphore::new(concurrency)),
            staging: Arc::new(Semaphore::new(pool.staged.max(1))),
            avif_permits: Arc::new(Semaphore::new(avif_concurrency)),
            memory: Arc::new(Semaphore::new(
                usize::try_from(memory_units).unwrap_or(usize::MAX >> 4),
            )),
            memory_units,
            limits,
            admitted: Arc::new(AtomicUsize::new(0)),
            capacity: concurrency + pool.queue_size,
            avif_admitted: Arc::new(AtomicUsize::new(0)),
            avif_capacity: avif_concurrency + pool.avif_queue_size,
            concurrency,
            render_timeout: pool.render_timeout,
            max_avif_pixels: pool.max_avif_pixels,
            total: AtomicU64::new(0),
            abandoned: AtomicU64::new(0),
        }
    }

    /// Renders `original` to `spec` on a blocking thread, waiting for a permit if the pool is busy and
    /// refusing at once when the queue is full. Dropping the future releases its place.
    pub async fn render(&self, original: Bytes, spec: RenderSpec) -> Result<Rendered, ImageError> {
        let admission = self.admit(spec.format)?;
        self.render_admitted(admission, None, original, spec, &|| true)
            .await
    }

    /// Takes a place in the queue for `format` now (AVIF has its own), or refuses at once when the
    /// pool and that queue are full.
    pub fn admit(&self, format: Format) -> Result<Admission, ImageError> {
        let (count, capacity) = if format == Format::Avif {
            (&self.avif_admitted, self.avif_capacity)
        } else {
            (&self.admitted, self.capacity)
        };
        let before = count.fetch_add(1, Ordering::AcqRel);
        let admission = Admission(count.clone());
        if before >= capacity {
            return Err(ImageError::Overloaded);
        }
        Ok(admission)
    }

    /// Waits for one of the `staged` places that let an admitted render fetch its original before the
    /// pool has a slot for it; the place is given back when the render starts (or the request goes
    /// away). Without it every admitted request holds its original while it queues: with
    /// `queue_size=64` and 32 connections that was 30 idle 2 MB originals, most of W1's peak RSS at
    /// c = 32 (149 MB). Sized like `download_concurrency`, it never stops more downloads than that
    /// limit already does.
    pub async fn stage(&self) -> Result<Staged, ImageError> {
        self.staging
            .clone()
            .acquire_owned()
            .await
            .map(|permit| Staged { _permit: permit })
            .map_err(|_| ImageError::Overloaded)
    }

    /// Renders with a place taken earlier by [`Processor::admit`], and the staging place its original
    /// was fetched under.
    ///
    /// In order, each step before the next may make it wait or refuse:
    /// 1. **inspect** the header and a JPEG's markers on a blocking thread, without a slot: a format
    ///    we do not load, a header over the limits or too many scans is refused here, in milliseconds;
    /// 2. **cost**: an AVIF output over `max_avif_output_pixels` is refused (406); the memory estimate
    ///    ([`cost`]) over the whole `max_memory_mb` is refused (422);
    /// 3. an AVIF render gives its staging place back and waits for the AVIF pool, so AVIF requests
    ///    queued there cannot stall the other formats' downloads;
    /// 4. **reserve** the estimate from the memory budget, waiting for it;
    /// 5. wait for a **slot**, then give the staging place back; if by then nobody wants the result
    ///    (`wanted` is false: every requester went away) it is dropped unstarted;
    /// 6. **render** on a blocking thread, stopped at `render_timeout` ([`ImageError::Timeout`]).
    ///
    /// The slot and the reservation move into the blocking task: if the requester goes away after
    /// the render started it still runs (to its deadline at most) and only then frees them, so the
    /// pool and memory bounds stay true.
    pub async fn render_admitted(
        &self,
        admission: Admission,
        mut staged: Option<Staged>,
        original: Bytes,
        spec: RenderSpec,
        wanted: &(dyn Fn() -> bool + Sync),
    ) -> Result<Rendered, ImageError> {
        let _admission = admission;
        let limits = self.limits;
        let inspection = {
            let original = original.clone();
            tokio::task::spawn_blocking(move || vips::inspect(&original, &limits))
                .await
                .map_err(|e| ImageError::Internal(format!("inspect task: {e}")))??
        };
        let cost = cost::estimate(&inspection, &spec, self.max_avif_pixels)?;
        let units = cost.bytes.div_ceil(MEMORY_UNIT);
        if units > self.memory_units {
            return Err(ImageError::OverMemoryBudget);
        }
        let _avif = if spec.format == Format::Avif {
            staged = None;
            Some(
                self.avif_permits
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| ImageError::Overloaded)?,
            )
        } else {
            None
        };
        let reserved = self
            .memory
            .clone()
            .acquire_many_owned(u32::try_from(units).unwrap_or(u32::MAX))
            .await
            .map_err(|_| ImageError::Overloaded)?;
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ImageError::Overloaded)?;
        drop(staged);
        if !wanted() {
            self.abandoned.fetch_add(1, Ordering::Relaxed);
            return Err(ImageError::Abandoned);
        }
        self.total.fetch_add(1, Ordering::Relaxed);
        let deadline = Deadline::after(self.render_timeout);
        let handle = tokio::task::spawn_blocking(move || {
            let _held = (permit, reserved);
            render::render_within(&original, &spec, &limits, &deadline, &inspection)
        });
        handle
            .await
            .map_err(|e| ImageError::Internal(format!("render task: {e}")))?
    }

    /// Renders running now.
    pub fn current(&self) -> usize {
        self.concurrency - self.permits.available_permits().min(self.concurrency)
    }

    /// Renders admitted (to either queue) but not running.
    pub fn queue_depth(&self) -> usize {
        (self.admitted.load(Ordering::Acquire) + self.avif_admitted.load(Ordering::Acquire))
            .saturating_sub(self.current())
    }

    /// Queued renders dropped unstarted because every requester had gone.
    pub fn abandoned(&self) -> u64 {
        self.abandoned.load(Ordering::Relaxed)
    }

    /// Bytes of the memory budget reserved by renders now.
    pub fn memory_reserved(&self) -> u64 {
        let free = u64::try_from(self.memory.available_permits()).unwrap_or(u64::MAX);
        self.memory_units.saturating_sub(free) * MEMORY_UNIT
    }

    /// Renders started since start-up.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// The decode limits in force.
    pub fn limits(&self) -> DecodeLimits {
        self.limits
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn spec() -> RenderSpec {
        RenderSpec {
            enlarge: false,
            ..fixtures::spec(crate::request::Version::Width(8), Format::Jpeg)
        }
    }

    /// Whether `fut` is still pending after a moment: it cannot complete while the permits it needs
    /// are held, so this is not a race (a wrongly free permit makes it complete at once).
    async fn pending<F: std::future::Future>(fut: F) -> bool {
        tokio::time::timeout(Duration::from_millis(50), fut)
            .await
            .is_err()
    }

    /// At most `staged` admitted renders hold (or fetch) an original while the pool is busy; a queued
    /// render keeps its place, and gives it back once it has run. (That it does so as soon as it gets
    /// its slot, not at its end, is not observable here without a render that can be paused.)
    #[tokio::test]
    async fn staging_places_bound_originals_waiting_for_the_pool() {
        vips::init(false).expect("libvips");
        let pool = PoolConfig {
            queue_size: 10,
            staged: 2,
            ..PoolConfig::with_concurrency(1)
        };
        let p = Arc::new(Processor::new(pool, DecodeLimits::default()));
        // The pool's only slot, taken by hand: renders queue behind it.
        let busy = p.permits.clone().acquire_owned().await.expect("slot");
        let a = p.stage().await.expect("first place");
        let b = p.stage().await.expect("second place");
        assert!(pending(p.stage()).await, "a third original must wait");

        let original = Bytes::from(crate::image::fixtures::jpeg(64, 48, 85));
        let render = {
            let p = p.clone();
            let admission = p.admit(Format::Jpeg).expect("admitted");
            tokio::spawn(async move {
                p.render_admitted(admission, Some(a), original, spec(), &|| true)
                    .await
            })
        };
        // Queued behind the busy slot, the render still holds its place.
        assert!(pending(p.stage()).await, "a queued render keeps its place");
        drop(busy);
        // Its render starts and gives the place back.
        let c = tokio::time::timeout(Duration::from_secs(10), p.stage())
            .await
            .expect("a place frees when the render starts")
            .expect("place");
        let rendered = render.await.expect("task").expect("render");
        assert_eq!(rendered.width, 8);
        drop((b, c));
    }

    /// An AVIF render waiting for the AVIF pool does not keep its staging place, so a queue of AVIF
    /// requests cannot stop the other formats from fetching their originals.
    #[tokio::test]
    async fn avif_waiting_for_its_pool_gives_its_staging_place_back() {
        vips::init(false).expect("libvips");
        let pool = PoolConfig {
            queue_size: 10,
            staged: 1,
            ..PoolConfig::with_concurrency(1)
        };
        let p = Arc::new(Processor::new(pool, DecodeLimits::default()));
        let avif_busy = p
            .avif_permits
            .clone()
            .acquire_owned()
            .await
            .expect("avif slot");
        let only = p.stage().await.expect("the only place");
        let render = {
            let p = p.clone();
            let admission = p.admit(Format::Avif).expect("admitted");
            let original = Bytes::from(crate::image::fixtures::jpeg(64, 48, 85));
            let avif = RenderSpec {
                format: Format::Avif,
                ..spec()
            };
            tokio::spawn(async move {
                p.render_admitted(admission, Some(only), original, avif, &|| true)
                    .await
            })
        };
        // Completes only if the AVIF render, stuck behind `avif_busy`, let its place go.
        let place = tokio::time::timeout(Duration::from_secs(10), p.stage())
            .await
            .expect("the AVIF waiter gives its place back")
            .expect("place");
        assert!(
            !render.is_finished(),
            "the AVIF render still waits for its pool"
        );
        drop((place, avif_busy));
        let rendered = render.await.expect("task").expect("render");
        assert_eq!((rendered.format, rendered.width), (Format::Avif, 8));
    }

    /// AVIF requests queue on their own: a full AVIF queue refuses AVIF only, and the shared queue
    /// stays open to every other format.
    #[test]
    fn avif_has_its_own_queue() {
        let pool = PoolConfig {
            queue_size: 2,
            avif_queue_size: 1,
            ..PoolConfig::with_concurrency(1)
        };
        let p = Processor::new(pool, DecodeLimits::default());
        // avif_concurrency 1 + avif_queue_size 1.
        let a = p.admit(Format::Avif).expect("first AVIF");
        let b = p.admit(Format::Avif).expect("second AVIF");
        assert_eq!(
            p.admit(Format::Avif).map(|_| ()),
            Err(ImageError::Overloaded)
        );
        // concurrency 1 + queue_size 2, untouched by the AVIF waiters.
        let jpegs: Vec<_> = (0..3)
            .map(|_| p.admit(Format::Jpeg).expect("JPEG admitted"))
            .collect();
        assert_eq!(
            p.admit(Format::Webp).map(|_| ()),
            Err(ImageError::Overloaded)
        );
        assert_eq!(p.queue_depth(), 5);
        drop((a, b, jpegs));
        assert_eq!(p.queue_depth(), 0);
    }

    /// A render whose estimate exceeds the whole memory budget is refused before it takes a slot;
    /// one within it reserves its estimate while it runs and gives it back.
    #[tokio::test]
    async fn the_memory_budget_refuses_what_can_never_fit() {
        vips::init(false).expect("libvips");
        let pool = PoolConfig {
            memory_bytes: 4 << 20,
            ..PoolConfig::with_concurrency(1)
        };
        let p = Processor::new(pool, DecodeLimits::default());
        // 2000x2000 at full size: 12 MB of RGB alone.
        let big = Bytes::from(crate::image::fixtures::jpeg(2000, 2000, 80));
        let full = RenderSpec {
            version: crate::request::Version::FullSize,
            ..spec()
        };
        assert_eq!(
            p.render(big.clone(), full).await.map(|_| ()),
            Err(ImageError::OverMemoryBudget)
        );
        assert_eq!(p.total(), 0, "refused without a slot");
        // w8 decodes at 1/8: 250x250, well within 4 MB.
        let small = p.render(big, spec()).await.expect("fits");
        assert_eq!(small.width, 8);
        assert_eq!(p.memory_reserved(), 0, "the reservation is given back");
    }
}
