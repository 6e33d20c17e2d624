//! The int8 GEMM: uint8 activations x int8 weights, accumulated exactly in int32.
//!
//! Written with `std::arch` because no well-kept crate fits: candle's quantized matmul
//! uses GGML blocks with dynamically quantized activations and has no quantized conv, and
//! the `gemm` crate has no integer kernels. The best path is chosen at run time:
//! AVX-512 VNNI (`vpdpbusd`, 64 multiply-adds per instruction), else AVX2 (bytes widened
//! to 16 bits and `vpmaddwd`, 16 per instruction: `vpmaddubsw` would be faster but
//! saturates at 16 bits, e.g. 255 x 127 x 2, so its sums would not be exact), else a
//! portable path in plain Rust. Integer sums are exact and every path requantizes with
//! the same f32 operations, so they agree bit for bit (tested).
//!
//! Two things keep the kernel fed rather than waiting on copies (measured with perf: they
//! were 60% of int8 inference when done as separate passes):
//! - [`Source::Conv`] reads a convolution's receptive fields straight from the NHWC
//!   activations (one contiguous `kernel * channels` run per kernel row), so no im2col
//!   copy is made;
//! - [`Sink::Requant`] turns the int32 sums into the next layer's bytes while they are
//!   still in registers (bias, zero-point correction, scale, rounding, ReLU, saturation).

/// Which instruction set computes the int8 dot products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Plain Rust (any CPU).
    Portable,
    /// AVX2 `vpmaddwd` on bytes widened to 16 bits (x86-64 with avx2).
    Avx2,
    /// AVX-512 VNNI `vpdpbusd` (x86-64 with avx512f/bw/vl + avx512vnni).
    Avx512Vnni,
}

impl Kernel {
    /// The fastest kernel this CPU supports.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512vnni")
            {
                return Kernel::Avx512Vnni;
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                return Kernel::Avx2;
            }
        }
        Kernel::Portable
    }

    /// Every kernel this CPU can run, slowest first (for tests and benchmarks).
    pub fn available() -> Vec<Self> {
        let mut out = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            out.push(Kernel::Avx2);
        }
        if Kernel::detect() == Kernel::Avx512Vnni {
            out.push(Kernel::Avx512Vnni);
        }
        out
    }

    /// Name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Portable => "portable",
            Kernel::Avx2 => "avx2",
            Kernel::Avx512Vnni => "avx512-vnni",
        }
    }
}

/// Output channels per packed block (one 512-bit register of int32 lanes).
const BLOCK: usize = 16;
/// Output channels per AVX2 block (one 256-bit register of int32 lanes).
const AVX2_BLOCK: usize = 8;

/// int8 weights `[n, k]` packed for the kernels, plus per-row sums for zero points.
#[derive(Debug, Clone)]
pub struct PackedWeights {
    /// Output channels.
    pub n: usize,
    /// Reduction length.
    pub k: usize,
    /// `k` rounded up to a multiple of 4 (the kernels read activations 4 bytes at a time).
    pub k_padded: usize,
    /// Row-major `[n, k]` copy (portable path).
    raw: Vec<i8>,
    /// `[n / 16][k_padded / 4][16][4]`: 4 consecutive k of 16 channels per 64 bytes.
    packed: Vec<i8>,
    /// AVX2 layout, widened: `[n / 8][k_padded / 4][2][8][2]`: per 4-byte group, the
    /// pairs (k0, k1) then (k2, k3) of 8 channels, one 256-bit register each.
    packed16: Vec<i16>,
    /// `sum_k w[n][k]`, to subtract the activation zero point's contribution.
    pub sums: Vec<i32>,
}

impl PackedWeights {
    /// Packs row-major `[n, k]` weights (`n` output channels; `k` the reduction: a conv's
    /// `kh * kw * in`, a dense layer's inputs).
    ///
    /// # Panics
    /// If `weights.len() != n * k`.
    pub fn new(weights: &[i8], n: usize, k: usize) -> Self {
        assert_eq!(weights.len(), n * k, "weights must be n x k");
        let k_padded = k.div_ceil(4) * 4;
        let groups = k_padded / 4;
        let blocks = n.div_ceil(BLOCK);
        let mut packed = vec![0i8; blocks * groups * BLOCK * 4];
        for row in 0..n {
            let (b, lane) = (row / BLOCK, row % BLOCK);
            for col in 0..k {
                let (g, byte) = (col / 4, col % 4);
                packed[((b * groups + g) * BLOCK + lane) * 4 + byte] = weights[row * k + col];
            }
        }
        let blocks8 = n.div_ceil(AVX2_BLOCK);
        let mut packed16 = vec![0i16; blocks8 * groups * 2 * AVX2_BLOCK * 2];
        for row in 0..n {
            let (b, lane) = (row / AVX2_BLOCK, row % AVX2_BLOCK);
            for col in 0..k {
                let (g, half, byte) = (col / 4, (col % 4) / 2, col % 2);
                let at = (((b * groups + g) * 2 + half) * AVX2_BLOCK + lane) * 2 + byte;
                packed16[at] = weights[row * k + col] as i16;
            }
        }
        let sums = weights
            .chunks_exact(k.max(1))
            .map(|r| r.iter().map(|&v| v as i32).sum())
            .collect();
        PackedWeights {
            n,
            k,
            k_padded,
            raw: weights.to_vec(),
            packed,
            packed16,
            sums,
        }
    }
}

