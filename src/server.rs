//! Step 1 of the request flow: accepting connections on the image port and the status port.
//!
//! [`run`] takes already-bound listeners and a shutdown future, so `main`, the integration tests and
//! the benches all start the same server (tests on port 0). HTTP/1 and HTTP/2 through hyper-util's
//! auto builder, a header-read timeout and a connection cap so slow clients cannot hold the box, and a
//! graceful stop: on shutdown `/ready` turns 503 at once, the image listener closes, in-flight requests
//! get `shutdown_grace` to finish, and queued result-store writes are flushed; the status port keeps
//! answering until then, so probes see the 503. A ticker re-sends the gauges every second.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::service::App;

/// Which of the two ports a connection arrived on.
#[derive(Clone, Copy)]
enum Port {
    Image,
    Status,
}

/// Connections the status port accepts at once (probes, scrapers, purge calls).
const STATUS_MAX_CONNECTIONS: usize = 64;

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

/// Serves both ports until `shutdown` resolves, then stops gracefully. Returns when every connection
/// has finished or `shutdown_grace` ran out, and the result-store writes were flushed.
pub async fn run(
    app: Arc<App>,
    listener: TcpListener,
    status_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let grace = app.config.shutdown_grace;
    let (stop_tx, stop_rx) = watch::channel(false);
    // The status port has its own stop signal, its own connection tracker and its own small
    // connection cap: it keeps answering through the drain (so probes read 503 from `/ready` instead
    // of a refused connection), and image traffic filling `max_connections` cannot starve probes.
    let (status_stop_tx, status_stop_rx) = watch::channel(false);
    let graceful = Arc::new(GracefulShutdown::new());
    let status_graceful = Arc::new(GracefulShutdown::new());
    let limit = Arc::new(Semaphore::new(app.config.max_connections.max(1)));

    let image = tokio::spawn(accept_loop(
        app.clone(),
        listener,
        Port::Image,
        stop_rx.clone(),
        graceful.clone(),
        limit.clone(),
    ));
    let status = status_listener.map(|l| {
        tokio::spawn(accept_loop(
            app.clone(),
            l,
            Port::Status,
            status_stop_rx.clone(),
            status_graceful.clone(),
            Arc::new(Semaphore::new(STATUS_MAX_CONNECTIONS)),
        ))
    });
    let gauges = tokio::spawn(publish_gauges(app.clone(), status_stop_rx.clone()));

    shutdown.await;
    tracing::info!("shutting down: refusing new work, finishing in-flight requests");
    app.shutting_down.store(true, Ordering::Release);
    let _ = stop_tx.send(true);
    let _ = image.await;
    let graceful = Arc::try_unwrap(graceful).unwrap_or_else(|_| GracefulShutdown::new());
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace ran out with connections still open");
    }
    if let Some(remote) = app.pipeline.remote() {
        if !remote.flush(Duration::from_secs(5)).await {
            tracing::warn!(
                pending = remote.pending(),
                "result store writes still pending at exit"
            );
        }
    }
    let _ = status_stop_tx.send(true);
    if let Some(s) = status {
        let _ = s.await;
    }
    let _ = gauges.await;
    let status_graceful =
        Arc::try_unwrap(status_graceful).unwrap_or_else(|_| GracefulShutdown::new());
    // Status answers are instant; a probe connection still open is closed after its current request.
    let _ = tokio::time::timeout(Duration::from_secs(1), status_graceful.shutdown()).await;
    tracing::info!("stopped");
    Ok(())
}

async fn accept_loop(
    app: Arc<App>,
    listener: TcpListener,
    port: Port,
    mut stop: watch::Receiver<bool>,
    graceful: Arc<GracefulShutdown>,
    limit: Arc<Semaphore>,
) {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(app.config.header_read_timeout)
        .max_headers(100)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256);
    loop {
        let permit = tokio::select! {
            _ = stop.changed() => break,
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, _peer) = tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let service = service_fn(move |req| {
            let app = app.clone();
            async move {
                let response = match port {
                    Port::Image => app.handle(req).await,
                    Port::Status => app.handle_status(req).await,
                };
                Ok::<_, std::convert::Infallible>(response)
            }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _permit = permit;
            let _ = conn.await;
        });
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
    let ip = app.config.listen_address;
    let listener = TcpListener::bind((ip, app.config.server_port)).await?;
    let status = TcpListener::bind((ip, app.config.status_port)).await?;
    let addr = listener.local_addr()?;
    let status_addr = status.local_addr()?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(run(app.clone(), listener, Some(status), async move {
        let _ = rx.await;
    }));
    Ok(Running {
        addr,
        status_addr,
        app,
        stop: Some(tx),
        task,
    })
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
