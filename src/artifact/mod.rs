//! Artifacts: one self-describing `.safetensors` file per model.
//!
//! An [`Artifact`] is the spec, the weights and the provenance (`mlops.*` metadata, see
//! DESIGN.md). Loading checks the format version, every tensor's name, dtype and shape
//! against the spec; saving goes through a temp file and a rename so a crash never
//! leaves a half-written model where a good one was.

pub mod checkpoint;
mod describe;
mod foreign;
pub use foreign::looks_like_safetensors;
pub mod safetensors;

use std::collections::BTreeMap;
use std::path::Path;

use half::{bf16, f16};
use serde::{Deserialize, Serialize};

pub use self::describe::{ArtifactInfo, LayerInfo, TensorInfo};
pub use self::safetensors::{NamedTensor, TensorData};
use crate::io::{sha256_hex, write_atomically, FileRecord, MLOPS_VERSION};
use crate::model::ModelSpec;
use crate::{Error, Result};

/// The value of `mlops.format` this version reads and writes.
pub const FORMAT: &str = "mlops/1";

/// Numeric precision of an artifact's stored weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// 32-bit float.
    Fp32,
    /// IEEE half: half the bytes, ~3 decimal digits.
    Fp16,
    /// bfloat16: half the bytes, fp32's range, ~2 decimal digits.
    Bf16,
    /// int8 weights (per output channel) and uint8 activations, run in integer arithmetic.
    Int8,
}

impl Precision {
    /// The name used in metadata, file names and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
            Precision::Bf16 => "bf16",
            Precision::Int8 => "int8",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "fp32" => Some(Precision::Fp32),
            "fp16" => Some(Precision::Fp16),
            "bf16" => Some(Precision::Bf16),
            "int8" => Some(Precision::Int8),
            _ => None,
        }
    }

    fn dtype_name(self) -> &'static str {
        match self {
            Precision::Fp32 => "F32",
            Precision::Fp16 => "F16",
            Precision::Bf16 => "BF16",
            Precision::Int8 => "I8",
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How one conv/dense layer of an int8 artifact is stored and run, recorded per weight
/// in `mlops.quantization.layers` (absent: every layer is `int8-static`, the default).
///
/// Mixed precision (`quantize --exclude`) and dynamic-range quantization
/// (`quantize --dynamic`) need the runtime and the loader to know each layer's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LayerPrecision {
    /// int8 weights, uint8 activations with a calibrated scale and zero point.
    Int8Static,
    /// int8 weights, activations quantized per image at run time (no calibration).
    Int8Dynamic,
    /// Kept in fp32 (excluded from quantization).
    Fp32,
}

impl LayerPrecision {
    /// The name in metadata and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            LayerPrecision::Int8Static => "int8-static",
            LayerPrecision::Int8Dynamic => "int8-dynamic",
            LayerPrecision::Fp32 => "fp32",
        }
    }

    /// The precision of weight tensor `weight` given an artifact's `mlops.quantization`
    /// (`Int8Static` when it has no entry for `weight`).
    ///
    /// # Errors
    /// [`Error::Config`] when `mlops.quantization.layers.<weight>` is not one of
    /// `"int8-static"`, `"int8-dynamic"`, `"fp32"`.
    pub fn of_layer(quantization: Option<&serde_json::Value>, weight: &str) -> Result<Self> {
        let Some(value) = quantization
            .and_then(|q| q.get("layers"))
            .and_then(|layers| layers.get(weight))
        else {
            return Ok(LayerPrecision::Int8Static);
        };
        serde_json::from_value(value.clone()).map_err(|_| {
            Error::Config(format!(
                "`mlops.quantization.layers.{weight}` is {value}; expected \"int8-static\", \"int8-dynamic\" or \"fp32\""
            ))
        })
    }
}

/// How raw pixels become the input tensor (`mlops.input`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputSpec {
    /// `[height, width, channels]`.
    pub shape: [usize; 3],
    /// Memory order of a batch: always `nhwc`.
    pub layout: String,
    /// `value = (pixel * scale - mean) / std`, pixel a byte in `[0, 255]`.
    pub scale: f32,
    /// Subtracted after scaling.
    pub mean: f32,
    /// Divided by after subtracting the mean.
    pub std: f32,
}

