//! Tests of the whole loader: layers, seed files, every key's checks and the rules between keys, the
//! shipped files, and the agreement between `config/default.toml` and the key declarations.

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
        (l.http2_max_concurrent_streams, l.max_connections),
        (100, 10_000)
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

#[test]
fn every_bad_value_names_its_key() {
    let cases: &[(&str, &str, &str)] = &[
        ("listen_address", "localhost", "IP address"),
        ("server_port", "70000", "between 0 and 65535, got 70000"),
        ("server_port", "http", "expected an integer"),
        ("status_port", "7000", "must differ from server_port"),
        ("max_connections", "0", "between 1"),
        ("source_domain", "ftp://x.example", "http"),
        ("source_domain", "not a url", "http"),
        ("source_domain", "http://x.example/?a=1", "query"),
        ("source_store", "ftp://bucket", "scheme"),
        ("source_store", "s3://", "bucket"),
        ("source_store", "s3://user:pw@bucket/x", "credentials"),
        ("source_store", "s3://bucket/a//b", "key prefix"),
        ("source_path", "{model}/{type}/original.jpg", "{id}"),
        ("source_path", "{id}/{size}.jpg", "placeholders"),
        ("source_path", "", "empty"),
        (
            "source_not_found_statuses",
            "404,200",
            "between 400 and 599",
        ),
        ("source_not_found_statuses", "[404, \"x\"]", "integer"),
        (
            "source_redirect_hosts",
            "https://cdn.example/",
            "host names",
        ),
        ("result_store", "http://store.example", "scheme"),
        ("result_store", "file:///tmp?x=1", "query"),
        ("s3_endpoint", "http://127.0.0.1:8333", "s3_allow_http"),
        ("s3_endpoint", "localhost:8333", "http"),
        ("s3_region", " ", "empty"),
        ("s3_access_key_id", "AKIAEXAMPLE", "s3_secret_access_key"),
        ("s3_allow_http", "yes", "true or false"),
        ("whitelisted_extensions", "jpg,bmp", "\"bmp\""),
        ("whitelisted_extensions", "", "at least one"),
        ("whitelisted_extensions", "[1, 2]", "list of strings"),
        ("maximum_width", "0", "must be between 1 and 99999, got 0"),
        ("maximum_height", "100000", "between 1 and 99999"),
        ("allowed_sizes", "w200,banana", "\"banana\""),
        ("allowed_sizes", "w3000", "maximum_width"),
        ("default_quality", "0", "between 1 and 100, got 0"),
        ("webp_quality", "101", "between 1 and 100"),
        ("avif_quality", "1.5", "integer"),
        ("avif_effort", "10", "between 0 and 9"),
        ("avif_concurrency", "0", "between 1"),
        ("progressive_jpeg", "1", "true or false"),
        ("crop_gravity", "north", "centre"),
        ("enlarge", "maybe", "true or false"),
        ("background", "#12345", "#rrggbb"),
        ("background", "300,0,0", "r,g,b"),
        ("background", "[1, 2, 300]", "r,g,b"),
        ("auto_format", "x", "true or false"),
        ("accept_avif_input", "x", "true or false"),
        ("max_source_bytes", "0", "at least 1"),
        ("max_source_bytes", "lots", "size"),
        ("max_source_pixels", "0", "between 1"),
        ("max_source_side", "20000000", "between 1 and 10000000"),
        ("memory_cache_mb", "-1", "size"),
        ("memory_cache_max_entry_kb", "0", "at least 1"),
        ("originals_cache_mb", "12 parsecs", "size"),
        ("not_found_ttl", "soon", "duration"),
        ("not_found_ttl", "400d", "at most"),
        ("cache_control", "", "Cache-Control"),
        ("cache_control", "public\u{1}", "Cache-Control"),
        ("processing_concurrency", "-1", "between 0"),
        ("queue_size", "x", "integer"),
        ("download_concurrency", "0", "between 1"),
        ("max_inflight_download_mb", "10", "max_source_bytes"),
        ("upload_concurrency", "0", "between 1"),
        ("upload_backlog", "0", "between 1"),
        ("request_timeout", "0", "greater than zero"),
        ("request_timeout", "10 parsecs", "duration"),
        ("fetch_timeout", "2 fortnights", "duration"),
        ("connect_timeout", "0ms", "greater than zero"),
        ("header_read_timeout", "-5", "duration"),
        ("store_timeout", "25h", "at most"),
        ("shutdown_grace", "forever", "duration"),
        ("keep_alive_timeout", "0", "greater than zero"),
        ("send_timeout", "soon", "duration"),
        ("render_timeout", "0s", "greater than zero"),
        ("status_address", "localhost", "IP address"),
        ("http2_max_concurrent_streams", "0", "between 1"),
        ("max_jpeg_scans", "0", "between 1"),
        ("max_avif_output_pixels", "0", "between 1"),
        ("max_memory_mb", "1", "at least"),
        ("avif_queue_size", "-1", "between 0"),
        ("prerender_popular", "33", "between 0 and 32"),
        ("popular_halflife", "0", "greater than zero"),
        ("popular_halflife", "2y", "at most"),
        ("statsd_host", "udp://stats", "host name"),
        ("statsd_host", "stats:8125", "host name"),
        ("statsd_port", "0", "between 1 and 65535"),
        ("statsd_prefix", "image server", "letters"),
        ("statsd_prefix", ".image", "inner dots"),
        ("allow_source_override", "on", "true or false"),
        ("allowed_source_hosts", "https://x.example/", "host names"),
        ("url_signing_key", "short", "at least 16"),
        ("admin_token", "short", "at least 16"),
        ("log_level", "", "empty"),
        ("log_level", "info,[{", "log filter"),
    ];
    for (key, value, expect) in cases {
        let e = err(with(&[("listen_address", "127.0.0.1"), (key, value)]));
        let text = e.to_string();
        assert!(
            e.key().is_some_and(|k| k.contains(key)),
            "{key}={value:?}: error names {:?}: {text}",
            e.key()
        );
        assert!(
            text.starts_with(&format!("{key}: ")) || text.contains(key),
            "{text}"
        );
        assert!(
            text.contains(expect),
            "{key}={value:?}: {text:?} lacks {expect:?}"
        );
    }

    // Rules between keys.
    let e = err(with(&[("allow_source_override", "true")]));
    assert_eq!(e.key(), Some("allowed_source_hosts"), "{e}");
    let e = err(with(&[("s3_secret_access_key", "0123456789abcdef")]));
    assert_eq!(e.key(), Some("s3_secret_access_key"), "{e}");
    assert!(!e.to_string().contains("0123456789abcdef"), "{e}");
}

