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
        };
        // Fail now, not in the first step, on what the candle forward pass cannot run.
        let tensors: Vec<Tensor> = trainer.vars.iter().map(|v| v.as_tensor().clone()).collect();
        let weights = Weights::from_tensors(spec, &tensors)?;
        let [h, w, c] = spec.input;
        weights.forward_train(&Tensor::zeros((1, h, w, c), DType::F32, device)?)?;
        Ok(trainer)
    }

    /// One update on batch `x` (`[batch, h, w, c]` NHWC f32, preprocessed) with `labels`:
    /// forward, mean softmax cross-entropy, backward, then Adam at `learning_rate` with
    /// `adam`'s hyper-parameters (its `step` is advanced; its moments live here until
    /// [`CandleTrainer::download`]). Returns the batch's loss sum and correct count.
    ///
    /// # Errors
    /// [`Error::Config`] when `labels` does not hold `batch` labels; [`Error::Candle`]
    /// when `x` does not hold `batch` images or the device fails.
    pub fn step(
        &mut self,
        x: &[f32],
        labels: &[u8],
        adam: &mut Adam,
        learning_rate: f32,
    ) -> Result<BatchStats> {
        let batch = labels.len();
        let [h, w, c] = self.spec.input;
        if batch == 0 || x.len() != batch * h * w * c {
            return Err(Error::Config(format!(
                "{} values and {batch} labels for images of {h}x{w}x{c}",
                x.len()
            )));
        }
        let xs = Tensor::from_slice(x, (batch, h, w, c), &self.device)?;
        let ys = Tensor::from_iter(labels.iter().map(|&l| u32::from(l)), &self.device)?;
        let tensors: Vec<Tensor> = self.vars.iter().map(|v| v.as_tensor().clone()).collect();
        let logits = Weights::from_tensors(&self.spec, &tensors)?.forward_train(&xs)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &ys)?;
        let grads = loss.backward()?;

        // Adam as `nn::Adam::update` computes it (Keras): bias correction folded into the
        // step size, epsilon added outside the square root.
        adam.step += 1;
        let t = adam.step as f64;
        let (b1, b2) = (adam.beta1 as f64, adam.beta2 as f64);
        let alpha = learning_rate as f64 * (1.0 - b2.powf(t)).sqrt() / (1.0 - b1.powf(t));
        for (i, var) in self.vars.iter().enumerate() {
            let g = match grads.get(var.as_tensor()) {
                Some(g) => g.clone(),
                None => var.as_tensor().zeros_like()?,
            };
            let m = ((&self.m[i] * b1)? + (&g * (1.0 - b1))?)?;
            let v = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let update = ((&m / (v.sqrt()? + adam.epsilon as f64)?)? * alpha)?;
            var.set(&(var.as_tensor() - update)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }

        let loss_sum = loss.to_scalar::<f32>()? as f64 * batch as f64;
        let predicted = logits.argmax(1)?;
        let correct = predicted
            .eq(&ys)?
            .to_dtype(DType::U32)?
            .sum_all()?
            .to_scalar::<u32>()? as usize;
        Ok(BatchStats { loss_sum, correct })
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
