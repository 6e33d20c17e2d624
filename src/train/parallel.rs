//! Data-parallel training: N ranks, one shard of the global batch each, gradients summed
//! across ranks, the same Adam update everywhere.
//!
//! # The scheme
//! This is what `torch.nn.parallel.DistributedDataParallel` and Keras'
//! `tf.distribute.MirroredStrategy` do:
//!
//! 1. All ranks start from the same weights ([`broadcast_params`] copies rank 0's, as DDP
//!    does when it wraps a model).
//! 2. Each step, the global batch of `B` images is cut into contiguous shards, one per rank
//!    ([`shard_range`]; uneven splits are fine, a shard may even be empty).
//! 3. Each rank runs forward and backward on its shard with the CPU executor
//!    ([`Executor::train_step`]), which returns the gradient of the mean loss over the
//!    *shard*. The rank multiplies it by `shard / B`, so that the sum over ranks is the
//!    gradient of the mean loss over the *global* batch, exactly what one rank on the
//!    whole batch computes (up to float summation order).
//! 4. The gradients are summed across ranks ([`Collective::all_reduce_sum`], one flat
//!    buffer per step, like one DDP bucket), as are the loss, the correct count and the
//!    shard sizes, so every rank reports the global figures.
//! 5. Every rank applies the same Adam update ([`Adam::update`]) to the same weights with
//!    the same gradients, so the weights stay identical on all ranks without ever being
//!    sent again.
//!
//! [`data_parallel_step`] is steps 3 to 5 on our CPU executor; [`candle_data_parallel_step`]
//! the same on a candle device ([`CandleTrainer`], CUDA or candle's CPU backend), and
//! [`DeviceGroup`] runs one candle rank per device in one process (`mlops train --devices`).
//!
//! # Determinism
//! The sum across ranks is always taken in rank order (`rank 0 + rank 1 + ...`), whatever
//! order the ranks arrive in, so a run is bit-identical from run to run for a given rank
//! count (and executor thread count). It is not bit-identical to a run with another rank
//! count: the images' gradients are summed in another grouping, and each shard's gradient
//! is rounded once more by the `shard / B` scaling. Those differences are float rounding
//! (the tests bound them). With dropout, each rank draws its own masks (the step seed is
//! mixed with the rank), so a dropout model does not follow the single-rank trajectory,
//! as in DDP.
//!
//! # Collectives
//! [`Collective`] is the seam: [`InProcess`] runs N ranks as threads of one process and
//! is what CI tests the data-parallel logic with (`mlops train --devices cpu,cpu`). NCCL
//! (`super::nccl::Nccl`, cargo feature `nccl`: `ncclAllReduce` / `ncclBroadcast` through
//! cudarc's `nccl` module) implements the same trait for GPUs, and sums the gradients in
//! device memory on the training stream ([`Collective::all_reduce_sum_tensor`]), so they
//! are never copied to the host.
//!
//! Multi-process runs (one process per GPU, across nodes) will read the environment that
//! `torchrun` and Slurm wrappers set: `WORLD_SIZE` (number of ranks), `RANK` (this
//! process's rank, `0..WORLD_SIZE`), and `MASTER_ADDR` / `MASTER_PORT` (where rank 0
//! publishes the NCCL unique id for the others to join). [`world_from_env`] parses the
//! first two.

use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::Tensor;

use super::candle::CandleTrainer;
use crate::nn::adam::Adam;
use crate::nn::{BatchStats, Executor};
use crate::{Error, Result};

/// A group of ranks that can sum buffers across ranks and copy one rank's buffer to all.
///
/// Every method is a *collective*: every rank of the group must call it, in the same order,
/// with buffers of the same length (a rank that does not call it makes the others wait,
/// until the implementation's timeout). This is the contract of NCCL's collectives, which
/// a GPU implementation maps the methods onto.
pub trait Collective: Send + Sync {
    /// This rank's index, `0..world_size()`.
    fn rank(&self) -> usize;

    /// The number of ranks in the group.
    fn world_size(&self) -> usize;

    /// Replaces `values`, on every rank, with the element-wise sum of all ranks' `values`
    /// (`ncclAllReduce` with `ncclSum` on `ncclFloat32`, in place).
    ///
    /// # Errors
    /// [`Error::Config`] on every rank when the ranks' buffers differ in length or the
    /// ranks called different collectives; when a rank has left the group (its thread or
    /// process ended or panicked) or did not arrive within the group's timeout.
    fn all_reduce_sum(&self, values: &mut [f32]) -> Result<()>;

    /// As [`Collective::all_reduce_sum`], in f64 (`ncclFloat64`): for totals such as
    /// summed losses and counts, which f32 would round.
    ///
    /// # Errors
    /// As [`Collective::all_reduce_sum`].
    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<()>;

    /// Replaces `values`, on every rank, with rank `root`'s `values` (`ncclBroadcast`
    /// with `ncclFloat32`, in place).
    ///
    /// # Errors
    /// As [`Collective::all_reduce_sum`]; also when `root` is not a rank of the group or
    /// the ranks named different roots.
    fn broadcast(&self, values: &mut [f32], root: usize) -> Result<()>;

    /// [`Collective::all_reduce_sum`] on a candle tensor (f32, any shape): the element-wise
    /// sum of all ranks' `values`, same shape, on the same device. `values` is taken: an
    /// implementation may sum in its storage, so the caller passes a tensor nothing else
    /// reads (a fresh result, not a view of parameters). This default goes through the host
    /// (what [`InProcess`] ranks on the CPU need); NCCL overrides it to sum in device memory
    /// on the device's stream, allocating nothing.
    ///
    /// # Errors
    /// As [`Collective::all_reduce_sum`]; [`Error::Candle`] when `values` is not f32 or the
    /// device fails.
    fn all_reduce_sum_tensor(&self, values: Tensor) -> Result<Tensor> {
        let mut host = values.flatten_all()?.to_vec1::<f32>()?;
        self.all_reduce_sum(&mut host)?;
        Ok(Tensor::from_vec(host, values.shape(), values.device())?)
    }
}

/// How long an [`InProcess`] rank waits for the others in one collective before it gives
/// up and breaks the group (the NCCL process group's default in PyTorch).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// The operation a rank asked for in a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    SumF32,
    SumF64,
    Broadcast { root: usize },
}

impl Op {
    /// This collective's failure on `rank`, for every implementation alike.
    pub(super) fn error(self, rank: usize, problem: &str) -> Error {
        Error::Config(format!(
            "collective {} on rank {rank}: {problem}",
            self.name()
        ))
    }

    fn name(self) -> String {
        match self {
            Op::SumF32 => "all_reduce_sum (f32)".into(),
            Op::SumF64 => "all_reduce_sum (f64)".into(),
            Op::Broadcast { root } => format!("broadcast from rank {root}"),
        }
    }
}

/// A rank's buffer in a round, and the round's result.
#[derive(Debug, Clone)]
pub(super) enum Data {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

impl Data {
    fn len(&self) -> usize {
        match self {
            Data::F32(v) => v.len(),
            Data::F64(v) => v.len(),
        }
    }
}

/// The rendezvous state of a group, behind its mutex.
#[derive(Debug)]
struct Round {
    /// Completed rounds.
    generation: u64,
    /// Each rank's contribution to the round in progress.
    slots: Vec<Option<(Op, Data)>>,
    /// The result of the last completed round (read by every rank before any of them can
    /// complete the next round, since completing it needs every rank's contribution).
    result: Option<Arc<std::result::Result<Data, String>>>,
    /// Why the group can no longer be used: a rank left or timed out.
    broken: Option<String>,
}

#[derive(Debug)]
struct Group {
    world: usize,
    timeout: Duration,
    round: Mutex<Round>,
    wake: Condvar,
}

/// One rank of an in-process group: N ranks as threads of one process, sharing a
/// rendezvous (a mutex and a condition variable).
///
/// The last rank to arrive in a round computes the result for all: the sum in rank order
/// (rank 0 + rank 1 + ...), so results do not depend on thread timing. A rank that waits
/// longer than the group's timeout, or whose peer has been dropped (its thread ended or
/// panicked) while it waits, gets an error instead of hanging, and the group is broken
/// from then on: every later collective on any rank errors at once.
#[derive(Debug)]
pub struct InProcess {
    rank: usize,
    group: Arc<Group>,
}

impl InProcess {
    /// `world` ranks (0, 1, ...) of one group, in rank order, with [`DEFAULT_TIMEOUT`];
    /// hand one to each thread. `world = 0` gives none.
    pub fn group(world: usize) -> Vec<InProcess> {
        Self::group_with_timeout(world, DEFAULT_TIMEOUT)
    }

