//! The libvips wrappers: the ONLY file in the crate that calls libvips (through `rs-vips` 0.7.0,
//! against the system libvips 8.14.1). [`super::render`] composes them into one render.
//!
//! `main` calls [`init`] once before the tokio runtime starts (it also blocks every loader but the
//! allowed ones, libvips' own second line behind `sniff`); `/health` calls [`self_test`];
//! [`inspect`] reads a header without decoding pixels, for the cost estimate and the limits. The
//! rest opens originals in place (shrink-on-load), evaluates under the render deadline
//! (`evaluate`), reads a lazy image into one buffer (`WholeImage`), resizes, converts colour,
//! strips metadata and encodes.
//!
//! Errors: a libvips failure while reading the header or pixels is [`ImageError::Undecodable`], one in
//! processing or the encoder is [`ImageError::Internal`]. The libvips error buffer is cleared after
//! every failure and its text is only ever logged, never matched.

#[cfg(test)]
use std::cell::Cell;
use std::ffi::{CStr, CString};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use rs_vips::bindings;
use rs_vips::enums::{BandFormat, Interpretation};
use rs_vips::voption::{Setter, VOption};
use rs_vips::{Vips, VipsImage, VipsSource};

use super::cost::Inspection;
use super::geometry::{CropBox, Size};
use super::markers;
use super::{Deadline, DecodeLimits, ImageError, RenderSpec};
use crate::request::Format;

/// The libvips loader classes that stay usable after `VipsForeignLoad` is blocked: exactly the formats
/// docs/urls.md lists as inputs. Unblocking a class unblocks its file/buffer/source subclasses.
const ALLOWED_LOADERS: [&str; 4] = [
    "VipsForeignLoadJpeg",
    "VipsForeignLoadPng",
    "VipsForeignLoadWebp",
    // libvips 8.14 loads GIF with libnsgif.
    "VipsForeignLoadNsgif",
];

/// The HEIF/AVIF loader class, unblocked only for `accept_avif_input`.
const HEIF_LOADER: &str = "VipsForeignLoadHeif";

/// Metadata field name prefixes removed before every save (the libvips 8.14.1 `webpsave` ignores
/// `strip`, so the encoder cannot be trusted to drop them). `orientation` must go too: the pixels are
/// already upright, and a left-over tag would make viewers rotate them a second time.
const METADATA_PREFIXES: [&str; 5] = ["exif-", "xmp", "iptc", "icc", "orientation"];

static INIT: OnceLock<Result<(), ImageError>> = OnceLock::new();
/// Serialises changes to the process-global loader block list.
static BLOCK_LOCK: Mutex<()> = Mutex::new(());
static HEIF_UNBLOCKED: AtomicBool = AtomicBool::new(false);
pub(super) static DECODES: AtomicU64 = AtomicU64::new(0);

#[cfg(test)]
thread_local! {
    /// Per-thread twin of [`DECODES`]: unit tests run in parallel threads, and a test proving that a
    /// bomb is never decoded must not see the decodes of its neighbours.
    pub(super) static THREAD_DECODES: Cell<u64> = const { Cell::new(0) };
    /// JPEG decodes on this thread that [`jpeg::decode`] did instead of libvips' loader: tests check
    /// the direct path is really the one taken.
    pub(super) static THREAD_DIRECT_JPEG: Cell<u64> = const { Cell::new(0) };
}

/// Starts libvips once per process, before the tokio runtime: `vips_init`, one libvips worker thread
/// per operation (the parallelism is our pool's, not libvips'), the operation cache off
/// (every request is different, and the cache would pin originals in memory), untrusted operations
/// blocked, and every loader blocked except JPEG, PNG, WebP and GIF (plus HEIF/AVIF when
/// `accept_avif_input`).
///
/// Idempotent. A later call with `accept_avif_input = true` unblocks the HEIF loaders; nothing is
/// re-blocked (loaders are only ever widened, so concurrent renders never see a loader vanish).
pub fn init(accept_avif_input: bool) -> Result<(), ImageError> {
    INIT.get_or_init(start).clone()?;
    if accept_avif_input && !HEIF_UNBLOCKED.load(Ordering::Acquire) {
        let _guard = BLOCK_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        block_set(HEIF_LOADER, false);
        HEIF_UNBLOCKED.store(true, Ordering::Release);
    }
    Ok(())
}

