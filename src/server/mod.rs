//! Step 1 of the request flow: accepting connections on the image port and the status port.
//!
//! [`run`] takes already-bound listeners and a shutdown future, so `main`, the integration tests and
//! the benches all start the same server (tests on port 0). HTTP/1 and HTTP/2 through hyper-util's
//! auto builder; per connection the deadlines of [`connection`] (header read, keep-alive, send) and TCP
//! keep-alive; per port a connection budget where idle connections make room for new ones, so slow
//! or silent clients cannot hold the box or keep a health probe out; and a graceful stop: on shutdown `/ready` turns 503 at once, the image listener closes, in-flight requests
//! get `shutdown_grace` to finish, and queued result-store writes are flushed; the status port keeps
//! answering until then, so probes see the 503. A ticker re-sends the gauges every second.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::{Body as HttpBody, Frame, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::app::App;
use crate::config::Config;
use crate::metrics as m;
use crate::service::Body;

pub mod connection;
pub mod restart;
pub mod supervisor;

use self::connection::{Activity, Deadlines, Room, Verdict, Watched};

/// Which of the two ports a connection arrived on.
#[derive(Clone, Copy)]
enum Port {
    Image,
    Status,
}

/// Connections the status port holds at once (probes, scrapers, purge calls). At the budget the
/// longest-idle one is closed for a new one, so idle sockets never keep a probe out. Large enough
/// that a few hundred idle sockets are simply left to their header deadline (each eviction is a
/// close and, from an attacker, a reconnect: with 64 places and 200 attacking sockets the port
/// churned through ~1,200 connections a second), small enough to bound the descriptors it holds.
pub const STATUS_MAX_CONNECTIONS: usize = 512;

/// How often a full port looks again for an idle connection to close while it waits for a place.
const EVICTION_RETRY: Duration = Duration::from_millis(50);

/// File descriptors kept back from the open-files limit for everything but client connections:
/// the listeners, origin and store connections, log files, libvips' temporaries.
const RESERVED_FDS: u64 = 64;

/// The request head (HTTP/1 read buffer) and the HTTP/2 header list, in bytes: nginx's
/// `large_client_header_buffers` allows 4 × 8 KB; no image URL comes close.
const MAX_HEADER_BYTES: usize = 32 * 1024;

/// Headers per request (HTTP/1).
const MAX_HEADERS: usize = 100;

/// TCP keep-alive on accepted sockets: the kernel probes a silent peer after this long, so a client
/// that vanished (power loss, a dropped NAT entry) does not hold its connection forever.
const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const TCP_KEEPALIVE_RETRIES: u32 = 5;

/// How often the gauges are re-sent: statsd keeps a gauge's last value, so without a periodic set
/// a gauge would stay at whatever it was when the last render or download ended.
const GAUGE_INTERVAL: Duration = Duration::from_secs(1);

/// Publishes the gauges every [`GAUGE_INTERVAL`] until the server stops.
async fn publish_gauges(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(GAUGE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = tick.tick() => app.publish_gauges(),
        }
    }
}

/// Binds the image port and the status port from `config`, each with `listen_backlog` as its
/// accept queue (port 0 picks a free one). Must run inside the tokio runtime.
pub fn bind_ports(config: &Config) -> std::io::Result<(TcpListener, TcpListener)> {
    let l = &config.listen;
    let image = listen((l.listen_address, l.server_port).into(), l.listen_backlog)?;
    let status = listen((l.status_ip(), l.status_port).into(), l.listen_backlog)?;
    Ok((image, status))
}

/// A listening socket on `addr` with `SO_REUSEADDR` (a restarted server binds a port whose old
/// connections linger in TIME_WAIT), as `TcpListener::bind` does, but with the backlog given: the
/// default (128 through mio) drops the handshakes of a burst from a load balancer.
fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Raises the open-files soft limit to the hard limit and returns the `max_connections` that fits
/// in it, with the warning to log when that is less than configured. Each client connection is one
/// descriptor; the status port's budget, the outbound connections (`download_concurrency` and
/// `upload_concurrency`) and 64 more (listeners, files) come off the top.
pub fn fit_connections(config: &Config) -> (usize, Option<String>) {
    let limit = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        // No such limit on this platform: nothing to fit.
        Err(_) => return (config.listen.max_connections, None),
    };
    let outbound =
        (config.capacity.download_concurrency + config.caching.upload_concurrency) as u64;
    connections_within(config.listen.max_connections, outbound, limit)
}

