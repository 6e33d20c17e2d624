//! The int8 runtime: conv and dense layers computed in integer arithmetic.
//!
//! uint8 activations (per-tensor scale and zero point) times int8 weights (per output
//! channel, symmetric) accumulate exactly in int32 (see [`gemm`]); the bias is added in
//! int32, the result is requantized to the next layer's uint8 scale with the ReLU fused
//! into the clamp, max-pooling works on the integers, and only the logits are turned
//! back into floats.

pub mod gemm;

use multiversion::multiversion;
use rayon::prelude::*;

use self::gemm::{gemm_u8i8, Kernel, PackedWeights};
use crate::artifact::{Artifact, Precision, TensorData};
use crate::nn::plan::{ConvOp, Op, PoolOp};
use crate::nn::Plan;
use crate::{Error, Result};

/// How real values map to uint8: `real = (q - zero_point) * scale`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ActQuant {
    /// Real value of one step.
    pub scale: f32,
    /// The byte that stands for 0.0.
    pub zero_point: u8,
}

impl ActQuant {
    /// The asymmetric uint8 mapping covering `[min, max]` (always including 0.0).
    pub fn from_range(min: f32, max: f32) -> Self {
        let (lo, hi) = (min.min(0.0), max.max(0.0));
        let scale = if hi > lo { (hi - lo) / 255.0 } else { 1.0 };
        let zero_point = (-lo / scale).round().clamp(0.0, 255.0) as u8;
        ActQuant { scale, zero_point }
    }

    /// Rounds a real value to its byte (nearest, ties to even, as the runtime does).
    pub fn quantize(&self, x: f32) -> u8 {
        (x / self.scale + self.zero_point as f32)
            .round_ties_even()
            .clamp(0.0, 255.0) as u8
    }
}

/// A conv or dense layer ready for the integer kernel.
#[derive(Debug, Clone)]
struct QuantLayer {
    /// `Some` for a conv (geometry), `None` for dense.
    conv: Option<ConvOp>,
    weights: PackedWeights,
    /// `round(bias / (input_scale * weight_scale)) - input_zero_point * sum(weights)`:
    /// everything added to a channel's int32 accumulator, folded once at load.
    offset: Vec<i32>,
    input: ActQuant,
    /// `None` for the last layer, whose output is dequantized logits.
    output: Option<ActQuant>,
    /// `input_scale * weight_scale / output_scale` (or without the output scale for logits).
    multiplier: Vec<f32>,
    relu: bool,
}

#[derive(Debug, Clone)]
enum QuantOp {
    Layer(Box<QuantLayer>),
    MaxPool(PoolOp),
    AvgPool(PoolOp),
    Relu { zero_point: u8 },
    Identity,
}

/// Per-thread buffers, one per op so their sizes never change between calls (a buffer
/// that shrank and regrew would be zero-filled again on every call).
#[derive(Debug, Default)]
struct Scratch {
    /// `acts[0]` is the quantized input, `acts[i + 1]` op `i`'s output.
    acts: Vec<Vec<u8>>,
    patches: Vec<Vec<u8>>,
    acc: Vec<Vec<i32>>,
    logits: Vec<f32>,
}

/// An int8 artifact compiled for the integer kernels.
pub struct Int8Model {
    plan: Plan,
    ops: Vec<QuantOp>,
    input: ActQuant,
    kernel: Kernel,
    scratch: Vec<Scratch>,
}

fn f32s(artifact: &Artifact, name: &str) -> Result<Vec<f32>> {
    artifact
        .tensor(name)
        .and_then(|t| t.data.to_f32())
        .ok_or_else(|| Error::Config(format!("int8 artifact lacks f32 tensor `{name}`")))
}

