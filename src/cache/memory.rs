//! A global memory budget for write buffers and read-ahead, in units of 64 KiB: writers wait
//! while it is spent (slowing them down instead of growing without bound), read-ahead takes
//! only what is free (it is an optimisation, and waiting for it would delay nobody's data).
//! Idle pooled buffers ([`crate::buffers`]) count as spent too: a reservation that would
//! take the process past the budget with them frees them first.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

const UNIT: usize = 64 << 10;
/// Longest a writer waits for budget. Buffers are held by writers that may sit idle (a file
/// open and not written); past this wait a writer goes on over budget rather than hang.
const MAX_WAIT: Duration = Duration::from_secs(5);

pub struct MemoryBudget {
    sem: Arc<Semaphore>,
    units: u32,
    /// Times a writer waited, and times it gave up waiting.
    pub waits: AtomicU64,
    pub overruns: AtomicU64,
}

/// Budget held for a buffer; returned when dropped.
pub struct Reservation(Option<OwnedSemaphorePermit>);

impl Reservation {
    pub fn none() -> Self {
        Reservation(None)
    }

    /// Bytes this reservation holds.
    pub fn bytes(&self) -> usize {
        self.0.as_ref().map_or(0, |p| p.num_permits() * UNIT)
    }
}

impl MemoryBudget {
    pub fn new(bytes: usize) -> Arc<Self> {
        let units = (bytes / UNIT).clamp(1, u32::MAX as usize >> 4) as u32;
        Arc::new(MemoryBudget {
            sem: Arc::new(Semaphore::new(units as usize)),
            units,
            waits: AtomicU64::new(0),
            overruns: AtomicU64::new(0),
        })
    }

    /// Reserves `bytes`, waiting while the budget is spent (at most [`MAX_WAIT`]).
    pub async fn reserve(&self, bytes: usize) -> Reservation {
        let n = bytes.div_ceil(UNIT).min(self.units as usize) as u32;
        if n == 0 {
            return Reservation::none();
        }
        self.make_room(n);
        if let Ok(p) = self.sem.clone().try_acquire_many_owned(n) {
            return Reservation(Some(p));
        }
        self.waits.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(MAX_WAIT, self.sem.clone().acquire_many_owned(n)).await {
            Ok(Ok(p)) => Reservation(Some(p)),
            _ => {
                self.overruns.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("memory budget spent for {MAX_WAIT:?}: going on over budget");
                Reservation::none()
            }
        }
    }

    /// Reserves `bytes` if they are free now.
    pub fn try_reserve(&self, bytes: usize) -> Option<Reservation> {
        let n = bytes.div_ceil(UNIT).min(self.units as usize) as u32;
        if n == 0 {
            return Some(Reservation::none());
        }
        self.make_room(n);
        self.sem
            .clone()
            .try_acquire_many_owned(n)
            .ok()
            .map(|p| Reservation(Some(p)))
    }

    /// Frees idle pooled buffers that, with `units` more reserved, would take the process
    /// past the budget.
    fn make_room(&self, units: u32) {
        let wanted = self.in_use() + units as usize * UNIT;
        let idle = crate::buffers::idle_bytes();
        let limit = self.units as usize * UNIT;
        if wanted + idle > limit {
            crate::cache::buffers::release_idle(wanted + idle - limit);
        }
    }

    /// Bytes reserved now.
    pub fn in_use(&self) -> usize {
        (self.units as usize - self.sem.available_permits()) * UNIT
    }

    pub fn available(&self) -> usize {
        self.sem.available_permits() * UNIT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waits_then_goes_on() {
        let b = MemoryBudget::new(1 << 20);
        let r1 = b.reserve(1 << 20).await;
        assert_eq!(r1.bytes(), 1 << 20);
        assert_eq!(b.available(), 0);
        // Spent: the next reservation waits for a release...
        let b2 = b.clone();
        let waiter = tokio::spawn(async move { b2.reserve(UNIT).await.bytes() });
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(r1);
        assert_eq!(waiter.await.unwrap(), UNIT);
        // ...and past MAX_WAIT goes on without a reservation.
        let _hold = b.reserve(1 << 20).await;
        let r = b.reserve(UNIT).await;
        assert_eq!(r.bytes(), 0);
        assert_eq!(b.overruns.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn try_reserve_takes_only_what_is_free() {
        let b = MemoryBudget::new(4 * UNIT);
        let r = b.try_reserve(3 * UNIT).expect("free");
        assert!(b.try_reserve(2 * UNIT).is_none());
        assert_eq!(b.try_reserve(UNIT).expect("one unit left").bytes(), UNIT);
        drop(r);
        assert_eq!(b.available(), 4 * UNIT);
    }
}
