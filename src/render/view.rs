//! A step report's `metrics` read back into its typed report, for the renderers
//! ([`super::html`], [`super::markdown`]).
//!
//! Typed, as [`crate::pipeline::summary`] reads them: a renamed field is an
//! [`StepView::Unreadable`] step (listed on the page with the reason), never a silent 0.
//! Pruning's reports are Serialize-only (and hold `&'static str`s), so they are read here
//! into [`PruneView`], which names the same fields.

use serde::Deserialize;

use crate::bench::BenchDoc;
use crate::quantize::QuantizeSummary;
use crate::runtime::EvalSummary;
use crate::train::TrainReport;

use crate::report::StepReport;

/// A step's figures, typed by its kind.
#[derive(Debug, Clone)]
pub enum StepView {
    /// `mlops train`.
    Train(Box<TrainReport>),
    /// `mlops eval`.
    Eval(Box<EvalSummary>),
    /// `mlops quantize --int8` (not a dry run).
    Quantize(Box<QuantizeSummary>),
    /// `mlops prune` (not a dry run).
    Prune(Box<PruneView>),
    /// `mlops bench`.
    Bench(Box<BenchDoc>),
    /// A step with no chart of its own (export, convert, inspect, predict, serve, dry
    /// runs, fp16/bf16 quantize): its scalar figures are shown as a table.
    Other,
    /// Figures that do not have the schema this mlops writes, with serde's reason.
    Unreadable(String),
}

/// `prune::MagnitudeReport`'s fields the report draws.
#[derive(Debug, Clone, Deserialize)]
pub struct MagnitudeView {
    /// The sparsity asked for.
    pub target_sparsity: f64,
    /// Measured sparsity over the pruned layers.
    pub total_sparsity: f64,
    /// Per weight tensor.
    pub layers: Vec<LayerSparsityView>,
    /// Accuracy of the input artifact.
    pub accuracy_before: f64,
    /// Accuracy of the pruned one.
    pub accuracy_after: f64,
    /// Bytes of the input file.
    pub bytes_before: u64,
    /// Bytes of the pruned artifact.
    pub bytes_after: u64,
    /// gzip -9 size of the input file.
    pub gzip_bytes_before: u64,
    /// gzip -9 size of the pruned artifact.
    pub gzip_bytes_after: u64,
    /// Updates of the fine-tuning run.
    pub fine_tune_steps: u64,
}

/// `prune::LayerSparsity`.
#[derive(Debug, Clone, Deserialize)]
pub struct LayerSparsityView {
    /// Weight tensor name.
    pub name: String,
    /// Values in it.
    pub params: u64,
    /// `zeros / params`.
    pub sparsity: f64,
    /// Whether it was pruned.
    pub pruned: bool,
}

/// `prune::LayerCut`.
#[derive(Debug, Clone, Deserialize)]
pub struct LayerCutView {
    /// Layer index.
    pub layer: usize,
    /// `conv2d`, `dense`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Filters / units before.
    pub before: usize,
    /// Kept.
    pub kept: usize,
}

/// `prune::LayerCost`.
#[derive(Debug, Clone, Deserialize)]
pub struct LayerCostView {
    /// Layer index.
    pub layer: usize,
    /// `conv2d`, `dense`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Params before.
    pub params_before: u64,
    /// Params after.
    pub params_after: u64,
    /// FLOPs per image before.
    pub flops_before: u64,
    /// FLOPs per image after.
    pub flops_after: u64,
}

/// `prune::StructuredReport`'s fields the report draws.
#[derive(Debug, Clone, Deserialize)]
pub struct StructuredView {
    /// Always true.
    pub structured: bool,
    /// Share of filters / units asked to be removed.
    pub target_sparsity: f64,
    /// Share removed.
    pub sparsity: f64,
    /// Per layer.
    pub plan: Vec<LayerCutView>,
    /// Per weighted layer (empty in reports written before mlops had it).
    #[serde(default)]
    pub layers: Vec<LayerCostView>,
    /// Parameters before.
    pub params_before: u64,
    /// Parameters after.
    pub params_after: u64,
    /// FLOPs per image before.
    pub flops_before: u64,
    /// FLOPs per image after.
    pub flops_after: u64,
    /// Bytes of the input file.
    pub bytes_before: u64,
    /// Bytes of the pruned artifact.
    pub bytes_after: u64,
    /// Accuracy of the input artifact.
    pub accuracy_before: f64,
    /// Accuracy right after cutting, before fine-tuning.
    pub accuracy_after_pruning: Option<f64>,
    /// Accuracy of the pruned artifact.
    pub accuracy_after: f64,
}

