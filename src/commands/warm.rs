//! `image-server warm`: renders `--versions` of many ids into the result store through
//! [`Pipeline::warm`], so what it stores is byte-for-byte what a request would have stored. Variants
//! already stored are skipped (unless `--force`), so an interrupted run, re-run, continues where it
//! stopped. Progress goes to stderr through `indicatif`: a live bar on a terminal, a plain line every
//! 2 s otherwise (logs, CI).

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use futures::{stream, StreamExt};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::{read_ids, shown, EXIT_INTERRUPTED, EXIT_USAGE};
use crate::app::App;
use crate::cli::WarmArgs;
use crate::config::Config;
use crate::error::Error;
use crate::pipeline::Pipeline;
use crate::request::{ImageRequest, Rules};

/// How often a plain progress line is written when stderr is not a terminal.
const LOG_TICK: Duration = Duration::from_secs(2);

/// `image-server warm`: renders `--versions` of every id into the result store.
///
/// Skips variants already stored (unless `--force`), so an interrupted run, re-run, continues where it
/// stopped. Invalid ids and versions are reported as failures with the parser's reason.
pub async fn warm(config: Config, args: WarmArgs) -> anyhow::Result<ExitCode> {
    if config.caching.result_store.is_none() {
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
    let capacity = (config.capacity.processing_concurrency + config.capacity.queue_size).max(1);
    let jobs = match args.jobs {
        0 => config.capacity.processing_concurrency,
        n => n,
    }
    .clamp(1, capacity);
    let deadline = config.timeouts.request_timeout;

    let app = App::new(config)?;
    let pipeline = app.pipeline.clone();
    if let Some(remote) = pipeline.remote() {
        if let Err(e) = remote.check().await {
            eprintln!("image-server warm: {e}");
            return Ok(ExitCode::from(EXIT_USAGE));
        }
    }

    let total = plan.variants();
    let mut tally = Tally {
        duplicates: plan.duplicates,
        ..Tally::default()
    };
    let progress = Progress::new(total, std::io::stderr().is_terminal());
    let force = args.force;
    let mut results = stream::iter(plan.tasks)
        .map(|task| run_task(&pipeline, task, force, deadline))
        .buffer_unordered(jobs)
        .flat_map(stream::iter);
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
                        progress.println(&format!("failed {}: {} ({e})", shown(&path), e.kind()));
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
        tally.summary(
            total,
            progress.started.elapsed(),
            stopped,
            pipeline.stats().decodes
        )
    );
    Ok(if stopped {
        ExitCode::from(EXIT_INTERRUPTED)
    } else if tally.failed() > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// One unit of `warm`: the versions of one original, rendered together (one download, and one
/// decode where they allow it), or a name that failed to parse (reported, not run).
enum Task {
    Original {
        paths: Vec<String>,
        reqs: Vec<ImageRequest>,
    },
    Invalid {
        path: String,
        error: Error,
    },
}

/// The variants to warm, one task per original.
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
            let (mut paths, mut reqs) = (Vec::new(), Vec::new());
            for version in versions {
                let path = format!("/{id}/{version}");
                match ImageRequest::parse(&path, rules) {
                    Ok(req) => {
                        if keys.insert(req.cache_key(req.format)) {
                            paths.push(path);
                            reqs.push(req);
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
            if !reqs.is_empty() {
                tasks.push(Task::Original { paths, reqs });
            }
        }
        Plan { tasks, duplicates }
    }

    /// How many variants the tasks name.
    fn variants(&self) -> usize {
        self.tasks
            .iter()
            .map(|t| match t {
                Task::Original { reqs, .. } => reqs.len(),
                Task::Invalid { .. } => 1,
            })
            .sum()
    }
}

/// Runs one task under the request deadline; per variant `Ok(true)` rendered, `Ok(false)` already
/// stored.
async fn run_task(
    pipeline: &Pipeline,
    task: Task,
    force: bool,
    deadline: Duration,
) -> Vec<(String, Result<bool, Error>)> {
    match task {
        Task::Invalid { path, error } => vec![(path, Err(error))],
        Task::Original { paths, reqs } => {
            let outcomes = tokio::time::timeout(deadline, pipeline.warm_versions(&reqs, force))
                .await
                .unwrap_or_else(|_| vec![Err(Error::Timeout); reqs.len()]);
            paths.into_iter().zip(outcomes).collect()
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

    /// The counts shown beside the progress figures.
    fn counts(&self) -> String {
        format!(
            "{} rendered, {} skipped, {} failed",
            self.rendered,
            self.skipped,
            self.failed()
        )
    }

    /// The closing line(s): counts, rate, and failures by reason.
    fn summary(&self, total: usize, elapsed: Duration, interrupted: bool, decodes: u64) -> String {
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
        let _ = write!(s, "; {decodes} decodes");
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

/// Progress on stderr: `indicatif`'s bar (rate and ETA from its own estimator) on a terminal; on a
/// file or pipe, where it draws nothing, the same figures as a plain line every [`LOG_TICK`].
struct Progress {
    bar: ProgressBar,
    tty: bool,
    started: Instant,
}

impl Progress {
    fn new(total: usize, tty: bool) -> Progress {
        let target = if tty {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let bar = ProgressBar::with_draw_target(Some(total as u64), target);
        // The template is a constant: it parses.
        if let Ok(style) = ProgressStyle::with_template(
            "warm: {pos}/{len} ({percent}%) {per_sec} ETA {eta}: {msg}",
        ) {
            bar.set_style(style);
        }
        Progress {
            bar,
            tty,
            started: Instant::now(),
        }
    }

    fn tick(&self) -> Duration {
        if self.tty {
            // The bar redraws itself; this only refreshes its message.
            Duration::from_millis(250)
        } else {
            LOG_TICK
        }
    }

    /// Records the tally in the bar.
    fn update(&self, tally: &Tally) {
        self.bar.set_position(tally.done() as u64);
        self.bar.set_message(tally.counts());
    }

    /// The plain line for logs: the bar's own figures.
    fn line(&self) -> String {
        let total = self.bar.length().unwrap_or(0);
        let done = self.bar.position();
        let pct = if total > 0 {
            100.0 * done as f64 / total as f64
        } else {
            100.0
        };
        let eta = if done > 0 {
            format!("{} s", self.bar.eta().as_secs())
        } else {
            "-".to_owned()
        };
        format!(
            "warm: {done}/{total} ({pct:.0}%) {:.1}/s ETA {eta}: {}",
            self.bar.per_sec(),
            self.bar.message()
        )
    }

    fn draw(&self, tally: &Tally) {
        self.update(tally);
        if !self.tty {
            eprintln!("{}", self.line());
        }
    }

    /// Prints a message above the bar (or plainly without one).
    fn println(&self, message: &str) {
        if self.tty {
            self.bar.println(message);
        } else {
            eprintln!("{message}");
        }
    }

    /// Removes the bar so the summary starts on a clean line.
    fn clear(&self) {
        self.bar.finish_and_clear();
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
                Task::Original { reqs, .. } => reqs
                    .iter()
                    .map(|r| r.cache_key(r.format).to_string())
                    .collect::<Vec<_>>()
                    .join(" + "),
                Task::Invalid { path, error } => format!("{path} {}", error.kind()),
            })
            .collect();
        // One task per original with all its valid versions (rendered together), after its
        // invalid names.
        assert_eq!(
            names,
            [
                "/p/i/1/w99999.jpg too_large",
                "/p/i/1/nope.jpg unknown_version",
                "p/i/1/w200.jpg + p/i/1/400x400.webp",
                "/p/i/2/w99999.jpg too_large",
                "/p/i/2/nope.jpg unknown_version",
                "p/i/2/w200.jpg + p/i/2/400x400.webp",
                // The repeated id: its invalid names are reported again, its valid ones are not.
                "/p/i/1/w99999.jpg too_large",
                "/p/i/1/nope.jpg unknown_version",
            ]
        );
        assert_eq!(plan.variants(), 10);
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
        let s = t.summary(10, Duration::from_secs(2), true, 1);
        assert!(
            s.starts_with(
                "warm: 2 rendered, 1 skipped, 3 failed of 10 variants in 2.0 s (3.0/s); 1 decodes"
            ),
            "{s}"
        );
        assert!(s.contains("interrupted with 4 not done"), "{s}");
        assert!(
            s.ends_with("failed by reason: no_route 1, timeout 2"),
            "{s}"
        );
    }

    #[test]
    fn progress_line_counts_from_the_tally() {
        let p = Progress::new(1000, false);
        let mut t = Tally::default();
        for _ in 0..500 {
            t.record(&Ok(false));
        }
        for _ in 0..200 {
            t.record(&Ok(true));
        }
        t.record(&Err(Error::Timeout));
        p.update(&t);
        let line = p.line();
        assert!(line.starts_with("warm: 701/1000 (70%) "), "{line}");
        assert!(
            line.ends_with(": 200 rendered, 500 skipped, 1 failed"),
            "{line}"
        );
    }
}
