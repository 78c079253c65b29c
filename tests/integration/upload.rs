//! Uploads, ingest and deletes of originals over HTTP, against a `file://` source store and a
//! SeaweedFS one: every answer and its counter, conditional writes, replacements that never let an
//! old size back, concurrent writers, clients that stop mid-body, the hostile originals, signed
//! browser uploads with CORS, the Go server's `POST ?outputs=&source=` form, and named versions.
//!
//! The store is checked directly after each refusal: nothing may be left behind.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::Method;
use image_server::app::App;
use image_server::image::{fixtures, vips};
use image_server::server::{self, Running};
use image_server::source::guard::{AddressPolicy, SourceGuard};
use image_server::source::{Source, SourceLimits};
use image_server::upload::auth;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::hostile;
use crate::seaweed::Seaweed;
use crate::source_override::TableResolver;
use crate::support::{self, client, counter, header, probe, Origin};

const TOKEN: &str = "upload-token-for-the-tests";
const KEY: &str = "upload-signing-key-for-the-tests";
const NAMED: &str = "thumb=x150.jpg,card=300x400.jpg,zoom=w1200-q85.jpg";

/// Where originals live in a test: a directory, or a SeaweedFS bucket.
enum Store {
    Dir(tempfile::TempDir),
    S3(Seaweed),
}

impl Store {
    fn dir() -> Store {
        Store::Dir(tempfile::tempdir().expect("tmp"))
    }

    fn overrides(&self) -> Vec<(String, String)> {
        match self {
            Store::Dir(d) => vec![(
                "source_store".into(),
                format!("file://{}", d.path().display()),
            )],
            Store::S3(weed) => {
                // Originals and results in the same bucket, under their own prefixes.
                let mut o = weed.overrides("results");
                o.push(("source_store".into(), weed.url("originals")));
                o
            }
        }
    }

    /// Every object below the originals, as paths relative to the store.
    async fn originals(&self) -> Vec<String> {
        match self {
            Store::Dir(d) => {
                let mut out = Vec::new();
                walk(d.path(), d.path(), &mut out);
                out
            }
            Store::S3(weed) => weed.list("originals").await,
        }
    }

    /// Every stored variant (SeaweedFS only; the `file://` tests have no result store).
    async fn results(&self) -> Vec<String> {
        match self {
            Store::Dir(_) => Vec::new(),
            Store::S3(weed) => weed.list("results").await,
        }
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path: PathBuf = entry.path();
        if path.is_dir() {
            walk(root, &path, out);
        } else if let Ok(rel) = path.strip_prefix(root) {
            out.push(rel.display().to_string());
        }
    }
}

async fn start(store: &Store, extra: &[(&str, &str)]) -> Running {
    let mut o: Vec<(String, String)> = store.overrides();
    o.push(("upload_token".into(), TOKEN.into()));
    o.push(("upload_signing_key".into(), KEY.into()));
    o.push(("named_versions".into(), NAMED.into()));
    o.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    let pairs: Vec<(&str, &str)> = o.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    support::start(support::config(&pairs)).await
}

fn url(server: &Running, path: &str) -> String {
    format!("http://{}{}", server.addr, path)
}

async fn put(server: &Running, path: &str, body: Vec<u8>) -> reqwest::Response {
    client()
        .put(url(server, path))
        .bearer_auth(TOKEN)
        .body(body)
        .send()
        .await
        .expect("PUT")
}

async fn json(resp: reqwest::Response) -> serde_json::Value {
    let text = resp.text().await.expect("body");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"))
}

async fn image(server: &Running, path: &str) -> (u16, bytes::Bytes) {
    let resp = support::get(server, path).await;
    let status = resp.status().as_u16();
    (status, resp.bytes().await.expect("body"))
}

