//! A second, independent forward pass written with candle's tensor ops.
//!
//! It exists to check the hand-written kernels in `nn` against a well-kept library
//! (see the tests below), and is what the CUDA path runs (`runtime::cuda`). It supports
//! every layer type, with `same` padding for odd kernels (candle pads symmetrically).

use candle_core::{DType, Device, Tensor};

use crate::model::{Activation, LayerSpec, ModelSpec, Padding};
use crate::{Error, Result};

/// Logits `[batch, classes]` (flat) for input `x` (`[batch, h, w, c]` NHWC f32,
/// preprocessed), computed by candle on `device`; `params` as [`Weights::upload`] takes.
///
/// # Errors
/// - [`Error::Spec`] / [`Error::SpecLayer`] when `spec` is invalid.
/// - [`Error::Config`] for a `same`-padded conv with an even kernel or a stride above 1.
/// - [`Error::Candle`] when `x` does not hold `batch * h * w * c` values, a parameter does
///   not fill its shape, or the device fails.
/// - [`Error::Config`] when `params` holds fewer tensors than the spec has parameters.
pub fn forward(
    spec: &ModelSpec,
    params: &[Vec<f32>],
    x: &[f32],
    batch: usize,
    device: &Device,
) -> Result<Vec<f32>> {
    let weights = Weights::upload(spec, params, device)?;
    let [h, w, c] = spec.input;
    let xs = Tensor::from_slice(x, (batch, h, w, c), device)?;
    Ok(weights.forward(&xs)?.flatten_all()?.to_vec1::<f32>()?)
}

/// A model's parameters as candle tensors on one device, laid out for candle's ops
/// (conv kernels `[out, in, kh, kw]`), so a device keeps them between calls.
pub struct Weights {
    spec: ModelSpec,
    /// Per conv/dense layer in order: weight and bias.
    layers: Vec<(Tensor, Tensor)>,
}

impl Weights {
    /// Uploads `params` to `device`: spec order, our layouts (conv weights
    /// `[out, kh, kw, in]`, permuted here to candle's `[out, in, kh, kw]`; dense weights
    /// `[out, in]`, stored transposed; biases `[out]`).
    ///
    /// # Errors
    /// - [`Error::Spec`] / [`Error::SpecLayer`] when `spec` is invalid.
    /// - [`Error::Candle`] when a parameter does not fill its shape, or the device fails.
    /// - [`Error::Config`] when `params` holds fewer tensors than the spec has parameters.
    pub fn upload(spec: &ModelSpec, params: &[Vec<f32>], device: &Device) -> Result<Self> {
        let infos = spec.params()?;
        let tensors = infos
            .iter()
            .zip(params)
            .map(|(info, values)| Tensor::from_slice(values, info.shape.as_slice(), device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Self::from_tensors(spec, &tensors)
    }

    /// The same from tensors already on a device, in our layouts and spec order (conv
    /// weights `[out, kh, kw, in]`, dense `[out, in]`, biases `[out]`). The layout changes
    /// are tensor ops, so gradients flow back to the tensors (candle training keeps its
    /// parameters as [`candle_core::Var`]s and calls this every step).
    ///
    /// # Errors
    /// - [`Error::Spec`] / [`Error::SpecLayer`] when `spec` is invalid.
    /// - [`Error::Config`] when `params` has fewer tensors than the spec has parameters.
    /// - [`Error::Candle`] when a tensor has another shape, or the device fails.
    pub fn from_tensors(spec: &ModelSpec, params: &[Tensor]) -> Result<Self> {
        let shapes = spec.shapes()?;
        let mut layers = Vec::new();
        let mut next = params.iter();
        let mut pair = || -> Result<(&Tensor, &Tensor)> {
            match (next.next(), next.next()) {
                (Some(w), Some(b)) => Ok((w, b)),
                _ => Err(Error::Config(
                    "fewer parameter tensors than the spec has conv/dense layers".into(),
                )),
            }
        };
        for (index, layer) in spec.layers.iter().enumerate() {
            match layer {
                LayerSpec::Conv2d { filters, .. } => {
                    let (weight, bias) = pair()?;
                    let weight = weight.permute((0, 3, 1, 2))?.contiguous()?;
                    let bias = bias.reshape((1, *filters, 1, 1))?;
                    layers.push((weight, bias));
                }
                LayerSpec::Dense { units, .. } => {
                    let (weight, bias) = pair()?;
                    let inputs = shapes[index].len();
                    let weight = weight.reshape((*units, inputs))?.t()?.contiguous()?;
                    layers.push((weight, bias.reshape(*units)?));
                }
                _ => {}
            }
        }
        Ok(Weights {
            spec: spec.clone(),
            layers,
        })
    }

    /// Logits `[batch, classes]` (F32) of an NHWC input tensor (`[batch, h, w, c]`) on the
    /// weights' device.
    ///
    /// # Errors
    /// - [`Error::Config`] for a `same`-padded conv with an even kernel or a stride above 1
    ///   (candle pads symmetrically).
    /// - [`Error::Candle`] when `x` is not `[batch, h, w, c]` of the spec's input, or on a
    ///   device error.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, false)
    }

    /// [`Weights::forward`] for training: the same numbers, with pooling written as
    /// crop + reshape + max/mean so that candle's autograd differentiates it correctly.
    /// candle 0.11.1's own `max_pool2d` backward multiplies the gradient by the share of
    /// maxima in the window instead of dividing by their count (a unique maximum gets 1/4
    /// of its gradient in a 2x2 window), and its pooling backwards upsample to the full
    /// input when the window does not tile it (`backprop.rs`, `Op::MaxPool2D` /
    /// `Op::AvgPool2D`); a test against our CPU trainer caught it.
    ///
    /// # Errors
    /// As [`Weights::forward`], and [`Error::Config`] for a pooling window whose stride is
    /// not its size (candle's autograd does not differentiate those).
    pub fn forward_train(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, true)
    }

