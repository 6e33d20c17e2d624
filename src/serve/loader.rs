//! Loading model versions (engine, warm-up, batching thread) and keeping the registry in
//! step with the model repository (TF Serving's file-system polling, Triton's `poll`
//! mode): a new version is loaded and warmed up with one forward pass while the old
//! ones keep answering, then swapped in; a version that went away is swapped out and
//! drains; a version that fails to load or warm up is refused with a log line and
//! never served, and the others keep serving.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::json;

use super::batcher::{BatchConfig, Batcher};
use super::cache::PredictionCache;
use super::http::{AppState, Model};
use super::metrics::Metrics;
use super::protocol::ModelShape;
use super::registry::{Registry, Served, VersionState, VersionStatus};
use super::repository::{self, ModelConfigList};
use crate::artifact::Artifact;
use crate::report::FileRecord;
use crate::runtime::{CpuEngine, Engine, Runtime};

/// Where the repository is and how it is watched.
#[derive(Debug, Clone)]
pub struct RepositoryConfig {
    /// `DIR` of `DIR/<name>/<version>/model.safetensors`.
    pub root: PathBuf,
    /// The `model_config_list` file (re-read on every poll), if any.
    pub config_file: Option<PathBuf>,
    /// How often the repository is read again; `None`: only at start-up and on SIGHUP.
    pub poll: Option<Duration>,
}

/// Makes servable versions from artifacts.
pub(crate) struct Loader {
    pub runtime: Option<Arc<dyn Runtime>>,
    pub model_threads: usize,
    pub batch: BatchConfig,
    /// Engines per version for inline passes (one per HTTP worker thread); 0: a
    /// batching thread. Inline needs our CPU kernels (no `runtime`), `max_batch` 1 and
    /// `model_threads` 1.
    pub inline_engines: usize,
    pub cache_images: usize,
    pub metrics: Arc<Metrics>,
}

impl Loader {
    /// Loads `artifact` as version `version` of `name`: its engine (or one per HTTP worker
    /// thread, inline), one warm-up forward pass on a blank image (which must give finite
    /// logits), and its batching thread unless inline.
    ///
    /// # Errors
    /// As [`Runtime::load`] / [`CpuEngine::new`]; [`crate::Error::Config`] when the
    /// warm-up pass fails or is not finite; [`crate::Error::Io`] when the batching thread
    /// cannot start.
    pub(crate) fn load(
        &self,
        name: &str,
        version: u64,
        artifact: &Artifact,
        record: &FileRecord,
    ) -> crate::Result<Model> {
        let mut engine = match &self.runtime {
            Some(runtime) => runtime.load(artifact)?,
            None => Box::new(CpuEngine::new(artifact, self.model_threads.max(1))?),
        };
        let blank = vec![0.0f32; engine.plan().input_len];
        let mut logits = Vec::new();
        engine.predict(&blank, 1, &mut logits)?;
        if logits.is_empty() || !logits.iter().all(|v| v.is_finite()) {
            return Err(crate::Error::Config(format!(
                "`{}`: the warm-up forward pass on a blank image gave non-finite logits {logits:?}; \
                 the weights are broken (re-export or retrain it)",
                record.path
            )));
        }
        let info = json!({
            "file": record.path, "sha256": record.sha256, "bytes": record.bytes,
            "precision": artifact.precision.as_str(), "compute": engine.compute(),
            "labels": artifact.labels, "input": artifact.input,
            "accuracy": artifact.metrics.as_ref().map(|m| m.accuracy),
            "parameters": artifact.spec.param_count()?,
        });
        let version_label = version.to_string();
        let labels = [name, version_label.as_str()];
        let batch_images = self.metrics.batch_images.with_label_values(&labels);
        let queue = self.metrics.queue_seconds.with_label_values(&labels);
        let compute = self.metrics.compute_seconds.with_label_values(&labels);
        let on_batch = move |stats: super::batcher::BatchStats| {
            batch_images.observe(stats.images as f64);
            compute.observe(stats.compute.as_secs_f64());
            for wait in stats.waits {
                queue.observe(wait.as_secs_f64());
            }
        };
        let batcher = if self.inline_engines > 0 && self.runtime.is_none() {
            let mut engines = vec![engine];
            for _ in 1..self.inline_engines {
                let mut more: Box<dyn Engine> =
                    Box::new(CpuEngine::new(artifact, self.model_threads.max(1))?);
                // Its buffers sized now, not by the first request it serves.
                more.predict(&blank, 1, &mut logits)?;
                engines.push(more);
            }
            Batcher::inline(engines, on_batch)
        } else {
            Batcher::spawn(engine, self.batch, on_batch)
                .map_err(|e| crate::Error::io("start the batching thread for", &record.path, e))?
        };
        Ok(Model {
            name: name.to_string(),
            version,
            shape: ModelShape {
                input: artifact.input.clone(),
                labels: artifact.labels.clone(),
            },
            batcher,
            cache: PredictionCache::new(self.cache_images),
            redis_prefix: format!(
                "mlops:pred:{name}:{version}:{}",
                record.sha256.get(..16).unwrap_or(&record.sha256)
            ),
            info,
        })
    }
}

