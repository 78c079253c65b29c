//! Step 4 of the request flow, before the body: what a GET or HEAD of an image gets when it carries
//! validators or a `Range` (RFC 9110 §13 and §14): 304, 206 with one part, 416, or the whole 200.
//!
//! The validators (`If-None-Match`, `If-Modified-Since`, `If-Range`) are read with the `headers`
//! crate's typed headers. `Range` is parsed here: the crate's `satisfiable_ranges` drops a suffix
//! longer than the body (RFC 9110 §14.1.3 says it means the whole body) and does not check that a
//! range starts inside it, both of which decide 206 against 416.

use std::time::SystemTime;

use headers::{ETag, HeaderMapExt, IfModifiedSince, IfNoneMatch, IfRange, LastModified};
use http::HeaderMap;

/// The answer to one GET or HEAD of a variant of `len` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// 304: the client's copy is current.
    NotModified,
    /// 200 with the whole body (no `Range`, one that is ignored, or several ranges).
    Whole,
    /// 206 with bytes `first..=last`.
    Part {
        /// The first byte sent.
        first: u64,
        /// The last byte sent (inclusive, as `Content-Range` writes it).
        last: u64,
    },
    /// 416: the range starts at or past the end of the body.
    Unsatisfiable,
}

/// Decides what a request with `headers` gets for a variant with this `etag` (quoted, as sent),
/// `last_modified` and `len`.
///
/// 1. `If-None-Match` decides when present (weak comparison, `*` matches); otherwise
///    `If-Modified-Since` at or after `last_modified` (whole seconds, as `Last-Modified` is sent)
///    means not modified.
/// 2. A `Range` is only looked at when `If-Range` is absent or names the current representation
///    (its ETag, or a date not older than `last_modified`); a stale `If-Range` gets the whole body.
/// 3. One byte range inside the body is a part; one that starts past its end is unsatisfiable;
///    several ranges, other units or a malformed value get the whole body (allowed by RFC 9110:
///    a server may ignore `Range`).
pub fn decide(headers: &HeaderMap, etag: &str, last_modified: SystemTime, len: u64) -> Answer {
    let tag = || etag.parse::<ETag>().ok();
    if let Some(inm) = headers.typed_get::<IfNoneMatch>() {
        if tag().is_some_and(|t| !inm.precondition_passes(&t)) {
            return Answer::NotModified;
        }
    } else if let Some(ims) = headers.typed_get::<IfModifiedSince>() {
        if !ims.is_modified(last_modified) {
            return Answer::NotModified;
        }
    }
    let Some(range) = headers.get(http::header::RANGE) else {
        return Answer::Whole;
    };
    if headers.contains_key(http::header::IF_RANGE) {
        let current = headers.typed_get::<IfRange>().is_some_and(|if_range| {
            !if_range.is_modified(tag().as_ref(), Some(&LastModified::from(last_modified)))
        });
        if !current {
            return Answer::Whole;
        }
    }
    match range.to_str().ok().map(|r| byte_range(r, len)) {
        Some(Some(Range::Part(first, last))) => Answer::Part { first, last },
        Some(Some(Range::Unsatisfiable)) => Answer::Unsatisfiable,
        _ => Answer::Whole,
    }
}

/// One byte range, resolved against the body's length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Range {
    Part(u64, u64),
    Unsatisfiable,
}

