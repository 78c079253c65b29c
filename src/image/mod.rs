//! Step 3c of the request flow: rendering, off the async runtime.
//!
//! Owns the processing pool: renders run on tokio's blocking threads, each within the bounds of
//! [`crate::budget`] (queue places, slots, AVIF slots, memory), refused with
//! [`ImageError::Overloaded`] (503) when the queue is full instead of queueing without bound. One
//! render is [`render`]; the libvips calls live in [`vips`] (the only file that touches libvips);
//! the pure size arithmetic in [`geometry`]; the SIMD resize of decoded 8-bit pixels in [`resample`].

pub mod cost;
#[cfg(any(test, feature = "test-support"))]
pub mod fixtures;
pub mod geometry;
mod group;
mod idle;
pub mod jpeg;
pub mod markers;
pub mod render;
pub mod resample;
pub mod shared;
pub mod vips;
pub mod webp;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::budget::{BudgetError, Budgets, Ticket};
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

impl From<BudgetError> for ImageError {
    fn from(e: BudgetError) -> ImageError {
        match e {
            BudgetError::Overloaded => ImageError::Overloaded,
            BudgetError::OverMemory => ImageError::OverMemoryBudget,
        }
    }
}

/// A batch's versions sorted by [`Processor::batch`].
struct Batch {
    /// Per version: its refusal, or `None` while it is still to render.
    results: Vec<Option<Result<Rendered, ImageError>>>,
    /// The indexes of the versions to render.
    wanted: Vec<usize>,
    /// The largest memory estimate among them.
    bytes: u64,
}

impl Batch {
    /// The render of the wanted versions from one decode where they allow it, to run on a render
    /// thread; `held` (slot, memory) is released when it ends.
    fn job<H: Send + 'static>(
        &self,
        held: H,
        original: Bytes,
        specs: &[RenderSpec],
        limits: DecodeLimits,
        timeout: Duration,
        inspection: cost::Inspection,
    ) -> impl FnOnce() -> (Vec<Result<Rendered, ImageError>>, u64) + Send + 'static {
        let chosen: Vec<RenderSpec> = self.wanted.iter().map(|&i| specs[i].clone()).collect();
        let deadline = Deadline::after(timeout);
        move || {
            let _held = held;
            let done =
                shared::render_shared(&original, &chosen, &limits, &deadline, &inspection, None);
            (done.results, done.decodes)
        }
    }

    /// Every version's result in order: the refusals, and `rendered` for the wanted ones.
    fn merge(
        self,
        rendered: Vec<Result<Rendered, ImageError>>,
    ) -> Vec<Result<Rendered, ImageError>> {
        let mut results = self.results;
        for (i, result) in self.wanted.into_iter().zip(rendered) {
            results[i] = Some(result);
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or(Err(ImageError::Internal("not rendered".into()))))
            .collect()
    }
}

/// The render pool: renders on tokio's blocking threads, within the [`Budgets`].
#[derive(Debug)]
pub struct Processor {
    budgets: Arc<Budgets>,
    limits: DecodeLimits,
    render_timeout: Duration,
    max_avif_pixels: u64,
    total: AtomicU64,
    abandoned: AtomicU64,
    /// Renders of one original waiting together, for one decode.
    groups: Arc<group::Groups>,
    /// Decode passes (a group of versions sharing one decode is one).
    decodes: AtomicU64,
    /// Versions rendered from another version's decode.
    shared: AtomicU64,
}

impl Processor {
    /// A pool working within `budgets`, refusing originals beyond `limits`, stopping each render
    /// `render_timeout` after it got its slot, refusing AVIF outputs over `max_avif_pixels`.
    pub fn new(
        budgets: Arc<Budgets>,
        limits: DecodeLimits,
        render_timeout: Duration,
        max_avif_pixels: u64,
    ) -> Processor {
        Processor {
            budgets,
            limits,
            render_timeout,
            max_avif_pixels,
            total: AtomicU64::new(0),
            abandoned: AtomicU64::new(0),
            groups: Arc::default(),
            decodes: AtomicU64::new(0),
            shared: AtomicU64::new(0),
        }
    }

