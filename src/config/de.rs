//! Reading one key's value: the functions the key declarations (`groups.rs`) name in
//! `#[serde(deserialize_with = …)]` or `#[serde(with = …)]`. Each takes whatever the layer gave
//! (TOML, JSON, or text from an environment variable or flag) as a [`Raw`] value and either builds
//! the key's type or returns the message for that key; figment adds the key and the layer it came
//! from. Messages never repeat a secret.

use std::time::Duration;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serializer};

use super::values::{
    host_name, parse_colour, parse_duration, parse_size, FromText, Secret, Size, StoreUrl,
};
use crate::image::Gravity;
use crate::request::{Format, Rules};

/// Timeouts beyond a day are typos; they also keep `Instant + timeout` far from overflow.
const MAX_TIMEOUT: Duration = Duration::from_secs(86_400);
/// A negative-cache TTL (and 4xx max-age) of more than a year is a typo.
const MAX_TTL: Duration = Duration::from_secs(365 * 86_400);
/// A secret shorter than this is guessable.
const MIN_SECRET_LEN: usize = 16;

/// A value as a layer gave it, before it is read as the key's type.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Raw {
    /// An integer.
    Int(i128),
    /// A number with a fraction.
    Float(f64),
    /// `true` or `false`.
    Bool(bool),
    /// Text (JSON `null` is never seen: the file reader drops it).
    Text(String),
    /// A list.
    List(Vec<Raw>),
    /// A table (`named_versions`), its entries in order.
    Table(Vec<(String, Raw)>),
}

impl Raw {
    /// The value for a message: text quoted, lists and tables named, never long.
    pub(super) fn show(&self) -> String {
        match self {
            Raw::Int(n) => n.to_string(),
            Raw::Float(f) => f.to_string(),
            Raw::Bool(b) => b.to_string(),
            Raw::Text(s) => format!("{s:?}"),
            Raw::List(_) => "a list".to_owned(),
            Raw::Table(_) => "a table".to_owned(),
        }
    }
}

impl<'de> Deserialize<'de> for Raw {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Raw, D::Error> {
        d.deserialize_any(RawVisitor)
    }
}

struct RawVisitor;

