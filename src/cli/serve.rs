//! `mlops serve`: artifacts behind an HTTP server until Ctrl-C / SIGTERM, then a report.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::Args;

use mlops::report::table::Table;
use mlops::report::StepReport;
use mlops::serve::batcher::BatchConfig;
use mlops::serve::signing::Signer;
use mlops::serve::{serve, ServeConfig, ServedArtifact};

use super::{Context, ReportArgs};

#[derive(Debug, Clone, Args)]
pub(crate) struct ServeArgs {
    /// Artifacts to serve; each is named by its file name without `.safetensors`
    #[arg(required = true, value_name = "ARTIFACT")]
    pub artifacts: Vec<PathBuf>,
    /// Address to listen on
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port (8501 is TF Serving's REST port; 0 picks a free one)
    #[arg(long, default_value_t = 8501)]
    pub port: u16,
    /// Images per forward pass at most when merging requests; 1 (the default, as TF
    /// Serving's batching is off by default) runs each request on its own: on CPU our
    /// kernels cost the same per image in batches, so merging only adds waiting (README)
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub max_batch: usize,
    /// Microseconds to wait for more requests after the first of a batch (0: run at once
    /// with whatever is queued, so batches grow only while the model is busy)
    #[arg(long, default_value_t = 0, value_name = "US")]
    pub batch_wait_us: u64,
    /// Threads of each model's forward pass (`--threads` sets the HTTP worker threads)
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub model_threads: usize,
    /// Images whose predictions each model keeps (LRU); 0 turns the cache off
    #[arg(long, default_value_t = 4096, value_name = "N")]
    pub cache_size: usize,
    /// Require requests signed with HMAC-SHA256 under the key in FILE (see README)
    #[arg(long, value_name = "FILE")]
    pub hmac_key_file: Option<PathBuf>,
    #[command(flatten)]
    pub output: ReportArgs,
}

/// `model.int8.safetensors` -> `model.int8`.
fn model_name(path: &std::path::Path) -> String {
    let file = path
        .file_name()
        .map_or_else(|| "model".into(), |f| f.to_string_lossy().to_string());
    file.strip_suffix(".safetensors")
        .map_or(file.clone(), str::to_string)
}

pub(crate) fn run(args: &ServeArgs, ctx: &Context) -> anyhow::Result<StepReport> {
    if args.max_batch == 0 {
        bail!("`--max-batch` must be at least 1");
    }
    let signer = match &args.hmac_key_file {
        None => None,
        Some(path) => {
            let key = std::fs::read(path)
                .with_context(|| format!("cannot read the HMAC key file `{}`", path.display()))?;
            let key = key.trim_ascii().to_vec();
            if key.len() < 16 {
                bail!(
                    "the HMAC key in `{}` has {} bytes; use at least 16 random bytes (e.g. `openssl rand -hex 32 > {}`)",
                    path.display(),
                    key.len(),
                    path.display()
                );
            }
            Some(Signer::new(key))
        }
    };
    let (mut step, started) = StepReport::start("serve", "cpu");
    let mut names = BTreeSet::new();
    let mut models = Vec::new();
    for path in super::eval::skip_checkpoints(&args.artifacts, ctx, &mut step, "serve")? {
        let (artifact, record) = super::eval::load_artifact(path)?;
        let name = model_name(path);
        if !names.insert(name.clone()) {
            bail!("two artifacts would both be served as `{name}`: rename one of the files");
        }
        step.inputs.push(record.clone());
        models.push(ServedArtifact {
            name,
            artifact,
            record,
        });
    }
    let config = ServeConfig {
        addr: SocketAddr::new(args.host, args.port),
        threads: ctx.threads,
        model_threads: args.model_threads,
        batch: BatchConfig {
            max_batch: args.max_batch,
            max_wait: Duration::from_micros(args.batch_wait_us),
        },
        cache_images: args.cache_size,
        signer,
    };
    let listed: Vec<String> = names.iter().cloned().collect();
    let signed = args.hmac_key_file.is_some();
    let summary = serve(models, config, |address| {
        // Always printed (also with --quiet): a client started with `--port 0` needs it.
        eprintln!(
            "mlops serve: listening on http://{address} ({}; {}; Ctrl-C stops)",
            listed.join(", "),
            if signed {
                "signed requests only"
            } else {
                "unsigned requests"
            }
        );
    })?;
    step.metrics = serde_json::to_value(&summary)?;
    step.finish(started);
    let mut table = Table::new([
        "requests",
        "failed",
        "forward passes",
        "images",
        "cache hits",
    ]);
    table.row([
        summary.requests.to_string(),
        summary.failed_requests.to_string(),
        summary.forward_passes.to_string(),
        summary.images_computed.to_string(),
        summary.cache_hits.to_string(),
    ]);
    let human = format!("\nserved on http://{}\n{table}\n", summary.address);
    ctx.printer.report(&step, &human, &args.output)?;
    Ok(step)
}
