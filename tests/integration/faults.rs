//! Faults of the world around the server: origins that fail, stall, trickle, lie or
//! refuse; clients that stall, crowd or leave; a full processing queue; SIGTERM with requests in
//! flight. Each case checks the status, the fixed body, the cache headers, that nothing was cached,
//! and that the server still serves afterwards. Every socket is on loopback.

use std::time::{Duration, Instant};

use image_server::image::fixtures;
use image_server::server::Running;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{self, get, header, Origin, Reply};
use image_server::source::raw_origin::{self as raw, Behaviour, RawOrigin};

const ID: &str = "product/image/1";

/// Asserts an error answer: status, body, and `no-store` for 5xx (a CDN must not keep it).
async fn expect_error(server: &Running, path: &str, status: u16, body: &str) {
    let resp = get(server, path).await;
    assert_eq!(resp.status(), status, "{path}");
    let cc = header(&resp, "cache-control");
    if status >= 500 {
        assert_eq!(cc, "no-store", "{path}");
    } else {
        assert!(cc.starts_with("public, max-age="), "{path}: {cc}");
    }
    assert_eq!(header(&resp, "content-type"), "text/plain; charset=utf-8");
    assert_eq!(resp.text().await.expect("body"), body, "{path}");
}

/// Nothing in the result cache nor the originals cache.
async fn assert_nothing_cached(server: &Running) {
    let p = &server.app.pipeline;
    p.memory().sync().await;
    p.sync_originals().await;
    assert_eq!(p.memory().entry_count(), 0, "result entries");
    assert_eq!(p.originals_usage().0, 0, "originals entries");
}

/// The server still renders a good original.
async fn still_serves(server: &Running, origin: &Origin) {
    origin.put("product/image/ok", fixtures::jpeg(200, 100, 85));
    let resp = get(server, "/product/image/ok/w50.jpg").await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn origin_statuses_map_to_ours() {
    let origin = Origin::start().await;
    origin.script("product/image/500", Reply::Status(500));
    origin.script("product/image/503", Reply::Status(503));
    origin.script("product/image/401", Reply::Status(401));
    origin.script("product/image/404", Reply::Status(404));
    origin.script("product/image/410", Reply::Status(410));
    let server = support::start_with_origin(&origin, &[]).await;
    expect_error(&server, "/product/image/500/w100.jpg", 502, "bad gateway\n").await;
    expect_error(&server, "/product/image/503/w100.jpg", 502, "bad gateway\n").await;
    expect_error(&server, "/product/image/401/w100.jpg", 502, "bad gateway\n").await;
    expect_error(&server, "/product/image/404/w100.jpg", 404, "not found\n").await;
    expect_error(&server, "/product/image/410/w100.jpg", 404, "not found\n").await;
    assert_nothing_cached(&server).await;
    still_serves(&server, &origin).await;
    server.stop().await.expect("stops");
}

/// Asks for `/{ID}/w100.jpg` and expects the deadline's 504 after at least `min` and before `max`:
/// earlier means the deadline did not hold the fetch open, later means it did not end it.
async fn expect_504_between(server: &Running, min: Duration, max: Duration) {
    let t = Instant::now();
    expect_error(server, &format!("/{ID}/w100.jpg"), 504, "gateway timeout\n").await;
    let took = t.elapsed();
    assert!(took >= min && took < max, "{took:?}");
}

#[tokio::test]
async fn silent_origin_is_504_at_the_fetch_deadline() {
    let origin = Origin::start().await;
    origin.script(ID, Reply::Hang);
    let server = support::start_with_origin(&origin, &[("fetch_timeout", "1s")]).await;
    expect_504_between(&server, Duration::from_millis(950), Duration::from_secs(3)).await;
    assert_nothing_cached(&server).await;
    still_serves(&server, &origin).await;
    server.stop().await.expect("stops");
}

#[tokio::test]
async fn trickling_origin_is_504_at_the_total_deadline() {
    // One byte a second: every byte is well within any idle timeout; only a total deadline ends it.
    let trickle = RawOrigin::start(
        "127.0.0.1",
        Behaviour::Trickle {
            head: raw::response(
                "200 OK",
                "content-type: image/jpeg\r\ncontent-length: 100\r\n",
                b"",
            ),
            count: 100,
            every: Duration::from_secs(1),
        },
    )
    .await;
    let url = trickle.url();
    let server = support::start(support::config(&[
        ("source_domain", url.as_str()),
        ("fetch_timeout", "2s"),
    ]))
    .await;
    expect_504_between(
        &server,
        Duration::from_millis(1950),
        Duration::from_millis(3500),
    )
    .await;
    assert_nothing_cached(&server).await;
    server.stop().await.expect("stops");
}

#[tokio::test]
async fn short_body_is_502() {
    // Declares 5000 bytes, sends 100 of a real JPEG, closes.
    let jpeg = fixtures::jpeg(200, 100, 85);
    let lying = RawOrigin::start(
        "127.0.0.1",
        Behaviour::Reply(raw::response(
            "200 OK",
            "content-type: image/jpeg\r\ncontent-length: 5000\r\n",
            &jpeg[..100],
        )),
    )
    .await;
    let url = lying.url();
    let server = support::start(support::config(&[("source_domain", url.as_str())])).await;
    expect_error(&server, &format!("/{ID}/w100.jpg"), 502, "bad gateway\n").await;
    assert_nothing_cached(&server).await;
    server.stop().await.expect("stops");
}

#[tokio::test]
async fn refused_connection_is_502() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let url = format!("http://{closed}");
    let server = support::start(support::config(&[("source_domain", url.as_str())])).await;
    expect_error(&server, &format!("/{ID}/w100.jpg"), 502, "bad gateway\n").await;
    // Accepting and closing at once (a reset mid-exchange) is the same class.
    let closing = RawOrigin::start("127.0.0.1", Behaviour::Close).await;
    let url = closing.url();
    let server2 = support::start(support::config(&[("source_domain", url.as_str())])).await;
    expect_error(&server2, &format!("/{ID}/w100.jpg"), 502, "bad gateway\n").await;
    assert!(closing.accepts() >= 1);
    assert_nothing_cached(&server).await;
    assert_nothing_cached(&server2).await;
    server.stop().await.expect("stops");
    server2.stop().await.expect("stops");
}

