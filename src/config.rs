//! Configuration: raw values from files, environment and flags become one validated [`Config`].
//!
//! Precedence (docs/configuration.md): built-in defaults (`config/default.toml`, embedded) < `config/{env}.toml`
//! (or the seed's `.json`) chosen by `-e/--environment`, or `--config FILE` < `IMAGE_SERVER_{KEY}`
//! environment variables < command-line flags. Nothing else in the crate reads files or the
//! environment for settings; sizes and durations are parsed here, once.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Value;

use crate::cli::GlobalOpts;
use crate::image::{DecodeLimits, Gravity};
use crate::request::{DefaultQuality, Format, Rules};

/// The validated configuration. Field names are the config keys.
#[derive(Clone, Debug)]
pub struct Config {
    /// `listen_address` (default `0.0.0.0`): the address both ports bind to.
    pub listen_address: std::net::IpAddr,
    /// `server_port` (7000).
    pub server_port: u16,
    /// `status_port` (7001).
    pub status_port: u16,
    /// `status_address` (default: `listen_address`): the address the status port binds to.
    pub status_address: std::net::IpAddr,
    /// `http2_max_concurrent_streams` (100).
    pub http2_max_concurrent_streams: u32,
    /// `source_domain`: HTTP(S) base URL of originals.
    pub source_domain: Option<url::Url>,
    /// `source_path`: template of the original's path/key (`{model}/{type}/{id}/original.jpg`).
    pub source_path: String,
    /// `source_store`: object-store URL of originals (`file:///dir`, `s3://bucket/prefix`, …).
    pub source_store: Option<String>,
    /// `result_store`: object-store URL for results, or `None` for `none`.
    pub result_store: Option<String>,
    /// S3 options shared by source and result stores.
    pub s3: S3Config,
    /// `whitelisted_extensions`, as formats.
    pub whitelisted_extensions: Vec<Format>,
    /// `maximum_width` (2048).
    pub maximum_width: u32,
    /// `maximum_height` (2048).
    pub maximum_height: u32,
    /// `default_quality` (JPEG, 75).
    pub default_quality: u8,
    /// `webp_quality` (75).
    pub webp_quality: u8,
    /// `avif_quality` (50).
    pub avif_quality: u8,
    /// `avif_effort` (2).
    pub avif_effort: u8,
    /// `avif_concurrency` (1).
    pub avif_concurrency: usize,
    /// `avif_queue_size` (4 × `avif_concurrency`): AVIF renders waiting in their own queue.
    pub avif_queue_size: usize,
    /// `max_avif_output_pixels` (2048 × 2048): larger AVIF outputs answer 406.
    pub max_avif_output_pixels: u64,
    /// `progressive_jpeg` (true).
    pub progressive_jpeg: bool,
    /// `crop_gravity` (centre).
    pub crop_gravity: Gravity,
    /// `enlarge` (true).
    pub enlarge: bool,
    /// `background` (white), RGB.
    pub background: [u8; 3],
    /// `auto_format` (false).
    pub auto_format: bool,
    /// `accept_avif_input` (false).
    pub accept_avif_input: bool,
    /// `allowed_sizes`: canonical version names, if restricted.
    pub allowed_sizes: Option<Vec<String>>,
    /// `max_source_bytes` (25 MB).
    pub max_source_bytes: u64,
    /// `max_source_pixels` (50 MP).
    pub max_source_pixels: u64,
    /// `max_source_side` (16384).
    pub max_source_side: u32,
    /// `memory_cache_mb` (256).
    pub memory_cache_bytes: u64,
    /// `memory_cache_max_entry_kb` (2048).
    pub memory_cache_max_entry_bytes: u64,
    /// `originals_cache_mb` (128).
    pub originals_cache_bytes: u64,
    /// `not_found_ttl` (60 s).
    pub not_found_ttl: Duration,
    /// `cache_control` (`public, max-age=31536000`).
    pub cache_control: String,
    /// `processing_concurrency` (cores).
    pub processing_concurrency: usize,
    /// `queue_size` (4 × pool).
    pub queue_size: usize,
    /// `download_concurrency` (16).
    pub download_concurrency: usize,
    /// `max_inflight_download_mb` (256).
    pub max_inflight_download_bytes: u64,
    /// `max_memory_mb` (1024), in bytes: the memory all renders may reserve at once.
    pub max_memory_bytes: u64,
    /// `max_jpeg_scans` (100).
    pub max_jpeg_scans: u32,
    /// `upload_concurrency` (seed `manta_concurrency`, 4).
    pub upload_concurrency: usize,
    /// `upload_backlog` (1000): queued background writes before new ones are dropped and counted.
    pub upload_backlog: usize,
    /// `request_timeout` (10 s).
    pub request_timeout: Duration,
    /// `render_timeout` (8 s), capped at `request_timeout`.
    pub render_timeout: Duration,
    /// `fetch_timeout` (5 s).
    pub fetch_timeout: Duration,
    /// `connect_timeout` (2 s).
    pub connect_timeout: Duration,
    /// `header_read_timeout` (10 s).
    pub header_read_timeout: Duration,
    /// `keep_alive_timeout` (75 s): an idle connection is closed after it.
    pub keep_alive_timeout: Duration,
    /// `send_timeout` (30 s): a response write without progress for this long closes the connection.
    pub send_timeout: Duration,
    /// `store_timeout` (2 s): one result-store read or write.
    pub store_timeout: Duration,
    /// `shutdown_grace` (20 s).
    pub shutdown_grace: Duration,
    /// `max_connections` (10000).
    pub max_connections: usize,
    /// `statsd_host` (seed `graphite_host`); `None` or empty disables statsd.
    pub statsd_host: Option<String>,
    /// `statsd_port` (seed `graphite_port`, 8125).
    pub statsd_port: u16,
    /// `statsd_prefix` (`image_server`).
    pub statsd_prefix: String,
    /// `allow_source_override` (false).
    pub allow_source_override: bool,
    /// `allowed_source_hosts` (empty).
    pub allowed_source_hosts: Vec<String>,
    /// `url_signing_key`.
    pub url_signing_key: Option<String>,
    /// `admin_token` for the status port's purge endpoint.
    pub admin_token: Option<String>,
    /// `log_level` (`info`); `RUST_LOG` wins when set.
    pub log_level: String,
}

/// S3-compatible store options.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct S3Config {
    /// `s3_endpoint`; path-style requests when set.
    pub endpoint: Option<String>,
    /// `s3_region` (`us-east-1`).
    pub region: String,
    /// `s3_allow_http` (false).
    pub allow_http: bool,
    /// `s3_access_key_id` (else `AWS_ACCESS_KEY_ID`).
    pub access_key_id: Option<String>,
    /// `s3_secret_access_key` (else `AWS_SECRET_ACCESS_KEY`).
    pub secret_access_key: Option<String>,
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
    #[error("unknown key `{key}` in {origin}")]
    UnknownKey {
        /// The key as written (lower case).
        key: String,
        /// Where it was set: a file, an environment variable or the command line.
        origin: String,
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
// Layers: defaults < file < environment < flags
// ---------------------------------------------------------------------------------------------------

/// The built-in defaults: `config/default.toml`, which documents every key.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Prefix of the environment variables that set keys: `IMAGE_SERVER_{KEY}`.
pub const ENV_PREFIX: &str = "IMAGE_SERVER_";

/// Names under [`ENV_PREFIX`] that are not keys: the CLI's own variables (see [`crate::cli`]).
const ENV_RESERVED: [&str; 3] = ["ENVIRONMENT", "CONFIG", "CONFIG_DIR"];

/// Seed (wanelo/image-server) key → our key. Resolved before layers merge, so a seed file and
/// an `IMAGE_SERVER_UPLOAD_CONCURRENCY` variable override each other as one key.
const ALIASES: [(&str, &str); 4] = [
    ("manta_concurrency", "upload_concurrency"),
    ("graphite_host", "statsd_host"),
    ("graphite_port", "statsd_port"),
    ("default_compression", "default_quality"),
];

/// Seed-only file keys with no meaning here (Manta paths, the local disk cache): skipped, so a
/// seed config file loads unchanged. Only files get this leniency.
const SEED_IGNORED: [&str; 2] = ["manta_base_path", "local_base_path"];

/// Seed file key: `false` turns statsd off (as an empty `statsd_host` in the same file).
const SEED_GRAPHITE_ENABLED: &str = "graphite_enabled";

/// Where the file layer comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileSource {
    /// No file: defaults, environment and flags only.
    None,
    /// `{dir}/{name}.toml` or `{dir}/{name}.json` (`-e/--environment`). A missing file is an
    /// error except for `development`, which may run on defaults.
    Environment {
        /// `--config-dir`.
        dir: PathBuf,
        /// `-e/--environment`.
        name: String,
    },
    /// An explicit file (`--config`), `.toml` or `.json` by extension; missing is an error.
    File(PathBuf),
    /// Text already in memory (tests), TOML or JSON by `name`'s extension.
    Inline {
        /// Name used in messages; its extension picks the format.
        name: String,
        /// The contents.
        text: String,
    },
}

