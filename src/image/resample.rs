//! Step 3c of the request flow, the resampling half of rendering: the resize after shrink-on-load,
//! done on 8-bit pixels in memory with `fast_image_resize` (SIMD separable convolution, Lanczos3).
//!
//! No libvips here. [`super::render::render`] decodes (with the JPEG `shrink` / WebP `scale` doing the
//! bulk of the reduction; JPEG pixels through [`super::jpeg`]) the upright image in one piece on the
//! render thread and hands its interleaved bytes to [`resample`]; it wraps the bytes that come back
//! as a libvips image again for the colour conversion, smart crop and encoder. A centre crop is folded into the resize as a
//! [`Window`] of the source, so only the output's own pixels are computed.
//!
//! Why not libvips' `resize`: on this machine's libvips 8.14.1 its `reduce` (plus the ORC code it
//! JIT-compiles per call) was the largest cost after the JPEG decode itself. The resample here costs
//! ~5 M instructions for 375×250 → 300×200 and ~9 M for the 375×500 window → 300×400 of a cover
//! crop (callgrind). With the render-thread decode that came with it (see `vips.rs`), CPU per render
//! of a 3000×2000 q90 JPEG went from 40.3 to 36.7 ms (fit to w300) and from 53.7 to 48.2 ms (cover to
//! 300×400), in-process, interleaved. In the first trial Lanczos3 cost here what Catmull-Rom cost
//! (34.0 vs 34.8 ms per fit render, within noise), so the sharper kernel is free.
//!
//! [`upright`] applies an EXIF orientation to decoded pixels (the JPEG path decodes them itself).
//!
//! Alpha (2 or 4 bands with an alpha channel) is premultiplied for the convolution and divided out
//! after it, so transparent pixels' colour never bleeds into visible edges. Four bands without alpha
//! (CMYK) are resized as four plain channels.

use std::cell::RefCell;

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{
    FilterType, ImageBufferError, PixelType, ResizeAlg, ResizeError, ResizeOptions, Resizer,
};

use super::geometry::{CropBox, Size};

/// A resizer's scratch buffers (the premultiplied copy and the horizontal pass) above this size are
/// released after the call instead of kept for the thread's next render.
const KEEP_SCRATCH_BYTES: usize = 4 << 20;

thread_local! {
    /// One resizer per blocking thread: its scratch buffers are reused from render to render.
    static RESIZER: RefCell<Resizer> = RefCell::new(Resizer::new());
}

/// Why a resample failed. Every variant is a bug or an unsupported layout on our side, never the
/// original's fault: the caller reports it as [`super::ImageError::Internal`].
#[derive(Debug, thiserror::Error)]
pub enum ResampleError {
    /// Only 1 to 4 interleaved 8-bit bands are handled here.
    #[error("{0} bands of 8 bits cannot be resampled")]
    Bands(u8),
    /// The pixel buffer does not match the size it claims.
    #[error("pixel buffer: {0}")]
    Buffer(#[from] ImageBufferError),
    /// The pixel buffer's length is not width × height × bands.
    #[error("pixel buffer of {0} bytes does not match its size")]
    Length(usize),
    /// The resizer refused the source, the window or the output.
    #[error("resize: {0}")]
    Resize(#[from] ResizeError),
}

/// Interleaved 8-bit pixels, row by row without padding.
#[derive(Clone, Copy, Debug)]
pub struct Pixels<'a> {
    /// `size.width × size.height × bands` bytes.
    pub data: &'a [u8],
    /// Width and height.
    pub size: Size,
    /// 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA, or CMYK when `alpha` is false).
    pub bands: u8,
    /// Whether the last band is alpha.
    pub alpha: bool,
}

/// The part of the source that is resized to the whole output, in source pixels (fractional edges
/// allowed).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Window {
    /// Left edge.
    pub left: f64,
    /// Top edge.
    pub top: f64,
    /// Width.
    pub width: f64,
    /// Height.
    pub height: f64,
}

