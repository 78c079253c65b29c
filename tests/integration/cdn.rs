//! What CDNs and browsers need: validators and 304s, cache headers per class, `auto_format` with
//! `Vary: Accept` behind a real nginx `proxy_cache` (tests/nginx/cdn.conf), and colour, alpha and
//! size options read back with independent tools (the `vips` and `vipsheader` commands).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use image_server::image::fixtures;
use image_server::request::Format;

use crate::support::{self, client, get, header, probe, Origin};

/// Debian's nginx as a caching proxy in front of our server, on a free loopback port.
struct Nginx {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl Nginx {
    fn start(upstream: std::net::SocketAddr) -> Nginx {
        let dir = tempfile::tempdir().expect("tmp");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let template = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/nginx/cdn.conf"),
        )
        .expect("nginx config");
        let conf = template
            .replace("@LISTEN@", &format!("127.0.0.1:{port}"))
            .replace("@UPSTREAM@", &upstream.to_string())
            .replace("@PREFIX@", &dir.path().display().to_string());
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("write conf");
        let nginx = ["/usr/sbin/nginx", "nginx"]
            .into_iter()
            .find(|p| Command::new(p).arg("-v").output().is_ok())
            .expect("nginx is installed (make test installs nginx-light)");
        let child = Command::new(nginx)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx starts");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nginx did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Nginx { child, dir, port }
    }

    async fn get(&self, path: &str, accept: &str) -> reqwest::Response {
        client()
            .get(format!("http://127.0.0.1:{}{path}", self.port))
            .header("accept", accept)
            .send()
            .await
            .expect("via nginx")
    }

