//! Restart on SIGHUP: the successor takes over the listening sockets, so under steady load no
//! request fails and no connection is refused; a successor that cannot start leaves the old process
//! serving. Runs the real binary (each restart is a new process).

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
    let good = format!(
        "listen_address = \"127.0.0.1\"\nserver_port = {port}\nstatus_port = {sport}\n\
         source_domain = \"{}\"\nshutdown_grace = 5\n",
        origin.url()
    );
    std::fs::write(&config, &good).expect("config");
    let mut first = tokio::process::Command::new(env!("CARGO_BIN_EXE_image-server"))
        .arg("--config")
        .arg(&config)
        .arg("serve")
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("server starts");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut current = loop {
        if let Some(p) = pid(sport).await {
            break p;
        }
        assert!(Instant::now() < deadline, "the server never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(Some(current), first.id());
    let url = format!("http://127.0.0.1:{port}/product/image/1/w50.jpg");
    assert_eq!(
        client().get(&url).send().await.expect("warm-up").status(),
        200
    );

    // Steady load: 32 connections, each a keep-alive client asking again as soon as answered.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let slowest_us = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut load = Vec::new();
    for _ in 0..32 {
        let (stop, ok, failed, url) = (stop.clone(), ok.clone(), failed.clone(), url.clone());
        let slowest_us = slowest_us.clone();
        load.push(tokio::spawn(async move {
            let c = client();
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let answered = match c.get(&url).send().await {
                    Ok(r) => r.status() == 200 && r.bytes().await.is_ok(),
                    Err(_) => false,
                };
                let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                slowest_us.fetch_max(us, Ordering::Relaxed);
                if answered {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let mut pids = vec![current];
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(300)).await;
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
        "restarts: {} processes, {ok} answered, {failed} failed, slowest request {} ms",
        pids.len(),
        slowest_us.load(Ordering::Relaxed) / 1000
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
