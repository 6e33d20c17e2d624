//! Compiles a [`ModelSpec`] into a flat list of ops with every shape resolved.
//!
//! `flatten` disappears here (NHWC is already flat in `(h, w, c)` order) and a layer's
//! ReLU is fused into its conv or dense op, so the executor never looks at the spec.

use crate::model::{Activation, LayerSpec, ModelSpec, ParamInfo, Shape};
use crate::Result;

/// A conv layer with its geometry resolved.
#[derive(Debug, Clone)]
pub struct ConvOp {
    /// `[h, w, c]` of the input.
    pub input: [usize; 3],
    /// `[oh, ow, filters]` of the output.
    pub output: [usize; 3],
    /// Square kernel size.
    pub kernel: usize,
    /// Window step.
    pub stride: usize,
    /// Zero rows above / columns left of the input (same padding).
    pub pad: (usize, usize),
    /// Fused ReLU.
    pub relu: bool,
    /// Index of the weight in the parameter list; the bias follows it.
    pub weight: usize,
    /// The network's first op: its input gradient is never needed.
    pub first: bool,
}

impl ConvOp {
    /// Values in one im2col row: `kernel * kernel * in_channels`.
    pub fn patch_len(&self) -> usize {
        self.kernel * self.kernel * self.input[2]
    }
}

/// A pooling layer with its geometry resolved.
#[derive(Debug, Clone)]
pub struct PoolOp {
    /// `[h, w, c]` of the input.
    pub input: [usize; 3],
    /// `[oh, ow, c]` of the output.
    pub output: [usize; 3],
    /// Window size.
    pub size: usize,
    /// Window step.
    pub stride: usize,
}

/// A dense layer.
#[derive(Debug, Clone)]
pub struct DenseOp {
    /// Input features.
    pub inputs: usize,
    /// Output features.
    pub units: usize,
    /// Fused ReLU.
    pub relu: bool,
    /// Index of the weight in the parameter list; the bias follows it.
    pub weight: usize,
}

/// One executable step of a network.
#[derive(Debug, Clone)]
pub enum Op {
    /// Convolution (+ bias, + optional ReLU).
    Conv(ConvOp),
    /// Max pooling.
    MaxPool(PoolOp),
    /// Average pooling.
    AvgPool(PoolOp),
    /// Fully connected (+ bias, + optional ReLU).
    Dense(DenseOp),
    /// Inverted dropout while training; identity at inference.
    Dropout {
        /// Fraction dropped.
        rate: f32,
        /// Values per image.
        len: usize,
    },
    /// Stand-alone ReLU.
    Relu {
        /// Values per image.
        len: usize,
    },
}

/// A network ready to run: ops plus the parameter layout they index into.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The spec it was compiled from.
    pub spec: ModelSpec,
    /// Ops in execution order.
    pub ops: Vec<Op>,
    /// Parameter tensors (names and shapes) in artifact order.
    pub params: Vec<ParamInfo>,
    /// Values in one input image.
    pub input_len: usize,
    /// Values per image after each op (`out_lens[i]` is op `i`'s output).
    pub out_lens: Vec<usize>,
    /// Output classes.
    pub classes: usize,
}

impl Plan {
    /// Compiles a spec (validating it first).
    ///
    /// # Errors
    /// [`crate::Error::Spec`] / [`crate::Error::SpecLayer`] when the spec is invalid
    /// ([`ModelSpec::params`]).
    pub fn compile(spec: &ModelSpec) -> Result<Self> {
        let shapes = spec.shapes()?;
        let params = spec.params()?;
        let mut ops = Vec::new();
        let mut out_lens = Vec::new();
        let mut next_param = 0;
        for (index, layer) in spec.layers.iter().enumerate() {
            let (input, output) = (shapes[index], shapes[index + 1]);
            let spatial = |s: Shape| match s {
                Shape::Spatial(s) => s,
                Shape::Flat(n) => [1, 1, n],
            };
            let op = match layer {
                LayerSpec::Conv2d {
                    kernel,
                    stride,
                    padding,
                    activation,
                    ..
                } => {
                    let (i, o) = (spatial(input), spatial(output));
                    let pad = (
                        padding.amounts(i[0], *kernel, *stride).0,
                        padding.amounts(i[1], *kernel, *stride).0,
                    );
                    let op = Op::Conv(ConvOp {
                        input: i,
                        output: o,
                        kernel: *kernel,
                        stride: *stride,
                        pad,
                        relu: *activation == Activation::Relu,
                        weight: next_param,
                        first: ops.is_empty(),
                    });
                    next_param += 2;
                    op
                }
                LayerSpec::MaxPool2d { size, stride } | LayerSpec::AvgPool2d { size, stride } => {
                    let pool = PoolOp {
                        input: spatial(input),
                        output: spatial(output),
                        size: *size,
                        stride: stride.unwrap_or(*size),
                    };
                    if matches!(layer, LayerSpec::MaxPool2d { .. }) {
                        Op::MaxPool(pool)
                    } else {
                        Op::AvgPool(pool)
                    }
                }
                LayerSpec::Flatten => continue,
                LayerSpec::Dense { units, activation } => {
                    let op = Op::Dense(DenseOp {
                        inputs: input.len(),
                        units: *units,
                        relu: *activation == Activation::Relu,
                        weight: next_param,
                    });
                    next_param += 2;
                    op
                }
                LayerSpec::Dropout { rate } => Op::Dropout {
                    rate: *rate,
                    len: input.len(),
                },
                LayerSpec::Relu => Op::Relu { len: input.len() },
            };
            ops.push(op);
            out_lens.push(output.len());
        }
        Ok(Plan {
            spec: spec.clone(),
            ops,
            params,
            input_len: spec.input.iter().product(),
            out_lens,
            classes: spec.classes,
        })
    }

    /// Glorot-uniform weights and zero biases (Keras' defaults), from a seed.
    pub fn init_params(&self, seed: u64) -> Vec<Vec<f32>> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        self.params
            .iter()
            .map(|p| {
                if p.shape.len() == 1 {
                    return vec![0.0; p.len()];
                }
                // fan_in / fan_out as Keras computes them: receptive field times channels.
                let out = p.shape[0];
                let receptive: usize = p.shape[1..p.shape.len() - 1].iter().product();
                let inp = p.shape[p.shape.len() - 1];
                let (fan_in, fan_out) = (receptive * inp, receptive * out);
                let limit = (6.0 / (fan_in + fan_out) as f32).sqrt();
                (0..p.len())
                    .map(|_| rng.random_range(-limit..limit))
                    .collect()
            })
            .collect()
    }
}
