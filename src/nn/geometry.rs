//! Where a convolution's receptive fields lie in NHWC memory, for kernels that read them
//! in place instead of copying them out (im2col), and the zero-padded frame that lets a
//! same-padded convolution be read the same way.

use super::plan::ConvOp;

/// A valid (unpadded) convolution's geometry over NHWC values, for kernels that read
/// receptive fields in place (the int8 GEMM's `Source::Conv`, the fp32 inference kernel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Input channels.
    pub c: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Vertical step.
    pub stride_y: usize,
    /// Horizontal step.
    pub stride_x: usize,
    /// Output height.
    pub oh: usize,
    /// Output width.
    pub ow: usize,
    /// A 2x2, stride-2 max-pool follows, fused: GEMM row `r` is pool window `r`, the
    /// max of its four output pixels (the conv outputs no window covers are skipped).
    pub pool2: bool,
}

impl ConvGeometry {
    /// Offset (in elements) of output pixel `row`'s receptive field (its top-left input pixel).
    #[inline(always)]
    pub fn row_base(&self, row: usize) -> usize {
        let per_image = self.oh * self.ow;
        let (n, p) = (row / per_image, row % per_image);
        let (oy, ox) = (p / self.ow, p % self.ow);
        self.pixel_base(n, oy, ox)
    }

    /// Offset of output pixel `(oy, ox)` of image `n`'s receptive field.
    #[inline(always)]
    pub fn pixel_base(&self, n: usize, oy: usize, ox: usize) -> usize {
        n * self.h * self.w * self.c + (oy * self.stride_y * self.w + ox * self.stride_x) * self.c
    }

    /// The contiguous runs one receptive field is read as: one per kernel row.
    pub fn runs(&self) -> Runs {
        Runs {
            count: self.kh,
            step: self.w * self.c,
            len: self.kw * self.c,
        }
    }

    /// One past the last element that `m` GEMM rows (pool windows with `pool2`) read:
    /// what the input buffer must hold.
    pub fn end(&self, m: usize) -> usize {
        if m == 0 {
            return 0;
        }
        let last = if self.pool2 {
            self.window_bases(m - 1)[3]
        } else {
            self.row_base(m - 1)
        };
        let runs = self.runs();
        last + (runs.count - 1) * runs.step + runs.len
    }

    /// The four output pixels' bases of pool window `row` (see `pool2`).
    #[inline(always)]
    pub fn window_bases(&self, row: usize) -> [usize; 4] {
        let (ph, pw) = (self.oh / 2, self.ow / 2);
        let (n, p) = (row / (ph * pw), row % (ph * pw));
        let (oy, ox) = (2 * (p / pw), 2 * (p % pw));
        [
            self.pixel_base(n, oy, ox),
            self.pixel_base(n, oy, ox + 1),
            self.pixel_base(n, oy + 1, ox),
            self.pixel_base(n, oy + 1, ox + 1),
        ]
    }
}

/// The contiguous runs of values one GEMM row reads: `count` runs of `len` values, the
/// `i`-th at `i * step` from the row's base (a plain row is one run).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Runs {
    /// Runs per row.
    pub count: usize,
    /// Distance between run starts.
    pub step: usize,
    /// Values per run.
    pub len: usize,
}

impl Runs {
    /// The runs' offsets from the row base.
    #[inline(always)]
    pub fn offsets(self) -> impl Iterator<Item = usize> {
        (0..self.count).map(move |i| i * self.step)
    }
}

/// The input extent a conv's windows cover: `(oh - 1) * stride + kernel` per axis.
/// Larger than the input under same padding, also when all the padding falls at the
/// bottom/right (so `pad` is `(0, 0)`).
pub fn covered_extent(conv: &ConvOp) -> (usize, usize) {
    (
        (conv.output[0] - 1) * conv.stride + conv.kernel,
        (conv.output[1] - 1) * conv.stride + conv.kernel,
    )
}

/// Whether a conv needs [`frame`] before its windows can be read in place.
pub fn needs_frame(conv: &ConvOp) -> bool {
    let (ph, pw) = covered_extent(conv);
    conv.pad != (0, 0) || ph > conv.input[0] || pw > conv.input[1]
}

/// Copies `batch` NHWC images into `out`, each centred in a frame of [`covered_extent`]
/// filled with `fill(b)` (the value of real 0.0 for image `b`), so every window of the
/// same-padded conv lies inside it. Returns the frame's height and width.
pub fn frame<T: Copy + Default>(
    conv: &ConvOp,
    x: &[T],
    batch: usize,
    fill: impl Fn(usize) -> T,
    out: &mut Vec<T>,
) -> (usize, usize) {
    let [h, w, c] = conv.input;
    let (ph, pw) = covered_extent(conv);
    let (top, left) = conv.pad;
    out.resize(batch * ph * pw * c, T::default());
    for b in 0..batch {
        let dst = &mut out[b * ph * pw * c..(b + 1) * ph * pw * c];
        dst.fill(fill(b));
        for y in 0..h.min(ph - top) {
            let src = &x[(b * h + y) * w * c..][..w.min(pw - left) * c];
            dst[((top + y) * pw + left) * c..][..src.len()].copy_from_slice(src);
        }
    }
    (ph, pw)
}

/// Pixels per register tile: 4 consecutive output rows, or the 4 pixels of a pool window.
pub const TILE_ROWS: usize = 4;

/// Walks `m` GEMM output rows in register tiles, the loop every in-place kernel shares:
/// `tile(row, bases, pixels)` gets the tile's first output row, the input offsets of its
/// pixels and how many there are. Plain rows come [`TILE_ROWS`] at a time (fewer at the
/// end, offsets from `base`); with `pooled`, output row `r` is pool window `r`, always
/// four pixels.
#[inline(always)]
pub fn for_each_tile(
    m: usize,
    pooled: Option<&ConvGeometry>,
    base: impl Fn(usize) -> usize,
    mut tile: impl FnMut(usize, &[usize; TILE_ROWS], usize),
) {
    let mut row = 0;
    while row < m {
        match pooled {
            Some(g) => {
                tile(row, &g.window_bases(row), TILE_ROWS);
                row += 1;
            }
            None => {
                let count = TILE_ROWS.min(m - row);
                let mut bases = [0usize; TILE_ROWS];
                for (r, b) in bases.iter_mut().enumerate().take(count) {
                    *b = base(row + r);
                }
                tile(row, &bases, count);
                row += count;
            }
        }
    }
}
