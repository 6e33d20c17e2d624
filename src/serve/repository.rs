//! The model repository of `mlops serve --model-repository DIR`: TF Serving's layout and
//! version policies, Triton's repository polling.
//!
//! Layout: `DIR/<name>/<version>/model.safetensors`, versions being positive integers
//! (other folders and files are ignored, as TF Serving ignores them). Which versions are
//! served is each model's version policy, from an optional config file shaped like TF
//! Serving's `model_config_list` (YAML or JSON):
//!
//! ```yaml
//! model_config_list:
//!   - name: cnn                      # served as /v1/models/cnn, /v2/models/cnn
//!     base_path: cnn                 # optional: folder under DIR (default: name)
//!     model_version_policy:          # optional: latest 1 by default
//!       latest: {num_versions: 2}    # or `all: {}`, or `specific: {versions: [1, 3]}`
//!     version_labels: {stable: 1, canary: 2}   # optional: /v1/models/cnn/labels/stable
//! ```
//!
//! Without a config file every folder of `DIR` is a model with the default policy.
//! [`scan`] reads the repository into what should be served; the server diffs that
//! against what it serves (load, warm up, swap in; unload what went away).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The file each version folder holds.
pub const MODEL_FILE: &str = "model.safetensors";

/// Models per repository at most (a guard against pointing `--model-repository` at a
/// huge tree): each loaded version holds its weights and a batching thread.
pub const MAX_MODELS: usize = 256;

/// TF Serving's `model_config_list`, read from YAML or JSON.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfigList {
    /// One entry per served model.
    pub model_config_list: Vec<ModelConfig>,
}

/// One model of the config file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Its name in URLs.
    pub name: String,
    /// Its folder under the repository (default: `name`). Absolute paths are refused:
    /// everything served lives under the repository.
    #[serde(default)]
    pub base_path: Option<String>,
    /// Which versions are served (default: the latest one).
    #[serde(default)]
    pub model_version_policy: VersionPolicy,
    /// Names for versions, as TF Serving's version labels.
    #[serde(default)]
    pub version_labels: BTreeMap<String, u64>,
}

/// TF Serving's `model_version_policy`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(try_from = "PolicyFields")]
pub enum VersionPolicy {
    /// The `num_versions` highest version numbers present.
    Latest {
        /// How many, at least 1.
        num_versions: usize,
    },
    /// Every version present.
    All {},
    /// These versions (those present).
    Specific {
        /// The version numbers.
        versions: Vec<u64>,
    },
}

/// The policy as written: a map with exactly one of `latest`, `all`, `specific` (TF
/// Serving's oneof). Read through this struct because serde_yaml 0.9 reads enums only
/// from YAML tags (`!latest`), which TF Serving users do not write.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFields {
    latest: Option<LatestFields>,
    all: Option<AllFields>,
    specific: Option<SpecificFields>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LatestFields {
    num_versions: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AllFields {}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SpecificFields {
    versions: Vec<u64>,
}

impl TryFrom<PolicyFields> for VersionPolicy {
    type Error = String;

    fn try_from(fields: PolicyFields) -> Result<Self, String> {
        match (fields.latest, fields.all, fields.specific) {
            (Some(l), None, None) => Ok(VersionPolicy::Latest {
                num_versions: l.num_versions,
            }),
            (None, Some(_), None) => Ok(VersionPolicy::All {}),
            (None, None, Some(s)) => Ok(VersionPolicy::Specific {
                versions: s.versions,
            }),
            _ => Err(
                "model_version_policy takes exactly one of `latest: {num_versions: N}`, \
                      `all: {}` or `specific: {versions: [..]}`"
                    .to_string(),
            ),
        }
    }
}

impl Default for VersionPolicy {
    fn default() -> Self {
        VersionPolicy::Latest { num_versions: 1 }
    }
}

impl VersionPolicy {
    /// The versions of `present` (sorted ascending) this policy serves.
    pub fn select(&self, present: &[u64]) -> Vec<u64> {
        match self {
            VersionPolicy::Latest { num_versions } => {
                let skip = present.len().saturating_sub(*num_versions);
                present[skip..].to_vec()
            }
            VersionPolicy::All {} => present.to_vec(),
            VersionPolicy::Specific { versions } => present
                .iter()
                .copied()
                .filter(|v| versions.contains(v))
                .collect(),
        }
    }

    /// For status pages: `latest 2`, `all`, `specific [1, 3]`.
    pub fn describe(&self) -> String {
        match self {
            VersionPolicy::Latest { num_versions } => format!("latest {num_versions}"),
            VersionPolicy::All {} => "all".into(),
            VersionPolicy::Specific { versions } => format!("specific {versions:?}"),
        }
    }
}

/// Reads and checks a config file.
///
/// # Errors
/// [`crate::Error::Config`] naming the file when it cannot be read or parsed, a model is
/// listed twice, a name or base path is not a plain folder name, `latest` asks for 0
/// versions, `specific` lists none, or a label names version 0.
pub fn read_config(path: &Path) -> crate::Result<ModelConfigList> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| crate::Error::io("read the model config", path, e))?;
    let config: ModelConfigList = serde_yaml::from_str(&text).map_err(|e| {
        crate::Error::Config(format!(
            "`{}` is not a model config list ({e}); write `model_config_list: [{{name: NAME, \
             model_version_policy: {{latest: {{num_versions: 1}}}}}}]` (README: serve)",
            path.display()
        ))
    })?;
    check_config(&config)
        .map_err(|problem| crate::Error::Config(format!("`{}`: {problem}", path.display())))?;
    Ok(config)
}

