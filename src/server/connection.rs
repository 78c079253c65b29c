//! Step 1 of the request flow, per connection: the deadlines hyper does not keep, and the room a
//! port keeps for new connections.
//!
//! hyper-util's auto builder reads the protocol preface with no timer, and hyper's HTTP/1 header timer
//! also runs while a keep-alive connection waits for its next request, so it cannot tell "idle" from
//! "slow headers". Every accepted socket is therefore wrapped in a [`Watched`] stream that records
//! read and write progress into an [`Activity`], the service marks requests in and out, and the
//! connection's task asks [`Activity::verdict`] when to close:
//!
//! | state | closed when | reason |
//! |---|---|---|
//! | no request yet (silent socket, partial HTTP/2 preface, slow first headers) | `header_read_timeout` after accept | `header_timeout` |
//! | HTTP/1, idle, the next request's first bytes arrived | `header_read_timeout` after those bytes | `header_timeout` |
//! | idle (no request in progress) | `keep_alive_timeout` after the last response | `keep_alive` |
//! | a write made no progress (the client does not read) | `send_timeout` after it stalled | `send_timeout` |
//! | the port is full and this is its longest-idle connection | at once | `evicted` |
//!
//! A request in progress is bounded by `request_timeout` in the service, not here. HTTP/2 also sends
//! pings (hyper) and closes a connection that does not answer them.
//!
//! [`Room`] tracks a port's connections: when the port reaches its connection budget, the connection
//! idle the longest is told to close, so idle sockets, however many, never keep a new client (a
//! health probe) out; only connections with requests in progress make new ones wait.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

/// "No time recorded" in the millisecond fields of [`Activity`].
const NONE: u64 = u64::MAX;

/// The first bytes of every HTTP/2 connection (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The deadlines a connection is held to (from the configuration).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadlines {
    /// `header_read_timeout`.
    pub header_read: Duration,
    /// `keep_alive_timeout`.
    pub keep_alive: Duration,
    /// `send_timeout`.
    pub send: Duration,
}

/// Why a connection was closed by us (the label of `connection.closed.{reason}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// No request (or no complete HTTP/1 head) in time.
    HeaderTimeout,
    /// Idle past `keep_alive_timeout`.
    KeepAlive,
    /// A write stalled past `send_timeout`.
    SendTimeout,
    /// Closed to make room for a new connection.
    Evicted,
}

impl Reason {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::HeaderTimeout => "header_timeout",
            Reason::KeepAlive => "keep_alive",
            Reason::SendTimeout => "send_timeout",
            Reason::Evicted => "evicted",
        }
    }
}

/// What the connection's task should do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing is due: ask again at this instant (or when woken).
    WaitUntil(Instant),
    /// Close the connection.
    Close(Reason),
}

/// One connection's progress, shared by its stream, its service and its task. Times are
/// milliseconds since the connection was accepted (tokio's clock, so tests can pause it).
#[derive(Debug)]
pub struct Activity {
    born: Instant,
    /// Requests in progress (from the service being called to the response body being dropped).
    active: AtomicUsize,
    /// Requests started.
    requests: AtomicU64,
    /// When the last response finished.
    last_done: AtomicU64,
    /// When the first bytes after the connection went idle arrived (HTTP/1: a next request's head
    /// under way), or [`NONE`].
    head_since: AtomicU64,
    /// When the current write stalled, or [`NONE`].
    stalled_since: AtomicU64,
    /// The connection speaks HTTP/2 (its first bytes were the preface).
    h2: AtomicBool,
    /// Bytes read so far, up to the preface's length (to recognise HTTP/2).
    sniffed: AtomicUsize,
    evict: AtomicBool,
    /// Wakes the connection's task when a deadline appears earlier than the one it sleeps on.
    wake: Notify,
}

