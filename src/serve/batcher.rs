//! Running a model version's forward passes for the server: inline or batched.
//!
//! **Inline** (`--max-batch 1` on our CPU kernels, the default): every HTTP worker thread
//! runs its request's forward pass itself, on an engine of its own taken from a pool (one
//! engine per worker thread, weights included). No request waits for another's pass and
//! none is handed to another thread and back: that hand-off (a futex wake, two context
//! switches) cost about as much as a whole batch-1 pass of the reference CNN. A worker
//! is busy for the length of one pass, so this suits models whose pass takes well under
//! a millisecond or so; bigger models want `--max-batch` above 1.
//!
//! **Dynamic batching**: images from many requests are merged into one forward pass.
//! One worker thread owns the model's [`Engine`]. It takes the first queued request,
//! then keeps taking requests until `max_batch` images are gathered or `max_wait` has
//! passed since the first, runs them as one batch and hands each request its logits.
//! A batch pays where a model or device costs less per image in batches (large models,
//! GPUs); our CPU kernels cost about the same per image at batch 1 and 64 on one thread,
//! so on CPU it mainly keeps one pass per model in flight (README: serving figures).
//!
//! The queue is bounded ([`QUEUE_JOBS`]): an overloaded model answers "retry later" at
//! once instead of growing memory; a forward pass that panics fails its batch's requests
//! and the worker goes on.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::runtime::Engine;

/// When the worker stops gathering and runs the batch.
#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    /// Images per forward pass at most (a single larger request still runs whole).
    pub max_batch: usize,
    /// How long to wait for more requests after the first one of a batch.
    pub max_wait: Duration,
}

/// Requests waiting for a model at most; more are refused with [`BatchError::Overloaded`].
pub const QUEUE_JOBS: usize = 1024;

/// Why a request got no logits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// The queue holds [`QUEUE_JOBS`] requests.
    #[error("the model's queue is full ({QUEUE_JOBS} requests waiting); retry later")]
    Overloaded,
    /// The request's values do not make whole images (a caller bug, not a client's).
    #[error("{values} values do not make {count} images of {per_image}")]
    Shape {
        /// Values given.
        values: usize,
        /// Images claimed.
        count: usize,
        /// Values per image.
        per_image: usize,
    },
    /// The forward pass panicked on the batch this request was in.
    #[error("the forward pass failed on this batch (see the server's log)")]
    Failed,
    /// The worker thread is gone.
    #[error("the model stopped running")]
    Stopped,
}

/// What a request gets back.
pub type Answer = oneshot::Receiver<Result<Vec<f32>, BatchError>>;

struct Job {
    images: Vec<f32>,
    count: usize,
    reply: oneshot::Sender<Result<Vec<f32>, BatchError>>,
    /// When it was queued (its queue time ends when its batch starts).
    queued_at: Instant,
}

/// What one forward pass did, for metrics: its images, how long it computed, and how
/// long each of its requests waited in the queue before it started.
#[derive(Debug, Clone)]
pub struct BatchStats {
    /// Images in the pass.
    pub images: usize,
    /// The forward pass, wall time.
    pub compute: Duration,
    /// Per request in the pass: queued until the pass started.
    pub waits: Vec<Duration>,
}

/// How a model version's forward passes run; shared by the handlers.
pub struct Batcher {
    mode: Mode,
    input_len: usize,
}

enum Mode {
    /// Queued to a batching thread.
    Thread(SyncSender<Job>),
    /// Run by the caller on a pooled engine.
    Inline(Pool),
}

/// Engines for inline passes: a caller takes one, runs and puts it back, never holding
/// it across an `.await`, so a caller that finds the pool empty (more threads calling
/// than engines) waits at most one forward pass.
struct Pool {
    engines: Mutex<Slots>,
    returned: Condvar,
    classes: usize,
    on_batch: Box<dyn Fn(BatchStats) + Send + Sync>,
}

/// The free engines, and how many callers wait for one.
struct Slots {
    free: Vec<Box<dyn Engine>>,
    waiting: usize,
}

