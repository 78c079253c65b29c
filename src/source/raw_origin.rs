//! For tests only (unit tests, and the integration tests through the `test-support` feature): a
//! raw-TCP loopback origin for the behaviours a well-behaved HTTP server cannot produce (a body
//! shorter than its `Content-Length`, one byte a second, an endless body, silence, a closed socket),
//! and for counting connections rather than requests: the `?source=` tests prove an address was
//! never dialled by watching its accept count. Binds only to 127.0.0.x.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Makes a whole response from a request head (lower-cased).
pub type Router = Arc<dyn Fn(&str) -> Vec<u8> + Send + Sync>;

/// What the origin does with each connection.
#[derive(Clone)]
pub enum Behaviour {
    /// Reads the request head, writes these bytes (a whole response, or a lying one), closes.
    Reply(Vec<u8>),
    /// Reads the request head, writes what the function makes of it (the head, lower-cased), closes.
    Route(Router),
    /// Reads the request head, writes `head`, then one body byte every `every`, `count` times.
    Trickle {
        /// The response head (and any first body bytes).
        head: Vec<u8>,
        /// How many more body bytes.
        count: usize,
        /// The pause before each.
        every: Duration,
    },
    /// Reads the request head, writes a 200 head without a length, then body bytes as fast as it
    /// can, forever.
    Endless,
    /// Reads the request head and never answers (holds the socket open for a minute).
    Silent,
    /// Accepts and closes at once, before reading anything.
    Close,
}

/// A raw loopback origin.
#[derive(Clone)]
pub struct RawOrigin {
    /// Where it listens.
    pub addr: std::net::SocketAddr,
    accepts: Arc<AtomicUsize>,
    heads: Arc<Mutex<Vec<String>>>,
}

impl RawOrigin {
    /// Starts on `ip:0` (`ip` must be a 127.0.0.x address).
    pub async fn start(ip: &str, behaviour: Behaviour) -> RawOrigin {
        assert!(ip.starts_with("127."), "loopback only");
        let listener = TcpListener::bind((ip, 0)).await.expect("bind raw origin");
        let origin = RawOrigin {
            addr: listener.local_addr().expect("addr"),
            accepts: Arc::default(),
            heads: Arc::default(),
        };
        let o = origin.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                o.accepts.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(sock, behaviour.clone(), o.heads.clone()));
            }
        });
        origin
    }

    /// Connections accepted so far.
    pub fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }

    /// Request heads received, lower-cased.
    pub fn heads(&self) -> Vec<String> {
        self.heads.lock().map(|h| h.clone()).unwrap_or_default()
    }

    /// `http://{addr}`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

async fn serve(mut sock: TcpStream, behaviour: Behaviour, heads: Arc<Mutex<Vec<String>>>) {
    if let Behaviour::Close = behaviour {
        return;
    }
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match sock.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    if let Ok(mut seen) = heads.lock() {
        seen.push(head.clone());
    }
    match behaviour {
        Behaviour::Reply(bytes) => {
            let _ = sock.write_all(&bytes).await;
            let _ = sock.shutdown().await;
        }
        Behaviour::Route(route) => {
            let _ = sock.write_all(&route(&head)).await;
            let _ = sock.shutdown().await;
        }
        Behaviour::Endless => {
            let _ = sock.write_all(&response("200 OK", "", b"")).await;
            let block = [7u8; 16 * 1024];
            while sock.write_all(&block).await.is_ok() {}
        }
        Behaviour::Trickle { head, count, every } => {
            let _ = sock.write_all(&head).await;
            for _ in 0..count {
                tokio::time::sleep(every).await;
                if sock.write_all(b"x").await.is_err() {
                    return;
                }
            }
        }
        Behaviour::Silent => tokio::time::sleep(Duration::from_secs(60)).await,
        Behaviour::Close => {}
    }
}

/// An HTTP/1.1 response: status line, `connection: close`, extra header lines (each ending in
/// `\r\n`), blank line, body.
pub fn response(status: &str, headers: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status}\r\nconnection: close\r\n{headers}\r\n").into_bytes();
    out.extend_from_slice(body);
    out
}

/// A 200 with an honest `Content-Length` and `Content-Type: image/jpeg`.
pub fn ok_jpeg(body: &[u8]) -> Vec<u8> {
    response(
        "200 OK",
        &format!(
            "content-type: image/jpeg\r\ncontent-length: {}\r\n",
            body.len()
        ),
        body,
    )
}
