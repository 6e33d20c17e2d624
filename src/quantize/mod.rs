//! Static int8 quantization: weights per output channel, activations calibrated.
//!
//! [`quantize`] runs the fp32 model over calibration images, records the range of every
//! conv/dense input, picks each tensor's uint8 scale and zero point by the chosen
//! [`CalibMethod`], rounds the weights to int8 per output channel (symmetric, [-127, 127])
//! and returns an int8 [`Artifact`] plus a per-layer [`QuantizeReport`].

pub mod calibrate;

use serde::{Deserialize, Serialize};

use std::collections::BTreeMap;

use crate::artifact::{Artifact, LayerPrecision, LineageEntry, NamedTensor, Precision, TensorData};
use crate::data::Split;
use crate::io::{combined_sha256, FileRecord};
use crate::nn::plan::Op;
use crate::nn::{Executor, Plan};
use crate::runtime::int8::ActQuant;
use crate::{Error, Result};

pub use calibrate::CalibMethod;
pub use check::{
    compare, compare_accuracy, plan, AccuracyComparison, Comparison, PlannedTensor, QuantizePlan,
    WorstClass,
};

mod check;
mod step;

pub use step::{run, MethodName, QuantizeConfig, QuantizeInputs, COMPARED_IMAGES};

/// Everything `mlops quantize` reports (its `metrics`): the quantization, what runs it,
/// how it compares with fp32, and the sizes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QuantizeSummary {
    /// Per layer and in total.
    #[serde(flatten)]
    pub report: QuantizeReport,
    /// What computes the int8 layers: `int8 (avx512-vnni)` ...
    pub compute: String,
    /// Weights stored and run as int8.
    pub layers_int8: Vec<String>,
    /// Weights kept in fp32.
    pub layers_fp32: Vec<String>,
    /// Logits against fp32 on a few images.
    pub comparison: Comparison,
    /// Accuracy against fp32 on the evaluation split, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval: Option<AccuracyComparison>,
    /// Bytes of the input file.
    pub bytes_before: u64,
    /// Bytes of the int8 file.
    pub bytes_after: u64,
    /// `bytes_after / bytes_before`.
    pub size_ratio: f64,
}

/// For people: a row per layer, the scheme and sizes, what runs it, and how it compares
/// with fp32 (drops as in JSON: fp32 minus int8, positive when accuracy was lost).
impl std::fmt::Display for QuantizeSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let report = &self.report;
        let mut table = crate::report::table::Table::new([
            "layer",
            "shape",
            "runs in",
            "w scale min..max",
            "input scale",
            "zp",
            "w SNR dB",
            "out SNR dB",
            "out cosine",
            "bytes fp32",
            "bytes stored",
        ]);
        let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        for l in &report.layers {
            table.row([
                l.name.clone(),
                format!("{:?}", l.shape),
                l.precision.as_str().to_string(),
                or_dash(
                    l.weight_scale_range
                        .map(|r| format!("{:.2e}..{:.2e}", r[0], r[1])),
                ),
                or_dash(l.input_scale.map(|s| format!("{s:.3e}"))),
                or_dash(l.input_zero_point.map(|z| z.to_string())),
                or_dash(l.weight_snr_db.map(|d| format!("{d:.1}"))),
                or_dash(l.output_snr_db.map(|d| format!("{d:.1}"))),
                or_dash(l.output_cosine.map(|c| format!("{c:.5}"))),
                l.bytes_fp32.to_string(),
                l.bytes_stored.to_string(),
            ]);
        }
        let scheme = if report.activations == "dynamic" {
            format!("{}, dynamic activations", report.weight_scheme)
        } else {
            format!(
                "{}, {} on {} calibration images",
                report.weight_scheme, report.method, report.samples
            )
        };
        writeln!(f, "{table}")?;
        writeln!(
            f,
            "{scheme}: {} -> {} bytes ({:.1}%), {:.2} bits per weight",
            self.bytes_before,
            self.bytes_after,
            100.0 * self.size_ratio,
            report.bits_per_weight
        )?;
        writeln!(f, "int8 layers run with {}", self.compute)?;
        if let (Some(cosine), Some(agreement)) = (
            self.comparison.logits_cosine,
            self.comparison.top1_agreement,
        ) {
            writeln!(
                f,
                "logits cosine vs fp32 on {} {} images {cosine:.5}, top-1 agreement {:.2}%",
                self.comparison.images,
                self.comparison.data,
                100.0 * agreement
            )?;
        }
        if let Some(e) = &self.eval {
            writeln!(
                f,
                "accuracy on {} images of `{}`: fp32 {:.2}%, int8 {:.2}% (drop {:+.2} pt), top-1 agreement {:.2}%{}",
                e.images,
                e.data,
                100.0 * e.fp32_accuracy,
                100.0 * e.int8_accuracy,
                100.0 * e.accuracy_drop,
                100.0 * e.top1_agreement,
                e.worst_class.map_or(String::new(), |w| format!(
                    ", worst class {} (drop {:+.2} pt)",
                    w.class,
                    100.0 * w.drop
                )),
            )?;
        }
        Ok(())
    }
}

