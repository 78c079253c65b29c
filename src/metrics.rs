//! The last step of the request flow: counting. Every metric name is a constant here, with a one-line
//! description, so dashboards can rely on them (docs/operations.md).
//!
//! One `metrics` recorder fans out to statsd (UDP, Graphite-style names under `statsd_prefix`, the
//! seed's dashboard names) and to a Prometheus registry rendered on the status port's `/metrics`.
//! Label values are bounded (formats, status codes, reasons), never ids or paths: statsd names are
//! built from them, so an unbounded label would be an unbounded number of Graphite series.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::OnceLock;

use metrics::{Counter, Histogram};

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use metrics_util::layers::FanoutBuilder;

/// Seed: an image was processed (no cache tier had it). Also sent as `image_request.{ext}`.
pub const IMAGE_REQUEST: &str = "image_request";
/// Seed: an image request was answered with an error status.
pub const IMAGE_REQUEST_FAIL: &str = "image_request_fail";
/// Seed: an original was fetched from the source.
pub const ORIGINAL_DOWNLOADED: &str = "original_downloaded";
/// Seed: the source said the original does not exist, or could not deliver it.
pub const ORIGINAL_UNAVAILABLE: &str = "original_unavailable";
/// Every HTTP request on the image port.
pub const REQUEST: &str = "request";
/// Prefix of `response.status.{code}`: responses by status code.
pub const RESPONSE_STATUS: &str = "response.status";
/// The memory result cache answered.
pub const CACHE_MEMORY_HIT: &str = "cache.memory.hit";
/// The memory result cache did not have the variant.
pub const CACHE_MEMORY_MISS: &str = "cache.memory.miss";
/// The remote result store answered.
pub const CACHE_REMOTE_HIT: &str = "cache.remote.hit";
/// The remote result store did not have the variant (or could not be read).
pub const CACHE_REMOTE_MISS: &str = "cache.remote.miss";
/// A variant was written to the remote result store.
pub const CACHE_REMOTE_WRITE: &str = "cache.remote.write";
/// A write to the remote result store failed or was dropped (backlog full).
pub const CACHE_REMOTE_WRITE_FAIL: &str = "cache.remote.write_fail";
/// A request waited for another request's identical load instead of doing its own.
pub const COALESCED: &str = "coalesced";
/// Prefix of `rejected.{reason}`: requests refused, by reason.
pub const REJECTED: &str = "rejected";
/// Prefix of `purge.{outcome}`: status-port purge calls (`ok`, `unauthorized`, `bad_id`, `disabled`,
/// `failed`).
pub const PURGE: &str = "purge";
/// Prefix of `connection.closed.{reason}`: connections the server closed (`header_timeout`,
/// `keep_alive`, `send_timeout`, `evicted`).
pub const CONNECTION_CLOSED: &str = "connection.closed";
/// Timer: fetching an original (statsd `|ms`; Prometheus seconds).
pub const TIME_FETCH: &str = "time.fetch";
/// Timer: rendering a variant, queue wait included (statsd `|ms`; Prometheus seconds).
pub const TIME_PROCESS: &str = "time.process";
/// Timer: a whole image request (statsd `|ms`; Prometheus seconds).
pub const TIME_TOTAL: &str = "time.total";
/// Gauge: renders running now.
pub const PROCESSING_CURRENT: &str = "processing.current";
/// Counter: background pre-renders of popular versions, by outcome:
/// `prerender.{rendered,skipped,dropped}`.
pub const PRERENDER: &str = "prerender";
/// Counter: restarts on SIGHUP, by outcome: `restart.{ok,failed}`.
pub const RESTART: &str = "restart";
/// Counter: originals taken in and removed, by outcome:
/// `upload.{created,replaced,deleted,output.rendered,output.failed}`.
pub const UPLOAD: &str = "upload";
/// Gauge: original downloads running now.
pub const DOWNLOADS_CURRENT: &str = "downloads.current";
/// Gauge: renders waiting for a pool slot.
pub const QUEUE_DEPTH: &str = "queue.depth";

