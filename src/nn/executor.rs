//! Runs a [`Plan`] on the CPU: forward, backward and loss over a batch split into shards.
//!
//! Each shard (one per thread) runs its slice of the batch single-threaded with its own
//! buffers, then the shards' gradients are summed in shard order. On 2 cores this beats
//! splitting each small GEMM across threads, and the fixed summation order makes a run
//! bit-reproducible for a given thread count.

use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use super::layers::{self, grown};
use super::plan::{ConvOp, Op, Plan, PoolOp};

/// Per-shard buffers, reused from step to step so the hot loop does not allocate.
#[derive(Debug, Default)]
struct Workspace {
    /// `acts[0]` is the input; `acts[i + 1]` is op `i`'s output (left empty while
    /// training for a conv fused with its pool, [`fused_conv_pool`]).
    acts: Vec<Vec<f32>>,
    /// im2col patches of each conv op: kept from forward to backward for the first conv
    /// (tap-major), a per-chunk scratch for the others, which unfold again in the
    /// backward pass ([`layers::conv_backward_chunked`],
    /// [`layers::conv_relu_max_pool_backward`]).
    patches: Vec<Vec<f32>>,
    /// Dropout multipliers (0 or 1 / keep).
    masks: Vec<Vec<f32>>,
    /// Window index of each maximum of a max-pool fused with the ReLU before it.
    argmax: Vec<Vec<u32>>,
    /// One chunk of a conv's pre-activations (or their gradient) when the conv is fused
    /// with the max-pool after it ([`layers::conv_relu_max_pool_forward`]).
    pre: Vec<f32>,
    /// Whether training fuses convs with their pools ([`fused_conv_pool`]); tests turn it
    /// off to compare with the separate passes.
    fuse: bool,
    grad: Vec<f32>,
    grad_prev: Vec<f32>,
    scratch: Vec<f32>,
}

impl Workspace {
    fn new(ops: usize) -> Self {
        Workspace {
            acts: vec![Vec::new(); ops + 1],
            patches: vec![Vec::new(); ops],
            masks: vec![Vec::new(); ops],
            argmax: vec![Vec::new(); ops],
            fuse: true,
            ..Default::default()
        }
    }
}

/// Whether dropout is active, and the seed of its masks for this shard and step.
#[derive(Debug, Clone, Copy)]
enum Mode {
    Infer,
    Train { dropout_seed: u64 },
}

/// The ReLU'd conv and the max-pool of op `i`, when that pool runs fused with the conv
/// before it while training ([`layers::conv_relu_max_pool_forward`]): the pool applies the
/// conv's bias and ReLU after the max, chunk by chunk, and the conv's own output is never
/// written, so its op does nothing. Inference (whose activations int8 calibration reads)
/// never fuses.
///
/// `fuse` is false only in tests, which compare against the separate passes.
fn fused_conv_pool(fuse: bool, plan: &Plan, i: usize) -> Option<(&ConvOp, &PoolOp)> {
    if !fuse {
        return None;
    }
    match (i.checked_sub(1).map(|j| &plan.ops[j]), plan.ops.get(i)) {
        (Some(Op::Conv(conv)), Some(Op::MaxPool(pool)))
            if conv.relu && layers::fuses_relu_max_pool(pool) =>
        {
            Some((conv, pool))
        }
        _ => None,
    }
}

/// Images per chunk of a training conv ([`layers::conv_backward_chunked`]). Measured on
/// the reference CNN (2-core AMD EPYC, 1 epoch on 30,000 images, 3 runs each, medians):
/// whole shards 4,837 images/s, chunks of 1: 4,845, 2: 5,480, 4: 5,737, 32: 4,930.
const CONV_CHUNK: usize = 4;

