//! The layout files of journaled writes, written after the write is acknowledged.
//!
//! A journaled write is durable once its entry is in every replica's journal (see
//! [`super::journal`]); its files in the layout only make it visible, and a replay writes
//! them again after a crash. So they are written by one worker thread per replica, while
//! the writer goes on: a small file's close then waits for one fdatasync, and its four
//! directory and file creations run on another core (on ext4 they cost more than the
//! fdatasync, and more than everything else a close does).
//!
//! Every operation that reads the store (or writes in place) first waits until the
//! workers have written what was queued before it ([`ApplyQueue::settle`]), so that no
//! reader of this process sees the store without a write it was told is done. Each
//! replica's queue is bounded in jobs and bytes: a writer waits for room rather than
//! letting the backlog (and the memory it holds) grow.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use super::journal::{Entry, SegmentHold};

/// Jobs one replica's queue holds at most.
pub const MAX_JOBS: usize = 512;
/// Bytes of entries one replica's queue holds at most (and more only for one entry larger
/// than this).
pub const MAX_BYTES: usize = 16 << 20;

/// Why [`ApplyQueue::wait_for_work`] returned.
#[derive(Debug, PartialEq, Eq)]
pub enum Wake {
    Job,
    Idle,
    Closed,
}

/// A journaled write's layout files to write on one replica.
pub struct Job {
    pub entry: Arc<Entry>,
    /// Dropped when every replica's job is done: until then the segment that holds the
    /// entry is not checkpointed.
    pub hold: Arc<SegmentHold>,
    /// A deferred entry: the offset its replica's log must be durable to before the
    /// layout files are written (see [`super::journal`]).
    pub durable_at: Option<u64>,
}

impl Job {
    /// What the job counts for against [`MAX_BYTES`].
    pub fn bytes(&self) -> usize {
        let data = match &self.entry.data {
            super::journal::EntryData::Inline(d) => d.len(),
            _ => 0,
        };
        data + self.entry.record.len() + self.entry.key.len()
    }
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    bytes: usize,
    /// Jobs pushed and jobs finished (or forgotten) since the queue was made.
    pushed: u64,
    done: u64,
    worker_started: bool,
    closed: bool,
    /// Test hook: the worker takes no job while set.
    paused: bool,
    /// Callers in [`ApplyQueue::settle`] or waiting for room in [`ApplyQueue::push`].
    waiting: usize,
}

/// One replica's queue of jobs, with its worker's progress.
#[derive(Default)]
pub struct ApplyQueue {
    state: Mutex<State>,
    changed: Condvar,
}

impl ApplyQueue {
    /// Queues `job`, first waiting while the queue is full. Returns true when the queue has
    /// no worker yet: the caller starts one.
    pub fn push(&self, job: Job) -> bool {
        let n = job.bytes();
        let mut s = self.state.lock();
        while s.worker_started
            && !s.jobs.is_empty()
            && (s.jobs.len() >= MAX_JOBS || s.bytes + n > MAX_BYTES)
        {
            s.waiting += 1;
            self.changed.wait(&mut s);
            s.waiting -= 1;
        }
        s.jobs.push_back(job);
        s.bytes += n;
        s.pushed += 1;
        self.changed.notify_all();
        !std::mem::replace(&mut s.worker_started, true)
    }

    /// The oldest job, if any; it counts as pending until [`Self::finish`].
    pub fn try_pop(&self) -> Option<Job> {
        self.state.lock().jobs.pop_front()
    }

    /// Counts a popped job of `bytes` as done.
    pub fn finish(&self, bytes: usize) {
        let mut s = self.state.lock();
        s.done += 1;
        s.bytes -= bytes;
        self.changed.notify_all();
    }

    /// Pops and runs every job queued, on the calling thread (`run` drops the job, and
    /// with it the hold).
    pub fn drain(&self, run: &mut dyn FnMut(Job)) {
        while let Some(job) = self.try_pop() {
            let n = job.bytes();
            run(job);
            self.finish(n);
        }
    }

    /// Waits until a job is queued, the queue is closed, or `poll` has passed (the worker
    /// then checks that its store still exists).
    pub fn wait_for_work(&self, poll: Duration) -> Wake {
        let mut s = self.state.lock();
        loop {
            if !s.jobs.is_empty() && !s.paused {
                return Wake::Job;
            }
            if s.closed {
                return Wake::Closed;
            }
            if self.changed.wait_for(&mut s, poll).timed_out() && (s.jobs.is_empty() || s.paused) {
                return if s.closed { Wake::Closed } else { Wake::Idle };
            }
        }
    }

