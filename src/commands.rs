//! Operator commands beside the request path (docs/operations.md): `warm` renders versions of many ids into the
//! result store through the same pipeline as a request; `purge` deletes an id's stored variants and
//! tells running servers to drop their memory entries.
//!
//! Neither command opens a listener. `warm` builds the same [`App`] a server builds (same source,
//! limits, canonical keys and result store) and calls [`Pipeline::warm`] for each variant, so what it
//! stores is byte-for-byte what a request would have stored. `purge` deletes from the result store
//! first and only then asks the servers to drop their memory entries: the other order would let a
//! request between the two steps refill a server's memory from the still-present stored object.
//!
//! Exit status: 0 when everything succeeded, 1 when anything failed, 2 when the command cannot start
//! (nothing to work on, no result store, no admin token for `--status-url`), 130 when interrupted.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use futures::{stream, StreamExt};

use crate::app::App;
use crate::cli::{PurgeArgs, WarmArgs};
use crate::config::Config;
use crate::error::Error;
use crate::pipeline::Pipeline;
use crate::request::{ImageRequest, Rules};

/// Exit status when the command cannot start (usage or configuration), as for a bad config in `main`.
const EXIT_USAGE: u8 = 2;
/// Exit status after Ctrl-C / SIGTERM (128 + SIGINT, the shell convention).
const EXIT_INTERRUPTED: u8 = 130;
/// How often the live progress line is redrawn on a terminal.
const TTY_TICK: Duration = Duration::from_millis(250);
/// How often a plain progress line is written when stderr is a file or pipe (logs, CI).
const LOG_TICK: Duration = Duration::from_secs(2);
/// Servers and store deletions `purge` runs at once: a handful of status ports, no need for more.
const PURGE_CONCURRENCY: usize = 8;

