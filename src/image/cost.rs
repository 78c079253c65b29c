//! Step 3c of the request flow, between the header and the pixels: what a render will cost, decided
//! from the original's header alone, so the pool can refuse or wait before anything is decoded.
//!
//! [`super::vips::inspect`] reads the header (libvips, no pixels) and walks a JPEG's markers
//! ([`super::markers`]) into an [`Inspection`]; [`estimate`] turns it and the [`RenderSpec`] into
//! the bytes the render will hold at its peak and checks the AVIF output ceiling. The processor
//! reserves that many bytes of `max_memory_mb` before the render takes a slot.
//!
//! The estimate is an upper bound of the buffers this crate and its decoders allocate, not a
//! measurement:
//! - **decode**: the decoded image, `width × height × bands × bytes per sample` after shrink-on-load
//!   (JPEG only; other formats decode at full size), plus libjpeg's whole coefficient image for a
//!   progressive JPEG (2 bytes × 64 per 8×8 block of every component), which it holds whatever the
//!   scale;
//! - **resize**: the resized image and its upright copy, 4 bytes per pixel each;
//! - **encode**: the output image and the encoder's buffers, 4 bytes per output pixel, and for AVIF
//!   the AV1 encoder's frame buffers, measured at about 12 bytes per output pixel with libaom;
//! - 1 MiB of fixed overhead (libvips objects, tables, the marker walk).

use super::geometry::{self, Plan, Size};
use super::markers::Layout;
use super::{ImageError, RenderSpec};
use crate::request::Format;

/// Fixed bytes every render is charged (libvips objects, decoder tables).
const OVERHEAD: u64 = 1 << 20;
/// Bytes per pixel of an 8-bit RGBA working image.
const WORKING_BPP: u64 = 4;
/// Bytes per output pixel the AV1 encoder (libaom, through libheif) holds beyond the image itself.
const AVIF_ENCODER_BPP: u64 = 12;

/// What the header of an original says, read without decoding a pixel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inspection {
    /// The original's format.
    pub format: Format,
    /// Stored size (before EXIF orientation), one frame.
    pub stored: Size,
    /// EXIF orientation 1..=8 (1 when none, and for HEIF, which is turned while decoding).
    pub orientation: u8,
    /// Bands of the decoded image (1 grey, 2 grey + alpha, 3 RGB, 4 RGBA or CMYK).
    pub bands: u32,
    /// Bytes per sample: 1, or 2 for 16-bit PNGs.
    pub sample_bytes: u32,
    /// The JPEG markers, for JPEG originals.
    pub jpeg: Option<Layout>,
}

/// A render's cost, known before it starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cost {
    /// Peak bytes the render is expected to hold.
    pub bytes: u64,
    /// The geometry it will produce.
    pub plan: Plan,
}

