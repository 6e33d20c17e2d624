//! The model spec: a Sequential list of layers read from YAML, with shapes inferred and
//! checked before anything is built, so a bad spec fails with the layer index and kind.
//!
//! Tensors are laid out as TFLite does: activations NHWC, conv weights `[out, kh, kw, in]`,
//! dense weights `[out, in]`, so `flatten` keeps `(h, w, c)` order and costs nothing.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Most values one image's activations may hold after any layer (the input included):
/// 2^26 (256 MiB of f32 per image). Sizes come from files and flags, so every size is
/// checked against this before anything is allocated.
pub const MAX_ACTIVATION_VALUES: usize = 1 << 26;

/// Most trainable values a model may have: 2^28 (1 GiB of fp32 weights), per tensor and
/// in total.
pub const MAX_PARAMETERS: usize = 1 << 28;

/// Most bytes the activations of one batch may take (8 GiB): a batch size that needs more
/// is refused before anything is allocated.
pub const MAX_BATCH_BYTES: usize = 8 << 30;

/// Most images in one step or forward pass that any command accepts (`--batch`).
pub const MAX_BATCH: usize = 1 << 16;

/// Non-linearity applied after a conv or dense layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// Identity.
    #[default]
    None,
    /// `max(x, 0)`.
    Relu,
    /// Only on the last layer: training works on logits, inference reports probabilities.
    Softmax,
}

/// How a conv layer pads its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Padding {
    /// No padding: the output shrinks by `kernel - 1`.
    #[default]
    Valid,
    /// Zero padding so that the output is `ceil(input / stride)`.
    Same,
}

impl Padding {
    /// Zeros added `(before, after)` along one axis of `input` values for a `kernel`
    /// window moved by `stride`: none for `Valid`; for `Same` the TensorFlow rule (the
    /// output is `ceil(input / stride)`, the total padding
    /// `max((output - 1) * stride + kernel - input, 0)`, the odd one after), which is
    /// also ONNX's `SAME_UPPER`.
    pub fn amounts(self, input: usize, kernel: usize, stride: usize) -> (usize, usize) {
        match self {
            Padding::Valid => (0, 0),
            Padding::Same => {
                let output = input.div_ceil(stride.max(1));
                let total = ((output.max(1) - 1) * stride + kernel).saturating_sub(input);
                (total / 2, total - total / 2)
            }
        }
    }
}

fn one() -> usize {
    1
}

/// One layer of a Sequential model, tagged by `type` in YAML.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum LayerSpec {
    /// 2-D convolution over NHWC input with a square kernel.
    Conv2d {
        /// Output channels.
        filters: usize,
        /// Kernel height and width.
        kernel: usize,
        /// Step between windows.
        #[serde(default = "one")]
        stride: usize,
        /// `valid` or `same`.
        #[serde(default)]
        padding: Padding,
        /// Applied to the output.
        #[serde(default)]
        activation: Activation,
    },
    /// Max over square windows (no padding).
    MaxPool2d {
        /// Window height and width.
        size: usize,
        /// Defaults to `size`.
        #[serde(default)]
        stride: Option<usize>,
    },
    /// Mean over square windows (no padding).
    AvgPool2d {
        /// Window height and width.
        size: usize,
        /// Defaults to `size`.
        #[serde(default)]
        stride: Option<usize>,
    },
    /// `[h, w, c]` to `[h * w * c]`, in that order.
    Flatten,
    /// Fully connected layer on a flat input.
    Dense {
        /// Output features.
        units: usize,
        /// Applied to the output.
        #[serde(default)]
        activation: Activation,
    },
    /// Zeroes a fraction of values while training; identity at inference.
    Dropout {
        /// Fraction dropped, in `[0, 1)`.
        rate: f32,
    },
    /// `max(x, 0)` as its own layer.
    Relu,
}

impl LayerSpec {
    /// The `type` name used in YAML and in errors.
    pub fn kind(&self) -> &'static str {
        match self {
            LayerSpec::Conv2d { .. } => "conv2d",
            LayerSpec::MaxPool2d { .. } => "max_pool2d",
            LayerSpec::AvgPool2d { .. } => "avg_pool2d",
            LayerSpec::Flatten => "flatten",
            LayerSpec::Dense { .. } => "dense",
            LayerSpec::Dropout { .. } => "dropout",
            LayerSpec::Relu => "relu",
        }
    }
}

