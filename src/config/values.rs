//! The built types of checked values, and the text parsers behind them: an object-store URL
//! ([`StoreUrl`]), the originals' path template ([`SourcePath`]), the HTTP origin ([`SourceDomain`]),
//! a secret that never prints ([`Secret`]) and a byte size in a key's unit ([`Size`]); durations
//! (humantime), sizes (bytesize), colours and host names. Each value is checked here once, when the
//! configuration loads; the modules that use these types trust them and check nothing again.

use std::fmt;
use std::ops::Deref;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Serialize, Serializer};

/// One kibibyte: sizes are binary (1 KB = 1024 bytes), as `config/default.toml` says.
pub const KB: u64 = 1024;
/// One mebibyte (1 MB = 1024 KB).
pub const MB: u64 = 1024 * KB;

/// A value read from one key's text (already trimmed). The error is the message for that key.
pub(super) trait FromText: Sized {
    /// Parses `text`, or says what was expected.
    fn from_text(text: &str) -> Result<Self, String>;
}

impl FromText for std::net::IpAddr {
    fn from_text(text: &str) -> Result<Self, String> {
        text.parse()
            .map_err(|_| format!("expected an IP address such as 0.0.0.0 or ::1, got {text:?}"))
    }
}

impl FromText for std::path::PathBuf {
    fn from_text(text: &str) -> Result<Self, String> {
        let path = std::path::PathBuf::from(text);
        if path.is_absolute() {
            Ok(path)
        } else {
            Err(format!("expected an absolute path such as /run/image-server/image-server.pid, got {text:?}"))
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Object-store URLs
// ---------------------------------------------------------------------------------------------------

/// Where a store is, as its URL names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreKind {
    /// `file:///dir`: the local filesystem below this absolute directory.
    File(PathBuf),
    /// `memory://`: an in-process store (tests); the URL's host, if any, is part of the prefix.
    Memory,
    /// `s3://bucket/prefix`: S3 or an S3-compatible server (`s3_*` keys).
    S3 {
        /// The bucket.
        bucket: String,
    },
    /// `gs://bucket/prefix`: Google Cloud Storage, credentials from its usual variables.
    Gcs {
        /// The bucket.
        bucket: String,
    },
    /// `az://container/prefix` (or `azure://`): Azure Blob Storage, credentials from its variables.
    Azure {
        /// The container.
        container: String,
    },
}

/// A checked object-store URL (`source_store`, `result_store`): a known scheme, a bucket where the
/// scheme needs one, a prefix that is a valid object key, no credentials, query or fragment, and a
/// relative `file://./dir` already resolved against the working directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreUrl {
    url: url::Url,
    kind: StoreKind,
    prefix: object_store::path::Path,
}

impl StoreUrl {
    /// Checks and normalises an object-store URL.
    pub fn parse(text: &str) -> Result<StoreUrl, String> {
        let text = text.trim();
        if let Some(rest) = text.strip_prefix("file://").filter(|r| !r.starts_with('/')) {
            let cwd = std::env::current_dir()
                .map_err(|e| format!("cannot resolve {text:?}: no working directory: {e}"))?;
            let dir = normalize(&cwd.join(rest));
            let url = url::Url::from_file_path(&dir)
                .map_err(|()| format!("cannot make a file URL of {text:?}"))?;
            return StoreUrl::parse(url.as_str());
        }
        let url = url::Url::parse(text).map_err(|e| {
            format!("expected an object-store URL such as s3://bucket/prefix or file:///dir, got {text:?} ({e})")
        })?;
        if !url.username().is_empty() || url.password().is_some() {
            // Credentials belong in their own keys, not in a URL that is logged and displayed.
            return Err("must not carry credentials; use the s3_* keys".to_owned());
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(format!("must not have a query or fragment, got {text:?}"));
        }
        let host = url.host_str().unwrap_or("").to_owned();
        let bucket = || {
            if host.is_empty() {
                Err(format!(
                    "{}:// needs a bucket, e.g. {}://bucket/prefix",
                    url.scheme(),
                    url.scheme()
                ))
            } else {
                Ok(host.clone())
            }
        };
        let (kind, raw_prefix) = match url.scheme() {
            "file" => {
                let dir = url
                    .to_file_path()
                    .ok()
                    .filter(|_| host.is_empty())
                    .ok_or_else(|| {
                        format!(
                            "expected file:///absolute/dir or file://./relative/dir, got {text:?}"
                        )
                    })?;
                (StoreKind::File(dir), String::new())
            }
            "memory" => (StoreKind::Memory, format!("{host}/{}", url.path())),
            "s3" => (StoreKind::S3 { bucket: bucket()? }, url.path().to_owned()),
            "gs" => (StoreKind::Gcs { bucket: bucket()? }, url.path().to_owned()),
            "az" | "azure" => (
                StoreKind::Azure {
                    container: bucket()?,
                },
                url.path().to_owned(),
            ),
            other => {
                return Err(format!(
                    "scheme must be one of file, s3, gs, az, memory; got {other:?}"
                ))
            }
        };
        let trimmed = raw_prefix.trim_matches('/');
        let prefix = object_store::path::Path::parse(trimmed)
            .map_err(|e| format!("{trimmed:?} is not a valid key prefix ({e})"))?;
        Ok(StoreUrl { url, kind, prefix })
    }

