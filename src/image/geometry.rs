//! Step 3c of the request flow, the arithmetic half of rendering: pure size calculations, no libvips.
//!
//! [`super::vips`] reads an original's header, then asks this module what to do with it: how far the
//! decoder may shrink on load ([`Plan::shrink`]), what size the resize must reach ([`Plan::resized`]),
//! where the crop window sits ([`Plan::crop`]) and what comes out ([`Plan::output`]), for every
//! [`Version`] form (docs/urls.md). Keeping it free of FFI lets proptest check the invariants below on
//! millions of sizes in a second:
//!
//! - every output side is at least 1;
//! - `Cover` outputs are exactly the requested W×H (when `enlarge` is on, or the original is big enough);
//! - `Width`/`Height` keep the aspect ratio within rounding;
//! - with `enlarge = false` nothing is ever larger than the original;
//! - the shrink-on-load factor never makes the decoded image smaller than the resize target.
//!
//! All sizes here are in the *displayed* orientation (after EXIF orientation is applied), except
//! [`Plan::shrink`], which the JPEG decoder applies to the stored pixels: [`plan`] swaps width and
//! height for the sideways orientations (5–8) before choosing it.

use crate::request::Version;

/// A width × height in pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Size {
    /// Pixels across.
    pub width: u32,
    /// Pixels down.
    pub height: u32,
}

impl Size {
    /// A size.
    pub const fn new(width: u32, height: u32) -> Size {
        Size { width, height }
    }

    /// The same size with the sides exchanged (what a 90° rotation does).
    pub const fn transposed(self) -> Size {
        Size {
            width: self.height,
            height: self.width,
        }
    }

    /// width × height, without overflow.
    pub const fn pixels(self) -> u64 {
        self.width as u64 * self.height as u64
    }
}

/// A crop window inside the resized image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropBox {
    /// Left edge.
    pub left: u32,
    /// Top edge.
    pub top: u32,
    /// Window width (= the output width).
    pub width: u32,
    /// Window height (= the output height).
    pub height: u32,
}

/// What [`super::render::render`] must do to one original for one version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// JPEG shrink-on-load factor (1, 2, 4 or 8): the largest that still decodes at least
    /// [`Plan::resized`] pixels in both directions, so the resize only ever reduces (or keeps) and never
    /// has to invent detail the full decode would have had.
    pub shrink: u32,
    /// The size the image is resized to (displayed orientation), before any crop.
    pub resized: Size,
    /// For `Cover`, the centred window cut from `resized` (smart-crop gravities choose their own
    /// position, with the same size). `None` when nothing is cut.
    pub crop: Option<CropBox>,
    /// The final size.
    pub output: Size,
}

/// EXIF orientations 5–8 store the picture sideways: the displayed width is the stored height.
pub fn swaps_sides(orientation: u8) -> bool {
    (5..=8).contains(&orientation)
}

/// `a * b / c` rounded half up, in u64 (the inputs are u32, so nothing overflows), at least 1 and at
/// most `u32::MAX`. `c` must not be 0.
fn mul_div_round(a: u32, b: u32, c: u32) -> u32 {
    let c = u64::from(c.max(1));
    let v = (u64::from(a) * u64::from(b) + c / 2) / c;
    u32::try_from(v).unwrap_or(u32::MAX).max(1)
}

/// The size a version asks for, before any crop, and the size that comes out.
///
/// `source` is the original's displayed size. Both sides of `source` must be at least 1 (the caller's
/// header check guarantees it; a 0 is treated as 1 here rather than dividing by zero).
fn layout(version: &Version, source: Size, enlarge: bool) -> (Size, Size) {
    let sw = source.width.max(1);
    let sh = source.height.max(1);
    match *version {
        Version::FullSize => (Size::new(sw, sh), Size::new(sw, sh)),
        Version::Width(w) => {
            let w = if enlarge { w.max(1) } else { w.clamp(1, sw) };
            let h = mul_div_round(sh, w, sw);
            // Rounding a very flat original can still land above the original height when !enlarge;
            // the clamp keeps the "never larger" promise exact.
            let h = if enlarge { h } else { h.min(sh) };
            (Size::new(w, h), Size::new(w, h))
        }
        Version::Height(h) => {
            let h = if enlarge { h.max(1) } else { h.clamp(1, sh) };
            let w = mul_div_round(sw, h, sh);
            let w = if enlarge { w } else { w.min(sw) };
            (Size::new(w, h), Size::new(w, h))
        }
        Version::Cover { width, height } => {
            let (bw, bh) = (width.max(1), height.max(1));
            // Without enlarging, a box bigger than the original shrinks uniformly until it fits, so the
            // result keeps the requested shape (a square avatar stays square) instead of being cut to
            // some other aspect ratio.
            let (bw, bh) = if enlarge || (bw <= sw && bh <= sh) {
                (bw, bh)
            } else if u64::from(sw) * u64::from(bh) <= u64::from(sh) * u64::from(bw) {
                // The width is the tighter limit: factor sw / bw.
                (sw, mul_div_round(bh, sw, bw).min(sh))
            } else {
                (mul_div_round(bw, sh, bh).min(sw), sh)
            };
            // Scale to cover the box: the side that is relatively shorter matches the box exactly, the
            // other one is at least as long as the box.
            let resized = if u64::from(sw) * u64::from(bh) >= u64::from(sh) * u64::from(bw) {
                Size::new(mul_div_round(sw, bh, sh).max(bw), bh)
            } else {
                Size::new(bw, mul_div_round(sh, bw, sw).max(bh))
            };
            (resized, Size::new(bw, bh))
        }
    }
}