/// `image-server warm`: renders `--versions` of every id into the result store.
///
/// Skips variants already stored (unless `--force`), so an interrupted run, re-run, continues where it
/// stopped. Invalid ids and versions are reported as failures with the parser's reason.
pub async fn warm(config: Config, args: WarmArgs) -> anyhow::Result<ExitCode> {
    if config.result_store.is_none() {
        eprintln!(
            "image-server warm: no result_store configured: nothing to warm into \
             (set result_store, or pass --result-store URL)"
        );
        return Ok(ExitCode::from(EXIT_USAGE));
    }
    let ids = match read_ids(&args.ids).await {
        Ok(ids) if ids.is_empty() => {
            eprintln!("image-server warm: no ids given");
            return Ok(ExitCode::from(EXIT_USAGE));
        }
        Ok(ids) => ids,
        Err(e) => {
            eprintln!("image-server warm: cannot read ids from stdin: {e}");
            return Ok(ExitCode::from(EXIT_USAGE));
        }
    };
    let versions: Vec<&str> = args
        .versions
        .iter()
        .map(|v| v.trim())
        .filter(|v| !v.is_empty())
        .collect();
    if versions.is_empty() {
        eprintln!("image-server warm: --versions names no version");
        return Ok(ExitCode::from(EXIT_USAGE));
    }
    let plan = Plan::new(&ids, &versions, &config.rules());
    // The pool admits `processing_concurrency + queue_size` renders and refuses the rest as
    // overloaded; more jobs than that would turn into failures, not speed.
    let capacity = (config.processing_concurrency + config.queue_size).max(1);
    let jobs = match args.jobs {
        0 => config.processing_concurrency,
        n => n,
    }
    .clamp(1, capacity);
    let deadline = config.request_timeout;

    let app = App::new(config)?;
    let pipeline = app.pipeline.clone();
    if let Some(remote) = pipeline.remote() {
        if let Err(e) = remote.check().await {
            eprintln!("image-server warm: {e}");
            return Ok(ExitCode::from(EXIT_USAGE));
        }
    }

    let total = plan.tasks.len();
    let mut tally = Tally {
        duplicates: plan.duplicates,
        ..Tally::default()
    };
    let mut progress = Progress::new(total, std::io::stderr().is_terminal());
    let force = args.force;
    let mut results = stream::iter(plan.tasks)
        .map(|task| run_task(&pipeline, task, force, deadline))
        .buffer_unordered(jobs);
    let mut tick = tokio::time::interval(progress.tick());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    tick.tick().await; // the first tick is immediate; nothing to show yet
    let interrupt = crate::server::shutdown_signal();
    tokio::pin!(interrupt);
    let mut stopped = false;
    loop {
        tokio::select! {
            next = results.next() => match next {
                Some((path, outcome)) => {
                    if let Err(e) = &outcome {
                        progress.clear();
                        eprintln!("failed {}: {} ({e})", shown(&path), e.kind());
                    }
                    tally.record(&outcome);
                }
                None => break,
            },
            _ = tick.tick() => progress.draw(&tally),
            _ = &mut interrupt => {
                stopped = true;
                break;
            }
        }
    }
    // Dropping the stream cancels the renders in flight; a store write is atomic, so nothing
    // half-written is left and the next run's skip rule picks up exactly where this one stopped.
    drop(results);
    progress.clear();
    println!(
        "{}",
        tally.summary(total, progress.started.elapsed(), stopped)
    );
    Ok(if stopped {
        ExitCode::from(EXIT_INTERRUPTED)
    } else if tally.failed() > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// `image-server purge`: deletes every stored variant of each id, then asks each `--status-url`
/// server to drop its memory entries (variants, original bytes, negative entry) for it.
pub async fn purge(config: Config, args: PurgeArgs) -> anyhow::Result<ExitCode> {
    let raw = match read_ids(&args.ids).await {
        Ok(ids) if ids.is_empty() => {
            eprintln!("image-server purge: no ids given");
            return Ok(ExitCode::from(EXIT_USAGE));
        }
        Ok(ids) => ids,
        Err(e) => {
            eprintln!("image-server purge: cannot read ids from stdin: {e}");
            return Ok(ExitCode::from(EXIT_USAGE));
        }
    };
    if config.result_store.is_none() && args.status_urls.is_empty() {
        eprintln!(
            "image-server purge: nothing to purge from: no result_store configured and no --status-url given"
        );
        return Ok(ExitCode::from(EXIT_USAGE));
    }
    let token = match (&config.admin_token, args.status_urls.is_empty()) {
        (Some(t), _) => Some(t.clone()),
        (None, true) => None,
        (None, false) => {
            eprintln!(
                "image-server purge: --status-url needs admin_token (the servers' bearer token) in the configuration"
            );
            return Ok(ExitCode::from(EXIT_USAGE));
        }
    };
    let mut failures = 0usize;
    let mut ids = Vec::new();
    for id in raw {
        match original_id(&id) {
            Some(valid) => ids.push(valid),
            None => {
                failures += 1;
                eprintln!("failed {}: bad id (expected model/type/id)", shown(&id));
            }
        }
    }
    let mut seen = HashSet::new();
    ids.retain(|id| seen.insert(id.clone()));
    let timeout = config.request_timeout;
    let connect_timeout = config.connect_timeout;
    let app = App::new(config)?;

    let mut deleted = 0usize;
    if let Some(remote) = app.pipeline.remote() {
        let mut deletions = stream::iter(ids.iter())
            .map(|id| async move { (id, remote.delete_original(id).await) })
            .buffer_unordered(PURGE_CONCURRENCY);
        while let Some((id, result)) = deletions.next().await {
            match result {
                Ok(keys) => {
                    for key in &keys {
                        println!("deleted {key}");
                    }
                    if keys.is_empty() {
                        println!("{id}: nothing stored");
                    }
                    deleted += keys.len();
                }
                Err(e) => {
                    failures += 1;
                    eprintln!("failed {id}: {e}");
                }
            }
        }
    }

    let mut acknowledged = 0usize;
    if let Some(token) = token.filter(|_| !args.status_urls.is_empty()) {
        let client = reqwest::Client::builder()
            // Status ports are internal addresses: a proxy from the environment would be wrong.
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(connect_timeout)
            .timeout(timeout)
            .build()?;
        let pairs: Vec<(&url::Url, &String)> = args
            .status_urls
            .iter()
            .flat_map(|u| ids.iter().map(move |id| (u, id)))
            .collect();
        let client = &client;
        let token = token.as_str();
        let mut calls = stream::iter(pairs)
            .map(
                |(base, id)| async move { (base, id, purge_server(client, base, id, token).await) },
            )
            .buffer_unordered(PURGE_CONCURRENCY);
        while let Some((base, id, result)) = calls.next().await {
            let base = base.as_str().trim_end_matches('/');
            match result {
                Ok(()) => {
                    acknowledged += 1;
                    println!("{base} purged {id}");
                }
                Err(why) => {
                    failures += 1;
                    eprintln!("failed {base} {id}: {why}");
                }
            }
        }
    }
    println!(
        "purge: {} ids, {deleted} stored objects deleted, {acknowledged}/{} server purges acknowledged, {failures} failed",
        ids.len(),
        ids.len() * args.status_urls.len(),
    );
    Ok(if failures > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// `POST {base}/purge/{id}` with the bearer token; `Err` says why in a short phrase.
async fn purge_server(
    client: &reqwest::Client,
    base: &url::Url,
    id: &str,
    token: &str,
) -> Result<(), String> {
    let url = format!("{}/purge/{id}", base.as_str().trim_end_matches('/'));
    let resp = client
        .post(url)
        .bearer_auth(token)
        .send()
        .await
        .map_err(|e| {
            if e.is_timeout() {
                "timed out".to_owned()
            } else if e.is_connect() {
                "cannot connect".to_owned()
            } else {
                format!("request failed: {e}")
            }
        })?;
    match resp.status().as_u16() {
        200 => Ok(()),
        401 => Err("401 unauthorized (admin_token differs from the server's)".to_owned()),
        404 => Err(
            "404 (purge disabled on that server: no admin_token, or not a status port)".to_owned(),
        ),
        400 => Err("400 bad id".to_owned()),
        s => Err(format!("status {s}")),
    }
}

/// The ids named on the command line, with `-` replaced by stdin's lines (read once, however often
/// `-` appears). Blank lines and `#` comments are skipped; surrounding slashes are tolerated.
async fn read_ids(args: &[String]) -> std::io::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stdin_read = false;
    for arg in args {
        if arg == "-" {
            if stdin_read {
                continue;
            }
            stdin_read = true;
            let text = tokio::task::spawn_blocking(|| std::io::read_to_string(std::io::stdin()))
                .await
                .map_err(std::io::Error::other)??;
            out.extend(text.lines().filter_map(clean_id));
        } else if let Some(id) = clean_id(arg) {
            out.push(id);
        }
    }
    Ok(out)
}

fn clean_id(line: &str) -> Option<String> {
    let id = line.trim().trim_matches('/');
    (!id.is_empty() && !id.starts_with('#')).then(|| id.to_owned())
}

/// `model/type/id` when it names an original the URL grammar accepts (the same check as the status
/// port's purge endpoint), else `None`.
fn original_id(id: &str) -> Option<String> {
    ImageRequest::parse(&format!("/{id}/full_size.jpg"), &Rules::default())
        .ok()
        .map(|r| r.original_id())
}

/// An operator-supplied name made safe for a terminal: control characters and the like escaped.
fn shown(s: &str) -> String {
    if s.bytes().all(|b| b.is_ascii_graphic()) {
        s.to_owned()
    } else {
        format!("{s:?}")
    }
}

/// One unit of `warm`: a variant to render, or a name that failed to parse (reported, not run).
enum Task {
    Render { path: String, req: ImageRequest },
    Invalid { path: String, error: Error },
}

/// The variants to warm, id-major so the versions of one original run together and share its one
/// download (the pipeline's originals cache coalesces them).
struct Plan {
    tasks: Vec<Task>,
    /// Names equivalent to an earlier one (`x400` after `400x400`, a repeated id): rendered once.
    duplicates: usize,
}

impl Plan {
    fn new(ids: &[String], versions: &[&str], rules: &Rules) -> Plan {
        let mut tasks = Vec::with_capacity(ids.len() * versions.len());
        let mut keys = HashSet::new();
        let mut duplicates = 0;
        for id in ids {
            for version in versions {
                let path = format!("/{id}/{version}");
                match ImageRequest::parse(&path, rules) {
                    Ok(req) => {
                        if keys.insert(req.cache_key(req.format)) {
                            tasks.push(Task::Render { path, req });
                        } else {
                            duplicates += 1;
                        }
                    }
                    Err(e) => tasks.push(Task::Invalid {
                        path,
                        error: e.into(),
                    }),
                }
            }
        }
        Plan { tasks, duplicates }
    }
}

/// Runs one task under the request deadline; `Ok(true)` rendered, `Ok(false)` already stored.
async fn run_task(
    pipeline: &Pipeline,
    task: Task,
    force: bool,
    deadline: Duration,
) -> (String, Result<bool, Error>) {
    match task {
        Task::Invalid { path, error } => (path, Err(error)),
        Task::Render { path, req } => {
            let outcome = tokio::time::timeout(deadline, pipeline.warm(&req, force))
                .await
                .unwrap_or(Err(Error::Timeout));
            (path, outcome)
        }
    }
}

/// Counts of a `warm` run.
#[derive(Default)]
struct Tally {
    rendered: usize,
    skipped: usize,
    duplicates: usize,
    /// Failures by [`Error::kind`] (a bounded set), sorted for a stable summary.
    failed: BTreeMap<&'static str, usize>,
}

impl Tally {
    fn record(&mut self, outcome: &Result<bool, Error>) {
        match outcome {
            Ok(true) => self.rendered += 1,
            Ok(false) => self.skipped += 1,
            Err(e) => *self.failed.entry(e.kind()).or_default() += 1,
        }
    }

    fn failed(&self) -> usize {
        self.failed.values().sum()
    }

    fn done(&self) -> usize {
        self.rendered + self.skipped + self.failed()
    }

    /// The closing line(s): counts, rate, and failures by reason.
    fn summary(&self, total: usize, elapsed: Duration, interrupted: bool) -> String {
        let secs = elapsed.as_secs_f64();
        let rate = if secs > 0.0 {
            self.done() as f64 / secs
        } else {
            0.0
        };
        let mut s = format!(
            "warm: {} rendered, {} skipped, {} failed of {total} variants in {secs:.1} s ({rate:.1}/s)",
            self.rendered,
            self.skipped,
            self.failed(),
        );
        if self.duplicates > 0 {
            let _ = write!(s, "; {} duplicate names ignored", self.duplicates);
        }
        if interrupted {
            let _ = write!(
                s,
                "; interrupted with {} not done (run again to continue)",
                total.saturating_sub(self.done())
            );
        }
        if !self.failed.is_empty() {
            let reasons: Vec<String> = self
                .failed
                .iter()
                .map(|(kind, n)| format!("{kind} {n}"))
                .collect();
            let _ = write!(s, "\nfailed by reason: {}", reasons.join(", "));
        }
        s
    }
}

/// Progress on stderr: a live line redrawn in place on a terminal, plain periodic lines otherwise.
/// Hand-rolled rather than `indicatif`: one line of counters does not justify a dependency.
struct Progress {
    total: usize,
    tty: bool,
    started: Instant,
    /// A live line is on screen and must be erased before anything else is printed.
    drawn: bool,
    /// The previous sample `(when, done)` and the smoothed rate, for the shown rate and the ETA.
    last: Option<(Instant, usize)>,
    rate: f64,
}

/// Time constant of the smoothed rate: skips (a HEAD each) run ~20× faster than renders, so a run
/// that resumes over a stored stretch would show a wildly optimistic ETA if it used the average
/// since the start; a few seconds' memory follows the current mix instead.
const RATE_WINDOW_SECS: f64 = 5.0;

impl Progress {
    fn new(total: usize, tty: bool) -> Progress {
        Progress {
            total,
            tty,
            started: Instant::now(),
            drawn: false,
            last: None,
            rate: 0.0,
        }
    }

    fn tick(&self) -> Duration {
        if self.tty {
            TTY_TICK
        } else {
            LOG_TICK
        }
    }

    /// The progress line at `now`; updates the smoothed rate.
    fn line(&mut self, tally: &Tally, now: Instant) -> String {
        let done = tally.done();
        let (since, before) = self.last.unwrap_or((self.started, 0));
        let dt = now.saturating_duration_since(since).as_secs_f64();
        if dt > 0.0 {
            let recent = done.saturating_sub(before) as f64 / dt;
            self.rate = if self.last.is_none() {
                recent
            } else {
                // Exponential smoothing with a time-based weight, so any tick interval behaves alike.
                let w = 1.0 - (-dt / RATE_WINDOW_SECS).exp();
                self.rate + w * (recent - self.rate)
            };
            self.last = Some((now, done));
        }
        let rate = self.rate;
        let eta = if rate > 0.0 {
            format!("{:.0} s", self.total.saturating_sub(done) as f64 / rate)
        } else {
            "-".to_owned()
        };
        let pct = if self.total > 0 {
            100.0 * done as f64 / self.total as f64
        } else {
            100.0
        };
        format!(
            "warm: {done}/{} ({pct:.0}%) {rate:.1}/s ETA {eta}: {} rendered, {} skipped, {} failed",
            self.total,
            tally.rendered,
            tally.skipped,
            tally.failed()
        )
    }

    fn draw(&mut self, tally: &Tally) {
        let line = self.line(tally, Instant::now());
        let mut err = std::io::stderr().lock();
        if self.tty {
            // \r + erase-line: redraw in place.
            let _ = write!(err, "\r\x1b[K{line}");
            self.drawn = true;
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
    }

    /// Erases the live line so the next message starts on a clean line.
    fn clear(&mut self) {
        if self.drawn {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[K");
            let _ = err.flush();
            self.drawn = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::RequestError;

    #[test]
    fn plan_is_id_major_parses_each_version_and_drops_equivalents() {
        let ids = vec!["p/i/1".to_owned(), "p/i/2".to_owned(), "p/i/1".to_owned()];
        let plan = Plan::new(
            &ids,
            &[
                "w200.jpg",
                "x400.webp",
                "400x400.webp",
                "w99999.jpg",
                "nope.jpg",
            ],
            &Rules::default(),
        );
        let names: Vec<String> = plan
            .tasks
            .iter()
            .map(|t| match t {
                Task::Render { req, .. } => req.cache_key(req.format).to_string(),
                Task::Invalid { path, error } => format!("{path} {}", error.kind()),
            })
            .collect();
        assert_eq!(
            names,
            [
                "p/i/1/w200.jpg",
                "p/i/1/400x400.webp",
                "/p/i/1/w99999.jpg too_large",
                "/p/i/1/nope.jpg unknown_version",
                "p/i/2/w200.jpg",
                "p/i/2/400x400.webp",
                "/p/i/2/w99999.jpg too_large",
                "/p/i/2/nope.jpg unknown_version",
                // The repeated id: its invalid names are reported again, its valid ones are not.
                "/p/i/1/w99999.jpg too_large",
                "/p/i/1/nope.jpg unknown_version",
            ]
        );
        // x400.webp ≡ 400x400.webp (×3 ids) and the repeated id's two valid names.
        assert_eq!(plan.duplicates, 5);
    }

    #[test]
    fn a_bad_id_fails_with_the_parsers_reason() {
        let plan = Plan::new(&["p/i/a.b".to_owned()], &["w200.jpg"], &Rules::default());
        assert!(matches!(
            &plan.tasks[..],
            [Task::Invalid {
                error: Error::Request(RequestError::NoRoute),
                ..
            }]
        ));
    }

    #[test]
    fn summary_counts_and_reasons() {
        let mut t = Tally::default();
        for o in [
            Ok(true),
            Ok(true),
            Ok(false),
            Err(Error::Request(RequestError::NoRoute)),
            Err(Error::Timeout),
            Err(Error::Timeout),
        ] {
            t.record(&o);
        }
        assert_eq!((t.done(), t.failed()), (6, 3));
        let s = t.summary(10, Duration::from_secs(2), true);
        assert!(
            s.starts_with("warm: 2 rendered, 1 skipped, 3 failed of 10 variants in 2.0 s (3.0/s)"),
            "{s}"
        );
        assert!(s.contains("interrupted with 4 not done"), "{s}");
        assert!(
            s.ends_with("failed by reason: no_route 1, timeout 2"),
            "{s}"
        );
    }

    #[test]
    fn progress_line_has_a_smoothed_rate_and_eta() {
        let mut p = Progress::new(1000, false);
        let t0 = p.started;
        let mut t = Tally::default();
        for _ in 0..500 {
            t.record(&Ok(false)); // a fast stretch of skips
        }
        let line = p.line(&t, t0 + Duration::from_secs(2));
        assert!(
            line.starts_with("warm: 500/1000 (50%) 250.0/s ETA 2 s"),
            "{line}"
        );
        // Then renders at 10/s: the shown rate follows them down instead of staying near the
        // average since the start (~42/s after 12 s).
        for _ in 0..100 {
            t.record(&Ok(true));
        }
        let line = p.line(&t, t0 + Duration::from_secs(12));
        let rate: f64 = line
            .split_whitespace()
            .nth(3)
            .and_then(|r| r.strip_suffix("/s"))
            .and_then(|r| r.parse().ok())
            .expect("rate");
        // w = 1 - e^-2 ≈ 0.865: 250 + 0.865 × (10 - 250) ≈ 42.5 — one window in; another 10 s at
        // 10/s brings it to ≈ 14.4.
        assert!((rate - 42.5).abs() < 0.5, "{line}");
        for _ in 0..100 {
            t.record(&Ok(true));
        }
        let line = p.line(&t, t0 + Duration::from_secs(22));
        assert!(
            line.starts_with("warm: 700/1000 (70%) 14.4/s ETA 21 s: 200 rendered, 500 skipped"),
            "{line}"
        );
    }

    #[test]
    fn ids_are_cleaned_and_validated() {
        assert_eq!(
            clean_id("  /product/image/1/ \r"),
            Some("product/image/1".into())
        );
        assert_eq!(clean_id("# comment"), None);
        assert_eq!(clean_id("   "), None);
        assert_eq!(
            original_id("product/image/1").as_deref(),
            Some("product/image/1")
        );
        for bad in [
            "product/image",
            "product/image/1/w200.jpg",
            "p/i/a.b",
            "P/i/1",
            "p/i/%2e",
        ] {
            assert_eq!(original_id(bad), None, "{bad}");
        }
        assert_eq!(shown("p/i/1"), "p/i/1");
        assert_eq!(shown("p/i/\x1b[2J"), "\"p/i/\\u{1b}[2J\"");
    }
}