impl<'de> Visitor<'de> for RawVisitor {
    type Value = Raw;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a configuration value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Raw, E> {
        Ok(Raw::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Raw, E> {
        Ok(Raw::Int(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Raw, E> {
        Ok(Raw::Int(v.into()))
    }
    fn visit_i128<E>(self, v: i128) -> Result<Raw, E> {
        Ok(Raw::Int(v))
    }
    fn visit_u128<E>(self, v: u128) -> Result<Raw, E> {
        Ok(i128::try_from(v).map_or(Raw::Float(v as f64), Raw::Int))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Raw, E> {
        Ok(Raw::Float(v))
    }
    fn visit_char<E>(self, v: char) -> Result<Raw, E> {
        Ok(Raw::Text(v.to_string()))
    }
    fn visit_str<E>(self, v: &str) -> Result<Raw, E> {
        Ok(Raw::Text(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Raw, E> {
        Ok(Raw::Text(v))
    }
    fn visit_unit<E>(self) -> Result<Raw, E> {
        Ok(Raw::Text(String::new()))
    }
    fn visit_none<E>(self) -> Result<Raw, E> {
        Ok(Raw::Text(String::new()))
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Raw, D::Error> {
        d.deserialize_any(RawVisitor)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Raw, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Raw>()? {
            items.push(item);
        }
        Ok(Raw::List(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Raw, A::Error> {
        let mut entries = Vec::new();
        while let Some((key, value)) = map.next_entry::<String, Raw>()? {
            entries.push((key, value));
        }
        Ok(Raw::Table(entries))
    }
}

/// Reads a [`Raw`] and turns it into `T` with `read`, whose error becomes the key's message.
fn read<'de, D, T>(d: D, read: impl FnOnce(Raw) -> Result<T, String>) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    read(Raw::deserialize(d)?).map_err(de::Error::custom)
}

// ---------------------------------------------------------------------------------------------------
// Scalars
// ---------------------------------------------------------------------------------------------------

fn integer(raw: &Raw, min: i64, max: i64) -> Result<i128, String> {
    let n = match raw {
        Raw::Int(n) => *n,
        // The seed wrote ports as JSON strings ("7000"); environment values arrive as text too.
        Raw::Text(s) => s
            .trim()
            .parse()
            .map_err(|_| format!("expected an integer, got {s:?}"))?,
        other => return Err(format!("expected an integer, got {}", other.show())),
    };
    if n < i128::from(min) || n > i128::from(max) {
        return Err(format!("must be between {min} and {max}, got {n}"));
    }
    Ok(n)
}

/// An integer in `MIN..=MAX` (text holding one is accepted, as the seed wrote `"7000"`).
pub(super) fn int<'de, D, T, const MIN: i64, const MAX: i64>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<i128>,
{
    read(d, |raw| {
        let n = integer(&raw, MIN, MAX)?;
        T::try_from(n).map_err(|_| format!("{n} does not fit this platform"))
    })
}

/// `true` or `false` (also as text, in any case).
pub(super) fn boolean<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    read(d, |raw| match &raw {
        Raw::Bool(b) => Ok(*b),
        Raw::Text(s) if s.trim().eq_ignore_ascii_case("true") => Ok(true),
        Raw::Text(s) if s.trim().eq_ignore_ascii_case("false") => Ok(false),
        other => Err(format!("expected true or false, got {}", other.show())),
    })
}

/// Text, verbatim. The message never shows the value, since secrets are read this way too.
fn raw_text(raw: Raw) -> Result<String, String> {
    match raw {
        Raw::Text(s) => Ok(s),
        Raw::List(_) | Raw::Table(_) => Err(format!("expected a string, got {}", raw.show())),
        _ => Err("expected a string (in quotes)".to_owned()),
    }
}

/// Text, trimmed and read as `T`.
pub(super) fn parsed<'de, D: Deserializer<'de>, T: FromText>(d: D) -> Result<T, D::Error> {
    read(d, |raw| T::from_text(raw_text(raw)?.trim()))
}

/// Text read as `T`; empty means not set.
pub(super) fn optional<'de, D: Deserializer<'de>, T: FromText>(
    d: D,
) -> Result<Option<T>, D::Error> {
    read(d, |raw| {
        let text = raw_text(raw)?;
        match text.trim() {
            "" => Ok(None),
            t => T::from_text(t).map(Some),
        }
    })
}

/// `result_store`: an object-store URL, or `none` (any case) or empty for no shared tier.
pub(super) fn result_store<'de, D: Deserializer<'de>>(d: D) -> Result<Option<StoreUrl>, D::Error> {
    read(d, |raw| {
        let text = raw_text(raw)?;
        match text.trim() {
            "" => Ok(None),
            t if t.eq_ignore_ascii_case("none") => Ok(None),
            t => StoreUrl::parse(t).map(Some),
        }
    })
}

/// A secret, verbatim; empty means not set.
pub(super) fn secret<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Secret>, D::Error> {
    read(d, |raw| {
        let s = raw_text(raw)?;
        Ok((!s.is_empty()).then(|| Secret::from(s)))
    })
}

/// A secret someone could otherwise guess: at least 16 characters, or empty to turn its feature off.
pub(super) fn strong_secret<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Secret>, D::Error> {
    let secret = secret(d)?;
    if secret
        .as_ref()
        .is_some_and(|s| s.expose().chars().count() < MIN_SECRET_LEN)
    {
        return Err(de::Error::custom(format!(
            "must be at least {MIN_SECRET_LEN} characters (or empty to disable)"
        )));
    }
    Ok(secret)
}

// ---------------------------------------------------------------------------------------------------
// Lists
// ---------------------------------------------------------------------------------------------------

/// The items of a list key as text: trimmed, empty ones dropped; text is read as `a,b,c`.
fn items(raw: Raw) -> Result<Vec<String>, String> {
    let items: Vec<String> = match raw {
        Raw::Text(s) => s.split(',').map(str::to_owned).collect(),
        Raw::List(items) => items
            .into_iter()
            .map(|item| match item {
                Raw::Text(s) => Ok(s),
                other => Err(format!(
                    "expected a list of strings, found {}",
                    other.show()
                )),
            })
            .collect::<Result<_, _>>()?,
        other => return Err(format!("expected a list, got {}", other.show())),
    };
    Ok(items
        .iter()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect())
}

/// A list of strings, trimmed, each once (text: comma-separated).
pub(super) fn list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    read(d, |raw| {
        let mut out = Vec::new();
        for item in items(raw)? {
            if !out.contains(&item) {
                out.push(item);
            }
        }
        Ok(out)
    })
}

/// Web origins as browsers send them in `Origin`: `scheme://host[:port]`, lower-cased, no path.
pub(super) fn web_origins<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    read(d, |raw| {
        let mut out = Vec::new();
        for item in items(raw)? {
            let bad = || format!("expected origins such as https://app.example.com, got {item:?}");
            let url = url::Url::parse(&item).map_err(|_| bad())?;
            let plain = matches!(url.scheme(), "http" | "https")
                && url.host_str().is_some()
                && url.username().is_empty()
                && url.password().is_none()
                && url.path() == "/"
                && url.query().is_none()
                && url.fragment().is_none()
                && !item.trim_end_matches('/').ends_with(':');
            if !plain {
                return Err(bad());
            }
            let origin = url.origin().ascii_serialization();
            if !out.contains(&origin) {
                out.push(origin);
            }
        }
        Ok(out)
    })
}

/// Host names, lower-cased, each once (`allowed_source_hosts`, `source_redirect_hosts`).
pub(super) fn hosts<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    read(d, |raw| {
        let mut hosts = Vec::new();
        for item in items(raw)? {
            let host = host_name(&item).ok_or_else(|| {
                format!("expected host names (no scheme, port or path), got {item:?}")
            })?;
            if !hosts.contains(&host) {
                hosts.push(host);
            }
        }
        Ok(hosts)
    })
}

/// HTTP status codes of failures (400–599), each once, as numbers or text.
pub(super) fn statuses<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u16>, D::Error> {
    read(d, |raw| {
        let list = match raw {
            Raw::List(list) => list,
            Raw::Text(s) => s
                .split(',')
                .filter(|p| !p.trim().is_empty())
                .map(|p| Raw::Text(p.to_owned()))
                .collect(),
            other => return Err(format!("expected a list of statuses, got {}", other.show())),
        };
        let mut out = Vec::new();
        for item in &list {
            let status = integer(item, 400, 599)
                .map_err(|m| format!("each status {m} (a client or server error)"))?;
            let status = u16::try_from(status).map_err(|_| format!("{status} is not a status"))?;
            if !out.contains(&status) {
                out.push(status);
            }
        }
        Ok(out)
    })
}

/// Version names (`allowed_sizes`), in the parser's canonical form (`x300` is `300x300`), each once.
/// Whether they fit `maximum_width` × `maximum_height` is checked with the other keys.
pub(super) fn version_names<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    read(d, |raw| {
        let mut names = Vec::new();
        for name in items(raw)? {
            let version = crate::request::parse_version_name(&name).map_err(|_| {
                format!(
                    "{name:?} is not a version name (such as w200, h200, 300x400, x300, full_size)"
                )
            })?;
            let canonical = version.to_string();
            if !names.contains(&canonical) {
                names.push(canonical);
            }
        }
        Ok(names)
    })
}

/// `named_versions`: a table of `name = "version file"` (`thumb = "x150.jpg"`), or text
/// `thumb=x150.jpg,card=300x400.jpg` (environment, flags). Names are 1–32 of `[A-Za-z0-9_-]`; each
/// file must have the form of an image URL's last segment. Whether the rules allow it is checked
/// with the other keys.
pub(super) fn named_versions<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<std::collections::BTreeMap<String, String>, D::Error> {
    read(d, |raw| {
        let entries: Vec<(String, Raw)> = match raw {
            Raw::Table(entries) => entries,
            Raw::List(list) if list.is_empty() => Vec::new(),
            Raw::Text(text) => {
                let mut entries = Vec::new();
                for pair in text.split(',').filter(|p| !p.trim().is_empty()) {
                    let (name, file) = pair.split_once('=').ok_or_else(|| {
                        format!("expected name=version pairs such as thumb=x150.jpg, got {pair:?}")
                    })?;
                    entries.push((name.trim().to_owned(), Raw::Text(file.trim().to_owned())));
                }
                entries
            }
            other => {
                return Err(format!(
                    "expected a table such as {{ thumb = \"x150.jpg\" }}, got {}",
                    other.show()
                ))
            }
        };
        let mut named = std::collections::BTreeMap::new();
        for (name, file) in entries {
            let valid_name = (1..=32).contains(&name.len())
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !valid_name {
                return Err(format!(
                    "{name:?} is not a version name (1 to 32 letters, digits, _ or -)"
                ));
            }
            let Raw::Text(file) = file else {
                return Err(format!(
                    "{name}: expected a version file such as \"x150.jpg\""
                ));
            };
            let file = file.trim().to_owned();
            if crate::request::ImageRequest::parse(&format!("/m/t/i/{file}"), &Rules::lenient())
                .is_err()
            {
                return Err(format!(
                    "{name} = {file:?} is not a version file (such as x150.jpg or w1200-q85.jpg)"
                ));
            }
            named.insert(name, file);
        }
        Ok(named)
    })
}

/// `whitelisted_extensions`: formats by extension (`jpeg` is `jpg`), at least one; shown as
/// extensions.
pub(super) mod extensions {
    use super::*;

    pub(in crate::config) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<Format>, D::Error> {
        read(d, |raw| {
            let mut formats = Vec::new();
            for ext in items(raw)? {
                let format = Format::from_ext(&ext.to_ascii_lowercase()).ok_or_else(|| {
                    format!(
                        "unknown extension {ext:?} (expected jpg, jpeg, png, webp, avif or gif)"
                    )
                })?;
                if !formats.contains(&format) {
                    formats.push(format);
                }
            }
            if formats.is_empty() {
                return Err("must list at least one extension".to_owned());
            }
            Ok(formats)
        })
    }

    pub(in crate::config) fn serialize<S: Serializer>(
        formats: &[Format],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(formats.iter().map(|f| f.ext()))
    }
}

// ---------------------------------------------------------------------------------------------------
// Rendering words
// ---------------------------------------------------------------------------------------------------

/// `crop_gravity`: `centre` (or `center`), `attention`, `entropy`.
pub(super) mod gravity {
    use super::*;

    pub(in crate::config) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Gravity, D::Error> {
        read(d, |raw| {
            let s = raw_text(raw)?;
            match s.trim().to_ascii_lowercase().as_str() {
                "centre" | "center" => Ok(Gravity::Centre),
                "attention" => Ok(Gravity::Attention),
                "entropy" => Ok(Gravity::Entropy),
                _ => Err(format!(
                    "expected centre, center, attention or entropy, got {s:?}"
                )),
            }
        })
    }

    pub(in crate::config) fn serialize<S: Serializer>(
        g: &Gravity,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(match g {
            Gravity::Centre => "centre",
            Gravity::Attention => "attention",
            Gravity::Entropy => "entropy",
        })
    }
}

/// `background`: `white`, `black`, `#rrggbb`, `#rgb`, `r,g,b` or a list `[r, g, b]`; shown as
/// `#rrggbb`.
pub(super) mod colour {
    use super::*;

    const EXPECTED: &str = "expected white, black, #rrggbb or r,g,b (0-255 each)";

    pub(in crate::config) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<[u8; 3], D::Error> {
        read(d, |raw| match raw {
            Raw::List(items) if items.len() == 3 => {
                let mut rgb = [0u8; 3];
                for (slot, item) in rgb.iter_mut().zip(&items) {
                    *slot = u8::try_from(
                        integer(item, 0, 255).map_err(|m| format!("{EXPECTED}: {m}"))?,
                    )
                    .map_err(|_| EXPECTED.to_owned())?;
                }
                Ok(rgb)
            }
            other => {
                let s = raw_text(other)?;
                parse_colour(&s).ok_or_else(|| format!("{EXPECTED}, got {s:?}"))
            }
        })
    }

    pub(in crate::config) fn serialize<S: Serializer>(
        [r, g, b]: &[u8; 3],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("#{r:02x}{g:02x}{b:02x}"))
    }
}

// ---------------------------------------------------------------------------------------------------
// Durations and sizes
// ---------------------------------------------------------------------------------------------------

fn duration(raw: Raw, allow_zero: bool, max: Duration) -> Result<Duration, String> {
    let expected = "expected a duration such as 10s, 500ms or 2m";
    let d = match &raw {
        Raw::Int(n) => u64::try_from(*n)
            .map(Duration::from_secs)
            .map_err(|_| format!("{expected}, got {n}"))?,
        Raw::Text(s) => parse_duration(s).ok_or_else(|| format!("{expected}, got {s:?}"))?,
        other => return Err(format!("{expected}, got {}", other.show())),
    };
    if d.is_zero() && !allow_zero {
        return Err("must be greater than zero".to_owned());
    }
    if d > max {
        return Err(format!(
            "must be at most {}, got {}",
            humantime::format_duration(max),
            humantime::format_duration(d)
        ));
    }
    Ok(d)
}

/// Shows a duration as humantime writes it (`10s`, `1m 15s`), which reads back the same.
pub(super) fn show_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

/// A timeout: above zero, at most a day.
pub(super) mod timeout {
    use super::*;

    pub(in crate::config) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Duration, D::Error> {
        read(d, |raw| duration(raw, false, MAX_TIMEOUT))
    }

    pub(in crate::config) use super::show_duration as serialize;
}

/// A grace period: zero to a day.
pub(super) mod grace {
    use super::*;

    pub(in crate::config) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Duration, D::Error> {
        read(d, |raw| duration(raw, true, MAX_TIMEOUT))
    }

    pub(in crate::config) use super::show_duration as serialize;
}

/// A period: above zero, at most a year.
pub(super) mod period {
    use super::*;

    pub(in crate::config) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Duration, D::Error> {
        read(d, |raw| duration(raw, false, MAX_TTL))
    }

    pub(in crate::config) use super::show_duration as serialize;
}

/// A time to live: zero to a year.
pub(super) mod ttl {
    use super::*;

    pub(in crate::config) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Duration, D::Error> {
        read(d, |raw| duration(raw, true, MAX_TTL))
    }

    pub(in crate::config) use super::show_duration as serialize;
}

/// A size of at least `MIN` bytes: an integer counts the key's `UNIT`, text may name its unit.
pub(super) fn size<'de, D, const UNIT: u64, const MIN: u64>(d: D) -> Result<Size<UNIT>, D::Error>
where
    D: Deserializer<'de>,
{
    read(d, |raw| {
        let bytes = match &raw {
            Raw::Int(n) => u64::try_from(*n).ok().and_then(|n| n.checked_mul(UNIT)),
            Raw::Text(s) => parse_size(s, UNIT),
            _ => None,
        }
        .ok_or_else(|| {
            format!(
                "expected a size such as 256, \"25MB\" or \"512KB\", got {}",
                raw.show()
            )
        })?;
        if bytes < MIN {
            return Err(format!("must be at least {MIN} bytes, got {bytes}"));
        }
        Ok(Size::from_bytes(bytes))
    })
}

// ---------------------------------------------------------------------------------------------------
// Key-specific text
// ---------------------------------------------------------------------------------------------------

/// Text that must not be empty (`s3_region`).
pub(super) fn required_text<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    read(d, |raw| match raw_text(raw)?.trim() {
        "" => Err("must not be empty".to_owned()),
        t => Ok(t.to_owned()),
    })
}

/// `s3_endpoint`: an `http://` or `https://` URL, or empty for AWS.
pub(super) fn endpoint<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    read(d, |raw| {
        let text = raw_text(raw)?.trim().to_owned();
        if text.is_empty() {
            return Ok(None);
        }
        url::Url::parse(&text)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
            .map(|_| Some(text.clone()))
            .ok_or_else(|| format!("expected an http:// or https:// URL, got {text:?}"))
    })
}

/// `cache_control`: a valid, non-empty header value.
pub(super) fn header_value<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    read(d, |raw| {
        let text = raw_text(raw)?.trim().to_owned();
        if text.is_empty() || http::HeaderValue::from_str(&text).is_err() {
            return Err(format!(
                "expected a Cache-Control header value, got {text:?}"
            ));
        }
        Ok(text)
    })
}

/// `statsd_host`: a host name or IP address; empty turns statsd off.
pub(super) fn statsd_host<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    read(d, |raw| {
        let text = raw_text(raw)?;
        if text.trim().is_empty() {
            return Ok(None);
        }
        host_name(&text).map(Some).ok_or_else(|| {
            format!("expected a host name or IP address (no scheme or port), got {text:?}")
        })
    })
}

/// `statsd_prefix`: letters, digits, `_`, `-` and inner dots.
pub(super) fn metric_prefix<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    read(d, |raw| {
        let p = raw_text(raw)?.trim().to_owned();
        if p.starts_with('.')
            || p.ends_with('.')
            || !p
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        {
            return Err(format!(
                "expected letters, digits, _, - and inner dots, got {p:?}"
            ));
        }
        Ok(p)
    })
}

/// `log_level`: a `tracing` filter such as `info` or `info,hyper=warn`.
pub(super) fn log_filter<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    read(d, |raw| {
        let level = raw_text(raw)?.trim().to_owned();
        if level.is_empty() {
            return Err("must not be empty".to_owned());
        }
        tracing_subscriber::EnvFilter::try_new(&level).map_err(|e| {
            format!("expected a log filter such as info or info,hyper=warn, got {level:?} ({e})")
        })?;
        Ok(level)
    })
}