pub(super) fn start() -> Result<(), ImageError> {
    if let Err(e) = Vips::init("image-server") {
        let message = e.to_string();
        Vips::error_clear();
        return Err(ImageError::Internal(format!("libvips init: {message}")));
    }
    Vips::concurrency_set(1);
    Vips::cache_set_max(0);
    Vips::cache_set_max_mem(0);
    Vips::cache_set_max_files(0);
    let _guard = BLOCK_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: plain setter on a process-global flag; libvips is initialised.
    unsafe { bindings::vips_block_untrusted_set(1) };
    block_set("VipsForeignLoad", true);
    for loader in ALLOWED_LOADERS {
        block_set(loader, false);
    }
    Ok(())
}

pub(super) fn block_set(name: &str, blocked: bool) {
    let Ok(name) = CString::new(name) else {
        return;
    };
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call; libvips is initialised.
    unsafe { bindings::vips_operation_block_set(name.as_ptr(), i32::from(blocked)) };
}

/// Makes every entry point safe to call even if `main` forgot [`init`]: libvips is started with the
/// default (AVIF input off) policy rather than used uninitialised.
pub(super) fn ensure_init() -> Result<(), ImageError> {
    INIT.get_or_init(start).clone()
}

/// The libvips version, e.g. `"8.14.1"`.
pub fn version() -> String {
    // SAFETY: vips_version only reads compile-time constants.
    let (major, minor, micro) = unsafe {
        (
            bindings::vips_version(0),
            bindings::vips_version(1),
            bindings::vips_version(2),
        )
    };
    format!("{major}.{minor}.{micro}")
}

/// A tiny end-to-end libvips operation for `/health`: build a 2×2 image and encode it as PNG.
pub fn self_test() -> Result<(), ImageError> {
    ensure_init()?;
    let png = VipsImage::black(2, 2)
        .and_then(|i| i.pngsave_buffer())
        .map_err(internal)?;
    if png.starts_with(b"\x89PNG\r\n\x1a\n") {
        Ok(())
    } else {
        Err(ImageError::Internal("self test: not a PNG".into()))
    }
}

/// How many pixel decodes [`super::render::render`] has started since start-up. Incremented after the header checks
/// pass and right before the pixels are decoded, so a refused bomb never counts.
pub fn decodes_started() -> u64 {
    DECODES.load(Ordering::Relaxed)
}

/// Counts one pixel decode (see [`decodes_started`]); the render calls it once its checks pass.
pub(super) fn count_decode() {
    DECODES.fetch_add(1, Ordering::Relaxed);
    #[cfg(test)]
    THREAD_DECODES.with(|c| c.set(c.get() + 1));
}

/// Header facts of an original, read without decoding pixels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The original's format (HEIF and AVIF input both map to [`Format::Avif`]).
    pub format: Format,
    /// Width as stored (before EXIF orientation).
    pub width: u32,
    /// Height as stored (of one frame, for animations).
    pub height: u32,
    /// Frames (1 for still images).
    pub pages: u32,
}

/// The loaders we call, picked from the bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Jpeg,
    Png,
    Webp,
    Gif,
    Heif,
}

impl Kind {
    fn format(self) -> Format {
        match self {
            Kind::Jpeg => Format::Jpeg,
            Kind::Png => Format::Png,
            Kind::Webp => Format::Webp,
            Kind::Gif => Format::Gif,
            Kind::Heif => Format::Avif,
        }
    }
}

/// HEIF `ftyp` brands we hand to libheif: AVIF stills and sequences, HEVC stills and sequences, and the
/// generic HEIF image/sequence brands.
const HEIF_BRANDS: [&[u8; 4]; 10] = [
    b"avif", b"avis", b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1",
];

/// Picks the loader from the magic number (never from a name or a Content-Type).
pub(super) fn sniff(b: &[u8]) -> Option<Kind> {
    if b.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some(Kind::Jpeg)
    } else if b.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some(Kind::Png)
    } else if b.starts_with(b"GIF87a") || b.starts_with(b"GIF89a") {
        Some(Kind::Gif)
    } else if b.len() >= 12 && &b[..4] == b"RIFF" && &b[8..12] == b"WEBP" {
        Some(Kind::Webp)
    } else if is_heif(b) {
        Some(Kind::Heif)
    } else {
        None
    }
}

