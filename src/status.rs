//! The status port: `/` (JSON status page), `/health`, `/ready`, `/metrics` (Prometheus text) and
//! `POST /purge/{model}/{type}/{id}` (drops one original's entries from memory, behind `admin_token`).
//! Every answer is `no-store`. The gauges are published from here too, on each scrape and once a
//! second by the server for statsd.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::header;
use http::{Method, Request, Response, StatusCode};

use crate::app::App;
use crate::image::vips;
use crate::metrics as m;
use crate::request::{ImageRequest, Rules};
use crate::service::Body;

impl App {
    /// Sets the `processing.current`, `downloads.current` and `queue.depth` gauges from the live
    /// counters (on every `/metrics` scrape, and once a second from the server for statsd).
    pub fn publish_gauges(&self) {
        self.pipeline.stats().publish();
    }

    /// Answers one request on the status port.
    pub async fn handle_status<B>(self: Arc<Self>, req: Request<B>) -> Response<Body> {
        let path = req.uri().path().to_owned();
        let (status, content_type, body) = match (req.method(), path.as_str()) {
            (&Method::GET, "/") => (
                StatusCode::OK,
                "application/json",
                self.status_json().await.to_string(),
            ),
            (&Method::GET, "/versions") => (
                StatusCode::OK,
                "application/json",
                self.versions_json().to_string(),
            ),
            (&Method::GET, "/health") => {
                let ok = tokio::task::spawn_blocking(vips::self_test).await;
                match ok {
                    Ok(Ok(())) => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
                    _ => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        "unhealthy\n".to_owned(),
                    ),
                }
            }
            (&Method::GET, "/ready") => {
                if self.shutting_down.load(Ordering::Acquire) {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        "shutting down\n".to_owned(),
                    )
                } else if let Some(Err(_)) = match self.pipeline.remote() {
                    Some(r) => Some(r.check().await),
                    None => None,
                } {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        "result store unreachable\n".to_owned(),
                    )
                } else {
                    (StatusCode::OK, "text/plain", "ready\n".to_owned())
                }
            }
            (&Method::GET, "/metrics") => {
                // Gauges are read at scrape time, not whenever a render last ended.
                self.publish_gauges();
                (
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    m::prometheus().map(|h| h.render()).unwrap_or_default(),
                )
            }
            (&Method::POST, p) if p.starts_with("/purge/") => self.purge(&req, p),
            _ => (
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found\n".to_owned(),
            ),
        };
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, content_type)
            .header(header::CACHE_CONTROL, "no-store")
            .body(Body::new(Bytes::from(body)))
            .unwrap_or_else(|_| Response::new(Body::default()))
    }

    fn purge<B>(&self, req: &Request<B>, path: &str) -> (StatusCode, &'static str, String) {
        let Some(token) = &self.config.security.admin_token else {
            m::incr_with(m::PURGE, "disabled");
            return (
                StatusCode::NOT_FOUND,
                "text/plain",
                "purge disabled\n".to_owned(),
            );
        };
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.expose().as_bytes())) {
            m::incr_with(m::PURGE, "unauthorized");
            return (
                StatusCode::UNAUTHORIZED,
                "text/plain",
                "unauthorized\n".to_owned(),
            );
        }
        let original = path.strip_prefix("/purge/").unwrap_or_default();
        // Reuse the URL grammar to validate the id: a purge path must name a real original.
        let probe = format!("/{original}/full_size.jpg");
        if ImageRequest::parse(&probe, &Rules::default()).is_err() {
            m::incr_with(m::PURGE, "bad_id");
            return (StatusCode::BAD_REQUEST, "text/plain", "bad id\n".to_owned());
        }
        match self.pipeline.purge_memory(original) {
            Ok(()) => {
                m::incr_with(m::PURGE, "ok");
                // An operator action, worth one line; the id passed the grammar, so it is safe to log.
                tracing::info!(original, "purged from memory");
                (StatusCode::OK, "text/plain", "purged\n".to_owned())
            }
            Err(e) => {
                m::incr_with(m::PURGE, "failed");
                tracing::warn!(error = %e, "purge failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    "internal error\n".to_owned(),
                )
            }
        }
    }

    async fn status_json(&self) -> serde_json::Value {
        let stats = self.pipeline.stats();
        let mem = self.pipeline.memory();
        mem.sync().await;
        self.pipeline.sync_originals().await;
        let (orig_entries, orig_bytes) = self.pipeline.originals_usage();
        let ratio = |h: u64, mi: u64| {
            if h + mi == 0 {
                0.0
            } else {
                h as f64 / (h + mi) as f64
            }
        };
        let remote = self.pipeline.remote().map(|r| {
            serde_json::json!({
                "hits": r.hits(),
                "misses": r.misses(),
                "hit_ratio": ratio(r.hits(), r.misses()),
                "writes": r.writes(),
                "write_fails": r.write_fails(),
                "pending_writes": r.pending(),
            })
        });
        serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "libvips_version": vips::version(),
            "uptime_seconds": self.started.elapsed().as_secs(),
            "pid": std::process::id(),
            "shutting_down": self.shutting_down.load(Ordering::Acquire),
            "processing": {
                "current": stats.processing_current,
                "total": stats.processing_total,
                "abandoned": stats.abandoned,
                "memory_reserved_bytes": stats.memory_reserved,
                "decodes": stats.decodes,
                "shared_decodes": stats.shared,
            },
            "connections": { "image": self.rooms.image.len(), "status": self.rooms.status.len() },
            "downloads": { "current": stats.downloads_current, "total": stats.downloads_total },
            "queue_depth": stats.queue_depth,
            "popular_versions": self.pipeline.popularity().summary(),
            "source": self.pipeline.source().describe(),
            "cache": {
                "memory": {
                    "entries": mem.entry_count(),
                    "bytes": mem.weighted_size(),
                    "hits": mem.hits(),
                    "misses": mem.misses(),
                    "hit_ratio": ratio(mem.hits(), mem.misses()),
                },
                "originals": { "entries": orig_entries, "bytes": orig_bytes },
                "remote": remote,
            },
            "limits": self.config.describe(),
        })
    }
}

impl App {
    /// `/versions`: every class with its versions and their decayed request counts, best first.
    fn versions_json(&self) -> serde_json::Value {
        let table = self.pipeline.popularity().table(std::time::Instant::now());
        let classes: serde_json::Map<String, serde_json::Value> = table
            .into_iter()
            .map(|(class, ranked)| (class, serde_json::json!(ranked)))
            .collect();
        serde_json::json!({ "classes": classes })
    }
}

/// Compares secrets in time independent of where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    subtle::ConstantTimeEq::ct_eq(a, b).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_compare() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