impl InputSpec {
    /// The pixel-to-input mapping every path applies ([`crate::data::Preprocess`]).
    pub fn preprocess(&self) -> crate::data::Preprocess {
        crate::data::Preprocess {
            scale: self.scale,
            mean: self.mean,
            std: self.std,
        }
    }

    /// Pixels scaled to `[0, 1]`, as the trainer feeds them.
    pub fn unit_scaled(shape: [usize; 3]) -> Self {
        InputSpec {
            shape,
            layout: "nhwc".into(),
            scale: crate::data::PIXEL_SCALE,
            mean: 0.0,
            std: 1.0,
        }
    }
}

/// One step in an artifact's history (`mlops.lineage`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LineageEntry {
    /// `train`, `export`, ...
    pub step: String,
    /// Version of mlops that ran it.
    pub mlops_version: String,
    /// sha256 of the artifact file it started from (none for training from scratch).
    pub parent_sha256: Option<String>,
    /// [`Artifact::digest`] of the artifact it started from (absent in artifacts written
    /// before digests existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_digest: Option<String>,
    /// [`Artifact::digest`] of the weights this step wrote: filled in by
    /// [`Artifact::to_bytes`] for the newest entry, so entry `i`'s `parent_digest` equals
    /// entry `i - 1`'s `digest` along an intact chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// The settings that shaped the result.
    pub args: BTreeMap<String, serde_json::Value>,
}

impl LineageEntry {
    /// A step made by this mlops from `parent` (none for training from scratch), whose file
    /// had sha256 `parent_sha256`.
    pub fn new(
        step: &str,
        parent: Option<(&Artifact, &str)>,
        args: BTreeMap<String, serde_json::Value>,
    ) -> Self {
        LineageEntry {
            step: step.into(),
            mlops_version: MLOPS_VERSION.into(),
            parent_sha256: parent.map(|(_, sha)| sha.to_string()),
            parent_digest: parent.map(|(a, _)| a.digest()),
            digest: None,
            args,
        }
    }
}

/// Whether an artifact's recorded lineage hangs together (see [`Artifact::lineage_check`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "detail")]
pub enum LineageCheck {
    /// Every entry's `parent_digest` equals the previous entry's `digest`, and the last
    /// entry's `digest` is this artifact's.
    Intact,
    /// Entries written before digests existed: nothing to compare.
    Unrecorded,
    /// A link does not match: which, and how.
    Broken(String),
}

/// Accuracy on an evaluation set (`mlops.metrics`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    /// Top-1 accuracy in `[0, 1]`.
    pub accuracy: f64,
    /// Mean cross-entropy.
    pub loss: f64,
    /// Images evaluated.
    pub images: usize,
    /// The data folder as given.
    pub data: String,
    /// sha256 of the image and label files, joined.
    pub data_sha256: String,
}

/// A model ready to save, load or run.
#[derive(Debug, Clone, PartialEq)]
pub struct Artifact {
    /// The architecture.
    pub spec: ModelSpec,
    /// Dtype of the stored weights.
    pub precision: Precision,
    /// Input preprocessing.
    pub input: InputSpec,
    /// Class names, index order.
    pub labels: Vec<String>,
    /// How it was made.
    pub lineage: Vec<LineageEntry>,
    /// Last measured accuracy, if any.
    pub metrics: Option<EvalMetrics>,
    /// How an int8 artifact was quantized (`mlops.quantization`).
    pub quantization: Option<serde_json::Value>,
    /// Per-layer and total sparsity of a pruned artifact (`mlops.sparsity`).
    pub sparsity: Option<serde_json::Value>,
    /// Parameters in spec order.
    pub tensors: Vec<NamedTensor>,
}

/// Layout facts for other runtimes (`mlops.layout`).
const LAYOUT: &str = r#"{"activations":"nhwc","conv_weight":"[out,kh,kw,in]","dense_weight":"[out,in]","flatten":"hwc"}"#;

