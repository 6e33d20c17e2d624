//! Calibration: the range of each conv/dense input over sample images, and the choice of
//! a uint8 scale for it (min/max, a percentile, or the clip that minimizes squared error).

use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::QuantConfig;
use crate::data::Split;
use crate::nn::plan::Op;
use crate::nn::{Executor, Plan};
use crate::runtime::int8::ActQuant;
use crate::Result;

/// How an activation range becomes a scale.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CalibMethod {
    /// The observed minimum and maximum.
    MinMax,
    /// Clip at this percentile of the observed values (e.g. 99.99).
    Percentile(f32),
    /// The clip (searched over 100 candidates) minimizing the squared rounding error.
    Mse,
    /// The clip minimizing the KL divergence between the value histogram and its
    /// quantized version (TensorRT's entropy calibration).
    Entropy,
}

impl CalibMethod {
    /// Name for reports.
    pub fn name(self) -> String {
        match self {
            CalibMethod::MinMax => "minmax".into(),
            CalibMethod::Percentile(p) => format!("percentile {p}"),
            CalibMethod::Mse => "mse".into(),
            CalibMethod::Entropy => "entropy".into(),
        }
    }
}

/// What calibration saw at one layer input.
#[derive(Debug, Clone, Default)]
pub struct Range {
    /// Smallest value.
    pub min: f32,
    /// Largest value.
    pub max: f32,
    /// A sample of the values (at most [`KEEP`]), for percentile and mse.
    kept: Vec<f32>,
    seen: usize,
}

/// Values kept per layer for percentile / mse (a deterministic stride sample).
const KEEP: usize = 1 << 20;

impl Range {
    /// The kept values.
    pub fn values(&self) -> &[f32] {
        &self.kept
    }
}

/// The calibration images used: `config.samples` of `count`, picked by `config.seed`.
pub fn sample_indices(count: usize, config: &QuantConfig) -> Vec<usize> {
    let mut order: Vec<usize> = (0..count).collect();
    order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(config.seed));
    order.truncate(config.samples);
    order
}

/// Fewer distinct calibration images than this is warned about: ranges from a handful of
/// images do not describe real inputs (TFLite's guide suggests ~100-500).
pub const MIN_DISTINCT_IMAGES: usize = 16;

/// What makes a calibration set unfit, in words: constant images, too few distinct
/// images, and layers whose observed input range is empty (the scale then falls back to
/// 1.0, see [`ActQuant::from_range`]) or is a single value. `names` are the conv/dense
/// weight names in op order, matching `ranges`.
///
/// A degenerate set can still give a model that agrees with fp32 *on that set*, which is
/// why the comparison is made on evaluation data when there is some.
pub fn calibration_warnings(
    calib: &Split,
    used: &[usize],
    ranges: &[Range],
    names: &[String],
) -> Vec<String> {
    let mut warnings = Vec::new();
    let len = calib.image_len();
    let image = |i: usize| &calib.images[i * len..(i + 1) * len];
    let constant = used
        .iter()
        .filter(|&&i| image(i).iter().all(|&p| p == image(i)[0]))
        .count();
    if constant > 0 && constant * 10 >= used.len() {
        warnings.push(format!(
            "{constant} of the {} calibration images are constant (every pixel the same value): calibrate on real, representative images",
            used.len()
        ));
    }
    let distinct: std::collections::HashSet<&[u8]> = used.iter().map(|&i| image(i)).collect();
    if distinct.len() < MIN_DISTINCT_IMAGES {
        warnings.push(format!(
            "only {} distinct calibration image(s) among {} used: activation ranges from so few do not describe real inputs; use a few hundred representative images (`--calib-samples`)",
            distinct.len(),
            used.len()
        ));
    }
    for (range, name) in ranges.iter().zip(names) {
        // `max <= min` (or NaN): the range is empty or a single value.
        if range.max.partial_cmp(&range.min) != Some(std::cmp::Ordering::Greater) {
            warnings.push(format!(
                "`{name}`: its input was the constant {} on every calibration image, so its activation scale fell back to 1.0 and real inputs will be rounded to a few levels",
                range.min
            ));
        }
    }
    warnings
}

/// Runs `config.samples` calibration images through the fp32 model; one range per
/// conv/dense layer, in op order, of that layer's input activations (f32, after
/// `preprocess` for the first layer). `params` are `plan`'s tensors in spec order;
/// `calib`'s images must have the plan's input shape ([`Split::check_shape`]).
///
/// # Errors
/// None today: it always returns `Ok` (the `Result` leaves room for checks of the data).
pub fn collect_ranges(
    plan: &Plan,
    params: &[Vec<f32>],
    calib: &Split,
    preprocess: &crate::data::Preprocess,
    config: &QuantConfig,
) -> Result<Vec<Range>> {
    let order = sample_indices(calib.count, config);
    let layer_ops: Vec<usize> = plan
        .ops
        .iter()
        .enumerate()
        .filter(|(_, op)| matches!(op, Op::Conv(_) | Op::Dense(_)))
        .map(|(i, _)| i)
        .collect();
    let mut ranges = vec![
        Range {
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
            ..Default::default()
        };
        layer_ops.len()
    ];
    let mut executor = Executor::new(plan, 1);
    let (mut x, mut labels) = (Vec::new(), Vec::new());
    for chunk in order.chunks(100) {
        calib.gather(chunk, preprocess, &mut x, &mut labels);
        let acts = executor.activations(params, &x, chunk.len());
        for (range, &op) in ranges.iter_mut().zip(&layer_ops) {
            let values = &acts[op][..chunk.len()
                * if op == 0 {
                    plan.input_len
                } else {
                    plan.out_lens[op - 1]
                }];
            for &v in values {
                range.min = range.min.min(v);
                range.max = range.max.max(v);
                range.seen += 1;
            }
            let stride = (values.len() * order.len() / chunk.len())
                .div_ceil(KEEP)
                .max(1);
            range.kept.extend(values.iter().step_by(stride));
        }
    }
    Ok(ranges)
}