fn forward(plan: &Plan, params: &[Vec<f32>], batch: usize, ws: &mut Workspace, mode: Mode) {
    let training = matches!(mode, Mode::Train { .. });
    let fuse = ws.fuse;
    for (i, op) in plan.ops.iter().enumerate() {
        let (before, after) = ws.acts.split_at_mut(i + 1);
        let (x, out) = (&before[i], &mut after[0]);
        match op {
            Op::Conv(_) if training && fused_conv_pool(fuse, plan, i + 1).is_some() => {
                // Runs with its pool, at the next op.
                out.clear();
            }
            Op::Conv(conv) => {
                let (weight, bias) = (&params[conv.weight], &params[conv.weight + 1]);
                let patches = &mut ws.patches[i];
                if training {
                    // The first (tap-major) conv unfolds the whole shard at once and keeps
                    // it for its weight gradient; the others go in chunks and unfold again.
                    let chunk = if conv.is_tap_major() {
                        batch
                    } else {
                        CONV_CHUNK
                    };
                    layers::conv_pre_activation_chunked(
                        conv, weight, bias, x, batch, chunk, patches, out,
                    );
                    if conv.relu {
                        layers::relu_in_place(out);
                    }
                } else {
                    layers::conv_forward(conv, weight, bias, x, batch, patches, out);
                }
            }
            Op::Dense(dense) => layers::dense_forward(
                dense,
                &params[dense.weight],
                &params[dense.weight + 1],
                x,
                batch,
                out,
            ),
            Op::MaxPool(_) if training && fused_conv_pool(fuse, plan, i).is_some() => {
                let (conv, pool) = fused_conv_pool(fuse, plan, i).expect("checked");
                layers::conv_relu_max_pool_forward(
                    conv,
                    pool,
                    &params[conv.weight],
                    &params[conv.weight + 1],
                    &before[i - 1],
                    batch,
                    CONV_CHUNK,
                    &mut ws.patches[i - 1],
                    &mut ws.pre,
                    out,
                    &mut ws.argmax[i],
                );
            }
            Op::MaxPool(pool) => layers::max_pool_forward(pool, x, batch, out),
            Op::AvgPool(pool) => layers::avg_pool_forward(pool, x, batch, out),
            Op::Relu { len } => {
                out.clear();
                out.extend_from_slice(&x[..batch * len]);
                layers::relu_in_place(out);
            }
            Op::Dropout { rate, len } => {
                out.clear();
                out.extend_from_slice(&x[..batch * len]);
                if let Mode::Train { dropout_seed } = mode {
                    let keep = 1.0 - rate;
                    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(dropout_seed ^ i as u64);
                    let mask = &mut ws.masks[i];
                    mask.clear();
                    mask.extend((0..batch * len).map(|_| {
                        if rng.random::<f32>() < keep {
                            1.0 / keep
                        } else {
                            0.0
                        }
                    }));
                    for (v, m) in out.iter_mut().zip(mask.iter()) {
                        *v *= m;
                    }
                }
            }
        }
    }
}

