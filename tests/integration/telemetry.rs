//! Telemetry as operators see it (docs/operations.md): the statsd lines, the Prometheus page, the status
//! port and the log, checked on the real binary.
//!
//! The `metrics` recorder is process-global (the first server in this test process installs it with
//! statsd off), so every statsd test runs `image-server` as a child process: `-e test`, both ports 0,
//! addresses read back from its "listening" log line, originals from a loopback [`Origin`] in this
//! process, statsd packets to a UDP socket (or an Etsy statsd daemon) bound here on 127.0.0.1.
//!
//! The scenario every counter test runs: a miss, a memory hit, a missing original (404), a width over
//! the limit (406) and an undecodable original (422).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use image_server::image::fixtures;

use crate::seaweed::Seaweed;
use crate::support::{self, client, probe, Origin, Reply};

// ---------------------------------------------------------------------------------------------
// Harness: the binary as a child process, a statsd socket, a Graphite sink.
// ---------------------------------------------------------------------------------------------

/// Output lines shared with the reader threads.
type Lines = Arc<Mutex<Vec<String>>>;

/// `image-server` running as a child process, stdout and stderr collected line by line.
struct Proc {
    child: Child,
    lines: Lines,
    image: SocketAddr,
    status: SocketAddr,
}

/// A loopback TCP port free right now (for the runs whose log level hides the "listening" line).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

fn collect(stream: impl Read + Send + 'static, lines: Lines) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { return };
            lines.lock().expect("lines").push(line);
        }
    });
}

impl Proc {
    /// Starts the server against the origin at `url`, sending statsd to 127.0.0.1:`port`.
    async fn start_with_statsd(url: &str, port: &str) -> Proc {
        let sets = [
            ("source_domain", url),
            ("statsd_host", "127.0.0.1"),
            ("statsd_port", port),
        ];
        Proc::start(&sets, &[]).await
    }

    /// Starts `image-server -e test --set k=v…` with `env` added to a clean environment (no
    /// `RUST_LOG`, no `IMAGE_SERVER_*` from the caller) and waits for its "listening" line.
    async fn start(sets: &[(&str, &str)], env: &[(&str, &str)]) -> Proc {
        let mut p = Proc::spawn(sets, env, None);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let found = p.lines().iter().find_map(|l| {
                if !l.contains(" listening ") {
                    return None;
                }
                let field = |k: &str| {
                    l.split_whitespace()
                        .find_map(|w| w.strip_prefix(k))
                        .and_then(|a| a.parse::<SocketAddr>().ok())
                };
                Some((field("image=")?, field("status=")?))
            });
            if let Some((image, status)) = found {
                p.image = image;
                p.status = status;
                return p;
            }
            p.assert_alive();
            assert!(
                Instant::now() < deadline,
                "no listening line: {:?}",
                p.lines()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Like [`Proc::start`] on ports chosen here, for log levels that hide the "listening" line:
    /// waits until the status port accepts a connection.
    async fn start_quiet(sets: &[(&str, &str)], env: &[(&str, &str)]) -> Proc {
        let (image, status) = (free_port(), free_port());
        let mut p = Proc::spawn(sets, env, Some((image, status)));
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(p.status).await.is_err() {
            p.assert_alive();
            assert!(Instant::now() < deadline, "status port never opened");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        p
    }

    fn spawn(sets: &[(&str, &str)], env: &[(&str, &str)], ports: Option<(u16, u16)>) -> Proc {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_image-server"));
        cmd.current_dir(root)
            .args(["-e", "test", "--config-dir"])
            .arg(root.join("config"));
        // Info by default: the "listening" line carries the bound ports. A caller's log_level comes
        // later and wins (later --set flags override earlier ones).
        let mut all: Vec<(String, String)> = vec![("log_level".into(), "info".into())];
        all.extend(sets.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        if let Some((image, status)) = ports {
            all.push(("server_port".into(), image.to_string()));
            all.push(("status_port".into(), status.to_string()));
        }
        for (k, v) in &all {
            cmd.arg("--set").arg(format!("{k}={v}"));
        }
        cmd.env_remove("RUST_LOG");
        for (k, _) in std::env::vars() {
            if k.starts_with("IMAGE_SERVER_") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn image-server");
        let lines: Lines = Arc::default();
        collect(child.stdout.take().expect("stdout"), lines.clone());
        collect(child.stderr.take().expect("stderr"), lines.clone());
        let (image, status) = ports.unwrap_or((0, 0));
        Proc {
            child,
            lines,
            image: SocketAddr::from(([127, 0, 0, 1], image)),
            status: SocketAddr::from(([127, 0, 0, 1], status)),
        }
    }

    fn assert_alive(&mut self) {
        if let Ok(Some(code)) = self.child.try_wait() {
            panic!("image-server exited {code}: {:?}", self.lines());
        }
    }

    /// Every output line so far.
    fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("lines").clone()
    }

    fn image_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.image)
    }

    fn status_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.status)
    }

