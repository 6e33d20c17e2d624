//! `mlops inspect`: everything an artifact says about itself, without running it.

use std::path::PathBuf;

use clap::Args;

use mlops::artifact::LineageCheck;
use mlops::report::table::Table;
use mlops::report::StepReport;

use super::Context;

#[derive(Debug, Clone, Args)]
pub(crate) struct InspectArgs {
    /// The artifact (.safetensors) to describe
    pub artifact: PathBuf,
    /// Print the description as JSON on stdout
    #[arg(long)]
    pub json: bool,
}

pub(crate) fn run(args: &InspectArgs, ctx: &Context) -> anyhow::Result<StepReport> {
    let (mut step, started) = StepReport::start("inspect", "cpu");
    let (artifact, record) = super::eval::load_artifact(&args.artifact)?;
    // Loading verified the digest when there is one.
    let record_has_digest = mlops::artifact::safetensors::read_header_metadata(&args.artifact)
        .is_some_and(|m| m.contains_key(mlops::artifact::DIGEST_KEY));
    let info = artifact.describe(record.clone(), record_has_digest)?;
    step.metrics = serde_json::to_value(&info)?;
    let spec = &artifact.spec;
    step.inputs.push(record.clone());
    step.finish(started);

    let mut human = format!(
        "`{}`\n  sha256     {}\n  bytes      {}\n  precision  {}\n  model      {} ({} parameters, {:.2} MFLOP per image)\n  input      {:?} {} scale {:.6} mean {} std {}\n",
        args.artifact.display(),
        record.sha256,
        record.bytes,
        artifact.precision,
        if spec.name.is_empty() { "-" } else { &spec.name },
        info.param_count,
        info.flops_per_image as f64 / 1e6,
        artifact.input.shape,
        artifact.input.layout,
        artifact.input.scale,
        artifact.input.mean,
        artifact.input.std,
    );
    if let Some(m) = &artifact.metrics {
        human.push_str(&format!(
            "  metrics    accuracy {:.2}%, loss {:.4} on {} images of `{}`\n",
            100.0 * m.accuracy,
            m.loss,
            m.images,
            m.data
        ));
    }
    let chain = &info.lineage_check;
    human.push_str(&format!(
        "  integrity  {}\n",
        if record_has_digest {
            "tensors and metadata match the digest written with them"
        } else {
            "no digest recorded (written by an older mlops): not verified"
        }
    ));
    human.push_str(&format!(
        "\nlineage: {}\n",
        match chain {
            LineageCheck::Intact => "intact (each step starts from the weights the one before wrote, and the last wrote these)".to_string(),
            LineageCheck::Unrecorded => "not checkable (no step digests recorded)".to_string(),
            LineageCheck::Broken(why) => format!("BROKEN: {why}"),
        }
    ));
    for (i, entry) in artifact.lineage.iter().enumerate() {
        let args_text: Vec<String> = entry.args.iter().map(|(k, v)| format!("{k}={v}")).collect();
        human.push_str(&format!(
            "  {}. {} (mlops {}){}: {}\n",
            i + 1,
            entry.step,
            entry.mlops_version,
            entry
                .parent_sha256
                .as_ref()
                .map_or(String::new(), |p| format!(
                    " from {}",
                    mlops::artifact::short(p)
                )),
            args_text.join(" ")
        ));
    }
    let mut layer_table = Table::new(["#", "layer", "output", "params", "MFLOP"]);
    for l in &info.layers {
        let shape: Vec<String> = l.output_shape.iter().map(usize::to_string).collect();
        layer_table.row([
            l.index.to_string(),
            l.kind.to_string(),
            shape.join("x"),
            l.params.to_string(),
            format!("{:.3}", l.flops as f64 / 1e6),
        ]);
    }
    let mut tensor_table = Table::new(["tensor", "dtype", "shape", "bytes"]);
    for t in &info.tensors {
        tensor_table.row([
            t.name.clone(),
            t.dtype.to_string(),
            format!("{:?}", t.shape),
            t.bytes.to_string(),
        ]);
    }
    human.push_str(&format!("\n{layer_table}\n{tensor_table}"));
    if args.json {
        let out = serde_json::to_string_pretty(&step)?;
        use std::io::Write;
        writeln!(std::io::stdout().lock(), "{out}")?;
    } else if !ctx.printer.is_quiet() {
        // inspect's output is the point of the command: stdout, so it can be piped.
        use std::io::Write;
        write!(std::io::stdout().lock(), "{human}")?;
    }
    Ok(step)
}
