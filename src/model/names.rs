//! Layer names as users type them (`layers.4` or `4`), resolved against a spec; shared
//! by every command that takes `--layers` or `--exclude`.

use super::ModelSpec;
use crate::{Error, Result};

/// Resolves layer names (`layers.4` or `4`) to parameter indices; unknown names are an
/// error that suggests the nearest layer with weights. Indices are into
/// [`ModelSpec::params`] (the weight's; its bias follows it).
///
/// # Errors
/// - [`Error::Spec`] / [`Error::SpecLayer`] when `spec` is invalid.
/// - [`Error::Config`] when a name is not a layer with weights (conv or dense).
pub fn resolve_layers(spec: &ModelSpec, names: &[String]) -> Result<Vec<usize>> {
    let params = spec.params()?;
    let candidates: Vec<(usize, String)> = params
        .iter()
        .enumerate()
        .filter(|(_, p)| p.name.ends_with(".weight"))
        .map(|(i, p)| (i, p.name.trim_end_matches(".weight").to_string()))
        .collect();
    names
        .iter()
        .map(|raw| {
            let name = if raw.chars().all(|c| c.is_ascii_digit()) {
                format!("layers.{raw}")
            } else {
                raw.trim_end_matches(".weight").to_string()
            };
            candidates
                .iter()
                .find(|(_, n)| *n == name)
                .map(|(i, _)| *i)
                .ok_or_else(|| {
                    let nearest = candidates
                        .iter()
                        .min_by_key(|(_, n)| edit_distance(n, &name))
                        .map_or(String::new(), |(_, n)| n.clone());
                    Error::Config(format!(
                        "no layer with weights named `{raw}`; did you mean `{nearest}`? (layers with weights: {})",
                        candidates.iter().map(|(_, n)| n.as_str()).collect::<Vec<_>>().join(", ")
                    ))
                })
        })
        .collect()
}

/// Levenshtein distance, for "did you mean" (a dozen lines; no crate needed).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_layer_suggests_the_nearest() {
        let spec = ModelSpec::reference_cnn();
        let err = resolve_layers(&spec, &["layers.5".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("did you mean"), "{err}");
        assert_eq!(
            resolve_layers(&spec, &["4".into(), "layers.6".into()]).unwrap(),
            vec![4, 6]
        );
    }
}
