//! Who may upload or delete: checked from the request line and headers alone, before a byte of the
//! body is read.
//!
//! - `Authorization: Bearer {upload_token}`, compared in constant time; or
//! - a signed URL, `?expires={unix seconds}&s={signature}`, for a browser uploading straight to the
//!   server with a URL its application made:
//!
//! ```text
//! s = base64url_no_pad( HMAC-SHA256( upload_signing_key, METHOD + "\n" + PATH + "\n" + EXPIRES ) )
//! ```
//!
//! `METHOD` is `PUT`, `POST` or `DELETE`; `PATH` the request path as sent (`/product/image/1`);
//! `EXPIRES` the `expires` parameter exactly as sent. A URL whose time has passed, or that reaches
//! further ahead than [`MAX_SIGNED_LIFETIME`], is refused. Other parameters are not signed, so a
//! signed URL may not carry `source=`: fetching from another server takes the token.
//!
//! No credentials: 401 with `WWW-Authenticate: Bearer`. Wrong ones: 403.

use std::time::{Duration, SystemTime};

use http::header::{HeaderMap, AUTHORIZATION};
use http::Method;
use subtle::ConstantTimeEq;

use super::UploadError;
use crate::config::Uploads;
use crate::request::query_values;
use crate::signature::{encode, mac_of, matches};

/// The longest a signed upload URL may stay valid: long enough for a page left open, short enough
/// that a leaked URL does not work for ever.
pub const MAX_SIGNED_LIFETIME: Duration = Duration::from_secs(7 * 86_400);

/// How a request was authorised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Credential {
    /// The bearer token: everything, `source=` included.
    Token,
    /// A signed URL: this method on this path until it expires, with the body as the original.
    Signed,
}

/// The `s` parameter of a signed upload URL: what an application computes to let a browser upload
/// (`{path}?expires={expires}&s={sign(…)}`).
pub fn sign(key: &str, method: &Method, path: &str, expires: u64) -> String {
    encode(mac_of(key, &[method.as_str(), path, &expires.to_string()]))
}

