//! Every key's checks: bad values name their key and origin, secrets stay hidden, environment and
//! file values follow the key's type and unit, store URLs, S3 settings, what is printed.

use super::*;

#[test]
fn every_bad_value_names_its_key() {
    let cases: &[(&str, &str, &str)] = &[
        ("listen_address", "localhost", "IP address"),
        ("server_port", "70000", "between 0 and 65535, got 70000"),
        ("server_port", "http", "expected an integer"),
        ("status_port", "7000", "must differ from server_port"),
        ("max_connections", "0", "between 1"),
        ("listen_backlog", "0", "between 1 and 65535"),
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
        ("pid_file", "run/image-server.pid", "absolute path"),
        ("named_versions", "thumb=x150", "not a version file"),
        ("named_versions", "thumb", "name=version pairs"),
        ("named_versions", "a.b=x150.jpg", "not a version name"),
        ("named_versions", "huge=w5000.jpg", "could never be served"),
        (
            "upload_cors_origins",
            "https://app.example.com/page",
            "origins",
        ),
        ("upload_cors_origins", "app.example.com", "origins"),
        ("upload_outputs", "nope", "neither a named version"),
        ("upload_token", "short", "at least 16"),
        ("upload_signing_key", "short", "at least 16"),
        ("upload_formats", "bmp", "extension"),
        ("max_concurrent_uploads", "0", "between 1"),
        ("upload_timeout", "0", "greater than zero"),
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
