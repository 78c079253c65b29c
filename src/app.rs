//! Everything a running server shares, built once from a checked [`Config`]: the source of originals,
//! the result store, the `?source=` guard and the pipeline over them. `serve`, `warm` and `purge` all
//! start from [`App::new`]; the image port's handlers live in [`crate::service`], the status port's in
//! [`crate::status`].

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use http::header::HeaderValue;

use crate::cache::remote::RemoteStore;
use crate::config::Config;
use crate::error::Error;
use crate::pipeline::Pipeline;
use crate::request::Rules;
use crate::server::connection::Room;
use crate::source::guard::SourceGuard;
use crate::source::Source;

/// Everything a request needs, shared by every connection.
pub struct App {
    /// The validated configuration.
    pub config: Arc<Config>,
    /// The parse rules derived from it.
    pub rules: Rules,
    /// The cache → fetch → render → store orchestration.
    pub pipeline: Pipeline,
    /// Set when a stop was asked for: `/ready` turns 503 and new image requests are refused.
    pub shutting_down: AtomicBool,
    /// Set once a successor has taken over the listening sockets: answers close their connection
    /// (`Connection: close`), so clients reconnect to the successor.
    pub handing_over: AtomicBool,
    /// When the server started.
    pub started: Instant,
    /// `Cache-Control` sent on cacheable 4xx answers, precomputed from `not_found_ttl`.
    pub(crate) error_cache_control: HeaderValue,
    /// `Cache-Control` sent on images.
    pub(crate) cache_control: HeaderValue,
    /// The open connections of each port (the server evicts idle ones from them; the status page
    /// counts them).
    pub rooms: Rooms,
    /// The upload endpoints' places and per-id locks.
    pub(crate) uploads: crate::upload::Uploads,
}

/// The open connections of both ports.
#[derive(Default)]
pub struct Rooms {
    /// The image port's.
    pub image: Arc<Room>,
    /// The status port's.
    pub status: Arc<Room>,
}

impl App {
    /// Builds the source, the result store and the pipeline from a validated config. Must run inside a
    /// tokio runtime (the result store spawns its writers).
    pub fn new(config: Config) -> Result<App, Error> {
        let config = Arc::new(config);
        let source = Source::from_config(&config)?;
        let remote = match &config.caching.result_store {
            None => None,
            Some(url) => {
                let (store, prefix) = crate::source::object_store_from_url(
                    url,
                    &config.s3,
                    config.timeouts.store_timeout,
                    config.timeouts.connect_timeout,
                )?;
                let attributes = url.keeps_attributes();
                Some(RemoteStore::new(
                    store,
                    prefix,
                    attributes,
                    config.caching.cache_control.clone(),
                    config.timeouts.store_timeout,
                    config.caching.upload_concurrency,
                    config.caching.upload_backlog,
                ))
            }
        };
        let guard = SourceGuard::from_config(&config)?;
        Ok(App::with_parts(config, source, remote, guard))
    }

    /// Assembles an app from parts (tests inject their own source, store or `?source=` guard).
    pub fn with_parts(
        config: Arc<Config>,
        source: Source,
        remote: Option<RemoteStore>,
        guard: Option<SourceGuard>,
    ) -> App {
        let error_cache_control = HeaderValue::from_str(&format!(
            "public, max-age={}",
            config.caching.not_found_ttl.as_secs()
        ))
        .unwrap_or(HeaderValue::from_static("no-store"));
        let cache_control = HeaderValue::from_str(&config.caching.cache_control)
            .unwrap_or(HeaderValue::from_static("public, max-age=31536000"));
        App {
            uploads: crate::upload::Uploads::new(&config),
            rules: config.rules(),
            pipeline: Pipeline::new(config.clone(), source, remote, guard),
            config,
            shutting_down: AtomicBool::new(false),
            handing_over: AtomicBool::new(false),
            started: Instant::now(),
            error_cache_control,
            cache_control,
            rooms: Rooms::default(),
        }
    }
}
