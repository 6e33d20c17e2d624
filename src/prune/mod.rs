//! Unstructured magnitude pruning with TF-MOT's schedules, applied while fine-tuning.
//!
//! A [`Schedule`] says at which optimizer steps the masks are recomputed and to what
//! sparsity; [`Masks`] zero the smallest-magnitude weights of the chosen layers and are
//! re-applied after every update, so the zeros survive Adam. The result is a plain fp32
//! artifact whose zeros are real (nothing to strip).

mod run;
pub mod structured;

pub use run::{
    plan, prune, FineTune, LayerCut, MagnitudeReport, Method, PlannedTensor, PruneConfig,
    PruneData, PrunePlan, PruneReport, ScheduleKind, StructuredReport,
};

use serde::Serialize;

use crate::model::ModelSpec;
use crate::{Error, Result};

/// When and how far to prune, with TF-MOT's semantics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Schedule {
    /// `ConstantSparsity`: the target from `begin` on, every `frequency` steps.
    Constant {
        /// Target sparsity in `[0, 1)`.
        sparsity: f32,
        /// First step that prunes.
        begin: u64,
        /// Last step that may prune.
        end: u64,
        /// Steps between mask updates.
        frequency: u64,
    },
    /// `PolynomialDecay` from `initial` to `target` between `begin` and `end`.
    Polynomial {
        /// Sparsity at `begin`.
        initial: f32,
        /// Sparsity at and after `end`.
        target: f32,
        /// First step that prunes.
        begin: u64,
        /// Step where the target is reached.
        end: u64,
        /// Steps between mask updates.
        frequency: u64,
        /// Exponent of the decay (TF-MOT default 3).
        power: f32,
    },
}

impl Schedule {
    /// The sparsity to prune to at `step`, or `None` when no mask update is due.
    pub fn at(&self, step: u64) -> Option<f32> {
        let (begin, end, frequency) = match *self {
            Schedule::Constant {
                begin,
                end,
                frequency,
                ..
            }
            | Schedule::Polynomial {
                begin,
                end,
                frequency,
                ..
            } => (begin, end, frequency),
        };
        if step < begin || step > end || !(step - begin).is_multiple_of(frequency.max(1)) {
            return None;
        }
        Some(match *self {
            Schedule::Constant { sparsity, .. } => sparsity,
            Schedule::Polynomial {
                initial,
                target,
                power,
                ..
            } => {
                // A schedule of one update (begin == end) prunes to the target at once.
                let p = if end <= begin {
                    1.0
                } else {
                    ((step - begin) as f64 / (end - begin) as f64).clamp(0.0, 1.0)
                };
                ((initial - target) as f64 * (1.0 - p).powf(power as f64) + target as f64) as f32
            }
        })
    }

    /// The sparsity the schedule ends at.
    pub fn target(&self) -> f32 {
        match *self {
            Schedule::Constant { sparsity, .. } => sparsity,
            Schedule::Polynomial { target, .. } => target,
        }
    }
}

/// The pruning steps of a run of `total_steps` optimizer updates, fitted so the target is
/// reached inside the run (TF-MOT leaves this to the user, and a schedule whose
/// `end_step` or `frequency` lies past the run silently prunes to less or nothing:
/// model-optimization#973, #975).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FittedSteps {
    /// First update that prunes (0-based).
    pub begin: u64,
    /// Update at which the target is reached: `begin + k * frequency`, within the run.
    pub end: u64,
    /// Updates between mask updates.
    pub frequency: u64,
    /// What was changed from the request, in words (empty when nothing was).
    pub adjustments: Vec<String>,
}

