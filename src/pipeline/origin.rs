//! Where a request's original comes from: the configured source, or a `?source=` URL that passed
//! the guard. The three cache keys a request touches all follow from that one choice, here, so an
//! override can never answer for, nor be answered by, the id's own original.

use crate::request::{CacheKey, Format, ImageRequest};
use crate::source::guard::SourceUrl;

/// The original a request is rendered from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The configured `source_domain` or `source_store`, at `source_path`.
    Configured,
    /// A checked `?source=` URL (docs/urls.md).
    Override(SourceUrl),
}

impl Origin {
    /// The result-cache key (memory and the result store): the id's own, or one carrying the
    /// override URL's digest, `{model}/{type}/{id}/source-{digest}/{canonical}`, which purging the
    /// id still drops.
    pub fn result_key(&self, req: &ImageRequest, format: Format) -> CacheKey {
        match self {
            Origin::Configured => req.cache_key(format),
            Origin::Override(s) => req.source_cache_key(format, s.digest()),
        }
    }

    /// The originals-cache key: the id, or the override URL itself (every id naming the same URL
    /// shares one download).
    pub fn originals_key(&self, req: &ImageRequest) -> String {
        match self {
            Origin::Configured => req.original_id(),
            Origin::Override(s) => s.originals_key(),
        }
    }

    /// The negative-cache key (an original found missing): the id, or the id with the override's
    /// digest, so a missing override URL never hides the id's own original and purging the id
    /// clears both.
    pub fn negative_key(&self, req: &ImageRequest) -> String {
        match self {
            Origin::Configured => req.original_id(),
            Origin::Override(s) => format!("{}/source-{}", req.original_id(), s.digest()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::Rules;
    use crate::source::guard::{check, AddressPolicy, AllowedHosts};

    #[test]
    fn an_override_never_shares_a_key_with_the_id_but_stays_under_it() {
        let req = ImageRequest::parse("/product/image/123/w200.jpg", &Rules::default())
            .expect("valid URL");
        let hosts = AllowedHosts::new(&["127.0.0.1".to_owned()]);
        let policy = AddressPolicy::for_tests(vec!["127.0.0.1".parse().expect("IP")]);
        let url = check("http://127.0.0.1/a.jpg", &hosts, &policy).expect("allowed");
        let own = Origin::Configured;
        let other = Origin::Override(url);
        assert_eq!(
            own.result_key(&req, Format::Jpeg).as_str(),
            "product/image/123/w200.jpg"
        );
        assert_eq!(own.originals_key(&req), "product/image/123");
        assert_eq!(own.negative_key(&req), "product/image/123");
        for (a, b) in [
            (
                own.result_key(&req, Format::Jpeg).as_str().to_owned(),
                other.result_key(&req, Format::Jpeg).as_str().to_owned(),
            ),
            (own.originals_key(&req), other.originals_key(&req)),
            (own.negative_key(&req), other.negative_key(&req)),
        ] {
            assert_ne!(a, b);
        }
        // Purging the id (a prefix match on `{model}/{type}/{id}/`) reaches the override's entries.
        assert!(other
            .result_key(&req, Format::Jpeg)
            .as_str()
            .starts_with("product/image/123/source-"));
        assert!(other
            .negative_key(&req)
            .starts_with("product/image/123/source-"));
        assert_eq!(other.originals_key(&req), "source:http://127.0.0.1/a.jpg");
    }
}