impl Artifact {
    /// Wraps fp32 parameters into an artifact: `params` in spec order
    /// ([`ModelSpec::params`]), conv weights `[out, kh, kw, in]`, dense weights
    /// `[out, in]`, biases `[out]`, each flat row-major. Input `mlops.input` is pixels
    /// scaled to `[0, 1]`, labels are `"0"`, `"1"`, ...
    ///
    /// # Errors
    /// - [`Error::Spec`] / [`Error::SpecLayer`] when `spec` is invalid.
    /// - [`Error::Config`] when `params` does not hold one tensor of the right length per
    ///   spec parameter.
    pub fn from_params(spec: &ModelSpec, params: &[Vec<f32>]) -> Result<Self> {
        let infos = spec.params()?;
        if params.len() != infos.len()
            || params
                .iter()
                .zip(&infos)
                .any(|(p, info)| p.len() != info.len())
        {
            return Err(Error::Config(format!(
                "{} parameter tensors do not match the model's {}",
                params.len(),
                infos.len()
            )));
        }
        let tensors = infos
            .iter()
            .zip(params)
            .map(|(info, values)| NamedTensor {
                name: info.name.clone(),
                shape: info.shape.clone(),
                data: TensorData::F32(values.clone()),
            })
            .collect();
        Ok(Artifact {
            spec: spec.clone(),
            precision: Precision::Fp32,
            input: InputSpec::unit_scaled(spec.input),
            labels: (0..spec.classes).map(|c| c.to_string()).collect(),
            lineage: Vec::new(),
            metrics: None,
            quantization: None,
            sparsity: None,
            tensors,
        })
    }

    /// A tensor by name.
    pub fn tensor(&self, name: &str) -> Option<&NamedTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The parameters as f32 in spec order (layouts as [`Artifact::from_params`]): widened
    /// from fp16/bf16, or dequantized from int8 (`q * weight_scale`, one scale per output
    /// channel; the fp32 reference of an int8 model, not its runtime).
    ///
    /// # Panics
    /// If the artifact does not hold together, which [`Artifact::load`] and
    /// [`Artifact::from_params`] rule out but a hand-built or edited `Artifact` (its fields
    /// are public) may not: `spec` invalid, a spec parameter missing from `tensors`, an I8
    /// weight without its F32 `<name>_scale`, or a parameter stored as U8/U64.
    pub fn params_f32(&self) -> Vec<Vec<f32>> {
        let infos = self.spec.params().expect("validated spec");
        infos
            .iter()
            .map(|info| {
                let t = self.tensor(&info.name).expect("validated tensors");
                match &t.data {
                    TensorData::I8(q) => {
                        let scale_name = format!("{}_scale", info.name);
                        let scales = self
                            .tensor(&scale_name)
                            .and_then(|s| s.data.to_f32())
                            .expect("validated scales");
                        let per_channel = q.len() / scales.len();
                        q.iter()
                            .enumerate()
                            .map(|(i, &v)| v as f32 * scales[i / per_channel])
                            .collect()
                    }
                    other => other.to_f32().expect("validated float tensors"),
                }
            })
            .collect()
    }

    /// A copy with the weights cast to a float `precision` (round to nearest even).
    ///
    /// # Errors
    /// [`Error::Config`] when this artifact or `precision` is int8, or a tensor is not a
    /// float tensor (only possible in a hand-built `Artifact`).
    pub fn cast(&self, precision: Precision) -> Result<Artifact> {
        if self.precision == Precision::Int8 || precision == Precision::Int8 {
            return Err(Error::Config(
                "an int8 artifact cannot be cast: it is already int8; export from the fp32 artifact, and make int8 with `mlops quantize --int8`".into(),
            ));
        }
        let mut out = self.clone();
        out.precision = precision;
        for t in &mut out.tensors {
            let values = t.data.to_f32().ok_or_else(|| {
                Error::Config(format!(
                    "tensor `{}` is {}, not a float tensor: only fp32, fp16 and bf16 weights can be cast",
                    t.name,
                    t.data.dtype_name()
                ))
            })?;
            t.data = match precision {
                Precision::Fp16 => {
                    TensorData::F16(values.iter().map(|&v| f16::from_f32(v)).collect())
                }
                Precision::Bf16 => {
                    TensorData::BF16(values.iter().map(|&v| bf16::from_f32(v)).collect())
                }
                _ => TensorData::F32(values),
            };
        }
        Ok(out)
    }

