//! The CPU kernels: convolution as im2col + GEMM, pooling, dense, and their gradients.
//!
//! Written here rather than taken from candle because candle 0.11's CPU conv2d and
//! autograd ran this model's training step at 396 images/s, 14x slower than Keras on
//! this machine (see the spine issue); im2col + the same `gemm` crate gets most of that
//! back. All buffers are NHWC and owned by the caller so nothing allocates per step.

use multiversion::multiversion;

use super::gemm::{matmul, MatRef};
use super::plan::{ConvOp, DenseOp, PoolOp};

// The element-wise loops below are compiled for AVX-512 and AVX2 as well as the baseline,
// and the best one is picked at run time (multiversion): the default x86-64 target
// only has SSE2, which left pooling and the first conv 4-10x slower than they need be.

/// Unfolds `x` (`[batch, h, w, c]`) into `patches` (`[batch * oh * ow, k * k * c]`).
pub fn im2col(op: &ConvOp, x: &[f32], batch: usize, patches: &mut Vec<f32>) {
    super::im2col::im2col(op, x, batch, op.patch_len(), 0.0, patches);
}

/// Folds patch gradients back onto the input gradient `dx` (the adjoint of [`im2col`]).
#[multiversion(targets("x86_64+avx512f+avx512vl+avx512bw+avx512dq", "x86_64+avx2+fma"))]
pub fn col2im(op: &ConvOp, dpatches: &[f32], batch: usize, dx: &mut [f32]) {
    let [h, w, c] = op.input;
    let [oh, ow, _] = op.output;
    let (k, s) = (op.kernel, op.stride);
    let row_len = op.patch_len();
    dx[..batch * h * w * c].fill(0.0);
    let mut row = 0;
    for n in 0..batch {
        let image = &mut dx[n * h * w * c..(n + 1) * h * w * c];
        for oy in 0..oh {
            for ox in 0..ow {
                let src = &dpatches[row * row_len..(row + 1) * row_len];
                for ky in 0..k {
                    let iy = (oy * s + ky) as isize - op.pad.0 as isize;
                    if iy < 0 || iy >= h as isize {
                        continue;
                    }
                    for kx in 0..k {
                        let ix = (ox * s + kx) as isize - op.pad.1 as isize;
                        if ix < 0 || ix >= w as isize {
                            continue;
                        }
                        let start = (iy as usize * w + ix as usize) * c;
                        let from = &src[(ky * k + kx) * c..(ky * k + kx + 1) * c];
                        for (d, g) in image[start..start + c].iter_mut().zip(from) {
                            *d += g;
                        }
                    }
                }
                row += 1;
            }
        }
    }
}

/// Convolutions with an im2col row this short and no input gradient (the first layer)
/// unfold "tap-major": one row per kernel tap holding that tap's value for every output
/// pixel. For a 1-channel image each row is a run of contiguous copies, where the usual
/// pixel-major layout makes 3-float copies that cost more than the GEMM itself.
const TAP_MAJOR_PATCH_LEN: usize = 32;

impl ConvOp {
    /// True when this conv unfolds its input tap-major (see [`im2col_tap_major`]).
    pub fn is_tap_major(&self) -> bool {
        self.first && self.patch_len() <= TAP_MAJOR_PATCH_LEN
    }
}