/// The JPEG shrink-on-load factor: the largest of 8, 4, 2, 1 that keeps the decoded image (stored
/// orientation) at least `needed` on both sides. libvips 8.14 rounds a shrunk side down
/// (`floor(stored / s)`, checked in `render::tests::loader_options_take_effect`), so the test is
/// `stored >= needed × s`.
pub fn jpeg_shrink(stored: Size, needed: Size) -> u32 {
    [8u32, 4, 2]
        .into_iter()
        .find(|&s| {
            u64::from(stored.width) >= u64::from(needed.width) * u64::from(s)
                && u64::from(stored.height) >= u64::from(needed.height) * u64::from(s)
        })
        .unwrap_or(1)
}

/// The WebP scale-on-load factor (≤ 1): libwebp scales to any size while decoding, so ask for exactly
/// the resize target (the larger of the two ratios, so neither side comes out short of `needed`).
pub fn webp_scale(stored: Size, needed: Size) -> f64 {
    let x = f64::from(needed.width) / f64::from(stored.width.max(1));
    let y = f64::from(needed.height) / f64::from(stored.height.max(1));
    x.max(y).min(1.0)
}

/// The centred crop window of `output` inside `resized`.
pub fn centre_crop(resized: Size, output: Size) -> CropBox {
    let width = output.width.min(resized.width);
    let height = output.height.min(resized.height);
    CropBox {
        left: (resized.width - width) / 2,
        top: (resized.height - height) / 2,
        width,
        height,
    }
}

