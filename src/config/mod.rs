//! Configuration: raw values from files, environment and flags become one validated [`Config`].
//!
//! Precedence (docs/configuration.md): built-in defaults (`config/default.toml`, embedded) < `config/{env}.toml`
//! (or the seed's `.json`) chosen by `-e/--environment`, or `--config FILE` < `IMAGE_SERVER_{KEY}`
//! environment variables < command-line flags. Nothing else in the crate reads files or the
//! environment for settings; sizes and durations are parsed here, once.

use std::time::Duration;

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

mod check;
mod layers;
mod validate;

use self::check::*;
#[cfg(test)]
use self::layers::*;
pub use self::layers::{load, load_from, load_layers, FileSource, DEFAULT_TOML, ENV_PREFIX};
use self::validate::*;

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
    use std::net::IpAddr;
    use std::path::{Path, PathBuf};
    use toml::Value;

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