impl QuantizeReport {
    /// Names of the weights whose precision is one of `wanted`.
    pub fn layers_in(&self, wanted: &[LayerPrecision]) -> Vec<String> {
        self.layers
            .iter()
            .filter(|l| wanted.contains(&l.precision))
            .map(|l| l.name.clone())
            .collect()
    }
}

/// Settings of a quantization run.
#[derive(Debug, Clone)]
pub struct QuantConfig {
    /// How activation ranges are chosen.
    pub method: CalibMethod,
    /// Calibration images used (picked by `seed` from the calibration split).
    pub samples: usize,
    /// Seed of the sample choice.
    pub seed: u64,
    /// One weight scale per tensor instead of per output channel.
    pub per_tensor: bool,
    /// Weights-only int8: activations quantized per image at run time, no calibration.
    pub dynamic: bool,
    /// Parameter indices of weights kept in fp32 (mixed precision).
    pub exclude: Vec<usize>,
}

/// One conv/dense layer in the report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerReport {
    /// Weight tensor name.
    pub name: String,
    /// Weight shape.
    pub shape: Vec<usize>,
    /// How it is stored and run: `int8-static`, `int8-dynamic` or `fp32`.
    pub precision: LayerPrecision,
    /// Smallest and largest per-channel weight scale (int8 layers).
    pub weight_scale_range: Option<[f32; 2]>,
    /// Input activation scale (static layers).
    pub input_scale: Option<f32>,
    /// Input activation zero point (static layers).
    pub input_zero_point: Option<u8>,
    /// Calibrated input range `[min, max]` before clipping to the chosen scale.
    pub input_range: Option<[f32; 2]>,
    /// 10·log10(signal / rounding noise) of the weights, in dB (int8 layers).
    pub weight_snr_db: Option<f64>,
    /// The layer's output in the quantized model against fp32 on the calibration images,
    /// as 10·log10(signal / error) in dB (errors of earlier layers included, as the
    /// model runs); see [`layer_output_errors`].
    pub output_snr_db: Option<f64>,
    /// The same comparison as a cosine similarity.
    pub output_cosine: Option<f64>,
    /// fp32 bytes of the weight.
    pub bytes_fp32: usize,
    /// Bytes of the weight as stored (int8 values plus their scales, or fp32).
    pub bytes_stored: usize,
}

/// What quantization did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QuantizeReport {
    /// `minmax`, `percentile`, `mse`, `entropy`; `none` for dynamic quantization.
    pub method: String,
    /// Calibration images used (0 for dynamic quantization).
    pub samples: usize,
    /// `per-channel` or `per-tensor` weights.
    pub weight_scheme: String,
    /// `static` (calibrated activations) or `dynamic` (quantized at run time).
    pub activations: String,
    /// A row per conv/dense layer.
    pub layers: Vec<LayerReport>,
    /// Total weight bits per parameter (int8 values plus scales and biases).
    pub bits_per_weight: f64,
    /// What makes the calibration set unfit ([`calibrate::calibration_warnings`]); the
    /// CLI puts these in the step report's `warnings`.
    #[serde(skip)]
    pub warnings: Vec<String>,
}

