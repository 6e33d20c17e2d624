//! Dynamic batching: images from many requests are merged into one forward pass.
//!
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

/// The sending side of a model's batching worker; cheap to share across handlers.
pub struct Batcher {
    jobs: SyncSender<Job>,
    input_len: usize,
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
        Ok(Batcher { jobs, input_len })
    }

    /// Queues `count` images (`[count, h, w, c]`, preprocessed) and returns where their
    /// logits (`[count, classes]`) will arrive; refused at once when the queue is full.
    ///
    /// # Errors
    /// - [`BatchError::Shape`] when `count` is 0 or `images` does not hold `count` images
    ///   of the model's input length.
    /// - [`BatchError::Overloaded`] when [`QUEUE_JOBS`] requests are already waiting.
    /// - [`BatchError::Stopped`] when the worker thread has ended.
    pub fn submit(&self, images: Vec<f32>, count: usize) -> Result<Answer, BatchError> {
        if count == 0 || images.len() != count * self.input_len {
            return Err(BatchError::Shape {
                values: images.len(),
                count,
                per_image: self.input_len,
            });
        }
        let (reply, answer) = oneshot::channel();
        let job = Job {
            images,
            count,
            reply,
            queued_at: Instant::now(),
        };
        match self.jobs.try_send(job) {
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
        let failure = match ran {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(panic) => Some(
                panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default(),
            ),
        };
        if let Some(why) = failure {
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
}
