//! im2col for any element type: the fp32 trainer and the int8 runtime unfold the same way.
//!
//! Row `r` of the output holds the receptive field of output pixel `r` in `(ky, kx, c)`
//! order, at a caller-chosen row stride (the int8 kernel wants a multiple of 4); cells in
//! the padding get `pad` (0.0, or the activation zero point).

use super::plan::ConvOp;

/// Copies a short run without a `memcpy` call: im2col runs are 3 to 200 elements long,
/// where the call costs more than the copy (measured: 17% of int8 inference).
#[inline(always)]
fn copy_short<T: Copy>(dst: &mut [T], src: &[T]) {
    let mut d = dst.chunks_exact_mut(16);
    let mut s = src.chunks_exact(16);
    for (d16, s16) in (&mut d).zip(&mut s) {
        let v: [T; 16] = s16.try_into().expect("16 elements");
        d16.copy_from_slice(&v);
    }
    for (x, &y) in d.into_remainder().iter_mut().zip(s.remainder()) {
        *x = y;
    }
}

/// Unfolds `x` (`[batch, h, w, c]` NHWC, `op.input`) into `out` (`[batch * oh * ow,
/// row_stride]`, each row in `(ky, kx, c)` order, the order of a conv weight's
/// `[out, kh, kw, in]` rows).
///
/// Elements past `k * k * c` in each row are left as they were (callers either use no
/// stride padding or multiply it by zero weights).
///
/// # Panics
/// If `x.len() < batch * h * w * c` or `row_stride < k * k * c`, or `op` is not a
/// geometry [`crate::nn::Plan::compile`] makes (its output larger than its padded input
/// allows).
pub fn im2col<T: Copy + Default>(
    op: &ConvOp,
    x: &[T],
    batch: usize,
    row_stride: usize,
    pad: T,
    out: &mut Vec<T>,
) {
    let [h, w, c] = op.input;
    let [oh, ow, _] = op.output;
    let (k, s) = (op.kernel, op.stride);
    out.resize(batch * oh * ow * row_stride, T::default());
    let mut row = 0;
    for n in 0..batch {
        let image = &x[n * h * w * c..(n + 1) * h * w * c];
        for oy in 0..oh {
            for ox in 0..ow {
                let dst = &mut out[row * row_stride..row * row_stride + k * k * c];
                row += 1;
                let inside = oy * s >= op.pad.0
                    && ox * s >= op.pad.1
                    && oy * s + k <= h + op.pad.0
                    && ox * s + k <= w + op.pad.1;
                if inside {
                    let (y0, x0) = (oy * s - op.pad.0, ox * s - op.pad.1);
                    if k == 3 && c == 1 {
                        // The usual first layer: nine values from three rows, no loops.
                        let d: &mut [T; 9] = (&mut dst[..9]).try_into().expect("9 elements");
                        for ky in 0..3 {
                            let at = (y0 + ky) * w + x0;
                            let r: [T; 3] = image[at..at + 3].try_into().expect("3 elements");
                            d[ky * 3..ky * 3 + 3].copy_from_slice(&r);
                        }
                    } else {
                        for ky in 0..k {
                            let start = ((y0 + ky) * w + x0) * c;
                            copy_short(
                                &mut dst[ky * k * c..(ky + 1) * k * c],
                                &image[start..start + k * c],
                            );
                        }
                    }
                    continue;
                }
                for ky in 0..k {
                    let iy = (oy * s + ky) as isize - op.pad.0 as isize;
                    let seg = &mut dst[ky * k * c..(ky + 1) * k * c];
                    if iy < 0 || iy >= h as isize {
                        seg.fill(pad);
                        continue;
                    }
                    for kx in 0..k {
                        let ix = (ox * s + kx) as isize - op.pad.1 as isize;
                        let cell = &mut seg[kx * c..(kx + 1) * c];
                        if ix < 0 || ix >= w as isize {
                            cell.fill(pad);
                        } else {
                            let start = (iy as usize * w + ix as usize) * c;
                            cell.copy_from_slice(&image[start..start + c]);
                        }
                    }
                }
            }
        }
    }
}
