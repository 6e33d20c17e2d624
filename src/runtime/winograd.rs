//! Winograd F(2x2, 3x3) for a 3x3 stride-1 convolution followed by a 2x2/2 max-pool, on
//! AVX2 + FMA (fp32 inference).
//!
//! Numerics: Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (CVPR
//! 2016), section 4.1. Each 2x2 block of conv outputs is `A^T [(G g G^T) ⊙ (B^T d B)] A`
//! for the 4x4 input tile `d` and the 3x3 filter `g`: 16 multiplications per input/output
//! channel pair instead of 36, so 2.25x fewer than the direct kernel. The 2x2 output
//! block is exactly one pool window, so the pool (and bias, ReLU) is applied while the
//! block is in registers, as the direct kernel does. The transforms only add and
//! subtract (and `G`'s halves are exact), so results match the direct sum up to rounding
//! order (tested against the training forward pass).
//!
//! Why our own kernel: this is the project's forward pass itself (no crate we could
//! depend on runs a fused conv+pool on our packed layout), and at batch 1 the
//! conv-after-pool (the reference CNN's second conv) is three quarters of the
//! multiplications of a request.
//!
//! Layout: the input tile transform `V` is `[16 positions][tiles][c]`, the filter
//! transform `U` is `[16 positions][n / 16 blocks][c][16]`, and each position is a small
//! GEMM `[tiles x c] * [c x 16]` per block, done in register tiles of up to 6 tiles x 16
//! channels (12 accumulators, 2 weight registers, 1 broadcast).

// Without x86_64 only the type and its checks remain (fp32's kernels are x86_64 only).
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

use crate::nn::plan::ConvOp;

/// Output channels per block (two ymm registers).
const LANES: usize = 16;
/// Tiles transformed and multiplied at a time; a multiple of the register tile's rows,
/// sized so the reference CNN's 25 tiles per image are one chunk and `V` / `M` stay in
/// L2 (16 x 36 x 32 and 16 x 36 x 16 floats).
const CHUNK: usize = 36;
/// Tiles per register tile.
const ROWS: usize = 6;

/// A conv layer's filters in the Winograd domain.
#[derive(Debug, Clone)]
pub(super) struct Winograd {
    c: usize,
    n: usize,
    blocks: usize,
    /// `G g G^T` as `[16][blocks][c][16]` (channels zero-padded to 16).
    u: Vec<f32>,
}

/// Where the conv reads and writes: the (framed) input is `batch` NHWC images of
/// `h x w x c`, and the output is `batch x ph x pw` pool windows of `n` channels.
#[derive(Debug, Clone, Copy)]
pub(super) struct Shape {
    pub batch: usize,
    pub h: usize,
    pub w: usize,
    pub ph: usize,
    pub pw: usize,
}

/// Reusable buffers for one thread: the chunk's `V` and one block's `M`.
#[derive(Debug, Default)]
pub(super) struct Buffers {
    v: Vec<f32>,
    m: Vec<f32>,
}

impl Winograd {
    /// Whether `conv` (with a fused 2x2/2 pool when `pool2`) is one this kernel runs: 3x3,
    /// stride 1, whole 2x2 pool windows, and input channels a multiple of 8 (one ymm of
    /// the input transform; with fewer, e.g. a first conv on grey images, the transforms
    /// cost more than the multiplications they save).
    pub fn applies(conv: &ConvOp, pool2: bool) -> bool {
        let c = conv.input[2];
        pool2 && conv.kernel == 3 && conv.stride == 1 && c > 0 && c.is_multiple_of(8)
    }

    /// Transforms `weights` (`[n, 3, 3, c]`, the plan's conv layout) with `G` (computed in
    /// f64, rounded once).
    ///
    /// # Panics
    /// If `weights` holds fewer than `n * 9 * c` values (the caller checked the shapes),
    /// or `c` is not a positive multiple of 8 ([`Winograd::applies`]; the input transform
    /// reads 8 channels at a time).
    pub fn new(weights: &[f32], n: usize, c: usize) -> Self {
        assert!(
            weights.len() >= n * 9 * c,
            "conv weights shorter than their shape"
        );
        assert!(
            c > 0 && c.is_multiple_of(8),
            "Winograd input channels must be a positive multiple of 8"
        );
        const G: [[f64; 3]; 4] = [
            [1.0, 0.0, 0.0],
            [0.5, 0.5, 0.5],
            [0.5, -0.5, 0.5],
            [0.0, 0.0, 1.0],
        ];
        let blocks = n.div_ceil(LANES);
        let mut u = vec![0.0f32; 16 * blocks * c * LANES];
        for out in 0..n {
            for ch in 0..c {
                let g = |y: usize, x: usize| f64::from(weights[((out * 3 + y) * 3 + x) * c + ch]);
                // G g: 4 x 3, then (G g) G^T: 4 x 4.
                let mut gg = [[0.0f64; 3]; 4];
                for (i, row) in gg.iter_mut().enumerate() {
                    for (x, v) in row.iter_mut().enumerate() {
                        *v = (0..3).map(|y| G[i][y] * g(y, x)).sum();
                    }
                }
                for (i, row) in gg.iter().enumerate() {
                    for (j, gj) in G.iter().enumerate() {
                        let value: f64 = (0..3).map(|x| row[x] * gj[x]).sum();
                        let at = (((i * 4 + j) * blocks + out / LANES) * c + ch) * LANES;
                        u[at + out % LANES] = value as f32;
                    }
                }
            }
        }
        Winograd { c, n, blocks, u }
    }

