//! Every bound on concurrent work and on the memory it holds, in one place: how many renders may
//! queue, how many may fetch and hold an original while they wait, how many bytes downloads may hold,
//! how many render slots there are (AVIF has its own), and how much memory renders may reserve.
//!
//! A miss goes through them in this order (docs/architecture.md):
//!
//! 1. [`Budgets::admit`]: a place in the render queue (`processing_concurrency + queue_size`, AVIF:
//!    `avif_concurrency + avif_queue_size`), taken without waiting; none free is a 503 before any
//!    download is spent on the request.
//! 2. [`Ticket::stage`]: one of `download_concurrency` staging places, held while the original is
//!    fetched and while it waits in memory for a slot. Every download happens under one, so this is
//!    also the download concurrency.
//! 3. [`Budgets::download`]: `max_source_bytes` (the most one download may hold, since
//!    `Content-Length` is not trusted) from `max_inflight_download_mb`.
//! 4. [`Budgets::reserve`]: the render's memory estimate from `max_memory_mb`.
//! 5. [`Budgets::slot`] (and [`Budgets::avif_slot`]): a render slot; the staging place is given back
//!    here.
//!
//! Every place is released on drop, so a requester that goes away frees what it held.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, SemaphorePermit};

use crate::config::Config;
use crate::request::Format;

/// The sizes of every budget (from the configuration; [`BudgetConfig::with_concurrency`] for tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BudgetConfig {
    /// `processing_concurrency`: renders at once.
    pub concurrency: usize,
    /// `queue_size`: renders waiting for a slot (every format but AVIF).
    pub queue_size: usize,
    /// `download_concurrency`: admitted renders that may fetch and hold their original while waiting.
    pub staged: usize,
    /// `avif_concurrency`: AVIF encodes at once.
    pub avif_concurrency: usize,
    /// `avif_queue_size`: AVIF renders waiting for an AVIF slot.
    pub avif_queue_size: usize,
    /// `max_memory_mb`, in bytes: what all renders may reserve at once.
    pub memory_bytes: u64,
    /// `max_inflight_download_mb`, in bytes: what all downloads may hold at once.
    pub download_bytes: u64,
    /// `max_source_bytes`: what one download may hold.
    pub source_bytes: u64,
}

impl BudgetConfig {
    /// The sizes a configuration asks for.
    pub fn from_config(c: &Config) -> BudgetConfig {
        BudgetConfig {
            concurrency: c.capacity.processing_concurrency,
            queue_size: c.capacity.queue_size,
            staged: c.capacity.download_concurrency,
            avif_concurrency: c.capacity.avif_concurrency,
            avif_queue_size: c.capacity.avif_queue_size,
            memory_bytes: c.capacity.max_memory_mb.bytes(),
            download_bytes: c.capacity.max_inflight_download_mb.bytes(),
            source_bytes: c.limits.max_source_bytes.bytes(),
        }
    }

    /// `concurrency` slots and otherwise default sizes (tests, benches).
    pub fn with_concurrency(concurrency: usize) -> BudgetConfig {
        BudgetConfig {
            concurrency,
            queue_size: 4 * concurrency,
            staged: 16,
            avif_concurrency: 1,
            avif_queue_size: 4,
            memory_bytes: 1 << 30,
            download_bytes: 256 << 20,
            source_bytes: 25 << 20,
        }
    }
}

/// Why a budget refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BudgetError {
    /// The render queue for this format is full: 503.
    #[error("processing queue full")]
    Overloaded,
    /// The estimate is larger than the whole memory budget: it could never run (422).
    #[error("over the memory budget")]
    OverMemory,
}

/// Memory is counted in KiB permits: a `u32` of them covers 4 TiB, and a KiB is far below any
/// estimate's precision.
const MEMORY_UNIT: u64 = 1024;

/// Download bytes are counted in MiB permits.
const DOWNLOAD_UNIT: u64 = 1 << 20;

/// The budgets themselves. Shared (`Arc`) by the pipeline and the render pool.
#[derive(Debug)]
pub struct Budgets {
    queue: Queue,
    avif_queue: Queue,
    staging: Arc<Semaphore>,
    download_bytes: Semaphore,
    /// Permits one download takes: `max_source_bytes`, at most the whole download budget.
    download_reservation: u32,
    downloads_current: AtomicUsize,
    downloads_total: AtomicU64,
    slots: Arc<Semaphore>,
    concurrency: usize,
    avif_slots: Arc<Semaphore>,
    memory: Arc<Semaphore>,
    memory_units: u64,
}

