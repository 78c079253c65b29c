//! Step 3b of the request flow (url → cache → **source** → image → store → response), HTTP backend:
//! fetch an original from `source_domain` (the seed's only source).
//!
//! One shared `reqwest` client (connection reuse across requests) with a connect timeout and no proxy
//! taken from the environment. Redirects are followed up to [`MAX_ORIGIN_REDIRECTS`] hops, only to
//! `source_domain`'s own host or a host listed in `source_redirect_hosts` (CDNs in front of a bucket
//! redirect to a canonical path or a signed URL); any other target, or a fourth hop, is a 502
//! without connecting to it. Which statuses mean "the original is missing" (404, negatively cached)
//! is `source_not_found_statuses`: an S3-backed origin answers 403 for a missing key when the reader
//! may not list the bucket. `?source=` overrides with their own checked redirects are a separate
//! concern ([`super::guard`]), sharing the fetch loop.
//!
//! The limits are enforced here, not trusted to the origin: the whole exchange (headers and body)
//! runs under one `fetch_timeout` deadline, and the body is counted chunk by chunk so an origin
//! that sends more than `max_source_bytes` is cut off as soon as it crosses the line, whatever its
//! `Content-Length` said.

use std::time::Duration;

use bytes::Bytes;

use super::{error_chain, expand_template, probe_request};
use super::{join_chunks, SourceError, SourceLimits};
use crate::config::{SourceDomain, SourcePath};
use crate::request::ImageRequest;

/// The most redirects one fetch from `source_domain` follows.
pub const MAX_ORIGIN_REDIRECTS: usize = 3;

/// The statuses that mean "missing" when no configuration says otherwise.
pub const DEFAULT_NOT_FOUND_STATUSES: [u16; 3] = [403, 404, 410];

/// How the configured origin's answers are read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginRules {
    /// `source_not_found_statuses`: statuses meaning the original does not exist (404 to the
    /// client, negatively cached). Every other non-2xx is a 502.
    pub not_found: Vec<u16>,
    /// `source_redirect_hosts`: hosts besides `source_domain`'s own that a redirect may lead to.
    pub redirect_hosts: Vec<String>,
}

impl Default for OriginRules {
    fn default() -> OriginRules {
        OriginRules {
            not_found: DEFAULT_NOT_FOUND_STATUSES.to_vec(),
            redirect_hosts: Vec::new(),
        }
    }
}

/// Originals behind an HTTP(S) base URL.
#[derive(Debug, Clone)]
pub struct HttpSource {
    client: reqwest::Client,
    not_found: Vec<u16>,
    /// The base URL as text, without a trailing slash; the expanded template is appended.
    base: String,
    /// `base` without credentials, for logs.
    described: String,
    template: SourcePath,
    limits: SourceLimits,
}

impl HttpSource {
    /// Builds the shared client for a base URL and template (both checked when the configuration
    /// loaded).
    pub fn new(
        base: SourceDomain,
        template: SourcePath,
        limits: SourceLimits,
        rules: OriginRules,
    ) -> Result<HttpSource, SourceError> {
        let client = reqwest::Client::builder()
            .connect_timeout(limits.connect_timeout)
            // HTTP_PROXY & co. must not silently reroute originals through another host.
            .no_proxy()
            .redirect(redirect_policy(&base, rules.redirect_hosts))
            .user_agent(concat!("image-server/", env!("CARGO_PKG_VERSION")))
            // Idle connections to the origin are reused; keep them for less than the usual
            // server-side keep-alive so we rarely write into a socket the origin just closed.
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| SourceError::Config(format!("HTTP client: {}", error_chain(&e))))?;