#[test]
fn errors_say_where_the_value_came_from_and_hide_secrets() {
    let e = err(load_layers(
        &inline(
            "prod.toml",
            "maximum_width = 0\nsource_domain = \"http://a.example\"",
        ),
        Vec::new(),
        &[],
    ));
    assert_eq!(
        e.to_string(),
        "maximum_width: must be between 1 and 99999, got 0 (set in prod.toml)"
    );
    let e = err(load_layers(
        &FileSource::None,
        pairs(&[
            ("IMAGE_SERVER_SOURCE_DOMAIN", ORIGIN),
            ("IMAGE_SERVER_ADMIN_TOKEN", "hunter2"),
        ]),
        &[],
    ));
    assert_eq!(e.key(), Some("admin_token"));
    assert!(e.to_string().contains("IMAGE_SERVER_ADMIN_TOKEN"), "{e}");
    assert!(!e.to_string().contains("hunter2"), "{e}");
    let e = err(load_layers(
        &inline(
            "f.toml",
            "source_domain = \"http://a.example\"\nurl_signing_key = 98765432109876543",
        ),
        Vec::new(),
        &[],
    ));
    assert_eq!(e.key(), Some("url_signing_key"));
    assert!(!e.to_string().contains("98765"), "{e}");
    // An old name is named as written.
    let e = err(load_layers(
        &inline(
            "seed.json",
            r#"{"source_domain": "http://a.example", "graphite_port": "x"}"#,
        ),
        Vec::new(),
        &[],
    ));
    assert_eq!(
        e.to_string(),
        "statsd_port: expected an integer, got \"x\" (set in seed.json as graphite_port)"
    );
    // A rule between keys names where the value at fault came from.
    let e = err(with(&[("allowed_sizes", "w4000")]));
    assert!(
        e.to_string().ends_with("(set in --set allowed_sizes)"),
        "{e}"
    );
}