impl Activity {
    /// A new connection, accepted now.
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            born: Instant::now(),
            active: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            last_done: AtomicU64::new(0),
            head_since: AtomicU64::new(NONE),
            stalled_since: AtomicU64::new(NONE),
            h2: AtomicBool::new(false),
            sniffed: AtomicUsize::new(0),
            evict: AtomicBool::new(false),
            wake: Notify::new(),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_millis()).unwrap_or(NONE - 1)
    }

    fn at(&self, ms: u64) -> Instant {
        self.born + Duration::from_millis(ms)
    }

    /// A request reached the service.
    pub fn begin(&self) {
        self.active.fetch_add(1, Ordering::AcqRel);
        self.requests.fetch_add(1, Ordering::AcqRel);
        self.head_since.store(NONE, Ordering::Release);
    }

    /// A response was sent (its body dropped).
    pub fn end(&self) {
        self.last_done.store(self.now_ms(), Ordering::Release);
        if self.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            // Idle now: the keep-alive deadline may be earlier than what the task sleeps on.
            self.wake.notify_one();
        }
    }

    /// Whether a request is in progress.
    pub fn busy(&self) -> bool {
        self.active.load(Ordering::Acquire) > 0
    }

    /// Since when the connection has been idle (milliseconds since accept), for eviction.
    fn idle_since(&self) -> u64 {
        if self.requests.load(Ordering::Acquire) == 0 {
            0
        } else {
            self.last_done.load(Ordering::Acquire)
        }
    }

    /// Tells the connection to close as soon as its task looks.
    fn evict(&self) {
        self.evict.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Resolves when something changed that may bring a deadline forward.
    pub async fn changed(&self) {
        self.wake.notified().await;
    }

    fn read_progress(&self, bytes: &[u8]) {
        let seen = self.sniffed.load(Ordering::Relaxed);
        if seen < H2_PREFACE.len() && !bytes.is_empty() {
            let n = bytes.len().min(H2_PREFACE.len() - seen);
            if bytes[..n] == H2_PREFACE[seen..seen + n] {
                if seen + n == H2_PREFACE.len() {
                    self.h2.store(true, Ordering::Release);
                }
                self.sniffed.store(seen + n, Ordering::Relaxed);
            } else {
                self.sniffed.store(H2_PREFACE.len(), Ordering::Relaxed);
            }
        }
        if !bytes.is_empty()
            && !self.busy()
            && self.requests.load(Ordering::Acquire) > 0
            && self.head_since.load(Ordering::Acquire) == NONE
        {
            self.head_since.store(self.now_ms(), Ordering::Release);
        }
    }

    fn write_progress(&self, progressed: bool) {
        if progressed {
            self.stalled_since.store(NONE, Ordering::Release);
        } else if self.stalled_since.load(Ordering::Acquire) == NONE {
            self.stalled_since.store(self.now_ms(), Ordering::Release);
            // A send deadline appeared.
            self.wake.notify_one();
        }
    }

    /// What is due now under `limits`.
    pub fn verdict(&self, limits: &Deadlines) -> Verdict {
        if self.evict.load(Ordering::Acquire) && !self.busy() {
            return Verdict::Close(Reason::Evicted);
        }
        let now = self.now_ms();
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(NONE / 2);
        let mut due: Option<(u64, Reason)> = None;
        let mut consider = |at: u64, reason: Reason| {
            if due.is_none_or(|(d, _)| at < d) {
                due = Some((at, reason));
            }
        };
        let stalled = self.stalled_since.load(Ordering::Acquire);
        if stalled != NONE {
            consider(stalled.saturating_add(ms(limits.send)), Reason::SendTimeout);
        }
        if !self.busy() {
            if self.requests.load(Ordering::Acquire) == 0 {
                consider(ms(limits.header_read), Reason::HeaderTimeout);
            } else {
                let head = self.head_since.load(Ordering::Acquire);
                if head != NONE && !self.h2.load(Ordering::Acquire) {
                    consider(
                        head.saturating_add(ms(limits.header_read)),
                        Reason::HeaderTimeout,
                    );
                }
                let done = self.last_done.load(Ordering::Acquire);
                consider(
                    done.saturating_add(ms(limits.keep_alive)),
                    Reason::KeepAlive,
                );
            }
        }
        match due {
            Some((at, reason)) if at <= now => Verdict::Close(reason),
            Some((at, _)) => Verdict::WaitUntil(self.at(at)),
            // Busy and writing: the earliest a deadline can appear is when the request ends (then
            // keep-alive) or a write stalls (then send); both wake the task.
            None => Verdict::WaitUntil(self.at(now.saturating_add(ms(limits.keep_alive)))),
        }
    }
}

/// A stream that reports its progress to an [`Activity`].
#[derive(Debug)]
pub struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> Watched<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, activity: Arc<Activity>) -> Watched<S> {
        Watched { inner, activity }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            self.activity.read_progress(&buf.filled()[before..]);
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.activity.write_progress(!result.is_pending());
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.activity.write_progress(!result.is_pending());
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A port's open connections, for eviction when it is full.
#[derive(Debug, Default)]
pub struct Room {
    conns: Mutex<HashMap<u64, Arc<Activity>>>,
    next: AtomicU64,
}

/// A connection's place in its [`Room`], given back on drop.
#[derive(Debug)]
pub struct Seat {
    room: Arc<Room>,
    id: u64,
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.room.lock().remove(&self.id);
    }
}