/// Unfolds `x` into `patches` as `[k * k * c, batch * oh * ow]` (the transpose of [`im2col`]).
pub fn im2col_tap_major(op: &ConvOp, x: &[f32], batch: usize, patches: &mut Vec<f32>) {
    let [h, w, c] = op.input;
    let [oh, ow, _] = op.output;
    let (k, s) = (op.kernel, op.stride);
    let pixels = batch * oh * ow;
    patches.resize(op.patch_len() * pixels, 0.0);
    for ky in 0..k {
        for kx in 0..k {
            for ci in 0..c {
                let tap = (ky * k + kx) * c + ci;
                let row = &mut patches[tap * pixels..(tap + 1) * pixels];
                let mut p = 0;
                for n in 0..batch {
                    let image = &x[n * h * w * c..(n + 1) * h * w * c];
                    for oy in 0..oh {
                        let dst = &mut row[p..p + ow];
                        p += ow;
                        let iy = (oy * s + ky) as isize - op.pad.0 as isize;
                        if iy < 0 || iy >= h as isize {
                            dst.fill(0.0);
                            continue;
                        }
                        let line = &image[iy as usize * w * c..(iy as usize + 1) * w * c];
                        let ix0 = kx as isize - op.pad.1 as isize;
                        let last = ix0 + ((ow - 1) * s) as isize;
                        if c == 1 && s == 1 && ix0 >= 0 && (last as usize) < w {
                            dst.copy_from_slice(&line[ix0 as usize..ix0 as usize + ow]);
                        } else {
                            for (ox, d) in dst.iter_mut().enumerate() {
                                let ix = ix0 + (ox * s) as isize;
                                *d = if ix < 0 || ix >= w as isize {
                                    0.0
                                } else {
                                    line[ix as usize * c + ci]
                                };
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The unfolded input as a `[pixels, k]` matrix, whichever layout it was unfolded in.
fn patch_matrix<'a>(op: &ConvOp, patches: &'a [f32], pixels: usize) -> MatRef<'a> {
    if op.is_tap_major() {
        MatRef::new(patches, op.patch_len(), pixels).t()
    } else {
        MatRef::new(patches, pixels, op.patch_len())
    }
}

/// Writes `bias` into every row of `out` (`rows x bias.len()`), ready for an accumulating GEMM.
fn fill_bias(out: &mut [f32], bias: &[f32], rows: usize) {
    for row in out[..rows * bias.len()].chunks_exact_mut(bias.len()) {
        row.copy_from_slice(bias);
    }
}

/// `max(x, 0)` in place.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx512bw+avx512dq", "x86_64+avx2+fma"))]
pub fn relu_in_place(values: &mut [f32]) {
    for v in values {
        if *v < 0.0 {
            *v = 0.0;
        }
    }
}

/// Zeroes gradients where the (post-ReLU) output was not positive.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx512bw+avx512dq", "x86_64+avx2+fma"))]
pub fn relu_backward(grad: &mut [f32], output: &[f32]) {
    for (g, &o) in grad.iter_mut().zip(output) {
        if o <= 0.0 {
            *g = 0.0;
        }
    }
}

/// Sums the rows of `grad` (`rows x cols`) into `out`.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx512bw+avx512dq", "x86_64+avx2+fma"))]
fn column_sums(grad: &[f32], cols: usize, out: &mut [f32]) {
    out.fill(0.0);
    for row in grad.chunks_exact(cols) {
        for (o, g) in out.iter_mut().zip(row) {
            *o += g;
        }
    }
}

/// Convolution forward: `out = relu?(im2col(x) * W^T + b)`; keeps `patches` for backward.
pub fn conv_forward(
    op: &ConvOp,
    weight: &[f32],
    bias: &[f32],
    x: &[f32],
    batch: usize,
    patches: &mut Vec<f32>,
    out: &mut Vec<f32>,
) {
    let rows = batch * op.output[0] * op.output[1];
    let filters = op.output[2];
    out.resize(rows * filters, 0.0);
    if op.is_tap_major() {
        im2col_tap_major(op, x, batch, patches);
    } else {
        im2col(op, x, batch, patches);
    }
    fill_bias(out, bias, rows);
    let k = op.patch_len();
    matmul(
        out,
        patch_matrix(op, patches, rows),
        MatRef::new(weight, filters, k).t(),
        true,
    );
    if op.relu {
        relu_in_place(&mut out[..rows * filters]);
    }
}

/// Convolution backward. `grad` is d(loss)/d(output), `[batch * oh * ow, filters]`,
/// already masked by the ReLU; `patches` are [`conv_forward`]'s for the same batch;
/// `weight` is `[filters, kh, kw, in]`.
///
/// Writes the weight (`[filters, kh, kw, in]`) and bias (`[filters]`) gradients, and `dx`
/// (`[batch, h, w, in]`) unless it is `None` (first layer).
///
/// # Panics
/// If `dx` is `Some` for a tap-major conv ([`ConvOp::is_tap_major`]: the first layer,
/// whose patches are not laid out for an input gradient), or a slice is shorter than its
/// shape above.
#[allow(clippy::too_many_arguments)]
pub fn conv_backward(
    op: &ConvOp,
    weight: &[f32],
    patches: &[f32],
    grad: &[f32],
    batch: usize,
    dweight: &mut [f32],
    dbias: &mut [f32],
    scratch: &mut Vec<f32>,
    dx: Option<&mut [f32]>,
) {
    let rows = batch * op.output[0] * op.output[1];
    let filters = op.output[2];
    let k = op.patch_len();
    column_sums(&grad[..rows * filters], filters, dbias);
    // dW [filters, k] = grad^T [filters, rows] * patches [rows, k]
    matmul(
        dweight,
        MatRef::new(grad, rows, filters).t(),
        patch_matrix(op, patches, rows),
        false,
    );
    if let Some(dx) = dx {
        assert!(!op.is_tap_major(), "tap-major convs have no input gradient");
        scratch.resize(rows * k, 0.0);
        // dpatches [rows, k] = grad [rows, filters] * W [filters, k]
        matmul(
            scratch,
            MatRef::new(grad, rows, filters),
            MatRef::new(weight, filters, k),
            false,
        );
        col2im(op, scratch, batch, dx);
    }
}

/// Dense forward: `out = relu?(x * W^T + b)`.
pub fn dense_forward(
    op: &DenseOp,
    weight: &[f32],
    bias: &[f32],
    x: &[f32],
    batch: usize,
    out: &mut Vec<f32>,
) {
    out.resize(batch * op.units, 0.0);
    fill_bias(out, bias, batch);
    matmul(
        out,
        MatRef::new(x, batch, op.inputs),
        MatRef::new(weight, op.units, op.inputs).t(),
        true,
    );
    if op.relu {
        relu_in_place(&mut out[..batch * op.units]);
    }
}

/// Dense backward; `grad` already masked by the ReLU.
#[allow(clippy::too_many_arguments)]
pub fn dense_backward(
    op: &DenseOp,
    weight: &[f32],
    x: &[f32],
    grad: &[f32],
    batch: usize,
    dweight: &mut [f32],
    dbias: &mut [f32],
    dx: Option<&mut [f32]>,
) {
    column_sums(&grad[..batch * op.units], op.units, dbias);
    matmul(
        dweight,
        MatRef::new(grad, batch, op.units).t(),
        MatRef::new(x, batch, op.inputs),
        false,
    );
    if let Some(dx) = dx {
        matmul(
            dx,
            MatRef::new(grad, batch, op.units),
            MatRef::new(weight, op.units, op.inputs),
            false,
        );
    }
}

/// Max pooling forward, vectorized across channels.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx512bw+avx512dq", "x86_64+avx2+fma"))]
pub fn max_pool_forward(op: &PoolOp, x: &[f32], batch: usize, out: &mut Vec<f32>) {
    max_pool(op, x, batch, out);
}

/// Max pooling on the int8 runtime's bytes: the max commutes with the (increasing)
/// quantization, so pooling bytes gives the bytes of the pooled floats.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx512bw+avx512dq", "x86_64+avx2+fma"))]
pub fn max_pool_bytes(op: &PoolOp, x: &[u8], batch: usize, out: &mut Vec<u8>) {
    max_pool(op, x, batch, out);
}

/// The one max-pooling loop, inlined into each compiled variant above.
#[inline(always)]
fn max_pool<T: Copy + Default + PartialOrd>(op: &PoolOp, x: &[T], batch: usize, out: &mut Vec<T>) {
    let [h, w, c] = op.input;
    let [oh, ow, _] = op.output;
    out.resize(batch * oh * ow * c, T::default());
    let mut o = 0;
    for n in 0..batch {
        let base = n * h * w * c;
        for oy in 0..oh {
            for ox in 0..ow {
                let first = base + (oy * op.stride * w + ox * op.stride) * c;
                let dst = &mut out[o..o + c];
                dst.copy_from_slice(&x[first..first + c]);
                for ky in 0..op.size {
                    for kx in 0..op.size {
                        let at = first + (ky * w + kx) * c;
                        for (d, &v) in dst.iter_mut().zip(&x[at..at + c]) {
                            if v > *d {
                                *d = v;
                            }
                        }
                    }
                }
                o += c;
            }
        }
    }
}

/// Max pooling backward: each output gradient goes to the first input of its window that
/// equals the maximum (recomputed from `x` and `out`, so the forward pass stores nothing).
/// Branch-free across channels: a per-channel "taken" flag replaces the early exit.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx512bw+avx512dq", "x86_64+avx2+fma"))]
pub fn max_pool_backward(
    op: &PoolOp,
    x: &[f32],
    out: &[f32],
    grad: &[f32],
    batch: usize,
    dx: &mut [f32],
) {
    let [h, w, c] = op.input;
    let [oh, ow, _] = op.output;
    dx[..batch * h * w * c].fill(0.0);
    let mut taken = vec![false; c];
    let mut o = 0;
    for n in 0..batch {
        let base = n * h * w * c;
        for oy in 0..oh {
            for ox in 0..ow {
                let first = base + (oy * op.stride * w + ox * op.stride) * c;
                let best = &out[o..o + c];
                let g = &grad[o..o + c];
                taken.fill(false);
                for ky in 0..op.size {
                    for kx in 0..op.size {
                        let at = first + (ky * w + kx) * c;
                        let xs = &x[at..at + c];
                        let ds = &mut dx[at..at + c];
                        for ch in 0..c {
                            let hit = !taken[ch] && xs[ch] == best[ch];
                            ds[ch] += if hit { g[ch] } else { 0.0 };
                            taken[ch] |= hit;
                        }
                    }
                }
                o += c;
            }
        }
    }
}

/// Average pooling forward.
pub fn avg_pool_forward(op: &PoolOp, x: &[f32], batch: usize, out: &mut Vec<f32>) {
    let [h, w, c] = op.input;
    let [oh, ow, _] = op.output;
    out.resize(batch * oh * ow * c, 0.0);
    let scale = 1.0 / (op.size * op.size) as f32;
    let mut o = 0;
    for n in 0..batch {
        let base = n * h * w * c;
        for oy in 0..oh {
            for ox in 0..ow {
                let first = base + (oy * op.stride * w + ox * op.stride) * c;
                for ch in 0..c {
                    let mut sum = 0.0;
                    for ky in 0..op.size {
                        for kx in 0..op.size {
                            sum += x[first + (ky * w + kx) * c + ch];
                        }
                    }
                    out[o] = sum * scale;
                    o += 1;
                }
            }
        }
    }
}

/// Average pooling backward.
pub fn avg_pool_backward(op: &PoolOp, grad: &[f32], batch: usize, dx: &mut [f32]) {
    let [h, w, c] = op.input;
    let [oh, ow, _] = op.output;
    dx[..batch * h * w * c].fill(0.0);
    let scale = 1.0 / (op.size * op.size) as f32;
    let mut o = 0;
    for n in 0..batch {
        let base = n * h * w * c;
        for oy in 0..oh {
            for ox in 0..ow {
                let first = base + (oy * op.stride * w + ox * op.stride) * c;
                for ch in 0..c {
                    let g = grad[o] * scale;
                    for ky in 0..op.size {
                        for kx in 0..op.size {
                            dx[first + (ky * w + kx) * c + ch] += g;
                        }
                    }
                    o += 1;
                }
            }
        }
    }
}
