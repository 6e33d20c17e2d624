//! Training checkpoints, the other kind of safetensors file mlops writes (beside
//! artifacts, so one module reads and writes every `.safetensors`): weights, Adam moments
//! and where the run stood, written atomically after every epoch with a digest, so
//! `--resume` continues exactly where an interrupted run left off.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::safetensors::{decode, encode, read_header_metadata, NamedTensor, TensorData};
use super::{metadata_digest, tensors_digest, Digest, DIGEST_KEY};
use crate::io::write_atomically;
use crate::model::ModelSpec;
use crate::nn::adam::Adam;
use crate::{Error, Result};

/// Everything besides tensors that a resumed run must agree with or restore.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Epochs completed.
    pub epoch: usize,
    /// The architecture.
    pub spec: ModelSpec,
    /// Settings that change the result; a resumed run must use the same ones.
    pub settings: BTreeMap<String, serde_json::Value>,
    /// The random streams: ChaCha8 seeded from `seed` and the epoch (shuffle) or step
    /// (dropout), so (seed, epoch, Adam step) is the whole RNG state.
    pub rng: serde_json::Value,
}

/// A checkpoint in memory.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// Run state.
    pub state: CheckpointState,
    /// Parameters, spec order.
    pub params: Vec<Vec<f32>>,
    /// Optimizer moments and step.
    pub adam: Adam,
}

impl Checkpoint {
    /// Writes the checkpoint atomically: `params` and the Adam moments as F32 tensors of
    /// the spec's shapes (`name`, `adam.m.name`, `adam.v.name`), `adam.step` as U64 `[1]`.
    ///
    /// # Errors
    /// - [`Error::Spec`] / [`Error::SpecLayer`] when `state.spec` is invalid.
    /// - [`Error::Artifact`] naming `path` when a tensor holds a non-finite value (training
    ///   diverged); nothing is written then.
    /// - [`Error::Config`] when a tensor's length does not match its spec shape.
    /// - [`Error::Io`] when the file cannot be written (or its folder does not exist).
    pub fn save(&self, path: &Path) -> Result<()> {
        let infos = self.state.spec.params()?;
        let mut tensors = Vec::new();
        for (prefix, values) in [
            ("", &self.params),
            ("adam.m.", &self.adam.m),
            ("adam.v.", &self.adam.v),
        ] {
            for (info, v) in infos.iter().zip(values.iter()) {
                tensors.push(NamedTensor {
                    name: format!("{prefix}{}", info.name),
                    shape: info.shape.clone(),
                    data: TensorData::F32(v.clone()),
                });
            }
        }
        tensors.push(NamedTensor {
            name: "adam.step".into(),
            shape: vec![1],
            data: TensorData::U64(vec![self.adam.step]),
        });
        if let Some(t) = tensors.iter().find(|t| {
            t.data
                .to_f32()
                .is_some_and(|v| v.iter().any(|x| !x.is_finite()))
        }) {
            return Err(Error::artifact(
                path,
                format!(
                    "refusing to write the checkpoint: tensor `{}` holds a non-finite value (training diverged; lower `--lr`)",
                    t.name
                ),
            ));
        }
        let mut metadata = BTreeMap::new();
        metadata.insert("mlops.checkpoint".to_string(), super::json(&self.state));
        let digest = Digest {
            algorithm: "sha256".into(),
            tensors: tensors_digest(&tensors),
            metadata: metadata_digest(&metadata),
        };
        metadata.insert(DIGEST_KEY.to_string(), super::json(&digest));
        write_atomically(path, &encode(&tensors, &metadata)?)
    }

    /// Whether `path` is a training checkpoint (`mlops.checkpoint` metadata). `mlops
    /// train` writes one beside the model, so `runs/x/*.safetensors` globs include it;
    /// commands that take many artifacts skip it instead of failing.
    /// Reads only the header, so artifacts are not read twice.
    pub fn is_checkpoint(path: &Path) -> bool {
        read_header_metadata(path).is_some_and(|m| m.contains_key("mlops.checkpoint"))
    }

