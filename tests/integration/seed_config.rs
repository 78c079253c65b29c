//! The Go server's configuration files (tests/data/seed-configs) given to the real binary:
//! `check-config --config FILE` accepts each one, says on stderr what it ignored or derived, and
//! `--print` shows where each value came from. Nothing is served; the child runs in a temporary
//! directory, so a result store derived from `local_base_path` is created there.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn seed(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/seed-configs")
        .join(name)
}

/// `image-server check-config --print --config FILE`, in `dir`, with no `IMAGE_SERVER_*` or
/// `RUST_LOG` from the environment running the suite.
fn check_config(file: &Path, dir: &Path) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_image-server"));
    cmd.current_dir(dir)
        .arg("check-config")
        .arg("--print")
        .arg("--config")
        .arg(file);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("IMAGE_SERVER_") {
            cmd.env_remove(name);
        }
    }
    cmd.env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("image-server runs")
}

fn settings(out: &Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(&out.stdout);
    let json = &text[..text.rfind("configuration OK").expect("ok line")];
    serde_json::from_str(json).expect("JSON settings")
}

#[test]
fn each_go_server_file_is_accepted_with_its_warnings() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, expected) in [
        ("production.json", &["manta_base_path"][..]),
        (
            "development.json",
            &["manta_base_path", "trailing comma"][..],
        ),
        (
            "test.json",
            &["manta_base_path", "`environment`", "local_base_path"][..],
        ),
    ] {
        let file = seed(name);
        let out = check_config(&file, dir.path());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: {stderr}");
        for word in expected {
            assert!(stderr.contains(word), "{name}: no {word:?} in {stderr}");
        }
        let s = settings(&out);
        let from_file = file.display().to_string();
        assert_eq!(s["server_port"]["value"], 7000, "{name}");
        assert_eq!(s["server_port"]["origin"], from_file.as_str(), "{name}");
        assert_eq!(s["maximum_width"]["value"], 1000, "{name}");
        assert_eq!(s["log_level"]["origin"], "default", "{name}");
    }

    // test.json keeps rendered images below the working directory, as the Go server did.
    let out = check_config(&seed("test.json"), dir.path());
    let s = settings(&out);
    let store = s["result_store"]["value"].as_str().unwrap_or_default();
    assert!(store.ends_with("/test/images"), "{store}");
    assert!(
        s["result_store"]["origin"]
            .as_str()
            .is_some_and(|o| o.ends_with("as local_base_path")),
        "{}",
        s["result_store"]
    );
    assert_eq!(s["upload_concurrency"]["value"], 3);
}

#[test]
fn an_unknown_key_stops_with_a_suggestion() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("typo.json");
    std::fs::write(
        &file,
        r#"{"source_domain": "http://cdn.example.com", "maximum_widht": 1000}"#,
    )
    .expect("write");
    let out = check_config(&file, dir.path());
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("unknown key `maximum_widht`") && stderr.contains("`maximum_width`?"),
        "{stderr}"
    );
}