    /// The safetensors bytes of this artifact (deterministic), with `mlops.digest` and the
    /// newest lineage entry's `digest` filled in.
    ///
    /// # Errors
    /// [`Error::Config`] when a number would be written non-finite or a scale
    /// non-positive ([`Artifact::check_numbers`]): no step writes such an artifact.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        self.check_numbers().map_err(|problem| {
            Error::Config(format!("refusing to write the artifact: {problem}"))
        })?;
        let tensors_digest = self.digest();
        let mut lineage = self.lineage.clone();
        if let Some(last) = lineage.last_mut() {
            last.digest = Some(tensors_digest.clone());
        }
        let mut metadata = BTreeMap::new();
        metadata.insert("mlops.format".into(), FORMAT.into());
        metadata.insert("mlops.version".into(), MLOPS_VERSION.into());
        metadata.insert("mlops.model".into(), json(&self.spec));
        metadata.insert("mlops.precision".into(), self.precision.as_str().into());
        metadata.insert("mlops.input".into(), json(&self.input));
        metadata.insert("mlops.labels".into(), json(&self.labels));
        metadata.insert("mlops.lineage".into(), json(&lineage));
        metadata.insert("mlops.layout".into(), LAYOUT.into());
        if let Some(m) = &self.metrics {
            metadata.insert("mlops.metrics".into(), json(m));
        }
        if let Some(q) = &self.quantization {
            metadata.insert("mlops.quantization".into(), json(q));
        }
        if let Some(q) = &self.sparsity {
            metadata.insert("mlops.sparsity".into(), json(q));
        }
        let digest = Digest {
            algorithm: "sha256".into(),
            tensors: tensors_digest,
            metadata: metadata_digest(&metadata),
        };
        metadata.insert(DIGEST_KEY.into(), json(&digest));
        safetensors::encode(&self.tensors, &metadata)
    }

    /// Writes the artifact atomically and returns its file record.
    ///
    /// # Errors
    /// As [`Artifact::to_bytes`] (naming `path`), or the I/O error of the write.
    pub fn save(&self, path: &Path) -> Result<FileRecord> {
        let bytes = self.to_bytes().map_err(|e| match e {
            Error::Config(problem) => Error::artifact(path, problem),
            other => other,
        })?;
        write_atomically(path, &bytes)?;
        Ok(FileRecord::of_bytes(path, &bytes))
    }

    /// Loads and fully validates an artifact; returns it with its file record.
    ///
    /// # Errors
    /// - [`Error::Io`] when the file cannot be read.
    /// - [`Error::Artifact`] naming `path` for everything else: no such file, another
    ///   model format (ONNX, TFLite, ...), not valid safetensors, missing or bad `mlops.*`
    ///   metadata or another format version, an invalid spec, labels or input shape that
    ///   disagree with the spec, a tensor missing, unexpected, or of the wrong shape or
    ///   dtype, a non-finite weight or non-positive scale ([`Artifact::check_numbers`]),
    ///   or data that no longer matches `mlops.digest`.
    pub fn load(path: &Path) -> Result<(Artifact, FileRecord)> {
        if !path.is_file() {
            return Err(Error::artifact(path, "no such artifact file"));
        }
        let bytes = std::fs::read(path).map_err(|e| Error::io("read", path, e))?;
        if let Some(kind) = crate::artifact::foreign::recognise(path, &bytes) {
            return Err(Error::artifact(path, kind));
        }
        let record = FileRecord::of_bytes(path, &bytes);
        let (tensors, metadata) = safetensors::decode(path, &bytes)?;
        let artifact = Self::from_parts(path, tensors, &metadata)?;
        artifact
            .check_numbers()
            .map_err(|problem| Error::artifact(path, problem))?;
        verify_digest(path, &artifact.tensors, &metadata)?;
        Ok((artifact, record))
    }

    fn from_parts(
        path: &Path,
        tensors: Vec<NamedTensor>,
        metadata: &BTreeMap<String, String>,
    ) -> Result<Artifact> {
        let get = |key: &str| {
            metadata
                .get(key)
                .ok_or_else(|| Error::artifact(path, format!("missing `{key}` metadata")))
        };
        let format = metadata.get("mlops.format").ok_or_else(|| {
            Error::artifact(
                path,
                "not an mlops artifact (no `mlops.format` metadata); make one with `mlops train` or `mlops export`",
            )
        })?;
        if format != FORMAT {
            return Err(Error::artifact(
                path,
                format!("has format `{format}`, this mlops {MLOPS_VERSION} reads `{FORMAT}`"),
            ));
        }
        fn parse<T: for<'de> Deserialize<'de>>(path: &Path, key: &str, text: &str) -> Result<T> {
            serde_json::from_str(text)
                .map_err(|e| Error::artifact(path, format!("bad `{key}` metadata: {e}")))
        }
        let spec: ModelSpec = parse(path, "mlops.model", get("mlops.model")?)?;
        spec.params()
            .map_err(|e| Error::artifact(path, format!("its model spec is invalid: {e}")))?;
        let precision_name = get("mlops.precision")?;
        let precision = Precision::parse(precision_name).ok_or_else(|| {
            Error::artifact(
                path,
                format!("precision `{precision_name}` is not supported (fp32, fp16, bf16, int8)"),
            )
        })?;
        let input: InputSpec = parse(path, "mlops.input", get("mlops.input")?)?;
        let labels: Vec<String> = parse(path, "mlops.labels", get("mlops.labels")?)?;
        // Consumers index labels by class and size inputs by `mlops.input` (serve does
        // both for every request), so a mismatch is refused here, once.
        if labels.len() != spec.classes {
            return Err(Error::artifact(
                path,
                format!(
                    "`mlops.labels` names {} classes, the model has {}",
                    labels.len(),
                    spec.classes
                ),
            ));
        }
        if input.shape != spec.input {
            return Err(Error::artifact(
                path,
                format!(
                    "`mlops.input` shape {:?} differs from the model's input {:?}",
                    input.shape, spec.input
                ),
            ));
        }
        let lineage: Vec<LineageEntry> = parse(path, "mlops.lineage", get("mlops.lineage")?)?;
        let metrics: Option<EvalMetrics> = metadata
            .get("mlops.metrics")
            .map(|t| parse(path, "mlops.metrics", t))
            .transpose()?;
        let quantization: Option<serde_json::Value> = metadata
            .get("mlops.quantization")
            .map(|t| parse(path, "mlops.quantization", t))
            .transpose()?;
        let sparsity: Option<serde_json::Value> = metadata
            .get("mlops.sparsity")
            .map(|t| parse(path, "mlops.sparsity", t))
            .transpose()?;
        let mut by_name: BTreeMap<String, NamedTensor> =
            tensors.into_iter().map(|t| (t.name.clone(), t)).collect();
        let mut ordered = Vec::new();
        let expected = expected_tensors(&spec, precision, quantization.as_ref())
            .map_err(|e| Error::artifact(path, e.to_string()))?;
        for (name, shape, dtype) in expected {
            let t = by_name.remove(&name).ok_or_else(|| {
                Error::artifact(
                    path,
                    format!("tensor `{name}` required by the model spec ({precision}) is missing"),
                )
            })?;
            if t.shape != shape {
                return Err(Error::artifact(
                    path,
                    format!(
                        "tensor `{name}` has shape {:?}, the spec needs {shape:?}",
                        t.shape
                    ),
                ));
            }
            if t.data.dtype_name() != dtype {
                return Err(Error::artifact(
                    path,
                    format!(
                        "tensor `{name}` is {} but a {precision} artifact stores it as {dtype}",
                        t.data.dtype_name()
                    ),
                ));
            }
            ordered.push(t);
        }
        if let Some(name) = by_name.keys().next() {
            return Err(Error::artifact(
                path,
                format!("unexpected tensor `{name}` not in the model spec"),
            ));
        }
        Ok(Artifact {
            spec,
            precision,
            input,
            labels,
            lineage,
            metrics,
            quantization,
            sparsity,
            tensors: ordered,
        })
    }

    /// sha256 (hex) of the tensors: for each tensor in name order, its name, dtype,
    /// shape (u64 little-endian per dimension) and stored bytes. safetensors has no
    /// checksum of its own; this is stored in `mlops.digest` and checked at load, so a
    /// flipped bit in a weight is an error, not a silently different model. Costs one
    /// sha256 pass over the weights (~1 ms for the reference CNN's 373 KB).
    pub fn digest(&self) -> String {
        tensors_digest(&self.tensors)
    }

    /// Checks every number the runtimes read: weights and biases finite, int8 scales
    /// finite and positive normal numbers, `mlops.input` scale and std the same, its
    /// mean finite, recorded metrics finite. The error names the tensor or key.
    ///
    /// Scales must be at least `f32::MIN_POSITIVE` (~1.2e-38): the CPU kernels run with
    /// denormals flushed to zero (`nn::denormals`), where a smaller scale would act as 0
    /// (a division by zero), and a plain `> 0.0` test would pass or fail it depending on
    /// the calling thread's floating-point mode.
    ///
    /// # Errors
    /// A description of the first bad number found.
    pub fn check_numbers(&self) -> std::result::Result<(), String> {
        let InputSpec {
            scale, mean, std, ..
        } = self.input;
        if !positive_normal(scale) {
            return Err(format!(
                "`mlops.input` scale is {scale}; it must be finite and positive, at least {:e} (1/255 for bytes scaled to [0, 1])",
                f32::MIN_POSITIVE
            ));
        }
        if !mean.is_finite() {
            return Err(format!("`mlops.input` mean is {mean}; it must be finite"));
        }
        if !positive_normal(std) {
            return Err(format!(
                "`mlops.input` std is {std}; it must be finite and positive, at least {:e} (1 when there is no normalisation)",
                f32::MIN_POSITIVE
            ));
        }
        for t in &self.tensors {
            let is_scale = t.name.ends_with("_scale");
            let Some(values) = t.data.to_f32() else {
                continue;
            };
            if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                return Err(format!(
                    "tensor `{}` holds a non-finite value ({v} at index {i}); the artifact is damaged or came from a training run that diverged",
                    t.name
                ));
            }
            if is_scale {
                if let Some((i, v)) = values
                    .iter()
                    .enumerate()
                    .find(|(_, v)| !positive_normal(**v))
                {
                    return Err(format!(
                        "tensor `{}` holds scale {v} at index {i}; quantization scales must be positive, at least {:e}; quantize the model again",
                        t.name,
                        f32::MIN_POSITIVE
                    ));
                }
            }
        }
        if let Some(m) = &self.metrics {
            if !(m.loss.is_finite() && (0.0..=1.0).contains(&m.accuracy)) {
                return Err(format!(
                    "`mlops.metrics` records accuracy {} and loss {}; accuracy must be in [0, 1] and loss finite",
                    m.accuracy, m.loss
                ));
            }
        }
        Ok(())
    }

    /// Whether the recorded lineage is a consistent chain ending at this artifact.
    pub fn lineage_check(&self) -> LineageCheck {
        let own = self.digest();
        let Some(last) = self.lineage.last() else {
            return LineageCheck::Unrecorded;
        };
        if self.lineage.iter().all(|e| e.digest.is_none()) {
            return LineageCheck::Unrecorded;
        }
        if last.digest.as_deref() != Some(own.as_str()) {
            return LineageCheck::Broken(format!(
                "the last step (`{}`) recorded weights {}, this file holds {}",
                last.step,
                short(last.digest.as_deref().unwrap_or("none")),
                short(&own)
            ));
        }
        for (i, pair) in self.lineage.windows(2).enumerate() {
            let (parent, child) = (&pair[0], &pair[1]);
            if let (Some(made), Some(used)) = (&parent.digest, &child.parent_digest) {
                if made != used {
                    return LineageCheck::Broken(format!(
                        "step {} (`{}`) started from weights {}, but step {} (`{}`) wrote {}",
                        i + 2,
                        child.step,
                        short(used),
                        i + 1,
                        parent.step,
                        short(made)
                    ));
                }
            }
        }
        LineageCheck::Intact
    }

    /// Bytes of all weights as stored.
    pub fn weight_bytes(&self) -> usize {
        self.tensors
            .iter()
            .map(|t| t.data.to_le_bytes().len())
            .sum()
    }
}

