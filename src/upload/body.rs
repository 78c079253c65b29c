//! Reading an upload's body: whole into memory, never more than `max_upload_bytes`, within
//! `upload_timeout`. A `Content-Length` over the limit is refused before a byte is read; a chunked
//! body is cut at the limit. Nothing is stored until the body is complete and checked, so a client
//! that stops or disconnects mid-body leaves nothing behind.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, CONTENT_LENGTH};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Body as HttpBody;

use super::UploadError;

/// The declared length, when the request has one.
pub(super) fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// Refuses a declared length over `max` (413) without reading.
pub(super) fn check_declared(headers: &HeaderMap, max: u64) -> Result<(), UploadError> {
    match declared_length(headers) {
        Some(n) if n > max => Err(UploadError::TooLarge),
        _ => Ok(()),
    }
}

/// Reads the whole body: 413 past `max` bytes, 408 when it is not complete within `timeout`, and
/// [`UploadError::Aborted`] when the client goes away or the stream breaks.
pub(super) async fn read<B>(body: B, max: u64, timeout: Duration) -> Result<Bytes, UploadError>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let limit = usize::try_from(max).unwrap_or(usize::MAX);
    let collect = Limited::new(body, limit).collect();
    match tokio::time::timeout(timeout, collect).await {
        Err(_elapsed) => Err(UploadError::Timeout),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(UploadError::TooLarge),
        Ok(Err(_)) => Err(UploadError::Aborted),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::stream;
    use http_body_util::{Full, StreamBody};
    use hyper::body::Frame;

    fn chunks(
        parts: Vec<Result<&'static [u8], std::io::Error>>,
    ) -> impl HttpBody<Data = Bytes, Error = std::io::Error> {
        StreamBody::new(stream::iter(
            parts
                .into_iter()
                .map(|p| p.map(|b| Frame::data(Bytes::from_static(b)))),
        ))
    }

    #[tokio::test]
    async fn whole_bodies_within_the_limit_are_read() {
        let body = chunks(vec![Ok(b"abc"), Ok(b"def")]);
        let got = read(body, 6, Duration::from_secs(1)).await;
        assert_eq!(got, Ok(Bytes::from_static(b"abcdef")));
    }

    #[tokio::test]
    async fn a_body_past_the_limit_is_cut_with_413() {
        let body = chunks(vec![Ok(b"abc"), Ok(b"defg")]);
        assert_eq!(
            read(body, 6, Duration::from_secs(1)).await,
            Err(UploadError::TooLarge)
        );
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_LENGTH, "7".parse().expect("value"));
        assert_eq!(check_declared(&headers, 6), Err(UploadError::TooLarge));
        assert_eq!(check_declared(&headers, 7), Ok(()));
        assert_eq!(check_declared(&HeaderMap::new(), 0), Ok(()));
    }

    #[tokio::test]
    async fn a_broken_stream_is_aborted() {
        let body = chunks(vec![Ok(b"abc"), Err(std::io::Error::other("reset"))]);
        assert_eq!(
            read(body, 100, Duration::from_secs(1)).await,
            Err(UploadError::Aborted)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_gets_408_at_the_deadline() {
        let silent = StreamBody::new(stream::pending::<Result<Frame<Bytes>, std::io::Error>>());
        let started = tokio::time::Instant::now();
        assert_eq!(
            read(silent, 100, Duration::from_secs(60)).await,
            Err(UploadError::Timeout)
        );
        assert_eq!(started.elapsed(), Duration::from_secs(60));
        // An empty body is read as empty (the handler decides what that means).
        let empty = Full::new(Bytes::new());
        assert_eq!(
            read(empty, 100, Duration::from_secs(1)).await,
            Ok(Bytes::new())
        );
    }
}
