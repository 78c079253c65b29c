//! The operator commands beside the request path: `image-server warm` and `image-server
//! purge` run as the real binary (a subprocess) against SeaweedFS and a loopback origin, and a server
//! started in-process shows what they changed: warmed variants answer from the store with no origin
//! request, a purged id is rendered again, and the status port's purge endpoint guards itself.

use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use image_server::image::fixtures;
use image_server::request::Format;
use image_server::server::Running;
use object_store::ObjectStore;
use tokio::io::AsyncWriteExt;

use crate::seaweed::{self, Seaweed};
use crate::support::{self, get, header, probe, Origin};

/// The servers' bearer token for `POST /purge/…` (at least 16 characters).
const TOKEN: &str = "operations-test-token-0123456789";
/// The result store's key prefix inside the bucket.
const PREFIX: &str = "cache";

/// Runs the real binary with the test configuration, the origin as source, `store` overrides and
/// `args` (a subcommand and its arguments), feeding `stdin` when given. Async: the origin is served by
/// this test's runtime, so the test must not block while the child talks to it.
async fn run(
    origin: &Origin,
    store: &[(String, String)],
    extra: &[(&str, &str)],
    args: &[&str],
    stdin: Option<&str>,
) -> Output {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_image-server"));
    cmd.current_dir(dir)
        .arg("-e")
        .arg("test")
        .arg("--config-dir")
        .arg(dir.join("config"))
        .arg("--source-domain")
        .arg(origin.url());
    for (k, v) in store {
        cmd.arg("--set").arg(format!("{k}={v}"));
    }
    for (k, v) in extra {
        cmd.arg("--set").arg(format!("{k}={v}"));
    }
    // The child reads only what this test gives it: no stray IMAGE_SERVER_* or RUST_LOG from the
    // environment running the suite.
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("IMAGE_SERVER_") {
            cmd.env_remove(name);
        }
    }
    cmd.env_remove("RUST_LOG")
        .args(args)
        .stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("image-server binary runs");
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().expect("stdin");
        pipe.write_all(text.as_bytes()).await.expect("write stdin");
        drop(pipe);
    }
    tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .expect("the command finishes")
        .expect("output")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The bucket seen directly (not through the server), to check what is stored.
fn bucket(weed: &Seaweed) -> Arc<dyn ObjectStore> {
    let cfg = support::config(&[("source_domain", "http://127.0.0.1:9")]);
    let mut s3 = cfg.s3.clone();
    s3.endpoint = Some(weed.endpoint());
    s3.allow_http = true;
    s3.access_key_id = Some(seaweed::ACCESS_KEY.into());
    s3.secret_access_key = Some(seaweed::SECRET_KEY.into());
    let (store, _) = image_server::source::object_store_from_url(
        &image_server::config::StoreUrl::parse(&weed.url("")).expect("store URL"),
        &s3,
        Duration::from_secs(5),
        Duration::from_secs(2),
    )
    .expect("store");
    store
}

/// Every key stored under `prefix`, sorted.
async fn keys(store: &Arc<dyn ObjectStore>, prefix: &str) -> Vec<String> {
    let prefix = object_store::path::Path::from(prefix);
    let mut out: Vec<String> = store
        .list(Some(&prefix))
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .expect("list");
    out.sort();
    out
}

