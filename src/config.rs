//! Configuration: raw values from files, environment and flags become one validated [`Config`].
//!
//! Precedence (SPEC §10): built-in defaults (`config/default.toml`, embedded) < `config/{env}.toml`
//! (or the seed's `.json`) chosen by `-e/--environment`, or `--config FILE` < `IMAGE_SERVER_{KEY}`
//! environment variables < command-line flags. Nothing else in the crate reads files or the
//! environment for settings; sizes and durations are parsed here, once.

use std::time::Duration;

use crate::image::Gravity;
use crate::request::Format;

/// The validated configuration. Field names are the config keys.
#[derive(Clone, Debug)]
pub struct Config {
    /// `listen_address` (default `0.0.0.0`): the address both ports bind to.
    pub listen_address: std::net::IpAddr,
    /// `server_port` (7000).
    pub server_port: u16,
    /// `status_port` (7001).
    pub status_port: u16,
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
    /// `upload_concurrency` (seed `manta_concurrency`, 4).
    pub upload_concurrency: usize,
    /// `upload_backlog` (1000): queued background writes before new ones are dropped and counted.
    pub upload_backlog: usize,
    /// `request_timeout` (10 s).
    pub request_timeout: Duration,
    /// `fetch_timeout` (5 s).
    pub fetch_timeout: Duration,
    /// `connect_timeout` (2 s).
    pub connect_timeout: Duration,
    /// `header_read_timeout` (10 s).
    pub header_read_timeout: Duration,
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

/// S3-compatible store options (SPEC §4).
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
