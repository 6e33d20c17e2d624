//! How far an int8 artifact is from its fp32 parent: per layer and at the logits on a
//! few images ([`compare`]), and accuracy, agreement and the worst class on a whole
//! evaluation split ([`compare_accuracy`]). Everything runs through engines, the same
//! ones `eval` uses.

use serde::{Deserialize, Serialize};

use super::{compare_logits, fp32_logits, layer_output_errors, QuantizeReport};
use crate::artifact::Artifact;
use crate::data::Split;
use crate::runtime::{argmax, evaluate, Engine};
use crate::Result;

/// fp32 vs int8 at the logits on the first images of a split (`comparison` in reports).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Comparison {
    /// Images compared (0: no data to compare on).
    pub images: usize,
    /// `evaluation` or `calibration` (or `none`).
    pub data: String,
    /// Mean cosine similarity of the logit rows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logits_cosine: Option<f64>,
    /// Share of images with the same top-1 class.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top1_agreement: Option<f64>,
}

impl Comparison {
    /// No data to compare on.
    pub fn none() -> Self {
        Comparison {
            images: 0,
            data: "none".into(),
            logits_cosine: None,
            top1_agreement: None,
        }
    }
}

/// Compares `quantized` (running in `engine`) with `fp32` on the first `images` of
/// `split` (named `data`), and fills each layer's output SNR and cosine in `report`.
///
/// # Errors
/// A failed forward pass.
pub fn compare(
    fp32: &Artifact,
    quantized: &Artifact,
    engine: &mut dyn Engine,
    split: &Split,
    data: &str,
    images: usize,
    report: &mut QuantizeReport,
) -> Result<Comparison> {
    let n = images.clamp(1, split.count.max(1)).min(split.count);
    let (mut x, mut labels) = (Vec::new(), Vec::new());
    split.gather(
        &(0..n).collect::<Vec<_>>(),
        &fp32.input.preprocess(),
        &mut x,
        &mut labels,
    );
    layer_output_errors(fp32, quantized, &x, n, report)?;
    let reference = fp32_logits(fp32, &x, n)?;
    let mut logits = Vec::new();
    engine.predict(&x, n, &mut logits)?;
    let (cosine, agreement) = compare_logits(&reference, &logits, fp32.spec.classes);
    Ok(Comparison {
        images: n,
        data: data.into(),
        logits_cosine: Some(cosine),
        top1_agreement: Some(agreement),
    })
}

/// The class whose accuracy fell most.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct WorstClass {
    /// Class index.
    pub class: usize,
    /// fp32 minus int8 accuracy on it.
    pub drop: f64,
}

/// fp32 and int8 on the same evaluation images (`eval` in reports).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccuracyComparison {
    /// The evaluation folder as given.
    pub data: String,
    /// Images evaluated.
    pub images: usize,
    /// fp32 top-1 accuracy.
    pub fp32_accuracy: f64,
    /// int8 top-1 accuracy.
    pub int8_accuracy: f64,
    /// `fp32_accuracy - int8_accuracy`: positive when accuracy was lost.
    pub accuracy_drop: f64,
    /// Share of images where both predict the same class.
    pub top1_agreement: f64,
    /// The class that lost most.
    pub worst_class: Option<WorstClass>,
    /// int8 forward passes, images/s.
    pub int8_images_per_s: f64,
    /// fp32 forward passes, images/s.
    pub fp32_images_per_s: f64,
}

/// Evaluates both engines on `split` (named `data`) and counts where they agree.
///
/// # Errors
/// A failed forward pass, or non-finite outputs.
pub fn compare_accuracy(
    fp32: &mut dyn Engine,
    int8: &mut dyn Engine,
    split: &Split,
    data: &str,
) -> Result<AccuracyComparison> {
    let classes = fp32.plan().classes;
    let fp32_eval = evaluate(fp32, split, 256)?;
    let int8_eval = evaluate(int8, split, 256)?;
    let preprocess = *fp32.preprocess();
    let (mut xs, mut ls, mut a, mut b) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut agree = 0usize;
    for chunk in (0..split.count).collect::<Vec<_>>().chunks(256) {
        split.gather(chunk, &preprocess, &mut xs, &mut ls);
        fp32.predict(&xs, chunk.len(), &mut a)?;
        int8.predict(&xs, chunk.len(), &mut b)?;
        agree += a
            .chunks_exact(classes)
            .zip(b.chunks_exact(classes))
            .filter(|(p, q)| argmax(p) == argmax(q))
            .count();
    }
    let worst_class = (0..classes)
        .filter_map(|c| {
            Some(WorstClass {
                class: c,
                drop: fp32_eval.per_class_accuracy[c]? - int8_eval.per_class_accuracy[c]?,
            })
        })
        .max_by(|x, y| x.drop.total_cmp(&y.drop));
    Ok(AccuracyComparison {
        data: data.into(),
        images: split.count,
        fp32_accuracy: fp32_eval.accuracy,
        int8_accuracy: int8_eval.accuracy,
        accuracy_drop: fp32_eval.accuracy - int8_eval.accuracy,
        top1_agreement: agree as f64 / split.count.max(1) as f64,
        worst_class,
        int8_images_per_s: int8_eval.images_per_s,
        fp32_images_per_s: fp32_eval.images_per_s,
    })
}