/// A bounded queue: a count of admitted renders and its capacity.
#[derive(Debug)]
struct Queue {
    admitted: Arc<AtomicUsize>,
    capacity: usize,
}

impl Queue {
    fn new(capacity: usize) -> Queue {
        Queue {
            admitted: Arc::new(AtomicUsize::new(0)),
            capacity,
        }
    }

    fn len(&self) -> usize {
        self.admitted.load(Ordering::Acquire)
    }
}

/// A render's way through the budgets: its place in the queue and, once it has one, its staging
/// place. Dropping it gives both back.
#[derive(Debug)]
pub struct Ticket {
    admitted: Arc<AtomicUsize>,
    staged: Option<OwnedSemaphorePermit>,
    staging: Arc<Semaphore>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.admitted.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Ticket {
    /// Waits for a staging place: from now until the render gets its slot, this request may fetch
    /// and hold an original. Without the bound every admitted request held its original while it
    /// queued: with `queue_size=64` and 32 connections that was 30 idle 2 MB originals, most of the
    /// peak memory of a busy server.
    pub async fn stage(&mut self) {
        if self.staged.is_none() {
            // The semaphore is never closed.
            self.staged = self.staging.clone().acquire_owned().await.ok();
        }
    }

    /// Gives the staging place back (the render has its slot, or waits elsewhere without holding
    /// anything the place stands for).
    pub fn unstage(&mut self) {
        self.staged = None;
    }
}

/// `max_source_bytes` of the download budget, and one count of the downloads running; both
/// released on drop.
#[derive(Debug)]
pub struct Download<'a> {
    _bytes: SemaphorePermit<'a>,
    current: &'a AtomicUsize,
}

