//! The export stage: a copy of an artifact at another float precision (fp32, fp16, bf16),
//! with its lineage, and how far the weights moved.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::artifact::{Artifact, LineageEntry, Precision};
use crate::io::FileRecord;
use crate::Result;

/// What an export did (the `metrics` of `mlops export --json`).
#[derive(Debug, Clone, Serialize)]
pub struct ExportReport {
    /// Precision of the input artifact.
    pub from_precision: Precision,
    /// Precision written.
    pub precision: Precision,
    /// Bytes of the input file.
    pub bytes_before: u64,
    /// Bytes of the exported artifact.
    pub bytes_after: u64,
    /// `bytes_after / bytes_before`.
    pub size_ratio: f64,
    /// Largest |w - w'| over all weights after the cast (round to nearest even).
    pub max_abs_weight_error: f32,
}

/// `artifact` (whose file is `record`) cast to `precision`, with an `export` lineage step
/// and no `mlops.metrics` (they were measured on the parent's weights, not these).
///
/// # Errors
/// An int8 artifact or target; a weight the cast makes non-finite (fp16 holds at most
/// 65,504) is refused when the result is written.
pub fn export(
    artifact: &Artifact,
    record: &FileRecord,
    precision: Precision,
) -> Result<(Artifact, ExportReport)> {
    let mut exported = artifact.cast(precision)?;
    exported.metrics = None;
    let args = BTreeMap::from([
        ("precision".to_string(), precision.as_str().into()),
        ("from".to_string(), artifact.precision.as_str().into()),
    ]);
    exported.lineage.push(LineageEntry::new(
        "export",
        Some((artifact, &record.sha256)),
        args,
    ));
    let max_abs_weight_error = artifact
        .params_f32()
        .iter()
        .zip(exported.params_f32())
        .flat_map(|(a, b)| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .collect::<Vec<_>>()
        })
        .fold(0.0f32, f32::max);
    let bytes_after = exported.to_bytes()?.len() as u64;
    let report = ExportReport {
        from_precision: artifact.precision,
        precision,
        bytes_before: record.bytes,
        bytes_after,
        size_ratio: bytes_after as f64 / record.bytes as f64,
        max_abs_weight_error,
    };
    Ok((exported, report))
}
