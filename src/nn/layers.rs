//! The CPU kernels: convolution as im2col + GEMM, pooling, dense, and their gradients.
//!
//! Written here rather than taken from candle because candle 0.11's CPU conv2d and
//! autograd ran this model's training step at 396 images/s, 14x slower than Keras on
//! this machine (see the spine issue); im2col + the same `gemm` crate gets most of that
//! back. All buffers are NHWC and owned by the caller so nothing allocates per step.

use super::gemm::{matmul, MatRef};
use super::plan::{ConvOp, DenseOp, PoolOp};

/// Unfolds `x` (`[batch, h, w, c]`) into `patches` (`[batch * oh * ow, k * k * c]`).
pub fn im2col(op: &ConvOp, x: &[f32], batch: usize, patches: &mut Vec<f32>) {
    let [h, w, c] = op.input;
    let [oh, ow, _] = op.output;
    let (k, s) = (op.kernel, op.stride);
    let row_len = op.patch_len();
    patches.resize(batch * oh * ow * row_len, 0.0);
    let mut row = 0;
    for n in 0..batch {
        let image = &x[n * h * w * c..(n + 1) * h * w * c];
        for oy in 0..oh {
            for ox in 0..ow {
                let dst = &mut patches[row * row_len..(row + 1) * row_len];
                for ky in 0..k {
                    let iy = (oy * s + ky) as isize - op.pad.0 as isize;
                    let seg = &mut dst[ky * k * c..(ky + 1) * k * c];
                    if iy < 0 || iy >= h as isize {
                        seg.fill(0.0);
                        continue;
                    }
                    let ix0 = (ox * s) as isize - op.pad.1 as isize;
                    if ix0 >= 0 && ix0 as usize + k <= w {
                        // The whole kernel row lies inside the image: one contiguous copy.
                        let start = (iy as usize * w + ix0 as usize) * c;
                        seg.copy_from_slice(&image[start..start + k * c]);
                    } else {
                        for kx in 0..k {
                            let ix = ix0 + kx as isize;
                            let cell = &mut seg[kx * c..(kx + 1) * c];
                            if ix < 0 || ix >= w as isize {
                                cell.fill(0.0);
                            } else {
                                let start = (iy as usize * w + ix as usize) * c;
                                cell.copy_from_slice(&image[start..start + c]);
                            }
                        }
                    }
                }
                row += 1;
            }
        }
    }
}

/// Folds patch gradients back onto the input gradient `dx` (the adjoint of [`im2col`]).
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

/// Writes `bias` into every row of `out` (`rows x bias.len()`), ready for an accumulating GEMM.
fn fill_bias(out: &mut [f32], bias: &[f32], rows: usize) {
    for row in out[..rows * bias.len()].chunks_exact_mut(bias.len()) {
        row.copy_from_slice(bias);
    }
}

/// `max(x, 0)` in place.
pub fn relu_in_place(values: &mut [f32]) {
    for v in values {
        *v = v.max(0.0);
    }
}

/// Zeroes gradients where the (post-ReLU) output was not positive.
pub fn relu_backward(grad: &mut [f32], output: &[f32]) {
    for (g, &o) in grad.iter_mut().zip(output) {
        if o <= 0.0 {
            *g = 0.0;
        }
    }
}

/// Sums the rows of `grad` (`rows x cols`) into `out`.
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
    im2col(op, x, batch, patches);
    out.resize(rows * filters, 0.0);
    fill_bias(out, bias, rows);
    let k = op.patch_len();
    matmul(
        out,
        MatRef::new(patches, rows, k),
        MatRef::new(weight, filters, k).t(),
        true,
    );
    if op.relu {
        relu_in_place(&mut out[..rows * filters]);
    }
}

/// Convolution backward. `grad` is d(loss)/d(output), already masked by the ReLU.
///
/// Writes the weight and bias gradients, and `dx` unless it is `None` (first layer).
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
        MatRef::new(patches, rows, k),
        false,
    );
    if let Some(dx) = dx {
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

/// Max pooling forward; `argmax` records the input index each output came from.
pub fn max_pool_forward(
    op: &PoolOp,
    x: &[f32],
    batch: usize,
    out: &mut Vec<f32>,
    argmax: &mut Vec<u32>,
) {
    let [h, w, c] = op.input;
    let [oh, ow, _] = op.output;
    let len = batch * oh * ow * c;
    out.resize(len, 0.0);
    argmax.resize(len, 0);
    let mut o = 0;
    for n in 0..batch {
        let base = n * h * w * c;
        for oy in 0..oh {
            for ox in 0..ow {
                let first = base + (oy * op.stride * w + ox * op.stride) * c;
                for ch in 0..c {
                    let mut best = x[first + ch];
                    let mut best_at = first + ch;
                    for ky in 0..op.size {
                        for kx in 0..op.size {
                            let at = first + (ky * w + kx) * c + ch;
                            if x[at] > best {
                                best = x[at];
                                best_at = at;
                            }
                        }
                    }
                    out[o] = best;
                    argmax[o] = best_at as u32;
                    o += 1;
                }
            }
        }
    }
}

/// Max pooling backward: each output gradient goes to the input that won.
pub fn max_pool_backward(grad: &[f32], argmax: &[u32], input_len: usize, dx: &mut [f32]) {
    dx[..input_len].fill(0.0);
    for (g, &at) in grad.iter().zip(argmax) {
        dx[at as usize] += g;
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