/// The tensors an artifact of `precision` must hold: name, shape, dtype, in order.
///
/// int8 adds, per int8 conv/dense layer, `weight_scale` (one per output channel) and,
/// for static layers, the input activation's `input_scale` and `input_zero_point`;
/// biases and the weights of layers kept in fp32 stay f32 (see [`LayerPrecision`]).
/// Dtypes are safetensors names (`F32`, `F16`, `BF16`, `I8`, `U8`).
///
/// # Errors
/// - [`Error::Spec`] / [`Error::SpecLayer`] when `spec` is invalid.
/// - [`Error::Config`] when a per-layer precision in `quantization` is unknown
///   ([`LayerPrecision::of_layer`]).
pub fn expected_tensors(
    spec: &ModelSpec,
    precision: Precision,
    quantization: Option<&serde_json::Value>,
) -> Result<Vec<(String, Vec<usize>, &'static str)>> {
    let mut out = Vec::new();
    for info in spec.params()? {
        let is_weight = info.name.ends_with(".weight");
        match precision {
            Precision::Int8 if is_weight => {
                let layer = LayerPrecision::of_layer(quantization, &info.name)?;
                if layer == LayerPrecision::Fp32 {
                    out.push((info.name.clone(), info.shape.clone(), "F32"));
                    continue;
                }
                let prefix = info.name.trim_end_matches("weight");
                out.push((info.name.clone(), info.shape.clone(), "I8"));
                out.push((format!("{}_scale", info.name), vec![info.shape[0]], "F32"));
                if layer == LayerPrecision::Int8Static {
                    out.push((format!("{prefix}input_scale"), vec![1], "F32"));
                    out.push((format!("{prefix}input_zero_point"), vec![1], "U8"));
                }
            }
            Precision::Int8 => out.push((info.name.clone(), info.shape.clone(), "F32")),
            _ => out.push((
                info.name.clone(),
                info.shape.clone(),
                precision.dtype_name(),
            )),
        }
    }
    Ok(out)
}

