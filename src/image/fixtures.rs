//! Test and bench fixtures generated with libvips, so no binary image files live in the repository:
//! photographic JPEGs, progressive and grey ones, EXIF-rotated ones with camera metadata, PNG with
//! alpha, WebP, GIF. They panic if libvips fails. Compiled for this crate's unit tests, and for its
//! integration tests, benches and fuzz targets through the `test-support` feature, never into the
//! server.

use rs_vips::enums::{Angle, Direction};
use rs_vips::voption::{Setter, VOption};
use rs_vips::VipsImage;

fn ok<T>(r: rs_vips::Result<T>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("fixture: libvips failed: {e}"),
    }
}

fn init() {
    if let Err(e) = super::vips::init(false) {
        panic!("fixture: libvips init failed: {e}");
    }
}

fn side(v: u32) -> i32 {
    i32::try_from(v.max(1)).unwrap_or(i32::MAX)
}

/// A smooth colour gradient (red across, green down, blue fixed) as 3-band float sRGB.
fn gradient(w: u32, h: u32) -> VipsImage {
    let (w, h) = (side(w), side(h));
    let xy = ok(VipsImage::xyz(w, h));
    let rg = ok(xy.linear(&[255.0 / f64::from(w), 255.0 / f64::from(h)], &[0.0, 0.0]));
    ok(rg.bandjoin_const(&[128.0]))
}

fn srgb_uchar(img: &VipsImage) -> VipsImage {
    let img = ok(img.cast(rs_vips::enums::BandFormat::Uchar));
    ok(img.copy_with_opts(VOption::new().set("interpretation", "srgb")))
}

/// `gradient` plus film-grain-like gaussian noise (per pixel, shared by the three bands, plus a
/// weaker per-band chroma noise): it defeats JPEG's entropy coding the way a real photo does, so a
/// 3000×2000 q90 file is about 2 MB.
fn photo(w: u32, h: u32) -> VipsImage {
    let base = gradient(w, h);
    let (wi, hi) = (side(w), side(h));
    let grain = ok(VipsImage::gaussnoise_with_opts(
        wi,
        hi,
        VOption::new()
            .set("mean", 0.0)
            .set("sigma", 7.0)
            .set("seed", 7),
    ));
    let chroma: Vec<VipsImage> = (0..3)
        .map(|i| {
            ok(VipsImage::gaussnoise_with_opts(
                wi,
                hi,
                VOption::new()
                    .set("mean", 0.0)
                    .set("sigma", 3.0)
                    .set("seed", 11 + i),
            ))
        })
        .collect();
    let chroma = ok(VipsImage::bandjoin(&chroma));
    let img = ok(base.add(&grain));
    srgb_uchar(&ok(img.add(&chroma)))
}

fn jpegsave(img: &VipsImage, q: u8) -> Vec<u8> {
    ok(img.jpegsave_buffer_with_opts(
        VOption::new()
            .set("Q", i32::from(q.clamp(1, 100)))
            .set("strip", true),
    ))
}

/// A photographic-like w×h sRGB JPEG at quality `q` (grain included: ~2 MB at 3000×2000 q90).
pub fn jpeg(w: u32, h: u32, q: u8) -> Vec<u8> {
    init();
    jpegsave(&photo(w, h), q)
}

/// [`jpeg`], saved progressive.
pub fn jpeg_progressive(w: u32, h: u32, q: u8) -> Vec<u8> {
    init();
    ok(photo(w, h).jpegsave_buffer_with_opts(
        VOption::new()
            .set("Q", i32::from(q.clamp(1, 100)))
            .set("interlace", true)
            .set("strip", true),
    ))
}

/// A w×h greyscale (one band) JPEG.
pub fn jpeg_grey(w: u32, h: u32) -> Vec<u8> {
    init();
    let img = ok(photo(w, h).colourspace(rs_vips::enums::Interpretation::BW));
    jpegsave(&img, 90)
}

