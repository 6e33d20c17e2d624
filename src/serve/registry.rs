//! What the server serves right now: models, their loaded versions, labels and version
//! states (TF Serving's `model_version_status`).
//!
//! The registry is an immutable snapshot behind an `RwLock<Arc<_>>`: a request takes the
//! `Arc` (a short read lock), picks its version's `Arc<Model>` and runs on it, so a
//! version swapped out while requests are in flight keeps running until the last of them
//! has its answer (its batching thread ends when the last `Arc` is dropped: drained, then
//! unloaded). Writers (start-up and the repository poller, one thread) build a changed
//! copy and swap it in: readers see the old or the new registry, never a half-built one.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use super::http::Model;

/// A version's state, as TF Serving names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VersionState {
    /// Loaded, warmed up and answering.
    Available,
    /// Gone: unloaded (removed from the repository or no longer selected by the policy),
    /// or refused when it was loaded (then with an error).
    End,
}

impl VersionState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            VersionState::Available => "AVAILABLE",
            VersionState::End => "END",
        }
    }
}

/// One version's state and, for a refused one, why.
#[derive(Debug, Clone)]
pub(crate) struct VersionStatus {
    pub state: VersionState,
    pub error: Option<String>,
}

/// One served model name.
#[derive(Clone, Default)]
pub(crate) struct Served {
    /// Loaded versions.
    pub versions: BTreeMap<u64, Arc<Model>>,
    /// Version labels (TF Serving's `version_labels`).
    pub labels: BTreeMap<String, u64>,
    /// Every version seen: loaded, unloaded, refused.
    pub states: BTreeMap<u64, VersionStatus>,
    /// The version policy, for status pages (`latest 1`, `all`, `fixed` for artifacts
    /// given on the command line).
    pub policy: String,
    /// From `--model-repository` (polled), or an artifact given on the command line.
    pub from_repository: bool,
}

/// Which version a request asked for.
#[derive(Debug, Clone)]
pub(crate) enum Pick {
    /// None named: the highest loaded version.
    Latest,
    /// `/versions/N`.
    Version(u64),
    /// `/labels/NAME`.
    Label(String),
}

/// Why a request's model or version cannot be answered (404s).
#[derive(Debug)]
pub(crate) enum PickError {
    /// No such model name.
    NoModel { known: Vec<String> },
    /// The model has no loaded version (all refused, or not loaded yet).
    NothingLoaded,
    /// The version is not loaded.
    NoVersion { version: u64, loaded: Vec<u64> },
    /// The label is not defined, or names a version that is not loaded.
    NoLabel {
        label: String,
        labels: Vec<String>,
        version: Option<u64>,
    },
}

impl PickError {
    /// A message naming what exists, for the 404 body.
    pub(crate) fn message(&self, name: &str) -> String {
        match self {
            PickError::NoModel { known } => format!("no model `{name}`; this server has {known:?}"),
            PickError::NothingLoaded => format!(
                "model `{name}` has no version loaded (see GET /v1/models/{name} for each version's state)"
            ),
            PickError::NoVersion { version, loaded } => format!(
                "model `{name}` has no version {version} loaded; loaded: {loaded:?}"
            ),
            PickError::NoLabel {
                label,
                labels,
                version: None,
            } => format!("model `{name}` has no version label `{label}`; labels: {labels:?}"),
            PickError::NoLabel {
                label,
                version: Some(v),
                ..
            } => format!(
                "label `{label}` of model `{name}` names version {v}, which is not loaded"
            ),
        }
    }
}

/// A snapshot of everything served.
#[derive(Clone, Default)]
pub(crate) struct Registry {
    pub models: BTreeMap<String, Served>,
}

impl Registry {
    /// The model `name`'s version per `pick`.
    pub(crate) fn pick(&self, name: &str, pick: &Pick) -> Result<Arc<Model>, PickError> {
        let served = self.models.get(name).ok_or_else(|| PickError::NoModel {
            known: self.models.keys().cloned().collect(),
        })?;
        let loaded = || served.versions.keys().copied().collect::<Vec<_>>();
        match pick {
            Pick::Latest => served
                .versions
                .values()
                .next_back()
                .cloned()
                .ok_or(PickError::NothingLoaded),
            Pick::Version(v) => {
                served
                    .versions
                    .get(v)
                    .cloned()
                    .ok_or_else(|| PickError::NoVersion {
                        version: *v,
                        loaded: loaded(),
                    })
            }
            Pick::Label(label) => {
                let version = served.labels.get(label).copied();
                version
                    .and_then(|v| served.versions.get(&v).cloned())
                    .ok_or_else(|| PickError::NoLabel {
                        label: label.clone(),
                        labels: served.labels.keys().cloned().collect(),
                        version,
                    })
            }
        }
    }
}

/// The registry as the handlers and the poller share it.
pub(crate) struct Shared {
    current: RwLock<Arc<Registry>>,
}

impl Shared {
    pub(crate) fn new(registry: Registry) -> Self {
        Shared {
            current: RwLock::new(Arc::new(registry)),
        }
    }

    /// The registry now (a poisoned lock still holds a whole registry: writers swap an
    /// `Arc`, they never leave one half-changed).
    pub(crate) fn snapshot(&self) -> Arc<Registry> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Applies `change` to a copy of the registry and swaps the copy in.
    pub(crate) fn update(&self, change: impl FnOnce(&mut Registry)) {
        let mut next = (*self.snapshot()).clone();
        change(&mut next);
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(next);
    }
}