    /// Renders `original` to `spec` on a blocking thread, waiting for a slot if the pool is busy and
    /// refusing at once when the queue is full. Dropping the future releases its place.
    pub async fn render(&self, original: Bytes, spec: RenderSpec) -> Result<Rendered, ImageError> {
        let ticket = self.budgets.admit(spec.format)?;
        self.render_admitted(ticket, original, spec, &|| true, false)
            .await
    }

    /// What a render of `original` would start from, read on a blocking thread without a slot and
    /// without decoding a pixel: its format, upright size (EXIF orientation applied), and the
    /// refusals of [`vips::inspect`] (a format we do not load, a header over the pixel or side
    /// limits, too many JPEG scans).
    pub async fn inspect_upright(
        &self,
        original: Bytes,
    ) -> Result<(Format, geometry::Size), ImageError> {
        let limits = self.limits();
        let inspection = tokio::task::spawn_blocking(move || vips::inspect(&original, &limits))
            .await
            .map_err(|e| ImageError::Internal(format!("inspect task: {e}")))??;
        let upright = if geometry::swaps_sides(inspection.orientation) {
            inspection.stored.transposed()
        } else {
            inspection.stored
        };
        Ok((inspection.format, upright))
    }

    /// Renders with a `ticket` taken earlier from [`Budgets::admit`] (and staged, when the original
    /// was fetched under it). `company`: other versions of this original are being asked for right
    /// now, so a group it leads is likely to gain members while it decodes.
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
    /// Before all of it, a render of an original whose group is open joins it (`group`) and waits
    /// for its result from the group's leader instead; a leader renders its members' versions with
    /// its own, from one decode ([`shared`]).
    ///
    /// The slot and the reservation move into the blocking task: if the requester goes away after
    /// the render started it still runs (to its deadline at most) and only then frees them, so the
    /// pool and memory bounds stay true.
    pub async fn render_admitted(
        &self,
        mut ticket: Ticket,
        original: Bytes,
        spec: RenderSpec,
        wanted: &(dyn Fn() -> bool + Sync),
        company: bool,
    ) -> Result<Rendered, ImageError> {
        let limits = self.limits;
        // Another version of this original already on its way to a slot: share its decode. Joined
        // before anything else, so the versions a page asks for at once (woken together by the
        // one download of their original) find each other.
        let lease = if spec.format == Format::Avif {
            None
        } else {
            match self.groups.join(&original, &spec) {
                group::Role::Leader(lease) => Some(lease),
                group::Role::Member(rx) => match rx.await {
                    Ok(result) => return result,
                    // The leader went away, or could not take this version: render alone.
                    Err(_) => None,
                },
            }
        };
        let inspection = self.inspect(&original).await?;
        let cost = cost::estimate(&inspection, &spec, self.max_avif_pixels)?;
        let budgets = &self.budgets;
        let _avif = if spec.format == Format::Avif {
            ticket.unstage();
            Some(budgets.avif_slot().await)
        } else {
            None
        };
        let reserved = budgets.reserve(cost.bytes).await?;
        let slot = budgets.slot().await;
        ticket.unstage();
        let members = match lease.as_ref().map(group::Lease::take) {
            Some(members) if !members.is_empty() => {
                self.admit_members(members, &inspection, cost.bytes).await
            }
            _ => (Vec::new(), None),
        };
        let (members, extra) = members;
        if !wanted() && members.is_empty() {
            self.abandoned.fetch_add(1, Ordering::Relaxed);
            return Err(ImageError::Abandoned);
        }
        self.total.fetch_add(1, Ordering::Relaxed);
        let deadline = Deadline::after(self.render_timeout);
        let handle = tokio::task::spawn_blocking(move || {
            let _held = (slot, reserved, extra);
            let Some(mut lease) = lease else {
                let result =
                    render::render_within(&original, &spec, &limits, &deadline, &inspection);
                return (result, 1, 0);
            };
            let (txs, mut specs): (Vec<_>, Vec<_>) =
                members.into_iter().map(|m| (m.tx, m.spec)).unzip();
            specs.insert(0, spec);
            let shared = txs.len() as u64;
            let mut late = || lease.take_more_or_close();
            let group = shared::Delivery {
                members: txs,
                late: &mut late,
                company,
            };
            let mut done = shared::render_shared(
                &original,
                &specs,
                &limits,
                &deadline,
                &inspection,
                Some(group),
            );
            // Whoever joins from here on renders alone.
            drop(lease);
            let own = done.results.remove(0);
            (own, done.decodes, shared + done.late)
        });
        let (result, decodes, shared) = handle
            .await
            .map_err(|e| ImageError::Internal(format!("render task: {e}")))?;
        self.shared.fetch_add(shared, Ordering::Relaxed);
        self.decodes.fetch_add(decodes, Ordering::Relaxed);
        result
    }

