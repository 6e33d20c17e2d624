//! fp32 inference built like the int8 runtime: convolutions read their receptive fields
//! in place (no im2col copy), and bias, ReLU and a following 2x2 max-pool are applied
//! while the sums are still in registers (the conv outputs no pool window covers are
//! never computed).
//!
//! Why not the training kernels (im2col + the `gemm` crate)? At inference the copies
//! around the GEMM cost more than the GEMM: perf showed im2col, the separate bias/ReLU
//! pass and pooling at over half of the fp32 forward time. Training keeps its path (it
//! needs the unfolded patches for the weight gradient).
//!
//! Two kernels, chosen at run time ([`Kernel::detect`]): AVX-512F (`vfmadd231ps`, 16
//! channels per register) and AVX2 + FMA (8 per register; most AMD Zen 2/3 and pre-2017
//! Intel CPUs, where CI runners often are). On AVX2, a 3x3 stride-1 conv followed by a 2x2
//! max-pool runs as Winograd F(2x2, 3x3) instead (`super::winograd`: 2.25x fewer
//! multiplications; the reference CNN's second conv). Elsewhere [`FloatModel::supported`] is false
//! and `CpuEngine` runs the training executor's forward pass. All give the same results up
//! to summation order (tested).

use super::passes::Shards;
use super::winograd::{self, Winograd};
use crate::nn::geometry::{frame, needs_frame, ConvGeometry};
use crate::nn::plan::{ConvOp, Op, PoolOp};
use crate::nn::{layers, Plan};

/// Output channels per register.
const LANES: usize = 16;

/// A conv/dense layer's weights as `[n / 16][k][16]` (channels zero-padded to 16).
#[derive(Debug, Clone)]
struct PackedF32 {
    n: usize,
    k: usize,
    packed: Vec<f32>,
}

impl PackedF32 {
    fn new(weights: &[f32], n: usize, k: usize) -> Self {
        let blocks = n.div_ceil(LANES);
        let mut packed = vec![0.0; blocks * k * LANES];
        for row in 0..n {
            for col in 0..k {
                packed[((row / LANES) * k + col) * LANES + row % LANES] = weights[row * k + col];
            }
        }
        PackedF32 { n, k, packed }
    }
}

#[derive(Debug, Clone)]
struct Layer {
    conv: Option<ConvOp>,
    /// The 2x2/2 max-pool that follows is fused.
    pool2: bool,
    weights: PackedF32,
    /// The same conv in the Winograd domain, run instead of the direct kernel. AVX2 only:
    /// no AVX-512 version is written yet (the machines this was built on have no AVX-512
    /// to test one), so AVX-512 CPUs keep the direct kernel.
    winograd: Option<Winograd>,
    bias: Vec<f32>,
    relu: bool,
}

#[derive(Debug, Clone)]
enum Step {
    Layer(Box<Layer>),
    MaxPool(PoolOp),
    AvgPool(PoolOp),
    Relu,
}

#[derive(Debug, Default)]
struct Scratch {
    /// Step `i`'s output.
    acts: Vec<Vec<f32>>,
    /// Zero-padded inputs of same-padded convs.
    frames: Vec<Vec<f32>>,
    /// The Winograd kernel's transforms.
    winograd: winograd::Buffers,
}

/// Which instruction set computes the conv and dense layers; reports name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// AVX-512F, 16 channels per register.
    Avx512,
    /// AVX2 + FMA, 8 channels per register.
    Avx2,
}

impl Kernel {
    /// The fastest kernel this CPU runs, if any.
    pub fn detect() -> Option<Self> {
        Self::available().into_iter().next()
    }

    /// Every kernel this CPU runs, fastest first (tests and benches compare them).
    pub fn available() -> Vec<Self> {
        let mut out = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                out.push(Kernel::Avx512);
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                out.push(Kernel::Avx2);
            }
        }
        out
    }

    /// The name reports and benches use.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Avx512 => "avx512",
            Kernel::Avx2 => "avx2",
        }
    }
}

/// An fp32 model compiled for an in-place SIMD kernel.
pub struct FloatModel {
    plan: Plan,
    steps: Vec<Step>,
    kernel: Kernel,
    scratch: Shards<Scratch>,
}