fn snr_db(signal: f64, noise: f64) -> f64 {
    if noise > 0.0 {
        10.0 * (signal / noise).log10()
    } else {
        f64::INFINITY
    }
}

/// Quantizes an fp32 (or fp16/bf16) artifact to int8: static layers calibrated on
/// `calib`, dynamic ones (`config.dynamic`) without it, excluded ones kept in fp32.
///
/// The artifact comes back finished: tensors, `mlops.quantization` (scheme, method,
/// samples, calibration sha256, the CPU kernel that runs it, per-layer precision) and a
/// `quantize` lineage step whose parent is `record` (the input's file; `None` for an
/// artifact that only lives in memory), so a library caller writes the same file as
/// `mlops quantize`.
///
/// # Errors
/// An int8 input, static quantization without calibration images, zero samples.
pub fn quantize(
    artifact: &Artifact,
    record: Option<&FileRecord>,
    calib: Option<&Split>,
    config: &QuantConfig,
) -> Result<(Artifact, QuantizeReport)> {
    if artifact.precision == Precision::Int8 {
        return Err(Error::Config(
            "the artifact is already int8; quantize its fp32 parent instead".into(),
        ));
    }
    let plan = Plan::compile(&artifact.spec)?;
    let params = artifact.params_f32();
    let mut warnings = Vec::new();
    let ranges = match (config.dynamic, calib) {
        (true, _) => Vec::new(),
        (false, Some(calib)) => {
            if config.samples == 0 {
                return Err(Error::Config("`--calib-samples` must be at least 1".into()));
            }
            let ranges = calibrate::collect_ranges(
                &plan,
                &params,
                calib,
                &artifact.input.preprocess(),
                config,
            )?;
            let names: Vec<String> = plan
                .ops
                .iter()
                .filter_map(|op| match op {
                    Op::Conv(c) => Some(plan.params[c.weight].name.clone()),
                    Op::Dense(d) => Some(plan.params[d.weight].name.clone()),
                    _ => None,
                })
                .collect();
            let used = calibrate::sample_indices(calib.count, config);
            warnings = calibrate::calibration_warnings(calib, &used, &ranges, &names);
            ranges
        }
        (false, None) => {
            return Err(Error::Config(
                "static int8 needs calibration images (`--calib DIR`), or use `--dynamic`".into(),
            ))
        }
    };
    let mut tensors = Vec::new();
    let mut layers = Vec::new();
    let mut precisions = serde_json::Map::new();
    let mut layer_index = 0;
    let mut total_bits = 0.0;
    let mut total_params = 0usize;
    for op in &plan.ops {
        let weight = match op {
            Op::Conv(c) => c.weight,
            Op::Dense(d) => d.weight,
            _ => continue,
        };
        let info = &plan.params[weight];
        let values = &params[weight];
        let bias = &params[weight + 1];
        let range = ranges.get(layer_index);
        layer_index += 1;
        let precision = if config.exclude.contains(&weight) {
            LayerPrecision::Fp32
        } else if config.dynamic {
            LayerPrecision::Int8Dynamic
        } else {
            LayerPrecision::Int8Static
        };
        precisions.insert(info.name.clone(), precision.as_str().into());
        let mut row = LayerReport {
            name: info.name.clone(),
            shape: info.shape.clone(),
            precision,
            weight_scale_range: None,
            input_scale: None,
            input_zero_point: None,
            input_range: None,
            weight_snr_db: None,
            output_snr_db: None,
            output_cosine: None,
            bytes_fp32: 4 * values.len(),
            bytes_stored: 4 * values.len(),
        };
        total_params += values.len() + bias.len();
        if precision == LayerPrecision::Fp32 {
            tensors.push(NamedTensor {
                name: info.name.clone(),
                shape: info.shape.clone(),
                data: TensorData::F32(values.clone()),
            });
        } else {
            let (q, scales, snr) = quantize_weights(values, info.shape[0], config.per_tensor);
            tensors.push(NamedTensor {
                name: info.name.clone(),
                shape: info.shape.clone(),
                data: TensorData::I8(q),
            });
            tensors.push(NamedTensor {
                name: format!("{}_scale", info.name),
                shape: vec![info.shape[0]],
                data: TensorData::F32(scales.clone()),
            });
            row.weight_scale_range = Some([
                scales.iter().copied().fold(f32::INFINITY, f32::min),
                scales.iter().copied().fold(0.0, f32::max),
            ]);
            row.weight_snr_db = Some(snr);
            row.bytes_stored = values.len() + 4 * scales.len();
        }
        if let (LayerPrecision::Int8Static, Some(range)) = (precision, range) {
            let act = calibrate::choose(range.values(), range.min, range.max, config.method);
            let prefix = info.name.trim_end_matches("weight");
            tensors.push(NamedTensor {
                name: format!("{prefix}input_scale"),
                shape: vec![1],
                data: TensorData::F32(vec![act.scale]),
            });
            tensors.push(NamedTensor {
                name: format!("{prefix}input_zero_point"),
                shape: vec![1],
                data: TensorData::U8(vec![act.zero_point]),
            });
            row.input_scale = Some(act.scale);
            row.input_zero_point = Some(act.zero_point);
            row.input_range = Some([range.min, range.max]);
            row.bytes_stored += 5;
        }
        tensors.push(NamedTensor {
            name: plan.params[weight + 1].name.clone(),
            shape: vec![bias.len()],
            data: TensorData::F32(bias.clone()),
        });
        total_bits += 8.0 * (row.bytes_stored + 4 * bias.len()) as f64;
        layers.push(row);
    }
    let mut out = artifact.clone();
    out.precision = Precision::Int8;
    out.metrics = None;
    out.tensors = tensors;
    // The layer map goes in first: the loader and the runtime need it.
    let layer_map = serde_json::Value::Object(precisions);
    out.quantization = Some(serde_json::json!({ "layers": layer_map }));
    let report = QuantizeReport {
        method: if config.dynamic {
            "none".into()
        } else {
            config.method.name()
        },
        samples: match (config.dynamic, calib) {
            (false, Some(calib)) => config.samples.min(calib.count),
            _ => 0,
        },
        weight_scheme: if config.per_tensor {
            "per-tensor"
        } else {
            "per-channel"
        }
        .into(),
        activations: if config.dynamic { "dynamic" } else { "static" }.into(),
        layers,
        bits_per_weight: total_bits / total_params.max(1) as f64,
        warnings,
    };
    let compute = crate::runtime::Engine::compute(&crate::runtime::CpuEngine::new(&out, 1)?);
    let calib_sha = calib
        .filter(|_| !config.dynamic)
        .map(|c| combined_sha256(&c.files));
    out.quantization = Some(scheme_metadata(
        &report,
        Some(&layer_map),
        calib_sha.as_deref(),
        &compute,
    ));
    let mut args = BTreeMap::new();
    args.insert("method".to_string(), report.method.clone().into());
    args.insert("samples".to_string(), report.samples.into());
    args.insert("weights".to_string(), report.weight_scheme.clone().into());
    args.insert("activations".to_string(), report.activations.clone().into());
    if let Some(sha) = &calib_sha {
        args.insert("calibration_sha256".to_string(), sha.clone().into());
    }
    if !config.exclude.is_empty() {
        let names: Vec<String> = config
            .exclude
            .iter()
            .map(|&i| plan.params[i].name.trim_end_matches(".weight").to_string())
            .collect();
        args.insert("exclude".to_string(), names.into());
    }
    let mut entry = LineageEntry::new(
        "quantize",
        record.map(|r| (artifact, r.sha256.as_str())),
        args,
    );
    entry.parent_digest = Some(artifact.digest());
    out.lineage.push(entry);
    Ok((out, report))
}

