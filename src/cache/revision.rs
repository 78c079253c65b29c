//! Revisions of originals: what keeps an upload, a replacement or a delete from being undone by
//! work that started before it.
//!
//! Each original (`{model}/{type}/{id}`) has a revision number that goes up when its original is
//! replaced or deleted ([`Revisions::bump`]). Everything cached from an original carries the
//! revision it was made from: the variants in memory ([`crate::cache::Variant::revision`]), the
//! original's bytes, the negative entry. A reader compares it with the current revision and treats
//! an older one as absent, so a render that started before a replacement and finished after it can
//! still answer the request that asked for it, but is never served again. The result store's
//! writer checks the revision before and after each write and deletes what it wrote when the
//! original changed meanwhile (see `cache::remote`).
//!
//! The numbers live in a fixed array of stripes indexed by a hash of the id, so memory stays
//! constant however many ids are replaced; two ids that share a stripe only cost each other a
//! cache miss after a replacement.

use std::sync::atomic::{AtomicU64, Ordering};

/// Stripes: 32 KiB of counters; a replacement costs another id a miss with probability 1/4096.
const STRIPES: usize = 4096;

/// The current revision of every original (striped).
pub struct Revisions {
    stripes: Box<[AtomicU64]>,
}

impl Default for Revisions {
    fn default() -> Revisions {
        Revisions {
            stripes: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl Revisions {
    /// The current revision of `model/type/id`, given in parts (the hit path has them apart).
    pub fn of(&self, model: &str, kind: &str, id: &str) -> u64 {
        self.stripes[stripe(&[model, "/", kind, "/", id])].load(Ordering::Acquire)
    }

    /// The current revision of an original named `model/type/id`.
    pub fn of_id(&self, original: &str) -> u64 {
        self.stripes[stripe(&[original])].load(Ordering::Acquire)
    }

    /// The original changed (replaced or deleted): everything made from it before is stale.
    pub fn bump(&self, original: &str) {
        self.stripes[stripe(&[original])].fetch_add(1, Ordering::AcqRel);
    }
}

/// FNV-1a over the concatenated parts (so `of` and `of_id` agree), reduced to a stripe.
fn stripe(parts: &[&str]) -> usize {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in part.as_bytes() {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    (hash % STRIPES as u64) as usize
}

/// The original id (`model/type/id`) a result key belongs to: its first three segments.
pub fn original_of(key: &str) -> &str {
    let mut slashes = key.match_indices('/').map(|(i, _)| i);
    match (slashes.next(), slashes.next(), slashes.next()) {
        (Some(_), Some(_), Some(third)) => &key[..third],
        _ => key,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_and_whole_ids_agree_and_a_bump_changes_only_that_stripe() {
        let r = Revisions::default();
        assert_eq!(r.of("product", "image", "1"), r.of_id("product/image/1"));
        let before = r.of_id("product/image/1");
        let other = r.of_id("product/image/2");
        r.bump("product/image/1");
        assert_eq!(r.of("product", "image", "1"), before + 1);
        if stripe(&["product/image/2"]) != stripe(&["product/image/1"]) {
            assert_eq!(r.of_id("product/image/2"), other);
        }
    }

    #[test]
    fn result_keys_name_their_original() {
        assert_eq!(original_of("product/image/1/w300.jpg"), "product/image/1");
        assert_eq!(original_of("product/image/1/w300.jpg/x"), "product/image/1");
        assert_eq!(original_of("short/key"), "short/key");
    }
}