/// What [`read_config`] checks beyond the syntax.
fn check_config(config: &ModelConfigList) -> Result<(), String> {
    let mut names = std::collections::BTreeSet::new();
    for (i, model) in config.model_config_list.iter().enumerate() {
        let at = format!("model_config_list[{i}] (`{}`)", model.name);
        check_name(&model.name).map_err(|p| format!("{at}: name {p}"))?;
        if let Some(base) = &model.base_path {
            check_name(base).map_err(|p| format!("{at}: base_path {p}"))?;
        }
        if !names.insert(&model.name) {
            return Err(format!("{at}: the model is listed twice"));
        }
        match &model.model_version_policy {
            VersionPolicy::Latest { num_versions: 0 } => {
                return Err(format!("{at}: `latest` needs num_versions >= 1"))
            }
            VersionPolicy::Specific { versions } if versions.is_empty() => {
                return Err(format!("{at}: `specific` lists no versions"))
            }
            VersionPolicy::Specific { versions } if versions.contains(&0) => {
                return Err(format!("{at}: versions start at 1"))
            }
            _ => {}
        }
        if let Some((label, _)) = model.version_labels.iter().find(|(_, &v)| v == 0) {
            return Err(format!(
                "{at}: label `{label}` names version 0; versions start at 1"
            ));
        }
    }
    Ok(())
}