/// PUT, GET of a named size, DELETE, GET: the transcript the docs show, on both stores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_named_size_delete_cycle_on_a_directory_and_on_s3() {
    for store in [Store::dir(), Store::S3(Seaweed::start("uploads"))] {
        let server = start(&store, &[]).await;
        let path = "/product/image/42";
        println!("$ curl -X PUT -H 'Authorization: Bearer …' --data-binary @photo.jpg {path}");
        let resp = put(&server, path, fixtures::jpeg(800, 600, 85)).await;
        assert_eq!(resp.status(), 201);
        assert_eq!(header(&resp, "cache-control"), "no-store");
        assert_eq!(header(&resp, "location"), path);
        let etag = header(&resp, "etag");
        let body = json(resp).await;
        println!("201 {body}");
        assert_eq!(body["id"], "product/image/42");
        assert_eq!(
            (body["width"].as_u64(), body["height"].as_u64()),
            (Some(800), Some(600))
        );
        assert_eq!(body["format"], "jpg");
        assert_eq!(body["etag"], etag.as_str());
        // Every named version by default, in canonical form.
        let outputs: Vec<&str> = body["outputs"]
            .as_array()
            .expect("outputs")
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        assert_eq!(outputs, ["300x400.jpg", "150x150.jpg", "w1200-q85.jpg"]);
        assert_eq!(store.originals().await.len(), 1, "one original stored");

        let (status, thumb) = image(&server, &format!("{path}/thumb")).await;
        println!("$ curl {path}/thumb\n{status} {} bytes", thumb.len());
        assert_eq!(status, 200);
        let p = probe(&thumb);
        assert_eq!((p.width, p.height), (150, 150));
        let same = support::get(&server, &format!("{path}/x150.jpg")).await;
        assert_eq!(
            header(&same, "x-cache"),
            "memory",
            "one entry for both names"
        );
        assert_eq!(same.bytes().await.expect("bytes"), thumb);

        let resp = client()
            .delete(url(&server, path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("DELETE");
        println!(
            "$ curl -X DELETE -H 'Authorization: Bearer …' {path}\n{}",
            resp.status()
        );
        assert_eq!(resp.status(), 204);
        let (status, _) = image(&server, &format!("{path}/thumb")).await;
        println!("$ curl {path}/thumb\n{status}");
        assert_eq!(status, 404);
        assert!(store.originals().await.is_empty(), "the original is gone");
        let left: Vec<String> = store
            .results()
            .await
            .into_iter()
            .filter(|k| k.contains("product/image/42/"))
            .collect();
        assert!(left.is_empty(), "stored variants left: {left:?}");
        let again = client()
            .delete(url(&server, path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("DELETE");
        assert_eq!(again.status(), 404, "nothing to delete");
        // Counters are process-wide and other tests upload in parallel: at least these.
        assert!(counter(&server, "upload.created").await >= 1.0);
        assert!(counter(&server, "upload.deleted").await >= 1.0);
        assert!(counter(&server, "rejected.upload_missing").await >= 1.0);
    }
}

/// Conditional writes, and a replacement that purges every old size before it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_writes_and_replacements() {
    let store = Store::dir();
    let server = start(&store, &[]).await;
    let path = "/product/image/7";
    let create_only = |body: Vec<u8>| {
        client()
            .put(url(&server, path))
            .bearer_auth(TOKEN)
            .header("if-none-match", "*")
            .body(body)
    };
    let first = create_only(fixtures::jpeg(400, 200, 85))
        .send()
        .await
        .expect("PUT");
    assert_eq!(first.status(), 201);
    let etag = header(&first, "etag");
    let again = create_only(fixtures::jpeg(400, 200, 85))
        .send()
        .await
        .expect("PUT");
    assert_eq!(again.status(), 412, "If-None-Match: * on an existing id");

    let (_, old) = image(&server, &format!("{path}/w100.jpg")).await;
    assert_eq!((probe(&old).width, probe(&old).height), (100, 50));

    let replace = |tag: &str, body: Vec<u8>| {
        client()
            .put(url(&server, path))
            .bearer_auth(TOKEN)
            .header("if-match", tag)
            .body(body)
    };
    let stale = replace("\"0000\"", fixtures::jpeg(200, 200, 85))
        .send()
        .await
        .expect("PUT");
    assert_eq!(stale.status(), 412, "If-Match with another version");
    let ok = replace(&etag, fixtures::jpeg(200, 200, 85))
        .send()
        .await
        .expect("PUT");
    assert_eq!(ok.status(), 200, "replaced");
    // The memory entry of w100 came from the old original: it must not be served.
    let (_, new) = image(&server, &format!("{path}/w100.jpg")).await;
    assert_eq!((probe(&new).width, probe(&new).height), (100, 100));
    let deleted = client()
        .delete(url(&server, path))
        .bearer_auth(TOKEN)
        .header("if-match", &etag)
        .send()
        .await
        .expect("DELETE");
    assert_eq!(
        deleted.status(),
        412,
        "a delete of a version that was replaced"
    );
    // Process-wide counters (other tests run in parallel): at least these.
    assert!(counter(&server, "upload.replaced").await >= 1.0);
    assert!(counter(&server, "rejected.precondition").await >= 3.0);
}

/// Ten writers of different images to one id, with readers in between: afterwards the original is
/// one of them, whole, and every size served matches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_puts_leave_one_whole_original_and_matching_sizes() {
    let weed = Seaweed::start("race");
    let store = Store::S3(weed);
    let server = Arc::new(start(&store, &[("max_concurrent_uploads", "10")]).await);
    let path = "/product/image/race";
    // Distinct aspect ratios: a size made from one original cannot pass for another's. Large
    // enough that renders take a while, so some are still running when the next upload lands.
    let images: Vec<Vec<u8>> = (0..10)
        .map(|i| fixtures::jpeg(1500 + 100 * i, 1000, 80))
        .collect();
    let mut puts = Vec::new();
    for body in images.clone() {
        let server = server.clone();
        puts.push(tokio::spawn(async move {
            put(&server, path, body).await.status().as_u16()
        }));
    }
    // Readers asking for sizes all along, so renders of every intermediate original run.
    let writing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut gets = Vec::new();
    for version in ["h50.jpg", "w100.jpg", "full_size.jpg", "thumb"] {
        let (server, writing) = (server.clone(), writing.clone());
        gets.push(tokio::spawn(async move {
            let mut last = 200;
            while writing.load(std::sync::atomic::Ordering::Relaxed) {
                last = image(&server, &format!("{path}/{version}")).await.0;
                if !matches!(last, 200 | 404 | 503) {
                    break;
                }
            }
            last
        }));
    }
    // 20 requests at once on 2 cores' render queue: some may be shed (503, by design).
    let mut stored_ok = Vec::new();
    for (i, t) in puts.into_iter().enumerate() {
        let status = t.await.expect("task");
        assert!(matches!(status, 200 | 201 | 503), "PUT {i}: {status}");
        if status != 503 {
            stored_ok.push(i);
        }
    }
    writing.store(false, std::sync::atomic::Ordering::Relaxed);
    for t in gets {
        let status = t.await.expect("task");
        assert!(matches!(status, 200 | 404 | 503), "GET: {status}");
    }
    assert!(!stored_ok.is_empty(), "no upload went through");
    let stored = match &store {
        Store::S3(weed) => weed.get("originals/product/image/race/original.jpg").await,
        Store::Dir(_) => unreachable!("S3 here"),
    };
    let winner = images
        .iter()
        .position(|i| *i == stored)
        .expect("the stored original is one of the uploads, whole");
    assert!(
        stored_ok.contains(&winner),
        "upload {winner} was refused but stored"
    );
    let (w, h) = (1500 + 100 * winner as u32, 1000);
    for (version, expect) in [
        ("h50.jpg", (w * 50 / h, 50)),
        ("w100.jpg", (100, (h * 100 + w / 2) / w)),
        ("full_size.jpg", (w, h)),
        ("thumb", (150, 150)),
    ] {
        let (status, bytes) = image(&server, &format!("{path}/{version}")).await;
        assert_eq!(status, 200, "{version}");
        let p = probe(&bytes);
        let (pw, ph) = (p.width, p.height);
        assert!(
            pw.abs_diff(expect.0) <= 1 && ph.abs_diff(expect.1) <= 1,
            "{version}: {pw}×{ph}, the original is {w}×{h}"
        );
    }
    println!(
        "10 concurrent PUTs: {} stored, upload {winner} ({w}×{h}) is the original, every size matches it",
        stored_ok.len()
    );
}

/// The refusal table, on a directory and on S3: each request, its status, and what was stored
/// (nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_store_nothing() {
    for store in [Store::dir(), Store::S3(Seaweed::start("refusals"))] {
        refusals_on(&store).await;
    }
    // Uploads on, originals from an HTTP origin: 405, with a message that says why.
    let origin = Origin::start().await;
    let http = support::start_with_origin(&origin, &[("upload_token", TOKEN)]).await;
    let resp = put(&http, "/product/image/x", fixtures::jpeg(8, 8, 80)).await;
    assert_eq!(resp.status(), 405);
    assert_eq!(header(&resp, "allow"), "GET, HEAD");
    assert_eq!(
        resp.text().await.expect("body"),
        "uploads need source_store\n"
    );
    // Uploads off: PUT is the 405 it always was.
    let off = support::start_with_origin(&origin, &[]).await;
    let resp = put(&off, "/product/image/x", fixtures::jpeg(8, 8, 80)).await;
    assert_eq!(resp.status(), 405);
    assert_eq!(resp.text().await.expect("body"), "method not allowed\n");
}