/// sha256 (hex) of tensors: for each in name order, its name, dtype, shape (u64
/// little-endian per dimension) and stored bytes ([`Artifact::digest`], and checkpoints').
pub fn tensors_digest(tensors: &[NamedTensor]) -> String {
    use sha2::{Digest as _, Sha256};
    let mut order: Vec<&NamedTensor> = tensors.iter().collect();
    order.sort_by(|a, b| a.name.cmp(&b.name));
    let mut hasher = Sha256::new();
    for t in order {
        hasher.update(t.name.as_bytes());
        hasher.update([0]);
        hasher.update(t.data.dtype_name().as_bytes());
        hasher.update([0]);
        hasher.update((t.shape.len() as u64).to_le_bytes());
        for &d in &t.shape {
            hasher.update((d as u64).to_le_bytes());
        }
        hasher.update(t.data.to_le_bytes());
    }
    crate::io::hex(&hasher.finalize())
}

/// The metadata key of [`Digest`].
pub const DIGEST_KEY: &str = "mlops.digest";

/// `mlops.digest`: what the file held when mlops wrote it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Digest {
    /// Always `sha256`.
    pub algorithm: String,
    /// [`Artifact::digest`] of the tensors.
    pub tensors: String,
    /// sha256 of every other `mlops.*` metadata key and value, in key order, so an edited
    /// `mlops.metrics` or lineage is noticed too.
    pub metadata: String,
}

