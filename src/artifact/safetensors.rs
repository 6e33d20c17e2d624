//! Reading and writing `.safetensors` files with a canonical header.
//!
//! The `safetensors` crate keeps `__metadata__` in a `HashMap`, so its header order varies
//! from process to process; [`encode`] re-emits the header with sorted keys (same length,
//! same offsets) so that the same model always gives the same bytes and the same sha256.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};

use crate::{Error, Result};

/// The values of a tensor, in one of the dtypes mlops stores.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    /// 32-bit float.
    F32(Vec<f32>),
    /// IEEE half.
    F16(Vec<f16>),
    /// bfloat16.
    BF16(Vec<bf16>),
    /// 64-bit unsigned (checkpoint counters).
    U64(Vec<u64>),
    /// Signed bytes (int8 weights).
    I8(Vec<i8>),
    /// Unsigned bytes (int8 activation zero points).
    U8(Vec<u8>),
}

impl TensorData {
    fn dtype(&self) -> Dtype {
        match self {
            TensorData::F32(_) => Dtype::F32,
            TensorData::F16(_) => Dtype::F16,
            TensorData::BF16(_) => Dtype::BF16,
            TensorData::U64(_) => Dtype::U64,
            TensorData::I8(_) => Dtype::I8,
            TensorData::U8(_) => Dtype::U8,
        }
    }

    /// Name of the dtype as safetensors spells it.
    pub fn dtype_name(&self) -> &'static str {
        match self {
            TensorData::F32(_) => "F32",
            TensorData::F16(_) => "F16",
            TensorData::BF16(_) => "BF16",
            TensorData::U64(_) => "U64",
            TensorData::I8(_) => "I8",
            TensorData::U8(_) => "U8",
        }
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            TensorData::F32(v) => v.len(),
            TensorData::F16(v) => v.len(),
            TensorData::BF16(v) => v.len(),
            TensorData::U64(v) => v.len(),
            TensorData::I8(v) => v.len(),
            TensorData::U8(v) => v.len(),
        }
    }

    /// True when it holds no value.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Little-endian bytes, as stored on disk.
    pub fn to_le_bytes(&self) -> Vec<u8> {
        match self {
            TensorData::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::F16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::BF16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::U64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::I8(v) => v.iter().map(|&x| x as u8).collect(),
            TensorData::U8(v) => v.clone(),
        }
    }

    /// The values widened to f32 (floats only).
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        match self {
            TensorData::F32(v) => Some(v.clone()),
            TensorData::F16(v) => Some(v.iter().map(|x| x.to_f32()).collect()),
            TensorData::BF16(v) => Some(v.iter().map(|x| x.to_f32()).collect()),
            TensorData::U64(_) | TensorData::I8(_) | TensorData::U8(_) => None,
        }
    }

    fn from_le_bytes(dtype: Dtype, bytes: &[u8]) -> Option<Self> {
        Some(match dtype {
            Dtype::F32 => TensorData::F32(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            Dtype::F16 => TensorData::F16(
                bytes
                    .chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            ),
            Dtype::BF16 => TensorData::BF16(
                bytes
                    .chunks_exact(2)
                    .map(|c| bf16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            ),
            Dtype::U64 => TensorData::U64(
                bytes
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect(),
            ),
            Dtype::I8 => TensorData::I8(bytes.iter().map(|&b| b as i8).collect()),
            Dtype::U8 => TensorData::U8(bytes.to_vec()),
            _ => return None,
        })
    }
}

/// A named tensor as stored in a file.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    /// `layers.3.weight`, ...
    pub name: String,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// The values.
    pub data: TensorData,
}

/// A file's `__metadata__` from its header alone (the 8-byte length and the JSON after
/// it), without reading the tensors: for telling kinds of files apart cheaply. `None`
/// when the file is not readable safetensors.
pub fn read_header_metadata(path: &Path) -> Option<BTreeMap<String, String>> {
    use std::io::Read;
    /// A header larger than this is not one we wrote.
    const MAX_HEADER: u64 = 100 << 20;
    let mut file = std::fs::File::open(path).ok()?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).ok()?;
    let len = u64::from_le_bytes(len);
    if len > MAX_HEADER {
        return None;
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header).ok()?;
    let mut parsed: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&header).ok()?;
    serde_json::from_value(parsed.remove("__metadata__")?).ok()
}

