//! Structured pruning: remove whole conv filters / dense units (smallest L1 norm) and the
//! matching input channels of the next layer, so the model itself gets smaller and faster.
//!
//! The next conv/dense layer is found by walking through pooling, ReLU, dropout and
//! flatten; after a flatten of `[h, w, c]` the kept inputs are every `(y, x)` position's
//! kept channels, in the same `(h, w, c)` order.

use serde::Serialize;

use crate::model::{LayerSpec, ModelSpec, Shape};
use crate::{Error, Result};

/// What happens to one layer's outputs.
#[derive(Debug, Clone, Serialize)]
pub struct LayerPlan {
    /// Index in the spec's layers.
    pub layer: usize,
    /// Output channels / units before.
    pub before: usize,
    /// Kept output indices, ascending.
    pub kept: Vec<usize>,
}

/// Output channels each layer keeps, chosen by L1 norm.
///
/// `params` are `spec`'s tensors in spec order (conv `[out, kh, kw, in]`, dense
/// `[out, in]`); `weights` are parameter indices (spec order) of the layers to shrink;
/// `global` ranks all their filters together by mean |w| instead of keeping `keep` of
/// each layer. Every layer keeps at least one output.
///
/// # Errors
/// - [`Error::Config`] when `keep` is outside `(0, 1]`, or a weight in `weights` is the
///   last layer's (it produces the class scores).
/// - [`Error::Spec`] / [`Error::SpecLayer`] when `spec` is invalid.
pub fn plan(
    spec: &ModelSpec,
    params: &[Vec<f32>],
    weights: &[usize],
    keep: f32,
    global: bool,
) -> Result<Vec<LayerPlan>> {
    if !(keep > 0.0 && keep <= 1.0) {
        return Err(Error::Config(format!(
            "the share of filters kept ({keep}) is outside (0, 1]; e.g. `--structured --sparsity 0.5` removes half the filters"
        )));
    }
    let infos = spec.params()?;
    let last_weight = infos.iter().rposition(|p| p.name.ends_with(".weight"));
    let mut scored = Vec::new();
    for &w in weights {
        if Some(w) == last_weight {
            return Err(Error::Config(format!(
                "`{}` produces the class scores; its outputs cannot be removed",
                infos[w].name
            )));
        }
        let layer: usize = infos[w].name["layers.".len()..]
            .split('.')
            .next()
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| Error::Config(format!("unexpected tensor name `{}`", infos[w].name)))?;
        let out = infos[w].shape[0];
        let per = params[w].len() / out;
        let norms: Vec<f64> = params[w]
            .chunks_exact(per)
            .map(|row| row.iter().map(|v| v.abs() as f64).sum::<f64>() / per as f64)
            .collect();
        scored.push((layer, out, norms));
    }
    let threshold = if global && !scored.is_empty() {
        let mut all: Vec<f64> = scored
            .iter()
            .flat_map(|(_, _, n)| n.iter().copied())
            .collect();
        all.sort_by(|a, b| b.total_cmp(a));
        let count = ((keep as f64 * all.len() as f64).round() as usize).clamp(1, all.len());
        Some(all[count - 1])
    } else {
        None
    };
    Ok(scored
        .into_iter()
        .map(|(layer, out, norms)| {
            let mut order: Vec<usize> = (0..out).collect();
            order.sort_by(|&a, &b| norms[b].total_cmp(&norms[a]).then(a.cmp(&b)));
            let count = match threshold {
                Some(t) => norms.iter().filter(|&&n| n >= t).count(),
                None => (keep as f64 * out as f64).round() as usize,
            }
            .clamp(1, out);
            let mut kept = order[..count].to_vec();
            kept.sort_unstable();
            LayerPlan {
                layer,
                before: out,
                kept,
            }
        })
        .collect())
}