impl Drop for Download<'_> {
    fn drop(&mut self) {
        self.current.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A reservation of the memory budget, released on drop.
#[derive(Debug)]
pub struct Reserved(#[allow(dead_code)] Option<OwnedSemaphorePermit>);

/// A render slot (or an AVIF slot), released on drop.
#[derive(Debug)]
pub struct Slot(#[allow(dead_code)] Option<OwnedSemaphorePermit>);

impl Budgets {
    /// Budgets of the given sizes; every size is at least 1.
    pub fn new(c: BudgetConfig) -> Budgets {
        let concurrency = c.concurrency.max(1);
        let avif_concurrency = c.avif_concurrency.max(1);
        let memory_units = (c.memory_bytes / MEMORY_UNIT).clamp(1, u64::from(u32::MAX));
        let download_units = units(c.download_bytes, DOWNLOAD_UNIT);
        Budgets {
            queue: Queue::new(concurrency + c.queue_size),
            avif_queue: Queue::new(avif_concurrency + c.avif_queue_size),
            staging: Arc::new(Semaphore::new(c.staged.max(1))),
            download_bytes: Semaphore::new(download_units as usize),
            download_reservation: units(c.source_bytes, DOWNLOAD_UNIT).min(download_units),
            downloads_current: AtomicUsize::new(0),
            downloads_total: AtomicU64::new(0),
            slots: Arc::new(Semaphore::new(concurrency)),
            concurrency,
            avif_slots: Arc::new(Semaphore::new(avif_concurrency)),
            memory: Arc::new(Semaphore::new(
                usize::try_from(memory_units).unwrap_or(usize::MAX >> 4),
            )),
            memory_units,
        }
    }

    /// A place in the queue for `format` (AVIF has its own), now or never: a full queue is
    /// [`BudgetError::Overloaded`], so a request the server cannot take costs no download.
    pub fn admit(&self, format: Format) -> Result<Ticket, BudgetError> {
        let queue = if format == Format::Avif {
            &self.avif_queue
        } else {
            &self.queue
        };
        let before = queue.admitted.fetch_add(1, Ordering::AcqRel);
        let ticket = Ticket {
            admitted: queue.admitted.clone(),
            staged: None,
            staging: self.staging.clone(),
        };
        if before >= queue.capacity {
            return Err(BudgetError::Overloaded);
        }
        Ok(ticket)
    }

    /// Waits until the downloads in flight leave room for one more of `max_source_bytes`, and counts
    /// it as running.
    pub async fn download(&self) -> Download<'_> {
        // The semaphore is never closed, so this only waits.
        let bytes = loop {
            if let Ok(p) = self
                .download_bytes
                .acquire_many(self.download_reservation)
                .await
            {
                break p;
            }
        };
        self.downloads_total.fetch_add(1, Ordering::Relaxed);
        self.downloads_current.fetch_add(1, Ordering::AcqRel);
        Download {
            _bytes: bytes,
            current: &self.downloads_current,
        }
    }

    /// Reserves `bytes` of the memory budget, waiting for it; more than the whole budget is
    /// [`BudgetError::OverMemory`] at once.
    pub async fn reserve(&self, bytes: u64) -> Result<Reserved, BudgetError> {
        let units = bytes.div_ceil(MEMORY_UNIT);
        if units > self.memory_units {
            return Err(BudgetError::OverMemory);
        }
        let units = u32::try_from(units).unwrap_or(u32::MAX);
        Ok(Reserved(
            self.memory.clone().acquire_many_owned(units).await.ok(),
        ))
    }

    /// Waits for a render slot.
    pub async fn slot(&self) -> Slot {
        Slot(self.slots.clone().acquire_owned().await.ok())
    }

    /// Waits for an AVIF slot (held besides a render slot: AVIF encodes are the slowest by far).
    pub async fn avif_slot(&self) -> Slot {
        Slot(self.avif_slots.clone().acquire_owned().await.ok())
    }

    /// Whether a background render could start now (see [`Budgets::try_background`]): checked
    /// before any work is spent on one.
    pub fn idle_for_background(&self) -> bool {
        self.queued() == 0
    }

    /// `bytes` of memory for a background render, now or never: only when no foreground render is
    /// waiting (queued, fetching or holding its original) and the memory is free. A background
    /// render takes no slot: it runs on one thread of its own at idle CPU priority
    /// (`image::idle`), so it uses only CPU time no client's render wants, and a client's render
    /// never waits for it.
    pub fn try_background(&self, bytes: u64) -> Option<Reserved> {
        if !self.idle_for_background() {
            return None;
        }
        let units = u32::try_from(bytes.div_ceil(MEMORY_UNIT)).ok()?;
        let reserved = self.memory.clone().try_acquire_many_owned(units).ok()?;
        Some(Reserved(Some(reserved)))
    }

    /// Renders running now.
    pub fn running(&self) -> usize {
        self.concurrency - self.slots.available_permits().min(self.concurrency)
    }

    /// Renders admitted (to either queue) but not running.
    pub fn queued(&self) -> usize {
        (self.queue.len() + self.avif_queue.len()).saturating_sub(self.running())
    }

    /// Bytes of the memory budget reserved now.
    pub fn memory_reserved(&self) -> u64 {
        let free = u64::try_from(self.memory.available_permits()).unwrap_or(u64::MAX);
        self.memory_units.saturating_sub(free) * MEMORY_UNIT
    }

    /// Downloads running now.
    pub fn downloads_current(&self) -> usize {
        self.downloads_current.load(Ordering::Acquire)
    }

    /// Downloads started since start-up.
    pub fn downloads_total(&self) -> u64 {
        self.downloads_total.load(Ordering::Relaxed)
    }
}

/// `bytes` in whole `unit` permits, rounded up, at least 1.
fn units(bytes: u64, unit: u64) -> u32 {
    u32::try_from(bytes.div_ceil(unit).max(1)).unwrap_or(u32::MAX >> 4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Whether `fut` is still pending after a moment (paused clock: the sleep is instant). It cannot
    /// complete while the permits it needs are held, so this is not a race.
    async fn pending<F: std::future::Future>(fut: F) -> bool {
        tokio::time::timeout(Duration::from_millis(50), fut)
            .await
            .is_err()
    }

    #[test]
    fn download_budget_in_mib() {
        assert_eq!(units(0, DOWNLOAD_UNIT), 1);
        assert_eq!(units(1, DOWNLOAD_UNIT), 1);
        assert_eq!(units(1 << 20, DOWNLOAD_UNIT), 1);
        assert_eq!(units((1 << 20) + 1, DOWNLOAD_UNIT), 2);
        // Defaults: 256 MiB in flight, 25 MiB per download: at most 10 downloads hold memory at once.
        assert_eq!(
            units(256 << 20, DOWNLOAD_UNIT) / units(25 << 20, DOWNLOAD_UNIT),
            10
        );
    }

    /// AVIF requests queue on their own: a full AVIF queue refuses AVIF only, and the shared queue
    /// stays open to every other format.
    #[test]
    fn avif_has_its_own_queue() {
        let b = Budgets::new(BudgetConfig {
            queue_size: 2,
            avif_queue_size: 1,
            ..BudgetConfig::with_concurrency(1)
        });
        // avif_concurrency 1 + avif_queue_size 1.
        let a = b.admit(Format::Avif).expect("first AVIF");
        let c = b.admit(Format::Avif).expect("second AVIF");
        assert_eq!(
            b.admit(Format::Avif).map(|_| ()),
            Err(BudgetError::Overloaded)
        );
        // concurrency 1 + queue_size 2, untouched by the AVIF waiters.
        let jpegs: Vec<_> = (0..3)
            .map(|_| b.admit(Format::Jpeg).expect("JPEG admitted"))
            .collect();
        assert_eq!(
            b.admit(Format::Webp).map(|_| ()),
            Err(BudgetError::Overloaded)
        );
        assert_eq!(b.queued(), 5);
        drop((a, c, jpegs));
        assert_eq!(b.queued(), 0);
    }

    /// A refused admission gives its count back, so a burst of refusals never shrinks the queue.
    #[test]
    fn refusals_leave_the_queue_as_it_was() {
        let b = Budgets::new(BudgetConfig {
            queue_size: 0,
            ..BudgetConfig::with_concurrency(1)
        });
        let only = b.admit(Format::Png).expect("the one place");
        for _ in 0..100 {
            assert!(b.admit(Format::Png).is_err());
        }
        drop(only);
        assert!(b.admit(Format::Png).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn staging_places_are_bounded_and_given_back() {
        let b = Budgets::new(BudgetConfig {
            staged: 1,
            ..BudgetConfig::with_concurrency(1)
        });
        let mut first = b.admit(Format::Jpeg).expect("admitted");
        first.stage().await;
        let mut second = b.admit(Format::Jpeg).expect("admitted");
        assert!(pending(second.stage()).await, "one staging place only");
        first.unstage();
        second.stage().await;
        drop(second);
        let mut third = b.admit(Format::Jpeg).expect("admitted");
        // Dropping a staged ticket gives its place back too.
        assert!(!pending(third.stage()).await);
    }

    #[tokio::test(start_paused = true)]
    async fn downloads_hold_max_source_bytes_of_the_budget() {
        let b = Budgets::new(BudgetConfig {
            download_bytes: 50 << 20,
            source_bytes: 25 << 20,
            ..BudgetConfig::with_concurrency(1)
        });
        let one = b.download().await;
        let two = b.download().await;
        assert_eq!(b.downloads_current(), 2);
        assert!(pending(b.download()).await, "a third would exceed 50 MiB");
        drop(one);
        let three = b.download().await;
        assert_eq!((b.downloads_current(), b.downloads_total()), (2, 3));
        drop((two, three));
        assert_eq!(b.downloads_current(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn memory_is_reserved_and_refused_when_it_can_never_fit() {
        let b = Budgets::new(BudgetConfig {
            memory_bytes: 4 << 20,
            ..BudgetConfig::with_concurrency(1)
        });
        assert_eq!(
            b.reserve(5 << 20).await.map(|_| ()),
            Err(BudgetError::OverMemory)
        );
        let three = b.reserve(3 << 20).await.expect("fits");
        assert_eq!(b.memory_reserved(), 3 << 20);
        assert!(pending(b.reserve(2 << 20)).await, "waits for room");
        drop(three);
        assert_eq!(b.memory_reserved(), 0);
    }

    /// The background lane starts only when no foreground render waits, and within the memory
    /// budget; it takes no slot.
    #[tokio::test(start_paused = true)]
    async fn background_renders_only_start_when_no_client_waits() {
        let b = Budgets::new(BudgetConfig {
            queue_size: 1,
            ..BudgetConfig::with_concurrency(1)
        });
        let background = b.try_background(1 << 20).expect("an idle pool");
        assert_eq!(b.running(), 0, "no slot taken");
        assert_eq!(b.memory_reserved(), 1 << 20);
        drop(background);
        // A foreground request waiting in the queue (here: the queue full): none starts.
        let waiting = b.admit(Format::Jpeg).expect("admitted");
        let full = b.admit(Format::Jpeg).expect("admitted");
        assert!(b.admit(Format::Jpeg).is_err(), "the queue is full");
        assert!(b.try_background(1 << 20).is_none());
        drop((waiting, full));
        // More memory than is free: none.
        assert!(b.try_background(2 << 30).is_none());
        assert!(b.try_background(1 << 20).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn slots_count_running_renders() {
        let b = Budgets::new(BudgetConfig::with_concurrency(2));
        let t = b.admit(Format::Jpeg).expect("admitted");
        assert_eq!((b.running(), b.queued()), (0, 1));
        let s = b.slot().await;
        assert_eq!((b.running(), b.queued()), (1, 0));
        let _other = b.slot().await;
        assert!(pending(b.slot()).await, "two slots only");
        drop((s, t));
        assert_eq!(b.running(), 1);
    }
}