/// Loads the configuration the command line asks for, reading the process environment.
///
/// See [`load_layers`] for the layers; this only gathers them from `opts` and `std::env`.
pub fn load(opts: &GlobalOpts) -> Result<Config, ConfigError> {
    let file = match &opts.config {
        Some(path) => FileSource::File(path.clone()),
        None => FileSource::Environment {
            dir: opts.config_dir.clone(),
            name: opts.environment.clone(),
        },
    };
    let mut vars = Vec::new();
    for (name, value) in std::env::vars_os() {
        // A name that is not UTF-8 cannot start with our (ASCII) prefix.
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with(ENV_PREFIX) {
            continue;
        }
        let value = value.into_string().map_err(|_| ConfigError::Malformed {
            origin: name.to_owned(),
            message: "value is not valid UTF-8".to_owned(),
        })?;
        vars.push((name.to_owned(), value));
    }
    load_layers(&file, vars, &opts.overrides())
}

/// Loads and validates a configuration the way the command line does, with the environment
/// variables and flags given explicitly (tests call this, never touching the process environment).
///
/// The file layer is `config_file` when given (`--config`), else `{config_dir}/{environment}.toml`
/// (or `.json`). `env_vars` and `overrides` are as in [`load_layers`].
pub fn load_from(
    config_dir: &Path,
    environment: &str,
    config_file: Option<&Path>,
    env_vars: impl IntoIterator<Item = (String, String)>,
    overrides: Vec<(String, String)>,
) -> Result<Config, ConfigError> {
    let file = match config_file {
        Some(path) => FileSource::File(path.to_owned()),
        None => FileSource::Environment {
            dir: config_dir.to_owned(),
            name: environment.to_owned(),
        },
    };
    load_layers(&file, env_vars, &overrides)
}

/// Loads and validates a configuration from explicit layers, without touching the process
/// environment (tests call this directly).
///
/// - `file`: the file layer over the built-in defaults.
/// - `env_vars`: `(name, value)` pairs; only `IMAGE_SERVER_*` names are read, values are TOML
///   when they parse and text otherwise (text keys take them verbatim unless they are a quoted
///   TOML string; list keys also take `a,b,c`).
/// - `overrides`: command-line `(key, value)` pairs, read like environment values; later pairs win.
///
/// Setting `source_domain` in a layer clears a `source_store` from lower layers and vice versa,
/// so `--source-domain` works over a file that names a store; one layer setting both is an error.
pub fn load_layers(
    file: &FileSource,
    env_vars: impl IntoIterator<Item = (String, String)>,
    overrides: &[(String, String)],
) -> Result<Config, ConfigError> {
    let defaults = parse_toml("built-in defaults", DEFAULT_TOML)?;
    let mut merged = Merged {
        values: defaults.clone(),
        origins: BTreeMap::new(),
    };

    if let Some((origin, table)) = read_file(file)? {
        merged.apply(file_layer(&origin, table, &defaults)?);
    }
    merged.apply(env_layer(env_vars, &defaults)?);
    merged.apply(flag_layer(overrides, &defaults)?);

    let raw: RawConfig = Value::Table(merged.values)
        .try_into()
        .map_err(|e: toml::de::Error| ConfigError::Malformed {
            origin: "built-in defaults".to_owned(),
            message: e.to_string(),
        })?;
    validate(
        &raw,
        &Check {
            origins: &merged.origins,
        },
    )
}

/// One layer: `(key, value, origin)` with keys canonical (aliases resolved) and known.
type Layer = Vec<(String, Value, String)>;

/// The merged key → value map, and which layer set each key (for messages).
struct Merged {
    values: toml::Table,
    origins: BTreeMap<String, String>,
}

impl Merged {
    fn apply(&mut self, layer: Layer) {
        let sets = |key: &str| {
            layer
                .iter()
                .any(|(k, v, _)| k == key && v.as_str().is_none_or(|s| !s.trim().is_empty()))
        };
        // The two source keys exclude each other: a layer naming one replaces the other below it.
        let clear = match (sets("source_domain"), sets("source_store")) {
            (true, false) => Some("source_store"),
            (false, true) => Some("source_domain"),
            _ => None,
        };
        if let Some(key) = clear {
            self.values
                .insert(key.to_owned(), Value::String(String::new()));
            self.origins.remove(key);
        }
        for (key, value, origin) in layer {
            self.values.insert(key.clone(), value);
            self.origins.insert(key, origin);
        }
    }
}

fn parse_toml(origin: &str, text: &str) -> Result<toml::Table, ConfigError> {
    toml::from_str(text).map_err(|e: toml::de::Error| ConfigError::Malformed {
        origin: origin.to_owned(),
        message: e.to_string().trim_end().to_owned(),
    })
}

fn parse_json(origin: &str, text: &str) -> Result<toml::Table, ConfigError> {
    let malformed = |message: String| ConfigError::Malformed {
        origin: origin.to_owned(),
        message,
    };
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| malformed(e.to_string()))?;
    match json_to_toml(value) {
        Some(Value::Table(t)) => Ok(t),
        _ => Err(malformed("expected a JSON object of keys".to_owned())),
    }
}

/// JSON → TOML values; `null` means "not set" and disappears.
fn json_to_toml(value: serde_json::Value) -> Option<Value> {
    use serde_json::Value as J;
    Some(match value {
        J::Null => return None,
        J::Bool(b) => Value::Boolean(b),
        J::Number(n) => match n.as_i64() {
            Some(i) => Value::Integer(i),
            None => Value::Float(n.as_f64()?),
        },
        J::String(s) => Value::String(s),
        J::Array(items) => Value::Array(items.into_iter().filter_map(json_to_toml).collect()),
        J::Object(map) => Value::Table(
            map.into_iter()
                .filter_map(|(k, v)| json_to_toml(v).map(|v| (k, v)))
                .collect(),
        ),
    })
}

fn is_json(name: &str) -> bool {
    Path::new(name)
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
}

fn read_path(path: &Path) -> Result<(String, toml::Table), ConfigError> {
    let origin = path.display().to_string();
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    if !matches!(ext.as_deref(), Some("toml" | "json")) {
        return Err(ConfigError::Malformed {
            origin,
            message: "a config file must end in .toml or .json".to_owned(),
        });
    }
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: origin.clone(),
        source,
    })?;
    let table = if is_json(&origin) {
        parse_json(&origin, &text)?
    } else {
        parse_toml(&origin, &text)?
    };
    Ok((origin, table))
}

/// Reads the file layer, if there is one.
fn read_file(file: &FileSource) -> Result<Option<(String, toml::Table)>, ConfigError> {
    match file {
        FileSource::None => Ok(None),
        FileSource::File(path) => read_path(path).map(Some),
        FileSource::Inline { name, text } => {
            let table = if is_json(name) {
                parse_json(name, text)?
            } else {
                parse_toml(name, text)?
            };
            Ok(Some((name.clone(), table)))
        }
        FileSource::Environment { dir, name } => {
            // The name becomes a file name: keep it to one plain path component.
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Err(ConfigError::Invalid {
                    key: "environment".to_owned(),
                    message: format!("expected a name of letters, digits, _ and -, got {name:?}"),
                    origin: None,
                });
            }
            let toml_path = dir.join(format!("{name}.toml"));
            let json_path = dir.join(format!("{name}.json"));
            match (toml_path.is_file(), json_path.is_file()) {
                (true, true) => Err(ConfigError::Malformed {
                    origin: toml_path.display().to_string(),
                    message: format!(
                        "{} also exists; keep one file per environment",
                        json_path.display()
                    ),
                }),
                (true, false) => read_path(&toml_path).map(Some),
                (false, true) => read_path(&json_path).map(Some),
                // Development runs on the defaults; any other environment was named on purpose.
                (false, false) if name == "development" => Ok(None),
                (false, false) => Err(ConfigError::Malformed {
                    origin: toml_path.display().to_string(),
                    message: format!(
                        "no such file (nor {}) for environment {name:?}",
                        json_path.display()
                    ),
                }),
            }
        }
    }
}

/// The canonical key for `key` (aliases resolved), or `None` when no layer may set it.
fn canonical_key<'a>(key: &'a str, defaults: &toml::Table) -> Option<&'a str> {
    let key = ALIASES
        .iter()
        .find(|(alias, _)| *alias == key)
        .map_or(key, |(_, canonical)| *canonical);
    defaults.contains_key(key).then_some(key)
}

/// Adds `(key, value)` to a layer that must not set one key twice (a file, the environment).
fn push_once(
    layer: &mut Layer,
    key: &str,
    value: Value,
    origin: String,
) -> Result<(), ConfigError> {
    if let Some((_, _, first)) = layer.iter().find(|(k, _, _)| k == key) {
        return Err(ConfigError::Invalid {
            key: key.to_owned(),
            message: format!("set twice, by {first} and by {origin}"),
            origin: None,
        });
    }
    layer.push((key.to_owned(), value, origin));
    Ok(())
}