impl Int8Model {
    /// Compiles an int8 artifact; `threads` shards the batch; `kernel` picks the GEMM.
    pub fn new(artifact: &Artifact, threads: usize, kernel: Kernel) -> Result<Self> {
        if artifact.precision != Precision::Int8 {
            return Err(Error::Config(
                "the int8 runtime needs an int8 artifact".into(),
            ));
        }
        let plan = Plan::compile(&artifact.spec)?;
        // Input quantization of every conv/dense, in op order.
        let mut layer_inputs = Vec::new();
        for op in &plan.ops {
            if let Op::Conv(ConvOp { weight, .. })
            | Op::Dense(crate::nn::plan::DenseOp { weight, .. }) = op
            {
                let name = &plan.params[*weight].name;
                let prefix = name.trim_end_matches("weight");
                let scale = f32s(artifact, &format!("{prefix}input_scale"))?[0];
                let zero_point = match artifact
                    .tensor(&format!("{prefix}input_zero_point"))
                    .map(|t| &t.data)
                {
                    Some(TensorData::U8(v)) if v.len() == 1 => v[0],
                    _ => {
                        return Err(Error::Config(format!(
                            "int8 artifact lacks `{prefix}input_zero_point`"
                        )))
                    }
                };
                layer_inputs.push(ActQuant { scale, zero_point });
            }
        }
        let Some(&first_input) = layer_inputs.first() else {
            return Err(Error::Config(
                "an int8 model needs at least one conv or dense layer".into(),
            ));
        };
        if !matches!(plan.ops.last(), Some(Op::Conv(_) | Op::Dense(_))) {
            return Err(Error::Config(
                "the int8 runtime needs the model to end with a conv or dense layer (its logits)"
                    .into(),
            ));
        }
        let mut ops = Vec::new();
        let mut next_layer = 0;
        // The quantization the activations are in while walking the ops.
        let mut current = first_input;
        for op in &plan.ops {
            let quant_op = match op {
                Op::Conv(_) | Op::Dense(_) => {
                    let (conv, weight, relu, n, k) = match op {
                        Op::Conv(c) => (
                            Some(c.clone()),
                            c.weight,
                            c.relu,
                            c.output[2],
                            c.patch_len(),
                        ),
                        Op::Dense(d) => (None, d.weight, d.relu, d.units, d.inputs),
                        _ => unreachable!(),
                    };
                    let name = &plan.params[weight].name;
                    let q = match artifact.tensor(name).map(|t| &t.data) {
                        Some(TensorData::I8(q)) => q.clone(),
                        _ => {
                            return Err(Error::Config(format!(
                                "int8 artifact lacks I8 tensor `{name}`"
                            )))
                        }
                    };
                    let weight_scale = f32s(artifact, &format!("{name}_scale"))?;
                    let bias = f32s(artifact, &plan.params[weight + 1].name)?;
                    let input = layer_inputs[next_layer];
                    next_layer += 1;
                    let output = layer_inputs.get(next_layer).copied();
                    let weights = PackedWeights::new(&q, n, k);
                    let offset = bias
                        .iter()
                        .zip(&weight_scale)
                        .zip(&weights.sums)
                        .map(|((b, s), sum)| {
                            (b / (input.scale * s)).round() as i32 - input.zero_point as i32 * sum
                        })
                        .collect();
                    let multiplier = weight_scale
                        .iter()
                        .map(|s| input.scale * s / output.map_or(1.0, |o| o.scale))
                        .collect();
                    if let Some(o) = output {
                        current = o;
                    }
                    QuantOp::Layer(Box::new(QuantLayer {
                        conv,
                        weights,
                        offset,
                        input,
                        output,
                        multiplier,
                        relu,
                    }))
                }
                Op::MaxPool(p) => QuantOp::MaxPool(p.clone()),
                Op::AvgPool(p) => QuantOp::AvgPool(p.clone()),
                Op::Relu { .. } => QuantOp::Relu {
                    zero_point: current.zero_point,
                },
                Op::Dropout { .. } => QuantOp::Identity,
            };
            ops.push(quant_op);
        }
        Ok(Int8Model {
            plan,
            ops,
            input: first_input,
            kernel,
            scratch: (0..threads.max(1)).map(|_| Scratch::default()).collect(),
        })
    }

