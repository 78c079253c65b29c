//! `?source=`, URL signing and `allowed_sizes`, end to end over HTTP.
//!
//! Nothing here leaves loopback: the server's override client gets an injected resolver that maps
//! test names (`img.test`, `evil.test`, …) to 127.0.0.x and records every lookup, and a test address
//! policy that plays "public internet" on 127.0.0.1 and "internal network" on every other loopback
//! address. The internal side is a raw listener on 127.0.0.2 that counts accepted connections, so
//! "never dialled" is observed, not inferred.
//!
//! Choice documented here and in `source::guard`: a name that resolves only to internal addresses is
//! 403 (a refusal by the operator's rules, like every other `?source=` refusal), not 502.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use image_server::app::App;
use image_server::image::fixtures;
use image_server::image::vips;
use image_server::server::{self, Running};
use image_server::signature;
use image_server::source::guard::{AddressPolicy, SourceGuard};
use image_server::source::{Source, SourceLimits};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

use crate::support::{self, get, header, probe, Origin, Reply};
use image_server::source::raw_origin::{self as raw, Behaviour, RawOrigin};

/// Test DNS: a fixed table of names, every question recorded.
#[derive(Clone, Default)]
pub(crate) struct TableResolver {
    names: HashMap<String, IpAddr>,
    asked: Arc<Mutex<Vec<String>>>,
}

impl TableResolver {
    pub(crate) fn new(entries: &[(&str, &str)]) -> TableResolver {
        TableResolver {
            names: entries
                .iter()
                .map(|(n, ip)| ((*n).to_owned(), ip.parse().expect("ip")))
                .collect(),
            asked: Arc::default(),
        }
    }

    fn asked(&self) -> Vec<String> {
        self.asked.lock().expect("lock").clone()
    }
}

impl Resolve for TableResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let name = name.as_str().to_owned();
        self.asked.lock().expect("lock").push(name.clone());
        let found = self.names.get(&name).copied();
        Box::pin(async move {
            match found {
                Some(ip) => Ok(Box::new(std::iter::once(SocketAddr::new(ip, 0))) as Addrs),
                None => Err(format!("test resolver: no such name {name}").into()),
            }
        })
    }
}

const ID: &str = "product/image/1";

/// The server with overrides on for `hosts`, the test resolver and the loopback test policy.
async fn start_guarded(
    origin: &Origin,
    hosts: &str,
    resolver: &TableResolver,
    extra: &[(&str, &str)],
) -> Running {
    let url = origin.url();
    let mut o: Vec<(&str, &str)> = vec![
        ("source_domain", url.as_str()),
        ("allow_source_override", "true"),
        ("allowed_source_hosts", hosts),
    ];
    o.extend_from_slice(extra);
    let cfg = support::config(&o);
    vips::init(cfg.rendering.accept_avif_input).expect("libvips");
    image_server::metrics::install(None);
    let guard = SourceGuard::new(
        &cfg.security.allowed_source_hosts,
        SourceLimits::from_config(&cfg),
        Arc::new(resolver.clone()),
        AddressPolicy::for_tests(vec!["127.0.0.1".parse().expect("ip")]),
    )
    .expect("guard");
    let cfg = Arc::new(cfg);
    let source = Source::from_config(&cfg).expect("source");
    let app = App::with_parts(cfg, source, None, Some(guard));
    server::start(app).await.expect("server starts")
}

/// Asserts a 403 with the fixed body, which no shared cache may keep (another client's request for
/// the same URL may well be allowed).
async fn forbidden(server: &Running, path: &str) {
    let resp = get(server, path).await;
    assert_eq!(resp.status(), 403, "{path}");
    assert_eq!(header(&resp, "cache-control"), "no-store", "{path}");
    assert_eq!(resp.text().await.expect("body"), "forbidden\n", "{path}");
}

fn with_source(path: &str, source: &str) -> String {
    let q = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("source", source)
        .finish();
    format!("{path}?{q}")
}

#[tokio::test]
async fn override_is_off_by_default() {
    let origin = Origin::start().await;
    origin.put(ID, fixtures::jpeg(600, 400, 85));
    let server = support::start_with_origin(&origin, &[]).await;
    for q in [
        "source=http://img.test/a.jpg",
        "source=",
        "source",
        "sour%63e=http://img.test/a.jpg",
    ] {
        forbidden(&server, &format!("/{ID}/w100.jpg?{q}")).await;
    }
    assert_eq!(origin.total(), 0, "a refused request does no I/O");
    // Other query parameters are ignored.
    let resp = get(&server, &format!("/{ID}/w100.jpg?sources=1&x=y")).await;
    assert_eq!(resp.status(), 200);
    server.stop().await.expect("stops");
}