    /// Max-pooled `relu?(conv + bias)` into `out` (`[batch * ph * pw, n]`).
    ///
    /// # Panics
    /// If `x` is shorter than `shape`'s input, `out` than its output, a pool window reads
    /// past its image (`2 * ph + 2 > h`), `bias` is not `n` long, or the CPU lacks AVX2
    /// or FMA (the caller built this for the AVX2 kernel).
    pub fn run(
        &self,
        x: &[f32],
        shape: Shape,
        bias: &[f32],
        relu: bool,
        buffers: &mut Buffers,
        out: &mut [f32],
    ) {
        let Shape {
            batch,
            h,
            w,
            ph,
            pw,
        } = shape;
        assert!(
            2 * ph + 2 <= h && 2 * pw + 2 <= w,
            "pool windows past the conv input"
        );
        assert!(x.len() >= batch * h * w * self.c, "conv input too small");
        assert!(
            out.len() >= batch * ph * pw * self.n,
            "conv output too small"
        );
        assert_eq!(bias.len(), self.n);
        #[cfg(target_arch = "x86_64")]
        {
            assert!(
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma"),
                "the Winograd kernel needs AVX2 and FMA"
            );
            buffers.v.resize(16 * CHUNK * self.c, 0.0);
            buffers.m.resize(16 * CHUNK * LANES, 0.0);
            // SAFETY: AVX2 and FMA were checked above, and every index the kernel forms
            // lies inside the buffers sized and checked above (see `simd::run`).
            unsafe { simd::run(self, x, shape, bias, relu, buffers, out) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (x, bias, relu, buffers, out);
            unreachable!("the fp32 kernels exist on x86_64 only");
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::{Buffers, Shape, Winograd, CHUNK, LANES, ROWS};

    /// # Safety
    /// AVX2 and FMA are present; `x`, `out`, `bias` and the buffers are as
    /// [`Winograd::run`] checked.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn run(
        wg: &Winograd,
        x: &[f32],
        shape: Shape,
        bias: &[f32],
        relu: bool,
        buffers: &mut Buffers,
        out: &mut [f32],
    ) {
        let Shape {
            batch,
            h,
            w,
            ph,
            pw,
        } = shape;
        let c = wg.c;
        let tiles = batch * ph * pw;
        let (v, m) = (buffers.v.as_mut_ptr(), buffers.m.as_mut_ptr());
        let mut start = 0;
        while start < tiles {
            let count = CHUNK.min(tiles - start);
            for t in 0..count {
                let tile = start + t;
                let (image, window) = (tile / (ph * pw), tile % (ph * pw));
                let (py, px) = (window / pw, window % pw);
                let base = ((image * h + 2 * py) * w + 2 * px) * c;
                input_tile(x.as_ptr().add(base), w * c, c, v.add(t * c), CHUNK * c);
            }
            for block in 0..wg.blocks {
                for pos in 0..16 {
                    let u = wg.u.as_ptr().add((pos * wg.blocks + block) * c * LANES);
                    let (vp, mp) = (v.add(pos * CHUNK * c), m.add(pos * CHUNK * LANES));
                    // Register tiles of even size (25 tiles: 5 x 5, not 4 x 6 + 1): a
                    // lone remainder row has 2 accumulators, too few to hide FMA latency.
                    let groups = count.div_ceil(ROWS);
                    let mut t = 0;
                    for g in 0..groups {
                        let rows = (count - t) / (groups - g);
                        debug_assert!((1..=ROWS).contains(&rows));
                        let (vt, mt) = (vp.add(t * c), mp.add(t * LANES));
                        match rows {
                            1 => product::<1>(vt, u, c, mt),
                            2 => product::<2>(vt, u, c, mt),
                            3 => product::<3>(vt, u, c, mt),
                            4 => product::<4>(vt, u, c, mt),
                            5 => product::<5>(vt, u, c, mt),
                            _ => product::<ROWS>(vt, u, c, mt),
                        }
                        t += rows;
                    }
                }
                let first = block * LANES;
                let width = LANES.min(wg.n - first);
                let mut padded = [0.0f32; LANES];
                padded[..width].copy_from_slice(&bias[first..first + width]);
                for t in 0..count {
                    let dst = out.as_mut_ptr().add((start + t) * wg.n + first);
                    output_tile(m.add(t * LANES), CHUNK * LANES, &padded, relu, dst, width);
                }
            }
            start += count;
        }
    }

    /// `B^T d B` for the 4x4 tile at `src` (rows `row` apart, `c` channels per pixel),
    /// 8 channels at a time, into `dst` (positions `pos_stride` apart).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn input_tile(src: *const f32, row: usize, c: usize, dst: *mut f32, pos_stride: usize) {
        for ch in (0..c).step_by(8) {
            let mut d = [[_mm256_setzero_ps(); 4]; 4];
            for (i, d_row) in d.iter_mut().enumerate() {
                for (j, v) in d_row.iter_mut().enumerate() {
                    *v = _mm256_loadu_ps(src.add(i * row + j * c + ch));
                }
            }
            // B^T d (rows), then (.) B (columns): B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1].
            let t = [
                std::array::from_fn::<_, 4, _>(|j| _mm256_sub_ps(d[0][j], d[2][j])),
                std::array::from_fn(|j| _mm256_add_ps(d[1][j], d[2][j])),
                std::array::from_fn(|j| _mm256_sub_ps(d[2][j], d[1][j])),
                std::array::from_fn(|j| _mm256_sub_ps(d[1][j], d[3][j])),
            ];
            for (i, r) in t.iter().enumerate() {
                let values = [
                    _mm256_sub_ps(r[0], r[2]),
                    _mm256_add_ps(r[1], r[2]),
                    _mm256_sub_ps(r[2], r[1]),
                    _mm256_sub_ps(r[1], r[3]),
                ];
                for (j, value) in values.into_iter().enumerate() {
                    _mm256_storeu_ps(dst.add((i * 4 + j) * pos_stride + ch), value);
                }
            }
        }
    }

    /// `M[r] = V[r] * U` for `R` tiles: `v` holds `R` rows of `c`, `u` is `[c][16]`, `m`
    /// gets `R` rows of 16.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn product<const R: usize>(v: *const f32, u: *const f32, c: usize, m: *mut f32) {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for k in 0..c {
            let w0 = _mm256_loadu_ps(u.add(k * LANES));
            let w1 = _mm256_loadu_ps(u.add(k * LANES + 8));
            for (r, a) in acc.iter_mut().enumerate() {
                let x = _mm256_broadcast_ss(&*v.add(r * c + k));
                a[0] = _mm256_fmadd_ps(x, w0, a[0]);
                a[1] = _mm256_fmadd_ps(x, w1, a[1]);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(m.add(r * LANES), a[0]);
            _mm256_storeu_ps(m.add(r * LANES + 8), a[1]);
        }
    }