/// Fits `begin`, `end` (default: as late as the run allows) and `frequency` to a run of
/// `total_steps` updates: `end` is clamped to the last update, `frequency` to the span
/// between `begin` and `end` (so at least one update after `begin` prunes), and `end`
/// is moved back onto `begin + k * frequency` so the last mask update hits the target.
///
/// # Errors
/// [`Error::Config`] when `begin` lies past the run (no update could prune), or
/// `frequency` is 0, or the run has no step.
pub fn fit_steps(
    begin: u64,
    end: Option<u64>,
    frequency: u64,
    total_steps: u64,
) -> Result<FittedSteps> {
    if frequency == 0 {
        return Err(Error::Config("`--frequency` must be at least 1".into()));
    }
    if total_steps == 0 {
        return Err(Error::Config(
            "the fine-tuning run has no optimizer step; give it data (`--data`, `--limit`) and `--fine-tune-epochs` of at least 1".into(),
        ));
    }
    let last = total_steps - 1;
    if begin > last {
        return Err(Error::Config(format!(
            "`--begin-step {begin}` is past the last fine-tuning step ({last} of {total_steps} steps, 0-based), so nothing would be pruned; lower `--begin-step` or raise `--fine-tune-epochs`"
        )));
    }
    let mut adjustments = Vec::new();
    let given = end.is_some();
    let asked_end = end.unwrap_or(last);
    let mut end = asked_end.min(last).max(begin);
    if end != asked_end {
        adjustments.push(format!(
            "end step {asked_end} clamped to {end}: the run has {total_steps} steps"
        ));
    }
    let span = end - begin;
    let fitted_frequency = if span == 0 {
        frequency
    } else {
        frequency.min(span)
    };
    if fitted_frequency != frequency {
        adjustments.push(format!(
            "frequency {frequency} lowered to {fitted_frequency}: steps {begin}..={end} hold fewer than {frequency} updates"
        ));
    }
    if span > 0 {
        let aligned = begin + span / fitted_frequency * fitted_frequency;
        if aligned != end && given && asked_end == end {
            adjustments.push(format!(
                "end step {end} moved back to {aligned}, the last mask update (begin {begin} + a multiple of frequency {fitted_frequency})"
            ));
        }
        end = aligned;
    }
    Ok(FittedSteps {
        begin,
        end,
        frequency: fitted_frequency,
        adjustments,
    })
}

/// Which parameter tensors are pruned and their current masks (true = kept).
#[derive(Debug, Clone)]
pub struct Masks {
    /// Parameter indices (spec order) of the pruned weights.
    pub params: Vec<usize>,
    /// Weights pruned together: runs of `block` consecutive values along the innermost
    /// (input) axis, ranked by their mean magnitude (TF-MOT's `block_size=(1, block)`).
    /// 1 is element-wise pruning.
    pub block: usize,
    masks: Vec<Vec<bool>>,
}

/// The prunable layers by default: every conv/dense weight but the first conv and the
/// last layer, which TF-MOT users keep dense for accuracy. Names are `layers.N`.
///
/// # Errors
/// [`crate::Error::Spec`] / [`crate::Error::SpecLayer`] when `spec` is invalid.
pub fn default_layers(spec: &ModelSpec) -> Result<Vec<String>> {
    let weights: Vec<String> = spec
        .params()?
        .into_iter()
        .filter(|p| p.name.ends_with(".weight"))
        .map(|p| p.name.trim_end_matches(".weight").to_string())
        .collect();
    Ok(weights
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 0 && *i + 1 != weights.len())
        .map(|(_, n)| n.clone())
        .collect())
}

impl Masks {
    /// All-keep masks for the given parameters, pruned in blocks of `block` (see
    /// [`Masks::block`]; every pruned tensor's length must be a multiple of it).
    pub fn new(params: &[Vec<f32>], pruned: Vec<usize>, block: usize) -> Self {
        let masks = pruned
            .iter()
            .map(|&i| vec![true; params[i].len()])
            .collect();
        Masks {
            params: pruned,
            block: block.max(1),
            masks,
        }
    }