fn backward(
    plan: &Plan,
    params: &[Vec<f32>],
    batch: usize,
    ws: &mut Workspace,
    grads: &mut [Vec<f32>],
) {
    // On entry ws.grad holds d(loss)/d(logits); after each op, d(loss)/d(its input).
    let fuse = ws.fuse;
    for (i, op) in plan.ops.iter().enumerate().rev() {
        if matches!(op, Op::Conv(_)) && fused_conv_pool(fuse, plan, i + 1).is_some() {
            // Its gradients were taken with its pool's, at the next op.
            continue;
        }
        // A fused pool takes its conv's input gradient: it stands for both ops.
        let first_op = if fused_conv_pool(fuse, plan, i).is_some() {
            i - 1
        } else {
            i
        };
        let needs_dx = first_op > 0;
        let in_len = if first_op == 0 {
            plan.input_len
        } else {
            plan.out_lens[first_op - 1]
        };
        let dx = needs_dx.then(|| grown(&mut ws.grad_prev, batch * in_len));
        let output = &ws.acts[i + 1];
        let input = &ws.acts[i];
        match op {
            Op::MaxPool(_) if fused_conv_pool(fuse, plan, i).is_some() => {
                let (conv, pool) = fused_conv_pool(fuse, plan, i).expect("checked");
                let (dw, db) = grads[conv.weight..].split_at_mut(1);
                layers::conv_relu_max_pool_backward(
                    conv,
                    pool,
                    &params[conv.weight],
                    &ws.acts[i - 1],
                    output,
                    &ws.argmax[i],
                    &ws.grad,
                    batch,
                    CONV_CHUNK,
                    &mut dw[0],
                    &mut db[0],
                    &mut ws.patches[i - 1],
                    &mut ws.pre,
                    &mut ws.scratch,
                    dx,
                );
            }
            Op::Conv(conv) => {
                if conv.relu {
                    layers::relu_backward(&mut ws.grad, output);
                }
                let (dw, db) = grads[conv.weight..].split_at_mut(1);
                if !conv.is_tap_major() {
                    layers::conv_backward_chunked(
                        conv,
                        &params[conv.weight],
                        input,
                        &ws.grad,
                        batch,
                        CONV_CHUNK,
                        &mut dw[0],
                        &mut db[0],
                        &mut ws.patches[i],
                        &mut ws.scratch,
                        dx,
                    );
                } else {
                    layers::conv_backward(
                        conv,
                        &params[conv.weight],
                        &ws.patches[i],
                        &ws.grad,
                        batch,
                        &mut dw[0],
                        &mut db[0],
                        &mut ws.scratch,
                        dx,
                    );
                }
            }
            Op::Dense(dense) => {
                if dense.relu {
                    layers::relu_backward(&mut ws.grad, output);
                }
                let (dw, db) = grads[dense.weight..].split_at_mut(1);
                layers::dense_backward(
                    dense,
                    &params[dense.weight],
                    input,
                    &ws.grad,
                    batch,
                    &mut dw[0],
                    &mut db[0],
                    dx,
                );
            }
            Op::MaxPool(pool) => {
                if let Some(dx) = dx {
                    layers::max_pool_backward(pool, input, output, &ws.grad, batch, dx);
                }
            }
            Op::AvgPool(pool) => {
                if let Some(dx) = dx {
                    layers::avg_pool_backward(pool, &ws.grad, batch, dx);
                }
            }
            Op::Relu { .. } => {
                if let Some(dx) = dx {
                    dx.copy_from_slice(&ws.grad[..batch * in_len]);
                    layers::relu_backward(dx, output);
                }
            }
            Op::Dropout { .. } => {
                if let Some(dx) = dx {
                    dx.copy_from_slice(&ws.grad[..batch * in_len]);
                    if !ws.masks[i].is_empty() {
                        for (d, m) in dx.iter_mut().zip(&ws.masks[i]) {
                            *d *= m;
                        }
                    }
                }
            }
        }
        if needs_dx {
            std::mem::swap(&mut ws.grad, &mut ws.grad_prev);
        }
    }
}

/// Softmax cross-entropy over logits: returns (sum of losses, correct count) and writes
/// d(mean loss)/d(logits) into the first `logits.len()` values of `dlogits` (grown when
/// shorter, never shrunk), where the mean is over `total_batch` images.
pub fn softmax_cross_entropy(
    logits: &[f32],
    labels: &[u8],
    classes: usize,
    total_batch: usize,
    dlogits: Option<&mut Vec<f32>>,
) -> (f64, usize) {
    let mut loss = 0.0f64;
    let mut correct = 0;
    let mut dl = dlogits;
    if let Some(d) = dl.as_deref_mut() {
        grown(d, logits.len());
    }
    for (n, row) in logits.chunks_exact(classes).enumerate() {
        let label = labels[n] as usize;
        let (mut best, mut best_at) = (f32::NEG_INFINITY, 0);
        for (c, &v) in row.iter().enumerate() {
            if v > best {
                best = v;
                best_at = c;
            }
        }
        if best_at == label {
            correct += 1;
        }
        let sum: f32 = row.iter().map(|v| (v - best).exp()).sum();
        let log_sum = sum.ln() + best;
        loss += (log_sum - row[label]) as f64;
        if let Some(d) = dl.as_deref_mut() {
            let scale = 1.0 / total_batch as f32;
            for (c, &v) in row.iter().enumerate() {
                let p = (v - log_sum).exp();
                let target = if c == label { 1.0 } else { 0.0 };
                d[n * classes + c] = (p - target) * scale;
            }
        }
    }
    (loss, correct)
}

struct Shard {
    ws: Workspace,
    grads: Vec<Vec<f32>>,
    loss: f64,
    correct: usize,
}

/// Totals of one training or evaluation batch.
#[derive(Debug, Clone, Copy, Default)]
pub struct BatchStats {
    /// Sum of per-image losses.
    pub loss_sum: f64,
    /// Images whose top-1 class was right.
    pub correct: usize,
}

/// Runs a plan over batches, one shard per thread.
pub struct Executor {
    plan: Plan,
    shards: Vec<Shard>,
    /// Summed gradients of the last training step, in parameter order.
    pub grads: Vec<Vec<f32>>,
}