    /// The members a leader can render with its own version: each member's own limits are checked
    /// (a refusal is that member's answer), and the memory the largest of them needs beyond the
    /// leader's `reserved` estimate is reserved now. If that cannot be had, the members are let go
    /// (they render alone).
    async fn admit_members(
        &self,
        members: Vec<group::Member>,
        inspection: &cost::Inspection,
        reserved: u64,
    ) -> (Vec<group::Member>, Option<crate::budget::Reserved>) {
        let mut extra = 0;
        let mut kept = Vec::with_capacity(members.len());
        for m in members {
            match cost::estimate(inspection, &m.spec, self.max_avif_pixels) {
                Ok(c) => {
                    extra = extra.max(c.bytes.saturating_sub(reserved));
                    kept.push(m);
                }
                Err(e) => {
                    let _ = m.tx.send(Err(e));
                }
            }
        }
        if extra == 0 || kept.is_empty() {
            return (kept, None);
        }
        match self.budgets.reserve(extra).await {
            Ok(more) => (kept, Some(more)),
            Err(_) => (Vec::new(), None),
        }
    }

    /// Renders several versions of one original with one `ticket` and one slot, sharing one decode
    /// where [`shared`] can (`warm`, which knows every version it wants up front). AVIF is not
    /// taken here: it has its own pool (the result for an AVIF spec is
    /// [`ImageError::UnsupportedFormat`]; callers render AVIF through [`Processor::render`]). The
    /// memory reserved is the largest single estimate: the versions are made one after another.
    pub async fn render_many(
        &self,
        mut ticket: Ticket,
        original: Bytes,
        specs: &[RenderSpec],
    ) -> Result<Vec<Result<Rendered, ImageError>>, ImageError> {
        let inspection = self.inspect(&original).await?;
        let batch = self.batch(&inspection, specs);
        if batch.wanted.is_empty() {
            return Ok(batch.merge(Vec::new()));
        }
        let reserved = self.budgets.reserve(batch.bytes).await?;
        let slot = self.budgets.slot().await;
        ticket.unstage();
        self.total.fetch_add(1, Ordering::Relaxed);
        self.shared
            .fetch_add(batch.wanted.len() as u64 - 1, Ordering::Relaxed);
        let job = batch.job(
            (slot, reserved),
            original,
            specs,
            self.limits,
            self.render_timeout,
            inspection,
        );
        let (rendered, decodes) = tokio::task::spawn_blocking(job)
            .await
            .map_err(|e| ImageError::Internal(format!("render task: {e}")))?;
        self.decodes.fetch_add(decodes, Ordering::Relaxed);
        Ok(batch.merge(rendered))
    }

    /// Decode passes since start-up: one per render, and one per group of versions sharing a
    /// decode.
    pub fn decodes(&self) -> u64 {
        self.decodes.load(Ordering::Relaxed)
    }

    /// Versions rendered from another version's decode since start-up.
    pub fn shared(&self) -> u64 {
        self.shared.load(Ordering::Relaxed)
    }

