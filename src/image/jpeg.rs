//! Step 3c of the request flow, the decode of a JPEG original when its pixels go to [`super::resample`]:
//! libjpeg-turbo called directly (through `jpeg.c`, built by `build.rs`), the same `libjpeg.so.62`
//! libvips' `jpegload` calls, with the same settings, so the pixels are the ones libvips would give.
//!
//! Why not libvips' loader here: it decodes every column. For a cover crop of a landscape original
//! (W2 in `make bench`: 3000×2000 → `300x400`, half the columns unused) `jpeg_crop_scanline` skips the
//! inverse DCT, upsampling and colour conversion of the columns outside the crop; callgrind counts
//! 246 M instructions for `djpeg -scale 1/4` with that crop against 273 M without. A fit render also
//! loses libvips' region bookkeeping and its zero-filled buffer (~2 M instructions of ~188 M).
//!
//! libvips still reads the header (size, orientation, ICC profile, the limits in `vips.rs`), and
//! everything this decoder does not take — CMYK/YCCK, images that need no resample —
//! stays on libvips' loader: [`JpegError::Unsupported`] tells the caller to use it.
//! Warnings count as errors, as with libvips' `fail_on=warning`: a truncated or corrupt original is
//! [`JpegError::Corrupt`], never an image with made-up rows.

use std::os::raw::{c_int, c_long, c_uint, c_ulong};

use super::geometry::Size;
use super::Deadline;

/// Return codes of `is_jpeg_decode` (`jpeg.c`).
const OK: c_int = 0;
const UNSUPPORTED: c_int = 1;
const CORRUPT: c_int = 2;
const MISMATCH: c_int = 3;
const SCANS: c_int = 4;
const TIMEOUT: c_int = 5;

extern "C" {
    fn is_jpeg_decode(
        data: *const u8,
        len: c_ulong,
        denom: c_uint,
        expect_width: c_uint,
        expect_height: c_uint,
        bands: c_int,
        want_left: c_uint,
        want_width: c_uint,
        out: *mut u8,
        out_cap: usize,
        got_left: *mut c_uint,
        got_width: *mut c_uint,
        max_scans: c_uint,
        budget_ms: c_long,
    ) -> c_int;
}

/// Why the direct decode did not produce pixels.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JpegError {
    /// A layout this decoder does not read the way libvips does (CMYK, YCCK, odd component counts),
    /// or a scale libjpeg has no scaled transform for: decode with libvips instead.
    #[error("JPEG layout left to libvips")]
    Unsupported,
    /// libjpeg failed or warned: truncated or damaged data, the original's fault.
    #[error("corrupt or truncated JPEG data")]
    Corrupt,
    /// More scans than allowed (libjpeg's progress monitor counted them).
    #[error("JPEG over the scan limit")]
    TooManyScans,
    /// The render deadline passed during the decode.
    #[error("render deadline passed during the JPEG decode")]
    Timeout,
    /// The scaled size, band count or column band disagrees with what the caller expected (from
    /// libvips' header of the same bytes): a bug on our side.
    #[error("JPEG size disagrees with its header")]
    Mismatch,
}

/// All rows of a band of columns of the scaled image: `width × height × bands` bytes, row by row.
#[derive(Debug)]
pub struct Columns {
    /// The pixels.
    pub data: Vec<u8>,
    /// The first column held, in the scaled image.
    pub left: u32,
    /// How many columns each row holds.
    pub width: u32,
}

/// Decodes `original` at `1/denom` scale (1, 2, 4 or 8), which must come out `scaled` (libvips'
/// size for that shrink, rounded down) with `bands` (1: grey, 3: RGB) bands, keeping at least the
/// columns `left .. left + width`.
///
/// libjpeg widens the band to whole iMCUs (8 to 32 columns of the full-size image); [`Columns`] says
/// which columns it holds. Pixels at the band's two edges may differ from a full decode's (chroma
/// upsampling sees no neighbour there), so callers ask for a margin beyond what they read.
pub fn decode(
    original: &[u8],
    denom: u32,
    scaled: Size,
    bands: u8,
    left: u32,
    width: u32,
) -> Result<Columns, JpegError> {
    decode_within(
        original,
        denom,
        scaled,
        bands,
        (left, width),
        u32::MAX,
        &Deadline::none(),
    )
}