    fn log(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("access.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Nginx {
    /// TERM, so the master stops its worker and cache manager before exiting; KILL after 5 s. A
    /// KILLed master leaves them running, orphaned, after the test process is gone.
    fn drop(&mut self) {
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill(2) on our own child's pid, which has not been waited for (not reused).
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn origin_with_photo() -> Origin {
    let origin = Origin::start().await;
    origin.put("product/image/1", fixtures::jpeg(1200, 800, 85));
    origin
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_nginx_hit_then_revalidated_with_our_304() {
    let origin = origin_with_photo().await;
    let server =
        support::start_with_origin(&origin, &[("cache_control", "\"public, max-age=1\"")]).await;
    let nginx = Nginx::start(server.addr);
    let path = "/product/image/1/w200.jpg";

    let first = nginx.get(path, "image/jpeg").await;
    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "x-cache-status"), "MISS");
    let etag = header(&first, "etag");
    let body = first.bytes().await.expect("body");

    let second = nginx.get(path, "image/jpeg").await;
    assert_eq!(header(&second, "x-cache-status"), "HIT");
    assert_eq!(second.bytes().await.expect("body"), body);

    tokio::time::sleep(Duration::from_millis(2100)).await;
    let third = nginx.get(path, "image/jpeg").await;
    assert_eq!(third.status(), 200);
    assert_eq!(header(&third, "x-cache-status"), "REVALIDATED");
    assert_eq!(header(&third, "etag"), etag);
    assert_eq!(third.bytes().await.expect("body"), body);
    assert_eq!(
        server.app.pipeline.stats().processing_total,
        1,
        "revalidation did not re-render"
    );
    let log = nginx.log();
    for status in ["MISS", "HIT", "REVALIDATED"] {
        assert!(
            log.iter().any(|l| l.starts_with(status)),
            "{status} in nginx log: {log:?}"
        );
    }
    // Printed for the closing note: the CDN's own view of the three requests.
    println!("nginx access log:\n{}", log.join("\n"));
    server.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_nginx_webp_and_jpeg_clients_never_get_each_others_variant() {
    let origin = origin_with_photo().await;
    let server = support::start_with_origin(&origin, &[("auto_format", "true")]).await;
    let nginx = Nginx::start(server.addr);
    let path = "/product/image/1/w150.jpg";
    let webp = "image/webp,image/*;q=0.8";
    let jpeg = "image/jpeg,image/*;q=0.8";
    for round in 0..3 {
        for (accept, want) in [(webp, "image/webp"), (jpeg, "image/jpeg")] {
            let resp = nginx.get(path, accept).await;
            assert_eq!(resp.status(), 200);
            assert_eq!(
                header(&resp, "content-type"),
                want,
                "round {round}, {accept}"
            );
            assert_eq!(header(&resp, "vary"), "Accept");
            let out = probe(&resp.bytes().await.expect("body"));
            let format = if want == "image/webp" {
                Format::Webp
            } else {
                Format::Jpeg
            };
            assert_eq!(out.format, format, "the bytes match the Content-Type");
        }
    }
    println!("nginx access log:\n{}", nginx.log().join("\n"));
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn junk_accept_headers_make_at_most_three_entries() {
    let origin = origin_with_photo().await;
    let server = support::start_with_origin(&origin, &[("auto_format", "true")]).await;
    let c = client();
    let url = format!("http://{}/product/image/1/w64.jpg", server.addr);
    let mut seen = std::collections::HashSet::new();
    for i in 0..1000u32 {
        let junk = match i % 5 {
            0 => format!("image/webp;q=0.{}, text/x-{i}", i % 9 + 1),
            1 => format!("image/avif,image/webp,application/x-{i};q=0.5"),
            2 => format!("*/*;q=0.{i}"),
            3 => format!("image/png, image/x-junk-{i}"),
            _ => format!("image/webp;q=0, garbage {i} ;;; ,,"),
        };
        let resp = c
            .get(&url)
            .header("accept", junk)
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 200);
        assert_eq!(header(&resp, "vary"), "Accept");
        seen.insert(header(&resp, "content-type"));
    }
    server.app.pipeline.memory().sync().await;
    let entries = server.app.pipeline.memory().entry_count();
    assert!(entries <= 3, "{entries} entries");
    assert_eq!(
        seen,
        ["image/jpeg", "image/webp", "image/avif"]
            .into_iter()
            .map(String::from)
            .collect()
    );
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn validators_304_and_cache_headers() {
    let origin = origin_with_photo().await;
    let server = support::start_with_origin(&origin, &[]).await;
    let path = "/product/image/1/300x300.png";
    let first = get(&server, path).await;
    assert_eq!(first.status(), 200);
    let etag = header(&first, "etag");
    assert!(
        etag.starts_with('"') && !etag.starts_with("W/"),
        "strong: {etag}"
    );
    assert_eq!(header(&first, "cache-control"), "public, max-age=31536000");
    assert_eq!(header(&first, "x-content-type-options"), "nosniff");
    assert_eq!(header(&first, "content-type"), "image/png");
    assert_eq!(
        header(&first, "vary"),
        "",
        "no Vary when auto_format is off"
    );
    assert_eq!(header(&first, "surrogate-key"), "product/image/1");
    assert_eq!(header(&first, "cache-tag"), "product/image/1");
    let last_modified = header(&first, "last-modified");
    assert!(httpdate::parse_http_date(&last_modified).is_ok());
    println!("200 headers: {:#?}", first.headers());

    let again = client()
        .get(format!("http://{}{path}", server.addr))
        .header("if-none-match", &etag)
        .send()
        .await
        .expect("send");
    assert_eq!(again.status(), 304);
    assert_eq!(header(&again, "etag"), etag);
    assert_eq!(header(&again, "last-modified"), last_modified);
    assert_eq!(header(&again, "cache-control"), "public, max-age=31536000");
    println!("304 headers: {:#?}", again.headers());
    assert!(again.bytes().await.expect("body").is_empty());
    assert_eq!(server.app.pipeline.stats().processing_total, 1);

    let by_date = client()
        .get(format!("http://{}{path}", server.addr))
        .header("if-modified-since", &last_modified)
        .send()
        .await
        .expect("send");
    assert_eq!(
        by_date.status(),
        304,
        "If-Modified-Since alone revalidates too"
    );
    assert_eq!(header(&by_date, "etag"), etag);

    let other = client()
        .get(format!("http://{}{path}", server.addr))
        .header("if-none-match", "\"something-else\"")
        .send()
        .await
        .expect("send");
    assert_eq!(other.status(), 200);

    let refused = get(&server, "/product/image/1/300x3000.png").await;
    assert_eq!(refused.status(), 406);
    assert_eq!(header(&refused, "cache-control"), "public, max-age=60");
    println!("406 headers: {:#?}", refused.headers());
    server.stop().await.expect("stop");

    // A second instance renders the same bytes and so sends the same ETag.
    let other_instance = support::start_with_origin(&origin, &[]).await;
    let resp = get(&other_instance, path).await;
    assert_eq!(header(&resp, "etag"), etag);
    other_instance.stop().await.expect("stop");
}

/// Mean of each band of an image file, read with the `vips` command (an independent process).
fn band_means(bytes: &[u8], bands: u32) -> Vec<f64> {
    let dir = tempfile::tempdir().expect("tmp");
    let input = dir.path().join("in");
    std::fs::write(&input, bytes).expect("write");
    (0..bands)
        .map(|b| {
            let band = dir.path().join(format!("b{b}.v"));
            let ok = Command::new("vips")
                .arg("extract_band")
                .arg(&input)
                .arg(&band)
                .arg(b.to_string())
                .status()
                .expect("vips");
            assert!(ok.success());
            let out = Command::new("vips")
                .arg("avg")
                .arg(&band)
                .output()
                .expect("vips");
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .expect("mean")
        })
        .collect()
}

/// Runs a `vips` command on a file and returns the output file's bytes.
fn vips_convert(input: &[u8], op: &[&str], out_name: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tmp");
    let i = dir.path().join("in.jpg");
    let o = dir.path().join(out_name);
    std::fs::write(&i, input).expect("write");
    let status = Command::new("vips")
        .arg(op[0])
        .arg(&i)
        .arg(&o)
        .args(&op[1..])
        .status()
        .expect("vips");
    assert!(status.success(), "vips {op:?}");
    // `name[options]` tells vips how to save; the file itself is `name`.
    let saved = out_name.split('[').next().unwrap_or(out_name);
    std::fs::read(dir.path().join(saved)).expect("read")
}

#[tokio::test]
async fn cmyk_and_wide_gamut_originals_come_out_srgb_with_their_colours() {
    let origin = Origin::start().await;
    let srgb = fixtures::jpeg(600, 400, 95);
    // The same picture converted to CMYK with libvips' built-in CMYK profile (embedded in the file).
    let cmyk = vips_convert(
        &srgb,
        &["icc_export", "--output-profile", "cmyk"],
        "cmyk.jpg[Q=95]",
    );
    let cmyk_probe = probe(&cmyk);
    assert_eq!(
        (cmyk_probe.interpretation.as_str(), cmyk_probe.bands),
        ("cmyk", 4),
        "a real CMYK file"
    );
    origin.put("product/image/21", cmyk.clone());
    // The EXIF fixture stores its pixels in Display P3 with the P3 profile embedded.
    origin.put("product/image/22", fixtures::jpeg_with_exif(600, 400, 1));
    let server = support::start_with_origin(&origin, &[]).await;

    // The reference is libvips' own conversion of the CMYK file with its embedded profile, by the
    // `vips` command. (The round trip to the sRGB original is not a fair reference: saturated reds
    // fall outside the CMYK gamut and come back duller.)
    let reference = vips_convert(&cmyk, &["icc_transform", "srgb", "--embedded"], "ref.png");
    let want = band_means(&reference, 3);
    let original = band_means(&srgb, 3);
    let resp = get(&server, "/product/image/21/full_size-q95.png").await;
    assert_eq!(resp.status(), 200);
    let out_bytes = resp.bytes().await.expect("body");
    let out = probe(&out_bytes);
    assert_eq!(out.interpretation, "srgb");
    assert_eq!(out.bands, 3);
    let got = band_means(&out_bytes, 3);
    for (g, w) in got.iter().zip(&want) {
        assert!(
            (g - w).abs() < 3.0,
            "CMYK → sRGB: got {got:?}, want {want:?}"
        );
    }
    for (g, o) in got.iter().zip(&original) {
        assert!(
            (g - o).abs() < 20.0,
            "still the same picture: got {got:?}, original {original:?}"
        );
    }

    // P3 → sRGB: compare with libvips' own reference conversion of the same file.
    let p3 = fixtures::jpeg_with_exif(600, 400, 1);
    let reference = vips_convert(&p3, &["icc_transform", "srgb", "--embedded"], "ref.png");
    let want = band_means(&reference, 3);
    let resp = get(&server, "/product/image/22/full_size.png").await;
    let out_bytes = resp.bytes().await.expect("body");
    assert_eq!(probe(&out_bytes).interpretation, "srgb");
    let got = band_means(&out_bytes, 3);
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() < 3.0, "P3 → sRGB: got {got:?}, want {want:?}");
    }
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn alpha_is_kept_except_in_jpeg_which_flattens_onto_the_background() {
    let origin = Origin::start().await;
    origin.put("product/image/30", fixtures::png_alpha(400, 200));
    let server = support::start_with_origin(&origin, &[("background", "\"#00ff00\"")]).await;
    for format in [Format::Png, Format::Webp, Format::Avif, Format::Gif] {
        let resp = get(&server, &format!("/product/image/30/w200.{}", format.ext())).await;
        assert_eq!(resp.status(), 200);
        let bytes = resp.bytes().await.expect("body");
        let out = probe(&bytes);
        assert_eq!(out.bands, 4, "{format}: alpha kept");
        let corner = support::pixel(&bytes, 2, 2);
        assert!(
            corner[3] < 10.0,
            "{format}: transparent corner stays transparent: {corner:?}"
        );
    }
    // A palette (8-bit indexed) PNG with a transparency table keeps its transparency too.
    let palette = vips_convert(
        &fixtures::png_alpha(400, 200),
        &["pngsave", "--palette"],
        "p.png",
    );
    assert_eq!(&palette[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(palette[25], 3, "IHDR colour type 3: an indexed PNG");
    origin.put("product/image/31", palette);
    for format in [Format::Png, Format::Webp] {
        let resp = get(&server, &format!("/product/image/31/w200.{}", format.ext())).await;
        assert_eq!(resp.status(), 200);
        let bytes = resp.bytes().await.expect("body");
        assert_eq!(probe(&bytes).bands, 4, "{format}: palette alpha kept");
        let corner = support::pixel(&bytes, 2, 2);
        assert!(
            corner[3] < 10.0,
            "{format}: palette transparency kept: {corner:?}"
        );
    }
    let resp = get(&server, "/product/image/30/w200.jpg").await;
    let bytes = resp.bytes().await.expect("body");
    assert_eq!(probe(&bytes).bands, 3);
    let corner = support::pixel(&bytes, 2, 2);
    assert!(
        corner[0] < 40.0 && corner[1] > 215.0 && corner[2] < 40.0,
        "flattened onto the configured green: {corner:?}"
    );
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn enlarge_off_never_exceeds_the_original_and_gravity_options_crop_exactly() {
    let origin = Origin::start().await;
    origin.put("product/image/40", fixtures::jpeg(400, 300, 85));
    let server = support::start_with_origin(&origin, &[("enlarge", "false")]).await;
    let out = probe(
        &get(&server, "/product/image/40/w1000.jpg")
            .await
            .bytes()
            .await
            .expect("b"),
    );
    assert_eq!((out.width, out.height), (400, 300));
    let out = probe(
        &get(&server, "/product/image/40/h150.jpg")
            .await
            .bytes()
            .await
            .expect("b"),
    );
    assert_eq!((out.width, out.height), (200, 150), "downscales still work");
    server.stop().await.expect("stop");

    let server = support::start_with_origin(&origin, &[]).await;
    let out = probe(
        &get(&server, "/product/image/40/w800.jpg")
            .await
            .bytes()
            .await
            .expect("b"),
    );
    assert_eq!(
        (out.width, out.height),
        (800, 600),
        "enlarge defaults to on (seed parity)"
    );
    server.stop().await.expect("stop");

    for gravity in ["attention", "entropy", "centre"] {
        let g = format!("\"{gravity}\"");
        let server = support::start_with_origin(&origin, &[("crop_gravity", g.as_str())]).await;
        let out = probe(
            &get(&server, "/product/image/40/100x250.webp")
                .await
                .bytes()
                .await
                .expect("b"),
        );
        assert_eq!((out.width, out.height), (100, 250), "{gravity}");
        server.stop().await.expect("stop");
    }
}

/// Range requests (RFC 9110 §14): one byte range gives 206 with `Content-Range`, a range past the
/// end 416 with `bytes */N`, `If-Range` with the current ETag is honoured and a stale one gets the
/// whole body, several ranges get the whole body, and HEAD answers like GET without a body. The ETag
/// is the whole representation's throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_requests_get_206_416_and_the_whole_body_when_if_range_is_stale() {
    let origin = origin_with_photo().await;
    let server = support::start_with_origin(&origin, &[]).await;
    let url = format!("http://{}/product/image/1/w200.jpg", server.addr);
    let ranged = |range: &str, if_range: Option<&str>| {
        let mut req = client().get(&url).header("range", range);
        if let Some(tag) = if_range {
            req = req.header("if-range", tag);
        }
        req.send()
    };

    let whole = get(&server, "/product/image/1/w200.jpg").await;
    assert_eq!(whole.status(), 200);
    assert_eq!(header(&whole, "accept-ranges"), "bytes");
    let etag = header(&whole, "etag");
    let body = whole.bytes().await.expect("body");
    let n = body.len();
    assert!(n > 100, "a real JPEG");

    let first = ranged("bytes=0-9", None).await.expect("ranged GET");
    assert_eq!(first.status(), 206);
    assert_eq!(header(&first, "content-range"), format!("bytes 0-9/{n}"));
    assert_eq!(header(&first, "content-length"), "10");
    assert_eq!(header(&first, "etag"), etag);
    assert_eq!(header(&first, "content-type"), "image/jpeg");
    assert_eq!(first.bytes().await.expect("part"), body.slice(0..10));

    let tail = ranged("bytes=-7", None).await.expect("suffix");
    assert_eq!(tail.status(), 206);
    assert_eq!(
        header(&tail, "content-range"),
        format!("bytes {}-{}/{n}", n - 7, n - 1)
    );
    assert_eq!(tail.bytes().await.expect("part"), body.slice(n - 7..));

    let open = ranged(&format!("bytes={}-", n - 3), None)
        .await
        .expect("open");
    assert_eq!(open.status(), 206);
    assert_eq!(open.bytes().await.expect("part"), body.slice(n - 3..));

    let past = ranged(&format!("bytes={n}-"), None).await.expect("past");
    assert_eq!(past.status(), 416);
    assert_eq!(header(&past, "content-range"), format!("bytes */{n}"));
    assert_eq!(header(&past, "cache-control"), "no-store");
    assert_eq!(
        past.bytes().await.expect("body").as_ref(),
        b"range not satisfiable\n"
    );

    let current = ranged("bytes=10-19", Some(&etag)).await.expect("if-range");
    assert_eq!(current.status(), 206);
    assert_eq!(current.bytes().await.expect("part"), body.slice(10..20));
    let stale = ranged("bytes=10-19", Some("\"stale\""))
        .await
        .expect("stale");
    assert_eq!(stale.status(), 200);
    assert_eq!(stale.bytes().await.expect("whole"), body);

    let multi = ranged("bytes=0-1,5-6", None).await.expect("multi");
    assert_eq!(multi.status(), 200);
    assert_eq!(multi.bytes().await.expect("whole"), body);

    let head = client()
        .head(&url)
        .header("range", "bytes=0-9")
        .send()
        .await
        .expect("HEAD");
    assert_eq!(head.status(), 206);
    assert_eq!(header(&head, "content-range"), format!("bytes 0-9/{n}"));
    assert_eq!(header(&head, "content-length"), "10");
    assert!(head.bytes().await.expect("no body").is_empty());

    assert_eq!(
        server.app.pipeline.stats().processing_total,
        1,
        "ranges are cut from the one render"
    );
    server.stop().await.expect("stop");
}

/// Behind a caching nginx, a ranged request is answered with the right bytes, on the miss that
/// fills the cache and on the hit after it, and nginx caches the whole image (one render).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_nginx_ranged_requests_get_the_right_bytes() {
    let origin = origin_with_photo().await;
    let server = support::start_with_origin(&origin, &[]).await;
    let nginx = Nginx::start(server.addr);
    let path = "/product/image/1/w300.jpg";
    let whole = get(&server, path).await.bytes().await.expect("whole");
    let n = whole.len();
    for (range, expected) in [
        ("bytes=0-99", whole.slice(0..100)),
        ("bytes=100-199", whole.slice(100..200)),
        ("bytes=-50", whole.slice(n - 50..)),
    ] {
        let resp = client()
            .get(format!("http://127.0.0.1:{}{path}", nginx.port))
            .header("range", range)
            .send()
            .await
            .expect("via nginx");
        assert_eq!(resp.status(), 206, "{range}");
        let content_range = header(&resp, "content-range");
        assert!(content_range.ends_with(&format!("/{n}")), "{content_range}");
        assert_eq!(resp.bytes().await.expect("part"), expected, "{range}");
    }
    let log = nginx.log();
    assert!(log.iter().any(|l| l.starts_with("HIT 206")), "{log:?}");
    assert_eq!(server.app.pipeline.stats().processing_total, 1);
    println!("nginx access log:\n{}", log.join("\n"));
    server.stop().await.expect("stop");
}
