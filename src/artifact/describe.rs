//! What an artifact says about itself, as data (`mlops inspect`): metadata, lineage and
//! whether it is intact, per-layer parameters and FLOPs, tensors.

use serde::Serialize;

use super::{Artifact, EvalMetrics, InputSpec, LineageCheck, LineageEntry, Precision};
use crate::io::FileRecord;
use crate::model::{ModelSpec, Shape};
use crate::Result;

/// One layer of the model.
#[derive(Debug, Clone, Serialize)]
pub struct LayerInfo {
    /// Index in the spec.
    pub index: usize,
    /// Its `type`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Output shape per image (`[h, w, c]` or `[n]`).
    pub output_shape: Vec<usize>,
    /// Trainable values.
    pub params: usize,
    /// Multiply-adds times two per image.
    pub flops: u64,
}

/// One stored tensor.
#[derive(Debug, Clone, Serialize)]
pub struct TensorInfo {
    /// `layers.3.weight`, ...
    pub name: String,
    /// As safetensors spells it.
    pub dtype: &'static str,
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Stored bytes.
    pub bytes: usize,
}

/// Everything [`Artifact::describe`] reports.
#[derive(Debug, Clone, Serialize)]
pub struct ArtifactInfo {
    /// The file.
    pub file: FileRecord,
    /// Stored precision.
    pub precision: Precision,
    /// The architecture.
    pub model: ModelSpec,
    /// Input preprocessing.
    pub input: InputSpec,
    /// Class names.
    pub labels: Vec<String>,
    /// The steps that made it.
    pub lineage: Vec<LineageEntry>,
    /// Whether the lineage chain is intact.
    pub lineage_check: LineageCheck,
    /// Whether a digest was recorded (and so checked at load).
    pub digest_verified: bool,
    /// Last measured accuracy.
    pub metrics: Option<EvalMetrics>,
    /// Trainable values.
    pub param_count: usize,
    /// FLOPs per image.
    pub flops_per_image: u64,
    /// Per layer.
    pub layers: Vec<LayerInfo>,
    /// Per tensor.
    pub tensors: Vec<TensorInfo>,
}

impl Artifact {
    /// A description of this artifact, loaded from `file`; `digest_verified` says whether
    /// the file carried a digest (loading checks it when it does).
    ///
    /// # Errors
    /// A spec that cannot be laid out (never for a loaded artifact).
    pub fn describe(&self, file: FileRecord, digest_verified: bool) -> Result<ArtifactInfo> {
        let spec = &self.spec;
        let shapes = spec.shapes()?;
        let flops = spec.flops()?;
        let params = spec.params()?;
        let layers = spec
            .layers
            .iter()
            .enumerate()
            .map(|(i, layer)| {
                let prefix = format!("layers.{i}.");
                LayerInfo {
                    index: i,
                    kind: layer.kind(),
                    output_shape: match shapes[i + 1] {
                        Shape::Spatial(s) => s.to_vec(),
                        Shape::Flat(n) => vec![n],
                    },
                    params: params
                        .iter()
                        .filter(|p| p.name.starts_with(&prefix))
                        .map(|p| p.len())
                        .sum(),
                    flops: flops[i],
                }
            })
            .collect();
        let tensors = self
            .tensors
            .iter()
            .map(|t| TensorInfo {
                name: t.name.clone(),
                dtype: t.data.dtype_name(),
                shape: t.shape.clone(),
                bytes: t.data.to_le_bytes().len(),
            })
            .collect();
        Ok(ArtifactInfo {
            file,
            precision: self.precision,
            model: spec.clone(),
            input: self.input.clone(),
            labels: self.labels.clone(),
            lineage: self.lineage.clone(),
            lineage_check: self.lineage_check(),
            digest_verified,
            metrics: self.metrics.clone(),
            param_count: spec.param_count()?,
            flops_per_image: flops.iter().sum(),
            layers,
            tensors,
        })
    }
}