    /// As [`InProcess::group`], waiting at most `timeout` for the other ranks in each
    /// collective.
    pub fn group_with_timeout(world: usize, timeout: Duration) -> Vec<InProcess> {
        let group = Arc::new(Group {
            world,
            timeout,
            round: Mutex::new(Round {
                generation: 0,
                slots: vec![None; world],
                result: None,
                broken: None,
            }),
            wake: Condvar::new(),
        });
        (0..world)
            .map(|rank| InProcess {
                rank,
                group: Arc::clone(&group),
            })
            .collect()
    }

    fn lock(&self) -> Result<MutexGuard<'_, Round>> {
        self.group.round.lock().map_err(|_| {
            Error::Config(format!(
                "collective on rank {}: the group is broken (a rank panicked inside a collective)",
                self.rank
            ))
        })
    }

    fn error(&self, op: Op, problem: &str) -> Error {
        op.error(self.rank, problem)
    }

    /// One round: contributes `data` for `op` and returns the round's result.
    fn exchange(&self, op: Op, data: Data) -> Result<Arc<std::result::Result<Data, String>>> {
        let group = &*self.group;
        let mut round = self.lock()?;
        if let Some(why) = &round.broken {
            return Err(self.error(op, why));
        }
        let generation = round.generation;
        round.slots[self.rank] = Some((op, data));
        if round.slots.iter().all(Option::is_some) {
            let slots: Vec<(Op, Data)> = round.slots.iter_mut().filter_map(Option::take).collect();
            round.result = Some(Arc::new(combine(slots)));
            round.generation += 1;
            group.wake.notify_all();
        } else {
            let deadline = Instant::now() + group.timeout;
            while round.generation == generation {
                if let Some(why) = &round.broken {
                    return Err(self.error(op, why));
                }
                let now = Instant::now();
                if now >= deadline {
                    let missing: Vec<String> = round
                        .slots
                        .iter()
                        .enumerate()
                        .filter(|(_, s)| s.is_none())
                        .map(|(r, _)| r.to_string())
                        .collect();
                    let why = format!(
                        "rank {} waited {:?} for rank(s) {} to join the collective; the group is broken",
                        self.rank,
                        group.timeout,
                        missing.join(", ")
                    );
                    round.broken = Some(why.clone());
                    group.wake.notify_all();
                    return Err(self.error(op, &why));
                }
                round = group
                    .wake
                    .wait_timeout(round, deadline - now)
                    .map_err(|_| {
                        self.error(
                            op,
                            "the group is broken (a rank panicked inside a collective)",
                        )
                    })?
                    .0;
            }
        }
        round
            .result
            .clone()
            .ok_or_else(|| self.error(op, "internal error: a completed round without a result"))
    }

    fn finish<'a>(
        &self,
        op: Op,
        result: &'a std::result::Result<Data, String>,
    ) -> Result<&'a Data> {
        result.as_ref().map_err(|problem| self.error(op, problem))
    }
}

/// The result of a round from every rank's contribution, in rank order.
pub(super) fn combine(slots: Vec<(Op, Data)>) -> std::result::Result<Data, String> {
    let Some(&(op, _)) = slots.first() else {
        return Err("an empty group".into());
    };
    if let Some((rank, (other, _))) = slots.iter().enumerate().find(|(_, (o, _))| *o != op) {
        return Err(format!(
            "the ranks called different collectives (rank 0: {}, rank {rank}: {})",
            op.name(),
            other.name()
        ));
    }
    let len = slots[0].1.len();
    if slots.iter().any(|(_, d)| d.len() != len) {
        let lens: Vec<String> = slots.iter().map(|(_, d)| d.len().to_string()).collect();
        return Err(format!(
            "the ranks' buffers differ in length ({} values, in rank order)",
            lens.join(", ")
        ));
    }
    let mut data = slots.into_iter().map(|(_, d)| d);
    match op {
        Op::Broadcast { root } => {
            let world = data.len();
            data.nth(root)
                .ok_or_else(|| format!("root {root} is not a rank of this group of {world}"))
        }
        Op::SumF32 | Op::SumF64 => {
            let Some(mut total) = data.next() else {
                return Err("an empty group".into());
            };
            for d in data {
                match (&mut total, d) {
                    (Data::F32(t), Data::F32(d)) => t.iter_mut().zip(d).for_each(|(t, v)| *t += v),
                    (Data::F64(t), Data::F64(d)) => t.iter_mut().zip(d).for_each(|(t, v)| *t += v),
                    _ => return Err("the ranks' buffers differ in type".into()),
                }
            }
            Ok(total)
        }
    }
}

impl Collective for InProcess {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.group.world
    }

    fn all_reduce_sum(&self, values: &mut [f32]) -> Result<()> {
        let op = Op::SumF32;
        let result = self.exchange(op, Data::F32(values.to_vec()))?;
        match self.finish(op, &result)? {
            Data::F32(sum) => values.copy_from_slice(sum),
            Data::F64(_) => return Err(self.error(op, "internal error: an f64 result")),
        }
        Ok(())
    }

    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<()> {
        let op = Op::SumF64;
        let result = self.exchange(op, Data::F64(values.to_vec()))?;
        match self.finish(op, &result)? {
            Data::F64(sum) => values.copy_from_slice(sum),
            Data::F32(_) => return Err(self.error(op, "internal error: an f32 result")),
        }
        Ok(())
    }

    fn broadcast(&self, values: &mut [f32], root: usize) -> Result<()> {
        // A root outside the group is refused when the round completes, on every rank.
        let op = Op::Broadcast { root };
        let result = self.exchange(op, Data::F32(values.to_vec()))?;
        match self.finish(op, &result)? {
            Data::F32(root_values) => values.copy_from_slice(root_values),
            Data::F64(_) => return Err(self.error(op, "internal error: an f64 result")),
        }
        Ok(())
    }
}

impl Drop for InProcess {
    /// Leaving breaks the group for the ranks still in it: any of them waiting in (or
    /// later starting) a collective gets an error instead of waiting for this rank.
    fn drop(&mut self) {
        let mut round = match self.group.round.lock() {
            Ok(round) => round,
            Err(poisoned) => poisoned.into_inner(),
        };
        if round.broken.is_none() {
            round.broken = Some(format!("rank {} has left the group", self.rank));
        }
        self.group.wake.notify_all();
    }
}

/// The images of a `global_batch` that rank `rank` of `world` trains on: a contiguous
/// slice, `rank * B / world .. (rank + 1) * B / world` (shards differ by at most one
/// image; with fewer images than ranks some are empty). A `rank` outside the group gets
/// an empty range; `world = 0` is treated as 1.
pub fn shard_range(global_batch: usize, world: usize, rank: usize) -> Range<usize> {
    let world = world.max(1);
    let at = |r: usize| (r.min(world) * global_batch / world).min(global_batch);
    at(rank)..at(rank.saturating_add(1))
}

/// Copies rank `root`'s parameters to every rank (what DDP does when it wraps a model),
/// so all ranks start from identical weights.
///
/// # Errors
/// As [`Collective::broadcast`], e.g. when the ranks' parameters differ in size.
pub fn broadcast_params(
    params: &mut [Vec<f32>],
    root: usize,
    collective: &dyn Collective,
) -> Result<()> {
    let mut flat: Vec<f32> = params.iter().flatten().copied().collect();
    collective.broadcast(&mut flat, root)?;
    unflatten(&flat, params);
    Ok(())
}

fn unflatten(flat: &[f32], tensors: &mut [Vec<f32>]) {
    let mut offset = 0;
    for t in tensors {
        let len = t.len();
        t.copy_from_slice(&flat[offset..offset + len]);
        offset += len;
    }
}

/// The settings of one [`data_parallel_step`], the same on every rank.
#[derive(Debug, Clone, Copy)]
pub struct StepSettings {
    /// Images in the global batch: the sum of all ranks' shards.
    pub global_batch: usize,
    /// The step's seed (dropout masks); each rank mixes in its rank.
    pub seed: u64,
    /// Adam's learning rate for this step.
    pub learning_rate: f32,
}

/// The seed a rank hands the executor: `seed` on rank 0, mixed with the rank elsewhere,
/// so the ranks' dropout masks differ.
fn rank_seed(seed: u64, rank: usize) -> u64 {
    seed ^ (rank as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93)
}

