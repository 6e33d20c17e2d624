//! mlops: take an image classifier from training to a production artifact.
//!
//! The crate, in pipeline order:
//! - [`io`]: file records, sha256, atomic writes (a leaf every stage uses).
//! - [`data`]: IDX data sets (MNIST layout) loaded and checked.
//! - [`model`]: Sequential model specs from YAML, shapes inferred and validated.
//! - [`nn`]: the CPU numerics (im2col + GEMM conv, pooling, dense, loss, gradients).
//! - [`train`]: Adam training with checkpoints and resume.
//! - [`convert`]: ONNX and Keras models in, as artifacts.
//! - [`artifact`]: self-describing `.safetensors` artifacts (fp32, fp16, bf16).
//! - [`export`]: a copy of an artifact at another float precision.
//! - [`onnx`]: ONNX export (fp32, int8 QDQ) and import.
//! - [`prune`]: magnitude pruning schedules and masks.
//! - [`quantize`]: static int8 quantization with calibration.
//! - [`runtime`]: loading artifacts into sessions; evaluation.
//! - [`device`]: `cpu` / `cuda[:N]` selection.
//! - [`bench`](mod@bench): latency percentiles and throughput of loaded models.
//! - [`render`]: report files as HTML pages with charts, or Markdown tables.
//! - [`report`]: per-step reports (JSON for CI, tables for people).
//! - [`predict`]: class, label and probabilities per image.
//! - [`pipeline`]: the summary of a pipeline run, from the steps' typed reports.
//! - [`progress`]: the callback through which long work reports progress.
#![warn(missing_docs, clippy::missing_errors_doc, clippy::missing_panics_doc)]

pub mod artifact;
pub mod bench;
pub mod convert;
pub mod data;
pub mod device;
pub mod error;
pub mod export;
pub mod io;
pub mod model;
pub mod nn;
pub mod onnx;
pub mod pipeline;
pub mod predict;
pub mod progress;
pub mod prune;
pub mod quantize;
pub mod render;
pub mod report;
pub mod runtime;
pub mod serve;
pub mod train;

pub use error::{Error, Result};