impl Window {
    /// The source window that yields exactly `crop` of the image resized from `source` to `resized`:
    /// the crop box scaled back by the resize factors, so every output pixel samples the same source
    /// position it would have had in a full resize followed by the cut.
    pub fn for_crop(source: Size, resized: Size, crop: CropBox) -> Window {
        let (sw, sh) = (f64::from(source.width), f64::from(source.height));
        let sx = sw / f64::from(resized.width.max(1));
        let sy = sh / f64::from(resized.height.max(1));
        let left = (f64::from(crop.left) * sx).min(sw);
        let top = (f64::from(crop.top) * sy).min(sh);
        // Clamped so rounding can never put the far edge a hair outside the source (an error there).
        Window {
            left,
            top,
            width: (f64::from(crop.width) * sx).min(sw - left),
            height: (f64::from(crop.height) * sy).min(sh - top),
        }
    }
}

fn pixel_type(bands: u8) -> Result<PixelType, ResampleError> {
    match bands {
        1 => Ok(PixelType::U8),
        2 => Ok(PixelType::U8x2),
        3 => Ok(PixelType::U8x3),
        4 => Ok(PixelType::U8x4),
        other => Err(ResampleError::Bands(other)),
    }
}

/// `src` (stored as EXIF `orientation` 1–8 says) turned upright: the same permutation of pixels as
/// libvips' `autorot`. Returns the pixels and their size (sides swapped for 5–8); any other
/// orientation value is taken as 1, as libvips does.
pub fn upright(src: &Pixels<'_>, orientation: u8) -> Result<(Vec<u8>, Size), ResampleError> {
    let (w, h) = (src.size.width as usize, src.size.height as usize);
    let b = usize::from(src.bands);
    if w.checked_mul(h).and_then(|p| p.checked_mul(b)) != Some(src.data.len()) {
        return Err(ResampleError::Length(src.data.len()));
    }
    let swaps = (5..=8).contains(&orientation);
    let (uw, uh) = if swaps { (h, w) } else { (w, h) };
    let mut out = Vec::with_capacity(uw * uh * b);
    for y in 0..uh {
        for x in 0..uw {
            // Where upright (x, y) is stored.
            let (sx, sy) = match orientation {
                2 => (w - 1 - x, y),
                3 => (w - 1 - x, h - 1 - y),
                4 => (x, h - 1 - y),
                5 => (y, x),
                6 => (y, h - 1 - x),
                7 => (w - 1 - y, h - 1 - x),
                8 => (w - 1 - y, x),
                _ => (x, y),
            };
            let at = (sy * w + sx) * b;
            out.extend_from_slice(&src.data[at..at + b]);
        }
    }
    let size = if swaps {
        src.size.transposed()
    } else {
        src.size
    };
    Ok((out, size))
}

