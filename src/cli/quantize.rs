//! `mlops quantize`: fp32 artifact + calibration images -> int8 artifact, with per-layer
//! figures and (with evaluation data) accuracy, agreement and the drop against fp32.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use clap::{Args, ValueEnum};

use mlops::artifact::{expected_tensors, LineageEntry, Precision};
use mlops::data::{load_split, Split, SplitKind};
use mlops::quantize::{compare_logits, quantize, scheme_metadata, CalibMethod, QuantConfig};
use mlops::report::table::Table;
use mlops::report::{FileRecord, Gate, StepReport, MLOPS_VERSION};
use mlops::runtime::{evaluate, Session};

use super::{Context, ReportArgs};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum MethodArg {
    Minmax,
    Percentile,
    Mse,
    Entropy,
}

#[derive(Debug, Clone, Args)]
pub(crate) struct QuantizeArgs {
    /// The fp32 (or fp16/bf16) artifact to quantize
    pub artifact: PathBuf,
    /// Static int8: int8 weights per output channel, calibrated uint8 activations
    #[arg(long)]
    pub int8: bool,
    /// Shorthand of `mlops export --precision fp16`
    #[arg(long, conflicts_with_all = ["int8", "bf16"])]
    pub fp16: bool,
    /// Shorthand of `mlops export --precision bf16`
    #[arg(long, conflicts_with_all = ["int8", "fp16"])]
    pub bf16: bool,
    /// Calibration images: a folder of PNG/JPEG images (flat or one sub-folder per class),
    /// or an IDX folder (its training split when it has one)
    #[arg(long, value_name = "DIR")]
    pub calib: Option<PathBuf>,
    /// Calibration images to use, chosen with a fixed seed
    #[arg(long, default_value_t = 500, value_name = "N")]
    pub calib_samples: usize,
    /// How activation ranges become scales
    #[arg(long, value_enum, default_value_t = MethodArg::Minmax)]
    pub calib_method: MethodArg,
    /// Percentile kept by `--calib-method percentile`
    #[arg(long, default_value_t = 99.99)]
    pub percentile: f32,
    /// One weight scale per tensor instead of per output channel
    #[arg(long)]
    pub per_tensor: bool,
    /// Evaluate fp32 and int8 on this folder's test split (default: the artifact's own
    /// evaluation data when it is recorded and present)
    #[arg(long, value_name = "DIR")]
    pub eval_data: Option<PathBuf>,
    /// Exit 3 when int8 accuracy is more than F (0..1) below fp32
    #[arg(long, value_name = "F")]
    pub max_accuracy_drop: Option<f64>,
    /// Output file; defaults to NAME.int8.safetensors beside the input
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Show what would be quantized and write nothing
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub output: ReportArgs,
}

/// Calibration images: a folder of PNG/JPEG images (converted to `shape`), else the
/// training split of an IDX folder, else its test split.
fn calibration_split(dir: &Path, shape: [usize; 3]) -> anyhow::Result<Split> {
    if !dir.is_dir() {
        bail!(mlops::Error::data(dir, "calibration folder does not exist"));
    }
    let context = || format!("cannot read calibration images from `{}`", dir.display());
    if mlops::data::images::looks_like_image_folder(dir) {
        return mlops::data::images::load_image_folder(dir, shape).with_context(context);
    }
    load_split(dir, SplitKind::Train)
        .or_else(|_| load_split(dir, SplitKind::Test))
        .with_context(context)
}

