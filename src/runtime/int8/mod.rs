//! The int8 runtime: conv and dense layers computed in integer arithmetic.
//!
//! uint8 activations (per-tensor scale and zero point) times int8 weights (per output
//! channel, symmetric) accumulate exactly in int32 (see [`gemm`](mod@gemm)); the bias is added in
//! int32, the result is requantized to the next layer's uint8 scale with the ReLU fused
//! into the clamp, max-pooling works on the integers, and only the logits are turned
//! back into floats.

pub mod gemm;

use multiversion::multiversion;

use self::gemm::{gemm, ConvGeometry, Kernel, PackedWeights, Requant, Sink, Source};
use super::passes::Shards;
use crate::artifact::{Artifact, LayerPrecision, Precision, TensorData};
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
        // An empty range (or one so narrow its scale would be subnormal, 0 with denormals
        // flushed, and refused by the artifact check) maps everything to the zero point.
        let scale = match (hi - lo) / 255.0 {
            s if s >= f32::MIN_POSITIVE => s,
            _ => 1.0,
        };
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

/// A static int8 conv/dense: uint8 in, calibrated; bytes or floats out.
#[derive(Debug, Clone)]
struct StaticLayer {
    conv: Option<ConvOp>,
    /// The 2x2 max-pool that follows is fused into the GEMM (see `ConvGeometry::pool2`).
    pool2: bool,
    weights: PackedWeights,
    input: ActQuant,
    output: StaticOutput,
}

#[derive(Debug, Clone)]
enum StaticOutput {
    /// Requantized to the next int8 layer's input bytes (ReLU fused in the clamp), whose
    /// quantization is the `ActQuant`.
    Bytes(Requant, ActQuant),
    /// Dequantized to floats `(acc + offset) * multiplier` (logits, or the input of a
    /// layer that is not static int8).
    Floats {
        offset: Vec<i32>,
        multiplier: Vec<f32>,
        relu: bool,
    },
}

/// A dynamic-range int8 conv/dense: float in, each image quantized to uint8 by its own
/// range at run time, int8 GEMM, float out with the bias added in float (TFLite's
/// dynamic-range scheme, per image so a result never depends on its batch-mates).
#[derive(Debug, Clone)]
struct DynamicLayer {
    conv: Option<ConvOp>,
    /// The 2x2 max-pool that follows is fused (dequantization is increasing in the sum).
    pool2: bool,
    weights: PackedWeights,
    weight_scale: Vec<f32>,
    bias: Vec<f32>,
    relu: bool,
}

/// A layer kept in fp32 (`quantize --exclude`).
#[derive(Debug, Clone)]
struct FloatLayer {
    op: Op,
    weight: Vec<f32>,
    bias: Vec<f32>,
}

/// What the activations are between steps.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Domain {
    Floats,
    Bytes(ActQuant),
}

#[derive(Debug, Clone)]
enum Step {
    /// Floats to bytes.
    Quantize(ActQuant),
    /// Bytes to floats.
    Dequantize(ActQuant),
    Static(Box<StaticLayer>),
    Dynamic(Box<DynamicLayer>),
    Float(Box<FloatLayer>),
    MaxPool(PoolOp, Domain),
    AvgPool(PoolOp, Domain),
    Relu(Domain),
}

/// Per-thread buffers, one per step so their sizes never change between calls (a buffer
/// that shrank and regrew would be zero-filled again on every call).
#[derive(Debug, Default)]
struct Scratch {
    /// Step `i`'s output when it is bytes.
    bytes: Vec<Vec<u8>>,
    /// Step `i`'s output when it is floats.
    floats: Vec<Vec<f32>>,
    /// A zero-point-padded copy of the input and/or its rows unfolded (see [`layer_source`]).
    staging: Vec<[Vec<u8>; 2]>,
    float_patches: Vec<Vec<f32>>,
    acc: Vec<Vec<i32>>,
    /// Per-image input quantization of dynamic layers.
    image_quant: Vec<ActQuant>,
}

/// How each conv/dense layer of a model runs, for reports.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerRun {
    /// The weight tensor's name.
    pub weight: String,
    /// Its precision.
    pub precision: LayerPrecision,
}