    /// The instruction set of the GEMM.
    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// The compiled float plan (shapes, classes).
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Logits `[batch, classes]` for float input `x` (`[batch, h, w, c]`, scaled).
    pub fn predict(&mut self, x: &[f32], batch: usize, logits: &mut Vec<f32>) {
        let shards = if batch <= 1 { 1 } else { self.scratch.len() };
        let ranges: Vec<(usize, usize)> = (0..shards)
            .map(|i| (i * batch / shards, (i + 1) * batch / shards))
            .collect();
        let (ops, plan, input, kernel) = (&self.ops, &self.plan, self.input, self.kernel);
        let run = |scratch: &mut Scratch, (start, end): (usize, usize)| {
            if end > start {
                forward(
                    ops,
                    plan,
                    input,
                    kernel,
                    &x[start * plan.input_len..end * plan.input_len],
                    end - start,
                    scratch,
                );
            }
        };
        if shards == 1 {
            run(&mut self.scratch[0], ranges[0]);
        } else {
            self.scratch[..shards]
                .par_iter_mut()
                .zip(ranges.clone())
                .for_each(|(s, r)| run(s, r));
        }
        logits.clear();
        for (scratch, (start, end)) in self.scratch.iter().zip(ranges) {
            logits.extend_from_slice(&scratch.logits[..(end - start) * plan.classes]);
        }
    }
}

fn forward(
    ops: &[QuantOp],
    plan: &Plan,
    input: ActQuant,
    kernel: Kernel,
    x: &[f32],
    batch: usize,
    s: &mut Scratch,
) {
    if s.acts.len() != ops.len() + 1 {
        s.acts = vec![Vec::new(); ops.len() + 1];
        s.patches = vec![Vec::new(); ops.len()];
        s.acc = vec![Vec::new(); ops.len()];
    }
    s.acts[0].resize(x.len(), 0);
    quantize_input(input, x, &mut s.acts[0]);
    for (i, op) in ops.iter().enumerate() {
        let in_len = if i == 0 {
            plan.input_len
        } else {
            plan.out_lens[i - 1]
        };
        let (before, after) = s.acts.split_at_mut(i + 1);
        let (a, out) = (&mut before[i], &mut after[0]);
        match op {
            QuantOp::Layer(layer) => {
                let patches = &mut s.patches[i];
                let rows = match &layer.conv {
                    Some(conv) => {
                        crate::nn::im2col::im2col(
                            conv,
                            a,
                            batch,
                            layer.weights.k_padded,
                            layer.input.zero_point,
                            patches,
                        );
                        batch * conv.output[0] * conv.output[1]
                    }
                    None => {
                        pad_rows(a, batch, in_len, layer.weights.k_padded, patches);
                        batch
                    }
                };
                let acc = &mut s.acc[i];
                acc.resize(rows * layer.weights.n, 0);
                gemm_u8i8(kernel, patches, rows, &layer.weights, acc);
                match layer.output {
                    Some(q) => {
                        out.resize(rows * layer.weights.n, 0);
                        requantize(layer, q, acc, out);
                    }
                    None => {
                        s.logits.resize(rows * layer.weights.n, 0.0);
                        dequantize(layer, acc, &mut s.logits);
                    }
                }
            }
            QuantOp::MaxPool(pool) => max_pool_u8(pool, a, batch, out),
            QuantOp::AvgPool(pool) => avg_pool_u8(pool, a, batch, out),
            QuantOp::Relu { zero_point } => {
                out.clear();
                out.extend(a.iter().map(|&v| v.max(*zero_point)));
            }
            QuantOp::Identity => {
                out.clear();
                out.extend_from_slice(a);
            }
        }
    }
}

/// Float input to the first layer's bytes (vectorized; same rounding as [`ActQuant::quantize`]).
#[multiversion(targets("x86_64+avx512f+avx512vl+avx512bw+avx512dq", "x86_64+avx2+fma"))]
// max/min rather than clamp: clamp keeps NaN, which the unchecked conversion must not see.
#[allow(clippy::manual_clamp)]
fn quantize_input(q: ActQuant, x: &[f32], out: &mut [u8]) {
    let zp = q.zero_point as f32;
    for (o, &v) in out.iter_mut().zip(x) {
        let r = (v / q.scale + zp).round_ties_even().max(0.0).min(255.0);
        // SAFETY: finite and in [0, 255] after max/min (NaN becomes 0).
        *o = unsafe { r.to_int_unchecked::<i32>() } as u8;
    }
}

/// Copies `rows` rows of `len` bytes to a stride of `stride` (the kernel's padded k).
#[inline(never)]
fn pad_rows(x: &[u8], rows: usize, len: usize, stride: usize, out: &mut Vec<u8>) {
    out.resize(rows * stride, 0);
    for r in 0..rows {
        out[r * stride..r * stride + len].copy_from_slice(&x[r * len..(r + 1) * len]);
    }
}