#[test]
fn env_values_follow_the_key_type() {
    let env = pairs(&[
        ("IMAGE_SERVER_SOURCE_DOMAIN", ORIGIN),
        ("IMAGE_SERVER_WHITELISTED_EXTENSIONS", "jpg, webp"),
        (
            "IMAGE_SERVER_ALLOWED_SIZES",
            r#"["x300", "w200", "300x300"]"#,
        ),
        ("IMAGE_SERVER_AUTO_FORMAT", "true"),
        ("IMAGE_SERVER_MAXIMUM_WIDTH", "1000"),
        // Text keys stay text: a numeric-looking secret is not turned into a number.
        ("IMAGE_SERVER_URL_SIGNING_KEY", "1234567890123456e7"),
        ("IMAGE_SERVER_ADMIN_TOKEN", "0123456789012345"),
        ("IMAGE_SERVER_STATSD_PREFIX", "123"),
        ("IMAGE_SERVER_CACHE_CONTROL", "public, max-age=60"),
        ("IMAGE_SERVER_FETCH_TIMEOUT", "1500ms"),
        ("IMAGE_SERVER_STORE_TIMEOUT", "\"3s\""),
        ("IMAGE_SERVER_LOG_LEVEL", "'warn'"),
        ("IMAGE_SERVER_SOURCE_PATH", "\"{id}.jpg"),
        ("IMAGE_SERVER_REQUEST_TIMEOUT", "30"),
        ("IMAGE_SERVER_MEMORY_CACHE_MB", "1GB"),
        ("IMAGE_SERVER_BACKGROUND", "#FF8000"),
        ("IMAGE_SERVER_CROP_GRAVITY", "Attention"),
        ("IMAGE_SERVER_ALLOW_SOURCE_OVERRIDE", "true"),
        (
            "IMAGE_SERVER_ALLOWED_SOURCE_HOSTS",
            "Images.Example.com,.cdn.example",
        ),
        ("IMAGE_SERVER_SOURCE_NOT_FOUND_STATUSES", "404, 410"),
        (
            "IMAGE_SERVER_SOURCE_REDIRECT_HOSTS",
            "Img.Example.com,cdn.example",
        ),
    ]);
    let c = ok(load_layers(&FileSource::None, env, &[]));
    assert_eq!(
        c.requests.whitelisted_extensions,
        vec![Format::Jpeg, Format::Webp]
    );
    assert_eq!(c.requests.allowed_sizes, ["300x300", "w200"]);
    assert!(c.rendering.auto_format);
    assert_eq!(c.requests.maximum_width, 1000);
    let secret = |s: &Option<Secret>| s.as_ref().map(|s| s.expose().to_owned());
    assert_eq!(
        secret(&c.security.url_signing_key).as_deref(),
        Some("1234567890123456e7")
    );
    assert_eq!(
        secret(&c.security.admin_token).as_deref(),
        Some("0123456789012345")
    );
    assert_eq!(c.statsd.statsd_prefix, "123");
    assert_eq!(c.caching.cache_control, "public, max-age=60");
    assert_eq!(c.timeouts.fetch_timeout, Duration::from_millis(1500));
    assert_eq!(c.timeouts.store_timeout, Duration::from_secs(3));
    assert_eq!(c.logging.log_level, "warn");
    assert_eq!(&*c.originals.source_path, "\"{id}.jpg");
    assert_eq!(c.timeouts.request_timeout, Duration::from_secs(30));
    assert_eq!(c.caching.memory_cache_mb.bytes(), 1024 * MB);
    assert_eq!(c.rendering.background, [255, 128, 0]);
    assert_eq!(c.rendering.crop_gravity, Gravity::Attention);
    assert_eq!(
        c.security.allowed_source_hosts,
        ["images.example.com", "cdn.example"]
    );
    assert_eq!(c.originals.source_not_found_statuses, [404, 410]);
    assert_eq!(
        c.originals.source_redirect_hosts,
        ["img.example.com", "cdn.example"]
    );
    assert_eq!(
        c.rules().allowed_sizes,
        Some(c.requests.allowed_sizes.clone())
    );
}

