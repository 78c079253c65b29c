//! End to end on the seed's URLs: the real server on 127.0.0.1:0 against a loopback origin or a
//! `file://` store; outputs decoded and checked (format, size, orientation, metadata), not bytes.

use std::time::Duration;

use image_server::image::fixtures;
use image_server::request::Format;

use crate::support::{self, get, header, probe, Origin, Reply};

const ORIGINAL: &str = "product/image/1";

async fn landscape_origin() -> Origin {
    let origin = Origin::start().await;
    // 1200×800: wide enough that every tested version is a downscale.
    origin.put(ORIGINAL, fixtures::jpeg(1200, 800, 85));
    origin
}

#[tokio::test]
async fn every_version_form_in_every_format() {
    let origin = landscape_origin().await;
    let server = support::start_with_origin(&origin, &[]).await;
    let versions: &[(&str, u32, u32)] = &[
        ("300x400", 300, 400),
        ("x300", 300, 300),
        ("w300", 300, 200),
        ("h200", 300, 200),
        ("full_size", 1200, 800),
        ("300x400-q40", 300, 400),
    ];
    for format in Format::ALL {
        for (version, w, h) in versions {
            let path = format!("/{ORIGINAL}/{version}.{}", format.ext());
            let resp = get(&server, &path).await;
            assert_eq!(resp.status(), 200, "{path}");
            assert_eq!(header(&resp, "content-type"), format.mime(), "{path}");
            let len: usize = header(&resp, "content-length").parse().expect("length");
            let body = resp.bytes().await.expect("body");
            assert_eq!(body.len(), len, "{path}");
            let out = probe(&body);
            assert_eq!(out.format, format, "{path}");
            assert_eq!((out.width, out.height), (*w, *h), "{path}");
        }
    }
    // Ten sizes, five formats: one download of the original.
    assert_eq!(origin.hits(ORIGINAL), 1);
    server.stop().await.expect("stops");
}

#[tokio::test]
async fn seed_parser_cases_over_http() {
    let origin = landscape_origin().await;
    let server = support::start_with_origin(&origin, &[]).await;
    for file in [
        "300x400.jpg",
        "x300.jpg",
        "w300.jpg",
        "full_size.jpg",
        "300x400-q10.jpg",
        "x300-q10.jpg",
        "w300-q10.jpg",
        "full_size-q10.jpg",
        "300x400.jpeg",
    ] {
        let resp = get(&server, &format!("/{ORIGINAL}/{file}")).await;
        assert_eq!(resp.status(), 200, "{file}");
    }
    let before = origin.total();
    let refusals: &[(&str, u16, &str)] = &[
        ("/product/image/1/random.jpg", 404, "not found\n"),
        ("/product/image/1/w3000.jpg", 406, "not acceptable\n"),
        ("/product/image/1/300x3000.jpg", 406, "not acceptable\n"),
        ("/product/image/1/w300.bmp", 406, "not acceptable\n"),
        ("/product/image/1/w0.jpg", 400, "bad request\n"),
        ("/product/image/1/w300-q0.jpg", 400, "bad request\n"),
        ("/product/image/1/w300-q101.jpg", 400, "bad request\n"),
        ("/product/image/%2e%2e%2f/w300.jpg", 404, "not found\n"),
        ("/product/image/1/w300.jpg/extra", 404, "not found\n"),
        ("/", 404, "not found\n"),
    ];
    for (path, status, body) in refusals {
        let resp = get(&server, path).await;
        assert_eq!(resp.status().as_u16(), *status, "{path}");
        assert_eq!(header(&resp, "content-type"), "text/plain; charset=utf-8");
        assert_eq!(
            header(&resp, "cache-control"),
            "public, max-age=60",
            "{path}"
        );
        assert_eq!(resp.text().await.expect("body"), *body, "{path}");
    }
    assert_eq!(
        origin.total(),
        before,
        "refused names never reach the origin"
    );

    let resp = get(
        &server,
        "/product/image/1/w300.jpg?source=http://127.0.0.1:1/x.jpg",
    )
    .await;
    assert_eq!(resp.status(), 403, "?source= is off by default");
    server.stop().await.expect("stops");
}

