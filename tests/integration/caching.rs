//! The caching tiers against real stores: SeaweedFS (S3) and a local directory. A variant is rendered
//! once per fleet, an original downloaded once for all its sizes, and a dead store costs no more than
//! a miss.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use image_server::image::fixtures;

use crate::seaweed::Seaweed;
use crate::support::{self, get, header, probe, Origin};

/// Where the shared result store lives in a scenario.
enum Store {
    S3(Seaweed),
    Local(tempfile::TempDir),
}

impl Store {
    fn s3() -> Store {
        Store::S3(Seaweed::start("results"))
    }

    fn local() -> Store {
        Store::Local(tempfile::tempdir().expect("tmp"))
    }

    fn local_dir(&self) -> Option<PathBuf> {
        match self {
            Store::Local(d) => Some(d.path().join("results")),
            Store::S3(_) => None,
        }
    }

    fn overrides(&self, prefix: &str) -> Vec<(String, String)> {
        match self {
            Store::S3(s) => s.overrides(prefix),
            Store::Local(_) => vec![(
                "result_store".into(),
                format!(
                    "file://{}",
                    self.local_dir().expect("local").join(prefix).display()
                ),
            )],
        }
    }

    /// Takes the store away (process stopped, or directory replaced by a file).
    fn break_it(&mut self) {
        match self {
            Store::S3(s) => s.stop(),
            Store::Local(_) => {
                let dir = self.local_dir().expect("local");
                std::fs::rename(&dir, dir.with_extension("away")).expect("move away");
                std::fs::write(&dir, b"not a directory").expect("block");
            }
        }
    }

    fn repair(&mut self) {
        match self {
            Store::S3(s) => s.resume(),
            Store::Local(_) => {
                let dir = self.local_dir().expect("local");
                std::fs::remove_file(&dir).expect("unblock");
                std::fs::rename(dir.with_extension("away"), &dir).expect("move back");
            }
        }
    }
}

async fn server(
    origin: &Origin,
    store: &Store,
    extra: &[(&str, &str)],
) -> image_server::server::Running {
    let url = origin.url();
    let owned = store.overrides("cache");
    let mut o: Vec<(&str, &str)> =
        vec![("source_domain", url.as_str()), ("store_timeout", "\"2s\"")];
    o.extend(owned.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    o.extend_from_slice(extra);
    support::start(support::config(&o)).await
}

async fn shared_store_scenario(store: Store) {
    let origin = Origin::start().await;
    origin.put("product/image/1", fixtures::jpeg(800, 600, 85));
    let a = server(&origin, &store, &[]).await;
    let b = server(&origin, &store, &[]).await;

    let resp = get(&a, "/product/image/1/300x200.jpg").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-cache"), "miss");
    let etag = header(&resp, "etag");
    let body_a = resp.bytes().await.expect("body");
    assert!(
        a.app
            .pipeline
            .remote()
            .expect("remote")
            .flush(Duration::from_secs(10))
            .await
    );
    assert_eq!(a.app.pipeline.remote().expect("remote").writes(), 1);

    let hits_before = origin.total();
    let resp = get(&b, "/product/image/1/300x200.jpg").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-cache"), "remote");
    assert_eq!(
        header(&resp, "etag"),
        etag,
        "same bytes, same validator on every instance"
    );
    assert_eq!(header(&resp, "content-type"), "image/jpeg");
    assert_eq!(resp.bytes().await.expect("body"), body_a);
    assert_eq!(origin.total(), hits_before, "B did not ask the origin");
    assert_eq!(
        b.app.pipeline.stats().processing_total,
        0,
        "B did not render"
    );

    if let Store::S3(weed) = &store {
        // The object carries Content-Type and Cache-Control for anything that reads the bucket directly.
        let cfg = support::config(&[("source_domain", "http://127.0.0.1:9")]);
        let mut s3 = cfg.s3.clone();
        s3.endpoint = Some(weed.endpoint());
        s3.allow_http = true;
        s3.access_key_id = Some(crate::seaweed::ACCESS_KEY.into());
        s3.secret_access_key = Some(crate::seaweed::SECRET_KEY.into());
        let (raw, _) = image_server::source::object_store_from_url(
            &image_server::config::StoreUrl::parse(&weed.url("")).expect("store URL"),
            &s3,
            Duration::from_secs(5),
            Duration::from_secs(2),
        )
        .expect("store");
        use object_store::ObjectStoreExt;
        let got = raw
            .get(&object_store::path::Path::from(
                "cache/product/image/1/300x200.jpg",
            ))
            .await
            .expect("object at {prefix}/{model}/{type}/{id}/{canonical}");
        let attr =
            |a: object_store::Attribute| got.attributes.get(&a).map(|v| v.as_ref().to_owned());
        assert_eq!(
            attr(object_store::Attribute::ContentType).as_deref(),
            Some("image/jpeg")
        );
        assert_eq!(
            attr(object_store::Attribute::CacheControl).as_deref(),
            Some("public, max-age=31536000")
        );
    }

    // B now has it in memory.
    let resp = get(&b, "/product/image/1/300x200.jpg").await;
    assert_eq!(header(&resp, "x-cache"), "memory");
    a.stop().await.expect("stop");
    b.stop().await.expect("stop");
}

async fn stampede_scenario(store: Store) {
    let origin = Origin::start().await;
    origin.put("product/image/2", fixtures::jpeg(1600, 1200, 85));
    // A slow origin widens the window in which the 200 requests overlap.
    origin.set_delay(Duration::from_millis(300));
    let s = Arc::new(server(&origin, &store, &[("queue_size", "400")]).await);
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let r = get(&s, "/product/image/2/w300.webp").await;
            assert_eq!(r.status(), 200);
            r.bytes().await.expect("body")
        }));
    }
    let mut bodies = Vec::new();
    for t in tasks {
        bodies.push(t.await.expect("join"));
    }
    assert!(
        bodies.windows(2).all(|w| w[0] == w[1]),
        "200 identical bodies"
    );
    assert_eq!(origin.hits("product/image/2"), 1, "one origin request");
    assert_eq!(s.app.pipeline.stats().processing_total, 1, "one render");

    // Ten versions of one cold original at once: one download.
    origin.put("product/image/3", fixtures::jpeg(1600, 1200, 85));
    let mut tasks = Vec::new();
    for w in [50, 60, 70, 80, 90, 100, 110, 120, 130, 140] {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let r = get(&s, &format!("/product/image/3/w{w}.jpg")).await;
            assert_eq!(r.status(), 200);
            probe(&r.bytes().await.expect("body")).width
        }));
    }
    for (t, w) in tasks
        .into_iter()
        .zip([50, 60, 70, 80, 90, 100, 110, 120, 130, 140])
    {
        assert_eq!(t.await.expect("join"), w);
    }
    assert_eq!(origin.hits("product/image/3"), 1, "ten sizes, one download");
    drop(s);
}