/// Symmetric int8 weights (`[-127, 127]`) with one scale per output channel (or one for
/// the tensor), and the rounding's signal-to-noise ratio in dB.
fn quantize_weights(values: &[f32], out: usize, per_tensor: bool) -> (Vec<i8>, Vec<f32>, f64) {
    let per_row = values.len() / out;
    let mut scales: Vec<f32> = values
        .chunks_exact(per_row)
        .map(|row| row.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0)
        .collect();
    if per_tensor {
        let max = scales.iter().copied().fold(0.0f32, f32::max);
        scales.iter_mut().for_each(|s| *s = max);
    }
    for s in &mut scales {
        // An all-zero channel: any scale reproduces it exactly. Below f32's smallest
        // normal number the same: such weights (under 1.5e-36) are zero once the CPU
        // kernels flush denormals, and a subnormal scale is refused by the artifact check.
        if *s < f32::MIN_POSITIVE {
            *s = 1.0;
        }
    }
    let q: Vec<i8> = values
        .iter()
        .enumerate()
        .map(|(i, v)| (v / scales[i / per_row]).round().clamp(-127.0, 127.0) as i8)
        .collect();
    let (signal, noise) = values
        .iter()
        .enumerate()
        .fold((0.0f64, 0.0f64), |(s, n), (i, &v)| {
            let back = q[i] as f32 * scales[i / per_row];
            (s + (v as f64).powi(2), n + ((v - back) as f64).powi(2))
        });
    (q, scales, snr_db(signal, noise))
}

