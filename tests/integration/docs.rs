//! The documentation against the code: every configuration key the code declares
//! (`image_server::config::keys`, from src/config/groups.rs) has its default in `config/default.toml`
//! (and that file names no other key), and is in docs/configuration.md with that default and its
//! environment variable (and the page names no key the code lacks); every
//! relative link in README.md and docs/ resolves to a file inside the repository, and no document
//! refers to a tracker entry by number. (That every metric is in docs/operations.md is checked by
//! `src/metrics.rs`'s own test, against the name constants.)
//!
//! No server is started: these tests only read files.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    let path = root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The key lines of config/default.toml (`^[a-z0-9_]+ = `), as key → default value text: exactly
/// the keys the code declares.
fn default_keys() -> BTreeMap<String, String> {
    let text = read("config/default.toml");
    let mut keys = BTreeMap::new();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(" = ") else {
            continue;
        };
        if key.is_empty()
            || !key
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            continue;
        }
        let previous = keys.insert(key.to_owned(), value.trim().to_owned());
        assert!(previous.is_none(), "config/default.toml names {key} twice");
    }
    // Every key TOML sees must have been found by the line rule, so a key written another way
    // (`key="x"`) cannot slip past the documentation check.
    let table: toml::Table = toml::from_str(&text).expect("config/default.toml is TOML");
    let parsed: BTreeSet<&String> = table.keys().collect();
    let found: BTreeSet<&String> = keys.keys().collect();
    assert_eq!(
        parsed, found,
        "config/default.toml: write every key as `key = value` at the start of a line"
    );
    let declared: BTreeSet<String> = image_server::config::keys()
        .into_iter()
        .map(str::to_owned)
        .collect();
    let in_file: BTreeSet<String> = keys.keys().cloned().collect();
    assert_eq!(
        in_file, declared,
        "config/default.toml must name exactly the keys declared in src/config/groups.rs"
    );
    keys
}

/// The cells of a Markdown table row (`| a | b |` → `["a", "b"]`), or `None` for other lines.
fn cells(line: &str) -> Option<Vec<&str>> {
    let inner = line.trim().strip_prefix('|')?.strip_suffix('|')?;
    Some(inner.split('|').map(str::trim).collect())
}

/// The `` `snake_case` `` words of a table cell.
fn snake_case_words(cell: &str) -> Vec<&str> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .filter(|w| {
            !w.is_empty()
                && w.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        })
        .collect()
}

#[test]
fn every_configuration_key_is_documented_with_its_default() {
    let keys = default_keys();
    let doc = read("docs/configuration.md");
    let rows: Vec<Vec<&str>> = doc.lines().filter_map(cells).collect();
    for (key, default) in &keys {
        let row = rows
            .iter()
            .find(|cells| cells.first() == Some(&format!("`{key}`").as_str()))
            .unwrap_or_else(|| panic!("docs/configuration.md has no table row for `{key}`"));
        assert_eq!(
            row.get(1).copied(),
            Some(format!("`{default}`").as_str()),
            "docs/configuration.md: the default of `{key}` must be `{default}`, as in config/default.toml"
        );
        let var = format!("`{}`", image_server::config::env_var(key));
        assert_eq!(
            row.get(2).copied(),
            Some(var.as_str()),
            "docs/configuration.md: the environment variable of `{key}`"
        );
        assert!(
            row.get(3).is_some_and(|meaning| !meaning.is_empty()),
            "docs/configuration.md: `{key}` needs a meaning"
        );
    }
}

#[test]
fn configuration_doc_names_no_unknown_key() {
    let keys = default_keys();
    let doc = read("docs/configuration.md");
    for line in doc.lines() {
        let Some(cells) = cells(line) else { continue };
        let Some(first) = cells.first() else { continue };
        for word in snake_case_words(first) {
            assert!(
                keys.contains_key(word),
                "docs/configuration.md documents `{word}`, which the code does not declare"
            );
        }
    }
}

/// README.md and every Markdown file in docs/.
fn documents() -> Vec<PathBuf> {
    let mut docs = vec![root().join("README.md")];
    let dir = root().join("docs");
    let mut in_dir: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    in_dir.sort();
    docs.extend(in_dir);
    docs
}

/// The lines of a Markdown file outside fenced code blocks.
fn prose_lines(text: &str) -> Vec<&str> {
    let mut fenced = false;
    let mut lines = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced {
            lines.push(line);
        }
    }
    lines
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn anchors(markdown: &str) -> BTreeSet<String> {
    prose_lines(markdown)
        .into_iter()
        .filter_map(|l| l.strip_prefix('#'))
        .map(|l| slug(l.trim_start_matches('#')))
        .collect()
}

#[test]
fn relative_links_resolve() {
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).expect("read document");
        let dir = doc.parent().expect("a document has a directory");
        for line in prose_lines(&text) {
            for piece in line.split("](").skip(1) {
                let Some(target) = piece.split(')').next() else {
                    continue;
                };
                if target.starts_with("http://")
                    || target.starts_with("https://")
                    || target.starts_with("mailto:")
                {
                    continue;
                }
                let (path, anchor) = target.split_once('#').unwrap_or((target, ""));
                let file = if path.is_empty() {
                    doc.clone()
                } else {
                    dir.join(path)
                };
                assert!(
                    file.exists(),
                    "{}: link to {target} does not resolve",
                    doc.display()
                );
                // Inside the repository: a reader with only this repository can follow it.
                let inside = file
                    .canonicalize()
                    .is_ok_and(|f| f.starts_with(root().canonicalize().expect("repository root")));
                assert!(
                    inside,
                    "{}: link to {target} leaves the repository",
                    doc.display()
                );
                if !anchor.is_empty() {
                    let linked = std::fs::read_to_string(&file).expect("read linked document");
                    assert!(
                        anchors(&linked).contains(anchor),
                        "{}: link to {target}: no such heading",
                        doc.display()
                    );
                }
            }
        }
    }
}

/// The repository stands on its own: its documents describe what they mean instead of pointing at a
/// tracker entry by number (links are held inside the repository by `relative_links_resolve`).
#[test]
fn documents_refer_to_no_tracker_entry() {
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).expect("read document");
        let lower = text.to_lowercase();
        for (at, _) in lower.match_indices("issue ") {
            let next = lower[at + "issue ".len()..].chars().next();
            assert!(
                !next.is_some_and(|c| c.is_ascii_digit()),
                "{} refers to an issue by number: describe it instead",
                doc.display()
            );
        }
    }
}
