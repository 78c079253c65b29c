//! The layers of the configuration and their merge through figment: the embedded defaults
//! (`config/default.toml`) < one file (`config/{env}.toml`, the seed's `.json`, or `--config FILE`)
//! < `IMAGE_SERVER_*` variables < command-line flags. Each layer is a figment provider that knows
//! where each of its keys came from, so figment's errors and [`super::Loaded::origins`] can name the
//! file, variable or flag. Here too: unknown keys (refused, with a suggestion), the typing of
//! environment and flag text, and the rule that `source_domain` and `source_store` exclude each other.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use figment::providers::{Format, Json, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};

use super::seed::{self, Report};
use super::{check, keys, ConfigError, Loaded};
use crate::cli::GlobalOpts;

/// The built-in defaults: `config/default.toml`, which documents every key.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

/// Prefix of the environment variables that set keys: `IMAGE_SERVER_{KEY}`.
pub const ENV_PREFIX: &str = "IMAGE_SERVER_";

/// Names under [`ENV_PREFIX`] that are not keys: the CLI's own variables (see [`crate::cli`]).
pub(super) const ENV_RESERVED: [&str; 5] = [
    "ENVIRONMENT",
    "CONFIG",
    "CONFIG_DIR",
    // The restart hand-over (crate::server::restart).
    "LISTEN_FDS",
    "READY_FD",
];

/// The defaults layer's name; a value from it has no origin worth a "(set in …)".
const DEFAULTS: &str = "built-in defaults";