/// sha256 of every metadata key and value but `mlops.digest`, in key order.
pub fn metadata_digest(metadata: &BTreeMap<String, String>) -> String {
    let mut text = Vec::new();
    for (key, value) in metadata.iter().filter(|(k, _)| k.as_str() != DIGEST_KEY) {
        text.extend_from_slice(key.as_bytes());
        text.push(0);
        text.extend_from_slice(value.as_bytes());
        text.push(0);
    }
    sha256_hex(&text)
}

/// Checks `mlops.digest` against what was loaded. Artifacts written before digests
/// existed have none and load as they are (`mlops inspect` says so).
/// Shared by artifacts and checkpoints (`checkpoint::Checkpoint::load`).
pub(crate) fn verify_digest(
    path: &Path,
    tensors: &[NamedTensor],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let Some(text) = metadata.get(DIGEST_KEY) else {
        return Ok(());
    };
    let digest: Digest = serde_json::from_str(text)
        .map_err(|e| Error::artifact(path, format!("bad `{DIGEST_KEY}` metadata: {e}")))?;
    if digest.algorithm != "sha256" {
        return Err(Error::artifact(
            path,
            format!(
                "`{DIGEST_KEY}` uses `{}`; this mlops checks sha256",
                digest.algorithm
            ),
        ));
    }
    if digest.tensors != tensors_digest(tensors) {
        return Err(Error::artifact(
            path,
            "its tensor data does not match the digest recorded when it was written: the file was changed or damaged (a flipped bit in a weight?); restore it from its source or rebuild it",
        ));
    }
    if digest.metadata != metadata_digest(metadata) {
        return Err(Error::artifact(
            path,
            "its `mlops.*` metadata does not match the digest recorded when it was written: the metrics, lineage or settings were edited after mlops wrote it; rebuild it rather than edit it",
        ));
    }
    Ok(())
}