/// `gzip -9` of `n` zero bytes, made by the system's gzip (no compression crate in the tree).
fn gzip_of_zeros(n: usize) -> Vec<u8> {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("head -c {n} /dev/zero | gzip -9 -c"))
        .output()
        .expect("gzip");
    assert!(out.status.success());
    out.stdout
}

#[tokio::test]
async fn gzip_bomb_is_never_inflated() {
    // 200 MB of zeros in ~200 KB. We ask for `Accept-Encoding: identity` and never decompress, so the
    // bytes we get are the compressed ones: not an image, 422. Inflating would have cost 200 MB.
    let bomb = gzip_of_zeros(200 << 20);
    assert!(bomb.len() < 1 << 20, "{}", bomb.len());
    let origin = RawOrigin::start(
        "127.0.0.1",
        Behaviour::Reply(raw::response(
            "200 OK",
            &format!(
                "content-type: image/jpeg\r\ncontent-encoding: gzip\r\ncontent-length: {}\r\n",
                bomb.len()
            ),
            &bomb,
        )),
    )
    .await;
    let url = origin.url();
    let server = support::start(support::config(&[
        ("source_domain", url.as_str()),
        ("max_source_bytes", "2MB"),
    ]))
    .await;
    let rss_before = support::rss_kb();
    expect_error(
        &server,
        &format!("/{ID}/w100.jpg"),
        422,
        "unprocessable image\n",
    )
    .await;
    let grew_mb = support::rss_kb().saturating_sub(rss_before) / 1024;
    // Loose: other tests share this process. 200 MB inflated would show.
    assert!(grew_mb < 100, "RSS grew {grew_mb} MB");
    let heads = origin.heads();
    assert_eq!(heads.len(), 1);
    assert!(
        heads[0].contains("accept-encoding: identity\r\n"),
        "{}",
        heads[0]
    );
    assert_nothing_cached(&server).await;
    server.stop().await.expect("stops");
}