        let described = base.redacted();
        let source = HttpSource {
            client,
            not_found: rules.not_found,
            base: base.as_str().trim_end_matches('/').to_owned(),
            described: described.as_str().trim_end_matches('/').to_owned(),
            template,
            limits,
        };
        // Prove at start-up that the template forms a URL; fetch() relies on it.
        source.url_for(&probe_request())?;
        Ok(source)
    }

    /// The URL of `req`'s original: `{base}/{expanded template}`. The base is treated as a
    /// directory whether or not it ends in `/`, so `https://host/originals` and
    /// `https://host/originals/` mean the same place.
    fn url_for(&self, req: &ImageRequest) -> Result<url::Url, SourceError> {
        let path = expand_template(&self.template, req);
        let text = format!("{}/{}", self.base, path.trim_start_matches('/'));
        url::Url::parse(&text).map_err(|e| SourceError::Config(format!("source URL: {e}")))
    }

    /// Fetches `req`'s original within the limits.
    pub async fn fetch(&self, req: &ImageRequest) -> Result<Bytes, SourceError> {
        let url = self.url_for(req)?;
        match tokio::time::timeout(self.limits.fetch_timeout, self.fetch_url(url)).await {
            Ok(result) => result,
            Err(_elapsed) => Err(SourceError::Timeout),
        }
    }

    /// The exchange itself, without the deadline (the caller owns it).
    async fn fetch_url(&self, url: url::Url) -> Result<Bytes, SourceError> {
        fetch_with(
            &self.client,
            url,
            &self.limits,
            &self.not_found,
            map_reqwest,
        )
        .await
    }

    /// The base URL without credentials (`https://cdn.example.com/originals`).
    pub fn describe(&self) -> String {
        self.described.clone()
    }
}

/// The redirect policy for `source_domain`: at most [`MAX_ORIGIN_REDIRECTS`] hops, each to an
/// http(s) URL on `base`'s host or one of `hosts` (compared after the `url` crate's normalisation:
/// lower case, punycode). A refused hop fails the fetch before anything connects to its target.
fn redirect_policy(base: &url::Url, hosts: Vec<String>) -> reqwest::redirect::Policy {
    let own = base.host_str().unwrap_or_default().to_ascii_lowercase();
    let allowed: Vec<String> = hosts
        .into_iter()
        .map(|h| h.trim().trim_end_matches('.').to_ascii_lowercase())
        .filter(|h| !h.is_empty())
        .collect();
    reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() > MAX_ORIGIN_REDIRECTS {
            return attempt.error(RedirectRefused("more than 3 redirects"));
        }
        let url = attempt.url();
        let host = url.host_str().unwrap_or_default().trim_end_matches('.');
        let host_ok = host == own || allowed.iter().any(|h| h == host);
        if !matches!(url.scheme(), "http" | "https") {
            attempt.error(RedirectRefused("redirect to a scheme other than http(s)"))
        } else if !host_ok {
            attempt.error(RedirectRefused(
                "redirect to a host not in source_redirect_hosts",
            ))
        } else {
            attempt.follow()
        }
    })
}