impl Pool {
    fn take(&self) -> Box<dyn Engine> {
        // A poisoned lock only means a panic elsewhere between take and put (there is
        // none: passes run outside it); the engines in it are whole.
        let mut slots = self.engines.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(engine) = slots.free.pop() {
                return engine;
            }
            slots.waiting += 1;
            slots = self
                .returned
                .wait(slots)
                .unwrap_or_else(PoisonError::into_inner);
            slots.waiting -= 1;
        }
    }

    fn put(&self, engine: Box<dyn Engine>) {
        let mut slots = self.engines.lock().unwrap_or_else(PoisonError::into_inner);
        slots.free.push(engine);
        // std's `notify_one` is a futex syscall whether or not anyone waits (strace: one
        // per request); callers rarely wait, so wake only when one does.
        let wake = slots.waiting > 0;
        drop(slots);
        if wake {
            self.returned.notify_one();
        }
    }

    fn run(&self, images: &[f32], count: usize) -> Result<Vec<f32>, BatchError> {
        let mut logits = Vec::with_capacity(count * self.classes);
        let queued_at = Instant::now();
        // Nothing between take and put may panic outside `catch_unwind`: the engine would
        // be lost to the pool.
        let mut engine = self.take();
        let started = Instant::now();
        // Flush-to-zero for the pass, as on the batching thread, whatever the worker's
        // own setting (the CLI's threads inherit it from the main thread).
        let ran = catch_unwind(AssertUnwindSafe(|| {
            crate::nn::denormals::with_denormals_flushed(|| {
                engine.predict(images, count, &mut logits)
            })
        }));
        let compute = started.elapsed();
        self.put(engine);
        if let Some(why) = failure(ran) {
            crate::io::log_line(format_args!(
                "mlops serve: the forward pass failed on a request of {count} images: {why}"
            ));
            return Err(BatchError::Failed);
        }
        (self.on_batch)(BatchStats {
            images: count,
            compute,
            // Waiting for a free engine (none, unless more threads call than engines).
            waits: vec![started.saturating_duration_since(queued_at)],
        });
        Ok(logits)
    }
}

/// Why a forward pass gave no logits: its error, or what it panicked with.
fn failure(ran: std::thread::Result<crate::Result<()>>) -> Option<String> {
    match ran {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(panic) => Some(
            panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default(),
        ),
    }
}

impl Batcher {
    /// Starts the worker thread; `on_batch` is called after every forward pass with what it
    /// did (metrics). The worker ends when the `Batcher` is dropped.
    ///
    /// # Errors
    /// The operating system's error when the thread cannot be created.
    pub fn spawn(
        mut engine: Box<dyn Engine>,
        config: BatchConfig,
        on_batch: impl Fn(BatchStats) + Send + 'static,
    ) -> std::io::Result<Self> {
        let input_len = engine.plan().input_len;
        let (jobs, queue) = mpsc::sync_channel::<Job>(QUEUE_JOBS);
        std::thread::Builder::new()
            .name("mlops-batcher".into())
            .spawn(move || {
                crate::nn::denormals::flush_denormals_on_this_thread();
                run_worker(engine.as_mut(), &queue, config, &on_batch)
            })?;
        Ok(Batcher {
            mode: Mode::Thread(jobs),
            input_len,
        })
    }

    /// Runs passes inline ([module docs](self)) on `engines`, all of one model version;
    /// `on_batch` is called after every pass (from the caller's thread).
    ///
    /// # Panics
    /// When `engines` is empty.
    pub fn inline(
        engines: Vec<Box<dyn Engine>>,
        on_batch: impl Fn(BatchStats) + Send + Sync + 'static,
    ) -> Self {
        let plan = engines.first().expect("at least one engine").plan();
        let (input_len, classes) = (plan.input_len, plan.classes);
        Batcher {
            mode: Mode::Inline(Pool {
                engines: Mutex::new(Slots {
                    free: engines,
                    waiting: 0,
                }),
                returned: Condvar::new(),
                classes,
                on_batch: Box::new(on_batch),
            }),
            input_len,
        }
    }

    /// Logits (`[count, classes]`) of `count` preprocessed images (`[count, h, w, c]`):
    /// run here (inline) or queued to the batching thread and awaited.
    ///
    /// # Errors
    /// As [`Batcher::submit`], and [`BatchError::Failed`] when the pass failed.
    pub async fn run(&self, images: &[f32], count: usize) -> Result<Vec<f32>, BatchError> {
        match &self.mode {
            Mode::Inline(pool) => {
                self.check(images, count)?;
                pool.run(images, count)
            }
            Mode::Thread(_) => self
                .submit(images.to_vec(), count)?
                .await
                .map_err(|_| BatchError::Stopped)?,
        }
    }

    fn check(&self, images: &[f32], count: usize) -> Result<(), BatchError> {
        if count == 0 || images.len() != count * self.input_len {
            return Err(BatchError::Shape {
                values: images.len(),
                count,
                per_image: self.input_len,
            });
        }
        Ok(())
    }