#[tokio::test]
async fn request_deadline_is_504() {
    // The origin answers after 3 s; the fetch deadline would allow it, the request deadline does not.
    let origin = Origin::start().await;
    origin.put(ID, fixtures::jpeg(200, 100, 85));
    origin.set_delay(Duration::from_secs(3));
    let server = support::start_with_origin(
        &origin,
        &[("request_timeout", "1s"), ("fetch_timeout", "5s")],
    )
    .await;
    let t = Instant::now();
    expect_error(
        &server,
        &format!("/{ID}/w100.jpg"),
        504,
        "gateway timeout\n",
    )
    .await;
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_millis(2500),
        "{took:?}"
    );
    server.stop().await.expect("stops");
}

#[tokio::test]
async fn full_queue_is_503_with_retry_after() {
    let origin = Origin::start().await;
    // Big enough that one render takes far longer than the other requests need to arrive.
    origin.put(ID, fixtures::jpeg(2400, 2400, 90));
    let server = support::start_with_origin(
        &origin,
        &[("processing_concurrency", "1"), ("queue_size", "1")],
    )
    .await;
    // The download takes 300 ms, so all six requests are waiting for it when it lands.
    origin.set_delay(Duration::from_millis(300));
    // Six distinct keys of one original (JPEG keeps -q in the key): they share the download, then
    // reach the pool together.
    let paths: Vec<String> = (50..56)
        .map(|q| format!("/{ID}/full_size-q{q}.jpg"))
        .collect();
    let client = support::client();
    let addr = server.addr;
    let answers = futures::future::join_all(paths.iter().map(|p| {
        let client = client.clone();
        let url = format!("http://{addr}{p}");
        async move {
            let resp = client.get(url).send().await.expect("request");
            let status = resp.status().as_u16();
            let retry = header(&resp, "retry-after");
            let cc = header(&resp, "cache-control");
            let body = resp.bytes().await.expect("body");
            (status, retry, cc, body)
        }
    }))
    .await;
    let ok = answers.iter().filter(|a| a.0 == 200).count();
    let busy: Vec<_> = answers.iter().filter(|a| a.0 == 503).collect();
    assert_eq!(
        ok + busy.len(),
        answers.len(),
        "{:?}",
        answers.iter().map(|a| a.0).collect::<Vec<_>>()
    );
    // One running + one queued are served; the rest are turned away at once.
    assert!(ok >= 2, "{ok} served");
    assert!(!busy.is_empty(), "no 503 with a pool of 1 and a queue of 1");
    for (_, retry, cc, body) in &busy {
        assert_eq!(retry, "1");
        assert_eq!(cc, "no-store");
        assert_eq!(&body[..], b"overloaded\n");
    }
    // Nothing about the refusal sticks: the same keys render on retry.
    for p in &paths {
        assert_eq!(get(&server, p).await.status(), 200, "{p}");
    }
    server.stop().await.expect("stops");
}