/// The shape of the activations between two layers (batch dimension left out).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Shape {
    /// `[height, width, channels]`.
    Spatial([usize; 3]),
    /// A vector of features.
    Flat(usize),
}

impl Shape {
    /// Number of values, or `None` when it does not fit in `usize`.
    pub fn checked_len(&self) -> Option<usize> {
        match self {
            Shape::Spatial(s) => s.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)),
            Shape::Flat(n) => Some(*n),
        }
    }

    /// Number of values (of a shape [`ModelSpec::shapes`] accepted, which never overflows).
    pub fn len(&self) -> usize {
        match self {
            Shape::Spatial(s) => s.iter().product(),
            Shape::Flat(n) => *n,
        }
    }

    /// True when it holds no value.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Shape::Spatial([h, w, c]) => write!(f, "{h}x{w}x{c}"),
            Shape::Flat(n) => write!(f, "{n}"),
        }
    }
}

/// A parameter tensor of a layer: its name in artifacts and its shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ParamInfo {
    /// `layers.{index}.weight` or `layers.{index}.bias`.
    pub name: String,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
}

impl ParamInfo {
    /// Number of values.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// True for a zero-sized tensor (never produced by a valid spec).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A Sequential classifier: input shape, class count and layers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// A label for people; not used by the math.
    #[serde(default)]
    pub name: String,
    /// Input image `[height, width, channels]`.
    pub input: [usize; 3],
    /// Number of classes; the last layer must produce this many values.
    pub classes: usize,
    /// The layers, first to last.
    pub layers: Vec<LayerSpec>,
}

/// The raw form, so each layer can be decoded alone and its errors name its index.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    #[serde(default)]
    name: String,
    input: [usize; 3],
    classes: usize,
    layers: Vec<serde_yaml::Value>,
}

impl ModelSpec {
    /// The reference CNN: Conv32-Pool-Conv64-Pool-Conv64-Dense64-Dense10, 93,322 parameters.
    pub fn reference_cnn() -> Self {
        let conv = |filters| LayerSpec::Conv2d {
            filters,
            kernel: 3,
            stride: 1,
            padding: Padding::Valid,
            activation: Activation::Relu,
        };
        let pool = LayerSpec::MaxPool2d {
            size: 2,
            stride: None,
        };
        ModelSpec {
            name: "reference-cnn".into(),
            input: [28, 28, 1],
            classes: 10,
            layers: vec![
                conv(32),
                pool.clone(),
                conv(64),
                pool,
                conv(64),
                LayerSpec::Flatten,
                LayerSpec::Dense {
                    units: 64,
                    activation: Activation::Relu,
                },
                LayerSpec::Dense {
                    units: 10,
                    activation: Activation::Softmax,
                },
            ],
        }
    }

    /// Parses and validates a YAML spec.
    ///
    /// # Errors
    /// - [`Error::Spec`] for YAML that does not parse or lacks / has unknown top-level
    ///   fields, and for whole-spec problems ([`ModelSpec::shapes`]).
    /// - [`Error::SpecLayer`] naming the layer's index and `type` when a layer does not
    ///   decode (unknown type or field) or does not fit its input ([`ModelSpec::params`]).
    pub fn from_yaml(text: &str) -> Result<Self> {
        let raw: RawSpec = serde_yaml::from_str(text).map_err(|e| Error::Spec(e.to_string()))?;
        let mut layers = Vec::with_capacity(raw.layers.len());
        for (index, value) in raw.layers.into_iter().enumerate() {
            let kind = value
                .get("type")
                .and_then(|t| t.as_str())
                .unwrap_or("?")
                .to_string();
            let layer: LayerSpec = serde_yaml::from_value(value).map_err(|e| Error::SpecLayer {
                index,
                kind,
                problem: e.to_string(),
            })?;
            layers.push(layer);
        }
        let spec = ModelSpec {
            name: raw.name,
            input: raw.input,
            classes: raw.classes,
            layers,
        };
        spec.params()?;
        Ok(spec)
    }

