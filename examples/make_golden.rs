//! Regenerates `fixtures/golden/`: reference artifacts (fp32 and int8) and the logits they
//! give on the first 8 test images of `fixtures/mnist-tiny/`, which the engine tests
//! check every runtime against (tract's `--assert-output-bundle`).
//!
//! Run: `cargo run --release --example make_golden`. The artifacts are committed, so
//! the check does not depend on training being bit-identical across CPUs; the logits are
//! those of our CPU kernels on the machine that ran this (fp32 is compared with a
//! tolerance, int8 exactly: the integer kernels are bit-identical on every ISA).

use std::path::Path;

use mlops::artifact::Artifact;
use mlops::data::{load_split, Dataset, Preprocess, SplitKind};
use mlops::io::FileRecord;
use mlops::model::ModelSpec;
use mlops::progress::NoProgress;
use mlops::quantize::{quantize, CalibMethod, QuantConfig};
use mlops::runtime::{CpuRuntime, Runtime as _};
use mlops::train::{fit, LrSchedule, Start, TrainConfig};

/// Images in the bundle.
const IMAGES: usize = 8;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let data_dir = Path::new("fixtures/mnist-tiny");
    let out = Path::new("fixtures/golden");
    std::fs::create_dir_all(out)?;
    let data = Dataset::load(data_dir)?;
    let spec = ModelSpec::reference_cnn();
    let config = TrainConfig {
        epochs: 3,
        batch_size: 32,
        learning_rate: 0.003,
        schedule: LrSchedule::Cosine,
        seed: 42,
        threads: 1,
        stop_after: None,
        preprocess: Preprocess::UNIT,
        engine: mlops::train::TrainEngine::Native,
        precision: mlops::train::Precision::Fp32,
    };
    let (params, _) = fit(
        &spec,
        &data,
        &config,
        Start::Fresh,
        &NoProgress,
        None,
        |_, _| Ok(()),
    )?;
    let fp32 = Artifact::from_params(&spec, &params)?;
    let fp32_path = out.join("model.safetensors");
    fp32.save(&fp32_path)?;
    let record = FileRecord::of(&fp32_path)?;
    let calib = load_split(data_dir, SplitKind::Train)?;
    let (int8, _) = quantize(
        &fp32,
        Some(&record),
        Some(&calib),
        &QuantConfig {
            method: CalibMethod::MinMax,
            samples: 256,
            seed: 0,
            per_tensor: false,
            dynamic: false,
            exclude: Vec::new(),
        },
    )?;
    int8.save(&out.join("model.int8.safetensors"))?;
    let test = load_split(data_dir, SplitKind::Test)?;
    let (mut x, mut labels) = (Vec::new(), Vec::new());
    test.gather(
        &(0..IMAGES).collect::<Vec<_>>(),
        &Preprocess::UNIT,
        &mut x,
        &mut labels,
    );
    let runtime = CpuRuntime::new(1);
    let mut bundle = serde_json::Map::new();
    bundle.insert("images".into(), IMAGES.into());
    bundle.insert(
        "data".into(),
        "fixtures/mnist-tiny test split, first images".into(),
    );
    bundle.insert("labels".into(), labels.clone().into());
    for (name, artifact) in [
        ("model.safetensors", &fp32),
        ("model.int8.safetensors", &int8),
    ] {
        let mut logits = Vec::new();
        runtime.load(artifact)?.predict(&x, IMAGES, &mut logits)?;
        bundle.insert(name.into(), logits.into());
    }
    let text = serde_json::to_string_pretty(&serde_json::Value::Object(bundle))?;
    std::fs::write(out.join("logits.json"), text + "\n")?;
    println!("wrote {}", out.display());
    Ok(())
}
