//! What the serving process tells whatever supervises it, and what it takes from it: systemd's
//! readiness protocol (`Type=notify`: `READY=1` with `MAINPID`, `RELOADING=1` while a restart's
//! successor starts, `STOPPING=1`), listening sockets passed by a systemd socket unit, and the PID
//! file that `image-server restart` reads.
//!
//! Outside systemd (no `NOTIFY_SOCKET`, no `LISTEN_FDS`) the notifications are no-ops and the
//! server binds its own ports. The notifications carry `MAINPID` because a restart's successor is a
//! child of the old main process: it tells systemd that it is the main process now, so the old
//! one's exit is not taken for the service's end (the unit needs `NotifyAccess=all` for that).

use std::os::fd::{FromRawFd, RawFd};
use std::path::{Path, PathBuf};

use sd_notify::NotifyState;
use tokio::net::TcpListener;

/// The names a socket unit gives its two sockets (`FileDescriptorName=`); without them the first
/// socket is the image port and the second the status port.
pub const SOCKET_NAMES: [&str; 2] = ["image", "status"];

/// Why systemd's sockets could not be taken over.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    /// `LISTEN_FDS` / `LISTEN_FDNAMES` could not be read.
    #[error("cannot read the sockets systemd passed: {0}")]
    Environment(#[source] std::io::Error),
    /// Not exactly the two sockets this server listens on.
    #[error("systemd passed {0} sockets; the socket unit must list two, the image port then the status port")]
    Count(usize),
    /// A passed descriptor is not a listening TCP socket.
    #[error("socket {name} (descriptor {fd}) cannot be used: {source}")]
    Socket {
        /// Its name (`image`, `status`, or systemd's `unknown`).
        name: String,
        /// The descriptor.
        fd: RawFd,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
}

/// The image and status listeners passed by a systemd socket unit, if this process was started by
/// one (`LISTEN_PID` names it). The sockets are chosen by name when both names are present, else
/// by order.
pub fn activated() -> Result<Option<(TcpListener, TcpListener)>, ActivationError> {
    let fds: Vec<(RawFd, String)> = sd_notify::listen_fds_with_names()
        .map_err(ActivationError::Environment)?
        .collect();
    if fds.is_empty() {
        return Ok(None);
    }
    if fds.len() != 2 {
        return Err(ActivationError::Count(fds.len()));
    }
    let by_name = |wanted: &str| fds.iter().find(|(_, name)| name == wanted).cloned();
    let (image, status) = match (by_name(SOCKET_NAMES[0]), by_name(SOCKET_NAMES[1])) {
        (Some(image), Some(status)) => (image, status),
        _ => (fds[0].clone(), fds[1].clone()),
    };
    Ok(Some((listener(image)?, listener(status)?)))
}

fn listener((fd, name): (RawFd, String)) -> Result<TcpListener, ActivationError> {
    let wrap = |source| ActivationError::Socket {
        name: name.clone(),
        fd,
        source,
    };
    // SAFETY: systemd passed this descriptor to this process (LISTEN_PID names it) for it to own,
    // and nothing else in the process uses it; `listen_fds` has already made it close-on-exec.
    let std = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    std.local_addr().map_err(wrap)?;
    std.set_nonblocking(true).map_err(wrap)?;
    TcpListener::from_std(std).map_err(wrap)
}

/// Tells the supervisor this process is ready and is the main process, and writes the PID file.
pub fn ready(pid_file: Option<&Path>) {
    let pid = std::process::id();
    if let Some(path) = pid_file {
        if let Err(e) = write_pid_file(path, pid) {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the PID file");
        }
    }
    notify(&[NotifyState::MainPid(pid), NotifyState::Ready]);
}

/// A restart has begun: the successor is starting.
pub fn reloading() {
    notify(&[
        NotifyState::Reloading,
        NotifyState::Status("starting the new process"),
    ]);
}

/// The successor did not start and this process keeps serving: ready again, with the reason.
pub fn restart_failed(pid_file: Option<&Path>, reason: &str) {
    if let Some(path) = pid_file {
        let note = failure_file(path);
        if let Err(e) = std::fs::write(&note, format!("{reason}\n")) {
            tracing::warn!(path = %note.display(), error = %e, "cannot record the failed restart");
        }
    }
    let status = format!("restart failed, still serving: {reason}");
    notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

/// The process is stopping for good (not handing over).
pub fn stopping() {
    notify(&[NotifyState::Stopping]);
}

/// On exit: removes the PID file if it still names this process (after a hand-over it names the
/// successor and is left alone).
pub fn exiting(pid_file: Option<&Path>) {
    let Some(path) = pid_file else { return };
    if read_pid_file(path).ok() == Some(std::process::id()) {
        let _ = std::fs::remove_file(path);
    }
}

/// Where a failed restart leaves its reason for `image-server restart`: `{pid_file}.failed`.
pub fn failure_file(pid_file: &Path) -> PathBuf {
    let mut name = pid_file.as_os_str().to_owned();
    name.push(".failed");
    PathBuf::from(name)
}

/// The PID a PID file names.
pub fn read_pid_file(path: &Path) -> std::io::Result<u32> {
    let text = std::fs::read_to_string(path)?;
    text.trim().parse().map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} does not hold a PID: {:?}", path.display(), text.trim()),
        )
    })
}

/// Writes the PID whole or not at all: a temporary file renamed over the old one, so a reader
/// never sees it half-written.
fn write_pid_file(path: &Path, pid: u32) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{pid}.tmp"));
    std::fs::write(&tmp, format!("{pid}\n"))?;
    std::fs::rename(&tmp, path)
}

fn notify(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_file_round_trip_and_removed_only_when_it_names_this_process() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("image-server.pid");
        ready(Some(&path));
        assert_eq!(read_pid_file(&path).expect("written"), std::process::id());
        // Only the file itself is left: the temporary was renamed into place.
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 1);

        std::fs::write(&path, "1\n").expect("another process's");
        exiting(Some(&path));
        assert!(path.exists(), "a successor's PID file is left alone");
        write_pid_file(&path, std::process::id()).expect("ours");
        exiting(Some(&path));
        assert!(!path.exists(), "our own PID file is removed on exit");
    }

    #[test]
    fn a_pid_file_that_holds_no_pid_is_an_error() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("pid");
        std::fs::write(&path, "not a pid").expect("write");
        assert!(read_pid_file(&path).is_err());
        assert_eq!(
            failure_file(&path),
            dir.path().join("pid.failed"),
            "the failure note sits beside the PID file"
        );
    }

    #[test]
    fn without_systemd_there_are_no_activated_sockets() {
        // No LISTEN_PID names the test process (one naming another process is ignored too).
        assert!(matches!(activated(), Ok(None)));
    }
}