/// The format of an image from its magic number alone (pure Rust, no libvips call): what an upload
/// is checked against before anything decodes it. HEIF and AVIF are both reported as AVIF.
pub fn detect_format(b: &[u8]) -> Option<Format> {
    sniff(b).map(Kind::format)
}

/// An ISO-BMFF `ftyp` box whose major or compatible brands name a HEIF/AVIF flavour.
pub(super) fn is_heif(b: &[u8]) -> bool {
    if b.len() < 16 || &b[4..8] != b"ftyp" {
        return false;
    }
    let declared = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
    let end = declared.clamp(16, b.len()).min(256);
    // Major brand at 8..12, minor version at 12..16, compatible brands from 16 on.
    std::iter::once(&b[8..12])
        .chain(b[16..end].chunks_exact(4))
        .any(|brand| HEIF_BRANDS.iter().any(|h| h.as_slice() == brand))
}

/// Whether `kind` may be loaded under `limits` and the libvips block list.
pub(super) fn allowed(kind: Kind, limits: &DecodeLimits) -> bool {
    kind != Kind::Heif || (limits.accept_avif_input && HEIF_UNBLOCKED.load(Ordering::Acquire))
}

/// What a load asks of the decoder beyond the defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Reduce {
    None,
    JpegShrink(u32),
    WebpScale(f64),
}

/// Opens `bytes` with the loader for `kind`. libvips loaders are lazy: this parses the header only;
/// the pixels are decoded when something downstream first asks for them.
///
/// The loader reads `bytes` in place through a memory `VipsSource`: the `_buffer` loaders of rs-vips
/// copy the whole original into a fresh allocation on every call (2 MB and ~500 page faults for a
/// typical photo, twice per render), which measured ~3 % of a render's CPU.
///
/// # Safety
///
/// The returned image, and every image derived from it, reads `bytes` without holding a borrow: they
/// must all be dropped before `bytes` is. [`probe`] and [`render`] keep every image local and return
/// only owned data.
pub(super) unsafe fn load(
    kind: Kind,
    bytes: &[u8],
    reduce: Reduce,
) -> Result<VipsImage, ImageError> {
    let source = VipsSource::new_from_memory(bytes).map_err(undecodable)?;
    let options = VOption::new()
        .set("access", "sequential")
        // A warning (truncated scan, bad CRC, …) aborts the decode: better a 422 than a grey image.
        .set("fail_on", "warning");
    // The loader takes its own reference to `source`; dropping ours at the end is fine.
    let result = match kind {
        Kind::Jpeg => {
            let shrink = match reduce {
                Reduce::JpegShrink(s) => i32::try_from(s).unwrap_or(1),
                _ => 1,
            };
            VipsImage::jpegload_source_with_opts(&source, options.set("shrink", shrink))
        }
        Kind::Png => VipsImage::pngload_source_with_opts(&source, options),
        Kind::Webp => {
            let options = options.set("n", 1);
            match reduce {
                Reduce::WebpScale(s) => {
                    VipsImage::webpload_source_with_opts(&source, options.set("scale", s))
                }
                _ => VipsImage::webpload_source_with_opts(&source, options),
            }
        }
        // First frame only (animations are not rendered); `n-pages` still reports how many there are.
        Kind::Gif => VipsImage::gifload_source_with_opts(&source, options.set("n", 1)),
        Kind::Heif => VipsImage::heifload_source_with_opts(&source, options.set("n", 1)),
    };
    result.map_err(undecodable)
}

pub(super) fn dims(img: &VipsImage) -> Result<Size, ImageError> {
    let w = u32::try_from(img.get_width()).map_err(|_| ImageError::Undecodable)?;
    let h = u32::try_from(img.get_height()).map_err(|_| ImageError::Undecodable)?;
    if w == 0 || h == 0 {
        return Err(ImageError::Undecodable);
    }
    Ok(Size::new(w, h))
}

pub(super) fn header_of(kind: Kind, img: &VipsImage) -> Result<Header, ImageError> {
    let size = dims(img)?;
    Ok(Header {
        format: kind.format(),
        width: size.width,
        height: size.height,
        pages: u32::try_from(img.get_n_pages()).unwrap_or(1).max(1),
    })
}