/// What is wrong with a rank's inputs, if anything (checked before the executor, which
/// would panic on them).
fn check_inputs(
    executor: &Executor,
    params: &[Vec<f32>],
    adam: &Adam,
    shard_x: &[f32],
    shard_labels: &[u8],
    global_batch: usize,
) -> Option<String> {
    let plan = executor.plan();
    let sizes_match = |tensors: &[Vec<f32>]| {
        tensors.len() == plan.params.len()
            && tensors
                .iter()
                .zip(&plan.params)
                .all(|(t, p)| t.len() == p.len())
    };
    let shard = shard_problem(
        shard_x,
        shard_labels,
        global_batch,
        plan.input_len,
        plan.classes,
    );
    if shard.is_some() {
        shard
    } else if !sizes_match(params) {
        Some("the parameters do not match the model's shapes".into())
    } else if !sizes_match(&adam.m) || !sizes_match(&adam.v) {
        Some("the optimizer's moments do not match the model's shapes".into())
    } else {
        None
    }
}

/// What is wrong with a rank's shard of a `global_batch` for a model taking `input_len`
/// values per image and `classes` classes, if anything.
fn shard_problem(
    shard_x: &[f32],
    shard_labels: &[u8],
    global_batch: usize,
    input_len: usize,
    classes: usize,
) -> Option<String> {
    if global_batch == 0 {
        Some("the global batch is empty".into())
    } else if shard_labels.len() > global_batch {
        Some(format!(
            "the shard holds {} images, more than the global batch of {global_batch}",
            shard_labels.len()
        ))
    } else if shard_x.len() != shard_labels.len() * input_len {
        Some(format!(
            "the shard holds {} values for {} labels; expected {} ({input_len} per image)",
            shard_x.len(),
            shard_labels.len(),
            shard_labels.len() * input_len,
        ))
    } else {
        shard_labels
            .iter()
            .find(|&&l| l as usize >= classes)
            .map(|label| format!("label {label} is out of range for {classes} classes"))
    }
}

/// The agreement round of a data-parallel step: this rank's loss, correct count, shard
/// size and whether it failed (`problem`), summed across ranks, so every rank learns
/// whether any failed before anyone waits on the gradients. Returns the global batch's
/// totals.
///
/// # Errors
/// [`Error::Config`] on every rank: this rank's `problem`, that another rank failed, or
/// shards that do not add up to `global_batch`; as [`Collective::all_reduce_sum_f64`].
fn agree_on_step(
    collective: &dyn Collective,
    local: BatchStats,
    shard: usize,
    problem: Option<String>,
    global_batch: usize,
) -> Result<BatchStats> {
    let rank = collective.rank();
    let mut totals = [
        local.loss_sum,
        local.correct as f64,
        shard as f64,
        f64::from(u8::from(problem.is_some())),
    ];
    collective.all_reduce_sum_f64(&mut totals)?;
    if let Some(problem) = problem {
        return Err(Error::Config(format!(
            "data-parallel step on rank {rank}: {problem}"
        )));
    }
    if totals[3] > 0.0 {
        return Err(Error::Config(format!(
            "data-parallel step on rank {rank}: {} {OTHER_RANK_FAILED} (see their errors)",
            totals[3]
        )));
    }
    if totals[2] != global_batch as f64 {
        return Err(Error::Config(format!(
            "data-parallel step on rank {rank}: the ranks' shards hold {} images in all, but the global batch is {global_batch}",
            totals[2]
        )));
    }
    Ok(BatchStats {
        loss_sum: totals[0],
        correct: totals[1] as usize,
    })
}

/// One data-parallel training step on this rank: forward and backward on the rank's shard,
/// gradients summed across ranks, the same Adam update of `params` as on every rank.
///
/// `shard_x` is `[shard, h, w, c]` preprocessed and `shard_labels` its labels (the rank's
/// [`shard_range`] of the global batch); `settings` must be the same on every rank.
/// Returns the *global* batch's totals (loss summed over all ranks' images, correct count),
/// the same on every rank. The executor's `grads` hold the summed gradients afterwards.
///
/// Every rank must call it for every step. A rank's bad input fails the step on every rank
/// (the ranks first agree on whether each is fine), so no rank waits for one that gave up.
///
/// # Errors
/// [`Error::Config`], on every rank, when a rank's shard does not fit the model (values
/// per image, a label out of range), its parameters or optimizer state are not shaped like
/// the model, or the shards do not add up to `global_batch`; and as
/// [`Collective::all_reduce_sum`] (a rank gone, a timeout, ranks with different models).
pub fn data_parallel_step(
    executor: &mut Executor,
    params: &mut [Vec<f32>],
    adam: &mut Adam,
    shard_x: &[f32],
    shard_labels: &[u8],
    settings: StepSettings,
    collective: &dyn Collective,
) -> Result<BatchStats> {
    let rank = collective.rank();
    let global = settings.global_batch;
    let problem = check_inputs(executor, params, adam, shard_x, shard_labels, global);
    let local = match problem {
        None => executor.train_step(
            params,
            shard_x,
            shard_labels,
            rank_seed(settings.seed, rank),
        ),
        Some(_) => BatchStats::default(),
    };
    let global_stats = agree_on_step(
        collective,
        local,
        shard_labels.len(),
        problem,
        settings.global_batch,
    )?;
    // The executor's gradients are of the shard's mean loss; weighted by the shard's share
    // of the global batch, their sum over ranks is the gradient of the global mean loss.
    let scale = shard_labels.len() as f32 / global as f32;
    let mut flat: Vec<f32> = executor.grads.iter().flatten().map(|g| g * scale).collect();
    collective.all_reduce_sum(&mut flat)?;
    unflatten(&flat, &mut executor.grads);
    adam.update(params, &executor.grads, settings.learning_rate);
    Ok(global_stats)
}

/// [`data_parallel_step`] on a candle device: forward and backward of this rank's shard
/// with candle's autograd ([`CandleTrainer::gradients`]), the gradients weighted by the
/// shard's share of the global batch and summed across ranks in one flat buffer
/// ([`Collective::all_reduce_sum_tensor`]: on GPUs, NCCL on the device), then the same
/// update on every rank ([`CandleTrainer::apply`]; with fp16 every rank sees the same
/// summed gradients, so all skip an overflowing step together and keep the same loss
/// scale). `adam` carries the hyper-parameters and step count (the moments live in the
/// trainer). Returns the global batch's totals, the same on every rank.
///
/// # Errors
/// As [`data_parallel_step`] (a bad shard on any rank fails the step on every rank), and
/// [`Error::Candle`] when the device fails.
pub fn candle_data_parallel_step(
    trainer: &mut CandleTrainer,
    adam: &mut Adam,
    shard_x: &[f32],
    shard_labels: &[u8],
    settings: StepSettings,
    collective: &dyn Collective,
) -> Result<BatchStats> {
    let global = settings.global_batch;
    let [h, w, c] = trainer.spec().input;
    let problem = shard_problem(
        shard_x,
        shard_labels,
        global,
        h * w * c,
        trainer.spec().classes,
    );
    // Everything that can fail locally happens before the ranks agree: after it, every
    // rank is committed to the gradient all-reduce (a rank that skipped it would leave the
    // others waiting, with NCCL for ever). The flat buffer is one DDP bucket: the weighted
    // gradients, concatenated in spec order.
    let share = shard_labels.len() as f64 / global.max(1) as f64;
    let local = match problem {
        Some(p) => Err(p),
        None => (|| -> Result<(Tensor, BatchStats)> {
            let (gradients, stats) = trainer.gradients(shard_x, shard_labels)?;
            let flat = gradients
                .iter()
                .map(|g| g.flatten_all())
                .collect::<candle_core::Result<Vec<_>>>()?;
            Ok(((Tensor::cat(&flat, 0)? * share)?, stats))
        })()
        .map_err(|e| e.to_string()),
    };
    let (flat, stats, problem) = match local {
        Ok((flat, stats)) => (Some(flat), stats, None),
        Err(p) => (None, BatchStats::default(), Some(p)),
    };
    let global_stats = agree_on_step(collective, stats, shard_labels.len(), problem, global)?;
    let flat = flat.ok_or_else(|| Error::Config("internal error: no gradients".into()))?;
    let summed = collective.all_reduce_sum_tensor(flat)?;
    let mut offset = 0;
    let shapes = trainer.param_shapes();
    let mut gradients = Vec::with_capacity(shapes.len());
    for shape in shapes {
        let n = shape.elem_count();
        gradients.push(summed.narrow(0, offset, n)?.reshape(shape)?);
        offset += n;
    }
    trainer.apply(gradients, adam, settings.learning_rate)?;
    Ok(global_stats)
}