    /// Renders versions of one original in the background lane, from one decode where they allow
    /// it ([`shared`]), only if the memory the largest of them needs is free right now and no
    /// foreground render is waiting ([`Budgets::try_background`]); `Ok(None)` when not. The render
    /// runs on a thread of its own at idle CPU priority (`idle`), outside the render slots.
    /// AVIF is never rendered in the background (its result is
    /// [`ImageError::UnsupportedFormat`]): its encoder is the slowest by far, and its own pool
    /// belongs to clients. Not counted in [`Processor::total`].
    pub async fn render_background(
        &self,
        original: Bytes,
        specs: &[RenderSpec],
    ) -> Result<Option<Vec<Result<Rendered, ImageError>>>, ImageError> {
        if !self.budgets.idle_for_background() {
            return Ok(None);
        }
        let inspection = self.inspect(&original).await?;
        let batch = self.batch(&inspection, specs);
        if batch.wanted.is_empty() {
            return Ok(Some(batch.merge(Vec::new())));
        }
        let Some(held) = self.budgets.try_background(batch.bytes) else {
            return Ok(None);
        };
        let job = batch.job(
            held,
            original,
            specs,
            self.limits,
            self.render_timeout,
            inspection,
        );
        let (rendered, decodes) = idle::run(job)
            .await
            .map_err(|_| ImageError::Internal("background render thread unavailable".into()))?;
        self.decodes.fetch_add(decodes, Ordering::Relaxed);
        Ok(Some(batch.merge(rendered)))
    }

    /// Sorts the versions of a batch (`warm`, the background lane): AVIF and versions over a limit
    /// get their refusal now, the rest are `wanted`, and `bytes` is the largest of their memory
    /// estimates (they are made one after another from one decode).
    fn batch(&self, inspection: &cost::Inspection, specs: &[RenderSpec]) -> Batch {
        let mut batch = Batch {
            results: vec![None; specs.len()],
            wanted: Vec::new(),
            bytes: 0,
        };
        for (i, spec) in specs.iter().enumerate() {
            if spec.format == Format::Avif {
                batch.results[i] = Some(Err(ImageError::UnsupportedFormat));
                continue;
            }
            match cost::estimate(inspection, spec, self.max_avif_pixels) {
                Ok(cost) => {
                    batch.bytes = batch.bytes.max(cost.bytes);
                    batch.wanted.push(i);
                }
                Err(e) => batch.results[i] = Some(Err(e)),
            }
        }
        batch
    }

    /// The header and (for a JPEG) the marker walk, on a blocking thread, without a slot.
    async fn inspect(&self, original: &Bytes) -> Result<cost::Inspection, ImageError> {
        let limits = self.limits;
        let original = original.clone();
        tokio::task::spawn_blocking(move || vips::inspect(&original, &limits))
            .await
            .map_err(|e| ImageError::Internal(format!("inspect task: {e}")))?
    }

    /// The budgets this pool works within.
    pub fn budgets(&self) -> &Arc<Budgets> {
        &self.budgets
    }

