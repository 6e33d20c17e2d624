//! Training with candle's autograd on any candle device: the same model spec,
//! initialization, data order, loss (mean softmax cross-entropy), Adam (Keras' epsilon
//! outside the square root) and learning-rate schedule as the CPU trainer, so a run on
//! `--engine candle` (CPU, how CI tests it) or `--device cuda[:N]` is the same training,
//! up to float summation order.
//!
//! The parameters live on the device as [`Var`]s in our layouts (conv `[out, kh, kw, in]`,
//! dense `[out, in]`); the forward pass is [`Weights::from_tensors`] + [`Weights::forward`],
//! the one candle forward pass inference also runs; Adam's moments stay on the device too.
//! The host copies ([`CandleTrainer::download`]) are made for checkpoints, evaluation and
//! hooks, not every step.

use candle_core::{DType, Device, Tensor, Var};

use crate::model::{LayerSpec, ModelSpec};
use crate::nn::adam::Adam;
use crate::nn::BatchStats;
use crate::runtime::reference::Weights;
use crate::{Error, Result};

/// Parameters, Adam moments and the model on one candle device.
pub struct CandleTrainer {
    spec: ModelSpec,
    device: Device,
    vars: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    precision: Precision,
    scaler: Option<LossScaler>,
    skipped: u64,
}

/// What the forward and backward passes compute in; parameters, optimizer state and the
/// loss stay f32 in every case (mixed precision as Keras' `mixed_float16` /
/// `mixed_bfloat16` policies and `torch.amp` do it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything f32.
    #[default]
    Fp32,
    /// Forward/backward in bfloat16 (f32's exponent range: no loss scaling needed).
    Bf16,
    /// Forward/backward in IEEE half, with dynamic loss scaling ([`LossScaler`]).
    Fp16,
}

impl Precision {
    /// `fp32`, `bf16`, `fp16`.
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
        }
    }

    fn dtype(self) -> DType {
        match self {
            Precision::Fp32 => DType::F32,
            Precision::Bf16 => DType::BF16,
            Precision::Fp16 => DType::F16,
        }
    }
}

/// Dynamic loss scaling for fp16 training, as Keras' `LossScaleOptimizer` and
/// `torch.amp.GradScaler` do it: the loss is multiplied by `scale` before the backward
/// pass so small gradients survive half precision, and the gradients divided by it
/// before the update; a step whose gradients overflowed (inf/NaN) is skipped and the
/// scale halved; after `growth_interval` clean steps in a row the scale doubles.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct LossScaler {
    /// The current scale (starts at 2^16).
    pub scale: f64,
    /// Clean steps since the last change.
    pub clean_steps: u64,
    /// Clean steps before the scale doubles (2000).
    pub growth_interval: u64,
}

impl Default for LossScaler {
    fn default() -> Self {
        LossScaler {
            scale: 65536.0,
            clean_steps: 0,
            growth_interval: 2000,
        }
    }
}

impl LossScaler {
    /// Records a step: `finite` gradients count towards growth, others halve the scale.
    /// Returns whether the step's update is to be applied.
    pub fn record(&mut self, finite: bool) -> bool {
        if finite {
            self.clean_steps += 1;
            if self.clean_steps >= self.growth_interval {
                self.scale *= 2.0;
                self.clean_steps = 0;
            }
        } else {
            // Never below 1: a scale that keeps overflowing at 1 means the model diverged,
            // which the test-set check after the epoch reports.
            self.scale = (self.scale / 2.0).max(1.0);
            self.clean_steps = 0;
        }
        finite
    }
}

impl CandleTrainer {
    /// Uploads `params` (spec order, our layouts) and `adam`'s moments to `device`.
    ///
    /// # Errors
    /// [`Error::Config`] for a spec with dropout (its masks are drawn by our CPU trainer;
    /// the candle trainer does not draw them yet) or a `same`-padded conv the candle
    /// forward pass does not take (even kernel, stride above 1); [`Error::Spec`] for an
    /// invalid spec; [`Error::Candle`] when a tensor does not fit its shape or the device
    /// fails.
    pub fn new(
        spec: &ModelSpec,
        params: &[Vec<f32>],
        adam: &Adam,
        device: &Device,
    ) -> Result<Self> {
        Self::with_precision(spec, params, adam, device, Precision::Fp32)
    }