    /// Queues `count` images (`[count, h, w, c]`, preprocessed) and returns where their
    /// logits (`[count, classes]`) will arrive; refused at once when the queue is full.
    /// Inline, the pass runs here and the answer is already there.
    ///
    /// # Errors
    /// - [`BatchError::Shape`] when `count` is 0 or `images` does not hold `count` images
    ///   of the model's input length.
    /// - [`BatchError::Overloaded`] when [`QUEUE_JOBS`] requests are already waiting.
    /// - [`BatchError::Stopped`] when the worker thread has ended.
    pub fn submit(&self, images: Vec<f32>, count: usize) -> Result<Answer, BatchError> {
        self.check(&images, count)?;
        let (reply, answer) = oneshot::channel();
        let jobs = match &self.mode {
            Mode::Thread(jobs) => jobs,
            Mode::Inline(pool) => {
                let _ = reply.send(pool.run(&images, count));
                return Ok(answer);
            }
        };
        let job = Job {
            images,
            count,
            reply,
            queued_at: Instant::now(),
        };
        match jobs.try_send(job) {
            Ok(()) => Ok(answer),
            Err(TrySendError::Full(_)) => Err(BatchError::Overloaded),
            Err(TrySendError::Disconnected(_)) => Err(BatchError::Stopped),
        }
    }
}

