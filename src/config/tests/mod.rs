//! Tests of the whole loader, with the helpers they share: defaults, the source rule, the layers and
//! their order, the Go server's keys, unknown keys. Every key's checks are in `values`, the shipped
//! files and the agreement between `config/default.toml` and the declarations in `files`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;
use crate::cli::GlobalOpts;
use crate::image::{DecodeLimits, Gravity};
use crate::request::{DefaultQuality, Format, Rules};

const ORIGIN: &str = "http://origin.example";

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Defaults plus a source plus `flags`.
fn with(flags: &[(&str, &str)]) -> Result<Loaded, ConfigError> {
    let mut all = vec![("source_domain", ORIGIN)];
    all.extend_from_slice(flags);
    load_layers(&FileSource::None, Vec::new(), &pairs(&all))
}

fn loaded(result: Result<Loaded, ConfigError>) -> Loaded {
    match result {
        Ok(l) => l,
        Err(e) => panic!("unexpected error: {e}"),
    }
}

fn ok(result: Result<Loaded, ConfigError>) -> Config {
    loaded(result).config
}

fn err(result: Result<Loaded, ConfigError>) -> ConfigError {
    match result {
        Ok(l) => panic!("expected an error, got {:?}", l.config),
        Err(e) => e,
    }
}

fn inline(name: &str, text: &str) -> FileSource {
    FileSource::Inline {
        name: name.to_owned(),
        text: text.to_owned(),
    }
}

fn config_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config")
}

fn file_url(path: &Path) -> String {
    url::Url::from_file_path(path)
        .expect("absolute")
        .to_string()
}

fn store(url: &Option<StoreUrl>) -> Option<&str> {
    url.as_ref().map(StoreUrl::as_str)
}

#[test]
fn defaults_load_and_validate() {
    let c = ok(with(&[]));
    let l = &c.listen;
    assert_eq!(l.listen_address, IpAddr::from([0, 0, 0, 0]));
    assert_eq!((l.server_port, l.status_port), (7000, 7001));
    assert_eq!((l.status_address, l.status_ip()), (None, l.listen_address));
    assert_eq!(
        (
            l.http2_max_concurrent_streams,
            l.max_connections,
            l.listen_backlog
        ),
        (100, 10_000, 1024)
    );
    let o = &c.originals;
    assert_eq!(
        o.source_domain.as_ref().map(|u| u.as_str()),
        Some("http://origin.example/")
    );
    assert_eq!(o.source_store, None);
    assert_eq!(&*o.source_path, "{model}/{type}/{id}/original.jpg");
    assert_eq!(o.source_not_found_statuses, [403, 404, 410]);
    assert!(o.source_redirect_hosts.is_empty());
    assert_eq!(
        c.s3,
        S3Config {
            endpoint: None,
            region: "us-east-1".into(),
            allow_http: false,
            access_key_id: None,
            secret_access_key: None,
        }
    );
    let r = &c.requests;
    assert_eq!(r.whitelisted_extensions, Format::ALL.to_vec());
    assert_eq!((r.maximum_width, r.maximum_height), (2048, 2048));
    assert!(r.allowed_sizes.is_empty());
    let g = &c.rendering;
    assert_eq!(
        (g.default_quality, g.webp_quality, g.avif_quality),
        (75, 75, 50)
    );
    assert_eq!(g.avif_effort, 2);
    assert!(g.progressive_jpeg && g.enlarge);
    assert!(!g.auto_format && !g.accept_avif_input && !c.security.allow_source_override);
    assert_eq!(g.crop_gravity, Gravity::Centre);
    assert_eq!(g.background, [255, 255, 255]);
    assert_eq!(g.max_avif_output_pixels, 2048 * 2048);
    assert_eq!(c.limits.max_source_bytes.bytes(), 25 * MB);
    assert_eq!(c.limits.max_source_pixels, 50_000_000);
    assert_eq!(c.limits.max_source_side, 16_384);
    assert_eq!(c.limits.max_jpeg_scans, 100);
    let k = &c.caching;
    assert_eq!(k.memory_cache_mb.bytes(), 256 * MB);
    assert_eq!(k.memory_cache_max_entry_kb.bytes(), 2048 * KB);
    assert_eq!(k.originals_cache_mb.bytes(), 128 * MB);
    assert_eq!(k.not_found_ttl, Duration::from_secs(60));
    assert_eq!(k.cache_control, "public, max-age=31536000");
    assert_eq!(k.result_store, None);
    assert_eq!((k.upload_concurrency, k.upload_backlog), (4, 1000));
    let p = &c.capacity;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(p.processing_concurrency, cores);
    assert_eq!(p.queue_size, 4 * cores);
    assert_eq!(p.download_concurrency, 16);
    assert_eq!(p.max_inflight_download_mb.bytes(), 256 * MB);
    assert_eq!(p.max_memory_mb.bytes(), 1024 * MB);
    assert_eq!((p.avif_concurrency, p.avif_queue_size), (1, 4));
    assert_eq!(c.prerender.prerender_popular, 3);
    assert_eq!(c.prerender.popular_halflife, Duration::from_secs(3600));
    let t = &c.timeouts;
    assert_eq!(t.request_timeout, Duration::from_secs(10));
    assert_eq!(t.fetch_timeout, Duration::from_secs(5));
    assert_eq!(t.connect_timeout, Duration::from_secs(2));
    assert_eq!(t.header_read_timeout, Duration::from_secs(10));
    assert_eq!(t.keep_alive_timeout, Duration::from_secs(75));
    assert_eq!(t.send_timeout, Duration::from_secs(30));
    assert_eq!(t.render_timeout, Duration::from_secs(8));
    assert_eq!(t.store_timeout, Duration::from_secs(2));
    assert_eq!(t.shutdown_grace, Duration::from_secs(20));
    assert_eq!(c.statsd.statsd_host, None);
    assert_eq!(
        (c.statsd.statsd_port, c.statsd.statsd_prefix.as_str()),
        (8125, "image_server")
    );
    assert!(c.security.allowed_source_hosts.is_empty());
    assert_eq!(
        (&c.security.url_signing_key, &c.security.admin_token),
        (&None, &None)
    );
    assert_eq!(c.logging.log_level, "info");

    // The views agree with the defaults the other modules assume.
    assert_eq!(c.default_quality(), DefaultQuality::default());
    assert_eq!(c.decode_limits(), DecodeLimits::default());
    let rules = c.rules();
    let std_rules = Rules::default();
    assert_eq!(
        (
            rules.maximum_width,
            rules.maximum_height,
            rules.whitelist,
            rules.allowed_sizes
        ),
        (
            std_rules.maximum_width,
            std_rules.maximum_height,
            std_rules.whitelist,
            std_rules.allowed_sizes
        )
    );
}

