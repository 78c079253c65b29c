//! Test harness: a real loopback HTTP origin, the real server started on 127.0.0.1:0, a client, and
//! readers that decode outputs independently. Every address used here is on loopback.

#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use image_server::app::App;
use image_server::config::{self, Config};
use image_server::image::vips;
use image_server::server::{self, Running};
use tokio::net::TcpListener;

/// How the origin answers.
#[derive(Clone, Debug)]
pub enum Reply {
    /// 200 with these bytes.
    Body(Bytes),
    /// This status with a short body.
    Status(u16),
    /// Accept the request and never answer.
    Hang,
    /// 302 to this `Location`.
    Redirect(String),
    /// 200 with these bytes and this `Content-Type` / `Content-Encoding` (empty: header left out).
    Typed {
        body: Bytes,
        content_type: &'static str,
        content_encoding: &'static str,
    },
}

/// A loopback HTTP origin with scripted replies that counts every request it receives.
#[derive(Clone)]
pub struct Origin {
    pub addr: SocketAddr,
    replies: Arc<Mutex<HashMap<String, Reply>>>,
    hits: Arc<Mutex<HashMap<String, usize>>>,
    total: Arc<AtomicUsize>,
    /// Requests being answered now, and the most seen at once (while the delay runs).
    inflight: Arc<AtomicUsize>,
    max_inflight: Arc<AtomicUsize>,
    delay: Arc<Mutex<Duration>>,
}

