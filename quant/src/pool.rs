//! The worker threads the products run on: started once, kept for the process, and
//! woken per product. A token's forward pass runs a few hundred small products back to
//! back, so an idle worker spins briefly before it sleeps: waking a sleeping thread costs
//! about as much as one of those products.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker spins for the next product before it sleeps.
const SPIN: Duration = Duration::from_micros(200);

/// A task body, with its lifetime erased: [`Pool::run`] does not return until every task
/// of its job has finished, and a worker can only claim tasks of the job it read.
#[derive(Clone, Copy)]
struct TaskFn(*const (dyn Fn(usize) + Sync));

// SAFETY: the pointee is `Sync`, and `Pool::run` keeps it alive while tasks can run.
unsafe impl Send for TaskFn {}

struct Job {
    generation: u32,
    tasks: usize,
    body: TaskFn,
}

struct Shared {
    job: Mutex<Option<Job>>,
    wake: Condvar,
    /// The current job's generation, for spinning workers to notice without the lock.
    generation: AtomicUsize,
    /// `generation << 32 | next task index`: a claim names its job, so a worker late
    /// from one job cannot take a task of the next with the old body.
    claim: AtomicU64,
    done: AtomicUsize,
    stop: AtomicBool,
}

/// A fixed set of worker threads; the calling thread works too.
pub struct Pool {
    shared: Arc<Shared>,
    threads: usize,
    /// One product at a time; another caller waits.
    running: Mutex<u32>,
}

impl Pool {
    /// A pool that runs on `threads` threads, the caller's included.
    pub fn new(threads: usize) -> Self {
        let shared = Arc::new(Shared {
            job: Mutex::new(None),
            wake: Condvar::new(),
            generation: AtomicUsize::new(0),
            claim: AtomicU64::new(0),
            done: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        });
        for _ in 1..threads.max(1) {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("nanofleet-quant".into())
                .spawn(move || work(&shared))
                .expect("a kernel thread starts");
        }
        Self {
            shared,
            threads: threads.max(1),
            running: Mutex::new(0),
        }
    }

    /// The process's pool, on as many threads as the machine has cores.
    pub fn global() -> &'static Pool {
        static POOL: OnceLock<Pool> = OnceLock::new();
        POOL.get_or_init(|| Pool::new(std::thread::available_parallelism().map_or(1, |n| n.get())))
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `body(i)` for every `i` in `0..tasks`, spread over the pool; returns when all
    /// have finished.
    pub fn run(&self, tasks: usize, body: &(dyn Fn(usize) + Sync)) {
        if tasks == 0 {
            return;
        }
        if self.threads == 1 || tasks == 1 {
            (0..tasks).for_each(body);
            return;
        }
        let mut generation = self.running.lock().unwrap_or_else(|e| e.into_inner());
        *generation = generation.wrapping_add(1);
        let generation = *generation;
        let shared = &self.shared;
        shared.done.store(0, Ordering::Relaxed);
        shared
            .claim
            .store(u64::from(generation) << 32, Ordering::Release);
        {
            // SAFETY (of the erased lifetime): this function returns only after `done`
            // reaches `tasks`, and no claim of this generation succeeds after that.
            let body: *const (dyn Fn(usize) + Sync + '_) = body;
            let body: *const (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(body) };
            *shared.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(Job {
                generation,
                tasks,
                body: TaskFn(body),
            });
        }
        shared
            .generation
            .store(generation as usize, Ordering::Release);
        shared.wake.notify_all();
        run_tasks(shared, generation, tasks, body);
        while shared.done.load(Ordering::Acquire) < tasks {
            std::hint::spin_loop();
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        let _guard = self.shared.job.lock();
        self.shared.wake.notify_all();
    }
}

/// Claims and runs tasks of job `generation` until none is left.
fn run_tasks(shared: &Shared, generation: u32, tasks: usize, body: &(dyn Fn(usize) + Sync)) {
    loop {
        let claim = shared.claim.load(Ordering::Acquire);
        let (claimed_generation, index) = ((claim >> 32) as u32, (claim & 0xFFFF_FFFF) as usize);
        if claimed_generation != generation || index >= tasks {
            return;
        }
        if shared
            .claim
            .compare_exchange_weak(claim, claim + 1, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            body(index);
            shared.done.fetch_add(1, Ordering::AcqRel);
        }
    }
}

fn work(shared: &Shared) {
    let mut seen = 0usize;
    loop {
        // Spin a while for the next job, then sleep until one comes.
        let spin_until = Instant::now() + SPIN;
        let mut spins = 0u32;
        while shared.generation.load(Ordering::Acquire) == seen
            && !shared.stop.load(Ordering::Acquire)
            // Reading the clock costs more than a spin; read it now and then.
            && (!spins.is_multiple_of(256) || Instant::now() < spin_until)
        {
            spins = spins.wrapping_add(1);
            std::hint::spin_loop();
        }
        let job = {
            let mut job = shared.job.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if shared.stop.load(Ordering::Acquire) {
                    return;
                }
                match &*job {
                    Some(j) if j.generation as usize != seen => break,
                    _ => job = shared.wake.wait(job).unwrap_or_else(|e| e.into_inner()),
                }
            }
            let j = job.as_ref().expect("a job is set");
            (j.generation, j.tasks, j.body)
        };
        seen = job.0 as usize;
        // SAFETY: see `TaskFn`; a claim for this generation succeeds only while `run`
        // still waits for the job's tasks.
        let body = unsafe { &*job.2 .0 };
        run_tasks(shared, job.0, job.1, body);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_across_many_jobs() {
        let pool = Pool::new(3);
        for tasks in [0usize, 1, 2, 7, 64, 1000] {
            let counts: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
            pool.run(tasks, &|i| {
                counts[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(
                counts.iter().all(|c| c.load(Ordering::Relaxed) == 1),
                "{tasks} tasks"
            );
        }
    }
}