#[test]
fn file_values_in_the_keys_unit() {
    // Integers in files: seconds and the key's unit.
    let file = inline(
        "f.toml",
        "source_domain = \"http://a.example\"\nnot_found_ttl = 0\nshutdown_grace = 3\nmax_source_bytes = 1048576\nmemory_cache_mb = 0\nbackground = [1, 2, 3]\nsource_not_found_statuses = [404]",
    );
    let c = ok(load_layers(&file, Vec::new(), &[]));
    assert_eq!(c.caching.not_found_ttl, Duration::ZERO);
    assert_eq!(c.timeouts.shutdown_grace, Duration::from_secs(3));
    assert_eq!(c.limits.max_source_bytes.bytes(), MB);
    assert_eq!(c.caching.memory_cache_mb.bytes(), 0);
    assert_eq!(c.rendering.background, [1, 2, 3]);
    assert_eq!(c.originals.source_not_found_statuses, [404]);
    // Text with units, binary: 1 KB = 1024 bytes.
    let c = ok(with(&[
        ("max_source_bytes", "10MB"),
        ("memory_cache_max_entry_kb", "1MB"),
        ("render_timeout", "1m 30s"),
        ("request_timeout", "2m"),
    ]));
    assert_eq!(c.limits.max_source_bytes.bytes(), 10 * MB);
    assert_eq!(c.caching.memory_cache_max_entry_kb.bytes(), 1024 * KB);
    assert_eq!(c.timeouts.render_timeout, Duration::from_secs(90));
}

#[test]
fn concurrency_zero_means_cores_and_queue_follows() {
    let c = ok(with(&[("processing_concurrency", "3")]));
    assert_eq!(
        (c.capacity.processing_concurrency, c.capacity.queue_size),
        (3, 12)
    );
    let c = ok(with(&[
        ("processing_concurrency", "3"),
        ("queue_size", "5"),
    ]));
    assert_eq!(
        (c.capacity.processing_concurrency, c.capacity.queue_size),
        (3, 5)
    );
    let c = ok(with(&[("avif_concurrency", "2")]));
    assert_eq!(c.capacity.avif_queue_size, 8);
    // A render may not outlive its request.
    let c = ok(with(&[("render_timeout", "20s")]));
    assert_eq!(c.timeouts.render_timeout, c.timeouts.request_timeout);
}

#[test]
fn store_urls_are_checked_and_relative_files_resolved() {
    let cwd = std::env::current_dir().expect("cwd");
    let result = |value: &str| ok(with(&[("result_store", value)])).caching.result_store;
    assert_eq!(
        store(&result("file://./tmp/results")),
        Some(file_url(&cwd.join("tmp/results")).as_str())
    );
    assert_eq!(
        store(&result("file://tmp/../out")),
        Some(file_url(&cwd.join("out")).as_str())
    );
    assert_eq!(
        store(&result("file:///var/cache/images")),
        Some("file:///var/cache/images")
    );
    for none in ["none", "NONE", ""] {
        assert_eq!(result(none), None);
    }
    for good in [
        "s3://bucket/prefix",
        "gs://bucket",
        "az://container/p",
        "memory://",
    ] {
        assert_eq!(store(&result(good)), Some(good));
    }
    let c = ok(load_layers(
        &FileSource::None,
        Vec::new(),
        &pairs(&[("source_store", "file://./samples")]),
    ));
    assert_eq!(
        store(&c.originals.source_store),
        Some(file_url(&cwd.join("samples")).as_str())
    );
    // "none" is only a result-store word.
    let e = err(load_layers(
        &FileSource::None,
        Vec::new(),
        &pairs(&[("source_store", "none")]),
    ));
    assert_eq!(e.key(), Some("source_store"));
}

