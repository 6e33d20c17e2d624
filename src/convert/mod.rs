//! The convert stage: a model from another framework's file as an mlops artifact.
//!
//! [`convert`] detects the format by its first bytes (zip: Keras 3 `.keras`; the HDF5
//! signature: legacy Keras `.h5`; otherwise an ONNX protobuf), reads the model through the
//! format's reader ([`crate::onnx::from_onnx`], [`keras`]), and returns an fp32 artifact
//! whose lineage starts with a `convert` step recording the source file's sha256 and
//! format. The input mapping (`mlops.input`) comes from the caller, else from the file's
//! own metadata when mlops wrote it, else `pixel / 255` (what Keras and PyTorch MNIST
//! models are usually trained on).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::artifact::{Artifact, InputSpec, LineageEntry};
use crate::io::FileRecord;
use crate::model::LayerSpec;
use crate::{Error, Result};

pub mod keras;

/// Largest model file read (bytes): 2 GiB, protobuf's own message limit.
pub const MAX_FILE_BYTES: u64 = 2 << 30;

/// The formats [`convert`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceFormat {
    /// ONNX protobuf (`.onnx`).
    Onnx,
    /// Keras 3 zip archive (`.keras`).
    Keras,
    /// Legacy Keras HDF5 (`.h5`).
    KerasH5,
}

impl SourceFormat {
    /// The format of `bytes` by magic number (protobuf has none: anything else is tried as
    /// ONNX).
    pub fn detect(bytes: &[u8]) -> Self {
        if bytes.starts_with(b"PK\x03\x04") {
            SourceFormat::Keras
        } else if bytes.starts_with(b"\x89HDF\r\n\x1a\n") {
            SourceFormat::KerasH5
        } else {
            SourceFormat::Onnx
        }
    }

    /// The name in reports and lineage.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceFormat::Onnx => "onnx",
            SourceFormat::Keras => "keras",
            SourceFormat::KerasH5 => "keras_h5",
        }
    }
}

/// How raw pixels become the model's input: `value = (pixel * scale - mean) / std`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct InputMapping {
    /// Multiplies the byte pixel value.
    pub scale: f32,
    /// Subtracted after scaling.
    pub mean: f32,
    /// Divided by last (non-zero).
    pub std: f32,
}

impl Default for InputMapping {
    /// `pixel / 255`: what Keras and PyTorch MNIST tutorials feed their models.
    fn default() -> Self {
        InputMapping {
            scale: crate::data::PIXEL_SCALE,
            mean: 0.0,
            std: 1.0,
        }
    }
}

/// Settings of a conversion.
#[derive(Debug, Clone, Default)]
pub struct ConvertConfig {
    /// The input mapping; `None`: the file's own (`mlops.input`, when mlops exported it),
    /// else [`InputMapping::default`].
    pub input: Option<InputMapping>,
    /// Class names (one per class); `None`: the file's own, else `0`, `1`, ...
    pub labels: Option<Vec<String>>,
}

/// What a conversion read and made (the `metrics` of `mlops convert --json`).
#[derive(Debug, Clone, Serialize)]
pub struct ConvertReport {
    /// The source file's format.
    pub format: SourceFormat,
    /// The tool that wrote it, when recorded (`pytorch 2.15.0`, `keras 3.15.1`).
    pub producer: String,
    /// ONNX opset, when the source is ONNX.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub opset: Option<i64>,
    /// Source layout of images: `nchw` or `nhwc`.
    pub source_layout: String,
    /// Our layers, by kind (`conv2d`, `dense`, ...).
    pub layers: Vec<String>,
    /// Parameters (weights and biases).
    pub parameters: usize,
    /// Input `[height, width, channels]`.
    pub input_shape: [usize; 3],
    /// The input mapping used, and where it came from (`flags`, `file`, `default`).
    pub input: InputMapping,
    /// Where the input mapping came from.
    pub input_from: String,
    /// Classes.
    pub classes: usize,
}

/// A model read from a foreign file, before it becomes an artifact.
#[derive(Debug, Clone)]
pub struct Read {
    /// Our spec.
    pub spec: crate::model::ModelSpec,
    /// fp32 parameters in spec order, in our layouts.
    pub params: Vec<Vec<f32>>,
    /// Key/value metadata of the file (`mlops.input`, `mlops.labels` when mlops wrote it).
    pub metadata: BTreeMap<String, String>,
    /// Who wrote it.
    pub producer: String,
    /// ONNX opset (ONNX only).
    pub opset: Option<i64>,
    /// `nchw` or `nhwc`.
    pub source_layout: String,
}