    /// Sends SIGTERM (a graceful stop), as an orchestrator would.
    fn terminate(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -TERM failed");
    }

    /// Waits for the process to exit on its own.
    async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "did not exit: {:?}",
                self.lines()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A UDP socket on 127.0.0.1 standing in for statsd: keeps every line it receives.
struct StatsdSocket {
    port: u16,
    lines: Lines,
    stop: Arc<AtomicBool>,
}

impl StatsdSocket {
    fn bind() -> StatsdSocket {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let port = socket.local_addr().expect("addr").port();
        let lines: Lines = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (l, s) = (lines.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 65_536];
            while !s.load(Ordering::Relaxed) {
                if let Ok(n) = socket.recv(&mut buf) {
                    // One metric per datagram (buffer size 0), but the protocol allows several.
                    let text = String::from_utf8_lossy(&buf[..n]).to_string();
                    let mut l = l.lock().expect("lines");
                    l.extend(text.lines().filter(|x| !x.is_empty()).map(str::to_owned));
                }
            }
        });
        StatsdSocket { port, lines, stop }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("lines").clone()
    }

    /// The counter lines (`name:1|c`) received, as a multiset.
    fn counters(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for l in self.lines().into_iter().filter(|l| l.ends_with("|c")) {
            *out.entry(l).or_default() += 1;
        }
        out
    }

    /// Waits until at least `n` counter lines arrived, then a little longer so that any extra line
    /// (the thing an exact assertion must catch) has time to arrive too.
    async fn wait_counters(&self, n: u64) -> BTreeMap<String, u64> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.counters().values().sum::<u64>() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.counters()
    }
}

impl Drop for StatsdSocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------------
// The scenario.
// ---------------------------------------------------------------------------------------------

/// One answer as a client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Answer {
    status: u16,
    x_cache: String,
    content_type: String,
    body: Bytes,
}

async fn fetch(url: &str) -> Answer {
    let resp = client().get(url).send().await.expect("request");
    let h = |n: &str| support::header(&resp, n);
    let (status, x_cache, content_type) = (resp.status().as_u16(), h("x-cache"), h("content-type"));
    Answer {
        status,
        x_cache,
        content_type,
        body: resp.bytes().await.expect("body"),
    }
}

/// The original of `product/image/1`: 400×300 (so `w100.jpg` is 100×75).
fn original() -> Vec<u8> {
    fixtures::jpeg(400, 300, 90)
}

/// An origin serving the scenario's originals: 1 good, 2 missing, 3 a truncated JPEG.
async fn scenario_origin() -> Origin {
    let origin = Origin::start().await;
    origin.put("product/image/1", original());
    origin.script("product/image/2", Reply::Status(404));
    let whole = fixtures::jpeg(400, 300, 90);
    origin.put("product/image/3", whole[..whole.len() / 2].to_vec());
    origin
}

/// The scenario's requests, in order, with the status each must get.
const SCENARIO: &[(&str, u16)] = &[
    ("/product/image/1/w100.jpg", 200),  // miss: fetched and rendered
    ("/product/image/1/w100.jpg", 200),  // memory hit
    ("/product/image/2/w100.jpg", 404),  // the origin has no such original
    ("/product/image/1/w5000.jpg", 406), // over maximum_width: no fetch, no decode
    ("/product/image/3/w100.jpg", 422),  // truncated original: downloaded, not decodable
];

/// Runs the scenario and checks every status and the cache tier of the two 200s.
async fn scenario(p: &Proc) -> Vec<Answer> {
    let mut answers = Vec::new();
    for (path, status) in SCENARIO {
        let a = fetch(&p.image_url(path)).await;
        assert_eq!(a.status, *status, "{path}: {a:?}");
        answers.push(a);
    }
    assert_eq!(answers[0].x_cache, "miss");
    assert_eq!(answers[1].x_cache, "memory");
    answers
}