    /// Recomputes each mask to drop the `sparsity` share of smallest-magnitude weights
    /// (or blocks; ties broken by position, so the count is exact).
    pub fn update(&mut self, params: &[Vec<f32>], sparsity: f32) {
        let block = self.block;
        for (mask, &p) in self.masks.iter_mut().zip(&self.params) {
            let magnitude: Vec<f32> = params[p]
                .chunks(block)
                .map(|b| b.iter().map(|v| v.abs()).sum::<f32>() / b.len() as f32)
                .collect();
            let drop = ((sparsity as f64) * magnitude.len() as f64).round() as usize;
            let mut order: Vec<usize> = (0..magnitude.len()).collect();
            order.sort_by(|&a, &b| magnitude[a].total_cmp(&magnitude[b]).then(a.cmp(&b)));
            mask.fill(true);
            for &i in &order[..drop.min(magnitude.len())] {
                let end = ((i + 1) * block).min(mask.len());
                mask[i * block..end].fill(false);
            }
        }
    }

    /// Zeroes the masked weights.
    pub fn apply(&self, params: &mut [Vec<f32>]) {
        for (mask, &p) in self.masks.iter().zip(&self.params) {
            for (v, &keep) in params[p].iter_mut().zip(mask) {
                if !keep {
                    *v = 0.0;
                }
            }
        }
    }
}

/// Sparsity of one tensor.
#[derive(Debug, Clone, Serialize)]
pub struct LayerSparsity {
    /// Weight tensor name.
    pub name: String,
    /// Values in it.
    pub params: usize,
    /// Exact zeros.
    pub zeros: usize,
    /// `zeros / params`.
    pub sparsity: f64,
    /// Whether it was pruned.
    pub pruned: bool,
}

