//! Every configuration key, declared once: its name (the field, or its `rename`), its type, how
//! its value is read and checked (`de::…`), and its doc comment. Keys are grouped by what they
//! configure; each group is read from the same flat set of keys (`server_port`, not
//! `listen.server_port`), so a file stays a flat list. The defaults are in `config/default.toml`
//! alone, and a test keeps that file and these declarations in agreement. Rules that involve more
//! than one key live in `check.rs`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::de;
use super::values::{Secret, Size, SourceDomain, SourcePath, StoreUrl, KB, MB};
use crate::image::Gravity;
use crate::request::Format;

/// Upper bound for pools and queues: far above any machine, low enough to catch a typo.
const MAX_WORKERS: i64 = 65_536;
/// Largest width or height a URL may name (the parser's five digits).
const MAX_DIMENSION: i64 = crate::request::MAX_NUMBER as i64;
/// libvips refuses coordinates above 10,000,000 (`VIPS_MAX_COORD`).
const MAX_SIDE: i64 = 10_000_000;
/// The largest AVIF frame an encoder accepts (65536²).
const MAX_AVIF_PIXELS: i64 = 1 << 32;
/// Queues: far above any useful depth.
const MAX_QUEUE: i64 = 1_000_000;
/// The versions the popularity table keeps per class: more could never be pre-rendered.
const MAX_PRERENDER: i64 = crate::popular::PER_CLASS as i64;

/// Where the two ports listen and how many connections they hold.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Listen {
    /// The IP address both ports bind to (an IPv4 or IPv6 address, not a name).
    #[serde(deserialize_with = "de::parsed")]
    pub listen_address: IpAddr,
    /// The IP address of the status port alone; `None` (empty) means `listen_address`, see
    /// [`Listen::status_ip`].
    #[serde(deserialize_with = "de::optional")]
    pub status_address: Option<IpAddr>,
    /// Port of the image service; 0 picks any free port.
    #[serde(deserialize_with = "de::int::<_, _, 0, 65_535>")]
    pub server_port: u16,
    /// Port of the status service (`/`, `/health`, `/ready`, `/metrics`, `POST /purge/…`); 0 picks
    /// any free port.
    #[serde(deserialize_with = "de::int::<_, _, 0, 65_535>")]
    pub status_port: u16,
    /// Most connections open at once on the image port (start-up may lower it to fit the
    /// open-files limit).
    #[serde(deserialize_with = "de::int::<_, _, 1, 10_000_000>")]
    pub max_connections: usize,
    /// Length of each port's queue of connections the kernel has completed but the server has not
    /// yet accepted (`listen(2)`'s backlog; the kernel caps it at `net.core.somaxconn`).
    #[serde(deserialize_with = "de::int::<_, _, 1, 65_535>")]
    pub listen_backlog: u32,
    /// Requests in progress at once on one HTTP/2 connection.
    #[serde(deserialize_with = "de::int::<_, _, 1, MAX_WORKERS>")]
    pub http2_max_concurrent_streams: u32,
    /// Where the serving process writes its PID once it is ready (a restart's successor replaces
    /// it); `image-server restart` reads it. `None` (empty): no PID file.
    #[serde(deserialize_with = "de::optional")]
    pub pid_file: Option<std::path::PathBuf>,
}

impl Listen {
    /// The address the status port binds to: `status_address`, else `listen_address`.
    pub fn status_ip(&self) -> IpAddr {
        self.status_address.unwrap_or(self.listen_address)
    }
}

/// Where originals come from: exactly one of `source_domain` and `source_store`, and the path of
/// an original below it.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Originals {
    /// HTTP(S) base URL of the originals (empty: not used).
    #[serde(deserialize_with = "de::optional")]
    pub source_domain: Option<SourceDomain>,
    /// Object-store URL of the originals (empty: not used).
    #[serde(deserialize_with = "de::optional")]
    pub source_store: Option<StoreUrl>,
    /// Path below `source_domain`, or key below `source_store`, of an original:
    /// `{model}/{type}/{id}/original.jpg` by default.
    #[serde(deserialize_with = "de::parsed")]
    pub source_path: SourcePath,
    /// Statuses from `source_domain` that mean the original is missing (404 to the client), each
    /// 400–599.
    #[serde(deserialize_with = "de::statuses")]
    pub source_not_found_statuses: Vec<u16>,
    /// Hosts, besides `source_domain`'s own, that a redirect from `source_domain` may lead to
    /// (lower-cased host names or IP addresses).
    #[serde(deserialize_with = "de::hosts")]
    pub source_redirect_hosts: Vec<String>,
}