/// A server sharing the store, with the purge endpoint on.
async fn server(origin: &Origin, weed: &Seaweed) -> Running {
    let url = origin.url();
    let owned = weed.overrides(PREFIX);
    let mut o: Vec<(&str, &str)> = vec![
        ("source_domain", url.as_str()),
        ("admin_token", TOKEN),
        ("store_timeout", "\"5s\""),
    ];
    o.extend(owned.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    support::start(support::config(&o)).await
}

fn id(n: usize) -> String {
    format!("product/image/{n}")
}

/// The three versions the warm tests render, as a request names them (`80x80.webp`, an equivalent
/// of the warmed `x80.webp`, must find the same stored variant), with the size each must come out at
/// from a 400×300 original, and the format.
const VERSIONS: &str = "w100.jpg,x80.webp,50x40.png";
const EXPECTED: [(&str, u32, u32, Format); 3] = [
    ("w100.jpg", 100, 75, Format::Jpeg),
    ("80x80.webp", 80, 80, Format::Webp),
    ("50x40.png", 50, 40, Format::Png),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_fills_the_store_the_server_answers_from_it_and_a_rerun_skips() {
    let weed = Seaweed::start("results");
    let origin = Origin::start().await;
    let original = fixtures::jpeg(400, 300, 85);
    for n in 1..=50 {
        origin.put(&id(n), original.clone());
    }
    let ids: String = (1..=50).map(|n| format!("{}\n", id(n))).collect();
    let store = weed.overrides(PREFIX);

    // Ids from stdin (`-`), as a pipeline would feed them.
    let out = run(
        &origin,
        &store,
        &[],
        &["warm", "--versions", VERSIONS, "-"],
        Some(&ids),
    )
    .await;
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains("warm: 150 rendered, 0 skipped, 0 failed of 150 variants"),
        "{}",
        stdout(&out)
    );
    // The three versions of each original come from one decode of it.
    assert!(stdout(&out).contains("; 50 decodes"), "{}", stdout(&out));
    // Id-major order: the three versions of an original share its one download.
    assert_eq!(origin.total(), 50, "one origin request per original");
    let raw = bucket(&weed);
    let stored = keys(&raw, PREFIX).await;
    assert_eq!(stored.len(), 150);
    assert!(
        stored.contains(&format!("{PREFIX}/product/image/7/80x80.webp")),
        "canonical keys"
    );

    // A server with the same store answers every variant from it, without asking the origin.
    let s = server(&origin, &weed).await;
    for n in 1..=50 {
        for (name, w, h, format) in EXPECTED {
            let resp = get(&s, &format!("/{}/{name}", id(n))).await;
            assert_eq!(resp.status(), 200);
            assert_eq!(header(&resp, "x-cache"), "remote", "{name}");
            assert_eq!(header(&resp, "surrogate-key"), id(n));
            assert_eq!(header(&resp, "cache-tag"), id(n));
            if n == 1 {
                let p = probe(&resp.bytes().await.expect("body"));
                assert_eq!((p.format, p.width, p.height), (format, w, h), "{name}");
            }
        }
    }
    assert_eq!(origin.total(), 50, "the server asked the origin nothing");
    assert_eq!(s.app.pipeline.stats().processing_total, 0, "nor rendered");

    // Run again: everything is stored, so nothing is fetched or rendered.
    let out = run(
        &origin,
        &store,
        &[],
        &["warm", "--versions", VERSIONS, "-"],
        Some(&ids),
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("warm: 0 rendered, 150 skipped, 0 failed of 150 variants"),
        "{}",
        stdout(&out)
    );
    assert_eq!(origin.total(), 50, "a re-run makes no origin request");

    // --force renders again (and so downloads again).
    let out = run(
        &origin,
        &store,
        &[("processing_concurrency", "2")],
        &[
            "warm",
            "--force",
            "--jobs",
            "4",
            "--versions",
            "w100.jpg",
            &id(1),
            &id(2),
        ],
        None,
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("warm: 2 rendered, 0 skipped"),
        "{}",
        stdout(&out)
    );
    assert_eq!(origin.total(), 52);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_reports_failures_by_reason_and_stores_the_rest() {
    let weed = Seaweed::start("results");
    let origin = Origin::start().await;
    let original = fixtures::jpeg(400, 300, 85);
    for n in [1, 2, 4] {
        origin.put(&id(n), original.clone());
    }
    // id 3 is an HTML page served as an image; id 5 does not exist.
    origin.put(
        &id(3),
        &b"<!doctype html><html><body>Login required</body></html>"[..],
    );
    let store = weed.overrides(PREFIX);
    let args: Vec<String> = ["warm", "--versions", "w100.jpg,x80.webp,w5000.jpg"]
        .iter()
        .map(|s| (*s).to_owned())
        .chain((1..=5).map(id))
        .chain(["product/image/a.b".to_owned()])
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run(&origin, &store, &[], &args, None).await;
    let (o, e) = (stdout(&out), stderr(&out));
    assert_eq!(
        out.status.code(),
        Some(1),
        "anything failed: non-zero\n{o}\n{e}"
    );
    // 6 ids × 3 versions = 18: ids 1, 2, 4 render two each (6); w5000 is over maximum_width for the
    // five valid ids (5 too_large), id 3 is not an image (2), id 5 is missing (2), and the bad id
    // fails its three names as no_route.
    assert!(
        o.contains("warm: 6 rendered, 0 skipped, 12 failed of 18 variants"),
        "{o}"
    );
    let reasons = o
        .lines()
        .find(|l| l.starts_with("failed by reason: "))
        .expect("reasons");
    let broken = if reasons.contains("format 2") {
        "format"
    } else {
        "undecodable"
    };
    assert!(reasons.contains(&format!("{broken} 2")), "{reasons}");
    for part in ["no_route 3", "not_found 2", "too_large 5"] {
        assert!(reasons.contains(part), "{part} in {reasons}");
    }
    // Each failure is named on stderr, with its reason.
    assert!(
        e.contains(&format!("failed /product/image/3/w100.jpg: {broken}")),
        "{e}"
    );
    assert!(
        e.contains("failed /product/image/1/w5000.jpg: too_large"),
        "{e}"
    );
    assert!(
        e.contains("failed /product/image/5/x80.webp: not_found"),
        "{e}"
    );
    // stderr is not a terminal here: plain lines, no cursor control.
    assert!(!e.contains('\r') && !e.contains('\x1b'), "{e:?}");

    let stored = keys(&bucket(&weed), PREFIX).await;
    let expected: Vec<String> = [1, 2, 4]
        .iter()
        .flat_map(|n| {
            [
                format!("{PREFIX}/{}/80x80.webp", id(*n)),
                format!("{PREFIX}/{}/w100.jpg", id(*n)),
            ]
        })
        .collect();
    assert_eq!(
        stored, expected,
        "the rest is stored, nothing of the failures"
    );

    // Fixed and re-run: only the missing work is done.
    origin.put(&id(3), original.clone());
    origin.put(&id(5), original.clone());
    let before = origin.total();
    let out = run(
        &origin,
        &store,
        &[],
        &[
            "warm",
            "--versions",
            "w100.jpg,x80.webp",
            &id(1),
            &id(3),
            &id(5),
        ],
        None,
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("warm: 4 rendered, 2 skipped, 0 failed of 6 variants"),
        "{}",
        stdout(&out)
    );
    assert_eq!(origin.total() - before, 2, "ids 3 and 5 only");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_and_purge_refuse_to_start_without_somewhere_to_work() {
    let origin = Origin::start().await;
    // config/test.toml has result_store = "none".
    let out = run(
        &origin,
        &[],
        &[],
        &["warm", "--versions", "w100.jpg", "p/i/1"],
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("no result_store configured"),
        "{}",
        stderr(&out)
    );
    assert_eq!(origin.total(), 0);

    let out = run(&origin, &[], &[], &["purge", "p/i/1"], None).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("no --status-url"), "{}", stderr(&out));

    // --status-url without the token to send.
    let out = run(
        &origin,
        &[],
        &[],
        &["purge", "p/i/1", "--status-url", "http://127.0.0.1:9"],
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("needs admin_token"),
        "{}",
        stderr(&out)
    );

    // An empty id list on stdin.
    let out = run(
        &origin,
        &[],
        &[("result_store", "file:///nonexistent-image-server-test")],
        &["warm", "--versions", "w100.jpg", "-"],
        Some("\n# nothing\n"),
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("no ids given"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_deletes_exactly_one_id_and_running_servers_render_it_again() {
    let weed = Seaweed::start("results");
    let origin = Origin::start().await;
    let original = fixtures::jpeg(400, 300, 85);
    for n in 1..=3 {
        origin.put(&id(n), original.clone());
    }
    // A neighbour whose id starts with the purged one's: a prefix match must not take it.
    origin.put(&id(22), original.clone());
    let store = weed.overrides(PREFIX);
    let out = run(
        &origin,
        &store,
        &[],
        &[
            "warm",
            "--versions",
            "w100.jpg,x80.webp",
            &id(1),
            &id(2),
            &id(3),
            &id(22),
        ],
        None,
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let raw = bucket(&weed);
    assert_eq!(keys(&raw, PREFIX).await.len(), 8);

    // The server has id 2 in memory.
    let s = server(&origin, &weed).await;
    for name in ["w100.jpg", "x80.webp"] {
        let resp = get(&s, &format!("/{}/{name}", id(2))).await;
        assert_eq!(header(&resp, "x-cache"), "remote");
        let resp = get(&s, &format!("/{}/{name}", id(2))).await;
        assert_eq!(header(&resp, "x-cache"), "memory");
    }
    let hits = origin.hits(&id(2));
    assert_eq!(hits, 1, "the warm-up's one download");

    // A wrong token: the store is still purged, the server refuses, the command says so and fails.
    let status_url = format!("http://{}", s.status_addr);
    let out = run(
        &origin,
        &store,
        &[("admin_token", "not-the-servers-token")],
        &["purge", &id(2), "--status-url", &status_url],
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("401 unauthorized"),
        "{}",
        stderr(&out)
    );
    let resp = get(&s, &format!("/{}/w100.jpg", id(2))).await;
    assert_eq!(
        header(&resp, "x-cache"),
        "memory",
        "the server kept its entry"
    );
    let remaining = keys(&raw, PREFIX).await;
    assert_eq!(remaining.len(), 6, "{remaining:?}");

    // Warm id 2 back, then purge it properly.
    let out = run(
        &origin,
        &store,
        &[],
        &["warm", "--versions", "w100.jpg,x80.webp", &id(2)],
        None,
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run(
        &origin,
        &store,
        &[("admin_token", TOKEN)],
        &["purge", &id(2), "--status-url", &status_url],
        None,
    )
    .await;
    let o = stdout(&out);
    assert!(out.status.success(), "{o}\n{}", stderr(&out));
    assert!(
        o.contains(&format!("deleted {PREFIX}/product/image/2/w100.jpg")),
        "{o}"
    );
    assert!(
        o.contains(&format!("deleted {PREFIX}/product/image/2/80x80.webp")),
        "{o}"
    );
    assert!(
        o.contains(&format!("{status_url} purged product/image/2")),
        "{o}"
    );
    assert!(
        o.contains(
            "purge: 1 ids, 2 stored objects deleted, 1/1 server purges acknowledged, 0 failed"
        ),
        "{o}"
    );
    let remaining = keys(&raw, PREFIX).await;
    let expected: Vec<String> = [1, 22, 3]
        .iter()
        .flat_map(|n| {
            [
                format!("{PREFIX}/{}/80x80.webp", id(*n)),
                format!("{PREFIX}/{}/w100.jpg", id(*n)),
            ]
        })
        .collect();
    assert_eq!(remaining, expected, "exactly id 2's variants are gone");

    // The server renders id 2 again from the origin; the others still come from the store.
    let before = origin.hits(&id(2));
    let resp = get(&s, &format!("/{}/w100.jpg", id(2))).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-cache"), "miss");
    assert_eq!(origin.hits(&id(2)), before + 1, "origin asked again");
    let resp = get(&s, &format!("/{}/w100.jpg", id(22))).await;
    assert_eq!(header(&resp, "x-cache"), "remote");
    s.stop().await.expect("stop");

    // Purging an id with nothing stored, and a bad id: reported, non-zero for the bad one.
    let out = run(&origin, &store, &[], &["purge", &id(9), "p/i/a.b"], None).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("product/image/9: nothing stored"),
        "{}",
        stdout(&out)
    );
    assert!(
        stderr(&out).contains("failed p/i/a.b: bad id"),
        "{}",
        stderr(&out)
    );
}

/// POSTs to the status port's purge endpoint.
async fn purge_call(s: &Running, path: &str, token: Option<&str>) -> (u16, String) {
    let mut req = support::client().post(format!("http://{}{}", s.status_addr, path));
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = req.send().await.expect("status port answers");
    let status = resp.status().as_u16();
    (status, resp.text().await.expect("body"))
}

#[tokio::test]
async fn purge_endpoint_guards_itself_and_drops_every_memory_entry_of_an_original() {
    let origin = Origin::start().await;
    origin.put(&id(1), fixtures::jpeg(800, 600, 85));
    let s = support::start_with_origin(&origin, &[("admin_token", TOKEN)]).await;

    // Authentication comes first, whatever the id.
    for (path, token) in [
        ("/purge/product/image/1", None),
        ("/purge/product/image/1", Some("wrong-token-0123456789")),
        ("/purge/product/image/1", Some("")),
        ("/purge/not/an/id/at/all", Some("wrong-token-0123456789")),
    ] {
        assert_eq!(
            purge_call(&s, path, token).await,
            (401, "unauthorized\n".to_owned()),
            "{path} {token:?}"
        );
    }
    // A near-miss scheme is not a bearer token.
    let resp = support::client()
        .post(format!("http://{}/purge/product/image/1", s.status_addr))
        .header("authorization", format!("Basic {TOKEN}"))
        .send()
        .await
        .expect("answer");
    assert_eq!(resp.status(), 401);
    // Ids the URL grammar refuses.
    for path in [
        "/purge/product/image",
        "/purge/product/image/",
        "/purge/product/image/1/w100.jpg",
        "/purge/product/image/a.b",
        "/purge/Product/image/1",
        "/purge/product/image/%2e%2e",
        "/purge/",
    ] {
        assert_eq!(
            purge_call(&s, path, Some(TOKEN)).await,
            (400, "bad id\n".to_owned()),
            "{path}"
        );
    }
    // Only POST purges.
    let resp = get(&s, "/purge/product/image/1").await;
    assert_eq!(resp.status(), 404);
    let resp = support::client()
        .get(format!("http://{}/purge/product/image/1", s.status_addr))
        .header("authorization", format!("Bearer {TOKEN}"))
        .send()
        .await
        .expect("answer");
    assert_eq!(resp.status(), 404);

    // Variants and the original's bytes: the server holds both after one request.
    let resp = get(&s, &format!("/{}/w100.jpg", id(1))).await;
    assert_eq!(header(&resp, "x-cache"), "miss");
    assert_eq!(header(&resp, "surrogate-key"), id(1));
    assert_eq!(header(&resp, "cache-tag"), id(1));
    assert_eq!(probe(&resp.bytes().await.expect("body")).height, 75);
    // The original is replaced at the origin (800×600 → 800×400): memory still has the old one.
    origin.put(&id(1), fixtures::jpeg(800, 400, 85));
    let resp = get(&s, &format!("/{}/w100.jpg", id(1))).await;
    assert_eq!(header(&resp, "x-cache"), "memory");
    assert_eq!(
        header(&resp, "surrogate-key"),
        id(1),
        "memory hits are tagged too"
    );
    assert_eq!(
        purge_call(&s, &format!("/purge/{}", id(1)), Some(TOKEN)).await,
        (200, "purged\n".to_owned())
    );
    // A new size of the same original would have been rendered from the cached old bytes had
    // purge left them: 100×50 proves it fetched the new original.
    let resp = get(&s, &format!("/{}/w100.jpg", id(1))).await;
    assert_eq!(header(&resp, "x-cache"), "miss");
    assert_eq!(probe(&resp.bytes().await.expect("body")).height, 50);
    assert_eq!(origin.hits(&id(1)), 2);

    // The negative entry: a missing original stays 404 until purged, even once it exists.
    let resp = get(&s, &format!("/{}/w100.jpg", id(9))).await;
    assert_eq!(resp.status(), 404);
    origin.put(&id(9), fixtures::jpeg(400, 300, 85));
    let resp = get(&s, &format!("/{}/w100.jpg", id(9))).await;
    assert_eq!(resp.status(), 404, "negatively cached");
    assert_eq!(origin.hits(&id(9)), 1);
    assert_eq!(
        purge_call(&s, &format!("/purge/{}", id(9)), Some(TOKEN))
            .await
            .0,
        200
    );
    let resp = get(&s, &format!("/{}/w100.jpg", id(9))).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(origin.hits(&id(9)), 2);

    // Every outcome is counted (the recorder is shared by the tests in this process: at least).
    let metrics = support::client()
        .get(format!("http://{}/metrics", s.status_addr))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body");
    for name in ["purge_ok", "purge_unauthorized", "purge_bad_id"] {
        assert!(metrics.contains(name), "{name} in /metrics");
    }
    s.stop().await.expect("stop");

    // No admin_token: the endpoint does not exist.
    let s = support::start_with_origin(&origin, &[]).await;
    assert_eq!(
        purge_call(&s, &format!("/purge/{}", id(1)), Some(TOKEN))
            .await
            .0,
        404
    );
}

/// `check-config` builds what start-up builds: a result store URL that parses as a URL but names no
/// bucket is refused (exit 2, the key named), as `serve` would refuse it; `--print` shows every key's
/// value in force and where it came from, secrets redacted.
#[tokio::test]
async fn check_config_builds_what_start_up_builds() {
    let origin = Origin::start().await;
    let ok = run(
        &origin,
        &[],
        &[("admin_token", "\"a-long-enough-admin-token\"")],
        &["check-config", "--print"],
        None,
    )
    .await;
    assert!(ok.status.success(), "{}", stderr(&ok));
    let text = stdout(&ok);
    assert!(text.ends_with("configuration OK\n"), "{text}");
    let json = &text[..text.rfind("configuration OK").expect("ok line")];
    let settings: serde_json::Value = serde_json::from_str(json).expect("JSON settings");
    assert_eq!(settings["max_jpeg_scans"]["value"], 100);
    assert_eq!(settings["max_jpeg_scans"]["origin"], "default");
    assert_eq!(settings["admin_token"]["value"], "<redacted>");
    assert_eq!(settings["admin_token"]["origin"], "--set admin_token");
    assert_eq!(settings["source_domain"]["origin"], "--source-domain");
    let port_from = settings["server_port"]["origin"]
        .as_str()
        .unwrap_or_default();
    assert!(port_from.ends_with("config/test.toml"), "{port_from}");
    assert!(
        !text.contains("a-long-enough-admin-token"),
        "no secret printed"
    );

    let bad = run(
        &origin,
        &[],
        &[("result_store", "\"s3://\"")],
        &["check-config"],
        None,
    )
    .await;
    assert_eq!(bad.status.code(), Some(2), "{}", stdout(&bad));
    assert!(stderr(&bad).contains("result_store"), "{}", stderr(&bad));
}
