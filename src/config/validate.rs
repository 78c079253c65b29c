//! Checking the merged values: every key as raw TOML ([`RawConfig`]), and [`validate`], which turns
//! them into a [`Config`] or the first error, naming the key, the value and where it came from.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use toml::Value;

use super::*;

// ---------------------------------------------------------------------------------------------------
// The raw, merged values
// ---------------------------------------------------------------------------------------------------

/// Every key, as merged from the layers and not yet checked. Each field is required, so the
/// embedded `config/default.toml` must name every key, and `deny_unknown_fields` keeps it from
/// naming others: the file is the schema's documentation and cannot drift from it.
/// Values stay [`toml::Value`] so that [`validate`] reports every type or range error with its
/// key and origin (the seed also wrote ports as strings, `"7000"`, which are accepted).
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    listen_address: Value,
    server_port: Value,
    status_port: Value,
    status_address: Value,
    max_connections: Value,
    http2_max_concurrent_streams: Value,
    source_domain: Value,
    source_store: Value,
    source_path: Value,
    result_store: Value,
    s3_endpoint: Value,
    s3_region: Value,
    s3_allow_http: Value,
    s3_access_key_id: Value,
    s3_secret_access_key: Value,
    whitelisted_extensions: Value,
    maximum_width: Value,
    maximum_height: Value,
    allowed_sizes: Value,
    #[serde(alias = "default_compression")]
    default_quality: Value,
    webp_quality: Value,
    avif_quality: Value,
    avif_effort: Value,
    avif_concurrency: Value,
    avif_queue_size: Value,
    max_avif_output_pixels: Value,
    progressive_jpeg: Value,
    crop_gravity: Value,
    enlarge: Value,
    background: Value,
    auto_format: Value,
    accept_avif_input: Value,
    max_source_bytes: Value,
    max_source_pixels: Value,
    max_source_side: Value,
    memory_cache_mb: Value,
    memory_cache_max_entry_kb: Value,
    originals_cache_mb: Value,
    not_found_ttl: Value,
    cache_control: Value,
    processing_concurrency: Value,
    queue_size: Value,
    download_concurrency: Value,
    max_inflight_download_mb: Value,
    max_memory_mb: Value,
    max_jpeg_scans: Value,
    #[serde(alias = "manta_concurrency")]
    upload_concurrency: Value,
    upload_backlog: Value,
    request_timeout: Value,
    render_timeout: Value,
    fetch_timeout: Value,
    connect_timeout: Value,
    header_read_timeout: Value,
    keep_alive_timeout: Value,
    send_timeout: Value,
    store_timeout: Value,
    shutdown_grace: Value,
    #[serde(alias = "graphite_host")]
    statsd_host: Value,
    #[serde(alias = "graphite_port")]
    statsd_port: Value,
    statsd_prefix: Value,
    allow_source_override: Value,
    allowed_source_hosts: Value,
    url_signing_key: Value,
    admin_token: Value,
    log_level: Value,
}

