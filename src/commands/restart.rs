//! `image-server restart`: the zero-downtime restart as one command that says whether it worked,
//! for `ExecReload=` and for operators. It checks the configuration the successor will read (as
//! `check-config` does, so a broken file is reported before anything is signalled), sends the
//! process named by the PID file `SIGHUP`, and waits until the PID file names a new live process
//! (success) or the old process leaves its reason beside the PID file (failure; it keeps serving).

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use super::EXIT_USAGE;
use crate::app::App;
use crate::cli::RestartArgs;
use crate::config::Config;
use crate::server::supervisor::{failure_file, read_pid_file};

/// How often the PID file is looked at while the successor starts.
const POLL: Duration = Duration::from_millis(100);

/// `image-server restart`: exit 0 once the successor serves, 1 when the restart failed or timed
/// out (the old process keeps serving), 2 when nothing could be signalled (no PID file, a broken
/// configuration, no such process).
pub async fn restart(config: Config, args: RestartArgs) -> anyhow::Result<ExitCode> {
    let Some(pid_file) = args.pid_file.or_else(|| config.listen.pid_file.clone()) else {
        eprintln!("image-server restart: no PID file: pass --pid-file or set pid_file");
        return Ok(ExitCode::from(EXIT_USAGE));
    };
    let old = match read_pid_file(&pid_file) {
        Ok(pid) => pid,
        Err(e) => {
            eprintln!(
                "image-server restart: cannot read {}: {e}",
                pid_file.display()
            );
            return Ok(ExitCode::from(EXIT_USAGE));
        }
    };
    if !alive(old) {
        eprintln!(
            "image-server restart: no process {old} (named by {}); is the server running?",
            pid_file.display()
        );
        return Ok(ExitCode::from(EXIT_USAGE));
    }
    if let Err(e) = App::new(config) {
        eprintln!("image-server restart: configuration error: {e}; nothing was restarted");
        return Ok(ExitCode::from(EXIT_USAGE));
    }
    let failed = failure_file(&pid_file);
    // A note from an earlier failed restart would be read as this one's.
    let _ = std::fs::remove_file(&failed);
    if let Err(e) = signal(old, libc::SIGHUP) {
        eprintln!("image-server restart: cannot signal process {old}: {e}");
        return Ok(ExitCode::from(EXIT_USAGE));
    }
    let started = Instant::now();
    loop {
        match outcome(&pid_file, &failed, old) {
            Some(Ok(new)) => {
                println!(
                    "restarted: process {new} serves, {old} drains (took {:.1} s)",
                    started.elapsed().as_secs_f64()
                );
                return Ok(ExitCode::SUCCESS);
            }
            Some(Err(reason)) => {
                eprintln!("image-server restart: failed: {reason}; process {old} keeps serving");
                return Ok(ExitCode::from(1));
            }
            None if started.elapsed() > args.timeout => {
                eprintln!(
                    "image-server restart: no new process took over within {:?}; {}",
                    args.timeout,
                    if alive(old) {
                        format!("process {old} keeps serving (its log says why)")
                    } else {
                        format!("process {old} has exited")
                    }
                );
                return Ok(ExitCode::from(1));
            }
            None => tokio::time::sleep(POLL).await,
        }
    }
}

/// `Some(Ok(pid))` once the PID file names another live process, `Some(Err(reason))` once the old
/// process recorded a failure, `None` while neither has happened.
fn outcome(pid_file: &Path, failed: &Path, old: u32) -> Option<Result<u32, String>> {
    if let Ok(pid) = read_pid_file(pid_file) {
        if pid != old && alive(pid) {
            return Some(Ok(pid));
        }
    }
    std::fs::read_to_string(failed)
        .ok()
        .map(|reason| Err(reason.trim().to_owned()))
}

fn alive(pid: u32) -> bool {
    signal(pid, 0).is_ok()
}

fn signal(pid: u32, sig: libc::c_int) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| std::io::Error::other(format!("{pid} is not a process id")))?;
    // SAFETY: kill(2) with a positive PID read from the PID file; signal 0 only checks existence.
    if unsafe { libc::kill(pid, sig) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_reads_a_new_pid_or_the_failure_note() {
        let dir = tempfile::tempdir().expect("tmp");
        let pid_file = dir.path().join("pid");
        let failed = failure_file(&pid_file);
        let me = std::process::id();
        // PID 1 exists in every namespace: the "old" process, still named by the file.
        std::fs::write(&pid_file, "1\n").expect("write");
        assert_eq!(outcome(&pid_file, &failed, 1), None, "nothing happened yet");
        std::fs::write(&failed, "the new process exited\n").expect("write");
        assert_eq!(
            outcome(&pid_file, &failed, 1),
            Some(Err("the new process exited".to_owned()))
        );
        std::fs::write(&pid_file, format!("{me}\n")).expect("write");
        assert_eq!(
            outcome(&pid_file, &failed, 1),
            Some(Ok(me)),
            "a live successor wins"
        );
    }

    #[test]
    fn a_pid_that_cannot_be_a_process_is_refused() {
        assert!(
            signal(0, 0).is_err(),
            "0 would signal the whole process group"
        );
        assert!(signal(u32::MAX, 0).is_err());
        assert!(alive(std::process::id()));
    }
}