/// Why a redirect from `source_domain` was not followed (in the 502's log line).
#[derive(Debug)]
struct RedirectRefused(&'static str);

impl std::fmt::Display for RedirectRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for RedirectRefused {}

/// One GET of `url` with `client`, the body counted against `limits.max_bytes` while it streams.
/// Shared by the configured origin and the `?source=` override ([`super::guard`]); the caller owns the
/// deadline, `not_found` lists the statuses that mean the original is missing, and `map_err` sorts
/// transport errors (the override also recognises its own refusals).
pub(crate) async fn fetch_with<E: From<SourceError>>(
    client: &reqwest::Client,
    url: url::Url,
    limits: &SourceLimits,
    not_found: &[u16],
    map_err: fn(reqwest::Error) -> E,
) -> Result<Bytes, E> {
    let mut resp = client
        .get(url)
        // Without the gzip feature reqwest would not decode anyway; saying so keeps origins
        // from compressing, and the byte limit counts what travels on the wire.
        .header(reqwest::header::ACCEPT_ENCODING, "identity")
        .send()
        .await
        .map_err(map_err)?;

    let status = resp.status();
    if not_found.contains(&status.as_u16()) {
        return Err(SourceError::NotFound.into());
    }
    if !status.is_success() {
        return Err(SourceError::Upstream(format!("origin answered {status}")).into());
    }

    let max = limits.max_bytes;
    let declared = resp.content_length();
    // Refuse early on an honest declaration; a dishonest one is caught while streaming.
    if declared.is_some_and(|n| n > max) {
        return Err(SourceError::TooLarge.into());
    }

    // Keep chunks rather than appending into one buffer: a small original usually arrives as
    // a single chunk, which is then returned without a copy.
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut total: u64 = 0;
    while let Some(chunk) = resp.chunk().await.map_err(map_err)? {
        total = total.saturating_add(chunk.len() as u64);
        if total > max {
            return Err(SourceError::TooLarge.into());
        }
        chunks.push(chunk);
    }
    if let Some(n) = declared {
        // hyper already fails a short fixed-length body; this keeps the rule local and explicit.
        if total != n {
            return Err(
                SourceError::Upstream(format!("truncated body: {total} of {n} bytes")).into(),
            );
        }
    }
    Ok(join_chunks(chunks, total))
}

/// Sorts a transport error: a timeout (connect or otherwise) is 504, everything else (refused,
/// reset, truncated, protocol error) is 502. The URL is dropped from the message: it may carry
/// credentials and the caller logs which original failed anyway.
pub(crate) fn map_reqwest(err: reqwest::Error) -> SourceError {
    if err.is_timeout() {
        return SourceError::Timeout;
    }
    SourceError::Upstream(error_chain(&err.without_url()))
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::source::raw_origin::{response, Behaviour, RawOrigin};

    /// A one-purpose HTTP/1.1 origin on a loopback port, and the base URL below it.
    async fn origin(behaviour: Behaviour) -> (url::Url, RawOrigin) {
        let origin = RawOrigin::start("127.0.0.1", behaviour).await;
        let base = url::Url::parse(&format!("{}/base", origin.url())).expect("url");
        (base, origin)
    }

    fn with_length(status: &str, body: &[u8]) -> Behaviour {
        Behaviour::Reply(response(
            status,
            &format!("content-length: {}\r\n", body.len()),
            body,
        ))
    }

    fn limits(max_bytes: u64, fetch_ms: u64) -> SourceLimits {
        SourceLimits {
            max_bytes,
            connect_timeout: Duration::from_millis(500),
            fetch_timeout: Duration::from_millis(fetch_ms),
        }
    }

    fn source(base: url::Url, limits: SourceLimits) -> HttpSource {
        source_with(base, limits, OriginRules::default())
    }

    fn domain(url: &str) -> SourceDomain {
        SourceDomain::parse(url).expect("source_domain")
    }

    fn template(t: &str) -> SourcePath {
        SourcePath::parse(t).expect("source_path")
    }

    fn source_with(base: url::Url, limits: SourceLimits, rules: OriginRules) -> HttpSource {
        let template = template("{model}/{type}/{id}/original.jpg");
        HttpSource::new(domain(base.as_str()), template, limits, rules).expect("source")
    }

    fn req() -> ImageRequest {
        ImageRequest {
            model: "product".into(),
            kind: "image".into(),
            id: "42".into(),
            ..probe_request()
        }
    }

    async fn fetch(b: Behaviour, l: SourceLimits) -> Result<Bytes, SourceError> {
        let (base, _) = origin(b).await;
        source(base, l).fetch(&req()).await
    }

    #[tokio::test]
    async fn ok_body_and_request_shape() {
        let (base, raw) = origin(with_length("200 OK", b"original bytes")).await;
        let got = source(base, limits(1000, 2000)).fetch(&req()).await;
        assert_eq!(got, Ok(Bytes::from_static(b"original bytes")));
        let heads = raw.heads();
        assert_eq!(heads.len(), 1);
        assert!(
            heads[0].starts_with("get /base/product/image/42/original.jpg http/1.1\r\n"),
            "{}",
            heads[0]
        );
        assert!(
            heads[0].contains("accept-encoding: identity\r\n"),
            "{}",
            heads[0]
        );
    }

    #[tokio::test]
    async fn body_without_content_length_until_close() {
        let b = Behaviour::Reply(response("200 OK", "", b"streamed until close"));
        assert_eq!(
            fetch(b, limits(1000, 2000)).await,
            Ok(Bytes::from_static(b"streamed until close"))
        );
    }

    #[tokio::test]
    async fn status_mapping() {
        let l = limits(1000, 2000);
        // The default `source_not_found_statuses`: 403 (an S3-backed origin's missing key), 404, 410.
        for status in ["404 Not Found", "410 Gone", "403 Forbidden"] {
            assert_eq!(
                fetch(with_length(status, b"no"), l).await,
                Err(SourceError::NotFound),
                "{status}"
            );
        }
        for status in [
            "500 Internal Server Error",
            "401 Unauthorized",
            "429 Too Many Requests",
            // A redirect to a host that is neither source_domain's nor listed: refused unfollowed.
            "301 Moved Permanently",
        ] {
            let b = Behaviour::Reply(response(
                status,
                "content-length: 0\r\nlocation: http://127.0.0.2:1/elsewhere\r\n",
                b"",
            ));
            assert!(
                matches!(fetch(b, l).await, Err(SourceError::Upstream(_))),
                "{status}"
            );
        }
        // Configured otherwise, 403 is an upstream failure again.
        let (base, _) = origin(with_length("403 Forbidden", b"no")).await;
        let strict = OriginRules {
            not_found: vec![404],
            ..OriginRules::default()
        };
        assert!(matches!(
            source_with(base, l, strict).fetch(&req()).await,
            Err(SourceError::Upstream(_))
        ));
    }

    #[tokio::test]
    async fn too_large_with_content_length() {
        assert_eq!(
            fetch(with_length("200 OK", &[7u8; 101]), limits(100, 2000)).await,
            Err(SourceError::TooLarge)
        );
        // Exactly at the limit is fine.
        assert!(fetch(with_length("200 OK", &[7u8; 100]), limits(100, 2000))
            .await
            .is_ok());
    }

    #[tokio::test]
    async fn too_large_without_content_length() {
        let big = vec![7u8; 64 * 1024];
        let b = Behaviour::Reply(response("200 OK", "", &big));
        assert_eq!(
            fetch(b, limits(1000, 2000)).await,
            Err(SourceError::TooLarge)
        );
        // A chunked body is counted the same way.
        let mut chunked = format!("{:x}\r\n", big.len()).into_bytes();
        chunked.extend_from_slice(&big);
        chunked.extend_from_slice(b"\r\n0\r\n\r\n");
        let b = Behaviour::Reply(response(
            "200 OK",
            "transfer-encoding: chunked\r\n",
            &chunked,
        ));
        assert_eq!(
            fetch(b, limits(1000, 2000)).await,
            Err(SourceError::TooLarge)
        );
    }

    #[tokio::test]
    async fn endless_body_is_cut_at_the_limit() {
        // Nothing but the streaming count can stop this origin; the deadline is far away.
        let start = Instant::now();
        assert_eq!(
            fetch(Behaviour::Endless, limits(1 << 20, 10_000)).await,
            Err(SourceError::TooLarge)
        );
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
    }

    #[tokio::test]
    async fn lying_small_content_length_is_not_trusted() {
        // Declares 10 bytes, sends 5000: at most the declared length is read, and it is refused
        // or cut, never returned as an original bigger than the limit.
        let b = Behaviour::Reply(response("200 OK", "content-length: 10\r\n", &[7u8; 5000]));
        match fetch(b, limits(100, 2000)).await {
            Ok(body) => assert_eq!(body.len(), 10),
            Err(e) => panic!("unexpected {e:?}"),
        }
    }

    #[tokio::test]
    async fn truncated_body_is_upstream() {
        let b = Behaviour::Reply(response("200 OK", "content-length: 100\r\n", b"only forty"));
        assert!(matches!(
            fetch(b, limits(1000, 2000)).await,
            Err(SourceError::Upstream(_))
        ));
    }

    #[tokio::test]
    async fn silent_origin_times_out_at_the_deadline() {
        let start = Instant::now();
        assert_eq!(
            fetch(Behaviour::Silent, limits(1000, 300)).await,
            Err(SourceError::Timeout)
        );
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(2),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn trickling_origin_hits_the_total_deadline() {
        // Each byte arrives well within any idle timeout; only a total deadline stops it.
        let b = Behaviour::Trickle {
            head: response("200 OK", "content-length: 50\r\n", b""),
            count: 50,
            every: Duration::from_millis(100),
        };
        let start = Instant::now();
        assert_eq!(fetch(b, limits(1000, 500)).await, Err(SourceError::Timeout));
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(500) && took < Duration::from_secs(2),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn refused_connection_is_upstream() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let base = url::Url::parse(&format!("http://{addr}/")).expect("url");
        let got = source(base, limits(1000, 2000)).fetch(&req()).await;
        assert!(matches!(got, Err(SourceError::Upstream(_))), "{got:?}");
    }

    /// Bad base URLs and templates are refused when the configuration loads ([`SourceDomain`],
    /// [`SourcePath`]); a built source keeps credentials out of its description only.
    #[test]
    fn describe_hides_credentials() {
        let l = limits(1, 1000);
        let s = HttpSource::new(
            domain("https://user:secret@cdn.example.com/originals/"),
            template("{id}"),
            l,
            OriginRules::default(),
        )
        .expect("source");
        assert_eq!(s.describe(), "https://cdn.example.com/originals");
        assert_eq!(
            s.url_for(&req()).expect("url").as_str(),
            "https://user:secret@cdn.example.com/originals/42"
        );
    }
}