/// [`fit_connections`] for a known open-files limit.
fn connections_within(
    max_connections: usize,
    extra_fds: u64,
    limit: u64,
) -> (usize, Option<String>) {
    let overhead = RESERVED_FDS + STATUS_MAX_CONNECTIONS as u64 + extra_fds;
    let room = usize::try_from(limit.saturating_sub(overhead))
        .unwrap_or(usize::MAX)
        .max(1);
    if max_connections <= room {
        return (max_connections, None);
    }
    let warning = format!(
        "max_connections lowered from {max_connections} to {room}: the open-files limit is {limit} \
         ({overhead} kept for the status port, origin and store connections); raise LimitNOFILE / ulimit -n"
    );
    (room, Some(warning))
}

/// Serves both ports until `shutdown` resolves, then stops gracefully. Returns when every connection
/// has finished or `shutdown_grace` ran out, and the result-store writes were flushed.
pub async fn run(
    app: Arc<App>,
    listener: TcpListener,
    status_listener: Option<TcpListener>,
    shutdown: impl Future<Output = Stop> + Send,
) -> std::io::Result<()> {
    let grace = app.config.timeouts.shutdown_grace;
    let (stop_tx, stop_rx) = watch::channel(false);
    // The image port's connections are told to stop separately: after a hand-over they keep
    // serving (each closes after its next answer) while the listener is already closed.
    let (conns_stop_tx, conns_stop_rx) = watch::channel(false);
    let (status_accept_tx, status_accept_rx) = watch::channel(false);
    // The status port has its own stop signal, its own connections and its own small budget: it
    // keeps answering through the drain (so probes read 503 from `/ready` instead of a refused
    // connection), and image traffic filling `max_connections` cannot starve probes.
    let (status_stop_tx, status_stop_rx) = watch::channel(false);
    let image_port = Arc::new(Slots::new(
        app.config.listen.max_connections,
        app.rooms.image.clone(),
    ));
    let status_port = Arc::new(Slots::new(STATUS_MAX_CONNECTIONS, app.rooms.status.clone()));

    let image = tokio::spawn(accept_loop(
        app.clone(),
        listener,
        Port::Image,
        (stop_rx.clone(), conns_stop_rx.clone()),
        image_port.clone(),
    ));
    let status = status_listener.map(|l| {
        tokio::spawn(accept_loop(
            app.clone(),
            l,
            Port::Status,
            (status_accept_rx.clone(), status_stop_rx.clone()),
            status_port.clone(),
        ))
    });
    let gauges = tokio::spawn(publish_gauges(app.clone(), status_stop_rx.clone()));

    match shutdown.await {
        Stop::Terminate => {
            tracing::info!("shutting down: refusing new work, finishing in-flight requests");
            app.shutting_down.store(true, Ordering::Release);
            let _ = conns_stop_tx.send(true);
        }
        Stop::Handover => {
            // The successor accepts on the same sockets now. Open connections keep being served,
            // each closed after its next answer (`Connection: close`), so no request fails.
            tracing::info!("handed over: closing connections as they finish their next request");
            app.handing_over.store(true, Ordering::Release);
            let _ = status_accept_tx.send(true);
        }
    }
    let _ = stop_tx.send(true);
    let _ = image.await;
    if tokio::time::timeout(grace, image_port.drained())
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace ran out with connections still open");
    }
    // Connections still idle after a hand-over are closed now.
    let _ = conns_stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(1), image_port.drained()).await;
    if let Some(remote) = app.pipeline.remote() {
        if !remote.flush(Duration::from_secs(5)).await {
            tracing::warn!(
                pending = remote.pending(),
                "result store writes still pending at exit"
            );
        }
    }
    let _ = status_accept_tx.send(true);
    let _ = status_stop_tx.send(true);
    if let Some(s) = status {
        let _ = s.await;
    }
    let _ = gauges.await;
    // Status answers are instant; a probe connection still open is closed after its current request.
    let _ = tokio::time::timeout(Duration::from_secs(1), status_port.drained()).await;
    tracing::info!("stopped");
    Ok(())
}

/// A port's connection budget: a permit per open connection, and the [`Room`] to evict from when
/// none is left.
struct Slots {
    permits: Arc<Semaphore>,
    capacity: u32,
    room: Arc<Room>,
}

impl Slots {
    fn new(capacity: usize, room: Arc<Room>) -> Slots {
        let capacity = u32::try_from(capacity.max(1)).unwrap_or(u32::MAX >> 4);
        Slots {
            permits: Arc::new(Semaphore::new(capacity as usize)),
            capacity,
            room,
        }
    }