/// Serializes tensors and string metadata into safetensors bytes with a sorted header.
///
/// # Errors
/// [`Error::Config`] when a tensor's values do not fill its `shape` exactly, or the
/// `safetensors` crate refuses to serialize (a header past its 100 MB limit).
pub fn encode(tensors: &[NamedTensor], metadata: &BTreeMap<String, String>) -> Result<Vec<u8>> {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|t| t.data.to_le_bytes()).collect();
    let mut views = Vec::with_capacity(tensors.len());
    for (t, b) in tensors.iter().zip(&bytes) {
        let view = safetensors::tensor::TensorView::new(t.data.dtype(), t.shape.clone(), b)
            .map_err(|e| Error::Config(format!("tensor `{}`: {e}", t.name)))?;
        views.push((t.name.clone(), view));
    }
    let info: HashMap<String, String> = metadata.clone().into_iter().collect();
    let mut buffer = safetensors::serialize(views, Some(info))
        .map_err(|e| Error::Config(format!("cannot serialize tensors: {e}")))?;
    canonicalize_header(&mut buffer);
    Ok(buffer)
}

/// Rewrites the JSON header in place with sorted keys; the length never changes.
fn canonicalize_header(buffer: &mut [u8]) {
    let n = u64::from_le_bytes(buffer[..8].try_into().expect("8-byte length")) as usize;
    let header = &buffer[8..8 + n];
    let Ok(parsed) = serde_json::from_slice::<BTreeMap<String, serde_json::Value>>(header) else {
        return;
    };
    let sorted: BTreeMap<String, serde_json::Value> = parsed
        .into_iter()
        .map(|(k, v)| {
            let v = match v {
                serde_json::Value::Object(map) => {
                    serde_json::to_value(map.into_iter().collect::<BTreeMap<_, _>>())
                        .expect("json values serialize")
                }
                other => other,
            };
            (k, v)
        })
        .collect();
    let text = serde_json::to_vec(&sorted).expect("json values serialize");
    if text.len() <= n {
        buffer[8..8 + text.len()].copy_from_slice(&text);
        buffer[8 + text.len()..8 + n].fill(b' ');
    }
}

/// Parses safetensors bytes read from `path` into tensors (sorted by name) and metadata.
///
/// # Errors
/// [`Error::Artifact`] naming `path` when the bytes are not valid safetensors (truncated,
/// another format, an unreadable header) or a tensor has a dtype mlops does not store
/// (anything but F32, F16, BF16, U64, I8, U8).
pub fn decode(path: &Path, bytes: &[u8]) -> Result<(Vec<NamedTensor>, BTreeMap<String, String>)> {
    let parsed = SafeTensors::deserialize(bytes).map_err(|e| {
        Error::artifact(
            path,
            format!("not a valid safetensors file ({e}); it may be truncated or of another format"),
        )
    })?;
    let (_, header) = SafeTensors::read_metadata(bytes)
        .map_err(|e| Error::artifact(path, format!("unreadable safetensors header: {e}")))?;
    let metadata: BTreeMap<String, String> = header
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let mut tensors = Vec::new();
    for (name, view) in parsed.tensors() {
        let data = TensorData::from_le_bytes(view.dtype(), view.data()).ok_or_else(|| {
            Error::artifact(
                path,
                format!("tensor `{name}` has unsupported dtype {:?}", view.dtype()),
            )
        })?;
        tensors.push(NamedTensor {
            name,
            shape: view.shape().to_vec(),
            data,
        });
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((tensors, metadata))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_is_deterministic_and_round_trips() {
        let tensors = vec![NamedTensor {
            name: "a".into(),
            shape: vec![2],
            data: TensorData::F32(vec![1.0, 2.0]),
        }];
        let metadata: BTreeMap<String, String> = (0..20)
            .map(|i| (format!("k{i}"), format!("v{i}")))
            .collect();
        let first = encode(&tensors, &metadata).unwrap();
        for _ in 0..5 {
            assert_eq!(encode(&tensors, &metadata).unwrap(), first);
        }
        let (back, meta) = decode(Path::new("x"), &first).unwrap();
        assert_eq!(back, tensors);
        assert_eq!(meta, metadata);
    }
}