/// A version refused once, by file size and modification time: it is tried again only
/// when its file changes (not on every poll, with a log line each time).
type Refused = BTreeMap<(String, u64), (u64, Option<SystemTime>)>;

fn file_stamp(path: &std::path::Path) -> (u64, Option<SystemTime>) {
    std::fs::metadata(path).map_or((0, None), |m| (m.len(), m.modified().ok()))
}

/// Keeps `state`'s registry in step with the repository.
pub(crate) struct Poller {
    pub repository: RepositoryConfig,
    pub loader: Loader,
    refused: Refused,
    config: Option<ModelConfigList>,
}

impl Poller {
    pub(crate) fn new(repository: RepositoryConfig, loader: Loader) -> Self {
        Poller {
            repository,
            loader,
            refused: Refused::new(),
            config: None,
        }
    }

    /// Reads the repository once and applies it. Start-up calls it before listening;
    /// errors only when the repository (or the config file, the first time) cannot be
    /// read at all: later failures keep what is served and log.
    ///
    /// # Errors
    /// As [`repository::read_config`] and [`repository::scan`], at start-up.
    pub(crate) fn first(&mut self, state: &AppState) -> crate::Result<()> {
        if let Some(file) = &self.repository.config_file {
            self.config = Some(repository::read_config(file)?);
        }
        let (wanted, problems) = repository::scan(&self.repository.root, self.config.as_ref())?;
        self.apply(state, wanted, problems);
        let loaded = state
            .registry
            .snapshot()
            .models
            .values()
            .any(|m| m.from_repository && !m.versions.is_empty());
        if !loaded {
            log(format_args!(
                "the model repository `{}` has no version that loads (expected DIR/<name>/<version>/{}); \
                 its models answer 404 and readiness 503 until one appears ({})",
                self.repository.root.display(),
                repository::MODEL_FILE,
                match self.repository.poll {
                    Some(every) => format!("read again every {} s and on SIGHUP", every.as_secs()),
                    None => "read again on SIGHUP".into(),
                }
            ));
        }
        Ok(())
    }

