//! The CPU kernels: convolution as im2col + GEMM, pooling, dense, and their gradients.
//!
//! Written here rather than taken from candle because candle 0.11's CPU conv2d and
//! autograd ran this model's training step at 396 images/s, 14x slower than Keras on
//! this machine (see the spine issue); im2col + the same `gemm` crate gets most of that
//! back. All buffers are NHWC and owned by the caller so nothing allocates per step.
//!
//! Training keeps its working set in cache and its passes few: convs run in chunks of a
//! few images, unfolding each chunk again in the backward pass ([`conv_backward_chunked`])
//! instead of streaming whole-shard patch buffers through memory, and a ReLU'd conv
//! followed by a max-pool runs as one kernel per chunk ([`conv_relu_max_pool_forward`] /
//! [`conv_relu_max_pool_backward`]): the chunk's pre-activations are pooled while still in
//! cache, the bias and ReLU applied after the max (a quarter of the values for 2x2
//! windows), the winning cell remembered, and the conv's own output never written; the
//! backward pass spreads each chunk's pooled gradient in cache right before the chunk's
//! GEMMs. `benches/train_kernels.rs` times each kernel, fused and separate.

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

/// `v[..len]`, growing `v` (with zeros) only when it is shorter: per-chunk and per-layer
/// buffers whose length changes keep their largest size instead of being cleared again.
pub(crate) fn grown(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() < len {
        v.resize(len, 0.0);
    }
    &mut v[..len]
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

/// Sums the rows of `grad` (`rows x cols`) into `out` (added to it when `accumulate`).
#[multiversion(targets("x86_64+avx512f+avx512vl+avx512bw+avx512dq", "x86_64+avx2+fma"))]
fn column_sums(grad: &[f32], cols: usize, out: &mut [f32], accumulate: bool) {
    if !accumulate {
        out.fill(0.0);
    }
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
    conv_pre_activation(op, weight, bias, x, batch, patches, out);
    if op.relu {
        let len = batch * op.output.iter().product::<usize>();
        relu_in_place(&mut out[..len]);
    }
}

/// [`conv_forward`] without the ReLU, whatever `op.relu` says: `out = im2col(x) * W^T + b`
/// (`[batch * oh * ow, filters]`). Training uses it when [`relu_max_pool_forward`] applies
/// the ReLU after pooling, on a quarter of the values.
pub fn conv_pre_activation(
    op: &ConvOp,
    weight: &[f32],
    bias: &[f32],
    x: &[f32],
    batch: usize,
    patches: &mut Vec<f32>,
    out: &mut Vec<f32>,
) {
    let rows = batch * op.output[0] * op.output[1];
    out.resize(rows * op.output[2], 0.0);
    conv_pre_activation_into(op, weight, bias, x, batch, patches, out);
}

/// [`conv_pre_activation`] into a slice of at least `batch * oh * ow * filters` values.
fn conv_pre_activation_into(
    op: &ConvOp,
    weight: &[f32],
    bias: &[f32],
    x: &[f32],
    batch: usize,
    patches: &mut Vec<f32>,
    out: &mut [f32],
) {
    let rows = batch * op.output[0] * op.output[1];
    let filters = op.output[2];
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
    column_sums(&grad[..rows * filters], filters, dbias, false);
    if dx.is_some() {
        assert!(!op.is_tap_major(), "tap-major convs have no input gradient");
    }
    let patches = patch_matrix(op, patches, rows);
    conv_gemm_gradients(
        op, weight, patches, grad, batch, dweight, false, scratch, dx,
    );
}

/// The GEMMs of a conv's gradient over `batch` images (a whole batch or one chunk):
/// `dweight` (`[filters, k]`) gets `grad^T * patches` (added to it when `accumulate`), and,
/// when `dx` is given (`[batch, h, w, in]`), the patch gradients `grad * W` go through
/// `scratch` and are folded onto it ([`col2im`]). `grad` is `[batch * oh * ow, filters]`,
/// `patches` the `[batch * oh * ow, k]` unfolded input.
#[allow(clippy::too_many_arguments)]
fn conv_gemm_gradients(
    op: &ConvOp,
    weight: &[f32],
    patches: MatRef<'_>,
    grad: &[f32],
    batch: usize,
    dweight: &mut [f32],
    accumulate: bool,
    scratch: &mut Vec<f32>,
    dx: Option<&mut [f32]>,
) {
    let rows = batch * op.output[0] * op.output[1];
    let filters = op.output[2];
    let k = op.patch_len();
    // dW [filters, k] (+)= grad^T [filters, rows] * patches [rows, k]
    matmul(
        dweight,
        MatRef::new(grad, rows, filters).t(),
        patches,
        accumulate,
    );
    if let Some(dx) = dx {
        let scratch = grown(scratch, rows * k);
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

/// The unfolded input of images `start..start + n` of a `batch`, as a `[n * oh * ow, k]`
/// matrix: rows of the whole batch's patches for a tap-major conv (unfolded once by the
/// caller, [`im2col_tap_major`]), else that chunk unfolded now into `patches` ([`im2col`]).
fn chunk_patches<'a>(
    op: &ConvOp,
    x: &[f32],
    batch: usize,
    start: usize,
    n: usize,
    patches: &'a mut Vec<f32>,
) -> MatRef<'a> {
    let pixels = op.output[0] * op.output[1];
    if op.is_tap_major() {
        patch_matrix(op, patches, batch * pixels).rows(start * pixels, n * pixels)
    } else {
        let in_len = op.input.iter().product::<usize>();
        im2col(op, &x[start * in_len..(start + n) * in_len], n, patches);
        MatRef::new(patches, n * pixels, op.patch_len())
    }
}

/// Convolution backward from the layer's *input* rather than stored patches: the batch
/// goes through in chunks of `chunk` images, each unfolded again ([`im2col`]) into
/// `patches`, so the unfolded rows, the patch gradients in `scratch` and the chunk's
/// output gradient stay in the core's L2 cache instead of streaming whole-shard buffers
/// through memory (the reference CNN's second conv unfolds to 139 KB per image).
///
/// Same contract and results as [`conv_backward`] (up to the summation order of the
/// weight gradient, which is summed chunk after chunk): `x` is `[batch, h, w, in]`.
///
/// # Panics
/// If the conv is tap-major ([`ConvOp::is_tap_major`]), `chunk` is 0, or a slice is
/// shorter than its shape.
#[allow(clippy::too_many_arguments)]
pub fn conv_backward_chunked(
    op: &ConvOp,
    weight: &[f32],
    x: &[f32],
    grad: &[f32],
    batch: usize,
    chunk: usize,
    dweight: &mut [f32],
    dbias: &mut [f32],
    patches: &mut Vec<f32>,
    scratch: &mut Vec<f32>,
    mut dx: Option<&mut [f32]>,
) {
    assert!(!op.is_tap_major(), "tap-major convs keep their patches");
    assert!(chunk > 0, "chunks of at least one image");
    let pixels = op.output[0] * op.output[1];
    let filters = op.output[2];
    let in_len = op.input.iter().product::<usize>();
    column_sums(&grad[..batch * pixels * filters], filters, dbias, false);
    let mut start = 0;
    while start < batch {
        let n = chunk.min(batch - start);
        let g = &grad[start * pixels * filters..(start + n) * pixels * filters];
        let a = chunk_patches(op, x, batch, start, n, patches);
        let dx = dx
            .as_deref_mut()
            .map(|dx| &mut dx[start * in_len..(start + n) * in_len]);
        conv_gemm_gradients(op, weight, a, g, n, dweight, start > 0, scratch, dx);
        start += n;
    }
}

/// Convolution forward in chunks of `chunk` images, each unfolded into `patches` and
/// multiplied while it is in cache: `patches` ends with the last chunk's rows (the whole
/// batch's, as [`conv_pre_activation`] leaves them, when `chunk >= batch`), and
/// [`conv_backward_chunked`] unfolds again. `out` is `[batch * oh * ow, filters]`, before
/// the ReLU.
///
/// # Panics
/// If `chunk` is 0 or a slice is shorter than its shape.
#[allow(clippy::too_many_arguments)]
pub fn conv_pre_activation_chunked(
    op: &ConvOp,
    weight: &[f32],
    bias: &[f32],
    x: &[f32],
    batch: usize,
    chunk: usize,
    patches: &mut Vec<f32>,
    out: &mut Vec<f32>,
) {
    assert!(chunk > 0, "chunks of at least one image");
    let pixels = op.output[0] * op.output[1];
    let filters = op.output[2];
    let in_len = op.input.iter().product::<usize>();
    out.resize(batch * pixels * filters, 0.0);
    let mut start = 0;
    while start < batch {
        let n = chunk.min(batch - start);
        conv_pre_activation_into(
            op,
            weight,
            bias,
            &x[start * in_len..(start + n) * in_len],
            n,
            patches,
            &mut out[start * pixels * filters..(start + n) * pixels * filters],
        );
        start += n;
    }
}

/// The training forward pass of a ReLU'd conv and the max-pool after it
/// ([`fuses_relu_max_pool`]), chunk by chunk: each chunk of `chunk` images is unfolded
/// (or, for a tap-major conv, read from the whole batch's patches, unfolded once and kept
/// for the backward pass), multiplied into `pre` without its bias, and pooled at once by
/// [`relu_max_pool_forward`], which adds the bias to each window's maximum and applies the
/// ReLU. The conv's output never leaves the cache: only the pooled values `out`
/// (`[batch, oh, ow, filters]` of the pool) and `argmax` (same length) are written.
///
/// `x` is `[batch, h, w, in]`, `weight` `[filters, kh, kw, in]`, `bias` `[filters]`.
/// Values equal [`conv_forward`] then [`max_pool_forward`] up to the GEMM's rounding.
///
/// # Panics
/// If `chunk` is 0, the pool does not fuse or does not take the conv's output, or a slice
/// is shorter than its shape.
#[allow(clippy::too_many_arguments)]
pub fn conv_relu_max_pool_forward(
    conv: &ConvOp,
    pool: &PoolOp,
    weight: &[f32],
    bias: &[f32],
    x: &[f32],
    batch: usize,
    chunk: usize,
    patches: &mut Vec<f32>,
    pre: &mut Vec<f32>,
    out: &mut Vec<f32>,
    argmax: &mut Vec<u32>,
) {
    assert!(chunk > 0, "chunks of at least one image");
    assert!(
        fuses_relu_max_pool(pool) && pool.input == conv.output,
        "pool after the conv"
    );
    let pixels = conv.output[0] * conv.output[1];
    let filters = conv.output[2];
    let k = conv.patch_len();
    let pooled = pool.output.iter().product::<usize>();
    out.resize(batch * pooled, 0.0);
    argmax.resize(batch * pooled, 0);
    if conv.is_tap_major() {
        im2col_tap_major(conv, x, batch, patches);
    }
    let mut start = 0;
    while start < batch {
        let n = chunk.min(batch - start);
        let rows = n * pixels;
        let a = chunk_patches(conv, x, batch, start, n, patches);
        let pre = grown(pre, rows * filters);
        matmul(pre, a, MatRef::new(weight, filters, k).t(), false);
        relu_max_pool_into(
            pool,
            pre,
            n,
            Some(bias),
            &mut out[start * pooled..(start + n) * pooled],
            &mut argmax[start * pooled..(start + n) * pooled],
        );
        start += n;
    }
}

/// The gradient through [`conv_relu_max_pool_forward`], chunk by chunk as it ran: each
/// chunk's pooled gradient is spread onto the conv's output cells in `dpre`
/// ([`relu_max_pool_backward`]), then multiplied into the weight and bias gradients and,
/// unless `dx` is `None`, the input gradient (`[batch, h, w, in]`, patch gradients in
/// `scratch` folded back by [`col2im`]). `grad` is d(loss)/d(pooled output); `out` and
/// `argmax` are the forward pass's; `patches` the forward pass's for a tap-major conv,
/// scratch (unfolded again per chunk) otherwise.
///
/// Writes `dweight` (`[filters, kh, kw, in]`) and `dbias` (`[filters]`), summed chunk after
/// chunk, so equal to [`conv_backward`]'s up to rounding.
///
/// # Panics
/// As [`conv_relu_max_pool_forward`], and if `dx` is `Some` for a tap-major conv.
#[allow(clippy::too_many_arguments)]
pub fn conv_relu_max_pool_backward(
    conv: &ConvOp,
    pool: &PoolOp,
    weight: &[f32],
    x: &[f32],
    out: &[f32],
    argmax: &[u32],
    grad: &[f32],
    batch: usize,
    chunk: usize,
    dweight: &mut [f32],
    dbias: &mut [f32],
    patches: &mut Vec<f32>,
    dpre: &mut Vec<f32>,
    scratch: &mut Vec<f32>,
    mut dx: Option<&mut [f32]>,
) {
    assert!(chunk > 0, "chunks of at least one image");
    assert!(
        fuses_relu_max_pool(pool) && pool.input == conv.output,
        "pool after the conv"
    );
    assert!(
        !(conv.is_tap_major() && dx.is_some()),
        "tap-major convs have no input gradient"
    );
    let pixels = conv.output[0] * conv.output[1];
    let filters = conv.output[2];
    let in_len = conv.input.iter().product::<usize>();
    let pooled = pool.output.iter().product::<usize>();
    if batch == 0 {
        dweight.fill(0.0);
        dbias.fill(0.0);
        return;
    }
    let mut start = 0;
    while start < batch {
        let n = chunk.min(batch - start);
        let rows = n * pixels;
        let p = start * pooled..(start + n) * pooled;
        let dpre = grown(dpre, rows * filters);
        relu_max_pool_backward(pool, &out[p.clone()], &argmax[p.clone()], &grad[p], n, dpre);
        column_sums(dpre, filters, dbias, start > 0);
        let a = chunk_patches(conv, x, batch, start, n, patches);
        let dx = dx
            .as_deref_mut()
            .map(|dx| &mut dx[start * in_len..(start + n) * in_len]);
        conv_gemm_gradients(conv, weight, a, dpre, n, dweight, start > 0, scratch, dx);
        start += n;
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
    column_sums(&grad[..batch * op.units], op.units, dbias, false);
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

/// Whether [`relu_max_pool_forward`] / [`relu_max_pool_backward`] can run `op` after a
/// ReLU'd layer: windows that tile the input without overlap or gaps (stride = size).
pub fn fuses_relu_max_pool(op: &PoolOp) -> bool {
    op.stride == op.size && op.size >= 1
}

/// Max pooling of a ReLU'd layer's *pre-activations* while training, with the ReLU applied
/// after the max: `out = max(0, max(window))`, which equals max-pooling the ReLU's output
/// (both are monotone), at a quarter of the ReLU work for 2x2 windows.
///
/// `x` is `[batch, h, w, c]`, `out` becomes `[batch, oh, ow, c]`, and `argmax` (same length)
/// the index `ky * size + kx` of the first maximum of each window, in window order, which is
/// the cell [`max_pool_backward`] would pick. Needs [`fuses_relu_max_pool`]. The index is a
/// `u32`, as wide as the floats it is chosen with, so the loop vectorizes without packing
/// (a `u8` index ran the forward pass 2x slower).
pub fn relu_max_pool_forward(
    op: &PoolOp,
    x: &[f32],
    batch: usize,
    out: &mut Vec<f32>,
    argmax: &mut Vec<u32>,
) {
    let len = batch * op.output.iter().product::<usize>();
    out.resize(len, 0.0);
    argmax.resize(len, 0);
    relu_max_pool_into(op, x, batch, None, out, argmax);
}

/// [`relu_max_pool_forward`] into slices of at least `batch * oh * ow * c` values, adding
/// `bias` (`[c]`) to each window's maximum before the ReLU when given. Adding a per-channel
/// constant after the max gives the same value, bit for bit, as adding it to every cell
/// before (rounding is monotone), on a quarter of the values for 2x2 windows. The winning
/// cell is then the first maximum of the unbiased values: where rounding makes two cells
/// equal only once the bias is added, it may be a later cell than a max-pool of the biased
/// values picks; both are valid subgradients.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx512bw+avx512dq", "x86_64+avx2+fma"))]
fn relu_max_pool_into(
    op: &PoolOp,
    x: &[f32],
    batch: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
    argmax: &mut [u32],
) {
    debug_assert!(fuses_relu_max_pool(op));
    let [h, w, c] = op.input;
    let [oh, ow, _] = op.output;
    // Channels go in groups of 8 held in local arrays (registers) across the window's
    // cells: updating the output slice cell by cell ran 4x slower, each cell waiting on
    // the store of the one before.
    const GROUP: usize = 8;
    let cells: Vec<usize> = (0..op.size)
        .flat_map(|ky| (0..op.size).map(move |kx| (ky * w + kx) * c))
        .collect();
    let mut o = 0;
    for n in 0..batch {
        let base = n * h * w * c;
        for oy in 0..oh {
            for ox in 0..ow {
                let first = base + (oy * op.stride * w + ox * op.stride) * c;
                let mut ch = 0;
                while ch < c {
                    let width = GROUP.min(c - ch);
                    let mut best = [f32::NEG_INFINITY; GROUP];
                    let mut index = [0u32; GROUP];
                    for (cell, &offset) in cells.iter().enumerate() {
                        let at = first + offset + ch;
                        if width == GROUP {
                            let v: &[f32; GROUP] = x[at..at + GROUP].try_into().expect("a group");
                            for j in 0..GROUP {
                                let greater = v[j] > best[j] || cell == 0;
                                best[j] = if greater { v[j] } else { best[j] };
                                index[j] = if greater { cell as u32 } else { index[j] };
                            }
                        } else {
                            for j in 0..width {
                                let v = x[at + j];
                                if v > best[j] || cell == 0 {
                                    best[j] = v;
                                    index[j] = cell as u32;
                                }
                            }
                        }
                    }
                    if let Some(bias) = bias {
                        for j in 0..width {
                            best[j] += bias[ch + j];
                        }
                    }
                    for j in 0..width {
                        // Not `f32::max`, which turns NaN into 0: a NaN must stay visible,
                        // as it does through `relu_in_place`.
                        out[o + ch + j] = if best[j] < 0.0 { 0.0 } else { best[j] };
                        argmax[o + ch + j] = index[j];
                    }
                    ch += width;
                }
                o += c;
            }
        }
    }
}

/// The gradient through [`relu_max_pool_forward`]: `dx` (`[batch, h, w, c]`, every value
/// written) gets each output gradient at its window's `argmax` cell when the pooled value
/// is positive, and zero everywhere else, which is [`max_pool_backward`] followed by
/// [`relu_backward`] in one pass and without clearing `dx` first. `out` and `argmax` are
/// the forward pass's, `grad` is `[batch, oh, ow, c]`.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx512bw+avx512dq", "x86_64+avx2+fma"))]
pub fn relu_max_pool_backward(
    op: &PoolOp,
    out: &[f32],
    argmax: &[u32],
    grad: &[f32],
    batch: usize,
    dx: &mut [f32],
) {
    debug_assert!(fuses_relu_max_pool(op));
    let [h, w, c] = op.input;
    let [oh, ow, _] = op.output;
    let size = op.size;
    let (covered_h, covered_w) = (oh * size, ow * size);
    let mut o = 0;
    for n in 0..batch {
        let image = &mut dx[n * h * w * c..(n + 1) * h * w * c];
        for oy in 0..oh {
            for ox in 0..ow {
                let first = (oy * size * w + ox * size) * c;
                let (best, index, g) = (&out[o..o + c], &argmax[o..o + c], &grad[o..o + c]);
                for ky in 0..size {
                    for kx in 0..size {
                        let cell = (ky * size + kx) as u32;
                        let at = first + (ky * w + kx) * c;
                        for (((d, &b), &i), &g) in
                            image[at..at + c].iter_mut().zip(best).zip(index).zip(g)
                        {
                            // No gradient where the pooled output is <= 0, or NaN (as the
                            // separate passes give: no cell equals a NaN maximum).
                            let live = i == cell && b > 0.0;
                            *d = if live { g } else { 0.0 };
                        }
                    }
                }
                o += c;
            }
        }
        // Cells no window covers (the last row / column when h or w is odd).
        for iy in 0..h {
            let row = &mut image[iy * w * c..(iy + 1) * w * c];
            if iy >= covered_h {
                row.fill(0.0);
            } else {
                row[covered_w * c..].fill(0.0);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Chunked convolution (patches unfolded again per chunk) gives what the whole-batch
    /// kernels give, with a partial last chunk and padding, stride and an input gradient.
    #[test]
    fn chunked_conv_matches_whole_batch() {
        let op = ConvOp {
            input: [7, 6, 5],
            output: [4, 3, 8],
            kernel: 3,
            stride: 2,
            pad: (1, 1),
            relu: false,
            weight: 0,
            first: false,
        };
        let batch = 5;
        let x: Vec<f32> = (0..batch * 7 * 6 * 5)
            .map(|i| ((i * 37 % 101) as f32) / 50.0 - 1.0)
            .collect();
        let k = op.patch_len();
        let weight: Vec<f32> = (0..8 * k)
            .map(|i| ((i * 13 % 29) as f32) / 29.0 - 0.5)
            .collect();
        let bias: Vec<f32> = (0..8).map(|i| i as f32 * 0.1).collect();
        let (mut patches, mut want_out) = (Vec::new(), Vec::new());
        conv_pre_activation(&op, &weight, &bias, &x, batch, &mut patches, &mut want_out);
        let grad: Vec<f32> = (0..want_out.len())
            .map(|i| ((i * 7 % 11) as f32) - 5.0)
            .collect();
        let (mut want_dw, mut want_db, mut want_dx) =
            (vec![0.0; weight.len()], vec![0.0; 8], vec![0.0; x.len()]);
        let mut scratch = Vec::new();
        conv_backward(
            &op,
            &weight,
            &patches,
            &grad,
            batch,
            &mut want_dw,
            &mut want_db,
            &mut scratch,
            Some(&mut want_dx),
        );
        // The GEMM's blocking changes with the row count, so values agree up to rounding.
        let close = |got: &[f32], want: &[f32], chunk: usize| {
            assert_eq!(got.len(), want.len());
            for (a, b) in got.iter().zip(want) {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "chunk {chunk}: {a} vs {b}"
                );
            }
        };
        for chunk in [1, 2, 3, 5, 8] {
            let (mut out, mut p2) = (Vec::new(), Vec::new());
            conv_pre_activation_chunked(&op, &weight, &bias, &x, batch, chunk, &mut p2, &mut out);
            close(&out, &want_out, chunk);
            let (mut dw, mut db, mut dx) = (
                vec![f32::NAN; weight.len()],
                vec![f32::NAN; 8],
                vec![f32::NAN; x.len()],
            );
            conv_backward_chunked(
                &op,
                &weight,
                &x,
                &grad,
                batch,
                chunk,
                &mut dw,
                &mut db,
                &mut p2,
                &mut scratch,
                Some(&mut dx),
            );
            assert_eq!(db, want_db);
            assert_eq!(dx, want_dx, "chunk {chunk}");
            for (a, b) in dw.iter().zip(&want_dw) {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "chunk {chunk}: {a} vs {b}"
                );
            }
        }
    }

    /// The conv fused with its ReLU and max-pool, chunk by chunk, gives what the separate
    /// whole-batch kernels give: the same pooled values bit for bit (the bias added after
    /// the max), and the same gradients up to the GEMM's rounding, for a tap-major first
    /// conv and for a padded one with an input gradient, with partial last chunks.
    #[test]
    fn conv_relu_max_pool_matches_separate_kernels() {
        let tap_major = ConvOp {
            input: [9, 8, 1],
            output: [7, 6, 8],
            kernel: 3,
            stride: 1,
            pad: (0, 0),
            relu: true,
            weight: 0,
            first: true,
        };
        let padded = ConvOp {
            input: [6, 7, 5],
            output: [6, 7, 16],
            pad: (1, 1),
            first: false,
            ..tap_major.clone()
        };
        for conv in [tap_major, padded] {
            let [oh, ow, filters] = conv.output;
            let pool = PoolOp {
                input: conv.output,
                output: [oh / 2, ow / 2, filters],
                size: 2,
                stride: 2,
            };
            let batch = 5;
            let in_len = conv.input.iter().product::<usize>();
            let x: Vec<f32> = (0..batch * in_len)
                .map(|i| ((i * 37 % 101) as f32) / 50.0 - 1.0)
                .collect();
            let k = conv.patch_len();
            let weight: Vec<f32> = (0..filters * k)
                .map(|i| ((i * 13 % 29) as f32) / 29.0 - 0.5)
                .collect();
            let bias: Vec<f32> = (0..filters).map(|i| i as f32 * 0.1 - 0.7).collect();

            let (mut patches, mut pre) = (Vec::new(), Vec::new());
            conv_pre_activation(&conv, &weight, &bias, &x, batch, &mut patches, &mut pre);
            let (mut want_out, mut want_argmax) = (Vec::new(), Vec::new());
            relu_max_pool_forward(&pool, &pre, batch, &mut want_out, &mut want_argmax);
            let grad: Vec<f32> = (0..want_out.len())
                .map(|i| ((i * 7 % 11) as f32) - 5.0)
                .collect();
            let mut dpre = vec![f32::NAN; pre.len()];
            relu_max_pool_backward(&pool, &want_out, &want_argmax, &grad, batch, &mut dpre);
            let (mut want_dw, mut want_db) = (vec![0.0; weight.len()], vec![0.0; filters]);
            let mut want_dx = vec![0.0; x.len()];
            let with_dx = !conv.is_tap_major();
            conv_backward(
                &conv,
                &weight,
                &patches,
                &dpre,
                batch,
                &mut want_dw,
                &mut want_db,
                &mut Vec::new(),
                with_dx.then_some(&mut want_dx[..]),
            );

            let close = |got: &[f32], want: &[f32], what: &str| {
                assert_eq!(got.len(), want.len(), "{what}");
                for (a, b) in got.iter().zip(want) {
                    assert!(
                        (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                        "{what}: {a} vs {b}"
                    );
                }
            };
            for chunk in [1, 2, 3, 5, 8] {
                let what = format!("first {} chunk {chunk}", conv.first);
                let (mut p2, mut pre2, mut out, mut argmax) =
                    (Vec::new(), Vec::new(), Vec::new(), Vec::new());
                conv_relu_max_pool_forward(
                    &conv,
                    &pool,
                    &weight,
                    &bias,
                    &x,
                    batch,
                    chunk,
                    &mut p2,
                    &mut pre2,
                    &mut out,
                    &mut argmax,
                );
                // The GEMM's blocking changes with the row count: values agree up to
                // rounding, and so may the winners of near ties.
                close(&out, &want_out, &what);
                // Backward from the separate pass's pooled values and winners, and from the
                // fused pass's own, which must be laid out as the separate pass's are.
                for (pooled, winners) in [(&want_out, &want_argmax), (&out, &argmax)] {
                    let (mut dw, mut db) = (vec![f32::NAN; weight.len()], vec![f32::NAN; filters]);
                    let mut dx = vec![f32::NAN; x.len()];
                    conv_relu_max_pool_backward(
                        &conv,
                        &pool,
                        &weight,
                        &x,
                        pooled,
                        winners,
                        &grad,
                        batch,
                        chunk,
                        &mut dw,
                        &mut db,
                        &mut p2,
                        &mut pre2,
                        &mut Vec::new(),
                        with_dx.then_some(&mut dx[..]),
                    );
                    close(&dw, &want_dw, &what);
                    close(&db, &want_db, &what);
                    if with_dx {
                        close(&dx, &want_dx, &what);
                    }
                }
            }
        }
    }

    /// The fused ReLU + max-pool pair gives exactly what the two separate passes give,
    /// ties (first cell wins), negative windows and uncovered edge cells included.
    #[test]
    fn relu_max_pool_matches_separate_passes() {
        for (h, w, c, size) in [(5, 5, 3, 2), (6, 7, 17, 2), (7, 7, 8, 3), (4, 4, 1, 1)] {
            let op = PoolOp {
                input: [h, w, c],
                output: [h / size, w / size, c],
                size,
                stride: size,
            };
            assert!(fuses_relu_max_pool(&op));
            let batch = 2;
            // Small integers: many ties, many negatives, some windows all negative.
            // ... and a NaN now and then (a diverging run), which must stay visible.
            let x: Vec<f32> = (0..batch * h * w * c)
                .map(|i| match (i * 7919 + 13) % 9 {
                    8 if i % 5 == 0 => f32::NAN,
                    v => v as f32 - 5.0,
                })
                .collect();
            let grad: Vec<f32> = (0..batch * op.output.iter().product::<usize>())
                .map(|i| 1.0 + i as f32)
                .collect();

            let mut relu_x = x.clone();
            relu_in_place(&mut relu_x);
            let mut want_out = Vec::new();
            max_pool_forward(&op, &relu_x, batch, &mut want_out);
            let mut want_dx = vec![f32::NAN; x.len()];
            max_pool_backward(&op, &relu_x, &want_out, &grad, batch, &mut want_dx);
            relu_backward(&mut want_dx, &relu_x);

            let (mut out, mut argmax) = (Vec::new(), Vec::new());
            relu_max_pool_forward(&op, &x, batch, &mut out, &mut argmax);
            // Bit for bit, so NaNs count too.
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&out), bits(&want_out), "{h}x{w}x{c} size {size}");
            let mut dx = vec![f32::NAN; x.len()];
            relu_max_pool_backward(&op, &out, &argmax, &grad, batch, &mut dx);
            assert_eq!(bits(&dx), bits(&want_dx), "{h}x{w}x{c} size {size}");
        }
    }
}