pub use crate::nn::geometry::ConvGeometry;
use crate::nn::geometry::Runs;

/// Where the GEMM's activation rows come from.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    /// Row `r` is `a[r * stride ..][.. k]`; bytes past `k` up to `k_padded` may hold
    /// anything (the packed weights are zero there) but must exist.
    Rows {
        /// The bytes.
        a: &'a [u8],
        /// Distance between rows (at least `k`).
        stride: usize,
    },
    /// Row `r` is output pixel `r`'s receptive field of a valid convolution over `x`,
    /// read in place in `(ky, kx, c)` order: needs `kw * c` to be a multiple of 4.
    Conv {
        /// NHWC input bytes.
        x: &'a [u8],
        /// The convolution.
        geometry: ConvGeometry,
    },
}

impl Source<'_> {
    /// The contiguous runs (in bytes) of one row.
    fn runs(&self, w: &PackedWeights) -> Runs {
        match self {
            Source::Rows { .. } => Runs {
                count: 1,
                step: 0,
                len: w.k_padded,
            },
            Source::Conv { geometry, .. } => geometry.runs(),
        }
    }

    #[inline(always)]
    fn row_base(&self, row: usize) -> usize {
        match self {
            Source::Rows { stride, .. } => row * stride,
            Source::Conv { geometry, .. } => geometry.row_base(row),
        }
    }

    /// The pooled geometry, when rows are 2x2 pool windows.
    fn pool2(&self) -> Option<&ConvGeometry> {
        match self {
            Source::Conv { geometry, .. } if geometry.pool2 => Some(geometry),
            _ => None,
        }
    }

    /// The bases of the pixels whose sums make GEMM row `row` (one, or a pool window).
    #[inline(always)]
    fn pixel_bases(&self, row: usize) -> ([usize; 4], usize) {
        match self.pool2() {
            Some(g) => (g.window_bases(row), 4),
            None => ([self.row_base(row), 0, 0, 0], 1),
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Source::Rows { a, .. } => a,
            Source::Conv { x, .. } => x,
        }
    }

    /// Panics unless every byte the kernels read for `m` rows lies inside the buffer.
    fn check(&self, m: usize, w: &PackedWeights) {
        if m == 0 {
            return;
        }
        let end = match self {
            Source::Rows { stride, .. } => {
                assert!(*stride >= w.k, "row stride below k");
                (m - 1) * stride + w.k_padded
            }
            Source::Conv { geometry: g, .. } => {
                assert_eq!(g.kh * g.kw * g.c, w.k, "conv geometry does not match k");
                assert_eq!(
                    g.runs().len % 4,
                    0,
                    "kernel width * channels must be a multiple of 4"
                );
                g.end(m)
            }
        };
        assert!(end <= self.bytes().len(), "activation buffer too small");
    }
}

/// Turns int32 sums into the next layer's bytes:
/// `clamp(round_half_even((acc + offset[j]) * multiplier[j]) + zero_point, low, 255)`.
#[derive(Debug, Clone)]
pub struct Requant {
    /// Bias in accumulator units minus the input zero point's contribution, per channel.
    pub offset: Vec<i32>,
    /// `input_scale * weight_scale / output_scale`, per channel.
    pub multiplier: Vec<f32>,
    /// The output's zero point.
    pub zero_point: f32,
    /// The smallest byte written: the zero point with a fused ReLU, else 0.
    pub low: f32,
}

impl Requant {
    /// The byte for channel `j`'s sum (the definition the SIMD epilogue reproduces).
    #[inline(always)]
    // max/min rather than clamp: clamp keeps NaN, which the unchecked conversion must not see.
    #[allow(clippy::manual_clamp)]
    pub fn byte(&self, j: usize, acc: i32) -> u8 {
        let r = ((acc.wrapping_add(self.offset[j]) as f32 * self.multiplier[j]).round_ties_even()
            + self.zero_point)
            .max(self.low)
            .min(255.0);
        // SAFETY: `r` is finite and in [0, 255] (max() maps NaN to `low`).
        unsafe { r.to_int_unchecked::<i32>() as u8 }
    }
}