/// Header facts of an original, read without decoding pixels. Refuses formats we do not load
/// ([`ImageError::UnsupportedFormat`]) and unreadable headers ([`ImageError::Undecodable`]); does not
/// apply the size limits (that is [`super::render::render`]'s job, so callers can see what a bomb claims to be).
pub fn probe(original: &[u8], limits: &DecodeLimits) -> Result<Header, ImageError> {
    ensure_init()?;
    let kind = sniff(original).ok_or(ImageError::UnsupportedFormat)?;
    if !allowed(kind, limits) {
        return Err(ImageError::UnsupportedFormat);
    }
    // SAFETY: `img` is dropped at the end of this function, before `original`.
    let img = unsafe { load(kind, original, Reduce::None)? };
    header_of(kind, &img)
}

/// Everything a render's cost depends on, read without decoding a pixel: the format (refused when
/// we do not load it), a JPEG's markers (refused over `max_jpeg_scans`), the header (refused over the
/// pixel and side limits), the EXIF orientation, bands and sample size. [`super::Processor`] calls it
/// before the render takes a slot, so all of these refusals cost milliseconds and no slot.
pub fn inspect(original: &[u8], limits: &DecodeLimits) -> Result<Inspection, ImageError> {
    ensure_init()?;
    let kind = sniff(original).ok_or(ImageError::UnsupportedFormat)?;
    if !allowed(kind, limits) {
        return Err(ImageError::UnsupportedFormat);
    }
    let jpeg = match kind {
        Kind::Jpeg => Some(jpeg_markers(original, limits)?),
        _ => None,
    };
    // SAFETY: `img` is dropped at the end of this function, before `original`.
    let img = unsafe { load(kind, original, Reduce::None)? };
    let header = header_of(kind, &img)?;
    let stored = Size::new(header.width, header.height);
    check_limits(stored, header.pages, limits)?;
    Ok(Inspection {
        format: header.format,
        stored,
        orientation: orientation_of(kind, &img),
        bands: u32::try_from(img.get_bands()).unwrap_or(4).max(1),
        sample_bytes: match img.get_format() {
            Ok(BandFormat::Uchar | BandFormat::Char) => 1,
            Ok(BandFormat::Ushort | BandFormat::Short) => 2,
            _ => 4,
        },
        jpeg,
    })
}

/// A JPEG's markers, refused with [`ImageError::TooManyScans`] over `max_jpeg_scans`.
pub(super) fn jpeg_markers(
    original: &[u8],
    limits: &DecodeLimits,
) -> Result<markers::Layout, ImageError> {
    markers::walk(original, limits.max_jpeg_scans).map_err(|_| ImageError::TooManyScans)
}

/// The EXIF orientation to apply: libheif applies HEIF's own rotation (irot/imir) while decoding, so
/// any EXIF orientation the container also carries must not be applied a second time.
pub(super) fn orientation_of(kind: Kind, img: &VipsImage) -> u8 {
    match kind {
        Kind::Heif => 1,
        _ => u8::try_from(img.get_orientation()).unwrap_or(1),
    }
}

pub(super) fn check_limits(
    size: Size,
    pages: u32,
    limits: &DecodeLimits,
) -> Result<(), ImageError> {
    let pixels = size.pixels().saturating_mul(u64::from(pages));
    if size.width > limits.max_side || size.height > limits.max_side || pixels > limits.max_pixels {
        return Err(ImageError::SourceTooLarge);
    }
    Ok(())
}

/// Runs one libvips evaluation of `img` (`copy_memory` or an encoder), stopped once `deadline` has
/// passed: [`EvalWatch`] kills it from libvips' `eval` signal, between two strips. A failure after
/// the deadline is [`ImageError::Timeout`]; any other goes through `on_error`.
pub(super) fn evaluate<T>(
    img: &VipsImage,
    deadline: &Deadline,
    run: impl FnOnce(&VipsImage) -> rs_vips::Result<T>,
    on_error: fn(rs_vips::error::Error) -> ImageError,
) -> Result<T, ImageError> {
    if deadline.passed() {
        return Err(ImageError::Timeout);
    }
    let watch = EvalWatch::start(img, deadline);
    let result = run(img);
    drop(watch);
    result.map_err(|e| {
        if deadline.passed() {
            Vips::error_clear();
            ImageError::Timeout
        } else {
            on_error(e)
        }
    })
}