/// The cost of rendering `inspection` to `spec`, or [`ImageError::AvifTooLarge`] for an AVIF output
/// over `max_avif_pixels`.
pub fn estimate(
    inspection: &Inspection,
    spec: &RenderSpec,
    max_avif_pixels: u64,
) -> Result<Cost, ImageError> {
    let plan = geometry::plan(
        &spec.version,
        inspection.stored,
        inspection.orientation,
        spec.enlarge,
    );
    if spec.format == Format::Avif && plan.output.pixels() > max_avif_pixels {
        return Err(ImageError::AvifTooLarge);
    }
    let per_pixel = u64::from(inspection.bands.max(1)) * u64::from(inspection.sample_bytes.max(1));
    let decode = match (&inspection.jpeg, inspection.format) {
        (Some(layout), Format::Jpeg) => {
            let s = u64::from(plan.shrink.max(1));
            let w = u64::from(inspection.stored.width).div_ceil(s);
            let h = u64::from(inspection.stored.height).div_ceil(s);
            w.saturating_mul(h).saturating_mul(per_pixel) + layout.coefficient_bytes()
        }
        _ => inspection.stored.pixels().saturating_mul(per_pixel),
    };
    let resize = plan.resized.pixels().saturating_mul(2 * WORKING_BPP);
    let encoder_bpp = if spec.format == Format::Avif {
        WORKING_BPP + AVIF_ENCODER_BPP
    } else {
        WORKING_BPP
    };
    let encode = plan.output.pixels().saturating_mul(encoder_bpp);
    Ok(Cost {
        bytes: OVERHEAD
            .saturating_add(decode)
            .saturating_add(resize)
            .saturating_add(encode),
        plan,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::fixtures::spec;
    use crate::image::markers::Component;
    use crate::request::Version;

    fn jpeg(w: u32, h: u32, progressive: bool) -> Inspection {
        Inspection {
            format: Format::Jpeg,
            stored: Size::new(w, h),
            orientation: 1,
            bands: 3,
            sample_bytes: 1,
            jpeg: Some(Layout {
                width: w,
                height: h,
                components: vec![
                    Component { h: 2, v: 2 },
                    Component { h: 1, v: 1 },
                    Component { h: 1, v: 1 },
                ],
                progressive,
                scans: if progressive { 10 } else { 1 },
            }),
        }
    }

    #[test]
    fn a_baseline_fit_costs_its_shrunk_decode() {
        // 3000x2000 -> w300: shrink 8 decodes 375x250 RGB.
        let c = estimate(
            &jpeg(3000, 2000, false),
            &spec(Version::Width(300), Format::Jpeg),
            u64::MAX,
        )
        .expect("cost");
        assert_eq!(c.plan.shrink, 8);
        let expected = OVERHEAD + 375 * 250 * 3 + 300 * 200 * 8 + 300 * 200 * 4;
        assert_eq!(c.bytes, expected);
    }

    /// A progressive JPEG holds its whole coefficient image whatever the shrink: a 6000x6000 4:2:0
    /// costs over 100 MB even for a thumbnail.
    #[test]
    fn a_progressive_jpeg_pays_for_every_coefficient() {
        let v = spec(Version::Width(100), Format::Jpeg);
        let baseline = estimate(&jpeg(6000, 6000, false), &v, u64::MAX).expect("cost");
        let progressive = estimate(&jpeg(6000, 6000, true), &v, u64::MAX).expect("cost");
        let coefficients = progressive.bytes - baseline.bytes;
        assert_eq!(coefficients, (750 * 750 + 2 * 375 * 375) * 128);
        assert!(coefficients > 100_000_000, "{coefficients}");
    }

    #[test]
    fn other_formats_decode_at_full_size() {
        let png = Inspection {
            format: Format::Png,
            stored: Size::new(4000, 3000),
            orientation: 1,
            bands: 4,
            sample_bytes: 2,
            jpeg: None,
        };
        let c = estimate(&png, &spec(Version::Width(400), Format::Png), u64::MAX).expect("cost");
        assert!(c.bytes >= 4000 * 3000 * 4 * 2, "{}", c.bytes);
    }

    #[test]
    fn avif_outputs_over_the_ceiling_are_refused_before_anything_else() {
        let big = jpeg(6000, 4000, false);
        assert_eq!(
            estimate(&big, &spec(Version::FullSize, Format::Avif), 2048 * 2048),
            Err(ImageError::AvifTooLarge)
        );
        // The same size in JPEG, or a small AVIF, is fine.
        assert!(estimate(&big, &spec(Version::FullSize, Format::Jpeg), 2048 * 2048).is_ok());
        let small = estimate(&big, &spec(Version::Width(2048), Format::Avif), 2048 * 2048)
            .expect("2048x1366 is under 2048x2048");
        assert_eq!(small.plan.output, Size::new(2048, 1365));
        // The ceiling is on the output: a sideways EXIF orientation counts the turned size.
        let mut turned = jpeg(1000, 5000, false);
        turned.orientation = 6;
        assert_eq!(
            estimate(
                &turned,
                &spec(Version::Height(1000), Format::Avif),
                2048 * 2048
            ),
            Err(ImageError::AvifTooLarge),
            "1000x5000 stored, turned: h1000 is 5000x1000, 5 MP"
        );
        let c = estimate(
            &turned,
            &spec(Version::Height(800), Format::Avif),
            2048 * 2048,
        )
        .expect("h800 is 4000x800, 3.2 MP");
        assert_eq!(c.plan.output, Size::new(4000, 800));
    }
}
