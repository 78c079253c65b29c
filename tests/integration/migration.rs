//! What an operator moving a wanelo image-server fleet onto this server relies on
//! (docs/migrating-from-wanelo.md): the seed's `-c{N}` quality spelling, extensions in capitals,
//! origins that answer 403 for a missing object, redirects from the origin, and the seed's own
//! configuration files.

use image_server::image::fixtures;

use crate::support::{self, get, header, probe, Origin, Reply};

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

/// An origin that answers 403 for a missing object (an S3 bucket the reader may not list) gives 404,
/// remembered for `not_found_ttl`: two client requests cost one origin request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_403_is_missing_and_negatively_cached() {
    let origin = Origin::start().await;
    origin.script("product/image/403", Reply::Status(403));
    let server = support::start_with_origin(&origin, &[]).await;
    for _ in 0..2 {
        let resp = get(&server, "/product/image/403/w100.jpg").await;
        assert_eq!(resp.status(), 404);
        assert_eq!(header(&resp, "cache-control"), "public, max-age=60");
        assert_eq!(resp.text().await.expect("body"), "not found\n");
    }
    assert_eq!(
        origin.hits("product/image/403"),
        1,
        "the second was answered from memory"
    );
    server.stop().await.expect("stop");
}

/// A redirect from `source_domain` to another path on its own host is followed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_redirect_to_its_own_host_is_followed() {
    let origin = Origin::start().await;
    origin.script(
        "product/image/9",
        Reply::Redirect(format!("{}/moved/9.jpg", origin.url())),
    );
    origin.script_path(
        "/moved/9.jpg",
        Reply::Body(fixtures::jpeg(300, 200, 85).into()),
    );
    let server = support::start_with_origin(&origin, &[]).await;
    let resp = get(&server, "/product/image/9/w100.jpg").await;
    assert_eq!(resp.status(), 200);
    let p = probe(&resp.bytes().await.expect("body"));
    assert_eq!(p.width, 100);
    assert_eq!(origin.path_hits("/moved/9.jpg"), 1);
    server.stop().await.expect("stop");
}

/// A redirect to a host that is neither `source_domain`'s nor in `source_redirect_hosts` is a 502,
/// and the target is never contacted; listed, it is followed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_redirect_to_another_host_needs_it_listed() {
    let origin = Origin::start().await;
    let other = Origin::start_with(
        tokio::net::TcpListener::bind("127.0.0.2:0")
            .await
            .expect("bind 127.0.0.2"),
    );
    other.put("elsewhere/image/1", fixtures::jpeg(300, 200, 85));
    origin.script(
        "product/image/10",
        Reply::Redirect(format!("{}/elsewhere/image/1/original.jpg", other.url())),
    );

    let server = support::start_with_origin(&origin, &[]).await;
    let resp = get(&server, "/product/image/10/w100.jpg").await;
    assert_eq!(resp.status(), 502);
    assert_eq!(header(&resp, "cache-control"), "no-store");
    assert_eq!(other.total(), 0, "the unlisted host was never contacted");
    server.stop().await.expect("stop");

    let server =
        support::start_with_origin(&origin, &[("source_redirect_hosts", "[\"127.0.0.2\"]")]).await;
    let resp = get(&server, "/product/image/10/w100.jpg").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(other.hits("elsewhere/image/1"), 1);
    server.stop().await.expect("stop");
}

/// A loop of redirects is followed 3 times, then given up as a 502 that is not remembered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_redirect_loop_stops_at_three() {
    let origin = Origin::start().await;
    origin.script(
        "product/image/11",
        Reply::Redirect(format!("{}/loop/a", origin.url())),
    );
    origin.script_path(
        "/loop/a",
        Reply::Redirect(format!("{}/loop/b", origin.url())),
    );
    origin.script_path(
        "/loop/b",
        Reply::Redirect(format!("{}/loop/a", origin.url())),
    );
    let server = support::start_with_origin(&origin, &[]).await;
    let resp = get(&server, "/product/image/11/w100.jpg").await;
    assert_eq!(resp.status(), 502);
    assert_eq!(header(&resp, "cache-control"), "no-store");
    // The first request and three hops; the fourth hop is refused.
    assert_eq!(
        origin.hits("product/image/11") + origin.path_hits("/loop/a") + origin.path_hits("/loop/b"),
        4
    );
    server.stop().await.expect("stop");
}