/// Everything [`super::render::render`] needs for one original (`stored`: its size as the pixels are
/// stored, `orientation`: its EXIF orientation 1–8, anything else meaning 1).
pub fn plan(version: &Version, stored: Size, orientation: u8, enlarge: bool) -> Plan {
    let sideways = swaps_sides(orientation);
    let source = if sideways {
        stored.transposed()
    } else {
        stored
    };
    let (resized, output) = layout(version, source, enlarge);
    let needed_stored = if sideways {
        resized.transposed()
    } else {
        resized
    };
    let crop = (resized != output).then(|| centre_crop(resized, output));
    Plan {
        shrink: jpeg_shrink(stored, needed_stored),
        resized,
        crop,
        output,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cover(w: u32, h: u32) -> Version {
        Version::Cover {
            width: w,
            height: h,
        }
    }

    #[test]
    fn bench_case_fit_uses_shrink_8() {
        let p = plan(&Version::Width(300), Size::new(3000, 2000), 1, true);
        assert_eq!(p.output, Size::new(300, 200));
        assert_eq!(p.resized, p.output);
        assert_eq!(p.crop, None);
        assert_eq!(p.shrink, 8);
    }

    #[test]
    fn bench_case_cover_uses_shrink_4_and_crops_centre() {
        let p = plan(&cover(300, 400), Size::new(3000, 2000), 1, true);
        assert_eq!(p.output, Size::new(300, 400));
        assert_eq!(p.resized, Size::new(600, 400));
        assert_eq!(
            p.crop,
            Some(CropBox {
                left: 150,
                top: 0,
                width: 300,
                height: 400
            })
        );
        // 2000 / 4 = 500 >= 400, 2000 / 8 = 250 < 400.
        assert_eq!(p.shrink, 4);
    }

    #[test]
    fn sideways_orientation_swaps_before_choosing_shrink() {
        // Stored 2000x3000, displayed 3000x2000 (orientation 6). h400 needs 600x400 displayed,
        // 400x600 stored: 3000/4 = 750 >= 600, 3000/8 = 375 < 600.
        let p = plan(&Version::Height(400), Size::new(2000, 3000), 6, true);
        assert_eq!(p.output, Size::new(600, 400));
        assert_eq!(p.shrink, 4);
        let upright = plan(&Version::Height(400), Size::new(2000, 3000), 1, true);
        assert_eq!(upright.output, Size::new(267, 400));
    }

    #[test]
    fn full_size_is_the_original() {
        let p = plan(&Version::FullSize, Size::new(640, 480), 8, true);
        assert_eq!(p.output, Size::new(480, 640));
        assert_eq!(p.shrink, 1);
        assert_eq!(p.crop, None);
    }

    #[test]
    fn no_enlarge_caps_width_and_keeps_cover_shape() {
        let p = plan(&Version::Width(1000), Size::new(400, 300), 1, false);
        assert_eq!(p.output, Size::new(400, 300));
        let p = plan(&cover(300, 300), Size::new(200, 100), 1, false);
        assert_eq!(p.output, Size::new(100, 100));
        assert_eq!(p.resized, Size::new(200, 100));
        let p = plan(&cover(300, 300), Size::new(200, 100), 1, true);
        assert_eq!(p.output, Size::new(300, 300));
        assert_eq!(p.resized, Size::new(600, 300));
    }

    #[test]
    fn extreme_aspect_never_yields_zero() {
        let p = plan(&Version::Width(1), Size::new(16384, 1), 1, true);
        assert_eq!(p.output, Size::new(1, 1));
        let p = plan(&Version::Height(1), Size::new(1, 16384), 1, true);
        assert_eq!(p.output, Size::new(1, 1));
        let p = plan(&cover(1, 1), Size::new(16384, 1), 1, true);
        assert_eq!(p.output, Size::new(1, 1));
        assert_eq!(p.resized, Size::new(16384, 1));
    }

    #[test]
    fn webp_scale_reaches_the_target() {
        let s = webp_scale(Size::new(3000, 2000), Size::new(300, 200));
        assert!((s - 0.1).abs() < 1e-12);
        assert_eq!(webp_scale(Size::new(10, 10), Size::new(20, 20)), 1.0);
    }

    fn version() -> impl Strategy<Value = Version> {
        prop_oneof![
            (1u32..=99_999, 1u32..=99_999).prop_map(|(w, h)| cover(w, h)),
            (1u32..=99_999).prop_map(Version::Width),
            (1u32..=99_999).prop_map(Version::Height),
            Just(Version::FullSize),
        ]
    }

    fn size() -> impl Strategy<Value = Size> {
        (1u32..=16_384, 1u32..=16_384).prop_map(|(w, h)| Size::new(w, h))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20_000))]

        #[test]
        fn invariants(v in version(), stored in size(), orientation in 0u8..=9, enlarge: bool) {
            let p = plan(&v, stored, orientation, enlarge);
            let source = if swaps_sides(orientation) { stored.transposed() } else { stored };

            prop_assert!(p.output.width >= 1 && p.output.height >= 1);
            prop_assert!(p.resized.width >= p.output.width && p.resized.height >= p.output.height);
            prop_assert!([1, 2, 4, 8].contains(&p.shrink));

            // The decoded (shrunk) image is never smaller than the resize target.
            let needed = if swaps_sides(orientation) { p.resized.transposed() } else { p.resized };
            prop_assert!(u64::from(stored.width) / u64::from(p.shrink) >= u64::from(needed.width)
                || p.shrink == 1);
            prop_assert!(u64::from(stored.height) / u64::from(p.shrink) >= u64::from(needed.height)
                || p.shrink == 1);

            if let Some(c) = p.crop {
                prop_assert_eq!((c.width, c.height), (p.output.width, p.output.height));
                prop_assert!(c.left + c.width <= p.resized.width);
                prop_assert!(c.top + c.height <= p.resized.height);
            } else {
                prop_assert_eq!(p.resized, p.output);
            }

            if !enlarge {
                prop_assert!(p.output.width <= source.width && p.output.height <= source.height);
                prop_assert!(p.resized.width <= source.width && p.resized.height <= source.height);
            }

            match v {
                Version::Cover { width, height } => {
                    if enlarge || (width <= source.width && height <= source.height) {
                        prop_assert_eq!(p.output, Size::new(width, height));
                    } else {
                        // Shrunk uniformly: the aspect ratio is the requested one within rounding
                        // (cross-multiplied error under one pixel of the longer side).
                        let lhs = u64::from(p.output.width) * u64::from(height);
                        let rhs = u64::from(p.output.height) * u64::from(width);
                        prop_assert!(lhs.abs_diff(rhs) <= u64::from(width.max(height)));
                    }
                    // The resized image covers the output and keeps the source aspect within
                    // rounding.
                    let lhs = u64::from(p.resized.width) * u64::from(source.height);
                    let rhs = u64::from(p.resized.height) * u64::from(source.width);
                    prop_assert!(lhs.abs_diff(rhs) <= u64::from(source.width.max(source.height)));
                }
                Version::Width(w) => {
                    let w = if enlarge { w } else { w.min(source.width) };
                    prop_assert_eq!(p.output.width, w);
                    // Height within half a pixel of the exact ratio (or clamped to 1).
                    let exact = f64::from(source.height) * f64::from(w) / f64::from(source.width);
                    prop_assert!(
                        (f64::from(p.output.height) - exact).abs() <= 0.5 + 1e-9
                            || p.output.height == 1
                    );
                }
                Version::Height(h) => {
                    let h = if enlarge { h } else { h.min(source.height) };
                    prop_assert_eq!(p.output.height, h);
                    let exact = f64::from(source.width) * f64::from(h) / f64::from(source.height);
                    prop_assert!(
                        (f64::from(p.output.width) - exact).abs() <= 0.5 + 1e-9
                            || p.output.width == 1
                    );
                }
                Version::FullSize => prop_assert_eq!(p.output, source),
            }
        }
    }
}