/// A JPEG that displays as a w×h picture but whose pixels are stored so that EXIF `orientation`
/// (1..=8; 5–8 store it h×w, sideways) is needed to show it upright, with camera EXIF (Make
/// `TestCam`, Model `Model X1`), GPS position, an XMP packet and a Display P3 ICC profile (the
/// pixels are in P3, so a renderer that ignores the profile gets visibly wrong colours).
///
/// Markers, in the upright picture: a pure red block in the top-left corner and a pure blue block in
/// the top-right corner, each w/4 × h/4; the rest is the grainless gradient. Two corners pin down
/// all eight orientations (red alone cannot tell orientation 1 from a transpose).
pub fn jpeg_with_exif(w: u32, h: u32, orientation: u8) -> Vec<u8> {
    init();
    let (bw, bh) = (side(w / 4), side(h / 4));
    let base = srgb_uchar(&gradient(w, h));
    let block = ok(VipsImage::black(bw, bh));
    let red = srgb_uchar(&ok(VipsImage::new_from_image(&block, &[255.0, 0.0, 0.0])));
    let blue = srgb_uchar(&ok(VipsImage::new_from_image(&block, &[0.0, 0.0, 255.0])));
    let upright = ok(base.insert(&red, 0, 0));
    let upright = ok(upright.insert(&blue, side(w) - bw, 0));
    // Into Display P3, attaching the P3 profile.
    let p3 = ok(upright.icc_transform_with_opts("p3", VOption::new().set("input_profile", "srgb")));
    let icc = ok(p3.get_blob("icc-profile-data"));
    // The inverse of what a viewer does for each orientation (EXIF 2.3, tag 0x0112).
    let stored = match orientation {
        2 => ok(p3.flip(Direction::Horizontal)),
        3 => ok(p3.rot(Angle::D180)),
        4 => ok(p3.flip(Direction::Vertical)),
        5 => ok(ok(p3.rot(Angle::D90)).flip(Direction::Horizontal)),
        6 => ok(p3.rot(Angle::D270)),
        7 => ok(ok(p3.rot(Angle::D270)).flip(Direction::Horizontal)),
        8 => ok(p3.rot(Angle::D90)),
        _ => p3,
    };
    let plain = jpegsave(&stored, 92);
    let exif = exif_block(orientation.clamp(1, 8));
    let xmp = xmp_packet();
    let mut segments = Vec::new();
    segments.extend(app_segment(0xE1, &[b"Exif\0\0".as_slice(), &exif].concat()));
    segments.extend(app_segment(
        0xE1,
        &[b"http://ns.adobe.com/xap/1.0/\0".as_slice(), xmp.as_bytes()].concat(),
    ));
    segments.extend(app_segment(
        0xE2,
        &[b"ICC_PROFILE\0\x01\x01".as_slice(), &icc].concat(),
    ));
    // Right after SOI, where cameras put them.
    let mut out = Vec::with_capacity(plain.len() + segments.len());
    out.extend_from_slice(&plain[..2]);
    out.extend_from_slice(&segments);
    out.extend_from_slice(&plain[2..]);
    out
}

fn app_segment(marker: u8, payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(payload.len() + 2).expect("APP segment under 64 KB");
    let mut s = vec![0xFF, marker];
    s.extend_from_slice(&len.to_be_bytes());
    s.extend_from_slice(payload);
    s
}

/// A big-endian TIFF/EXIF block: IFD0 with Make, Model, Orientation and a GPS IFD pointer; a GPS
/// IFD with version, latitude and longitude.
fn exif_block(orientation: u8) -> Vec<u8> {
    const ASCII: u16 = 2;
    const SHORT: u16 = 3;
    const LONG: u16 = 4;
    const RATIONAL: u16 = 5;
    const BYTE: u16 = 1;
    fn rationals(v: &[(u32, u32)]) -> Vec<u8> {
        v.iter()
            .flat_map(|(n, d)| [n.to_be_bytes(), d.to_be_bytes()].concat())
            .collect()
    }
    // IFD0 sits at offset 8; its size is 2 + 4 × 12 + 4 = 54, so the GPS IFD follows at 62 + data.
    let ifd0_entries: Vec<(u16, u16, u32, Vec<u8>)> = vec![
        (0x010F, ASCII, 8, b"TestCam\0".to_vec()),
        (0x0110, ASCII, 9, b"Model X1\0".to_vec()),
        (
            0x0112,
            SHORT,
            1,
            u16::from(orientation).to_be_bytes().to_vec(),
        ),
        (0x8825, LONG, 1, vec![0; 4]), // patched below
    ];
    let gps_entries: Vec<(u16, u16, u32, Vec<u8>)> = vec![
        (0x0000, BYTE, 4, vec![2, 3, 0, 0]),
        (0x0001, ASCII, 2, b"N\0".to_vec()),
        (
            0x0002,
            RATIONAL,
            3,
            rationals(&[(48, 1), (51, 1), (2988, 100)]),
        ),
        (0x0003, ASCII, 2, b"E\0".to_vec()),
        (
            0x0004,
            RATIONAL,
            3,
            rationals(&[(2, 1), (17, 1), (4008, 100)]),
        ),
    ];
    fn ifd(entries: &[(u16, u16, u32, Vec<u8>)], at: u32) -> Vec<u8> {
        let count = u32::try_from(entries.len()).expect("few entries");
        let mut data_at = at + 2 + count * 12 + 4;
        let mut head = Vec::new();
        let mut data = Vec::new();
        head.extend_from_slice(&u16::try_from(count).expect("few").to_be_bytes());
        for (tag, ty, n, payload) in entries {
            head.extend_from_slice(&tag.to_be_bytes());
            head.extend_from_slice(&ty.to_be_bytes());
            head.extend_from_slice(&n.to_be_bytes());
            if payload.len() <= 4 {
                let mut inline = payload.clone();
                inline.resize(4, 0);
                head.extend_from_slice(&inline);
            } else {
                head.extend_from_slice(&data_at.to_be_bytes());
                data.extend_from_slice(payload);
                if payload.len() % 2 == 1 {
                    data.push(0);
                }
                data_at += u32::try_from(payload.len().div_ceil(2) * 2).expect("small");
            }
        }
        head.extend_from_slice(&0u32.to_be_bytes());
        head.extend_from_slice(&data);
        head
    }
    let first = ifd(&ifd0_entries, 8);
    let gps_at = 8 + u32::try_from(first.len()).expect("small");
    let mut ifd0_entries = ifd0_entries;
    ifd0_entries[3].3 = gps_at.to_be_bytes().to_vec();
    let mut out = b"MM\0\x2A\0\0\0\x08".to_vec();
    out.extend_from_slice(&ifd(&ifd0_entries, 8));
    out.extend_from_slice(&ifd(&gps_entries, gps_at));
    out
}

