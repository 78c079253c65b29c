//! One decode for several versions of one original: the versions of an original that wait for a
//! render slot at the same time are rendered together ([`super::Processor`] groups them), from one
//! JPEG decode.
//!
//! The decode uses the smallest shrink-on-load factor any of them needs (the largest decoded image,
//! which serves the biggest version), full width, by libjpeg-turbo ([`super::jpeg`]); each version
//! is then resampled from it ([`super::resample`]) and finished like any render
//! (`render::finish`).
//!
//! **Identity.** A version whose own render would decode with the same factor comes out byte for
//! byte as its own render would: the same decoder, the same decoded pixels (its own render decodes
//! only the columns it needs, which the tests hold identical to the full decode), the same resample,
//! crop and encoder. A version whose own render would shrink more on load (a thumbnail next to a
//! zoom) is resampled from a larger decode instead: JPEG's scaled decode is itself a reduction, and
//! resampling from more pixels differs from it by rounding: measured on a 3000×2000 photograph, at
//! most 0.38 levels of 255 on average and 5 at worst (docs/performance.md). The test
//! `shared_decode_stays_within_tolerance` holds it under 1 on average and 8 at worst: never a
//! visible difference.
//!
//! Only the common case is shared: a JPEG that libjpeg-turbo decodes directly (1 or 3 components),
//! stored upright, every version a centre-gravity JPEG, PNG, WebP or GIF, and the decoded image small
//! enough to resample in memory. Anything else renders each version on its own.

use rs_vips::VipsImage;

use super::cost::Inspection;
use super::geometry::{self, Plan, Size};
use super::group::Member;
use super::jpeg::{self, JpegError};
use super::render::{self, finish, resample_space, RESAMPLE_MAX_PIXELS};
use super::resample::{self, Pixels, Window};
use super::vips::{
    check_limits, count_decode, cut, dims, ensure_init, header_of, label, load, resample_failed,
    Kind, Reduce,
};
use super::{Deadline, DecodeLimits, Gravity, ImageError, RenderSpec, Rendered};
use crate::request::Format;
use tokio::sync::oneshot;

/// A group leader's side of [`render_shared`]: where the members' results go, and the versions
/// that join while the decode is in use.
pub(super) struct Delivery<'a> {
    /// One sender per spec after the first (the leader's own), in order.
    pub(super) members: Vec<oneshot::Sender<Result<Rendered, ImageError>>>,
    /// Called after each batch: the versions that joined since (empty: none, and the group is now
    /// closed). Each is served from the decode when it is large enough for it; otherwise it is
    /// dropped, and its requester renders alone.
    pub(super) late: &'a mut dyn FnMut() -> Vec<Member>,
    /// Whether other versions of this original are being asked for right now, so latecomers are
    /// likely: a lone cropped version then takes the full-width decode they can share.
    pub(super) company: bool,
}

impl Delivery<'_> {
    /// Sends the members' results (every result but the first, which is kept) as soon as they are
    /// made, so no member waits for the late arrivals.
    fn send(&mut self, results: &mut Vec<Result<Rendered, ImageError>>) {
        for (tx, result) in self.members.drain(..).zip(results.drain(1..)) {
            // A member whose client went away no longer listens.
            let _ = tx.send(result);
        }
    }
}

/// What [`render_shared`] did.
pub(super) struct Shared {
    /// The results, in the order of the specs (with a [`Delivery`], only the leader's own: the
    /// members' went to them).
    pub(super) results: Vec<Result<Rendered, ImageError>>,
    /// Decode passes made.
    pub(super) decodes: u64,
    /// Late versions served from the decode.
    pub(super) late: u64,
}

/// Renders every spec from `original`, with one decode when the group can share it (see the module
/// doc), else each on its own. With a [`Delivery`] (a group leader) the shared decode is used even
/// for one spec (an uncropped one, or any when `company` is expected), so versions arriving
/// meanwhile can be served from it.
pub(super) fn render_shared(
    original: &[u8],
    specs: &[RenderSpec],
    limits: &DecodeLimits,
    deadline: &Deadline,
    inspected: &Inspection,
    mut group: Option<Delivery<'_>>,
) -> Shared {
    // One version alone renders its own way unless it leads a group that latecomers may join and
    // the full-width decode costs it nothing or company is expected: with a centre crop, its own
    // render decodes only the columns the crop keeps.
    let cropped = || {
        specs.iter().any(|s| {
            geometry::plan(
                &s.version,
                inspected.stored,
                inspected.orientation,
                s.enlarge,
            )
            .crop
            .is_some()
        })
    };
    let alone = specs.len() == 1
        && match &group {
            None => true,
            Some(g) => !g.company && cropped(),
        };
    if !alone && shareable(specs, inspected) {
        if let Some(mut done) = shared(original, specs, limits, deadline, group.as_mut()) {
            if let Some(group) = group.as_mut() {
                // Failed before the decode: the members' answers are still due.
                group.send(&mut done.results);
            }
            return done;
        }
    }
    if let Some(group) = group.as_mut() {
        // No shared decode to serve latecomers from: close the group now, so versions that joined
        // meanwhile (dropped here) render alone at once instead of waiting for this render.
        while !(group.late)().is_empty() {}
    }
    let mut results: Vec<_> = specs
        .iter()
        .map(|spec| render::render_within(original, spec, limits, deadline, inspected))
        .collect();
    if let Some(group) = group.as_mut() {
        group.send(&mut results);
    }
    Shared {
        decodes: specs.len() as u64,
        results,
        late: 0,
    }
}