/// The render deadline inside libvips: progress reporting on for `img`, and an `eval` handler that
/// sets the kill flag of the image being evaluated once the deadline has passed.
///
/// libvips emits `eval` on the thread that runs the evaluation, once per finished strip, for the
/// image progress was enabled on and every image made from it afterwards (an encoder's internal
/// copies included). The sink checks the kill flag of the image it evaluates right after the signal,
/// so the call fails within one strip of the deadline; that image is the sink's own and dies with
/// the call, so no flag outlives it. What libvips cannot stop is a single long library call: the AV1
/// and WebP encoders compress the whole frame in one call after the last strip (the AVIF output
/// ceiling bounds those), and WebP and GIF decode a whole frame at once (the pixel limits bound
/// those). The in-memory resample path decodes at most [`RESAMPLE_MAX_PIXELS`], in milliseconds.
pub(super) struct EvalWatch<'a> {
    img: &'a VipsImage,
    handler: std::os::raw::c_ulong,
}

impl<'a> EvalWatch<'a> {
    fn start(img: &'a VipsImage, deadline: &'a Deadline) -> Option<EvalWatch<'a>> {
        deadline.remaining()?;
        type OnEval = unsafe extern "C" fn(
            *mut bindings::VipsImage,
            *mut bindings::VipsProgress,
            bindings::gpointer,
        );
        let on_eval: OnEval = on_eval;
        // SAFETY: `img` is live for the watch's lifetime. GObject calls the handler with the
        // signal's real signature (image, progress, user data), which `on_eval` has; `GCallback` is
        // the type-erased function pointer type GObject takes for every signature. `deadline`
        // outlives the watch, and `Drop` disconnects the handler before either goes away.
        let handler = unsafe {
            let ptr = img.as_mut_ptr();
            bindings::vips_image_set_progress(ptr, 1);
            bindings::g_signal_connect_data(
                ptr.cast(),
                c"eval".as_ptr(),
                Some(std::mem::transmute::<OnEval, unsafe extern "C" fn()>(
                    on_eval,
                )),
                std::ptr::from_ref(deadline).cast_mut().cast(),
                None,
                0,
            )
        };
        (handler != 0).then_some(EvalWatch { img, handler })
    }
}

impl Drop for EvalWatch<'_> {
    fn drop(&mut self) {
        // SAFETY: the handler was connected to this live image by `start` and is disconnected once.
        unsafe {
            bindings::g_signal_handler_disconnect(self.img.as_mut_ptr().cast(), self.handler)
        };
    }
}

/// The `eval` handler of [`EvalWatch`]: kill the evaluated image once the deadline has passed.
unsafe extern "C" fn on_eval(
    _image: *mut bindings::VipsImage,
    progress: *mut bindings::VipsProgress,
    deadline: bindings::gpointer,
) {
    // SAFETY: `deadline` is the `&Deadline` `EvalWatch::start` connected with, alive until the
    // handler is disconnected; `progress` is libvips' record for this evaluation, and its `im` the
    // image being evaluated. Nothing here can unwind.
    unsafe {
        let deadline = &*deadline.cast::<Deadline>();
        if deadline.passed() && !progress.is_null() && !(*progress).im.is_null() {
            bindings::vips_image_set_kill((*progress).im, 1);
        }
    }
}

pub(super) fn to_i32(v: u32) -> Result<i32, ImageError> {
    i32::try_from(v).map_err(|_| ImageError::SourceTooLarge)
}

/// `pixels` (`out`, `bands` interleaved 8-bit bands) as a libvips image labelled `space`, with
/// `like`'s resolution and ICC profile, which is all the colour conversion and encoder read from the
/// header.
pub(super) fn label(
    pixels: &[u8],
    out: Size,
    bands: u8,
    space: &str,
    like: &VipsImage,
) -> Result<VipsImage, ImageError> {
    let fresh = VipsImage::new_from_memory_copy(
        pixels,
        to_i32(out.width)?,
        to_i32(out.height)?,
        i32::from(bands),
        BandFormat::Uchar,
    )
    .map_err(internal)?;
    let mut labelled = fresh
        .copy_with_opts(
            VOption::new()
                .set("interpretation", space)
                .set("xres", like.get_xres())
                .set("yres", like.get_yres()),
        )
        .map_err(internal)?;
    if like.get_typeof(ICC_FIELD).unwrap_or(0) != 0 {
        let icc = like.get_blob(ICC_FIELD).map_err(internal)?;
        labelled.set_blob_copy(ICC_FIELD, &icc).map_err(internal)?;
    }
    Ok(labelled)
}

