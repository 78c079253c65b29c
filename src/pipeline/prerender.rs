//! The background lane: after a foreground miss has rendered one version of an id, the most popular
//! other versions of its class ([`crate::popular`]) that are not cached yet are rendered from the
//! original the server already holds, and kept in memory and the result store like any render. A
//! page that asks for the grid thumbnail first then finds the card and the zoom already made.
//!
//! The lane never competes with clients: its queue is short ([`LANE_QUEUE`]; a job that does not
//! fit is dropped), and a job starts only when the memory it needs is free, no foreground render is
//! waiting, and a render slot stays free for clients beside the one it takes
//! ([`crate::budget::Budgets::try_background`]); otherwise it is dropped, not delayed. Its renders are counted as `prerender.*`, never as `image_request`, and
//! never in the popularity table.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::Inner;
use crate::cache::{Tier, Variant};
use crate::metrics as m;
use crate::request::{Format, ImageRequest};

/// Jobs waiting in the lane; more are dropped.
pub(super) const LANE_QUEUE: usize = 64;

/// One version to render in the background, with its original.
pub(super) struct Job {
    req: ImageRequest,
    original: Bytes,
}

/// The lane's queue; its worker starts with the first job (the pipeline may be built outside a
/// runtime) and stops when the pipeline is dropped.
pub(super) struct Lane {
    tx: mpsc::Sender<Job>,
    rx: Mutex<Option<mpsc::Receiver<Job>>>,
}

impl Default for Lane {
    fn default() -> Lane {
        let (tx, rx) = mpsc::channel(LANE_QUEUE);
        Lane {
            tx,
            rx: Mutex::new(Some(rx)),
        }
    }
}

impl Lane {
    fn start(&self, inner: Weak<Inner>) {
        let rx = self.rx.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut rx) = rx {
            tokio::spawn(async move {
                while let Some(job) = rx.recv().await {
                    let Some(inner) = inner.upgrade() else { return };
                    inner.prerender(job).await;
                }
            });
        }
    }
}

fn count(outcome: &str) {
    m::incr_with(m::PRERENDER, outcome);
}

impl Inner {
    /// Counts a version of `req`'s class as asked for (a client got it).
    pub(super) fn record(&self, req: &ImageRequest, format: Format) {
        let class = format!("{}/{}", req.model, req.kind);
        self.popularity
            .record(&class, &req.canonical_name(format), Instant::now());
    }

    /// After a foreground miss of `req` as `format`: queues the `prerender_popular` most popular
    /// other versions of its class that are not in memory, with the original just used.
    pub(super) async fn after_miss(self: &Arc<Self>, req: &ImageRequest, format: Format) {
        let wanted = self.prerender_count;
        if wanted == 0 {
            return;
        }
        let class = format!("{}/{}", req.model, req.kind);
        let this = req.canonical_name(format);
        let candidates =
            self.popularity
                .top(&class, crate::popular::PER_CLASS, &this, Instant::now());
        let mut queued = 0;
        let mut original = None;
        for ranked in candidates {
            if queued == wanted {
                break;
            }
            let path = format!("/{}/{}/{}/{}", req.model, req.kind, req.id, ranked.version);
            let Ok(other) = ImageRequest::parse(&path, &self.rules) else {
                // A version the rules no longer allow (the configuration changed): never rendered.
                continue;
            };
            if self.memory.contains(&other.cache_key(other.format)) {
                continue;
            }
            if original.is_none() {
                original = self.originals.get(&req.original_id()).await;
            }
            let Some(bytes) = original.clone() else {
                // Already evicted: fetching it again is foreground work.
                count("skipped");
                return;
            };
            self.lane.start(Arc::downgrade(self));
            match self.lane.tx.try_send(Job {
                req: other,
                original: bytes,
            }) {
                Ok(()) => queued += 1,
                Err(_) => count("dropped"),
            }
        }
    }

    /// Runs one job: skipped when it has been cached meanwhile (memory, or the result store, which
    /// another instance may have filled), dropped when the pool is not idle.
    async fn prerender(&self, job: Job) {
        let key = job.req.cache_key(job.req.format);
        if self.memory.contains(&key) {
            count("skipped");
            return;
        }
        if let Some(remote) = &self.remote {
            // A HEAD, not a read: the next client request reads it (and counts the hit).
            if let Ok(true) = remote.exists(&key).await {
                count("skipped");
                return;
            }
        }
        let spec = self.spec(&job.req, job.req.format);
        match self.processor.render_background(job.original, spec).await {
            Ok(Some(rendered)) if !rendered.bytes.is_empty() => {
                let variant = Arc::new(Variant::new(
                    rendered.bytes,
                    rendered.format,
                    SystemTime::now(),
                    Tier::Miss,
                ));
                self.memory.insert(key.clone(), variant.clone()).await;
                if let Some(remote) = &self.remote {
                    remote.enqueue(key, variant);
                }
                count("rendered");
            }
            Ok(_) => count("dropped"),
            Err(e) => {
                tracing::debug!(error = %e, key = key.as_str(), "background render failed");
                count("dropped");
            }
        }
    }
}
