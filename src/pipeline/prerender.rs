//! The background lane: after a foreground miss has rendered one version of an id, the most popular
//! other versions of its class ([`crate::popular`]) that are not cached yet are rendered from the
//! original the server already holds, together from one decode where their sizes allow
//! ([`crate::image::shared`]), and kept in memory and the result store like any render. A
//! page that asks for the grid thumbnail first then finds the card and the zoom already made.
//!
//! The lane never competes with clients: its queue is short ([`LANE_QUEUE`]; a job that does not
//! fit is dropped), a job starts only when no foreground render is waiting and the memory it needs
//! is free ([`crate::budget::Budgets::try_background`]), otherwise it is dropped, not delayed; and
//! it renders on one thread of its own at idle CPU priority, outside the render slots, so it only
//! uses CPU time no client's render wants. Its renders are counted as `prerender.*`, never as `image_request`, and
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

/// The versions of one original to render in the background, with the original.
pub(super) struct Job {
    reqs: Vec<ImageRequest>,
    original: Bytes,
    /// The revision of the original the bytes are (the renders are marked with it).
    revision: u64,
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

fn count_n(outcome: &str, n: usize) {
    for _ in 0..n {
        count(outcome);
    }
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
        let mut others = Vec::with_capacity(wanted);
        for ranked in candidates {
            if others.len() == wanted {
                break;
            }
            let path = format!("/{}/{}/{}/{}", req.model, req.kind, req.id, ranked.version);
            let Ok(other) = ImageRequest::parse(&path, &self.rules) else {
                // A version the rules no longer allow (the configuration changed): never rendered.
                continue;
            };
            if other.format == Format::Avif || self.memory.contains(&other.cache_key(other.format))
            {
                continue;
            }
            others.push(other);
        }
        if others.is_empty() {
            return;
        }
        let Some((revision, original)) = self.originals.get(&req.original_id()).await else {
            // Already evicted: fetching it again is foreground work.
            count_n("skipped", others.len());
            return;
        };
        self.lane.start(Arc::downgrade(self));
        let n = others.len();
        if self
            .lane
            .tx
            .try_send(Job {
                reqs: others,
                original,
                revision,
            })
            .is_err()
        {
            count_n("dropped", n);
        }
    }

    /// Runs one job: versions cached meanwhile (in memory, or in the result store, which another
    /// instance may have filled) are skipped; the rest are rendered together from one decode, or
    /// dropped when the pool is not idle.
    async fn prerender(&self, job: Job) {
        let mut todo = Vec::with_capacity(job.reqs.len());
        for req in job.reqs {
            let key = req.cache_key(req.format);
            let stored = match &self.remote {
                // A HEAD, not a read: the next client request reads it (and counts the hit).
                Some(remote) => matches!(remote.exists(&key).await, Ok(true)),
                None => false,
            };
            if self.memory.contains(&key) || stored {
                count("skipped");
            } else {
                todo.push((req, key));
            }
        }
        if todo.is_empty() {
            return;
        }
        let specs: Vec<_> = todo.iter().map(|(r, _)| self.spec(r, r.format)).collect();
        let rendered = match self.processor.render_background(job.original, &specs).await {
            Ok(Some(rendered)) => rendered,
            Ok(None) => return count_n("dropped", todo.len()),
            Err(e) => {
                tracing::debug!(error = %e, "background render failed");
                return count_n("dropped", todo.len());
            }
        };
        for ((_, key), result) in todo.into_iter().zip(rendered) {
            match result {
                Ok(r) if !r.bytes.is_empty() => {
                    let variant = Variant::new(r.bytes, r.format, SystemTime::now(), Tier::Miss);
                    let variant = Arc::new(variant.with_revision(job.revision));
                    self.memory.insert(key.clone(), variant.clone()).await;
                    if let Some(remote) = &self.remote {
                        remote.enqueue(key, variant);
                    }
                    count("rendered");
                }
                _ => count("dropped"),
            }
        }
    }
}