    /// [`CandleTrainer::new`] computing the forward and backward passes in `precision`.
    ///
    /// # Errors
    /// As [`CandleTrainer::new`], and [`Error::Config`] when the device has no kernels
    /// for `precision` (candle's CPU backend has no bf16 convolution).
    pub fn with_precision(
        spec: &ModelSpec,
        params: &[Vec<f32>],
        adam: &Adam,
        device: &Device,
        precision: Precision,
    ) -> Result<Self> {
        if let Some(index) = spec
            .layers
            .iter()
            .position(|l| matches!(l, LayerSpec::Dropout { .. }))
        {
            return Err(Error::Config(format!(
                "layer {index} is dropout: the candle trainer does not draw dropout masks yet; train this model with `--engine native`"
            )));
        }
        let infos = spec.params()?;
        if params.len() != infos.len() || adam.m.len() != infos.len() || adam.v.len() != infos.len()
        {
            return Err(Error::Config(format!(
                "{} parameter tensors (and {} Adam moments) for a model of {}",
                params.len(),
                adam.m.len(),
                infos.len()
            )));
        }
        let upload = |values: &[f32], shape: &[usize]| Tensor::from_slice(values, shape, device);
        let mut vars = Vec::with_capacity(infos.len());
        let (mut m, mut v) = (Vec::new(), Vec::new());
        for (i, info) in infos.iter().enumerate() {
            vars.push(Var::from_tensor(&upload(&params[i], &info.shape)?)?);
            m.push(upload(&adam.m[i], &info.shape)?);
            v.push(upload(&adam.v[i], &info.shape)?);
        }
        let trainer = CandleTrainer {
            spec: spec.clone(),
            device: device.clone(),
            vars,
            m,
            v,
            precision,
            scaler: (precision == Precision::Fp16).then(LossScaler::default),
            skipped: 0,
        };
        // Fail now, not in the first step, on what the candle forward pass cannot run.
        let [h, w, c] = spec.input;
        let x = Tensor::zeros((1, h, w, c), DType::F32, device)?;
        trainer.forward(&x).map_err(|e| match (precision, e) {
            (Precision::Fp32, e) => e,
            (p, e) => Error::Config(format!(
                "{} training does not run on this device ({e}); use `--precision fp32`{}",
                p.as_str(),
                if device.is_cpu() && p == Precision::Bf16 {
                    " (candle's CPU backend has no bf16 convolution; fp16 runs on the CPU)"
                } else {
                    ""
                }
            )),
        })?;
        Ok(trainer)
    }