    /// `A^T M A` for one tile's 16 channels (`m`, positions `pos_stride` apart), the max
    /// of the 2x2 block, plus `bias`, ReLU, and `width` channels stored at `dst`.
    /// `A^T = [1 1 1 0; 0 1 -1 -1]`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn output_tile(
        m: *const f32,
        pos_stride: usize,
        bias: &[f32; LANES],
        relu: bool,
        dst: *mut f32,
        width: usize,
    ) {
        let mut result = [0.0f32; LANES];
        for half in 0..2 {
            let at =
                |i: usize, j: usize| _mm256_loadu_ps(m.add((i * 4 + j) * pos_stride + half * 8));
            // A^T M: 2 x 4.
            let s: [[__m256; 4]; 2] = [
                std::array::from_fn(|j| _mm256_add_ps(_mm256_add_ps(at(0, j), at(1, j)), at(2, j))),
                std::array::from_fn(|j| _mm256_sub_ps(_mm256_sub_ps(at(1, j), at(2, j)), at(3, j))),
            ];
            // (A^T M) A: 2 x 2, and their max.
            let corner = |r: &[__m256; 4]| {
                let y0 = _mm256_add_ps(_mm256_add_ps(r[0], r[1]), r[2]);
                let y1 = _mm256_sub_ps(_mm256_sub_ps(r[1], r[2]), r[3]);
                _mm256_max_ps(y0, y1)
            };
            let best = _mm256_max_ps(corner(&s[0]), corner(&s[1]));
            let mut y = _mm256_add_ps(best, _mm256_loadu_ps(bias.as_ptr().add(half * 8)));
            if relu {
                y = _mm256_max_ps(y, _mm256_setzero_ps());
            }
            if width == LANES {
                _mm256_storeu_ps(dst.add(half * 8), y);
            } else {
                _mm256_storeu_ps(result.as_mut_ptr().add(half * 8), y);
            }
        }
        if width < LANES {
            std::ptr::copy_nonoverlapping(result.as_ptr(), dst, width);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The direct definition in f64: `relu?(max over the 2x2 window of (conv + bias))`.
    fn reference(x: &[f32], w: &[f32], bias: &[f32], s: Shape, c: usize, relu: bool) -> Vec<f64> {
        let mut out = Vec::new();
        for image in 0..s.batch {
            for py in 0..s.ph {
                for px in 0..s.pw {
                    for (o, b) in bias.iter().enumerate() {
                        let mut best = f64::NEG_INFINITY;
                        for (dy, dx) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                            let (oy, ox) = (2 * py + dy, 2 * px + dx);
                            let mut sum = f64::from(*b);
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    for ch in 0..c {
                                        let xi = ((image * s.h + oy + ky) * s.w + ox + kx) * c + ch;
                                        let wi = ((o * 3 + ky) * 3 + kx) * c + ch;
                                        sum += f64::from(x[xi]) * f64::from(w[wi]);
                                    }
                                }
                            }
                            best = best.max(sum);
                        }
                        out.push(if relu { best.max(0.0) } else { best });
                    }
                }
            }
        }
        out
    }

    fn values(count: usize, seed: usize, scale: f32) -> Vec<f32> {
        (0..count)
            .map(|i| ((i * 7919 + seed * 104_729) % 1013) as f32 / 1013.0 - 0.5)
            .map(|v| v * scale)
            .collect()
    }

    /// Against the f64 definition: input channels 8-32, output channels that fill no,
    /// one or several 16-channel blocks partially, odd and even conv outputs (an odd
    /// one leaves its last row and column to no pool window), chunks that split a batch
    /// (4 x 25 tiles), register tiles of 1 to 6 tiles, with and without ReLU.
    #[test]
    fn matches_the_direct_convolution() {
        if !(std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma"))
        {
            eprintln!("skipped: this CPU has no AVX2 + FMA");
            return;
        }
        let cases = [
            (1, 13, 13, 32, 64, true),
            (4, 12, 12, 8, 21, false),
            (3, 9, 11, 16, 5, true),
            (2, 6, 6, 24, 40, false),
            (1, 4, 4, 8, 16, true),
            // 7 single-window images: register tiles of 3 and 4 tiles.
            (7, 4, 4, 8, 16, false),
        ];
        for (case, &(batch, h, w, c, n, relu)) in cases.iter().enumerate() {
            let shape = Shape {
                batch,
                h,
                w,
                ph: (h - 2) / 2,
                pw: (w - 2) / 2,
            };
            let x = values(batch * h * w * c, case, 2.0);
            let weights = values(n * 9 * c, case + 7, 0.5);
            let bias = values(n, case + 11, 0.2);
            let want = reference(&x, &weights, &bias, shape, c, relu);
            let wg = Winograd::new(&weights, n, c);
            let mut got = vec![f32::NAN; want.len()];
            wg.run(&x, shape, &bias, relu, &mut Buffers::default(), &mut got);
            let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
            for (i, (a, b)) in want.iter().zip(&got).enumerate() {
                let error = (a - f64::from(*b)).abs();
                assert!(error <= 1e-5 * scale, "case {case}, value {i}: {a} vs {b}");
            }
        }
    }

    /// The input transform reads 8 channels at a time: other counts are refused when
    /// built, not read past the input when run.
    #[test]
    #[should_panic(expected = "positive multiple of 8")]
    fn refuses_input_channels_that_are_not_a_multiple_of_8() {
        Winograd::new(&[0.0; 16 * 9 * 12], 16, 12);
    }

    #[test]
    fn applies_to_3x3_stride_1_convs_with_a_pool_and_whole_registers_of_channels() {
        let conv = |c: usize, kernel: usize, stride: usize| ConvOp {
            input: [13, 13, c],
            output: [11, 11, 64],
            kernel,
            stride,
            pad: (0, 0),
            relu: true,
            weight: 0,
            first: false,
        };
        assert!(Winograd::applies(&conv(32, 3, 1), true));
        assert!(!Winograd::applies(&conv(32, 3, 1), false));
        assert!(!Winograd::applies(&conv(1, 3, 1), true));
        assert!(!Winograd::applies(&conv(12, 3, 1), true));
        assert!(!Winograd::applies(&conv(0, 3, 1), true));
        assert!(!Winograd::applies(&conv(32, 5, 1), true));
        assert!(!Winograd::applies(&conv(32, 3, 2), true));
    }
}