#[test]
fn a_source_is_required_and_only_one() {
    let e = err(load_layers(&FileSource::None, Vec::new(), &[]));
    assert!(e.to_string().contains("source_domain"), "{e}");
    assert!(e.to_string().contains("neither"), "{e}");

    // Flags in one layer naming both is a contradiction.
    let e = err(load_layers(
        &FileSource::None,
        Vec::new(),
        &pairs(&[("source_domain", ORIGIN), ("source_store", "memory://")]),
    ));
    assert!(e.to_string().contains("both are set"), "{e}");
    assert!(e.to_string().contains("--set source_store"), "{e}");

    // A higher layer naming one source replaces the other from below.
    let file = inline("f.toml", "source_domain = \"http://a.example\"");
    let l = loaded(load_layers(
        &file,
        Vec::new(),
        &pairs(&[("source_store", "s3://bucket/originals")]),
    ));
    let o = &l.config.originals;
    assert_eq!(
        (&o.source_domain, store(&o.source_store)),
        (&None, Some("s3://bucket/originals"))
    );
    assert_eq!(l.origins["source_domain"], "cleared by --set source_store");
    let c = ok(load_layers(
        &inline("f.toml", "source_store = \"memory://\""),
        pairs(&[("IMAGE_SERVER_SOURCE_DOMAIN", "https://b.example/base")]),
        &[],
    ));
    assert_eq!(
        c.originals.source_domain.as_ref().map(|d| d.as_str()),
        Some("https://b.example/base/")
    );
    assert_eq!(c.originals.source_store, None);
    // An empty value does not clear the other key.
    let c = ok(load_layers(
        &inline("f.toml", "source_store = \"memory://\""),
        pairs(&[("IMAGE_SERVER_SOURCE_DOMAIN", "")]),
        &[],
    ));
    assert_eq!(store(&c.originals.source_store), Some("memory://"));
}