#[test]
fn s3_settings() {
    let c = ok(with(&[
        ("result_store", "s3://results/prod"),
        ("s3_endpoint", "http://127.0.0.1:8333"),
        ("s3_allow_http", "true"),
        ("s3_region", "eu-west-1"),
        ("s3_access_key_id", "AKIAEXAMPLE"),
        ("s3_secret_access_key", "secret/with+chars"),
    ]));
    assert_eq!(c.s3.endpoint.as_deref(), Some("http://127.0.0.1:8333"));
    assert!(c.s3.allow_http);
    assert_eq!(c.s3.region, "eu-west-1");
    assert_eq!(
        c.s3.access_key_id.as_ref().map(Secret::expose),
        Some("AKIAEXAMPLE")
    );
    assert_eq!(
        c.s3.secret_access_key.as_ref().map(Secret::expose),
        Some("secret/with+chars")
    );
    let described = c.describe().to_string();
    assert!(!described.contains("secret/with+chars"), "{described}");
    assert!(!described.contains("AKIAEXAMPLE"), "{described}");
    assert!(!format!("{c:?}").contains("secret/with+chars"));
}

#[test]
fn describe_shows_limits_not_secrets() {
    let c = ok(with(&[
        ("source_domain", "https://user:pa55word@origin.example/base"),
        ("url_signing_key", "signing-key-0123456789"),
        ("admin_token", "admin-token-0123456789"),
        ("statsd_host", "127.0.0.1"),
    ]));
    let d = c.describe();
    let text = d.to_string();
    for secret in ["pa55word", "user", "signing-key", "admin-token"] {
        assert!(!text.contains(secret), "{secret} leaked: {text}");
    }
    assert_eq!(d["source_domain"], "https://origin.example/base/");
    assert_eq!(d["maximum_width"], 2048);
    assert_eq!(d["max_source_bytes"], 25 * MB);
    assert_eq!(d["memory_cache_mb"], 256);
    assert_eq!(d["request_timeout"], "10s");
    assert_eq!(d["statsd_host"], "127.0.0.1");
    assert_eq!(d["url_signing_key"], "<redacted>");
    assert_eq!(d["background"], "#ffffff");
    assert_eq!(d["whitelisted_extensions"][0], "jpg");
    // One entry per key, under the key's own name.
    let mut described: Vec<&String> = d.as_object().expect("object").keys().collect();
    let mut declared: Vec<&str> = keys();
    described.sort();
    declared.sort_unstable();
    assert_eq!(described, declared);
}

/// What `check-config --print` shows is what a file could say: each value read back as a layer
/// gives the same configuration.
#[test]
fn printed_settings_read_back() {
    let l = loaded(with(&[
        ("result_store", "memory://r"),
        ("memory_cache_max_entry_kb", "1MB"),
        ("keep_alive_timeout", "75"),
        ("allowed_sizes", "w200"),
        ("crop_gravity", "center"),
    ]));
    let settings = l.settings();
    assert_eq!(settings.len(), keys().len());
    let (key, value, origin) = &settings[0];
    assert_eq!(
        (*key, value, origin.as_str()),
        ("listen_address", &serde_json::json!("0.0.0.0"), "default")
    );
    let printed: serde_json::Value =
        serde_json::from_str(&l.settings_json()).expect("settings_json is JSON");
    assert_eq!(printed["result_store"]["origin"], "--set result_store");
    let mut file = serde_json::Map::new();
    for (key, value, _) in settings {
        // `status_address` prints as null when it follows listen_address; secrets cannot be read back.
        if !value.is_null() && value != "<redacted>" {
            file.insert(key.to_owned(), value);
        }
    }
    let text = serde_json::Value::Object(file).to_string();
    let again = ok(load_layers(&inline("printed.json", &text), Vec::new(), &[]));
    assert_eq!(again.describe(), l.config.describe());
}