#[tokio::test]
async fn half_sent_request_is_dropped_after_header_read_timeout() {
    let origin = Origin::start().await;
    let server = support::start_with_origin(&origin, &[("header_read_timeout", "1s")]).await;
    let mut sock = TcpStream::connect(server.addr).await.expect("connect");
    sock.write_all(b"GET /product/image/1/w100.jpg HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let t = Instant::now();
    let mut buf = Vec::new();
    // The server closes the socket (possibly after a 408): read to EOF, bounded by the test.
    let read = tokio::time::timeout(Duration::from_secs(5), sock.read_to_end(&mut buf)).await;
    let took = t.elapsed();
    assert!(read.is_ok(), "connection still open after 5 s");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    let text = String::from_utf8_lossy(&buf);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
    still_serves(&server, &origin).await;
    server.stop().await.expect("stops");
}

#[tokio::test]
async fn a_full_port_closes_idle_connections_and_makes_new_ones_wait_for_busy_ones() {
    let origin = Origin::start().await;
    origin.put(ID, fixtures::jpeg(200, 100, 85));
    origin.put("product/image/2", fixtures::jpeg(200, 100, 85));
    origin.put("product/image/3", fixtures::jpeg(200, 100, 85));
    let server = support::start_with_origin(
        &origin,
        &[("max_connections", "2"), ("header_read_timeout", "\"30s\"")],
    )
    .await;
    let addr = server.addr;
    let fetch = move |path: String| {
        tokio::spawn(async move {
            support::client()
                .get(format!("http://{addr}{path}"))
                .send()
                .await
                .map(|r| r.status().as_u16())
        })
    };

    // Two idle connections take both places; a third client is served anyway, and the idle
    // connection that waited longest was closed for it.
    let mut held1 = TcpStream::connect(server.addr).await.expect("connect");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let _held2 = TcpStream::connect(server.addr).await.expect("connect");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let status = tokio::time::timeout(Duration::from_secs(10), fetch(format!("/{ID}/w100.jpg")))
        .await
        .expect("served despite the idle connections")
        .expect("task")
        .expect("request");
    assert_eq!(status, 200);
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(5), held1.read(&mut buf))
        .await
        .expect("the oldest idle connection was closed");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");

    // Two requests in progress take both places: a third connection waits for one of them.
    origin.set_delay(Duration::from_millis(1500));
    let busy1 = fetch("/product/image/2/w100.jpg".to_owned());
    let busy2 = fetch("/product/image/3/w100.jpg".to_owned());
    tokio::time::sleep(Duration::from_millis(300)).await;
    origin.set_delay(Duration::ZERO);
    let third = fetch(format!("/{ID}/w120.jpg"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !third.is_finished(),
        "the third connection was served past the cap while both were busy"
    );
    // A place frees when a busy request ends: it waited, it was not refused.
    for busy in [busy1, busy2] {
        assert_eq!(busy.await.expect("task").expect("request"), 200);
    }
    let status = tokio::time::timeout(Duration::from_secs(10), third)
        .await
        .expect("served after a place freed")
        .expect("task")
        .expect("request");
    assert_eq!(status, 200);
    server.stop().await.expect("stop");
}

/// `processing.current` from the status page.
async fn processing_current(server: &Running) -> u64 {
    let text = support::client()
        .get(format!("http://{}/", server.status_addr))
        .send()
        .await
        .expect("status")
        .text()
        .await
        .expect("text");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    v["processing"]["current"]
        .as_u64()
        .expect("processing.current")
}

#[tokio::test]
async fn client_leaving_mid_render_releases_the_pool() {
    let origin = Origin::start().await;
    origin.put(ID, fixtures::jpeg(3000, 3000, 90));
    let server = support::start_with_origin(
        &origin,
        &[("processing_concurrency", "1"), ("queue_size", "1")],
    )
    .await;
    let addr = server.addr;
    let leaving = tokio::spawn(async move {
        let _ = support::client()
            .get(format!("http://{addr}/{ID}/full_size.png"))
            .send()
            .await;
    });
    // Wait until its render holds the only permit, then hang up.
    let t = Instant::now();
    while processing_current(&server).await == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "render never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    leaving.abort();
    let _ = leaving.await;
    // The next request gets the permit once that render ends: no leak, no panic.
    let resp = tokio::time::timeout(
        Duration::from_secs(20),
        get(&server, &format!("/{ID}/w100.jpg")),
    )
    .await
    .expect("permit released");
    assert_eq!(resp.status(), 200);
    let t = Instant::now();
    while processing_current(&server).await != 0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "permit never returned"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(server.app.pipeline.stats().queue_depth, 0);
    server.stop().await.expect("stops");
}

/// The real binary, stopped with SIGTERM while 20 requests are in flight.
#[tokio::test]
async fn sigterm_drains_in_flight_requests() {
    let origin = Origin::start().await;
    for i in 0..20 {
        origin.put(&format!("product/image/{i}"), fixtures::jpeg(200, 100, 85));
    }
    origin.set_delay(Duration::from_secs(1));
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_image-server"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["-e", "test", "serve"])
        .env("IMAGE_SERVER_SOURCE_DOMAIN", origin.url())
        .env("IMAGE_SERVER_LOG_LEVEL", "info")
        // All 20 downloads land together: room for all of them in the pool's queue.
        .env("IMAGE_SERVER_DOWNLOAD_CONCURRENCY", "32")
        .env("IMAGE_SERVER_QUEUE_SIZE", "64")
        .env("IMAGE_SERVER_SHUTDOWN_GRACE", "20s")
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn image-server");
    let (image, status) = listening_addrs(&mut child).await;

    // A status connection opened before the signal, as a load balancer's health checker keeps one.
    let checker = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(1)
        .build()
        .expect("client");
    let ready = checker
        .get(format!("http://{status}/ready"))
        .send()
        .await
        .expect("ready");
    assert_eq!(ready.status(), 200);

    let client = support::client();
    let requests: Vec<_> = (0..20)
        .map(|i| {
            let client = client.clone();
            let url = format!("http://{image}/product/image/{i}/w100.jpg");
            tokio::spawn(async move {
                client
                    .get(url)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .map_err(|e| e.to_string())
            })
        })
        .collect();
    // Every request has reached the origin (which holds each for 1 s) before the signal.
    let t = Instant::now();
    while origin.total() < 20 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "requests never arrived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let pid = child.id().expect("pid");
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(sent.success());

    // /ready says 503 at once, while the requests are still in flight.
    let t = Instant::now();
    let code = loop {
        let code = checker
            .get(format!("http://{status}/ready"))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0);
        if code == 503 || t.elapsed() > Duration::from_millis(500) {
            break code;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(code, 503, "/ready after SIGTERM");
    assert!(
        requests.iter().any(|r| !r.is_finished()),
        "checked /ready too late to mean anything"
    );
    for r in requests {
        assert_eq!(r.await.expect("task"), Ok(200));
    }
    let exit = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("exits within the grace")
        .expect("wait");
    assert_eq!(exit.code(), Some(0), "{exit:?}");
}

/// Reads the child's log until the `listening` line; returns (image, status) addresses.
async fn listening_addrs(
    child: &mut tokio::process::Child,
) -> (std::net::SocketAddr, std::net::SocketAddr) {
    use tokio::io::AsyncBufReadExt;
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if !line.contains("listening") {
                continue;
            }
            let field = |name: &str| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(name))
                    .and_then(|v| v.parse::<std::net::SocketAddr>().ok())
            };
            if let (Some(i), Some(s)) = (field("image="), field("status=")) {
                return Some((i, s));
            }
        }
        None
    })
    .await
    .expect("listening line within 20 s")
    .expect("listening line with both addresses");
    // Keep draining the log so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inflight_download_budget_bounds_concurrent_fetches() {
    // max_source_bytes = 1 MB and max_inflight_download_mb = 2: at most two downloads may hold
    // memory at once, whatever download_concurrency allows.
    let origin = Origin::start().await;
    for i in 0..6 {
        origin.put(
            &format!("product/image/{}", 700 + i),
            image_server::image::fixtures::jpeg(200, 150, 80),
        );
    }
    origin.set_delay(Duration::from_millis(200));
    let server = support::start_with_origin(
        &origin,
        &[
            ("max_source_bytes", "\"1MB\""),
            ("max_inflight_download_mb", "2"),
            ("download_concurrency", "16"),
            ("queue_size", "32"),
        ],
    )
    .await;
    let server = std::sync::Arc::new(server);
    let mut tasks = Vec::new();
    for i in 0..6 {
        let s = server.clone();
        tasks.push(tokio::spawn(async move {
            get(&s, &format!("/product/image/{}/w50.jpg", 700 + i))
                .await
                .status()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("join"), 200);
    }
    assert_eq!(origin.total(), 6);
    assert_eq!(
        origin.max_concurrent(),
        2,
        "two 1 MB reservations fill the 2 MB budget"
    );
}
