//! Benchmarks step 3c of the request flow, the libvips render, in isolation (no pool, no runtime).
//!
//! The workload is the one `make bench` measures (docs/performance.md): a 3000×2000, quality-90, grainy
//! (~2 MB) JPEG rendered to a q80 JPEG, once as a fit (`w300`, 300×200, also what "fit into 300×400"
//! gives for a landscape original) and once as a cover crop (`300x400`). The floor to compare against is
//! the decode alone, `djpeg -scale 1/8` (fit) and `-scale 1/4` (cover) on the same file; the target is
//! ≤ 1.10× of it for fit.
//!
//! Run: `cargo bench --bench render -- --warm-up-time 1 --measurement-time 5`.

// criterion's macros define undocumented functions; a bench binary has no API to document.
#![allow(missing_docs)]

use criterion::{criterion_group, criterion_main, Criterion};
use image_server::image::fixtures::spec;
use image_server::image::{render, vips};
use image_server::image::{DecodeLimits, Gravity, RenderSpec};
use image_server::request::{Format, Version};
use std::hint::black_box;

fn render(c: &mut Criterion) {
    vips::init(false).expect("libvips init");
    let original = image_server::image::fixtures::jpeg(3000, 2000, 90);
    let limits = DecodeLimits::default();
    if let Ok(dir) = std::env::var("RENDER_BENCH_WRITE_ORIGINAL") {
        // Lets the djpeg floor be measured on exactly the same bytes.
        std::fs::write(format!("{dir}/original.jpg"), &original).expect("write original");
    }

    let mut group = c.benchmark_group("render_3000x2000_q90");
    let cases = [
        ("fit_w300_jpeg_q80", spec(Version::Width(300), Format::Jpeg)),
        (
            "cover_300x400_jpeg_q80",
            spec(
                Version::Cover {
                    width: 300,
                    height: 400,
                },
                Format::Jpeg,
            ),
        ),
        (
            "cover_300x400_attention_jpeg_q80",
            RenderSpec {
                gravity: Gravity::Attention,
                ..spec(
                    Version::Cover {
                        width: 300,
                        height: 400,
                    },
                    Format::Jpeg,
                )
            },
        ),
        ("fit_w300_webp_q80", spec(Version::Width(300), Format::Webp)),
        (
            "fit_w300_avif_effort0",
            spec(Version::Width(300), Format::Avif),
        ),
    ];
    for (name, spec) in cases {
        group.bench_function(name, |b| {
            b.iter(|| {
                render::render(black_box(&original), black_box(&spec), &limits).expect("render")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, render);
criterion_main!(benches);
