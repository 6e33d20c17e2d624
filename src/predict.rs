//! What a model says about each image: class, label, probabilities and the top-k, in
//! input order (`mlops predict`).

use serde::Serialize;

use crate::data::Split;
use crate::runtime::{argmax, Engine};
use crate::{Error, Result};

/// One image's answer.
#[derive(Debug, Clone, Serialize)]
pub struct Prediction {
    /// The most likely class.
    pub class: usize,
    /// Its label.
    pub label: String,
    /// softmax of the logits, one per class (sums to 1).
    pub probabilities: Vec<f32>,
    /// The `k` most likely classes, most likely first: `(class, probability)`.
    pub top: Vec<(usize, f32)>,
    /// The image's label in the data, when it came from a labelled data set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected: Option<usize>,
}

/// `softmax(x)_i = exp(x_i - max x) / sum_j exp(x_j - max x)` (shifted by the maximum so
/// no `exp` overflows).
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let exp: Vec<f32> = logits.iter().map(|&v| (v - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.into_iter().map(|v| v / sum).collect()
}

/// Runs `engine` over every image of `split` (`batch` at a time) and answers for each:
/// class, `labels[class]`, probabilities and the `top` most likely classes; `expected`
/// is the split's label when `labelled`.
///
/// # Errors
/// [`Error::Config`] when `labels` does not have one entry per class, or when an image's
/// logits are non-finite (naming the image: never a made-up answer); a failed forward
/// pass.
pub fn predict(
    engine: &mut dyn Engine,
    split: &Split,
    labels: &[String],
    top: usize,
    batch: usize,
    labelled: bool,
) -> Result<Vec<Prediction>> {
    let classes = engine.plan().classes;
    if labels.len() != classes {
        return Err(Error::Config(format!(
            "{} labels for {classes} classes",
            labels.len()
        )));
    }
    let preprocess = *engine.preprocess();
    let (mut x, mut y, mut logits) = (Vec::new(), Vec::new(), Vec::new());
    let mut out = Vec::with_capacity(split.count);
    let all: Vec<usize> = (0..split.count).collect();
    for chunk in all.chunks(batch.max(1)) {
        split.gather(chunk, &preprocess, &mut x, &mut y);
        engine.predict(&x, chunk.len(), &mut logits)?;
        for (row, (&image, &label)) in logits.chunks_exact(classes).zip(chunk.iter().zip(&y)) {
            if row.iter().any(|v| !v.is_finite()) {
                return Err(Error::Config(format!(
                    "image {image}: the forward pass gave non-finite logits; the artifact or the image is broken (check it with `mlops eval`)"
                )));
            }
            let probabilities = softmax(row);
            let class = argmax(row);
            let mut order: Vec<usize> = (0..classes).collect();
            order.sort_by(|&a, &b| probabilities[b].total_cmp(&probabilities[a]));
            out.push(Prediction {
                class,
                label: labels[class].clone(),
                top: order
                    .iter()
                    .take(top.clamp(1, classes))
                    .map(|&c| (c, probabilities[c]))
                    .collect(),
                probabilities,
                expected: labelled.then_some(label as usize),
            });
        }
    }
    Ok(out)
}