/// Every counter line the scenario must produce, exactly, with the default prefix. Worked out from
/// the code: `request` and `response.status.*` per request (service), `cache.memory.*` for the
/// requests that reach the pipeline (all but the 406), `original_downloaded` for each body fetched
/// (the miss and the truncated original), `original_unavailable` for the origin's 404, one
/// `image_request` (+ `.jpg`) for the one successful render, `image_request_fail` and `rejected.*`
/// for the three error statuses. No remote tier, no coalescing.
const SCENARIO_COUNTERS: &[(&str, u64)] = &[
    ("image_server.request:1|c", 5),
    ("image_server.response.status.200:1|c", 2),
    ("image_server.response.status.404:1|c", 1),
    ("image_server.response.status.406:1|c", 1),
    ("image_server.response.status.422:1|c", 1),
    ("image_server.cache.memory.miss:1|c", 3),
    ("image_server.cache.memory.hit:1|c", 1),
    ("image_server.original_downloaded:1|c", 2),
    ("image_server.original_unavailable:1|c", 1),
    ("image_server.image_request:1|c", 1),
    ("image_server.image_request.jpg:1|c", 1),
    ("image_server.image_request_fail:1|c", 3),
    ("image_server.rejected.not_found:1|c", 1),
    ("image_server.rejected.too_large:1|c", 1),
    ("image_server.rejected.undecodable:1|c", 1),
];

fn expected_counters() -> BTreeMap<String, u64> {
    SCENARIO_COUNTERS
        .iter()
        .map(|(l, n)| ((*l).to_owned(), *n))
        .collect()
}

/// Timer lines by name: (count, values in ms).
fn timers(lines: &[String]) -> BTreeMap<String, Vec<u64>> {
    let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for l in lines {
        if let Some(body) = l.strip_suffix("|ms") {
            let (name, value) = body.rsplit_once(':').expect("name:value|ms");
            out.entry(name.to_owned())
                .or_default()
                .push(value.parse().expect("integer ms"));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// A strict Prometheus text-format reader.
// ---------------------------------------------------------------------------------------------

/// A sample's labels, in order.
type Labels = Vec<(String, String)>;

/// One sample line.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: Labels,
    value: f64,
}

/// A parsed `/metrics` page.
#[derive(Debug, Default)]
struct Exposition {
    types: BTreeMap<String, String>,
    samples: Vec<Sample>,
}

impl Exposition {
    /// The value of the label-less sample `name`.
    fn value(&self, name: &str) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels.is_empty())
            .map(|s| s.value)
    }

    /// Every family of this type.
    fn families(&self, ty: &str) -> BTreeSet<String> {
        self.types
            .iter()
            .filter(|(_, t)| *t == ty)
            .map(|(n, _)| n.clone())
            .collect()
    }
}

fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `{a="x",b="y"}` → pairs; the text after `{`, returns the pairs and the rest after `}`.
fn parse_labels(mut rest: &str) -> Result<(Labels, &str), String> {
    let mut labels = Vec::new();
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let (name, after) = rest.split_once("=\"").ok_or("label without =\"")?;
        if !is_label_name(name) {
            return Err(format!("bad label name {name:?}"));
        }
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err("unterminated label value".into()),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("bad escape {other:?}")),
                },
                Some((_, c)) => value.push(c),
            }
        };
        labels.push((name.to_owned(), value));
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s.parse::<f64>().map_err(|e| format!("value {s:?}: {e}")),
    }
}

