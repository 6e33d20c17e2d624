//! `mlops predict`: class, label and probabilities per image (files or a data folder),
//! in input order.

use std::path::PathBuf;

use anyhow::bail;
use clap::{Args, ValueEnum};
use serde::Serialize;

use mlops::data::SplitKind;
use mlops::predict::Prediction;
use mlops::report::StepReport;

use super::{Context, HintExt as _, ReportArgs};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum SplitArg {
    Test,
    Train,
}

#[derive(Debug, Clone, Args)]
pub(crate) struct PredictArgs {
    /// The artifact (.safetensors)
    pub artifact: PathBuf,
    /// PNG/JPEG images, converted to the model's input as `--calib` images are
    #[arg(value_name = "IMAGE", conflicts_with = "data")]
    pub images: Vec<PathBuf>,
    /// An IDX data folder (e.g. fixtures/mnist): its images in data order
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Which split of `--data`
    #[arg(long, value_enum, default_value_t = SplitArg::Test, requires = "data")]
    pub split: SplitArg,
    /// Use only the first N images of `--data`
    #[arg(long, value_name = "N", value_parser = super::parse::at_least_one, requires = "data")]
    pub limit: Option<usize>,
    /// Show the K most likely classes per image
    #[arg(long, default_value_t = 3, value_name = "K", value_parser = super::parse::at_least_one)]
    pub top: usize,
    /// Images per forward pass
    #[arg(long, default_value_t = 256, value_parser = super::parse::batch)]
    pub batch_size: usize,
    #[command(flatten)]
    pub device: super::DeviceArgs,
    #[command(flatten)]
    pub output: ReportArgs,
}

/// What `predict` found: the `--json` document on stdout (the predictions in input
/// order), and the step report's `metrics`.
#[derive(Serialize)]
struct PredictReport<'a> {
    /// Image files or `DIR (split)`.
    source: String,
    predictions: &'a [Prediction],
    /// Share of images whose class equals the data's label (`--data` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    accuracy: Option<f64>,
}

pub(crate) fn run(args: &PredictArgs, ctx: &Context) -> anyhow::Result<StepReport> {
    let runtime = args.device.runtime(ctx)?;
    let (mut step, started) = StepReport::start("predict", &runtime.name());
    let (artifact, record) = super::eval::load_artifact(&args.artifact)?;
    if args.top > artifact.spec.classes {
        bail!(
            "`--top {}` is more than the model's {} classes; use --top 1..={}",
            args.top,
            artifact.spec.classes,
            artifact.spec.classes
        );
    }
    let shape = artifact.spec.input;
    let (split, source, labelled) = match (&args.data, args.images.is_empty()) {
        (Some(dir), _) => {
            let kind = match args.split {
                SplitArg::Test => SplitKind::Test,
                SplitArg::Train => SplitKind::Train,
            };
            let split = mlops::data::load_split_limited(dir, kind, args.limit).hinted(
                || format!("cannot load `--data` `{}`", dir.display()),
                &format!("`--data` {}", super::IDX_FOLDER_HINT),
            )?;
            split.check_fits(shape, artifact.spec.classes)?;
            let name = format!("{} ({:?})", dir.display(), args.split).to_lowercase();
            (split, name, true)
        }
        (None, false) => {
            let split = mlops::data::images::load_image_files(&args.images, shape)?;
            let name = format!("{} image file(s)", args.images.len());
            (split, name, false)
        }
        (None, true) => {
            bail!("give image files (`mlops predict MODEL a.png b.jpg`) or `--data DIR`")
        }
    };
    let mut engine = runtime.load(&artifact)?;
    let predictions = mlops::predict::predict(
        engine.as_mut(),
        &split,
        &artifact.labels,
        args.top,
        args.batch_size,
        labelled,
    )?;
    let accuracy = labelled.then(|| {
        predictions
            .iter()
            .filter(|p| Some(p.class) == p.expected)
            .count() as f64
            / predictions.len().max(1) as f64
    });
    step.inputs.push(record);
    step.inputs.extend(split.files.iter().cloned());
    let report = PredictReport {
        source,
        predictions: &predictions,
        accuracy,
    };
    step.metrics = serde_json::to_value(&report)?;
    step.finish(started);
    let names: Vec<String> = if labelled {
        (0..split.count).map(|i| format!("#{i}")).collect()
    } else {
        args.images
            .iter()
            .map(|p| p.display().to_string())
            .collect()
    };
    let mut table = mlops::report::table::Table::new(["image", "class", "label", "top"]);
    for (name, p) in names.iter().zip(&predictions) {
        let top = p
            .top
            .iter()
            .map(|(c, prob)| format!("{} {:.2}%", artifact.labels[*c], 100.0 * prob))
            .collect::<Vec<_>>()
            .join(", ");
        table.row([name.clone(), p.class.to_string(), p.label.clone(), top]);
    }
    let mut human = format!("{table}");
    if let Some(a) = accuracy {
        human.push_str(&format!(
            "{:.2}% of {} images match their label\n",
            100.0 * a,
            predictions.len()
        ));
    }
    if args.output.json && !ctx.in_pipeline {
        // `--json` prints the predictions themselves (`{"predictions": [...]}`), what a
        // script wants; `--report FILE` keeps the whole step report.
        let text = serde_json::to_string_pretty(&report)?;
        std::io::Write::write_all(
            &mut std::io::stdout().lock(),
            format!("{text}\n").as_bytes(),
        )?;
        let output = ReportArgs {
            report: args.output.report.clone(),
            json: false,
            html: args.output.html.clone(),
        };
        ctx.printer.report(&step, "", &output)?;
    } else {
        ctx.printer.report(&step, &human, &args.output)?;
    }
    Ok(step)
}
