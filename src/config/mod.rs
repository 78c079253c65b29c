//! Configuration: every key declared once (`groups.rs`), layered through figment (`layers.rs`):
//! built-in defaults (`config/default.toml`, embedded) < `config/{env}.toml` (or the seed's `.json`,
//! read by `seed.rs`) chosen by `-e/--environment`, or `--config FILE` < `IMAGE_SERVER_{KEY}`
//! environment variables < command-line flags; each value read into a built type (`de.rs`,
//! `values.rs`) and the rules between keys checked in one place (`check.rs`). The result is a
//! [`Loaded`]: the checked [`Config`], where each value came from, and what the operator should be
//! told. Nothing else in the crate reads files or the environment for settings, and nothing else
//! checks a setting again (docs/configuration.md).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::image::DecodeLimits;
use crate::request::{DefaultQuality, Rules};

mod check;
mod de;
mod groups;
mod layers;
mod seed;
#[cfg(test)]
mod tests;
mod values;

pub use self::groups::{
    Caching, Capacity, Limits, Listen, Logging, Originals, Prerender, Rendering, Requests,
    S3Config, Security, Statsd, Timeouts, Uploads,
};
pub use self::layers::{
    env_var, load, load_from, load_layers, FileSource, DEFAULT_TOML, ENV_PREFIX,
};
pub use self::values::{Secret, Size, SourceDomain, SourcePath, StoreKind, StoreUrl, KB, MB};

/// The checked configuration, one field per group of keys. Every value is already checked and
/// built (a store URL is a [`StoreUrl`], a size a [`Size`]); values that follow from others are
/// resolved (`processing_concurrency = 0` is the number of cores here).
#[derive(Clone, Debug, Serialize)]
pub struct Config {
    /// Where the ports listen.
    #[serde(flatten)]
    pub listen: Listen,
    /// Where originals come from.
    #[serde(flatten)]
    pub originals: Originals,
    /// S3 settings of `s3://` stores.
    #[serde(flatten)]
    pub s3: S3Config,
    /// What a URL may ask for.
    #[serde(flatten)]
    pub requests: Requests,
    /// How results are encoded.
    #[serde(flatten)]
    pub rendering: Rendering,
    /// Limits on originals.
    #[serde(flatten)]
    pub limits: Limits,
    /// Work at once, and its memory.
    #[serde(flatten)]
    pub capacity: Capacity,
    /// Background renders of popular versions.
    #[serde(flatten)]
    pub prerender: Prerender,
    /// Memory caches and the result store.
    #[serde(flatten)]
    pub caching: Caching,
    /// Deadlines.
    #[serde(flatten)]
    pub timeouts: Timeouts,
    /// statsd.
    #[serde(flatten)]
    pub statsd: Statsd,
    /// `?source=`, URL signing, the purge token.
    #[serde(flatten)]
    pub security: Security,
    /// Uploads and deletes of originals.
    #[serde(flatten)]
    pub uploads: Uploads,
    /// Logs.
    #[serde(flatten)]
    pub logging: Logging,
}

/// Every key, in declaration order: the field names of the groups of [`Config`].
pub fn keys() -> Vec<&'static str> {
    [
        field_names::<Listen>(),
        field_names::<Originals>(),
        field_names::<S3Config>(),
        field_names::<Requests>(),
        field_names::<Rendering>(),
        field_names::<Limits>(),
        field_names::<Capacity>(),
        field_names::<Prerender>(),
        field_names::<Caching>(),
        field_names::<Timeouts>(),
        field_names::<Statsd>(),
        field_names::<Security>(),
        field_names::<Uploads>(),
        field_names::<Logging>(),
    ]
    .concat()
}

/// The keys a group reads, as serde names them: asks its `Deserialize` for the struct's fields.
fn field_names<T: serde::de::DeserializeOwned>() -> &'static [&'static str] {
    use serde::de::{self, Visitor};

    struct Fields<'a>(&'a mut &'static [&'static str]);

    impl<'de> de::Deserializer<'de> for Fields<'_> {
        type Error = de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("not a group of keys"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(de::Error::custom("fields read"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }

    let mut fields: &'static [&'static str] = &[];
    // The error is the point: the struct named its fields and stopped there.
    let _ = T::deserialize(Fields(&mut fields));
    fields
}

/// A loaded configuration: the checked [`Config`], where each key's value came from, and what the
/// operator should be told about the files (`main` logs them at start-up; `check-config` prints
/// them).
#[derive(Debug)]
pub struct Loaded {
    /// The checked configuration.
    pub config: Config,
    /// Something in the configuration is ignored or was guessed (a seed-only key, a second file).
    pub warnings: Vec<String>,
    /// Something was derived as documented (`local_base_path` as the result store).
    pub notes: Vec<String>,
    /// Key → where its value came from: `default`, a file path, an environment variable, a flag.
    pub origins: BTreeMap<&'static str, String>,
}