/// An int8 artifact compiled for the integer kernels.
pub struct Int8Model {
    plan: Plan,
    steps: Vec<Step>,
    layers: Vec<LayerRun>,
    kernel: Kernel,
    scratch: Shards<Scratch>,
}

fn f32s(artifact: &Artifact, name: &str) -> Result<Vec<f32>> {
    artifact
        .tensor(name)
        .and_then(|t| t.data.to_f32())
        .ok_or_else(|| Error::Config(format!("int8 artifact lacks f32 tensor `{name}`")))
}

/// The calibrated input quantization of a static layer's weight `name`, if it has one.
fn static_input(artifact: &Artifact, name: &str) -> Result<Option<ActQuant>> {
    let prefix = name.trim_end_matches("weight");
    let Some(scale) = artifact.tensor(&format!("{prefix}input_scale")) else {
        return Ok(None);
    };
    let scale = scale.data.to_f32().unwrap_or_default();
    match (
        scale.as_slice(),
        artifact
            .tensor(&format!("{prefix}input_zero_point"))
            .map(|t| &t.data),
    ) {
        ([scale], Some(TensorData::U8(zp))) if zp.len() == 1 => Ok(Some(ActQuant {
            scale: *scale,
            zero_point: zp[0],
        })),
        _ => Err(Error::Config(format!(
            "int8 artifact has a bad `{prefix}input_scale` / `{prefix}input_zero_point`"
        ))),
    }
}

/// How the layer at `weight` runs in this artifact, read from its tensors' dtypes.
fn layer_kind(artifact: &Artifact, name: &str) -> Result<LayerPrecision> {
    match artifact.tensor(name).map(|t| &t.data) {
        Some(TensorData::I8(_)) => Ok(if static_input(artifact, name)?.is_some() {
            LayerPrecision::Int8Static
        } else {
            LayerPrecision::Int8Dynamic
        }),
        Some(_) => Ok(LayerPrecision::Fp32),
        None => Err(Error::Config(format!("int8 artifact lacks `{name}`"))),
    }
}

/// Whether `next` is a 2x2, stride-2 max-pool over all of `conv`'s output windows, which
/// the GEMM can fuse (see `ConvGeometry::pool2`).
fn fusable_pool(conv: Option<&ConvOp>, next: Option<&Op>) -> bool {
    match (conv, next) {
        (Some(c), Some(Op::MaxPool(p))) => {
            p.size == 2 && p.stride == 2 && p.output[..2] == [c.output[0] / 2, c.output[1] / 2]
        }
        _ => false,
    }
}

/// The weight index, output channels, reduction length and fused ReLU of a conv/dense.
fn layer_shape(op: &Op) -> Option<(usize, usize, usize, bool)> {
    match op {
        Op::Conv(c) => Some((c.weight, c.output[2], c.patch_len(), c.relu)),
        Op::Dense(d) => Some((d.weight, d.units, d.inputs, d.relu)),
        _ => None,
    }
}

impl Int8Model {
    /// Compiles an int8 artifact; `threads` shards the batch; `kernel` picks the GEMM.
    ///
    /// # Errors
    /// - [`Error::Config`] when the artifact is not int8, a layer's tensors are missing or
    ///   malformed (I8 weight, F32 `weight_scale` and bias, a static layer's
    ///   `input_scale` / `input_zero_point`), or it has no conv or dense layer.
    /// - [`Error::Spec`] / [`Error::SpecLayer`] when its spec is invalid.
    pub fn new(artifact: &Artifact, threads: usize, kernel: Kernel) -> Result<Self> {
        Self::compile(artifact, threads, kernel, true)
    }