#[tokio::test]
async fn whitelist_from_config_is_enforced_without_fetching() {
    let origin = landscape_origin().await;
    let server =
        support::start_with_origin(&origin, &[("whitelisted_extensions", "[\"jpg\"]")]).await;
    assert_eq!(
        get(&server, "/product/image/1/w300.png").await.status(),
        406
    );
    assert_eq!(
        get(&server, "/product/image/1/w300.webp").await.status(),
        406
    );
    assert_eq!(origin.total(), 0);
    assert_eq!(
        get(&server, "/product/image/1/w300.jpg").await.status(),
        200
    );
    server.stop().await.expect("stops");
}

#[tokio::test]
async fn head_answers_like_get_without_a_body_and_other_methods_are_405() {
    let origin = landscape_origin().await;
    let server = support::start_with_origin(&origin, &[]).await;
    let url = format!("http://{}/{ORIGINAL}/w100.jpg", server.addr);
    let got = support::client().get(&url).send().await.expect("get");
    let get_len = header(&got, "content-length");
    let get_etag = header(&got, "etag");
    let body = got.bytes().await.expect("body");
    let head = support::client().head(&url).send().await.expect("head");
    assert_eq!(head.status(), 200);
    assert_eq!(header(&head, "content-length"), get_len);
    assert_eq!(header(&head, "etag"), get_etag);
    assert_eq!(header(&head, "content-type"), "image/jpeg");
    assert_eq!(get_len.parse::<usize>().expect("len"), body.len());
    assert!(head.bytes().await.expect("empty").is_empty());
    for method in [
        reqwest::Method::POST,
        reqwest::Method::PUT,
        reqwest::Method::DELETE,
    ] {
        let resp = support::client()
            .request(method.clone(), &url)
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 405, "{method}");
        assert_eq!(header(&resp, "allow"), "GET, HEAD");
    }
    server.stop().await.expect("stops");
}

#[tokio::test]
async fn exif_rotated_original_comes_out_upright_and_metadata_free() {
    let origin = Origin::start().await;
    // Displayed upright it is 400×600 (stored sideways, EXIF orientation 6), with a red block in
    // its top-left corner and a blue block in its top-right corner.
    origin.put("user/avatar/7", fixtures::jpeg_with_exif(400, 600, 6));
    let server = support::start_with_origin(&origin, &[]).await;
    let input_tags = support::exif_tags(&fixtures::jpeg_with_exif(400, 600, 6));
    assert!(
        input_tags.iter().any(|t| t.contains("GPS")),
        "the fixture really carries GPS: {input_tags:?}"
    );
    for format in Format::ALL {
        let path = format!("/user/avatar/7/w200.{}", format.ext());
        let resp = get(&server, &path).await;
        assert_eq!(resp.status(), 200, "{path}");
        let body = resp.bytes().await.expect("body");
        let out = probe(&body);
        assert_eq!(
            (out.width, out.height),
            (200, 300),
            "{path}: upright is portrait"
        );
        let tags = support::exif_tags(&body);
        let leaked: Vec<_> = tags
            .iter()
            .filter(|t| {
                t.starts_with("EXIF:")
                    || t.starts_with("XMP")
                    || t.starts_with("IPTC:")
                    || t.starts_with("ICC")
                    || t.contains("GPS")
            })
            .collect();
        assert!(leaked.is_empty(), "{path} leaks {leaked:?}");
    }
    server.stop().await.expect("stops");
}