/// Applies a plan: the smaller spec and its parameters (spec order, same layouts as
/// `params`). Each pruned layer loses its removed output rows and bias entries, and the
/// next conv/dense layer the matching input channels (every position's, after a flatten).
///
/// # Errors
/// - [`Error::Spec`] / [`Error::SpecLayer`] when `spec` is invalid.
/// - [`Error::Config`] when a plan names a layer without weights or with no conv/dense
///   layer after it, or the pruned spec is invalid.
pub fn apply(
    spec: &ModelSpec,
    params: &[Vec<f32>],
    plans: &[LayerPlan],
) -> Result<(ModelSpec, Vec<Vec<f32>>)> {
    let shapes = spec.shapes()?;
    let infos = spec.params()?;
    let index_of = |layer: usize| -> Result<usize> {
        let name = format!("layers.{layer}.weight");
        infos
            .iter()
            .position(|p| p.name == name)
            .ok_or_else(|| Error::Config(format!("layer {layer} has no weights")))
    };
    let mut new_spec = spec.clone();
    let mut new_params = params.to_vec();
    let mut ordered: Vec<&LayerPlan> = plans.iter().collect();
    ordered.sort_by_key(|p| p.layer);
    for plan in ordered {
        let w = index_of(plan.layer)?;
        // Its input side may already be smaller (an earlier plan's consumer).
        let per = new_params[w].len() / plan.before;
        // Keep the plan's output rows (weight) and entries (bias).
        new_params[w] = plan
            .kept
            .iter()
            .flat_map(|&o| new_params[w][o * per..(o + 1) * per].to_vec())
            .collect();
        new_params[w + 1] = plan.kept.iter().map(|&o| new_params[w + 1][o]).collect();
        match &mut new_spec.layers[plan.layer] {
            LayerSpec::Conv2d { filters, .. } => *filters = plan.kept.len(),
            LayerSpec::Dense { units, .. } => *units = plan.kept.len(),
            other => {
                return Err(Error::Config(format!(
                    "layer {} ({}) has no outputs to remove",
                    plan.layer,
                    other.kind()
                )))
            }
        }
        // Walk to the consumer, noting a flatten on the way.
        let mut flatten_from: Option<[usize; 3]> = None;
        let mut next = plan.layer + 1;
        while next < spec.layers.len() {
            match &spec.layers[next] {
                LayerSpec::Conv2d { .. } | LayerSpec::Dense { .. } => break,
                LayerSpec::Flatten => {
                    if let Shape::Spatial(s) = shapes[next] {
                        flatten_from = Some(s);
                    }
                }
                _ => {}
            }
            next += 1;
        }
        let consumer = index_of(next)?;
        let kept_inputs: Vec<usize> = match (&spec.layers[next], flatten_from) {
            (LayerSpec::Dense { .. }, Some([h, w_, c])) => (0..h * w_)
                .flat_map(|pos| plan.kept.iter().map(move |&ch| pos * c + ch))
                .collect(),
            _ => plan.kept.clone(),
        };
        let rows = infos[consumer].shape[0];
        let old = &new_params[consumer];
        let row_len = old.len() / rows;
        let new_weight: Vec<f32> = match &spec.layers[next] {
            LayerSpec::Conv2d { kernel, .. } => {
                // [out, kh, kw, in]: keep the kept input channels of every tap.
                let input = row_len / (kernel * kernel);
                old.chunks_exact(input)
                    .flat_map(|tap| plan.kept.iter().map(|&ch| tap[ch]).collect::<Vec<_>>())
                    .collect()
            }
            _ => old
                .chunks_exact(row_len)
                .flat_map(|row| kept_inputs.iter().map(|&i| row[i]).collect::<Vec<_>>())
                .collect(),
        };
        new_params[consumer] = new_weight;
    }
    new_spec
        .shapes()
        .map_err(|e| Error::Config(format!("the pruned spec is invalid: {e}")))?;
    Ok((new_spec, new_params))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::{Executor, Plan};

    /// Removing filters that were already zero changes no output.
    #[test]
    fn removing_zero_filters_keeps_outputs() {
        let spec = ModelSpec::from_yaml(
            "input: [6, 6, 2]\nclasses: 3\nlayers:\n\
             - {type: conv2d, filters: 4, kernel: 3, activation: relu}\n\
             - {type: conv2d, filters: 6, kernel: 2, activation: relu}\n\
             - {type: max_pool2d, size: 2}\n\
             - {type: flatten}\n\
             - {type: dense, units: 5, activation: relu}\n\
             - {type: dense, units: 3}\n",
        )
        .unwrap();
        let plan = Plan::compile(&spec).unwrap();
        let mut params = plan.init_params(7);
        // Zero filters 1 and 3 of layer 1 (param 2 = weight [6, 2, 2, 4], 3 = bias), and
        // units 0 and 4 of layer 4 (param 4 = weight [5, 24], 5 = bias).
        let per = params[2].len() / 6;
        for f in [1, 3] {
            params[2][f * per..(f + 1) * per].fill(0.0);
            params[3][f] = 0.0;
        }
        let per = params[4].len() / 5;
        for u in [0, 4] {
            params[4][u * per..(u + 1) * per].fill(0.0);
            params[5][u] = 0.0;
        }
        let plans = super::plan(&spec, &params, &[2, 4], 0.6, false).unwrap();
        assert_eq!(plans[0].kept, vec![0, 2, 4, 5]);
        assert_eq!(plans[1].kept, vec![1, 2, 3]);
        let (small, small_params) = apply(&spec, &params, &plans).unwrap();
        assert!(small.param_count().unwrap() < spec.param_count().unwrap());
        let x: Vec<f32> = (0..3 * 72).map(|i| (i % 11) as f32 / 11.0).collect();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        Executor::new(&plan, 1).predict(&params, &x, 3, &mut a);
        Executor::new(&Plan::compile(&small).unwrap(), 1).predict(&small_params, &x, 3, &mut b);
        for (p, q) in a.iter().zip(&b) {
            assert!((p - q).abs() < 1e-5, "{p} vs {q}");
        }
    }

    #[test]
    fn keep_outside_range_and_last_layer_are_rejected() {
        let spec = ModelSpec::reference_cnn();
        let params = Plan::compile(&spec).unwrap().init_params(0);
        assert!(plan(&spec, &params, &[2], 0.0, false).is_err());
        assert!(plan(&spec, &params, &[2], 1.5, false).is_err());
        let err = plan(&spec, &params, &[8], 0.5, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("class scores"), "{err}");
    }
}