    /// Every conv/dense layer's output (dequantized to floats, before any pooling) for
    /// images `x` (`[batch, h, w, c]` NHWC f32, preprocessed), as the model computes them:
    /// one `[batch, oh, ow, filters]` or `[batch, units]` vector per layer in op order,
    /// what per-layer error reports compare against fp32.
    ///
    /// # Errors
    /// As [`Int8Model::new`].
    ///
    /// # Panics
    /// If `x.len() < batch * h * w * c` (the plan's `input_len`).
    pub fn layer_outputs(artifact: &Artifact, x: &[f32], batch: usize) -> Result<Vec<Vec<f32>>> {
        let mut model = Self::compile(artifact, 1, Kernel::detect(), false)?;
        let scratch = model.scratch.first();
        forward(&model.steps, model.kernel, x, batch, scratch);
        let mut outputs = Vec::new();
        for (i, step) in model.steps.iter().enumerate() {
            match step {
                Step::Static(layer) => match &layer.output {
                    StaticOutput::Bytes(_, q) => outputs.push(
                        scratch.bytes[i]
                            .iter()
                            .map(|&b| (b as i32 - q.zero_point as i32) as f32 * q.scale)
                            .collect(),
                    ),
                    StaticOutput::Floats { .. } => outputs.push(scratch.floats[i].clone()),
                },
                Step::Dynamic(_) | Step::Float(_) => outputs.push(scratch.floats[i].clone()),
                _ => {}
            }
        }
        Ok(outputs)
    }

    fn compile(
        artifact: &Artifact,
        threads: usize,
        kernel: Kernel,
        fuse_pools: bool,
    ) -> Result<Self> {
        if artifact.precision != Precision::Int8 {
            return Err(Error::Config(
                "the int8 runtime needs an int8 artifact".into(),
            ));
        }
        let plan = Plan::compile(&artifact.spec)?;
        // Each conv/dense layer's kind and (static) input quantization, in op order.
        let mut kinds = Vec::new();
        for op in &plan.ops {
            if let Some((weight, ..)) = layer_shape(op) {
                let name = &plan.params[weight].name;
                kinds.push((layer_kind(artifact, name)?, static_input(artifact, name)?));
            }
        }
        let mut steps = Vec::new();
        let mut layers = Vec::new();
        let mut domain = Domain::Floats;
        let mut fused_pool = false;
        for (index, op) in plan.ops.iter().enumerate() {
            if std::mem::take(&mut fused_pool) {
                continue;
            }
            let Some((weight, n, k, relu)) = layer_shape(op) else {
                match op {
                    Op::MaxPool(p) => steps.push(Step::MaxPool(p.clone(), domain)),
                    Op::AvgPool(p) => steps.push(Step::AvgPool(p.clone(), domain)),
                    Op::Relu { .. } => steps.push(Step::Relu(domain)),
                    // Identity at inference.
                    Op::Dropout { .. } => {}
                    Op::Conv(_) | Op::Dense(_) => unreachable!("handled above"),
                }
                continue;
            };
            let conv = match op {
                Op::Conv(c) => Some(c.clone()),
                _ => None,
            };
            let name = plan.params[weight].name.clone();
            let bias = f32s(artifact, &plan.params[weight + 1].name)?;
            let (kind, input) = kinds[layers.len()];
            layers.push(LayerRun {
                weight: name.clone(),
                precision: kind,
            });
            // The next layer's input quantization, when it is static int8.
            let next_static = kinds.get(layers.len()).and_then(|(_, q)| *q);
            let int8_weights = || -> Result<(PackedWeights, Vec<f32>)> {
                let Some(TensorData::I8(q)) = artifact.tensor(&name).map(|t| &t.data) else {
                    return Err(Error::Config(format!("int8 artifact lacks I8 `{name}`")));
                };
                Ok((
                    pack_weights(conv.as_ref(), q, n, k),
                    f32s(artifact, &format!("{name}_scale"))?,
                ))
            };
            match (kind, input) {
                (LayerPrecision::Int8Static, Some(input)) => {
                    match domain {
                        Domain::Bytes(current) if current == input => {}
                        Domain::Bytes(current) => {
                            steps.push(Step::Dequantize(current));
                            steps.push(Step::Quantize(input));
                        }
                        Domain::Floats => steps.push(Step::Quantize(input)),
                    }
                    let (weights, weight_scale) = int8_weights()?;
                    let offset: Vec<i32> = bias
                        .iter()
                        .zip(&weight_scale)
                        .zip(&weights.sums)
                        .map(|((b, s), sum)| {
                            (b / (input.scale * s)).round() as i32 - input.zero_point as i32 * sum
                        })
                        .collect();
                    let output = match next_static {
                        Some(out) => {
                            domain = Domain::Bytes(out);
                            StaticOutput::Bytes(
                                Requant {
                                    offset,
                                    multiplier: weight_scale
                                        .iter()
                                        .map(|s| input.scale * s / out.scale)
                                        .collect(),
                                    zero_point: out.zero_point as f32,
                                    low: if relu { out.zero_point as f32 } else { 0.0 },
                                },
                                out,
                            )
                        }
                        None => {
                            domain = Domain::Floats;
                            StaticOutput::Floats {
                                offset,
                                multiplier: weight_scale.iter().map(|s| input.scale * s).collect(),
                                relu,
                            }
                        }
                    };
                    // A 2x2/2 max-pool right after a conv with byte output: fused.
                    let pool2 = matches!(output, StaticOutput::Bytes(..))
                        && fuse_pools
                        && fusable_pool(conv.as_ref(), plan.ops.get(index + 1));
                    fused_pool = pool2;
                    steps.push(Step::Static(Box::new(StaticLayer {
                        conv,
                        pool2,
                        weights,
                        input,
                        output,
                    })));
                }
                (LayerPrecision::Int8Static, None) => unreachable!("static layers have inputs"),
                (LayerPrecision::Int8Dynamic, _) => {
                    if let Domain::Bytes(current) = domain {
                        steps.push(Step::Dequantize(current));
                    }
                    let (weights, weight_scale) = int8_weights()?;
                    let pool2 = fuse_pools && fusable_pool(conv.as_ref(), plan.ops.get(index + 1));
                    fused_pool = pool2;
                    steps.push(Step::Dynamic(Box::new(DynamicLayer {
                        conv,
                        pool2,
                        weights,
                        weight_scale,
                        bias,
                        relu,
                    })));
                    domain = Domain::Floats;
                }
                (LayerPrecision::Fp32, _) => {
                    if let Domain::Bytes(current) = domain {
                        steps.push(Step::Dequantize(current));
                    }
                    steps.push(Step::Float(Box::new(FloatLayer {
                        op: op.clone(),
                        weight: f32s(artifact, &name)?,
                        bias,
                    })));
                    domain = Domain::Floats;
                }
            }
        }
        if let Domain::Bytes(current) = domain {
            steps.push(Step::Dequantize(current));
        }
        if layers.is_empty() {
            return Err(Error::Config(
                "an int8 model needs at least one conv or dense layer".into(),
            ));
        }
        Ok(Int8Model {
            plan,
            steps,
            layers,
            kernel,
            scratch: Shards::new(threads),
        })
    }

