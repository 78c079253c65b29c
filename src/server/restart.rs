//! Restarting without refusing a connection (`SIGHUP`): the running server starts its successor
//! (the binary now on disk, with the same arguments, so a new binary and a new configuration take
//! effect) and hands it the two listening sockets, which stay open throughout; the kernel queues
//! connections on them while neither process accepts. Once the successor says it is ready, the old
//! server stops accepting and drains like a stop (`shutdown_grace`). If the successor fails (a bad
//! configuration, a bad binary) or is not ready within [`READY_WITHIN`], the old server keeps
//! serving, logs why and counts `restart.failed`.
//!
//! The hand-over is two environment variables: [`LISTEN_FDS`] (`{image},{status}` descriptor
//! numbers, inherited across `exec`) and [`READY_FD`] (the write end of a pipe the successor writes
//! `ready` to once it has built everything start-up builds).

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use tokio::net::TcpListener;

/// Names the inherited listening sockets: `{image fd},{status fd}`.
pub const LISTEN_FDS: &str = "IMAGE_SERVER_LISTEN_FDS";
/// The descriptor the successor writes `ready` to.
pub const READY_FD: &str = "IMAGE_SERVER_READY_FD";
/// How long a successor may take to start before the restart is abandoned.
pub const READY_WITHIN: Duration = Duration::from_secs(30);

/// Why a restart did not happen.
#[derive(Debug, thiserror::Error)]
pub enum RestartError {
    /// The successor could not be started.
    #[error("cannot start the new process: {0}")]
    Spawn(#[source] std::io::Error),
    /// It exited (its configuration or binary is bad; its own log says why).
    #[error("the new process exited before it was ready ({0})")]
    Exited(std::process::ExitStatus),
    /// It did not say it was ready in time, and was stopped.
    #[error("the new process was not ready within {0:?}")]
    NotReady(Duration),
    /// Preparing the hand-over failed.
    #[error("cannot hand the sockets over: {0}")]
    Io(#[source] std::io::Error),
}

/// The path this process was started from, taken at start-up ([`remember_executable`]).
static EXECUTABLE: OnceLock<PathBuf> = OnceLock::new();

/// Notes the path of the running binary, before anything can replace it. Once a package upgrade
/// has renamed a new binary over it, the kernel names the running one `… (deleted)`, and a
/// successor must start from the path, which now holds the new binary.
pub fn remember_executable() {
    if let Ok(path) = std::env::current_exe() {
        let _ = EXECUTABLE.set(without_deleted(path));
    }
}

/// The binary a successor starts from: the path noted at start-up, else the current one.
fn executable() -> std::io::Result<PathBuf> {
    match EXECUTABLE.get() {
        Some(path) => Ok(path.clone()),
        None => std::env::current_exe().map(without_deleted),
    }
}

/// `/usr/bin/image-server (deleted)` → `/usr/bin/image-server`: what Linux reports for a binary
/// unlinked or replaced while it runs.
fn without_deleted(path: PathBuf) -> PathBuf {
    match path.to_str().and_then(|p| p.strip_suffix(" (deleted)")) {
        Some(original) => PathBuf::from(original),
        None => path,
    }
}

/// The listening sockets a predecessor handed over, if this process is a successor.
pub fn inherited() -> std::io::Result<Option<(TcpListener, TcpListener)>> {
    let Ok(value) = std::env::var(LISTEN_FDS) else {
        return Ok(None);
    };
    let bad = || std::io::Error::other(format!("{LISTEN_FDS}={value:?} names no two descriptors"));
    let (image, status) = value.split_once(',').ok_or_else(bad)?;
    let image: RawFd = image.parse().map_err(|_| bad())?;
    let status: RawFd = status.parse().map_err(|_| bad())?;
    Ok(Some((listener(image)?, listener(status)?)))
}

fn listener(fd: RawFd) -> std::io::Result<TcpListener> {
    // SAFETY: the predecessor passed this descriptor for us to own: a listening TCP socket it
    // made inheritable for exactly this exec, and nothing else in this process uses it.
    let std = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    set_cloexec(fd, true)?;
    std.set_nonblocking(true)?;
    TcpListener::from_std(std)
}

/// Tells the predecessor this process is ready (when there is one).
pub fn signal_ready() {
    let Some(fd) = std::env::var(READY_FD)
        .ok()
        .and_then(|v| v.parse::<RawFd>().ok())
    else {
        return;
    };
    // SAFETY: the predecessor passed the pipe's write end for this process to own.
    let mut pipe = unsafe { std::fs::File::from_raw_fd(fd) };
    if let Err(e) = pipe.write_all(b"ready\n") {
        tracing::warn!(error = %e, "cannot tell the previous process that this one is ready");
    }
}

fn set_cloexec(fd: RawFd, on: bool) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor this process holds; F_SETFD only changes its flags.
    let rc = unsafe { libc::fcntl(fd, libc::F_SETFD, if on { libc::FD_CLOEXEC } else { 0 }) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Starts the successor with `image` and `status` (this process's listening sockets) and waits
/// until it is ready: `Ok(pid)`, after which this process should stop accepting and drain.
pub async fn hand_over(image: RawFd, status: RawFd) -> Result<u32, RestartError> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two new descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(RestartError::Io(std::io::Error::last_os_error()));
    }
    // SAFETY: both ends were just made by pipe2 and are owned here.
    let (read_end, write_end) = unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    let exe = executable().map_err(RestartError::Spawn)?;
    // Inheritable for this one spawn only.
    for fd in [image, status, fds[1]] {
        set_cloexec(fd, false).map_err(RestartError::Io)?;
    }
    let spawned = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(LISTEN_FDS, format!("{image},{status}"))
        .env(READY_FD, fds[1].to_string())
        .spawn();
    for fd in [image, status] {
        set_cloexec(fd, true).map_err(RestartError::Io)?;
    }
    drop(write_end);
    let mut child = spawned.map_err(RestartError::Spawn)?;
    let pid = child.id();
    // The read ends with `ready`, or with end-of-file when the successor exits without it.
    let ready = tokio::time::timeout(
        READY_WITHIN,
        tokio::task::spawn_blocking(move || {
            let mut said = String::new();
            let mut read_end = read_end;
            let _ = read_end.read_to_string(&mut said);
            said.starts_with("ready")
        }),
    )
    .await;
    match ready {
        Ok(Ok(true)) => {
            // The successor is on its own now; it is not this process's child to wait for.
            std::mem::forget(child);
            Ok(pid)
        }
        Ok(_) => {
            let status = child.wait().map_err(RestartError::Io)?;
            Err(RestartError::Exited(status))
        }
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(RestartError::NotReady(READY_WITHIN))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_binary_is_restarted_from_its_path() {
        assert_eq!(
            without_deleted(PathBuf::from("/usr/bin/image-server (deleted)")),
            PathBuf::from("/usr/bin/image-server")
        );
        assert_eq!(
            without_deleted(PathBuf::from("/usr/bin/image-server")),
            PathBuf::from("/usr/bin/image-server")
        );
    }
}