#[test]
fn shipped_config_files_load() {
    let dir = config_dir();
    let env = |name: &str| FileSource::Environment {
        dir: dir.clone(),
        name: name.to_owned(),
    };
    let cwd = std::env::current_dir().expect("cwd");

    // default.toml itself, as a file, with a source.
    let c = ok(load_layers(
        &FileSource::File(dir.join("default.toml")),
        Vec::new(),
        &pairs(&[("source_domain", ORIGIN)]),
    ));
    assert_eq!(c.listen.server_port, 7000);

    let c = ok(load_layers(&env("development"), Vec::new(), &[]));
    assert_eq!((c.listen.server_port, c.listen.status_port), (7000, 7001));
    assert_eq!(
        store(&c.originals.source_store),
        Some(file_url(&cwd.join("samples")).as_str())
    );
    assert_eq!(
        store(&c.caching.result_store),
        Some(file_url(&cwd.join("tmp/results")).as_str())
    );
    assert_eq!(c.statsd.statsd_host, None);

    let test_flags = pairs(&[("source_domain", "http://127.0.0.1:1")]);
    let c = ok(load_layers(&env("test"), Vec::new(), &test_flags));
    assert_eq!((c.listen.server_port, c.listen.status_port), (0, 0));
    assert_eq!(c.statsd.statsd_host, None);
    assert_eq!(c.caching.result_store, None);

    let l = loaded(load_layers(&env("production"), Vec::new(), &[]));
    let c = &l.config;
    assert_eq!((c.listen.server_port, c.listen.status_port), (7000, 7001));
    assert_eq!(c.requests.maximum_width, 1000);
    assert_eq!(c.caching.upload_concurrency, 10);
    assert_eq!(c.statsd.statsd_host.as_deref(), Some("127.0.0.1"));
    assert_eq!(
        c.requests.whitelisted_extensions,
        vec![Format::Jpeg, Format::Png, Format::Webp]
    );
    assert!(
        l.warnings[0].contains("manta_base_path"),
        "{:?}",
        l.warnings
    );
    let c = ok(load_layers(
        &FileSource::File(dir.join("production.json")),
        Vec::new(),
        &pairs(&[("source_store", "s3://originals/prod")]),
    ));
    assert_eq!(c.originals.source_domain, None);
    assert_eq!(
        store(&c.originals.source_store),
        Some("s3://originals/prod")
    );

    // Development may run without a file; any other environment must have one.
    let empty = tempfile::tempdir().expect("tempdir");
    let in_empty = |name: &str| FileSource::Environment {
        dir: empty.path().to_owned(),
        name: name.to_owned(),
    };
    ok(load_layers(
        &in_empty("development"),
        Vec::new(),
        &test_flags,
    ));
    let e = err(load_layers(&in_empty("staging"), Vec::new(), &test_flags));
    assert!(e.to_string().contains("staging"), "{e}");
    let e = err(load_layers(
        &in_empty("../etc/passwd"),
        Vec::new(),
        &test_flags,
    ));
    assert_eq!(e.key(), Some("environment"));
    // A seed .json left beside the .toml of its environment: the .toml wins, with a warning.
    std::fs::write(empty.path().join("qa.toml"), "maximum_width = 10").expect("write");
    std::fs::write(empty.path().join("qa.json"), "{\"maximum_width\": 20}").expect("write");
    let l = loaded(load_layers(&in_empty("qa"), Vec::new(), &test_flags));
    assert_eq!(l.config.requests.maximum_width, 10);
    assert_eq!(l.warnings.len(), 1, "{:?}", l.warnings);
    assert!(l.warnings[0].contains("qa.json"), "{:?}", l.warnings);
    std::fs::write(empty.path().join("bad.toml"), "maximum_width = ").expect("write");
    let e = err(load_layers(&in_empty("bad"), Vec::new(), &test_flags));
    assert!(matches!(e, ConfigError::Malformed { .. }), "{e}");
    assert!(e.to_string().contains("bad.toml"), "{e}");
    std::fs::write(empty.path().join("worse.json"), "{\"a\": }").expect("write");
    let e = err(load_layers(&in_empty("worse"), Vec::new(), &test_flags));
    assert!(matches!(e, ConfigError::Malformed { .. }), "{e}");
    let e = err(load_layers(
        &FileSource::File(empty.path().join("x.yaml")),
        Vec::new(),
        &test_flags,
    ));
    assert!(e.to_string().contains(".toml or .json"), "{e}");
}

