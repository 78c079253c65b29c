//! # image-server
//!
//! An on-the-fly resizing image proxy, URL-compatible with the Go `wanelo/image-server` (2014).
//!
//! Request flow (each step is a module, in the order a request meets them):
//!
//! 1. [`server`] accepts connections (hyper-util auto builder, per-connection deadlines, a connection
//!    budget per port where idle connections make room, graceful stop).
//! 2. [`service`] routes; [`request`] parses `/{model}/{type}/{id}/{version}[-q{Q}].{ext}` into an
//!    [`request::ImageRequest`] with a canonical [`request::CacheKey`], refusing bad names before any I/O.
//! 3. [`pipeline`] looks the key up in the memory cache ([`cache::memory`]), then the remote result
//!    store ([`cache::remote`]); on a miss it fetches the original once ([`source`]), renders it once in
//!    the bounded libvips pool ([`image`]), answers, and writes both tiers in the background.
//! 4. [`service`] turns the result or the [`error::Error`] into a response with the right validators,
//!    cache headers and counters ([`metrics`]).
//!
//! Configuration is read once by [`config`] (defaults < `config/{env}.toml` < `IMAGE_SERVER_*` < flags);
//! [`app`] builds everything from it once (`serve`, `warm` and `purge` alike); [`status`] answers the
//! status port. `docs/architecture.md` tells the same story with the decisions each step makes.

pub mod app;
pub mod budget;
pub mod cache;
pub mod cli;
pub mod commands;
pub mod conditional;
pub mod config;
pub mod error;
pub mod image;
pub mod metrics;
pub mod pipeline;
pub mod popular;
pub mod request;
pub mod server;
pub mod service;
pub mod signature;
pub mod source;
pub mod status;
pub mod upload;