/// Parses the Prometheus text format (0.0.4) strictly: only `# HELP` / `# TYPE` comments, one TYPE
/// per family, declared before its samples, every sample belonging to a declared family.
fn parse_prometheus(text: &str) -> Result<Exposition, String> {
    let mut out = Exposition::default();
    let mut seen_samples: BTreeSet<String> = BTreeSet::new();
    for (n, line) in text.lines().enumerate() {
        let err = |e: String| format!("line {}: {e}: {line:?}", n + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut parts = comment.trim_start().splitn(3, ' ');
            let (kind, name, rest) = (parts.next(), parts.next(), parts.next());
            let name = name.ok_or_else(|| err("comment without a name".into()))?;
            if !is_metric_name(name) {
                return Err(err(format!("bad name {name:?}")));
            }
            match kind {
                Some("HELP") => {}
                Some("TYPE") => {
                    let ty = rest.ok_or_else(|| err("TYPE without a type".into()))?;
                    if !["counter", "gauge", "summary", "histogram", "untyped"].contains(&ty) {
                        return Err(err(format!("unknown type {ty}")));
                    }
                    if seen_samples.contains(name) {
                        return Err(err("TYPE after samples".into()));
                    }
                    if out.types.insert(name.to_owned(), ty.to_owned()).is_some() {
                        return Err(err("second TYPE".into()));
                    }
                }
                _ => return Err(err("comment other than HELP or TYPE".into())),
            }
            continue;
        }
        let name_end = line
            .find(['{', ' '])
            .ok_or_else(|| err("no value".into()))?;
        let name = &line[..name_end];
        if !is_metric_name(name) {
            return Err(err(format!("bad name {name:?}")));
        }
        let (labels, rest) = match line[name_end..].strip_prefix('{') {
            Some(after) => parse_labels(after).map_err(err)?,
            None => (Vec::new(), &line[name_end..]),
        };
        let rest = rest
            .strip_prefix(' ')
            .ok_or_else(|| err("no space before the value".into()))?;
        let mut fields = rest.split(' ');
        let value = parse_value(fields.next().unwrap_or("")).map_err(err)?;
        if let Some(ts) = fields.next() {
            ts.parse::<i64>()
                .map_err(|e| err(format!("timestamp: {e}")))?;
        }
        if fields.next().is_some() {
            return Err(err("trailing fields".into()));
        }
        // The family: the name itself, or a summary/histogram's _sum/_count/_bucket.
        let family = std::iter::once(name)
            .chain(
                ["_sum", "_count", "_bucket"]
                    .iter()
                    .filter_map(|s| name.strip_suffix(s)),
            )
            .find(|f| out.types.contains_key(*f))
            .ok_or_else(|| err("sample of an undeclared family".into()))?;
        seen_samples.insert(family.to_owned());
        out.samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    Ok(out)
}

#[test]
fn prometheus_reader_is_strict() {
    let good = "# HELP a_total things\n# TYPE a_total counter\na_total 3\n\n# TYPE t summary\n\
                t{quantile=\"0.5\"} 0.25\nt_sum 1.5\nt_count 4\n# TYPE g gauge\ng{x=\"a\\\"b\"} -Inf\n";
    let e = parse_prometheus(good).expect("valid");
    assert_eq!(e.value("a_total"), Some(3.0));
    assert_eq!(e.value("t_count"), Some(4.0));
    assert_eq!(
        e.samples.last().map(|s| s.labels[0].1.as_str()),
        Some("a\"b")
    );
    for bad in [
        "a 1\n",                                     // no TYPE
        "# TYPE a counter\na one\n",                 // not a number
        "# TYPE a.b counter\na.b 1\n",               // bad name
        "# TYPE a counter\na{x=1} 1\n",              // unquoted label
        "# TYPE a counter\n# TYPE a gauge\n",        // two TYPEs
        "# TYPE a counter\na 1 2 3\n",               // trailing field
        "# comment\n",                               // unknown comment
        "# TYPE a counter\na 1\n# TYPE a counter\n", // TYPE after samples
    ] {
        assert!(parse_prometheus(bad).is_err(), "accepted {bad:?}");
    }
}

async fn metrics_page(p: &Proc) -> Exposition {
    let resp = client()
        .get(p.status_url("/metrics"))
        .send()
        .await
        .expect("metrics");
    assert_eq!(resp.status(), 200);
    assert!(support::header(&resp, "content-type").starts_with("text/plain"));
    let text = resp.text().await.expect("text");
    parse_prometheus(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

async fn status_json(p: &Proc) -> serde_json::Value {
    let resp = client()
        .get(p.status_url("/"))
        .send()
        .await
        .expect("status");
    assert_eq!(resp.status(), 200);
    assert_eq!(support::header(&resp, "content-type"), "application/json");
    serde_json::from_slice(&resp.bytes().await.expect("body")).expect("json")
}

async fn status_of(url: String) -> (u16, String) {
    let resp = client().get(url).send().await.expect("status port");
    let code = resp.status().as_u16();
    (code, resp.text().await.expect("text"))
}

// ---------------------------------------------------------------------------------------------
// 1. Exact statsd lines.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statsd_lines_are_exactly_the_scenarios() {
    let statsd = StatsdSocket::bind();
    let origin = scenario_origin().await;
    let port = statsd.port.to_string();
    let url = origin.url();
    let p = Proc::start_with_statsd(&url, &port).await;
    let started = Instant::now();
    scenario(&p).await;
    let wall_ms = started.elapsed().as_millis() as u64;
    let expected = expected_counters();
    let got = statsd.wait_counters(expected.values().sum()).await;
    assert_eq!(got, expected, "counter lines");

    // Timers: one total per request, one fetch per origin request, one process per render started;
    // the values are milliseconds (never more than the whole scenario took: a seconds/ms mix-up
    // shows as a thousandfold value).
    let lines = statsd.lines();
    let t = timers(&lines);
    let counts: BTreeMap<&str, usize> = t.iter().map(|(k, v)| (k.as_str(), v.len())).collect();
    assert_eq!(
        counts,
        BTreeMap::from([
            ("image_server.time.fetch", 3),
            ("image_server.time.process", 2),
            ("image_server.time.total", 5),
        ])
    );
    for (name, values) in &t {
        for v in values {
            assert!(
                *v <= wall_ms + 1,
                "{name} = {v} ms, scenario took {wall_ms} ms"
            );
        }
    }
    // Gauges are set (never incremented: the statsd exporter drops gauge increments).
    for gauge in ["processing.current", "downloads.current", "queue.depth"] {
        let prefix = format!("image_server.{gauge}:");
        assert!(
            lines.iter().any(|l| l.starts_with(&prefix)
                && l.ends_with("|g")
                && !l[prefix.len()..].starts_with(['+', '-'])),
            "no {gauge} gauge set: {lines:?}"
        );
    }
    // Nothing else: every line is a counter, a timer or one of the three gauges.
    for l in &lines {
        assert!(
            l.ends_with("|c") || l.ends_with("|ms") || l.ends_with("|g"),
            "unexpected line {l:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Through a real Etsy statsd daemon to a Graphite sink: the seed's dashboard names.
// ---------------------------------------------------------------------------------------------

/// A TCP listener standing in for Graphite's plaintext port: keeps every line of every connection.
fn graphite_sink() -> (u16, Lines) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind graphite");
    let port = listener.local_addr().expect("addr").port();
    let lines: Lines = Arc::default();
    let l = lines.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            collect(conn, l.clone());
        }
    });
    (port, lines)
}

/// Etsy statsd under node, killed on drop.
struct StatsdDaemon {
    child: Child,
    _dir: tempfile::TempDir,
    port: u16,
}

impl StatsdDaemon {
    fn start(graphite_port: u16) -> StatsdDaemon {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let stats_js: PathBuf = root.join(".tools/statsd/node_modules/statsd/stats.js");
        assert!(
            stats_js.exists(),
            "Etsy statsd missing at {}: run scripts/install-deps.sh test",
            stats_js.display()
        );
        let port = {
            let s = UdpSocket::bind("127.0.0.1:0").expect("udp");
            s.local_addr().expect("addr").port()
        };
        let mgmt = free_port();
        let dir = tempfile::tempdir().expect("tmp");
        let config = dir.path().join("config.js");
        // Loopback only, on every socket it opens. Default (legacy) namespace: counters appear as
        // stats.{name} (rate) and stats_counts.{name} (count).
        std::fs::write(
            &config,
            format!(
                r#"{{
  port: {port}, address: "127.0.0.1",
  mgmt_port: {mgmt}, mgmt_address: "127.0.0.1",
  graphiteHost: "127.0.0.1", graphitePort: {graphite_port},
  flushInterval: 500,
  backends: ["./backends/graphite"]
}}"#
            ),
        )
        .expect("config");
        let child = Command::new("node")
            .arg(&stats_js)
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("node is installed");
        let daemon = StatsdDaemon {
            child,
            _dir: dir,
            port,
        };
        // Ready when its management port answers (it opens it with the UDP server).
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", mgmt)).is_err() {
            assert!(Instant::now() < deadline, "statsd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        daemon
    }
}