/// Picks the uint8 mapping for one tensor.
pub fn choose(values: &[f32], min: f32, max: f32, method: CalibMethod) -> ActQuant {
    match method {
        CalibMethod::MinMax => ActQuant::from_range(min, max),
        CalibMethod::Percentile(p) => {
            let mut sorted = values.to_vec();
            sorted.sort_by(f32::total_cmp);
            if sorted.is_empty() {
                return ActQuant::from_range(min, max);
            }
            let at = |q: f32| {
                let i = ((q / 100.0) * (sorted.len() - 1) as f32).round() as usize;
                sorted[i.min(sorted.len() - 1)]
            };
            ActQuant::from_range(at(100.0 - p), at(p))
        }
        CalibMethod::Entropy => {
            let signed = min < 0.0;
            let top = if signed { max.max(-min) } else { max };
            let t = entropy_threshold(values, top, if signed { 127 } else { 255 });
            if signed {
                ActQuant::from_range(-t, t)
            } else {
                ActQuant::from_range(0.0, t)
            }
        }
        CalibMethod::Mse => {
            let mut best = (f64::INFINITY, ActQuant::from_range(min, max));
            for i in 1..=100 {
                let f = i as f32 / 100.0;
                let q = ActQuant::from_range(min * f, max * f);
                let err: f64 = values
                    .iter()
                    .map(|&v| {
                        let back = (q.quantize(v) as f32 - q.zero_point as f32) * q.scale;
                        ((v - back) as f64).powi(2)
                    })
                    .sum();
                if err < best.0 {
                    best = (err, q);
                }
            }
            best.1
        }
    }
}

/// Histogram bins for entropy calibration.
const BINS: usize = 2048;

/// The clip threshold in `(0, top]` whose `levels`-step quantization of the |value|
/// histogram loses the least information (smallest KL divergence).
fn entropy_threshold(values: &[f32], top: f32, levels: usize) -> f32 {
    if top <= 0.0 || values.is_empty() {
        return top.max(0.0);
    }
    let mut hist = vec![0f64; BINS];
    for &v in values {
        let bin = ((v.abs() / top) * BINS as f32) as usize;
        hist[bin.min(BINS - 1)] += 1.0;
    }
    let mut best = (f64::INFINITY, BINS);
    for end in (levels..=BINS).step_by(8) {
        // Reference: the first `end` bins, with everything beyond clipped into the last.
        let mut p = hist[..end].to_vec();
        p[end - 1] += hist[end..].iter().sum::<f64>();
        // Candidate: the same range merged into `levels` steps, spread back uniformly over
        // the bins that were non-empty.
        let mut q = vec![0f64; end];
        for level in 0..levels {
            let (lo, hi) = (
                level * end / levels,
                ((level + 1) * end / levels).max(level * end / levels + 1),
            );
            let hi = hi.min(end);
            let mass: f64 = hist[lo..hi].iter().sum();
            let nonzero = hist[lo..hi].iter().filter(|&&h| h > 0.0).count();
            if nonzero > 0 {
                for i in lo..hi {
                    if hist[i] > 0.0 {
                        q[i] = mass / nonzero as f64;
                    }
                }
            }
        }
        let (sp, sq): (f64, f64) = (p.iter().sum(), q.iter().sum());
        let mut kl = 0.0;
        for (a, b) in p.iter().zip(&q) {
            if *a > 0.0 {
                let (a, b) = (a / sp, (b / sq).max(1e-12));
                kl += a * (a / b).ln();
            }
        }
        if kl < best.0 {
            best = (kl, end);
        }
    }
    top * best.1 as f32 / BINS as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Round-trip error of a calibrated mapping is at most half a step inside its range.
    #[test]
    fn quantize_dequantize_round_trip_within_half_a_step() {
        let values: Vec<f32> = (0..1000).map(|i| i as f32 / 100.0 - 2.0).collect();
        let q = choose(&values, -2.0, 7.99, CalibMethod::MinMax);
        for &v in &values {
            let back = (q.quantize(v) as f32 - q.zero_point as f32) * q.scale;
            assert!((v - back).abs() <= 0.5 * q.scale + 1e-6, "{v} -> {back}");
        }
        // 0.0 is exactly representable (zero padding and ReLU depend on it).
        assert_eq!(
            (q.quantize(0.0) as f32 - q.zero_point as f32) * q.scale,
            0.0
        );
    }

    #[test]
    fn entropy_clips_a_long_tail() {
        // Mostly small values and a few huge ones: the entropy clip lands well below max.
        let mut values: Vec<f32> = (0..100_000).map(|i| (i % 100) as f32 / 100.0).collect();
        values.extend([50.0, 80.0, 100.0]);
        let q = choose(&values, 0.0, 100.0, CalibMethod::Entropy);
        assert!(q.scale * 255.0 < 50.0, "{q:?}");
        assert_eq!(q.zero_point, 0);
    }

    #[test]
    fn percentile_clips_outliers() {
        let mut values = vec![1.0f32; 10_000];
        values[0] = 1000.0;
        let q = choose(&values, 0.0, 1000.0, CalibMethod::Percentile(99.9));
        assert!(q.scale < 0.01, "{q:?}");
    }
}