/// [`decode`], stopped by libjpeg's progress monitor at the first scan beyond `max_scans`
/// ([`JpegError::TooManyScans`]) or once `deadline` has passed ([`JpegError::Timeout`]).
pub fn decode_within(
    original: &[u8],
    denom: u32,
    scaled: Size,
    bands: u8,
    (left, width): (u32, u32),
    max_scans: u32,
    deadline: &Deadline,
) -> Result<Columns, JpegError> {
    let budget_ms: c_long = match deadline.remaining() {
        None => -1,
        Some(left) => c_long::try_from(left.as_millis()).unwrap_or(c_long::MAX),
    };
    if budget_ms == 0 {
        return Err(JpegError::Timeout);
    }
    if ![1, 2, 4, 8].contains(&denom) || !matches!(bands, 1 | 3) {
        return Err(JpegError::Unsupported);
    }
    let len = c_ulong::try_from(original.len()).map_err(|_| JpegError::Unsupported)?;
    // libjpeg rounds the scaled size up where libvips rounds down: room for one more column and row,
    // decoded and then dropped (see jpeg.c).
    let cap = usize::try_from(scaled.width)
        .ok()
        .zip(usize::try_from(scaled.height).ok())
        .and_then(|(w, h)| (w + 1).checked_mul(h + 1))
        .and_then(|p| p.checked_mul(usize::from(bands)))
        .ok_or(JpegError::Mismatch)?;
    let mut data: Vec<u8> = Vec::with_capacity(cap);
    let (mut got_left, mut got_width): (c_uint, c_uint) = (0, 0);
    // SAFETY: `original` is `len` readable bytes for the whole call; `data` has `cap` writable bytes
    // of spare capacity, and `is_jpeg_decode` writes at most `out_cap` bytes from `out` (it checks
    // that libjpeg's rows fit before reading one). The two out-parameters are plain integers it sets
    // only on success.
    let code = unsafe {
        is_jpeg_decode(
            original.as_ptr(),
            len,
            denom,
            scaled.width,
            scaled.height,
            c_int::from(bands),
            left,
            width,
            data.as_mut_ptr(),
            cap,
            &mut got_left,
            &mut got_width,
            max_scans,
            budget_ms,
        )
    };
    match code {
        OK => {}
        UNSUPPORTED => return Err(JpegError::Unsupported),
        CORRUPT => return Err(JpegError::Corrupt),
        SCANS => return Err(JpegError::TooManyScans),
        TIMEOUT => return Err(JpegError::Timeout),
        other => {
            debug_assert_eq!(other, MISMATCH, "a return code jpeg.c does not have");
            return Err(JpegError::Mismatch);
        }
    }
    let written = usize::try_from(got_width)
        .ok()
        .and_then(|w| w.checked_mul(usize::from(bands)))
        .and_then(|row| row.checked_mul(usize::try_from(scaled.height).ok()?))
        .filter(|&n| {
            n <= cap
                && got_width > 0
                && got_left
                    .checked_add(got_width)
                    .is_some_and(|r| r <= scaled.width)
        })
        .ok_or(JpegError::Mismatch)?;
    // SAFETY: on success `is_jpeg_decode` has left the `height` rows of `got_width × bands` bytes back
    // to back from the start of the buffer: `written` (≤ `cap`) initialised bytes.
    unsafe { data.set_len(written) };
    Ok(Columns {
        data,
        left: got_left,
        width: got_width,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::fixtures;

    fn full(original: &[u8], denom: u32, scaled: Size, bands: u8) -> Columns {
        decode(original, denom, scaled, bands, 0, scaled.width).expect("decode")
    }

    #[test]
    fn whole_decode_has_every_column() {
        let jpeg = fixtures::jpeg(640, 480, 85);
        let got = full(&jpeg, 4, Size::new(160, 120), 3);
        assert_eq!((got.left, got.width), (0, 160));
        assert_eq!(got.data.len(), 160 * 120 * 3);
    }

    #[test]
    fn a_column_band_is_widened_to_whole_blocks_and_holds_it() {
        let jpeg = fixtures::jpeg(640, 480, 85);
        let whole = full(&jpeg, 2, Size::new(320, 240), 3);
        let band = decode(&jpeg, 2, Size::new(320, 240), 3, 101, 50).expect("band");
        assert!(
            band.left <= 101 && band.left + band.width >= 151,
            "{band:?}"
        );
        assert!(
            band.width < 320,
            "the band is narrower than the image: {}",
            band.width
        );
        assert_eq!(band.data.len(), band.width as usize * 240 * 3);
        // Away from the band's edges the pixels are a full decode's.
        let (l, w) = (band.left as usize, band.width as usize);
        for y in [0usize, 57, 239] {
            let inner = &band.data[(y * w + 2) * 3..(y * w + w - 2) * 3];
            let same = &whole.data[(y * 320 + l + 2) * 3..(y * 320 + l + w - 2) * 3];
            assert_eq!(inner, same, "row {y}");
        }
    }

    #[test]
    fn libvips_rounded_down_size_drops_libjpegs_extra_column_and_row() {
        // 1001×667 at 1/8: libjpeg makes 126×84, libvips says 125×83.
        let jpeg = fixtures::jpeg(1001, 667, 80);
        let libjpeg = full(&jpeg, 8, Size::new(126, 84), 3);
        let libvips = full(&jpeg, 8, Size::new(125, 83), 3);
        assert_eq!((libvips.left, libvips.width), (0, 125));
        assert_eq!(libvips.data.len(), 125 * 83 * 3);
        for y in [0usize, 1, 40, 82] {
            assert_eq!(
                &libvips.data[y * 125 * 3..(y + 1) * 125 * 3],
                &libjpeg.data[y * 126 * 3..(y * 126 + 125) * 3],
                "row {y}"
            );
        }
        // A band reaching the right edge is cut there too.
        let band = decode(&jpeg, 8, Size::new(125, 83), 3, 100, 25).expect("band");
        assert_eq!(band.left + band.width, 125, "{band:?}");
        let w = band.width as usize;
        let l = band.left as usize;
        assert_eq!(
            &band.data[82 * w * 3 + 6..83 * w * 3],
            &libvips.data[(82 * 125 + l) * 3 + 6..(82 * 125 + l + w) * 3]
        );
    }

    #[test]
    fn grey_jpeg_decodes_to_one_band() {
        let jpeg = fixtures::jpeg_grey(64, 48);
        let got = full(&jpeg, 1, Size::new(64, 48), 1);
        assert_eq!(got.data.len(), 64 * 48);
    }

    #[test]
    fn wrong_expectations_are_mismatch_or_unsupported() {
        let jpeg = fixtures::jpeg(64, 48, 85);
        let size = Size::new(64, 48);
        assert_eq!(
            decode(&jpeg, 1, Size::new(62, 48), 3, 0, 62).map(|_| ()),
            Err(JpegError::Mismatch)
        );
        assert_eq!(
            decode(&jpeg, 1, size, 3, 60, 10).map(|_| ()),
            Err(JpegError::Mismatch)
        );
        assert_eq!(
            decode(&jpeg, 1, size, 1, 0, 64).map(|_| ()),
            Err(JpegError::Unsupported)
        );
        assert_eq!(
            decode(&jpeg, 3, size, 3, 0, 64).map(|_| ()),
            Err(JpegError::Unsupported)
        );
    }

    #[test]
    fn truncated_and_damaged_data_is_corrupt() {
        let jpeg = fixtures::jpeg(640, 480, 85);
        let size = Size::new(160, 120);
        // Cut in the middle of the entropy-coded data: libjpeg warns and pads with grey.
        let cut = &jpeg[..jpeg.len() / 2];
        assert_eq!(
            decode(cut, 4, size, 3, 0, 160).map(|_| ()),
            Err(JpegError::Corrupt)
        );
        // Only the EOI marker missing: every row decodes, the end of data still warns.
        let no_eoi = &jpeg[..jpeg.len() - 2];
        assert_eq!(
            decode(no_eoi, 4, size, 3, 0, 160).map(|_| ()),
            Err(JpegError::Corrupt)
        );
        // Garbage in the entropy-coded data.
        let mut damaged = jpeg.clone();
        let mid = damaged.len() / 2;
        for b in &mut damaged[mid..mid + 64] {
            *b = 0xFF;
        }
        assert_eq!(
            decode(&damaged, 4, size, 3, 0, 160).map(|_| ()),
            Err(JpegError::Corrupt)
        );
        // Not a JPEG at all.
        assert_eq!(
            decode(b"GIF89a not a jpeg", 1, size, 3, 0, 160).map(|_| ()),
            Err(JpegError::Corrupt)
        );
    }

    /// The progress monitor stops a decode at the first scan over the limit (the second line of
    /// defence behind the marker walk) and once the deadline has passed.
    #[test]
    fn the_progress_monitor_enforces_the_scan_limit_and_the_deadline() {
        let progressive = fixtures::jpeg_progressive(640, 480, 85);
        let size = Size::new(80, 60);
        let scans = crate::image::markers::walk(&progressive, u32::MAX)
            .expect("walk")
            .scans;
        assert!(
            scans > 3,
            "libjpeg's default progression has several scans: {scans}"
        );
        let within = |max_scans, deadline: &Deadline| {
            decode_within(&progressive, 8, size, 3, (0, 80), max_scans, deadline).map(|_| ())
        };
        assert_eq!(within(scans, &Deadline::none()), Ok(()));
        assert_eq!(
            within(scans - 1, &Deadline::none()),
            Err(JpegError::TooManyScans)
        );
        // A deadline already passed stops it before libjpeg starts.
        let passed = Deadline::after(std::time::Duration::ZERO);
        assert_eq!(within(scans, &passed), Err(JpegError::Timeout));
        // One that passes mid-decode: a full-scale decode of 12 MP takes far longer than 1 ms.
        let big = fixtures::jpeg(4000, 3000, 90);
        let deadline = Deadline::after(std::time::Duration::from_millis(1));
        assert_eq!(
            decode_within(&big, 1, Size::new(4000, 3000), 3, (0, 4000), 100, &deadline).map(|_| ()),
            Err(JpegError::Timeout)
        );
    }
}