    /// The instruction set of the GEMM.
    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// How each conv/dense layer runs (int8 static, int8 dynamic or fp32).
    pub fn layers(&self) -> &[LayerRun] {
        &self.layers
    }

    /// The compiled float plan (shapes, classes).
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Logits `[batch, classes]` for float input `x` (`[batch, h, w, c]` NHWC f32,
    /// preprocessed as `mlops.input` says).
    ///
    /// # Panics
    /// If `x.len() < batch * h * w * c` (the plan's `input_len`); the
    /// [`Engine`](crate::runtime::Engine) path checks this and returns an error instead.
    pub fn predict(&mut self, x: &[f32], batch: usize, logits: &mut Vec<f32>) {
        let (steps, plan, kernel) = (&self.steps, &self.plan, self.kernel);
        let pass = |scratch: &mut Scratch, images: &[f32], count: usize, out: &mut Vec<f32>| {
            forward(steps, kernel, images, count, scratch);
            let last = scratch.floats.last().expect("a step ran");
            out.extend_from_slice(&last[..count * plan.classes]);
        };
        self.scratch.predict(x, batch, plan.input_len, logits, pass);
    }
}

fn forward(steps: &[Step], kernel: Kernel, x: &[f32], batch: usize, s: &mut Scratch) {
    if s.bytes.len() != steps.len() {
        s.bytes = vec![Vec::new(); steps.len()];
        s.floats = vec![Vec::new(); steps.len()];
        s.staging = vec![[Vec::new(), Vec::new()]; steps.len()];
        s.float_patches = vec![Vec::new(); steps.len()];
        s.acc = vec![Vec::new(); steps.len()];
    }
    for (i, step) in steps.iter().enumerate() {
        let (bytes_before, bytes_after) = s.bytes.split_at_mut(i);
        let (floats_before, floats_after) = s.floats.split_at_mut(i);
        let (in_bytes, out_bytes): (&[u8], _) = match bytes_before.last() {
            Some(b) => (b, &mut bytes_after[0]),
            None => (&[], &mut bytes_after[0]),
        };
        let (in_floats, out_floats): (&[f32], _) = match floats_before.last() {
            Some(f) => (f, &mut floats_after[0]),
            None => (x, &mut floats_after[0]),
        };
        let (staging, acc) = (&mut s.staging[i], &mut s.acc[i]);
        match step {
            Step::Quantize(q) => {
                out_bytes.resize(in_floats.len(), 0);
                quantize_input(*q, in_floats, out_bytes);
            }
            Step::Dequantize(q) => {
                out_floats.clear();
                out_floats.extend(
                    in_bytes
                        .iter()
                        .map(|&b| (b as i32 - q.zero_point as i32) as f32 * q.scale),
                );
            }
            Step::Static(layer) => {
                let (source, rows) = layer_source(
                    layer.conv.as_ref(),
                    layer.pool2,
                    &layer.weights,
                    in_bytes,
                    batch,
                    |_| layer.input.zero_point,
                    staging,
                );
                let n = layer.weights.n;
                match &layer.output {
                    StaticOutput::Bytes(requant, _) => {
                        out_bytes.resize(rows * n, 0);
                        let sink = Sink::Requant {
                            requant,
                            out: out_bytes,
                        };
                        gemm(kernel, source, rows, &layer.weights, sink);
                    }
                    StaticOutput::Floats {
                        offset,
                        multiplier,
                        relu,
                    } => {
                        acc.resize(rows * n, 0);
                        gemm(kernel, source, rows, &layer.weights, Sink::Int32(acc));
                        out_floats.resize(rows * n, 0.0);
                        for (row, out) in acc.chunks_exact(n).zip(out_floats.chunks_exact_mut(n)) {
                            for (j, o) in out.iter_mut().enumerate() {
                                let real = (row[j] + offset[j]) as f32 * multiplier[j];
                                *o = if *relu { real.max(0.0) } else { real };
                            }
                        }
                    }
                }
            }
            Step::Dynamic(layer) => dynamic_layer(
                layer,
                kernel,
                in_floats,
                batch,
                DynamicBuffers {
                    bytes: out_bytes,
                    staging,
                    acc,
                    image_quant: &mut s.image_quant,
                },
                out_floats,
            ),
            Step::Float(layer) => match &layer.op {
                Op::Conv(conv) => crate::nn::layers::conv_forward(
                    conv,
                    &layer.weight,
                    &layer.bias,
                    in_floats,
                    batch,
                    &mut s.float_patches[i],
                    out_floats,
                ),
                Op::Dense(dense) => crate::nn::layers::dense_forward(
                    dense,
                    &layer.weight,
                    &layer.bias,
                    in_floats,
                    batch,
                    out_floats,
                ),
                _ => unreachable!("float layers are conv or dense"),
            },
            Step::MaxPool(pool, Domain::Bytes(_)) => {
                crate::nn::layers::max_pool_bytes(pool, in_bytes, batch, out_bytes)
            }
            Step::AvgPool(pool, Domain::Bytes(_)) => avg_pool_u8(pool, in_bytes, batch, out_bytes),
            Step::MaxPool(pool, Domain::Floats) => {
                crate::nn::layers::max_pool_forward(pool, in_floats, batch, out_floats)
            }
            Step::AvgPool(pool, Domain::Floats) => {
                crate::nn::layers::avg_pool_forward(pool, in_floats, batch, out_floats)
            }
            Step::Relu(Domain::Bytes(q)) => {
                out_bytes.clear();
                out_bytes.extend(in_bytes.iter().map(|&v| v.max(q.zero_point)));
            }
            Step::Relu(Domain::Floats) => {
                out_floats.clear();
                out_floats.extend_from_slice(in_floats);
                crate::nn::layers::relu_in_place(out_floats);
            }
        }
    }
}

/// Whether a conv's kernel rows are too narrow to read in place 4 bytes at a time
/// (`kernel * channels` not a multiple of 4: the usual 1-channel first layer). Such a
/// conv runs on its input unfolded along the width (see [`unfold_width`]), and its
/// weights are packed to match (see [`pack_weights`]).
fn unfolds(conv: &ConvOp) -> bool {
    !(conv.kernel * conv.input[2]).is_multiple_of(4)
}

/// Bytes per kernel row after [`unfold_width`]: `kernel * channels` rounded up to 4.
fn unfolded_run(conv: &ConvOp) -> usize {
    (conv.kernel * conv.input[2]).div_ceil(4) * 4
}

/// Packs `[n, k]` int8 weights for the layer's source: as they are, or for a conv that
/// [`unfolds`], each kernel row padded with zero weights to [`unfolded_run`].
fn pack_weights(conv: Option<&ConvOp>, q: &[i8], n: usize, k: usize) -> PackedWeights {
    match conv {
        Some(conv) if unfolds(conv) => {
            let (row, run) = (conv.kernel * conv.input[2], unfolded_run(conv));
            let mut padded = vec![0i8; n * conv.kernel * run];
            for (src, dst) in q.chunks_exact(row).zip(padded.chunks_exact_mut(run)) {
                dst[..row].copy_from_slice(src);
            }
            PackedWeights::new(&padded, n, conv.kernel * run)
        }
        _ => PackedWeights::new(q, n, k),
    }
}

/// The GEMM's rows for a conv/dense layer over the bytes `x` of `batch` images, and
/// their count: in place when the layout allows, else through `staging` (a padded copy,
/// or rows unfolded along the width); with `pool2` a row is a 2x2 pool window. `fill(b)`
/// is the byte of real 0.0 for image `b` (what same padding pads with).
fn layer_source<'a>(
    conv: Option<&ConvOp>,
    pool2: bool,
    weights: &PackedWeights,
    x: &'a [u8],
    batch: usize,
    fill: impl Fn(usize) -> u8,
    staging: &'a mut [Vec<u8>; 2],
) -> (Source<'a>, usize) {
    let [frame, unfolded] = staging;
    let Some(conv) = conv else {
        let k = weights.k;
        if k.is_multiple_of(4) {
            return (Source::Rows { a: x, stride: k }, batch);
        }
        pad_rows(x, batch, k, weights.k_padded, frame);
        return (
            Source::Rows {
                a: frame,
                stride: weights.k_padded,
            },
            batch,
        );
    };
    let [mut h, mut w, c] = conv.input;
    let [oh, ow, _] = conv.output;
    let rows = if pool2 {
        batch * (oh / 2) * (ow / 2)
    } else {
        batch * oh * ow
    };
    let mut x: &'a [u8] = x;
    if crate::nn::geometry::needs_frame(conv) {
        // Copy into a frame of zero-point bytes, then read in place.
        let (ph, pw) = crate::nn::geometry::frame(conv, x, batch, fill, frame);
        (h, w, x) = (ph, pw, frame);
    }
    let geometry = if unfolds(conv) {
        let run = unfolded_run(conv);
        unfold_width(conv, x, batch, h, w, unfolded);
        x = unfolded;
        ConvGeometry {
            h,
            w: ow,
            c: run,
            kh: conv.kernel,
            kw: 1,
            stride_y: conv.stride,
            stride_x: 1,
            oh,
            ow,
            pool2,
        }
    } else {
        ConvGeometry {
            h,
            w,
            c,
            kh: conv.kernel,
            kw: conv.kernel,
            stride_y: conv.stride,
            stride_x: conv.stride,
            oh,
            ow,
            pool2,
        }
    };
    (Source::Conv { x, geometry }, rows)
}

