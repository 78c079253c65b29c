//! The `image-server` binary: parse the command line, load the configuration, start telemetry and
//! libvips, bind, and hand over to the library (`server::run`). Nothing else lives here.

use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use image_server::app::App;
use image_server::cli::{CheckConfigArgs, Cli, Command};
use image_server::config::{self, Config, Loaded};
use image_server::image::vips;
use image_server::metrics::{self, StatsdTarget};
use image_server::server::{self, restart, supervisor};

fn main() -> ExitCode {
    restart::remember_executable();
    let cli = Cli::parse();
    let loaded = match config::load(&cli.global) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("image-server: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let command = cli.command.unwrap_or(Command::Serve);
    if let Command::CheckConfig(args) = command {
        return check_config(loaded, &args);
    }
    init_tracing(&loaded.config);
    // Once logging is up: what loading ignored, guessed or derived (seed files, a second file).
    for warning in &loaded.warnings {
        tracing::warn!("configuration: {warning}");
    }
    for note in &loaded.notes {
        tracing::info!("configuration: {note}");
    }
    let config = loaded.config;
    limit_malloc_arenas();
    // libvips is initialised once, before the runtime starts any thread (libvips' own requirement: `vips_init` is not thread-safe).
    if let Err(e) = vips::init(config.rendering.accept_avif_input) {
        eprintln!("image-server: libvips failed to start: {e}");
        return ExitCode::from(1);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(config.capacity.processing_concurrency + 64)
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("image-server: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async move {
        match command {
            Command::Serve | Command::CheckConfig(_) => serve(config).await,
            Command::Warm(args) => image_server::commands::warm(config, args).await,
            Command::Purge(args) => image_server::commands::purge(config, args).await,
            Command::Restart(args) => image_server::commands::restart(config, args).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("image-server: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// `check-config`: what start-up builds (source, result store, `?source=` guard), built and dropped
/// without binding a port or starting libvips; the connection budget checked against the open-files
/// limit; what loading ignored or derived, on stderr; `--print` adds every key's value in force and
/// where it came from.
fn check_config(loaded: Loaded, args: &CheckConfigArgs) -> ExitCode {
    for warning in &loaded.warnings {
        eprintln!("image-server: warning: {warning}");
    }
    for note in &loaded.notes {
        eprintln!("image-server: note: {note}");
    }
    let config = loaded.config.clone();
    if let (_, Some(warning)) = server::fit_connections(&config) {
        println!("warning: {warning}");
    }
    let settings = args.print.then(|| loaded.settings_json());
    // The result store starts its writers on a runtime, as at start-up.
    let built = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
        .and_then(|rt| {
            rt.block_on(async { App::new(config).map(drop).map_err(|e| e.to_string()) })
        });
    if let Err(e) = built {
        eprintln!("image-server: configuration error: {e}");
        return ExitCode::from(2);
    }
    if let Some(settings) = settings {
        println!("{settings}");
    }
    println!("configuration OK");
    ExitCode::SUCCESS
}

fn init_tracing(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.logging.log_level));
    // Colour codes only on a terminal: log files and collectors get plain `key=value` lines.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(ansi)
        .init();
}

async fn serve(mut config: Config) -> anyhow::Result<ExitCode> {
    metrics::install(config.statsd.statsd_host.as_ref().map(|host| StatsdTarget {
        host: host.clone(),
        port: config.statsd.statsd_port,
        prefix: config.statsd.statsd_prefix.clone(),
    }));
    let (max_connections, warning) = server::fit_connections(&config);
    if let Some(warning) = warning {
        tracing::warn!("{warning}");
    }
    config.listen.max_connections = max_connections;
    // A successor takes over its predecessor's sockets, a process started by a systemd socket
    // unit takes that unit's; a first start binds them.
    let inherited = match restart::inherited()? {
        Some(pair) => Some(pair),
        None => supervisor::activated()?,
    };
    let (listener, status) = match inherited {
        Some(pair) => pair,
        None => server::bind_ports(&config)?,
    };
    tracing::info!(
        image = %listener.local_addr()?,
        status = %status.local_addr()?,
        libvips = %vips::version(),
        "listening"
    );
    let pid_file = config.listen.pid_file.clone();
    let app = Arc::new(App::new(config)?);
    let fds = (listener.as_raw_fd(), status.as_raw_fd());
    restart::signal_ready();
    supervisor::ready(pid_file.as_deref());
    let stop = stop_or_restart(fds, pid_file.clone());
    let served = server::run(app, listener, Some(status), stop).await;
    supervisor::exiting(pid_file.as_deref());
    served?;
    Ok(ExitCode::SUCCESS)
}

/// Resolves with [`server::Stop::Terminate`] on SIGTERM or SIGINT, or with
/// [`server::Stop::Handover`] once a SIGHUP's successor is ready. A successor that fails leaves
/// this process serving: logged, counted as `restart.failed`, and its reason left beside the PID
/// file for `image-server restart`.
async fn stop_or_restart(
    (image, status): (RawFd, RawFd),
    pid_file: Option<PathBuf>,
) -> server::Stop {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        server::shutdown_signal().await;
        supervisor::stopping();
        return server::Stop::Terminate;
    };
    let stop = server::shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => {
                supervisor::stopping();
                return server::Stop::Terminate;
            }
            _ = hup.recv() => {
                supervisor::reloading();
                match restart::hand_over(image, status).await {
                    Ok(pid) => {
                        metrics::incr_with(metrics::RESTART, "ok");
                        tracing::info!(pid, "restart: the new process is serving");
                        return server::Stop::Handover;
                    }
                    Err(e) => {
                        metrics::incr_with(metrics::RESTART, "failed");
                        tracing::error!(error = %e, "restart failed; this process keeps serving");
                        supervisor::restart_failed(pid_file.as_deref(), &e.to_string());
                    }
                }
            }
        }
    }
}

/// Caps glibc's malloc arenas at the number of cores. By default glibc gives each thread that
/// allocates concurrently its own arena (up to 8 × cores), and every render runs on a different
/// blocking thread, so freed decode buffers stay resident in many half-empty arenas. Measured with
/// `BENCH_ONLY='^W1 fit$' BENCH_DURATION=10 scripts/bench.sh` on 2 cores: peak RSS 179–197 → 133 MB
/// at 32 connections and 105 → 73 MB at 8; CPU per render moved within this machine's run-to-run
/// noise (±10 %). `MALLOC_ARENA_MAX` in the environment still wins.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let arenas = libc::c_int::try_from(cores.max(2)).unwrap_or(2);
        // SAFETY: mallopt only adjusts a glibc tuning knob; it is called once, before the runtime
        // starts any other thread.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, arenas);
        }
    }
}
