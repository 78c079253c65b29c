//! The server under attack, end to end over loopback: silent and slow sockets, idle connections by the
//! hundred, a client that stops reading, a JPEG scan bomb, a render that outlives its deadline, a
//! queued render whose client left, an AVIF output too large to encode, a render over the memory
//! budget, and the cache headers of refusals. Every hostile input is generated here.

use std::process::Command;
use std::time::{Duration, Instant};

use image_server::image::fixtures;
use image_server::server::Running;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{self, counter, Origin};

/// Waits (at most `within`) until `name` has grown by `by` over `before`.
async fn counter_reaches(server: &Running, name: &str, before: f64, by: f64, within: Duration) {
    let start = Instant::now();
    loop {
        let now = counter(server, name).await;
        if now >= before + by {
            return;
        }
        assert!(
            start.elapsed() < within,
            "{name} stayed at {now} (wanted {before} + {by}) for {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads until the peer closes (EOF or reset); returns the bytes read and how long it took, or
/// panics after `within`.
async fn until_closed(sock: &mut TcpStream, within: Duration) -> (Vec<u8>, Duration) {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        let read = tokio::time::timeout_at((start + within).into(), sock.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("the server kept the socket open for {within:?}"));
        match read {
            Ok(0) | Err(_) => return (got, start.elapsed()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// One GET over a fresh connection, answered in full: the status line's code and the response text.
async fn get_raw(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut sock = TcpStream::connect(addr).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    sock.write_all(req.as_bytes()).await.expect("write");
    let (bytes, _) = until_closed(&mut sock, Duration::from_secs(30)).await;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let code = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, text)
}

#[tokio::test]
async fn silent_sockets_and_partial_prefaces_are_closed_at_the_header_deadline() {
    let origin = Origin::start().await;
    let server = support::start_with_origin(
        &origin,
        &[
            ("header_read_timeout", "\"1s\""),
            ("keep_alive_timeout", "\"60s\""),
        ],
    )
    .await;
    let before = counter(&server, "connection.closed.header_timeout").await;
    let mut socks = Vec::new();
    for addr in [server.addr, server.status_addr] {
        // Nothing at all.
        socks.push(TcpStream::connect(addr).await.expect("connect"));
        // The first half of the HTTP/2 preface, then nothing.
        let mut partial = TcpStream::connect(addr).await.expect("connect");
        partial
            .write_all(b"PRI * HTTP/2.0\r\n")
            .await
            .expect("write");
        socks.push(partial);
        // An HTTP/1 request line without its end.
        let mut slow = TcpStream::connect(addr).await.expect("connect");
        slow.write_all(b"GET /product/image/1/w10.jpg HTTP/1.1\r\nHo")
            .await
            .expect("write");
        socks.push(slow);
    }
    for sock in &mut socks {
        let (bytes, took) = until_closed(sock, Duration::from_secs(15)).await;
        // Closed without an answer (there was no request to answer).
        assert!(bytes.is_empty(), "{:?}", String::from_utf8_lossy(&bytes));
        println!("closed after {took:?}");
    }
    counter_reaches(
        &server,
        "connection.closed.header_timeout",
        before,
        6.0,
        Duration::from_secs(5),
    )
    .await;
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_at_keep_alive_timeout() {
    let origin = Origin::start().await;
    // The header deadline is far beyond the keep-alive one, so only the latter can close it.
    let server = support::start_with_origin(
        &origin,
        &[
            ("header_read_timeout", "\"60s\""),
            ("keep_alive_timeout", "\"1s\""),
        ],
    )
    .await;
    let before = counter(&server, "connection.closed.keep_alive").await;
    let mut sock = TcpStream::connect(server.status_addr)
        .await
        .expect("connect");
    sock.write_all(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .expect("write");
    let (bytes, _) = until_closed(&mut sock, Duration::from_secs(20)).await;
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("ok\n"), "one answer, then the close: {text}");
    counter_reaches(
        &server,
        "connection.closed.keep_alive",
        before,
        1.0,
        Duration::from_secs(5),
    )
    .await;
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_at_send_timeout() {
    let origin = Origin::start().await;
    // full_size.png of a grainy 3000x2000 photo: ~15 MB, far more than the socket buffers hold.
    origin.put("product/image/1", fixtures::jpeg(3000, 2000, 95));
    let server = support::start_with_origin(&origin, &[("send_timeout", "\"1s\"")]).await;
    let before = counter(&server, "connection.closed.send_timeout").await;
    let sock =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    // A small receive window, so the server's writes stall early.
    sock.set_recv_buffer_size(4096).expect("rcvbuf");
    sock.connect(&server.addr.into()).expect("connect");
    sock.set_nonblocking(true).expect("nonblocking");
    let mut sock = TcpStream::from_std(sock.into()).expect("tokio socket");
    sock.write_all(
        b"GET /product/image/1/full_size.png HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("write");
    // Read nothing until the server has given up on this client.
    counter_reaches(
        &server,
        "connection.closed.send_timeout",
        before,
        1.0,
        Duration::from_secs(60),
    )
    .await;
    let (bytes, _) = until_closed(&mut sock, Duration::from_secs(10)).await;
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(2048)]).into_owned();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let length: usize = text
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("content-length");
    assert!(
        bytes.len() < length,
        "the body was cut: {} of {length} bytes",
        bytes.len()
    );
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn idle_sockets_never_keep_health_from_answering() {
    let origin = Origin::start().await;
    origin.put("product/image/1", fixtures::jpeg(64, 48, 85));
    let server = support::start_with_origin(&origin, &[]).await;
    // Client and server sockets both live in this process: room for them.
    rlimit::increase_nofile_limit(u64::MAX).expect("open-files limit");
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(TcpStream::connect(server.addr).await.expect("connect"));
    }
    // More idle sockets than the status port's budget: the health probe gets in anyway.
    for _ in 0..image_server::server::STATUS_MAX_CONNECTIONS + 100 {
        idle.push(
            TcpStream::connect(server.status_addr)
                .await
                .expect("connect"),
        );
    }
    let health = tokio::time::timeout(
        Duration::from_secs(5),
        get_raw(server.status_addr, "/health"),
    )
    .await
    .expect("/health answered within 5 s");
    assert_eq!(health.0, 200, "{}", health.1);
    let image = tokio::time::timeout(
        Duration::from_secs(30),
        get_raw(server.addr, "/product/image/1/w32.jpg"),
    )
    .await
    .expect("an image answered");
    assert_eq!(image.0, 200);
    assert!(counter(&server, "connection.closed.evicted").await >= 1.0);
    drop(idle);
    server.stop().await.expect("stop");
}

/// A valid progressive JPEG whose one full AC scan is repeated: a flat `side`×`side` grey image
/// encoded by `cjpeg -scans` with a DC scan and one AC scan (point transform 0, so repeating it is
/// consistent and libjpeg raises no warning), then that AC scan copied until there are `scans`.
fn scan_bomb(side: u32, scans: usize) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tmp");
    let pgm = dir.path().join("flat.pgm");
    let mut image = format!("P5\n{side} {side}\n255\n").into_bytes();
    image.resize(image.len() + (side * side) as usize, 128);
    std::fs::write(&pgm, image).expect("pgm");
    let script = dir.path().join("scans.txt");
    std::fs::write(&script, "0: 0 0 0 0;\n0: 1 63 0 0;\n").expect("scan script");
    let out = Command::new("cjpeg")
        .arg("-scans")
        .arg(&script)
        .arg(&pgm)
        .output()
        .expect("cjpeg (libjpeg-turbo-progs)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let jpeg = out.stdout;
    // The second SOS segment (the AC scan) runs from its marker to the EOI marker at the end.
    let sos: Vec<usize> = jpeg
        .windows(2)
        .enumerate()
        .filter(|(_, w)| w == &[0xFF, 0xDA])
        .map(|(i, _)| i)
        .collect();
    assert_eq!(sos.len(), 2, "cjpeg wrote the two scans asked for");
    let eoi = jpeg.len() - 2;
    assert_eq!(&jpeg[eoi..], &[0xFF, 0xD9]);
    let ac = jpeg[sos[1]..eoi].to_vec();
    let mut bomb = jpeg[..eoi].to_vec();
    for _ in 2..scans {
        bomb.extend_from_slice(&ac);
    }
    bomb.extend_from_slice(&[0xFF, 0xD9]);
    bomb
}

#[tokio::test]
async fn a_scan_bomb_is_refused_before_any_decode_and_takes_no_slot() {
    let bomb = scan_bomb(512, 2_000);
    // It is a valid JPEG: djpeg (no scan limit) decodes it without a warning.
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("bomb.jpg");
    std::fs::write(&path, &bomb).expect("write");
    let djpeg = Command::new("djpeg")
        .arg("-outfile")
        .arg(dir.path().join("out.pnm"))
        .arg(&path)
        .output()
        .expect("djpeg");
    assert!(
        djpeg.status.success() && djpeg.stderr.is_empty(),
        "{djpeg:?}"
    );
    let refused = Command::new("djpeg")
        .args(["-maxscans", "100", "-outfile"])
        .arg(dir.path().join("out2.pnm"))
        .arg(&path)
        .output()
        .expect("djpeg");
    assert!(!refused.status.success(), "djpeg -maxscans 100 refuses it");

    let origin = Origin::start().await;
    origin.put("product/image/1", bomb);
    let server = support::start_with_origin(&origin, &[]).await;
    let before = counter(&server, "rejected.scans").await;
    let started = Instant::now();
    for path in [
        "/product/image/1/w100.jpg",
        "/product/image/1/full_size.png",
    ] {
        let (code, text) = get_raw(server.addr, path).await;
        assert_eq!(code, 422, "{text}");
        assert!(text.ends_with("unprocessable image\n"), "{text}");
    }
    println!("two scan bombs refused in {:?}", started.elapsed());
    assert_eq!(counter(&server, "rejected.scans").await, before + 2.0);
    assert_eq!(
        server.app.pipeline.stats().processing_total,
        0,
        "no render took a slot"
    );
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn a_render_past_render_timeout_frees_its_slot_and_caches_nothing() {
    let origin = Origin::start().await;
    origin.put("product/image/1", fixtures::jpeg(4000, 3000, 95));
    origin.put("product/image/2", fixtures::jpeg(64, 48, 85));
    // One slot; a deadline far below what a 12 MP PNG encode takes, far above a thumbnail's.
    let server = support::start_with_origin(
        &origin,
        &[
            ("processing_concurrency", "1"),
            ("render_timeout", "\"200ms\""),
        ],
    )
    .await;
    let before = counter(&server, "rejected.render_timeout").await;
    for _ in 0..2 {
        let resp = support::get(&server, "/product/image/1/full_size.png").await;
        assert_eq!(resp.status(), 504);
        assert_eq!(support::header(&resp, "cache-control"), "no-store");
    }
    assert_eq!(
        counter(&server, "rejected.render_timeout").await,
        before + 2.0
    );
    // The slot is free at once: the next render is served.
    let resp = support::get(&server, "/product/image/2/w32.jpg").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(server.app.pipeline.stats().processing_current, 0);
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn a_queued_render_whose_client_left_never_starts() {
    let origin = Origin::start().await;
    origin.put("product/image/1", fixtures::jpeg(4000, 3000, 95));
    origin.put("product/image/2", fixtures::jpeg(64, 48, 85));
    let server = support::start_with_origin(&origin, &[("processing_concurrency", "1")]).await;
    let addr = server.addr;
    // A slow render holds the only slot.
    let slow = tokio::spawn(async move { get_raw(addr, "/product/image/1/full_size.png").await });
    let start = Instant::now();
    while server.app.pipeline.stats().processing_current == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the slow render never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A second request queues behind it, then its client goes away.
    let gone = support::client()
        .get(format!("http://{}/product/image/2/w32.jpg", server.addr))
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(gone.is_err(), "the client gave up: {gone:?}");
    let (code, _) = slow.await.expect("slow request");
    assert_eq!(code, 200);
    let start = Instant::now();
    while server.app.pipeline.stats().abandoned == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the queued render was not dropped"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        server.app.pipeline.stats().processing_total,
        1,
        "only the slow render ran"
    );
    // Nothing was cached for it: asked again, it renders.
    let resp = support::get(&server, "/product/image/2/w32.jpg").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(support::header(&resp, "x-cache"), "miss");
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn full_size_avif_of_a_large_original_is_406_without_an_avif_slot() {
    let origin = Origin::start().await;
    origin.put("product/image/1", fixtures::jpeg(6000, 4000, 80));
    let server = support::start_with_origin(&origin, &[]).await;
    let before = counter(&server, "rejected.avif_pixels").await;
    let resp = support::get(&server, "/product/image/1/full_size.avif").await;
    assert_eq!(resp.status(), 406);
    assert_eq!(resp.text().await.expect("body"), "not acceptable\n");
    assert_eq!(counter(&server, "rejected.avif_pixels").await, before + 1.0);
    assert_eq!(server.app.pipeline.stats().processing_total, 0);
    // A size under the ceiling still encodes.
    let resp = support::get(&server, "/product/image/1/w400.avif").await;
    assert_eq!(resp.status(), 200);
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn a_render_over_the_whole_memory_budget_is_422() {
    let origin = Origin::start().await;
    origin.put("product/image/1", fixtures::jpeg(6000, 4000, 80));
    let server = support::start_with_origin(&origin, &[("max_memory_mb", "64")]).await;
    let before = counter(&server, "rejected.memory").await;
    // full_size decodes all 24 MP (72 MB of RGB) before anything else.
    let resp = support::get(&server, "/product/image/1/full_size.jpg").await;
    assert_eq!(resp.status(), 422);
    assert_eq!(counter(&server, "rejected.memory").await, before + 1.0);
    // A thumbnail of the same original decodes at 1/8 and fits.
    let resp = support::get(&server, "/product/image/1/w300.jpg").await;
    assert_eq!(resp.status(), 200);
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn refusals_are_never_stored_by_a_cdn_and_negotiated_errors_vary_on_accept() {
    let origin = Origin::start().await;
    let server = support::start_with_origin(&origin, &[("auto_format", "true")]).await;
    // ?source= while overrides are off: 403.
    let resp = support::get(
        &server,
        "/product/image/1/w100.jpg?source=http://127.0.0.1:9/x.jpg",
    )
    .await;
    assert_eq!(resp.status(), 403);
    assert_eq!(support::header(&resp, "cache-control"), "no-store");
    // A missing original for a URL whose format follows Accept: the 404 depends on Accept too.
    let resp = support::client()
        .get(format!("http://{}/product/image/404/w100.jpg", server.addr))
        .header("accept", "image/webp,*/*")
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 404);
    assert_eq!(support::header(&resp, "vary"), "Accept");
    // A WebP URL is not negotiated: no Vary.
    let resp = support::get(&server, "/product/image/404/w100.webp").await;
    assert_eq!(resp.status(), 404);
    assert_eq!(support::header(&resp, "vary"), "");
    server.stop().await.expect("stop");
}

/// A stream that stops reading and writing for good once `frozen` is set: a peer that vanished
/// without closing (power loss, a dropped NAT entry).
struct Freezable {
    inner: TcpStream,
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Freezable {
    fn frozen(&self) -> bool {
        self.frozen.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl tokio::io::AsyncRead for Freezable {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.frozen() {
            return std::task::Poll::Pending;
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Freezable {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.frozen() {
            return std::task::Poll::Pending;
        }
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.frozen() {
            return std::task::Poll::Pending;
        }
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[tokio::test]
async fn an_http2_peer_that_stops_answering_pings_is_closed() {
    let origin = Origin::start().await;
    // Idle connections would only be closed after a minute: only the unanswered ping can close
    // this one within the test.
    let server = support::start_with_origin(
        &origin,
        &[
            ("send_timeout", "\"1s\""),
            ("keep_alive_timeout", "\"60s\""),
            ("header_read_timeout", "\"60s\""),
        ],
    )
    .await;
    let frozen = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stream = Freezable {
        inner: TcpStream::connect(server.status_addr)
            .await
            .expect("connect"),
        frozen: frozen.clone(),
    };
    let (client, connection) = h2::client::handshake(stream).await.expect("h2 handshake");
    let driver = tokio::spawn(connection);
    let mut client = client.ready().await.expect("ready");
    let request = http::Request::get(format!("http://{}/health", server.status_addr))
        .body(())
        .expect("request");
    let (response, _) = client.send_request(request, true).expect("send");
    let response = response.await.expect("response");
    assert_eq!(response.status(), 200);
    assert_eq!(server.app.rooms.status.len(), 1);

    frozen.store(true, std::sync::atomic::Ordering::Release);
    let start = Instant::now();
    while !server.app.rooms.status.is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the silent HTTP/2 peer was never closed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("closed {:?} after the peer went silent", start.elapsed());
    driver.abort();
    server.stop().await.expect("stop");
}