/// Where the GEMM's results go.
#[derive(Debug)]
pub enum Sink<'a> {
    /// Raw int32 sums, `[m, n]` row-major.
    Int32(&'a mut [i32]),
    /// Requantized bytes, `[m, n]` row-major.
    Requant {
        /// How sums become bytes.
        requant: &'a Requant,
        /// The bytes.
        out: &'a mut [u8],
    },
}

/// `c[m][n] = sum_k a[m][k] * w[n][k]` for the `m` rows of `source`, written to `sink`.
///
/// # Panics
/// When a buffer is too small or the shapes disagree (the unsafe kernels rely on these
/// checks): [`Source::Rows`] with `stride < w.k` or fewer than
/// `(m - 1) * stride + w.k_padded` bytes; [`Source::Conv`] whose `kh * kw * c != w.k`,
/// whose `kw * c` is not a multiple of 4, or whose input is shorter than the windows of
/// `m` rows reach; a sink shorter than `m * w.n`; a [`Requant`] without `w.n` offsets and
/// multipliers; or a `kernel` this CPU cannot run (use [`Kernel::detect`] or
/// [`Kernel::available`]).
pub fn gemm(kernel: Kernel, source: Source<'_>, m: usize, w: &PackedWeights, mut sink: Sink<'_>) {
    source.check(m, w);
    match &mut sink {
        Sink::Int32(c) => assert!(c.len() >= m * w.n, "output buffer too small"),
        Sink::Requant { requant, out } => {
            assert!(out.len() >= m * w.n, "output buffer too small");
            assert!(requant.offset.len() == w.n && requant.multiplier.len() == w.n);
        }
    }
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Vnni => {
            assert!(
                Kernel::detect() == Kernel::Avx512Vnni,
                "CPU lacks AVX-512 VNNI"
            );
            // SAFETY: the CPU supports the features (checked above), and `check` and the
            // asserts above keep every load and store inside the buffers.
            unsafe { vnni::gemm(source, m, w, sink) }
        }
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => {
            assert!(
                std::arch::is_x86_feature_detected!("avx2"),
                "CPU lacks AVX2"
            );
            // SAFETY: as above, for AVX2.
            unsafe { avx2::gemm(source, m, w, sink) }
        }
        _ => portable(source, m, w, sink),
    }
}

/// [`gemm()`] over plain rows into int32 (benchmarks and tests).
pub fn gemm_u8i8(kernel: Kernel, a: &[u8], m: usize, w: &PackedWeights, c: &mut [i32]) {
    let source = Source::Rows {
        a,
        stride: w.k_padded,
    };
    gemm(kernel, source, m, w, Sink::Int32(c));
}