/// Every counter name (for describe and the docs test).
pub const COUNTERS: &[(&str, &str)] = &[
    (
        IMAGE_REQUEST,
        "an image was processed (no cache tier had it); also image_request.{ext}",
    ),
    (
        IMAGE_REQUEST_FAIL,
        "an image request was answered with an error status",
    ),
    (
        ORIGINAL_DOWNLOADED,
        "an original was fetched from the source",
    ),
    (
        ORIGINAL_UNAVAILABLE,
        "the source said the original does not exist, or could not deliver it",
    ),
    (REQUEST, "an HTTP request reached the image port"),
    (
        RESPONSE_STATUS,
        "responses by status code: response.status.{code}",
    ),
    (CACHE_MEMORY_HIT, "the memory result cache answered"),
    (
        CACHE_MEMORY_MISS,
        "the memory result cache did not have the variant",
    ),
    (CACHE_REMOTE_HIT, "the remote result store answered"),
    (
        CACHE_REMOTE_MISS,
        "the remote result store did not have the variant",
    ),
    (
        CACHE_REMOTE_WRITE,
        "a variant was written to the remote result store",
    ),
    (
        CACHE_REMOTE_WRITE_FAIL,
        "a remote write failed or was dropped",
    ),
    (COALESCED, "a request shared another request's load"),
    (REJECTED, "requests refused, by reason: rejected.{reason}"),
    (
        PURGE,
        "status-port purge calls, by outcome: purge.{ok,unauthorized,bad_id,disabled,failed}",
    ),
    (
        PRERENDER,
        "background pre-renders of popular versions: prerender.{rendered,skipped,dropped}",
    ),
    (
        RESTART,
        "restarts on SIGHUP: restart.{ok,failed}",
    ),
    (
        UPLOAD,
        "originals uploaded and deleted: upload.{created,replaced,deleted,output.rendered,output.failed}",
    ),
    (
        CONNECTION_CLOSED,
        "connections closed by the server: connection.closed.{header_timeout,keep_alive,send_timeout,evicted}",
    ),
];

/// Every timer and gauge name with its description.
pub const TIMERS_AND_GAUGES: &[(&str, &str)] = &[
    (TIME_FETCH, "time to fetch an original"),
    (TIME_PROCESS, "time to render a variant, queue included"),
    (TIME_TOTAL, "time for a whole image request"),
    (PROCESSING_CURRENT, "renders running now"),
    (DOWNLOADS_CURRENT, "original downloads running now"),
    (QUEUE_DEPTH, "renders waiting for a pool slot"),
];

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Where statsd packets go; `None` turns statsd off.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatsdTarget {
    /// Host name or address.
    pub host: String,
    /// UDP port.
    pub port: u16,
    /// Prefix of every name (`image_server`).
    pub prefix: String,
}

/// Installs the process-wide recorder (statsd + Prometheus). Only the first call installs; later calls
/// (tests that start several servers in one process) reuse it and return its handle.
pub fn install(statsd: Option<StatsdTarget>) -> PrometheusHandle {
    if let Some(handle) = PROMETHEUS.get() {
        return handle.clone();
    }
    let prometheus = PrometheusBuilder::new().build_recorder();
    let handle = prometheus.handle();
    let mut fanout = FanoutBuilder::default().add_recorder(prometheus);
    if let Some(target) = statsd {
        // Buffer size 0: the exporter has no timed flush, so a buffered lone counter might never leave
        // (its default 256-byte buffer has no timed flush). histogram_is_timer: Etsy statsd has no histogram type, timers are `|ms`.
        match metrics_exporter_statsd::StatsdBuilder::from(target.host.clone(), target.port)
            .with_buffer_size(0)
            .with_queue_size(4096)
            .histogram_is_timer()
            .build(Some(&target.prefix))
        {
            Ok(statsd) => fanout = fanout.add_recorder(statsd),
            Err(e) => tracing::warn!(error = %e, "statsd exporter not started"),
        }
    }
    if metrics::set_global_recorder(fanout.build()).is_ok() {
        describe();
        let _ = PROMETHEUS.set(handle.clone());
        handle
    } else {
        // Someone installed a recorder first (another test); the handle still renders our registry.
        PROMETHEUS.get_or_init(|| handle).clone()
    }
}

/// The Prometheus handle, if [`install`] ran.
pub fn prometheus() -> Option<&'static PrometheusHandle> {
    PROMETHEUS.get()
}

/// Registers the descriptions of every metric.
pub fn describe() {
    for (name, help) in COUNTERS {
        metrics::describe_counter!(*name, *help);
    }
    for (name, help) in TIMERS_AND_GAUGES {
        if name.starts_with("time.") {
            metrics::describe_histogram!(*name, metrics::Unit::Seconds, *help);
        } else {
            metrics::describe_gauge!(*name, *help);
        }
    }
}

/// Increments a counter by one.
pub fn incr(name: &'static str) {
    if PROMETHEUS.get().is_none() {
        metrics::counter!(name).increment(1);
        return;
    }
    HANDLES.with_borrow_mut(|h| {
        h.counters
            .entry(static_key(name))
            .or_insert_with(|| metrics::counter!(name))
            .increment(1)
    });
}