    /// Test hook: holds the worker off its jobs (`true`) or lets it go on. A read settles
    /// by waiting for the jobs, so it waits while they are held.
    pub fn pause(&self, paused: bool) {
        self.state.lock().paused = paused;
        self.changed.notify_all();
    }

    /// Waits until every job queued before this call is done.
    pub fn settle(&self) {
        let mut s = self.state.lock();
        let target = s.pushed;
        while s.done < target {
            s.waiting += 1;
            self.changed.wait(&mut s);
            s.waiting -= 1;
        }
    }

    /// Whether someone waits for the worker (to settle, or for room): it should not wait
    /// for anything else meanwhile.
    pub fn waited_on(&self) -> bool {
        let s = self.state.lock();
        s.waiting > 0 || s.closed
    }

    /// Jobs and bytes queued and not yet done.
    pub fn backlog(&self) -> (usize, usize) {
        let s = self.state.lock();
        ((s.pushed - s.done) as usize, s.bytes)
    }

    /// Stops the worker once the queue is empty.
    pub fn close(&self) {
        self.state.lock().closed = true;
        self.changed.notify_all();
    }

    /// Drops every queued job unwritten, as a killed process would (test hook: their
    /// entries are in the journal, for the next open to replay).
    ///
    /// A job the worker has popped is still running: its bytes stay counted until its
    /// [`Self::finish`] (zeroing them here made that finish underflow and kill the worker
    /// before it woke a waiting settle, which then waited for good).
    pub fn forget(&self) {
        let mut s = self.state.lock();
        let n = s.jobs.len() as u64;
        let bytes: usize = s.jobs.drain(..).map(|j| j.bytes()).sum();
        s.bytes -= bytes;
        s.done += n;
        self.changed.notify_all();
    }

    /// The worker could not be started (the caller ran the queue itself): the next push
    /// asks for one again.
    pub fn worker_failed_to_start(&self) {
        self.state.lock().worker_started = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::local::journal::{EntryData, Journal};

    fn job(journal: &Journal, key: &str, len: usize) -> Job {
        let (w, _) = journal.begin().unwrap();
        Job {
            entry: Arc::new(Entry {
                key: key.into(),
                id: "1".into(),
                record: vec![],
                data: EntryData::Inline(vec![0; len]),
            }),
            hold: Arc::new(w.into_hold()),
            durable_at: None,
        }
    }

    #[test]
    fn settle_waits_for_what_was_queued_before_it_and_full_queues_wait_for_room() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::new(vec![(0, dir.path().to_path_buf())]);
        let q = Arc::new(ApplyQueue::default());
        assert!(
            q.push(job(&journal, "a", 10)),
            "the first push starts the worker"
        );
        assert!(!q.push(job(&journal, "b", 10)));
        assert_eq!(q.backlog().0, 2);
        let done = Arc::new(Mutex::new(Vec::new()));
        let worker = {
            let (q, done) = (q.clone(), done.clone());
            std::thread::spawn(move || {
                loop {
                    match q.wait_for_work(Duration::from_millis(10)) {
                        Wake::Closed => return,
                        Wake::Idle => continue,
                        Wake::Job => {}
                    }
                    std::thread::sleep(Duration::from_millis(20));
                    q.drain(&mut |j| done.lock().push(j.entry.key.clone()));
                }
            })
        };
        q.settle();
        assert_eq!(*done.lock(), vec!["a", "b"]);
        // An idle worker keeps waiting for work.
        std::thread::sleep(Duration::from_millis(50));
        assert!(!q.push(job(&journal, "c", 10)));
        q.settle();
        assert_eq!(done.lock().len(), 3);
        // Bytes: a job that does not fit waits until the queue has room.
        for i in 0..4 {
            q.push(job(&journal, &format!("big{i}"), MAX_BYTES / 2));
            assert!(q.backlog().1 <= MAX_BYTES);
        }
        q.settle();
        assert_eq!(done.lock().len(), 7);
        assert_eq!(q.backlog(), (0, 0));
        q.close();
        worker.join().unwrap();
    }

    /// tests/journal's abandon forgets the queues while a worker may be writing a job it
    /// popped: that job's finish must still balance the counts.
    #[test]
    fn forgetting_the_queue_leaves_a_popped_job_to_finish() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::new(vec![(0, dir.path().to_path_buf())]);
        let q = ApplyQueue::default();
        q.push(job(&journal, "running", 10));
        q.push(job(&journal, "queued", 20));
        let running = q.try_pop().unwrap();
        q.forget();
        assert_eq!(q.backlog(), (1, running.bytes()));
        q.finish(running.bytes());
        assert_eq!(q.backlog(), (0, 0));
        q.settle();
    }
}