impl Drop for StatsdDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sums every value Graphite received for `name`.
fn graphite_sum(lines: &[String], name: &str) -> Option<f64> {
    let values: Vec<f64> = lines
        .iter()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some(name))
                .then(|| f.next().and_then(|v| v.parse().ok()))
                .flatten()
        })
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_dashboard_names_reach_graphite_through_etsy_statsd() {
    let (graphite_port, graphite) = graphite_sink();
    let daemon = StatsdDaemon::start(graphite_port);
    let origin = scenario_origin().await;
    let (port, url) = (daemon.port.to_string(), origin.url());
    let p = Proc::start_with_statsd(&url, &port).await;
    scenario(&p).await;
    // Counts per seed name (stats_counts sums over flushes; later flushes send 0).
    let want = [
        ("image_request", 1.0),
        ("image_request.jpg", 1.0),
        ("image_request_fail", 3.0),
        ("original_downloaded", 2.0),
        ("original_unavailable", 1.0),
    ];
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let lines = graphite.lock().expect("lines").clone();
        let done = want.iter().all(|(name, n)| {
            graphite_sum(&lines, &format!("stats_counts.image_server.{name}")) == Some(*n)
                && graphite_sum(&lines, &format!("stats.image_server.{name}")).is_some()
        }) && graphite_sum(&lines, "stats.timers.image_server.time.total.count")
            == Some(5.0);
        if done {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Graphite did not get the seed names: {}",
            lines
                .iter()
                .filter(|l| l.contains("image_server"))
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(p);
    drop(daemon);
}

// ---------------------------------------------------------------------------------------------
// 3. /metrics: valid Prometheus text with the scenario's counts.
// ---------------------------------------------------------------------------------------------

/// The Prometheus name of a statsd name: the exporter maps `.` to `_` (the prefix is statsd's).
fn prometheus_name(statsd: &str) -> String {
    statsd.replace('.', "_")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_page_is_prometheus_text_with_the_same_counts() {
    let origin = scenario_origin().await;
    let url = origin.url();
    let p = Proc::start(&[("source_domain", &url)], &[]).await;
    let started = Instant::now();
    scenario(&p).await;
    let wall = started.elapsed().as_secs_f64();
    let page = metrics_page(&p).await;
    let mut want = BTreeMap::new();
    for (line, n) in SCENARIO_COUNTERS {
        let name = line
            .strip_prefix("image_server.")
            .and_then(|l| l.strip_suffix(":1|c"))
            .expect("counter line");
        want.insert(prometheus_name(name), *n as f64);
    }
    let counters: BTreeMap<String, f64> = page
        .families("counter")
        .into_iter()
        .map(|f| {
            let v = page
                .value(&f)
                .unwrap_or_else(|| panic!("{f} has no sample"));
            (f, v)
        })
        .collect();
    assert_eq!(counters, want, "counters on /metrics");
    assert_eq!(
        page.families("gauge"),
        BTreeSet::from(
            ["downloads_current", "processing_current", "queue_depth"].map(String::from)
        )
    );
    for g in ["downloads_current", "processing_current", "queue_depth"] {
        assert_eq!(page.value(g), Some(0.0), "{g} when idle");
    }
    // Timers are summaries in seconds: the counts match the statsd timers.
    for (t, n) in [
        ("time_total", 5.0),
        ("time_fetch", 3.0),
        ("time_process", 2.0),
    ] {
        assert_eq!(page.types.get(t).map(String::as_str), Some("summary"));
        assert_eq!(page.value(&format!("{t}_count")), Some(n), "{t}_count");
        let sum = page.value(&format!("{t}_sum")).expect("sum");
        assert!(
            (0.0..=wall).contains(&sum),
            "{t}_sum = {sum} s, scenario took {wall} s"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 4. A dead statsd changes nothing for clients and does not flood the log.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_statsd_changes_nothing() {
    let origin = scenario_origin().await;
    let url = origin.url();
    let dead = {
        let s = UdpSocket::bind("127.0.0.1:0").expect("udp");
        s.local_addr().expect("addr").port().to_string()
    };
    let mut runs = Vec::new();
    for statsd in [None, Some(dead.as_str())] {
        let mut sets = vec![("source_domain", url.as_str()), ("log_level", "info")];
        if let Some(port) = statsd {
            sets.extend([("statsd_host", "127.0.0.1"), ("statsd_port", port)]);
        }
        let p = Proc::start(&sets, &[]).await;
        let mut answers = scenario(&p).await;
        // Enough traffic that one log line per packet would show.
        for _ in 0..50 {
            answers.push(fetch(&p.image_url(SCENARIO[1].0)).await);
        }
        tokio::time::sleep(Duration::from_millis(1500)).await; // a gauge tick or two
        runs.push((answers, p.lines()));
    }
    let (off, on) = (&runs[0], &runs[1]);
    assert_eq!(off.0.len(), on.0.len());
    for (i, (a, b)) in off.0.iter().zip(&on.0).enumerate() {
        assert_eq!(a, b, "answer {i} differs with a dead statsd");
    }
    let noisy: Vec<&String> =
        on.1.iter()
            .filter(|l| {
                let lower = l.to_lowercase();
                lower.contains("statsd") || l.contains(" WARN ") || l.contains(" ERROR ")
            })
            .collect();
    assert!(noisy.len() <= 2, "log flood: {noisy:?}");
    assert_eq!(
        on.1.iter().filter(|l| l.contains(" request ")).count(),
        SCENARIO.len() + 50,
        "one line per request"
    );
}

// ---------------------------------------------------------------------------------------------
// 5. The status port.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_after_the_scenario() {
    let origin = scenario_origin().await;
    let url = origin.url();
    let p = Proc::start(&[("source_domain", &url)], &[]).await;
    let answers = scenario(&p).await;
    let s = status_json(&p).await;
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    let libvips = s["libvips_version"].as_str().expect("libvips_version");
    assert_eq!(libvips.split('.').count(), 3, "{libvips}");
    assert!(
        libvips.split('.').all(|n| n.parse::<u32>().is_ok()),
        "{libvips}"
    );
    assert!(s["uptime_seconds"].as_u64().is_some_and(|u| u < 600));
    assert_eq!(s["shutting_down"], false);
    // Renders started: the miss and the truncated original; downloads: 1, 2 and 3.
    assert_eq!(
        s["processing"],
        serde_json::json!({
            "current": 0, "total": 2, "abandoned": 0, "memory_reserved_bytes": 0,
            "decodes": 2, "shared_decodes": 0
        })
    );
    assert_eq!(
        s["downloads"],
        serde_json::json!({"current": 0, "total": 3})
    );
    assert_eq!(s["queue_depth"], 0);
    let mem = &s["cache"]["memory"];
    assert_eq!(mem["entries"], 1);
    // Weighed bytes (what memory_cache_mb bounds): the body plus a small per-entry overhead.
    let (bytes, body) = (
        mem["bytes"].as_u64().expect("bytes"),
        answers[0].body.len() as u64,
    );
    assert!(
        (body..=body + 512).contains(&bytes),
        "{bytes} bytes for a {body}-byte entry"
    );
    assert_eq!(
        (mem["hits"].as_u64(), mem["misses"].as_u64()),
        (Some(1), Some(3))
    );
    assert_eq!(mem["hit_ratio"].as_f64(), Some(0.25));
    // Only the good original stays (a failed render drops its original).
    let originals = &s["cache"]["originals"];
    assert_eq!(originals["entries"], 1);
    assert_eq!(originals["bytes"].as_u64(), Some(original().len() as u64));
    assert!(s["cache"]["remote"].is_null(), "no result store configured");
    let limits = &s["limits"];
    assert_eq!(limits["maximum_width"], 2048);
    assert_eq!(limits["max_source_bytes"], 25 * 1024 * 1024);
    assert!(limits["processing_concurrency"]
        .as_u64()
        .is_some_and(|n| n >= 1));
    assert!(limits["queue_size"].as_u64().is_some());

    assert_eq!(
        status_of(p.status_url("/health")).await,
        (200, "ok\n".into())
    );
    assert_eq!(
        status_of(p.status_url("/ready")).await,
        (200, "ready\n".into())
    );
    assert_eq!(status_of(p.status_url("/nope")).await.0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_turns_ready_503_at_once_and_finishes_in_flight_work() {
    let origin = Origin::start().await;
    origin.put("product/image/5", original());
    let url = origin.url();
    let mut p = Proc::start(
        &[
            ("source_domain", &url),
            ("log_level", "info"),
            ("shutdown_grace", "10s"),
            ("fetch_timeout", "8s"),
            ("request_timeout", "9s"),
        ],
        &[],
    )
    .await;
    assert_eq!(
        status_of(p.status_url("/ready")).await,
        (200, "ready\n".into())
    );

    origin.set_delay(Duration::from_secs(2));
    let slow_url = p.image_url("/product/image/5/w100.jpg");
    let slow = tokio::spawn(async move { fetch(&slow_url).await });
    let deadline = Instant::now() + Duration::from_secs(10);
    while origin.hits("product/image/5") == 0 {
        assert!(
            Instant::now() < deadline,
            "the slow request never reached the origin"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    p.terminate();
    let signalled = Instant::now();
    loop {
        let (code, body) = status_of(p.status_url("/ready")).await;
        if code == 503 {
            assert_eq!(body, "shutting down\n");
            break;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(1),
            "/ready still {code} after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        !slow.is_finished(),
        "the slow request must still be in flight"
    );
    assert_eq!(status_json(&p).await["shutting_down"], true);
    // New image connections are refused once the listener closed.
    let refused = client()
        .get(p.image_url("/product/image/5/w50.jpg"))
        .send()
        .await;
    assert!(
        refused.as_ref().map(|r| r.status() == 503).unwrap_or(true),
        "a new image request during the drain: {refused:?}"
    );

    let answer = slow.await.expect("task");
    assert_eq!(answer.status, 200, "in-flight request finished");
    let img = probe(&answer.body);
    assert_eq!((img.width, img.height), (100, 75));
    let status = p.wait_exit(Duration::from_secs(15)).await;
    assert!(status.success(), "exit status {status}");
    let lines = p.lines();
    assert!(
        lines.iter().any(|l| l.contains("shutting down")),
        "{lines:?}"
    );
    assert!(lines.iter().any(|l| l.contains("stopped")), "{lines:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_is_503_while_the_result_store_is_down() {
    let mut store = Seaweed::start("ready");
    let origin = Origin::start().await;
    let url = origin.url();
    let owned = store.overrides("results");
    let mut sets: Vec<(&str, &str)> = owned
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    sets.push(("source_domain", &url));
    sets.push(("store_timeout", "1s"));
    let p = Proc::start(&sets, &[]).await;
    assert_eq!(
        status_of(p.status_url("/ready")).await,
        (200, "ready\n".into())
    );

    store.stop();
    let started = Instant::now();
    assert_eq!(
        status_of(p.status_url("/ready")).await,
        (503, "result store unreachable\n".into())
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "/ready took {:?}",
        started.elapsed()
    );
    // Liveness is not readiness: libvips still works.
    assert_eq!(status_of(p.status_url("/health")).await.0, 200);

    store.resume();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (code, _) = status_of(p.status_url("/ready")).await;
        if code == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/ready stayed {code} after the store came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// 6. Logs.
// ---------------------------------------------------------------------------------------------

/// `key=value` fields of a log line (values may be quoted).
fn fields(line: &str) -> BTreeMap<String, String> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_log_line_per_request_and_the_cause_once() {
    let origin = scenario_origin().await;
    origin.script("product/image/4", Reply::Status(500));
    let url = origin.url();
    let p = Proc::start(&[("source_domain", &url), ("log_level", "info")], &[]).await;
    let answers = scenario(&p).await;
    assert_eq!(
        fetch(&p.image_url("/product/image/4/w100.jpg"))
            .await
            .status,
        502
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let lines = p.lines();
    assert!(
        !lines.iter().any(|l| l.contains('\x1b')),
        "colour codes in a piped log"
    );

    let requests: Vec<BTreeMap<String, String>> = lines
        .iter()
        .filter(|l| l.contains(" INFO ") && l.contains(" request "))
        .map(|l| fields(l))
        .collect();
    assert_eq!(requests.len(), SCENARIO.len() + 1, "{lines:#?}");
    for r in &requests {
        for key in ["method", "path", "status", "bytes", "cache", "ms"] {
            assert!(r.contains_key(key), "{key} missing from {r:?}");
        }
        assert_eq!(r["method"], "GET");
        assert!(r["ms"].parse::<u64>().is_ok());
    }
    let expect = [
        ("/product/image/1/w100.jpg", "200", "miss", "-"),
        ("/product/image/1/w100.jpg", "200", "memory", "-"),
        ("/product/image/2/w100.jpg", "404", "-", "not_found"),
        ("/product/image/1/w5000.jpg", "406", "-", "too_large"),
        ("/product/image/3/w100.jpg", "422", "-", "undecodable"),
        ("/product/image/4/w100.jpg", "502", "-", "upstream"),
    ];
    for (r, (path, status, cache, error)) in requests.iter().zip(expect) {
        assert_eq!(
            (
                r["path"].as_str(),
                r["status"].as_str(),
                r["cache"].as_str(),
                r["error"].as_str()
            ),
            (path, status, cache, error)
        );
    }
    assert_eq!(requests[0]["bytes"], answers[0].body.len().to_string());
    assert_eq!(requests[2]["bytes"], "not found\n".len().to_string());

    // The 502's cause (the origin's status) is logged once, at warn; nothing else warns.
    let causes: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("origin answered 500"))
        .collect();
    assert_eq!(causes.len(), 1, "{lines:#?}");
    assert!(causes[0].contains(" WARN "), "{}", causes[0]);
    let warnings = lines
        .iter()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .count();
    assert_eq!(warnings, 1, "{lines:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_level_comes_from_config_or_rust_log() {
    let origin = Origin::start().await;
    origin.put("product/image/1", original());
    let url = origin.url();
    let path = "/product/image/1/w100.jpg";
    // log_level = warn: no request lines, not even the start-up line.
    let quiet = Proc::start_quiet(&[("source_domain", &url), ("log_level", "warn")], &[]).await;
    assert_eq!(fetch(&quiet.image_url(path)).await.status, 200);
    // RUST_LOG wins over the config.
    let loud = Proc::start_quiet(
        &[("source_domain", &url), ("log_level", "warn")],
        &[("RUST_LOG", "info")],
    )
    .await;
    assert_eq!(fetch(&loud.image_url(path)).await.status, 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let info = |p: &Proc| p.lines().iter().filter(|l| l.contains(" INFO ")).count();
    assert_eq!(info(&quiet), 0, "{:?}", quiet.lines());
    let loud_lines = loud.lines();
    assert!(
        loud_lines
            .iter()
            .any(|l| l.contains(" INFO ") && l.contains(" request ")),
        "{loud_lines:?}"
    );
    assert!(loud_lines.iter().any(|l| l.contains(" listening ")));
}
