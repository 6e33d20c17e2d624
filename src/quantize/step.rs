//! `mlops quantize` as one library call: settings as a user gives them
//! ([`QuantizeConfig`]), resolved against the artifact ([`QuantizeConfig::resolve`]), then
//! [`run`]: quantize, compare with fp32, evaluate both, and the typed summary.

use super::QuantizeSummary;
use super::{compare, compare_accuracy, quantize, CalibMethod, Comparison, QuantConfig};
use crate::artifact::{Artifact, LayerPrecision, Precision};
use crate::data::Split;
use crate::io::FileRecord;
use crate::runtime::Runtime;
use crate::{Error, Result};

/// Calibration methods by name, as `--calib-method` spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MethodName {
    /// Observed min/max (TFLite's default).
    MinMax,
    /// A percentile of absolute values (`percentile` in [`QuantizeConfig`]).
    Percentile,
    /// The range minimising the mean squared quantization error.
    Mse,
    /// KL divergence between fp32 and quantized histograms (TensorRT's entropy calibrator).
    Entropy,
}

/// Quantization settings as a user gives them; [`QuantizeConfig::resolve`] checks them
/// against an artifact and gives the [`QuantConfig`] that [`quantize`] runs.
#[derive(Debug, Clone)]
pub struct QuantizeConfig {
    /// How activation ranges become scales.
    pub method: MethodName,
    /// Percentile kept by [`MethodName::Percentile`], in `[50, 100)`.
    pub percentile: f32,
    /// Calibration images used (at least 1), chosen with a fixed seed.
    pub samples: usize,
    /// One weight scale per tensor instead of per output channel.
    pub per_tensor: bool,
    /// Weights-only int8 (dynamic range activations).
    pub dynamic: bool,
    /// Conv/dense layers kept in fp32, by name (`layers.4`) or index (`4`).
    pub exclude: Vec<String>,
}

impl QuantizeConfig {
    /// The run's [`QuantConfig`] for `artifact`.
    ///
    /// # Errors
    /// [`Error::Config`] for an int8 artifact, zero samples, a percentile outside
    /// `[50, 100)`, or an `exclude` entry that names no conv/dense layer.
    pub fn resolve(&self, artifact: &Artifact) -> Result<QuantConfig> {
        if artifact.precision == Precision::Int8 {
            return Err(Error::Config(
                "the artifact is already int8; quantize its fp32 parent instead".into(),
            ));
        }
        if self.samples == 0 {
            return Err(Error::Config("`--calib-samples` must be at least 1".into()));
        }
        if !(50.0..100.0).contains(&self.percentile) {
            return Err(Error::Config(
                "`--percentile` must be in [50, 100), e.g. 99.99".into(),
            ));
        }
        Ok(QuantConfig {
            method: match self.method {
                MethodName::MinMax => CalibMethod::MinMax,
                MethodName::Percentile => CalibMethod::Percentile(self.percentile),
                MethodName::Mse => CalibMethod::Mse,
                MethodName::Entropy => CalibMethod::Entropy,
            },
            samples: self.samples,
            seed: 0,
            per_tensor: self.per_tensor,
            dynamic: self.dynamic,
            exclude: crate::model::resolve_layers(&artifact.spec, &self.exclude)?,
        })
    }
}

/// What [`run`] works on.
#[derive(Debug, Clone, Copy)]
pub struct QuantizeInputs<'a> {
    /// The fp32 (or fp16/bf16) artifact.
    pub artifact: &'a Artifact,
    /// Its file (the lineage parent and `bytes_before`); `None` for one in memory.
    pub record: Option<&'a FileRecord>,
    /// Calibration images (static int8 needs them).
    pub calib: Option<&'a Split>,
    /// An evaluation split and the name it is reported under: fp32 and int8 accuracy.
    pub eval: Option<(&'a Split, &'a str)>,
}

/// Images compared layer by layer and at the logits (at most; fewer when the data has
/// fewer).
pub const COMPARED_IMAGES: usize = 500;

/// Quantizes, then measures what it cost: per-layer output SNR and logits against fp32 on
/// the evaluation images (the calibration images when there are none: on those alone a
/// degenerate set looks perfect, issue 10), and accuracy of both on the evaluation split.
/// Both models run in engines of `runtime`. Returns the finished int8 artifact (as
/// [`quantize`]) and the step's typed summary; `summary.report.warnings` holds what made
/// the calibration set unfit.
///
/// # Errors
/// As [`quantize`], an engine that cannot load either model, or a failed forward pass.
pub fn run(
    inputs: QuantizeInputs<'_>,
    config: &QuantConfig,
    runtime: &dyn Runtime,
) -> Result<(Artifact, QuantizeSummary)> {
    let QuantizeInputs {
        artifact,
        record,
        calib,
        eval,
    } = inputs;
    let (quantized, mut report) = quantize(artifact, record, calib, config)?;
    let mut engine = runtime.load(&quantized)?;
    let compared = match (eval, calib) {
        (Some((split, _)), _) => Some((split, "evaluation")),
        (None, Some(calib)) => Some((calib, "calibration")),
        (None, None) => None,
    };
    let comparison = match compared {
        Some((images, name)) => compare(
            artifact,
            &quantized,
            engine.as_mut(),
            images,
            name,
            config.samples.min(COMPARED_IMAGES),
            &mut report,
        )?,
        None => Comparison::none(),
    };
    let eval = match eval {
        Some((split, name)) => Some(compare_accuracy(
            runtime.load(artifact)?.as_mut(),
            engine.as_mut(),
            split,
            name,
        )?),
        None => None,
    };
    let bytes_before = match record {
        Some(record) => record.bytes,
        None => artifact.to_bytes()?.len() as u64,
    };
    let bytes_after = quantized.to_bytes()?.len() as u64;
    let summary = QuantizeSummary {
        layers_int8: report.layers_in(&[LayerPrecision::Int8Static, LayerPrecision::Int8Dynamic]),
        layers_fp32: report.layers_in(&[LayerPrecision::Fp32]),
        compute: engine.compute(),
        comparison,
        eval,
        bytes_before,
        bytes_after,
        size_ratio: bytes_after as f64 / bytes_before.max(1) as f64,
        report,
    };
    Ok((quantized, summary))
}