/// Reads `bytes` (the file at `path`) in the format they are in.
///
/// # Errors
/// [`Error::Data`] naming `path` and what in it is unsupported or malformed (the layer or
/// node, its class or op, and what is supported); [`Error::Spec`] when the model fails our
/// spec's checks.
pub fn read(path: &Path, bytes: &[u8]) -> Result<(SourceFormat, Read)> {
    if crate::artifact::looks_like_safetensors(bytes) {
        return Err(Error::data(
            path,
            "is a safetensors file, not a Keras or ONNX model; if it is already an mlops artifact, use it as it is (`mlops inspect` shows what it holds)",
        ));
    }
    let format = SourceFormat::detect(bytes);
    let read = match format {
        SourceFormat::Onnx => {
            let imported = crate::onnx::from_onnx(path, bytes)?;
            Read {
                spec: imported.spec,
                params: imported.params,
                metadata: imported.metadata.into_iter().collect(),
                producer: imported.producer,
                opset: Some(imported.opset),
                source_layout: if imported.nchw_input { "nchw" } else { "nhwc" }.into(),
            }
        }
        SourceFormat::Keras | SourceFormat::KerasH5 => keras::read(path, bytes, format)?,
    };
    Ok((format, read))
}

/// Converts the model file at `path` into an fp32 artifact; also returns the source
/// file's record (read and hashed once, here).
///
/// # Errors
/// [`Error::Io`] when the file cannot be read; [`Error::Data`] when it is larger than
/// [`MAX_FILE_BYTES`] or as [`read`]; [`Error::Config`] for labels that do not match the
/// classes or an input mapping that is not finite with a positive `std`.
pub fn convert(
    path: &Path,
    config: &ConvertConfig,
) -> Result<(Artifact, ConvertReport, FileRecord)> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io("read", path, e))?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(Error::data(
            path,
            format!(
                "is {} bytes; mlops converts models up to {MAX_FILE_BYTES} bytes",
                meta.len()
            ),
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io("read", path, e))?;
    let record = FileRecord::of_bytes(path, &bytes);
    let (format, read) = read(path, &bytes)?;
    let spec = read.spec;
    let mut artifact = Artifact::from_params(&spec, &read.params)?;

    let from_file: Option<InputSpec> = read
        .metadata
        .get("mlops.input")
        .and_then(|v| serde_json::from_str(v).ok());
    let (input, input_from) = match (config.input, &from_file) {
        (Some(m), _) => (m, "flags"),
        (None, Some(f)) => (
            InputMapping {
                scale: f.scale,
                mean: f.mean,
                std: f.std,
            },
            "file",
        ),
        (None, None) => (InputMapping::default(), "default"),
    };
    if ![input.scale, input.mean, input.std]
        .iter()
        .all(|v| v.is_finite())
        || input.std <= 0.0
    {
        return Err(Error::Config(format!(
            "the input mapping (scale {}, mean {}, std {}) must be finite with std > 0",
            input.scale, input.mean, input.std
        )));
    }
    artifact.input = InputSpec {
        scale: input.scale,
        mean: input.mean,
        std: input.std,
        ..InputSpec::unit_scaled(spec.input)
    };
    let file_labels: Option<Vec<String>> = read
        .metadata
        .get("mlops.labels")
        .and_then(|v| serde_json::from_str(v).ok())
        .filter(|l: &Vec<String>| l.len() == spec.classes);
    if let Some(labels) = config.labels.clone().or(file_labels) {
        if labels.len() != spec.classes {
            return Err(Error::Config(format!(
                "{} labels for a model of {} classes; give one label per class, in class order",
                labels.len(),
                spec.classes
            )));
        }
        artifact.labels = labels;
    }
    let mut args = BTreeMap::from([
        ("format".to_string(), format.as_str().into()),
        ("source".to_string(), record.path.clone().into()),
        ("producer".to_string(), read.producer.clone().into()),
        ("input_from".to_string(), input_from.into()),
    ]);
    if let Some(opset) = read.opset {
        args.insert("opset".into(), opset.into());
    }
    let mut entry = LineageEntry::new("convert", None, args);
    entry.parent_sha256 = Some(record.sha256.clone());
    artifact.lineage.push(entry);
    artifact
        .check_numbers()
        .map_err(|problem| Error::data(path, problem))?;

    let report = ConvertReport {
        format,
        producer: read.producer,
        opset: read.opset,
        source_layout: read.source_layout,
        layers: spec
            .layers
            .iter()
            .map(|l| LayerSpec::kind(l).to_string())
            .collect(),
        parameters: read.params.iter().map(Vec::len).sum(),
        input_shape: spec.input,
        input,
        input_from: input_from.into(),
        classes: spec.classes,
    };
    Ok((artifact, report, record))
}