    /// Reads and validates a YAML spec file.
    ///
    /// # Errors
    /// - [`Error::Io`] when the file cannot be read.
    /// - [`Error::Spec`] when it is not UTF-8 text (a binary file), and as
    ///   [`ModelSpec::from_yaml`], the message naming the file ([`Error::SpecLayer`] too).
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io("read", path, e))?;
        let Ok(text) = String::from_utf8(bytes) else {
            return Err(Error::Spec(format!(
                "`{}` is not a YAML model spec: it is a binary file (an artifact or another model format?)",
                path.display()
            )));
        };
        Self::from_yaml(&text).map_err(|e| match e {
            Error::Spec(p) => Error::Spec(format!("`{}`: {p}", path.display())),
            Error::SpecLayer {
                index,
                kind,
                problem,
            } => Error::SpecLayer {
                index,
                kind,
                problem: format!("{problem} (in `{}`)", path.display()),
            },
            other => other,
        })
    }

    /// The shape after each layer (`shapes()[0]` is the input, so `layers.len() + 1`
    /// shapes; per image, batch left out), checking every layer fits.
    ///
    /// # Errors
    /// - [`Error::Spec`] when the input has a zero dimension or more than
    ///   [`MAX_ACTIVATION_VALUES`] values, `classes` is below 2, there are no layers, or
    ///   the last layer does not produce `classes` values.
    /// - [`Error::SpecLayer`] when a layer does not fit: a zero size, a conv or pool on a
    ///   flat input, a dense layer on a spatial one, a window larger than its input,
    ///   softmax anywhere but the last dense layer, a dropout rate outside `[0, 1)`, or an
    ///   output (or a conv's unfolded input) past [`MAX_ACTIVATION_VALUES`].
    pub fn shapes(&self) -> Result<Vec<Shape>> {
        if self.input.contains(&0) {
            return Err(Error::Spec(format!(
                "input {:?} has a zero dimension",
                self.input
            )));
        }
        match Shape::Spatial(self.input).checked_len() {
            Some(n) if n <= MAX_ACTIVATION_VALUES => {}
            _ => {
                return Err(Error::Spec(format!(
                    "input {:?} has more than {MAX_ACTIVATION_VALUES} values per image (the limit of this mlops)",
                    self.input
                )))
            }
        }
        if self.classes < 2 {
            return Err(Error::Spec(format!(
                "classes is {}; a classifier needs at least 2",
                self.classes
            )));
        }
        if self.layers.is_empty() {
            return Err(Error::Spec("no layers".into()));
        }
        let mut shape = Shape::Spatial(self.input);
        let mut shapes = vec![shape];
        let last = self.layers.len() - 1;
        for (index, layer) in self.layers.iter().enumerate() {
            let fail = |problem: String| Error::SpecLayer {
                index,
                kind: layer.kind().into(),
                problem,
            };
            let spatial = |shape: Shape| match shape {
                Shape::Spatial(s) => Ok(s),
                Shape::Flat(_) => Err(fail(format!(
                    "needs an image-shaped input but gets a flat vector of {shape}"
                ))),
            };
            shape = match layer {
                LayerSpec::Conv2d {
                    filters,
                    kernel,
                    stride,
                    padding,
                    activation,
                } => {
                    let [h, w, channels] = spatial(shape)?;
                    if *filters == 0 || *kernel == 0 || *stride == 0 {
                        return Err(fail("filters, kernel and stride must be at least 1".into()));
                    }
                    if *activation == Activation::Softmax {
                        return Err(fail(
                            "softmax is only allowed on the last dense layer".into(),
                        ));
                    }
                    let (oh, ow) = match padding {
                        Padding::Valid => {
                            if *kernel > h || *kernel > w {
                                return Err(fail(format!(
                                    "kernel {kernel}x{kernel} is larger than its input {shape}"
                                )));
                            }
                            ((h - kernel) / stride + 1, (w - kernel) / stride + 1)
                        }
                        Padding::Same => (h.div_ceil(*stride), w.div_ceil(*stride)),
                    };
                    // The training executor unfolds each output pixel's receptive field
                    // (im2col), so that buffer is bounded like an activation.
                    let unfolded = [oh, ow, *kernel, *kernel, channels]
                        .iter()
                        .try_fold(1usize, |acc, &d| acc.checked_mul(d));
                    if unfolded.is_none_or(|n| n > MAX_ACTIVATION_VALUES) {
                        return Err(fail(format!(
                            "its unfolded input ({oh}x{ow} windows of {kernel}x{kernel} over {shape}) has more than {MAX_ACTIVATION_VALUES} values per image (the limit of this mlops); use a smaller kernel or input"
                        )));
                    }
                    Shape::Spatial([oh, ow, *filters])
                }
                LayerSpec::MaxPool2d { size, stride } | LayerSpec::AvgPool2d { size, stride } => {
                    let [h, w, c] = spatial(shape)?;
                    let stride = stride.unwrap_or(*size);
                    if *size == 0 || stride == 0 {
                        return Err(fail("size and stride must be at least 1".into()));
                    }
                    if *size > h || *size > w {
                        return Err(fail(format!(
                            "window {size}x{size} is larger than its input {shape}"
                        )));
                    }
                    Shape::Spatial([(h - size) / stride + 1, (w - size) / stride + 1, c])
                }
                LayerSpec::Flatten => Shape::Flat(shape.len()),
                LayerSpec::Dense { units, activation } => {
                    if let Shape::Spatial(_) = shape {
                        return Err(fail(format!(
                            "needs a flat input but gets {shape}; add a `flatten` layer before it"
                        )));
                    }
                    if *units == 0 {
                        return Err(fail("units must be at least 1".into()));
                    }
                    if *activation == Activation::Softmax && index != last {
                        return Err(fail("softmax is only allowed on the last layer".into()));
                    }
                    Shape::Flat(*units)
                }
                LayerSpec::Dropout { rate } => {
                    if !(0.0..1.0).contains(rate) {
                        return Err(fail(format!("rate {rate} is outside [0, 1)")));
                    }
                    shape
                }
                LayerSpec::Relu => shape,
            };
            match shape.checked_len() {
                Some(n) if n <= MAX_ACTIVATION_VALUES => {}
                _ => {
                    return Err(fail(format!(
                        "its output {shape} has more than {MAX_ACTIVATION_VALUES} values per image (the limit of this mlops); use fewer filters or a smaller input"
                    )))
                }
            }
            shapes.push(shape);
        }
        if shape != Shape::Flat(self.classes) {
            return Err(Error::Spec(format!(
                "the last layer produces {shape} values but `classes` is {}; end with a dense layer of {} units",
                self.classes, self.classes
            )));
        }
        Ok(shapes)
    }

    /// The parameter tensors in artifact order (weight then bias, layer by layer): conv
    /// weight `[filters, kernel, kernel, in_channels]`, dense weight `[units, inputs]`,
    /// bias `[out]`.
    ///
    /// # Errors
    /// As [`ModelSpec::shapes`], and [`Error::SpecLayer`] when a weight takes the model
    /// past [`MAX_PARAMETERS`].
    pub fn params(&self) -> Result<Vec<ParamInfo>> {
        let shapes = self.shapes()?;
        let mut params = Vec::new();
        let mut total = 0usize;
        for (index, layer) in self.layers.iter().enumerate() {
            let input = shapes[index];
            let (weight, bias) = match layer {
                LayerSpec::Conv2d {
                    filters, kernel, ..
                } => {
                    let Shape::Spatial([_, _, c]) = input else {
                        unreachable!("checked by shapes()")
                    };
                    (vec![*filters, *kernel, *kernel, c], *filters)
                }
                LayerSpec::Dense { units, .. } => (vec![*units, input.len()], *units),
                _ => continue,
            };
            let count = weight.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
            match count.and_then(|n| n.checked_add(total)) {
                Some(n) if n + bias <= MAX_PARAMETERS => total = n + bias,
                _ => {
                    return Err(Error::SpecLayer {
                        index,
                        kind: layer.kind().into(),
                        problem: format!(
                            "its weight {weight:?} takes the model past {MAX_PARAMETERS} parameters (the limit of this mlops)"
                        ),
                    })
                }
            }
            params.push(ParamInfo {
                name: format!("layers.{index}.weight"),
                shape: weight,
            });
            params.push(ParamInfo {
                name: format!("layers.{index}.bias"),
                shape: vec![bias],
            });
        }
        Ok(params)
    }

    /// f32 values one image takes in the training executor's workspace: every activation
    /// and its gradient, plus the largest unfolded conv input (im2col). Inference needs
    /// less, so this bounds both.
    ///
    /// # Errors
    /// As [`ModelSpec::shapes`].
    pub fn workspace_values_per_image(&self) -> Result<usize> {
        let shapes = self.shapes()?;
        let activations: usize = shapes.iter().map(Shape::len).sum();
        let unfolded = self
            .layers
            .iter()
            .zip(&shapes)
            .zip(&shapes[1..])
            .map(|((layer, input), output)| match (layer, input) {
                (LayerSpec::Conv2d { kernel, .. }, Shape::Spatial([_, _, c])) => {
                    let Shape::Spatial([oh, ow, _]) = output else {
                        return 0;
                    };
                    oh * ow * kernel * kernel * c
                }
                _ => 0,
            })
            .max()
            .unwrap_or(0);
        Ok(2 * activations + unfolded)
    }

    /// Checks that `batch` images fit [`MAX_BATCH_BYTES`] of workspace.
    ///
    /// # Errors
    /// [`Error::Config`] naming the batch, the bytes it needs and the largest that fits;
    /// as [`ModelSpec::shapes`] for an invalid spec.
    pub fn check_batch(&self, batch: usize) -> Result<()> {
        let per_image = 4 * self.workspace_values_per_image()?.max(1);
        if batch
            .checked_mul(per_image)
            .is_none_or(|b| b > MAX_BATCH_BYTES)
        {
            return Err(Error::Config(format!(
                "a batch of {batch} images needs about {} MiB of activations for this model, more than the {} GiB limit; use a batch of at most {}",
                batch.saturating_mul(per_image) >> 20,
                MAX_BATCH_BYTES >> 30,
                MAX_BATCH_BYTES / per_image
            )));
        }
        Ok(())
    }

    /// Total number of trainable values.
    ///
    /// # Errors
    /// As [`ModelSpec::params`].
    pub fn param_count(&self) -> Result<usize> {
        Ok(self.params()?.iter().map(ParamInfo::len).sum())
    }

    /// Trainable values per layer (weight plus bias; 0 for layers without weights), one
    /// entry per layer in `layers` order.
    ///
    /// # Errors
    /// As [`ModelSpec::params`].
    pub fn layer_params(&self) -> Result<Vec<usize>> {
        let mut counts = vec![0usize; self.layers.len()];
        for p in self.params()? {
            // Names are `layers.{index}.weight|bias`, written by `params` above.
            if let Some(index) = p
                .name
                .strip_prefix("layers.")
                .and_then(|rest| rest.split('.').next())
                .and_then(|i| i.parse::<usize>().ok())
            {
                counts[index] += p.len();
            }
        }
        Ok(counts)
    }

    /// Multiply-adds times two for one image's forward pass, per layer (0 for layers
    /// without weights).
    ///
    /// # Errors
    /// As [`ModelSpec::shapes`].
    pub fn flops(&self) -> Result<Vec<u64>> {
        let shapes = self.shapes()?;
        Ok(self
            .layers
            .iter()
            .enumerate()
            .map(|(i, layer)| match layer {
                LayerSpec::Conv2d { kernel, .. } => {
                    let Shape::Spatial([_, _, c]) = shapes[i] else {
                        return 0;
                    };
                    2 * (shapes[i + 1].len() * kernel * kernel * c) as u64
                }
                LayerSpec::Dense { units, .. } => 2 * (shapes[i].len() * units) as u64,
                _ => 0,
            })
            .collect())
    }
}