/// `local` on every rank if it is `Ok` on every rank; otherwise an error on every rank
/// (this rank's own, or that another failed). One f64 all-reduce: a rank that fails before
/// a collective says so in this round instead of leaving the others waiting in the next.
///
/// # Errors
/// As above, and as [`Collective::all_reduce_sum_f64`].
pub fn agree<T>(collective: &dyn Collective, local: Result<T>) -> Result<T> {
    let mut failed = [f64::from(u8::from(local.is_err()))];
    collective.all_reduce_sum_f64(&mut failed)?;
    match local {
        Err(e) => Err(e),
        Ok(_) if failed[0] > 0.0 => Err(Error::Config(format!(
            "rank {}: {} {OTHER_RANK_FAILED} (see their errors)",
            collective.rank(),
            failed[0]
        ))),
        Ok(value) => Ok(value),
    }
}

/// Checks that every rank passed the same `fingerprint` (a description of its settings),
/// so that ranks started with different command lines fail at once, on every rank, instead
/// of training different things or calling NCCL with different buffer sizes.
///
/// The SHA-256 of `fingerprint` becomes three 20-bit integers `x`; the ranks all-reduce
/// `x` and `x^2` (exact in f64), and all `x` are equal exactly when
/// `sum(x)^2 = world * sum(x^2)` (Cauchy-Schwarz), which every rank decides alike.
///
/// # Errors
/// [`Error::Config`] on every rank when the fingerprints differ; as
/// [`Collective::all_reduce_sum_f64`].
pub fn check_same_everywhere(collective: &dyn Collective, fingerprint: &str) -> Result<()> {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(fingerprint.as_bytes());
    let x: Vec<f64> = digest
        .chunks_exact(3)
        .take(3)
        .map(|c| f64::from(u32::from_le_bytes([c[0], c[1], c[2] & 0x0f, 0])))
        .collect();
    let mut sums: Vec<f64> = x.iter().copied().chain(x.iter().map(|v| v * v)).collect();
    collective.all_reduce_sum_f64(&mut sums)?;
    let world = collective.world_size() as f64;
    if (0..3).all(|i| sums[i] * sums[i] == world * sums[3 + i]) {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "rank {}: the ranks were started with different settings (model, data, seed, batch size, learning rate, epochs, precision or checkpoint); start every rank with the same command line and files",
            collective.rank()
        )))
    }
}

/// How a rank says the step failed elsewhere (and not why).
const OTHER_RANK_FAILED: &str = "other rank(s) failed";

/// What the main thread asks a [`DeviceGroup`] worker rank to do.
enum Job {
    /// One data-parallel step on the global batch (the rank takes its shard).
    Step {
        x: Arc<Vec<f32>>,
        labels: Arc<Vec<u8>>,
        settings: StepSettings,
    },
    /// Replace the parameters (after a hook changed them on the host).
    Upload(Arc<Vec<Vec<f32>>>),
}

/// A rank on a thread of its own.
struct Worker {
    jobs: std::sync::mpsc::Sender<Job>,
    results: std::sync::mpsc::Receiver<Result<BatchStats>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

/// Data-parallel training on candle devices: this process's ranks of a group (all of them
/// for `mlops train --devices cuda:0,cuda:1`, or `cpu,cpu` for CI; one per process in a
/// multi-process run). One [`CandleTrainer`] per rank, the first on the calling thread and
/// the others on threads of their own (one thread per GPU, as NCCL wants), every step's
/// global batch cut into [`shard_range`]s by rank and run with
/// [`candle_data_parallel_step`]. All ranks hold the same weights after every step.
pub struct DeviceGroup {
    rank0: CandleTrainer,
    /// `None` only while dropping.
    collective0: Option<Box<dyn Collective>>,
    /// A job reached only some workers: their answers are out of step, so the group
    /// refuses further work.
    poisoned: bool,
    world: usize,
    input_len: usize,
    workers: Vec<Worker>,
}

impl DeviceGroup {
    /// One rank per trainer, `collectives[i]` being `trainers[i]`'s (distinct ranks of one
    /// group). Rank 0's parameters are broadcast to all ranks first (as DDP does), so every
    /// rank starts from the same weights.
    ///
    /// # Errors
    /// [`Error::Config`] when the counts differ, there are no ranks or the collectives are
    /// not distinct ranks of one group; as [`Collective::broadcast`] and
    /// [`CandleTrainer::upload`].
    pub fn new(
        trainers: Vec<CandleTrainer>,
        collectives: Vec<Box<dyn Collective>>,
        adam: &Adam,
    ) -> Result<Self> {
        if trainers.is_empty() || collectives.len() != trainers.len() {
            return Err(Error::Config(format!(
                "{} device(s) and {} collective rank(s): a data-parallel group needs one of each per rank",
                trainers.len(),
                collectives.len()
            )));
        }
        let world = collectives[0].world_size();
        let mut ranks: Vec<usize> = collectives.iter().map(|c| c.rank()).collect();
        ranks.sort_unstable();
        ranks.dedup();
        if ranks.len() != collectives.len()
            || ranks.last().is_some_and(|&r| r >= world)
            || collectives.iter().any(|c| c.world_size() != world)
        {
            return Err(Error::Config(format!(
                "the collectives are not distinct ranks of one group of {world}"
            )));
        }
        let mut trainers = trainers.into_iter();
        let mut collectives = collectives.into_iter();
        let (Some(rank0), Some(collective0)) = (trainers.next(), collectives.next()) else {
            return Err(Error::Config("a data-parallel group without ranks".into()));
        };
        let [h, w, c] = rank0.spec().input;
        let input_len = h * w * c;
        // Rank 0's weights to every rank, each rank in its own thread (a collective needs
        // all ranks at once).
        // The moments too: a resumed run's ranks then agree on the whole optimizer state.
        fn broadcast(
            trainer: &mut CandleTrainer,
            collective: &dyn Collective,
            adam: &Adam,
        ) -> Result<()> {
            let (mut params, mut adam) = (Vec::new(), adam.clone());
            let local = trainer.download(&mut params, &mut adam);
            agree(collective, local)?;
            broadcast_params(&mut params, 0, collective)?;
            broadcast_params(&mut adam.m, 0, collective)?;
            broadcast_params(&mut adam.v, 0, collective)?;
            trainer.upload_state(&params, &adam)
        }
        let mut workers = Vec::with_capacity(world - 1);
        for (mut trainer, collective) in trainers.zip(collectives) {
            let (jobs, job_rx) = std::sync::mpsc::channel::<Job>();
            let (result_tx, results) = std::sync::mpsc::channel();
            let mut adam = adam.clone();
            let handle = std::thread::Builder::new()
                .name(format!("mlops-rank-{}", collective.rank()))
                .spawn(move || {
                    let start = broadcast(&mut trainer, collective.as_ref(), &adam)
                        .map(|()| BatchStats::default());
                    let failed = start.is_err();
                    if result_tx.send(start).is_err() || failed {
                        return;
                    }
                    for job in job_rx {
                        let result = match job {
                            Job::Step {
                                x,
                                labels,
                                settings,
                            } => {
                                let range = shard_range(labels.len(), world, collective.rank());
                                candle_data_parallel_step(
                                    &mut trainer,
                                    &mut adam,
                                    x.get(range.start * input_len..range.end * input_len)
                                        .unwrap_or_default(),
                                    &labels[range],
                                    settings,
                                    collective.as_ref(),
                                )
                            }
                            Job::Upload(params) => {
                                trainer.upload(&params).map(|()| BatchStats::default())
                            }
                        };
                        if result_tx.send(result).is_err() {
                            return;
                        }
                    }
                })
                .map_err(|e| Error::Config(format!("cannot start a rank's thread: {e}")))?;
            workers.push(Worker {
                jobs,
                results,
                handle: Some(handle),
            });
        }
        let mut group = DeviceGroup {
            rank0,
            collective0: Some(collective0),
            poisoned: false,
            world,
            input_len,
            workers,
        };
        let own = match &group.collective0 {
            Some(c) => broadcast(&mut group.rank0, c.as_ref(), adam),
            None => Err(Error::Config("internal error: no collective".into())),
        };
        group.collect(own)?;
        Ok(group)
    }

    /// Every worker's answer to the last job, with rank 0's (`own`): the first error that
    /// gives a reason, rather than a rank's "another rank failed", if any failed.
    fn collect<T>(&mut self, own: Result<T>) -> Result<T> {
        let mut errors = Vec::new();
        for (i, worker) in self.workers.iter().enumerate() {
            let answer = worker.results.recv().unwrap_or_else(|_| {
                Err(Error::Config(format!(
                    "rank {} stopped (its thread ended)",
                    i + 1
                )))
            });
            if let Err(e) = answer {
                errors.push(e);
            }
        }
        match own {
            Ok(value) if errors.is_empty() => Ok(value),
            Ok(_) => Err(errors.remove(0)),
            Err(e) => {
                errors.insert(0, e);
                let reason = errors
                    .iter()
                    .position(|e| !e.to_string().contains(OTHER_RANK_FAILED));
                Err(errors.remove(reason.unwrap_or(0)))
            }
        }
    }

