//! The value checks behind validation: integers in a range, booleans, texts, secrets, lists,
//! durations, sizes, colours, path templates, host names and store URLs, each error naming its key
//! and origin.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use toml::Value;

use super::*;

// ---------------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------------

pub(super) const KB: u64 = 1024;
pub(super) const MB: u64 = 1024 * KB;
/// Timeouts beyond a day are typos; they also keep `Instant + timeout` far from overflow.
pub(super) const MAX_TIMEOUT: Duration = Duration::from_secs(86_400);
/// A negative-cache TTL (and 4xx max-age) of more than a year is a typo.
pub(super) const MAX_TTL: Duration = Duration::from_secs(365 * 86_400);
/// libvips refuses coordinates above 10,000,000 (`VIPS_MAX_COORD`).
pub(super) const MAX_SIDE: i64 = 10_000_000;
/// A secret shorter than this is guessable.
pub(super) const MIN_SECRET_LEN: usize = 16;
/// Upper bound for pools and queues: far above any machine, low enough to catch a typo.
pub(super) const MAX_WORKERS: i64 = 65_536;

/// A value for messages: strings quoted, lists and tables named, never long.
pub(super) fn show(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        Value::Integer(n) => n.to_string(),
        Value::Float(f) => f.to_string(),
        Value::Boolean(b) => b.to_string(),
        Value::Datetime(d) => d.to_string(),
        Value::Array(_) => "a list".to_owned(),
        Value::Table(_) => "a table".to_owned(),
    }
}

/// Type-checking accessors that name the key (and the layer that set it) in every error.
pub(super) struct Check<'a> {
    pub(super) origins: &'a BTreeMap<String, String>,
}