/// `out[b][y][ox]` = the `kernel * c` bytes of input row `y` under output column `ox`,
/// zero-padded to [`unfolded_run`]: each of the kernel's rows becomes one 4-byte-aligned
/// run, so the GEMM reads the receptive field in place (`kernel` runs per output pixel).
#[multiversion(targets("x86_64+avx512f+avx512vl+avx512bw+avx512dq", "x86_64+avx2+fma"))]
fn unfold_width(conv: &ConvOp, x: &[u8], batch: usize, h: usize, w: usize, out: &mut Vec<u8>) {
    let c = conv.input[2];
    let ow = conv.output[1];
    let (row, run) = (conv.kernel * c, unfolded_run(conv));
    out.resize(batch * h * ow * run, 0);
    for (src, dst) in x
        .chunks_exact(w * c)
        .zip(out.chunks_exact_mut(ow * run))
        .take(batch * h)
    {
        for (ox, d) in dst.chunks_exact_mut(run).enumerate() {
            // The bytes past `row` meet zero weights: left as they are.
            let s = &src[ox * conv.stride * c..][..row];
            d[..row].copy_from_slice(s);
        }
    }
}

/// The scratch a dynamic-range layer works in.
struct DynamicBuffers<'a> {
    bytes: &'a mut Vec<u8>,
    staging: &'a mut [Vec<u8>; 2],
    acc: &'a mut Vec<i32>,
    image_quant: &'a mut Vec<ActQuant>,
}