    /// Reads a checkpoint, checking every tensor against the spec inside it.
    ///
    /// # Errors
    /// - [`Error::Config`] when `path` is not a file (`--resume` without a checkpoint).
    /// - [`Error::Io`] when it cannot be read.
    /// - [`Error::Artifact`] naming `path` when it is not valid safetensors, fails its
    ///   `mlops.digest`, lacks or has a bad `mlops.checkpoint`, or a tensor (or
    ///   `adam.step`) is missing or has the wrong shape or dtype.
    /// - [`Error::Spec`] / [`Error::SpecLayer`] when the recorded spec is invalid.
    pub fn load(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::Config(format!(
                "`--resume` needs a checkpoint but `{}` does not exist; run without `--resume` to start fresh",
                path.display()
            )));
        }
        let bytes = std::fs::read(path).map_err(|e| Error::io("read", path, e))?;
        let (tensors, metadata) = decode(path, &bytes)?;
        // Same integrity check as artifacts: a checkpoint that changed after it was
        // written must not resume silently.
        super::verify_digest(path, &tensors, &metadata)?;
        let state: CheckpointState = metadata
            .get("mlops.checkpoint")
            .ok_or_else(|| {
                Error::artifact(
                    path,
                    "not an mlops checkpoint (no `mlops.checkpoint` metadata)",
                )
            })
            .and_then(|t| {
                serde_json::from_str(t)
                    .map_err(|e| Error::artifact(path, format!("bad `mlops.checkpoint`: {e}")))
            })?;
        let mut by_name: BTreeMap<String, NamedTensor> =
            tensors.into_iter().map(|t| (t.name.clone(), t)).collect();
        let mut take = |name: String, shape: &[usize]| -> Result<Vec<f32>> {
            match by_name.remove(&name) {
                Some(NamedTensor {
                    shape: s,
                    data: TensorData::F32(v),
                    ..
                }) if s == shape => Ok(v),
                _ => Err(Error::artifact(
                    path,
                    format!("tensor `{name}` is missing or has the wrong shape or dtype"),
                )),
            }
        };
        let infos = state.spec.params()?;
        let mut params = Vec::new();
        let mut adam = Adam::new(&[]);
        for info in &infos {
            params.push(take(info.name.clone(), &info.shape)?);
            adam.m
                .push(take(format!("adam.m.{}", info.name), &info.shape)?);
            adam.v
                .push(take(format!("adam.v.{}", info.name), &info.shape)?);
        }
        adam.step = match by_name.remove("adam.step").map(|t| t.data) {
            Some(TensorData::U64(v)) if v.len() == 1 => v[0],
            _ => return Err(Error::artifact(path, "tensor `adam.step` is missing")),
        };
        Ok(Checkpoint {
            state,
            params,
            adam,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint() -> Checkpoint {
        let spec = ModelSpec::reference_cnn();
        let params = crate::nn::Plan::compile(&spec).unwrap().init_params(1);
        Checkpoint {
            state: CheckpointState {
                epoch: 1,
                spec,
                settings: BTreeMap::new(),
                rng: serde_json::json!({}),
            },
            adam: Adam::new(&params),
            params,
        }
    }

    /// Issue 10 (integrity): a checkpoint with a flipped bit resumed silently.
    #[test]
    fn a_changed_checkpoint_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint.safetensors");
        checkpoint().save(&path).unwrap();
        Checkpoint::load(&path).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() - 100;
        bytes[at] ^= 0x10;
        std::fs::write(&path, bytes).unwrap();
        let err = Checkpoint::load(&path).unwrap_err().to_string();
        assert!(err.contains("does not match the digest"), "{err}");
    }

    /// A diverged run's weights are never written as a checkpoint.
    #[test]
    fn a_non_finite_checkpoint_is_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint.safetensors");
        let mut ck = checkpoint();
        ck.params[3][0] = f32::NAN;
        let err = ck.save(&path).unwrap_err().to_string();
        assert!(err.contains("non-finite"), "{err}");
        assert!(!path.exists());
    }
}