pub(super) fn validate(raw: &RawConfig, c: &Check<'_>) -> Result<Config, ConfigError> {
    let listen_address = {
        let s = c.text("listen_address", &raw.listen_address)?;
        s.parse::<IpAddr>().map_err(|_| {
            c.err(
                "listen_address",
                format!("expected an IP address such as 0.0.0.0 or ::1, got {s:?}"),
            )
        })?
    };
    let server_port: u16 = c.num("server_port", &raw.server_port, 0, 65_535)?;
    let status_port: u16 = c.num("status_port", &raw.status_port, 0, 65_535)?;
    let status_address = match c.opt_text("status_address", &raw.status_address)? {
        None => listen_address,
        Some(s) => s.parse::<IpAddr>().map_err(|_| {
            c.err(
                "status_address",
                format!("expected an IP address such as 127.0.0.1 or ::1, or empty, got {s:?}"),
            )
        })?,
    };
    if server_port != 0 && server_port == status_port && status_address == listen_address {
        return Err(c.err(
            "status_port",
            format!("must differ from server_port, both are {server_port}"),
        ));
    }

    // Originals: exactly one of the two sources.
    let source_domain = match c.opt_text("source_domain", &raw.source_domain)? {
        None => None,
        Some(s) => {
            let bad = |why: &str| c.err("source_domain", format!("{why}, got {s:?}"));
            let mut url =
                url::Url::parse(&s).map_err(|_| bad("expected an http:// or https:// URL"))?;
            if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                return Err(bad("expected an http:// or https:// URL"));
            }
            if url.query().is_some() || url.fragment().is_some() {
                return Err(bad("must not have a query or fragment"));
            }
            // A base URL: the source path is appended below it, never replacing its last segment.
            if !url.path().ends_with('/') {
                let path = format!("{}/", url.path());
                url.set_path(&path);
            }
            Some(url)
        }
    };
    let source_store = c.store_url("source_store", &raw.source_store, false)?;
    match (&source_domain, &source_store) {
        (Some(_), Some(_)) => {
            let from = |k: &str| {
                c.origins
                    .get(k)
                    .map_or("built-in defaults".to_owned(), String::clone)
            };
            return Err(ConfigError::Invalid {
                key: "source_domain, source_store".to_owned(),
                message: format!(
                    "both are set (source_domain in {}, source_store in {}); set exactly one",
                    from("source_domain"),
                    from("source_store")
                ),
                origin: None,
            });
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
    let source_path = c.text("source_path", &raw.source_path)?;
    check_template(&source_path).map_err(|m| c.err("source_path", m))?;
    let result_store = c.store_url("result_store", &raw.result_store, true)?;

    let s3 = {
        let endpoint = c.opt_text("s3_endpoint", &raw.s3_endpoint)?;
        let allow_http = c.boolean("s3_allow_http", &raw.s3_allow_http)?;
        if let Some(e) = &endpoint {
            let url = url::Url::parse(e)
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some());
            match url {
                None => {
                    return Err(c.err(
                        "s3_endpoint",
                        format!("expected an http:// or https:// URL, got {e:?}"),
                    ))
                }
                Some(u) if u.scheme() == "http" && !allow_http => {
                    return Err(c.err(
                        "s3_endpoint",
                        "is plain http; set s3_allow_http = true to allow it",
                    ))
                }
                Some(_) => {}
            }
        }
        let region = c.text("s3_region", &raw.s3_region)?;
        if region.is_empty() {
            return Err(c.err("s3_region", "must not be empty"));
        }
        let access_key_id = c.opt_text("s3_access_key_id", &raw.s3_access_key_id)?;
        let secret_access_key =
            Some(c.raw_text("s3_secret_access_key", &raw.s3_secret_access_key)?)
                .filter(|s| !s.is_empty());
        match (&access_key_id, &secret_access_key) {
            (Some(_), None) => {
                return Err(c.err(
                    "s3_access_key_id",
                    "is set but s3_secret_access_key is not; set both or neither",
                ))
            }
            (None, Some(_)) => {
                return Err(c.err(
                    "s3_secret_access_key",
                    "is set but s3_access_key_id is not; set both or neither",
                ))
            }
            _ => {}
        }
        S3Config {
            endpoint,
            region,
            allow_http,
            access_key_id,
            secret_access_key,
        }
    };

    // What may be requested.
    let mut whitelisted_extensions = Vec::new();
    for ext in c.list("whitelisted_extensions", &raw.whitelisted_extensions)? {
        let format = Format::from_ext(&ext.to_ascii_lowercase()).ok_or_else(|| {
            c.err(
                "whitelisted_extensions",
                format!("unknown extension {ext:?} (expected jpg, jpeg, png, webp, avif or gif)"),
            )
        })?;
        if !whitelisted_extensions.contains(&format) {
            whitelisted_extensions.push(format);
        }
    }
    if whitelisted_extensions.is_empty() {
        return Err(c.err("whitelisted_extensions", "must list at least one extension"));
    }
    let max = i64::from(crate::request::MAX_NUMBER);
    let maximum_width: u32 = c.num("maximum_width", &raw.maximum_width, 1, max)?;
    let maximum_height: u32 = c.num("maximum_height", &raw.maximum_height, 1, max)?;
    let mut allowed_sizes: Vec<String> = Vec::new();
    for name in c.list("allowed_sizes", &raw.allowed_sizes)? {
        let version = crate::request::parse_version_name(&name).map_err(|_| {
            c.err(
                "allowed_sizes",
                format!(
                    "{name:?} is not a version name (such as w200, h200, 300x400, x300, full_size)"
                ),
            )
        })?;
        if version.width().is_some_and(|w| w > maximum_width)
            || version.height().is_some_and(|h| h > maximum_height)
        {
            return Err(c.err(
                "allowed_sizes",
                format!("{name:?} is larger than maximum_width × maximum_height ({maximum_width}×{maximum_height}), so it could never be served"),
            ));
        }
        // Canonical, as the parser compares: `x300` is stored as `300x300`.
        let canonical = version.to_string();
        if !allowed_sizes.contains(&canonical) {
            allowed_sizes.push(canonical);
        }
    }

    // Rendering.
    let crop_gravity = {
        let s = c.text("crop_gravity", &raw.crop_gravity)?;
        match s.to_ascii_lowercase().as_str() {
            "centre" | "center" => Gravity::Centre,
            "attention" => Gravity::Attention,
            "entropy" => Gravity::Entropy,
            _ => {
                return Err(c.err(
                    "crop_gravity",
                    format!("expected centre, center, attention or entropy, got {s:?}"),
                ))
            }
        }
    };
    let background = match &raw.background {
        Value::Array(items) if items.len() == 3 => {
            let mut rgb = [0u8; 3];
            for (slot, item) in rgb.iter_mut().zip(items) {
                *slot = c.num("background", item, 0, 255)?;
            }
            rgb
        }
        v => {
            let s = c.text("background", v)?;
            parse_colour(&s).ok_or_else(|| {
                c.err(
                    "background",
                    format!("expected white, black, #rrggbb or r,g,b (0-255 each), got {s:?}"),
                )
            })?
        }
    };

    // Limits on originals and caches.
    let max_source_bytes = c.size("max_source_bytes", &raw.max_source_bytes, 1, 1)?;
    let max_source_pixels: u64 = c.num("max_source_pixels", &raw.max_source_pixels, 1, i64::MAX)?;
    let max_source_side: u32 = c.num("max_source_side", &raw.max_source_side, 1, MAX_SIDE)?;
    let memory_cache_bytes = c.size("memory_cache_mb", &raw.memory_cache_mb, MB, 0)?;
    let memory_cache_max_entry_bytes = c.size(
        "memory_cache_max_entry_kb",
        &raw.memory_cache_max_entry_kb,
        KB,
        1,
    )?;
    let originals_cache_bytes = c.size("originals_cache_mb", &raw.originals_cache_mb, MB, 0)?;
    let not_found_ttl = c.duration("not_found_ttl", &raw.not_found_ttl, true, MAX_TTL)?;
    let cache_control = c.text("cache_control", &raw.cache_control)?;
    if cache_control.is_empty() || http::HeaderValue::from_str(&cache_control).is_err() {
        return Err(c.err(
            "cache_control",
            format!("expected a Cache-Control header value, got {cache_control:?}"),
        ));
    }

    // Capacity.
    let processing_concurrency = match c.num::<usize>(
        "processing_concurrency",
        &raw.processing_concurrency,
        0,
        MAX_WORKERS,
    )? {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let queue_size = match c.num::<usize>("queue_size", &raw.queue_size, 0, 1_000_000)? {
        0 => 4 * processing_concurrency,
        n => n,
    };
    let avif_concurrency: usize =
        c.num("avif_concurrency", &raw.avif_concurrency, 1, MAX_WORKERS)?;
    let avif_queue_size =
        match c.num::<usize>("avif_queue_size", &raw.avif_queue_size, 0, 1_000_000)? {
            0 => 4 * avif_concurrency,
            n => n,
        };
    // The AV1 encoder holds several buffers of the frame and cannot be stopped: 1 pixel .. the
    // largest frame an encoder accepts (65536²).
    let max_avif_output_pixels: u64 = c.num(
        "max_avif_output_pixels",
        &raw.max_avif_output_pixels,
        1,
        1 << 32,
    )?;
    let max_memory_bytes = c.size("max_memory_mb", &raw.max_memory_mb, MB, 16 * MB)?;
    // Encoders write 1 (baseline) to about 10 scans; libjpeg's own marker limit is far above any
    // legitimate file.
    let max_jpeg_scans: u32 = c.num("max_jpeg_scans", &raw.max_jpeg_scans, 1, 100_000)?;
    let download_concurrency: usize = c.num(
        "download_concurrency",
        &raw.download_concurrency,
        1,
        MAX_WORKERS,
    )?;
    let max_inflight_download_bytes = c.size(
        "max_inflight_download_mb",
        &raw.max_inflight_download_mb,
        MB,
        1,
    )?;
    if max_inflight_download_bytes < max_source_bytes {
        // Otherwise one original of the largest allowed size could never be admitted.
        return Err(c.err(
            "max_inflight_download_mb",
            format!("must be at least max_source_bytes ({max_source_bytes} bytes), got {max_inflight_download_bytes} bytes"),
        ));
    }
    let upload_concurrency: usize = c.num(
        "upload_concurrency",
        &raw.upload_concurrency,
        1,
        MAX_WORKERS,
    )?;
    let upload_backlog: usize = c.num("upload_backlog", &raw.upload_backlog, 1, 10_000_000)?;
    let max_connections: usize = c.num("max_connections", &raw.max_connections, 1, 10_000_000)?;

    // Timeouts.
    let timeout = |key: &str, v: &Value| c.duration(key, v, false, MAX_TIMEOUT);
    let request_timeout = timeout("request_timeout", &raw.request_timeout)?;
    let fetch_timeout = timeout("fetch_timeout", &raw.fetch_timeout)?;
    let connect_timeout = timeout("connect_timeout", &raw.connect_timeout)?;
    let header_read_timeout = timeout("header_read_timeout", &raw.header_read_timeout)?;
    let keep_alive_timeout = timeout("keep_alive_timeout", &raw.keep_alive_timeout)?;
    let send_timeout = timeout("send_timeout", &raw.send_timeout)?;
    // A render may not outlive the request that asked for it.
    let render_timeout = timeout("render_timeout", &raw.render_timeout)?.min(request_timeout);
    let http2_max_concurrent_streams: u32 = c.num(
        "http2_max_concurrent_streams",
        &raw.http2_max_concurrent_streams,
        1,
        MAX_WORKERS,
    )?;
    let store_timeout = timeout("store_timeout", &raw.store_timeout)?;
    let shutdown_grace = c.duration("shutdown_grace", &raw.shutdown_grace, true, MAX_TIMEOUT)?;

    // Counters.
    let statsd_host = match c.opt_text("statsd_host", &raw.statsd_host)? {
        None => None,
        Some(h) => Some(host_name(&h).ok_or_else(|| {
            c.err(
                "statsd_host",
                format!("expected a host name or IP address (no scheme or port), got {h:?}"),
            )
        })?),
    };
    let statsd_port: u16 = c.num("statsd_port", &raw.statsd_port, 1, 65_535)?;
    let statsd_prefix = c.text("statsd_prefix", &raw.statsd_prefix)?;
    if statsd_prefix.starts_with('.')
        || statsd_prefix.ends_with('.')
        || !statsd_prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        return Err(c.err(
            "statsd_prefix",
            format!("expected letters, digits, _, - and inner dots, got {statsd_prefix:?}"),
        ));
    }

    // Safety.
    let allow_source_override = c.boolean("allow_source_override", &raw.allow_source_override)?;
    let mut allowed_source_hosts = Vec::new();
    for h in c.list("allowed_source_hosts", &raw.allowed_source_hosts)? {
        let host = host_name(&h).ok_or_else(|| {
            c.err(
                "allowed_source_hosts",
                format!("expected host names (no scheme, port or path), got {h:?}"),
            )
        })?;
        if !allowed_source_hosts.contains(&host) {
            allowed_source_hosts.push(host);
        }
    }
    if allow_source_override && allowed_source_hosts.is_empty() {
        return Err(c.err(
            "allowed_source_hosts",
            "must list at least one host when allow_source_override is true",
        ));
    }
    let url_signing_key = c.secret("url_signing_key", &raw.url_signing_key)?;
    let admin_token = c.secret("admin_token", &raw.admin_token)?;

    let log_level = c.text("log_level", &raw.log_level)?;
    if log_level.is_empty() {
        return Err(c.err("log_level", "must not be empty"));
    }
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&log_level) {
        return Err(c.err(
            "log_level",
            format!(
                "expected a log filter such as info or info,hyper=warn, got {log_level:?} ({e})"
            ),
        ));
    }

    Ok(Config {
        listen_address,
        server_port,
        status_port,
        status_address,
        http2_max_concurrent_streams,
        source_domain,
        source_path,
        source_store,
        result_store,
        s3,
        whitelisted_extensions,
        maximum_width,
        maximum_height,
        default_quality: c.num("default_quality", &raw.default_quality, 1, 100)?,
        webp_quality: c.num("webp_quality", &raw.webp_quality, 1, 100)?,
        avif_quality: c.num("avif_quality", &raw.avif_quality, 1, 100)?,
        avif_effort: c.num("avif_effort", &raw.avif_effort, 0, 9)?,
        avif_concurrency,
        avif_queue_size,
        max_avif_output_pixels,
        progressive_jpeg: c.boolean("progressive_jpeg", &raw.progressive_jpeg)?,
        crop_gravity,
        enlarge: c.boolean("enlarge", &raw.enlarge)?,
        background,
        auto_format: c.boolean("auto_format", &raw.auto_format)?,
        accept_avif_input: c.boolean("accept_avif_input", &raw.accept_avif_input)?,
        allowed_sizes: Some(allowed_sizes).filter(|s| !s.is_empty()),
        max_source_bytes,
        max_source_pixels,
        max_source_side,
        memory_cache_bytes,
        memory_cache_max_entry_bytes,
        originals_cache_bytes,
        not_found_ttl,
        cache_control,
        processing_concurrency,
        queue_size,
        download_concurrency,
        max_inflight_download_bytes,
        max_memory_bytes,
        max_jpeg_scans,
        upload_concurrency,
        upload_backlog,
        request_timeout,
        render_timeout,
        fetch_timeout,
        connect_timeout,
        header_read_timeout,
        keep_alive_timeout,
        send_timeout,
        store_timeout,
        shutdown_grace,
        max_connections,
        statsd_host,
        statsd_port,
        statsd_prefix,
        allow_source_override,
        allowed_source_hosts,
        url_signing_key,
        admin_token,
        log_level,
    })
}
