//! Step 3a of the request flow: the result caches, in the order they are asked.
//!
//! [`memory`] holds encoded variants in process (moka, weighed by bytes, single-flight per key) and
//! the negative 404 entries; [`remote`] is the result store shared by every instance (object_store),
//! read before rendering and written in the background after answering. [`Variant`] is what both
//! tiers hold: the encoded bytes with the validators every response needs. [`revision`] keeps both
//! tiers from serving what was made from an original that has since been replaced or deleted.

pub mod memory;
pub mod remote;
pub mod revision;

use std::time::SystemTime;

use bytes::Bytes;
use http::HeaderValue;
use sha2::{Digest, Sha256};

use crate::request::Format;

/// Which tier answered a request (`X-Cache`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    /// The in-process memory cache.
    Memory,
    /// The shared remote result store.
    Remote,
    /// Nobody had it: rendered for this request.
    Miss,
}

impl Tier {
    /// The `X-Cache` header value.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Memory => "memory",
            Tier::Remote => "remote",
            Tier::Miss => "miss",
        }
    }
}

/// One encoded variant with its validators.
#[derive(Clone, Debug)]
pub struct Variant {
    /// The encoded image.
    pub bytes: Bytes,
    /// Its format (decides `Content-Type`).
    pub format: Format,
    /// Strong ETag derived from the bytes, quoted: identical on every instance for the same output.
    pub etag: String,
    /// When this variant was first generated (kept in the result store as the object's time).
    pub last_modified: SystemTime,
    /// `etag` as a header value, made once: a memory hit copies a reference, not the text.
    pub etag_header: HeaderValue,
    /// `Last-Modified`: `last_modified` (never later than when this value was made), formatted once.
    pub last_modified_header: HeaderValue,
    /// The tier it came from when it was loaded (a later memory hit reports `Memory`).
    pub loaded_from: Tier,
    /// The revision of its original it was made from ([`revision::Revisions`]); a memory hit with an
    /// older one is stale.
    pub revision: u64,
}

impl Variant {
    /// Wraps freshly encoded or stored bytes, computing the ETag.
    pub fn new(
        bytes: Bytes,
        format: Format,
        last_modified: SystemTime,
        loaded_from: Tier,
    ) -> Variant {
        let etag = etag_for(&bytes);
        // Hex digits and quotes, and an HTTP date: always valid header values.
        let etag_header = HeaderValue::from_str(&etag).unwrap_or(HeaderValue::from_static("\"\""));
        let date = httpdate::fmt_http_date(last_modified.min(SystemTime::now()));
        let last_modified_header = HeaderValue::from_str(&date)
            .unwrap_or(HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 GMT"));
        Variant {
            bytes,
            format,
            etag,
            last_modified,
            etag_header,
            last_modified_header,
            loaded_from,
            revision: 0,
        }
    }

    /// The same variant, marked as made from `revision` of its original.
    pub fn with_revision(mut self, revision: u64) -> Variant {
        self.revision = revision;
        self
    }
}

/// A strong ETag: the first 128 bits of SHA-256 of the output, hex, quoted. Content-derived, so every
/// instance that renders (or reads) the same bytes sends the same validator.
pub fn etag_for(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    format!("\"{}\"", hex::encode(&digest[..16]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etag_is_strong_stable_and_content_derived() {
        let a = etag_for(b"abc");
        assert_eq!(a, etag_for(b"abc"));
        assert_ne!(a, etag_for(b"abd"));
        assert!(a.starts_with('"') && a.ends_with('"') && !a.starts_with("W/"));
        assert_eq!(a.len(), 34);
    }
}
