//! The configuration files of the Go server this one replaces (wanelo/image-server, 2014), read as
//! ours before they become a layer: its old key names become ours, its keys that mean nothing here
//! are dropped with one warning, `graphite_enabled = false` turns statsd off, `local_base_path`
//! becomes a `file://` result store unless one is set, and the trailing comma its development file
//! ends with is accepted. Everything this pass decides is reported (warnings and notes), never silent.
//! Old key names also work in environment variables and flags; the rest applies to files only.

use std::collections::BTreeMap;

use figment::value::{Dict, Value};

use super::ConfigError;

/// Seed key → our key. Resolved before layers merge, so a seed file and an
/// `IMAGE_SERVER_UPLOAD_CONCURRENCY` variable override each other as one key.
pub(super) const ALIASES: [(&str, &str); 4] = [
    ("manta_concurrency", "upload_concurrency"),
    ("graphite_host", "statsd_host"),
    ("graphite_port", "statsd_port"),
    ("default_compression", "default_quality"),
];

/// Seed keys that configured things this server does not have (its run environment, its Manta
/// uploader and batch outputs): dropped from files, named in one warning. So are the other
/// `manta_*` keys (`manta_url`, `manta_user`, `manta_key_id`, …).
const IGNORED: [&str; 3] = ["environment", "outputs", "uploader"];

/// Seed file key: `false` turns statsd off (as an empty `statsd_host` in the same file would).
const GRAPHITE_ENABLED: &str = "graphite_enabled";
/// Seed file key: the local directory rendered images were kept in.
const LOCAL_BASE_PATH: &str = "local_base_path";
/// Seed file key: where rendered images were uploaded in Manta.
const MANTA_BASE_PATH: &str = "manta_base_path";

/// Our key for `key`: an old name resolved, any other name unchanged.
pub(super) fn canonical(key: &str) -> &str {
    ALIASES
        .iter()
        .find(|(alias, _)| *alias == key)
        .map_or(key, |(_, ours)| ours)
}

/// What loading decided that the operator should hear about: warnings (something in their files
/// is ignored or guessed) and notes (something was derived, as documented).
#[derive(Debug, Default)]
pub(super) struct Report {
    pub(super) warnings: Vec<String>,
    pub(super) notes: Vec<String>,
}

/// A file's keys once the seed's are read as ours.
#[derive(Debug, Default)]
pub(super) struct FileKeys {
    /// Key → value, our names only (unknown names stay, for the caller to refuse).
    pub(super) values: Dict,
    /// Key → origin text, when not just the file (`f.json as graphite_host`).
    pub(super) origins: BTreeMap<String, String>,
    /// `local_base_path`, when the file names one.
    pub(super) local_base_path: Option<String>,
}