/// Fills each layer's `output_snr_db` and `output_cosine`: the quantized model's
/// conv/dense outputs (as it runs, dequantized) against the fp32 model's on images `x`
/// (`[batch, h, w, c]` NHWC f32, preprocessed as `mlops.input` says).
///
/// # Errors
/// - [`Error::Spec`] / [`Error::SpecLayer`] when either artifact's spec is invalid.
/// - [`Error::Config`] when `quantized` is not an int8 artifact the int8 runtime
///   can build ([`Int8Model::new`](crate::runtime::int8::Int8Model::new)).
pub fn layer_output_errors(
    fp32: &Artifact,
    quantized: &Artifact,
    x: &[f32],
    batch: usize,
    report: &mut QuantizeReport,
) -> Result<()> {
    let plan = Plan::compile(&fp32.spec)?;
    let reference = Executor::new(&plan, 1).activations(&fp32.params_f32(), x, batch);
    let outputs = crate::runtime::int8::Int8Model::layer_outputs(quantized, x, batch)?;
    let layer_ops = plan
        .ops
        .iter()
        .enumerate()
        .filter(|(_, op)| matches!(op, Op::Conv(_) | Op::Dense(_)));
    for ((row, (op, _)), got) in report.layers.iter_mut().zip(layer_ops).zip(&outputs) {
        let want = &reference[op + 1];
        // A stand-alone ReLU next: compare after it, as the int8 runtime folds it into
        // the requantization (negative values are not represented, not an error).
        let relu_next = plan.ops[op + 1..]
            .iter()
            .find(|o| !matches!(o, Op::Dropout { .. }))
            .is_some_and(|o| matches!(o, Op::Relu { .. }));
        let fold = |v: f32| if relu_next { v.max(0.0) } else { v } as f64;
        let (mut signal, mut noise, mut dot, mut got_norm) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
        for (&w, &g) in want.iter().zip(got) {
            let (w, g) = (fold(w), fold(g));
            signal += w * w;
            noise += (w - g) * (w - g);
            dot += w * g;
            got_norm += g * g;
        }
        row.output_snr_db = Some(snr_db(signal, noise));
        row.output_cosine = Some(dot / (signal.sqrt() * got_norm.sqrt()).max(1e-30));
    }
    Ok(())
}