    /// A place for a connection just accepted: at once when there is one; otherwise the longest-idle
    /// connection is told to close and its place taken when it has. With every connection busy this
    /// waits (and so does the accept loop), which is the port's back-pressure. `None` once stopping.
    async fn take(&self, stop: &mut watch::Receiver<bool>) -> Option<OwnedSemaphorePermit> {
        loop {
            if let Ok(p) = self.permits.clone().try_acquire_owned() {
                return Some(p);
            }
            self.room.evict_one();
            // Until a place frees; busy connections that turn idle meanwhile are evicted on the
            // next round.
            tokio::select! {
                _ = stop.changed() => return None,
                p = self.permits.clone().acquire_owned() => return p.ok(),
                _ = tokio::time::sleep(EVICTION_RETRY) => {}
            }
        }
    }

    /// Resolves when every connection has closed.
    async fn drained(&self) {
        let _ = self.permits.acquire_many(self.capacity).await;
    }
}

async fn accept_loop(
    app: Arc<App>,
    listener: TcpListener,
    port: Port,
    (mut stop, conns_stop): (watch::Receiver<bool>, watch::Receiver<bool>),
    slots: Arc<Slots>,
) {
    let config = &app.config;
    let deadlines = Deadlines {
        header_read: config.timeouts.header_read_timeout,
        keep_alive: config.timeouts.keep_alive_timeout,
        send: config.timeouts.send_timeout,
    };
    let mut builder = Builder::new(TokioExecutor::new());
    // hyper's own header timer is off: it also runs while a keep-alive connection waits for its next
    // request, so it would close idle connections at `header_read_timeout`. `connection` keeps both.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_headers(MAX_HEADERS)
        .max_buf_size(MAX_HEADER_BYTES.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(config.listen.http2_max_concurrent_streams)
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .keep_alive_interval(config.timeouts.send_timeout)
        .keep_alive_timeout(config.timeouts.send_timeout);
    let builder = Arc::new(builder);
    loop {
        if *stop.borrow() {
            break;
        }
        let (stream, _peer) = tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning, and free a descriptor held
                    // by an idle connection.
                    tracing::warn!(error = %e, "accept failed");
                    slots.room.evict_one();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // The place is taken once a connection is there, so a full port only closes an idle
        // connection for a client that actually arrived.
        let Some(permit) = slots.take(&mut stop).await else {
            break;
        };
        tune(&stream);
        let activity = Activity::new();
        let seat = slots.room.enter(activity.clone());
        tokio::spawn(serve_connection(
            app.clone(),
            builder.clone(),
            stream,
            port,
            activity,
            deadlines,
            conns_stop.clone(),
            (permit, seat),
        ));
    }
}

/// `TCP_NODELAY` (responses are written whole, waiting for more would only add latency) and TCP
/// keep-alive. Failures only cost those optimisations.
fn tune(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let keepalive = TcpKeepalive::new()
        .with_time(TCP_KEEPALIVE_IDLE)
        .with_interval(TCP_KEEPALIVE_INTERVAL);
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "macos"))]
    let keepalive = keepalive.with_retries(TCP_KEEPALIVE_RETRIES);
    let _ = SockRef::from(stream).set_tcp_keepalive(&keepalive);
}