/// The first 12 characters of a hex digest, for messages.
pub fn short(hex: &str) -> &str {
    hex.get(..12).unwrap_or(hex)
}

/// A metadata value: compact JSON (every `mlops.*` key holds one).
fn json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("metadata serializes")
}

/// Finite, positive and not subnormal (false for NaN). Compares against a normal number,
/// so the answer is the same with denormals flushed (DAZ) or not.
fn positive_normal(v: f32) -> bool {
    v >= f32::MIN_POSITIVE && v.is_finite()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Artifact {
        let spec = ModelSpec::reference_cnn();
        let plan = crate::nn::Plan::compile(&spec).unwrap();
        Artifact::from_params(&spec, &plan.init_params(0)).unwrap()
    }

    #[test]
    fn save_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let a = tiny();
        a.save(&path).unwrap();
        let (b, record) = Artifact::load(&path).unwrap();
        assert_eq!(a, b);
        assert_eq!(record.bytes, std::fs::metadata(&path).unwrap().len());
    }

    #[test]
    fn fp16_is_about_half_and_close() {
        let a = tiny();
        let h = a.cast(Precision::Fp16).unwrap();
        let ratio = h.to_bytes().unwrap().len() as f64 / a.to_bytes().unwrap().len() as f64;
        assert!((0.45..0.56).contains(&ratio), "{ratio}");
        for (x, y) in a.params_f32().iter().zip(h.params_f32()) {
            for (p, q) in x.iter().zip(y) {
                assert!((p - q).abs() <= p.abs() * 1e-3 + 1e-6);
            }
        }
    }

    #[test]
    fn other_format_is_rejected() {
        let a = tiny();
        let mut metadata = BTreeMap::new();
        metadata.insert("mlops.format".to_string(), "mlops/9".to_string());
        let bytes = safetensors::encode(&a.tensors, &metadata).unwrap();
        let (tensors, meta) = safetensors::decode(Path::new("m"), &bytes).unwrap();
        let err = Artifact::from_parts(Path::new("m"), tensors, &meta).unwrap_err();
        assert!(err.to_string().contains("mlops/9"), "{err}");
    }

    /// Zero, negative and subnormal scales are refused, with denormals flushed (as on the
    /// CPU runtime's threads) and without: the answer does not depend on the thread.
    #[test]
    fn scales_must_be_positive_normal_numbers_in_any_float_mode() {
        let scaled = |name: &str, v: f32| {
            let mut a = tiny();
            a.tensors.push(NamedTensor {
                name: format!("{name}_scale"),
                shape: vec![2],
                data: TensorData::F32(vec![0.5, v]),
            });
            a
        };
        for v in [0.0, -0.5, 1e-39, f32::from_bits(1)] {
            for flushed in [false, true] {
                let check = || scaled("layers.0.weight", v).check_numbers();
                let err = if flushed {
                    crate::nn::denormals::with_denormals_flushed(check)
                } else {
                    check()
                }
                .unwrap_err();
                assert!(
                    err.contains("`layers.0.weight_scale`") && err.contains("index 1"),
                    "{err}"
                );
            }
            let mut a = tiny();
            a.input.std = v;
            assert!(a.check_numbers().unwrap_err().contains("std"));
            a = tiny();
            a.input.scale = v;
            assert!(a.check_numbers().unwrap_err().contains("scale"));
        }
        assert!(scaled("layers.0.weight", f32::MIN_POSITIVE)
            .check_numbers()
            .is_ok());
    }

    /// Labels that do not match the classes are refused at load (serve indexes them by
    /// class for every answer).
    #[test]
    fn labels_must_match_the_classes() {
        let mut a = tiny();
        a.labels.pop();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        a.save(&path).unwrap();
        let err = Artifact::load(&path).unwrap_err().to_string();
        assert!(err.contains("names 9 classes, the model has 10"), "{err}");
    }
}
