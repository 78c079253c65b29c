//! Hostile inputs end to end over HTTP: decompression bombs, truncated and
//! disguised originals, and malformed requests. Each must get its documented status (docs/urls.md) and a fixed body;
//! no bomb may start a pixel decode; nothing may be cached; the process must stay up with its
//! resident memory barely moved.
//!
//! The bombs are generated here, byte by byte, so the test says exactly what they claim. The cases
//! run in a process of their own (`bad_inputs` re-runs this test binary on
//! `bad_inputs_isolated`): `vips::decodes_started()` is process-wide and other tests render in
//! parallel, as they also allocate, which would blur the RSS reading. Requests go over a raw socket
//! so no client library normalises the hostile paths first.

use std::time::{Duration, Instant};

use image_server::image::fixtures;
use image_server::image::vips;
use image_server::server::Running;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{self, Origin, Reply};

/// Runs [`bad_inputs_isolated`] alone in a fresh process and requires it to pass.
#[test]
fn bad_inputs() {
    let stdout = support::run_isolated("hostile::bad_inputs_isolated");
    // The table, for the report and for anyone reading the test log.
    for line in stdout.lines().filter(|l| l.starts_with("| ")) {
        println!("{line}");
    }
}

/// CRC-32 (IEEE), for hand-made PNG chunks.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut c = u32::try_from(data.len())
        .expect("small chunk")
        .to_be_bytes()
        .to_vec();
    c.extend_from_slice(kind);
    c.extend_from_slice(data);
    c.extend_from_slice(&crc32(&[kind.as_slice(), data].concat()).to_be_bytes());
    c
}

/// A 69-byte PNG whose header claims 100000×100000 RGB (30 GB of pixels).
pub(crate) fn png_bomb() -> Vec<u8> {
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(png_chunk(b"IHDR", &ihdr));
    png.extend(png_chunk(b"IDAT", &[0x78, 0x9C, 0x63, 0x00, 0x00]));
    png.extend(png_chunk(b"IEND", &[]));
    png
}

/// A real small JPEG whose frame header (SOFn) is patched to claim 65500×65500.
pub(crate) fn jpeg_bomb() -> Vec<u8> {
    let mut jpeg = fixtures::jpeg(16, 16, 80);
    let sof = jpeg
        .windows(2)
        .position(|w| w[0] == 0xFF && (0xC0..=0xC2).contains(&w[1]))
        .expect("SOF marker");
    // FF Cn, length (2), precision (1), height (2), width (2).
    jpeg[sof + 5..sof + 7].copy_from_slice(&65_500u16.to_be_bytes());
    jpeg[sof + 7..sof + 9].copy_from_slice(&65_500u16.to_be_bytes());
    jpeg
}

/// A 1×1 GIF screen whose one 1×1 frame sits at (60000, 60000): libvips 8.14.1 by default builds a
/// 60001×60001 canvas for it (14.3 GB, measured).
pub(crate) fn gif_bomb() -> Vec<u8> {
    let mut gif = b"GIF89a".to_vec();
    gif.extend_from_slice(&[1, 0, 1, 0, 0, 0, 0]);
    gif.push(0x2C);
    gif.extend_from_slice(&60_000u16.to_le_bytes());
    gif.extend_from_slice(&60_000u16.to_le_bytes());
    gif.extend_from_slice(&[1, 0, 1, 0]);
    gif.push(0x80);
    gif.extend_from_slice(&[0, 0, 0, 255, 255, 255]);
    gif.extend_from_slice(&[0x02, 0x02, 0x44, 0x01, 0x00]);
    gif.push(0x3B);
    gif
}

/// A real TIFF, written by the `vips` command (a loader we block must be offered real input).
fn tiff() -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("x.tif");
    let ok = std::process::Command::new("vips")
        .arg("black")
        .arg(&path)
        .args(["64", "64"])
        .status()
        .expect("vips CLI");
    assert!(ok.success());
    std::fs::read(&path).expect("tiff")
}