impl Check<'_> {
    pub(super) fn err(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            key: key.to_owned(),
            message: message.into(),
            origin: self.origins.get(key).cloned(),
        }
    }

    pub(super) fn int(&self, key: &str, v: &Value, min: i64, max: i64) -> Result<i64, ConfigError> {
        let n = match v {
            Value::Integer(n) => *n,
            // The seed wrote ports as JSON strings ("7000").
            Value::String(s) => s
                .trim()
                .parse()
                .map_err(|_| self.err(key, format!("expected an integer, got {s:?}")))?,
            other => return Err(self.err(key, format!("expected an integer, got {}", show(other)))),
        };
        if n < min || n > max {
            return Err(self.err(key, format!("must be between {min} and {max}, got {n}")));
        }
        Ok(n)
    }

    pub(super) fn num<T: TryFrom<i64>>(
        &self,
        key: &str,
        v: &Value,
        min: i64,
        max: i64,
    ) -> Result<T, ConfigError> {
        let n = self.int(key, v, min, max)?;
        T::try_from(n).map_err(|_| self.err(key, format!("{n} does not fit this platform")))
    }

    pub(super) fn bool_of(v: &Value) -> Option<bool> {
        match v {
            Value::Boolean(b) => Some(*b),
            Value::String(s) if s.trim().eq_ignore_ascii_case("true") => Some(true),
            Value::String(s) if s.trim().eq_ignore_ascii_case("false") => Some(false),
            _ => None,
        }
    }

    pub(super) fn boolean(&self, key: &str, v: &Value) -> Result<bool, ConfigError> {
        Check::bool_of(v)
            .ok_or_else(|| self.err(key, format!("expected true or false, got {}", show(v))))
    }

    /// A string, verbatim. The message never shows the value (this reads secrets too).
    pub(super) fn raw_text(&self, key: &str, v: &Value) -> Result<String, ConfigError> {
        match v {
            Value::String(s) => Ok(s.clone()),
            Value::Array(_) | Value::Table(_) => {
                Err(self.err(key, format!("expected a string, got {}", show(v))))
            }
            _ => Err(self.err(key, "expected a string (in quotes)")),
        }
    }

    /// A string, trimmed.
    pub(super) fn text(&self, key: &str, v: &Value) -> Result<String, ConfigError> {
        Ok(self.raw_text(key, v)?.trim().to_owned())
    }

    /// A trimmed string; empty means not set.
    pub(super) fn opt_text(&self, key: &str, v: &Value) -> Result<Option<String>, ConfigError> {
        Ok(Some(self.text(key, v)?).filter(|s| !s.is_empty()))
    }

    /// A secret: verbatim, empty means not set, at least [`MIN_SECRET_LEN`] characters.
    pub(super) fn secret(&self, key: &str, v: &Value) -> Result<Option<String>, ConfigError> {
        let s = self.raw_text(key, v)?;
        if s.is_empty() {
            return Ok(None);
        }
        if s.chars().count() < MIN_SECRET_LEN {
            return Err(self.err(
                key,
                format!("must be at least {MIN_SECRET_LEN} characters (or empty to disable)"),
            ));
        }
        Ok(Some(s))
    }

    /// A list of strings (trimmed, empty items dropped); a string is read as `a,b,c`.
    pub(super) fn list(&self, key: &str, v: &Value) -> Result<Vec<String>, ConfigError> {
        let items: Vec<String> = match v {
            Value::String(s) => s.split(',').map(str::to_owned).collect(),
            Value::Array(items) => items
                .iter()
                .map(|item| match item {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(self.err(
                        key,
                        format!("expected a list of strings, found {}", show(other)),
                    )),
                })
                .collect::<Result<_, _>>()?,
            other => {
                return Err(self.err(key, format!("expected a list, got {}", show(other))));
            }
        };
        Ok(items
            .iter()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect())
    }

    /// A duration: an integer is seconds, text uses units (`500ms`, `10s`, `2m`, `1m30s`).
    pub(super) fn duration(
        &self,
        key: &str,
        v: &Value,
        allow_zero: bool,
        max: Duration,
    ) -> Result<Duration, ConfigError> {
        let d = match v {
            Value::Integer(n) if *n >= 0 => Duration::from_secs(n.unsigned_abs()),
            Value::String(s) => parse_duration(s).ok_or_else(|| {
                self.err(
                    key,
                    format!("expected a duration such as 10s, 500ms or 2m, got {s:?}"),
                )
            })?,
            other => {
                return Err(self.err(
                    key,
                    format!(
                        "expected a duration such as 10s, 500ms or 2m, got {}",
                        show(other)
                    ),
                ))
            }
        };
        if d.is_zero() && !allow_zero {
            return Err(self.err(key, "must be greater than zero"));
        }
        if d > max {
            return Err(self.err(
                key,
                format!("must be at most {}s, got {}s", max.as_secs(), d.as_secs()),
            ));
        }
        Ok(d)
    }

    /// A size in bytes: an integer counts `unit`s (the key's `_mb`/`_kb`/`_bytes`), text may
    /// name its unit (`25MB`, `512 KB`).
    pub(super) fn size(
        &self,
        key: &str,
        v: &Value,
        unit: u64,
        min: u64,
    ) -> Result<u64, ConfigError> {
        let bytes = match v {
            Value::Integer(n) if *n >= 0 => n.unsigned_abs().checked_mul(unit),
            Value::String(s) => parse_size(s, unit),
            _ => None,
        }
        .ok_or_else(|| {
            self.err(
                key,
                format!(
                    "expected a size such as 256, \"25MB\" or \"512KB\", got {}",
                    show(v)
                ),
            )
        })?;
        if bytes < min {
            return Err(self.err(key, format!("must be at least {min} bytes, got {bytes}")));
        }
        Ok(bytes)
    }

    /// An object-store URL (`file`, `s3`, `gs`, `az`, `memory`), with relative `file://./dir` and
    /// `file://dir` resolved against the working directory; `allow_none` also maps `none` to `None`.
    pub(super) fn store_url(
        &self,
        key: &str,
        v: &Value,
        allow_none: bool,
    ) -> Result<Option<String>, ConfigError> {
        let Some(s) = self.opt_text(key, v)? else {
            return Ok(None);
        };
        if allow_none && s.eq_ignore_ascii_case("none") {
            return Ok(None);
        }
        if let Some(rest) = s.strip_prefix("file://").filter(|r| !r.starts_with('/')) {
            let cwd = std::env::current_dir().map_err(|e| {
                self.err(
                    key,
                    format!("cannot resolve {s:?}: no working directory: {e}"),
                )
            })?;
            let path = normalize(&cwd.join(rest));
            let url = url::Url::from_file_path(&path)
                .map_err(|()| self.err(key, format!("cannot make a file URL of {s:?}")))?;
            return Ok(Some(url.to_string()));
        }
        let url = url::Url::parse(&s).map_err(|e| {
            self.err(
                key,
                format!("expected an object-store URL such as s3://bucket/prefix or file:///dir, got {s:?} ({e})"),
            )
        })?;
        if !url.username().is_empty() || url.password().is_some() {
            // Credentials belong in their own keys, not in a URL that is logged and displayed.
            return Err(self.err(key, "must not carry credentials; use the s3_* keys"));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(self.err(key, format!("must not have a query or fragment, got {s:?}")));
        }
        match url.scheme() {
            "file" => {
                if url.host_str().is_some_and(|h| !h.is_empty()) || url.to_file_path().is_err() {
                    return Err(self.err(
                        key,
                        format!(
                            "expected file:///absolute/dir or file://./relative/dir, got {s:?}"
                        ),
                    ));
                }
            }
            "s3" | "gs" | "az" | "azure" => {
                if url.host_str().is_none_or(str::is_empty) {
                    return Err(self.err(
                        key,
                        format!(
                            "{}:// needs a bucket, e.g. {}://bucket/prefix",
                            url.scheme(),
                            url.scheme()
                        ),
                    ));
                }
            }
            "memory" => {}
            other => {
                return Err(self.err(
                    key,
                    format!("scheme must be one of file, s3, gs, az, memory; got {other:?}"),
                ))
            }
        }
        Ok(Some(url.to_string()))
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

/// `10`, `10s`, `500ms`, `2m`, `1h`, `1d`, `1m30s` (whitespace between parts allowed).
pub(super) fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().ok().map(Duration::from_secs);
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = rest[digits..].trim_start();
        let letters = rest
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(rest.len());
        let part = match &rest[..letters] {
            "ms" => Duration::from_millis(n),
            "s" | "sec" | "secs" => Duration::from_secs(n),
            "m" | "min" | "mins" => Duration::from_secs(n.checked_mul(60)?),
            "h" => Duration::from_secs(n.checked_mul(3_600)?),
            "d" => Duration::from_secs(n.checked_mul(86_400)?),
            _ => return None,
        };
        total = total.checked_add(part)?;
        rest = rest[letters..].trim_start();
    }
    Some(total)
}