impl Executor {
    /// An executor with `shards` shards (usually the thread count).
    pub fn new(plan: &Plan, shards: usize) -> Self {
        let zeros =
            || -> Vec<Vec<f32>> { plan.params.iter().map(|p| vec![0.0; p.len()]).collect() };
        Executor {
            plan: plan.clone(),
            shards: (0..shards.max(1))
                .map(|_| Shard {
                    ws: Workspace::new(plan.ops.len()),
                    grads: zeros(),
                    loss: 0.0,
                    correct: 0,
                })
                .collect(),
            grads: zeros(),
        }
    }

    /// The plan it runs.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    fn ranges(&self, batch: usize) -> Vec<(usize, usize)> {
        let n = self.shards.len();
        (0..n)
            .map(|i| (i * batch / n, (i + 1) * batch / n))
            .collect()
    }

    /// Forward + backward on one batch; leaves the summed gradients in `self.grads`.
    ///
    /// `x` is `[batch, h, w, c]` NHWC f32, preprocessed, with `batch = labels.len()`;
    /// `params` are the plan's tensors in spec order (conv `[out, kh, kw, in]`, dense
    /// `[out, in]`, biases `[out]`); `step_seed` drives the dropout masks. The returned
    /// loss is summed over the batch, the gradients are of the batch's mean loss.
    ///
    /// # Panics
    /// If `x.len() < labels.len() * plan.input_len`, a label is `plan.classes` or more, or
    /// `params` does not match `plan.params` (fewer tensors, or one shorter than its
    /// shape).
    pub fn train_step(
        &mut self,
        params: &[Vec<f32>],
        x: &[f32],
        labels: &[u8],
        step_seed: u64,
    ) -> BatchStats {
        let batch = labels.len();
        let ranges = self.ranges(batch);
        let plan = &self.plan;
        let input_len = plan.input_len;
        self.shards.par_iter_mut().zip(ranges).enumerate().for_each(
            |(index, (shard, (start, end)))| {
                let n = end - start;
                shard.loss = 0.0;
                shard.correct = 0;
                if n == 0 {
                    shard.grads.iter_mut().for_each(|g| g.fill(0.0));
                    return;
                }
                shard.ws.acts[0].clear();
                shard.ws.acts[0].extend_from_slice(&x[start * input_len..end * input_len]);
                let seed = step_seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ index as u64;
                forward(
                    plan,
                    params,
                    n,
                    &mut shard.ws,
                    Mode::Train { dropout_seed: seed },
                );
                let logits = &shard.ws.acts[plan.ops.len()];
                let (loss, correct) = softmax_cross_entropy(
                    logits,
                    &labels[start..end],
                    plan.classes,
                    batch,
                    Some(&mut shard.ws.grad),
                );
                shard.loss = loss;
                shard.correct = correct;
                backward(plan, params, n, &mut shard.ws, &mut shard.grads);
            },
        );
        // Sum in shard order: deterministic for a given shard count.
        let (first, rest) = self.shards.split_first().expect("at least one shard");
        let mut stats = BatchStats {
            loss_sum: first.loss,
            correct: first.correct,
        };
        for (total, g) in self.grads.iter_mut().zip(&first.grads) {
            total.copy_from_slice(g);
        }
        for shard in rest {
            stats.loss_sum += shard.loss;
            stats.correct += shard.correct;
            for (total, g) in self.grads.iter_mut().zip(&shard.grads) {
                for (t, v) in total.iter_mut().zip(g) {
                    *t += v;
                }
            }
        }
        stats
    }

    /// The fp32 activations of one batch: `[0]` is the input, `[i + 1]` op `i`'s output,
    /// each `[batch, out_lens[i]]` NHWC (what int8 calibration measures). `x` is
    /// `[batch, h, w, c]` preprocessed, `params` as in [`Executor::train_step`].
    pub fn activations(&mut self, params: &[Vec<f32>], x: &[f32], batch: usize) -> Vec<Vec<f32>> {
        let plan = &self.plan;
        let ws = &mut self.shards[0].ws;
        ws.acts[0].clear();
        ws.acts[0].extend_from_slice(&x[..batch * plan.input_len]);
        forward(plan, params, batch, ws, Mode::Infer);
        ws.acts.clone()
    }

    /// Logits for a batch (`[batch, classes]` into `logits`), dropout off.
    pub fn predict(&mut self, params: &[Vec<f32>], x: &[f32], batch: usize, logits: &mut Vec<f32>) {
        let plan = &self.plan;
        let input_len = plan.input_len;
        if batch <= 1 || self.shards.len() == 1 {
            // Too small to split: run inline, sparing the thread hand-off (batch-1 latency).
            let ws = &mut self.shards[0].ws;
            ws.acts[0].clear();
            ws.acts[0].extend_from_slice(&x[..batch * input_len]);
            forward(plan, params, batch, ws, Mode::Infer);
            logits.clear();
            logits.extend_from_slice(&ws.acts[plan.ops.len()][..batch * plan.classes]);
            return;
        }
        let ranges = self.ranges(batch);
        self.shards
            .par_iter_mut()
            .zip(ranges.clone())
            .for_each(|(shard, (start, end))| {
                if end > start {
                    shard.ws.acts[0].clear();
                    shard.ws.acts[0].extend_from_slice(&x[start * input_len..end * input_len]);
                    forward(plan, params, end - start, &mut shard.ws, Mode::Infer);
                }
            });
        logits.clear();
        for (shard, (start, end)) in self.shards.iter().zip(ranges) {
            if end > start {
                let out = &shard.ws.acts[plan.ops.len()];
                logits.extend_from_slice(&out[..(end - start) * plan.classes]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelSpec;

    /// Smooth (no ReLU, no max) so finite differences are exact up to rounding; covers
    /// both conv paths: direct (layers 0 and 3, the latter with an input gradient) and
    /// im2col + GEMM (layer 1).
    fn tiny_spec() -> ModelSpec {
        ModelSpec::from_yaml(
            "input: [6, 6, 2]\nclasses: 3\nlayers:\n\
             - {type: conv2d, filters: 8, kernel: 3, padding: same}\n\
             - {type: conv2d, filters: 4, kernel: 3, padding: same}\n\
             - {type: avg_pool2d, size: 2}\n\
             - {type: conv2d, filters: 3, kernel: 2, stride: 1}\n\
             - {type: avg_pool2d, size: 2}\n\
             - {type: flatten}\n\
             - {type: dense, units: 5}\n\
             - {type: dense, units: 3}\n",
        )
        .unwrap()
    }

    fn loss_of(plan: &Plan, params: &[Vec<f32>], x: &[f32], labels: &[u8]) -> f64 {
        let mut exec = Executor::new(plan, 1);
        let mut logits = Vec::new();
        exec.predict(params, x, labels.len(), &mut logits);
        softmax_cross_entropy(&logits, labels, plan.classes, labels.len(), None).0
            / labels.len() as f64
    }

    /// ReLU and max-pool gradients: kinks make finite differences unreliable at ties,
    /// so this spec keeps windows away from them (valid conv on varied input).
    fn kinked_spec() -> ModelSpec {
        ModelSpec::from_yaml(
            "input: [7, 7, 3]\nclasses: 3\nlayers:\n\
             - {type: conv2d, filters: 12, kernel: 3, activation: relu}\n\
             - {type: max_pool2d, size: 2}\n\
             - {type: flatten}\n\
             - {type: dense, units: 6, activation: relu}\n\
             - {type: dense, units: 3}\n",
        )
        .unwrap()
    }

    /// Every analytic gradient agrees with a central finite difference.
    #[test]
    fn gradients_match_finite_differences() {
        check_gradients(&tiny_spec());
    }

    #[test]
    fn relu_and_max_pool_gradients_match_finite_differences() {
        check_gradients(&kinked_spec());
    }

    /// Two ReLU'd convs each fused with the max-pool after it while training (the second
    /// one padded, not tap-major, passing its input gradient back through the first pool),
    /// over several chunks and a partial one: the same loss and gradients as the separate
    /// passes, up to the GEMM's rounding. (Finite differences cannot check this stack: its
    /// two ReLU + max-pool stages put kinks within any usable step of most weights.)
    #[test]
    fn fused_conv_pool_pairs_match_separate_passes() {
        let spec = ModelSpec::from_yaml(
            "input: [10, 10, 2]\nclasses: 3\nlayers:\n\
             - {type: conv2d, filters: 6, kernel: 3, activation: relu}\n\
             - {type: max_pool2d, size: 2}\n\
             - {type: conv2d, filters: 5, kernel: 3, padding: same, activation: relu}\n\
             - {type: max_pool2d, size: 2}\n\
             - {type: flatten}\n\
             - {type: dense, units: 3}\n",
        )
        .unwrap();
        let plan = Plan::compile(&spec).unwrap();
        assert!(fused_conv_pool(true, &plan, 1).is_some());
        assert!(fused_conv_pool(true, &plan, 3).is_some());
        let mut params = plan.init_params(3);
        // Biases away from zero, so adding them after the max is exercised.
        for conv in [0, 2] {
            let Op::Conv(op) = &plan.ops[conv] else {
                panic!("op {conv} is a conv")
            };
            for (j, b) in params[op.weight + 1].iter_mut().enumerate() {
                *b = 0.05 * j as f32 - 0.1;
            }
        }
        // Several steps on the same executors, the batch shrinking and growing again (buffers
        // keep their largest size), over one shard and over shards of which some are empty.
        for shards in [1, 4] {
            let mut fused = Executor::new(&plan, shards);
            let mut separate = Executor::new(&plan, shards);
            for shard in &mut separate.shards {
                shard.ws.fuse = false;
            }
            for (step, batch) in [2 * CONV_CHUNK + 3, 5, 3, 2 * CONV_CHUNK + 3]
                .into_iter()
                .enumerate()
            {
                let x: Vec<f32> = (0..batch * plan.input_len)
                    .map(|i| (((i + step * 31) * 7919 % 1009) as f32) / 1009.0)
                    .collect();
                let labels: Vec<u8> = (0..batch).map(|i| ((i + step) % 3) as u8).collect();
                let a = fused.train_step(&params, &x, &labels, 0);
                let b = separate.train_step(&params, &x, &labels, 0);
                let what = format!("{shards} shard(s), step {step}, batch {batch}");
                assert!(
                    (a.loss_sum - b.loss_sum).abs() < 1e-5 * b.loss_sum.abs(),
                    "{what}: loss {} vs {}",
                    a.loss_sum,
                    b.loss_sum
                );
                assert_eq!(a.correct, b.correct, "{what}");
                for (p, (got, want)) in fused.grads.iter().zip(&separate.grads).enumerate() {
                    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                    assert!(
                        scale > 0.0,
                        "{what}: {} has no gradient",
                        plan.params[p].name
                    );
                    for (g, w) in got.iter().zip(want) {
                        assert!(
                            (g - w).abs() <= 1e-4 * scale,
                            "{what}: {}: {g} vs {w}",
                            plan.params[p].name
                        );
                    }
                }
            }
        }
    }

    fn check_gradients(spec: &ModelSpec) {
        let plan = Plan::compile(spec).unwrap();
        let params = plan.init_params(3);
        let batch = 4;
        let x: Vec<f32> = (0..batch * plan.input_len)
            .map(|i| ((i * 37 % 101) as f32) / 101.0)
            .collect();
        let labels = [0u8, 1, 2, 1];
        let mut exec = Executor::new(&plan, 2);
        exec.train_step(&params, &x, &labels, 0);
        let eps = 3e-3f32;
        for (p, param) in params.iter().enumerate() {
            for j in (0..param.len()).step_by(7) {
                let mut plus = params.clone();
                plus[p][j] += eps;
                let mut minus = params.clone();
                minus[p][j] -= eps;
                let numeric = (loss_of(&plan, &plus, &x, &labels)
                    - loss_of(&plan, &minus, &x, &labels))
                    / (2.0 * eps as f64);
                let analytic = exec.grads[p][j] as f64;
                assert!(
                    (numeric - analytic).abs() < 2e-3 + 0.05 * analytic.abs(),
                    "{} [{j}]: numeric {numeric} analytic {analytic}",
                    plan.params[p].name
                );
            }
        }
    }

    /// Splitting a batch into shards gives the same logits as one shard (up to GEMM
    /// blocking, which differs with the row count).
    #[test]
    fn shards_agree_with_single_shard() {
        let plan = Plan::compile(&tiny_spec()).unwrap();
        let params = plan.init_params(1);
        let x: Vec<f32> = (0..5 * plan.input_len)
            .map(|i| (i % 13) as f32 / 13.0)
            .collect();
        let (mut one, mut three) = (Vec::new(), Vec::new());
        Executor::new(&plan, 1).predict(&params, &x, 5, &mut one);
        Executor::new(&plan, 3).predict(&params, &x, 5, &mut three);
        assert_eq!(one.len(), three.len());
        for (a, b) in one.iter().zip(&three) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + a.abs()), "{a} vs {b}");
        }
    }
}