#[test]
fn file_then_env_then_flags() {
    let file = inline(
        "f.toml",
        "source_domain = \"http://a.example\"\nserver_port = 7100\n",
    );
    let env = || pairs(&[("IMAGE_SERVER_SERVER_PORT", "7200"), ("PATH", "/bin")]);
    let flags = pairs(&[("server_port", "7300")]);
    let port = |r| ok(r).listen.server_port;
    assert_eq!(port(load_layers(&file, env(), &flags)), 7300);
    assert_eq!(port(load_layers(&file, env(), &[])), 7200);
    assert_eq!(port(load_layers(&file, Vec::new(), &[])), 7100);
    // Later flags win (named flags come after --set in GlobalOpts::overrides).
    let flags = pairs(&[("server_port", "7300"), ("SERVER_PORT", "7400")]);
    assert_eq!(port(load_layers(&file, env(), &flags)), 7400);

    // Each key says where its value came from.
    let l = loaded(load_layers(
        &file,
        env(),
        &pairs(&[("maximum_width", "99")]),
    ));
    assert_eq!(l.origins["server_port"], "IMAGE_SERVER_SERVER_PORT");
    assert_eq!(l.origins["source_domain"], "f.toml");
    assert_eq!(l.origins["maximum_width"], "--set maximum_width");
    assert_eq!(l.origins["log_level"], "default");
    assert_eq!(l.origins.len(), keys().len());
}

#[test]
fn load_reads_global_opts() {
    let opts = GlobalOpts {
        config_dir: config_dir(),
        server_port: Some(7777),
        set: pairs(&[("maximum_width", "1234")]),
        ..GlobalOpts::default()
    };
    let l = loaded(load(&opts));
    let c = &l.config;
    assert_eq!(
        (
            c.listen.server_port,
            c.listen.status_port,
            c.requests.maximum_width
        ),
        (7777, 7001, 1234)
    );
    assert_eq!(l.origins["server_port"], "--server-port");
    assert_eq!(l.origins["maximum_width"], "--set maximum_width");

    let opts = GlobalOpts {
        config: Some(config_dir().join("missing.toml")),
        ..GlobalOpts::default()
    };
    let e = err(load(&opts));
    assert!(matches!(e, ConfigError::Read { .. }), "{e}");
    assert!(e.to_string().contains("missing.toml"), "{e}");
}

#[test]
fn seed_json_keys_and_aliases() {
    let json = r#"{
        "server_port": "7010",
        "status_port": "7011",
        "source_domain": "http://cdn.example.com",
        "whitelisted_extensions": ["jpg", "png", "webp"],
        "maximum_width": 1000,
        "manta_base_path": "public/images/production",
        "default_compression": 80,
        "manta_concurrency": 10,
        "graphite_enabled": true,
        "graphite_host": "stats.example",
        "graphite_port": 8126,
        "s3_endpoint": null
    }"#;
    let l = loaded(load_layers(&inline("seed.json", json), Vec::new(), &[]));
    let c = &l.config;
    assert_eq!((c.listen.server_port, c.listen.status_port), (7010, 7011));
    assert_eq!(
        c.requests.whitelisted_extensions,
        vec![Format::Jpeg, Format::Png, Format::Webp]
    );
    assert_eq!(c.requests.maximum_width, 1000);
    assert_eq!(c.rendering.default_quality, 80);
    assert_eq!(c.caching.upload_concurrency, 10);
    assert_eq!(c.statsd.statsd_host.as_deref(), Some("stats.example"));
    assert_eq!(c.statsd.statsd_port, 8126);
    assert_eq!(l.origins["statsd_host"], "seed.json as graphite_host");
    // manta_base_path: one warning, naming what replaces it.
    assert_eq!(l.warnings.len(), 1, "{:?}", l.warnings);
    assert!(
        l.warnings[0].contains("manta_base_path"),
        "{:?}",
        l.warnings
    );
    assert!(l.warnings[0].contains("result_store"), "{:?}", l.warnings);

    // graphite_enabled = false turns statsd off even with a host in the same file...
    let off = json.replace("\"graphite_enabled\": true", "\"graphite_enabled\": false");
    let c = ok(load_layers(&inline("seed.json", &off), Vec::new(), &[]));
    assert_eq!(c.statsd.statsd_host, None);
    // ...but a higher layer can turn it back on, by either name.
    let c = ok(load_layers(
        &inline("seed.json", &off),
        pairs(&[("IMAGE_SERVER_GRAPHITE_HOST", "env.example")]),
        &[],
    ));
    assert_eq!(c.statsd.statsd_host.as_deref(), Some("env.example"));

    // An alias and its key in one file, or in the environment, is ambiguous.
    let both =
        "upload_concurrency = 2\nmanta_concurrency = 3\nsource_domain = \"http://a.example\"";
    let e = err(load_layers(&inline("f.toml", both), Vec::new(), &[]));
    assert_eq!(e.key(), Some("upload_concurrency"), "{e}");
    let e = err(load_layers(
        &FileSource::None,
        pairs(&[
            ("IMAGE_SERVER_SOURCE_DOMAIN", ORIGIN),
            ("IMAGE_SERVER_GRAPHITE_HOST", "a"),
            ("IMAGE_SERVER_STATSD_HOST", "b"),
        ]),
        &[],
    ));
    assert_eq!(e.key(), Some("statsd_host"), "{e}");

    // Seed-only keys are skipped in files, not on the command line.
    let e = err(with(&[("manta_base_path", "x")]));
    assert_eq!(e.key(), Some("manta_base_path"), "{e}");
}