    /// Logits `[batch, classes]` in f32 for `x` (f32), computed in the trainer's precision
    /// from the f32 master weights (the casts are tensor ops: gradients flow back to the
    /// f32 [`Var`]s).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = self.precision.dtype();
        let tensors = self
            .vars
            .iter()
            .map(|v| v.as_tensor().to_dtype(dtype))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let logits =
            Weights::from_tensors(&self.spec, &tensors)?.forward_train(&x.to_dtype(dtype)?)?;
        Ok(logits.to_dtype(DType::F32)?)
    }

    /// The loss scaler of an fp16 run (its scale and clean steps).
    pub fn loss_scaler(&self) -> Option<LossScaler> {
        self.scaler
    }

    /// Replaces the fp16 loss scaler (tests force an overflow with a huge scale; a run
    /// could start from another scale). No effect in fp32/bf16, which do not scale.
    pub fn set_loss_scaler(&mut self, scaler: LossScaler) {
        if self.scaler.is_some() {
            self.scaler = Some(scaler);
        }
    }

    /// Updates skipped because their gradients overflowed (fp16).
    pub fn skipped_steps(&self) -> u64 {
        self.skipped
    }

    /// The precision of the forward and backward passes.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// One update on batch `x` (`[batch, h, w, c]` NHWC f32, preprocessed) with `labels`:
    /// forward, mean softmax cross-entropy, backward, then Adam at `learning_rate` with
    /// `adam`'s hyper-parameters (its `step` is advanced; its moments live here until
    /// [`CandleTrainer::download`]). Returns the batch's loss sum and correct count.
    ///
    /// # Errors
    /// [`Error::Config`] when the batch is empty or `x` does not hold `labels.len()`
    /// images; [`Error::Candle`] when the device fails.
    pub fn step(
        &mut self,
        x: &[f32],
        labels: &[u8],
        adam: &mut Adam,
        learning_rate: f32,
    ) -> Result<BatchStats> {
        if labels.is_empty() {
            return Err(Error::Config(
                "an empty batch: a training step needs at least one image".into(),
            ));
        }
        let (gradients, stats) = self.gradients(x, labels)?;
        self.apply(gradients, adam, learning_rate)?;
        Ok(stats)
    }

    /// The f32 gradients (spec order, the parameters' shapes, on the device) of the mean
    /// softmax cross-entropy over batch `x` / `labels`, unscaled (fp16's loss scale is
    /// divided out), and the batch's loss sum and correct count. An empty batch gives zero
    /// gradients (a data-parallel rank whose shard is empty). Nothing is updated.
    ///
    /// # Errors
    /// As [`CandleTrainer::step`].
    pub fn gradients(&mut self, x: &[f32], labels: &[u8]) -> Result<(Vec<Tensor>, BatchStats)> {
        let batch = labels.len();
        let [h, w, c] = self.spec.input;
        if x.len() != batch * h * w * c {
            return Err(Error::Config(format!(
                "{} values and {batch} labels for images of {h}x{w}x{c}",
                x.len()
            )));
        }
        if batch == 0 {
            let zeros = self
                .vars
                .iter()
                .map(|v| v.as_tensor().zeros_like())
                .collect::<candle_core::Result<Vec<_>>>()?;
            return Ok((zeros, BatchStats::default()));
        }
        let xs = Tensor::from_slice(x, (batch, h, w, c), &self.device)?;
        let ys = Tensor::from_iter(labels.iter().map(|&l| u32::from(l)), &self.device)?;
        let logits = self.forward(&xs)?;
        // The loss in f32; with fp16, scaled before the backward pass.
        let loss = candle_nn::loss::cross_entropy(&logits, &ys)?;
        let scale = self.scaler.map_or(1.0, |s| s.scale);
        let grads = if scale == 1.0 {
            loss.backward()?
        } else {
            (&loss * scale)?.backward()?
        };
        let loss_sum = loss.to_scalar::<f32>()? as f64 * batch as f64;
        let correct = logits
            .argmax(1)?
            .eq(&ys)?
            .to_dtype(DType::U32)?
            .sum_all()?
            .to_scalar::<u32>()? as usize;
        let mut gradients = Vec::with_capacity(self.vars.len());
        for var in &self.vars {
            let g = match grads.get(var.as_tensor()) {
                Some(g) => g.to_dtype(DType::F32)?,
                None => var.as_tensor().zeros_like()?,
            };
            gradients.push(if scale == 1.0 { g } else { (g / scale)? });
        }
        Ok((gradients, BatchStats { loss_sum, correct }))
    }

    /// Applies `gradients` (as [`CandleTrainer::gradients`] gives them, or their sum over
    /// data-parallel ranks) with Adam at `learning_rate`. With fp16, a step whose gradients
    /// are not all finite is skipped instead (no update, `adam.step` unchanged) and the
    /// loss scale halved. Returns whether the update was applied.
    ///
    /// # Errors
    /// [`Error::Config`] when `gradients` does not hold one tensor per parameter;
    /// [`Error::Candle`] when a gradient's shape differs from its parameter's or the device
    /// fails.
    pub fn apply(
        &mut self,
        gradients: Vec<Tensor>,
        adam: &mut Adam,
        learning_rate: f32,
    ) -> Result<bool> {
        if gradients.len() != self.vars.len() {
            return Err(Error::Config(format!(
                "{} gradient tensors for {} parameters",
                gradients.len(),
                self.vars.len()
            )));
        }
        if let Some(scaler) = &mut self.scaler {
            // One host read per tensor: is every unscaled gradient finite?
            let mut finite = true;
            for g in &gradients {
                let total = g
                    .abs()?
                    .sum_all()?
                    .to_dtype(DType::F32)?
                    .to_scalar::<f32>()?;
                finite &= total.is_finite();
            }
            if !scaler.record(finite) {
                // Skipped: no update, no optimizer step (as Keras' LossScaleOptimizer).
                self.skipped += 1;
                return Ok(false);
            }
        }

        // Adam as `nn::Adam::update` computes it (Keras): bias correction folded into the
        // step size, epsilon added outside the square root.
        adam.step += 1;
        let t = adam.step as f64;
        let (b1, b2) = (adam.beta1 as f64, adam.beta2 as f64);
        let alpha = learning_rate as f64 * (1.0 - b2.powf(t)).sqrt() / (1.0 - b1.powf(t));
        for (i, (var, g)) in self.vars.iter().zip(gradients).enumerate() {
            let m = ((&self.m[i] * b1)? + (&g * (1.0 - b1))?)?;
            let v = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let update = ((&m / (v.sqrt()? + adam.epsilon as f64)?)? * alpha)?;
            var.set(&(var.as_tensor() - update)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(true)
    }

    /// The parameters' shapes, spec order (what [`CandleTrainer::apply`] takes).
    pub fn param_shapes(&self) -> Vec<candle_core::Shape> {
        self.vars.iter().map(|v| v.shape().clone()).collect()
    }

    /// Replaces the parameters and Adam's moments with host values (spec order): what a
    /// data-parallel rank takes from rank 0 at the start.
    ///
    /// # Errors
    /// [`Error::Candle`] when a tensor does not fit its shape or the device fails.
    pub fn upload_state(&mut self, params: &[Vec<f32>], adam: &Adam) -> Result<()> {
        self.upload(params)?;
        for (i, var) in self.vars.iter().enumerate() {
            let shape = var.as_tensor().shape();
            self.m[i] = Tensor::from_slice(&adam.m[i], shape, &self.device)?;
            self.v[i] = Tensor::from_slice(&adam.v[i], shape, &self.device)?;
        }
        Ok(())
    }

    /// The model being trained.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The candle device the parameters live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Copies the parameters and Adam's moments to the host (spec order, our layouts).
    ///
    /// # Errors
    /// [`Error::Candle`] when the device fails.
    pub fn download(&self, params: &mut Vec<Vec<f32>>, adam: &mut Adam) -> Result<()> {
        let host = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
        *params = self
            .vars
            .iter()
            .map(|v| host(v.as_tensor()))
            .collect::<Result<_>>()?;
        adam.m = self.m.iter().map(host).collect::<Result<_>>()?;
        adam.v = self.v.iter().map(host).collect::<Result<_>>()?;
        Ok(())
    }

    /// Replaces the parameters with host values (after a hook changed them, e.g. pruning
    /// masks).
    ///
    /// # Errors
    /// [`Error::Candle`] when a tensor does not fit its shape or the device fails.
    pub fn upload(&mut self, params: &[Vec<f32>]) -> Result<()> {
        for (var, values) in self.vars.iter().zip(params) {
            let t = Tensor::from_slice(values, var.as_tensor().shape(), &self.device)?;
            var.set(&t)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::{Executor, Plan};
    use rand::{Rng, SeedableRng};

    fn small_spec() -> ModelSpec {
        ModelSpec::from_yaml(
            "input: [10, 10, 2]\nclasses: 4\nlayers:\n\
             - {type: conv2d, filters: 6, kernel: 3, padding: same, activation: relu}\n\
             - {type: max_pool2d, size: 2}\n\
             - {type: conv2d, filters: 5, kernel: 3, activation: relu}\n\
             - {type: avg_pool2d, size: 3}\n\
             - {type: flatten}\n\
             - {type: dense, units: 7, activation: relu}\n\
             - {type: relu}\n\
             - {type: dense, units: 4, activation: softmax}\n",
        )
        .unwrap()
    }

    /// Five updates on candle's CPU device and on our executor from the same weights and
    /// batches: the same parameters and moments up to float summation order, and the same
    /// batch losses. This is what makes `--engine candle` (and CUDA) the same training.
    #[test]
    fn candle_updates_match_the_native_trainer() {
        const STEPS: usize = 5;
        let spec = small_spec();
        let plan = Plan::compile(&spec).unwrap();
        let params = plan.init_params(3);
        let batch = 8;
        // Random pixels: ties inside a max-pool window (which the two engines may route
        // to different elements) have probability ~0.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let x: Vec<f32> = (0..batch * 200)
            .map(|_| rng.random_range(0.0..1.0))
            .collect();
        let labels: Vec<u8> = (0..batch).map(|i| (i % 4) as u8).collect();

        let mut native_params = params.clone();
        let mut native_adam = Adam::new(&params);
        let mut executor = Executor::new(&plan, 1);
        let mut candle_adam = Adam::new(&params);
        let mut candle = CandleTrainer::new(&spec, &params, &candle_adam, &Device::Cpu).unwrap();
        for step in 0..STEPS {
            let a = executor.train_step(&native_params, &x, &labels, 0);
            native_adam.update(&mut native_params, &executor.grads, 0.01);
            let b = candle.step(&x, &labels, &mut candle_adam, 0.01).unwrap();
            assert!(
                (a.loss_sum - b.loss_sum).abs() < 1e-4 * a.loss_sum.abs().max(1.0),
                "step {step}: loss {} vs {}",
                a.loss_sum,
                b.loss_sum
            );
            assert_eq!(a.correct, b.correct, "step {step}");
        }
        let mut host = Vec::new();
        candle.download(&mut host, &mut candle_adam).unwrap();
        assert_eq!(candle_adam.step, native_adam.step);
        for (i, (p, q)) in native_params.iter().zip(&host).enumerate() {
            let diff = p
                .iter()
                .zip(q)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            if diff >= 1e-4 {
                let at = p
                    .iter()
                    .zip(q)
                    .position(|(a, b)| (a - b).abs() == diff)
                    .unwrap();
                eprintln!("param {i} at {at}: native {} candle {} start {} native m {} v {} candle m {} v {}", p[at], q[at], params[i][at], native_adam.m[i][at], native_adam.v[i][at], candle_adam.m[i][at], candle_adam.v[i][at]);
            }
            assert!(diff < 1e-4, "parameter {i}: max |native - candle| = {diff}");
        }
    }

    #[test]
    fn loss_scaler_halves_on_overflow_and_grows_after_clean_steps() {
        let mut s = LossScaler {
            growth_interval: 3,
            ..LossScaler::default()
        };
        assert!(!s.record(false));
        assert_eq!(s.scale, 32768.0);
        assert!(s.record(true) && s.record(true));
        assert_eq!(s.scale, 32768.0);
        assert!(s.record(true));
        assert_eq!((s.scale, s.clean_steps), (65536.0, 0));
    }

    /// fp16 on candle's CPU device: a scale so large that the half-precision gradients
    /// overflow makes the step a no-op (weights, moments and the optimizer step unchanged),
    /// counts it as skipped and halves the scale; at a sane scale the next step updates,
    /// and its loss is close to the fp32 one.
    #[test]
    fn fp16_overflow_skips_the_step_and_halves_the_scale() {
        let spec = small_spec();
        let plan = Plan::compile(&spec).unwrap();
        let params = plan.init_params(3);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let batch = 8;
        let x: Vec<f32> = (0..batch * 200)
            .map(|_| rng.random_range(0.0..1.0))
            .collect();
        let labels: Vec<u8> = (0..batch).map(|i| (i % 4) as u8).collect();
        let mut adam = Adam::new(&params);
        let mut half =
            CandleTrainer::with_precision(&spec, &params, &adam, &Device::Cpu, Precision::Fp16)
                .unwrap();
        half.set_loss_scaler(LossScaler {
            scale: 2f64.powi(40),
            ..LossScaler::default()
        });
        half.step(&x, &labels, &mut adam, 0.01).unwrap();
        assert_eq!(half.skipped_steps(), 1);
        assert_eq!(half.loss_scaler().unwrap().scale, 2f64.powi(39));
        assert_eq!(adam.step, 0, "a skipped step is not an optimizer step");
        let mut host = Vec::new();
        half.download(&mut host, &mut adam).unwrap();
        assert_eq!(host, params, "a skipped step changed the weights");

        half.set_loss_scaler(LossScaler::default());
        let stats = half.step(&x, &labels, &mut adam, 0.01).unwrap();
        assert_eq!((half.skipped_steps(), adam.step), (1, 1));
        half.download(&mut host, &mut adam).unwrap();
        assert_ne!(host, params);
        let mut adam32 = Adam::new(&params);
        let mut full = CandleTrainer::new(&spec, &params, &adam32, &Device::Cpu).unwrap();
        let stats32 = full.step(&x, &labels, &mut adam32, 0.01).unwrap();
        let rel = (stats.loss_sum - stats32.loss_sum).abs() / stats32.loss_sum;
        assert!(
            rel < 1e-2,
            "fp16 loss {} vs fp32 {}",
            stats.loss_sum,
            stats32.loss_sum
        );
    }

    #[test]
    fn dropout_is_refused_with_what_to_do() {
        let spec = ModelSpec::from_yaml(
            "input: [4, 4, 1]\nclasses: 2\nlayers:\n- {type: flatten}\n- {type: dropout, rate: 0.5}\n- {type: dense, units: 2}\n",
        )
        .unwrap();
        let params = Plan::compile(&spec).unwrap().init_params(1);
        let err = CandleTrainer::new(&spec, &params, &Adam::new(&params), &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("--engine native"), "{err}");
    }
}
