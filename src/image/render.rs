//! Step 3c of the request flow, one render from original bytes to encoded output: the plan and the
//! pixel paths. The libvips calls themselves are in [`super::vips`].
//!
//! [`super::Processor`] calls [`render_within`] on a blocking thread, after [`super::vips::inspect`]
//! has read the header. One render is:
//!
//! 1. **Sniff** the magic number and pick the loader ourselves (JPEG, PNG, WebP, GIF, and HEIF/AVIF only
//!    when `accept_avif_input`); anything else is [`ImageError::UnsupportedFormat`]. libvips' own loader
//!    allow-list, set up in [`super::vips::init`], is the second line of defence.
//! 2. **Header**: open the original lazily (no pixels decoded), read width, height, pages and EXIF
//!    orientation, refuse with [`ImageError::SourceTooLarge`] over `max_source_pixels`/`max_source_side`
//!    (docs/operations.md). Only then is [`super::vips::decodes_started`] incremented.
//! 3. **Decode once**, reading the original in place (a memory `VipsSource`, no copy), shrinking on
//!    load (JPEG `shrink` 1/2/4/8, WebP `scale`), sequential access, `fail_on = warning` so a truncated
//!    file is an error rather than a grey image; first frame only (`n = 1`).
//! 4. **Resize** to the exact size from [`super::geometry::plan`] (alpha premultiplied meanwhile) and
//!    apply the EXIF orientation, then **crop** (centre, or libvips `smartcrop` for attention/entropy).
//!    Usually the decoded image is small (shrink-on-load did most of the work): it is decoded in one
//!    piece on the render thread (a whole-image region, no libvips worker thread), turned upright with
//!    `autorot` when EXIF asks, and resized by [`super::resample`] (SIMD Lanczos3, outside libvips)
//!    with a centre crop folded into the same pass. A 1- or 3-component JPEG skips libvips' loader
//!    (and `autorot`) for the pixels: [`super::jpeg`] calls the same libjpeg-turbo with the same
//!    settings, only for the columns the crop keeps when it is stored upright, and
//!    [`super::resample::upright`] turns it otherwise (tests hold the output byte-identical). Large
//!    decodes, 16-bit images and unusual colour spaces use libvips' `resize` (lanczos3 too) instead,
//!    streaming from the decoder, with `autorot` after the resize, where it touches the fewest pixels.
//! 5. **Colour**: embedded ICC profile → sRGB, CMYK/16-bit → 8-bit sRGB; alpha flattened onto the
//!    background for JPEG only.
//! 6. **Strip** every metadata field by hand as well as asking the encoder to, then **encode** once.
//!    libvips 8.14.1 `webpsave` ignores `strip` and even writes an EXIF chunk of its own, so WebP
//!    output is also cleaned at the RIFF level ([`super::webp`]).
//!
//! Greyscale originals stay one-band greyscale for JPEG and PNG (smaller, and every viewer shows it the
//! same) and become sRGB for WebP, AVIF and GIF, whose encoders want colour input.
//!
//! Errors: a libvips failure while reading the header or pixels is [`ImageError::Undecodable`], one in
//! processing or the encoder is [`ImageError::Internal`]. libvips is lazy, so to tell them apart the processed image is
//! pulled into memory before the encoder runs (it is at most the output size, a few MB); only huge
//! JPEG/PNG outputs (over [`STREAM_ABOVE_PIXELS`]) stream straight from the decoder into the encoder,
//! and there a failure is reported as `Undecodable`, by far the likelier cause. The libvips error
//! buffer is cleared after every failure and its text is only ever logged, never matched.

use bytes::Bytes;
use rs_vips::enums::{BandFormat, Interpretation};
use rs_vips::voption::{Setter, VOption};
use rs_vips::VipsImage;

use super::cost::Inspection;
use super::geometry::{self, CropBox, Size};
use super::jpeg::{self, JpegError};
use super::resample::{self, Pixels, Window};
#[cfg(test)]
use super::vips::THREAD_DIRECT_JPEG;
use super::vips::{
    allowed, check_limits, count_decode, cut, dims, encode, ensure_init, evaluate, flatten,
    header_of, internal, jpeg_markers, label, load, orientation_of, resample_failed, resize_exact,
    sniff, strip_metadata, to_i32, to_srgb8, undecodable, Kind, Reduce, WholeImage,
};
use super::{Deadline, DecodeLimits, Gravity, ImageError, RenderSpec, Rendered};
use crate::request::Format;

/// Outputs larger than this many pixels, in a format whose encoder streams (JPEG, PNG), are encoded
/// straight from the lazy pipeline instead of being materialised first: 16 MP × 4 bands = 64 MB is the
/// most one render holds for the sake of precise error classification. Every version up to the
/// 2048×2048 request limit stays below it; only `full_size` of a big original goes above. (A sideways
/// EXIF orientation or a smart crop needs the resized image in memory regardless: rotation and
/// attention scoring read it out of order. WebP, AVIF and GIF encoders hold the whole image anyway.)
pub const STREAM_ABOVE_PIXELS: u64 = 1 << 24;

/// Renders one variant: probe and limit checks, then one decode with shrink-on-load, EXIF orientation,
/// resize, crop, sRGB conversion, alpha handling, metadata stripping and one encode.
///
/// The intermediate (resized, before crop) and output sizes are held to the same
/// `max_source_side`/`max_source_pixels` limits as the original: enlarging an extreme panorama (say
/// `w2048` of a 1×16384 strip) would otherwise ask for a billions-of-pixels image. Such requests get
/// [`ImageError::SourceTooLarge`] too.
pub fn render(
    original: &[u8],
    spec: &RenderSpec,
    limits: &DecodeLimits,
) -> Result<Rendered, ImageError> {
    render_with(
        original,
        spec,
        limits,
        JpegPixels::Direct,
        &Deadline::none(),
        Scans::Count,
    )
}

/// [`render`] of an original [`super::vips::inspect`] has passed (`inspected`), stopped with
/// [`ImageError::Timeout`] once `deadline` has passed: the direct JPEG decode checks it from
/// libjpeg's progress monitor, libvips' evaluation from its `eval` signal (see `EvalWatch`).
/// Encoders that cannot be interrupted (the AV1 encoder) run to their end; the AVIF output ceiling
/// bounds them instead. A JPEG's scans, counted by `inspect`, are not walked again.
pub fn render_within(
    original: &[u8],
    spec: &RenderSpec,
    limits: &DecodeLimits,
    deadline: &Deadline,
    inspected: &Inspection,
) -> Result<Rendered, ImageError> {
    let scans = if inspected.jpeg.is_some() {
        Scans::Counted
    } else {
        Scans::Count
    };
    render_with(original, spec, limits, JpegPixels::Direct, deadline, scans)
}

/// Whether [`render_with`] must still count a JPEG's scans, or [`inspect`] already did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scans {
    Count,
    Counted,
}

/// Who decodes a JPEG's pixels on the in-memory resample path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum JpegPixels {
    /// libjpeg-turbo directly ([`jpeg::decode`]), only the columns a centre crop needs, where it can.
    Direct,
    /// Always libvips' `jpegload` (tests compare the two).
    #[cfg_attr(not(test), allow(dead_code))]
    Libvips,
}

