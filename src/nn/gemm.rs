//! A safe, bounds-checked face on the `gemm` crate (the f32 GEMM candle uses on CPU).
//!
//! Views carry explicit strides so transposes cost nothing; every call is single-threaded
//! because parallelism comes from splitting the batch across threads (see `nn::executor`).

/// A read-only matrix view over a slice with arbitrary strides.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major `rows x cols` view.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        MatRef {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transposed view (no copy).
    pub fn t(self) -> Self {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    /// Rows `start..start + count` of this view (no copy).
    ///
    /// # Panics
    /// If `start + count` is more than the view's rows.
    pub fn rows(self, start: usize, count: usize) -> Self {
        assert!(start + count <= self.rows, "row range out of the view");
        MatRef {
            data: &self.data[(start * self.row_stride).min(self.data.len())..],
            rows: count,
            ..self
        }
    }

    fn check(&self) {
        if self.rows > 0 && self.cols > 0 {
            let last = (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride;
            assert!(last < self.data.len(), "matrix view out of bounds");
        }
    }
}

/// `dst = a * b` (or `dst += a * b` when `accumulate`), `dst` row-major `a.rows x b.cols`.
///
/// # Panics
/// When the shapes disagree or a view runs past its slice: both are programming errors.
pub fn matmul(dst: &mut [f32], a: MatRef<'_>, b: MatRef<'_>, accumulate: bool) {
    matmul_strided(dst, false, a, b, accumulate);
}

/// `dst = (a * b)^T` (or `+=`), `dst` row-major `b.cols x a.rows`: the product written
/// transposed, at no extra cost. Lets a caller pick the operand order the `gemm` crate
/// packs least (it copies a left operand that is not column-major into a panel).
///
/// # Panics
/// As [`matmul`].
pub fn matmul_transposed(dst: &mut [f32], a: MatRef<'_>, b: MatRef<'_>, accumulate: bool) {
    matmul_strided(dst, true, a, b, accumulate);
}

fn matmul_strided(
    dst: &mut [f32],
    transposed: bool,
    a: MatRef<'_>,
    b: MatRef<'_>,
    accumulate: bool,
) {
    assert_eq!(a.cols, b.rows, "inner dimensions differ");
    let (m, n, k) = (a.rows, b.cols, a.cols);
    assert!(dst.len() >= m * n, "destination too small");
    a.check();
    b.check();
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    let (dst_col_stride, dst_row_stride) = if transposed { (m, 1) } else { (1, n) };
    // SAFETY: the asserts above keep every index the kernel touches inside the slices:
    // dst is m x n row-major (n x m when transposed), and a / b were checked against
    // their strides and lengths.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_col_stride as isize,
            dst_row_stride as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row range of a row-major view and of a transposed one reads the right values.
    #[test]
    fn row_ranges_of_plain_and_transposed_views() {
        let data: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let plain = MatRef::new(&data, 4, 3); // rows [0 1 2] [3 4 5] [6 7 8] [9 10 11]
        let ones = [1.0f32; 3];
        let mut dst = [0.0f32; 2];
        // Row sums of rows 1..3: 3+4+5, 6+7+8.
        matmul(&mut dst, plain.rows(1, 2), MatRef::new(&ones, 3, 1), false);
        assert_eq!(dst, [12.0, 21.0]);
        // The transposed view is 3 x 4 (columns of `plain`); its rows 1..3 are columns 1
        // and 2: 1+4+7+10, 2+5+8+11.
        let ones = [1.0f32; 4];
        matmul(
            &mut dst,
            plain.t().rows(1, 2),
            MatRef::new(&ones, 4, 1),
            false,
        );
        assert_eq!(dst, [22.0, 26.0]);
    }

    fn naive(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        out
    }

    #[test]
    fn matches_naive_product_including_transposes() {
        let (m, n, k) = (7, 5, 3);
        let a: Vec<f32> = (0..m * k).map(|i| i as f32 * 0.5 - 3.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 4) as f32 - 1.0).collect();
        let want = naive(&a, &b, m, n, k);
        let mut got = vec![0.0; m * n];
        matmul(
            &mut got,
            MatRef::new(&a, m, k),
            MatRef::new(&b, k, n),
            false,
        );
        assert_eq!(got, want);
        // b stored transposed (n x k) and viewed through .t()
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        let mut got_t = vec![0.0; m * n];
        matmul(
            &mut got_t,
            MatRef::new(&a, m, k),
            MatRef::new(&bt, n, k).t(),
            false,
        );
        assert_eq!(got_t, want);
        matmul(
            &mut got_t,
            MatRef::new(&a, m, k),
            MatRef::new(&b, k, n),
            true,
        );
        let doubled: Vec<f32> = want.iter().map(|v| v * 2.0).collect();
        assert_eq!(got_t, doubled);
        // The product written transposed: n x m.
        let mut got_tt = vec![0.0; m * n];
        matmul_transposed(
            &mut got_tt,
            MatRef::new(&a, m, k),
            MatRef::new(&b, k, n),
            false,
        );
        for i in 0..m {
            for j in 0..n {
                assert_eq!(got_tt[j * m + i], want[i * n + j]);
            }
        }
    }
}