/// `prune::PruneReport`: structured reports say `structured: true`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PruneView {
    /// Structured pruning (tried first: it has `structured` and `plan`).
    Structured(StructuredView),
    /// Magnitude pruning.
    Magnitude(MagnitudeView),
}

fn typed<T: serde::de::DeserializeOwned>(
    step: &StepReport,
    wrap: impl FnOnce(T) -> StepView,
) -> StepView {
    match serde_json::from_value::<T>(step.metrics.clone()) {
        Ok(t) => wrap(t),
        Err(e) => StepView::Unreadable(e.to_string()),
    }
}

/// Reads `step`'s figures by its kind.
pub fn view(step: &StepReport) -> StepView {
    let metrics = &step.metrics;
    if metrics.get("dry_run").and_then(|v| v.as_bool()) == Some(true) {
        return StepView::Other;
    }
    match step.step.as_str() {
        "train" => typed(step, |t| StepView::Train(Box::new(t))),
        "eval" => typed(step, |t| StepView::Eval(Box::new(t))),
        // fp16 / bf16 copies made by `quantize --precision` have no layer errors to draw.
        "quantize" if metrics.get("layers").is_some() => {
            typed(step, |t| StepView::Quantize(Box::new(t)))
        }
        "prune" => typed(step, |t| StepView::Prune(Box::new(t))),
        "bench" => typed(step, |t| StepView::Bench(Box::new(t))),
        _ => StepView::Other,
    }
}

/// The file name of a path as reports give it (`runs/default/model.int8.safetensors` ->
/// `model.int8.safetensors`).
pub fn file_name(path: &str) -> String {
    std::path::Path::new(path)
        .file_name()
        .map_or_else(|| path.to_string(), |n| n.to_string_lossy().to_string())
}

/// One evaluated artifact of the run, with the bench figures measured for it.
#[derive(Debug, Clone)]
pub struct ArtifactRow {
    /// Path as the eval step read it.
    pub path: String,
    /// Precision.
    pub precision: String,
    /// File size.
    pub bytes: u64,
    /// Top-1 accuracy.
    pub accuracy: f64,
    /// Bench p50 latency at batch 1, µs.
    pub p50_b1_us: Option<f64>,
    /// Bench throughput at the largest batch measured for it, images/s.
    pub images_per_s: Option<f64>,
    /// That batch.
    pub batch: Option<usize>,
}

/// Every evaluated artifact (one eval step each, last one wins) with its bench figures:
/// what the summary draws and tables.
pub fn artifacts(steps: &[StepReport]) -> Vec<ArtifactRow> {
    let mut rows: Vec<ArtifactRow> = Vec::new();
    let mut bench = Vec::new();
    for step in steps {
        match view(step) {
            StepView::Eval(e) => {
                let Some(input) = step.inputs.first() else {
                    continue;
                };
                let row = ArtifactRow {
                    path: input.path.clone(),
                    precision: e.precision.to_string(),
                    bytes: input.bytes,
                    accuracy: e.report.accuracy,
                    p50_b1_us: None,
                    images_per_s: None,
                    batch: None,
                };
                match rows.iter_mut().find(|r| r.path == row.path) {
                    Some(old) => *old = row,
                    None => rows.push(row),
                }
            }
            StepView::Bench(doc) => {
                bench.extend(doc.rows.into_iter().filter(|r| r.mode == "infer"))
            }
            _ => {}
        }
    }
    for row in &mut rows {
        let mine: Vec<_> = bench.iter().filter(|b| b.artifact == row.path).collect();
        row.p50_b1_us = mine
            .iter()
            .rev()
            .find(|b| b.batch == 1)
            .map(|b| b.latency_us.p50);
        if let Some(b) = mine.iter().max_by_key(|b| b.batch) {
            row.images_per_s = Some(b.throughput_images_per_s);
            row.batch = Some(b.batch);
        }
    }
    rows
}
