//! The int8 GEMM: uint8 activations x int8 weights, accumulated exactly in int32.
//!
//! Written with `std::arch` because no well-kept crate fits: candle's quantized matmul
//! uses GGML blocks with dynamically quantized activations and has no quantized conv, and
//! the `gemm` crate has no integer kernels. The AVX-512 VNNI path (`vpdpbusd`, 64
//! multiply-adds per instruction) is chosen at run time; the portable path computes the
//! same sums in plain Rust. Integer sums are exact, so the two agree bit for bit (tested).

/// Which instruction set computes the int8 dot products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Plain Rust (any CPU).
    Portable,
    /// AVX-512 VNNI `vpdpbusd` (x86-64 with avx512f + avx512vnni).
    Avx512Vnni,
}

impl Kernel {
    /// The fastest kernel this CPU supports.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512vnni")
            {
                return Kernel::Avx512Vnni;
            }
        }
        Kernel::Portable
    }

    /// Name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Portable => "portable",
            Kernel::Avx512Vnni => "avx512-vnni",
        }
    }
}

/// Output channels per packed block (one 512-bit register of int32 lanes).
const BLOCK: usize = 16;

/// int8 weights `[n, k]` packed for the kernels, plus per-row sums for zero points.
#[derive(Debug, Clone)]
pub struct PackedWeights {
    /// Output channels.
    pub n: usize,
    /// Reduction length.
    pub k: usize,
    /// `k` rounded up to a multiple of 4 (the row stride activations must have).
    pub k_padded: usize,
    /// Row-major `[n, k]` copy (portable path).
    raw: Vec<i8>,
    /// `[n / 16][k_padded / 4][16][4]`: 4 consecutive k of 16 channels per 64 bytes.
    packed: Vec<i8>,
    /// `sum_k w[n][k]`, to subtract the activation zero point's contribution.
    pub sums: Vec<i32>,
}

impl PackedWeights {
    /// Packs row-major `[n, k]` weights.
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
            sums,
        }
    }
}

/// `c[m][n] = sum_k a[m][k] * w[n][k]` for `m` rows of `a` (row stride `w.k_padded`).
///
/// Bytes of `a` past `k` in each row may hold anything: the packed weights are zero there.
pub fn gemm_u8i8(kernel: Kernel, a: &[u8], m: usize, w: &PackedWeights, c: &mut [i32]) {
    assert!(a.len() >= m * w.k_padded, "activation buffer too small");
    assert!(c.len() >= m * w.n, "output buffer too small");
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Vnni => {
            assert!(
                Kernel::detect() == Kernel::Avx512Vnni,
                "CPU lacks AVX-512 VNNI"
            );
            // SAFETY: the CPU supports the features (checked above) and every load and
            // store stays inside the buffers checked above.
            unsafe { vnni::gemm(a, m, w, c) }
        }
        _ => portable(a, m, w, c),
    }
}

fn portable(a: &[u8], m: usize, w: &PackedWeights, c: &mut [i32]) {
    for row in 0..m {
        let x = &a[row * w.k_padded..row * w.k_padded + w.k];
        for n in 0..w.n {
            let wr = &w.raw[n * w.k..(n + 1) * w.k];
            c[row * w.n + n] = x.iter().zip(wr).map(|(&p, &q)| p as i32 * q as i32).sum();
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use std::arch::x86_64::*;

    use super::{PackedWeights, BLOCK};

    /// Rows per tile: each row reuses the same weight registers.
    const ROWS: usize = 4;

    #[target_feature(enable = "avx512f,avx512vnni")]
    pub unsafe fn gemm(a: &[u8], m: usize, w: &PackedWeights, c: &mut [i32]) {
        let blocks = w.n.div_ceil(BLOCK);
        let mut row = 0;
        while row < m {
            let rows = ROWS.min(m - row);
            let mut b = 0;
            while b < blocks {
                let nb = 4.min(blocks - b);
                if rows == ROWS && nb == 4 {
                    tile::<ROWS, 4>(a, row, b, w, c);
                } else if rows == ROWS {
                    tile::<ROWS, 1>(a, row, b, w, c);
                    b += 1;
                    continue;
                } else if nb == 4 {
                    for r in 0..rows {
                        tile::<1, 4>(a, row + r, b, w, c);
                    }
                } else {
                    for r in 0..rows {
                        tile::<1, 1>(a, row + r, b, w, c);
                    }
                    b += 1;
                    continue;
                }
                b += nb;
            }
            row += rows;
        }
    }

    /// `R` rows x `NB` blocks of 16 channels, accumulated in registers over all of k.
    #[inline]
    #[target_feature(enable = "avx512f,avx512vnni")]
    unsafe fn tile<const R: usize, const NB: usize>(
        a: &[u8],
        row: usize,
        block: usize,
        w: &PackedWeights,
        c: &mut [i32],
    ) {
        let groups = w.k_padded / 4;
        let mut acc = [[_mm512_setzero_si512(); NB]; R];
        let a_ptr = a.as_ptr();
        let w_ptr = w.packed.as_ptr();
        for g in 0..groups {
            let mut wv = [_mm512_setzero_si512(); NB];
            for (j, v) in wv.iter_mut().enumerate() {
                let at = ((block + j) * groups + g) * BLOCK * 4;
                *v = _mm512_loadu_si512(w_ptr.add(at) as *const _);
            }
            for (r, acc_row) in acc.iter_mut().enumerate() {
                let at = (row + r) * w.k_padded + g * 4;
                let four = (a_ptr.add(at) as *const i32).read_unaligned();
                let av = _mm512_set1_epi32(four);
                for j in 0..NB {
                    acc_row[j] = _mm512_dpbusd_epi32(acc_row[j], av, wv[j]);
                }
            }
        }
        for (r, acc_row) in acc.iter().enumerate() {
            for (j, v) in acc_row.iter().enumerate() {
                let first = (block + j) * BLOCK;
                let width = BLOCK.min(w.n - first);
                let mut lanes = [0i32; BLOCK];
                _mm512_storeu_si512(lanes.as_mut_ptr() as *mut _, *v);
                let out = (row + r) * w.n + first;
                c[out..out + width].copy_from_slice(&lanes[..width]);
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
            let w: Vec<i8> = bytes(n * k, 2)
                .into_iter()
                .map(|b| (b as i8).max(-127))
                .collect();
            let mut w = w;
            w[0] = -127;
            let packed = PackedWeights::new(&w, n, k);
            let mut want = vec![0; m * n];
            gemm_u8i8(Kernel::Portable, &a, m, &packed, &mut want);
            // The portable result is the textbook sum.
            assert_eq!(
                want[0],
                (0..k).map(|i| a[i] as i32 * w[i] as i32).sum::<i32>()
            );
            if Kernel::detect() == Kernel::Avx512Vnni {
                let mut got = vec![0; m * n];
                gemm_u8i8(Kernel::Avx512Vnni, &a, m, &packed, &mut got);
                assert_eq!(got, want, "m {m} n {n} k {k}");
            }
        }
    }
}
