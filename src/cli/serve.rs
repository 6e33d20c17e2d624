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
use mlops::serve::{serve, LogFormat, RedisConfig, RepositoryConfig, ServeConfig, ServedArtifact};

use super::{Context, ReportArgs};

#[derive(Debug, Clone, Args)]
pub(crate) struct ServeArgs {
    /// Artifacts to serve; each is named by its file name without `.safetensors` and
    /// served as version 1
    #[arg(value_name = "ARTIFACT", required_unless_present = "model_repository")]
    pub artifacts: Vec<PathBuf>,
    /// A model repository, `DIR/<name>/<version>/model.safetensors` (TF Serving's layout):
    /// every model folder is served (or those in `--model-config`), new versions are loaded,
    /// warmed up and swapped in while serving, removed ones unloaded
    #[arg(long, value_name = "DIR")]
    pub model_repository: Option<PathBuf>,
    /// TF Serving's `model_config_list` as YAML or JSON: the models of the repository to
    /// serve, each with a version policy (`latest: {num_versions: N}`, `all: {}`,
    /// `specific: {versions: [..]}`) and version labels; re-read on every poll
    #[arg(long, value_name = "FILE", requires = "model_repository")]
    pub model_config: Option<PathBuf>,
    /// Seconds between reads of the model repository, 0 to 86400 (0: only at start-up
    /// and on SIGHUP)
    #[arg(long, default_value_t = 5, value_name = "S", value_parser = poll_secs, requires = "model_repository")]
    pub poll_secs: u64,
    /// Address to listen on
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port (8501 is TF Serving's REST port; 0 picks a free one)
    #[arg(long, default_value_t = 8501)]
    pub port: u16,
    #[command(flatten)]
    pub device: super::DeviceArgs,
    /// Images per forward pass at most when merging requests, 1 to 4096; 1 (the default,
    /// as TF Serving's batching is off by default) runs each request on its own, on the
    /// HTTP worker thread that read it (one engine per `--threads` worker): on CPU our
    /// kernels cost the same per image in batches, so merging only adds waiting (README)
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = max_batch)]
    pub max_batch: usize,
    /// Microseconds to wait for more requests after the first of a batch, 0 to 1000000 (0:
    /// run at once with whatever is queued, so batches grow only while the model is busy)
    #[arg(long, default_value_t = 0, value_name = "US", value_parser = batch_wait_us)]
    pub batch_wait_us: u64,
    /// Threads of each model's forward pass, 1 to 1024 (`--threads` sets the HTTP worker
    /// threads); above 1, passes run on one thread per model, as with batching
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = model_threads)]
    pub model_threads: usize,
    /// Images whose predictions each model keeps (LRU), 0 to 1000000; 0 turns the cache off
    #[arg(long, default_value_t = 4096, value_name = "N", value_parser = cache_size)]
    pub cache_size: usize,
    /// Milliseconds a request's head, then its body, may take to arrive, 10 to 600000; a
    /// slower (or half-sent) request, and a keep-alive connection idle that long, is closed
    #[arg(long, default_value_t = 30_000, value_name = "MS", value_parser = read_timeout_ms)]
    pub read_timeout_ms: u64,
    /// Connections open at once, 1 to 65536; more wait until one closes
    #[arg(long, default_value_t = 512, value_name = "N", value_parser = max_connections)]
    pub max_connections: usize,
    /// Require requests signed with HMAC-SHA256 under the key in FILE, each with a fresh
    /// nonce (see README)
    #[arg(long, value_name = "FILE")]
    pub hmac_key_file: Option<PathBuf>,
    /// Require `Authorization: Bearer KEY` on every route but the health probes, KEY one of
    /// the lines of FILE (blank lines and `#` comments skipped; each at least 16 bytes)
    #[arg(long, value_name = "FILE")]
    pub api_key_file: Option<PathBuf>,
    /// A Redis shared by replicas (`redis://HOST:PORT/DB`, `unix:///path/redis.sock`): a
    /// second-level prediction cache behind the in-process one, and the nonces of signed
    /// requests (a replay to another replica is refused too). Redis trouble never fails a
    /// request: it is skipped, counted in /metrics, and retried
    #[arg(long, value_name = "URL")]
    pub cache_redis: Option<String>,
    /// Seconds a prediction stays in Redis, 1 to 2592000 (30 days)
    #[arg(long, default_value_t = 3600, value_name = "S", value_parser = cache_ttl, requires = "cache_redis")]
    pub cache_ttl: u64,
    /// Milliseconds a request waits for Redis at most, 1 to 10000; slower answers count as
    /// misses
    #[arg(long, default_value_t = 50, value_name = "MS", value_parser = redis_timeout_ms, requires = "cache_redis")]
    pub redis_timeout_ms: u64,
    /// One line per request on stderr: `json` (request_id, method, path, api, model,
    /// version, status, latency_ms, cache) or `text`; off by default (it costs throughput)
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<LogFormatArg>,
    #[command(flatten)]
    pub output: ReportArgs,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum LogFormatArg {
    Json,
    Text,
}

/// An integer in `lo..=hi`, or a message naming the range (clap prints it with the flag).
/// The ranges keep every setting from allocating or waiting without bound: a cache of
/// 10^9 images was allocated up front and aborted the server (issue 10).
fn integer_in(text: &str, lo: u64, hi: u64) -> Result<u64, String> {
    let n: u64 = text
        .trim()
        .parse()
        .map_err(|e| format!("`{text}` is not a whole number ({e}); use {lo}..={hi}"))?;
    if (lo..=hi).contains(&n) {
        Ok(n)
    } else {
        Err(format!("must be in {lo}..={hi}"))
    }
}