    /// Polls until `wake` is closed: every `poll` interval, or when a message (SIGHUP)
    /// arrives.
    pub(crate) fn run(mut self, state: Arc<AppState>, wake: Receiver<()>) {
        loop {
            let woken = match self.repository.poll {
                Some(every) => wake.recv_timeout(every),
                None => wake.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            if let Err(RecvTimeoutError::Disconnected) = woken {
                return;
            }
            if let Some(file) = &self.repository.config_file {
                match repository::read_config(file) {
                    Ok(config) => self.config = Some(config),
                    Err(e) => log(format_args!("{e}; keeping the previous model config")),
                }
            }
            match repository::scan(&self.repository.root, self.config.as_ref()) {
                Ok((wanted, problems)) => self.apply(&state, wanted, problems),
                Err(e) => log(format_args!("{e}; keeping the models served")),
            }
        }
    }

    /// Loads what is wanted and not served, unloads what is served and not wanted, one
    /// swap per change so a new version answers as soon as it is warm.
    fn apply(
        &mut self,
        state: &AppState,
        wanted: BTreeMap<String, repository::WantedModel>,
        problems: Vec<String>,
    ) {
        for problem in problems {
            log(format_args!("{problem}"));
        }
        let current = state.registry.snapshot();
        // Models gone from the repository (or the config): every version unloaded.
        for (name, served) in &current.models {
            if served.from_repository && !wanted.contains_key(name) {
                state.registry.update(|r| unload_all(r, name));
                log(format_args!(
                    "model `{name}` is gone from the repository: versions {:?} unloaded (in-flight requests finish first)",
                    served.versions.keys().collect::<Vec<_>>()
                ));
            }
        }
        for (name, want) in wanted {
            let served = current.models.get(&name);
            if served.is_some_and(|s| !s.from_repository) {
                log(format_args!(
                    "the repository's model `{name}` has the name of an artifact given on the command line; that artifact keeps the name"
                ));
                continue;
            }
            let loaded: Vec<u64> =
                served.map_or(Vec::new(), |s| s.versions.keys().copied().collect());
            state.registry.update(|r| {
                let entry = r.models.entry(name.clone()).or_insert_with(|| Served {
                    from_repository: true,
                    ..Served::default()
                });
                entry.labels = want.labels.clone();
                entry.policy = want.policy.describe();
            });
            // The policy picks among the versions that load: a refused one (until its
            // file changes) is passed over, so `latest 1` keeps the version serving
            // when a newer one is broken.
            let selected = loop {
                let candidates: Vec<u64> = want
                    .present
                    .iter()
                    .filter(|(v, path)| {
                        self.refused.get(&(name.clone(), **v)) != Some(&file_stamp(path))
                    })
                    .map(|(v, _)| *v)
                    .collect();
                let selected = want.policy.select(&candidates);
                let mut refused_one = false;
                for &version in &selected {
                    if loaded.contains(&version)
                        || state
                            .registry
                            .snapshot()
                            .models
                            .get(&name)
                            .is_some_and(|s| s.versions.contains_key(&version))
                    {
                        continue;
                    }
                    if !self.load_version(state, &name, version, &want.present[&version], &loaded) {
                        refused_one = true;
                    }
                }
                if !refused_one {
                    break selected;
                }
            };
            for version in loaded {
                if !selected.contains(&version) {
                    state.registry.update(|r| {
                        if let Some(entry) = r.models.get_mut(&name) {
                            entry.versions.remove(&version);
                            entry.states.insert(
                                version,
                                VersionStatus {
                                    state: VersionState::End,
                                    error: None,
                                },
                            );
                        }
                    });
                    log(format_args!(
                        "model `{name}` version {version} unloaded (gone or no longer selected by `{}`; in-flight requests finish first)",
                        want.policy.describe()
                    ));
                }
            }
        }
    }
}

impl Poller {
    /// Loads one version and swaps it in; on failure records it as refused (state END
    /// with the error) and logs. Returns whether it loaded.
    fn load_version(
        &mut self,
        state: &AppState,
        name: &str,
        version: u64,
        path: &std::path::Path,
        loaded: &[u64],
    ) -> bool {
        let key = (name.to_string(), version);
        let stamp = file_stamp(path);
        match Artifact::load(path)
            .and_then(|(a, record)| self.loader.load(name, version, &a, &record))
        {
            Ok(model) => {
                self.refused.remove(&key);
                let model = Arc::new(model);
                state.registry.update(|r| {
                    let entry = r.models.entry(name.to_string()).or_default();
                    entry.versions.insert(version, model);
                    entry.states.insert(
                        version,
                        VersionStatus {
                            state: VersionState::Available,
                            error: None,
                        },
                    );
                });
                log(format_args!(
                    "model `{name}` version {version} loaded, warmed up and serving (`{}`)",
                    path.display()
                ));
                true
            }
            Err(e) => {
                self.refused.insert(key, stamp);
                let error = e.to_string();
                state.registry.update(|r| {
                    r.models.entry(name.to_string()).or_default().states.insert(
                        version,
                        VersionStatus {
                            state: VersionState::End,
                            error: Some(error.clone()),
                        },
                    );
                });
                log(format_args!(
                    "model `{name}` version {version} refused, not served: {error}{}",
                    if loaded.is_empty() {
                        String::new()
                    } else {
                        format!(" (versions {loaded:?} keep serving)")
                    }
                ));
                false
            }
        }
    }
}

fn unload_all(registry: &mut Registry, name: &str) {
    if let Some(entry) = registry.models.get_mut(name) {
        let versions: Vec<u64> = entry.versions.keys().copied().collect();
        entry.versions.clear();
        for v in versions {
            entry.states.insert(
                v,
                VersionStatus {
                    state: VersionState::End,
                    error: None,
                },
            );
        }
    }
}

fn log(message: std::fmt::Arguments<'_>) {
    crate::io::log_line(format_args!("mlops serve: {message}"));
}