impl FloatModel {
    /// Whether this CPU runs one of the kernels.
    pub fn supported() -> bool {
        Kernel::detect().is_some()
    }

    /// Compiles `plan` with its parameters for `kernel`; `threads` shards the batch.
    /// `params` are the plan's tensors in spec order: conv weights `[out, kh, kw, in]`,
    /// dense weights `[out, in]`, biases `[out]`.
    ///
    /// # Panics
    /// Unless `kernel` is in [`Kernel::available`], or if `params` holds fewer tensors
    /// than `plan.params` or a weight shorter than its shape
    /// ([`CpuEngine::from_params`](super::CpuEngine::from_params) checks both).
    pub fn new(plan: &Plan, params: &[Vec<f32>], threads: usize, kernel: Kernel) -> Self {
        assert!(
            Kernel::available().contains(&kernel),
            "this CPU cannot run the fp32 {} kernel",
            kernel.name()
        );
        let mut steps = Vec::new();
        let mut skip_next = false;
        for (index, op) in plan.ops.iter().enumerate() {
            if std::mem::take(&mut skip_next) {
                continue;
            }
            let (conv, weight, n, k, relu) = match op {
                Op::Conv(c) => (
                    Some(c.clone()),
                    c.weight,
                    c.output[2],
                    c.patch_len(),
                    c.relu,
                ),
                Op::Dense(d) => (None, d.weight, d.units, d.inputs, d.relu),
                Op::MaxPool(p) => {
                    steps.push(Step::MaxPool(p.clone()));
                    continue;
                }
                Op::AvgPool(p) => {
                    steps.push(Step::AvgPool(p.clone()));
                    continue;
                }
                Op::Relu { .. } => {
                    steps.push(Step::Relu);
                    continue;
                }
                Op::Dropout { .. } => continue,
            };
            let pool2 = match (&conv, plan.ops.get(index + 1)) {
                (Some(c), Some(Op::MaxPool(p))) => {
                    p.size == 2
                        && p.stride == 2
                        && p.output[..2] == [c.output[0] / 2, c.output[1] / 2]
                }
                _ => false,
            };
            skip_next = pool2;
            let winograd = match &conv {
                Some(c) if kernel == Kernel::Avx2 && Winograd::applies(c, pool2) => {
                    Some(Winograd::new(&params[weight], n, c.input[2]))
                }
                _ => None,
            };
            steps.push(Step::Layer(Box::new(Layer {
                conv,
                pool2,
                winograd,
                weights: PackedF32::new(&params[weight], n, k),
                bias: params[weight + 1].clone(),
                relu,
            })));
        }
        FloatModel {
            plan: plan.clone(),
            steps,
            kernel,
            scratch: Shards::new(threads),
        }
    }

    /// The kernel it runs on.
    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// Conv and dense layers, and how many of them run the Winograd kernel (reports).
    pub fn winograd_layers(&self) -> (usize, usize) {
        let layers = self.steps.iter().filter_map(|s| match s {
            Step::Layer(layer) => Some(layer.winograd.is_some()),
            _ => None,
        });
        layers.fold((0, 0), |(w, all), winograd| {
            (w + usize::from(winograd), all + 1)
        })
    }

    /// The compiled plan.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Logits `[batch, classes]` for `x` (`[batch, h, w, c]`, scaled).
    pub fn predict(&mut self, x: &[f32], batch: usize, logits: &mut Vec<f32>) {
        let (steps, plan, kernel) = (&self.steps, &self.plan, self.kernel);
        let pass = |scratch: &mut Scratch, images: &[f32], count: usize, out: &mut Vec<f32>| {
            forward(steps, kernel, images, count, scratch);
            let last = scratch.acts.last().map_or(images, |a| a.as_slice());
            out.extend_from_slice(&last[..count * plan.classes]);
        };
        self.scratch.predict(x, batch, plan.input_len, logits, pass);
    }
}