/// A model name or folder: one path component of letters, digits, `-`, `_`, `.` (not
/// `.`/`..`), so it is safe in URLs and cannot leave the repository.
fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` must be 1-128 letters, digits, `-`, `_` or `.` (one folder name)"
        ))
    }
}

/// What the repository holds for one model, and how to pick its versions.
#[derive(Debug, Clone, PartialEq)]
pub struct WantedModel {
    /// Every version present and its file (the policy picks among those that load).
    pub present: BTreeMap<u64, PathBuf>,
    /// Version labels (from the config file).
    pub labels: BTreeMap<String, u64>,
    /// The policy, for status pages.
    pub policy: VersionPolicy,
}

/// Reads `root` into the models and their versions, with their policies, by `config` (or
/// every folder with the default policy). Problems that skip a model or version (an unreadable folder, a
/// configured model with no folder) are returned as log lines, not errors: the other
/// models keep being served.
///
/// # Errors
/// [`crate::Error::Io`] when `root` itself cannot be listed;
/// [`crate::Error::Config`] when it holds more than [`MAX_MODELS`] models.
pub fn scan(
    root: &Path,
    config: Option<&ModelConfigList>,
) -> crate::Result<(BTreeMap<String, WantedModel>, Vec<String>)> {
    let mut problems = Vec::new();
    let entries: Vec<(String, String, VersionPolicy, BTreeMap<String, u64>)> = match config {
        Some(config) => config
            .model_config_list
            .iter()
            .map(|m| {
                (
                    m.name.clone(),
                    m.base_path.clone().unwrap_or_else(|| m.name.clone()),
                    m.model_version_policy.clone(),
                    m.version_labels.clone(),
                )
            })
            .collect(),
        None => {
            let mut names = Vec::new();
            for entry in std::fs::read_dir(root)
                .map_err(|e| crate::Error::io("list the model repository", root, e))?
            {
                let entry =
                    entry.map_err(|e| crate::Error::io("list the model repository", root, e))?;
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let name = entry.file_name().to_string_lossy().to_string();
                if name.starts_with('.') {
                    continue; // hidden folders: editors, rsync, `..data` of k8s volumes
                }
                match check_name(&name) {
                    Ok(()) => names.push(name),
                    Err(p) => problems.push(format!("skipped folder {p}")),
                }
            }
            names.sort();
            names
                .into_iter()
                .map(|n| (n.clone(), n, VersionPolicy::default(), BTreeMap::new()))
                .collect()
        }
    };
    if entries.len() > MAX_MODELS {
        return Err(crate::Error::Config(format!(
            "the model repository `{}` has {} models; this server takes at most {MAX_MODELS}",
            root.display(),
            entries.len()
        )));
    }
    let mut wanted = BTreeMap::new();
    for (name, base, policy, labels) in entries {
        let folder = root.join(&base);
        let present = match versions_in(&folder) {
            Ok(present) => present,
            Err(e) => {
                problems.push(format!(
                    "model `{name}`: cannot list `{}`: {e}",
                    folder.display()
                ));
                continue;
            }
        };
        wanted.insert(
            name,
            WantedModel {
                present,
                labels,
                policy,
            },
        );
    }
    Ok((wanted, problems))
}

/// The version folders of one model that hold a [`MODEL_FILE`], ascending.
fn versions_in(folder: &Path) -> std::io::Result<BTreeMap<u64, PathBuf>> {
    let mut versions = BTreeMap::new();
    for entry in std::fs::read_dir(folder)? {
        let entry = entry?;
        let Some(version) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u64>().ok())
            .filter(|&v| v > 0)
        else {
            continue;
        };
        let file = entry.path().join(MODEL_FILE);
        if file.is_file() {
            versions.insert(version, file);
        }
    }
    Ok(versions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_pick_versions_as_tf_serving() {
        let present = [1, 2, 5, 7];
        assert_eq!(VersionPolicy::default().select(&present), [7]);
        assert_eq!(
            VersionPolicy::Latest { num_versions: 3 }.select(&present),
            [2, 5, 7]
        );
        assert_eq!(
            VersionPolicy::Latest { num_versions: 9 }.select(&present),
            present
        );
        assert_eq!(VersionPolicy::All {}.select(&present), present);
        assert_eq!(
            VersionPolicy::Specific {
                versions: vec![5, 1, 3]
            }
            .select(&present),
            [1, 5]
        );
        assert!(VersionPolicy::default().select(&[]).is_empty());
    }

    #[test]
    fn config_reads_tf_serving_shapes_and_refuses_bad_ones() {
        let config: ModelConfigList = serde_yaml::from_str(
            "model_config_list:\n\
             - {name: cnn, model_version_policy: {latest: {num_versions: 2}}, version_labels: {stable: 1}}\n\
             - {name: b, base_path: other, model_version_policy: {all: {}}}\n\
             - {name: c, model_version_policy: {specific: {versions: [3]}}}\n\
             - {name: d}\n",
        )
        .unwrap();
        assert_eq!(check_config(&config), Ok(()));
        let m = &config.model_config_list;
        assert_eq!(
            m[0].model_version_policy,
            VersionPolicy::Latest { num_versions: 2 }
        );
        assert_eq!(m[0].version_labels["stable"], 1);
        assert_eq!(m[1].model_version_policy, VersionPolicy::All {});
        assert_eq!(m[3].model_version_policy, VersionPolicy::default());
        for (yaml, problem) in [
            ("- {name: a}\n- {name: a}", "listed twice"),
            ("- {name: ../x}", "must be"),
            ("- {name: a, base_path: /etc}", "base_path"),
            (
                "- {name: a, model_version_policy: {latest: {num_versions: 0}}}",
                ">= 1",
            ),
            (
                "- {name: a, model_version_policy: {specific: {versions: []}}}",
                "no versions",
            ),
            ("- {name: a, version_labels: {x: 0}}", "version 0"),
        ] {
            let config: ModelConfigList =
                serde_yaml::from_str(&format!("model_config_list:\n{yaml}")).unwrap();
            let e = check_config(&config).unwrap_err();
            assert!(e.contains(problem), "{yaml}: {e}");
        }
        assert!(serde_yaml::from_str::<ModelConfigList>(
            "model_config_list: [{name: a, model_version_policy: {newest: {}}}]"
        )
        .is_err());
    }

    #[test]
    fn scan_finds_numbered_folders_with_a_model_file() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for (model, version) in [
            ("cnn", "1"),
            ("cnn", "3"),
            ("cnn", "x"),
            ("cnn", "0"),
            ("b", "2"),
        ] {
            std::fs::create_dir_all(root.join(model).join(version)).unwrap();
            std::fs::write(root.join(model).join(version).join(MODEL_FILE), b"").unwrap();
        }
        std::fs::create_dir_all(root.join("cnn/4")).unwrap(); // no model file yet
        std::fs::create_dir_all(root.join(".hidden/1")).unwrap();
        let (wanted, problems) = scan(root, None).unwrap();
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(wanted.keys().collect::<Vec<_>>(), ["b", "cnn"]);
        assert_eq!(wanted["cnn"].present.keys().collect::<Vec<_>>(), [&1, &3]);
        assert_eq!(wanted["cnn"].policy, VersionPolicy::default());
        let config: ModelConfigList = serde_yaml::from_str(
            "model_config_list: [{name: cnn, model_version_policy: {all: {}}}, {name: gone}]",
        )
        .unwrap();
        let (wanted, problems) = scan(root, Some(&config)).unwrap();
        assert_eq!(wanted["cnn"].policy, VersionPolicy::All {});
        assert!(!wanted.contains_key("b"), "only configured models");
        assert!(problems[0].contains("model `gone`"), "{problems:?}");
    }
}