/// `--max-batch`: as many images as one request may carry at most.
fn max_batch(text: &str) -> Result<usize, String> {
    let most = mlops::serve::protocol::MAX_IMAGES_PER_REQUEST as u64;
    Ok(integer_in(text, 1, most)? as usize)
}

/// `--batch-wait-us`: up to one second.
fn batch_wait_us(text: &str) -> Result<u64, String> {
    integer_in(text, 0, 1_000_000)
}

/// `--model-threads`: as many as `--threads` allows.
fn model_threads(text: &str) -> Result<usize, String> {
    Ok(integer_in(text, 1, 1024)? as usize)
}

/// `--cache-size`: up to a million images (~150 MB of logits and keys per model).
fn cache_size(text: &str) -> Result<usize, String> {
    Ok(integer_in(text, 0, 1_000_000)? as usize)
}

/// `--read-timeout-ms`: 10 ms to 10 minutes.
fn read_timeout_ms(text: &str) -> Result<u64, String> {
    integer_in(text, 10, 600_000)
}

/// `--cache-ttl`: a second to 30 days.
fn cache_ttl(text: &str) -> Result<u64, String> {
    integer_in(text, 1, 30 * 86_400)
}

/// `--redis-timeout-ms`: 1 ms to 10 s.
fn redis_timeout_ms(text: &str) -> Result<u64, String> {
    integer_in(text, 1, 10_000)
}

/// `--poll-secs`: up to a day.
fn poll_secs(text: &str) -> Result<u64, String> {
    integer_in(text, 0, 86_400)
}

/// `--max-connections`: 1 to 65536 (each open connection holds a file descriptor).
fn max_connections(text: &str) -> Result<usize, String> {
    Ok(integer_in(text, 1, 65_536)? as usize)
}

/// The keys of `--api-key-file`: one per line, blank lines and `#` comments skipped.
fn read_api_keys(path: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the API key file `{}`", path.display()))?;
    let keys: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    if keys.is_empty() {
        bail!(
            "the API key file `{}` has no keys; put one per line (e.g. `openssl rand -hex 32 >> {}`)",
            path.display(),
            path.display()
        );
    }
    if let Some((i, _)) = keys
        .iter()
        .enumerate()
        .find(|(_, k)| k.len() < 16 || !k.bytes().all(|b| b.is_ascii_graphic()))
    {
        bail!(
            "key {} of `{}` is shorter than 16 bytes or not printable ASCII; use random keys (`openssl rand -hex 32`)",
            i + 1,
            path.display()
        );
    }
    Ok(keys)
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
    let api_keys = match &args.api_key_file {
        None => None,
        Some(path) => Some(read_api_keys(path)?),
    };
    // Our CPU kernels run with `--model-threads`; other runtimes are resolved as usual.
    let native_cpu = args.device.device == "cpu" && args.device.engine == super::EngineArg::Native;
    let runtime = if native_cpu {
        None
    } else {
        Some(args.device.runtime(ctx)?)
    };
    let device = runtime
        .as_ref()
        .map_or_else(|| "cpu".to_string(), |r| r.name());
    let (mut step, started) = StepReport::start("serve", &device);
    let mut names = BTreeSet::new();
    let mut models = Vec::new();
    let artifacts = if args.artifacts.is_empty() {
        Vec::new() // `--model-repository` only (clap requires one of the two)
    } else {
        super::eval::skip_checkpoints(&args.artifacts, ctx, &mut step, "serve")?
    };
    for path in artifacts {
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
        runtime,
        read_timeout: Duration::from_millis(args.read_timeout_ms),
        max_connections: args.max_connections,
        repository: args.model_repository.as_ref().map(|root| RepositoryConfig {
            root: root.clone(),
            config_file: args.model_config.clone(),
            poll: (args.poll_secs > 0).then(|| Duration::from_secs(args.poll_secs)),
        }),
        api_keys,
        log_format: args.log_format.map(|f| match f {
            LogFormatArg::Json => LogFormat::Json,
            LogFormatArg::Text => LogFormat::Text,
        }),
        redis: args.cache_redis.as_ref().map(|url| RedisConfig {
            url: url.clone(),
            ttl: Duration::from_secs(args.cache_ttl),
            timeout: Duration::from_millis(args.redis_timeout_ms),
        }),
    };
    let mut listed: Vec<String> = names.iter().cloned().collect();
    if let Some(root) = &args.model_repository {
        listed.push(format!("the model repository `{}`", root.display()));
    }
    let signed = args.hmac_key_file.is_some();
    let summary = serve(models, config, |address| {
        // Always printed (also with --quiet): a client started with `--port 0` needs it.
        super::printer::to_stderr(format_args!(
            "mlops serve: listening on http://{address} ({}; {}; Ctrl-C stops)\n",
            listed.join(", "),
            if signed {
                "signed requests only"
            } else {
                "unsigned requests"
            }
        ));
    })?;
    step.metrics = serde_json::to_value(&summary)?;
    step.finish(started);
    let mut table = Table::new([
        "requests",
        "failed",
        "other requests",
        "read timeouts",
        "forward passes",
        "images",
        "cache hits",
    ]);
    table.row([
        summary.requests.to_string(),
        summary.failed_requests.to_string(),
        summary.other_requests.to_string(),
        summary.read_timeouts.to_string(),
        summary.forward_passes.to_string(),
        summary.images_computed.to_string(),
        summary.cache_hits.to_string(),
    ]);
    let human = format!("\nserved on http://{}\n{table}\n", summary.address);
    ctx.printer.report(&step, &human, &args.output)?;
    Ok(step)
}