impl Room {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Activity>>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a connection.
    pub fn enter(self: &Arc<Self>, activity: Arc<Activity>) -> Seat {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, activity);
        Seat {
            room: self.clone(),
            id,
        }
    }

    /// Tells the connection idle the longest (no request in progress, not already told) to close.
    /// Returns false when every connection is busy.
    pub fn evict_one(&self) -> bool {
        let conns = self.lock();
        let oldest = conns
            .values()
            .filter(|a| !a.busy() && !a.evict.load(Ordering::Acquire))
            // Earliest idle-since instant, across connections born at different times.
            .min_by_key(|a| a.born + Duration::from_millis(a.idle_since()));
        match oldest {
            Some(a) => {
                a.evict();
                true
            }
            None => false,
        }
    }

    /// Connections open now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no connection is open.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Deadlines = Deadlines {
        header_read: Duration::from_secs(10),
        keep_alive: Duration::from_secs(75),
        send: Duration::from_secs(30),
    };

    fn advance(secs: u64) -> impl std::future::Future<Output = ()> {
        tokio::time::advance(Duration::from_secs(secs))
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_closes_at_the_header_deadline() {
        let a = Activity::new();
        assert_eq!(
            a.verdict(&LIMITS),
            Verdict::WaitUntil(a.born + Duration::from_secs(10))
        );
        advance(9).await;
        assert!(matches!(a.verdict(&LIMITS), Verdict::WaitUntil(_)));
        // Bytes that never make a request (a partial HTTP/2 preface) change nothing.
        a.read_progress(b"PRI * HTTP/2.0\r\n");
        advance(1).await;
        assert_eq!(a.verdict(&LIMITS), Verdict::Close(Reason::HeaderTimeout));
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_keep_alive_connection_closes_at_keep_alive_timeout() {
        let a = Activity::new();
        a.read_progress(b"GET / HTTP/1.1\r\n\r\n");
        a.begin();
        advance(3).await;
        // Busy: no deadline but the fallback wake-up.
        assert!(matches!(a.verdict(&LIMITS), Verdict::WaitUntil(_)));
        a.end();
        advance(74).await;
        assert!(matches!(a.verdict(&LIMITS), Verdict::WaitUntil(_)));
        advance(1).await;
        assert_eq!(a.verdict(&LIMITS), Verdict::Close(Reason::KeepAlive));
    }

    /// HTTP/1: once the next request's first bytes arrive, its head has `header_read_timeout`.
    #[tokio::test(start_paused = true)]
    async fn slow_headers_of_a_later_request_close_at_the_header_deadline() {
        let a = Activity::new();
        a.read_progress(b"GET / HTTP/1.1\r\n\r\n");
        a.begin();
        a.end();
        advance(20).await;
        a.read_progress(b"GE");
        advance(9).await;
        assert!(matches!(a.verdict(&LIMITS), Verdict::WaitUntil(_)));
        advance(1).await;
        assert_eq!(a.verdict(&LIMITS), Verdict::Close(Reason::HeaderTimeout));
    }

    /// HTTP/2: frames between requests (pings, settings) are not a request head.
    #[tokio::test(start_paused = true)]
    async fn http2_frames_between_requests_keep_the_keep_alive_deadline() {
        let a = Activity::new();
        a.read_progress(H2_PREFACE);
        a.begin();
        a.end();
        advance(20).await;
        a.read_progress(b"\x00\x00\x08\x06\x01");
        advance(40).await;
        assert!(matches!(a.verdict(&LIMITS), Verdict::WaitUntil(_)));
        advance(15).await;
        assert_eq!(a.verdict(&LIMITS), Verdict::Close(Reason::KeepAlive));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_write_closes_at_send_timeout_even_mid_request() {
        let a = Activity::new();
        a.begin();
        a.write_progress(true);
        advance(100).await;
        assert!(matches!(a.verdict(&LIMITS), Verdict::WaitUntil(_)));
        a.write_progress(false);
        advance(29).await;
        a.write_progress(false); // still stalled: the clock keeps running from the first stall
        assert!(matches!(a.verdict(&LIMITS), Verdict::WaitUntil(_)));
        advance(1).await;
        assert_eq!(a.verdict(&LIMITS), Verdict::Close(Reason::SendTimeout));
        // Progress resets it.
        a.write_progress(true);
        assert!(matches!(a.verdict(&LIMITS), Verdict::WaitUntil(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn eviction_picks_the_longest_idle_and_spares_busy_connections() {
        let room = Arc::new(Room::default());
        let busy = Activity::new();
        busy.begin();
        let _s1 = room.enter(busy.clone());
        advance(1).await;
        let old = Activity::new();
        let _s2 = room.enter(old.clone());
        advance(1).await;
        let recent = Activity::new();
        recent.begin();
        recent.end();
        let _s3 = room.enter(recent.clone());
        assert_eq!(room.len(), 3);

        assert!(room.evict_one());
        assert_eq!(old.verdict(&LIMITS), Verdict::Close(Reason::Evicted));
        assert!(matches!(recent.verdict(&LIMITS), Verdict::WaitUntil(_)));
        assert!(room.evict_one());
        assert_eq!(recent.verdict(&LIMITS), Verdict::Close(Reason::Evicted));
        // Only the busy one is left: nothing to evict, and it is never told to close.
        assert!(!room.evict_one());
        assert!(matches!(busy.verdict(&LIMITS), Verdict::WaitUntil(_)));
        drop(_s2);
        assert_eq!(room.len(), 2);
    }
}