/// Every pixel of an 8-bit image, computed on the calling thread into one libvips region that covers
/// the whole image.
///
/// For a lazy image straight from a loader this *is* the decode, without `copy_memory`'s detour:
/// that runs the pipeline on a libvips worker thread strip by strip (a thread hand-off and a
/// semaphore round trip per strip) and then copies each strip into the memory image. For an image
/// already in memory the region just points into it.
pub(super) struct WholeImage {
    region: *mut bindings::VipsRegion,
    len: usize,
}

impl WholeImage {
    /// Prepares the region. A failure is [`ImageError::Undecodable`]: for a lazy image it is the
    /// decoder failing on the original.
    pub(super) fn prepare(
        img: &VipsImage,
        size: Size,
        bands: u8,
    ) -> Result<WholeImage, ImageError> {
        let row = usize::try_from(size.width)
            .ok()
            .and_then(|w| w.checked_mul(usize::from(bands)))
            .ok_or_else(|| resample_failed("image size"))?;
        let len = usize::try_from(size.height)
            .ok()
            .and_then(|h| h.checked_mul(row))
            .ok_or_else(|| resample_failed("image size"))?;
        let rect = bindings::VipsRect {
            left: 0,
            top: 0,
            width: to_i32(size.width)?,
            height: to_i32(size.height)?,
        };
        // SAFETY: `img` is a live image for the whole call. The region holds its own reference to
        // it, and `WholeImage` owns the region (one reference, dropped in `Drop`).
        let whole = unsafe {
            let region = bindings::vips_region_new(img.as_mut_ptr());
            if region.is_null() {
                Vips::error_clear();
                return Err(ImageError::Undecodable);
            }
            WholeImage { region, len }
        };
        // SAFETY: `whole.region` is the valid region made above; `rect` outlives the call.
        let prepared = unsafe { bindings::vips_region_prepare(whole.region, &rect) };
        if prepared != 0 {
            Vips::error_clear();
            return Err(ImageError::Undecodable);
        }
        // SAFETY: the region is valid; these are plain fields libvips set while preparing it.
        let (valid, bpl, data) = unsafe {
            let r = &*whole.region;
            (r.valid, r.bpl, r.data)
        };
        let covers = valid.left == 0
            && valid.top == 0
            && valid.width == rect.width
            && valid.height == rect.height;
        // Rows must be back to back for one slice to hold the image: true of a region that spans
        // the full width, whether it owns a buffer or points into a memory image.
        if !covers || data.is_null() || usize::try_from(bpl).ok() != Some(row) {
            return Err(resample_failed("region does not hold the whole image"));
        }
        Ok(whole)
    }

    pub(super) fn data(&self) -> &[u8] {
        // SAFETY: `prepare` checked that the region's pixels start at `data` and are `len` bytes
        // (height rows of exactly `row` bytes, the whole image); the region, and with it the
        // buffer, lives as long as `self`, and nothing writes to it meanwhile.
        unsafe { std::slice::from_raw_parts((*self.region).data.cast_const(), self.len) }
    }
}

impl Drop for WholeImage {
    fn drop(&mut self) {
        // SAFETY: `self.region` is the one reference `prepare` took; it is not used after this.
        unsafe { bindings::g_object_unref(self.region.cast()) };
    }
}

/// The `c` window of `img`.
pub(super) fn cut(img: &VipsImage, c: CropBox) -> Result<VipsImage, ImageError> {
    img.extract_area(
        to_i32(c.left)?,
        to_i32(c.top)?,
        to_i32(c.width)?,
        to_i32(c.height)?,
    )
    .map_err(internal)
}

pub(super) fn resample_failed(what: &str) -> ImageError {
    ImageError::Internal(format!("resample: {what}"))
}

/// The header field holding an embedded ICC profile.
pub(super) const ICC_FIELD: &str = "icc-profile-data";

/// The resampling kernel of libvips' resize, used where [`resample`] is not: lanczos3, the kernel
/// [`resample`] uses, so a 16-bit PNG and an 8-bit one look alike.
pub(super) const RESIZE_KERNEL: &str = "lanczos3";