fn render_with(
    original: &[u8],
    spec: &RenderSpec,
    limits: &DecodeLimits,
    jpeg_pixels: JpegPixels,
    deadline: &Deadline,
    scans: Scans,
) -> Result<Rendered, ImageError> {
    ensure_init()?;
    let kind = sniff(original).ok_or(ImageError::UnsupportedFormat)?;
    if !allowed(kind, limits) {
        return Err(ImageError::UnsupportedFormat);
    }
    // Every JPEG path (the direct decode and libvips' loader) is behind the scan limit, whoever
    // calls: counted here unless `inspect` did (the processor always inspects first).
    if kind == Kind::Jpeg && scans == Scans::Count {
        jpeg_markers(original, limits)?;
    }
    // SAFETY (this and the loads below): every image made in this function is dropped before it
    // returns, and `original` outlives the call; the result holds only owned bytes.
    let opened = unsafe { load(kind, original, Reduce::None)? };
    let header = header_of(kind, &opened)?;
    let stored = Size::new(header.width, header.height);
    check_limits(stored, header.pages, limits)?;

    let orientation = orientation_of(kind, &opened);
    let plan = geometry::plan(&spec.version, stored, orientation, spec.enlarge);
    check_limits(plan.resized, 1, limits)?;
    check_limits(plan.output, 1, limits)?;
    if plan.output.width.max(plan.output.height) > encoder_max_side(spec.format) {
        return Err(ImageError::SourceTooLarge);
    }

    count_decode();

    // Re-open with the decoder doing the bulk of the reduction; every other format decodes at full size.
    let target = if geometry::swaps_sides(orientation) {
        plan.resized.transposed()
    } else {
        plan.resized
    };
    let decoded = match kind {
        Kind::Jpeg if plan.shrink > 1 => unsafe {
            load(kind, original, Reduce::JpegShrink(plan.shrink))?
        },
        Kind::Webp if target != stored => {
            let scale = geometry::webp_scale(stored, target);
            if scale < 1.0 {
                unsafe { load(kind, original, Reduce::WebpScale(scale))? }
            } else {
                opened
            }
        }
        _ => opened,
    };

    let smart = plan.crop.is_some() && spec.gravity != Gravity::Centre;
    let rotate = orientation > 1 && orientation <= 8;
    let centre_crop = if smart { None } else { plan.crop };
    let upright_size = if geometry::swaps_sides(orientation) {
        dims(&decoded)?.transposed()
    } else {
        dims(&decoded)?
    };
    let path = PixelPath::choose(
        resample_space(&decoded),
        kind == Kind::Jpeg && jpeg_pixels == JpegPixels::Direct,
        upright_size != plan.resized,
    );
    let in_memory = |decoded: VipsImage, space: &str| {
        let upright = upright_lazily(decoded, rotate, upright_size == plan.resized, deadline)?;
        resample_upright(&upright, space, plan.resized, centre_crop)
    };
    let (mut img, in_memory) = match path {
        PixelPath::DirectJpeg { space } => {
            // `decoded` was opened with `plan.shrink` (1 when it is `opened`).
            let source = JpegSource {
                original,
                denom: plan.shrink,
                max_scans: limits.max_jpeg_scans,
                deadline,
            };
            let turned = if rotate { orientation } else { 1 };
            match resample_jpeg(source, &decoded, turned, space, plan.resized, centre_crop)? {
                Some(img) => (img, true),
                // A layout libjpeg-turbo leaves to libvips (CMYK, YCCK).
                None => (in_memory(decoded, space)?, true),
            }
        }
        PixelPath::VipsInMemory { space } => (in_memory(decoded, space)?, true),
        PixelPath::VipsStreaming => {
            let smart_or_turned = rotate || smart;
            let img = vips_streaming(
                &decoded,
                target,
                rotate,
                smart_or_turned,
                centre_crop,
                deadline,
            )?;
            (img, smart_or_turned)
        }
    };
    if let (true, Some(c)) = (smart, plan.crop) {
        let interesting = if spec.gravity == Gravity::Attention {
            "attention"
        } else {
            "entropy"
        };
        img = img
            .smartcrop_with_opts(
                to_i32(c.width)?,
                to_i32(c.height)?,
                VOption::new().set("interesting", interesting),
            )
            .map_err(internal)?;
    }
    finish(img, plan.output, spec, in_memory, deadline)
}

/// The end of every render: `img` at its final size (`planned`), made 8-bit sRGB (grey kept for
/// JPEG and PNG), flattened for JPEG, stripped of metadata and encoded once. `in_memory`: its pixels
/// are already computed (else they are pulled into memory first, or, for a big JPEG or PNG, streamed
/// from the decoder into the encoder).
pub(super) fn finish(
    mut img: VipsImage,
    planned: Size,
    spec: &RenderSpec,
    in_memory: bool,
    deadline: &Deadline,
) -> Result<Rendered, ImageError> {
    let out = dims(&img)?;
    if out != planned {
        return Err(ImageError::Internal(format!(
            "geometry: got {}x{}, planned {}x{}",
            out.width, out.height, planned.width, planned.height
        )));
    }

    img = to_srgb8(img, matches!(spec.format, Format::Jpeg | Format::Png))?;
    if spec.format == Format::Jpeg && img.hasalpha() {
        img = flatten(&img, spec.background)?;
    }
    let mut img = strip_metadata(&img)?;

    let streams = matches!(spec.format, Format::Jpeg | Format::Png);
    let stream = !in_memory && streams && out.pixels() > STREAM_ABOVE_PIXELS;
    if !in_memory && !stream {
        img = evaluate(&img, deadline, VipsImage::copy_memory, undecodable)?;
    }
    let bytes = evaluate(
        &img,
        deadline,
        |img| encode(img, spec),
        if stream { undecodable } else { internal },
    )?;
    Ok(Rendered {
        bytes: Bytes::from(bytes),
        format: spec.format,
        width: out.width,
        height: out.height,
    })
}

/// Which code computes a render's resized pixels; [`PixelPath::choose`] decides from the decoded
/// image alone, and `render_with` has one branch per path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PixelPath {
    /// libjpeg-turbo decodes the pixels (only the columns a centre crop keeps, when stored
    /// upright) and [`resample`] resizes them: a JPEG whose decoded image is small and must be
    /// resampled, the usual case.
    DirectJpeg {
        /// The colour space to label the result with.
        space: &'static str,
    },
    /// libvips decodes into memory (or on this thread, into one region) and [`resample`] resizes:
    /// small decoded images of the other formats, and JPEGs that need no resample.
    VipsInMemory {
        /// The colour space to label the result with.
        space: &'static str,
    },
    /// libvips decodes and resizes, streaming from the decoder: decoded images over
    /// [`RESAMPLE_MAX_PIXELS`], 16-bit and unusual colour spaces.
    VipsStreaming,
}

impl PixelPath {
    /// `space`: what [`resample_space`] says of the decoded image (`None`: `resample` cannot take
    /// it); `direct_jpeg`: a JPEG libjpeg-turbo may decode; `resamples`: the decoded size is not the
    /// resized size.
    fn choose(space: Option<&'static str>, direct_jpeg: bool, resamples: bool) -> PixelPath {
        match space {
            None => PixelPath::VipsStreaming,
            Some(space) if direct_jpeg && resamples => PixelPath::DirectJpeg { space },
            Some(space) => PixelPath::VipsInMemory { space },
        }
    }
}

/// [`PixelPath::VipsStreaming`]: libvips' resize to `target` (stored orientation), streaming from
/// the decoder. Rotation and smart crop read the image out of order, which a sequential decode
/// cannot serve: with `in_memory` the resized (small) image is pulled into memory first, and that is
/// where the decode happens. Then it is turned upright and the centre `crop` cut.
fn vips_streaming(
    decoded: &VipsImage,
    target: Size,
    rotate: bool,
    in_memory: bool,
    crop: Option<CropBox>,
    deadline: &Deadline,
) -> Result<VipsImage, ImageError> {
    let mut img = resize_exact(decoded, target)?;
    if in_memory {
        img = evaluate(&img, deadline, VipsImage::copy_memory, undecodable)?;
    }
    if rotate {
        img = img.autorot().map_err(internal)?;
    }
    if let Some(c) = crop {
        img = cut(&img, c)?;
    }
    Ok(img)
}

/// The longest side each encoder can write: WebP stores sides in 14 bits, JPEG and GIF in 16 (libjpeg
/// stops at 65500), AV1 frames at 65536. Checked up front so a too-large `full_size` is a 422, not an
/// encoder failure (500).
pub(super) fn encoder_max_side(format: Format) -> u32 {
    match format {
        Format::Webp => 16_383,
        Format::Jpeg => 65_500,
        Format::Gif => 65_535,
        Format::Avif => 65_536,
        Format::Png => u32::MAX,
    }
}

/// Decoded images up to this many pixels are resized in memory by [`resample`]; larger ones (formats
/// without shrink-on-load, big outputs) go through libvips' own resize, which streams from the decoder
/// and never holds the whole decoded image. 4 Mpx is at most 16 MB per render in memory. Shrink-on-load
/// leaves a JPEG (or WebP) decode under 4× the resized pixels unless the shrink is capped at 8, so
/// every output up to 1 Mpx from such an original takes the in-memory path.
pub(super) const RESAMPLE_MAX_PIXELS: u64 = 1 << 22;

/// The libvips interpretation nick to label [`resample`]'s output with, when the decoded image is one
/// it can take: 8-bit, 1–4 bands, sRGB, greyscale or CMYK, and at most [`RESAMPLE_MAX_PIXELS`].
/// `None` sends the render down the libvips resize path.
pub(super) fn resample_space(img: &VipsImage) -> Option<&'static str> {
    if img.get_format().ok()? != BandFormat::Uchar || !(1..=4).contains(&img.get_bands()) {
        return None;
    }
    if dims(img).ok()?.pixels() > RESAMPLE_MAX_PIXELS {
        return None;
    }
    match img.get_interpretation().ok()? {
        Interpretation::Srgb => Some("srgb"),
        Interpretation::BW => Some("b-w"),
        Interpretation::Cmyk => Some("cmyk"),
        _ => None,
    }
}