/// Zeros per weight tensor and over all pruned weights (what `mlops.sparsity` records).
/// `params` are `spec`'s tensors in spec order; `pruned` holds indices into them.
///
/// # Errors
/// [`crate::Error::Spec`] / [`crate::Error::SpecLayer`] when `spec` is invalid.
pub fn sparsity_of(
    spec: &ModelSpec,
    params: &[Vec<f32>],
    pruned: &[usize],
) -> Result<(Vec<LayerSparsity>, f64)> {
    let infos = spec.params()?;
    let mut layers = Vec::new();
    let (mut zeros, mut total) = (0usize, 0usize);
    for (i, info) in infos.iter().enumerate() {
        if !info.name.ends_with(".weight") {
            continue;
        }
        let z = params[i].iter().filter(|v| **v == 0.0).count();
        let is_pruned = pruned.contains(&i);
        if is_pruned {
            zeros += z;
            total += params[i].len();
        }
        layers.push(LayerSparsity {
            name: info.name.clone(),
            params: params[i].len(),
            zeros: z,
            sparsity: z as f64 / params[i].len().max(1) as f64,
            pruned: is_pruned,
        });
    }
    Ok((layers, zeros as f64 / total.max(1) as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values from TF-MOT's PolynomialDecay formula,
    /// `(initial - final) * (1 - (step - begin) / (end - begin))^power + final`,
    /// for initial 0, final 0.5, begin 0, end 900, frequency 100, power 3 (the anchor's).
    #[test]
    fn polynomial_schedule_matches_tfmot() {
        let s = Schedule::Polynomial {
            initial: 0.0,
            target: 0.5,
            begin: 0,
            end: 900,
            frequency: 100,
            power: 3.0,
        };
        assert_eq!(s.at(0), Some(0.0));
        assert_eq!(s.at(50), None, "only every `frequency` steps");
        let at300 = 0.5 - 0.5 * (1.0f64 - 300.0 / 900.0).powi(3);
        assert!((s.at(300).unwrap() as f64 - at300).abs() < 1e-6);
        assert!((s.at(900).unwrap() - 0.5).abs() < 1e-7);
        assert_eq!(s.at(1000), None, "after end_step nothing changes");
        let c = Schedule::Constant {
            sparsity: 0.3,
            begin: 10,
            end: u64::MAX,
            frequency: 5,
        };
        assert_eq!(
            (c.at(9), c.at(10), c.at(12), c.at(15)),
            (None, Some(0.3), None, Some(0.3))
        );
    }

    /// Issue 10: `--limit 2000` (32 steps) with the default frequency 100, `--begin-step
    /// 1000` and `--end-step 300` all pruned to less than asked; fitted, every schedule
    /// reaches the target at its last mask update inside the run.
    #[test]
    fn fitted_steps_reach_the_target_inside_the_run() {
        for (begin, end, frequency, total) in [
            (0, None, 100, 32),
            (0, Some(300), 100, 32),
            (0, None, 100, 24),
            (5, None, 100, 32),
            (0, None, 100, 938),
            (10, Some(15), 100, 938),
            (0, None, 1, 1),
        ] {
            let fitted = fit_steps(begin, end, frequency, total).unwrap();
            assert!(fitted.end < total, "{fitted:?}");
            assert_eq!(
                (fitted.end - fitted.begin) % fitted.frequency,
                0,
                "{fitted:?}"
            );
            let schedule = Schedule::Polynomial {
                initial: 0.0,
                target: 0.5,
                begin: fitted.begin,
                end: fitted.end,
                frequency: fitted.frequency,
                power: 3.0,
            };
            let last_update = (0..total).rev().find_map(|s| schedule.at(s));
            assert_eq!(
                last_update,
                Some(0.5),
                "{begin} {end:?} {frequency} {total}: {fitted:?}"
            );
        }
        let full = fit_steps(0, None, 100, 938).unwrap();
        assert_eq!(
            (full.end, full.frequency),
            (900, 100),
            "the default run is unchanged"
        );
        assert!(full.adjustments.is_empty());
        assert!(!fit_steps(0, Some(300), 100, 32)
            .unwrap()
            .adjustments
            .is_empty());
        let err = fit_steps(1000, None, 100, 32).unwrap_err().to_string();
        assert!(err.contains("--begin-step 1000"), "{err}");
    }

    /// Masks zero exactly the requested share and survive an update that moved weights.
    #[test]
    fn masks_survive_optimizer_steps() {
        let mut params = vec![(0..100).map(|i| i as f32 - 50.0).collect::<Vec<f32>>()];
        let mut masks = Masks::new(&params, vec![0], 1);
        masks.update(&params, 0.5);
        masks.apply(&mut params);
        assert_eq!(params[0].iter().filter(|v| **v == 0.0).count(), 50);
        // An "optimizer step" that moves every weight, then the re-application.
        params[0].iter_mut().for_each(|v| *v += 0.25);
        masks.apply(&mut params);
        assert_eq!(params[0].iter().filter(|v| **v == 0.0).count(), 50);
    }

    /// Block masks drop whole runs: the weakest blocks by mean magnitude, exactly the
    /// requested share of them.
    #[test]
    fn block_masks_drop_whole_runs() {
        // Blocks of 4 with mean magnitudes 0, 1, ..., 9 (signs mixed inside a block).
        let values: Vec<f32> = (0..40)
            .map(|i| (i / 4) as f32 * if i % 2 == 0 { 1.0 } else { -1.0 })
            .collect();
        let mut params = vec![values];
        let mut masks = Masks::new(&params, vec![0], 4);
        masks.update(&params, 0.3);
        masks.apply(&mut params);
        let zeros: Vec<usize> = (0..40).filter(|&i| params[0][i] == 0.0).collect();
        assert_eq!(zeros, (0..12).collect::<Vec<_>>());
    }

    #[test]
    fn default_layers_skip_the_first_and_last() {
        let spec = ModelSpec::reference_cnn();
        assert_eq!(
            default_layers(&spec).unwrap(),
            vec!["layers.2", "layers.4", "layers.6"]
        );
    }
}