/// S3 settings, shared by `source_store` and `result_store` when they are `s3://` URLs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct S3Config {
    /// `s3_endpoint`: an S3-compatible server (path-style requests then); `None` means AWS.
    #[serde(rename = "s3_endpoint", deserialize_with = "de::endpoint")]
    pub endpoint: Option<String>,
    /// `s3_region`.
    #[serde(rename = "s3_region", deserialize_with = "de::required_text")]
    pub region: String,
    /// `s3_allow_http`: whether a plain `http://` endpoint is allowed.
    #[serde(rename = "s3_allow_http", deserialize_with = "de::boolean")]
    pub allow_http: bool,
    /// `s3_access_key_id`; with neither key set, `AWS_ACCESS_KEY_ID` and friends are read.
    #[serde(rename = "s3_access_key_id", deserialize_with = "de::secret")]
    pub access_key_id: Option<Secret>,
    /// `s3_secret_access_key`; set with `s3_access_key_id` or not at all.
    #[serde(rename = "s3_secret_access_key", deserialize_with = "de::secret")]
    pub secret_access_key: Option<Secret>,
}

/// What a URL may ask for.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Requests {
    /// Output formats served, by extension; others answer 406.
    #[serde(with = "de::extensions")]
    pub whitelisted_extensions: Vec<Format>,
    /// Largest width a URL may ask for; wider answers 406.
    #[serde(deserialize_with = "de::int::<_, _, 1, MAX_DIMENSION>")]
    pub maximum_width: u32,
    /// Largest height a URL may ask for; taller answers 406.
    #[serde(deserialize_with = "de::int::<_, _, 1, MAX_DIMENSION>")]
    pub maximum_height: u32,
    /// When not empty, the only versions served, as canonical names (`x300` is `300x300`).
    #[serde(deserialize_with = "de::version_names")]
    pub allowed_sizes: Vec<String>,
    /// Names for version files: `/{model}/{type}/{id}/thumb` answers what `…/x150.jpg` answers,
    /// from the same cache entry.
    #[serde(deserialize_with = "de::named_versions")]
    pub named_versions: BTreeMap<String, String>,
}

/// How results are encoded.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Rendering {
    /// JPEG quality when the URL has no `-q` (the seed's `default_compression`).
    #[serde(deserialize_with = "de::int::<_, _, 1, 100>")]
    pub default_quality: u8,
    /// WebP quality when the URL has no `-q`.
    #[serde(deserialize_with = "de::int::<_, _, 1, 100>")]
    pub webp_quality: u8,
    /// AVIF quality when the URL has no `-q`.
    #[serde(deserialize_with = "de::int::<_, _, 1, 100>")]
    pub avif_quality: u8,
    /// AVIF encoder effort, 0 (fastest) to 9 (smallest).
    #[serde(deserialize_with = "de::int::<_, _, 0, 9>")]
    pub avif_effort: u8,
    /// Largest AVIF output in pixels; larger answers 406 (the AV1 encoder cannot be interrupted).
    #[serde(deserialize_with = "de::int::<_, _, 1, MAX_AVIF_PIXELS>")]
    pub max_avif_output_pixels: u64,
    /// Encode JPEG output as progressive.
    #[serde(deserialize_with = "de::boolean")]
    pub progressive_jpeg: bool,
    /// Where `{W}x{H}` crops.
    #[serde(with = "de::gravity")]
    pub crop_gravity: Gravity,
    /// Allow results larger than the original.
    #[serde(deserialize_with = "de::boolean")]
    pub enlarge: bool,
    /// Colour transparency is flattened onto for JPEG output, RGB.
    #[serde(with = "de::colour")]
    pub background: [u8; 3],
    /// Serve AVIF or WebP for `.jpg`/`.png` URLs when `Accept` names them.
    #[serde(deserialize_with = "de::boolean")]
    pub auto_format: bool,
    /// Load AVIF and HEIF originals (otherwise 422).
    #[serde(deserialize_with = "de::boolean")]
    pub accept_avif_input: bool,
}

