//! Originals taken in by the upload endpoints ([`crate::upload`]), as the pipeline sees them: the
//! check that an uploaded original renders ([`Pipeline::check_original`]), its outputs rendered in
//! the background ([`Pipeline::render_outputs`]), and forgetting everything made from an original
//! that was replaced or deleted ([`Pipeline::forget_original`]).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::{Origin, Pipeline};
use crate::cache::Variant;
use crate::error::Error;
use crate::image::ImageError;
use crate::metrics as m;
use crate::request::{Format, ImageRequest};

/// The width of the render that checks an uploaded original decodes whole: small, so the check
/// costs the decode and little else.
const CHECK_WIDTH: u32 = 32;

/// How long an upload's outputs wait, each time, for room in a full render queue before trying
/// again (then they are counted as failed).
const OUTPUT_RETRIES: [Duration; 4] = [
    Duration::from_millis(100),
    Duration::from_millis(300),
    Duration::from_secs(1),
    Duration::from_secs(3),
];

impl Pipeline {
    /// Checks an original taken in by an upload the way a render would see it: the format and the
    /// header limits ([`crate::image::Processor::inspect_upright`]), then a full decode, as a small render
    /// through the pool under every render limit (memory, slot, `render_timeout`). Returns the
    /// format and the upright size.
    pub async fn check_original(
        &self,
        original: Bytes,
    ) -> Result<(Format, crate::image::geometry::Size), ImageError> {
        let inner = &self.inner;
        let (format, size) = inner.processor.inspect_upright(original.clone()).await?;
        let check = ImageRequest {
            version: crate::request::Version::Width(CHECK_WIDTH),
            ..crate::source::probe_request()
        };
        let spec = inner.spec(&check, Format::Jpeg);
        inner.processor.render(original, spec).await?;
        Ok((format, size))
    }

    /// Renders `reqs`, versions of the original just stored as `original`, in the background into
    /// memory and the result store (an upload's outputs). The upload's bytes go into the originals
    /// cache, so nothing is downloaded. Counted as `upload.output.{rendered,failed}`.
    pub fn render_outputs(&self, reqs: Vec<ImageRequest>, original: Bytes) {
        let Some(first) = reqs.first() else { return };
        let inner = self.inner.clone();
        let revision = inner.revisions.of(&first.model, &first.kind, &first.id);
        let id = first.original_id();
        tokio::spawn(async move {
            let Ok(_lane) = inner.outputs_lane.acquire().await else {
                return;
            };
            inner.originals.insert(id, (revision, original)).await;
            let (avif, batch): (Vec<_>, Vec<_>) =
                reqs.into_iter().partition(|r| r.format == Format::Avif);
            let mut done = Vec::new();
            let mut rendered = inner.render_many(&batch).await;
            for wait in OUTPUT_RETRIES {
                // A full queue is the clients' moment: wait for room rather than compete.
                let full = |r: &Result<Variant, Error>| {
                    matches!(r, Err(Error::Image(ImageError::Overloaded)))
                };
                if !rendered.iter().any(full) {
                    break;
                }
                tokio::time::sleep(wait).await;
                rendered = inner.render_many(&batch).await;
            }
            for (req, result) in batch.iter().zip(rendered) {
                done.push((req.clone(), result));
            }
            for req in avif {
                let result = inner
                    .render(&req, req.format, &Origin::Configured, None)
                    .await;
                done.push((req, result));
            }
            for (req, result) in done {
                match result {
                    Ok(variant) => {
                        let key = req.cache_key(req.format);
                        let variant = Arc::new(variant.with_revision(revision));
                        inner.memory.insert(key.clone(), variant.clone()).await;
                        if let Some(remote) = &inner.remote {
                            remote.enqueue(key, variant);
                        }
                        m::incr_with(m::UPLOAD, "output.rendered");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, version = %req.canonical_name(req.format), "upload output not rendered");
                        m::incr_with(m::UPLOAD, "output.failed");
                    }
                }
            }
        });
    }

    /// After the original of `original` (`model/type/id`) was replaced or deleted in the source:
    /// nothing made from the old one is served again. Its revision goes up first (so renders still
    /// running cannot bring old variants back: see [`crate::cache::revision`]), then its memory
    /// entries and stored variants are dropped. Returns how many stored variants were deleted.
    pub async fn forget_original(&self, original: &str) -> Result<usize, Error> {
        self.inner.revisions.bump(original);
        self.purge_memory(original)?;
        match &self.inner.remote {
            Some(remote) => remote
                .delete_original(original)
                .await
                .map(|deleted| deleted.len())
                .map_err(|e| Error::Internal(format!("result store: {e}"))),
            None => Ok(0),
        }
    }
}
