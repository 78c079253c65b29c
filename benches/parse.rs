//! Criterion bench: parsing and canonicalising request URLs (step 2 of the request flow).

// criterion's macros define undocumented functions; a bench binary has no API to document.
#![allow(missing_docs)]

use criterion::{criterion_group, criterion_main, Criterion};
use image_server::request::{ImageRequest, Rules};
use std::hint::black_box;

fn parse(c: &mut Criterion) {
    let rules = Rules::default();
    let mut group = c.benchmark_group("parse");
    for path in [
        "/product/image/10855050/300x400.jpg",
        "/user/avatar/3589782/w500-q60.webp",
        "/product/image/123/full_size.png",
        "/product/image/123/random.jpg",
    ] {
        group.bench_function(path, |b| {
            b.iter(|| {
                let r = ImageRequest::parse(black_box(path), &rules);
                black_box(r.map(|r| r.cache_key(r.format)))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, parse);
criterion_main!(benches);
