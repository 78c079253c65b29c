//! Restart on SIGHUP: the successor takes over the listening sockets, so under steady load no
//! request fails and no connection is refused; a successor that cannot start leaves the old process
//! serving. Also what systemd sees: the readiness protocol (`READY=1`, `MAINPID`, `RELOADING=1`,
//! `STOPPING=1`) read from a notify socket this test binds in systemd's place (systemd is not the
//! init process here), `image-server restart` with the PID file, and sockets passed by
//! `systemd-socket-activate`, systemd's own socket-passing tool. Runs the real binary (each restart
//! is a new process).

use std::ffi::OsStr;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use image_server::image::fixtures;

use crate::support::{client, Origin};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

async fn status(sport: u16) -> Option<serde_json::Value> {
    let text = client()
        .get(format!("http://127.0.0.1:{sport}/"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    serde_json::from_str(&text).ok()
}

async fn pid(sport: u16) -> Option<u32> {
    status(sport)
        .await
        .and_then(|s| s["pid"].as_u64())
        .and_then(|p| u32::try_from(p).ok())
}

fn signal(pid: u32, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).expect("pid");
    // SAFETY: kill(2) on a server process this test started (or its successor).
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Starts the server binary on `config` with extra environment, its output discarded.
fn spawn(program: &OsStr, args: &[&OsStr], env: &[(&str, &OsStr)]) -> tokio::process::Child {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("server starts")
}

fn server_args(config: &Path) -> Vec<&OsStr> {
    vec![
        OsStr::new("--config"),
        config.as_os_str(),
        OsStr::new("serve"),
    ]
}

/// Waits until the status port answers, and returns the PID it names.
async fn first_pid(sport: u16) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(p) = pid(sport).await {
            return p;
        }
        assert!(Instant::now() < deadline, "the server never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn config_text(origin: &Origin, port: u16, sport: u16, extra: &str) -> String {
    format!(
        "listen_address = \"127.0.0.1\"\nserver_port = {port}\nstatus_port = {sport}\n\
         source_domain = \"{}\"\nshutdown_grace = 5\n{extra}",
        origin.url()
    )
}

/// Waits until the status port names a process other than `old`, and returns it.
async fn next_pid(sport: u16, old: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(p) = pid(sport).await {
            if p != old {
                return p;
            }
        }
        assert!(Instant::now() < deadline, "no new process after SIGHUP");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_restarts_without_a_failed_request_and_a_bad_successor_changes_nothing() {
    let origin = Origin::start().await;
    origin.put("product/image/1", fixtures::jpeg(400, 300, 85));
    let dir = tempfile::tempdir().expect("tmp");
    let config = dir.path().join("server.toml");
    let (port, sport) = (free_port(), free_port());
    std::fs::write(&config, config_text(&origin, port, sport, "")).expect("config");
    let bin = OsStr::new(env!("CARGO_BIN_EXE_image-server"));
    let mut first = spawn(bin, &server_args(&config), &[]);
    let mut current = first_pid(sport).await;
    assert_eq!(Some(current), first.id());
    let url = format!("http://127.0.0.1:{port}/product/image/1/w50.jpg");
    assert_eq!(
        client().get(&url).send().await.expect("warm-up").status(),
        200
    );

    // Steady load: 32 connections, each a keep-alive client asking again as soon as answered.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    // The slowest request that started once the restarts began (the first requests of the load
    // wait for the other tasks' clients to be built, which says nothing about restarts), and when
    // it started, in ms after `t0`, to place it against the SIGHUPs.
    let slowest_us = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let restarting = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let slowest_at = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut load = Vec::new();
    for _ in 0..32 {
        let (stop, ok, failed, url) = (stop.clone(), ok.clone(), failed.clone(), url.clone());
        let (slowest_us, slowest_at) = (slowest_us.clone(), slowest_at.clone());
        let restarting = restarting.clone();
        load.push(tokio::spawn(async move {
            let c = client();
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let timed = restarting.load(Ordering::Relaxed);
                let answered = match c.get(&url).send().await {
                    Ok(r) => r.status() == 200 && r.bytes().await.is_ok(),
                    Err(_) => false,
                };
                let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                if timed && slowest_us.fetch_max(us, Ordering::Relaxed) < us {
                    let at = started.duration_since(t0).as_millis();
                    slowest_at.store(u64::try_from(at).unwrap_or(0), Ordering::Relaxed);
                }
                if answered {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let mut pids = vec![current];
    let mut hups = Vec::new();
    tokio::time::sleep(Duration::from_millis(300)).await;
    restarting.store(true, Ordering::Relaxed);
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        hups.push(t0.elapsed().as_millis());
        signal(current, libc::SIGHUP);
        current = next_pid(sport, current).await;
        pids.push(current);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A successor with a broken configuration: the process in place keeps serving.
    std::fs::write(&config, "server_port = \"not a port\"\n").expect("break the config");
    signal(current, libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    let failed_restarts = loop {
        let metrics = client()
            .get(format!("http://127.0.0.1:{sport}/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        let n = metrics
            .lines()
            .find(|l| l.starts_with("restart_failed"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok());
        if let Some(n) = n {
            break n;
        }
        assert!(
            Instant::now() < deadline,
            "the failed restart was not counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(failed_restarts, 1.0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.expect("load task");
    }
    assert_eq!(pid(sport).await, Some(current), "still the same process");

    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!(
        "restarts: {} processes, {ok} answered, {failed} failed, slowest request during the \
         restarts {} ms, started at {} ms (SIGHUPs at {hups:?} ms)",
        pids.len(),
        slowest_us.load(Ordering::Relaxed) / 1000,
        slowest_at.load(Ordering::Relaxed),
    );
    assert_eq!(
        failed, 0,
        "{ok} answered, {failed} failed during 5 restarts"
    );
    assert!(ok > 100, "{ok}");
    let mut distinct = pids.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), 6, "a new process each time: {pids:?}");

    signal(current, libc::SIGTERM);
    let _ = first.wait().await;
}

/// Reads notify-socket datagrams until one contains `wanted`; returns it.
fn await_notice(sock: &UnixDatagram, wanted: &str) -> String {
    let mut buf = vec![0u8; 4096];
    let mut seen = Vec::new();
    loop {
        let n = match sock.recv(&mut buf) {
            Ok(n) => n,
            Err(e) => panic!("no {wanted:?} on the notify socket ({e}); got {seen:?}"),
        };
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        if msg.lines().any(|l| l == wanted) {
            return msg;
        }
        seen.push(msg);
    }
}

fn main_pid(notice: &str) -> u32 {
    notice
        .lines()
        .find_map(|l| l.strip_prefix("MAINPID="))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no MAINPID in {notice:?}"))
}

async fn restart_command(config: &Path) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_image-server"))
        .arg("--config")
        .arg(config)
        .arg("restart")
        .env_remove("RUST_LOG")
        .output()
        .await
        .expect("restart command runs")
}

/// systemd's side of a restart: every state a `Type=notify` unit relies on arrives on the notify
/// socket, `image-server restart` waits for the successor and says so, a broken configuration is
/// refused before anything is signalled, a successor that fails leaves its reason beside the PID
/// file, and a stop says `STOPPING=1` and removes the PID file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_notify_protocol_and_the_restart_command() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().expect("tmp");
    let notify_path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&notify_path).expect("notify socket");
    sock.set_read_timeout(Some(Duration::from_secs(40)))
        .expect("timeout");
    let pid_file = dir.path().join("image-server.pid");
    let config = dir.path().join("server.toml");
    let (port, sport) = (free_port(), free_port());
    let good = config_text(
        &origin,
        port,
        sport,
        &format!("pid_file = \"{}\"\n", pid_file.display()),
    );
    std::fs::write(&config, &good).expect("config");
    let bin = OsStr::new(env!("CARGO_BIN_EXE_image-server"));
    let mut child = spawn(
        bin,
        &server_args(&config),
        &[("NOTIFY_SOCKET", notify_path.as_os_str())],
    );
    let started = await_notice(&sock, "READY=1");
    let first = child.id().expect("running");
    assert_eq!(main_pid(&started), first, "{started:?}");
    assert_eq!(read_pid(&pid_file), first);

    // `image-server restart` (what ExecReload runs): the successor reports itself as main.
    let out = restart_command(&config).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    await_notice(&sock, "RELOADING=1");
    let ready = await_notice(&sock, "READY=1");
    let second = main_pid(&ready);
    assert_ne!(second, first, "{ready:?}");
    assert!(
        stdout.contains(&format!("process {second} serves")),
        "{stdout}"
    );
    assert_eq!(read_pid(&pid_file), second);
    assert_eq!(next_pid(sport, first).await, second);

    // A broken configuration: refused by the command, nothing signalled.
    std::fs::write(&config, "server_port = \"not a port\"\n").expect("break the config");
    let out = restart_command(&config).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("configuration error"),
        "{out:?}"
    );
    // The same through a bare SIGHUP: the successor fails, the server stays and says why.
    signal(second, libc::SIGHUP);
    await_notice(&sock, "RELOADING=1");
    let back = await_notice(&sock, "READY=1");
    assert!(back.contains("STATUS=restart failed"), "{back:?}");
    let note = std::fs::read_to_string(dir.path().join("image-server.pid.failed"))
        .expect("the failure is left beside the PID file");
    assert!(note.contains("exited before it was ready"), "{note}");
    assert_eq!(pid(sport).await, Some(second));
    assert_eq!(read_pid(&pid_file), second);

    signal(second, libc::SIGTERM);
    await_notice(&sock, "STOPPING=1");
    let deadline = Instant::now() + Duration::from_secs(20);
    while pid_file.exists() {
        assert!(
            Instant::now() < deadline,
            "the PID file outlived the server"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.wait().await;
}

fn read_pid(path: &Path) -> u32 {
    std::fs::read_to_string(path)
        .expect("PID file")
        .trim()
        .parse()
        .expect("a PID")
}

/// Sockets passed by systemd (here by `systemd-socket-activate`, which passes them the same way a
/// socket unit does): the server serves on them instead of binding its configured ports, picks
/// them by name whatever their order, and hands them on to a restart's successor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_on_sockets_passed_by_systemd_and_restarts_on_them() {
    let origin = Origin::start().await;
    origin.put("product/image/1", fixtures::jpeg(400, 300, 85));
    let dir = tempfile::tempdir().expect("tmp");
    let config = dir.path().join("server.toml");
    // The configured ports are never bound: the passed sockets are used instead.
    let (unused, unused_status) = (free_port(), free_port());
    std::fs::write(&config, config_text(&origin, unused, unused_status, "")).expect("config");
    let (port, sport) = (free_port(), free_port());
    let activate = [
        "/usr/bin/systemd-socket-activate",
        "systemd-socket-activate",
    ]
    .into_iter()
    .find(|p| !p.starts_with('/') || Path::new(p).exists())
    .expect("systemd-socket-activate (make test installs systemd's tools)");
    let status_at = format!("127.0.0.1:{sport}");
    let image_at = format!("127.0.0.1:{port}");
    let mut args: Vec<&OsStr> = vec![
        OsStr::new("-l"),
        OsStr::new(&status_at),
        OsStr::new("-l"),
        OsStr::new(&image_at),
        OsStr::new("--fdname=status:image"),
        OsStr::new(env!("CARGO_BIN_EXE_image-server")),
    ];
    args.extend(server_args(&config));
    let mut child = spawn(OsStr::new(activate), &args, &[]);
    // It starts the server on the first connection, which waits in the socket's queue meanwhile.
    let first = first_pid(sport).await;
    let url = format!("http://127.0.0.1:{port}/product/image/1/w50.jpg");
    assert_eq!(
        client().get(&url).send().await.expect("image").status(),
        200
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", unused)).is_err(),
        "the configured port must not be bound"
    );

    signal(first, libc::SIGHUP);
    let second = next_pid(sport, first).await;
    assert_ne!(second, first);
    assert_eq!(
        client().get(&url).send().await.expect("image").status(),
        200
    );
    signal(second, libc::SIGTERM);
    let _ = child.wait().await;
}

/// What a package upgrade does: a new binary is renamed over the running one's path, then the
/// server is restarted; the successor runs the new file (the old one is by then "deleted").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_successor_runs_the_binary_now_at_the_path() {
    use std::os::unix::fs::MetadataExt;

    let origin = Origin::start().await;
    let dir = tempfile::tempdir().expect("tmp");
    let bin = dir.path().join("image-server");
    std::fs::copy(env!("CARGO_BIN_EXE_image-server"), &bin).expect("copy the binary");
    let config = dir.path().join("server.toml");
    let (port, sport) = (free_port(), free_port());
    std::fs::write(&config, config_text(&origin, port, sport, "")).expect("config");
    let mut child = spawn(bin.as_os_str(), &server_args(&config), &[]);
    let first = first_pid(sport).await;

    // The upgrade: a new file written beside it and renamed over the path.
    let staged = dir.path().join("image-server.new");
    std::fs::copy(env!("CARGO_BIN_EXE_image-server"), &staged).expect("stage");
    std::fs::rename(&staged, &bin).expect("replace");
    let running = std::fs::read_link(format!("/proc/{first}/exe")).expect("exe link");
    assert!(
        running.to_string_lossy().ends_with("(deleted)"),
        "{running:?}"
    );

    signal(first, libc::SIGHUP);
    let second = next_pid(sport, first).await;
    let exe = std::fs::metadata(format!("/proc/{second}/exe")).expect("successor's binary");
    let now = std::fs::metadata(&bin).expect("the new binary");
    assert_eq!(
        (exe.dev(), exe.ino()),
        (now.dev(), now.ino()),
        "the successor runs the file now at the path"
    );
    signal(second, libc::SIGTERM);
    let _ = child.wait().await;
}