pub(crate) fn run(args: &QuantizeArgs, ctx: &Context) -> anyhow::Result<StepReport> {
    if args.fp16 || args.bf16 {
        let export = super::export::ExportArgs {
            artifact: args.artifact.clone(),
            precision: if args.fp16 {
                super::export::PrecisionArg::Fp16
            } else {
                super::export::PrecisionArg::Bf16
            },
            out: args.out.clone(),
            output: args.output.clone(),
        };
        return super::export::run(&export, ctx);
    }
    if !args.int8 {
        bail!("say what to quantize to: `--int8` (with `--calib DIR`), `--fp16` or `--bf16`");
    }
    let (artifact, record) = super::eval::load_artifact(&args.artifact)?;
    if artifact.precision == Precision::Int8 {
        bail!(
            "`{}` is already int8; quantize its fp32 parent instead",
            args.artifact.display()
        );
    }
    if args.dry_run {
        return dry_run(args, &artifact, ctx);
    }
    let Some(calib_dir) = &args.calib else {
        bail!("`--int8` needs calibration images: add `--calib DIR` (an IDX folder such as `fixtures/mnist`)");
    };
    if !(50.0..100.0).contains(&args.percentile) {
        bail!("`--percentile` must be in [50, 100), e.g. 99.99");
    }
    let (mut step, started) = StepReport::start("quantize", "cpu");
    let calib = calibration_split(calib_dir, artifact.spec.input)?;
    calib.check_fits(artifact.spec.input, artifact.spec.classes)?;
    let config = QuantConfig {
        method: match args.calib_method {
            MethodArg::Minmax => CalibMethod::MinMax,
            MethodArg::Percentile => CalibMethod::Percentile(args.percentile),
            MethodArg::Mse => CalibMethod::Mse,
            MethodArg::Entropy => CalibMethod::Entropy,
        },
        samples: args.calib_samples,
        seed: 0,
        per_tensor: args.per_tensor,
    };
    let out_path = super::output_beside(&args.artifact, args.out.as_ref(), "int8");
    let (mut quantized, report) = quantize(&artifact, &calib, &config)?;
    let calib_sha = mlops::artifact::combined_sha256(&calib.files);
    let mut session = Session::new(&quantized, ctx.threads)?;
    let compute = session.compute();
    quantized.quantization = Some(scheme_metadata(&report, &calib_sha, &compute));
    let mut lineage_args = BTreeMap::new();
    lineage_args.insert("method".to_string(), report.method.clone().into());
    lineage_args.insert("samples".to_string(), report.samples.into());
    lineage_args.insert("weights".to_string(), report.weight_scheme.clone().into());
    lineage_args.insert("calibration_sha256".to_string(), calib_sha.clone().into());
    quantized.lineage.push(LineageEntry {
        step: "quantize".into(),
        mlops_version: MLOPS_VERSION.into(),
        parent_sha256: Some(record.sha256.clone()),
        args: lineage_args,
    });

    // fp32 vs int8 logits on the calibration images.
    let n = report.samples.min(calib.count);
    let (mut x, mut labels) = (Vec::new(), Vec::new());
    calib.gather(&(0..n).collect::<Vec<_>>(), &mut x, &mut labels);
    let fp32_logits = mlops::quantize::fp32_logits(&artifact, &x, n)?;
    let mut int8_logits = Vec::new();
    session.predict(&x, n, &mut int8_logits);
    let classes = artifact.spec.classes;
    let (cosine, calib_agreement) = compare_logits(&fp32_logits, &int8_logits, classes);

    let mut metrics = serde_json::to_value(&report)?;
    metrics["compute"] = compute.clone().into();
    metrics["layers_int8"] = report
        .layers
        .iter()
        .map(|l| l.name.clone())
        .collect::<Vec<_>>()
        .into();
    metrics["layers_fp32"] = serde_json::json!([]);
    metrics["logits_cosine_calibration"] = cosine.into();
    metrics["top1_agreement_calibration"] = calib_agreement.into();

    // Evaluation: fp32 and int8 on the same test images.
    let eval_dir = args.eval_data.clone().or_else(|| {
        artifact
            .metrics
            .as_ref()
            .map(|m| PathBuf::from(&m.data))
            .filter(|p| p.is_dir())
    });
    let mut human_eval = String::new();
    if let Some(dir) = &eval_dir {
        let split = load_split(dir, SplitKind::Test)
            .with_context(|| format!("cannot load `--eval-data` `{}`", dir.display()))?;
        split.check_fits(artifact.spec.input, classes)?;
        let mut fp32 = Session::new(&artifact, ctx.threads)?;
        let fp32_eval = evaluate(&mut fp32, &split, 256);
        let int8_eval = evaluate(&mut session, &split, 256);
        let (mut xs, mut ls, mut a, mut b) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut agree = 0usize;
        for chunk in (0..split.count).collect::<Vec<_>>().chunks(256) {
            split.gather(chunk, &mut xs, &mut ls);
            fp32.predict(&xs, chunk.len(), &mut a);
            session.predict(&xs, chunk.len(), &mut b);
            agree += a
                .chunks_exact(classes)
                .zip(b.chunks_exact(classes))
                .filter(|(p, q)| mlops::runtime::argmax(p) == mlops::runtime::argmax(q))
                .count();
        }
        let agreement = agree as f64 / split.count.max(1) as f64;
        let drop = fp32_eval.accuracy - int8_eval.accuracy;
        let worst = (0..classes)
            .filter_map(|c| {
                Some((
                    c,
                    fp32_eval.per_class_accuracy[c]? - int8_eval.per_class_accuracy[c]?,
                ))
            })
            .max_by(|x, y| x.1.total_cmp(&y.1));
        metrics["eval"] = serde_json::json!({
            "data": dir.display().to_string(),
            "images": split.count,
            "fp32_accuracy": fp32_eval.accuracy,
            "int8_accuracy": int8_eval.accuracy,
            "accuracy_drop": drop,
            "top1_agreement": agreement,
            "worst_class": worst.map(|(c, d)| serde_json::json!({"class": c, "drop": d})),
            "int8_images_per_s": int8_eval.images_per_s,
            "fp32_images_per_s": fp32_eval.images_per_s,
        });
        if let Some(max) = args.max_accuracy_drop {
            step.gates.push(Gate {
                name: "max_accuracy_drop".into(),
                threshold: max,
                value: drop,
                passed: drop <= max,
            });
        }
        step.inputs.extend(split.files.iter().cloned());
        human_eval = format!(
            "accuracy on {} images of `{}`: fp32 {:.2}%, int8 {:.2}% (drop {:+.2} pt), top-1 agreement {:.2}%{}\n",
            split.count,
            dir.display(),
            100.0 * fp32_eval.accuracy,
            100.0 * int8_eval.accuracy,
            -100.0 * drop,
            100.0 * agreement,
            worst.map_or(String::new(), |(c, d)| format!(", worst class {c} ({:+.2} pt)", -100.0 * d)),
        );
    } else if args.max_accuracy_drop.is_some() {
        bail!("`--max-accuracy-drop` needs evaluation data: add `--eval-data DIR`");
    }

    let written = quantized.save(&out_path)?;
    metrics["bytes_before"] = record.bytes.into();
    metrics["bytes_after"] = written.bytes.into();
    metrics["size_ratio"] = (written.bytes as f64 / record.bytes as f64).into();
    step.inputs.insert(0, record.clone());
    step.inputs.extend(calib.files.iter().cloned());
    step.outputs.push(written.clone());
    step.metrics = metrics;
    step.finish(started);

    let mut table = Table::new([
        "layer",
        "shape",
        "w scale min..max",
        "input scale",
        "zp",
        "w SNR dB",
        "bytes fp32",
        "bytes int8",
    ]);
    for l in &report.layers {
        table.row([
            l.name.clone(),
            format!("{:?}", l.shape),
            format!(
                "{:.2e}..{:.2e}",
                l.weight_scale_range[0], l.weight_scale_range[1]
            ),
            format!("{:.3e}", l.input_scale),
            l.input_zero_point.to_string(),
            format!("{:.1}", l.weight_snr_db),
            l.bytes_fp32.to_string(),
            l.bytes_int8.to_string(),
        ]);
    }
    let human = format!(
        "\n{table}\nquantized `{}` -> `{}` ({}, {} on {} calibration images): {} -> {} bytes ({:.1}%), {:.2} bits per weight\n\
         int8 layers run with {compute}; logits cosine vs fp32 on the calibration images {:.5}, top-1 agreement {:.2}%\n{human_eval}",
        args.artifact.display(),
        out_path.display(),
        report.weight_scheme,
        report.method,
        report.samples,
        record.bytes,
        written.bytes,
        100.0 * written.bytes as f64 / record.bytes as f64,
        report.bits_per_weight,
        cosine,
        100.0 * calib_agreement,
    );
    ctx.printer.report(
        &step,
        &human,
        args.output.json,
        args.output.report.as_deref(),
    )?;
    Ok(step)
}