/// Resizes `img` to exactly `target` (stored orientation), premultiplying alpha meanwhile so
/// transparent pixels' colour does not bleed into the visible edge.
pub(super) fn resize_exact(img: &VipsImage, target: Size) -> Result<VipsImage, ImageError> {
    let have = dims(img)?;
    if have == target {
        return Ok(img.clone());
    }
    let hscale = f64::from(target.width) / f64::from(have.width);
    let vscale = f64::from(target.height) / f64::from(have.height);
    let alpha = img.hasalpha();
    let format = img.get_format().map_err(internal)?;
    let src = if alpha {
        img.premultiply().map_err(internal)?
    } else {
        img.clone()
    };
    let mut out = src
        .resize_with_opts(
            hscale,
            VOption::new()
                .set("vscale", vscale)
                .set("kernel", RESIZE_KERNEL),
        )
        .map_err(internal)?;
    if alpha {
        out = out
            .unpremultiply()
            .and_then(|i| i.cast(format))
            .map_err(internal)?;
    }
    let got = dims(&out)?;
    if got == target {
        Ok(out)
    } else if got.width >= target.width && got.height >= target.height {
        // libvips rounds its output size; should it ever land a pixel long, trim rather than fail.
        out.extract_area(0, 0, to_i32(target.width)?, to_i32(target.height)?)
            .map_err(internal)
    } else {
        Err(ImageError::Internal(format!(
            "resize: got {}x{}, wanted {}x{}",
            got.width, got.height, target.width, target.height
        )))
    }
}

/// Converts to 8-bit sRGB (or 8-bit greyscale when `keep_grey` and the image is grey): an embedded
/// ICC profile is honoured; CMYK without one uses libvips' built-in CMYK profile.
pub(super) fn to_srgb8(img: VipsImage, keep_grey: bool) -> Result<VipsImage, ImageError> {
    let mut img = img;
    let mut converted = false;
    if img.get_typeof(ICC_FIELD).unwrap_or(0) != 0 {
        match img.icc_transform_with_opts(
            "srgb",
            VOption::new()
                .set("embedded", true)
                .set("intent", "perceptual")
                .set("depth", 8),
        ) {
            Ok(i) => {
                img = i;
                converted = true;
            }
            // A broken or mismatched profile is not worth a 422: fall back to the plain conversion.
            Err(_) => Vips::error_clear(),
        }
    }
    if !converted {
        let interpretation = img.get_interpretation().map_err(internal)?;
        let grey = matches!(interpretation, Interpretation::BW | Interpretation::Grey16);
        let space = if grey && keep_grey {
            Interpretation::BW
        } else {
            Interpretation::Srgb
        };
        let format = img.get_format().map_err(internal)?;
        let already = interpretation == space && format == BandFormat::Uchar;
        if !already {
            img = img.colourspace(space).map_err(internal)?;
        }
    }
    if img.get_format().map_err(internal)? != BandFormat::Uchar {
        img = img.cast(BandFormat::Uchar).map_err(internal)?;
    }
    Ok(img)
}

/// Flattens alpha onto `background` (JPEG has no alpha).
pub(super) fn flatten(img: &VipsImage, background: [u8; 3]) -> Result<VipsImage, ImageError> {
    let img = if img.get_bands() < 3 {
        img.colourspace(Interpretation::Srgb).map_err(internal)?
    } else {
        img.clone()
    };
    let bg = background.map(f64::from);
    img.flatten_with_opts(VOption::new().set("background", &bg))
        .and_then(|i| i.cast(BandFormat::Uchar))
        .map_err(internal)
}

/// The names of every metadata field on `img`.
pub(super) fn field_names(img: &VipsImage) -> Vec<String> {
    let mut names = Vec::new();
    // SAFETY: `img` keeps the VipsImage alive for the duration; vips_image_get_fields returns a
    // NULL-terminated, newly allocated array of NUL-terminated strings, freed with g_strfreev.
    unsafe {
        let list = bindings::vips_image_get_fields(img.as_mut_ptr());
        if list.is_null() {
            return names;
        }
        let mut i = 0;
        loop {
            let p = *list.add(i);
            if p.is_null() {
                break;
            }
            names.push(CStr::from_ptr(p).to_string_lossy().into_owned());
            i += 1;
        }
        bindings::g_strfreev(list);
    }
    names
}