/// `256` (in `unit`s), `25MB`, `25 MiB`, `512KB`, `1GB`, `100B`. Units are binary (1 KB = 1024 B).
pub(super) fn parse_size(s: &str, unit: u64) -> Option<u64> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if digits == 0 {
        return None;
    }
    let n: u64 = s[..digits].parse().ok()?;
    let factor = match s[digits..].trim().to_ascii_lowercase().as_str() {
        "" => unit,
        "b" => 1,
        "k" | "kb" | "kib" => KB,
        "m" | "mb" | "mib" => MB,
        "g" | "gb" | "gib" => 1024 * MB,
        _ => return None,
    };
    n.checked_mul(factor)
}

/// `white`, `black`, `#rrggbb`, `#rgb`, `r,g,b`.
pub(super) fn parse_colour(s: &str) -> Option<[u8; 3]> {
    let s = s.trim().to_ascii_lowercase();
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

/// `source_path`: not empty, `{id}` present (else every id maps to one original), and braces
/// only in `{model}`, `{type}`, `{id}`.
pub(super) fn check_template(template: &str) -> Result<(), String> {
    if template.trim_matches('/').is_empty() {
        return Err("must not be empty".to_owned());
    }
    if !template.contains("{id}") {
        return Err(format!("must contain {{id}}, got {template:?}"));
    }
    let rest = ["{model}", "{type}", "{id}"]
        .iter()
        .fold(template.to_owned(), |t, p| t.replace(p, ""));
    if rest.contains('{') || rest.contains('}') {
        return Err(format!(
            "may only use the placeholders {{model}}, {{type}} and {{id}}, got {template:?}"
        ));
    }
    Ok(())
}

/// A host name for `allowed_source_hosts` / `statsd_host`: lower-cased, letters, digits, `.`, `-`
/// (and `:` for IPv6 literals), no scheme, path or port.
pub(super) fn host_name(s: &str) -> Option<String> {
    let s = s.trim().trim_start_matches('.').to_ascii_lowercase();
    let ok = !s.is_empty()
        && (s.parse::<IpAddr>().is_ok()
            || s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_'));
    ok.then_some(s)
}