#[tokio::test]
async fn allowed_host_is_served_and_cached_apart_from_the_id() {
    let origin = Origin::start().await;
    // The id's own original is landscape; the override's is portrait: the sizes tell them apart.
    origin.put(ID, fixtures::jpeg(600, 400, 85));
    origin.script_path(
        "/elsewhere/portrait.jpg",
        Reply::Body(fixtures::jpeg(300, 600, 85).into()),
    );
    let resolver = TableResolver::new(&[("img.test", "127.0.0.1"), ("a.img.test", "127.0.0.1")]);
    let server = start_guarded(&origin, "img.test", &resolver, &[]).await;
    let port = origin.addr.port();
    let src = format!("http://img.test:{port}/elsewhere/portrait.jpg");
    let overridden = with_source(&format!("/{ID}/w100.jpg"), &src);

    let resp = get(&server, &overridden).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-cache"), "miss");
    let out = probe(&resp.bytes().await.expect("body"));
    assert_eq!((out.width, out.height), (100, 200));
    assert_eq!(resolver.asked(), vec!["img.test".to_owned()]);

    // The id's own original is untouched by the override, in both cache tiers' keys.
    let resp = get(&server, &format!("/{ID}/w100.jpg")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-cache"), "miss");
    let out = probe(&resp.bytes().await.expect("body"));
    assert_eq!((out.width, out.height), (100, 67));

    // Both now answer from memory, each its own.
    let resp = get(&server, &overridden).await;
    assert_eq!(header(&resp, "x-cache"), "memory");
    assert_eq!(probe(&resp.bytes().await.expect("body")).height, 200);
    let resp = get(&server, &format!("/{ID}/w100.jpg")).await;
    assert_eq!(header(&resp, "x-cache"), "memory");
    assert_eq!(probe(&resp.bytes().await.expect("body")).height, 67);

    // Another size of the override reuses its original (keyed by URL): one download each.
    let resp = get(&server, &with_source(&format!("/{ID}/w50.jpg"), &src)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(origin.path_hits("/elsewhere/portrait.jpg"), 1);
    assert_eq!(origin.hits(ID), 1);

    // A subdomain of an allowed host is allowed (dot boundary).
    origin.script_path("/sub.jpg", Reply::Body(fixtures::jpeg(200, 200, 85).into()));
    let sub = format!("http://a.img.test:{port}/sub.jpg");
    let resp = get(&server, &with_source(&format!("/{ID}/w100.jpg"), &sub)).await;
    assert_eq!(resp.status(), 200);

    // A missing override is 404 and negatively cached for the URL, not for the id.
    let missing = format!("http://img.test:{port}/nope.jpg");
    let resp = get(&server, &with_source(&format!("/{ID}/w120.jpg"), &missing)).await;
    assert_eq!(resp.status(), 404);
    let resp = get(&server, &format!("/{ID}/w120.jpg")).await;
    assert_eq!(
        resp.status(),
        200,
        "the id's own original is not marked missing"
    );
    server.stop().await.expect("stops");
}

#[tokio::test]
async fn hosts_outside_the_allow_list_are_refused_without_a_lookup() {
    let origin = Origin::start().await;
    origin.put(ID, fixtures::jpeg(600, 400, 85));
    let resolver = TableResolver::new(&[
        ("img.test", "127.0.0.1"),
        ("notimg.test", "127.0.0.1"),
        ("other.test", "127.0.0.1"),
    ]);
    let server = start_guarded(&origin, "img.test", &resolver, &[]).await;
    let port = origin.addr.port();
    for src in [
        format!("http://other.test:{port}/product/image/1/original.jpg"),
        format!("http://notimg.test:{port}/product/image/1/original.jpg"),
        format!("http://img.test.other.test:{port}/product/image/1/original.jpg"),
        format!("http://127.0.0.1:{port}/product/image/1/original.jpg"),
        format!("http://2130706433:{port}/product/image/1/original.jpg"),
        format!("http://localhost:{port}/product/image/1/original.jpg"),
        // Scheme and userinfo rules.
        format!("ftp://img.test:{port}/product/image/1/original.jpg"),
        "file:///etc/passwd".to_owned(),
        format!("gopher://img.test:{port}/"),
        format!("http://user:secret@img.test:{port}/product/image/1/original.jpg"),
        format!("http://user@img.test:{port}/product/image/1/original.jpg"),
        // Not URLs.
        "/product/image/1/original.jpg".to_owned(),
        "img.test/product/image/1/original.jpg".to_owned(),
        String::new(),
    ] {
        forbidden(&server, &with_source(&format!("/{ID}/w100.jpg"), &src)).await;
    }
    // Two sources: ambiguous, refused.
    let two = format!(
        "/{ID}/w100.jpg?source=http://img.test:{port}/a.jpg&source=http://img.test:{port}/b.jpg"
    );
    forbidden(&server, &two).await;
    assert!(resolver.asked().is_empty(), "{:?}", resolver.asked());
    assert_eq!(origin.total(), 0);
    server.stop().await.expect("stops");
}

#[tokio::test]
async fn internal_addresses_are_never_dialled() {
    let origin = Origin::start().await;
    // The internal service would happily serve a valid image if anyone connected.
    let image = fixtures::jpeg(64, 64, 85);
    let internal = RawOrigin::start("127.0.0.2", Behaviour::Reply(raw::ok_jpeg(&image))).await;
    let iport = internal.addr.port();
    let resolver = TableResolver::new(&[("img.test", "127.0.0.1"), ("evil.test", "127.0.0.2")]);
    // The internal address is even listed, in several spellings: the address rule still holds.
    let server = start_guarded(
        &origin,
        "img.test,evil.test,127.0.0.2,::ffff:127.0.0.2",
        &resolver,
        &[],
    )
    .await;
    for src in [
        format!("http://evil.test:{iport}/a.jpg"),
        format!("http://127.0.0.2:{iport}/a.jpg"),
        format!("http://2130706434:{iport}/a.jpg"),
        format!("http://0x7f000002:{iport}/a.jpg"),
        format!("http://0177.0.0.2:{iport}/a.jpg"),
        format!("http://[::ffff:127.0.0.2]:{iport}/a.jpg"),
    ] {
        forbidden(&server, &with_source(&format!("/{ID}/w100.jpg"), &src)).await;
    }
    assert_eq!(internal.accepts(), 0, "no connection reached 127.0.0.2");
    assert_eq!(resolver.asked(), vec!["evil.test".to_owned()]);
    // Control: the listener does count a connection, so the zero above means something.
    let direct = support::client()
        .get(format!("{}/a.jpg", internal.url()))
        .send()
        .await
        .expect("direct");
    assert_eq!(direct.status(), 200);
    assert_eq!(internal.accepts(), 1);
    server.stop().await.expect("stops");
}

#[tokio::test]
async fn redirects_are_rechecked_and_limited() {
    let origin = Origin::start().await;
    let internal = RawOrigin::start(
        "127.0.0.2",
        Behaviour::Reply(raw::ok_jpeg(&fixtures::jpeg(64, 64, 85))),
    )
    .await;
    let iport = internal.addr.port();
    let resolver = TableResolver::new(&[
        ("img.test", "127.0.0.1"),
        ("evil.test", "127.0.0.2"),
        ("other.test", "127.0.0.1"),
    ]);
    let server = start_guarded(&origin, "img.test,evil.test", &resolver, &[]).await;
    let port = origin.addr.port();
    let base = format!("http://img.test:{port}");
    origin.script_path(
        "/final.jpg",
        Reply::Body(fixtures::jpeg(300, 600, 85).into()),
    );
    origin.script_path(
        "/other-final.jpg",
        Reply::Body(fixtures::jpeg(300, 600, 85).into()),
    );
    // A chain: /hop1 → /hop2 → /hop3 → /hop4 → /final.jpg.
    for n in 1..=4 {
        let next = if n == 4 {
            format!("{base}/final.jpg")
        } else {
            format!("{base}/hop{}", n + 1)
        };
        origin.script_path(&format!("/hop{n}"), Reply::Redirect(next));
    }
    // Three redirects are fine.
    let resp = get(
        &server,
        &with_source(&format!("/{ID}/w100.jpg"), &format!("{base}/hop2")),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(probe(&resp.bytes().await.expect("body")).height, 200);
    assert_eq!(origin.path_hits("/final.jpg"), 1);
    // Four are not, and the fifth request is never made.
    forbidden(
        &server,
        &with_source(&format!("/{ID}/w101.jpg"), &format!("{base}/hop1")),
    )
    .await;
    assert_eq!(origin.path_hits("/final.jpg"), 1);

    // Each hop is checked like the first URL. A `Location` that is not even an HTTP URI
    // (`file:///…`, no authority) is not followed by the client at all: the exchange ends on the
    // origin's 302, which is an origin error (502). Either way nothing is fetched.
    let targets = [
        (format!("http://other.test:{port}/other-final.jpg"), 403),
        (format!("http://evil.test:{iport}/a.jpg"), 403),
        (format!("http://127.0.0.2:{iport}/a.jpg"), 403),
        (format!("http://[::ffff:7f00:2]:{iport}/a.jpg"), 403),
        (format!("ftp://img.test:{port}/other-final.jpg"), 403),
        (
            format!("http://user:pw@img.test:{port}/other-final.jpg"),
            403,
        ),
        ("file:///etc/passwd".to_owned(), 502),
    ];
    for (i, (target, status)) in targets.iter().enumerate() {
        let hop = format!("/to-{i}");
        origin.script_path(&hop, Reply::Redirect(target.clone()));
        let resp = get(
            &server,
            &with_source(&format!("/{ID}/w100.jpg"), &format!("{base}{hop}")),
        )
        .await;
        assert_eq!(resp.status(), *status, "{target}");
        assert_eq!(origin.path_hits(&hop), 1, "{target}");
    }
    assert_eq!(origin.path_hits("/other-final.jpg"), 0);
    assert_eq!(internal.accepts(), 0, "no redirect reached 127.0.0.2");
    assert!(
        !resolver.asked().contains(&"other.test".to_owned()),
        "a disallowed redirect target is not even looked up"
    );
    server.stop().await.expect("stops");
}

#[tokio::test]
async fn refusals_are_counted() {
    let origin = Origin::start().await;
    let resolver = TableResolver::new(&[]);
    let server = start_guarded(&origin, "img.test", &resolver, &[]).await;
    let before = support::counter(&server, "rejected.source_refused").await as u64;
    for _ in 0..3 {
        forbidden(
            &server,
            &with_source(&format!("/{ID}/w100.jpg"), "ftp://x/"),
        )
        .await;
    }
    let after = support::counter(&server, "rejected.source_refused").await as u64;
    assert!(after >= before + 3, "{before} → {after}");
    server.stop().await.expect("stops");
}

const KEY: &str = "test-signing-key-0123456789abcdef";

#[tokio::test]
async fn signed_urls_only() {
    let origin = Origin::start().await;
    origin.put(ID, fixtures::jpeg(600, 400, 85));
    origin.script_path(
        "/elsewhere/portrait.jpg",
        Reply::Body(fixtures::jpeg(300, 600, 85).into()),
    );
    let resolver = TableResolver::new(&[("img.test", "127.0.0.1")]);
    let server = start_guarded(&origin, "img.test", &resolver, &[("url_signing_key", KEY)]).await;
    let path = format!("/{ID}/w100.jpg");
    let s = signature::sign(KEY, &path, None);

    let resp = get(&server, &format!("{path}?s={s}")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(probe(&resp.bytes().await.expect("body")).height, 67);

    forbidden(&server, &path).await;
    forbidden(&server, &format!("{path}?s=")).await;
    forbidden(
        &server,
        &format!(
            "{path}?s={}",
            signature::sign("another-key-0123456789abcdef!", &path, None)
        ),
    )
    .await;
    // A signature for one size does not open another.
    forbidden(&server, &format!("/{ID}/w101.jpg?s={s}")).await;
    forbidden(&server, &format!("{path}?s={s}&s={s}")).await;
    // Nor does it cover an added ?source=.
    let src = format!(
        "http://img.test:{}/elsewhere/portrait.jpg",
        origin.addr.port()
    );
    forbidden(&server, &format!("{}&s={s}", with_source(&path, &src))).await;
    assert_eq!(origin.path_hits("/elsewhere/portrait.jpg"), 0);
    // Signed with its source, it is served.
    let s2 = signature::sign(KEY, &path, Some(&src));
    let resp = get(&server, &format!("{}&s={s2}", with_source(&path, &src))).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(probe(&resp.bytes().await.expect("body")).height, 200);
    // Refused before any I/O: one download each for the two accepted requests, nothing else.
    assert_eq!(origin.total(), 2);
    // Path errors are still reported as such (the grammar is checked first, and costs no I/O).
    let resp = get(&server, &format!("/{ID}/random.jpg")).await;
    assert_eq!(resp.status(), 404);
    server.stop().await.expect("stops");
}

#[tokio::test]
async fn allowed_sizes_refuse_other_versions() {
    let origin = Origin::start().await;
    origin.put(ID, fixtures::jpeg(600, 400, 85));
    let server =
        support::start_with_origin(&origin, &[("allowed_sizes", "w300,300x400,x200")]).await;
    for (file, status) in [
        ("w300.jpg", 200),
        ("w300-q60.webp", 200),
        ("300x400.jpg", 200),
        // x200 is canonically 200x200: both spellings are allowed.
        ("x200.jpg", 200),
        ("200x200.png", 200),
        ("w301.jpg", 406),
        ("h300.jpg", 406),
        ("400x300.jpg", 406),
        ("full_size.jpg", 406),
        ("random.jpg", 404),
    ] {
        let resp = get(&server, &format!("/{ID}/{file}")).await;
        assert_eq!(resp.status(), status, "{file}");
        if status == 406 {
            assert_eq!(resp.text().await.expect("body"), "not acceptable\n");
        }
    }
    assert_eq!(origin.total(), 1, "refused sizes cost no download");
    server.stop().await.expect("stops");
}