#[test]
fn seed_local_base_path_becomes_the_result_store() {
    let cwd = std::env::current_dir().expect("cwd");
    let json = r#"{"source_domain": "http://cdn.example.com", "local_base_path": "public"}"#;
    let l = loaded(load_layers(&inline("seed.json", json), Vec::new(), &[]));
    assert_eq!(
        store(&l.config.caching.result_store),
        Some(file_url(&cwd.join("public")).as_str())
    );
    assert_eq!(l.origins["result_store"], "seed.json as local_base_path");
    assert_eq!(l.notes.len(), 1, "{:?}", l.notes);
    assert!(l.warnings.is_empty(), "{:?}", l.warnings);

    // Any layer naming result_store wins, and local_base_path is reported as ignored.
    let l = loaded(load_layers(
        &inline("seed.json", json),
        pairs(&[("IMAGE_SERVER_RESULT_STORE", "none")]),
        &[],
    ));
    assert_eq!(l.config.caching.result_store, None);
    assert_eq!(l.warnings.len(), 1, "{:?}", l.warnings);
    assert!(
        l.warnings[0].contains("IMAGE_SERVER_RESULT_STORE"),
        "{:?}",
        l.warnings
    );
    let in_file = r#"{"source_domain": "http://a.example", "local_base_path": "/srv/x", "result_store": "memory://"}"#;
    let l = loaded(load_layers(&inline("seed.json", in_file), Vec::new(), &[]));
    assert_eq!(store(&l.config.caching.result_store), Some("memory://"));
    assert!(
        l.warnings[0].contains("local_base_path"),
        "{:?}",
        l.warnings
    );
}

#[test]
fn unknown_keys_are_errors_naming_them() {
    let e = err(load_layers(
        &inline(
            "config/typo.toml",
            "source_domain = \"http://a.example\"\nmaximum_widht = 10",
        ),
        Vec::new(),
        &[],
    ));
    assert!(matches!(e, ConfigError::UnknownKey { .. }));
    assert_eq!(e.key(), Some("maximum_widht"));
    assert!(e.to_string().contains("config/typo.toml"), "{e}");
    assert!(
        e.to_string().ends_with("did you mean `maximum_width`?"),
        "{e}"
    );

    let e = err(load_layers(
        &FileSource::None,
        pairs(&[
            ("IMAGE_SERVER_SERVERPORT", "1"),
            ("IMAGE_SERVER_SOURCE_DOMAIN", ORIGIN),
        ]),
        &[],
    ));
    assert_eq!(e.key(), Some("serverport"));
    assert!(e.to_string().contains("IMAGE_SERVER_SERVERPORT"), "{e}");
    assert!(e.to_string().contains("`server_port`"), "{e}");

    let e = err(with(&[("nope", "1")]));
    assert_eq!(e.key(), Some("nope"));
    assert_eq!(e.to_string(), "unknown key `nope` in --set nope");

    // Not ours: the CLI's variables and Kubernetes service links.
    ok(load_layers(
        &FileSource::None,
        pairs(&[
            ("IMAGE_SERVER_SOURCE_DOMAIN", ORIGIN),
            ("IMAGE_SERVER_ENVIRONMENT", "production"),
            ("IMAGE_SERVER_CONFIG_DIR", "/etc"),
            ("IMAGE_SERVER_PORT", "tcp://10.0.0.1:7000"),
            ("IMAGE_SERVER_PORT_7000_TCP_ADDR", "10.0.0.1"),
            ("IMAGE_SERVER_SERVICE_HOST", "10.0.0.1"),
            ("IMAGE_SERVER_SERVICE_PORT", "7000"),
        ]),
        &[],
    ));
}