    /// The number of ranks in the group (all processes').
    pub fn world_size(&self) -> usize {
        self.world
    }

    /// This process's first rank's trainer (its precision, loss scaler, skipped steps: the
    /// same on all ranks).
    pub fn rank0(&self) -> &CandleTrainer {
        &self.rank0
    }

    /// One data-parallel step on the global batch `x` (`[batch, h, w, c]`) / `labels`;
    /// `adam` is rank 0's (the workers advance their own copies in step). Returns the
    /// global batch's loss sum and correct count.
    ///
    /// # Errors
    /// As [`candle_data_parallel_step`], from rank 0 or else the first worker that failed;
    /// [`Error::Config`] when a worker's thread has ended.
    pub fn step(
        &mut self,
        x: &[f32],
        labels: &[u8],
        adam: &mut Adam,
        learning_rate: f32,
    ) -> Result<BatchStats> {
        let settings = StepSettings {
            global_batch: labels.len(),
            seed: 0,
            learning_rate,
        };
        if x.len() != labels.len() * self.input_len {
            // Before any rank starts: refused alike on all of them.
            return Err(Error::Config(format!(
                "{} values for {} images of {} values",
                x.len(),
                labels.len(),
                self.input_len
            )));
        }
        let collective = self.usable()?;
        let range = shard_range(labels.len(), self.world, collective.rank());
        if !self.workers.is_empty() {
            let (x_all, labels_all) = (Arc::new(x.to_vec()), Arc::new(labels.to_vec()));
            for (i, worker) in self.workers.iter().enumerate() {
                let job = Job::Step {
                    x: Arc::clone(&x_all),
                    labels: Arc::clone(&labels_all),
                    settings,
                };
                if worker.jobs.send(job).is_err() {
                    self.poisoned = true;
                    return Err(Error::Config(format!(
                        "rank {} stopped (its thread ended)",
                        i + 1
                    )));
                }
            }
        }
        self.usable()?;
        let Some(collective) = self.collective0.as_deref() else {
            return Err(Error::Config("internal error: no collective".into()));
        };
        let own = candle_data_parallel_step(
            &mut self.rank0,
            adam,
            &x[range.start * self.input_len..range.end * self.input_len],
            &labels[range],
            settings,
            collective,
        );
        self.collect(own)
    }

    /// [`agree`] across processes: `local` on every rank if every process's is `Ok`. For the
    /// steps only some processes run (rank 0 saving a checkpoint), so that a failure there
    /// stops every rank instead of leaving them waiting in the next collective. A group
    /// whose ranks are all in this process has nobody to tell: `local` as it is.
    ///
    /// # Errors
    /// As [`agree`].
    pub fn agree<T>(&self, local: Result<T>) -> Result<T> {
        match self.collective0.as_deref() {
            Some(c) if self.workers.is_empty() && c.world_size() > 1 => agree(c, local),
            _ => local,
        }
    }

    /// This process's first rank's collective, unless the group is poisoned.
    fn usable(&self) -> Result<&dyn Collective> {
        match (&self.collective0, self.poisoned) {
            (Some(c), false) => Ok(c.as_ref()),
            _ => Err(Error::Config(
                "the data-parallel group is broken (a rank's thread ended); the run cannot go on"
                    .into(),
            )),
        }
    }

    /// Copies rank 0's parameters and moments to the host (all ranks hold the same).
    ///
    /// # Errors
    /// As [`CandleTrainer::download`].
    pub fn download(&self, params: &mut Vec<Vec<f32>>, adam: &mut Adam) -> Result<()> {
        self.rank0.download(params, adam)
    }

    /// Replaces every rank's parameters with `params`.
    ///
    /// # Errors
    /// As [`CandleTrainer::upload`], on any rank.
    pub fn upload(&mut self, params: &[Vec<f32>]) -> Result<()> {
        self.usable()?;
        let shared = Arc::new(params.to_vec());
        for (i, worker) in self.workers.iter().enumerate() {
            if worker.jobs.send(Job::Upload(Arc::clone(&shared))).is_err() {
                self.poisoned = true;
                return Err(Error::Config(format!(
                    "rank {} stopped (its thread ended)",
                    i + 1
                )));
            }
        }
        let own = self.rank0.upload(params);
        self.collect(own)
    }
}

impl Drop for DeviceGroup {
    /// Leaves the group first (so a worker waiting in a collective for this rank gets an
    /// error instead of waiting out the timeout), then closes the workers' queues and waits
    /// for their threads; a poisoned group's threads are left to end with the process.
    fn drop(&mut self) {
        drop(self.collective0.take());
        for worker in &mut self.workers {
            let (closed, _) = std::sync::mpsc::channel();
            drop(std::mem::replace(&mut worker.jobs, closed));
            if let Some(handle) = worker.handle.take() {
                if !self.poisoned {
                    let _ = handle.join();
                }
            }
        }
    }
}

/// This process's place in a multi-process run: from `WORLD_SIZE` and `RANK`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorldEnv {
    /// Number of ranks (`WORLD_SIZE`), at least 1.
    pub world_size: usize,
    /// This process's rank (`RANK`), `0..world_size`.
    pub rank: usize,
}

/// Reads `WORLD_SIZE` and `RANK` as `torchrun` and Slurm wrappers set them: `None` when
/// neither is set (a single-process run).
///
/// # Errors
/// [`Error::Config`] when only one of the two is set, a value is not a whole number (or
/// not Unicode), `WORLD_SIZE` is 0, or `RANK` is not below `WORLD_SIZE`.
pub fn world_from_env() -> Result<Option<WorldEnv>> {
    let read = |name: &str| match std::env::var(name) {
        Ok(value) => Ok(Some(value)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(value)) => Err(Error::Config(format!(
            "{name}={value:?} is not a whole number"
        ))),
    };
    parse_world(read("WORLD_SIZE")?.as_deref(), read("RANK")?.as_deref())
}

/// [`world_from_env`] on given values of `WORLD_SIZE` and `RANK`.
///
/// # Errors
/// As [`world_from_env`].
pub fn parse_world(world_size: Option<&str>, rank: Option<&str>) -> Result<Option<WorldEnv>> {
    let number = |name: &str, value: &str| {
        value.trim().parse::<usize>().map_err(|_| {
            Error::Config(format!(
                "{name}=`{value}` is not a whole number (torchrun and Slurm set WORLD_SIZE to the number of processes, RANK to this one's index from 0)"
            ))
        })
    };
    match (world_size, rank) {
        (None, None) => Ok(None),
        (Some(_), None) => Err(Error::Config(
            "WORLD_SIZE is set but RANK is not: set both (as torchrun does) or neither".into(),
        )),
        (None, Some(_)) => Err(Error::Config(
            "RANK is set but WORLD_SIZE is not: set both (as torchrun does) or neither".into(),
        )),
        (Some(world), Some(rank)) => {
            let world_size = number("WORLD_SIZE", world)?;
            let rank = number("RANK", rank)?;
            if world_size == 0 {
                return Err(Error::Config(
                    "WORLD_SIZE=0: a run needs at least one process".into(),
                ));
            }
            if rank >= world_size {
                return Err(Error::Config(format!(
                    "RANK={rank} is out of range for WORLD_SIZE={world_size} (ranks are 0..{})",
                    world_size - 1
                )));
            }
            Ok(Some(WorldEnv { world_size, rank }))
        }
    }
}

/// Where rank 0 of a multi-process run listens: `MASTER_ADDR` and `MASTER_PORT`, as
/// torchrun and Slurm wrappers set them.
///
/// # Errors
/// As [`parse_master`].
pub fn master_from_env() -> Result<(String, u16)> {
    parse_master(
        std::env::var("MASTER_ADDR").ok().as_deref(),
        std::env::var("MASTER_PORT").ok().as_deref(),
    )
}