async fn refusals_on(store: &Store) {
    let server = start(store, &[("max_upload_bytes", "200KB")]).await;
    let good = fixtures::jpeg(64, 48, 80);
    let truncated_jpeg = {
        let j = fixtures::jpeg(400, 300, 85);
        j[..j.len() / 2].to_vec()
    };
    let truncated_png = {
        let p = fixtures::png_alpha(300, 200);
        p[..p.len() / 2].to_vec()
    };
    let expired = format!(
        "/product/image/x?expires=1000&s={}",
        auth::sign(KEY, &Method::PUT, "/product/image/x", 1000)
    );
    let big = vec![0xFFu8; 300 * 1024];
    let c = client();
    let cases: Vec<(&str, reqwest::RequestBuilder, u16, &str)> = vec![
        (
            "no credentials",
            c.put(url(&server, "/product/image/x")).body(good.clone()),
            401,
            "unauthorized",
        ),
        (
            "wrong token",
            c.put(url(&server, "/product/image/x"))
                .bearer_auth("wrong-token-wrong-token")
                .body(good.clone()),
            403,
            "forbidden",
        ),
        (
            "expired signed URL",
            c.put(url(&server, &expired)).body(good.clone()),
            403,
            "forbidden",
        ),
        (
            "Content-Length over the limit",
            c.put(url(&server, "/product/image/x"))
                .bearer_auth(TOKEN)
                .body(big.clone()),
            413,
            "upload_too_large",
        ),
        (
            "chunked body over the limit",
            c.put(url(&server, "/product/image/x"))
                .bearer_auth(TOKEN)
                .body(reqwest::Body::wrap_stream(futures::stream::iter(
                    (0..30).map(|_| Ok::<_, std::io::Error>(vec![0u8; 10 * 1024])),
                ))),
            413,
            "upload_too_large",
        ),
        (
            "empty body",
            c.put(url(&server, "/product/image/x")).bearer_auth(TOKEN),
            400,
            "upload_request",
        ),
        (
            "HTML sent as image/jpeg",
            c.put(url(&server, "/product/image/x"))
                .bearer_auth(TOKEN)
                .header("content-type", "image/jpeg")
                .body(hostile::HTML),
            415,
            "upload_format",
        ),
        (
            "SVG",
            c.put(url(&server, "/product/image/x"))
                .bearer_auth(TOKEN)
                .body(hostile::SVG),
            415,
            "upload_format",
        ),
        (
            "PNG bomb (100000×100000)",
            c.put(url(&server, "/product/image/x"))
                .bearer_auth(TOKEN)
                .body(hostile::png_bomb()),
            422,
            "upload_invalid",
        ),
        (
            "JPEG bomb (65500×65500)",
            c.put(url(&server, "/product/image/x"))
                .bearer_auth(TOKEN)
                .body(hostile::jpeg_bomb()),
            422,
            "upload_invalid",
        ),
        (
            "GIF bomb (frame at 60000,60000)",
            c.put(url(&server, "/product/image/x"))
                .bearer_auth(TOKEN)
                .body(hostile::gif_bomb()),
            422,
            "upload_invalid",
        ),
        (
            "truncated JPEG",
            c.put(url(&server, "/product/image/x"))
                .bearer_auth(TOKEN)
                .body(truncated_jpeg),
            422,
            "upload_invalid",
        ),
        (
            "truncated PNG",
            c.put(url(&server, "/product/image/x"))
                .bearer_auth(TOKEN)
                .body(truncated_png),
            422,
            "upload_invalid",
        ),
        (
            "bad outputs=",
            c.put(url(&server, "/product/image/x?outputs=w99999.jpg"))
                .bearer_auth(TOKEN)
                .body(good.clone()),
            400,
            "upload_request",
        ),
        (
            "not an original's path",
            c.put(url(&server, "/product/image/x/w100.jpg"))
                .bearer_auth(TOKEN)
                .body(good.clone()),
            404,
            "no_route",
        ),
    ];
    println!("| request | status | stored |");
    println!("|---|---|---|");
    for (what, request, status, kind) in cases {
        let before = counter(&server, &format!("rejected.{kind}")).await;
        let resp = request.send().await.expect("request");
        assert_eq!(resp.status().as_u16(), status, "{what}");
        assert_eq!(header(&resp, "cache-control"), "no-store", "{what}");
        if status == 401 {
            assert_eq!(header(&resp, "www-authenticate"), "Bearer");
        }
        let stored = store.originals().await;
        println!(
            "| {what} | {status} | {} |",
            if stored.is_empty() {
                "nothing".to_owned()
            } else {
                format!("{stored:?}")
            }
        );
        assert!(stored.is_empty(), "{what} left {stored:?}");
        // Process-wide (other tests run in parallel): at least this refusal.
        let after = counter(&server, &format!("rejected.{kind}")).await;
        assert!(after > before, "{what}: rejected.{kind} {before} → {after}");
    }
    // The server is still whole: a good upload goes through.
    assert_eq!(put(&server, "/product/image/x", good).await.status(), 201);
}