    /// The URL, normalised (`file:///abs/dir`, `s3://bucket/prefix`).
    pub fn as_str(&self) -> &str {
        self.url.as_str()
    }

    /// What kind of store, and its bucket or directory.
    pub fn kind(&self) -> &StoreKind {
        &self.kind
    }

    /// The key prefix every object lives under (the URL's path; for `memory://` its host too).
    pub fn prefix(&self) -> &object_store::path::Path {
        &self.prefix
    }

    /// Whether the backend keeps object attributes (Content-Type, Cache-Control): every one but
    /// the local filesystem.
    pub fn keeps_attributes(&self) -> bool {
        !matches!(self.kind, StoreKind::File(_))
    }
}

impl FromText for StoreUrl {
    fn from_text(text: &str) -> Result<Self, String> {
        StoreUrl::parse(text)
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for StoreUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Removes `.` and resolves `..` lexically (the directory need not exist yet).
pub(super) fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------------
// The originals: path template and HTTP origin
// ---------------------------------------------------------------------------------------------------

/// The placeholders a [`SourcePath`] may hold.
const PLACEHOLDERS: [&str; 3] = ["{model}", "{type}", "{id}"];

/// A checked `source_path` template: not empty, `{id}` present (without it every id would map to one
/// original), and braces only in `{model}`, `{type}` and `{id}`. Reads as the template text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourcePath(String);

impl SourcePath {
    /// Checks a template.
    pub fn parse(template: &str) -> Result<SourcePath, String> {
        if template.trim_matches('/').is_empty() {
            return Err("must not be empty".to_owned());
        }
        if !template.contains("{id}") {
            return Err(format!("must contain {{id}}, got {template:?}"));
        }
        let rest = PLACEHOLDERS
            .iter()
            .fold(template.to_owned(), |t, p| t.replace(p, ""));
        if rest.contains('{') || rest.contains('}') {
            return Err(format!(
                "may only use the placeholders {{model}}, {{type}} and {{id}}, got {template:?}"
            ));
        }
        Ok(SourcePath(template.to_owned()))
    }

    /// The template text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Deref for SourcePath {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl FromText for SourcePath {
    fn from_text(text: &str) -> Result<Self, String> {
        SourcePath::parse(text)
    }
}

impl Serialize for SourcePath {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// A checked `source_domain`: an `http://` or `https://` URL with a host, no query or fragment, its
/// path ending in `/` so that the expanded `source_path` is appended below it. Reads as the URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceDomain(url::Url);

impl SourceDomain {
    /// Checks a base URL.
    pub fn parse(text: &str) -> Result<SourceDomain, String> {
        let text = text.trim();
        let bad = |why: &str| format!("{why}, got {text:?}");
        let mut url =
            url::Url::parse(text).map_err(|_| bad("expected an http:// or https:// URL"))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
            return Err(bad("expected an http:// or https:// URL"));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(bad("must not have a query or fragment"));
        }
        // A base URL: the source path is appended below it, never replacing its last segment.
        if !url.path().ends_with('/') {
            let path = format!("{}/", url.path());
            url.set_path(&path);
        }
        Ok(SourceDomain(url))
    }

    /// The URL without user name or password, for logs and the status page.
    pub fn redacted(&self) -> url::Url {
        let mut url = self.0.clone();
        // Cannot fail: an http(s) URL with a host can have credentials, so it can lose them.
        let _ = url.set_username("");
        let _ = url.set_password(None);
        url
    }
}

impl Deref for SourceDomain {
    type Target = url::Url;
    fn deref(&self) -> &url::Url {
        &self.0
    }
}

impl FromText for SourceDomain {
    fn from_text(text: &str) -> Result<Self, String> {
        SourceDomain::parse(text)
    }
}

impl Serialize for SourceDomain {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.redacted().as_str())
    }
}

// ---------------------------------------------------------------------------------------------------
// Secrets and sizes
// ---------------------------------------------------------------------------------------------------

/// A secret (a signing key, a token, an S3 key): kept verbatim, never printed. `Debug`, `Display`
/// and the settings shown by `check-config --print` and the status page say `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the one place that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Secret {
        Secret(s.to_owned())
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Secret {
        Secret(s)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

/// A byte size read in the unit `UNIT` (bytes) of its key: `memory_cache_mb` is a `Size<MB>`, so a
/// bare `256` is 256 MB, while text may name its own unit (`"1GB"`). Shown in the key's unit when
/// whole, so what `check-config --print` shows can be written back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size<const UNIT: u64>(u64);

impl<const UNIT: u64> Size<UNIT> {
    /// A size of `bytes` bytes.
    pub const fn from_bytes(bytes: u64) -> Self {
        Size(bytes)
    }

    /// The size in bytes.
    pub const fn bytes(self) -> u64 {
        self.0
    }
}

impl<const UNIT: u64> Serialize for Size<UNIT> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0.is_multiple_of(UNIT) {
            s.serialize_u64(self.0 / UNIT)
        } else {
            s.serialize_str(&format!("{}B", self.0))
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Text parsers
// ---------------------------------------------------------------------------------------------------

/// A duration: a bare integer is seconds (`10`); anything else is humantime's grammar (`500ms`,
/// `10s`, `2m`, `1h`, `1d`, combined as `1m30s` or `1m 30s`).
pub(super) fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text.parse().ok().map(Duration::from_secs);
    }
    humantime::parse_duration(text).ok()
}

/// A size in bytes: a bare integer counts `unit`s (the key's `_mb`, `_kb` or `_bytes`); text with a
/// unit is read by bytesize, the decimal spellings taken as binary (`25MB` = 25 × 1024²), as
/// `config/default.toml` documents.
pub(super) fn parse_size(text: &str, unit: u64) -> Option<u64> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text.parse::<u64>().ok()?.checked_mul(unit);
    }
    let at = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit_name) = text.split_at(at);
    let binary = match unit_name.trim().to_ascii_lowercase().as_str() {
        "b" => "B",
        "k" | "kb" | "ki" | "kib" => "KiB",
        "m" | "mb" | "mi" | "mib" => "MiB",
        "g" | "gb" | "gi" | "gib" => "GiB",
        "t" | "tb" | "ti" | "tib" => "TiB",
        _ => return None,
    };
    let bytes = bytesize::ByteSize::from_str(&format!("{}{binary}", number.trim()))
        .ok()?
        .as_u64();
    // bytesize saturates instead of overflowing; a size that large is a typo either way.
    (bytes != u64::MAX).then_some(bytes)
}

