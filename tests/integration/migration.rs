//! What an operator moving a wanelo image-server fleet onto this server relies on
//! (docs/migrating-from-wanelo.md): the seed's `-c{N}` quality spelling, extensions in capitals,
//! origins that answer 403 for a missing object, redirects from the origin, and the seed's own
//! configuration files.

use image_server::image::fixtures;

use crate::support::{self, get, header, probe, Origin};

/// `-c60` is the seed's spelling of `-q60`: one cache entry, one render, the same bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compression_suffix_is_quality_one_entry_one_render() {
    let origin = Origin::start().await;
    origin.put("product/image/7", fixtures::jpeg(640, 480, 90));
    let server = support::start_with_origin(&origin, &[]).await;

    let c = get(&server, "/product/image/7/x50-c60.jpg").await;
    assert_eq!(c.status(), 200);
    assert_eq!(header(&c, "x-cache"), "miss");
    let c_bytes = c.bytes().await.expect("body");
    let q = get(&server, "/product/image/7/x50-q60.jpg").await;
    assert_eq!(q.status(), 200);
    assert_eq!(header(&q, "x-cache"), "memory", "the same entry");
    assert_eq!(q.bytes().await.expect("body"), c_bytes);
    assert_eq!(server.app.pipeline.stats().processing_total, 1);
    // And it is really quality 60, not the default 75.
    let default = get(&server, "/product/image/7/x50.jpg")
        .await
        .bytes()
        .await
        .expect("body");
    assert_ne!(default, c_bytes);
    let p = probe(&c_bytes);
    assert_eq!((p.width, p.height), (50, 50));
    server.stop().await.expect("stop");
}

/// `.JPG`, `.Png`, `.WEBP` are the formats their lower-case names are: same key, same answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extensions_in_capitals_are_the_same_format() {
    let origin = Origin::start().await;
    origin.put("product/image/8", fixtures::jpeg(400, 300, 90));
    let server = support::start_with_origin(&origin, &[]).await;

    let lower = get(&server, "/product/image/8/w100.jpg").await;
    assert_eq!(lower.status(), 200);
    let lower_bytes = lower.bytes().await.expect("body");
    for path in ["/product/image/8/w100.JPG", "/product/image/8/w100.Jpeg"] {
        let upper = get(&server, path).await;
        assert_eq!(upper.status(), 200, "{path}");
        assert_eq!(header(&upper, "x-cache"), "memory", "{path}: same entry");
        assert_eq!(header(&upper, "content-type"), "image/jpeg");
        assert_eq!(upper.bytes().await.expect("body"), lower_bytes);
    }
    let png = get(&server, "/product/image/8/w100.Png").await;
    assert_eq!(png.status(), 200);
    assert_eq!(header(&png, "content-type"), "image/png");
    let webp = get(&server, "/product/image/8/w100.WEBP").await;
    assert_eq!(header(&webp, "content-type"), "image/webp");
    // An unknown extension in capitals is 406, as in lower case.
    assert_eq!(
        get(&server, "/product/image/8/w100.BMP").await.status(),
        406
    );
    assert_eq!(server.app.pipeline.stats().processing_total, 3);
    server.stop().await.expect("stop");
}
