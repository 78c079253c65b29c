//! From the merged layers to a checked [`Config`]: each group of keys is extracted from the same
//! flat figment (so an error keeps its key and the layer that set it), then [`build`] applies every
//! rule that involves more than one key, in one place, and resolves the values that depend on
//! others (`0` = a number of cores, `render_timeout` within `request_timeout`).

use figment::Figment;
use serde::de::DeserializeOwned;

use super::layers::{message_of, origin_in, origin_of};
use super::values::Size;
use super::{Config, ConfigError};

/// One group of keys, read from the flat root. An error names the key, says what is wrong with the
/// value (unless it is a secret) and which layer set it.
fn extract<T: DeserializeOwned>(figment: &Figment) -> Result<T, ConfigError> {
    figment.extract().map_err(|e| {
        let key = match &e.kind {
            figment::error::Kind::MissingField(field) => field.to_string(),
            _ => e.path.join("."),
        };
        let origin = e.metadata.as_ref().and_then(|m| origin_in(m, &e.path));
        ConfigError::Invalid {
            key,
            message: message_of(&e),
            origin,
        }
    })
}

/// What a valid configuration may still get wrong, for the operator: logged at start-up and
/// printed by `check-config`.
pub(super) fn warnings(c: &Config) -> Vec<String> {
    let mut out = Vec::new();
    if c.uploads.enabled() && c.originals.source_store.is_none() {
        out.push(
            "upload_token or upload_signing_key is set, but originals come from source_domain: \
             uploads answer 405 until source_store is set"
                .to_owned(),
        );
    }
    out
}

/// Extracts every group and checks the rules between keys.
pub(super) fn build(figment: &Figment) -> Result<Config, ConfigError> {
    let mut c = Config {
        listen: extract(figment)?,
        originals: extract(figment)?,
        s3: extract(figment)?,
        requests: extract(figment)?,
        rendering: extract(figment)?,
        limits: extract(figment)?,
        capacity: extract(figment)?,
        prerender: extract(figment)?,
        caching: extract(figment)?,
        timeouts: extract(figment)?,
        statsd: extract(figment)?,
        security: extract(figment)?,
        uploads: extract(figment)?,
        logging: extract(figment)?,
    };
    let err = |key: &str, message: String| ConfigError::Invalid {
        key: key.to_owned(),
        message,
        origin: origin_of(figment, key),
    };
    let from =
        |key: &str| origin_of(figment, key).unwrap_or_else(|| "built-in defaults".to_owned());

    let listen = &c.listen;
    if listen.server_port != 0
        && listen.server_port == listen.status_port
        && listen.status_ip() == listen.listen_address
    {
        return Err(err(
            "status_port",
            format!(
                "must differ from server_port, both are {}",
                listen.server_port
            ),
        ));
    }

    // Originals: exactly one of the two sources.
    match (&c.originals.source_domain, &c.originals.source_store) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::Invalid {
                key: "source_domain, source_store".to_owned(),
                message: format!(
                    "both are set (source_domain in {}, source_store in {}); set exactly one",
                    from("source_domain"),
                    from("source_store")
                ),
                origin: None,
            })
        }
        (None, None) => {
            return Err(ConfigError::Invalid {
                key: "source_domain, source_store".to_owned(),
                message: "neither is set; set source_domain (an http(s) origin) or source_store (an object-store URL)".to_owned(),
                origin: None,
            })
        }
        _ => {}
    }

    let s3 = &c.s3;
    if s3
        .endpoint
        .as_deref()
        .is_some_and(|e| e.starts_with("http:"))
        && !s3.allow_http
    {
        return Err(err(
            "s3_endpoint",
            "is plain http; set s3_allow_http = true to allow it".to_owned(),
        ));
    }
    match (&s3.access_key_id, &s3.secret_access_key) {
        (Some(_), None) => {
            return Err(err(
                "s3_access_key_id",
                "is set but s3_secret_access_key is not; set both or neither".to_owned(),
            ))
        }
        (None, Some(_)) => {
            return Err(err(
                "s3_secret_access_key",
                "is set but s3_access_key_id is not; set both or neither".to_owned(),
            ))
        }
        _ => {}
    }

    let (width, height) = (c.requests.maximum_width, c.requests.maximum_height);
    for name in &c.requests.allowed_sizes {
        let version = crate::request::parse_version_name(name)
            .map_err(|_| err("allowed_sizes", format!("{name:?} is not a version name")))?;
        if version.width().is_some_and(|w| w > width)
            || version.height().is_some_and(|h| h > height)
        {
            return Err(err(
                "allowed_sizes",
                format!("{name:?} is larger than maximum_width × maximum_height ({width}×{height}), so it could never be served"),
            ));
        }
    }

    // Otherwise one original of the largest allowed size could never be admitted.
    let (inflight, largest) = (
        c.capacity.max_inflight_download_mb.bytes(),
        c.limits.max_source_bytes.bytes(),
    );
    if inflight < largest {
        return Err(err(
            "max_inflight_download_mb",
            format!("must be at least max_source_bytes ({largest} bytes), got {inflight} bytes"),
        ));
    }

    if c.security.allow_source_override && c.security.allowed_source_hosts.is_empty() {
        return Err(err(
            "allowed_source_hosts",
            "must list at least one host when allow_source_override is true".to_owned(),
        ));
    }

    // Named versions and upload outputs must be servable under the URL rules.
    let rules = c.rules();
    for (name, file) in &c.requests.named_versions {
        crate::request::ImageRequest::parse(&format!("/m/t/i/{file}"), &rules).map_err(|e| {
            err(
                "named_versions",
                format!("{name} = {file:?} could never be served: {e} under the URL keys"),
            )
        })?;
    }
    for output in &c.uploads.upload_outputs {
        crate::request::ImageRequest::parse(&format!("/m/t/i/{output}"), &rules).map_err(|e| {
            err(
                "upload_outputs",
                format!("{output:?} is neither a named version nor a servable version file: {e}"),
            )
        })?;
    }

    // Values that follow from others.
    if c.uploads.max_upload_bytes.bytes() == 0 {
        c.uploads.max_upload_bytes = Size::from_bytes(c.limits.max_source_bytes.bytes());
    }
    let capacity = &mut c.capacity;
    if capacity.processing_concurrency == 0 {
        capacity.processing_concurrency =
            std::thread::available_parallelism().map_or(1, |n| n.get());
    }
    if capacity.queue_size == 0 {
        capacity.queue_size = 4 * capacity.processing_concurrency;
    }
    if capacity.avif_queue_size == 0 {
        capacity.avif_queue_size = 4 * capacity.avif_concurrency;
    }
    // A render may not outlive the request that asked for it.
    c.timeouts.render_timeout = c.timeouts.render_timeout.min(c.timeouts.request_timeout);
    Ok(c)
}