/// `white`, `black`, `#rrggbb`, `#rgb`, `r,g,b`.
pub(super) fn parse_colour(text: &str) -> Option<[u8; 3]> {
    let s = text.trim().to_ascii_lowercase();
    match s.as_str() {
        "white" => return Some([255, 255, 255]),
        "black" => return Some([0, 0, 0]),
        _ => {}
    }
    if let Some(hex) = s.strip_prefix('#') {
        if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let digit = |i: usize, len: usize| u8::from_str_radix(&hex[i..i + len], 16).ok();
        return match hex.len() {
            6 => Some([digit(0, 2)?, digit(2, 2)?, digit(4, 2)?]),
            3 => Some([digit(0, 1)? * 17, digit(1, 1)? * 17, digit(2, 1)? * 17]),
            _ => None,
        };
    }
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    match parts.as_slice() {
        [r, g, b] => Some([r.parse().ok()?, g.parse().ok()?, b.parse().ok()?]),
        _ => None,
    }
}

/// A host name (`allowed_source_hosts`, `source_redirect_hosts`, `statsd_host`): lower-cased;
/// letters, digits, `.`, `-`, `_`, or an IP address; no scheme, path or port.
pub(super) fn host_name(text: &str) -> Option<String> {
    let s = text.trim().trim_start_matches('.').to_ascii_lowercase();
    let ok = !s.is_empty()
        && (s.parse::<std::net::IpAddr>().is_ok()
            || s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_'));
    ok.then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let d = parse_duration;
        assert_eq!(d("10"), Some(Duration::from_secs(10)));
        assert_eq!(d("10s"), Some(Duration::from_secs(10)));
        assert_eq!(d("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(d("2m"), Some(Duration::from_secs(120)));
        assert_eq!(d("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(d("1d"), Some(Duration::from_secs(86_400)));
        assert_eq!(d("1m 30s"), Some(Duration::from_secs(90)));
        assert_eq!(d("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(d(" 2 s "), Some(Duration::from_secs(2)));
        // humantime's grammar: longer unit names and fractions too.
        assert_eq!(d("2 days"), Some(Duration::from_secs(2 * 86_400)));
        assert_eq!(d("1.5s"), Some(Duration::from_millis(1500)));
        for bad in [
            "",
            "s",
            "10x",
            "-1s",
            "1m30",
            "99999999999999999999h",
            "soon",
        ] {
            assert_eq!(d(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn sizes_are_binary() {
        assert_eq!(parse_size("256", MB), Some(256 * MB));
        assert_eq!(parse_size("25MB", 1), Some(25 * MB));
        assert_eq!(parse_size("25 MiB", 1), Some(25 * MB));
        assert_eq!(parse_size("512kb", MB), Some(512 * KB));
        assert_eq!(parse_size("2G", 1), Some(2048 * MB));
        assert_eq!(parse_size("100B", MB), Some(100));
        assert_eq!(parse_size("1.5MB", 1), Some(3 * MB / 2));
        for bad in ["", "MB", "-1", "-1MB", "12 parsecs", "99999999999999999999"] {
            assert_eq!(parse_size(bad, 1), None, "{bad:?}");
        }
        assert_eq!(parse_size("18446744073709551615", MB), None);
        assert_eq!(parse_size("18446744073709551615 GB", 1), None);
    }

    #[test]
    fn colours() {
        assert_eq!(parse_colour("white"), Some([255, 255, 255]));
        assert_eq!(parse_colour("Black"), Some([0, 0, 0]));
        assert_eq!(parse_colour("#0a0B0c"), Some([10, 11, 12]));
        assert_eq!(parse_colour("#fa0"), Some([255, 170, 0]));
        assert_eq!(parse_colour("1, 2,3"), Some([1, 2, 3]));
        for bad in ["", "#ggg", "#1234", "1,2", "1,2,256", "red"] {
            assert_eq!(parse_colour(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn source_paths() {
        assert!(SourcePath::parse("{model}/{type}/{id}/original.jpg").is_ok());
        assert_eq!(&*SourcePath::parse("{id}.jpg").expect("valid"), "{id}.jpg");
        for bad in [
            "",
            "/",
            "{model}/{type}/original.jpg",
            "{id}/{size}",
            "{id}/{model",
            "{id}}",
        ] {
            assert!(SourcePath::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn source_domains() {
        let d = SourceDomain::parse("https://user:secret@cdn.example.com/originals").expect("ok");
        assert_eq!(d.as_str(), "https://user:secret@cdn.example.com/originals/");
        assert_eq!(d.redacted().as_str(), "https://cdn.example.com/originals/");
        for bad in [
            "ftp://host/",
            "http://host/?q=1",
            "http://host/#f",
            "file:///tmp",
            "nope",
        ] {
            assert!(
                SourceDomain::parse(bad).is_err(),
                "{bad:?} should be refused"
            );
        }
    }

    #[test]
    fn store_urls_give_kind_and_prefix() {
        let s = StoreUrl::parse("s3://bucket/some/prefix/").expect("s3");
        assert_eq!(s.prefix().as_ref(), "some/prefix");
        assert_eq!(
            s.kind(),
            &StoreKind::S3 {
                bucket: "bucket".into()
            }
        );
        assert!(StoreUrl::parse("s3://bucket")
            .expect("s3")
            .prefix()
            .is_root());
        let m = StoreUrl::parse("memory://results").expect("memory");
        assert_eq!(
            (m.kind(), m.prefix().as_ref()),
            (&StoreKind::Memory, "results")
        );
        assert!(!StoreUrl::parse("file:///tmp/x")
            .expect("file")
            .keeps_attributes());
        // Without a third slash the rest is a directory below the working directory.
        let cwd = std::env::current_dir().expect("cwd");
        assert_eq!(
            StoreUrl::parse("file://dir/sub").expect("file").kind(),
            &StoreKind::File(cwd.join("dir/sub"))
        );
        for bad in [
            "not a url",
            "ftp://host/x",
            "s3://",
            "s3://user:pw@bucket/x",
            "s3://bucket/x?y=1",
            "s3://bucket/a//b",
            "none",
        ] {
            assert!(StoreUrl::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::from("hunter2-hunter2-hunter2");
        assert_eq!(format!("{s} {s:?}"), "<redacted> <redacted>");
        assert_eq!(serde_json::to_string(&s).expect("json"), "\"<redacted>\"");
        assert_eq!(s.expose(), "hunter2-hunter2-hunter2");
    }

    #[test]
    fn sizes_show_in_their_unit() {
        let json = |v: serde_json::Result<String>| v.expect("json");
        assert_eq!(
            json(serde_json::to_string(&Size::<MB>::from_bytes(256 * MB))),
            "256"
        );
        assert_eq!(
            json(serde_json::to_string(&Size::<MB>::from_bytes(MB + 1))),
            "\"1048577B\""
        );
        assert_eq!(
            json(serde_json::to_string(&Size::<1>::from_bytes(25 * MB))),
            "26214400"
        );
    }
}