/// The environment variable that sets `key`.
pub fn env_var(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.to_ascii_uppercase())
}

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
pub fn load(opts: &GlobalOpts) -> Result<Loaded, ConfigError> {
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
    load_with(&file, vars, opts.flag_overrides())
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
) -> Result<Loaded, ConfigError> {
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
/// - `env_vars`: `(name, value)` pairs; only `IMAGE_SERVER_*` names are read. A key whose default
///   is text takes the value verbatim (unless it is one quoted string, `"2s"` or `'2s'`); a list
///   key takes `[…]` or `a,b,c`; any other key reads it as figment reads an environment value
///   (`3000`, `true`, `1.5`), falling back to text.
/// - `overrides`: `--set` `(key, value)` pairs, read like environment values; later pairs win.
///
/// Setting `source_domain` in a layer clears a `source_store` from lower layers and vice versa,
/// so `--source-domain` works over a file that names a store; one layer setting both is an error.
pub fn load_layers(
    file: &FileSource,
    env_vars: impl IntoIterator<Item = (String, String)>,
    overrides: &[(String, String)],
) -> Result<Loaded, ConfigError> {
    let flags = overrides
        .iter()
        .map(|(k, v)| {
            let key = k.trim().to_ascii_lowercase();
            (format!("--set {key}"), key, v.clone())
        })
        .collect();
    load_with(file, env_vars, flags)
}

/// The loader itself; `flags` are `(flag as written, key, value)`, in command-line order.
fn load_with(
    file: &FileSource,
    env_vars: impl IntoIterator<Item = (String, String)>,
    flags: Vec<(String, String, String)>,
) -> Result<Loaded, ConfigError> {
    let mut report = Report::default();
    let defaults = Layer::parsed(DEFAULTS, None, DEFAULT_TOML, false, &mut report)?;
    let mut file = read_file(file, &mut report)?;
    let env = env_layer(env_vars, &defaults.values)?;
    let flags = flag_layer(flags, &defaults.values)?;

    if let Some((layer, Some(path))) = &mut file {
        let set_by = [&*layer, &env, &flags]
            .into_iter()
            .rev()
            .find(|l| l.values.contains_key("result_store"))
            .map(|l| l.origin("result_store"));
        if let Some(url) = seed::local_base_path(&layer.name, path, set_by.as_deref(), &mut report)?
        {
            let origin = format!("{} as local_base_path", layer.name);
            layer.set("result_store", Value::from(url), origin);
        }
    }

    let mut layers = vec![defaults];
    layers.extend(file.map(|(layer, _)| layer));
    layers.extend([env, flags]);
    let mut below = Layer::new("below");
    let mut figment = Figment::new();
    for mut layer in layers {
        layer.exclude_sources(&below);
        for key in ["source_domain", "source_store"] {
            if let Some(value) = layer.values.get(key) {
                below.values.insert(key.to_owned(), value.clone());
            }
        }
        figment = figment.merge(layer);
    }

    let config = check::build(&figment)?;
    report.warnings.extend(check::warnings(&config));
    let origins = keys()
        .into_iter()
        .map(|k| {
            let origin = origin_of(&figment, k).unwrap_or_else(|| "default".to_owned());
            (k, origin)
        })
        .collect();
    Ok(Loaded {
        config,
        warnings: report.warnings,
        notes: report.notes,
        origins,
    })
}

/// Where the value of `key` came from, or `None` for the built-in default.
pub(super) fn origin_of(figment: &Figment, key: &str) -> Option<String> {
    figment
        .find_metadata(key)
        .and_then(|m| origin_in(m, &[key]))
}

/// The origin a layer's metadata gives `path`, or `None` for the built-in defaults.
pub(super) fn origin_in<K: AsRef<str>>(metadata: &Metadata, path: &[K]) -> Option<String> {
    (metadata.name != DEFAULTS).then(|| metadata.interpolate(&Profile::Default, path))
}

// ---------------------------------------------------------------------------------------------------
// A layer
// ---------------------------------------------------------------------------------------------------

/// One layer: its values, and where each came from (a file, a variable, a flag); a figment
/// provider whose metadata names that origin for each key.
#[derive(Debug)]
struct Layer {
    /// The layer's name: `built-in defaults`, a file path, `environment`, `command line`.
    name: String,
    values: Dict,
    /// Key → origin, where it is not `name` (a variable, a flag, an old key name).
    origins: BTreeMap<String, String>,
}

impl Layer {
    fn new(name: &str) -> Layer {
        Layer {
            name: name.to_owned(),
            values: Dict::new(),
            origins: BTreeMap::new(),
        }
    }

    /// A file's text, TOML or JSON, read through figment's providers.
    fn parsed(
        name: &str,
        path: Option<&Path>,
        text: &str,
        json: bool,
        report: &mut Report,
    ) -> Result<Layer, ConfigError> {
        let data = if json {
            Json::string(&seed::relax_json(name, text, report)).data()
        } else {
            Toml::string(text).data()
        };
        let mut data = data.map_err(|e| ConfigError::Malformed {
            origin: path.map_or(name.to_owned(), |p| p.display().to_string()),
            message: message_of(&e).trim_end().to_owned(),
        })?;
        Ok(Layer {
            values: data.remove(&Profile::Default).unwrap_or_default(),
            ..Layer::new(name)
        })
    }

    /// Where this layer's `key` came from.
    fn origin(&self, key: &str) -> String {
        self.origins.get(key).unwrap_or(&self.name).clone()
    }

    fn set(&mut self, key: &str, value: Value, origin: String) {
        self.values.insert(key.to_owned(), value);
        self.origins.insert(key.to_owned(), origin);
    }

    /// Whether this layer sets `key` to something (not empty text).
    fn sets(&self, key: &str) -> bool {
        self.values
            .get(key)
            .is_some_and(|v| v.as_str().is_none_or(|s| !s.trim().is_empty()))
    }

    /// The two source keys exclude each other: a layer naming one (not empty) clears the other
    /// when the layers `below` it (merged) set it. A layer naming both is left as it is, for the
    /// check to refuse.
    fn exclude_sources(&mut self, below: &Layer) {
        let (domain, store) = ("source_domain", "source_store");
        let clear = match (self.sets(domain), self.sets(store)) {
            (true, false) => Some((store, domain)),
            (false, true) => Some((domain, store)),
            _ => None,
        };
        if let Some((cleared, by)) = clear.filter(|(cleared, _)| below.sets(cleared)) {
            let origin = format!("cleared by {}", self.origin(by));
            self.set(cleared, Value::from(String::new()), origin);
        }
    }

    /// Refuses a key no layer may set.
    fn check_known(&self) -> Result<(), ConfigError> {
        let known = keys();
        match self.values.keys().find(|k| !known.contains(&k.as_str())) {
            Some(key) => Err(unknown(key, self.origin(key))),
            None => Ok(()),
        }
    }
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        let name = self.name.clone();
        let origins = Arc::new(self.origins.clone());
        Metadata::named(self.name.clone()).interpolater(move |_: &Profile, path: &[&str]| {
            let key = path.join(".");
            origins.get(&key).unwrap_or(&name).clone()
        })
    }

    fn data(&self) -> figment::Result<Map<Profile, Dict>> {
        Ok(Profile::Default.collect(self.values.clone()))
    }
}

/// figment's message, without its own "for key … in …" decoration.
pub(super) fn message_of(e: &figment::Error) -> String {
    match &e.kind {
        figment::error::Kind::Message(m) => m.clone(),
        other => other.to_string(),
    }
}

/// An unknown key, with the known key it was probably meant to be when one is close: Jaro-Winkler
/// similarity of at least 0.8 catches transpositions and dropped underscores (`maximum_widht`,
/// `serverport`) without proposing unrelated keys for short words (`nope`).
fn unknown(key: &str, origin: String) -> ConfigError {
    let candidates = keys()
        .into_iter()
        .chain(seed::ALIASES.iter().map(|(alias, _)| *alias));
    let suggestion = candidates
        .map(|k| (strsim::jaro_winkler(key, k), k))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| k.to_owned());
    ConfigError::UnknownKey {
        key: key.to_owned(),
        origin,
        suggestion,
    }
}

// ---------------------------------------------------------------------------------------------------
// The file
// ---------------------------------------------------------------------------------------------------

fn is_json(name: &str) -> bool {
    Path::new(name)
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
}

/// A file's layer after the seed pass, and its `local_base_path` if it names one.
type FileLayer = (Layer, Option<String>);