/// The suggestion threshold (Jaro-Winkler ≥ 0.8): typos, dropped underscores and old names find
/// their key; unrelated words find none.
#[test]
fn unknown_keys_suggest_the_close_one() {
    let suggestion = |key: &str| match err(with(&[(key, "1")])) {
        ConfigError::UnknownKey { suggestion, .. } => suggestion,
        other => panic!("{other}"),
    };
    for (typo, meant) in [
        ("maximum_widht", "maximum_width"),
        ("serverport", "server_port"),
        ("max_width", "maximum_width"),
        ("statsd_hots", "statsd_host"),
        ("sourcedomain", "source_domain"),
        ("cache_contrl", "cache_control"),
        ("graphite_hots", "graphite_host"),
        ("source_not_found_status", "source_not_found_statuses"),
    ] {
        assert_eq!(suggestion(typo).as_deref(), Some(meant), "{typo}");
    }
    for unrelated in ["nope", "foo", "colour", "x"] {
        assert_eq!(suggestion(unrelated), None, "{unrelated}");
    }
}

mod files;
mod values;

#[test]
fn named_versions_and_upload_keys() {
    let c = ok(load_layers(
        &inline(
            "named.toml",
            "source_store = \"memory://\"\nmax_source_bytes = \"2MB\"\n\
             named_versions = { thumb = \"x150.jpg\", zoom = \"w1200-q85.jpg\" }\n\
             upload_outputs = [\"thumb\", \"w300.webp\"]\n\
             upload_cors_origins = [\"HTTPS://App.Example.com/\"]\n",
        ),
        Vec::new(),
        &[],
    ));
    assert_eq!(
        c.requests.named_versions.get("thumb").map(String::as_str),
        Some("x150.jpg")
    );
    assert_eq!(c.requests.named_versions.len(), 2);
    assert_eq!(c.uploads.upload_outputs, ["thumb", "w300.webp"]);
    assert_eq!(c.uploads.upload_cors_origins, ["https://app.example.com"]);
    assert_eq!(
        c.uploads.max_upload_bytes.bytes(),
        2 * 1024 * 1024,
        "0 means max_source_bytes"
    );
    assert!(!c.uploads.enabled(), "no token and no signing key: off");
    // The text form (environment, --set) reads the same.
    let c = ok(with(&[(
        "named_versions",
        "thumb=x150.jpg, card=300x400.jpg",
    )]));
    assert_eq!(
        c.requests.named_versions.get("card").map(String::as_str),
        Some("300x400.jpg")
    );
    let rules = c.rules();
    let named = crate::request::ImageRequest::parse("/p/i/1/thumb", &rules).expect("named");
    let plain = crate::request::ImageRequest::parse("/p/i/1/x150.jpg", &rules).expect("plain");
    assert_eq!(named.cache_key(named.format), plain.cache_key(plain.format));
    assert!(crate::request::ImageRequest::parse("/p/i/1/nameless", &rules).is_err());
}

#[test]
fn uploads_without_a_source_store_are_warned_about() {
    let l = loaded(with(&[("upload_token", "a-token-long-enough-to-pass")]));
    assert!(l.config.uploads.enabled());
    assert!(
        l.warnings.iter().any(|w| w.contains("uploads answer 405")),
        "{:?}",
        l.warnings
    );
    let l = loaded(load_layers(
        &inline(
            "store.toml",
            "source_store = \"memory://\"\nupload_token = \"a-token-long-enough-to-pass\"\n",
        ),
        Vec::new(),
        &[],
    ));
    assert!(l.warnings.is_empty(), "{:?}", l.warnings);
}