/// The Go server's own configuration files (kept in tests/data/seed-configs) load as they are, each
/// with the warnings its keys call for.
#[test]
fn the_go_servers_files_load() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/seed-configs");
    let load_seed = |name: &str| {
        loaded(load_layers(
            &FileSource::File(dir.join(name)),
            Vec::new(),
            &[],
        ))
    };

    let l = load_seed("production.json");
    let c = &l.config;
    assert_eq!((c.listen.server_port, c.listen.status_port), (7000, 7001));
    assert_eq!(
        c.originals.source_domain.as_ref().map(|d| d.as_str()),
        Some("http://cdn-s3-2.wanelo.com/")
    );
    assert_eq!(c.requests.maximum_width, 1000);
    assert_eq!(c.rendering.default_quality, 75);
    assert_eq!(
        c.statsd.statsd_host, None,
        "graphite_enabled without a host"
    );
    assert_eq!(l.warnings.len(), 1, "{:?}", l.warnings);
    assert!(
        l.warnings[0].contains("manta_base_path"),
        "{:?}",
        l.warnings
    );

    // The trailing comma strict JSON refuses is accepted, with a warning.
    let l = load_seed("development.json");
    assert_eq!(
        l.config.statsd.statsd_host, None,
        "graphite_enabled = false"
    );
    assert_eq!(l.config.statsd.statsd_port, 7777);
    assert_eq!(l.warnings.len(), 2, "{:?}", l.warnings);
    assert!(
        l.warnings.iter().any(|w| w.contains("trailing comma")),
        "{:?}",
        l.warnings
    );

    // "environment": "test" no longer stops start-up; local_base_path becomes the result store.
    let l = load_seed("test.json");
    let c = &l.config;
    assert_eq!(c.caching.upload_concurrency, 3);
    let cwd = std::env::current_dir().expect("cwd");
    assert_eq!(
        store(&c.caching.result_store),
        Some(file_url(&cwd.join("test/images")).as_str())
    );
    assert_eq!(l.notes.len(), 1, "{:?}", l.notes);
    assert_eq!(l.warnings.len(), 2, "{:?}", l.warnings);
    assert!(
        l.warnings.iter().any(|w| w.contains("`environment`")),
        "{:?}",
        l.warnings
    );
    assert!(
        l.warnings.iter().any(|w| w.contains("manta_base_path")),
        "{:?}",
        l.warnings
    );
}

#[test]
fn load_from_as_the_integration_harness_calls_it() {
    let c = ok(load_from(
        config_dir().as_path(),
        "test",
        None,
        std::iter::empty(),
        vec![("source_domain".to_owned(), ORIGIN.to_owned())],
    ));
    assert_eq!((c.listen.server_port, c.listen.status_port), (0, 0));
    let prod = config_dir().join("production.json");
    let c = ok(load_from(
        Path::new("nowhere"),
        "ignored",
        Some(prod.as_path()),
        vec![("IMAGE_SERVER_MAXIMUM_WIDTH".to_owned(), "900".to_owned())],
        Vec::new(),
    ));
    assert_eq!(c.requests.maximum_width, 900);
}

/// `config/default.toml` names exactly the declared keys, each documented by the comment line right
/// above it, which ends with its variable; and it loads with no warning.
#[test]
fn default_toml_documents_exactly_the_declared_keys() {
    let table: toml::Table = toml::from_str(DEFAULT_TOML).expect("default.toml parses");
    let mut in_file: Vec<&str> = table.keys().map(String::as_str).collect();
    let mut declared = keys();
    in_file.sort_unstable();
    declared.sort_unstable();
    assert_eq!(
        in_file, declared,
        "config/default.toml and src/config/groups.rs"
    );

    let lines: Vec<&str> = DEFAULT_TOML.lines().collect();
    for key in keys() {
        let at = lines
            .iter()
            .position(|l| l.starts_with(&format!("{key} = ")))
            .unwrap_or_else(|| panic!("default.toml has no line `{key} = …`"));
        let comment = lines[at - 1];
        let var = format!("Env: {}", env_var(key));
        assert!(
            comment.starts_with("# ") && comment.ends_with(&var),
            "the line above `{key}` must describe it and end with `{var}`: {comment:?}"
        );
    }
    // Old names point at real keys and are not keys themselves.
    for (alias, key) in seed::ALIASES {
        assert!(table.contains_key(key), "{alias} -> {key}");
        assert!(!table.contains_key(alias), "{alias}");
    }
    let l = loaded(with(&[]));
    assert!(l.warnings.is_empty() && l.notes.is_empty());
}
