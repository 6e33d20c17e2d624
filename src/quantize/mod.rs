//! Static int8 quantization: weights per output channel, activations calibrated.
//!
//! [`quantize`] runs the fp32 model over calibration images, records the range of every
//! conv/dense input, picks each tensor's uint8 scale and zero point by the chosen
//! [`CalibMethod`], rounds the weights to int8 per output channel (symmetric, [-127, 127])
//! and returns an int8 [`Artifact`] plus a per-layer [`QuantizeReport`].

pub mod calibrate;

use serde::Serialize;

use crate::artifact::{Artifact, NamedTensor, Precision, TensorData};
use crate::data::Split;
use crate::nn::plan::Op;
use crate::nn::{Executor, Plan};
use crate::runtime::int8::ActQuant;
use crate::{Error, Result};

pub use calibrate::CalibMethod;

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
}

/// One quantized layer in the report.
#[derive(Debug, Clone, Serialize)]
pub struct LayerReport {
    /// Weight tensor name.
    pub name: String,
    /// Weight shape.
    pub shape: Vec<usize>,
    /// Smallest and largest per-channel weight scale.
    pub weight_scale_range: [f32; 2],
    /// Input activation scale.
    pub input_scale: f32,
    /// Input activation zero point.
    pub input_zero_point: u8,
    /// Calibrated input range `[min, max]` before clipping to the chosen scale.
    pub input_range: [f32; 2],
    /// 10·log10(signal / rounding noise) of the weights, in dB.
    pub weight_snr_db: f64,
    /// fp32 bytes of the weight.
    pub bytes_fp32: usize,
    /// int8 bytes of the weight plus its scales.
    pub bytes_int8: usize,
}

/// What quantization did.
#[derive(Debug, Clone, Serialize)]
pub struct QuantizeReport {
    /// `minmax`, `percentile`, `mse`.
    pub method: String,
    /// Calibration images used.
    pub samples: usize,
    /// `per-channel` or `per-tensor` weights.
    pub weight_scheme: String,
    /// A row per conv/dense layer.
    pub layers: Vec<LayerReport>,
    /// Total weight bits per parameter (int8 values plus scales and biases).
    pub bits_per_weight: f64,
}