/// The source store down: 503 `store unavailable`, and once it is back, nothing was written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_is_503_and_leaves_nothing() {
    let mut weed = Seaweed::start("outage");
    let mut overrides = weed.overrides("results");
    overrides.push(("source_store".into(), weed.url("originals")));
    overrides.push(("upload_token".into(), TOKEN.into()));
    overrides.push(("fetch_timeout".into(), "2s".into()));
    let pairs: Vec<(&str, &str)> = overrides
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let server = support::start(support::config(&pairs)).await;
    weed.stop();
    let resp = put(&server, "/product/image/o", fixtures::jpeg(64, 48, 80)).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(header(&resp, "retry-after"), "1");
    assert_eq!(resp.text().await.expect("body"), "store unavailable\n");
    weed.resume();
    assert!(weed.list("originals").await.is_empty(), "nothing written");
    assert_eq!(
        put(&server, "/product/image/o", fixtures::jpeg(64, 48, 80))
            .await
            .status(),
        201,
        "the same upload once the store is back"
    );
}

/// Clients that stop: one that disconnects mid-body, one that goes silent (408). Neither leaves an
/// object, and neither keeps an upload place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stop_mid_body_leave_nothing() {
    let store = Store::dir();
    let server = start(
        &store,
        &[("upload_timeout", "1s"), ("max_concurrent_uploads", "1")],
    )
    .await;
    let head = format!(
        "PUT /product/image/d HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 100000\r\n\r\n"
    );
    let mut dropped = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    dropped.write_all(head.as_bytes()).await.expect("head");
    dropped
        .write_all(&fixtures::jpeg(64, 64, 80)[..500])
        .await
        .expect("part");
    drop(dropped);
    // The server notices the disconnect (counted), and the upload place is free again.
    let mut aborted = 0.0;
    for _ in 0..100 {
        aborted = counter(&server, "rejected.upload_aborted").await;
        if aborted >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(aborted >= 1.0, "the dropped upload was not counted");

    let mut silent = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    silent.write_all(head.as_bytes()).await.expect("head");
    silent.write_all(&[0xFF, 0xD8]).await.expect("part");
    // While it holds the one upload place, another upload is turned away at once.
    let mut busy = put(&server, "/product/image/e", fixtures::jpeg(64, 64, 80)).await;
    for _ in 0..20 {
        if busy.status() == 503 {
            break;
        }
        // The silent upload had not taken its place yet.
        tokio::time::sleep(Duration::from_millis(20)).await;
        busy = put(&server, "/product/image/e", fixtures::jpeg(64, 64, 80)).await;
    }
    assert_eq!(busy.status(), 503);
    assert_eq!(header(&busy, "retry-after"), "1");
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), silent.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the silent client was answered and closed");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.ends_with("request timeout\n"), "{text}");

    let left = store.originals().await;
    assert!(left.iter().all(|p| !p.contains("image/d/")), "{left:?}");
    assert!(counter(&server, "rejected.upload_timeout").await >= 1.0);
    assert!(counter(&server, "rejected.upload_busy").await >= 1.0);
    // The one upload place is free again.
    assert_eq!(
        put(&server, "/product/image/d", fixtures::jpeg(64, 64, 80))
            .await
            .status(),
        201
    );
}