/// Whether the group is one [`shared`] may take (the rest is checked once the header is open).
fn shareable(specs: &[RenderSpec], inspected: &Inspection) -> bool {
    inspected.format == Format::Jpeg
        && inspected.jpeg.is_some()
        && inspected.orientation <= 1
        && matches!(inspected.bands, 1 | 3)
        && specs
            .iter()
            .all(|s| s.gravity == Gravity::Centre && s.format != Format::Avif)
}

/// The shared render, or `None` when this original turns out not to fit it (the caller renders each
/// version on its own). A failure of the decode itself is every version's failure.
fn shared(
    original: &[u8],
    specs: &[RenderSpec],
    limits: &DecodeLimits,
    deadline: &Deadline,
    group: Option<&mut Delivery<'_>>,
) -> Option<Shared> {
    // A failed pass counts as one, as a failed render of a single version does.
    let all = |e: ImageError| {
        Some(Shared {
            results: vec![Err(e); specs.len()],
            decodes: 1,
            late: 0,
        })
    };
    if let Err(e) = ensure_init() {
        return all(e);
    }
    // SAFETY (both loads): the images are dropped before this returns; `original` outlives them.
    let opened = match unsafe { load(Kind::Jpeg, original, Reduce::None) } {
        Ok(img) => img,
        Err(e) => return all(e),
    };
    let stored = match header_of(Kind::Jpeg, &opened) {
        Ok(h) => Size::new(h.width, h.height),
        Err(e) => return all(e),
    };
    if let Err(e) = check_limits(stored, 1, limits) {
        return all(e);
    }
    // Each version's own plan; a version its own render would refuse is refused the same way.
    let plans: Vec<Result<Plan, ImageError>> = specs
        .iter()
        .map(|spec| {
            let plan = geometry::plan(&spec.version, stored, 1, spec.enlarge);
            check_limits(plan.resized, 1, limits)?;
            check_limits(plan.output, 1, limits)?;
            if plan.output.width.max(plan.output.height) > render::encoder_max_side(spec.format) {
                return Err(ImageError::SourceTooLarge);
            }
            Ok(plan)
        })
        .collect();
    let shrink = plans.iter().flatten().map(|p| p.shrink).min()?;
    let decoded = if shrink > 1 {
        match unsafe { load(Kind::Jpeg, original, Reduce::JpegShrink(shrink)) } {
            Ok(img) => img,
            Err(e) => return all(e),
        }
    } else {
        opened
    };
    let size = dims(&decoded).ok()?;
    let space = resample_space(&decoded)?;
    if size.pixels() > RESAMPLE_MAX_PIXELS {
        return None;
    }
    let bands = u8::try_from(decoded.get_bands()).ok()?;
    let columns = match jpeg::decode_within(
        original,
        shrink,
        size,
        bands,
        (0, size.width),
        limits.max_jpeg_scans,
        deadline,
    ) {
        Ok(columns) => columns,
        // A layout libjpeg-turbo leaves to libvips: each version on its own.
        Err(JpegError::Unsupported) => return None,
        Err(JpegError::Corrupt) => return all(ImageError::Undecodable),
        Err(JpegError::TooManyScans) => return all(ImageError::TooManyScans),
        Err(JpegError::Timeout) => return all(ImageError::Timeout),
        Err(e @ JpegError::Mismatch) => return all(ImageError::Internal(e.to_string())),
    };
    count_decode();
    let pixels = Pixels {
        data: &columns.data,
        size: Size::new(columns.width, size.height),
        bands,
        alpha: false,
    };
    let mut results = specs
        .iter()
        .zip(plans)
        .map(|(spec, plan)| {
            let plan = plan?;
            let img = version_of(&pixels, &decoded, space, &plan)?;
            finish(img, plan.output, spec, true, deadline)
        })
        .collect();
    let mut served = 0;
    if let Some(group) = group {
        group.send(&mut results);
        loop {
            let members = (group.late)();
            if members.is_empty() {
                break;
            }
            for m in members {
                let plan = geometry::plan(&m.spec.version, stored, 1, m.spec.enlarge);
                // A version this decode is too small for (its own render would shrink less), or
                // one its own render would refuse: its requester renders alone.
                let fits = plan.shrink >= shrink
                    && m.spec.gravity == Gravity::Centre
                    && m.spec.format != Format::Avif
                    && check_limits(plan.output, 1, limits).is_ok()
                    && check_limits(plan.resized, 1, limits).is_ok()
                    && plan.output.width.max(plan.output.height)
                        <= render::encoder_max_side(m.spec.format);
                if !fits {
                    continue;
                }
                let result = version_of(&pixels, &decoded, space, &plan)
                    .and_then(|img| finish(img, plan.output, &m.spec, true, deadline));
                served += 1;
                let _ = m.tx.send(result);
            }
        }
    }
    Some(Shared {
        results,
        decodes: 1,
        late: served,
    })
}

