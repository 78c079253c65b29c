//! Step 3c of the request flow: rendering, off the async runtime.
//!
//! Owns the bounded processing pool (SPEC §8): at most `processing_concurrency` renders run at once on
//! tokio's blocking threads, at most `queue_size` more wait, and beyond that a request is refused with
//! [`ImageError::Overloaded`] (503) instead of queueing without bound. AVIF encodes also take a permit
//! from their own small pool so AVIF traffic cannot starve JPEG traffic. The libvips calls themselves
//! live in [`vips`] (the only file that touches libvips); the pure size arithmetic in [`geometry`]; the
//! SIMD resize of decoded 8-bit pixels in [`resample`].

pub mod geometry;
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

impl Processor {
    /// A pool of `concurrency` renders with `queue_size` waiting places and `avif_concurrency`
    /// concurrent AVIF encodes.
    pub fn new(
        concurrency: usize,
        queue_size: usize,
        avif_concurrency: usize,
        limits: DecodeLimits,
    ) -> Processor {
        let concurrency = concurrency.max(1);
        Processor {
            permits: Arc::new(Semaphore::new(concurrency)),
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
        self.render_admitted(admission, original, spec).await
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

    /// Renders with a place taken earlier by [`Processor::admit`].
    pub async fn render_admitted(
        &self,
        admission: Admission,
        original: Bytes,
        spec: RenderSpec,
    ) -> Result<Rendered, ImageError> {
        let _admission = admission;
        let _avif = if spec.format == Format::Avif {
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