/// `--dry-run`: a row per tensor that would change, and nothing written.
fn dry_run(
    args: &QuantizeArgs,
    artifact: &mlops::artifact::Artifact,
    ctx: &Context,
) -> anyhow::Result<StepReport> {
    let (mut step, started) = StepReport::start("quantize", "cpu");
    let mut table = Table::new([
        "tensor",
        "shape",
        "from",
        "to",
        "bytes before",
        "bytes after",
    ]);
    let mut rows = Vec::new();
    let (mut before, mut after) = (0usize, 0usize);
    for (name, shape, dtype) in expected_tensors(&artifact.spec, Precision::Int8, None)? {
        let count: usize = shape.iter().product();
        let old = artifact.tensor(&name);
        let from = old.map_or("-", |t| t.data.dtype_name());
        let old_bytes = old.map_or(0, |t| t.data.to_le_bytes().len());
        let new_bytes = count * if dtype == "I8" || dtype == "U8" { 1 } else { 4 };
        before += old_bytes;
        after += new_bytes;
        table.row([
            name.clone(),
            format!("{shape:?}"),
            from.to_string(),
            dtype.to_string(),
            old_bytes.to_string(),
            new_bytes.to_string(),
        ]);
        rows.push(serde_json::json!({"tensor": name, "shape": shape, "from": from, "to": dtype, "bytes_before": old_bytes, "bytes_after": new_bytes}));
    }
    step.inputs.push(FileRecord::of(&args.artifact)?);
    step.metrics = serde_json::json!({"dry_run": true, "tensors": rows, "weight_bytes_before": before, "weight_bytes_after": after});
    step.finish(started);
    let human = format!(
        "\n{table}\ndry run: weights {before} -> {after} bytes ({:.1}%); nothing written\n",
        100.0 * after as f64 / before.max(1) as f64
    );
    ctx.printer.report(
        &step,
        &human,
        args.output.json,
        args.output.report.as_deref(),
    )?;
    Ok(step)
}