    fn run(&self, x: &Tensor, training: bool) -> Result<Tensor> {
        // Candle convolves NCHW tensors.
        let mut xs = x.permute((0, 3, 1, 2))?;
        let mut next = self.layers.iter();
        for layer in &self.spec.layers {
            xs = match layer {
                LayerSpec::Conv2d {
                    kernel,
                    stride,
                    padding,
                    activation,
                    ..
                } => {
                    let pad = match padding {
                        Padding::Valid => 0,
                        Padding::Same if kernel % 2 == 1 && *stride == 1 => kernel / 2,
                        Padding::Same => return Err(Error::Config(
                            "the candle path handles `same` padding only for odd kernels, stride 1"
                                .into(),
                        )),
                    };
                    let Some((weight, bias)) = next.next() else {
                        unreachable!("`upload` made one weight pair per conv/dense layer")
                    };
                    let ys = xs.conv2d(weight, pad, *stride, 1, 1)?.broadcast_add(bias)?;
                    activate(ys, *activation)?
                }
                LayerSpec::MaxPool2d { size, stride } if training => {
                    pool_by_reshape(&xs, *size, stride.unwrap_or(*size), true)?
                }
                LayerSpec::AvgPool2d { size, stride } if training => {
                    pool_by_reshape(&xs, *size, stride.unwrap_or(*size), false)?
                }
                LayerSpec::MaxPool2d { size, stride } => {
                    xs.max_pool2d_with_stride(*size, stride.unwrap_or(*size))?
                }
                LayerSpec::AvgPool2d { size, stride } => {
                    xs.avg_pool2d_with_stride(*size, stride.unwrap_or(*size))?
                }
                LayerSpec::Flatten => {
                    // Back to NHWC so the flattened order is (h, w, c), as in our artifacts.
                    xs.permute((0, 2, 3, 1))?.contiguous()?.flatten_from(1)?
                }
                LayerSpec::Dense { activation, .. } => {
                    let Some((weight, bias)) = next.next() else {
                        unreachable!("`upload` made one weight pair per conv/dense layer")
                    };
                    let ys = xs.matmul(weight)?.broadcast_add(bias)?;
                    activate(ys, *activation)?
                }
                LayerSpec::Dropout { .. } => xs,
                LayerSpec::Relu => xs.relu()?,
            };
        }
        Ok(xs.to_dtype(DType::F32)?)
    }
}

/// Max or mean pooling of NCHW `xs` over `size` x `size` windows moved by `stride` ==
/// `size`, as differentiable tensor ops: the input is cropped to whole windows (as
/// pooling without padding floors), reshaped to `[n, c, oh, size, ow, size]`, reduced.
fn pool_by_reshape(xs: &Tensor, size: usize, stride: usize, max: bool) -> Result<Tensor> {
    if stride != size {
        return Err(Error::Config(format!(
            "training on candle supports pooling windows with stride = size; this one is {size}x{size} with stride {stride}: use `--engine native`"
        )));
    }
    let (n, c, h, w) = xs.dims4()?;
    let (oh, ow) = (h / size, w / size);
    let windows = xs
        .narrow(2, 0, oh * size)?
        .narrow(3, 0, ow * size)?
        .contiguous()?
        .reshape((n, c, oh, size, ow, size))?;
    Ok(if max {
        windows.max(5)?.max(3)?
    } else {
        windows.mean(5)?.mean(3)?
    })
}

fn activate(xs: Tensor, activation: Activation) -> Result<Tensor> {
    Ok(match activation {
        Activation::Relu => xs.relu()?,
        // Logits: softmax is applied by whoever wants probabilities.
        Activation::None | Activation::Softmax => xs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::{Executor, Plan};

    fn agree(spec: &ModelSpec, batch: usize) {
        let plan = Plan::compile(spec).unwrap();
        let params = plan.init_params(5);
        let x: Vec<f32> = (0..batch * plan.input_len)
            .map(|i| ((i * 7919) % 255) as f32 / 255.0)
            .collect();
        let mut ours = Vec::new();
        Executor::new(&plan, 2).predict(&params, &x, batch, &mut ours);
        let theirs = forward(spec, &params, &x, batch, &Device::Cpu).unwrap();
        assert_eq!(ours.len(), theirs.len());
        for (a, b) in ours.iter().zip(&theirs) {
            assert!(
                (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "ours {a} candle {b}"
            );
        }
    }

    #[test]
    fn reference_cnn_matches_candle() {
        agree(&ModelSpec::reference_cnn(), 5);
    }

    #[test]
    fn same_padding_strides_and_avg_pool_match_candle() {
        let spec = ModelSpec::from_yaml(
            "input: [9, 9, 3]\nclasses: 4\nlayers:\n\
             - {type: conv2d, filters: 5, kernel: 3, padding: same, activation: relu}\n\
             - {type: avg_pool2d, size: 2, stride: 1}\n\
             - {type: conv2d, filters: 6, kernel: 3, stride: 2}\n\
             - {type: relu}\n\
             - {type: flatten}\n\
             - {type: dropout, rate: 0.5}\n\
             - {type: dense, units: 4}\n",
        )
        .unwrap();
        agree(&spec, 3);
    }
}