/// A browser uploading with a signed URL from an allowed page: the preflight, the upload, and
/// nothing for other origins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_browser_upload_with_cors() {
    let store = Store::dir();
    let server = start(
        &store,
        &[("upload_cors_origins", "https://app.example.com")],
    )
    .await;
    let path = "/avatar/image/5";
    let preflight = |origin: &str| {
        client()
            .request(reqwest::Method::OPTIONS, url(&server, path))
            .header("origin", origin)
            .header("access-control-request-method", "PUT")
            .send()
    };
    let ok = preflight("https://app.example.com").await.expect("OPTIONS");
    assert_eq!(ok.status(), 204);
    assert_eq!(
        header(&ok, "access-control-allow-origin"),
        "https://app.example.com"
    );
    assert_eq!(
        header(&ok, "access-control-allow-methods"),
        "PUT, POST, DELETE"
    );
    let other = preflight("https://evil.example.net")
        .await
        .expect("OPTIONS");
    assert_eq!(other.status(), 403);
    assert_eq!(header(&other, "access-control-allow-origin"), "");

    let expires = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 600;
    let s = auth::sign(KEY, &Method::PUT, path, expires);
    let resp = client()
        .put(url(&server, &format!("{path}?expires={expires}&s={s}")))
        .header("origin", "https://app.example.com")
        .body(fixtures::png_alpha(120, 80))
        .send()
        .await
        .expect("signed PUT");
    assert_eq!(resp.status(), 201);
    assert_eq!(
        header(&resp, "access-control-allow-origin"),
        "https://app.example.com"
    );
    assert_eq!(json(resp).await["format"], "png");
    // The same URL for another method is refused.
    let resp = client()
        .delete(url(&server, &format!("{path}?expires={expires}&s={s}")))
        .send()
        .await
        .expect("DELETE");
    assert_eq!(resp.status(), 403);
    // GET answers carry no CORS headers: only the uploads do.
    let (status, _) = image(&server, &format!("{path}/w50.jpg")).await;
    assert_eq!(status, 200);
    let get = client()
        .get(url(&server, &format!("{path}/w50.jpg")))
        .header("origin", "https://app.example.com")
        .send()
        .await
        .expect("GET");
    assert_eq!(header(&get, "access-control-allow-origin"), "");
}

