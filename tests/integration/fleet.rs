//! A fleet as deploy/fleet/ documents it, started by `scripts/fleet.sh up 3`: SeaweedFS as the shared
//! result store, three instances of the real binary (child processes), and nginx hashing each path
//! to one instance, all on loopback, originals from a test origin. Through nginx: 300 concurrent
//! requests for one cold variant cost one origin fetch and one render in the whole fleet; a failing
//! origin is asked once, not once per instance; `kill -9` of an instance under steady load fails no
//! request, and only its keys move, each to one survivor; restarted with an empty memory, it answers
//! `X-Cache: remote` for what the others rendered, directly and for its own keys through nginx.
//! One test in phases, since starting the fleet is the expensive part; `down` runs at the end, and
//! also when a phase panics.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use image_server::image::fixtures;

use crate::support::{client, counter_at, header, Origin, Reply};

/// The fleet in a temporary state directory; stopped with `down` when dropped.
struct Fleet {
    dir: tempfile::TempDir,
    source: String,
    env: HashMap<String, String>,
}

impl Fleet {
    /// `scripts/fleet.sh up N` with the debug binary and `origin` as the source of originals.
    fn up(n: usize, origin: &Origin) -> Fleet {
        let mut fleet = Fleet {
            dir: tempfile::tempdir().expect("tmp"),
            source: origin.url(),
            env: HashMap::new(),
        };
        let out = fleet.run(&["up", &n.to_string()]);
        println!("{out}");
        fleet
    }