/// A small spec that takes every runtime path: same padding on 3 channels, a fused 2x2
/// pool, an unfused 3x3/1 average pool, a stride-2 same-padded conv of `filters` channels,
/// a stand-alone ReLU, an unfused max-pool, a 1x1 conv, dropout and two dense layers. The
/// int8 tests pick 5 filters (unfolded kernel rows), the fp32 ones 21 (a partial block).
#[cfg(test)]
pub(crate) fn every_path_spec(filters: usize) -> ModelSpec {
    ModelSpec::from_yaml(&format!(
        "input: [12, 12, 3]\nclasses: 4\nlayers:\n\
         - {{type: conv2d, filters: 8, kernel: 3, padding: same, activation: relu}}\n\
         - {{type: max_pool2d, size: 2, stride: 2}}\n\
         - {{type: avg_pool2d, size: 3, stride: 1}}\n\
         - {{type: conv2d, filters: {filters}, kernel: 3, stride: 2, padding: same}}\n\
         - {{type: relu}}\n\
         - {{type: max_pool2d, size: 2, stride: 1}}\n\
         - {{type: conv2d, filters: 16, kernel: 1, activation: relu}}\n\
         - {{type: flatten}}\n\
         - {{type: dropout, rate: 0.5}}\n\
         - {{type: dense, units: 6, activation: relu}}\n\
         - {{type: dense, units: 4}}\n"
    ))
    .expect("a valid spec")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_cnn_has_93322_parameters() {
        assert_eq!(ModelSpec::reference_cnn().param_count().unwrap(), 93_322);
    }

    #[test]
    fn layer_params_split_the_count_by_layer() {
        // Conv(1->32, 3x3), pool, Conv(32->64), pool, Conv(64->64), flatten, Dense(576->64),
        // Dense(64->10): weights + biases.
        assert_eq!(
            ModelSpec::reference_cnn().layer_params().unwrap(),
            [320, 0, 18_496, 0, 36_928, 0, 36_928, 650]
        );
    }

    #[test]
    fn shipped_yaml_equals_builtin() {
        let text = include_str!("../../examples/models/cnn.yaml");
        assert_eq!(
            ModelSpec::from_yaml(text).unwrap(),
            ModelSpec::reference_cnn()
        );
    }

    #[test]
    fn yaml_round_trip() {
        let spec = ModelSpec::reference_cnn();
        let text = serde_yaml::to_string(&spec).unwrap();
        assert_eq!(ModelSpec::from_yaml(&text).unwrap(), spec);
    }

    #[test]
    fn unknown_layer_names_its_index() {
        let text = "input: [8, 8, 1]\nclasses: 2\nlayers:\n  - type: flatten\n  - type: conv3d\n";
        let err = ModelSpec::from_yaml(text).unwrap_err().to_string();
        assert!(err.contains("layer 1 (conv3d)"), "{err}");
    }

    #[test]
    fn kernel_larger_than_input_is_rejected() {
        let text = "input: [4, 4, 1]\nclasses: 2\nlayers:\n  - {type: conv2d, filters: 2, kernel: 5}\n  - type: flatten\n  - {type: dense, units: 2}\n";
        let err = ModelSpec::from_yaml(text).unwrap_err().to_string();
        assert!(err.contains("layer 0 (conv2d)"), "{err}");
        assert!(err.contains("larger than its input"), "{err}");
    }

    /// Issue 10: `filters: 1000000` aborted the process on a 27 GB allocation and
    /// `filters: 2^62` panicked with `capacity overflow`; both are refused at parse time,
    /// naming the layer.
    #[test]
    fn oversized_layers_are_refused_naming_the_layer() {
        for filters in [1_000_000usize, 1 << 62, usize::MAX] {
            let text = format!(
                "input: [28, 28, 1]\nclasses: 10\nlayers:\n  - {{type: conv2d, filters: {filters}, kernel: 3}}\n  - type: flatten\n  - {{type: dense, units: 10}}\n"
            );
            let err = ModelSpec::from_yaml(&text).unwrap_err().to_string();
            assert!(err.contains("layer 0 (conv2d)"), "{err}");
            assert!(err.contains("limit of this mlops"), "{err}");
        }
        let wide = "input: [28, 28, 1]\nclasses: 10\nlayers:\n  - type: flatten\n  - {type: dense, units: 400000}\n  - {type: dense, units: 10}\n";
        let err = ModelSpec::from_yaml(wide).unwrap_err().to_string();
        assert!(err.contains("layer 1 (dense)"), "{err}");
        assert!(err.contains("parameters"), "{err}");
        let kernel = "input: [28, 28, 1]\nclasses: 10\nlayers:\n  - {type: conv2d, filters: 1, kernel: 100000, padding: same}\n  - type: flatten\n  - {type: dense, units: 10}\n";
        let err = ModelSpec::from_yaml(kernel).unwrap_err().to_string();
        assert!(err.contains("layer 0 (conv2d)"), "{err}");
    }

    /// Issue 10: an input of `[2^32, 2^32, 1]` wrapped to 0 values and loaded.
    #[test]
    fn input_sizes_that_wrap_are_refused() {
        let mut spec = ModelSpec::reference_cnn();
        spec.input = [1 << 32, 1 << 32, 1];
        let err = spec.shapes().unwrap_err().to_string();
        assert!(err.contains("more than"), "{err}");
    }

    #[test]
    fn dense_on_image_needs_flatten() {
        let text = "input: [4, 4, 1]\nclasses: 2\nlayers:\n  - {type: dense, units: 2}\n";
        let err = ModelSpec::from_yaml(text).unwrap_err().to_string();
        assert!(err.contains("flatten"), "{err}");
    }
}