fn run_worker(
    engine: &mut dyn Engine,
    queue: &Receiver<Job>,
    config: BatchConfig,
    on_batch: &dyn Fn(BatchStats),
) {
    let classes = engine.plan().classes;
    let (mut x, mut logits) = (Vec::new(), Vec::new());
    // A job that would have overfilled the last batch starts the next one.
    let mut carried: Option<Job> = None;
    loop {
        let first = match carried.take() {
            Some(job) => job,
            None => match queue.recv() {
                Ok(job) => job,
                Err(_) => return,
            },
        };
        let deadline = Instant::now() + config.max_wait;
        let mut images = first.count;
        let mut batch = vec![first];
        while images < config.max_batch {
            let left = deadline.saturating_duration_since(Instant::now());
            let next = if left.is_zero() {
                queue.try_recv().map_err(|_| RecvTimeoutError::Timeout)
            } else {
                queue.recv_timeout(left)
            };
            match next {
                Ok(job) if images + job.count > config.max_batch => {
                    carried = Some(job);
                    break;
                }
                Ok(job) => {
                    images += job.count;
                    batch.push(job);
                }
                Err(_) => break,
            }
        }
        x.clear();
        for job in &batch {
            x.extend_from_slice(&job.images);
        }
        // An error fails only this batch; a panic in a kernel (a bug) is caught so that it
        // too fails only this batch and the server keeps serving.
        let started = Instant::now();
        let ran = catch_unwind(AssertUnwindSafe(|| engine.predict(&x, images, &mut logits)));
        let compute = started.elapsed();
        if let Some(why) = failure(ran) {
            crate::io::log_line(format_args!(
                "mlops serve: the forward pass failed on a batch of {images} images: {why}"
            ));
            for job in batch {
                let _ = job.reply.send(Err(BatchError::Failed));
            }
            continue;
        }
        on_batch(BatchStats {
            images,
            compute,
            waits: batch
                .iter()
                .map(|job| started.saturating_duration_since(job.queued_at))
                .collect(),
        });
        let mut at = 0;
        for job in batch {
            let len = job.count * classes;
            // The requester may have gone (client closed the connection): nothing to do.
            let _ = job.reply.send(Ok(logits[at..at + len].to_vec()));
            at += len;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelSpec;
    use crate::nn::Plan;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn session() -> Box<dyn Engine> {
        let plan = Plan::compile(&ModelSpec::reference_cnn()).unwrap();
        Box::new(crate::runtime::CpuEngine::from_params(&plan, plan.init_params(3), 1).unwrap())
    }

    fn image(seed: usize) -> Vec<f32> {
        (0..784)
            .map(|i| ((i * 31 + seed * 17) % 256) as f32 / 255.0)
            .collect()
    }

    /// Requests queued together run as one forward pass, each gets the logits of its own
    /// images (the same as running them alone), and `max_batch` splits the rest.
    #[test]
    fn merges_queued_requests_and_routes_the_logits_back() {
        let batches = Arc::new(AtomicUsize::new(0));
        let counted = batches.clone();
        let config = BatchConfig {
            max_batch: 6,
            max_wait: Duration::from_secs(2),
        };
        let batcher = Batcher::spawn(session(), config, move |_| {
            counted.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
        // Eight requests of one image: 6 fill the first batch at once, 2 wait for more
        // until `max_wait`.
        let answers: Vec<_> = (0..8)
            .map(|i| batcher.submit(image(i), 1).unwrap())
            .collect();
        let got: Vec<Vec<f32>> = answers
            .into_iter()
            .map(|a| a.blocking_recv().unwrap().unwrap())
            .collect();
        assert_eq!(batches.load(Ordering::SeqCst), 2);
        let mut alone = session();
        for (i, logits) in got.iter().enumerate() {
            let mut want = Vec::new();
            alone.predict(&image(i), 1, &mut want).unwrap();
            for (a, b) in want.iter().zip(logits) {
                assert!((a - b).abs() < 1e-4, "request {i}: {a} vs {b}");
            }
        }
    }

    /// With no wait, a lone request runs at once; a request larger than `max_batch` runs
    /// whole; values that are not whole images are refused, not run.
    #[test]
    fn no_wait_and_oversized_requests() {
        let config = BatchConfig {
            max_batch: 2,
            max_wait: Duration::ZERO,
        };
        let batcher = Batcher::spawn(session(), config, |_| {}).unwrap();
        let five: Vec<f32> = (0..5).flat_map(image).collect();
        let logits = batcher.submit(five, 5).unwrap().blocking_recv().unwrap();
        assert_eq!(logits.unwrap().len(), 50);
        let one = batcher
            .submit(image(9), 1)
            .unwrap()
            .blocking_recv()
            .unwrap();
        assert_eq!(one.unwrap().len(), 10);
        assert!(matches!(
            batcher.submit(vec![0.0; 700], 1),
            Err(BatchError::Shape { .. })
        ));
    }

    /// A CPU engine that panics on an image whose first value is negative (a kernel bug
    /// stands in for), and counts its passes.
    struct Flaky {
        inner: Box<dyn Engine>,
        passes: Arc<AtomicUsize>,
    }

    impl Engine for Flaky {
        fn predict(&mut self, x: &[f32], batch: usize, logits: &mut Vec<f32>) -> crate::Result<()> {
            assert!(x[0] >= 0.0, "a kernel bug");
            self.passes.fetch_add(1, Ordering::SeqCst);
            self.inner.predict(x, batch, logits)
        }
        fn plan(&self) -> &Plan {
            self.inner.plan()
        }
        fn compute(&self) -> String {
            self.inner.compute()
        }
        fn preprocess(&self) -> &crate::data::Preprocess {
            self.inner.preprocess()
        }
    }

    /// Inline: requests from more threads than engines each get their own images'
    /// logits (callers wait for a free engine), every pass is reported, a pass that
    /// panics fails only its request and its engine goes on serving, and values that are
    /// not whole images are refused before any pass.
    #[test]
    fn inline_passes_share_a_pool_of_engines() {
        let passes = Arc::new(AtomicUsize::new(0));
        let reported = Arc::new(AtomicUsize::new(0));
        let engines: Vec<Box<dyn Engine>> = (0..2)
            .map(|_| {
                Box::new(Flaky {
                    inner: session(),
                    passes: passes.clone(),
                }) as Box<dyn Engine>
            })
            .collect();
        let counted = reported.clone();
        let batcher = Arc::new(Batcher::inline(engines, move |stats| {
            assert_eq!(stats.waits.len(), 1);
            counted.fetch_add(stats.images, Ordering::SeqCst);
        }));
        let mut alone = session();
        let want: Vec<Vec<f32>> = (0..6)
            .map(|i| {
                let mut logits = Vec::new();
                alone.predict(&image(i), 1, &mut logits).unwrap();
                logits
            })
            .collect();
        let threads: Vec<_> = (0..6)
            .map(|i| {
                let batcher = batcher.clone();
                std::thread::spawn(move || {
                    (0..20)
                        .map(|_| {
                            let answer = batcher.submit(image(i), 1).unwrap();
                            answer.blocking_recv().unwrap().unwrap()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for (i, thread) in threads.into_iter().enumerate() {
            for logits in thread.join().unwrap() {
                assert_eq!(logits, want[i], "thread {i}");
            }
        }
        assert_eq!(passes.load(Ordering::SeqCst), 120);
        assert_eq!(reported.load(Ordering::SeqCst), 120);
        let mut bad = image(0);
        bad[0] = -1.0;
        let failed = batcher.submit(bad, 1).unwrap().blocking_recv().unwrap();
        assert_eq!(failed, Err(BatchError::Failed));
        // Both engines still serve (one of them just panicked).
        let pair: Vec<f32> = image(0).into_iter().chain(image(1)).collect();
        for _ in 0..4 {
            let logits = batcher.submit(pair.clone(), 2).unwrap().blocking_recv();
            assert_eq!(
                logits.unwrap().unwrap(),
                [want[0].clone(), want[1].clone()].concat()
            );
        }
        assert!(matches!(
            batcher.submit(vec![0.0; 700], 1),
            Err(BatchError::Shape { .. })
        ));
        assert_eq!(passes.load(Ordering::SeqCst), 124);
    }
}