pub(crate) const SVG: &str = r#"<?xml version="1.0"?>
<svg xmlns="http://www.w3.org/2000/svg" width="50000" height="50000"><rect width="50000" height="50000" fill="red"/></svg>
"#;

/// A minimal valid one-page PDF.
const PDF: &str = "%PDF-1.4
1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj
2 0 obj<</Type/Pages/Kids[3 0 R]/Count 1>>endobj
3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 30000 30000]>>endobj
trailer<</Root 1 0 R>>
%%EOF
";

pub(crate) const HTML: &str =
    "<!DOCTYPE html><html><head><title>Not Found</title></head><body>nope</body></html>";

/// One raw HTTP/1.1 exchange: the status code and the whole response text.
async fn raw_exchange(server: &Running, request: &[u8]) -> (u16, String) {
    let mut sock = TcpStream::connect(server.addr).await.expect("connect");
    sock.write_all(request).await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), sock.read_to_end(&mut buf))
        .await
        .expect("answered within 30 s")
        .expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

fn get_request(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").into_bytes()
}

/// One row of the table: what was sent, the status expected, whether it may start a decode.
struct Case {
    name: &'static str,
    request: Vec<u8>,
    status: u16,
    body: Option<&'static str>,
    may_decode: bool,
}

#[tokio::test]
#[ignore = "run in a process of its own by hostile::bad_inputs"]
async fn bad_inputs_isolated() {
    let origin = Origin::start().await;
    let good = fixtures::jpeg(400, 300, 85);
    let originals: Vec<(&str, Vec<u8>, &'static str)> = vec![
        ("png-bomb", png_bomb(), "image/png"),
        ("jpeg-bomb", jpeg_bomb(), "image/jpeg"),
        ("gif-bomb", gif_bomb(), "image/gif"),
        (
            "jpeg-truncated",
            good[..good.len() / 2].to_vec(),
            "image/jpeg",
        ),
        (
            "png-truncated",
            {
                let png = fixtures::png_alpha(300, 200);
                png[..png.len() / 2].to_vec()
            },
            "image/png",
        ),
        ("svg", SVG.as_bytes().to_vec(), "image/svg+xml"),
        ("tiff", tiff(), "image/tiff"),
        ("pdf", PDF.as_bytes().to_vec(), "application/pdf"),
        ("html", HTML.as_bytes().to_vec(), "image/jpeg"),
    ];
    for (id, bytes, content_type) in &originals {
        origin.script(
            &format!("product/image/{id}"),
            Reply::Typed {
                body: bytes.clone().into(),
                content_type,
                content_encoding: "",
            },
        );
    }
    origin.put("product/image/good", good.clone());
    let server = support::start_with_origin(&origin, &[]).await;

    // Warm up (libvips, allocator arenas, connection pools), then forget the good entry.
    let (status, _) = raw_exchange(&server, &get_request("/product/image/good/w100.jpg")).await;
    assert_eq!(status, 200);
    server
        .app
        .pipeline
        .purge_memory("product/image/good")
        .expect("purge");

    let unprocessable = Some("unprocessable image\n");
    let not_found = Some("not found\n");
    let mut cases = Vec::new();
    for (id, _, _) in &originals {
        cases.push(Case {
            name: id,
            request: get_request(&format!("/product/image/{id}/w100.jpg")),
            status: 422,
            body: unprocessable,
            // Only damaged files of an allowed format get as far as decoding.
            may_decode: id.ends_with("-truncated"),
        });
    }
    let path_404 = |name: &'static str, path: String| Case {
        name,
        request: get_request(&path),
        status: 404,
        body: not_found,
        may_decode: false,
    };
    cases.push(path_404(
        "id %2e%2e%2f",
        "/product/image/%2e%2e%2f/w100.jpg".into(),
    ));
    cases.push(path_404(
        "id ..%2f..%2fetc",
        "/product/image/..%2f..%2fetc/w100.jpg".into(),
    ));
    cases.push(path_404("id %00", "/product/image/1%00/w100.jpg".into()));
    cases.push(path_404(
        "id arabic-indic digits",
        "/product/image/%D9%A1%D9%A2%D9%A3/w100.jpg".into(),
    ));
    cases.push(path_404(
        "id fullwidth digits",
        "/product/image/%EF%BC%91%EF%BC%92/w100.jpg".into(),
    ));
    cases.push(path_404(
        "16 KB path",
        format!("/product/image/{}/w100.jpg", "1".repeat(16 * 1024)),
    ));
    // Raw non-ASCII bytes in the request line: hyper lets them through, the grammar refuses them.
    let mut raw_utf8 = b"GET /product/image/".to_vec();
    raw_utf8.extend_from_slice("١٢٣".as_bytes());
    raw_utf8.extend_from_slice(b"/w100.jpg HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    cases.push(Case {
        name: "id raw UTF-8 bytes",
        request: raw_utf8,
        status: 404,
        body: not_found,
        may_decode: false,
    });
    let mut many = b"GET /product/image/good/w100.jpg HTTP/1.1\r\nHost: test\r\n".to_vec();
    for i in 0..200 {
        many.extend_from_slice(format!("X-Filler-{i}: {i}\r\n").as_bytes());
    }
    many.extend_from_slice(b"Connection: close\r\n\r\n");
    cases.push(Case {
        name: "200 headers",
        request: many,
        status: 431,
        body: None,
        may_decode: false,
    });
    for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"] {
        cases.push(Case {
            name: method,
            request: format!(
                "{method} /product/image/good/w100.jpg HTTP/1.1\r\nHost: test\r\n\
                 Content-Length: 4\r\nConnection: close\r\n\r\nbody"
            )
            .into_bytes(),
            status: 405,
            body: Some("method not allowed\n"),
            may_decode: false,
        });
    }

    let rss_before = support::rss_kb();
    println!("| case | status | decodes | ms |");
    println!("|---|---|---|---|");
    let mut failures = Vec::new();
    for case in &cases {
        let decodes_before = vips::decodes_started();
        let t = Instant::now();
        let (status, text) = raw_exchange(&server, &case.request).await;
        let ms = t.elapsed().as_millis();
        let decoded = vips::decodes_started() - decodes_before;
        println!("| {} | {status} | {decoded} | {ms} |", case.name);
        if status != case.status {
            failures.push(format!(
                "{}: status {status}, want {}",
                case.name, case.status
            ));
        }
        if let Some(body) = case.body {
            if !text.ends_with(&format!("\r\n\r\n{body}")) {
                failures.push(format!("{}: body of {text:?}", case.name));
            }
        }
        if status == 405
            && !text
                .to_ascii_lowercase()
                .contains("\r\nallow: get, head\r\n")
        {
            failures.push(format!("{}: no Allow header", case.name));
        }
        if !case.may_decode && decoded != 0 {
            failures.push(format!("{}: {decoded} decodes started", case.name));
        }
        if t.elapsed() > Duration::from_secs(2) {
            failures.push(format!("{}: took {ms} ms", case.name));
        }
    }
    let grew_mb = support::rss_kb().saturating_sub(rss_before) / 1024;
    println!("| RSS growth | {grew_mb} MB | | |");

    // Still alive and still rendering.
    let (status, _) = raw_exchange(&server, &get_request("/product/image/good/w120.jpg")).await;
    assert_eq!(status, 200, "server still serves");
    server
        .app
        .pipeline
        .purge_memory("product/image/good")
        .expect("purge");
    // Nothing cached by any failure: no variant, no original.
    let p = &server.app.pipeline;
    p.memory().sync().await;
    p.sync_originals().await;
    let (originals_left, _) = p.originals_usage();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(p.memory().entry_count(), 0, "result entries after failures");
    assert_eq!(originals_left, 0, "originals kept after failures");
    assert!(grew_mb < 50, "RSS grew {grew_mb} MB");
    server.stop().await.expect("stops");
}
