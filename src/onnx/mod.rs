//! ONNX in and out: [`to_onnx`] writes an artifact as an ONNX model (fp32, or int8 as a
//! QDQ graph), [`from_onnx`] reads an ONNX model of our layer subset into a spec and
//! fp32 parameters. The protobuf messages are in [`proto`].

mod export;
mod import;
pub mod proto;

pub use export::{to_onnx, InputLayout, OnnxExportReport, DEFAULT_OPSET, OPSETS};
pub use import::{from_onnx, Imported, SUPPORTED_OPS};

#[cfg(test)]
mod tests {
    use std::path::Path;

    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::artifact::Artifact;
    use crate::io::FileRecord;
    use crate::runtime::{CpuEngine, Engine};

    fn logits(artifact: &Artifact, x: &[f32], batch: usize) -> Vec<f32> {
        let mut engine = CpuEngine::new(artifact, 1).unwrap();
        let mut out = Vec::new();
        engine.predict(x, batch, &mut out).unwrap();
        out
    }

    /// Export then import gives the same function on a spec that takes every layout
    /// path: same padding, stride 2, average pooling, a stand-alone ReLU, dropout, and a
    /// flatten of 5 channels (the `h, w, c` <-> `c, h, w` column reorder).
    #[test]
    fn export_then_import_is_the_same_model() {
        let spec = crate::model::spec::every_path_spec(5);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let params: Vec<Vec<f32>> = spec
            .params()
            .unwrap()
            .iter()
            .map(|p| (0..p.len()).map(|_| rng.random_range(-0.5..0.5)).collect())
            .collect();
        let artifact = Artifact::from_params(&spec, &params).unwrap();
        let record = FileRecord::of_bytes(Path::new("m.safetensors"), b"x");
        for layout in [InputLayout::Nhwc, InputLayout::Nchw] {
            let (bytes, report) = to_onnx(&artifact, &record, DEFAULT_OPSET, layout).unwrap();
            assert_eq!(report.graph, "fp32");
            let imported = from_onnx(Path::new("m.onnx"), &bytes).unwrap();
            assert_eq!(imported.nchw_input, layout == InputLayout::Nchw);
            let back = Artifact::from_params(&imported.spec, &imported.params).unwrap();
            let batch = 3;
            let x: Vec<f32> = (0..batch * 12 * 12 * 3)
                .map(|_| rng.random_range(0.0..1.0))
                .collect();
            let (a, b) = (logits(&artifact, &x, batch), logits(&back, &x, batch));
            let diff = a
                .iter()
                .zip(&b)
                .map(|(p, q)| (p - q).abs())
                .fold(0.0, f32::max);
            assert!(diff < 1e-5, "{layout:?}: max |a - b| = {diff}");
        }
    }

    #[test]
    fn column_reorders_are_inverse() {
        let hwc = [2, 3, 4];
        let w: Vec<f32> = (0..2 * 24).map(|v| v as f32).collect();
        let chw = export::hwc_columns_to_chw(&w, 2, hwc);
        assert_ne!(chw, w);
        assert_eq!(import::chw_columns_to_hwc(&chw, 2, hwc), w);
    }

    /// Thousands of mutants (byte flips, truncations) of a real PyTorch export: the reader
    /// answers Ok or Err, never panics, never allocates what a size field claims.
    #[test]
    fn mutated_onnx_files_never_panic() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/onnx/cnn.onnx");
        let original = std::fs::read(&path).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(13);
        for round in 0..3000 {
            let mut bytes = original.clone();
            match round % 3 {
                0 => bytes.truncate(rng.random_range(0..original.len())),
                1 => {
                    for _ in 0..rng.random_range(1..8) {
                        let at = rng.random_range(0..bytes.len());
                        bytes[at] = rng.random();
                    }
                }
                _ => {
                    // Mutate the graph structure near the front (node and attribute
                    // fields), where a flip changes meaning rather than a weight value.
                    let at = rng.random_range(0..bytes.len().min(4096));
                    bytes[at] ^= 1 << rng.random_range(0..8);
                }
            }
            let result = std::panic::catch_unwind(|| from_onnx(Path::new("m.onnx"), &bytes));
            assert!(result.is_ok(), "round {round} panicked");
        }
    }
}