/// One tensor of a dry run: how it is stored now and would be after quantization.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedTensor {
    /// Tensor name.
    pub tensor: String,
    /// Dimensions.
    pub shape: Vec<usize>,
    /// dtype now (`-` for a tensor quantization adds).
    pub from: String,
    /// dtype after.
    pub to: String,
    /// Bytes now.
    pub bytes_before: usize,
    /// Bytes after.
    pub bytes_after: usize,
}

/// What [`super::quantize`] would write, without calibrating (`--dry-run`).
#[derive(Debug, Clone, Serialize)]
pub struct QuantizePlan {
    /// Always true.
    pub dry_run: bool,
    /// Every tensor of the int8 artifact.
    pub tensors: Vec<PlannedTensor>,
    /// Weight bytes now.
    pub weight_bytes_before: usize,
    /// Weight bytes after.
    pub weight_bytes_after: usize,
}

/// The tensors `config` would produce from `artifact`, with their sizes.
///
/// # Errors
/// A spec or layer map that cannot be laid out (never for a loaded artifact).
pub fn plan(artifact: &Artifact, config: &super::QuantConfig) -> Result<QuantizePlan> {
    use crate::artifact::{expected_tensors, LayerPrecision, Precision};
    let layers: serde_json::Map<String, serde_json::Value> = artifact
        .spec
        .params()?
        .iter()
        .enumerate()
        .filter(|(_, p)| p.name.ends_with(".weight"))
        .map(|(i, p)| {
            let precision = if config.exclude.contains(&i) {
                LayerPrecision::Fp32
            } else if config.dynamic {
                LayerPrecision::Int8Dynamic
            } else {
                LayerPrecision::Int8Static
            };
            (p.name.clone(), precision.as_str().into())
        })
        .collect();
    let quantization = serde_json::json!({ "layers": layers });
    let mut tensors = Vec::new();
    for (name, shape, dtype) in
        expected_tensors(&artifact.spec, Precision::Int8, Some(&quantization))?
    {
        let count: usize = shape.iter().product();
        let old = artifact.tensor(&name);
        tensors.push(PlannedTensor {
            from: old.map_or("-", |t| t.data.dtype_name()).into(),
            bytes_before: old.map_or(0, |t| t.data.to_le_bytes().len()),
            bytes_after: count * if dtype == "I8" || dtype == "U8" { 1 } else { 4 },
            tensor: name,
            shape,
            to: dtype.into(),
        });
    }
    Ok(QuantizePlan {
        dry_run: true,
        weight_bytes_before: tensors.iter().map(|t| t.bytes_before).sum(),
        weight_bytes_after: tensors.iter().map(|t| t.bytes_after).sum(),
        tensors,
    })
}

/// For people: a row per tensor and the weight bytes before and after.
impl std::fmt::Display for QuantizePlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut table = crate::report::table::Table::new([
            "tensor",
            "shape",
            "from",
            "to",
            "bytes before",
            "bytes after",
        ]);
        for t in &self.tensors {
            table.row([
                t.tensor.clone(),
                format!("{:?}", t.shape),
                t.from.clone(),
                t.to.clone(),
                t.bytes_before.to_string(),
                t.bytes_after.to_string(),
            ]);
        }
        let (before, after) = (self.weight_bytes_before, self.weight_bytes_after);
        writeln!(f, "{table}")?;
        write!(
            f,
            "weights {before} -> {after} bytes ({:.1}%)",
            100.0 * after as f64 / before.max(1) as f64
        )
    }
}
