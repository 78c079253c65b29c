//! Fuzz target for step 3c of the request flow: arbitrary bytes as an original, through the header
//! probe and a full render, with the production loader allow-list and small decode limits (so a
//! claimed-huge image is refused, as in production, instead of exhausting the fuzzer's memory).
//! Any outcome but a panic or a crash is fine: errors are how bad input is meant to end.
#![no_main]

use image_server::image::{render, vips};
use image_server::image::{DecodeLimits, Gravity, RenderSpec};
use image_server::request::{Format, Version};
use libfuzzer_sys::fuzz_target;

const LIMITS: DecodeLimits = DecodeLimits {
    max_pixels: 4_000_000,
    max_side: 4096,
    accept_avif_input: false,
};

fuzz_target!(|data: &[u8]| {
    if vips::init(false).is_err() {
        return;
    }
    let _ = vips::probe(data, &LIMITS);
    // The first byte picks the output, so encoders see fuzzed pixels too.
    let (format, version) = match data.first().map(|b| b % 4) {
        Some(0) => (Format::Jpeg, Version::Width(64)),
        Some(1) => (
            Format::Png,
            Version::Cover {
                width: 32,
                height: 48,
            },
        ),
        Some(2) => (Format::Webp, Version::Height(40)),
        _ => (Format::Gif, Version::Width(16)),
    };
    let spec = RenderSpec {
        version,
        format,
        quality: 75,
        gravity: Gravity::Centre,
        enlarge: true,
        background: [255, 255, 255],
        progressive: true,
        avif_effort: 0,
    };
    if let Ok(out) = render::render(data, &spec, &LIMITS) {
        assert!(!out.bytes.is_empty(), "empty encode");
    }
});