fn portable(source: Source<'_>, m: usize, w: &PackedWeights, mut sink: Sink<'_>) {
    let runs = source.runs(w);
    let run = runs.len.min(w.k); // plain rows: the padding past k is not part of the sum
    let bytes = source.bytes();
    for row in 0..m {
        let (bases, pixels) = source.pixel_bases(row);
        for n in 0..w.n {
            let weights = &w.raw[n * w.k..(n + 1) * w.k];
            let mut best = i32::MIN;
            for &base in &bases[..pixels] {
                let mut sum = 0i32;
                for (s, offset) in runs.offsets().enumerate() {
                    let a = &bytes[base + offset..base + offset + run];
                    let wr = &weights[s * run..(s + 1) * run];
                    sum += a
                        .iter()
                        .zip(wr)
                        .map(|(&p, &q)| p as i32 * q as i32)
                        .sum::<i32>();
                }
                best = best.max(sum);
            }
            match &mut sink {
                Sink::Int32(c) => c[row * w.n + n] = best,
                Sink::Requant { requant, out } => out[row * w.n + n] = requant.byte(n, best),
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use std::arch::x86_64::*;

    use super::{PackedWeights, Runs, Sink, Source, BLOCK};
    use crate::nn::geometry::{for_each_tile, TILE_ROWS as ROWS};

    /// Blocks of 16 channels per tile: 4 x 4 accumulators + 4 weights fit the registers.
    const BLOCKS: usize = 4;

    /// Per-call constants of a tile.
    struct Ctx<'a> {
        a: *const u8,
        runs: Runs,
        w: &'a PackedWeights,
    }

    /// The int8 GEMM with AVX-512 VNNI (`vpdpbusd`: u8 x i8 -> i32, four at a time).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW, VL and VNNI (`Kernel::Avx512Vnni` is only detected
    /// where it does; the safe `gemm` re-checks before calling). `source` and `sink` must
    /// have been bounds-checked for `m` rows and `w` (the safe `gemm` does): the tiles
    /// read and write through raw pointers without further checks.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn gemm(source: Source<'_>, m: usize, w: &PackedWeights, mut sink: Sink<'_>) {
        let ctx = Ctx {
            a: source.bytes().as_ptr(),
            runs: source.runs(w),
            w,
        };
        let blocks = w.n.div_ceil(BLOCK);
        let pooled = source.pool2().is_some();
        let base = |row| source.row_base(row);
        for_each_tile(m, source.pool2(), base, |row, bases, pixels| {
            let mut b = 0;
            while b < blocks {
                let nb = BLOCKS.min(blocks - b);
                match (pooled, pixels == ROWS, nb) {
                    (true, _, 4) => tile::<4, 4, true>(&ctx, bases, row, b, &mut sink),
                    (true, _, 3) => tile::<4, 3, true>(&ctx, bases, row, b, &mut sink),
                    (true, _, 2) => tile::<4, 2, true>(&ctx, bases, row, b, &mut sink),
                    (true, _, _) => tile::<4, 1, true>(&ctx, bases, row, b, &mut sink),
                    (false, true, 4) => tile::<4, 4, false>(&ctx, bases, row, b, &mut sink),
                    (false, true, 3) => tile::<4, 3, false>(&ctx, bases, row, b, &mut sink),
                    (false, true, 2) => tile::<4, 2, false>(&ctx, bases, row, b, &mut sink),
                    (false, true, _) => tile::<4, 1, false>(&ctx, bases, row, b, &mut sink),
                    (false, false, _) => {
                        for r in 0..pixels {
                            let (bases, row) = (&bases[r..], row + r);
                            match nb {
                                4 => tile::<1, 4, false>(&ctx, bases, row, b, &mut sink),
                                3 => tile::<1, 3, false>(&ctx, bases, row, b, &mut sink),
                                2 => tile::<1, 2, false>(&ctx, bases, row, b, &mut sink),
                                _ => tile::<1, 1, false>(&ctx, bases, row, b, &mut sink),
                            }
                        }
                    }
                }
                b += nb;
            }
        });
    }

    /// `R` rows x `NB` blocks of 16 channels, accumulated in registers over all of k,
    /// then stored through the sink (with `POOL`, the max of the `R` rows, as row `row`).
    ///
    /// # Safety
    /// As [`gemm()`]: AVX-512 F/BW/VL/VNNI present, `bases` and `row` within the checked
    /// source and sink, `block + NB` blocks within the packed weights.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn tile<const R: usize, const NB: usize, const POOL: bool>(
        ctx: &Ctx<'_>,
        bases: &[usize],
        row: usize,
        block: usize,
        sink: &mut Sink<'_>,
    ) {
        let w = ctx.w;
        let groups = w.k_padded / 4;
        let mut acc = [[_mm512_setzero_si512(); NB]; R];
        let w_ptr = w.packed.as_ptr();
        let mut g = 0;
        for segment in ctx.runs.offsets() {
            for s in 0..ctx.runs.len / 4 {
                let mut wv = [_mm512_setzero_si512(); NB];
                for (j, v) in wv.iter_mut().enumerate() {
                    let at = ((block + j) * groups + g) * BLOCK * 4;
                    *v = _mm512_loadu_si512(w_ptr.add(at) as *const _);
                }
                for (r, acc_row) in acc.iter_mut().enumerate() {
                    let at = bases[r] + segment + s * 4;
                    let four = (ctx.a.add(at) as *const i32).read_unaligned();
                    let av = _mm512_set1_epi32(four);
                    for j in 0..NB {
                        acc_row[j] = _mm512_dpbusd_epi32(acc_row[j], av, wv[j]);
                    }
                }
                g += 1;
            }
        }
        let stored = if POOL {
            let (first, rest) = acc.split_at_mut(1);
            for other in rest.iter() {
                for (best, v) in first[0].iter_mut().zip(other) {
                    *best = _mm512_max_epi32(*best, *v);
                }
            }
            1
        } else {
            R
        };
        for j in 0..NB {
            let first = (block + j) * BLOCK;
            let width = BLOCK.min(w.n - first);
            let mask: __mmask16 = if width == BLOCK {
                0xFFFF
            } else {
                (1u16 << width) - 1
            };
            match sink {
                Sink::Int32(c) => {
                    for (r, acc_row) in acc.iter().enumerate().take(stored) {
                        let out = c.as_mut_ptr().add((row + r) * w.n + first);
                        _mm512_mask_storeu_epi32(out as *mut _, mask, acc_row[j]);
                    }
                }
                Sink::Requant { requant, out } => {
                    let offset = _mm512_maskz_loadu_epi32(
                        mask,
                        requant.offset.as_ptr().add(first) as *const _,
                    );
                    let multiplier =
                        _mm512_maskz_loadu_ps(mask, requant.multiplier.as_ptr().add(first));
                    let zero_point = _mm512_set1_ps(requant.zero_point);
                    let (low, high) = (_mm512_set1_ps(requant.low), _mm512_set1_ps(255.0));
                    for (r, acc_row) in acc.iter().enumerate().take(stored) {
                        let sum = _mm512_add_epi32(acc_row[j], offset);
                        let scaled = _mm512_mul_ps(_mm512_cvtepi32_ps(sum), multiplier);
                        let rounded = _mm512_roundscale_ps::<
                            { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
                        >(scaled);
                        // max(x, low) as the scalar path: NaN in x becomes `low`.
                        let clamped = _mm512_min_ps(
                            _mm512_max_ps(_mm512_add_ps(rounded, zero_point), low),
                            high,
                        );
                        let bytes = _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(clamped));
                        let dst = out.as_mut_ptr().add((row + r) * w.n + first);
                        _mm_mask_storeu_epi8(dst as *mut _, mask, bytes);
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{PackedWeights, Runs, Sink, Source, AVX2_BLOCK};
    use crate::nn::geometry::{for_each_tile, TILE_ROWS as ROWS};

    /// Blocks of 8 channels per tile: 4 x 2 accumulators, 4 weights and 2 activation
    /// registers fill the 16 ymm registers.
    const BLOCKS: usize = 2;

    struct Ctx<'a> {
        a: *const u8,
        runs: Runs,
        w: &'a PackedWeights,
    }

    /// The int8 GEMM with AVX2 (bytes widened to i16, `vpmaddwd`: exact).
    ///
    /// # Safety
    /// The CPU must have AVX2 (`Kernel::Avx2` is only detected where it does; the safe
    /// `gemm` re-checks before calling). `source` and `sink` must have been bounds-checked
    /// for `m` rows and `w` (the safe `gemm` does): the tiles read and write through raw
    /// pointers without further checks.
    #[target_feature(enable = "avx2")]
    pub unsafe fn gemm(source: Source<'_>, m: usize, w: &PackedWeights, mut sink: Sink<'_>) {
        let ctx = Ctx {
            a: source.bytes().as_ptr(),
            runs: source.runs(w),
            w,
        };
        let blocks = w.n.div_ceil(AVX2_BLOCK);
        let pooled = source.pool2().is_some();
        let base = |row| source.row_base(row);
        for_each_tile(m, source.pool2(), base, |row, bases, pixels| {
            let mut b = 0;
            while b < blocks {
                let nb = BLOCKS.min(blocks - b);
                match (pooled, pixels == ROWS, nb == BLOCKS) {
                    (true, _, true) => tile::<4, 2, true>(&ctx, bases, row, b, &mut sink),
                    (true, _, false) => tile::<4, 1, true>(&ctx, bases, row, b, &mut sink),
                    (false, true, true) => tile::<4, 2, false>(&ctx, bases, row, b, &mut sink),
                    (false, true, false) => tile::<4, 1, false>(&ctx, bases, row, b, &mut sink),
                    (false, false, _) => {
                        for r in 0..pixels {
                            let (bases, row) = (&bases[r..], row + r);
                            match nb {
                                2 => tile::<1, 2, false>(&ctx, bases, row, b, &mut sink),
                                _ => tile::<1, 1, false>(&ctx, bases, row, b, &mut sink),
                            }
                        }
                    }
                }
                b += nb;
            }
        });
    }

    /// `R` rows x `NB` blocks of 8 channels: each 4-byte group of a row is split into
    /// the zero-extended pairs (a0, a1) and (a2, a3), multiplied with the widened weight
    /// pairs and summed into int32 (`vpmaddwd`: exact, no saturation).
    ///
    /// # Safety
    /// As [`gemm()`]: AVX2 present, `bases` and `row` within the checked source and sink,
    /// `block + NB` blocks within the packed weights.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn tile<const R: usize, const NB: usize, const POOL: bool>(
        ctx: &Ctx<'_>,
        bases: &[usize],
        row: usize,
        block: usize,
        sink: &mut Sink<'_>,
    ) {
        let w = ctx.w;
        let groups = w.k_padded / 4;
        // Byte shuffles: (a0, 0, a1, 0) and (a2, 0, a3, 0) in every 32-bit lane.
        let low_pairs = _mm256_set1_epi32(0x8001_8000u32 as i32);
        let high_pairs = _mm256_set1_epi32(0x8003_8002u32 as i32);
        let mut acc = [[_mm256_setzero_si256(); NB]; R];
        let w_ptr = w.packed16.as_ptr();
        let mut g = 0;
        for segment in ctx.runs.offsets() {
            for s in 0..ctx.runs.len / 4 {
                let mut wv = [[_mm256_setzero_si256(); 2]; NB];
                for (j, v) in wv.iter_mut().enumerate() {
                    let at = ((block + j) * groups + g) * 2 * AVX2_BLOCK * 2;
                    v[0] = _mm256_loadu_si256(w_ptr.add(at) as *const _);
                    v[1] = _mm256_loadu_si256(w_ptr.add(at + AVX2_BLOCK * 2) as *const _);
                }
                for (r, acc_row) in acc.iter_mut().enumerate() {
                    let at = bases[r] + segment + s * 4;
                    let four = _mm256_set1_epi32((ctx.a.add(at) as *const i32).read_unaligned());
                    let lo = _mm256_shuffle_epi8(four, low_pairs);
                    let hi = _mm256_shuffle_epi8(four, high_pairs);
                    for (j, v) in acc_row.iter_mut().enumerate() {
                        *v = _mm256_add_epi32(*v, _mm256_madd_epi16(lo, wv[j][0]));
                        *v = _mm256_add_epi32(*v, _mm256_madd_epi16(hi, wv[j][1]));
                    }
                }
                g += 1;
            }
        }
        let stored = if POOL {
            let (first, rest) = acc.split_at_mut(1);
            for other in rest.iter() {
                for (best, v) in first[0].iter_mut().zip(other) {
                    *best = _mm256_max_epi32(*best, *v);
                }
            }
            1
        } else {
            R
        };
        for j in 0..NB {
            let first = (block + j) * AVX2_BLOCK;
            let width = AVX2_BLOCK.min(w.n - first);
            match sink {
                Sink::Int32(c) => {
                    for (r, acc_row) in acc.iter().enumerate().take(stored) {
                        let mut lanes = [0i32; AVX2_BLOCK];
                        _mm256_storeu_si256(lanes.as_mut_ptr() as *mut _, acc_row[j]);
                        let at = (row + r) * w.n + first;
                        c[at..at + width].copy_from_slice(&lanes[..width]);
                    }
                }
                Sink::Requant { requant, out } => {
                    // `Requant::byte` for 8 channels at once, with the same f32 operations
                    // in the same order (convert, multiply, round half to even, add, max,
                    // min, truncate), so the bytes are bit-identical (tested). A partial
                    // block goes through 8-lane buffers (AVX2 has no masked byte store).
                    let (offset, multiplier) = if width == AVX2_BLOCK {
                        let offset = requant.offset[first..first + width].as_ptr();
                        let multiplier = requant.multiplier[first..first + width].as_ptr();
                        (
                            _mm256_loadu_si256(offset as *const _),
                            _mm256_loadu_ps(multiplier),
                        )
                    } else {
                        let mut offset = [0i32; AVX2_BLOCK];
                        let mut multiplier = [0f32; AVX2_BLOCK];
                        offset[..width].copy_from_slice(&requant.offset[first..first + width]);
                        multiplier[..width]
                            .copy_from_slice(&requant.multiplier[first..first + width]);
                        (
                            _mm256_loadu_si256(offset.as_ptr() as *const _),
                            _mm256_loadu_ps(multiplier.as_ptr()),
                        )
                    };
                    let zero_point = _mm256_set1_ps(requant.zero_point);
                    let (low, high) = (_mm256_set1_ps(requant.low), _mm256_set1_ps(255.0));
                    for (r, acc_row) in acc.iter().enumerate().take(stored) {
                        let sum = _mm256_add_epi32(acc_row[j], offset);
                        let scaled = _mm256_mul_ps(_mm256_cvtepi32_ps(sum), multiplier);
                        let rounded = _mm256_round_ps::<
                            { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
                        >(scaled);
                        // max(x, low) as the scalar path: NaN in x becomes `low`.
                        let clamped = _mm256_min_ps(
                            _mm256_max_ps(_mm256_add_ps(rounded, zero_point), low),
                            high,
                        );
                        // 8 int32 in [0, 255] -> 8 bytes (the saturating packs change nothing).
                        let ints = _mm256_cvttps_epi32(clamped);
                        let words = _mm_packus_epi32(
                            _mm256_castsi256_si128(ints),
                            _mm256_extracti128_si256::<1>(ints),
                        );
                        let bytes = _mm_packus_epi16(words, words);
                        let at = (row + r) * w.n + first;
                        if width == AVX2_BLOCK {
                            _mm_storel_epi64(out.as_mut_ptr().add(at) as *mut _, bytes);
                        } else {
                            let mut buf = [0u8; 16];
                            _mm_storeu_si128(buf.as_mut_ptr() as *mut _, bytes);
                            out[at..at + width].copy_from_slice(&buf[..width]);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny deterministic generator, so the test covers the full byte ranges.
    fn bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (s >> 56) as u8
            })
            .collect()
    }

    fn weights(n: usize, k: usize) -> Vec<i8> {
        let mut w: Vec<i8> = bytes(n * k, 2)
            .into_iter()
            .map(|b| (b as i8).max(-127))
            .collect();
        w[0] = -127;
        w
    }

    fn kernels() -> Vec<Kernel> {
        Kernel::available()
    }

    #[test]
    fn simd_and_portable_agree_exactly() {
        // Shapes with row, block and k tails; extremes (255 x -127) included.
        let shapes: [(usize, usize, usize); 6] = [
            (1, 1, 1),
            (5, 17, 9),
            (9, 64, 288),
            (4, 64, 576),
            (7, 10, 64),
            (13, 33, 13),
        ];
        for (m, n, k) in shapes {
            let k_padded = k.div_ceil(4) * 4;
            let mut a = bytes(m * k_padded, 1);
            a[0] = 255;
            let w = weights(n, k);
            let packed = PackedWeights::new(&w, n, k);
            let mut want = vec![0; m * n];
            gemm_u8i8(Kernel::Portable, &a, m, &packed, &mut want);
            // The portable result is the textbook sum.
            assert_eq!(
                want[0],
                (0..k).map(|i| a[i] as i32 * w[i] as i32).sum::<i32>()
            );
            for kernel in kernels() {
                let mut got = vec![0; m * n];
                gemm_u8i8(kernel, &a, m, &packed, &mut got);
                assert_eq!(got, want, "{kernel:?} m {m} n {n} k {k}");
            }
        }
    }

    /// The SIMD epilogues round half to even, clamp at `low` and 255, map NaN to `low`
    /// and store a partial block as `Requant::byte` and the sink's bounds say: sums
    /// chosen to land on exact halves, below the zero point and past 255, over 11
    /// channels (one full AVX2 block and a partial one, whose stores must not spill into
    /// the next row's first channels or past the buffer).
    #[test]
    fn fused_requant_rounds_ties_to_even_and_clamps_like_the_definition() {
        let (m, n, k) = (5, 11, 4);
        // Row r's only nonzero byte is 1 + r; channel j's only nonzero weight is 5 - j,
        // so sum = (1 + r) * (5 - j) in -25..=25: positive in channels 0..5, negative
        // (clamped at `low`) in the partial block 8..11 but for channel 10's offset.
        let mut a = vec![0u8; m * k];
        for r in 0..m {
            a[r * k] = 1 + r as u8;
        }
        let mut w = vec![0i8; n * k];
        for j in 0..n {
            w[j * k] = 5 - j as i8;
        }
        let packed = PackedWeights::new(&w, n, k);
        let requant = Requant {
            offset: (0..n as i32)
                .map(|j| match j {
                    5 => 0,
                    10 => 600,
                    _ => j % 2,
                })
                .collect(),
            // 0.5 and 1.5 put odd sums on exact halves; 0.5 * 575 lies past 255; channel
            // 5's 0 * infinity is NaN.
            multiplier: (0..n)
                .map(|j| match j {
                    5 => f32::INFINITY,
                    _ if j % 3 == 0 => 1.5,
                    _ => 0.5,
                })
                .collect(),
            zero_point: 3.0,
            low: 3.0,
        };
        let source = Source::Rows { a: &a, stride: k };
        let mut sums = vec![0; m * n];
        gemm(Kernel::Portable, source, m, &packed, Sink::Int32(&mut sums));
        let want: Vec<u8> = (0..m * n).map(|i| requant.byte(i % n, sums[i])).collect();
        // The cases are there: ties both ways, NaN, the low clamp (in the partial block)
        // and the high one, and next rows' first channels unlike what a spill would write.
        let scaled: Vec<f32> = (0..m * n)
            .map(|i| (sums[i] + requant.offset[i % n]) as f32 * requant.multiplier[i % n])
            .collect();
        assert!(scaled.contains(&2.5) && scaled.contains(&1.5));
        assert_eq!((want[1], want[2]), (3 + 2, 3 + 2), "2.5 and 1.5 round to 2");
        assert!(scaled[5].is_nan() && want[5] == 3);
        assert!(want[8] == 3 && want[10] == 255);
        assert!((1..m).all(|r| want[r * n] != 3));
        for kernel in kernels() {
            // A guard past the end catches a store beyond the last row.
            let mut out = vec![0xAAu8; m * n + 16];
            let sink = Sink::Requant {
                requant: &requant,
                out: &mut out[..m * n],
            };
            gemm(kernel, source, m, &packed, sink);
            assert_eq!(out[..m * n], want, "{kernel:?}");
            assert!(
                out[m * n..].iter().all(|&b| b == 0xAA),
                "{kernel:?} wrote past the end"
            );
        }
    }

    /// Reading a conv's receptive fields in place gives the im2col sums, and the fused
    /// requantization gives the scalar definition's bytes, with every kernel.
    #[test]
    fn in_place_conv_and_fused_requant_match_the_definitions() {
        let g = ConvGeometry {
            h: 9,
            w: 7,
            c: 4,
            kh: 3,
            kw: 3,
            stride_y: 2,
            stride_x: 2,
            oh: 4,
            ow: 3,
            pool2: false,
        };
        let (batch, n) = (3, 20);
        let k = g.kh * g.kw * g.c;
        let x = bytes(batch * g.h * g.w * g.c, 5);
        let w = weights(n, k);
        let packed = PackedWeights::new(&w, n, k);
        // im2col by hand.
        let m = batch * g.oh * g.ow;
        let mut patches = Vec::new();
        for b in 0..batch {
            for oy in 0..g.oh {
                for ox in 0..g.ow {
                    for ky in 0..g.kh {
                        for kx in 0..g.kw {
                            let (y, xx) = (oy * g.stride_y + ky, ox * g.stride_x + kx);
                            let at = ((b * g.h + y) * g.w + xx) * g.c;
                            patches.extend_from_slice(&x[at..at + g.c]);
                        }
                    }
                }
            }
        }
        let mut want = vec![0; m * n];
        gemm_u8i8(Kernel::Portable, &patches, m, &packed, &mut want);
        let requant = Requant {
            offset: (0..n as i32).map(|j| j * 997 - 9000).collect(),
            multiplier: (0..n).map(|j| 0.0004 + j as f32 * 0.0001).collect(),
            zero_point: 7.0,
            low: 7.0,
        };
        let want_bytes: Vec<u8> = want
            .iter()
            .enumerate()
            .map(|(i, &s)| requant.byte(i % n, s))
            .collect();
        assert!(want_bytes.contains(&7) && want_bytes.iter().any(|&b| b > 7));
        for kernel in kernels() {
            let source = Source::Conv { x: &x, geometry: g };
            let mut sums = vec![0; m * n];
            gemm(kernel, source, m, &packed, Sink::Int32(&mut sums));
            assert_eq!(sums, want, "{kernel:?} sums");
            let mut out = vec![0u8; m * n];
            let sink = Sink::Requant {
                requant: &requant,
                out: &mut out,
            };
            gemm(kernel, source, m, &packed, sink);
            assert_eq!(out, want_bytes, "{kernel:?} bytes");
            // Fused 2x2 max-pool: the max of each window's sums (the odd last column of
            // the 4 x 3 output is not covered by any window).
            let pooled = Source::Conv {
                x: &x,
                geometry: ConvGeometry { pool2: true, ..g },
            };
            let windows = batch * 2;
            let mut got = vec![0; windows * n];
            gemm(kernel, pooled, windows, &packed, Sink::Int32(&mut got));
            let mut want_pooled = Vec::new();
            for b in 0..batch {
                for py in 0..2 {
                    let pixel = |y: usize, x: usize| (b * g.oh + y) * g.ow + x;
                    let p = [
                        pixel(2 * py, 0),
                        pixel(2 * py, 1),
                        pixel(2 * py + 1, 0),
                        pixel(2 * py + 1, 1),
                    ];
                    for j in 0..n {
                        want_pooled.push(p.iter().map(|&r| want[r * n + j]).max().unwrap());
                    }
                }
            }
            assert_eq!(got, want_pooled, "{kernel:?} pooled");
            // And requantized: the pooled sums' bytes (the multipliers are positive, so
            // the max of the sums gives the max of the bytes).
            let mut bytes = vec![0u8; windows * n];
            let sink = Sink::Requant {
                requant: &requant,
                out: &mut bytes,
            };
            gemm(kernel, pooled, windows, &packed, sink);
            let want_bytes: Vec<u8> = want_pooled
                .iter()
                .enumerate()
                .map(|(i, &s)| requant.byte(i % n, s))
                .collect();
            assert_eq!(bytes, want_bytes, "{kernel:?} pooled bytes");
        }
    }
}