/// A dynamic-range layer: quantize each image by its own range, int8 GEMM, dequantize
/// with the bias added in float.
fn dynamic_layer(
    layer: &DynamicLayer,
    kernel: Kernel,
    x: &[f32],
    batch: usize,
    buffers: DynamicBuffers<'_>,
    out: &mut Vec<f32>,
) {
    let DynamicBuffers {
        bytes,
        staging,
        acc,
        image_quant,
    } = buffers;
    let per_image = x.len() / batch.max(1);
    bytes.resize(x.len(), 0);
    image_quant.clear();
    for (image, dst) in x
        .chunks_exact(per_image)
        .zip(bytes.chunks_exact_mut(per_image))
    {
        let (min, max) = value_range(image);
        let q = ActQuant::from_range(min, max);
        quantize_input(q, image, dst);
        image_quant.push(q);
    }
    let (source, rows) = layer_source(
        layer.conv.as_ref(),
        layer.pool2,
        &layer.weights,
        bytes,
        batch,
        |b| image_quant[b].zero_point,
        staging,
    );
    let n = layer.weights.n;
    acc.resize(rows * n, 0);
    gemm(kernel, source, rows, &layer.weights, Sink::Int32(acc));
    out.resize(rows * n, 0.0);
    let rows_per_image = rows / batch.max(1);
    for (b, &q) in image_quant.iter().enumerate() {
        let span = b * rows_per_image * n..(b + 1) * rows_per_image * n;
        dequantize_rows(&acc[span.clone()], q, layer, &mut out[span]);
    }
}