/// Increments `{prefix}.{suffix}` where `suffix` is a bounded label (status code, format, reason).
pub fn incr_with(prefix: &'static str, suffix: &str) {
    if PROMETHEUS.get().is_none() {
        metrics::counter!(format!("{prefix}.{suffix}")).increment(1);
        return;
    }
    HANDLES.with_borrow_mut(|h| {
        let by_suffix = h.labelled.entry(static_key(prefix)).or_default();
        match by_suffix.get(suffix) {
            Some(counter) => counter.increment(1),
            None => {
                let counter = metrics::counter!(format!("{prefix}.{suffix}"));
                counter.increment(1);
                by_suffix.insert(suffix.to_owned(), counter);
            }
        }
    });
}

/// Records a duration. The value is in seconds, the `metrics` convention: the statsd exporter
/// converts it to the `|ms` integer on the wire (it multiplies by 1000; recording milliseconds here
/// sent timers 1000× too large) and Prometheus expects seconds.
pub fn time(name: &'static str, elapsed: std::time::Duration) {
    if PROMETHEUS.get().is_none() {
        metrics::histogram!(name).record(elapsed.as_secs_f64());
        return;
    }
    HANDLES.with_borrow_mut(|h| {
        h.histograms
            .entry(static_key(name))
            .or_insert_with(|| metrics::histogram!(name))
            .record(elapsed.as_secs_f64())
    });
}

thread_local! {
    /// The handles this thread has registered, by name. `counter!(name)` looks the name up in every
    /// recorder of the fan-out (a hash, a lock and a handle allocation each) on every call: 5 % of a
    /// memory hit's CPU under load. Registered once per thread instead, and only once [`install`] has
    /// run, so a handle taken before the recorder existed (a no-op) is never kept. Names and suffixes
    /// are bounded (see the module doc), so these maps are too.
    static HANDLES: RefCell<Handles> = RefCell::new(Handles::default());
}

#[derive(Default)]
struct Handles {
    counters: HashMap<(usize, usize), Counter>,
    labelled: HashMap<(usize, usize), HashMap<String, Counter>>,
    histograms: HashMap<(usize, usize), Histogram>,
}

/// A `&'static str` name by address and length: no hashing of its text, and two names sharing a
/// prefix in the binary's string table still differ by length.
fn static_key(name: &'static str) -> (usize, usize) {
    (name.as_ptr() as usize, name.len())
}

/// Sets a gauge (the statsd exporter drops increment/decrement on gauges, so always set).
pub fn gauge(name: &'static str, value: f64) {
    metrics::gauge!(name).set(value);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Operators read docs/operations.md's Metrics table: every name here must be in it, in backticks (a
    /// name emitted only with a suffix, such as `response.status`, as `response.status.{…}`), and so
    /// must every `{name}.{…}` form a description mentions.
    #[test]
    fn the_operations_doc_lists_every_metric() {
        let doc = include_str!("../docs/operations.md");
        let section = doc
            .split("\n## Metrics\n")
            .nth(1)
            .and_then(|s| s.split("\n## ").next())
            .expect("docs/operations.md has a Metrics section");
        for (name, help) in COUNTERS.iter().chain(TIMERS_AND_GAUGES) {
            assert!(
                section.contains(&format!("| `{name}` |"))
                    || section.contains(&format!("| `{name}.{{")),
                "docs/operations.md Metrics table lacks `{name}`"
            );
            // `image_request.{ext}` in a description needs its own row; an enumeration such as
            // `purge.{ok,…}` is covered by the `{name}.{` row above.
            for word in help.split_whitespace() {
                let Some(rest) = word.strip_prefix(&format!("{name}.{{")) else {
                    continue;
                };
                let placeholder = rest.split('}').next().unwrap_or(rest);
                if !placeholder.contains(',') {
                    let form = format!("{name}.{{{placeholder}}}");
                    assert!(
                        section.contains(&format!("| `{form}` |")),
                        "docs/operations.md Metrics table lacks `{form}`"
                    );
                }
            }
        }
    }

    #[test]
    fn names_are_graphite_safe() {
        for (name, _) in COUNTERS.iter().chain(TIMERS_AND_GAUGES) {
            assert!(
                name.bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_' || b == b'.'),
                "{name}"
            );
            assert!(!name.starts_with('.') && !name.ends_with('.'), "{name}");
        }
    }
}