#[tokio::test]
async fn missing_original_is_404_and_unreachable_origin_is_502_then_recovers() {
    let origin = landscape_origin().await;
    let server = support::start_with_origin(&origin, &[]).await;
    let resp = get(&server, "/product/image/404/w100.jpg").await;
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.text().await.expect("body"), "not found\n");
    // Negative-cached: the second ask does not reach the origin.
    let hits = origin.hits("product/image/404");
    assert_eq!(
        get(&server, "/product/image/404/w100.jpg").await.status(),
        404
    );
    assert_eq!(origin.hits("product/image/404"), hits);

    origin.script("product/image/5", Reply::Status(500));
    let resp = get(&server, "/product/image/5/w100.jpg").await;
    assert_eq!(resp.status(), 502);
    assert_eq!(header(&resp, "cache-control"), "no-store");
    server.stop().await.expect("stops");

    // An origin that refuses connections: 502; once it is back, the next request is served. The
    // port stays bound (not listening, so connections are refused) until the origin listens on it:
    // a port let go could be taken by another test's server in between.
    let reserved =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().expect("addr");
    reserved.bind(&any.into()).expect("bind");
    let addr = reserved
        .local_addr()
        .expect("addr")
        .as_socket()
        .expect("inet");
    let url = format!("http://{addr}");
    let server = support::start(support::config(&[("source_domain", url.as_str())])).await;
    let resp = get(&server, "/product/image/1/w100.jpg").await;
    assert_eq!(resp.status(), 502);
    assert_eq!(header(&resp, "cache-control"), "no-store");
    reserved.listen(128).expect("listen");
    reserved.set_nonblocking(true).expect("nonblocking");
    let listener = tokio::net::TcpListener::from_std(reserved.into()).expect("listener");
    let revived = Origin::start_with(listener);
    revived.put(ORIGINAL, fixtures::jpeg(400, 300, 80));
    let resp = get(&server, "/product/image/1/w100.jpg").await;
    assert_eq!(resp.status(), 200, "nothing about the failure was cached");
    assert_eq!(probe(&resp.bytes().await.expect("body")).width, 100);
    server.stop().await.expect("stops");
}

#[tokio::test]
async fn a_hanging_origin_is_504_within_the_fetch_deadline() {
    let origin = landscape_origin().await;
    origin.script("product/image/8", Reply::Hang);
    let server = support::start_with_origin(&origin, &[("fetch_timeout", "\"1s\"")]).await;
    let started = std::time::Instant::now();
    let resp = get(&server, "/product/image/8/w100.jpg").await;
    assert_eq!(resp.status(), 504);
    assert!(started.elapsed() < Duration::from_secs(8));
    server.stop().await.expect("stops");
}

#[tokio::test]
async fn object_store_source_on_the_local_filesystem() {
    let dir = tempfile::tempdir().expect("tmp");
    let original = dir.path().join("product/image/3/original.jpg");
    std::fs::create_dir_all(original.parent().expect("parent")).expect("mkdir");
    std::fs::write(&original, fixtures::png_alpha(300, 300)).expect("write");
    let store = format!("file://{}", dir.path().display());
    let server = support::start(support::config(&[("source_store", store.as_str())])).await;
    let resp = get(&server, "/product/image/3/x100.png").await;
    assert_eq!(resp.status(), 200);
    let out = probe(&resp.bytes().await.expect("body"));
    assert_eq!((out.format, out.width, out.height), (Format::Png, 100, 100));
    assert_eq!(
        get(&server, "/product/image/4/x100.png").await.status(),
        404
    );
    server.stop().await.expect("stops");
}

#[tokio::test]
async fn undecodable_original_is_422_and_not_cached() {
    let origin = Origin::start().await;
    origin.put(
        "product/image/9",
        &b"<html><body>not an image</body></html>"[..],
    );
    let server = support::start_with_origin(&origin, &[]).await;
    let resp = get(&server, "/product/image/9/w100.jpg").await;
    assert_eq!(resp.status(), 422);
    assert_eq!(resp.text().await.expect("body"), "unprocessable image\n");
    server.app.pipeline.memory().sync().await;
    assert_eq!(server.app.pipeline.memory().entry_count(), 0);
    server.stop().await.expect("stops");
}
