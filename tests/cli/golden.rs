//! Golden input/output bundles (tract's `--assert-output-bundle`): the committed
//! reference artifacts in `fixtures/golden/` must give the committed logits on the first
//! test images, through every runtime that can run them. Regenerate with
//! `cargo run --release --example make_golden` (and say why in the commit).

use mlops::artifact::{Artifact, Precision};
use mlops::data::{load_split, Preprocess, SplitKind};

use crate::util::{fixture, tiny_data};

#[test]
fn every_runtime_reproduces_the_golden_logits() {
    let bundle: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("golden/logits.json")).unwrap())
            .unwrap();
    let images = bundle["images"].as_u64().unwrap() as usize;
    let test = load_split(&tiny_data(), SplitKind::Test).unwrap();
    let (mut x, mut labels) = (Vec::new(), Vec::new());
    test.gather(
        &(0..images).collect::<Vec<_>>(),
        &Preprocess::UNIT,
        &mut x,
        &mut labels,
    );
    assert_eq!(serde_json::json!(labels), bundle["labels"]);
    let mut checked = 0;
    for name in ["model.safetensors", "model.int8.safetensors"] {
        let (artifact, _) = Artifact::load(&fixture(&format!("golden/{name}"))).unwrap();
        let want: Vec<f32> = bundle[name]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        for runtime in mlops::runtime::available(1) {
            let Ok(mut engine) = runtime.load(&artifact) else {
                assert_eq!(artifact.precision, Precision::Int8, "{}", runtime.name());
                continue;
            };
            let mut logits = Vec::new();
            engine.predict(&x, images, &mut logits).unwrap();
            for (i, (got, want)) in logits.iter().zip(&want).enumerate() {
                // int8 runs in integers: every kernel gives the same bits. fp32 kernels
                // differ in summation order only.
                let tolerance = if artifact.precision == Precision::Int8 {
                    0.0
                } else {
                    1e-4 * (1.0 + want.abs())
                };
                assert!(
                    (got - want).abs() <= tolerance,
                    "{name} on {}: logit {i} is {got}, the bundle says {want}",
                    runtime.name()
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 3, "fp32 on two runtimes and int8 on ours");
}
