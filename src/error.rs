//! The top-level error: where every failure of the request flow ends up, and the ONE place that maps a
//! failure to an HTTP status, a short fixed public message and a bounded metric label.
//!
//! Where the failure came from decides the class: the client's request (4xx), the original or its
//! origin (404 / 422 / 502 / 504), our own capacity (503) or a bug (500). Clients only ever see
//! [`Error::public_message`]; the cause chain goes to the log once, at the service boundary.

use http::StatusCode;

use crate::image::ImageError;
use crate::request::RequestError;
use crate::source::SourceError;
use crate::upload::UploadError;

/// Every way a request can fail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The URL was refused by the parser.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// Fetching the original failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// Rendering failed.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// An upload or delete was refused.
    #[error(transparent)]
    Upload(#[from] UploadError),
    /// A method other than GET or HEAD.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// `?source=` given while `allow_source_override` is off, or refused by its rules.
    #[error("source override refused")]
    SourceRefused,
    /// URL signature missing or wrong.
    #[error("bad signature")]
    BadSignature,
    /// The request deadline passed.
    #[error("request deadline exceeded")]
    Timeout,
    /// The server is stopping.
    #[error("shutting down")]
    ShuttingDown,
    /// A bug or an impossible state; the detail is logged, never sent.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// The HTTP status for this failure (docs/urls.md lists them). Pinned by the table test below.
    pub fn status(&self) -> StatusCode {
        use ImageError as I;
        use RequestError as R;
        use SourceError as S;
        use UploadError as U;
        match self {
            Error::Request(R::NoRoute | R::UnknownVersion) => StatusCode::NOT_FOUND,
            Error::Request(R::OutOfRange) => StatusCode::BAD_REQUEST,
            Error::Request(R::TooLarge | R::ExtensionNotAllowed | R::SizeNotAllowed) => {
                StatusCode::NOT_ACCEPTABLE
            }
            Error::Source(S::NotFound) => StatusCode::NOT_FOUND,
            Error::Source(S::TooLarge) => StatusCode::UNPROCESSABLE_ENTITY,
            Error::Source(S::Upstream(_)) => StatusCode::BAD_GATEWAY,
            Error::Source(S::Timeout) => StatusCode::GATEWAY_TIMEOUT,
            Error::Source(S::Config(_)) => StatusCode::INTERNAL_SERVER_ERROR,
            Error::Image(I::SourceTooLarge | I::UnsupportedFormat | I::Undecodable) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            Error::Image(I::TooManyScans | I::OverMemoryBudget) => StatusCode::UNPROCESSABLE_ENTITY,
            Error::Image(I::AvifTooLarge) => StatusCode::NOT_ACCEPTABLE,
            Error::Image(I::Timeout) => StatusCode::GATEWAY_TIMEOUT,
            Error::Image(I::Overloaded | I::Abandoned) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Image(I::Internal(_)) => StatusCode::INTERNAL_SERVER_ERROR,
            Error::Upload(U::NoSourceStore) => StatusCode::METHOD_NOT_ALLOWED,
            Error::Upload(U::Unauthorized) => StatusCode::UNAUTHORIZED,
            Error::Upload(U::Forbidden) => StatusCode::FORBIDDEN,
            Error::Upload(U::TooLarge) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::Upload(U::Timeout) => StatusCode::REQUEST_TIMEOUT,
            Error::Upload(U::Aborted | U::BadRequest(_)) => StatusCode::BAD_REQUEST,
            Error::Upload(U::Format) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Error::Upload(U::Invalid(_)) => StatusCode::UNPROCESSABLE_ENTITY,
            Error::Upload(U::Precondition) => StatusCode::PRECONDITION_FAILED,
            Error::Upload(U::Busy | U::Store(_)) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Upload(U::Missing) => StatusCode::NOT_FOUND,
            Error::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Error::SourceRefused | Error::BadSignature => StatusCode::FORBIDDEN,
            Error::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Error::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A bounded label for `rejected.{reason}` and logs. Never contains ids or paths.
    pub fn kind(&self) -> &'static str {
        use ImageError as I;
        use RequestError as R;
        use SourceError as S;
        use UploadError as U;
        match self {
            Error::Request(R::NoRoute) => "no_route",
            Error::Request(R::UnknownVersion) => "unknown_version",
            Error::Request(R::OutOfRange) => "out_of_range",
            Error::Request(R::TooLarge) => "too_large",
            Error::Request(R::ExtensionNotAllowed) => "extension",
            Error::Request(R::SizeNotAllowed) => "size_not_allowed",
            Error::Source(S::NotFound) => "not_found",
            Error::Source(S::TooLarge) => "source_too_large",
            Error::Source(S::Upstream(_)) => "upstream",
            Error::Source(S::Timeout) => "upstream_timeout",
            Error::Source(S::Config(_)) => "source_config",
            Error::Image(I::SourceTooLarge) => "pixels",
            Error::Image(I::UnsupportedFormat) => "format",
            Error::Image(I::Undecodable) => "undecodable",
            Error::Image(I::TooManyScans) => "scans",
            Error::Image(I::OverMemoryBudget) => "memory",
            Error::Image(I::AvifTooLarge) => "avif_pixels",
            Error::Image(I::Timeout) => "render_timeout",
            Error::Image(I::Overloaded) => "overloaded",
            Error::Image(I::Abandoned) => "abandoned",
            Error::Image(I::Internal(_)) => "render",
            Error::Upload(U::NoSourceStore) => "upload_no_store",
            Error::Upload(U::Unauthorized) => "unauthorized",
            Error::Upload(U::Forbidden) => "forbidden",
            Error::Upload(U::TooLarge) => "upload_too_large",
            Error::Upload(U::Timeout) => "upload_timeout",
            Error::Upload(U::Aborted) => "upload_aborted",
            Error::Upload(U::BadRequest(_)) => "upload_request",
            Error::Upload(U::Format) => "upload_format",
            Error::Upload(U::Invalid(_)) => "upload_invalid",
            Error::Upload(U::Precondition) => "precondition",
            Error::Upload(U::Busy) => "upload_busy",
            Error::Upload(U::Store(_)) => "upload_store",
            Error::Upload(U::Missing) => "upload_missing",
            Error::MethodNotAllowed => "method",
            Error::SourceRefused => "source_refused",
            Error::BadSignature => "signature",
            Error::Timeout => "timeout",
            Error::ShuttingDown => "shutting_down",
            Error::Internal(_) => "internal",
        }
    }

    /// The fixed one-line body sent to the client: no URLs, hosts, paths or library messages.
    pub fn public_message(&self) -> &'static str {
        match self.status() {
            StatusCode::NOT_FOUND => "not found\n",
            StatusCode::BAD_REQUEST => "bad request\n",
            StatusCode::NOT_ACCEPTABLE => "not acceptable\n",
            StatusCode::FORBIDDEN => "forbidden\n",
            StatusCode::METHOD_NOT_ALLOWED => match self {
                Error::Upload(UploadError::NoSourceStore) => "uploads need source_store\n",
                _ => "method not allowed\n",
            },
            StatusCode::UNAUTHORIZED => "unauthorized\n",
            StatusCode::PAYLOAD_TOO_LARGE => "payload too large\n",
            StatusCode::REQUEST_TIMEOUT => "request timeout\n",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported media type\n",
            StatusCode::PRECONDITION_FAILED => "precondition failed\n",
            StatusCode::UNPROCESSABLE_ENTITY => "unprocessable image\n",
            StatusCode::BAD_GATEWAY => "bad gateway\n",
            StatusCode::GATEWAY_TIMEOUT => "gateway timeout\n",
            StatusCode::SERVICE_UNAVAILABLE => match self {
                Error::ShuttingDown => "shutting down\n",
                Error::Upload(UploadError::Store(_)) => "store unavailable\n",
                _ => "overloaded\n",
            },
            _ => "internal error\n",
        }
    }

    /// True when the original itself is missing: the one failure that is negatively cached.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Source(SourceError::NotFound))
    }

    /// True when the source could not deliver (counts `original_unavailable`).
    pub fn is_original_unavailable(&self) -> bool {
        matches!(
            self,
            Error::Source(SourceError::NotFound | SourceError::Upstream(_) | SourceError::Timeout)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_table() {
        use ImageError as I;
        use RequestError as R;
        use SourceError as S;
        use UploadError as U;
        let table: Vec<(Error, u16, &str)> = vec![
            (R::NoRoute.into(), 404, "not found\n"),
            (R::UnknownVersion.into(), 404, "not found\n"),
            (R::OutOfRange.into(), 400, "bad request\n"),
            (R::TooLarge.into(), 406, "not acceptable\n"),
            (R::ExtensionNotAllowed.into(), 406, "not acceptable\n"),
            (R::SizeNotAllowed.into(), 406, "not acceptable\n"),
            (S::NotFound.into(), 404, "not found\n"),
            (S::TooLarge.into(), 422, "unprocessable image\n"),
            (S::Upstream("x".into()).into(), 502, "bad gateway\n"),
            (S::Timeout.into(), 504, "gateway timeout\n"),
            (S::Config("x".into()).into(), 500, "internal error\n"),
            (I::SourceTooLarge.into(), 422, "unprocessable image\n"),
            (I::UnsupportedFormat.into(), 422, "unprocessable image\n"),
            (I::Undecodable.into(), 422, "unprocessable image\n"),
            (I::TooManyScans.into(), 422, "unprocessable image\n"),
            (I::OverMemoryBudget.into(), 422, "unprocessable image\n"),
            (I::AvifTooLarge.into(), 406, "not acceptable\n"),
            (I::Timeout.into(), 504, "gateway timeout\n"),
            (I::Overloaded.into(), 503, "overloaded\n"),
            (I::Abandoned.into(), 503, "overloaded\n"),
            (I::Internal("x".into()).into(), 500, "internal error\n"),
            (Error::MethodNotAllowed, 405, "method not allowed\n"),
            (Error::SourceRefused, 403, "forbidden\n"),
            (Error::BadSignature, 403, "forbidden\n"),
            (Error::Timeout, 504, "gateway timeout\n"),
            (Error::ShuttingDown, 503, "shutting down\n"),
            (Error::Internal("x".into()), 500, "internal error\n"),
            (U::NoSourceStore.into(), 405, "uploads need source_store\n"),
            (U::Unauthorized.into(), 401, "unauthorized\n"),
            (U::Forbidden.into(), 403, "forbidden\n"),
            (U::TooLarge.into(), 413, "payload too large\n"),
            (U::Timeout.into(), 408, "request timeout\n"),
            (U::Aborted.into(), 400, "bad request\n"),
            (U::BadRequest("x").into(), 400, "bad request\n"),
            (U::Format.into(), 415, "unsupported media type\n"),
            (
                U::Invalid(I::Undecodable).into(),
                422,
                "unprocessable image\n",
            ),
            (U::Precondition.into(), 412, "precondition failed\n"),
            (U::Busy.into(), 503, "overloaded\n"),
            (U::Store("x".into()).into(), 503, "store unavailable\n"),
            (U::Missing.into(), 404, "not found\n"),
        ];
        let mut kinds = std::collections::HashSet::new();
        for (err, status, body) in table {
            assert_eq!(err.status().as_u16(), status, "{err:?}");
            assert_eq!(err.public_message(), body, "{err:?}");
            assert!(kinds.insert(err.kind()), "duplicate kind {}", err.kind());
            assert!(err
                .kind()
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'_'));
        }
    }
}