/// Checks the credentials of an upload or delete of `path`.
pub fn authorize(
    cfg: &Uploads,
    method: &Method,
    path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    now: SystemTime,
) -> Result<Credential, UploadError> {
    if let Some(value) = headers.get(AUTHORIZATION) {
        let given = value
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .ok_or(UploadError::Forbidden)?;
        let token = cfg.upload_token.as_ref().ok_or(UploadError::Forbidden)?;
        if bool::from(given.as_bytes().ct_eq(token.expose().as_bytes())) {
            return Ok(Credential::Token);
        }
        return Err(UploadError::Forbidden);
    }
    let signatures = query_values(query, "s");
    if signatures.is_empty() {
        return Err(UploadError::Unauthorized);
    }
    let key = cfg
        .upload_signing_key
        .as_ref()
        .ok_or(UploadError::Forbidden)?;
    let (expires, [given]) = (query_values(query, "expires"), signatures.as_slice()) else {
        return Err(UploadError::Forbidden);
    };
    let [expires] = expires.as_slice() else {
        return Err(UploadError::Forbidden);
    };
    let at: u64 = expires.parse().map_err(|_| UploadError::Forbidden)?;
    let now_secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if at < now_secs || at - now_secs > MAX_SIGNED_LIFETIME.as_secs() {
        return Err(UploadError::Forbidden);
    }
    if !query_values(query, "source").is_empty() {
        return Err(UploadError::Forbidden);
    }
    if !matches(
        mac_of(key.expose(), &[method.as_str(), path, expires]),
        given,
    ) {
        return Err(UploadError::Forbidden);
    }
    Ok(Credential::Signed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    const TOKEN: &str = "an-upload-token-long-enough";
    const KEY: &str = "an-upload-signing-key-long-enough";

    fn cfg() -> Uploads {
        Uploads {
            upload_token: Some(Secret::from(TOKEN.to_owned())),
            upload_signing_key: Some(Secret::from(KEY.to_owned())),
            upload_cors_origins: Vec::new(),
            max_upload_bytes: crate::config::Size::from_bytes(1 << 20),
            upload_formats: vec![crate::request::Format::Jpeg],
            upload_outputs: Vec::new(),
            max_concurrent_uploads: 2,
            upload_timeout: Duration::from_secs(60),
        }
    }

    fn bearer(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, value.parse().expect("header"));
        h
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn bearer_tokens() {
        let put = Method::PUT;
        let none = HeaderMap::new();
        let now = at(1_000);
        let check = |h: &HeaderMap| authorize(&cfg(), &put, "/p/i/1", None, h, now);
        assert_eq!(
            check(&bearer(&format!("Bearer {TOKEN}"))),
            Ok(Credential::Token)
        );
        assert_eq!(
            check(&bearer(&format!("bearer  {TOKEN} "))),
            Ok(Credential::Token)
        );
        assert_eq!(check(&none), Err(UploadError::Unauthorized));
        assert_eq!(check(&bearer("Bearer wrong")), Err(UploadError::Forbidden));
        assert_eq!(
            check(&bearer(TOKEN)),
            Err(UploadError::Forbidden),
            "no scheme"
        );
        assert_eq!(
            check(&bearer(&format!("Basic {TOKEN}"))),
            Err(UploadError::Forbidden)
        );
        let mut no_token = cfg();
        no_token.upload_token = None;
        assert_eq!(
            authorize(
                &no_token,
                &put,
                "/p/i/1",
                None,
                &bearer(&format!("Bearer {TOKEN}")),
                now
            ),
            Err(UploadError::Forbidden)
        );
    }

    #[test]
    fn the_signature_is_the_one_the_docs_shell_recipe_makes() {
        // printf 'PUT\n/avatar/image/5\n%s' 1700000000 | openssl dgst -sha256 -hmac "$KEY" -binary \
        //   | basenc --base64url | tr -d '='
        assert_eq!(
            sign(KEY, &Method::PUT, "/avatar/image/5", 1_700_000_000),
            "BEi1Cgya-EeEnpAw_gVrtPBx2GTQ9Ogr_Jwv5VBllyc"
        );
    }

    #[test]
    fn signed_urls() {
        let none = HeaderMap::new();
        let now = at(1_000_000);
        let s = sign(KEY, &Method::PUT, "/p/i/1", 1_000_600);
        let q = format!("expires=1000600&s={s}");
        let check =
            |m: &Method, path: &str, q: &str, now| authorize(&cfg(), m, path, Some(q), &none, now);
        assert_eq!(
            check(&Method::PUT, "/p/i/1", &q, now),
            Ok(Credential::Signed)
        );
        // Another method, another path, another time, a passed time: all refused.
        assert_eq!(
            check(&Method::DELETE, "/p/i/1", &q, now),
            Err(UploadError::Forbidden)
        );
        assert_eq!(
            check(&Method::PUT, "/p/i/2", &q, now),
            Err(UploadError::Forbidden)
        );
        let other = format!("expires=1000601&s={s}");
        assert_eq!(
            check(&Method::PUT, "/p/i/1", &other, now),
            Err(UploadError::Forbidden)
        );
        assert_eq!(
            check(&Method::PUT, "/p/i/1", &q, at(1_000_601)),
            Err(UploadError::Forbidden),
            "expired"
        );
        // Too far ahead, a repeated s, a source= the signature does not cover.
        let far = 1_000_000 + MAX_SIGNED_LIFETIME.as_secs() + 1;
        let far_q = format!("expires={far}&s={}", sign(KEY, &Method::PUT, "/p/i/1", far));
        assert_eq!(
            check(&Method::PUT, "/p/i/1", &far_q, now),
            Err(UploadError::Forbidden)
        );
        let twice = format!("{q}&s={s}");
        assert_eq!(
            check(&Method::PUT, "/p/i/1", &twice, now),
            Err(UploadError::Forbidden)
        );
        let source = format!("{q}&source=http%3A%2F%2Fexample.com%2Fa.jpg");
        assert_eq!(
            check(&Method::PUT, "/p/i/1", &source, now),
            Err(UploadError::Forbidden)
        );
        let mut no_key = cfg();
        no_key.upload_signing_key = None;
        assert_eq!(
            authorize(&no_key, &Method::PUT, "/p/i/1", Some(&q), &none, now),
            Err(UploadError::Forbidden)
        );
    }
}