/// The decoded image made upright for [`resample_upright`]. With `whole` (it already has the resized
/// size, nothing to resample) it is decoded into memory here, where a decoder failure is the
/// original's fault.
fn upright_lazily(
    decoded: VipsImage,
    rotate: bool,
    whole: bool,
    deadline: &Deadline,
) -> Result<VipsImage, ImageError> {
    Ok(if whole {
        // Nothing to resample: decode into memory, then turn upright there, since the encoder reads
        // in strips that a rotated sequential decode could not serve.
        let img = evaluate(&decoded, deadline, VipsImage::copy_memory, undecodable)?;
        if rotate {
            let turned = img.autorot().map_err(internal)?;
            evaluate(&turned, deadline, VipsImage::copy_memory, internal)?
        } else {
            img
        }
    } else if rotate {
        // Still lazy: the one whole-image request in `resample_upright` asks `autorot` for
        // everything at once, which asks the loader for everything at once, top to bottom, as
        // sequential access requires.
        decoded.autorot().map_err(internal)?
    } else {
        // Still lazy: `resample_upright` decodes it on this thread, straight into the buffer it
        // reads.
        decoded
    })
}

/// Resizes the upright `img` to `resized` and cuts `crop` from it (in one pass: only the crop's pixels
/// are computed) with [`resample`], and labels the result as `space` with `img`'s ICC profile and
/// resolution, which is all the colour conversion and encoder read from the header. `img` is either in
/// memory or lazy, straight from the loader; then this is where it is decoded ([`WholeImage`]), and a
/// decoder failure is [`ImageError::Undecodable`].
fn resample_upright(
    img: &VipsImage,
    space: &str,
    resized: Size,
    crop: Option<CropBox>,
) -> Result<VipsImage, ImageError> {
    let have = dims(img)?;
    if have == resized {
        return match crop {
            None => Ok(img.clone()),
            Some(c) => cut(img, c),
        };
    }
    let out = crop.map_or(resized, |c| Size::new(c.width, c.height));
    let bands = u8::try_from(img.get_bands()).map_err(|_| resample_failed("band count"))?;
    let whole = WholeImage::prepare(img, have, bands)?;
    let data = whole.data();
    let source = Pixels {
        data,
        size: have,
        bands,
        alpha: img.hasalpha(),
    };
    let window = crop.map(|c| Window::for_crop(have, resized, c));
    let pixels =
        resample::resample(&source, window, out).map_err(|e| resample_failed(&e.to_string()))?;
    label(&pixels, out, bands, space, img)
}

/// [`resample_upright`] for a JPEG `img` (the lazy header of `original` opened with shrink `denom`)
/// whose pixels libjpeg-turbo decodes itself ([`jpeg::decode`]). Stored upright, for a centre crop
/// only the columns the resample reads, plus a margin, are inverse-transformed and colour-converted;
/// stored otherwise (EXIF `orientation` 2–8), every pixel is decoded and turned upright in memory
/// ([`resample::upright`]) first. `None`: a layout [`jpeg`] leaves to libvips' loader (CMYK, YCCK,
/// unusual component counts).
/// The JPEG [`resample_jpeg`] decodes: its bytes, the shrink, and when to stop.
struct JpegSource<'a> {
    original: &'a [u8],
    denom: u32,
    max_scans: u32,
    deadline: &'a Deadline,
}

fn resample_jpeg(
    source: JpegSource<'_>,
    img: &VipsImage,
    orientation: u8,
    space: &str,
    resized: Size,
    crop: Option<CropBox>,
) -> Result<Option<VipsImage>, ImageError> {
    let stored = dims(img)?;
    let turned = orientation > 1;
    let upright_size = if geometry::swaps_sides(orientation) {
        stored.transposed()
    } else {
        stored
    };
    let bands = u8::try_from(img.get_bands()).map_err(|_| resample_failed("band count"))?;
    let out = crop.map_or(resized, |c| Size::new(c.width, c.height));
    let window = crop.map(|c| Window::for_crop(upright_size, resized, c));
    let (left, width) = match window {
        Some(w) if !turned => columns_for(w, out.width, stored.width),
        _ => (0, stored.width),
    };
    let columns = match jpeg::decode_within(
        source.original,
        source.denom,
        stored,
        bands,
        (left, width),
        source.max_scans,
        source.deadline,
    ) {
        Ok(columns) => columns,
        Err(JpegError::Unsupported) => return Ok(None),
        Err(JpegError::Corrupt) => return Err(ImageError::Undecodable),
        Err(JpegError::TooManyScans) => return Err(ImageError::TooManyScans),
        Err(JpegError::Timeout) => return Err(ImageError::Timeout),
        Err(e @ JpegError::Mismatch) => return Err(ImageError::Internal(e.to_string())),
    };
    #[cfg(test)]
    THREAD_DIRECT_JPEG.with(|c| c.set(c.get() + 1));
    let decoded = Pixels {
        data: &columns.data,
        size: Size::new(columns.width, stored.height),
        bands,
        alpha: false,
    };
    let pixels = if turned {
        let (data, size) = resample::upright(&decoded, orientation)
            .map_err(|e| resample_failed(&e.to_string()))?;
        let source = Pixels {
            data: &data,
            size,
            ..decoded
        };
        resample::resample(&source, window, out)
    } else {
        // The window in the band's own columns. Without a crop the band is the whole width.
        let window = window.map(|w| Window {
            left: w.left - f64::from(columns.left),
            ..w
        });
        resample::resample(&decoded, window, out)
    }
    .map_err(|e| resample_failed(&e.to_string()))?;
    label(&pixels, out, bands, space, img).map(Some)
}

/// The band of columns (first, count) of an image `have_width` wide that resampling `window` to
/// `out_width` columns reads, widened by a margin: Lanczos3 reaches 3 output pixels' worth of source
/// columns either side of each sample, and the band's own edge columns may differ from a full decode
/// (chroma upsampling has no neighbour there), so those must stay out of reach too.
fn columns_for(window: Window, out_width: u32, have_width: u32) -> (u32, u32) {
    let scale = (window.width / f64::from(out_width.max(1))).max(1.0);
    let margin = (3.0 * scale).ceil() + 2.0;
    let first = (window.left - margin).floor().max(0.0);
    let end = (window.left + window.width + margin)
        .ceil()
        .min(f64::from(have_width));
    if first.partial_cmp(&end) != Some(std::cmp::Ordering::Less) {
        return (0, have_width);
    }
    // Both are whole numbers in 0..=have_width by now.
    (first as u32, (end - first) as u32)
}

#[cfg(test)]
mod tests {
    //! Real libvips, small generated fixtures. AVIF outputs are checked by parsing their `ispe`
    //! (size) box instead of decoding, so these tests do not depend on the HEIF loader being unblocked.

    use super::*;
    use crate::image::fixtures::{self, spec};
    use crate::image::vips::*;
    use crate::request::Version;
    use rs_vips::Vips;
    use std::cell::Cell;
    use std::time::{Duration, Instant};

    fn setup() {
        init(false).expect("libvips init");
    }

    fn limits() -> DecodeLimits {
        DecodeLimits::default()
    }

    fn thread_decodes() -> u64 {
        THREAD_DECODES.with(|c| c.get())
    }

    /// Output size, read independently of the encoder: `probe` for what we load, the `ispe` box for
    /// AVIF.
    fn output_size(bytes: &[u8], format: Format) -> (u32, u32) {
        if format == Format::Avif {
            assert!(is_heif(bytes), "not an AVIF container");
            let at = find(bytes, b"ispe").expect("ispe box");
            let w = u32::from_be_bytes(bytes[at + 8..at + 12].try_into().expect("4"));
            let h = u32::from_be_bytes(bytes[at + 12..at + 16].try_into().expect("4"));
            return (w, h);
        }
        let header = probe(bytes, &limits()).expect("probe output");
        assert_eq!(header.format, format);
        (header.width, header.height)
    }

    fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
        hay.windows(needle.len()).position(|w| w == needle)
    }

    /// Decodes an output we can load (not AVIF) fully into memory, upright as stored.
    fn decode(bytes: &[u8]) -> VipsImage {
        let kind = sniff(bytes).expect("known format");
        // SAFETY: copy_memory makes an image that owns its pixels; the lazy one dies here.
        unsafe { load(kind, bytes, Reduce::None) }
            .expect("load")
            .copy_memory()
            .expect("decode")
    }

    fn pixel(img: &VipsImage, x: u32, y: u32) -> Vec<f64> {
        img.getpoint(x as i32, y as i32).expect("getpoint")
    }

    #[test]
    fn every_version_in_every_format() {
        setup();
        let original = fixtures::jpeg(600, 400, 90);
        let cases = [
            (
                Version::Cover {
                    width: 200,
                    height: 100,
                },
                (200, 100),
            ),
            (
                Version::Cover {
                    width: 100,
                    height: 150,
                },
                (100, 150),
            ),
            (Version::Width(150), (150, 100)),
            (Version::Height(50), (75, 50)),
            (Version::FullSize, (600, 400)),
            // Enlarging (the default) goes past the original.
            (Version::Width(900), (900, 600)),
        ];
        for format in Format::ALL {
            for (version, want) in cases {
                let out = render(&original, &spec(version, format), &limits())
                    .unwrap_or_else(|e| panic!("{version} {format:?}: {e}"));
                assert_eq!(out.format, format);
                assert_eq!((out.width, out.height), want, "{version} {format:?}");
                assert_eq!(
                    output_size(&out.bytes, format),
                    want,
                    "{version} {format:?} decoded"
                );
            }
        }
    }

    #[test]
    fn every_input_format_renders() {
        setup();
        let inputs = [
            (fixtures::jpeg(300, 200, 85), Format::Jpeg),
            (fixtures::png_alpha(300, 200), Format::Png),
            (fixtures::webp(300, 200), Format::Webp),
            (fixtures::gif(300, 200), Format::Gif),
            (fixtures::jpeg_grey(300, 200), Format::Jpeg),
        ];
        for (bytes, format) in &inputs {
            let header = probe(bytes, &limits()).expect("probe");
            assert_eq!(header.format, *format);
            assert_eq!((header.width, header.height, header.pages), (300, 200, 1));
            for out_format in Format::ALL {
                let out = render(
                    bytes,
                    &spec(
                        Version::Cover {
                            width: 64,
                            height: 64,
                        },
                        out_format,
                    ),
                    &limits(),
                )
                .unwrap_or_else(|e| panic!("{format:?} -> {out_format:?}: {e}"));
                assert_eq!(output_size(&out.bytes, out_format), (64, 64));
            }
        }
    }

    #[test]
    fn webp_scale_on_load_gives_exact_sizes() {
        setup();
        let original = fixtures::webp(640, 480);
        for (version, want) in [
            (Version::Width(100), (100, 75)),
            (Version::Height(77), (103, 77)),
            (
                Version::Cover {
                    width: 99,
                    height: 101,
                },
                (99, 101),
            ),
        ] {
            let out = render(&original, &spec(version, Format::Png), &limits()).expect("render");
            assert_eq!(output_size(&out.bytes, Format::Png), want, "{version}");
        }
    }

    #[test]
    fn jpeg_shrink_and_resize_give_exact_sizes_for_awkward_ratios() {
        setup();
        let original = fixtures::jpeg(1001, 667, 80);
        for w in [
            1, 2, 3, 7, 99, 100, 125, 126, 127, 250, 251, 333, 500, 501, 1000, 1001, 1500,
        ] {
            let out = render(&original, &spec(Version::Width(w), Format::Jpeg), &limits())
                .unwrap_or_else(|e| panic!("w{w}: {e}"));
            let h = geometry::plan(&Version::Width(w), Size::new(1001, 667), 1, true).output;
            assert_eq!(output_size(&out.bytes, Format::Jpeg), (w, h.height), "w{w}");
            let cover = Version::Cover {
                width: w,
                height: w / 2 + 1,
            };
            let out = render(&original, &spec(cover, Format::Jpeg), &limits())
                .unwrap_or_else(|e| panic!("{cover}: {e}"));
            assert_eq!(
                output_size(&out.bytes, Format::Jpeg),
                (w, w / 2 + 1),
                "{cover}"
            );
        }
    }

    #[test]
    fn enlarge_false_never_exceeds_the_original() {
        setup();
        let original = fixtures::jpeg(320, 240, 80);
        let mut s = spec(Version::Width(1000), Format::Jpeg);
        s.enlarge = false;
        let out = render(&original, &s, &limits()).expect("render");
        assert_eq!(output_size(&out.bytes, Format::Jpeg), (320, 240));
        s.version = Version::Cover {
            width: 500,
            height: 500,
        };
        let out = render(&original, &s, &limits()).expect("render");
        assert_eq!(output_size(&out.bytes, Format::Jpeg), (240, 240));
    }

    /// The marker colours of `jpeg_with_exif`, sampled at the centres of the top corner blocks.
    fn assert_upright(img: &VipsImage, label: &str) {
        let (w, h) = (img.get_width() as u32, img.get_height() as u32);
        let tl = pixel(img, w / 8, h / 8);
        let tr = pixel(img, w - 1 - w / 8, h / 8);
        let red = tl[0] > 200.0 && tl[1] < 60.0 && tl[2] < 60.0;
        let blue = tr[2] > 200.0 && tr[0] < 60.0 && tr[1] < 60.0;
        assert!(red && blue, "{label}: top-left {tl:?}, top-right {tr:?}");
    }

    #[test]
    fn exif_orientation_is_applied_for_all_eight() {
        setup();
        for orientation in 1..=8u8 {
            let original = fixtures::jpeg_with_exif(400, 240, orientation);
            let header = probe(&original, &limits()).expect("probe");
            if orientation >= 5 {
                assert_eq!((header.width, header.height), (240, 400), "stored sideways");
            }
            for version in [
                Version::Width(200),
                Version::Cover {
                    width: 100,
                    height: 100,
                },
                // Cut 10 rows off the top and bottom: both marker blocks stay in the corners.
                Version::Cover {
                    width: 200,
                    height: 100,
                },
                // Sizes that shrink-on-load (1/2 here) does not hit exactly, so the rotation runs
                // lazily in front of the resample instead of on a decoded copy.
                Version::Width(150),
                Version::Cover {
                    width: 150,
                    height: 80,
                },
                Version::FullSize,
            ] {
                let out =
                    render(&original, &spec(version, Format::Png), &limits()).expect("render");
                let want = geometry::plan(&version, Size::new(400, 240), 1, true).output;
                let img = decode(&out.bytes);
                assert_eq!(
                    (img.get_width() as u32, img.get_height() as u32),
                    (want.width, want.height),
                    "orientation {orientation} {version}"
                );
                if want.width != want.height {
                    assert_upright(&img, &format!("orientation {orientation} {version}"));
                }
            }
        }
    }

    #[test]
    fn exif_orientation_of_png_and_webp_originals_is_applied() {
        setup();
        // The sideways JPEG fixture re-saved losslessly as PNG and WebP, keeping its EXIF block.
        let stored = decode(&fixtures::jpeg_with_exif(400, 240, 6));
        let png = stored
            .pngsave_buffer_with_opts(VOption::new().set("compression", 1))
            .expect("png");
        let webp = stored
            .webpsave_buffer_with_opts(VOption::new().set("lossless", true))
            .expect("webp");
        for (name, bytes) in [("png", &png), ("webp", &webp)] {
            let reopened = decode(bytes);
            assert_eq!(
                reopened.get_orientation(),
                6,
                "{name} keeps the orientation"
            );
            for version in [Version::Width(150), Version::Width(200), Version::FullSize] {
                let out = render(bytes, &spec(version, Format::Png), &limits()).expect("render");
                let img = decode(&out.bytes);
                let want = geometry::plan(&version, Size::new(400, 240), 1, true).output;
                assert_eq!(
                    (img.get_width() as u32, img.get_height() as u32),
                    (want.width, want.height),
                    "{name} {version}"
                );
                assert_upright(&img, &format!("{name} {version}"));
            }
        }
    }

    #[test]
    fn embedded_icc_profile_is_converted_to_srgb() {
        setup();
        // The red marker is stored in Display P3 as about (234, 51, 35); converted back it is pure red.
        let original = fixtures::jpeg_with_exif(400, 240, 1);
        let stored = decode(&original);
        let raw = pixel(&stored, 50, 30);
        assert!(raw[1] > 35.0, "fixture red really is stored as P3: {raw:?}");
        // Full size keeps the decoded header; a resize goes through `resample`, which must carry the
        // profile over to the image it builds.
        for (version, x, y) in [(Version::FullSize, 50, 30), (Version::Width(200), 25, 15)] {
            let out = render(&original, &spec(version, Format::Png), &limits()).expect("render");
            let p = pixel(&decode(&out.bytes), x, y);
            assert!(
                p[0] > 245.0 && p[1] < 20.0 && p[2] < 20.0,
                "{version:?}: {p:?}"
            );
        }
    }

    /// Mean absolute difference per sample of two same-sized 8-bit images.
    fn mean_abs_diff(a: &VipsImage, b: &VipsImage) -> f64 {
        let d = a.subtract(b).and_then(|d| d.abs()).expect("difference");
        d.avg().expect("average")
    }

    #[test]
    fn both_resize_paths_agree_with_a_full_decode_reference() {
        setup();
        // The in-memory path (`resample` after shrink-on-load) for JPEG; the libvips path for a PNG
        // decoded above RESAMPLE_MAX_PIXELS. Both against libvips' lanczos3 from the full decode.
        let (w, h) = (2400u32, 1800u32);
        assert!(u64::from(w) * u64::from(h) > RESAMPLE_MAX_PIXELS);
        let jpeg = fixtures::jpeg(w, h, 95);
        let full = decode(&jpeg);
        let png = full
            .pngsave_buffer_with_opts(VOption::new().set("compression", 1))
            .expect("png");
        let reference = full
            .resize_with_opts(0.125, VOption::new().set("kernel", "lanczos3"))
            .expect("reference");
        for (original, label) in [(&jpeg, "jpeg"), (&png, "png")] {
            let out = render(original, &spec(Version::Width(300), Format::Png), &limits())
                .expect("render");
            let img = decode(&out.bytes);
            assert_eq!((img.get_width(), img.get_height()), (300, 225), "{label}");
            let mad = mean_abs_diff(&img, &reference);
            // Shrink-on-load's DCT scaling differs a little from a full decode, and grain is sharp.
            assert!(mad < 6.0, "{label}: mean difference {mad}");
        }
    }

    fn exiftool_groups(bytes: &[u8], ext: &str) -> Option<Vec<String>> {
        let dir = tempfile::tempdir().ok()?;
        let path = dir.path().join(format!("out.{ext}"));
        std::fs::write(&path, bytes).ok()?;
        let out = std::process::Command::new("exiftool")
            .args(["-j", "-G", "-a"])
            .arg(&path)
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let obj = json.get(0)?.as_object()?;
        Some(obj.keys().cloned().collect())
    }

    #[test]
    fn metadata_is_stripped_in_every_format() {
        setup();
        let original = fixtures::jpeg_with_exif(400, 240, 6);
        // The fixture really carries what we strip.
        for marker in [
            b"Exif\0\0".as_slice(),
            b"TestCam",
            b"http://ns.adobe.com/xap",
            b"ICC_PROFILE",
        ] {
            assert!(find(&original, marker).is_some());
        }
        let tags = exiftool_groups(&original, "jpg");
        if let Some(tags) = &tags {
            assert!(tags.iter().any(|t| t.contains("GPSLatitude")), "{tags:?}");
            assert!(tags.iter().any(|t| t == "EXIF:Make"), "{tags:?}");
        }
        for format in Format::ALL {
            let out =
                render(&original, &spec(Version::Width(120), format), &limits()).expect("render");
            for marker in [
                b"Exif\0\0".as_slice(),
                b"Exif",
                b"TestCam",
                b"Model X1",
                b"http://ns.adobe.com/xap",
                b"xpacket",
                b"ICC_PROFILE",
                b"acsp",
            ] {
                assert!(
                    find(&out.bytes, marker).is_none(),
                    "{format:?} output contains {:?}",
                    String::from_utf8_lossy(marker)
                );
            }
            if let Some(tags) = exiftool_groups(&out.bytes, format.ext()) {
                let leaked: Vec<_> = tags
                    .iter()
                    .filter(|t| {
                        t.starts_with("EXIF:")
                            || t.starts_with("XMP")
                            || t.starts_with("ICC")
                            || t.starts_with("IPTC")
                            || t.contains("GPS")
                            || t.contains("Orientation")
                            || t.contains("Make")
                    })
                    .collect();
                assert!(leaked.is_empty(), "{format:?} leaks {leaked:?}");
            }
        }
    }

    #[test]
    fn alpha_kept_except_for_jpeg() {
        setup();
        let original = fixtures::png_alpha(200, 100);
        for format in [Format::Png, Format::Webp, Format::Gif] {
            let out =
                render(&original, &spec(Version::Width(100), format), &limits()).expect("render");
            let img = decode(&out.bytes);
            assert_eq!(img.get_bands(), 4, "{format:?}");
            assert!(pixel(&img, 0, 0)[3] < 1.0, "{format:?}: corner transparent");
            assert!(pixel(&img, 99, 49)[3] > 254.0, "{format:?}: right opaque");
        }
        let out = render(
            &original,
            &spec(Version::Width(100), Format::Avif),
            &limits(),
        )
        .expect("render");
        assert!(
            find(&out.bytes, b"urn:mpeg:mpegB:cicp:systems:auxiliary:alpha").is_some(),
            "AVIF carries an alpha plane"
        );
        let mut s = spec(Version::Width(100), Format::Jpeg);
        s.background = [10, 200, 30];
        let out = render(&original, &s, &limits()).expect("render");
        let img = decode(&out.bytes);
        assert_eq!(img.get_bands(), 3);
        let p = pixel(&img, 1, 1);
        assert!(
            (p[0] - 10.0).abs() < 8.0 && (p[1] - 200.0).abs() < 8.0 && (p[2] - 30.0).abs() < 8.0,
            "corner is the background: {p:?}"
        );
    }

    #[test]
    fn greyscale_stays_grey_for_jpeg_and_png() {
        setup();
        let original = fixtures::jpeg_grey(200, 100);
        for (format, bands) in [(Format::Jpeg, 1), (Format::Png, 1), (Format::Webp, 3)] {
            let out =
                render(&original, &spec(Version::Width(50), format), &limits()).expect("render");
            assert_eq!(decode(&out.bytes).get_bands(), bands, "{format:?}");
        }
    }

    /// A flat 64×64 image of `rgb`, as 8-bit sRGB.
    fn flat(rgb: [f64; 3]) -> VipsImage {
        VipsImage::black(64, 64)
            .and_then(|b| VipsImage::new_from_image(&b, &rgb))
            .and_then(|i| i.cast(BandFormat::Uchar))
            .and_then(|i| i.copy_with_opts(VOption::new().set("interpretation", "srgb")))
            .expect("flat")
    }

    #[test]
    fn cmyk_with_and_without_profile_becomes_srgb() {
        setup();
        let cmyk = flat([220.0, 30.0, 30.0])
            .icc_transform_with_opts("cmyk", VOption::new().set("input_profile", "srgb"))
            .expect("to cmyk");
        assert_eq!(cmyk.get_bands(), 4);
        for strip in [true, false] {
            let jpeg = cmyk
                .jpegsave_buffer_with_opts(VOption::new().set("strip", strip))
                .expect("cmyk jpeg");
            for format in [Format::Png, Format::Jpeg] {
                let out =
                    render(&jpeg, &spec(Version::Width(32), format), &limits()).expect("render");
                let img = decode(&out.bytes);
                assert_eq!(img.get_bands(), 3, "profile kept: {}", !strip);
                assert_eq!(img.get_format().expect("format"), BandFormat::Uchar);
                let p = pixel(&img, 16, 16);
                assert!(
                    p[0] > 170.0 && p[1] < 90.0 && p[2] < 90.0,
                    "profile kept {}: {p:?}",
                    !strip
                );
            }
        }
    }

    #[test]
    fn sixteen_bit_png_becomes_8_bit() {
        setup();
        // new_from_image takes its band format from the template: make the template 16-bit first.
        let png16 = VipsImage::black(64, 64)
            .and_then(|b| b.cast(BandFormat::Ushort))
            .and_then(|b| VipsImage::new_from_image(&b, &[65535.0, 32768.0, 0.0]))
            .and_then(|i| i.copy_with_opts(VOption::new().set("interpretation", "rgb16")))
            .and_then(|i| i.pngsave_buffer())
            .expect("16-bit png");
        assert_eq!(
            decode(&png16).get_format().expect("format"),
            BandFormat::Ushort,
            "the original really is 16-bit"
        );
        for format in [Format::Png, Format::Webp] {
            let out = render(&png16, &spec(Version::Width(32), format), &limits()).expect("render");
            let img = decode(&out.bytes);
            assert_eq!(img.get_format().expect("format"), BandFormat::Uchar);
            let p = pixel(&img, 16, 16);
            assert!(
                (p[0] - 255.0).abs() < 3.0 && (p[1] - 128.0).abs() < 4.0 && p[2] < 3.0,
                "{format:?}: {p:?}"
            );
        }
    }

    #[test]
    fn encoder_options_take_effect() {
        setup();
        let original = fixtures::jpeg(800, 600, 92);
        let mut s = spec(Version::Width(400), Format::Jpeg);
        s.quality = 10;
        let q10 = render(&original, &s, &limits()).expect("q10");
        s.quality = 90;
        let q90 = render(&original, &s, &limits()).expect("q90");
        assert!(
            q10.bytes.len() * 3 < q90.bytes.len(),
            "q10 {} vs q90 {}",
            q10.bytes.len(),
            q90.bytes.len()
        );
        // SOF2 (progressive) present, SOF0 (baseline) absent, and the reverse.
        assert!(find(&q90.bytes, &[0xFF, 0xC2]).is_some());
        assert!(find(&q90.bytes, &[0xFF, 0xC0]).is_none());
        s.progressive = false;
        let baseline = render(&original, &s, &limits()).expect("baseline");
        assert!(find(&baseline.bytes, &[0xFF, 0xC0]).is_some());
        assert!(find(&baseline.bytes, &[0xFF, 0xC2]).is_none());

        // WebP and AVIF quality.
        for format in [Format::Webp, Format::Avif] {
            let mut s = spec(Version::Width(400), format);
            s.quality = 10;
            let low = render(&original, &s, &limits()).expect("low");
            s.quality = 95;
            let high = render(&original, &s, &limits()).expect("high");
            assert!(
                low.bytes.len() * 2 < high.bytes.len(),
                "{format:?}: q10 {} vs q95 {}",
                low.bytes.len(),
                high.bytes.len()
            );
        }
    }

    #[test]
    fn avif_is_av1_8_bit_and_effort_matters() {
        setup();
        let original = fixtures::jpeg(600, 400, 90);
        let mut s = spec(Version::Width(300), Format::Avif);
        let fast = render(&original, &s, &limits()).expect("effort 0");
        // `av01` item type: compression av1 (not HEVC); `pixi` box: 3 channels × 8 bits.
        assert!(find(&fast.bytes, b"av01").is_some());
        assert!(find(&fast.bytes, b"hvc1").is_none());
        let pixi = find(&fast.bytes, b"pixi").expect("pixi box");
        assert_eq!(&fast.bytes[pixi + 8..pixi + 12], &[3, 8, 8, 8]);
        s.avif_effort = 9;
        let t = Instant::now();
        let slow = render(&original, &s, &limits()).expect("effort 9");
        let slow_time = t.elapsed();
        s.avif_effort = 0;
        let t = Instant::now();
        render(&original, &s, &limits()).expect("effort 0");
        let fast_time = t.elapsed();
        assert!(
            slow_time > fast_time || slow.bytes != fast.bytes,
            "effort option had no visible effect"
        );
    }

    #[test]
    fn loader_options_take_effect() {
        setup();
        let jpeg = fixtures::jpeg(1001, 667, 80);
        // SAFETY: `jpeg` and `webp` outlive the images made from them.
        let img = unsafe { load(Kind::Jpeg, &jpeg, Reduce::JpegShrink(8)) }.expect("load");
        // libvips 8.14 rounds shrunk sides down (libjpeg itself would round up).
        assert_eq!((img.get_width(), img.get_height()), (125, 83));
        assert!(
            img.get_typeof("vips-sequential").unwrap_or(0) != 0,
            "sequential access was requested"
        );
        let webp = fixtures::webp(640, 480);
        let img = unsafe { load(Kind::Webp, &webp, Reduce::WebpScale(0.25)) }.expect("load");
        assert_eq!((img.get_width(), img.get_height()), (160, 120));
    }

    #[test]
    fn resize_kernel_option_takes_effect() {
        setup();
        let img = decode(&fixtures::jpeg(200, 100, 90));
        let ours = resize_exact(&img, Size::new(150, 75))
            .expect("resize")
            .write_to_memory();
        let with = |kernel: &str| {
            img.resize_with_opts(
                0.75,
                VOption::new().set("vscale", 0.75).set("kernel", kernel),
            )
            .expect("resize")
            .write_to_memory()
        };
        assert!(
            ours == with(RESIZE_KERNEL),
            "same as an explicit {RESIZE_KERNEL}"
        );
        assert!(ours != with("cubic"), "not the cubic kernel");
    }

    #[test]
    fn jpeg_huffman_tables_are_optimised() {
        setup();
        let original = fixtures::jpeg(800, 600, 92);
        let mut s = spec(Version::Width(400), Format::Jpeg);
        s.progressive = false;
        let out = render(&original, &s, &limits()).expect("render");
        // libjpeg's standard tables are written as DHT segments of length 31 (DC) and 181 (AC);
        // optimize_coding writes tables fitted to the image, which are shorter.
        let mut lengths = Vec::new();
        let b = &out.bytes;
        let mut at = 2;
        while at + 4 <= b.len() && b[at] == 0xFF && b[at + 1] != 0xDA {
            let len = usize::from(u16::from_be_bytes([b[at + 2], b[at + 3]]));
            if b[at + 1] == 0xC4 {
                lengths.push(len);
            }
            at += 2 + len;
        }
        assert!(!lengths.is_empty(), "found the DHT segments");
        assert!(
            !lengths.contains(&181),
            "standard AC table used: {lengths:?}"
        );
    }

    /// A 600×200 grey PNG, flat except for a noisy block on the far left.
    fn detail_on_the_left() -> Vec<u8> {
        let flat = VipsImage::black(600, 200)
            .and_then(|i| i.linear(&[1.0], &[128.0]))
            .expect("flat");
        let noise = VipsImage::gaussnoise_with_opts(
            150,
            200,
            VOption::new().set("sigma", 60.0).set("seed", 3),
        )
        .expect("noise");
        flat.insert(&noise, 0, 0)
            .and_then(|i| i.cast(BandFormat::Uchar))
            .and_then(|i| i.copy_with_opts(VOption::new().set("interpretation", "b-w")))
            .and_then(|i| i.pngsave_buffer())
            .expect("png")
    }

    #[test]
    fn smart_crop_finds_the_detail_centre_does_not() {
        setup();
        let original = detail_on_the_left();
        let deviation = |gravity: Gravity| {
            let mut s = spec(
                Version::Cover {
                    width: 150,
                    height: 200,
                },
                Format::Png,
            );
            s.gravity = gravity;
            let out = render(&original, &s, &limits()).expect("render");
            decode(&out.bytes).deviate().expect("deviate")
        };
        assert!(deviation(Gravity::Centre) < 1.0);
        assert!(deviation(Gravity::Entropy) > 20.0);
        assert!(deviation(Gravity::Attention) > 20.0);
    }

    #[test]
    fn avif_input_when_accepted() {
        setup();
        let avif = render(
            &fixtures::jpeg_with_exif(400, 240, 6),
            &spec(Version::FullSize, Format::Avif),
            &limits(),
        )
        .expect("encode avif")
        .bytes;
        init(true).expect("unblock HEIF");
        let accept = DecodeLimits {
            accept_avif_input: true,
            ..limits()
        };
        let header = probe(&avif, &accept).expect("probe");
        assert_eq!(
            (header.format, header.width, header.height),
            (Format::Avif, 400, 240)
        );
        let out = render(&avif, &spec(Version::Width(200), Format::Png), &accept).expect("render");
        let img = decode(&out.bytes);
        assert_eq!((img.get_width(), img.get_height()), (200, 120));
        assert_upright(&img, "avif round trip");
    }

    #[test]
    fn webp_output_wider_than_16383_is_refused_up_front() {
        setup();
        let original = fixtures::jpeg(300, 10, 80);
        assert_eq!(
            render(
                &original,
                &spec(Version::Width(16_384), Format::Webp),
                &limits()
            )
            .map(|_| ()),
            Err(ImageError::SourceTooLarge)
        );
    }

    #[test]
    fn smart_crop_gravities_give_the_exact_size() {
        setup();
        let original = fixtures::jpeg_with_exif(400, 240, 6);
        for gravity in [Gravity::Attention, Gravity::Entropy, Gravity::Centre] {
            let mut s = spec(
                Version::Cover {
                    width: 90,
                    height: 120,
                },
                Format::Jpeg,
            );
            s.gravity = gravity;
            let out = render(&original, &s, &limits()).expect("render");
            assert_eq!(
                output_size(&out.bytes, Format::Jpeg),
                (90, 120),
                "{gravity:?}"
            );
        }
    }

    #[test]
    fn animated_gif_renders_first_frame_only() {
        setup();
        let original = fixtures::gif_animated(40, 30, 3);
        let header = probe(&original, &limits()).expect("probe");
        assert_eq!((header.width, header.height, header.pages), (40, 30, 3));
        for format in [Format::Gif, Format::Webp, Format::Png] {
            let out =
                render(&original, &spec(Version::FullSize, format), &limits()).expect("render");
            let img = decode(&out.bytes);
            assert_eq!((img.get_width(), img.get_height()), (40, 30), "{format:?}");
            assert!(img.get_n_pages() <= 1, "{format:?} is a single frame");
            let p = pixel(&img, 20, 15);
            assert!((p[0] - 20.0).abs() < 3.0, "{format:?} first frame: {p:?}");
        }
    }

    #[test]
    fn truncated_originals_are_undecodable() {
        setup();
        let jpeg = fixtures::jpeg(400, 300, 90);
        let png = fixtures::png_alpha(400, 300);
        // Without `fail_on` libvips "decodes" the truncated JPEG into a grey-bottomed image: it is our
        // option that turns it into an error.
        let cut = &jpeg[..jpeg.len() * 2 / 3];
        let lenient =
            VipsImage::jpegload_buffer_with_opts(cut, VOption::new().set("fail_on", "none"))
                .and_then(|i| i.copy_memory());
        assert!(lenient.is_ok(), "libvips default is lenient");
        Vips::error_clear();
        // Each way a decode can happen: streaming (full size), on the render thread (w40, cover),
        // and through memory for a sideways EXIF orientation.
        let sideways = fixtures::jpeg_with_exif(400, 240, 6);
        for (name, bytes) in [("jpeg", &jpeg), ("png", &png), ("rotated jpeg", &sideways)] {
            let cut = &bytes[..bytes.len() * 2 / 3];
            for version in [
                Version::FullSize,
                Version::Width(40),
                Version::Cover {
                    width: 40,
                    height: 40,
                },
            ] {
                assert_eq!(
                    render(cut, &spec(version, Format::Jpeg), &limits()).map(|_| ()),
                    Err(ImageError::Undecodable),
                    "{name} {version}"
                );
            }
        }
        // Garbage after a valid magic number.
        let mut junk = b"\xFF\xD8\xFF\xE0".to_vec();
        junk.extend_from_slice(&[0x5A; 200]);
        assert_eq!(
            render(&junk, &spec(Version::Width(10), Format::Jpeg), &limits()).map(|_| ()),
            Err(ImageError::Undecodable)
        );
    }

    /// The direct libjpeg-turbo decode (`jpeg.rs`) gives byte for byte the output libvips' loader
    /// (and `autorot`) gives, across chroma layouts (4:2:0 below Q 90, 4:4:4 above), progressive and
    /// greyscale originals, an embedded ICC profile, all eight EXIF orientations, odd sizes, each
    /// shrink and crop bands narrow and wide; and it really is the path taken.
    #[test]
    fn direct_jpeg_decode_matches_libvips_byte_for_byte() {
        setup();
        let mut originals = vec![
            ("4:2:0".to_string(), fixtures::jpeg(1203, 797, 80)),
            ("4:4:4".to_string(), fixtures::jpeg(1203, 797, 92)),
            (
                "progressive".to_string(),
                fixtures::jpeg_progressive(1001, 1499, 80),
            ),
            ("grey".to_string(), fixtures::jpeg_grey(901, 603)),
        ];
        // An ICC profile and every EXIF orientation (1 included).
        for orientation in 1..=8 {
            originals.push((
                format!("icc, orientation {orientation}"),
                fixtures::jpeg_with_exif(401, 243, orientation),
            ));
        }
        let cover = |width, height| Version::Cover { width, height };
        let versions = [
            Version::Width(299),
            Version::Width(37),
            Version::Height(150),
            cover(300, 400),
            cover(100, 100),
            cover(20, 300),
            cover(290, 30),
            cover(390, 230),
        ];
        for (name, original) in &originals {
            for version in versions {
                for format in [Format::Png, Format::Jpeg] {
                    let spec = spec(version, format);
                    let before = THREAD_DIRECT_JPEG.with(Cell::get);
                    let direct = render_with(
                        original,
                        &spec,
                        &limits(),
                        JpegPixels::Direct,
                        &Deadline::none(),
                        Scans::Count,
                    )
                    .expect("direct");
                    let taken = THREAD_DIRECT_JPEG.with(Cell::get) - before;
                    let libvips = render_with(
                        original,
                        &spec,
                        &limits(),
                        JpegPixels::Libvips,
                        &Deadline::none(),
                        Scans::Count,
                    )
                    .expect("libvips");
                    assert_eq!(taken, 1, "{name} {version} {format:?}: direct decode taken");
                    assert_eq!(
                        (direct.width, direct.height),
                        (libvips.width, libvips.height),
                        "{name} {version}"
                    );
                    assert!(
                        direct.bytes == libvips.bytes,
                        "{name} {version} {format:?}: outputs differ"
                    );
                }
            }
        }
        // Left to libvips: no resample at all (800 / 4 is 200 already).
        let before = THREAD_DIRECT_JPEG.with(Cell::get);
        let plain = fixtures::jpeg(800, 600, 80);
        render(&plain, &spec(Version::Width(200), Format::Jpeg), &limits()).expect("render");
        assert_eq!(THREAD_DIRECT_JPEG.with(Cell::get), before);
    }

    /// Data missing from the end, however little, fails both decoders alike (`fail_on=warning`).
    #[test]
    fn direct_and_libvips_decoders_fail_alike_on_short_data() {
        setup();
        let jpeg = fixtures::jpeg(640, 480, 80);
        for cut in [2, 3, 100, jpeg.len() / 3] {
            let short = &jpeg[..jpeg.len() - cut];
            for version in [
                Version::Width(100),
                Version::Cover {
                    width: 50,
                    height: 100,
                },
            ] {
                let spec = spec(version, Format::Jpeg);
                let direct = render_with(
                    short,
                    &spec,
                    &limits(),
                    JpegPixels::Direct,
                    &Deadline::none(),
                    Scans::Count,
                )
                .map(|_| ());
                let libvips = render_with(
                    short,
                    &spec,
                    &limits(),
                    JpegPixels::Libvips,
                    &Deadline::none(),
                    Scans::Count,
                )
                .map(|_| ());
                assert_eq!(
                    direct,
                    Err(ImageError::Undecodable),
                    "{cut} bytes short, {version}"
                );
                assert_eq!(libvips, direct, "{cut} bytes short, {version}");
            }
        }
    }

    #[test]
    fn other_formats_are_unsupported() {
        setup();
        let svg = br#"<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>"#;
        let tiff = b"II*\0\x08\0\0\0\x00\x00\x00\x00";
        let pdf = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF";
        let html = b"<!DOCTYPE html><html><body>not an image</body></html>";
        let empty = b"";
        for (name, bytes) in [
            ("svg", svg.as_slice()),
            ("tiff", tiff.as_slice()),
            ("pdf", pdf.as_slice()),
            ("html", html.as_slice()),
            ("empty", empty.as_slice()),
        ] {
            assert_eq!(
                render(bytes, &spec(Version::Width(10), Format::Png), &limits()).map(|_| ()),
                Err(ImageError::UnsupportedFormat),
                "{name}"
            );
            assert_eq!(
                probe(bytes, &limits()),
                Err(ImageError::UnsupportedFormat),
                "{name}"
            );
        }
    }

    #[test]
    fn avif_input_needs_accept_avif_input() {
        setup();
        let avif = render(
            &fixtures::jpeg(64, 48, 80),
            &spec(Version::FullSize, Format::Avif),
            &limits(),
        )
        .expect("encode avif")
        .bytes;
        assert_eq!(probe(&avif, &limits()), Err(ImageError::UnsupportedFormat));
        assert_eq!(
            render(&avif, &spec(Version::Width(10), Format::Png), &limits()).map(|_| ()),
            Err(ImageError::UnsupportedFormat)
        );
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
        let mut c = (data.len() as u32).to_be_bytes().to_vec();
        c.extend_from_slice(kind);
        c.extend_from_slice(data);
        c.extend_from_slice(&crc32(&[kind.as_slice(), data].concat()).to_be_bytes());
        c
    }

    #[test]
    fn crc32_matches_known_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn png_bomb_header_is_refused_before_decoding() {
        setup();
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&100_000u32.to_be_bytes());
        ihdr.extend_from_slice(&100_000u32.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB, deflate, no interlace
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        png.extend(png_chunk(b"IHDR", &ihdr));
        png.extend(png_chunk(b"IDAT", &[0x78, 0x9C, 0x63, 0x00, 0x00]));
        png.extend(png_chunk(b"IEND", &[]));

        let header = probe(&png, &limits()).expect("the header itself is valid");
        assert_eq!((header.width, header.height), (100_000, 100_000));

        let before = thread_decodes();
        let result = render(&png, &spec(Version::Width(100), Format::Jpeg), &limits());
        assert_eq!(result.map(|_| ()), Err(ImageError::SourceTooLarge));
        // Refused from the header: the decode (7.7 s and gigabytes when it runs) never started.
        assert_eq!(thread_decodes(), before, "nothing decoded");
    }

    #[test]
    fn gif_frame_far_outside_the_screen_is_refused() {
        setup();
        let mut gif = b"GIF89a".to_vec();
        gif.extend_from_slice(&[1, 0, 1, 0, 0, 0, 0]); // 1×1 screen, no global palette
        gif.push(0x2C); // image descriptor
        gif.extend_from_slice(&60_000u16.to_le_bytes());
        gif.extend_from_slice(&60_000u16.to_le_bytes());
        gif.extend_from_slice(&[1, 0, 1, 0]); // 1×1 frame
        gif.push(0x80); // local palette, 2 entries
        gif.extend_from_slice(&[0, 0, 0, 255, 255, 255]);
        gif.extend_from_slice(&[0x02, 0x02, 0x44, 0x01, 0x00]); // LZW: one pixel
        gif.push(0x3B);

        let probed = probe(&gif, &limits());
        if let Ok(h) = &probed {
            eprintln!("gif bomb header: {h:?}");
        }
        let before = thread_decodes();
        let t = Instant::now();
        let result = render(&gif, &spec(Version::Width(10), Format::Png), &limits()).map(|_| ());
        assert!(
            matches!(
                result,
                Err(ImageError::SourceTooLarge | ImageError::Undecodable)
            ),
            "{result:?} (probe said {probed:?})"
        );
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "took {:?}",
            t.elapsed()
        );
        if result == Err(ImageError::SourceTooLarge) {
            assert_eq!(thread_decodes(), before);
        }
    }

    #[test]
    fn side_and_pixel_limits() {
        setup();
        let original = fixtures::jpeg(300, 200, 80);
        let tight = DecodeLimits {
            max_pixels: 300 * 200 - 1,
            ..limits()
        };
        assert_eq!(
            render(&original, &spec(Version::Width(10), Format::Jpeg), &tight).map(|_| ()),
            Err(ImageError::SourceTooLarge)
        );
        let narrow = DecodeLimits {
            max_side: 299,
            ..limits()
        };
        assert_eq!(
            render(&original, &spec(Version::Width(10), Format::Jpeg), &narrow).map(|_| ()),
            Err(ImageError::SourceTooLarge)
        );
        // Animations count every frame.
        let gif = fixtures::gif_animated(100, 100, 5);
        let frames = DecodeLimits {
            max_pixels: 100 * 100 * 4,
            ..limits()
        };
        assert_eq!(
            render(&gif, &spec(Version::Width(10), Format::Gif), &frames).map(|_| ()),
            Err(ImageError::SourceTooLarge)
        );
        // Enlarging an extreme strip would create a huge intermediate: refused, not attempted.
        let strip = fixtures::jpeg(4000, 2, 80);
        assert_eq!(
            render(
                &strip,
                &spec(
                    Version::Cover {
                        width: 2048,
                        height: 2048
                    },
                    Format::Jpeg
                ),
                &limits()
            )
            .map(|_| ()),
            Err(ImageError::SourceTooLarge)
        );
    }

    mod damaged {
        //! Damaged originals of every loaded format: any result but a panic (or a hang) is fine.

        use super::*;
        use proptest::prelude::*;
        use std::sync::OnceLock;

        fn originals() -> &'static [Vec<u8>] {
            static ORIGINALS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
            ORIGINALS.get_or_init(|| {
                setup();
                vec![
                    fixtures::jpeg(64, 48, 80),
                    fixtures::jpeg_with_exif(64, 48, 6),
                    fixtures::png_alpha(64, 48),
                    fixtures::webp(64, 48),
                    fixtures::gif(64, 48),
                    fixtures::gif_animated(16, 16, 2),
                ]
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(300))]

            #[test]
            fn mutated_originals_never_panic(
                which in 0usize..6,
                flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
                cut in any::<prop::sample::Index>(),
                truncate: bool,
            ) {
                let mut bytes = originals()[which].clone();
                for (at, value) in flips {
                    let i = at.index(bytes.len());
                    // Keep the magic number so the loader, not the sniffer, meets the damage.
                    if i >= 12 {
                        bytes[i] = value;
                    }
                }
                if truncate {
                    bytes.truncate(cut.index(bytes.len()).max(12));
                }
                let s = spec(Version::Cover { width: 20, height: 30 }, Format::Png);
                let _ = render(&bytes, &s, &limits());
                let _ = probe(&bytes, &limits());
            }

            #[test]
            fn random_bytes_after_a_magic_number_never_panic(
                magic in prop::sample::select(vec![
                    b"\xFF\xD8\xFF".to_vec(),
                    b"\x89PNG\r\n\x1a\n".to_vec(),
                    b"GIF89a".to_vec(),
                    b"RIFF\0\0\0\0WEBP".to_vec(),
                    b"\0\0\0\x1cftypavif".to_vec(),
                ]),
                tail in proptest::collection::vec(any::<u8>(), 0..300),
            ) {
                setup();
                let bytes = [magic, tail].concat();
                let r = render(&bytes, &spec(Version::Width(10), Format::Jpeg), &limits());
                prop_assert!(r.is_err());
            }
        }
    }

    #[test]
    fn fixture_jpeg_is_photographic_sized() {
        setup();
        let big = fixtures::jpeg(3000, 2000, 90);
        let mb = big.len() as f64 / 1e6;
        assert!((1.5..3.0).contains(&mb), "{mb} MB");
    }

    /// libvips' own evaluation stops at the deadline: a full-size PNG of a 6 MP photo (libvips'
    /// decode and encode, about a second) killed from its `eval` signal long before its end.
    #[test]
    fn libvips_evaluation_stops_at_the_deadline() {
        init(false).expect("libvips init");
        let photo = fixtures::jpeg(3000, 2000, 90);
        let spec = spec(Version::FullSize, Format::Png);
        let deadline = Deadline::after(std::time::Duration::from_millis(20));
        let started = std::time::Instant::now();
        assert_eq!(
            render_within(
                &photo,
                &spec,
                &limits(),
                &deadline,
                &inspect(&photo, &limits()).expect("inspect")
            )
            .map(|_| ()),
            Err(ImageError::Timeout)
        );
        println!("stopped after {:?}", started.elapsed());
        // The next render on this thread is not affected by the kill.
        let ok = render(&photo, &spec, &limits()).expect("renders without a deadline");
        assert_eq!((ok.width, ok.height), (3000, 2000));
    }

    /// The scan limit holds on every JPEG path: `inspect`, the direct decode and libvips' loader.
    #[test]
    fn the_scan_limit_applies_to_inspect_and_every_render_path() {
        init(false).expect("libvips init");
        let progressive = fixtures::jpeg_progressive(320, 240, 85);
        let strict = DecodeLimits {
            max_jpeg_scans: 2,
            ..limits()
        };
        assert_eq!(
            inspect(&progressive, &strict).map(|_| ()),
            Err(ImageError::TooManyScans)
        );
        let inspected = inspect(&progressive, &limits()).expect("within the default limit");
        let layout = inspected.jpeg.expect("JPEG layout");
        assert!(layout.progressive && layout.scans > 2);
        for pixels in [JpegPixels::Direct, JpegPixels::Libvips] {
            for version in [Version::Width(40), Version::FullSize] {
                let s = spec(version, Format::Jpeg);
                assert_eq!(
                    render_with(
                        &progressive,
                        &s,
                        &strict,
                        pixels,
                        &Deadline::none(),
                        Scans::Count
                    )
                    .map(|_| ()),
                    Err(ImageError::TooManyScans),
                    "{pixels:?} {version:?}"
                );
            }
        }
    }

    #[test]
    fn one_pixel_path_per_kind_of_decoded_image() {
        use PixelPath::*;
        assert_eq!(PixelPath::choose(None, true, true), VipsStreaming);
        assert_eq!(PixelPath::choose(None, false, false), VipsStreaming);
        assert_eq!(
            PixelPath::choose(Some("srgb"), true, true),
            DirectJpeg { space: "srgb" }
        );
        // A JPEG already at its resized size, or another format: libvips decodes.
        assert_eq!(
            PixelPath::choose(Some("srgb"), true, false),
            VipsInMemory { space: "srgb" }
        );
        assert_eq!(
            PixelPath::choose(Some("b-w"), false, true),
            VipsInMemory { space: "b-w" }
        );
    }
}