fn forward(steps: &[Step], kernel: Kernel, x: &[f32], batch: usize, s: &mut Scratch) {
    if s.acts.len() != steps.len() {
        s.acts = vec![Vec::new(); steps.len()];
        s.frames = vec![Vec::new(); steps.len()];
    }
    for (i, step) in steps.iter().enumerate() {
        let (before, after) = s.acts.split_at_mut(i);
        let input: &[f32] = before.last().map_or(x, |a| a.as_slice());
        let out = &mut after[0];
        match step {
            Step::Layer(layer) => {
                let buffers = (&mut s.frames[i], &mut s.winograd);
                run_layer(layer, kernel, input, batch, buffers, out)
            }
            Step::MaxPool(p) => layers::max_pool_forward(p, input, batch, out),
            Step::AvgPool(p) => layers::avg_pool_forward(p, input, batch, out),
            Step::Relu => {
                out.clear();
                out.extend_from_slice(input);
                layers::relu_in_place(out);
            }
        }
    }
}

/// Where a layer's rows are: `k` consecutive values per row, or a conv's windows.
#[derive(Clone, Copy)]
enum Rows<'a> {
    Dense(&'a [f32]),
    Conv(&'a [f32], ConvGeometry),
}

fn run_layer(
    layer: &Layer,
    kernel: Kernel,
    x: &[f32],
    batch: usize,
    (frame_buf, winograd_buf): (&mut Vec<f32>, &mut winograd::Buffers),
    out: &mut Vec<f32>,
) {
    let n = layer.weights.n;
    let (rows, m) = match &layer.conv {
        None => (Rows::Dense(x), batch),
        Some(conv) => {
            let [mut h, mut w, c] = conv.input;
            let mut x = x;
            if needs_frame(conv) {
                (h, w) = frame(conv, x, batch, |_| 0.0, frame_buf);
                x = frame_buf;
            }
            let [oh, ow, _] = conv.output;
            if let Some(wg) = &layer.winograd {
                let (ph, pw) = (oh / 2, ow / 2);
                out.resize(batch * ph * pw * n, 0.0);
                let shape = winograd::Shape {
                    batch,
                    h,
                    w,
                    ph,
                    pw,
                };
                wg.run(x, shape, &layer.bias, layer.relu, winograd_buf, out);
                return;
            }
            let geometry = ConvGeometry {
                h,
                w,
                c,
                kh: conv.kernel,
                kw: conv.kernel,
                stride_y: conv.stride,
                stride_x: conv.stride,
                oh,
                ow,
                pool2: layer.pool2,
            };
            let m = if layer.pool2 {
                batch * (oh / 2) * (ow / 2)
            } else {
                batch * oh * ow
            };
            (Rows::Conv(x, geometry), m)
        }
    };
    out.resize(m * n, 0.0);
    // Bounds: every row's last value lies inside the input.
    if m > 0 {
        let fits = match rows {
            Rows::Dense(a) => m * layer.weights.k <= a.len(),
            Rows::Conv(a, g) => g.end(m) <= a.len(),
        };
        assert!(fits, "fp32 kernel input too small");
    }
    assert_eq!(layer.bias.len(), n);
    // SAFETY: the kernel was checked against the CPU when the model was built, the
    // bounds of every row were checked above, and `out` holds `m * n` values.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        match kernel {
            Kernel::Avx512 => simd::gemm_avx512(rows, m, layer, out),
            Kernel::Avx2 => simd::gemm_avx2(rows, m, layer, out),
        }
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (kernel, rows);
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::{Layer, Rows, LANES};
    use crate::nn::geometry::{for_each_tile, Runs, TILE_ROWS as ROWS};

    /// The input `x`, each row's contiguous runs (offsets from the row base) and their
    /// length, for the tiles.
    pub(super) struct Ctx<'a> {
        x: *const f32,
        runs: Runs,
        layer: &'a Layer,
        out: *mut f32,
    }

    /// One instruction set's register tile: `R` rows x `NB` blocks of 16 channels over
    /// all of k, then the max of the rows (`POOL`), bias, ReLU and the store. The walk
    /// over rows and blocks ([`gemm`]) is shared; only the tile knows the registers.
    pub(super) trait Tile {
        /// Blocks of 16 channels per tile that fit the registers next to 4 rows.
        const BLOCKS: usize;

        /// # Safety
        /// The CPU has the kernel's features; `bases[..R]` plus every run of k stay
        /// inside the input, and rows `row..row + R` (one with `POOL`) inside the output.
        unsafe fn tile<const R: usize, const NB: usize, const POOL: bool>(
            ctx: &Ctx<'_>,
            bases: &[usize],
            row: usize,
            block: usize,
        );
    }

    /// Walks the layer's output rows in tiles of [`ROWS`] rows x `K::BLOCKS` blocks.
    /// Inlined into each kernel's `#[target_feature]` entry point, so the tiles inline too.
    ///
    /// # Safety
    /// As [`Tile::tile`], for all `m` rows (checked by the caller).
    #[inline(always)]
    unsafe fn gemm<K: Tile>(rows: Rows<'_>, m: usize, layer: &Layer, out: &mut [f32]) {
        let w = &layer.weights;
        let (x, runs, geometry) = match rows {
            Rows::Dense(a) => (
                a,
                Runs {
                    count: 1,
                    step: 0,
                    len: w.k,
                },
                None,
            ),
            Rows::Conv(a, g) => (a, g.runs(), Some(g)),
        };
        let ctx = Ctx {
            x: x.as_ptr(),
            runs,
            layer,
            out: out.as_mut_ptr(),
        };
        let base = |row: usize| match (&rows, geometry) {
            (Rows::Dense(_), _) => row * w.k,
            (_, Some(g)) => g.row_base(row),
            _ => unreachable!(),
        };
        let blocks = w.n.div_ceil(LANES);
        let pooled = geometry.filter(|g| g.pool2);
        for_each_tile(m, pooled.as_ref(), base, |row, bases, pixels| {
            let mut b = 0;
            while b < blocks {
                let nb = K::BLOCKS.min(blocks - b);
                match (pooled.is_some(), pixels == ROWS, nb) {
                    (true, _, 4) => K::tile::<4, 4, true>(&ctx, bases, row, b),
                    (true, _, 3) => K::tile::<4, 3, true>(&ctx, bases, row, b),
                    (true, _, 2) => K::tile::<4, 2, true>(&ctx, bases, row, b),
                    (true, _, _) => K::tile::<4, 1, true>(&ctx, bases, row, b),
                    (false, true, 4) => K::tile::<4, 4, false>(&ctx, bases, row, b),
                    (false, true, 3) => K::tile::<4, 3, false>(&ctx, bases, row, b),
                    (false, true, 2) => K::tile::<4, 2, false>(&ctx, bases, row, b),
                    (false, true, _) => K::tile::<4, 1, false>(&ctx, bases, row, b),
                    (false, false, _) => {
                        for r in 0..pixels {
                            let (bases, row) = (&bases[r..], row + r);
                            match nb {
                                4 => K::tile::<1, 4, false>(&ctx, bases, row, b),
                                3 => K::tile::<1, 3, false>(&ctx, bases, row, b),
                                2 => K::tile::<1, 2, false>(&ctx, bases, row, b),
                                _ => K::tile::<1, 1, false>(&ctx, bases, row, b),
                            }
                        }
                    }
                }
                b += nb;
            }
        });
    }

    /// AVX-512F: a block is one zmm register; 4 x 4 accumulators + 4 weights.
    pub(super) struct Avx512;

    /// # Safety
    /// The CPU has AVX-512F; as [`gemm`].
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn gemm_avx512(rows: Rows<'_>, m: usize, layer: &Layer, out: &mut [f32]) {
        gemm::<Avx512>(rows, m, layer, out)
    }

    impl Tile for Avx512 {
        const BLOCKS: usize = 4;

        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn tile<const R: usize, const NB: usize, const POOL: bool>(
            ctx: &Ctx<'_>,
            bases: &[usize],
            row: usize,
            block: usize,
        ) {
            let layer = ctx.layer;
            let w = &layer.weights;
            let mut acc = [[_mm512_setzero_ps(); NB]; R];
            let w_ptr = w.packed.as_ptr();
            let mut kk = 0;
            for segment in ctx.runs.offsets() {
                for t in 0..ctx.runs.len {
                    let mut wv = [_mm512_setzero_ps(); NB];
                    for (j, v) in wv.iter_mut().enumerate() {
                        *v = _mm512_loadu_ps(w_ptr.add(((block + j) * w.k + kk) * LANES));
                    }
                    for (r, acc_row) in acc.iter_mut().enumerate() {
                        let a = _mm512_set1_ps(*ctx.x.add(bases[r] + segment + t));
                        for (j, v) in acc_row.iter_mut().enumerate() {
                            *v = _mm512_fmadd_ps(a, wv[j], *v);
                        }
                    }
                    kk += 1;
                }
            }
            let stored = if POOL {
                let (first, rest) = acc.split_at_mut(1);
                for other in rest.iter() {
                    for (best, v) in first[0].iter_mut().zip(other) {
                        *best = _mm512_max_ps(*best, *v);
                    }
                }
                1
            } else {
                R
            };
            for j in 0..NB {
                let first = (block + j) * LANES;
                let width = LANES.min(w.n - first);
                let mask: __mmask16 = if width == LANES {
                    0xFFFF
                } else {
                    (1u16 << width) - 1
                };
                let bias = _mm512_maskz_loadu_ps(mask, layer.bias.as_ptr().add(first));
                for (r, acc_row) in acc.iter().enumerate().take(stored) {
                    let mut v = _mm512_add_ps(acc_row[j], bias);
                    if layer.relu {
                        v = _mm512_max_ps(v, _mm512_setzero_ps());
                    }
                    _mm512_mask_storeu_ps(ctx.out.add((row + r) * w.n + first), mask, v);
                }
            }
        }
    }

    /// AVX2 + FMA: a block of 16 channels is two ymm registers; 4 rows x 1 block = 8
    /// accumulators + 2 weights + 1 broadcast of the 16 registers.
    pub(super) struct Avx2;

    /// # Safety
    /// The CPU has AVX2 and FMA; as [`gemm`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gemm_avx2(rows: Rows<'_>, m: usize, layer: &Layer, out: &mut [f32]) {
        gemm::<Avx2>(rows, m, layer, out)
    }

    impl Tile for Avx2 {
        const BLOCKS: usize = 1;

        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn tile<const R: usize, const NB: usize, const POOL: bool>(
            ctx: &Ctx<'_>,
            bases: &[usize],
            row: usize,
            block: usize,
        ) {
            let layer = ctx.layer;
            let w = &layer.weights;
            // [row][block][half]: NB is 1 in practice (BLOCKS), larger ones are never run.
            let mut acc = [[[_mm256_setzero_ps(); 2]; NB]; R];
            let w_ptr = w.packed.as_ptr();
            let mut kk = 0;
            for segment in ctx.runs.offsets() {
                for t in 0..ctx.runs.len {
                    let mut wv = [[_mm256_setzero_ps(); 2]; NB];
                    for (j, v) in wv.iter_mut().enumerate() {
                        let at = w_ptr.add(((block + j) * w.k + kk) * LANES);
                        *v = [_mm256_loadu_ps(at), _mm256_loadu_ps(at.add(8))];
                    }
                    for (r, acc_row) in acc.iter_mut().enumerate() {
                        let a = _mm256_set1_ps(*ctx.x.add(bases[r] + segment + t));
                        for (j, v) in acc_row.iter_mut().enumerate() {
                            v[0] = _mm256_fmadd_ps(a, wv[j][0], v[0]);
                            v[1] = _mm256_fmadd_ps(a, wv[j][1], v[1]);
                        }
                    }
                    kk += 1;
                }
            }
            let stored = if POOL {
                let (first, rest) = acc.split_at_mut(1);
                for other in rest.iter() {
                    for (best, v) in first[0].iter_mut().zip(other) {
                        best[0] = _mm256_max_ps(best[0], v[0]);
                        best[1] = _mm256_max_ps(best[1], v[1]);
                    }
                }
                1
            } else {
                R
            };
            for j in 0..NB {
                let first = (block + j) * LANES;
                let width = LANES.min(w.n - first);
                // Bias and stores go through a 16-value buffer when the block is partial
                // (AVX2 has no cheap masked float load/store of arbitrary width); a full
                // block loads its bias in place (the copy was a `memcpy` call per tile:
                // over a quarter of the first conv's time, whose tiles have k = 9).
                let bias = if width == LANES {
                    let at = layer.bias[first..first + LANES].as_ptr();
                    [_mm256_loadu_ps(at), _mm256_loadu_ps(at.add(8))]
                } else {
                    let mut bias = [0.0f32; LANES];
                    bias[..width].copy_from_slice(&layer.bias[first..first + width]);
                    [
                        _mm256_loadu_ps(bias.as_ptr()),
                        _mm256_loadu_ps(bias.as_ptr().add(8)),
                    ]
                };
                for (r, acc_row) in acc.iter().enumerate().take(stored) {
                    let mut v = [
                        _mm256_add_ps(acc_row[j][0], bias[0]),
                        _mm256_add_ps(acc_row[j][1], bias[1]),
                    ];
                    if layer.relu {
                        v[0] = _mm256_max_ps(v[0], _mm256_setzero_ps());
                        v[1] = _mm256_max_ps(v[1], _mm256_setzero_ps());
                    }
                    let dst = ctx.out.add((row + r) * w.n + first);
                    if width == LANES {
                        _mm256_storeu_ps(dst, v[0]);
                        _mm256_storeu_ps(dst.add(8), v[1]);
                    } else {
                        let mut buf = [0.0f32; LANES];
                        _mm256_storeu_ps(buf.as_mut_ptr(), v[0]);
                        _mm256_storeu_ps(buf.as_mut_ptr().add(8), v[1]);
                        std::ptr::copy_nonoverlapping(buf.as_ptr(), dst, width);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelSpec;
    use crate::nn::Executor;

    /// Every in-place kernel this CPU runs gives the training executor's logits up to
    /// summation order, on the reference CNN, on a spec with every layer kind, padding
    /// case and partial channel block (21, 6 and 4 channels), and on convs the Winograd
    /// kernel takes (framed input, odd output, a single pool window).
    #[test]
    fn matches_the_training_forward_pass() {
        // The third puts the Winograd kernel (AVX2) on a same-padded conv (framed input)
        // with an odd output and on one whose pool leaves a single window.
        let winograd = "input: [11, 11, 3]\nclasses: 4\nlayers:\n\
            - {type: conv2d, filters: 8, kernel: 3, padding: same, activation: relu}\n\
            - {type: conv2d, filters: 21, kernel: 3, padding: same, activation: relu}\n\
            - {type: max_pool2d, size: 2, stride: 2}\n\
            - {type: conv2d, filters: 16, kernel: 1}\n\
            - {type: conv2d, filters: 24, kernel: 3, activation: relu}\n\
            - {type: max_pool2d, size: 2, stride: 2}\n\
            - {type: flatten}\n\
            - {type: dense, units: 4}\n";
        let specs = [
            ModelSpec::reference_cnn(),
            crate::model::spec::every_path_spec(21),
            ModelSpec::from_yaml(winograd).unwrap(),
        ];
        for spec in specs {
            let plan = Plan::compile(&spec).unwrap();
            let params = plan.init_params(9);
            let batch = 11;
            let x: Vec<f32> = (0..batch * plan.input_len)
                .map(|i| ((i * 7919) % 256) as f32 / 255.0)
                .collect();
            let mut want = Vec::new();
            Executor::new(&plan, 2).predict(&params, &x, batch, &mut want);
            let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for kernel in Kernel::available() {
                let mut got = Vec::new();
                FloatModel::new(&plan, &params, 2, kernel).predict(&x, batch, &mut got);
                assert_eq!(want.len(), got.len());
                for (a, b) in want.iter().zip(&got) {
                    let name = kernel.name();
                    assert!((a - b).abs() <= 1e-5 * scale.max(1.0), "{name}: {a} vs {b}");
                }
            }
        }
    }

    /// The reference CNN's second conv (32 channels in, pooled) is the one Winograd
    /// layer on AVX2; the first (1 channel) and third (no pool) stay direct, and the
    /// AVX-512 kernel has none (reports count them: `compute`).
    #[test]
    fn winograd_takes_the_pooled_3x3_convs_on_avx2() {
        let plan = Plan::compile(&ModelSpec::reference_cnn()).unwrap();
        let params = plan.init_params(1);
        for kernel in Kernel::available() {
            let want = if kernel == Kernel::Avx2 {
                (1, 5)
            } else {
                (0, 5)
            };
            let model = FloatModel::new(&plan, &params, 1, kernel);
            assert_eq!(model.winograd_layers(), want, "{}", kernel.name());
        }
    }
}