impl Origin {
    /// Starts an origin on 127.0.0.1:0.
    pub async fn start() -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
        Origin::serve_on(listener)
    }

    /// Starts an origin on a listener the caller has bound.
    pub fn start_with(listener: TcpListener) -> Origin {
        Origin::serve_on(listener)
    }

    fn serve_on(listener: TcpListener) -> Origin {
        let origin = Origin {
            addr: listener.local_addr().expect("addr"),
            replies: Arc::default(),
            hits: Arc::default(),
            total: Arc::default(),
            inflight: Arc::default(),
            max_inflight: Arc::default(),
            delay: Arc::new(Mutex::new(Duration::ZERO)),
        };
        let o = origin.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let o = o.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let o = o.clone();
                        async move { Ok::<_, Infallible>(o.reply(req.uri().path()).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        origin
    }

    async fn reply(&self, path: &str) -> Response<Full<Bytes>> {
        self.total.fetch_add(1, Ordering::SeqCst);
        *self
            .hits
            .lock()
            .expect("lock")
            .entry(path.to_owned())
            .or_default() += 1;
        let delay = *self.delay.lock().expect("lock");
        if !delay.is_zero() {
            let now = self.inflight.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_inflight.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(delay).await;
            self.inflight.fetch_sub(1, Ordering::SeqCst);
        }
        let reply = self.replies.lock().expect("lock").get(path).cloned();
        match reply {
            Some(Reply::Body(b)) => Response::builder()
                .header("content-type", "image/jpeg")
                .body(Full::new(b))
                .expect("response"),
            Some(Reply::Status(s)) => Response::builder()
                .status(StatusCode::from_u16(s).expect("status"))
                .body(Full::new(Bytes::from_static(b"origin says no")))
                .expect("response"),
            Some(Reply::Redirect(location)) => Response::builder()
                .status(302)
                .header("location", location)
                .body(Full::new(Bytes::new()))
                .expect("response"),
            Some(Reply::Typed {
                body,
                content_type,
                content_encoding,
            }) => {
                let mut b = Response::builder();
                if !content_type.is_empty() {
                    b = b.header("content-type", content_type);
                }
                if !content_encoding.is_empty() {
                    b = b.header("content-encoding", content_encoding);
                }
                b.body(Full::new(body)).expect("response")
            }
            Some(Reply::Hang) => {
                std::future::pending::<()>().await;
                unreachable!()
            }
            None => Response::builder()
                .status(404)
                .body(Full::new(Bytes::from_static(b"missing")))
                .expect("response"),
        }
    }

    /// Serves `bytes` as the original of `{model}/{type}/{id}` (the default template).
    pub fn put(&self, original: &str, bytes: impl Into<Bytes>) {
        self.replies.lock().expect("lock").insert(
            format!("/{original}/original.jpg"),
            Reply::Body(bytes.into()),
        );
    }

    /// Scripts a reply for the original of `{model}/{type}/{id}`.
    pub fn script(&self, original: &str, reply: Reply) {
        self.replies
            .lock()
            .expect("lock")
            .insert(format!("/{original}/original.jpg"), reply);
    }

    /// Scripts a reply for an exact request path (`/x/y.jpg`).
    pub fn script_path(&self, path: &str, reply: Reply) {
        self.replies
            .lock()
            .expect("lock")
            .insert(path.to_owned(), reply);
    }

    /// Requests received for an exact path.
    pub fn path_hits(&self, path: &str) -> usize {
        self.hits
            .lock()
            .expect("lock")
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    /// Delay before every answer.
    pub fn set_delay(&self, d: Duration) {
        *self.delay.lock().expect("lock") = d;
    }

    /// Requests received for one original.
    pub fn hits(&self, original: &str) -> usize {
        self.hits
            .lock()
            .expect("lock")
            .get(&format!("/{original}/original.jpg"))
            .copied()
            .unwrap_or(0)
    }

    /// The most requests the origin was answering at once (counted while a delay is set).
    pub fn max_concurrent(&self) -> usize {
        self.max_inflight.load(Ordering::SeqCst)
    }

    /// Requests received in all.
    pub fn total(&self) -> usize {
        self.total.load(Ordering::SeqCst)
    }

    /// The base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// The test configuration (`config/test.toml`) with overrides.
pub fn config(overrides: &[(&str, &str)]) -> Config {
    let flags: Vec<(String, String)> = overrides
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    config::load_from(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("config")
            .as_path(),
        "test",
        None,
        std::iter::empty(),
        flags,
    )
    .expect("test config")
    .config
}

/// Starts the real server with this config on 127.0.0.1:0 (both ports).
pub async fn start(config: Config) -> Running {
    vips::init(config.rendering.accept_avif_input).expect("libvips");
    image_server::metrics::install(None);
    let app = App::new(config).expect("app");
    server::start(app).await.expect("server starts")
}

/// Starts the server against an HTTP origin.
pub async fn start_with_origin(origin: &Origin, extra: &[(&str, &str)]) -> Running {
    let url = origin.url();
    let mut o: Vec<(&str, &str)> = vec![("source_domain", url.as_str())];
    o.extend_from_slice(extra);
    start(config(&o)).await
}

/// A client that never follows redirects and never uses a proxy.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// GETs a path on the server.
pub async fn get(server: &Running, path: &str) -> reqwest::Response {
    client()
        .get(format!("http://{}{}", server.addr, path))
        .send()
        .await
        .expect("request")
}

/// A counter from the status port's Prometheus page (`a.b.c` is written `a_b_c`), 0 when absent.
pub async fn counter(server: &Running, name: &str) -> f64 {
    counter_at(&server.status_addr.to_string(), name).await
}

/// [`counter`] of the server whose status port is at `status_addr` (`host:port`), such as a server
/// running as a child process.
pub async fn counter_at(status_addr: &str, name: &str) -> f64 {
    let text = client()
        .get(format!("http://{status_addr}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    let name = name.replace('.', "_");
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(n, _)| *n == name || *n == format!("{name}_total"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The header's value as a string ("" when absent).
pub fn header(resp: &reqwest::Response, name: &str) -> String {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// An output's format and size as read by an independent reader: the `vipsheader` command (a
/// separate process, so none of the server's loader blocks apply).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub format: image_server::request::Format,
    pub width: u32,
    pub height: u32,
    pub bands: u32,
    pub interpretation: String,
}

fn with_file<T>(bytes: &[u8], f: impl FnOnce(&Path) -> T) -> T {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("img");
    std::fs::write(&path, bytes).expect("write");
    f(&path)
}

/// Reads an output's format, size, bands and colour space with `vipsheader`.
pub fn probe(bytes: &[u8]) -> Probe {
    use image_server::request::Format;
    let out = with_file(bytes, |p| {
        std::process::Command::new("vipsheader")
            .arg(p)
            .output()
            .expect("vipsheader is installed (make test installs libvips-tools)")
    });
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    // "PATH: 300x200 uchar, 3 bands, srgb, jpegload"
    let rest = text
        .split_once(": ")
        .map(|(_, r)| r.trim().to_owned())
        .unwrap_or_else(|| {
            panic!(
                "undecodable output: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let parts: Vec<&str> = rest.split(", ").collect();
    let (w, h) = parts[0]
        .split_whitespace()
        .next()
        .and_then(|d| d.split_once('x'))
        .expect("dimensions");
    let bands = parts[1].split_whitespace().next().expect("bands");
    let format = match parts[3] {
        "jpegload" => Format::Jpeg,
        "pngload" => Format::Png,
        "webpload" => Format::Webp,
        "heifload" => Format::Avif,
        "gifload" => Format::Gif,
        other => panic!("unexpected loader {other}"),
    };
    Probe {
        format,
        width: w.parse().expect("w"),
        height: h.parse().expect("h"),
        bands: bands.parse().expect("bands"),
        interpretation: parts[2].to_owned(),
    }
}

/// The pixel at (x, y) as read by the `vips getpoint` command (independent of the server process).
pub fn pixel(bytes: &[u8], x: u32, y: u32) -> Vec<f64> {
    let out = with_file(bytes, |p| {
        std::process::Command::new("vips")
            .arg("getpoint")
            .arg(p)
            .arg(x.to_string())
            .arg(y.to_string())
            .output()
            .expect("vips CLI")
    });
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(|v| v.parse().expect("number"))
        .collect()
}

/// Every metadata tag exiftool finds in `bytes`, as `Group:Tag` names (an independent reader).
pub fn exif_tags(bytes: &[u8]) -> Vec<String> {
    let out = with_file(bytes, |p| {
        std::process::Command::new("exiftool")
            .args(["-j", "-G", "-a", "-u"])
            .arg(p)
            .output()
            .expect("exiftool is installed (make test installs it)")
    });
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("exiftool json");
    v.get(0)
        .and_then(|o| o.as_object())
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

/// This process's resident set, in kB (Linux `/proc/self/status`).
pub fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Runs the ignored test `name` (`module::test`) in a process of its own and returns its output:
/// for tests that read process-wide counters, which other tests running in parallel would move.
/// Fails unless it passed.
pub fn run_isolated(name: &str) -> String {
    let exe = std::env::current_exe().expect("test binary");
    let out = std::process::Command::new(exe)
        .args([
            name,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .output()
        .expect("re-run the test binary");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "isolated run of {name} failed:\n{stdout}\n{stderr}"
    );
    stdout
}
