//! Reading the layers of the configuration: the embedded defaults, a file (`config/{env}.toml`,
//! the seed's `.json`, or `--config FILE`), `IMAGE_SERVER_*` variables and command-line flags, each
//! turned into `(key, value, origin)` triples and merged in that order, the seed's aliases resolved.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use toml::Value;

use super::*;

// ---------------------------------------------------------------------------------------------------
// Layers: defaults < file < environment < flags
// ---------------------------------------------------------------------------------------------------

/// The built-in defaults: `config/default.toml`, which documents every key.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

/// Prefix of the environment variables that set keys: `IMAGE_SERVER_{KEY}`.
pub const ENV_PREFIX: &str = "IMAGE_SERVER_";

/// Names under [`ENV_PREFIX`] that are not keys: the CLI's own variables (see [`crate::cli`]).
pub(super) const ENV_RESERVED: [&str; 3] = ["ENVIRONMENT", "CONFIG", "CONFIG_DIR"];

/// Seed (wanelo/image-server) key → our key. Resolved before layers merge, so a seed file and
/// an `IMAGE_SERVER_UPLOAD_CONCURRENCY` variable override each other as one key.
pub(super) const ALIASES: [(&str, &str); 4] = [
    ("manta_concurrency", "upload_concurrency"),
    ("graphite_host", "statsd_host"),
    ("graphite_port", "statsd_port"),
    ("default_compression", "default_quality"),
];

/// Seed-only file keys with no meaning here (Manta paths, the local disk cache): skipped, so a
/// seed config file loads unchanged. Only files get this leniency.
pub(super) const SEED_IGNORED: [&str; 2] = ["manta_base_path", "local_base_path"];

/// Seed file key: `false` turns statsd off (as an empty `statsd_host` in the same file).
pub(super) const SEED_GRAPHITE_ENABLED: &str = "graphite_enabled";

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
pub(super) type Layer = Vec<(String, Value, String)>;

/// The merged key → value map, and which layer set each key (for messages).
pub(super) struct Merged {
    values: toml::Table,
    origins: BTreeMap<String, String>,
}

impl Merged {
    pub(super) fn apply(&mut self, layer: Layer) {
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

pub(super) fn parse_toml(origin: &str, text: &str) -> Result<toml::Table, ConfigError> {
    toml::from_str(text).map_err(|e: toml::de::Error| ConfigError::Malformed {
        origin: origin.to_owned(),
        message: e.to_string().trim_end().to_owned(),
    })
}

pub(super) fn parse_json(origin: &str, text: &str) -> Result<toml::Table, ConfigError> {
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
pub(super) fn json_to_toml(value: serde_json::Value) -> Option<Value> {
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

pub(super) fn is_json(name: &str) -> bool {
    Path::new(name)
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
}

pub(super) fn read_path(path: &Path) -> Result<(String, toml::Table), ConfigError> {
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
pub(super) fn read_file(file: &FileSource) -> Result<Option<(String, toml::Table)>, ConfigError> {
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
pub(super) fn canonical_key<'a>(key: &'a str, defaults: &toml::Table) -> Option<&'a str> {
    let key = ALIASES
        .iter()
        .find(|(alias, _)| *alias == key)
        .map_or(key, |(_, canonical)| *canonical);
    defaults.contains_key(key).then_some(key)
}

/// Adds `(key, value)` to a layer that must not set one key twice (a file, the environment).
pub(super) fn push_once(
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

pub(super) fn file_layer(
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

pub(super) fn env_layer(
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

pub(super) fn flag_layer(
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
pub(super) fn toml_value(text: &str) -> Option<Value> {
    let mut table: toml::Table = toml::from_str(&format!("v = {text}")).ok()?;
    if table.len() != 1 {
        return None;
    }
    table.remove("v")
}

/// Reads an environment or flag value, guided by the type of the key's default: text keys take
/// it verbatim (a secret `0123` or `1e5` must not become a number) unless it is a quoted TOML
/// string, list keys take TOML or `a,b,c`, other keys take TOML and fall back to text.
pub(super) fn text_value(
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