fn file_layer(
    origin: &str,
    table: toml::Table,
    defaults: &toml::Table,
) -> Result<Layer, ConfigError> {
    let mut layer = Layer::new();
    let mut statsd_off = false;
    for (key, value) in table {
        if SEED_IGNORED.contains(&key.as_str()) {
            continue;
        }
        if key == SEED_GRAPHITE_ENABLED {
            statsd_off = !Check::bool_of(&value).ok_or_else(|| ConfigError::Invalid {
                key: key.clone(),
                message: format!("expected true or false, got {}", show(&value)),
                origin: Some(origin.to_owned()),
            })?;
            continue;
        }
        let canonical = canonical_key(&key, defaults).ok_or_else(|| ConfigError::UnknownKey {
            key: key.clone(),
            origin: origin.to_owned(),
        })?;
        let key_origin = if canonical == key {
            origin.to_owned()
        } else {
            format!("{origin} as {key}")
        };
        push_once(&mut layer, canonical, value, key_origin)?;
    }
    if statsd_off {
        // The seed's switch beats a host named in the same file; a later layer may still set one.
        layer.retain(|(k, _, _)| k != "statsd_host");
        layer.push((
            "statsd_host".to_owned(),
            Value::String(String::new()),
            format!("{origin} by graphite_enabled = false"),
        ));
    }
    Ok(layer)
}

fn env_layer(
    vars: impl IntoIterator<Item = (String, String)>,
    defaults: &toml::Table,
) -> Result<Layer, ConfigError> {
    // Sorted, so a clash between an alias and its key is reported the same way every time.
    let vars: BTreeMap<String, String> = vars
        .into_iter()
        .filter(|(name, _)| name.starts_with(ENV_PREFIX))
        .collect();
    let mut layer = Layer::new();
    for (name, text) in vars {
        let rest = &name[ENV_PREFIX.len()..];
        // Kubernetes injects IMAGE_SERVER_SERVICE_HOST, IMAGE_SERVER_PORT_7000_TCP, … for a
        // Service named image-server; they are not ours and must not stop the server.
        if ENV_RESERVED.contains(&rest)
            || rest == "PORT"
            || rest.starts_with("PORT_")
            || rest.starts_with("SERVICE_")
        {
            continue;
        }
        let key = rest.to_ascii_lowercase();
        let canonical = canonical_key(&key, defaults).ok_or_else(|| ConfigError::UnknownKey {
            key: key.clone(),
            origin: format!("environment variable {name}"),
        })?;
        let value = text_value(canonical, &text, defaults, &name)?;
        push_once(&mut layer, canonical, value, name.clone())?;
    }
    Ok(layer)
}

fn flag_layer(
    overrides: &[(String, String)],
    defaults: &toml::Table,
) -> Result<Layer, ConfigError> {
    let mut layer = Layer::new();
    for (key, text) in overrides {
        let key = key.trim().to_ascii_lowercase();
        let origin = format!("--set {key}");
        let canonical = canonical_key(&key, defaults).ok_or_else(|| ConfigError::UnknownKey {
            key: key.clone(),
            origin: "the command line".to_owned(),
        })?;
        let value = text_value(canonical, text, defaults, &origin)?;
        // Later flags win, as on any command line.
        layer.retain(|(k, _, _)| k != canonical);
        layer.push((canonical.to_owned(), value, "the command line".to_owned()));
    }
    Ok(layer)
}

/// A TOML value from a one-line text, if it is one (`3000`, `true`, `["a","b"]`, `"x"`).
fn toml_value(text: &str) -> Option<Value> {
    let mut table: toml::Table = toml::from_str(&format!("v = {text}")).ok()?;
    if table.len() != 1 {
        return None;
    }
    table.remove("v")
}

/// Reads an environment or flag value, guided by the type of the key's default: text keys take
/// it verbatim (a secret `0123` or `1e5` must not become a number) unless it is a quoted TOML
/// string, list keys take TOML or `a,b,c`, other keys take TOML and fall back to text.
fn text_value(
    key: &str,
    text: &str,
    defaults: &toml::Table,
    origin: &str,
) -> Result<Value, ConfigError> {
    Ok(match defaults.get(key) {
        Some(Value::String(_)) => {
            // A complete TOML string literal ("2s", 'x') is unquoted; anything else is verbatim.
            let t = text.trim();
            match toml_value(t) {
                Some(Value::String(s)) if t.starts_with(['"', '\'']) => Value::String(s),
                _ => Value::String(text.to_owned()),
            }
        }
        Some(Value::Array(_)) => {
            let t = text.trim();
            if t.starts_with('[') {
                toml_value(t)
                    .filter(Value::is_array)
                    .ok_or_else(|| ConfigError::Invalid {
                        key: key.to_owned(),
                        message: format!("expected a TOML list or a,b,c, got {t:?}"),
                        origin: Some(origin.to_owned()),
                    })?
            } else {
                Value::Array(
                    t.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(|s| Value::String(s.to_owned()))
                        .collect(),
                )
            }
        }
        _ => toml_value(text.trim()).unwrap_or_else(|| Value::String(text.to_owned())),
    })
}

// ---------------------------------------------------------------------------------------------------
// The raw, merged values
// ---------------------------------------------------------------------------------------------------

/// Every key, as merged from the layers and not yet checked. Each field is required, so the
/// embedded `config/default.toml` must name every key, and `deny_unknown_fields` keeps it from
/// naming others: the file is the schema's documentation and cannot drift from it.
/// Values stay [`toml::Value`] so that [`validate`] reports every type or range error with its
/// key and origin (the seed also wrote ports as strings, `"7000"`, which are accepted).
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen_address: Value,
    server_port: Value,
    status_port: Value,
    status_address: Value,
    max_connections: Value,
    http2_max_concurrent_streams: Value,
    source_domain: Value,
    source_store: Value,
    source_path: Value,
    result_store: Value,
    s3_endpoint: Value,
    s3_region: Value,
    s3_allow_http: Value,
    s3_access_key_id: Value,
    s3_secret_access_key: Value,
    whitelisted_extensions: Value,
    maximum_width: Value,
    maximum_height: Value,
    allowed_sizes: Value,
    #[serde(alias = "default_compression")]
    default_quality: Value,
    webp_quality: Value,
    avif_quality: Value,
    avif_effort: Value,
    avif_concurrency: Value,
    avif_queue_size: Value,
    max_avif_output_pixels: Value,
    progressive_jpeg: Value,
    crop_gravity: Value,
    enlarge: Value,
    background: Value,
    auto_format: Value,
    accept_avif_input: Value,
    max_source_bytes: Value,
    max_source_pixels: Value,
    max_source_side: Value,
    memory_cache_mb: Value,
    memory_cache_max_entry_kb: Value,
    originals_cache_mb: Value,
    not_found_ttl: Value,
    cache_control: Value,
    processing_concurrency: Value,
    queue_size: Value,
    download_concurrency: Value,
    max_inflight_download_mb: Value,
    max_memory_mb: Value,
    max_jpeg_scans: Value,
    #[serde(alias = "manta_concurrency")]
    upload_concurrency: Value,
    upload_backlog: Value,
    request_timeout: Value,
    render_timeout: Value,
    fetch_timeout: Value,
    connect_timeout: Value,
    header_read_timeout: Value,
    keep_alive_timeout: Value,
    send_timeout: Value,
    store_timeout: Value,
    shutdown_grace: Value,
    #[serde(alias = "graphite_host")]
    statsd_host: Value,
    #[serde(alias = "graphite_port")]
    statsd_port: Value,
    statsd_prefix: Value,
    allow_source_override: Value,
    allowed_source_hosts: Value,
    url_signing_key: Value,
    admin_token: Value,
    log_level: Value,
}

// ---------------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------------

const KB: u64 = 1024;
const MB: u64 = 1024 * KB;
/// Timeouts beyond a day are typos; they also keep `Instant + timeout` far from overflow.
const MAX_TIMEOUT: Duration = Duration::from_secs(86_400);
/// A negative-cache TTL (and 4xx max-age) of more than a year is a typo.
const MAX_TTL: Duration = Duration::from_secs(365 * 86_400);
/// libvips refuses coordinates above 10,000,000 (`VIPS_MAX_COORD`).
const MAX_SIDE: i64 = 10_000_000;
/// A secret shorter than this is guessable.
const MIN_SECRET_LEN: usize = 16;
/// Upper bound for pools and queues: far above any machine, low enough to catch a typo.
const MAX_WORKERS: i64 = 65_536;

/// A value for messages: strings quoted, lists and tables named, never long.
fn show(v: &Value) -> String {
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
struct Check<'a> {
    origins: &'a BTreeMap<String, String>,
}