/// Quantizes an fp32 (or fp16/bf16) artifact to int8 using `calib` images.
pub fn quantize(
    artifact: &Artifact,
    calib: &Split,
    config: &QuantConfig,
) -> Result<(Artifact, QuantizeReport)> {
    if artifact.precision == Precision::Int8 {
        return Err(Error::Config(
            "the artifact is already int8; quantize its fp32 parent instead".into(),
        ));
    }
    if config.samples == 0 {
        return Err(Error::Config("`--calib-samples` must be at least 1".into()));
    }
    let plan = Plan::compile(&artifact.spec)?;
    let params = artifact.params_f32();
    let ranges = calibrate::collect_ranges(&plan, &params, calib, config)?;
    let mut tensors = Vec::new();
    let mut layers = Vec::new();
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
        let out = info.shape[0];
        let per_row = values.len() / out;
        let mut scales: Vec<f32> = values
            .chunks_exact(per_row)
            .map(|row| row.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0)
            .collect();
        if config.per_tensor {
            let max = scales.iter().copied().fold(0.0f32, f32::max);
            scales.iter_mut().for_each(|s| *s = max);
        }
        for s in &mut scales {
            if *s == 0.0 {
                *s = 1.0; // an all-zero channel: any scale reproduces it exactly
            }
        }
        let q: Vec<i8> = values
            .iter()
            .enumerate()
            .map(|(i, v)| (v / scales[i / per_row]).round().clamp(-127.0, 127.0) as i8)
            .collect();
        let (signal, noise) =
            values
                .iter()
                .enumerate()
                .fold((0.0f64, 0.0f64), |(s, n), (i, &v)| {
                    let back = q[i] as f32 * scales[i / per_row];
                    (s + (v as f64).powi(2), n + ((v - back) as f64).powi(2))
                });
        let range = &ranges[layer_index];
        layer_index += 1;
        let act = calibrate::choose(range.values(), range.min, range.max, config.method);
        let prefix = info.name.trim_end_matches("weight").to_string();
        let bias = &params[weight + 1];
        tensors.push(NamedTensor {
            name: info.name.clone(),
            shape: info.shape.clone(),
            data: TensorData::I8(q),
        });
        tensors.push(NamedTensor {
            name: format!("{}_scale", info.name),
            shape: vec![out],
            data: TensorData::F32(scales.clone()),
        });
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
        tensors.push(NamedTensor {
            name: plan.params[weight + 1].name.clone(),
            shape: vec![bias.len()],
            data: TensorData::F32(bias.clone()),
        });
        let bytes_int8 = values.len() + 4 * out;
        total_bits += 8.0 * (bytes_int8 + 4 * bias.len() + 5) as f64;
        total_params += values.len() + bias.len();
        layers.push(LayerReport {
            name: info.name.clone(),
            shape: info.shape.clone(),
            weight_scale_range: [
                scales.iter().copied().fold(f32::INFINITY, f32::min),
                scales.iter().copied().fold(0.0, f32::max),
            ],
            input_scale: act.scale,
            input_zero_point: act.zero_point,
            input_range: [range.min, range.max],
            weight_snr_db: if noise > 0.0 {
                10.0 * (signal / noise).log10()
            } else {
                f64::INFINITY
            },
            bytes_fp32: 4 * values.len(),
            bytes_int8,
        });
    }
    let mut out = artifact.clone();
    out.precision = Precision::Int8;
    out.metrics = None;
    out.tensors = tensors;
    let report = QuantizeReport {
        method: config.method.name(),
        samples: config.samples.min(calib.count),
        weight_scheme: if config.per_tensor {
            "per-tensor"
        } else {
            "per-channel"
        }
        .into(),
        layers,
        bits_per_weight: total_bits / total_params.max(1) as f64,
    };
    Ok((out, report))
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

/// fp32 logits of `x` (for comparisons).
pub fn fp32_logits(artifact: &Artifact, x: &[f32], batch: usize) -> Result<Vec<f32>> {
    let plan = Plan::compile(&artifact.spec)?;
    let mut logits = Vec::new();
    Executor::new(&plan, 1).predict(&artifact.params_f32(), x, batch, &mut logits);
    Ok(logits)
}

/// The quantization scheme recorded in `mlops.quantization`.
pub fn scheme_metadata(
    report: &QuantizeReport,
    calib_sha256: &str,
    kernel_note: &str,
) -> serde_json::Value {
    serde_json::json!({
        "weights": format!("int8 symmetric [-127, 127], {}", report.weight_scheme),
        "activations": "uint8 asymmetric, per tensor, static (calibrated)",
        "method": report.method,
        "samples": report.samples,
        "calibration_sha256": calib_sha256,
        "requantization": "f32 multiplier per output channel, round half away from zero",
        "runtime": kernel_note,
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
        };
        let (int8, report) = quantize(&fp32, &synthetic_split(64), &config).unwrap();
        assert_eq!(report.layers.len(), 5);
        (fp32, int8)
    }

    /// The whole int8 network gives bit-identical logits with the SIMD and portable GEMM.
    #[test]
    fn int8_runtime_simd_and_portable_agree_exactly() {
        let (_, int8) = int8_reference_cnn();
        let split = synthetic_split(9);
        let (mut x, mut labels) = (Vec::new(), Vec::new());
        split.gather(&(0..9).collect::<Vec<_>>(), &mut x, &mut labels);
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
        split.gather(&(0..32).collect::<Vec<_>>(), &mut x, &mut labels);
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

    #[test]
    fn quantizing_int8_again_is_refused() {
        let (_, int8) = int8_reference_cnn();
        let config = QuantConfig {
            method: CalibMethod::MinMax,
            samples: 8,
            seed: 0,
            per_tensor: false,
        };
        let err = quantize(&int8, &synthetic_split(8), &config)
            .unwrap_err()
            .to_string();
        assert!(err.contains("already int8"), "{err}");
    }
}