/// `[min, max]` of `x` and 0.0 (vectorized: sixteen running lanes).
#[multiversion(targets("x86_64+avx512f+avx512vl+avx512bw+avx512dq", "x86_64+avx2+fma"))]
fn value_range(x: &[f32]) -> (f32, f32) {
    let (mut lo, mut hi) = ([0.0f32; 16], [0.0f32; 16]);
    let mut chunks = x.chunks_exact(16);
    for chunk in &mut chunks {
        for i in 0..16 {
            lo[i] = if chunk[i] < lo[i] { chunk[i] } else { lo[i] };
            hi[i] = if chunk[i] > hi[i] { chunk[i] } else { hi[i] };
        }
    }
    let fold = |lanes: [f32; 16], rest: &[f32], pick: fn(f32, f32) -> f32| {
        lanes.iter().chain(rest).copied().fold(0.0, pick)
    };
    (
        fold(lo, chunks.remainder(), f32::min),
        fold(hi, chunks.remainder(), f32::max),
    )
}

/// int32 sums of one image's rows to floats:
/// `(acc - zero_point * weight_sum) * (scale * weight_scale) + bias`.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx512bw+avx512dq", "x86_64+avx2+fma"))]
fn dequantize_rows(acc: &[i32], q: ActQuant, layer: &DynamicLayer, out: &mut [f32]) {
    let (n, zp) = (layer.weights.n, q.zero_point as i32);
    for (sums, dst) in acc.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        for ((((o, &a), &w_sum), &w_scale), &b) in dst
            .iter_mut()
            .zip(sums)
            .zip(&layer.weights.sums)
            .zip(&layer.weight_scale)
            .zip(&layer.bias)
        {
            let real = (a - zp * w_sum) as f32 * (q.scale * w_scale) + b;
            *o = if layer.relu { real.max(0.0) } else { real };
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