    /// Runs the script (blocking this worker thread only) and reloads fleet.env; panics with the
    /// script's output when it fails.
    fn run(&mut self, args: &[&str]) -> String {
        let out = tokio::task::block_in_place(|| self.command(args));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "scripts/fleet.sh {args:?} failed:\n{text}"
        );
        let env = std::fs::read_to_string(self.dir.path().join("fleet.env")).unwrap_or_default();
        self.env = env
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
            .collect();
        text
    }

    fn command(&self, args: &[&str]) -> std::process::Output {
        Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/fleet.sh"))
            .args(args)
            .env("FLEET_DIR", self.dir.path())
            .env("FLEET_BIN", env!("CARGO_BIN_EXE_image-server"))
            .env("FLEET_SOURCE_DOMAIN", &self.source)
            .env_remove("FLEET_PORT")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .output()
            .expect("run scripts/fleet.sh")
    }

    fn value(&self, key: &str) -> u32 {
        self.env
            .get(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{key} in fleet.env: {:?}", self.env))
    }

    fn nginx(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.value("FLEET_NGINX_PORT"))
    }

    /// Instance K's image address, as nginx names it in `X-Upstream`.
    fn addr(&self, k: usize) -> String {
        format!(
            "127.0.0.1:{}",
            self.value(&format!("FLEET_INSTANCE_{k}_PORT"))
        )
    }

    fn status_addr(&self, k: usize) -> String {
        format!(
            "127.0.0.1:{}",
            self.value(&format!("FLEET_INSTANCE_{k}_STATUS_PORT"))
        )
    }

    fn pid(&self, k: usize) -> u32 {
        self.value(&format!("FLEET_INSTANCE_{k}_PID"))
    }

    /// Which instance an address is.
    fn which(&self, addr: &str) -> usize {
        (1..=3)
            .find(|k| self.addr(*k) == addr)
            .unwrap_or_else(|| panic!("{addr} is no instance of the fleet"))
    }

    /// A counter summed over the instances given.
    async fn sum(&self, instances: &[usize], name: &str) -> f64 {
        let mut total = 0.0;
        for k in instances {
            total += counter_at(&self.status_addr(*k), name).await;
        }
        total
    }

    /// Waits until the instances have no result-store write queued (status page
    /// `cache.remote.pending_writes`), so what they rendered is in the store.
    async fn flushed(&self, instances: &[usize]) {
        let deadline = Instant::now() + Duration::from_secs(20);
        for k in instances {
            loop {
                let text = client()
                    .get(format!("http://{}/", self.status_addr(*k)))
                    .send()
                    .await
                    .expect("status page")
                    .text()
                    .await
                    .expect("status page text");
                let status: serde_json::Value = serde_json::from_str(&text).expect("status JSON");
                if status["cache"]["remote"]["pending_writes"].as_u64() == Some(0) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "instance {k} still has result-store writes queued"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// The last lines of every log the fleet wrote (instances, SeaweedFS, nginx's error log and
    /// the non-200 lines of its access log), for a failed phase.
    fn print_logs(&self) {
        let logs = self.dir.path().join("logs");
        let nginx = self.dir.path().join("nginx");
        let mut files: Vec<_> = std::fs::read_dir(&logs)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        files.push(nginx.join("error.log"));
        for path in files {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!("--- {}:\n{}", path.display(), tail.join("\n"));
        }
        let access = std::fs::read_to_string(nginx.join("access.log")).unwrap_or_default();
        let failed: Vec<&str> = access
            .lines()
            .filter(|l| !l.contains("upstream_status=200 "))
            .collect();
        eprintln!(
            "--- nginx access log, other than one upstream answering 200 ({}):\n{}",
            failed.len(),
            failed[..failed.len().min(40)].join("\n")
        );
    }

    /// Every PID the fleet recorded (SeaweedFS, nginx, instances).
    fn pids(&self) -> Vec<(String, u32)> {
        self.env
            .iter()
            .filter(|(k, _)| k.ends_with("_PID"))
            .filter_map(|(k, v)| Some((k.clone(), v.parse().ok()?)))
            .collect()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_logs();
        }
        let out = self.command(&["down"]);
        if !out.status.success() {
            eprintln!(
                "scripts/fleet.sh down failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// Alive and not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(") ")
                .is_some_and(|(_, rest)| !rest.starts_with('Z'))
        })
        .unwrap_or(false)
}

/// The instance that answered: the last address of `X-Upstream` (nginx lists the failed ones first).
fn answered_by(resp: &reqwest::Response) -> String {
    header(resp, "x-upstream")
        .rsplit(", ")
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// One request of the steady load.
struct Outcome {
    variant: usize,
    after_kill: bool,
    by: String,
    failure: Option<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_renders_once_survives_a_killed_instance_and_a_restart_reads_the_store() {
    let origin = Origin::start().await;
    let mut fleet = Fleet::up(3, &origin);
    let all = [1, 2, 3];

    // Phase 1: 300 concurrent requests for one cold variant. The origin holds each answer 300 ms,
    // so they all arrive while the first is still loading.
    origin.put("product/image/1", fixtures::jpeg(1600, 1200, 85));
    origin.set_delay(Duration::from_millis(300));
    let c = client();
    let url = fleet.nginx("/product/image/1/300x200.jpg");
    let mut tasks = Vec::new();
    for _ in 0..300 {
        let (c, url) = (c.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let resp = c.get(&url).send().await.expect("through nginx");
            let (status, by) = (resp.status().as_u16(), answered_by(&resp));
            let upstream = header(&resp, "x-upstream");
            (status, by, upstream, resp.bytes().await.expect("body"))
        }));
    }
    let mut bodies: BTreeSet<Bytes> = BTreeSet::new();
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    let mut by: BTreeSet<String> = BTreeSet::new();
    let mut others = Vec::new();
    for t in tasks {
        let (status, addr, upstream, body) = t.await.expect("task");
        *statuses.entry(status).or_default() += 1;
        by.insert(addr);
        if status != 200 || upstream.contains(',') {
            others.push(format!(
                "{status} via [{upstream}]: {:?}",
                &body[..body.len().min(60)]
            ));
        }
        bodies.insert(body);
    }
    origin.set_delay(Duration::ZERO);
    let (renders, downloads) = (
        fleet.sum(&all, "image_request").await,
        fleet.sum(&all, "original_downloaded").await,
    );
    println!(
        "phase 1: 300 concurrent requests: statuses {statuses:?}, distinct bodies {}, answered by {by:?}; \
         origin fetches {}, fleet-wide renders (image_request) {renders}, original_downloaded {downloads}, coalesced {}",
        bodies.len(),
        origin.hits("product/image/1"),
        fleet.sum(&all, "coalesced").await,
    );
    assert_eq!(
        statuses.get(&200),
        Some(&300),
        "every request answered 200: {statuses:?}, others {others:?}"
    );
    assert_eq!(bodies.len(), 1, "identical bytes for all 300");
    assert_eq!(by.len(), 1, "one path, one instance: {by:?}, {others:?}");
    assert_eq!(origin.hits("product/image/1"), 1, "one origin fetch");
    assert_eq!(renders, 1.0, "one render in the whole fleet");
    assert_eq!(downloads, 1.0, "one download in the whole fleet");

    // A failing origin (500, so the instance answers 502) is asked by one instance only: nginx does
    // not retry a 502 on the others, nor take healthy instances out for it.
    origin.script("product/image/2", Reply::Status(500));
    let resp = c
        .get(fleet.nginx("/product/image/2/w100.jpg"))
        .send()
        .await
        .expect("through nginx");
    let tried = header(&resp, "x-upstream");
    println!(
        "failing origin: {} via {tried}, origin asked {} time(s)",
        resp.status(),
        origin.hits("product/image/2")
    );
    assert_eq!(resp.status(), 502);
    assert!(!tried.contains(','), "no retry of a 502: {tried}");

    // Phase 2: 60 variants (12 originals × 5 versions), each first requested once to learn which
    // instance the hash gives it.
    for id in 10..22 {
        origin.put(&format!("product/image/{id}"), fixtures::jpeg(480, 360, 85));
    }
    let variants: Arc<Vec<String>> = Arc::new(
        (10..22)
            .flat_map(|id| {
                ["w40", "w64", "x50", "80x60", "h70"]
                    .map(|v| format!("/product/image/{id}/{v}.jpg"))
            })
            .collect(),
    );
    let mut owner: Vec<usize> = Vec::new();
    for chunk in variants.chunks(8) {
        let mut tasks = Vec::new();
        for path in chunk {
            let (c, url) = (c.clone(), fleet.nginx(path));
            tasks.push(tokio::spawn(async move {
                let resp = c.get(&url).send().await.expect("warm-up");
                (resp.status(), answered_by(&resp))
            }));
        }
        for t in tasks {
            let (status, addr) = t.await.expect("task");
            assert_eq!(status, 200, "warm-up");
            owner.push(fleet.which(&addr));
        }
    }
    let victim = (1..=3)
        .max_by_key(|k| owner.iter().filter(|o| *o == k).count())
        .expect("three instances");
    let survivors: Vec<usize> = all.into_iter().filter(|k| *k != victim).collect();
    let owned = |k: usize| owner.iter().filter(|o| **o == k).count();
    println!(
        "phase 2: keys per instance: 1: {}, 2: {}, 3: {}; killing instance {victim}",
        owned(1),
        owned(2),
        owned(3)
    );

    // Steady load: 16 clients, each looping over every variant from its own starting point.
    let stop = Arc::new(AtomicBool::new(false));
    let killed = Arc::new(AtomicBool::new(false));
    let outcomes: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let base = fleet.nginx("");
    let mut load = Vec::new();
    for client_no in 0..16 {
        let (stop, killed, outcomes) = (stop.clone(), killed.clone(), outcomes.clone());
        let (variants, base) = (variants.clone(), base.clone());
        load.push(tokio::spawn(async move {
            let c = client();
            let mut i = client_no * 7;
            while !stop.load(Ordering::SeqCst) {
                let variant = i % variants.len();
                i += 1;
                let after_kill = killed.load(Ordering::SeqCst);
                let (by, failure) = match c.get(format!("{base}{}", variants[variant])).send().await
                {
                    Err(e) => (String::new(), Some(format!("request: {e}"))),
                    Ok(resp) => {
                        let (status, by) = (resp.status(), answered_by(&resp));
                        match resp.bytes().await {
                            Ok(b) if status == 200 && !b.is_empty() => (by, None),
                            Ok(b) => (by, Some(format!("{status}, {} bytes", b.len()))),
                            Err(e) => (by, Some(format!("{status}, body: {e}"))),
                        }
                    }
                };
                outcomes.lock().expect("lock").push(Outcome {
                    variant,
                    after_kill,
                    by,
                    failure,
                });
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (victim_pid, victim_addr) = (fleet.pid(victim), fleet.addr(victim));
    assert!(alive(victim_pid), "instance {victim} (PID {victim_pid})");
    // SAFETY: kill(2) on the instance the script started for this test (its PID from fleet.env,
    // checked alive just before).
    unsafe {
        libc::kill(
            libc::pid_t::try_from(victim_pid).expect("pid"),
            libc::SIGKILL,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(&victim_addr).is_ok() {
        assert!(
            Instant::now() < deadline,
            "the killed instance still accepts"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    killed.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    stop.store(true, Ordering::SeqCst);
    for t in load {
        t.await.expect("load task");
    }

    let outcomes = std::mem::take(&mut *outcomes.lock().expect("lock"));
    let failures: Vec<&String> = outcomes.iter().filter_map(|o| o.failure.as_ref()).collect();
    let after = outcomes.iter().filter(|o| o.after_kill).count();
    // Where each variant went after the kill.
    let mut moved: BTreeMap<usize, BTreeSet<usize>> = BTreeMap::new();
    let mut stayed_elsewhere = Vec::new();
    let mut served_by: BTreeMap<usize, usize> = BTreeMap::new();
    for o in outcomes.iter().filter(|o| o.failure.is_none()) {
        let by = fleet.which(&o.by);
        if o.after_kill {
            *served_by.entry(by).or_default() += 1;
        }
        if owner[o.variant] == victim {
            if o.after_kill {
                moved.entry(o.variant).or_default().insert(by);
            }
        } else if by != owner[o.variant] {
            stayed_elsewhere.push((o.variant, by));
        }
    }
    let mut moved_to: BTreeMap<usize, usize> = BTreeMap::new();
    for to in moved.values().flatten() {
        *moved_to.entry(*to).or_default() += 1;
    }
    println!(
        "phase 2: {} requests through nginx under kill -9 of instance {victim}, {} failed \
         ({after} started after the kill); after the kill answered by {served_by:?} (instance: \
         requests); the victim's {} keys moved to {moved_to:?} (instance: keys)",
        outcomes.len(),
        failures.len(),
        owned(victim),
    );
    assert!(
        failures.is_empty(),
        "{} of {} requests failed, e.g. {:?}",
        failures.len(),
        outcomes.len(),
        failures.iter().take(5).collect::<Vec<_>>()
    );
    assert!(
        after > 0 && owned(victim) > 0,
        "load ran after the kill on the victim's keys"
    );
    assert!(
        !served_by.contains_key(&victim),
        "nothing answered by the dead instance after the kill"
    );
    assert!(
        stayed_elsewhere.is_empty(),
        "the survivors' keys stayed where they were: {stayed_elsewhere:?}"
    );
    for (i, o) in owner.iter().enumerate() {
        if *o == victim {
            let to = moved.get(&i).cloned().unwrap_or_default();
            assert_eq!(
                to.len(),
                1,
                "{} moved to exactly one survivor: {to:?}",
                variants[i]
            );
        }
    }

    // Phase 3: the killed instance restarted (empty memory). What the survivors rendered comes from
    // the store, asked of it directly; its own keys come back to it through nginx, also from the
    // store (it wrote them before it died, or the survivor that took them over did).
    fleet.flushed(&survivors).await;
    let out = fleet.run(&["start-instance", &victim.to_string()]);
    println!("{out}");
    assert_ne!(fleet.pid(victim), victim_pid, "a new process");
    let direct = format!("http://{}", fleet.addr(victim));
    let mut direct_cache: BTreeMap<String, usize> = BTreeMap::new();
    for (i, path) in variants.iter().enumerate() {
        if owner[i] != victim {
            let resp = c
                .get(format!("{direct}{path}"))
                .send()
                .await
                .expect("direct");
            assert_eq!(resp.status(), 200);
            *direct_cache.entry(header(&resp, "x-cache")).or_default() += 1;
        }
    }
    // nginx tries the instance again once fail_timeout has passed since its last failure.
    let own: Vec<&String> = variants
        .iter()
        .enumerate()
        .filter(|(i, _)| owner[*i] == victim)
        .map(|(_, p)| p)
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut polls = 0;
    let first = loop {
        let resp = c.get(fleet.nginx(own[0])).send().await.expect("nginx");
        polls += 1;
        assert_eq!(resp.status(), 200);
        if answered_by(&resp) == fleet.addr(victim) {
            break header(&resp, "x-cache");
        }
        assert!(
            Instant::now() < deadline,
            "nginx never sent instance {victim}'s keys back to it"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut via_nginx: BTreeMap<String, usize> = BTreeMap::from([(first, 1)]);
    let mut elsewhere = 0;
    for path in &own[1..] {
        let resp = c.get(fleet.nginx(path)).send().await.expect("nginx");
        assert_eq!(resp.status(), 200);
        if answered_by(&resp) == fleet.addr(victim) {
            *via_nginx.entry(header(&resp, "x-cache")).or_default() += 1;
        } else {
            elsewhere += 1;
        }
    }
    println!(
        "phase 3: restarted instance {victim}: X-Cache of the survivors' {} keys asked directly: \
         {direct_cache:?}; its own {} keys through nginx (after {polls} request(s) until nginx \
         used it again): {via_nginx:?}, {elsewhere} answered elsewhere",
        variants.len() - own.len(),
        own.len(),
    );
    assert_eq!(
        direct_cache.keys().collect::<Vec<_>>(),
        ["remote"],
        "the restarted instance reads what the others rendered from the store"
    );
    assert_eq!(elsewhere, 0, "its keys came back to it");
    assert_eq!(
        via_nginx.keys().collect::<Vec<_>>(),
        ["remote"],
        "its own keys come from the store, not a new render"
    );

    // `down` stops every process the fleet started.
    let pids = fleet.pids();
    let out = fleet.run(&["down"]);
    println!("{out}");
    let left: Vec<_> = pids.iter().filter(|(_, p)| alive(*p)).collect();
    assert!(left.is_empty(), "still running after down: {left:?}");
}