/// Limits on an original, checked before it is decoded.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Limits {
    /// Largest original downloaded; larger answers 422, decided while the bytes arrive.
    #[serde(deserialize_with = "de::size::<_, 1, 1>")]
    pub max_source_bytes: Size<1>,
    /// Most pixels (width × height × frames) an original may have, from its header.
    #[serde(deserialize_with = "de::int::<_, _, 1, { i64::MAX }>")]
    pub max_source_pixels: u64,
    /// Longest side an original may have, from its header.
    #[serde(deserialize_with = "de::int::<_, _, 1, MAX_SIDE>")]
    pub max_source_side: u32,
    /// Most scans a JPEG original may have (encoders write 1 to about 10).
    #[serde(deserialize_with = "de::int::<_, _, 1, 100_000>")]
    pub max_jpeg_scans: u32,
}

/// How much work runs at once, and the memory it may hold.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Capacity {
    /// Renders at once; 0 in a layer means the number of CPU cores (resolved when loaded).
    #[serde(deserialize_with = "de::int::<_, _, 0, MAX_WORKERS>")]
    pub processing_concurrency: usize,
    /// Renders waiting for a slot before 503; 0 means 4 × `processing_concurrency` (resolved).
    #[serde(deserialize_with = "de::int::<_, _, 0, MAX_QUEUE>")]
    pub queue_size: usize,
    /// AVIF encodes at once, within `processing_concurrency`.
    #[serde(deserialize_with = "de::int::<_, _, 1, MAX_WORKERS>")]
    pub avif_concurrency: usize,
    /// AVIF renders waiting for an AVIF slot; 0 means 4 × `avif_concurrency` (resolved).
    #[serde(deserialize_with = "de::int::<_, _, 0, MAX_QUEUE>")]
    pub avif_queue_size: usize,
    /// Downloads of originals at once.
    #[serde(deserialize_with = "de::int::<_, _, 1, MAX_WORKERS>")]
    pub download_concurrency: usize,
    /// Memory all downloads in progress may hold; each reserves `max_source_bytes`.
    #[serde(deserialize_with = "de::size::<_, MB, 1>")]
    pub max_inflight_download_mb: Size<MB>,
    /// Memory all renders may reserve at once (at least 16 MB).
    #[serde(deserialize_with = "de::size::<_, MB, { 16 * MB }>")]
    pub max_memory_mb: Size<MB>,
}

/// Rendering popular versions in the background (docs/operations.md, "Pre-rendering popular sizes").
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Prerender {
    /// Versions of a class rendered in the background after a client's miss, the most requested
    /// first; 0 turns pre-rendering off. At most the versions the popularity table keeps per class.
    #[serde(deserialize_with = "de::int::<_, _, 0, MAX_PRERENDER>")]
    pub prerender_popular: usize,
    /// How fast popularity fades: every score halves each period.
    #[serde(with = "de::period")]
    pub popular_halflife: Duration,
}

/// The memory caches and the shared result store.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Caching {
    /// Memory cache of rendered variants; 0 turns it off.
    #[serde(deserialize_with = "de::size::<_, MB, 0>")]
    pub memory_cache_mb: Size<MB>,
    /// Variants larger than this skip the memory cache.
    #[serde(deserialize_with = "de::size::<_, KB, 1>")]
    pub memory_cache_max_entry_kb: Size<KB>,
    /// Memory cache of downloaded originals; 0 turns it off.
    #[serde(deserialize_with = "de::size::<_, MB, 0>")]
    pub originals_cache_mb: Size<MB>,
    /// How long a missing original is remembered; also the `max-age` of cacheable 4xx answers.
    #[serde(with = "de::ttl")]
    pub not_found_ttl: Duration,
    /// The `Cache-Control` header of image answers.
    #[serde(deserialize_with = "de::header_value")]
    pub cache_control: String,
    /// Object store for rendered variants shared by instances; `None` (`"none"`) for no shared tier.
    #[serde(deserialize_with = "de::result_store")]
    pub result_store: Option<StoreUrl>,
    /// Background writers to the result store (the seed's `manta_concurrency`).
    #[serde(deserialize_with = "de::int::<_, _, 1, MAX_WORKERS>")]
    pub upload_concurrency: usize,
    /// Result-store writes that may wait before new ones are dropped and counted.
    #[serde(deserialize_with = "de::int::<_, _, 1, 10_000_000>")]
    pub upload_backlog: usize,
}