    /// Queued renders dropped unstarted because every requester had gone.
    pub fn abandoned(&self) -> u64 {
        self.abandoned.load(Ordering::Relaxed)
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
    use crate::budget::BudgetConfig;

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

    fn processor(sizes: BudgetConfig) -> Arc<Processor> {
        vips::init(false).expect("libvips");
        Arc::new(Processor::new(
            Arc::new(Budgets::new(sizes)),
            DecodeLimits::default(),
            Duration::from_secs(8),
            2048 * 2048,
        ))
    }

    async fn staged(p: &Processor, format: Format) -> Ticket {
        let mut ticket = p.budgets().admit(format).expect("admitted");
        ticket.stage().await;
        ticket
    }

    /// At most `staged` admitted renders hold (or fetch) an original while the pool is busy; a queued
    /// render keeps its place, and gives it back once it has its slot.
    #[tokio::test]
    async fn staging_places_bound_originals_waiting_for_the_pool() {
        let p = processor(BudgetConfig {
            queue_size: 10,
            staged: 2,
            ..BudgetConfig::with_concurrency(1)
        });
        // The pool's only slot, taken by hand: renders queue behind it.
        let busy = p.budgets().slot().await;
        let a = staged(&p, Format::Jpeg).await;
        let b = staged(&p, Format::Jpeg).await;
        assert!(
            pending(staged(&p, Format::Jpeg)).await,
            "a third original must wait"
        );

        let original = Bytes::from(crate::image::fixtures::jpeg(64, 48, 85));
        let render = {
            let p = p.clone();
            tokio::spawn(async move {
                p.render_admitted(a, original, spec(), &|| true, false)
                    .await
            })
        };
        // Queued behind the busy slot, the render still holds its place.
        assert!(
            pending(staged(&p, Format::Jpeg)).await,
            "a queued render keeps its place"
        );
        drop(busy);
        // Its render starts and gives the place back.
        let c = tokio::time::timeout(Duration::from_secs(10), staged(&p, Format::Jpeg))
            .await
            .expect("a place frees when the render starts");
        let rendered = render.await.expect("task").expect("render");
        assert_eq!(rendered.width, 8);
        drop((b, c));
    }

    /// An AVIF render waiting for the AVIF pool does not keep its staging place, so a queue of AVIF
    /// requests cannot stop the other formats from fetching their originals.
    #[tokio::test]
    async fn avif_waiting_for_its_pool_gives_its_staging_place_back() {
        let p = processor(BudgetConfig {
            queue_size: 10,
            staged: 1,
            ..BudgetConfig::with_concurrency(1)
        });
        let avif_busy = p.budgets().avif_slot().await;
        let only = staged(&p, Format::Avif).await;
        let render = {
            let p = p.clone();
            let original = Bytes::from(crate::image::fixtures::jpeg(64, 48, 85));
            let avif = RenderSpec {
                format: Format::Avif,
                ..spec()
            };
            tokio::spawn(async move {
                p.render_admitted(only, original, avif, &|| true, false)
                    .await
            })
        };
        // Completes only if the AVIF render, stuck behind `avif_busy`, let its place go.
        let place = tokio::time::timeout(Duration::from_secs(10), staged(&p, Format::Jpeg))
            .await
            .expect("the AVIF waiter gives its place back");
        assert!(
            !render.is_finished(),
            "the AVIF render still waits for its pool"
        );
        drop((place, avif_busy));
        let rendered = render.await.expect("task").expect("render");
        assert_eq!((rendered.format, rendered.width), (Format::Avif, 8));
    }

    /// Versions of one original that wait for the pool together share one decode, and each comes
    /// out as its own render would (these share their shrink-on-load factor).
    #[tokio::test]
    async fn concurrent_sizes_of_one_original_share_one_decode() {
        let p = processor(BudgetConfig::with_concurrency(1));
        let original = Bytes::from(crate::image::fixtures::jpeg(1600, 1200, 85));
        let versions = [
            Version::Width(100),
            Version::Width(150),
            Version::Cover {
                width: 120,
                height: 90,
            },
        ];
        // The only slot, held: the three renders gather behind it.
        let busy = p.budgets().slot().await;
        let renders: Vec<_> = versions
            .iter()
            .map(|v| {
                let (p, original) = (p.clone(), original.clone());
                let spec = RenderSpec {
                    version: *v,
                    ..spec()
                };
                tokio::spawn(async move { p.render(original, spec).await })
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        while p.groups.waiting() < versions.len() - 1 {
            assert!(Instant::now() < deadline, "the renders never gathered");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(busy);
        let mut shared = Vec::new();
        for render in renders {
            shared.push(render.await.expect("task").expect("render"));
        }
        assert_eq!((p.decodes(), p.shared()), (1, 2));
        // Each byte for byte as rendered alone, one at a time.
        for (v, got) in versions.iter().zip(&shared) {
            let alone = p
                .render(
                    original.clone(),
                    RenderSpec {
                        version: *v,
                        ..spec()
                    },
                )
                .await
                .expect("alone");
            assert!(alone.bytes == got.bytes, "{v:?}");
        }
        assert_eq!(p.decodes(), 4);
    }

    /// A render whose estimate exceeds the whole memory budget is refused before it takes a slot;
    /// one within it reserves its estimate while it runs and gives it back.
    #[tokio::test]
    async fn the_memory_budget_refuses_what_can_never_fit() {
        let p = processor(BudgetConfig {
            memory_bytes: 4 << 20,
            ..BudgetConfig::with_concurrency(1)
        });
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
        assert_eq!(
            p.budgets().memory_reserved(),
            0,
            "the reservation is given back"
        );
    }
}