/// One version's pixels from the shared decode: resampled to `plan.resized` with the centre crop
/// folded in, or, when the decode already has that size, the crop cut from it.
fn version_of(
    decoded: &Pixels<'_>,
    like: &VipsImage,
    space: &str,
    plan: &Plan,
) -> Result<VipsImage, ImageError> {
    if decoded.size == plan.resized {
        let whole = label(decoded.data, decoded.size, decoded.bands, space, like)?;
        return match plan.crop {
            Some(c) => cut(&whole, c),
            None => Ok(whole),
        };
    }
    let out = plan
        .crop
        .map_or(plan.resized, |c| Size::new(c.width, c.height));
    let window = plan
        .crop
        .map(|c| Window::for_crop(decoded.size, plan.resized, c));
    let resized =
        resample::resample(decoded, window, out).map_err(|e| resample_failed(&e.to_string()))?;
    label(&resized, out, decoded.bands, space, like)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::fixtures::{self, spec};
    use crate::image::vips::{self, inspect};
    use crate::request::Version;

    fn limits() -> DecodeLimits {
        DecodeLimits::default()
    }

    fn solo(original: &[u8], s: &RenderSpec) -> Rendered {
        let inspected = inspect(original, &limits()).expect("inspect");
        render::render_within(original, s, &limits(), &Deadline::none(), &inspected)
            .expect("solo render")
    }

    fn together(original: &[u8], specs: &[RenderSpec]) -> (Vec<Rendered>, u64) {
        let inspected = inspect(original, &limits()).expect("inspect");
        let shared = render_shared(
            original,
            specs,
            &limits(),
            &Deadline::none(),
            &inspected,
            None,
        );
        let rendered = shared
            .results
            .into_iter()
            .map(|r| r.expect("shared render"))
            .collect();
        (rendered, shared.decodes)
    }

    fn jpeg_spec(version: Version) -> RenderSpec {
        spec(version, Format::Jpeg)
    }

    fn decode(bytes: &[u8]) -> VipsImage {
        VipsImage::new_from_buffer(bytes, "")
            .and_then(|i| i.copy_memory())
            .expect("decodes")
    }

    /// Mean and largest absolute difference over every sample, in levels of 255.
    fn difference(a: &[u8], b: &[u8]) -> (f64, f64) {
        let d = decode(a)
            .subtract(&decode(b))
            .and_then(|d| d.abs())
            .expect("difference");
        (d.avg().expect("mean"), d.max().expect("max"))
    }

    /// Versions that share their shrink factor come out of one decode byte for byte as from their
    /// own renders, in every output format that can be shared, with and without a crop.
    #[test]
    fn one_decode_and_identical_bytes_where_the_shrink_is_the_same() {
        vips::init(false).expect("libvips");
        let photo = fixtures::jpeg(1600, 1200, 85);
        // All shrink-on-load 8 from 1600×1200 (200×150 decoded).
        let specs = [
            jpeg_spec(Version::Width(100)),
            jpeg_spec(Version::Width(150)),
            jpeg_spec(Version::Cover {
                width: 120,
                height: 90,
            }),
            jpeg_spec(Version::Cover {
                width: 100,
                height: 100,
            }),
            spec(Version::Width(140), Format::Webp),
            spec(Version::Width(130), Format::Png),
        ];
        let (shared, decodes) = together(&photo, &specs);
        assert_eq!(decodes, 1);
        for (s, got) in specs.iter().zip(&shared) {
            let alone = solo(&photo, s);
            assert_eq!(
                (got.width, got.height),
                (alone.width, alone.height),
                "{s:?}"
            );
            assert!(got.bytes == alone.bytes, "{s:?}: not byte-identical");
        }
    }

    /// A catalogue page's sizes from one decode: those sharing the page's smallest shrink are
    /// identical; the thumbnails, resampled from a larger decode than their own render would use,
    /// stay within the stated tolerance (mean under 1 level, no sample over 8 of 255).
    #[test]
    fn shared_decode_stays_within_tolerance() {
        vips::init(false).expect("libvips");
        let photo = fixtures::jpeg(3000, 2000, 90);
        let specs = [
            jpeg_spec(Version::Width(100)),
            jpeg_spec(Version::Width(200)),
            jpeg_spec(Version::Width(300)),
            jpeg_spec(Version::Cover {
                width: 150,
                height: 150,
            }),
            jpeg_spec(Version::Cover {
                width: 300,
                height: 400,
            }),
            spec(Version::Width(600), Format::Webp),
        ];
        let (shared, decodes) = together(&photo, &specs);
        assert_eq!(decodes, 1);
        let mut worst = (0.0f64, 0.0f64);
        for (s, got) in specs.iter().zip(&shared) {
            let alone = solo(&photo, s);
            assert_eq!((got.width, got.height), (alone.width, alone.height));
            if got.bytes == alone.bytes {
                continue;
            }
            let (mean, max) = difference(&got.bytes, &alone.bytes);
            println!("{:?}: mean {mean:.3}, max {max}", s.version);
            assert!(mean < 1.0 && max <= 8.0, "{s:?}: mean {mean}, max {max}");
            worst = (worst.0.max(mean), worst.1.max(max));
        }
        println!("worst: mean {:.3}, max {}", worst.0, worst.1);
        // The versions that decode at the page's factor (1/4 here) are identical.
        for i in [4, 5] {
            assert!(shared[i].bytes == solo(&photo, &specs[i]).bytes, "{i}");
        }
    }

    /// Versions joining while the decode is in use are served from it when it is large enough (the
    /// same bytes as alone when their shrink matches), and let go to render alone when it is not.
    #[test]
    fn late_arrivals_are_served_from_the_decode_when_it_is_large_enough() {
        vips::init(false).expect("libvips");
        let photo = fixtures::jpeg(1600, 1200, 85);
        let inspected = inspect(&photo, &limits()).expect("inspect");
        let leader = jpeg_spec(Version::Width(300)); // shrink 4 (400×300 decoded)
        let fits = jpeg_spec(Version::Width(350)); // shrink 4 too: served, identical
        let too_big = jpeg_spec(Version::Width(1000)); // shrink 1: this decode is too small
        let (fits_tx, mut fits_rx) = oneshot::channel();
        let (big_tx, mut big_rx) = oneshot::channel();
        let mut arrivals = vec![
            vec![Member {
                spec: too_big,
                tx: big_tx,
            }],
            vec![Member {
                spec: fits.clone(),
                tx: fits_tx,
            }],
        ];
        let mut late = || arrivals.pop().unwrap_or_default();
        let done = render_shared(
            &photo,
            std::slice::from_ref(&leader),
            &limits(),
            &Deadline::none(),
            &inspected,
            Some(Delivery {
                members: Vec::new(),
                late: &mut late,
                company: false,
            }),
        );
        assert_eq!((done.decodes, done.late), (1, 1));
        let own = done
            .results
            .into_iter()
            .next()
            .expect("own")
            .expect("rendered");
        assert!(own.bytes == solo(&photo, &leader).bytes);
        let served = fits_rx.try_recv().expect("served").expect("rendered");
        assert!(served.bytes == solo(&photo, &fits).bytes);
        assert!(big_rx.try_recv().is_err(), "let go: it renders alone");
    }

    /// What cannot share is rendered version by version, exactly as alone: a sideways original,
    /// a smart crop, AVIF.
    #[test]
    fn the_rest_renders_each_version_alone() {
        vips::init(false).expect("libvips");
        let sideways = fixtures::jpeg_with_exif(640, 480, 6);
        let specs = [
            jpeg_spec(Version::Width(100)),
            jpeg_spec(Version::Width(50)),
        ];
        let (shared, decodes) = together(&sideways, &specs);
        assert_eq!(decodes, 2);
        for (s, got) in specs.iter().zip(&shared) {
            assert!(got.bytes == solo(&sideways, s).bytes);
        }
        let photo = fixtures::jpeg(640, 480, 85);
        let smart = RenderSpec {
            gravity: Gravity::Attention,
            ..jpeg_spec(Version::Cover {
                width: 100,
                height: 100,
            })
        };
        let (_, decodes) = together(&photo, &[jpeg_spec(Version::Width(100)), smart]);
        assert_eq!(decodes, 2);
    }
}