fn file_layer(
    name: &str,
    path: Option<&Path>,
    text: &str,
    report: &mut Report,
) -> Result<FileLayer, ConfigError> {
    let parsed = Layer::parsed(name, path, text, is_json(name), report)?;
    let seed::FileKeys {
        values,
        origins,
        local_base_path,
    } = seed::read_keys(name, parsed.values, report)?;
    let layer = Layer {
        values,
        origins,
        ..Layer::new(name)
    };
    layer.check_known()?;
    Ok((layer, local_base_path))
}

fn read_path(path: &Path, report: &mut Report) -> Result<FileLayer, ConfigError> {
    let name = path.display().to_string();
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    if !matches!(ext.as_deref(), Some("toml" | "json")) {
        return Err(ConfigError::Malformed {
            origin: name,
            message: "a config file must end in .toml or .json".to_owned(),
        });
    }
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: name.clone(),
        source,
    })?;
    file_layer(&name, Some(path), &text, report)
}

/// Reads the file layer, if there is one.
fn read_file(file: &FileSource, report: &mut Report) -> Result<Option<FileLayer>, ConfigError> {
    match file {
        FileSource::None => Ok(None),
        FileSource::File(path) => read_path(path, report).map(Some),
        FileSource::Inline { name, text } => file_layer(name, None, text, report).map(Some),
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
                (true, json) => {
                    if json {
                        // A seed file left beside its replacement: the TOML is the newer intent.
                        report.warnings.push(format!(
                            "{} is ignored: {} is read instead (keep one file per environment)",
                            json_path.display(),
                            toml_path.display()
                        ));
                    }
                    read_path(&toml_path, report).map(Some)
                }
                (false, true) => read_path(&json_path, report).map(Some),
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

// ---------------------------------------------------------------------------------------------------
// Environment variables and flags
// ---------------------------------------------------------------------------------------------------

fn env_layer(
    vars: impl IntoIterator<Item = (String, String)>,
    defaults: &Dict,
) -> Result<Layer, ConfigError> {
    // Sorted, so a clash between an old name and its key is reported the same way every time.
    let vars: BTreeMap<String, String> = vars
        .into_iter()
        .filter(|(name, _)| name.starts_with(ENV_PREFIX))
        .collect();
    let mut layer = Layer::new("environment");
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
        let canonical = seed::canonical(&key);
        if !keys().contains(&canonical) {
            return Err(unknown(&key, format!("environment variable {name}")));
        }
        if layer.values.contains_key(canonical) {
            return Err(ConfigError::Invalid {
                key: canonical.to_owned(),
                message: format!("set twice, by {} and by {name}", layer.origin(canonical)),
                origin: None,
            });
        }
        let value = text_value(canonical, &text, defaults, &name)?;
        layer.set(canonical, value, name.clone());
    }
    Ok(layer)
}

fn flag_layer(flags: Vec<(String, String, String)>, defaults: &Dict) -> Result<Layer, ConfigError> {
    let mut layer = Layer::new("command line");
    for (flag, key, text) in flags {
        let canonical = seed::canonical(&key);
        if !keys().contains(&canonical) {
            return Err(unknown(&key, flag));
        }
        // Later flags win, as on any command line.
        let value = text_value(canonical, &text, defaults, &flag)?;
        layer.set(canonical, value, flag);
    }
    Ok(layer)
}

/// Reads an environment or flag value, guided by the type of the key's default: text keys take
/// it verbatim (a secret `0123` or `1e5` must not become a number) unless it is one quoted string,
/// list keys take `[…]` or `a,b,c`, other keys are read as figment reads environment values.
fn text_value(key: &str, text: &str, defaults: &Dict, origin: &str) -> Result<Value, ConfigError> {
    let t = text.trim();
    Ok(match defaults.get(key) {
        Some(Value::String(..)) => {
            if t.len() >= 2
                && t.starts_with('\'')
                && t.ends_with('\'')
                && !t[1..t.len() - 1].contains('\'')
            {
                Value::from(t[1..t.len() - 1].to_owned())
            } else {
                match t.starts_with('"').then(|| t.parse::<Value>()) {
                    // figment's parser unquotes a complete string; anything else comes back whole.
                    Some(Ok(Value::String(_, s))) if s != t => Value::from(s),
                    _ => Value::from(text.to_owned()),
                }
            }
        }
        Some(Value::Array(..)) if t.starts_with('[') => match t.parse::<Value>() {
            Ok(list @ Value::Array(..)) => list,
            _ => {
                return Err(ConfigError::Invalid {
                    key: key.to_owned(),
                    message: format!("expected a list [a, b] or a,b,c, got {t:?}"),
                    origin: Some(origin.to_owned()),
                })
            }
        },
        Some(Value::Array(..)) => Value::from(
            t.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::from(s.to_owned()))
                .collect::<Vec<Value>>(),
        ),
        _ => match t.parse::<Value>() {
            Ok(v) => v,
            Err(never) => match never {},
        },
    })
}