/// A copy of `img` without EXIF, XMP, IPTC, ICC, orientation or comment fields. The copy shares the
/// pixels; only the header is new, so this costs nothing but makes every encoder metadata-free even
/// where its `strip` option is broken (libvips 8.14.1 WebP). An image that carries none of them (the
/// usual case after [`resample_upright`], which labels a fresh image) is returned as it is: one
/// libvips operation fewer per render.
pub(super) fn strip_metadata(img: &VipsImage) -> Result<VipsImage, ImageError> {
    let doomed: Vec<String> = field_names(img)
        .into_iter()
        .filter(|name| {
            METADATA_PREFIXES.iter().any(|p| name.starts_with(p)) || name.contains("comment")
        })
        .collect();
    if doomed.is_empty() {
        return Ok(img.clone());
    }
    let mut copy = img.copy().map_err(internal)?;
    for name in doomed {
        // A field that vanished in between is fine: the goal is its absence.
        let _ = copy.remove(&name);
    }
    Ok(copy)
}

pub(super) fn encode(img: &VipsImage, spec: &RenderSpec) -> rs_vips::Result<Vec<u8>> {
    let q = i32::from(spec.quality.clamp(1, 100));
    match spec.format {
        Format::Jpeg => img.jpegsave_buffer_with_opts(
            VOption::new()
                .set("Q", q)
                .set("interlace", spec.progressive)
                .set("optimize_coding", true)
                .set("strip", true),
        ),
        // Lossless; zlib level 6 is the usual size/speed balance.
        Format::Png => {
            img.pngsave_buffer_with_opts(VOption::new().set("compression", 6).set("strip", true))
        }
        Format::Webp => img
            .webpsave_buffer_with_opts(VOption::new().set("Q", q).set("strip", true))
            .map(super::webp::without_metadata),
        // 8.14 defaults AVIF to 12 bits per sample: slower and larger for 8-bit input with no gain.
        Format::Avif => img.heifsave_buffer_with_opts(
            VOption::new()
                .set("compression", "av1")
                .set("Q", q)
                .set("effort", i32::from(spec.avif_effort.min(9)))
                .set("bitdepth", 8)
                .set("strip", true),
        ),
        Format::Gif => img.gifsave_buffer_with_opts(VOption::new().set("strip", true)),
    }
}

/// A libvips failure while reading the original: clear the global error buffer, report 422.
pub(super) fn undecodable(_e: rs_vips::error::Error) -> ImageError {
    Vips::error_clear();
    ImageError::Undecodable
}

/// A libvips failure in processing or encoding: clear the global error buffer, keep the text for logs.
pub(super) fn internal(e: rs_vips::error::Error) -> ImageError {
    let message = e.to_string();
    Vips::error_clear();
    ImageError::Internal(message)
}

#[cfg(test)]
mod tests {
    //! The wrappers on their own; renders are tested in `super::super::render`.

    use super::*;
    use crate::image::fixtures;

    fn setup() {
        init(false).expect("libvips init");
    }

    #[test]
    fn version_and_self_test() {
        setup();
        assert_eq!(version(), "8.14.1");
        self_test().expect("self test");
    }

    #[test]
    fn sniff_magic_numbers() {
        assert_eq!(sniff(b"\xFF\xD8\xFF\xE0rest"), Some(Kind::Jpeg));
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\nrest"), Some(Kind::Png));
        assert_eq!(sniff(b"GIF89a......"), Some(Kind::Gif));
        assert_eq!(sniff(b"RIFF\0\0\0\0WEBPVP8 "), Some(Kind::Webp));
        assert_eq!(
            sniff(b"\0\0\0\x1cftypavif\0\0\0\0avifmif1miaf"),
            Some(Kind::Heif)
        );
        assert_eq!(
            sniff(b"\0\0\0\x18ftypmp42\0\0\0\0isommp42"),
            None,
            "an MP4 is not an image"
        );
        assert_eq!(sniff(b"RIFF\0\0\0\0WAVEfmt "), None);
        assert_eq!(sniff(b""), None);
        assert_eq!(sniff(b"\xFF\xD8"), None);
    }

    #[test]
    fn libvips_level_loader_block_holds() {
        setup();
        // Past our own sniffing, libvips' generic loader must refuse blocked formats too.
        let tiff = {
            let img = VipsImage::black(4, 4).expect("black");
            img.tiffsave_buffer()
                .expect("tiff encodes (savers are not blocked)")
        };
        assert!(VipsImage::new_from_buffer(&tiff, "").is_err());
        Vips::error_clear();
        let svg = br#"<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"/>"#;
        assert!(VipsImage::new_from_buffer(svg, "").is_err());
        Vips::error_clear();
        // The allowed ones still load through the generic path.
        assert!(VipsImage::new_from_buffer(&fixtures::gif(4, 4), "").is_ok());
    }
}