impl Check<'_> {
    fn err(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            key: key.to_owned(),
            message: message.into(),
            origin: self.origins.get(key).cloned(),
        }
    }

    fn int(&self, key: &str, v: &Value, min: i64, max: i64) -> Result<i64, ConfigError> {
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

    fn num<T: TryFrom<i64>>(
        &self,
        key: &str,
        v: &Value,
        min: i64,
        max: i64,
    ) -> Result<T, ConfigError> {
        let n = self.int(key, v, min, max)?;
        T::try_from(n).map_err(|_| self.err(key, format!("{n} does not fit this platform")))
    }

    fn bool_of(v: &Value) -> Option<bool> {
        match v {
            Value::Boolean(b) => Some(*b),
            Value::String(s) if s.trim().eq_ignore_ascii_case("true") => Some(true),
            Value::String(s) if s.trim().eq_ignore_ascii_case("false") => Some(false),
            _ => None,
        }
    }

    fn boolean(&self, key: &str, v: &Value) -> Result<bool, ConfigError> {
        Check::bool_of(v)
            .ok_or_else(|| self.err(key, format!("expected true or false, got {}", show(v))))
    }

    /// A string, verbatim. The message never shows the value (this reads secrets too).
    fn raw_text(&self, key: &str, v: &Value) -> Result<String, ConfigError> {
        match v {
            Value::String(s) => Ok(s.clone()),
            Value::Array(_) | Value::Table(_) => {
                Err(self.err(key, format!("expected a string, got {}", show(v))))
            }
            _ => Err(self.err(key, "expected a string (in quotes)")),
        }
    }

    /// A string, trimmed.
    fn text(&self, key: &str, v: &Value) -> Result<String, ConfigError> {
        Ok(self.raw_text(key, v)?.trim().to_owned())
    }

    /// A trimmed string; empty means not set.
    fn opt_text(&self, key: &str, v: &Value) -> Result<Option<String>, ConfigError> {
        Ok(Some(self.text(key, v)?).filter(|s| !s.is_empty()))
    }

    /// A secret: verbatim, empty means not set, at least [`MIN_SECRET_LEN`] characters.
    fn secret(&self, key: &str, v: &Value) -> Result<Option<String>, ConfigError> {
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
    fn list(&self, key: &str, v: &Value) -> Result<Vec<String>, ConfigError> {
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
    fn duration(
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
    fn size(&self, key: &str, v: &Value, unit: u64, min: u64) -> Result<u64, ConfigError> {
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
    fn store_url(
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
fn normalize(path: &Path) -> PathBuf {
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
fn parse_duration(s: &str) -> Option<Duration> {
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
fn parse_size(s: &str, unit: u64) -> Option<u64> {
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
fn parse_colour(s: &str) -> Option<[u8; 3]> {
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
fn check_template(template: &str) -> Result<(), String> {
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
fn host_name(s: &str) -> Option<String> {
    let s = s.trim().trim_start_matches('.').to_ascii_lowercase();
    let ok = !s.is_empty()
        && (s.parse::<IpAddr>().is_ok()
            || s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_'));
    ok.then_some(s)
}

fn validate(raw: &RawConfig, c: &Check<'_>) -> Result<Config, ConfigError> {
    let listen_address = {
        let s = c.text("listen_address", &raw.listen_address)?;
        s.parse::<IpAddr>().map_err(|_| {
            c.err(
                "listen_address",
                format!("expected an IP address such as 0.0.0.0 or ::1, got {s:?}"),
            )
        })?
    };
    let server_port: u16 = c.num("server_port", &raw.server_port, 0, 65_535)?;
    let status_port: u16 = c.num("status_port", &raw.status_port, 0, 65_535)?;
    let status_address = match c.opt_text("status_address", &raw.status_address)? {
        None => listen_address,
        Some(s) => s.parse::<IpAddr>().map_err(|_| {
            c.err(
                "status_address",
                format!("expected an IP address such as 127.0.0.1 or ::1, or empty, got {s:?}"),
            )
        })?,
    };
    if server_port != 0 && server_port == status_port && status_address == listen_address {
        return Err(c.err(
            "status_port",
            format!("must differ from server_port, both are {server_port}"),
        ));
    }

    // Originals: exactly one of the two sources.
    let source_domain = match c.opt_text("source_domain", &raw.source_domain)? {
        None => None,
        Some(s) => {
            let bad = |why: &str| c.err("source_domain", format!("{why}, got {s:?}"));
            let mut url =
                url::Url::parse(&s).map_err(|_| bad("expected an http:// or https:// URL"))?;
            if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
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
            Some(url)
        }
    };
    let source_store = c.store_url("source_store", &raw.source_store, false)?;
    match (&source_domain, &source_store) {
        (Some(_), Some(_)) => {
            let from = |k: &str| {
                c.origins
                    .get(k)
                    .map_or("built-in defaults".to_owned(), String::clone)
            };
            return Err(ConfigError::Invalid {
                key: "source_domain, source_store".to_owned(),
                message: format!(
                    "both are set (source_domain in {}, source_store in {}); set exactly one",
                    from("source_domain"),
                    from("source_store")
                ),
                origin: None,
            });
        }
        (None, None) => {
            return Err(ConfigError::Invalid {
                key: "source_domain, source_store".to_owned(),
                message: "neither is set; set source_domain (an http(s) origin) or source_store (an object-store URL)".to_owned(),
                origin: None,
            })
        }
        _ => {}
    }
    let source_path = c.text("source_path", &raw.source_path)?;
    check_template(&source_path).map_err(|m| c.err("source_path", m))?;
    let result_store = c.store_url("result_store", &raw.result_store, true)?;

    let s3 = {
        let endpoint = c.opt_text("s3_endpoint", &raw.s3_endpoint)?;
        let allow_http = c.boolean("s3_allow_http", &raw.s3_allow_http)?;
        if let Some(e) = &endpoint {
            let url = url::Url::parse(e)
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some());
            match url {
                None => {
                    return Err(c.err(
                        "s3_endpoint",
                        format!("expected an http:// or https:// URL, got {e:?}"),
                    ))
                }
                Some(u) if u.scheme() == "http" && !allow_http => {
                    return Err(c.err(
                        "s3_endpoint",
                        "is plain http; set s3_allow_http = true to allow it",
                    ))
                }
                Some(_) => {}
            }
        }
        let region = c.text("s3_region", &raw.s3_region)?;
        if region.is_empty() {
            return Err(c.err("s3_region", "must not be empty"));
        }
        let access_key_id = c.opt_text("s3_access_key_id", &raw.s3_access_key_id)?;
        let secret_access_key =
            Some(c.raw_text("s3_secret_access_key", &raw.s3_secret_access_key)?)
                .filter(|s| !s.is_empty());
        match (&access_key_id, &secret_access_key) {
            (Some(_), None) => {
                return Err(c.err(
                    "s3_access_key_id",
                    "is set but s3_secret_access_key is not; set both or neither",
                ))
            }
            (None, Some(_)) => {
                return Err(c.err(
                    "s3_secret_access_key",
                    "is set but s3_access_key_id is not; set both or neither",
                ))
            }
            _ => {}
        }
        S3Config {
            endpoint,
            region,
            allow_http,
            access_key_id,
            secret_access_key,
        }
    };

    // What may be requested.
    let mut whitelisted_extensions = Vec::new();
    for ext in c.list("whitelisted_extensions", &raw.whitelisted_extensions)? {
        let format = Format::from_ext(&ext.to_ascii_lowercase()).ok_or_else(|| {
            c.err(
                "whitelisted_extensions",
                format!("unknown extension {ext:?} (expected jpg, jpeg, png, webp, avif or gif)"),
            )
        })?;
        if !whitelisted_extensions.contains(&format) {
            whitelisted_extensions.push(format);
        }
    }
    if whitelisted_extensions.is_empty() {
        return Err(c.err("whitelisted_extensions", "must list at least one extension"));
    }
    let max = i64::from(crate::request::MAX_NUMBER);
    let maximum_width: u32 = c.num("maximum_width", &raw.maximum_width, 1, max)?;
    let maximum_height: u32 = c.num("maximum_height", &raw.maximum_height, 1, max)?;
    let mut allowed_sizes: Vec<String> = Vec::new();
    for name in c.list("allowed_sizes", &raw.allowed_sizes)? {
        let version = crate::request::parse_version_name(&name).map_err(|_| {
            c.err(
                "allowed_sizes",
                format!(
                    "{name:?} is not a version name (such as w200, h200, 300x400, x300, full_size)"
                ),
            )
        })?;
        if version.width().is_some_and(|w| w > maximum_width)
            || version.height().is_some_and(|h| h > maximum_height)
        {
            return Err(c.err(
                "allowed_sizes",
                format!("{name:?} is larger than maximum_width × maximum_height ({maximum_width}×{maximum_height}), so it could never be served"),
            ));
        }
        // Canonical, as the parser compares: `x300` is stored as `300x300`.
        let canonical = version.to_string();
        if !allowed_sizes.contains(&canonical) {
            allowed_sizes.push(canonical);
        }
    }

    // Rendering.
    let crop_gravity = {
        let s = c.text("crop_gravity", &raw.crop_gravity)?;
        match s.to_ascii_lowercase().as_str() {
            "centre" | "center" => Gravity::Centre,
            "attention" => Gravity::Attention,
            "entropy" => Gravity::Entropy,
            _ => {
                return Err(c.err(
                    "crop_gravity",
                    format!("expected centre, center, attention or entropy, got {s:?}"),
                ))
            }
        }
    };
    let background = match &raw.background {
        Value::Array(items) if items.len() == 3 => {
            let mut rgb = [0u8; 3];
            for (slot, item) in rgb.iter_mut().zip(items) {
                *slot = c.num("background", item, 0, 255)?;
            }
            rgb
        }
        v => {
            let s = c.text("background", v)?;
            parse_colour(&s).ok_or_else(|| {
                c.err(
                    "background",
                    format!("expected white, black, #rrggbb or r,g,b (0-255 each), got {s:?}"),
                )
            })?
        }
    };

    // Limits on originals and caches.
    let max_source_bytes = c.size("max_source_bytes", &raw.max_source_bytes, 1, 1)?;
    let max_source_pixels: u64 = c.num("max_source_pixels", &raw.max_source_pixels, 1, i64::MAX)?;
    let max_source_side: u32 = c.num("max_source_side", &raw.max_source_side, 1, MAX_SIDE)?;
    let memory_cache_bytes = c.size("memory_cache_mb", &raw.memory_cache_mb, MB, 0)?;
    let memory_cache_max_entry_bytes = c.size(
        "memory_cache_max_entry_kb",
        &raw.memory_cache_max_entry_kb,
        KB,
        1,
    )?;
    let originals_cache_bytes = c.size("originals_cache_mb", &raw.originals_cache_mb, MB, 0)?;
    let not_found_ttl = c.duration("not_found_ttl", &raw.not_found_ttl, true, MAX_TTL)?;
    let cache_control = c.text("cache_control", &raw.cache_control)?;
    if cache_control.is_empty() || http::HeaderValue::from_str(&cache_control).is_err() {
        return Err(c.err(
            "cache_control",
            format!("expected a Cache-Control header value, got {cache_control:?}"),
        ));
    }

    // Capacity.
    let processing_concurrency = match c.num::<usize>(
        "processing_concurrency",
        &raw.processing_concurrency,
        0,
        MAX_WORKERS,
    )? {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let queue_size = match c.num::<usize>("queue_size", &raw.queue_size, 0, 1_000_000)? {
        0 => 4 * processing_concurrency,
        n => n,
    };
    let avif_concurrency: usize =
        c.num("avif_concurrency", &raw.avif_concurrency, 1, MAX_WORKERS)?;
    let avif_queue_size =
        match c.num::<usize>("avif_queue_size", &raw.avif_queue_size, 0, 1_000_000)? {
            0 => 4 * avif_concurrency,
            n => n,
        };
    // The AV1 encoder holds several buffers of the frame and cannot be stopped: 1 pixel .. the
    // largest frame an encoder accepts (65536²).
    let max_avif_output_pixels: u64 = c.num(
        "max_avif_output_pixels",
        &raw.max_avif_output_pixels,
        1,
        1 << 32,
    )?;
    let max_memory_bytes = c.size("max_memory_mb", &raw.max_memory_mb, MB, 16 * MB)?;
    // Encoders write 1 (baseline) to about 10 scans; libjpeg's own marker limit is far above any
    // legitimate file.
    let max_jpeg_scans: u32 = c.num("max_jpeg_scans", &raw.max_jpeg_scans, 1, 100_000)?;
    let download_concurrency: usize = c.num(
        "download_concurrency",
        &raw.download_concurrency,
        1,
        MAX_WORKERS,
    )?;
    let max_inflight_download_bytes = c.size(
        "max_inflight_download_mb",
        &raw.max_inflight_download_mb,
        MB,
        1,
    )?;
    if max_inflight_download_bytes < max_source_bytes {
        // Otherwise one original of the largest allowed size could never be admitted.
        return Err(c.err(
            "max_inflight_download_mb",
            format!("must be at least max_source_bytes ({max_source_bytes} bytes), got {max_inflight_download_bytes} bytes"),
        ));
    }
    let upload_concurrency: usize = c.num(
        "upload_concurrency",
        &raw.upload_concurrency,
        1,
        MAX_WORKERS,
    )?;
    let upload_backlog: usize = c.num("upload_backlog", &raw.upload_backlog, 1, 10_000_000)?;
    let max_connections: usize = c.num("max_connections", &raw.max_connections, 1, 10_000_000)?;

    // Timeouts.
    let timeout = |key: &str, v: &Value| c.duration(key, v, false, MAX_TIMEOUT);
    let request_timeout = timeout("request_timeout", &raw.request_timeout)?;
    let fetch_timeout = timeout("fetch_timeout", &raw.fetch_timeout)?;
    let connect_timeout = timeout("connect_timeout", &raw.connect_timeout)?;
    let header_read_timeout = timeout("header_read_timeout", &raw.header_read_timeout)?;
    let keep_alive_timeout = timeout("keep_alive_timeout", &raw.keep_alive_timeout)?;
    let send_timeout = timeout("send_timeout", &raw.send_timeout)?;
    // A render may not outlive the request that asked for it.
    let render_timeout = timeout("render_timeout", &raw.render_timeout)?.min(request_timeout);
    let http2_max_concurrent_streams: u32 = c.num(
        "http2_max_concurrent_streams",
        &raw.http2_max_concurrent_streams,
        1,
        MAX_WORKERS,
    )?;
    let store_timeout = timeout("store_timeout", &raw.store_timeout)?;
    let shutdown_grace = c.duration("shutdown_grace", &raw.shutdown_grace, true, MAX_TIMEOUT)?;

    // Counters.
    let statsd_host = match c.opt_text("statsd_host", &raw.statsd_host)? {
        None => None,
        Some(h) => Some(host_name(&h).ok_or_else(|| {
            c.err(
                "statsd_host",
                format!("expected a host name or IP address (no scheme or port), got {h:?}"),
            )
        })?),
    };
    let statsd_port: u16 = c.num("statsd_port", &raw.statsd_port, 1, 65_535)?;
    let statsd_prefix = c.text("statsd_prefix", &raw.statsd_prefix)?;
    if statsd_prefix.starts_with('.')
        || statsd_prefix.ends_with('.')
        || !statsd_prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        return Err(c.err(
            "statsd_prefix",
            format!("expected letters, digits, _, - and inner dots, got {statsd_prefix:?}"),
        ));
    }

    // Safety.
    let allow_source_override = c.boolean("allow_source_override", &raw.allow_source_override)?;
    let mut allowed_source_hosts = Vec::new();
    for h in c.list("allowed_source_hosts", &raw.allowed_source_hosts)? {
        let host = host_name(&h).ok_or_else(|| {
            c.err(
                "allowed_source_hosts",
                format!("expected host names (no scheme, port or path), got {h:?}"),
            )
        })?;
        if !allowed_source_hosts.contains(&host) {
            allowed_source_hosts.push(host);
        }
    }
    if allow_source_override && allowed_source_hosts.is_empty() {
        return Err(c.err(
            "allowed_source_hosts",
            "must list at least one host when allow_source_override is true",
        ));
    }
    let url_signing_key = c.secret("url_signing_key", &raw.url_signing_key)?;
    let admin_token = c.secret("admin_token", &raw.admin_token)?;

    let log_level = c.text("log_level", &raw.log_level)?;
    if log_level.is_empty() {
        return Err(c.err("log_level", "must not be empty"));
    }
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&log_level) {
        return Err(c.err(
            "log_level",
            format!(
                "expected a log filter such as info or info,hyper=warn, got {log_level:?} ({e})"
            ),
        ));
    }

    Ok(Config {
        listen_address,
        server_port,
        status_port,
        status_address,
        http2_max_concurrent_streams,
        source_domain,
        source_path,
        source_store,
        result_store,
        s3,
        whitelisted_extensions,
        maximum_width,
        maximum_height,
        default_quality: c.num("default_quality", &raw.default_quality, 1, 100)?,
        webp_quality: c.num("webp_quality", &raw.webp_quality, 1, 100)?,
        avif_quality: c.num("avif_quality", &raw.avif_quality, 1, 100)?,
        avif_effort: c.num("avif_effort", &raw.avif_effort, 0, 9)?,
        avif_concurrency,
        avif_queue_size,
        max_avif_output_pixels,
        progressive_jpeg: c.boolean("progressive_jpeg", &raw.progressive_jpeg)?,
        crop_gravity,
        enlarge: c.boolean("enlarge", &raw.enlarge)?,
        background,
        auto_format: c.boolean("auto_format", &raw.auto_format)?,
        accept_avif_input: c.boolean("accept_avif_input", &raw.accept_avif_input)?,
        allowed_sizes: Some(allowed_sizes).filter(|s| !s.is_empty()),
        max_source_bytes,
        max_source_pixels,
        max_source_side,
        memory_cache_bytes,
        memory_cache_max_entry_bytes,
        originals_cache_bytes,
        not_found_ttl,
        cache_control,
        processing_concurrency,
        queue_size,
        download_concurrency,
        max_inflight_download_bytes,
        max_memory_bytes,
        max_jpeg_scans,
        upload_concurrency,
        upload_backlog,
        request_timeout,
        render_timeout,
        fetch_timeout,
        connect_timeout,
        header_read_timeout,
        keep_alive_timeout,
        send_timeout,
        store_timeout,
        shutdown_grace,
        max_connections,
        statsd_host,
        statsd_port,
        statsd_prefix,
        allow_source_override,
        allowed_source_hosts,
        url_signing_key,
        admin_token,
        log_level,
    })
}

// ---------------------------------------------------------------------------------------------------
// Views for the other modules
// ---------------------------------------------------------------------------------------------------

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Config {
    /// The URL rules of [`crate::request::ImageRequest::parse`].
    pub fn rules(&self) -> Rules {
        Rules {
            maximum_width: self.maximum_width,
            maximum_height: self.maximum_height,
            whitelist: self.whitelisted_extensions.clone(),
            default_quality: self.default_quality(),
            allowed_sizes: self.allowed_sizes.clone(),
        }
    }

    /// The default quality per lossy format (`default_quality`, `webp_quality`, `avif_quality`).
    pub fn default_quality(&self) -> DefaultQuality {
        DefaultQuality {
            jpeg: self.default_quality,
            webp: self.webp_quality,
            avif: self.avif_quality,
        }
    }

    /// The limits checked on an original's header before decoding.
    pub fn decode_limits(&self) -> DecodeLimits {
        DecodeLimits {
            max_pixels: self.max_source_pixels,
            max_side: self.max_source_side,
            accept_avif_input: self.accept_avif_input,
            max_jpeg_scans: self.max_jpeg_scans,
        }
    }

    /// The render pool's sizes and budgets.
    pub fn pool(&self) -> crate::image::PoolConfig {
        crate::image::PoolConfig {
            concurrency: self.processing_concurrency,
            queue_size: self.queue_size,
            staged: self.download_concurrency,
            avif_concurrency: self.avif_concurrency,
            avif_queue_size: self.avif_queue_size,
            memory_bytes: self.max_memory_bytes,
            render_timeout: self.render_timeout,
            max_avif_pixels: self.max_avif_output_pixels,
        }
    }

    /// The settings in force, for the status page and `check-config`. Secrets appear only as
    /// whether they are set; credentials in `source_domain` are removed.
    pub fn describe(&self) -> serde_json::Value {
        let source_domain = self.source_domain.as_ref().map(|u| {
            let mut u = u.clone();
            // Only fails for URLs that cannot have credentials, which then have none to remove.
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.to_string()
        });
        let gravity = match self.crop_gravity {
            Gravity::Centre => "centre",
            Gravity::Attention => "attention",
            Gravity::Entropy => "entropy",
        };
        let [r, g, b] = self.background;
        // Built in groups: one `json!` this size exceeds the macro recursion limit.
        let groups = [
            serde_json::json!({
                "listen_address": self.listen_address.to_string(),
                "server_port": self.server_port,
                "status_port": self.status_port,
                "status_address": self.status_address.to_string(),
                "max_connections": self.max_connections,
                "http2_max_concurrent_streams": self.http2_max_concurrent_streams,
                "source_domain": source_domain,
                "source_store": self.source_store,
                "source_path": self.source_path,
                "result_store": self.result_store,
                "s3": {
                    "endpoint": self.s3.endpoint,
                    "region": self.s3.region,
                    "allow_http": self.s3.allow_http,
                    "credentials": if self.s3.access_key_id.is_some() { "config" } else { "environment" },
                },
            }),
            serde_json::json!({
                "whitelisted_extensions": self
                    .whitelisted_extensions
                    .iter()
                    .map(|f| f.ext())
                    .collect::<Vec<_>>(),
                "maximum_width": self.maximum_width,
                "maximum_height": self.maximum_height,
                "allowed_sizes": self.allowed_sizes,
                "default_quality": {
                    "jpeg": self.default_quality,
                    "webp": self.webp_quality,
                    "avif": self.avif_quality,
                },
                "avif_effort": self.avif_effort,
                "avif_concurrency": self.avif_concurrency,
                "avif_queue_size": self.avif_queue_size,
                "max_avif_output_pixels": self.max_avif_output_pixels,
                "progressive_jpeg": self.progressive_jpeg,
                "crop_gravity": gravity,
                "enlarge": self.enlarge,
                "background": format!("#{r:02x}{g:02x}{b:02x}"),
                "auto_format": self.auto_format,
                "accept_avif_input": self.accept_avif_input,
            }),
            serde_json::json!({
                "max_source_bytes": self.max_source_bytes,
                "max_source_pixels": self.max_source_pixels,
                "max_source_side": self.max_source_side,
                "memory_cache_bytes": self.memory_cache_bytes,
                "memory_cache_max_entry_bytes": self.memory_cache_max_entry_bytes,
                "originals_cache_bytes": self.originals_cache_bytes,
                "not_found_ttl_ms": millis(self.not_found_ttl),
                "cache_control": self.cache_control,
            }),
            serde_json::json!({
                "processing_concurrency": self.processing_concurrency,
                "queue_size": self.queue_size,
                "download_concurrency": self.download_concurrency,
                "max_inflight_download_bytes": self.max_inflight_download_bytes,
                "max_memory_mb": self.max_memory_bytes / MB,
                "max_jpeg_scans": self.max_jpeg_scans,
                "upload_concurrency": self.upload_concurrency,
                "upload_backlog": self.upload_backlog,
                "timeouts_ms": {
                    "request": millis(self.request_timeout),
                    "fetch": millis(self.fetch_timeout),
                    "connect": millis(self.connect_timeout),
                    "header_read": millis(self.header_read_timeout),
                    "keep_alive": millis(self.keep_alive_timeout),
                    "send": millis(self.send_timeout),
                    "render": millis(self.render_timeout),
                    "store": millis(self.store_timeout),
                    "shutdown_grace": millis(self.shutdown_grace),
                },
            }),
            serde_json::json!({
                "statsd": self.statsd_host.as_ref().map(|h| format!("{h}:{}", self.statsd_port)),
                "statsd_prefix": self.statsd_prefix,
                "allow_source_override": self.allow_source_override,
                "allowed_source_hosts": self.allowed_source_hosts,
                "url_signing": self.url_signing_key.is_some(),
                "purge_endpoint": self.admin_token.is_some(),
                "log_level": self.log_level,
            }),
        ];
        let mut all = serde_json::Map::new();
        for group in groups {
            if let serde_json::Value::Object(map) = group {
                all.extend(map);
            }
        }
        serde_json::Value::Object(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGIN: &str = "http://origin.example";

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// Defaults plus a source plus `flags`.
    fn with(flags: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut all = vec![("source_domain", ORIGIN)];
        all.extend_from_slice(flags);
        load_layers(&FileSource::None, Vec::new(), &pairs(&all))
    }

    fn ok(result: Result<Config, ConfigError>) -> Config {
        match result {
            Ok(c) => c,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }

    fn err(result: Result<Config, ConfigError>) -> ConfigError {
        match result {
            Ok(c) => panic!("expected an error, got {c:?}"),
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

    #[test]
    fn defaults_load_and_validate() {
        let c = ok(with(&[]));
        assert_eq!(c.listen_address, IpAddr::from([0, 0, 0, 0]));
        assert_eq!((c.server_port, c.status_port), (7000, 7001));
        assert_eq!(
            c.source_domain.as_ref().map(|u| u.as_str()),
            Some("http://origin.example/")
        );
        assert_eq!(c.source_store, None);
        assert_eq!(c.source_path, "{model}/{type}/{id}/original.jpg");
        assert_eq!(c.result_store, None);
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
        assert_eq!(c.whitelisted_extensions, Format::ALL.to_vec());
        assert_eq!((c.maximum_width, c.maximum_height), (2048, 2048));
        assert_eq!(
            (c.default_quality, c.webp_quality, c.avif_quality),
            (75, 75, 50)
        );
        assert_eq!((c.avif_effort, c.avif_concurrency), (2, 1));
        assert!(c.progressive_jpeg && c.enlarge);
        assert!(!c.auto_format && !c.accept_avif_input && !c.allow_source_override);
        assert_eq!(c.crop_gravity, Gravity::Centre);
        assert_eq!(c.background, [255, 255, 255]);
        assert_eq!(c.allowed_sizes, None);
        assert_eq!(c.max_source_bytes, 25 * MB);
        assert_eq!(c.max_source_pixels, 50_000_000);
        assert_eq!(c.max_source_side, 16_384);
        assert_eq!(c.memory_cache_bytes, 256 * MB);
        assert_eq!(c.memory_cache_max_entry_bytes, 2048 * KB);
        assert_eq!(c.originals_cache_bytes, 128 * MB);
        assert_eq!(c.not_found_ttl, Duration::from_secs(60));
        assert_eq!(c.cache_control, "public, max-age=31536000");
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(c.processing_concurrency, cores);
        assert_eq!(c.queue_size, 4 * cores);
        assert_eq!(c.download_concurrency, 16);
        assert_eq!(c.max_inflight_download_bytes, 256 * MB);
        assert_eq!((c.upload_concurrency, c.upload_backlog), (4, 1000));
        assert_eq!(c.request_timeout, Duration::from_secs(10));
        assert_eq!(c.fetch_timeout, Duration::from_secs(5));
        assert_eq!(c.connect_timeout, Duration::from_secs(2));
        assert_eq!(c.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.keep_alive_timeout, Duration::from_secs(75));
        assert_eq!(c.send_timeout, Duration::from_secs(30));
        assert_eq!(c.render_timeout, Duration::from_secs(8));
        assert_eq!(c.status_address, c.listen_address);
        assert_eq!(c.http2_max_concurrent_streams, 100);
        assert_eq!(c.max_jpeg_scans, 100);
        assert_eq!(c.max_avif_output_pixels, 2048 * 2048);
        assert_eq!(c.max_memory_bytes, 1024 * MB);
        assert_eq!(c.avif_queue_size, 4 * c.avif_concurrency);
        assert_eq!(c.store_timeout, Duration::from_secs(2));
        assert_eq!(c.shutdown_grace, Duration::from_secs(20));
        assert_eq!(c.max_connections, 10_000);
        assert_eq!(c.statsd_host, None);
        assert_eq!(
            (c.statsd_port, c.statsd_prefix.as_str()),
            (8125, "image_server")
        );
        assert!(c.allowed_source_hosts.is_empty());
        assert_eq!(
            (c.url_signing_key.as_deref(), c.admin_token.as_deref()),
            (None, None)
        );
        assert_eq!(c.log_level, "info");

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

        let e = err(with(&[("source_store", "memory://")]).and_then(|_| {
            // Flags in one layer naming both is a contradiction.
            load_layers(
                &FileSource::None,
                Vec::new(),
                &pairs(&[("source_domain", ORIGIN), ("source_store", "memory://")]),
            )
        }));
        assert!(e.to_string().contains("both are set"), "{e}");

        // A higher layer naming one source replaces the other from below.
        let file = inline("f.toml", "source_domain = \"http://a.example\"");
        let c = ok(load_layers(
            &file,
            Vec::new(),
            &pairs(&[("source_store", "s3://bucket/originals")]),
        ));
        assert_eq!(
            (c.source_domain, c.source_store.as_deref()),
            (None, Some("s3://bucket/originals"))
        );
        let c = ok(load_layers(
            &inline("f.toml", "source_store = \"memory://\""),
            pairs(&[("IMAGE_SERVER_SOURCE_DOMAIN", "https://b.example/base")]),
            &[],
        ));
        assert_eq!(
            c.source_domain.map(String::from),
            Some("https://b.example/base/".to_owned())
        );
        assert_eq!(c.source_store, None);
        // An empty value does not clear the other key.
        let c = ok(load_layers(
            &inline("f.toml", "source_store = \"memory://\""),
            pairs(&[("IMAGE_SERVER_SOURCE_DOMAIN", "")]),
            &[],
        ));
        assert_eq!(c.source_store.as_deref(), Some("memory://"));
    }

    #[test]
    fn file_then_env_then_flags() {
        let file = inline(
            "f.toml",
            "source_domain = \"http://a.example\"\nserver_port = 7100\n",
        );
        let env = || pairs(&[("IMAGE_SERVER_SERVER_PORT", "7200"), ("PATH", "/bin")]);
        let flags = pairs(&[("server_port", "7300")]);
        assert_eq!(ok(load_layers(&file, env(), &flags)).server_port, 7300);
        assert_eq!(ok(load_layers(&file, env(), &[])).server_port, 7200);
        assert_eq!(ok(load_layers(&file, Vec::new(), &[])).server_port, 7100);
        // Later flags win (named flags come after --set in GlobalOpts::overrides).
        let flags = pairs(&[("server_port", "7300"), ("SERVER_PORT", "7400")]);
        assert_eq!(ok(load_layers(&file, env(), &flags)).server_port, 7400);
    }

    #[test]
    fn load_reads_global_opts() {
        let opts = GlobalOpts {
            config_dir: config_dir(),
            server_port: Some(7777),
            set: pairs(&[("maximum_width", "1234")]),
            ..GlobalOpts::default()
        };
        let c = ok(load(&opts));
        assert_eq!(
            (c.server_port, c.status_port, c.maximum_width),
            (7777, 7001, 1234)
        );

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
            "local_base_path": "public",
            "default_compression": 80,
            "manta_concurrency": 10,
            "graphite_enabled": true,
            "graphite_host": "stats.example",
            "graphite_port": 8126,
            "s3_endpoint": null
        }"#;
        let c = ok(load_layers(&inline("seed.json", json), Vec::new(), &[]));
        assert_eq!((c.server_port, c.status_port), (7010, 7011));
        assert_eq!(
            c.whitelisted_extensions,
            vec![Format::Jpeg, Format::Png, Format::Webp]
        );
        assert_eq!(c.maximum_width, 1000);
        assert_eq!(c.default_quality, 80);
        assert_eq!(c.upload_concurrency, 10);
        assert_eq!(c.statsd_host.as_deref(), Some("stats.example"));
        assert_eq!(c.statsd_port, 8126);

        // graphite_enabled = false turns statsd off even with a host in the same file...
        let off = json.replace("\"graphite_enabled\": true", "\"graphite_enabled\": false");
        let c = ok(load_layers(&inline("seed.json", &off), Vec::new(), &[]));
        assert_eq!(c.statsd_host, None);
        // ...but a higher layer can turn it back on, by either name.
        let c = ok(load_layers(
            &inline("seed.json", &off),
            pairs(&[("IMAGE_SERVER_GRAPHITE_HOST", "env.example")]),
            &[],
        ));
        assert_eq!(c.statsd_host.as_deref(), Some("env.example"));

        // An alias and its key in one file is ambiguous.
        let both =
            "upload_concurrency = 2\nmanta_concurrency = 3\nsource_domain = \"http://a.example\"";
        let e = err(load_layers(&inline("f.toml", both), Vec::new(), &[]));
        assert_eq!(e.key(), Some("upload_concurrency"), "{e}");

        // Seed-only keys are skipped in files, not on the command line.
        let e = err(with(&[("manta_base_path", "x")]));
        assert_eq!(e.key(), Some("manta_base_path"), "{e}");
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

        let e = err(with(&[("nope", "1")]));
        assert_eq!(e.key(), Some("nope"));

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
            ("source_path", "{model}/{type}/original.jpg", "{id}"),
            ("source_path", "{id}/{size}.jpg", "placeholders"),
            ("source_path", "", "empty"),
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
            ("fetch_timeout", "2days", "duration"),
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
        ]);
        let c = ok(load_layers(&FileSource::None, env, &[]));
        assert_eq!(c.whitelisted_extensions, vec![Format::Jpeg, Format::Webp]);
        assert_eq!(
            c.allowed_sizes,
            Some(vec!["300x300".to_owned(), "w200".to_owned()])
        );
        assert!(c.auto_format);
        assert_eq!(c.maximum_width, 1000);
        assert_eq!(c.url_signing_key.as_deref(), Some("1234567890123456e7"));
        assert_eq!(c.admin_token.as_deref(), Some("0123456789012345"));
        assert_eq!(c.statsd_prefix, "123");
        assert_eq!(c.cache_control, "public, max-age=60");
        assert_eq!(c.fetch_timeout, Duration::from_millis(1500));
        assert_eq!(c.store_timeout, Duration::from_secs(3));
        assert_eq!(c.log_level, "warn");
        assert_eq!(c.source_path, "\"{id}.jpg");
        assert_eq!(c.request_timeout, Duration::from_secs(30));
        assert_eq!(c.memory_cache_bytes, 1024 * MB);
        assert_eq!(c.background, [255, 128, 0]);
        assert_eq!(c.crop_gravity, Gravity::Attention);
        assert_eq!(
            c.allowed_source_hosts,
            ["images.example.com", "cdn.example"]
        );
        assert_eq!(c.rules().allowed_sizes, c.allowed_sizes);
    }

    #[test]
    fn durations_sizes_colours() {
        let d = |s| parse_duration(s);
        assert_eq!(d("10"), Some(Duration::from_secs(10)));
        assert_eq!(d("10s"), Some(Duration::from_secs(10)));
        assert_eq!(d("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(d("2m"), Some(Duration::from_secs(120)));
        assert_eq!(d("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(d("1d"), Some(Duration::from_secs(86_400)));
        assert_eq!(d("1m 30s"), Some(Duration::from_secs(90)));
        assert_eq!(d(" 2 s "), Some(Duration::from_secs(2)));
        for bad in [
            "",
            "s",
            "10x",
            "1.5s",
            "-1s",
            "1m30",
            "99999999999999999999h",
        ] {
            assert_eq!(d(bad), None, "{bad:?}");
        }

        assert_eq!(parse_size("256", MB), Some(256 * MB));
        assert_eq!(parse_size("25MB", 1), Some(25 * MB));
        assert_eq!(parse_size("25 MiB", 1), Some(25 * MB));
        assert_eq!(parse_size("512kb", MB), Some(512 * KB));
        assert_eq!(parse_size("2G", 1), Some(2048 * MB));
        assert_eq!(parse_size("100B", MB), Some(100));
        for bad in [
            "",
            "MB",
            "1.5MB",
            "-1",
            "12 parsecs",
            "99999999999999999999",
        ] {
            assert_eq!(parse_size(bad, 1), None, "{bad:?}");
        }
        assert_eq!(parse_size("18446744073709551615", MB), None);

        assert_eq!(parse_colour("white"), Some([255, 255, 255]));
        assert_eq!(parse_colour("Black"), Some([0, 0, 0]));
        assert_eq!(parse_colour("#0a0B0c"), Some([10, 11, 12]));
        assert_eq!(parse_colour("#fa0"), Some([255, 170, 0]));
        assert_eq!(parse_colour("1, 2,3"), Some([1, 2, 3]));
        for bad in ["", "#ggg", "#1234", "1,2", "1,2,256", "red"] {
            assert_eq!(parse_colour(bad), None, "{bad:?}");
        }

        // Integers in files: seconds and the key's unit.
        let file = inline(
            "f.toml",
            "source_domain = \"http://a.example\"\nnot_found_ttl = 0\nshutdown_grace = 3\nmax_source_bytes = 1048576\nmemory_cache_mb = 0\nbackground = [1, 2, 3]",
        );
        let c = ok(load_layers(&file, Vec::new(), &[]));
        assert_eq!(c.not_found_ttl, Duration::ZERO);
        assert_eq!(c.shutdown_grace, Duration::from_secs(3));
        assert_eq!(c.max_source_bytes, MB);
        assert_eq!(c.memory_cache_bytes, 0);
        assert_eq!(c.background, [1, 2, 3]);
    }

    #[test]
    fn concurrency_zero_means_cores_and_queue_follows() {
        let c = ok(with(&[("processing_concurrency", "3")]));
        assert_eq!((c.processing_concurrency, c.queue_size), (3, 12));
        let c = ok(with(&[
            ("processing_concurrency", "3"),
            ("queue_size", "5"),
        ]));
        assert_eq!((c.processing_concurrency, c.queue_size), (3, 5));
    }

    #[test]
    fn store_urls_are_checked_and_relative_files_resolved() {
        let cwd = std::env::current_dir().expect("cwd");
        let file_url = |p: &Path| url::Url::from_file_path(p).expect("abs").to_string();
        let c = ok(with(&[("result_store", "file://./tmp/results")]));
        assert_eq!(c.result_store, Some(file_url(&cwd.join("tmp/results"))));
        let c = ok(with(&[("result_store", "file://tmp/../out")]));
        assert_eq!(c.result_store, Some(file_url(&cwd.join("out"))));
        let c = ok(with(&[("result_store", "file:///var/cache/images")]));
        assert_eq!(c.result_store.as_deref(), Some("file:///var/cache/images"));
        for none in ["none", "NONE", ""] {
            assert_eq!(ok(with(&[("result_store", none)])).result_store, None);
        }
        for good in [
            "s3://bucket/prefix",
            "gs://bucket",
            "az://container/p",
            "memory://",
        ] {
            assert_eq!(
                ok(with(&[("result_store", good)])).result_store.as_deref(),
                Some(good)
            );
        }
        let c = ok(load_layers(
            &FileSource::None,
            Vec::new(),
            &pairs(&[("source_store", "file://./samples")]),
        ));
        assert_eq!(c.source_store, Some(file_url(&cwd.join("samples"))));
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
        assert_eq!(c.s3.access_key_id.as_deref(), Some("AKIAEXAMPLE"));
        assert_eq!(c.s3.secret_access_key.as_deref(), Some("secret/with+chars"));
        let described = c.describe().to_string();
        assert!(!described.contains("secret/with+chars"), "{described}");
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
        assert_eq!(d["timeouts_ms"]["request"], 10_000);
        assert_eq!(d["statsd"], "127.0.0.1:8125");
        assert_eq!(d["url_signing"], true);
        assert_eq!(d["background"], "#ffffff");
        assert_eq!(d["whitelisted_extensions"][0], "jpg");
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
        assert_eq!(c.server_port, 7000);

        let c = ok(load_layers(&env("development"), Vec::new(), &[]));
        assert_eq!((c.server_port, c.status_port), (7000, 7001));
        let samples = url::Url::from_file_path(cwd.join("samples")).expect("abs");
        assert_eq!(c.source_store.as_deref(), Some(samples.as_str()));
        let results = url::Url::from_file_path(cwd.join("tmp/results")).expect("abs");
        assert_eq!(c.result_store.as_deref(), Some(results.as_str()));
        assert_eq!(c.statsd_host, None);

        let test_flags = pairs(&[("source_domain", "http://127.0.0.1:1")]);
        let c = ok(load_layers(&env("test"), Vec::new(), &test_flags));
        assert_eq!((c.server_port, c.status_port), (0, 0));
        assert_eq!(c.statsd_host, None);
        assert_eq!(c.result_store, None);

        let c = ok(load_layers(&env("production"), Vec::new(), &[]));
        assert_eq!((c.server_port, c.status_port), (7000, 7001));
        assert_eq!(c.maximum_width, 1000);
        assert_eq!(c.upload_concurrency, 10);
        assert_eq!(c.statsd_host.as_deref(), Some("127.0.0.1"));
        assert_eq!(
            c.whitelisted_extensions,
            vec![Format::Jpeg, Format::Png, Format::Webp]
        );
        let c = ok(load_layers(
            &FileSource::File(dir.join("production.json")),
            Vec::new(),
            &pairs(&[("source_store", "s3://originals/prod")]),
        ));
        assert_eq!(c.source_domain, None);
        assert_eq!(c.source_store.as_deref(), Some("s3://originals/prod"));

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
        std::fs::write(empty.path().join("qa.toml"), "maximum_width = 10").expect("write");
        std::fs::write(empty.path().join("qa.json"), "{}").expect("write");
        let e = err(load_layers(&in_empty("qa"), Vec::new(), &test_flags));
        assert!(e.to_string().contains("qa.json"), "{e}");
        std::fs::write(empty.path().join("bad.toml"), "maximum_width = ").expect("write");
        let e = err(load_layers(&in_empty("bad"), Vec::new(), &test_flags));
        assert!(matches!(e, ConfigError::Malformed { .. }), "{e}");
        let e = err(load_layers(
            &FileSource::File(empty.path().join("x.yaml")),
            Vec::new(),
            &test_flags,
        ));
        assert!(e.to_string().contains(".toml or .json"), "{e}");
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
        assert_eq!((c.server_port, c.status_port), (0, 0));
        let prod = config_dir().join("production.json");
        let c = ok(load_from(
            Path::new("nowhere"),
            "ignored",
            Some(prod.as_path()),
            vec![("IMAGE_SERVER_MAXIMUM_WIDTH".to_owned(), "900".to_owned())],
            Vec::new(),
        ));
        assert_eq!(c.maximum_width, 900);
    }

    #[test]
    fn default_toml_documents_exactly_the_raw_keys() {
        // Every field is required and unknown fields are denied, so this proves the file names
        // each field of RawConfig and nothing else.
        let table = parse_toml("default.toml", DEFAULT_TOML).expect("default.toml parses");
        let raw: RawConfig = Value::Table(table.clone())
            .try_into()
            .expect("default.toml matches RawConfig");

        // And each key is documented: a comment line right above it naming its variable.
        let keys = toml::Table::try_from(&raw).expect("serialize");
        assert_eq!(keys.len(), table.len());
        let lines: Vec<&str> = DEFAULT_TOML.lines().collect();
        for key in keys.keys() {
            let at = lines
                .iter()
                .position(|l| l.starts_with(&format!("{key} = ")))
                .unwrap_or_else(|| panic!("default.toml has no line `{key} = …`"));
            let comment = lines[at - 1];
            let var = format!("Env: {ENV_PREFIX}{}", key.to_ascii_uppercase());
            assert!(
                comment.starts_with("# ") && comment.ends_with(&var),
                "the line above `{key}` must describe it and end with `{var}`: {comment:?}"
            );
        }
        // Aliases point at real keys.
        for (alias, key) in ALIASES {
            assert!(table.contains_key(key), "{alias} -> {key}");
            assert!(!table.contains_key(alias), "{alias}");
        }
    }
}