/// Deadlines.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Timeouts {
    /// One image request, end to end (504 past it).
    #[serde(with = "de::timeout")]
    pub request_timeout: Duration,
    /// One render once it has a slot; capped at `request_timeout` when loaded.
    #[serde(with = "de::timeout")]
    pub render_timeout: Duration,
    /// One whole download of an original, headers and body.
    #[serde(with = "de::timeout")]
    pub fetch_timeout: Duration,
    /// Connecting to the origin or a store.
    #[serde(with = "de::timeout")]
    pub connect_timeout: Duration,
    /// A new connection's first request headers (HTTP/1) or preface and first request (HTTP/2).
    #[serde(with = "de::timeout")]
    pub header_read_timeout: Duration,
    /// An idle connection is closed this long after its last response.
    #[serde(with = "de::timeout")]
    pub keep_alive_timeout: Duration,
    /// A response write without progress for this long closes its connection; also the HTTP/2
    /// ping interval and deadline.
    #[serde(with = "de::timeout")]
    pub send_timeout: Duration,
    /// One result-store read or write.
    #[serde(with = "de::timeout")]
    pub store_timeout: Duration,
    /// Time requests in progress get to finish after SIGTERM or SIGINT.
    #[serde(with = "de::grace")]
    pub shutdown_grace: Duration,
}

/// Counters sent to statsd.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Statsd {
    /// statsd host (the seed's `graphite_host`); `None` (empty) turns statsd off.
    #[serde(deserialize_with = "de::statsd_host")]
    pub statsd_host: Option<String>,
    /// statsd UDP port (the seed's `graphite_port`).
    #[serde(deserialize_with = "de::int::<_, _, 1, 65_535>")]
    pub statsd_port: u16,
    /// Prefix of every metric name.
    #[serde(deserialize_with = "de::metric_prefix")]
    pub statsd_prefix: String,
}

/// What clients may make the server do, and the secrets that guard it.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Security {
    /// Honour `?source=URL` (docs/urls.md); needs `allowed_source_hosts`.
    #[serde(deserialize_with = "de::boolean")]
    pub allow_source_override: bool,
    /// Hosts `?source=` may name (a name also allows its subdomains).
    #[serde(deserialize_with = "de::hosts")]
    pub allowed_source_hosts: Vec<String>,
    /// When set, every image URL must carry a valid `?s=` signature made with this key.
    #[serde(deserialize_with = "de::strong_secret")]
    pub url_signing_key: Option<Secret>,
    /// Bearer token of the status port's `POST /purge/…`; `None` turns the endpoint off.
    #[serde(deserialize_with = "de::strong_secret")]
    pub admin_token: Option<Secret>,
}

/// Originals taken in on the image port: `PUT`, `POST` and `DELETE` of `/{model}/{type}/{id}`.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Uploads {
    /// Bearer token that authorises uploads and deletes; `None` (with no signing key) turns the
    /// endpoints off.
    #[serde(deserialize_with = "de::strong_secret")]
    pub upload_token: Option<Secret>,
    /// Key of signed upload URLs (`?expires=…&s=…`), for browsers uploading straight here.
    #[serde(deserialize_with = "de::strong_secret")]
    pub upload_signing_key: Option<Secret>,
    /// Origins (`https://app.example.com`) whose pages may upload with a signed URL (CORS).
    #[serde(deserialize_with = "de::web_origins")]
    pub upload_cors_origins: Vec<String>,
    /// Largest upload body; 0 means `max_source_bytes` (resolved when loaded).
    #[serde(deserialize_with = "de::size::<_, 1, 0>")]
    pub max_upload_bytes: Size<1>,
    /// Formats accepted, detected from the bytes (never from `Content-Type`); others answer 415.
    #[serde(with = "de::extensions")]
    pub upload_formats: Vec<Format>,
    /// Versions rendered after an upload that names no `outputs=`: names from `named_versions` or
    /// version files. Empty means every named version.
    #[serde(deserialize_with = "de::list")]
    pub upload_outputs: Vec<String>,
    /// Uploads read and checked at once; more answer 503.
    #[serde(deserialize_with = "de::int::<_, _, 1, MAX_WORKERS>")]
    pub max_concurrent_uploads: usize,
    /// Time for a client to send a whole upload body; slower answers 408.
    #[serde(with = "de::timeout")]
    pub upload_timeout: Duration,
}

impl Uploads {
    /// Whether the upload endpoints answer at all (a token or a signing key is set).
    pub fn enabled(&self) -> bool {
        self.upload_token.is_some() || self.upload_signing_key.is_some()
    }
}

/// Logs.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Logging {
    /// Log filter in `tracing` EnvFilter syntax; `RUST_LOG` wins when set.
    #[serde(deserialize_with = "de::log_filter")]
    pub log_level: String,
}