/// How close two sets of logits are: cosine similarity over all values, and the share
/// of images whose top-1 class agrees.
pub fn compare_logits(a: &[f32], b: &[f32], classes: usize) -> (f64, f64) {
    let (mut dot, mut na, mut nb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        dot += x as f64 * y as f64;
        na += (x as f64).powi(2);
        nb += (y as f64).powi(2);
    }
    let rows = a.len() / classes.max(1);
    let agree = a
        .chunks_exact(classes)
        .zip(b.chunks_exact(classes))
        .filter(|(x, y)| crate::runtime::argmax(x) == crate::runtime::argmax(y))
        .count();
    (
        dot / (na.sqrt() * nb.sqrt()).max(1e-30),
        agree as f64 / rows.max(1) as f64,
    )
}

/// fp32 logits `[batch, classes]` of `x` (`[batch, h, w, c]` NHWC f32, preprocessed), for
/// comparisons; int8 artifacts run dequantized ([`Artifact::params_f32`]).
///
/// # Errors
/// [`Error::Spec`] / [`Error::SpecLayer`] when the artifact's spec is invalid.
pub fn fp32_logits(artifact: &Artifact, x: &[f32], batch: usize) -> Result<Vec<f32>> {
    let plan = Plan::compile(&artifact.spec)?;
    let mut logits = Vec::new();
    Executor::new(&plan, 1).predict(&artifact.params_f32(), x, batch, &mut logits);
    Ok(logits)
}

/// The quantization scheme recorded in `mlops.quantization` (with the per-layer
/// precisions `quantize` already put in `layers`).
pub fn scheme_metadata(
    report: &QuantizeReport,
    layers: Option<&serde_json::Value>,
    calib_sha256: Option<&str>,
    kernel_note: &str,
) -> serde_json::Value {
    let activations = if report.activations == "dynamic" {
        "uint8 asymmetric, per image, dynamic (quantized at run time; float bias and output)"
    } else {
        "uint8 asymmetric, per tensor, static (calibrated)"
    };
    serde_json::json!({
        "weights": format!("int8 symmetric [-127, 127], {}", report.weight_scheme),
        "activations": activations,
        "method": report.method,
        "samples": report.samples,
        "calibration_sha256": calib_sha256,
        "requantization": "f32 multiplier per output channel, round half to even",
        "runtime": kernel_note,
        "layers": layers,
    })
}

