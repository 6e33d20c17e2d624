//! Recognising files that are models, but not mlops artifacts, by their first bytes.
//!
//! Without this, a Keras or ONNX file handed to any command fails inside the safetensors
//! parser with "header too large", which tells a user nothing. The magic numbers are the
//! formats' own: zip local file header `PK\x03\x04` (Keras 3 `.keras`, PyTorch `.pt`),
//! HDF5's 8-byte signature (legacy Keras `.h5`), FlatBuffers file identifier `TFL3` at
//! byte 4 (TFLite), `GGUF`, NumPy's `\x93NUMPY`, pickle protocol 2+ (`\x80` then the
//! version), gzip `\x1f\x8b`, and for ONNX (protobuf has no magic) field 1
//! `ir_version` as a small varint followed by a known producer or the `.onnx` suffix.

use std::path::Path;

/// What the file is and what to do, when it is a known foreign format.
pub(crate) fn recognise(path: &Path, bytes: &[u8]) -> Option<String> {
    let extension = path
        .extension()
        .map(|e| e.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    if looks_like_safetensors(bytes) {
        return None;
    }
    let head = &bytes[..bytes.len().min(512)];
    let has = |needle: &[u8]| head.windows(needle.len()).any(|w| w == needle);
    let not_ours = "mlops reads its own safetensors artifacts only (made by `mlops train`, `export`, `quantize` or `prune`)";
    if bytes.starts_with(b"PK\x03\x04") {
        return Some(
            if has(b"config.json") || has(b"metadata.json") || extension == "keras" {
                format!("is a Keras 3 `.keras` archive (zip), not an mlops artifact; {not_ours}: convert it first with `mlops convert {}`", path.display())
            } else if has(b"data.pkl") || matches!(extension.as_str(), "pt" | "pth") {
                format!(
                    "is a PyTorch checkpoint (zip of pickles), not an mlops artifact; {not_ours}"
                )
            } else {
                format!("is a zip archive, not an mlops artifact; {not_ours}")
            },
        );
    }
    if bytes.starts_with(b"\x89HDF\r\n\x1a\n") {
        return Some(format!(
            "is an HDF5 file (a legacy Keras `.h5` model?), not an mlops artifact; {not_ours}: convert it first with `mlops convert {}`",
            path.display()
        ));
    }
    if bytes.len() >= 8 && &bytes[4..8] == b"TFL3" {
        return Some(format!(
            "is a TensorFlow Lite flatbuffer, not an mlops artifact; {not_ours}"
        ));
    }
    if bytes.starts_with(b"GGUF") {
        return Some(format!("is a GGUF file, not an mlops artifact; {not_ours}"));
    }
    if bytes.starts_with(b"\x93NUMPY") {
        return Some(format!(
            "is a NumPy `.npy` array, not an mlops artifact; {not_ours}"
        ));
    }
    if bytes.len() >= 2 && bytes[0] == 0x80 && (2..=5).contains(&bytes[1]) {
        return Some(format!(
            "is a Python pickle (a PyTorch `.pt` file?), not an mlops artifact; {not_ours}"
        ));
    }
    if bytes.starts_with(&[0x1f, 0x8b]) {
        return Some(format!(
            "is gzip-compressed; decompress it first (`gunzip`), or if it is not an mlops artifact: {not_ours}"
        ));
    }
    let onnx_producer = [
        &b"pytorch"[..],
        b"tf2onnx",
        b"keras2onnx",
        b"onnxmltools",
        b"skl2onnx",
        b"onnx",
    ];
    if bytes.len() >= 2
        && bytes[0] == 0x08
        && bytes[1] < 0x80
        && (extension == "onnx" || onnx_producer.iter().any(|p| has(p)))
    {
        return Some(format!(
            "is an ONNX model (protobuf), not an mlops artifact; {not_ours}: convert it first with `mlops convert {}`",
            path.display()
        ));
    }
    None
}

/// Whether `bytes` start like a safetensors file: an 8-byte little-endian header length
/// that fits the file, then a JSON object.
pub fn looks_like_safetensors(bytes: &[u8]) -> bool {
    let Some(&[a, b, c, d, e, f, g, h]) = bytes.get(..8) else {
        return false;
    };
    let len = u64::from_le_bytes([a, b, c, d, e, f, g, h]);
    len >= 2 && len <= bytes.len() as u64 - 8 && bytes.get(8) == Some(&b'{')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_common_formats() {
        let cases: [(&str, &[u8], &str); 6] = [
            ("m.keras", b"PK\x03\x04....config.json", "Keras 3"),
            ("m.h5", b"\x89HDF\r\n\x1a\n\0\0\0\0", "HDF5"),
            ("m.onnx", b"\x08\x07\x12\x07pytorch", "ONNX"),
            ("m.tflite", b"\x1c\0\0\0TFL3\0\0", "TensorFlow Lite"),
            ("m.pt", b"\x80\x02}q\0", "pickle"),
            ("x", b"\x1f\x8b\x08\0", "gzip"),
        ];
        for (name, bytes, needle) in cases {
            let said = recognise(Path::new(name), bytes).unwrap_or_default();
            assert!(said.contains(needle), "{name}: {said}");
        }
        // A safetensors file starts with its header length: not recognised as foreign.
        assert_eq!(
            recognise(Path::new("m.safetensors"), b"\x10\0\0\0\0\0\0\0{}"),
            None
        );
    }
}