/// Reads the seed's keys of one file (`origin` names it in messages). A key given twice (an old
/// name and its new one) is an error; JSON `null` means the key is absent.
pub(super) fn read_keys(
    origin: &str,
    dict: Dict,
    report: &mut Report,
) -> Result<FileKeys, ConfigError> {
    let mut out = FileKeys::default();
    let mut ignored = Vec::new();
    let mut statsd_off = false;
    for (key, value) in dict {
        if matches!(value, Value::Empty(..)) {
            continue;
        }
        let value = drop_nulls(value);
        if IGNORED.contains(&key.as_str())
            || (key.starts_with("manta_") && key != MANTA_BASE_PATH && canonical(&key) == key)
        {
            ignored.push(key);
            continue;
        }
        match key.as_str() {
            MANTA_BASE_PATH => report.warnings.push(format!(
                "{origin}: {MANTA_BASE_PATH} is ignored: Manta storage is not supported; \
                 keep rendered images in a shared store with result_store (s3://…, gs://…, file://…)"
            )),
            LOCAL_BASE_PATH => match value.as_str().map(str::trim) {
                Some(path) if !path.is_empty() => out.local_base_path = Some(path.to_owned()),
                _ => ignored.push(key),
            },
            GRAPHITE_ENABLED => {
                statsd_off = !boolean(&value).ok_or_else(|| ConfigError::Invalid {
                    key: key.clone(),
                    message: "expected true or false".to_owned(),
                    origin: Some(origin.to_owned()),
                })?;
            }
            _ => {
                let ours = canonical(&key).to_owned();
                if out.values.contains_key(&ours) {
                    let first = out.origins.get(&ours).map_or(origin, String::as_str);
                    let second = if ours == key {
                        origin.to_owned()
                    } else {
                        format!("{origin} as {key}")
                    };
                    return Err(ConfigError::Invalid {
                        key: ours,
                        message: format!("set twice, by {first} and by {second}"),
                        origin: None,
                    });
                }
                if ours != key {
                    out.origins
                        .insert(ours.clone(), format!("{origin} as {key}"));
                }
                out.values.insert(ours, value);
            }
        }
    }
    if statsd_off {
        // The seed's switch beats a host named in the same file; a later layer may still set one.
        out.values
            .insert("statsd_host".to_owned(), Value::from(String::new()));
        out.origins.insert(
            "statsd_host".to_owned(),
            format!("{origin} by {GRAPHITE_ENABLED} = false"),
        );
    }
    if !ignored.is_empty() {
        let (keys, mean) = if ignored.len() == 1 {
            ("key", "means")
        } else {
            ("keys", "mean")
        };
        report.warnings.push(format!(
            "{origin}: ignoring the Go image-server's {keys} {}, which {mean} nothing here",
            ignored
                .iter()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Ok(out)
}

/// `local_base_path` (the seed's directory of rendered images) as a `file://` result store, when no
/// layer sets `result_store` (`set_by` names the one that does). A relative path is below the
/// working directory. Returns the store URL to use, if any.
pub(super) fn local_base_path(
    origin: &str,
    path: &str,
    set_by: Option<&str>,
    report: &mut Report,
) -> Result<Option<String>, ConfigError> {
    if let Some(other) = set_by {
        report.warnings.push(format!(
            "{origin}: {LOCAL_BASE_PATH} is ignored: result_store is set (by {other})"
        ));
        return Ok(None);
    }
    let invalid = |message: String| ConfigError::Invalid {
        key: LOCAL_BASE_PATH.to_owned(),
        message,
        origin: Some(origin.to_owned()),
    };
    let cwd = std::env::current_dir().map_err(|e| {
        invalid(format!(
            "cannot resolve {path:?}: no working directory: {e}"
        ))
    })?;
    let dir = super::values::normalize(&cwd.join(path));
    let url = url::Url::from_file_path(&dir)
        .map_err(|()| invalid(format!("cannot make a file URL of {path:?}")))?;
    report.notes.push(format!(
        "{origin}: {LOCAL_BASE_PATH} = {path:?} is used as result_store = \"{url}\" (rendered images are kept there)"
    ));
    Ok(Some(url.to_string()))
}

/// JSON as the seed wrote it: a comma before a closing `}` or `]` (which strict JSON refuses, and
/// the seed's development file has) is removed, with a warning naming its line.
pub(super) fn relax_json(origin: &str, text: &str, report: &mut Report) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut lines = Vec::new();
    let (mut in_string, mut escaped) = (false, false);
    for (i, c) in text.char_indices() {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
        } else if c == '"' {
            in_string = true;
        } else if c == ',' {
            let next = bytes[i + 1..]
                .iter()
                .find(|b| !b.is_ascii_whitespace())
                .copied();
            if matches!(next, Some(b'}' | b']')) {
                let line = text[..i].matches('\n').count() + 1;
                if lines.last() != Some(&line) {
                    lines.push(line);
                }
                continue;
            }
        }
        out.push(c);
    }
    if !lines.is_empty() {
        let lines: Vec<String> = lines.iter().map(usize::to_string).collect();
        report.warnings.push(format!(
            "{origin}: accepted a trailing comma on line {} (strict JSON refuses it; remove it)",
            lines.join(", ")
        ));
    }
    out
}

fn boolean(value: &Value) -> Option<bool> {
    value.to_bool().or_else(|| match value.as_str()?.trim() {
        t if t.eq_ignore_ascii_case("true") => Some(true),
        t if t.eq_ignore_ascii_case("false") => Some(false),
        _ => None,
    })
}

/// JSON `null` inside a list means nothing, as at the top level.
fn drop_nulls(value: Value) -> Value {
    match value {
        Value::Array(tag, items) => Value::Array(
            tag,
            items
                .into_iter()
                .filter(|v| !matches!(v, Value::Empty(..)))
                .map(drop_nulls)
                .collect(),
        ),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dict(json: &str) -> Dict {
        serde_json::from_str(json).expect("a JSON object")
    }

    #[test]
    fn old_names_become_ours_and_unknown_ones_stay() {
        let mut report = Report::default();
        let keys = read_keys(
            "f.json",
            dict(r#"{"graphite_host": "h", "manta_concurrency": 3, "server_port": "7000", "nope": 1, "s3_endpoint": null}"#),
            &mut report,
        )
        .expect("read");
        let names: Vec<&str> = keys.values.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            ["nope", "server_port", "statsd_host", "upload_concurrency"]
        );
        assert_eq!(keys.origins["statsd_host"], "f.json as graphite_host");
        assert!(report.warnings.is_empty() && report.notes.is_empty());
        assert_eq!(canonical("default_compression"), "default_quality");
        assert_eq!(canonical("server_port"), "server_port");
    }

    #[test]
    fn keys_of_the_go_server_are_ignored_with_one_warning() {
        let mut report = Report::default();
        let keys = read_keys(
            "seed.json",
            dict(r#"{"environment": "test", "manta_url": "https://us-east.manta.joyent.com", "manta_user": "u",
                     "manta_key_id": "aa:bb", "outputs": ["x"], "uploader": "manta", "maximum_width": 1000}"#),
            &mut report,
        )
        .expect("read");
        assert_eq!(keys.values.len(), 1);
        let [warning] = report.warnings.as_slice() else {
            panic!("one warning: {:?}", report.warnings)
        };
        for key in [
            "environment",
            "manta_url",
            "manta_user",
            "manta_key_id",
            "outputs",
            "uploader",
        ] {
            assert!(warning.contains(&format!("`{key}`")), "{warning}");
        }
        assert!(warning.starts_with("seed.json: "), "{warning}");
    }

    #[test]
    fn manta_base_path_names_the_replacement() {
        let mut report = Report::default();
        read_keys(
            "p.json",
            dict(r#"{"manta_base_path": "public/images"}"#),
            &mut report,
        )
        .expect("read");
        assert_eq!(report.warnings.len(), 1);
        assert!(
            report.warnings[0].contains("result_store"),
            "{:?}",
            report.warnings
        );
    }

    #[test]
    fn graphite_enabled_false_turns_statsd_off() {
        let mut report = Report::default();
        let keys = read_keys(
            "p.json",
            dict(r#"{"graphite_host": "h", "graphite_enabled": "false"}"#),
            &mut report,
        )
        .expect("read");
        assert_eq!(keys.values["statsd_host"].as_str(), Some(""));
        assert_eq!(
            keys.origins["statsd_host"],
            "p.json by graphite_enabled = false"
        );
        let e = read_keys("p.json", dict(r#"{"graphite_enabled": 3}"#), &mut report)
            .expect_err("not a boolean");
        assert_eq!(e.key(), Some("graphite_enabled"));
    }

    #[test]
    fn local_base_path_becomes_a_result_store_unless_one_is_set() {
        let mut report = Report::default();
        let cwd = std::env::current_dir().expect("cwd");
        let url = local_base_path("t.json", "test/images", None, &mut report)
            .expect("resolved")
            .expect("used");
        let expected = url::Url::from_file_path(cwd.join("test/images")).expect("url");
        assert_eq!(url, expected.as_str());
        assert_eq!(report.notes.len(), 1);
        let abs = local_base_path("t.json", "/srv/images", None, &mut report).expect("resolved");
        assert_eq!(abs.as_deref(), Some("file:///srv/images"));

        let mut report = Report::default();
        let unused = local_base_path("t.json", "x", Some("--set result_store"), &mut report)
            .expect("resolved");
        assert_eq!(unused, None);
        assert!(
            report.warnings[0].contains("--set result_store"),
            "{:?}",
            report.warnings
        );
    }

    #[test]
    fn trailing_commas_are_accepted_with_a_warning() {
        let mut report = Report::default();
        let text = "{\n  \"a\": \"x,}\",\n  \"b\": [1, 2,],\n}\n";
        let relaxed = relax_json("d.json", text, &mut report);
        assert_eq!(relaxed, "{\n  \"a\": \"x,}\",\n  \"b\": [1, 2]\n}\n");
        let value: serde_json::Value = serde_json::from_str(&relaxed).expect("strict JSON now");
        assert_eq!(value["a"], "x,}");
        assert_eq!(report.warnings.len(), 1);
        assert!(
            report.warnings[0].contains("line 3 "),
            "{:?}",
            report.warnings
        );

        let mut report = Report::default();
        assert_eq!(
            relax_json("s.json", "{\"a\": 1}", &mut report),
            "{\"a\": 1}"
        );
        assert!(report.warnings.is_empty());
    }
}