/// The Go server's ingest: `POST …?outputs=LIST&source=URL`, with the source on the allow-list (a
/// loopback origin seen through the test resolver and address policy, as in the `?source=` tests).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_ingest_from_a_source_url_renders_the_outputs() {
    let origin = Origin::start().await;
    origin.script_path(
        "/remote/photo.jpg",
        crate::support::Reply::Body(fixtures::jpeg(640, 480, 85).into()),
    );
    let dir = Store::dir();
    let mut o: Vec<(String, String)> = dir.overrides();
    for (k, v) in [
        ("upload_token", TOKEN),
        ("named_versions", NAMED),
        ("allow_source_override", "true"),
        ("allowed_source_hosts", "img.test"),
    ] {
        o.push((k.into(), v.into()));
    }
    let pairs: Vec<(&str, &str)> = o.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let cfg = support::config(&pairs);
    vips::init(cfg.rendering.accept_avif_input).expect("libvips");
    image_server::metrics::install(None);
    let resolver = TableResolver::new(&[("img.test", "127.0.0.1")]);
    let guard = SourceGuard::new(
        &cfg.security.allowed_source_hosts,
        SourceLimits::from_config(&cfg),
        Arc::new(resolver),
        AddressPolicy::for_tests(vec!["127.0.0.1".parse().expect("ip")]),
    )
    .expect("guard");
    let cfg = Arc::new(cfg);
    let source = Source::from_config(&cfg).expect("source");
    let server = server::start(App::with_parts(cfg, source, None, Some(guard)))
        .await
        .expect("server");

    let port = origin
        .url()
        .rsplit(':')
        .next()
        .map(str::to_owned)
        .expect("port");
    let source_url = format!("http://img.test:{port}/remote/photo.jpg");
    let q = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("outputs", "x300.jpg,x300.webp")
        .append_pair("source", &source_url)
        .finish();
    let resp = client()
        .post(url(&server, &format!("/user/avatar/3589782?{q}")))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status(), 201);
    let body = json(resp).await;
    assert_eq!(
        (body["width"].as_u64(), body["height"].as_u64()),
        (Some(640), Some(480))
    );
    assert_eq!(
        body["outputs"],
        serde_json::json!(["300x300.jpg", "300x300.webp"])
    );
    // The outputs are rendered in the background; both then come from memory.
    // The outputs are rendered in the background: once both are, they come from memory, and
    // the origin was asked once (for the ingest, never for the renders).
    for v in ["x300.jpg", "x300.webp"] {
        let mut cached = String::new();
        for _ in 0..100 {
            let resp = client()
                .head(url(&server, &format!("/user/avatar/3589782/{v}")))
                .send()
                .await
                .expect("HEAD");
            assert_eq!(resp.status(), 200, "{v}");
            cached = header(&resp, "x-cache");
            if cached == "memory" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(cached, "memory", "{v} was rendered after the upload");
    }
    assert_eq!(origin.path_hits("/remote/photo.jpg"), 1);
    // A host off the list, and a signed (not token) request with source=, are refused.
    let q = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("source", "http://evil.test/a.jpg")
        .finish();
    let resp = client()
        .post(url(&server, &format!("/user/avatar/1?{q}")))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status(), 403);
    assert!(dir
        .originals()
        .await
        .iter()
        .all(|p| !p.contains("avatar/1/")));
}