/// Activation quantization for tests and tools: the range as one mapping.
pub fn act_quant(min: f32, max: f32) -> ActQuant {
    ActQuant::from_range(min, max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelSpec;
    use crate::runtime::int8::gemm::Kernel;
    use crate::runtime::int8::Int8Model;

    fn synthetic_split(count: usize) -> Split {
        let images = (0..count * 784)
            .map(|i| ((i * 7919 + i / 784 * 13) % 256) as u8)
            .collect();
        Split {
            images,
            labels: (0..count).map(|i| (i % 10) as u8).collect(),
            count,
            shape: [28, 28, 1],
            files: Vec::new(),
        }
    }

    fn int8_reference_cnn() -> (Artifact, Artifact) {
        let spec = ModelSpec::reference_cnn();
        let plan = Plan::compile(&spec).unwrap();
        let fp32 = Artifact::from_params(&spec, &plan.init_params(3)).unwrap();
        let config = QuantConfig {
            method: CalibMethod::MinMax,
            samples: 64,
            seed: 0,
            per_tensor: false,
            dynamic: false,
            exclude: Vec::new(),
        };
        let (int8, report) = quantize(&fp32, None, Some(&synthetic_split(64)), &config).unwrap();
        assert_eq!(report.layers.len(), 5);
        (fp32, int8)
    }

    /// A channel (or an activation range) so small its scale would be subnormal is
    /// quantized as all-zero (scale 1) rather than written with a scale that the CPU
    /// kernels' flushed denormals would read as 0 and the artifact check refuses.
    #[test]
    fn tiny_weights_and_ranges_get_a_normal_scale() {
        let (q, scales, _) = quantize_weights(&[1e-37, -2e-37, 0.5, -0.25], 2, false);
        assert_eq!(scales, [1.0, 0.5 / 127.0]);
        assert_eq!(q, [0, 0, 127, -64]);
        let act = crate::runtime::int8::ActQuant::from_range(0.0, 1e-37);
        assert_eq!((act.scale, act.zero_point), (1.0, 0));
        // End to end: the first conv's first filter scaled down to ~1e-37.
        let spec = ModelSpec::reference_cnn();
        let plan = Plan::compile(&spec).unwrap();
        let mut params = plan.init_params(3);
        params[0][..9].iter_mut().for_each(|w| *w *= 1e-36);
        let fp32 = Artifact::from_params(&spec, &params).unwrap();
        let config = QuantConfig {
            method: CalibMethod::MinMax,
            samples: 16,
            seed: 0,
            per_tensor: false,
            dynamic: false,
            exclude: Vec::new(),
        };
        let (int8, _) = quantize(&fp32, None, Some(&synthetic_split(16)), &config).unwrap();
        int8.check_numbers().unwrap();
    }

    /// The whole int8 network gives bit-identical logits with the SIMD and portable GEMM.
    #[test]
    fn int8_runtime_simd_and_portable_agree_exactly() {
        let (_, int8) = int8_reference_cnn();
        let split = synthetic_split(9);
        let (mut x, mut labels) = (Vec::new(), Vec::new());
        split.gather(
            &(0..9).collect::<Vec<_>>(),
            &crate::data::Preprocess::UNIT,
            &mut x,
            &mut labels,
        );
        let mut portable = Int8Model::new(&int8, 2, Kernel::Portable).unwrap();
        let mut fast = Int8Model::new(&int8, 2, Kernel::detect()).unwrap();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        portable.predict(&x, 9, &mut a);
        fast.predict(&x, 9, &mut b);
        assert_eq!(a, b);
    }

    /// int8 logits track the fp32 ones closely (per-channel weights, minmax activations).
    #[test]
    fn int8_logits_track_fp32() {
        let (fp32, int8) = int8_reference_cnn();
        let split = synthetic_split(32);
        let (mut x, mut labels) = (Vec::new(), Vec::new());
        split.gather(
            &(0..32).collect::<Vec<_>>(),
            &crate::data::Preprocess::UNIT,
            &mut x,
            &mut labels,
        );
        let reference = fp32_logits(&fp32, &x, 32).unwrap();
        let mut model = Int8Model::new(&int8, 1, Kernel::detect()).unwrap();
        let mut got = Vec::new();
        model.predict(&x, 32, &mut got);
        let (cosine, _) = compare_logits(&reference, &got, 10);
        assert!(cosine > 0.999, "cosine {cosine}");
    }

    /// Weight round trip: every dequantized weight is within half a step of the original.
    #[test]
    fn weight_round_trip_within_half_a_step() {
        let (fp32, int8) = int8_reference_cnn();
        let before = fp32.params_f32();
        let after = int8.params_f32();
        for (info, (b, a)) in fp32
            .spec
            .params()
            .unwrap()
            .iter()
            .zip(before.iter().zip(&after))
        {
            if !info.name.ends_with("weight") {
                assert_eq!(b, a, "biases stay f32");
                continue;
            }
            let scales = int8
                .tensor(&format!("{}_scale", info.name))
                .unwrap()
                .data
                .to_f32()
                .unwrap();
            let per = b.len() / scales.len();
            for (i, (x, y)) in b.iter().zip(a).enumerate() {
                assert!(
                    (x - y).abs() <= 0.5 * scales[i / per] + 1e-7,
                    "{} [{i}]",
                    info.name
                );
            }
        }
    }

    /// Every runtime path, with a 5-channel stride-2 conv (5 x 3 bytes per kernel row:
    /// the width-unfolded case).
    fn odd_spec() -> ModelSpec {
        crate::model::spec::every_path_spec(5)
    }

    fn random_split(shape: [usize; 3], count: usize) -> Split {
        let len = shape.iter().product::<usize>();
        Split {
            images: (0..count * len)
                .map(|i| ((i * 7919 + i / 5 * 31) % 256) as u8)
                .collect(),
            labels: (0..count).map(|i| (i % 4) as u8).collect(),
            count,
            shape,
            files: Vec::new(),
        }
    }

    /// Every mode (static, dynamic, mixed) on every layer kind: SIMD and portable kernels
    /// give bit-identical logits, and the logits track fp32.
    #[test]
    fn every_mode_tracks_fp32_and_kernels_agree() {
        for spec in [odd_spec(), ModelSpec::reference_cnn()] {
            let plan = Plan::compile(&spec).unwrap();
            let fp32 = Artifact::from_params(&spec, &plan.init_params(5)).unwrap();
            let split = random_split(spec.input, 24);
            let (mut x, mut labels) = (Vec::new(), Vec::new());
            split.gather(
                &(0..24).collect::<Vec<_>>(),
                &crate::data::Preprocess::UNIT,
                &mut x,
                &mut labels,
            );
            let reference = fp32_logits(&fp32, &x, 24).unwrap();
            let weights: Vec<usize> = spec
                .params()
                .unwrap()
                .iter()
                .enumerate()
                .filter(|(_, p)| p.name.ends_with(".weight"))
                .map(|(i, _)| i)
                .collect();
            let middle = weights[1];
            for (dynamic, exclude) in [(false, vec![]), (true, vec![]), (false, vec![middle])] {
                let config = QuantConfig {
                    method: CalibMethod::MinMax,
                    samples: 24,
                    seed: 0,
                    per_tensor: false,
                    dynamic,
                    exclude: exclude.clone(),
                };
                let (int8, mut report) = quantize(&fp32, None, Some(&split), &config).unwrap();
                let what = format!(
                    "input {:?} dynamic {dynamic} exclude {exclude:?}",
                    spec.input
                );
                // Round trip through the file format (the layer map must survive).
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("m.safetensors");
                int8.save(&path).unwrap();
                let (int8, _) = Artifact::load(&path).unwrap();
                let mut portable = Int8Model::new(&int8, 2, Kernel::Portable).unwrap();
                let mut a = Vec::new();
                portable.predict(&x, 24, &mut a);
                let mut b = Vec::new();
                for kernel in Kernel::available() {
                    let mut model = Int8Model::new(&int8, 2, kernel).unwrap();
                    model.predict(&x, 24, &mut b);
                    assert_eq!(a, b, "{what} {kernel:?}");
                }
                let (cosine, _) = compare_logits(&reference, &b, spec.classes);
                assert!(cosine > 0.995, "{what}: cosine {cosine}");
                layer_output_errors(&fp32, &int8, &x, 24, &mut report).unwrap();
                for layer in &report.layers {
                    let c = layer.output_cosine.unwrap();
                    assert!(c > 0.99, "{what}: {} cosine {c}", layer.name);
                    if layer.precision == LayerPrecision::Fp32 {
                        assert!(exclude.contains(
                            &weights[report
                                .layers
                                .iter()
                                .position(|l| l.name == layer.name)
                                .unwrap()]
                        ));
                    }
                }
            }
        }
    }

    #[test]
    fn quantizing_int8_again_is_refused() {
        let (_, int8) = int8_reference_cnn();
        let config = QuantConfig {
            method: CalibMethod::MinMax,
            samples: 8,
            seed: 0,
            per_tensor: false,
            dynamic: false,
            exclude: Vec::new(),
        };
        let err = quantize(&int8, None, Some(&synthetic_split(8)), &config)
            .unwrap_err()
            .to_string();
        assert!(err.contains("already int8"), "{err}");
    }
}