/// `bytes=first-[last]` or `bytes=-suffix` against a body of `len` bytes; `None` for anything to
/// ignore (another unit, several ranges, bad syntax, `last` before `first`).
fn byte_range(value: &str, len: u64) -> Option<Range> {
    let (unit, spec) = value.trim().split_once('=')?;
    if !unit.trim().eq_ignore_ascii_case("bytes") || spec.contains(',') {
        return None;
    }
    let (first, last) = spec.trim().split_once('-')?;
    let number = |s: &str| -> Option<u64> {
        let s = s.trim();
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        // Digits only: too long for a u64 is still a valid (huge) position.
        Some(s.parse().unwrap_or(u64::MAX))
    };
    if first.trim().is_empty() {
        // A suffix: the last `n` bytes, the whole body when it is shorter.
        let n = number(last)?;
        if n == 0 || len == 0 {
            return Some(Range::Unsatisfiable);
        }
        return Some(Range::Part(len.saturating_sub(n), len - 1));
    }
    let first = number(first)?;
    let last = if last.trim().is_empty() {
        None
    } else {
        Some(number(last)?)
    };
    if last.is_some_and(|l| l < first) {
        return None;
    }
    if first >= len {
        return Some(Range::Unsatisfiable);
    }
    Some(Range::Part(first, last.map_or(len - 1, |l| l.min(len - 1))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::{self, HeaderName};
    use proptest::prelude::*;
    use std::time::Duration;

    const TAG: &str = "\"abc\"";

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn date(secs: u64) -> String {
        httpdate::fmt_http_date(at(secs))
    }

    fn h(pairs: &[(HeaderName, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(k.clone(), v.parse().expect("header value"));
        }
        m
    }

    fn answer(pairs: &[(HeaderName, &str)]) -> Answer {
        decide(&h(pairs), TAG, at(1_700_000_000), 100)
    }

    #[test]
    fn validators() {
        use Answer::*;
        assert_eq!(answer(&[]), Whole);
        assert_eq!(answer(&[(header::IF_NONE_MATCH, TAG)]), NotModified);
        assert_eq!(answer(&[(header::IF_NONE_MATCH, "W/\"abc\"")]), NotModified);
        assert_eq!(
            answer(&[(header::IF_NONE_MATCH, "\"x\", \"abc\"")]),
            NotModified
        );
        assert_eq!(answer(&[(header::IF_NONE_MATCH, "*")]), NotModified);
        assert_eq!(answer(&[(header::IF_NONE_MATCH, "\"abd\"")]), Whole);
        let same = date(1_700_000_000);
        let later = date(1_800_000_000);
        let earlier = date(1_600_000_000);
        assert_eq!(answer(&[(header::IF_MODIFIED_SINCE, &same)]), NotModified);
        assert_eq!(answer(&[(header::IF_MODIFIED_SINCE, &later)]), NotModified);
        assert_eq!(answer(&[(header::IF_MODIFIED_SINCE, &earlier)]), Whole);
        assert_eq!(answer(&[(header::IF_MODIFIED_SINCE, "garbage")]), Whole);
        // If-None-Match decides when both are sent.
        assert_eq!(
            answer(&[
                (header::IF_NONE_MATCH, "\"other\""),
                (header::IF_MODIFIED_SINCE, &later)
            ]),
            Whole
        );
    }

    #[test]
    fn ranges() {
        use Answer::*;
        let part = |first, last| Part { first, last };
        let r = |v: &str| answer(&[(header::RANGE, v)]);
        assert_eq!(r("bytes=0-9"), part(0, 9));
        assert_eq!(r("bytes=90-"), part(90, 99));
        assert_eq!(r("bytes=90-500"), part(90, 99));
        assert_eq!(r("bytes=-10"), part(90, 99));
        assert_eq!(
            r("bytes=-500"),
            part(0, 99),
            "a long suffix is the whole body"
        );
        assert_eq!(r("bytes=99-99"), part(99, 99));
        assert_eq!(r("bytes=100-"), Unsatisfiable);
        assert_eq!(r("bytes=100-200"), Unsatisfiable);
        assert_eq!(r("bytes=-0"), Unsatisfiable);
        assert_eq!(r("bytes=99999999999999999999999-"), Unsatisfiable);
        // Ignored: several ranges, another unit, bad syntax, last before first.
        for ignored in [
            "bytes=0-1,5-6",
            "items=0-9",
            "bytes=a-b",
            "bytes=5-1",
            "bytes=",
            "bytes=-",
            "0-9",
            "bytes=+1-2",
        ] {
            assert_eq!(r(ignored), Whole, "{ignored}");
        }
    }

    #[test]
    fn if_range() {
        use Answer::*;
        let with =
            |if_range: &str| answer(&[(header::RANGE, "bytes=0-9"), (header::IF_RANGE, if_range)]);
        assert_eq!(with(TAG), Part { first: 0, last: 9 });
        assert_eq!(with("\"stale\""), Whole);
        // A weak tag never matches for If-Range (strong comparison).
        assert_eq!(with("W/\"abc\""), Whole);
        assert_eq!(with(&date(1_700_000_000)), Part { first: 0, last: 9 });
        assert_eq!(with(&date(1_600_000_000)), Whole);
        assert_eq!(with("garbage"), Whole);
        // Validators come first: a matching If-None-Match is a 304 whatever the range.
        assert_eq!(
            answer(&[(header::RANGE, "bytes=0-9"), (header::IF_NONE_MATCH, TAG)]),
            NotModified
        );
    }

    proptest! {
        /// Whatever the header, a part lies inside the body and a body always has an answer.
        #[test]
        fn parts_stay_inside_the_body(value in "[ -~]{0,40}", len in 0u64..1000) {
            let headers = h(&[(header::RANGE, value.as_str())]);
            match decide(&headers, TAG, at(0), len) {
                Answer::Part { first, last } => prop_assert!(first <= last && last < len),
                Answer::NotModified => prop_assert!(false, "no validator was sent"),
                Answer::Whole | Answer::Unsatisfiable => {}
            }
        }
    }
}