/// [`master_from_env`] on given values of `MASTER_ADDR` and `MASTER_PORT`.
///
/// # Errors
/// [`Error::Config`] when either is missing or empty, or the port is not 1..=65535.
pub fn parse_master(addr: Option<&str>, port: Option<&str>) -> Result<(String, u16)> {
    let addr = addr.map(str::trim).filter(|a| !a.is_empty()).ok_or_else(|| {
        Error::Config(
            "WORLD_SIZE is set but MASTER_ADDR is not: set it to rank 0's host name or address (torchrun does)".into(),
        )
    })?;
    let port = port.map(str::trim).ok_or_else(|| {
        Error::Config(
            "WORLD_SIZE is set but MASTER_PORT is not: set it to a free TCP port on rank 0's host (torchrun does)".into(),
        )
    })?;
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok((addr.to_string(), p)),
        _ => Err(Error::Config(format!(
            "MASTER_PORT=`{port}` is not a TCP port (1..65535)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelSpec;
    use crate::nn::Plan;
    use rand::{Rng, SeedableRng};

    const LR: f32 = 0.01;

    fn plan() -> Plan {
        let spec = ModelSpec::from_yaml(
            "input: [8, 8, 1]\nclasses: 3\nlayers:\n\
             - {type: conv2d, filters: 4, kernel: 3, padding: same, activation: relu}\n\
             - {type: max_pool2d, size: 2, stride: 2}\n\
             - {type: flatten}\n\
             - {type: dense, units: 8, activation: relu}\n\
             - {type: dense, units: 3}\n",
        )
        .unwrap();
        Plan::compile(&spec).unwrap()
    }

    /// `steps` random global batches of `batch` images.
    fn batches(plan: &Plan, steps: usize, batch: usize) -> Vec<(Vec<f32>, Vec<u8>)> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        (0..steps)
            .map(|_| {
                let x = (0..batch * plan.input_len)
                    .map(|_| rng.random::<f32>())
                    .collect();
                let labels = (0..batch)
                    .map(|_| rng.random_range(0..plan.classes as u8))
                    .collect();
                (x, labels)
            })
            .collect()
    }

    /// One rank, the whole batch: the plain trainer's loop.
    fn train_single(plan: &Plan, data: &[(Vec<f32>, Vec<u8>)]) -> (Vec<Vec<f32>>, Vec<BatchStats>) {
        let mut params = plan.init_params(3);
        let mut adam = Adam::new(&params);
        let mut executor = Executor::new(plan, 1);
        let mut stats = Vec::new();
        for (step, (x, labels)) in data.iter().enumerate() {
            stats.push(executor.train_step(&params, x, labels, step as u64));
            adam.update(&mut params, &executor.grads, LR);
        }
        (params, stats)
    }

    /// `world` ranks as threads, each on its shard; the ranks' weights and stats, in rank
    /// order. With `jitter`, ranks sleep rank- and step-dependent times before each step,
    /// so they arrive at the collectives in varying orders.
    fn train_parallel(
        plan: &Plan,
        data: &[(Vec<f32>, Vec<u8>)],
        world: usize,
        jitter: bool,
    ) -> Vec<(Vec<Vec<f32>>, Vec<BatchStats>)> {
        let group = InProcess::group_with_timeout(world, Duration::from_secs(60));
        std::thread::scope(|s| {
            let handles: Vec<_> = group
                .into_iter()
                .map(|collective| {
                    s.spawn(move || {
                        let rank = collective.rank();
                        // Each rank starts from its own weights; rank 0's win.
                        let mut params = plan.init_params(3 + rank as u64);
                        broadcast_params(&mut params, 0, &collective).unwrap();
                        let mut adam = Adam::new(&params);
                        let mut executor = Executor::new(plan, 1);
                        let mut stats = Vec::new();
                        for (step, (x, labels)) in data.iter().enumerate() {
                            if jitter {
                                let ms = (rank * 7 + step * 3) % 5;
                                std::thread::sleep(Duration::from_millis(ms as u64));
                            }
                            let range = shard_range(labels.len(), world, rank);
                            let settings = StepSettings {
                                global_batch: labels.len(),
                                seed: step as u64,
                                learning_rate: LR,
                            };
                            let shard_x =
                                &x[range.start * plan.input_len..range.end * plan.input_len];
                            stats.push(
                                data_parallel_step(
                                    &mut executor,
                                    &mut params,
                                    &mut adam,
                                    shard_x,
                                    &labels[range],
                                    settings,
                                    &collective,
                                )
                                .unwrap(),
                            );
                        }
                        (params, stats)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    fn bits(params: &[Vec<f32>]) -> Vec<u32> {
        params.iter().flatten().map(|v| v.to_bits()).collect()
    }

    /// Largest |a - b| / (|a| + LR) over all weights. The denominator's LR keeps weights
    /// that sit near zero (biases start at 0) from inflating the ratio: an Adam step moves
    /// a weight by about LR, so a difference of 1e-5 * LR is a 1e-5 share of one step.
    fn max_relative_difference(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
        a.iter()
            .flatten()
            .zip(b.iter().flatten())
            .map(|(a, b)| (a - b).abs() / (a.abs() + LR))
            .fold(0.0, f32::max)
    }

    #[test]
    fn shards_cover_the_batch_in_order() {
        for (batch, world) in [(10, 1), (10, 2), (10, 3), (3, 4), (0, 2), (64, 8)] {
            let ranges: Vec<_> = (0..world).map(|r| shard_range(batch, world, r)).collect();
            assert_eq!(ranges[0].start, 0);
            assert_eq!(ranges[world - 1].end, batch);
            for pair in ranges.windows(2) {
                assert_eq!(pair[0].end, pair[1].start);
            }
            let (min, max) = (
                ranges.iter().map(|r| r.len()).min().unwrap(),
                ranges.iter().map(|r| r.len()).max().unwrap(),
            );
            assert!(max - min <= 1, "{ranges:?}");
        }
        assert_eq!(shard_range(10, 3, 1), 3..6);
        assert_eq!(shard_range(10, 3, 5), 10..10);
        assert_eq!(shard_range(10, 0, 0), 0..10);
    }

    /// N ranks on their shards follow one rank on the whole batch, up to float rounding:
    /// the images' gradients are summed in another grouping and each shard's is rescaled
    /// by `shard / batch` (one more rounding). Each differs from the single-rank gradient
    /// by a few f32 ulps (~1e-7 relative); Adam divides by the root of the second moment,
    /// so relative gradient errors stay relative in the update, and after 6 steps the
    /// weights agree to a few 1e-6 of a weight (or of one step, near zero; measured: at
    /// most 3.5e-6, 3e-7 absolute), so the bound is 1e-5.
    #[test]
    fn n_ranks_match_one_rank_on_the_whole_batch() {
        let plan = plan();
        // 10 images: 5 + 5 on 2 ranks, 3 + 3 + 4 on 3; 3 images on 4 ranks leave rank 0
        // with an empty shard.
        for (world, batch) in [(2, 10), (3, 10), (4, 3)] {
            let data = batches(&plan, 6, batch);
            let (single, single_stats) = train_single(&plan, &data);
            let ranks = train_parallel(&plan, &data, world, false);
            for (rank, (params, stats)) in ranks.iter().enumerate() {
                let diff = max_relative_difference(&single, params);
                let abs = single
                    .iter()
                    .flatten()
                    .zip(params.iter().flatten())
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                eprintln!(
                    "world {world}, batch {batch}, rank {rank}: max difference {abs:e} \
                     ({diff:e} of |weight| + LR)"
                );
                assert!(diff < 1e-5, "world {world} rank {rank}: {diff:e}");
                for (a, b) in single_stats.iter().zip(stats) {
                    assert_eq!(a.correct, b.correct);
                    assert!((a.loss_sum - b.loss_sum).abs() < 1e-4 * a.loss_sum.abs().max(1.0));
                }
            }
            // The weights moved: the comparison is not of untouched initial weights.
            assert!(max_relative_difference(&single, &plan.init_params(3)) > 1e-3);
        }
    }

    /// With one rank the step is the plain trainer's step, bit for bit (the scale is 1 and
    /// the sum of one buffer is the buffer).
    #[test]
    fn one_rank_is_plain_training_bit_for_bit() {
        let plan = plan();
        let data = batches(&plan, 4, 9);
        let (single, _) = train_single(&plan, &data);
        let ranks = train_parallel(&plan, &data, 1, false);
        assert_eq!(bits(&single), bits(&ranks[0].0));
    }

    #[test]
    fn runs_are_bit_identical_whatever_the_thread_timing() {
        let plan = plan();
        let data = batches(&plan, 5, 11);
        let first = train_parallel(&plan, &data, 3, false);
        let second = train_parallel(&plan, &data, 3, true);
        for (a, b) in first.iter().zip(&second) {
            assert_eq!(bits(&a.0), bits(&b.0));
            for (x, y) in a.1.iter().zip(&b.1) {
                assert_eq!(x.loss_sum.to_bits(), y.loss_sum.to_bits());
                assert_eq!(x.correct, y.correct);
            }
        }
    }

    #[test]
    fn all_ranks_end_with_identical_weights_and_stats() {
        let plan = plan();
        let data = batches(&plan, 5, 10);
        let ranks = train_parallel(&plan, &data, 3, true);
        for (params, stats) in &ranks[1..] {
            assert_eq!(bits(&ranks[0].0), bits(params));
            for (x, y) in ranks[0].1.iter().zip(stats) {
                assert_eq!(x.loss_sum.to_bits(), y.loss_sum.to_bits());
                assert_eq!(x.correct, y.correct);
            }
        }
    }

    /// Sums in rank order, whatever order the ranks arrive in.
    #[test]
    fn all_reduce_sums_in_rank_order() {
        let group = InProcess::group(3);
        let sums: Vec<Vec<f32>> = std::thread::scope(|s| {
            let handles: Vec<_> = group
                .iter()
                .map(|c| {
                    s.spawn(move || {
                        // Arrive in reverse rank order.
                        std::thread::sleep(Duration::from_millis(10 * (3 - c.rank()) as u64));
                        // 1e8 + 1 - 1e8: 0 in rank order (1e8 absorbs the 1), 1 otherwise.
                        let mut v = vec![[1e8f32, 1.0, -1e8][c.rank()], c.rank() as f32];
                        c.all_reduce_sum(&mut v).unwrap();
                        let mut b = vec![c.rank() as f32; 2];
                        c.broadcast(&mut b, 2).unwrap();
                        v.extend(b);
                        v
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for v in sums {
            assert_eq!(v, [0.0, 3.0, 2.0, 2.0]);
        }
    }

    /// Runs `work` on every rank of a group (timeout 5 s) and returns each rank's result.
    fn on_ranks<T: Send>(
        world: usize,
        timeout: Duration,
        work: impl Fn(&InProcess) -> T + Sync,
    ) -> Vec<T> {
        let group = InProcess::group_with_timeout(world, timeout);
        let work = &work;
        std::thread::scope(|s| {
            let handles: Vec<_> = group
                .into_iter()
                .map(|c| s.spawn(move || work(&c)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn a_wrong_buffer_length_fails_on_every_rank() {
        let started = Instant::now();
        let results = on_ranks(3, Duration::from_secs(30), |c| {
            let mut v = vec![1.0; if c.rank() == 1 { 3 } else { 4 }];
            let first = c.all_reduce_sum(&mut v).map_err(|e| e.to_string());
            // The round failed cleanly: the group still works.
            let mut w = vec![1.0; 2];
            c.all_reduce_sum(&mut w).unwrap();
            assert_eq!(w, [3.0, 3.0]);
            first
        });
        for result in results {
            let err = result.unwrap_err();
            assert!(err.contains("differ in length (4, 3, 4"), "{err}");
        }
        // Failed at once, not by timing out.
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn a_bad_shard_fails_the_step_on_every_rank() {
        let plan = plan();
        let data = batches(&plan, 1, 6);
        let (x, labels) = &data[0];
        let results = on_ranks(2, Duration::from_secs(30), |c| {
            let mut params = plan.init_params(3);
            let mut adam = Adam::new(&params);
            let mut executor = Executor::new(&plan, 1);
            let range = shard_range(6, 2, c.rank());
            let shard_x = &x[range.start * plan.input_len..range.end * plan.input_len];
            // Rank 1 drops one value of its last image.
            let shard_x = if c.rank() == 1 {
                &shard_x[..shard_x.len() - 1]
            } else {
                shard_x
            };
            let settings = StepSettings {
                global_batch: 6,
                seed: 0,
                learning_rate: LR,
            };
            let before = params.clone();
            let result = data_parallel_step(
                &mut executor,
                &mut params,
                &mut adam,
                shard_x,
                &labels[range],
                settings,
                c,
            );
            assert_eq!(params, before, "no update after a failed step");
            result.map(|_| ()).map_err(|e| e.to_string())
        });
        assert!(results[0]
            .as_ref()
            .unwrap_err()
            .contains("1 other rank(s) failed"));
        assert!(results[1]
            .as_ref()
            .unwrap_err()
            .contains("values for 3 labels"));
    }

    #[test]
    fn shards_that_do_not_add_up_fail_on_every_rank() {
        let plan = plan();
        let data = batches(&plan, 1, 6);
        let (x, labels) = &data[0];
        let results = on_ranks(2, Duration::from_secs(30), |c| {
            let mut params = plan.init_params(3);
            let mut adam = Adam::new(&params);
            let mut executor = Executor::new(&plan, 1);
            // Both ranks take the first 3 images of a global batch of 6 claimed as 7.
            let settings = StepSettings {
                global_batch: 7,
                seed: 0,
                learning_rate: LR,
            };
            data_parallel_step(
                &mut executor,
                &mut params,
                &mut adam,
                &x[..3 * plan.input_len],
                &labels[..3],
                settings,
                c,
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
        });
        for result in results {
            assert!(result
                .unwrap_err()
                .contains("6 images in all, but the global batch is 7"));
        }
    }

    #[test]
    fn a_rank_that_never_comes_fails_the_others_by_timeout() {
        let started = Instant::now();
        let results = on_ranks(3, Duration::from_millis(200), |c| {
            if c.rank() == 2 {
                // Late: arrives after the others have timed out.
                std::thread::sleep(Duration::from_millis(600));
            }
            let mut v = vec![1.0; 4];
            c.all_reduce_sum(&mut v).map_err(|e| e.to_string())
        });
        assert!(started.elapsed() < Duration::from_secs(5));
        for result in &results {
            let err = result.as_ref().unwrap_err();
            assert!(err.contains("for rank(s) 2 to join"), "{err}");
        }
    }

    #[test]
    fn a_rank_that_leaves_or_panics_fails_the_others() {
        for panics in [false, true] {
            let group = InProcess::group(3);
            let started = Instant::now();
            let results: Vec<Result<(), String>> = std::thread::scope(|s| {
                let handles: Vec<_> = group
                    .into_iter()
                    .map(|c| {
                        s.spawn(move || {
                            if c.rank() == 1 {
                                std::thread::sleep(Duration::from_millis(50));
                                if panics {
                                    panic!("rank 1 fails (expected by the test)");
                                }
                                return Err("left".to_string());
                            }
                            let mut v = vec![1.0; 4];
                            c.all_reduce_sum(&mut v).map_err(|e| e.to_string())
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|_| Err("panicked".into())))
                    .collect()
            });
            // Default timeout is 10 minutes: failing fast means the drop was noticed.
            assert!(started.elapsed() < Duration::from_secs(5));
            for rank in [0, 2] {
                let err = results[rank].as_ref().unwrap_err();
                assert!(err.contains("rank 1 has left the group"), "{err}");
            }
        }
    }

    #[test]
    fn broadcast_to_a_root_outside_the_group_fails_on_every_rank() {
        let results = on_ranks(2, Duration::from_secs(30), |c| {
            let mut v = vec![c.rank() as f32; 2];
            c.broadcast(&mut v, 5).map_err(|e| e.to_string())
        });
        for result in results {
            assert!(result.unwrap_err().contains("root 5"));
        }
    }

    #[test]
    fn world_from_the_environment_values() {
        assert_eq!(parse_world(None, None).unwrap(), None);
        assert_eq!(
            parse_world(Some("4"), Some("3")).unwrap(),
            Some(WorldEnv {
                world_size: 4,
                rank: 3
            })
        );
        assert_eq!(
            parse_world(Some(" 1 "), Some("0")).unwrap(),
            Some(WorldEnv {
                world_size: 1,
                rank: 0
            })
        );
        let err = |w, r| parse_world(w, r).unwrap_err().to_string();
        assert!(err(Some("2"), None).contains("RANK is not"));
        assert!(err(None, Some("0")).contains("WORLD_SIZE is not"));
        assert!(err(Some("two"), Some("0")).contains("WORLD_SIZE=`two` is not a whole number"));
        assert!(err(Some("2"), Some("-1")).contains("RANK=`-1`"));
        assert!(err(Some("0"), Some("0")).contains("at least one process"));
        assert!(err(Some("2"), Some("2")).contains("RANK=2 is out of range for WORLD_SIZE=2"));
    }

    /// Equal fingerprints pass; any difference fails on every rank, including the rank
    /// whose own value is the mean of the others' (which a sum alone would not catch).
    #[test]
    fn ranks_with_different_settings_fail_everywhere() {
        assert!(
            on_ranks(3, Duration::from_secs(20), |c| check_same_everywhere(
                c, "same"
            ))
            .iter()
            .all(Result::is_ok)
        );
        let results = on_ranks(3, Duration::from_secs(20), |c| {
            check_same_everywhere(c, &format!("run {}", c.rank() % 2))
        });
        assert!(results.iter().all(Result::is_err), "{results:?}");
        let results = on_ranks(2, Duration::from_secs(20), |c| {
            check_same_everywhere(c, if c.rank() == 0 { "a" } else { "b" })
                .unwrap_err()
                .to_string()
        });
        assert!(
            results.iter().all(|e| e.contains("different settings")),
            "{results:?}"
        );
    }

    /// One rank's failure before a collective becomes an error on every rank.
    #[test]
    fn agree_fails_every_rank_when_one_fails() {
        let results = on_ranks(3, Duration::from_secs(20), |c| {
            agree(
                c,
                if c.rank() == 1 {
                    Err(Error::Config("disk full".into()))
                } else {
                    Ok(c.rank())
                },
            )
            .map_err(|e| e.to_string())
        });
        assert_eq!(results[1].as_ref().unwrap_err(), "disk full");
        assert!(
            results[0]
                .as_ref()
                .unwrap_err()
                .contains("1 other rank(s) failed"),
            "{results:?}"
        );
        assert!(results[2].is_err());
        assert_eq!(
            on_ranks(2, Duration::from_secs(20), |c| agree(c, Ok(7)).unwrap()),
            vec![7, 7]
        );
    }

    #[test]
    fn master_address_from_the_environment_values() {
        assert_eq!(
            parse_master(Some("10.0.0.1"), Some("29500")).unwrap(),
            ("10.0.0.1".to_string(), 29500)
        );
        let err = |a, p| parse_master(a, p).unwrap_err().to_string();
        assert!(err(None, Some("1")).contains("MASTER_ADDR is not"));
        assert!(err(Some(" "), Some("1")).contains("MASTER_ADDR is not"));
        assert!(err(Some("h"), None).contains("MASTER_PORT is not"));
        assert!(err(Some("h"), Some("0")).contains("MASTER_PORT=`0`"));
        assert!(err(Some("h"), Some("70000")).contains("not a TCP port"));
    }

    /// `world` candle CPU ranks in a [`DeviceGroup`] (rank r starting from its own weights,
    /// rank 0's broadcast), trained on `data`: the weights and the per-step stats.
    fn train_candle_group(
        plan: &Plan,
        data: &[(Vec<f32>, Vec<u8>)],
        world: usize,
        precision: super::super::Precision,
    ) -> (Vec<Vec<f32>>, Vec<BatchStats>, u64) {
        let device = candle_core::Device::Cpu;
        let mut adam = Adam::new(&plan.init_params(3));
        let trainers = (0..world)
            .map(|r| {
                let params = plan.init_params(3 + r as u64);
                CandleTrainer::with_precision(&plan.spec, &params, &adam, &device, precision)
                    .unwrap()
            })
            .collect();
        let collectives = InProcess::group_with_timeout(world, Duration::from_secs(60))
            .into_iter()
            .map(|c| Box::new(c) as Box<dyn Collective>)
            .collect();
        let mut group = DeviceGroup::new(trainers, collectives, &adam).unwrap();
        let stats = data
            .iter()
            .map(|(x, labels)| group.step(x, labels, &mut adam, LR).unwrap())
            .collect();
        let mut params = Vec::new();
        group.download(&mut params, &mut adam).unwrap();
        (params, stats, group.rank0().skipped_steps())
    }

    /// The candle version of the data-parallel bar: N candle ranks (threads, in-process
    /// sums, one shard of 3 ranks empty on the last 2-image batch) give the weights of one
    /// candle rank on the whole batch up to float summation order, the same global stats,
    /// and bit-identical weights run to run.
    #[test]
    fn candle_ranks_match_one_candle_rank_on_the_whole_batch() {
        let plan = plan();
        let mut data = batches(&plan, 4, 12);
        data.extend(batches(&plan, 1, 2));
        let params = plan.init_params(3);
        let mut adam = Adam::new(&params);
        let mut one =
            CandleTrainer::new(&plan.spec, &params, &adam, &candle_core::Device::Cpu).unwrap();
        let one_stats: Vec<BatchStats> = data
            .iter()
            .map(|(x, labels)| one.step(x, labels, &mut adam, LR).unwrap())
            .collect();
        let mut one_params = Vec::new();
        one.download(&mut one_params, &mut adam).unwrap();
        for world in [2, 3] {
            let (weights, stats, _) =
                train_candle_group(&plan, &data, world, super::super::Precision::Fp32);
            let diff = max_relative_difference(&one_params, &weights);
            assert!(diff < 1e-4, "{world} ranks: relative difference {diff}");
            for (step, (a, b)) in one_stats.iter().zip(&stats).enumerate() {
                assert!(
                    (a.loss_sum - b.loss_sum).abs() < 1e-4 * a.loss_sum.abs().max(1.0),
                    "{world} ranks, step {step}: loss {} vs {}",
                    a.loss_sum,
                    b.loss_sum
                );
                assert_eq!(a.correct, b.correct, "{world} ranks, step {step}");
            }
            let (again, _, _) =
                train_candle_group(&plan, &data, world, super::super::Precision::Fp32);
            assert_eq!(
                bits(&weights),
                bits(&again),
                "{world} ranks: not reproducible"
            );
        }
    }

    /// fp16 on candle CPU ranks: a loss scale so large that one rank's gradients overflow
    /// makes every rank skip the step (they see the same summed gradients), so the ranks
    /// stay in step and train on.
    #[test]
    fn fp16_ranks_skip_an_overflowing_step_together() {
        let plan = plan();
        let data = batches(&plan, 3, 8);
        let (weights, stats, skipped) =
            train_candle_group(&plan, &data, 2, super::super::Precision::Fp16);
        // The default scale (2^16) does not overflow on this model: all steps applied.
        assert_eq!(skipped, 0);
        assert_eq!(stats.len(), 3);
        assert!(weights.iter().flatten().all(|w| w.is_finite()));

        let device = candle_core::Device::Cpu;
        let params = plan.init_params(3);
        let mut adam = Adam::new(&params);
        let huge = super::super::LossScaler {
            scale: 2f64.powi(40),
            ..Default::default()
        };
        let trainers = (0..2)
            .map(|_| {
                let mut t = CandleTrainer::with_precision(
                    &plan.spec,
                    &params,
                    &adam,
                    &device,
                    super::super::Precision::Fp16,
                )
                .unwrap();
                t.set_loss_scaler(huge);
                t
            })
            .collect();
        let collectives = InProcess::group_with_timeout(2, Duration::from_secs(60))
            .into_iter()
            .map(|c| Box::new(c) as Box<dyn Collective>)
            .collect();
        let mut group = DeviceGroup::new(trainers, collectives, &adam).unwrap();
        group.step(&data[0].0, &data[0].1, &mut adam, LR).unwrap();
        assert_eq!(group.rank0().skipped_steps(), 1);
        assert_eq!(adam.step, 0, "a skipped step is not an optimizer step");
        assert_eq!(group.rank0().loss_scaler().unwrap().scale, 2f64.powi(39));
        // The worker skipped too: the next step (scale still huge) keeps both in step, and
        // a group whose ranks disagreed would fail its next collective on lengths/rounds.
        group.step(&data[1].0, &data[1].1, &mut adam, LR).unwrap();
        let mut after = Vec::new();
        group.download(&mut after, &mut adam).unwrap();
        assert_eq!(after, params, "skipped steps changed the weights");
    }

    /// A bad label in rank 1's shard fails the step on every rank with the reason, and the
    /// group goes on with the next good batch.
    #[test]
    fn a_bad_shard_fails_the_candle_step_everywhere() {
        let plan = plan();
        let mut data = batches(&plan, 2, 8);
        data[0].1[7] = 9; // rank 1's shard (images 4..8 of 2 ranks)
        let device = candle_core::Device::Cpu;
        let params = plan.init_params(3);
        let mut adam = Adam::new(&params);
        let trainers = (0..2)
            .map(|_| CandleTrainer::new(&plan.spec, &params, &adam, &device).unwrap())
            .collect();
        let collectives = InProcess::group_with_timeout(2, Duration::from_secs(60))
            .into_iter()
            .map(|c| Box::new(c) as Box<dyn Collective>)
            .collect();
        let mut group = DeviceGroup::new(trainers, collectives, &adam).unwrap();
        let err = group
            .step(&data[0].0, &data[0].1, &mut adam, LR)
            .unwrap_err()
            .to_string();
        assert!(err.contains("rank 1: label 9 is out of range"), "{err}");
        group.step(&data[1].0, &data[1].1, &mut adam, LR).unwrap();
        assert_eq!(adam.step, 1);
    }
}
