//! Step 3c of the request flow: rendering, off the async runtime.
//!
//! Owns the bounded processing pool (SPEC §8): at most `processing_concurrency` renders run at once on
//! tokio's blocking threads, at most `queue_size` more wait, and beyond that a request is refused with
//! [`ImageError::Overloaded`] (503) instead of queueing without bound; of those waiting, at most
//! `download_concurrency` fetch and hold their original ([`Processor::stage`]). AVIF encodes also take a
//! permit from their own small pool so AVIF traffic cannot starve JPEG traffic. The libvips calls themselves
//! live in [`vips`] (the only file that touches libvips); the pure size arithmetic in [`geometry`]; the
//! SIMD resize of decoded 8-bit pixels in [`resample`].

pub mod geometry;
pub mod jpeg;
pub mod resample;
pub mod vips;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

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

/// Limits checked on the header, before any pixel is decoded (SPEC §9).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeLimits {
    /// `max_source_pixels`: width × height (× frames for animations).
    pub max_pixels: u64,
    /// `max_source_side`: the longer side.
    pub max_side: u32,
    /// `accept_avif_input`: whether HEIF/AVIF originals are loaded.
    pub accept_avif_input: bool,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_pixels: 50_000_000,
            max_side: 16_384,
            accept_avif_input: false,
        }
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
    /// The pool and its queue are full: 503.
    #[error("processing queue full")]
    Overloaded,
    /// libvips failed while resizing or encoding: 500. The detail is logged, never sent.
    #[error("render failed: {0}")]
    Internal(String),
}

/// The bounded processing pool.
#[derive(Debug)]
pub struct Processor {
    permits: Arc<Semaphore>,
    /// Admitted renders that may hold (or be fetching) their original while they wait for the pool;
    /// see [`Processor::stage`].
    staging: Arc<Semaphore>,
    avif_permits: Arc<Semaphore>,
    limits: DecodeLimits,
    /// Renders admitted (running, waiting, or fetching their original); bounded by
    /// `concurrency + queue_size`.
    admitted: Arc<AtomicUsize>,
    capacity: usize,
    concurrency: usize,
    total: AtomicU64,
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
    /// A pool of `concurrency` renders with `queue_size` waiting places, of which at most `staged`
    /// fetch or hold their original at a time, and `avif_concurrency` concurrent AVIF encodes.
    pub fn new(
        concurrency: usize,
        queue_size: usize,
        staged: usize,
        avif_concurrency: usize,
        limits: DecodeLimits,
    ) -> Processor {
        let concurrency = concurrency.max(1);
        Processor {
            permits: Arc::new(Semaphore::new(concurrency)),
            staging: Arc::new(Semaphore::new(staged.max(1))),
            avif_permits: Arc::new(Semaphore::new(avif_concurrency.max(1))),
            limits,
            admitted: Arc::new(AtomicUsize::new(0)),
            capacity: concurrency + queue_size,
            concurrency,
            total: AtomicU64::new(0),
        }
    }

    /// Renders `original` to `spec` on a blocking thread, waiting for a permit if the pool is busy and
    /// refusing at once when the queue is full. Dropping the future releases its place.
    pub async fn render(&self, original: Bytes, spec: RenderSpec) -> Result<Rendered, ImageError> {
        let admission = self.admit()?;
        self.render_admitted(admission, None, original, spec).await
    }

    /// Takes a place in the queue now, or refuses at once when the pool and its queue are full.
    pub fn admit(&self) -> Result<Admission, ImageError> {
        let before = self.admitted.fetch_add(1, Ordering::AcqRel);
        let admission = Admission(self.admitted.clone());
        if before >= self.capacity {
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
    /// was fetched under, given back as soon as the pool has a slot. An AVIF render gives it back
    /// before it waits for its own small pool instead: AVIF requests queued there must not hold every
    /// staging place and so stall the other formats' downloads.
    pub async fn render_admitted(
        &self,
        admission: Admission,
        mut staged: Option<Staged>,
        original: Bytes,
        spec: RenderSpec,
    ) -> Result<Rendered, ImageError> {
        let _admission = admission;
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
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ImageError::Overloaded)?;
        drop(staged);
        self.total.fetch_add(1, Ordering::Relaxed);
        let limits = self.limits;
        // The permit moves into the blocking task: if the client goes away the render still finishes
        // (libvips cannot be interrupted) and only then frees its slot, so the pool bound stays true.
        let handle = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            vips::render(&original, &spec, &limits)
        });
        handle
            .await
            .map_err(|e| ImageError::Internal(format!("render task: {e}")))?
    }

    /// Renders running now.
    pub fn current(&self) -> usize {
        self.concurrency - self.permits.available_permits().min(self.concurrency)
    }

    /// Renders admitted but waiting for a permit.
    pub fn queue_depth(&self) -> usize {
        self.admitted
            .load(Ordering::Acquire)
            .saturating_sub(self.current())
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
            version: crate::request::Version::Width(8),
            format: Format::Jpeg,
            quality: 80,
            gravity: Gravity::Centre,
            enlarge: false,
            background: [255, 255, 255],
            progressive: true,
            avif_effort: 0,
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
        let p = Arc::new(Processor::new(1, 10, 2, 1, DecodeLimits::default()));
        // The pool's only slot, taken by hand: renders queue behind it.
        let busy = p.permits.clone().acquire_owned().await.expect("slot");
        let a = p.stage().await.expect("first place");
        let b = p.stage().await.expect("second place");
        assert!(pending(p.stage()).await, "a third original must wait");

        let original = Bytes::from(vips::fixtures::jpeg(64, 48, 85));
        let render = {
            let p = p.clone();
            let admission = p.admit().expect("admitted");
            tokio::spawn(async move {
                p.render_admitted(admission, Some(a), original, spec())
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
        let p = Arc::new(Processor::new(1, 10, 1, 1, DecodeLimits::default()));
        let avif_busy = p
            .avif_permits
            .clone()
            .acquire_owned()
            .await
            .expect("avif slot");
        let only = p.stage().await.expect("the only place");
        let render = {
            let p = p.clone();
            let admission = p.admit().expect("admitted");
            let original = Bytes::from(vips::fixtures::jpeg(64, 48, 85));
            let avif = RenderSpec {
                format: Format::Avif,
                ..spec()
            };
            tokio::spawn(async move {
                p.render_admitted(admission, Some(only), original, avif)
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
}