fn xmp_packet() -> String {
    concat!(
        "<?xpacket begin=\"\u{feff}\" id=\"W5M0MpCehiHzreSzNTczkc9d\"?>",
        "<x:xmpmeta xmlns:x=\"adobe:ns:meta/\">",
        "<rdf:RDF xmlns:rdf=\"http://www.w3.org/1999/02/22-rdf-syntax-ns#\">",
        "<rdf:Description rdf:about=\"\" xmlns:xmp=\"http://ns.adobe.com/xap/1.0/\"",
        " xmp:CreatorTool=\"image-server fixture\"/>",
        "</rdf:RDF></x:xmpmeta><?xpacket end=\"w\"?>"
    )
    .to_string()
}

/// A w×h RGBA PNG: the left quarter fully transparent (so the top-left corner is transparent), the
/// next quarter half transparent (alpha 128), the right half opaque.
pub fn png_alpha(w: u32, h: u32) -> Vec<u8> {
    init();
    let (wi, hi) = (side(w), side(h));
    let rgb = srgb_uchar(&gradient(w, h));
    let zero = ok(VipsImage::black(wi, hi));
    let alpha = ok(VipsImage::new_from_image(&zero, &[255.0]));
    let half = ok(VipsImage::new_from_image(
        &ok(VipsImage::black(side(w / 2), hi)),
        &[128.0],
    ));
    let alpha = ok(alpha.insert(&half, 0, 0));
    let alpha = ok(alpha.insert(&ok(VipsImage::black(side(w / 4), hi)), 0, 0));
    let alpha = ok(alpha.cast(rs_vips::enums::BandFormat::Uchar));
    let rgba = srgb_uchar(&ok(VipsImage::bandjoin(&[rgb, alpha])));
    ok(rgba.pngsave_buffer_with_opts(VOption::new().set("strip", true)))
}

/// A w×h lossy WebP (grainy gradient, Q 90).
pub fn webp(w: u32, h: u32) -> Vec<u8> {
    init();
    ok(photo(w, h).webpsave_buffer_with_opts(VOption::new().set("Q", 90).set("strip", true)))
}

/// A w×h GIF (the gradient, quantised by libvips).
pub fn gif(w: u32, h: u32) -> Vec<u8> {
    init();
    ok(srgb_uchar(&gradient(w, h)).gifsave_buffer())
}

/// An animated GIF of `frames` w×h frames (frame i is a flat grey of level 40 × i + 20).
pub fn gif_animated(w: u32, h: u32, frames: u32) -> Vec<u8> {
    init();
    let (wi, hi) = (side(w), side(h));
    let pages: Vec<VipsImage> = (0..frames.max(1))
        .map(|i| {
            let level = f64::from((40 * i + 20).min(255));
            srgb_uchar(&ok(VipsImage::new_from_image(
                &ok(VipsImage::black(wi, hi)),
                &[level, level, level],
            )))
        })
        .collect();
    let mut strip = ok(VipsImage::arrayjoin_with_opts(
        &pages,
        VOption::new().set("across", 1),
    ));
    // A fresh image (not shared with `pages`) so the header edits below touch nothing else.
    strip = ok(strip.copy());
    let _ = strip.set_int("page-height", hi);
    let _ = strip.set_array_int("delay", &vec![100; pages.len()]);
    ok(strip.gifsave_buffer())
}

/// The render settings tests and benches use unless they test a setting: quality 80, centre crop,
/// enlarging allowed, white background, progressive JPEG, the fastest AVIF effort.
pub fn spec(version: crate::request::Version, format: crate::request::Format) -> super::RenderSpec {
    super::RenderSpec {
        version,
        format,
        quality: 80,
        gravity: super::Gravity::Centre,
        enlarge: true,
        background: [255, 255, 255],
        progressive: true,
        avif_effort: 0,
    }
}
