//! Step 2 of the request flow, when `url_signing_key` is set: every image URL must carry a signature
//! made with the key, so only whoever holds it (the application writing the `<img>` tags) can mint
//! URLs, and nobody else can make the server render arbitrary sizes or fetch arbitrary sources
//! (docs/urls.md). Checked after the path parsed and before any cache or I/O; failure is
//! [`Error::BadSignature`] → 403 (`rejected.signature`).
//!
//! What is signed, exactly:
//!
//! ```text
//! s = base64url_no_pad( HMAC-SHA256( key, message ) )
//! message = PATH                      without ?source=
//!         = PATH + "\n" + SOURCE      with ?source=
//! ```
//!
//! - `key`: the bytes of `url_signing_key` as written in the configuration (UTF-8).
//! - `PATH`: the request path exactly as sent, still percent-encoded, without the query:
//!   `/product/image/10855050/w500.jpg`.
//! - `SOURCE`: the *decoded* value of the `source` query parameter (what the server will fetch),
//!   e.g. `https://img.example.com/a.jpg`. A newline cannot occur in a valid path, so the two parts
//!   cannot be confused.
//! - `s`: the `s` query parameter, base64url (RFC 4648 §5) without `=` padding, 43 characters.
//!
//! Other query parameters are neither signed nor used. Exactly one `s` (and at most one `source`) is
//! accepted. The MAC is compared in constant time ([`hmac::Mac::verify_slice`]).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::Error;
use crate::request::query_values;

type HmacSha256 = Hmac<Sha256>;

/// HMAC-SHA256 under `key` of `parts` joined by newlines: the MAC of signed URLs here and of signed
/// uploads (`crate::upload::auth`).
pub(crate) fn mac_of(key: &str, parts: &[&str]) -> HmacSha256 {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            mac.update(b"\n");
        }
        mac.update(part.as_bytes());
    }
    mac
}

/// A MAC as a signature parameter: base64url without padding.
pub(crate) fn encode(mac: HmacSha256) -> String {
    URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
}

/// Whether `given` is `mac` in the form [`encode`] writes, compared in constant time. The strict
/// engine refuses padding and non-canonical trailing bits, so one MAC has one spelling.
pub(crate) fn matches(mac: HmacSha256, given: &str) -> bool {
    URL_SAFE_NO_PAD
        .decode(given)
        .is_ok_and(|tag| mac.verify_slice(&tag).is_ok())
}

/// The MAC over a path and an optional source, as defined in the module documentation.
fn mac(key: &str, path: &str, source: Option<&str>) -> HmacSha256 {
    match source {
        Some(source) => mac_of(key, &[path, source]),
        None => mac_of(key, &[path]),
    }
}

/// The `s` value for a path (and `?source=` value, decoded). What an application computes to build a
/// URL: `{path}?s={sign(key, path, None)}`.
pub fn sign(key: &str, path: &str, source: Option<&str>) -> String {
    encode(mac(key, path, source))
}

/// Checks the signature of a request: `path` as sent (without the query) and its raw query string.
pub fn verify(key: &str, path: &str, query: Option<&str>) -> Result<(), Error> {
    let given = query_values(query, "s");
    let [given] = given.as_slice() else {
        return Err(Error::BadSignature);
    };
    let sources = query_values(query, "source");
    let source = match sources.as_slice() {
        [] => None,
        [one] => Some(one.as_str()),
        // Which one was signed? Refuse rather than guess.
        _ => return Err(Error::BadSignature),
    };
    if matches(mac(key, path, source), given) {
        Ok(())
    } else {
        Err(Error::BadSignature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "0123456789abcdef0123456789abcdef";
    const PATH: &str = "/product/image/1/w300.jpg";

    #[test]
    fn known_answer() {
        // HMAC-SHA256(KEY, PATH), computed independently (then the `=` padding dropped):
        // printf %s /product/image/1/w300.jpg |
        //   openssl dgst -sha256 -hmac KEY -binary | basenc --base64url
        let s = sign(KEY, PATH, None);
        assert_eq!(s.len(), 43);
        assert!(!s.contains('='));
        assert_eq!(s, "s-9KWQ11VXbVuLl4KfMpSba5sZO7DJv_p43iUHqduAY");
    }

    #[test]
    fn accepts_only_the_right_signature() {
        let s = sign(KEY, PATH, None);
        let q = format!("s={s}");
        assert_eq!(verify(KEY, PATH, Some(&q)), Ok(()));
        // Unrelated parameters are ignored.
        assert_eq!(verify(KEY, PATH, Some(&format!("a=1&{q}&b"))), Ok(()));
        let bad = |query: Option<&str>, path: &str, key: &str| {
            assert_eq!(
                verify(key, path, query),
                Err(Error::BadSignature),
                "{query:?}"
            )
        };
        bad(None, PATH, KEY);
        bad(Some(""), PATH, KEY);
        bad(Some("s="), PATH, KEY);
        bad(Some(&q), "/product/image/1/w301.jpg", KEY);
        bad(Some(&q), PATH, "another key, also long enough!!");
        bad(Some(&format!("{q}&{q}")), PATH, KEY);
        bad(Some(&format!("s={s}=")), PATH, KEY);
        bad(Some(&format!("s={}", &s[..42])), PATH, KEY);
        // Standard base64 alphabet is not base64url.
        let std = s.replace('-', "+").replace('_', "/");
        if std != s {
            bad(Some(&format!("s={}", std.replace('+', "%2B"))), PATH, KEY);
        }
        // The same signature does not cover an added ?source=.
        bad(
            Some(&format!("{q}&source=http://a.example/x.jpg")),
            PATH,
            KEY,
        );
    }

    #[test]
    fn source_is_signed_decoded() {
        let src = "https://img.example.com/a b.jpg?x=1";
        let s = sign(KEY, PATH, Some(src));
        let encoded = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("source", src)
            .append_pair("s", &s)
            .finish();
        assert_eq!(verify(KEY, PATH, Some(&encoded)), Ok(()));
        // Two sources: ambiguous.
        let two = format!("{encoded}&source=https://other.example.com/");
        assert_eq!(verify(KEY, PATH, Some(&two)), Err(Error::BadSignature));
        // The source is bound: another one with the same s fails.
        let other = format!("source=https%3A%2F%2Fimg.example.com%2Fb.jpg&s={s}");
        assert_eq!(verify(KEY, PATH, Some(&other)), Err(Error::BadSignature));
    }
}