async fn outage_scenario(mut store: Store) {
    let origin = Origin::start().await;
    origin.put("product/image/4", fixtures::jpeg(800, 600, 85));
    origin.put("product/image/5", fixtures::jpeg(800, 600, 85));
    let s = server(&origin, &store, &[]).await;
    let remote = s.app.pipeline.remote().expect("remote").clone();

    assert_eq!(get(&s, "/product/image/4/w100.jpg").await.status(), 200);
    assert!(remote.flush(Duration::from_secs(10)).await);
    assert_eq!(remote.writes(), 1);

    store.break_it();
    // Hot key: still answered, from memory.
    let resp = get(&s, "/product/image/4/w100.jpg").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-cache"), "memory");
    // Cold key: rendered; its store write fails and is counted.
    let resp = get(&s, "/product/image/5/w100.jpg").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-cache"), "miss");
    assert!(remote.flush(Duration::from_secs(15)).await);
    assert_eq!(remote.write_fails(), 1, "the failed write is counted");

    store.repair();
    // Writes resume without a server restart.
    let resp = get(&s, "/product/image/5/w120.jpg").await;
    assert_eq!(resp.status(), 200);
    assert!(remote.flush(Duration::from_secs(15)).await);
    assert_eq!(
        remote.writes(),
        2,
        "writes resumed after the store came back"
    );
    s.stop().await.expect("stop");
}

async fn failure_leaves_nothing_scenario(store: Store) {
    let origin = Origin::start().await;
    origin.put("product/image/6", &b"GIF89a truncated"[..]);
    let s = server(&origin, &store, &[]).await;
    let resp = get(&s, "/product/image/6/w100.jpg").await;
    assert_eq!(resp.status(), 422);
    let remote = s.app.pipeline.remote().expect("remote").clone();
    assert!(remote.flush(Duration::from_secs(10)).await);
    assert_eq!(remote.writes() + remote.write_fails(), 0, "nothing written");
    let key = image_server::request::ImageRequest::parse(
        "/product/image/6/w100.jpg",
        &image_server::request::Rules::default(),
    )
    .expect("valid")
    .cache_key(image_server::request::Format::Jpeg);
    assert!(!remote.exists(&key).await.expect("store reachable"));
    s.app.pipeline.memory().sync().await;
    assert_eq!(
        s.app.pipeline.memory().entry_count(),
        0,
        "nothing in memory"
    );
    assert_eq!(
        s.app.pipeline.originals_usage().0,
        0,
        "the bad original is not kept"
    );
    // And a fixed original is picked up on the next request.
    origin.put("product/image/6", fixtures::jpeg(400, 300, 80));
    assert_eq!(get(&s, "/product/image/6/w100.jpg").await.status(), 200);
    s.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_shared_store_serves_other_instances() {
    shared_store_scenario(Store::s3()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_shared_store_serves_other_instances() {
    shared_store_scenario(Store::local()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_stampede_is_one_fetch_one_render() {
    stampede_scenario(Store::s3()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_stampede_is_one_fetch_one_render() {
    stampede_scenario(Store::local()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_outage_costs_a_miss_and_writes_resume() {
    outage_scenario(Store::s3()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_outage_costs_a_miss_and_writes_resume() {
    outage_scenario(Store::local()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_failed_render_leaves_nothing() {
    failure_leaves_nothing_scenario(Store::s3()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_failed_render_leaves_nothing() {
    failure_leaves_nothing_scenario(Store::local()).await;
}
