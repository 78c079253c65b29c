//! The popular-size pre-render: after a client's miss, the most requested other versions of the
//! class are rendered in the background from the original already held, and counted apart.

use std::time::{Duration, Instant};

use image_server::image::fixtures;
use image_server::request::{ImageRequest, Rules};

use image_server::server::Running;

use crate::support::{self, get, header, Origin};

/// Waits (up to 20 s) until `path`'s variant is in the server's memory tier.
async fn until_in_memory(server: &Running, path: &str) {
    let req = ImageRequest::parse(path, &Rules::default()).expect("valid path");
    let key = req.cache_key(req.format);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !server.app.pipeline.memory().contains(&key) {
        assert!(Instant::now() < deadline, "{path} was never pre-rendered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn origin_with_six() -> Origin {
    let origin = Origin::start().await;
    for id in 1..=6 {
        origin.put(&format!("product/image/{id}"), fixtures::jpeg(800, 600, 85));
    }
    origin
}

/// The scenario: `w200` of ids 1–5 makes `w200` the class's favourite; a miss of `w300` of id 6
/// then pre-renders `w200` of id 6, which answers from memory without another origin fetch.
async fn popular_size_is_rendered_before_it_is_asked_for(server: &Running, origin: &Origin) {
    for id in 1..=5 {
        let resp = get(server, &format!("/product/image/{id}/w200.jpg")).await;
        assert_eq!(resp.status(), 200);
    }
    let resp = get(server, "/product/image/6/w300.jpg").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-cache"), "miss");

    until_in_memory(server, "/product/image/6/w200.jpg").await;
    let resp = get(server, "/product/image/6/w200.jpg").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-cache"), "memory");
    let bytes = resp.bytes().await.expect("body");
    assert_eq!(support::probe(&bytes).width, 200);
    assert_eq!(origin.hits("product/image/6"), 1, "no second origin fetch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn popular_versions_are_prerendered_after_a_miss() {
    let origin = origin_with_six().await;
    let server = support::start_with_origin(&origin, &[("processing_concurrency", "2")]).await;
    popular_size_is_rendered_before_it_is_asked_for(&server, &origin).await;

    // The table on the status port.
    let text = support::client()
        .get(format!("http://{}/versions", server.status_addr))
        .send()
        .await
        .expect("versions")
        .text()
        .await
        .expect("text");
    let versions: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    let class = &versions["classes"]["product/image"];
    assert_eq!(class[0]["version"], "w200.jpg", "{versions}");
    // Five w200 requests for ids 1-5 and the one for id 6: the background render did not count.
    assert_eq!(class[0]["score"].as_f64().map(f64::round), Some(6.0));
    assert_eq!(class[1]["version"], "w300.jpg");
    server.stop().await.expect("stop");
}

/// Counters are process-wide, so the exact counts are checked in a process of their own (the
/// ignored test below, run by this one).
#[test]
fn prerenders_are_counted_apart_from_image_requests() {
    support::run_isolated("prerender::counted_apart_isolated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run in its own process by prerenders_are_counted_apart_from_image_requests"]
async fn counted_apart_isolated() {
    let origin = origin_with_six().await;
    let server = support::start_with_origin(&origin, &[("processing_concurrency", "2")]).await;
    popular_size_is_rendered_before_it_is_asked_for(&server, &origin).await;
    // Six client misses rendered; the background render is not among them.
    assert_eq!(support::counter(&server, "image_request").await, 6.0);
    assert_eq!(support::counter(&server, "prerender.rendered").await, 1.0);
    assert_eq!(support::counter(&server, "prerender.dropped").await, 0.0);
    server.stop().await.expect("stop");
}