impl Loaded {
    /// Every key in declaration order with the value in force and where it came from, for
    /// `check-config --print`. Secrets show as `<redacted>`.
    pub fn settings(&self) -> Vec<(&'static str, serde_json::Value, String)> {
        let serde_json::Value::Object(mut values) = self.config.describe() else {
            return Vec::new();
        };
        keys()
            .into_iter()
            .map(|key| {
                let value = values.remove(key).unwrap_or_default();
                let origin = self.origins.get(key).cloned().unwrap_or_default();
                (key, value, origin)
            })
            .collect()
    }

    /// [`Loaded::settings`] as a JSON object, one key per line:
    /// `"server_port": {"value": 7000, "origin": "default"}`.
    pub fn settings_json(&self) -> String {
        let lines: Vec<String> = self
            .settings()
            .into_iter()
            .map(|(key, value, origin)| {
                let (key, origin) = (
                    serde_json::Value::from(key),
                    serde_json::Value::from(origin),
                );
                format!("  {key}: {{\"value\": {value}, \"origin\": {origin}}}")
            })
            .collect();
        format!("{{\n{}\n}}", lines.join(",\n"))
    }
}

// ---------------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------------

/// Why the configuration could not be loaded. Every message names the file, variable or key at
/// fault; none repeats a secret.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A config file exists (or was named with `--config`) but could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file is missing or is not valid TOML/JSON, or an environment variable is unusable.
    #[error("{origin}: {message}")]
    Malformed {
        /// The file or variable.
        origin: String,
        /// What is wrong with it.
        message: String,
    },
    /// A key no version of the configuration knows.
    #[error("unknown key `{key}` in {origin}{}", suggestion_suffix(.suggestion))]
    UnknownKey {
        /// The key as written (lower case).
        key: String,
        /// Where it was set: a file, an environment variable or a flag.
        origin: String,
        /// A known key whose name is close, if one is.
        suggestion: Option<String>,
    },
    /// A value out of range, of the wrong type, or inconsistent with another key.
    #[error("{key}: {message}{}", origin_suffix(.origin))]
    Invalid {
        /// The key (for rules between two keys, both, comma-separated).
        key: String,
        /// What is wrong, with the value when it is not a secret.
        message: String,
        /// The layer that set the value, when it was not the built-in default.
        origin: Option<String>,
    },
}

fn origin_suffix(origin: &Option<String>) -> String {
    match origin {
        Some(o) => format!(" (set in {o})"),
        None => String::new(),
    }
}

fn suggestion_suffix(suggestion: &Option<String>) -> String {
    match suggestion {
        Some(s) => format!("; did you mean `{s}`?"),
        None => String::new(),
    }
}

impl ConfigError {
    /// The key the error is about, if it is about one key.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::UnknownKey { key, .. } | ConfigError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Views for the other modules
// ---------------------------------------------------------------------------------------------------

impl Config {
    /// The URL rules of [`crate::request::ImageRequest::parse`].
    pub fn rules(&self) -> Rules {
        let r = &self.requests;
        Rules {
            maximum_width: r.maximum_width,
            maximum_height: r.maximum_height,
            whitelist: r.whitelisted_extensions.clone(),
            default_quality: self.default_quality(),
            allowed_sizes: Some(r.allowed_sizes.clone()).filter(|s| !s.is_empty()),
            named: r.named_versions.clone(),
        }
    }

    /// The default quality per lossy format (`default_quality`, `webp_quality`, `avif_quality`).
    pub fn default_quality(&self) -> DefaultQuality {
        DefaultQuality {
            jpeg: self.rendering.default_quality,
            webp: self.rendering.webp_quality,
            avif: self.rendering.avif_quality,
        }
    }

    /// The limits checked on an original's header before decoding.
    pub fn decode_limits(&self) -> DecodeLimits {
        DecodeLimits {
            max_pixels: self.limits.max_source_pixels,
            max_side: self.limits.max_source_side,
            accept_avif_input: self.rendering.accept_avif_input,
            max_jpeg_scans: self.limits.max_jpeg_scans,
        }
    }

    /// The settings in force, one entry per key, for the status page and `check-config --print`:
    /// sizes in the key's unit, durations as `10s`, secrets as `<redacted>`, credentials removed
    /// from `source_domain`.
    pub fn describe(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}