/// One connection, from accept to close: hyper serves it; this task closes it when
/// [`Activity::verdict`] says so, and asks it to finish gracefully when the server stops.
#[allow(clippy::too_many_arguments)]
async fn serve_connection(
    app: Arc<App>,
    builder: Arc<Builder<TokioExecutor>>,
    stream: TcpStream,
    port: Port,
    activity: Arc<Activity>,
    deadlines: Deadlines,
    mut stop: watch::Receiver<bool>,
    held: (OwnedSemaphorePermit, connection::Seat),
) {
    let _held = held;
    let in_service = activity.clone();
    let service = service_fn(move |req| {
        let app = app.clone();
        in_service.begin();
        let done = Done(in_service.clone());
        async move {
            let response = match port {
                Port::Image => app.handle(req).await,
                Port::Status => app.handle_status(req).await,
            };
            Ok::<_, std::convert::Infallible>(response.map(|body| Tracked { body, _done: done }))
        }
    });
    let io = TokioIo::new(Watched::new(stream, activity.clone()));
    let conn = builder.serve_connection(io, service);
    let mut conn = std::pin::pin!(conn);
    let mut stopping = *stop.borrow();
    if stopping {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        let until = match activity.verdict(&deadlines) {
            Verdict::Close(reason) => {
                m::incr_with(m::CONNECTION_CLOSED, reason.as_str());
                // Dropping the connection closes the socket; a request in progress (only possible
                // for a stalled write) is abandoned with it.
                break;
            }
            Verdict::WaitUntil(at) => at,
        };
        tokio::select! {
            _ = conn.as_mut() => break,
            _ = tokio::time::sleep_until(until) => {}
            _ = activity.changed() => {}
            _ = stop.changed(), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Marks the request done when dropped: with the response body once hyper has sent it, or with the
/// service future if the connection goes away first.
struct Done(Arc<Activity>);

impl Drop for Done {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// A response body that carries its request's [`Done`] marker.
struct Tracked {
    body: Body,
    _done: Done,
}

impl HttpBody for Tracked {
    type Data = <Body as HttpBody>::Data;
    type Error = <Body as HttpBody>::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A server started in the background (tests, benches, `make run` smoke checks).
pub struct Running {
    /// The image port's address.
    pub addr: SocketAddr,
    /// The status port's address.
    pub status_addr: SocketAddr,
    /// The shared app (caches, counters).
    pub app: Arc<App>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    /// Asks the server to stop and waits for it.
    pub async fn stop(mut self) -> std::io::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        (&mut self.task)
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?
    }

    /// Asks the server to stop without waiting.
    pub fn signal_stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// Binds both ports from `app.config` (port 0 picks a free one) and serves in the background.
pub async fn start(app: App) -> std::io::Result<Running> {
    let app = Arc::new(app);
    let (listener, status) = bind_ports(&app.config)?;
    let addr = listener.local_addr()?;
    let status_addr = status.local_addr()?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(run(app.clone(), listener, Some(status), async move {
        let _ = rx.await;
        Stop::Terminate
    }));
    Ok(Running {
        addr,
        status_addr,
        app,
        stop: Some(tx),
        task,
    })
}

/// How [`run`] ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// A stop (SIGTERM, SIGINT): refuse new work with 503, finish what is in progress.
    Terminate,
    /// A successor accepts on the same sockets now ([`restart`]): stop accepting, serve each open
    /// connection's next request normally and close it after.
    Handover,
}

/// Resolves on SIGINT or SIGTERM (the server's graceful stop, and `warm`'s clean interruption).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_connections_is_lowered_to_what_the_open_files_limit_holds() {
        // Room to spare: kept as configured, no warning.
        assert_eq!(connections_within(10_000, 20, 1 << 20), (10_000, None));
        // A soft limit of 1024 descriptors, minus the status port's 512, 64 reserved and 20
        // outbound.
        let (fitted, warning) = connections_within(10_000, 20, 1024);
        assert_eq!(fitted, 1024 - 512 - 64 - 20);
        let warning = warning.expect("a warning");
        assert!(warning.contains("10000") && warning.contains("428") && warning.contains("1024"));
        // A limit below the overhead still leaves one connection, never zero.
        assert_eq!(connections_within(100, 20, 10).0, 1);
    }

    /// Opens `n` connections at once to a listener that accepts none; how many completed their
    /// handshake within `wait` (the kernel queues at most backlog + 1 and drops the SYNs of the
    /// rest, which retry after a second).
    async fn handshakes(listener: &TcpListener, n: usize, wait: Duration) -> usize {
        let addr = listener.local_addr().expect("addr");
        let tries = (0..n).map(|_| tokio::time::timeout(wait, TcpStream::connect(addr)));
        let done = futures::future::join_all(tries).await;
        done.into_iter().filter(|r| matches!(r, Ok(Ok(_)))).count()
    }

    #[tokio::test]
    async fn the_backlog_holds_a_burst_the_server_has_not_accepted_yet() {
        // A burst of 300 (a load balancer's cold start) against the default listen_backlog: every
        // handshake completes though nothing is accepted yet.
        let pairs = [
            ("source_domain", "http://origin.example"),
            ("listen_address", "127.0.0.1"),
            ("server_port", "0"),
            ("status_port", "0"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let config = crate::config::load_layers(&crate::config::FileSource::None, vec![], &pairs)
            .expect("config")
            .config;
        assert_eq!(config.listen.listen_backlog, 1024);
        let (image, status) = bind_ports(&config).expect("bind");
        assert_eq!(
            handshakes(&image, 300, Duration::from_millis(500)).await,
            300
        );
        assert_eq!(
            handshakes(&status, 300, Duration::from_millis(500)).await,
            300
        );
        // The check can fail: a short queue takes backlog + 1 and leaves the rest waiting.
        let short = listen("127.0.0.1:0".parse().expect("addr"), 8).expect("bind");
        assert_eq!(handshakes(&short, 40, Duration::from_millis(300)).await, 9);
    }
}