/// Resizes `src` (or the `window` of it) to exactly `out`, Lanczos3, and returns the output's
/// interleaved bytes (`out.width × out.height × bands`).
pub fn resample(
    src: &Pixels<'_>,
    window: Option<Window>,
    out: Size,
) -> Result<Vec<u8>, ResampleError> {
    let kind = pixel_type(src.bands)?;
    let from = ImageRef::new(src.size.width, src.size.height, src.data, kind)?;
    let mut to = Image::new(out.width, out.height, kind);
    let mut options = ResizeOptions::new()
        .resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3))
        .use_alpha(src.alpha);
    if let Some(w) = window {
        options = options.crop(w.left, w.top, w.width, w.height);
    }
    RESIZER.with(|cell| -> Result<(), ResampleError> {
        let mut resizer = cell.borrow_mut();
        let result = resizer.resize(&from, &mut to, &options);
        if resizer.size_of_internal_buffers() > KEEP_SCRATCH_BYTES {
            resizer.reset_internal_buffers();
        }
        Ok(result?)
    })?;
    Ok(to.into_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upright_turns_each_orientation_and_refuses_a_short_buffer() {
        // 3×2 grey, stored: 0 1 2 / 3 4 5.
        let data = [0u8, 1, 2, 3, 4, 5];
        let src = plain(&data, Size::new(3, 2), 1);
        let cases: [(u8, &[u8], (u32, u32)); 8] = [
            (1, &[0, 1, 2, 3, 4, 5], (3, 2)),
            (2, &[2, 1, 0, 5, 4, 3], (3, 2)),
            (3, &[5, 4, 3, 2, 1, 0], (3, 2)),
            (4, &[3, 4, 5, 0, 1, 2], (3, 2)),
            (5, &[0, 3, 1, 4, 2, 5], (2, 3)),
            (6, &[3, 0, 4, 1, 5, 2], (2, 3)),
            (7, &[5, 2, 4, 1, 3, 0], (2, 3)),
            (8, &[2, 5, 1, 4, 0, 3], (2, 3)),
        ];
        for (orientation, want, (w, h)) in cases {
            let (got, size) = upright(&src, orientation).expect("upright");
            assert_eq!(got, want, "orientation {orientation}");
            assert_eq!(size, Size::new(w, h), "orientation {orientation}");
        }
        // Three bands move together.
        let rgb = [1u8, 2, 3, 4, 5, 6];
        let (got, _) = upright(&plain(&rgb, Size::new(2, 1), 3), 2).expect("upright");
        assert_eq!(got, [4, 5, 6, 1, 2, 3]);
        assert!(matches!(
            upright(&plain(&data[..5], Size::new(3, 2), 1), 6),
            Err(ResampleError::Length(5))
        ));
    }

    /// A smooth RGB(A) test card: red rises left to right, green top to bottom, blue is their mix.
    fn card(size: Size, bands: u8) -> Vec<u8> {
        let mut v = Vec::new();
        for y in 0..size.height {
            for x in 0..size.width {
                let r = (x * 255 / size.width.max(1)) as u8;
                let g = (y * 255 / size.height.max(1)) as u8;
                let px = [r, g, r / 2 + g / 2, 255];
                v.extend_from_slice(&px[..usize::from(bands)]);
            }
        }
        v
    }

    /// `data` as `size` pixels of `bands` bands, none of them alpha.
    fn plain(data: &[u8], size: Size, bands: u8) -> Pixels<'_> {
        Pixels {
            data,
            size,
            bands,
            alpha: false,
        }
    }

    fn at(data: &[u8], size: Size, bands: u8, x: u32, y: u32) -> &[u8] {
        let b = usize::from(bands);
        let i = (y as usize * size.width as usize + x as usize) * b;
        &data[i..i + b]
    }

    #[test]
    fn exact_output_sizes_for_every_band_count() {
        let src_size = Size::new(375, 250);
        for bands in 1..=4u8 {
            let data = card(src_size, bands);
            let px = Pixels {
                data: &data,
                size: src_size,
                bands,
                alpha: bands == 2 || bands == 4,
            };
            for out in [
                Size::new(300, 200),
                Size::new(1, 1),
                Size::new(377, 251),
                Size::new(7, 250),
            ] {
                let got = resample(&px, None, out).expect("resample");
                assert_eq!(
                    got.len(),
                    out.pixels() as usize * usize::from(bands),
                    "{bands} bands -> {out:?}"
                );
            }
        }
    }

    #[test]
    fn a_smooth_gradient_keeps_its_values() {
        // Downscaling a linear ramp must give (nearly) the ramp's value at each output pixel's centre.
        let src_size = Size::new(400, 300);
        let data = card(src_size, 3);
        let px = plain(&data, src_size, 3);
        let out = Size::new(100, 75);
        let got = resample(&px, None, out).expect("resample");
        let p = at(&got, out, 3, 50, 30);
        // Centre of output pixel 50 is source x = 50.5 × 4 = 202 → red ≈ 202 × 255 / 400 ≈ 128.8.
        assert!((i32::from(p[0]) - 129).abs() <= 2, "red {}", p[0]);
        // Centre of output row 30 is source y = 30.5 × 4 = 122 → green ≈ 122 × 255 / 300 ≈ 103.7.
        assert!((i32::from(p[1]) - 104).abs() <= 2, "green {}", p[1]);
    }

    #[test]
    fn a_window_equals_the_same_cut_of_the_full_resize() {
        let src_size = Size::new(750, 500);
        let data = card(src_size, 3);
        let px = plain(&data, src_size, 3);
        let resized = Size::new(600, 400);
        let crop = CropBox {
            left: 150,
            top: 0,
            width: 300,
            height: 400,
        };
        let full = resample(&px, None, resized).expect("full");
        let out = Size::new(crop.width, crop.height);
        let cut = resample(&px, Some(Window::for_crop(src_size, resized, crop)), out).expect("cut");
        // Away from the window's edges (where the full resize can read pixels outside the window)
        // the two agree to rounding.
        for (x, y) in [(10, 10), (150, 200), (289, 389), (0, 200), (299, 0)] {
            let a = at(&cut, out, 3, x, y);
            let b = at(&full, resized, 3, x + crop.left, y + crop.top);
            for band in 0..3 {
                assert!(
                    (i32::from(a[band]) - i32::from(b[band])).abs() <= 2,
                    "({x},{y}) band {band}: cut {a:?} full {b:?}"
                );
            }
        }
        // And the window really moved: the cut's left column is the full resize's column 150, far
        // redder than its column 0.
        assert!(at(&cut, out, 3, 0, 200)[0] > at(&full, resized, 3, 0, 200)[0] + 50);
    }

    #[test]
    fn windows_stay_inside_the_source_for_awkward_ratios() {
        for (sw, sh, rw, rh) in [
            (375, 250, 600, 400),
            (1000, 667, 300, 200),
            (333, 1001, 97, 293),
            (7, 3, 1000, 429),
        ] {
            let (source, resized) = (Size::new(sw, sh), Size::new(rw, rh));
            for (cw, ch) in [(rw, rh), (rw / 2, rh), (rw, rh / 3), (1, 1)] {
                let crop = CropBox {
                    left: rw - cw,
                    top: rh - ch,
                    width: cw,
                    height: ch,
                };
                let w = Window::for_crop(source, resized, crop);
                assert!(w.left >= 0.0 && w.top >= 0.0, "{w:?}");
                assert!(
                    w.left + w.width <= f64::from(sw),
                    "{source:?} {crop:?} {w:?}"
                );
                assert!(
                    w.top + w.height <= f64::from(sh),
                    "{source:?} {crop:?} {w:?}"
                );
                let data = vec![128u8; source.pixels() as usize];
                let px = plain(&data, source, 1);
                let got = resample(&px, Some(w), Size::new(cw, ch)).expect("in bounds");
                assert!(got.iter().all(|&v| v == 128), "flat stays flat");
            }
        }
    }

    #[test]
    fn transparent_pixels_do_not_bleed_their_colour() {
        // Left half opaque white, right half fully transparent *red*: after a downscale the boundary
        // pixels must stay white (premultiplied), never pink.
        let size = Size::new(64, 8);
        let mut data = Vec::new();
        for _y in 0..size.height {
            for x in 0..size.width {
                if x < 32 {
                    data.extend_from_slice(&[255, 255, 255, 255]);
                } else {
                    data.extend_from_slice(&[255, 0, 0, 0]);
                }
            }
        }
        let px = Pixels {
            data: &data,
            size,
            bands: 4,
            alpha: true,
        };
        let out = Size::new(16, 2);
        let got = resample(&px, None, out).expect("resample");
        let edge = at(&got, out, 4, 7, 1);
        assert!(
            edge[3] > 0 && edge[3] < 255,
            "the edge is partly transparent: {edge:?}"
        );
        assert!(
            edge[1] >= 250 && edge[2] >= 250,
            "and white, not pink: {edge:?}"
        );
        // Without alpha handling the same pixel does turn pink: the option is what keeps it white.
        let plain = resample(&Pixels { alpha: false, ..px }, None, out).expect("resample");
        let pink = at(&plain, out, 4, 7, 1);
        assert!(
            pink[1] < 250,
            "four plain channels mix the hidden red in: {pink:?}"
        );
    }

    #[test]
    fn wrong_layouts_are_errors_not_panics() {
        let data = vec![0u8; 10];
        let short = plain(&data, Size::new(4, 4), 3);
        assert!(matches!(
            resample(&short, None, Size::new(2, 2)),
            Err(ResampleError::Buffer(_))
        ));
        let five = plain(&data, Size::new(1, 2), 5);
        assert!(matches!(
            resample(&five, None, Size::new(1, 1)),
            Err(ResampleError::Bands(5))
        ));
        let ok = plain(&data, Size::new(1, 10), 1);
        let outside = Window {
            left: 0.0,
            top: 5.0,
            width: 1.0,
            height: 20.0,
        };
        assert!(matches!(
            resample(&ok, Some(outside), Size::new(1, 2)),
            Err(ResampleError::Resize(_))
        ));
    }
}
