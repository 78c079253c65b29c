//! The shipped files and the Go server's files load, the harness's entry point, and the agreement
//! between `config/default.toml` and the key declarations.

use super::*;

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