/// int32 accumulators to the next layer's bytes: offset (bias and zero-point
/// correction), scale, round to nearest even, ReLU (clamp at the zero point) and
/// saturation in one vectorized pass.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx512bw+avx512dq", "x86_64+avx2+fma"))]
#[allow(clippy::manual_clamp)] // see quantize_input
fn requantize(layer: &QuantLayer, out: ActQuant, acc: &[i32], dst: &mut [u8]) {
    let n = layer.weights.n;
    let low = if layer.relu {
        out.zero_point as f32
    } else {
        0.0
    };
    let zp_out = out.zero_point as f32;
    for (row, q) in acc.chunks_exact(n).zip(dst.chunks_exact_mut(n)) {
        for (((&a, &offset), &m), o) in row
            .iter()
            .zip(&layer.offset)
            .zip(&layer.multiplier)
            .zip(q.iter_mut())
        {
            let r = (((a + offset) as f32 * m).round_ties_even() + zp_out)
                .max(low)
                .min(255.0);
            // SAFETY: `r` is finite and in [0, 255] (max() maps NaN to `low`), so the
            // unchecked conversion is exact; the checked `as u8` would not vectorize.
            *o = unsafe { r.to_int_unchecked::<i32>() } as u8;
        }
    }
}

/// int32 accumulators of the last layer to float logits.
fn dequantize(layer: &QuantLayer, acc: &[i32], logits: &mut [f32]) {
    let n = layer.weights.n;
    for (row, out) in acc.chunks_exact(n).zip(logits.chunks_exact_mut(n)) {
        for (((&a, &offset), &m), o) in row
            .iter()
            .zip(&layer.offset)
            .zip(&layer.multiplier)
            .zip(out.iter_mut())
        {
            let real = (a + offset) as f32 * m;
            *o = if layer.relu { real.max(0.0) } else { real };
        }
    }
}

#[inline(never)]
fn max_pool_u8(op: &PoolOp, x: &[u8], batch: usize, out: &mut Vec<u8>) {
    let [h, w, c] = op.input;
    let [oh, ow, _] = op.output;
    out.resize(batch * oh * ow * c, 0);
    let mut o = 0;
    for n in 0..batch {
        let base = n * h * w * c;
        for oy in 0..oh {
            for ox in 0..ow {
                let first = base + (oy * op.stride * w + ox * op.stride) * c;
                let dst = &mut out[o..o + c];
                o += c;
                if op.size == 2 {
                    // The common window, as one branch-free pass (no memcpy/memset calls).
                    let (r0, r1) = (first, first + w * c);
                    let (a, b) = (&x[r0..r0 + c], &x[r0 + c..r0 + 2 * c]);
                    let (p, q) = (&x[r1..r1 + c], &x[r1 + c..r1 + 2 * c]);
                    for ch in 0..c {
                        dst[ch] = a[ch].max(b[ch]).max(p[ch].max(q[ch]));
                    }
                    continue;
                }
                // Bytes are >= 0, so 0 is the identity of max.
                dst.fill(0);
                for ky in 0..op.size {
                    for kx in 0..op.size {
                        let at = first + (ky * w + kx) * c;
                        for (d, &v) in dst.iter_mut().zip(&x[at..at + c]) {
                            *d = (*d).max(v);
                        }
                    }
                }
            }
        }
    }
}

fn avg_pool_u8(op: &PoolOp, x: &[u8], batch: usize, out: &mut Vec<u8>) {
    let [h, w, c] = op.input;
    let [oh, ow, _] = op.output;
    out.resize(batch * oh * ow * c, 0);
    let count = (op.size * op.size) as u32;
    let mut o = 0;
    for n in 0..batch {
        let base = n * h * w * c;
        for oy in 0..oh {
            for ox in 0..ow {
                let first = base + (oy * op.stride * w + ox * op.stride) * c;
                for ch in 0..c {
                    let mut sum = 0u32;
                    for ky in 0..op.size {
                        for kx in 0..op.size {
                            sum += x[first + (ky * w + kx) * c + ch] as u32;
                        }
                    }
                    out[o + ch] = ((sum + count / 2) / count) as u8;
                }
                o += c;
            }
        }
    }
}
