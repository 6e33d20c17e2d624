//! Keras models: Keras 3 `.keras` archives and legacy HDF5 `.h5` files.
//!
//! HDF5 comes from the `hdf5-pure` crate, pinned to `=0.47.0` in Cargo.toml (it releases
//! often): a maintained pure-Rust reader (no libhdf5, no build script) that reads both
//! containers Keras writes, superblock v0 with v1 object headers, symbol-table groups,
//! header continuation chunks, variable-length strings in the global heap, and contiguous
//! (or chunked, deflated) datasets. It was tried on every fixture and on thousands of
//! corrupted copies without a panic. We keep no HDF5 parser of our own.
//!
//! A `.keras` file is a zip (`config.json`, `metadata.json`, `model.weights.h5`); its
//! weights sit at `layers/<snake_case class>[_<n>]/vars/<i>`, numbered per class in the
//! order of `model.layers` (the InputLayer of a Sequential model left out, those of a
//! Functional one counted), not by the layers' names. A legacy `.h5` holds the config
//! JSON in the root attribute `model_config` and the weights at
//! `model_weights/<layer name>/<weight name>`, in the order of the `weight_names`
//! attribute. Either way the order comes from the config and the attributes, never from
//! HDF5's group listing (which is by name).
//!
//! Sequential models, and Functional ones that are one straight chain from one input,
//! of Conv2D, MaxPooling2D, AveragePooling2D, Flatten, Dense, Dropout, ReLU, Activation
//! and Softmax layers become our [`ModelSpec`]; a BatchNormalization right after a Conv2D
//! or Dense without activation is folded into it. Anything else is refused with an error
//! naming the Keras layer, never converted into a different model. Weight layouts:
//! Keras conv kernels are HWIO `[kh, kw, in, out]` (ours `[out, kh, kw, in]`), dense
//! kernels `[in, out]` (ours `[out, in]`); Keras flattens channels-last tensors in
//! `(h, w, c)` order, as we do.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read as _;
use std::path::Path;

use hdf5_pure::{AttrValue, Datatype, Layout};
use serde_json::Value as Json;

use super::{Read, SourceFormat};
use crate::model::{Activation, LayerSpec, ModelSpec, Padding};
use crate::{Error, Result};

/// What the reader converts, for error messages.
const SUPPORTED: &str = "Supported: Sequential models (or Functional ones that are one \
    straight chain from one input) of Conv2D, MaxPooling2D, AveragePooling2D, Flatten, Dense, \
    Dropout, ReLU, Activation or Softmax (relu, softmax, linear), and BatchNormalization right \
    after a Conv2D or Dense without activation; channels_last only";

/// Largest `config.json` / `metadata.json` read from a `.keras` archive.
const MAX_JSON_BYTES: u64 = 64 << 20;

/// Largest ratio of a chunked (possibly compressed) dataset's values to the file's size:
/// above deflate's best ratio, so a small file cannot make us allocate much more.
const MAX_EXPANSION: u64 = 1100;

/// Reads a Keras model (`format` says which container).
///
/// # Errors
/// [`Error::Data`] naming `path`: a corrupt zip or HDF5 container, a missing config or
/// weights, weights whose shapes or count differ from the config, or a model outside what
/// mlops converts (the message names the Keras layer, its class and what is supported);
/// [`Error::Spec`] when the model as a whole fails our spec's checks.
pub fn read(path: &Path, bytes: &[u8], format: SourceFormat) -> Result<Read> {
    let source = match format {
        SourceFormat::Keras => open_keras(path, bytes)?,
        SourceFormat::KerasH5 => open_h5(path, bytes)?,
        SourceFormat::Onnx => {
            return Err(Error::data(
                path,
                "is not a Keras model (.keras zip or .h5)",
            ));
        }
    };
    let model = parse_model(path, &source.config)?;
    let (spec, params) = build(path, &model, &source.store)?;
    let producer = match source.metadata.get("keras_version") {
        Some(v) => format!("keras {v}"),
        None => "keras".to_string(),
    };
    Ok(Read {
        spec,
        params,
        metadata: source.metadata,
        producer,
        opset: None,
        source_layout: "nhwc".into(),
    })
}

/// The parts of a Keras file, whatever the container.
struct Source {
    /// The model config: `{"class_name": ..., "config": {...}}`.
    config: Json,
    /// Where the weights are.
    store: Store,
    /// `keras_version`, `backend` when recorded.
    metadata: BTreeMap<String, String>,
}

/// The weights file and how its groups are named.
enum Store {
    /// `model.weights.h5` of a `.keras` archive: `layers/<class key>/vars/<i>`.
    Keras3 { file: hdf5_pure::File, len: u64 },
    /// A legacy `.h5`: `model_weights/<layer name>/<weight name>`.
    Legacy { file: hdf5_pure::File, len: u64 },
}

fn h5_error(path: &Path, what: &str, e: &hdf5_pure::Error) -> Error {
    Error::data(path, format!("{what}: {e}"))
}

/// Reads a `.keras` zip: its config, metadata and weights.
fn open_keras(path: &Path, bytes: &[u8]) -> Result<Source> {
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .map_err(|e| Error::data(path, format!("is not a readable .keras archive (zip: {e})")))?;
    let config = member(path, &mut archive, "config.json", MAX_JSON_BYTES)?.ok_or_else(|| {
        Error::data(
            path,
            "is a zip without `config.json`: not a Keras 3 `.keras` model",
        )
    })?;
    let config: Json = serde_json::from_slice(&config)
        .map_err(|e| Error::data(path, format!("its `config.json` is not valid JSON: {e}")))?;
    let mut metadata = BTreeMap::new();
    if let Some(meta) = member(path, &mut archive, "metadata.json", MAX_JSON_BYTES)? {
        // Only informative: a malformed metadata.json does not stop the conversion.
        if let Ok(Json::Object(meta)) = serde_json::from_slice::<Json>(&meta) {
            for key in ["keras_version", "backend"] {
                if let Some(v) = meta.get(key).and_then(Json::as_str) {
                    metadata.insert(key.to_string(), v.to_string());
                }
            }
        }
    }
    let weights = member(
        path,
        &mut archive,
        "model.weights.h5",
        super::MAX_FILE_BYTES,
    )?
    .ok_or_else(|| {
        Error::data(
            path,
            "has no `model.weights.h5`: mlops reads `.keras` files written by `model.save` \
                 with their weights (sharded or npz weights are not supported)",
        )
    })?;
    let len = weights.len() as u64;
    let file = hdf5_pure::File::from_bytes(weights).map_err(|e| {
        h5_error(
            path,
            "its `model.weights.h5` is not a readable HDF5 file",
            &e,
        )
    })?;
    Ok(Source {
        config,
        store: Store::Keras3 { file, len },
        metadata,
    })
}

/// One member of a zip, at most `limit` bytes; `None` when absent.
fn member(
    path: &Path,
    archive: &mut zip::ZipArchive<std::io::Cursor<&[u8]>>,
    name: &str,
    limit: u64,
) -> Result<Option<Vec<u8>>> {
    let corrupt = |e: &dyn std::fmt::Display| {
        Error::data(
            path,
            format!("its `{name}` cannot be read from the zip: {e}"),
        )
    };
    let file = match archive.by_name(name) {
        Ok(file) => file,
        Err(zip::result::ZipError::FileNotFound) => return Ok(None),
        Err(e) => return Err(corrupt(&e)),
    };
    if file.size() > limit {
        return Err(Error::data(
            path,
            format!(
                "its `{name}` is {} bytes; mlops reads at most {limit}",
                file.size()
            ),
        ));
    }
    // The declared size is only a hint (at most 64 MiB reserved up front).
    let mut out = Vec::with_capacity(file.size().min(64 << 20) as usize);
    file.take(limit + 1)
        .read_to_end(&mut out)
        .map_err(|e| corrupt(&e))?;
    if out.len() as u64 > limit {
        return Err(Error::data(
            path,
            format!("its `{name}` unpacks to more than {limit} bytes"),
        ));
    }
    Ok(Some(out))
}

/// Reads a legacy `.h5` model: the `model_config` attribute and `model_weights`.
fn open_h5(path: &Path, bytes: &[u8]) -> Result<Source> {
    let len = bytes.len() as u64;
    let file = hdf5_pure::File::from_bytes(bytes.to_vec())
        .map_err(|e| h5_error(path, "is not a readable HDF5 file", &e))?;
    let root = file
        .root()
        .attrs()
        .map_err(|e| h5_error(path, "its root attributes cannot be read", &e))?;
    let Some(config) = root.get("model_config") else {
        return Err(Error::data(
            path,
            "is an HDF5 file without a `model_config` attribute: it holds weights only \
             (`save_weights`, or a `.keras` archive's `model.weights.h5`); save the whole \
             model with `model.save(\"model.keras\")` or `model.save(\"model.h5\")`",
        ));
    };
    let config = config
        .as_str()
        .ok_or_else(|| Error::data(path, "its `model_config` attribute is not a string"))?;
    let config: Json = serde_json::from_str(config).map_err(|e| {
        Error::data(
            path,
            format!("its `model_config` attribute is not valid JSON: {e}"),
        )
    })?;
    let mut metadata = BTreeMap::new();
    for key in ["keras_version", "backend"] {
        if let Some(v) = root.get(key).and_then(AttrValue::as_str) {
            metadata.insert(key.to_string(), v.to_string());
        }
    }
    Ok(Source {
        config,
        store: Store::Legacy { file, len },
        metadata,
    })
}

/// A non-linearity as Keras names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Act {
    Linear,
    Relu,
    Softmax,
}

/// A Keras layer mlops understands.
#[derive(Debug, Clone, PartialEq)]
enum Op {
    Input,
    Conv {
        filters: usize,
        kernel: usize,
        stride: usize,
        padding: Padding,
        activation: Act,
        bias: bool,
    },
    Pool {
        max: bool,
        size: usize,
        stride: usize,
    },
    Flatten,
    Dense {
        units: usize,
        activation: Act,
        bias: bool,
    },
    Dropout {
        rate: f32,
    },
    Activation(Act),
    BatchNorm {
        epsilon: f64,
        center: bool,
        scale: bool,
    },
}

/// One layer of the config.
#[derive(Debug, Clone)]
struct Layer {
    /// Its config `name`.
    name: String,
    /// Its `class_name`.
    class: String,
    /// Its group under `layers/` in a `.keras` weights file.
    key: String,
    op: Op,
}

/// The model as the config describes it.
#[derive(Debug)]
struct Model {
    name: String,
    input: [usize; 3],
    /// In model order, input layers included.
    layers: Vec<Layer>,
}

fn layer_error(path: &Path, layer: &Layer, problem: impl std::fmt::Display) -> Error {
    Error::data(
        path,
        format!("Keras layer `{}` ({}) {problem}", layer.name, layer.class),
    )
}

/// Keras' `naming.to_snake_case`, which names the weight groups of a `.keras` file.
fn snake_case(name: &str) -> String {
    let chars: Vec<char> = name
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    // re.sub("(.)([A-Z][a-z]+)", r"\1_\2"): non-overlapping, left to right.
    let mut first = Vec::with_capacity(chars.len() + 8);
    let mut i = 0;
    while i < chars.len() {
        let word = i + 2 < chars.len()
            && chars[i + 1].is_ascii_uppercase()
            && chars[i + 2].is_ascii_lowercase();
        if word {
            let mut end = i + 2;
            while end < chars.len() && chars[end].is_ascii_lowercase() {
                end += 1;
            }
            first.push(chars[i]);
            first.push('_');
            first.extend_from_slice(&chars[i + 1..end]);
            i = end;
        } else {
            first.push(chars[i]);
            i += 1;
        }
    }
    // re.sub("([a-z])([A-Z])", r"\1_\2").lower()
    let mut out = String::with_capacity(first.len() + 8);
    for (i, &c) in first.iter().enumerate() {
        if i > 0 && first[i - 1].is_ascii_lowercase() && c.is_ascii_uppercase() {
            out.push('_');
        }
        out.extend(c.to_lowercase());
    }
    out
}

/// A positive integer of a config, `default` when absent or null.
fn uint(value: Option<&Json>) -> Option<usize> {
    value
        .and_then(Json::as_u64)
        .and_then(|v| usize::try_from(v).ok())
}

/// A size given as `n`, `[n]` or `[n, n]`; `Err` for a non-square pair or a bad value.
fn square(value: Option<&Json>, what: &str) -> std::result::Result<Option<usize>, String> {
    let bad = || format!("has {what} {}; ", value.map_or("?".into(), Json::to_string));
    match value {
        None | Some(Json::Null) => Ok(None),
        Some(Json::Array(items)) => {
            let sizes: Option<Vec<usize>> = items.iter().map(|v| uint(Some(v))).collect();
            match sizes.as_deref() {
                Some([a]) => Ok(Some(*a)),
                Some([a, b]) if a == b => Ok(Some(*a)),
                Some([_, _]) => Err(format!("{}mlops supports square {what} only", bad())),
                _ => Err(format!("{}expected two positive integers", bad())),
            }
        }
        Some(v) => uint(Some(v))
            .map(Some)
            .ok_or_else(|| format!("{}expected a positive integer", bad())),
    }
}

fn activation(value: Option<&Json>) -> std::result::Result<Act, String> {
    match value {
        None | Some(Json::Null) => Ok(Act::Linear),
        Some(Json::String(s)) => match s.as_str() {
            "linear" => Ok(Act::Linear),
            "relu" => Ok(Act::Relu),
            "softmax" => Ok(Act::Softmax),
            other => Err(format!(
                "has activation `{other}`; mlops supports relu, softmax (last Dense) and linear"
            )),
        },
        Some(other) => Err(format!(
            "has a custom activation ({other}); mlops supports relu, softmax (last Dense) and linear"
        )),
    }
}

/// The `[h, w, c]` of a Keras shape (`[null, h, w, c]` with the batch dimension).
fn image_shape(dims: &[Json]) -> std::result::Result<[usize; 3], String> {
    let sizes: Vec<Option<usize>> = dims.iter().map(|v| uint(Some(v))).collect();
    let shown = Json::Array(dims.to_vec()).to_string();
    if sizes.iter().any(Option::is_none) {
        return Err(format!(
            "has input shape {shown} with a variable or invalid size; mlops needs a fixed image size"
        ));
    }
    let s: Vec<usize> = sizes.into_iter().flatten().collect();
    match s[..] {
        [h, w, c] => Ok([h, w, c]),
        [h, w] => Ok([h, w, 1]),
        _ => Err(format!(
            "has input shape {shown}; mlops converts models of image input [height, width, channels]"
        )),
    }
}

/// The names of the layers a Functional layer's inbound node reads (Keras 3 and 2).
fn node_inputs(node: &Json, out: &mut Vec<String>) {
    match node {
        Json::Object(map) => {
            if map.get("class_name").and_then(Json::as_str) == Some("__keras_tensor__") {
                if let Some(name) = map
                    .get("config")
                    .and_then(|c| c.get("keras_history"))
                    .and_then(|h| h.get(0))
                    .and_then(Json::as_str)
                {
                    out.push(name.to_string());
                }
                return;
            }
            for v in map.values() {
                node_inputs(v, out);
            }
        }
        // Keras 2: [[name, node_index, tensor_index, kwargs], ...].
        Json::Array(items) => {
            if let (Some(Json::String(name)), Some(Json::Number(_))) = (items.first(), items.get(1))
            {
                out.push(name.clone());
            } else {
                for v in items {
                    node_inputs(v, out);
                }
            }
        }
        _ => {}
    }
}

/// Reads one layer's config into an [`Op`].
fn parse_op(class: &str, cfg: &Json) -> std::result::Result<Op, String> {
    let channels_last = || {
        match cfg.get("data_format").and_then(Json::as_str) {
        None | Some("channels_last") => Ok(()),
        Some(other) => Err(format!(
            "has data_format `{other}`; mlops converts channels_last (NHWC) models only: build the model with data_format=\"channels_last\""
        )),
    }
    };
    let flag = |key: &str, default: bool| -> std::result::Result<bool, String> {
        match cfg.get(key) {
            None | Some(Json::Null) => Ok(default),
            Some(Json::Bool(b)) => Ok(*b),
            Some(v) => Err(format!("has {key} {v}, not true or false")),
        }
    };
    let op = match class {
        "InputLayer" => Op::Input,
        "Conv2D" | "Convolution2D" => {
            channels_last()?;
            let filters =
                uint(cfg.get("filters")).ok_or("has no positive integer `filters`".to_string())?;
            let kernel = square(cfg.get("kernel_size"), "kernel_size")?
                .ok_or("has no kernel_size".to_string())?;
            let stride = square(cfg.get("strides"), "strides")?.unwrap_or(1);
            if square(cfg.get("dilation_rate"), "dilation_rate")?.unwrap_or(1) != 1 {
                return Err(
                    "has a dilation_rate other than 1; mlops supports plain convolutions".into(),
                );
            }
            if uint(cfg.get("groups")).unwrap_or(1) != 1 {
                return Err(
                    "is a grouped convolution (groups > 1); mlops supports groups = 1".into(),
                );
            }
            let padding = match cfg.get("padding").and_then(Json::as_str) {
                None | Some("valid") => Padding::Valid,
                Some("same") => Padding::Same,
                Some(other) => {
                    return Err(format!(
                        "has padding `{other}`; mlops supports valid and same"
                    ))
                }
            };
            let activation = activation(cfg.get("activation"))?;
            if activation == Act::Softmax {
                return Err(
                    "has a softmax activation; mlops applies softmax only on the last Dense layer"
                        .into(),
                );
            }
            Op::Conv {
                filters,
                kernel,
                stride,
                padding,
                activation,
                bias: flag("use_bias", true)?,
            }
        }
        "MaxPooling2D" | "MaxPool2D" | "AveragePooling2D" | "AvgPool2D" => {
            channels_last()?;
            let size = square(cfg.get("pool_size"), "pool_size")?.unwrap_or(2);
            let stride = square(cfg.get("strides"), "strides")?.unwrap_or(size);
            match cfg.get("padding").and_then(Json::as_str) {
                None | Some("valid") => {}
                Some(other) => {
                    return Err(format!(
                        "has padding `{other}`; mlops pools without padding (valid) only"
                    ))
                }
            }
            Op::Pool {
                max: class.starts_with("Max"),
                size,
                stride,
            }
        }
        "Flatten" => {
            channels_last()?;
            Op::Flatten
        }
        "Dense" => {
            let units =
                uint(cfg.get("units")).ok_or("has no positive integer `units`".to_string())?;
            if cfg.get("lora_rank").is_some_and(|v| !v.is_null()) {
                return Err(
                    "has LoRA weights (lora_rank); merge them into the kernel before saving".into(),
                );
            }
            Op::Dense {
                units,
                activation: activation(cfg.get("activation"))?,
                bias: flag("use_bias", true)?,
            }
        }
        "Dropout" => Op::Dropout {
            rate: cfg
                .get("rate")
                .and_then(Json::as_f64)
                .ok_or("has no numeric `rate`".to_string())? as f32,
        },
        "ReLU" => {
            let zero = |key: &str| {
                cfg.get(key)
                    .is_none_or(|v| v.is_null() || v.as_f64() == Some(0.0))
            };
            let unbounded = cfg.get("max_value").is_none_or(Json::is_null);
            if !(unbounded && zero("negative_slope") && zero("threshold")) {
                return Err(
                    "has max_value, negative_slope or threshold set; mlops supports a plain ReLU"
                        .into(),
                );
            }
            Op::Activation(Act::Relu)
        }
        "Activation" => Op::Activation(activation(cfg.get("activation"))?),
        "Softmax" => {
            let axis_last = match cfg.get("axis") {
                None | Some(Json::Null) => true,
                Some(Json::Array(a)) => a.len() == 1 && a[0].as_i64() == Some(-1),
                Some(v) => v.as_i64() == Some(-1),
            };
            if !axis_last {
                return Err("is a softmax over an axis other than the last".into());
            }
            Op::Activation(Act::Softmax)
        }
        "BatchNormalization" => {
            let axis_last = match cfg.get("axis") {
                None | Some(Json::Null) => true,
                Some(Json::Array(a)) => a.len() == 1 && matches!(a[0].as_i64(), Some(-1 | 3)),
                Some(v) => matches!(v.as_i64(), Some(-1 | 3)),
            };
            if !axis_last {
                return Err("normalizes an axis other than the channels (last) axis".into());
            }
            Op::BatchNorm {
                epsilon: cfg.get("epsilon").and_then(Json::as_f64).unwrap_or(1e-3),
                center: flag("center", true)?,
                scale: flag("scale", true)?,
            }
        }
        "Sequential" | "Functional" | "Model" => {
            return Err(format!(
                "is a nested model; flatten it into one model first. {SUPPORTED}"
            ))
        }
        _ => {
            return Err(format!(
                "is not a layer mlops converts (a custom or unsupported layer). {SUPPORTED}"
            ))
        }
    };
    Ok(op)
}

/// Reads the config of a Sequential or Functional model.
fn parse_model(path: &Path, config: &Json) -> Result<Model> {
    let class = config
        .get("class_name")
        .and_then(Json::as_str)
        .ok_or_else(|| Error::data(path, "its model config has no `class_name`"))?;
    let sequential = match class {
        "Sequential" => true,
        "Functional" | "Model" => false,
        other => {
            return Err(Error::data(
                path,
                format!("is a Keras `{other}` model (a subclassed or custom model). {SUPPORTED}"),
            ))
        }
    };
    let inner = config
        .get("config")
        .ok_or_else(|| Error::data(path, "its model config has no `config`"))?;
    // Keras 2.0 to 2.2 wrote a Sequential's config as the bare list of layers.
    let (name, raw_layers) = match inner {
        Json::Array(layers) => (String::new(), layers),
        _ => (
            inner
                .get("name")
                .and_then(Json::as_str)
                .unwrap_or_default()
                .to_string(),
            inner
                .get("layers")
                .and_then(Json::as_array)
                .ok_or_else(|| Error::data(path, "its model config has no `layers` list"))?,
        ),
    };

    let mut layers = Vec::with_capacity(raw_layers.len());
    let mut counts: HashMap<String, usize> = HashMap::new();
    // The first layer that does not parse; reported after the model's structure, which
    // is the more basic problem (two inputs, a branch).
    let mut first_error: Option<(usize, String)> = None;
    for (index, raw) in raw_layers.iter().enumerate() {
        let class = raw
            .get("class_name")
            .and_then(Json::as_str)
            .unwrap_or("?")
            .to_string();
        let cfg = raw.get("config").unwrap_or(&Json::Null);
        let name = cfg
            .get("name")
            .or_else(|| raw.get("name"))
            .and_then(Json::as_str)
            .unwrap_or("?")
            .to_string();
        let mut layer = Layer {
            name,
            class,
            key: String::new(),
            op: Op::Input,
        };
        layer.op = match parse_op(&layer.class, cfg) {
            Ok(op) => op,
            Err(problem) => {
                first_error.get_or_insert((index, problem));
                // A stand-in, never converted: the error is returned below.
                Op::Flatten
            }
        };
        // `.keras` weight groups: numbered per class over `model.layers`, which leaves a
        // Sequential's InputLayer out.
        if !(sequential && layer.op == Op::Input) {
            let base = snake_case(&layer.class);
            let n = counts.entry(base.clone()).or_insert(0);
            layer.key = if *n == 0 {
                base.clone()
            } else {
                format!("{base}_{n}")
            };
            *n += 1;
        }
        layers.push(layer);
    }

    let inputs: Vec<usize> = (0..layers.len())
        .filter(|&i| layers[i].op == Op::Input)
        .collect();
    if inputs.len() > 1 {
        let names: Vec<String> = inputs
            .iter()
            .map(|&i| format!("`{}`", layers[i].name))
            .collect();
        return Err(layer_error(
            path,
            &layers[inputs[1]],
            format!(
                "is a second input: the model has {} inputs ({}); mlops converts models of one image input. {SUPPORTED}",
                inputs.len(),
                names.join(", ")
            ),
        ));
    }
    if let Some(&i) = inputs.first() {
        if i != 0 {
            return Err(layer_error(
                path,
                &layers[i],
                "comes after other layers; the input must come first",
            ));
        }
    }
    if !sequential {
        check_chain(path, inner, raw_layers, &layers)?;
    }
    if let Some((index, problem)) = first_error {
        return Err(layer_error(path, &layers[index], problem));
    }

    let input = input_shape(path, config, inner, raw_layers, &layers)?;
    Ok(Model {
        name,
        input,
        layers,
    })
}

/// Checks that a Functional model is one chain: each layer reads the one before it.
fn check_chain(path: &Path, inner: &Json, raw_layers: &[Json], layers: &[Layer]) -> Result<()> {
    if layers.first().is_none_or(|l| l.op != Op::Input) {
        return Err(Error::data(
            path,
            "is a Functional model without an InputLayer first; mlops converts a straight chain from one input",
        ));
    }
    for (i, (raw, layer)) in raw_layers.iter().zip(layers).enumerate().skip(1) {
        let nodes = raw
            .get("inbound_nodes")
            .and_then(Json::as_array)
            .map_or(&[][..], Vec::as_slice);
        if nodes.len() != 1 {
            return Err(layer_error(
                path,
                layer,
                format!(
                    "is called {} times in the model (a shared or unused layer); mlops converts a straight chain of layers each used once",
                    nodes.len()
                ),
            ));
        }
        let mut sources = Vec::new();
        node_inputs(&nodes[0], &mut sources);
        let previous = &layers[i - 1].name;
        if sources.len() != 1 {
            let names: Vec<String> = sources.iter().map(|s| format!("`{s}`")).collect();
            return Err(layer_error(
                path,
                layer,
                format!(
                    "takes {} inputs ({}); mlops converts a straight chain where each layer takes the one before it. {SUPPORTED}",
                    sources.len(),
                    names.join(", ")
                ),
            ));
        }
        if &sources[0] != previous {
            return Err(layer_error(
                path,
                layer,
                format!(
                    "reads `{}`, not the layer before it (`{previous}`): the model branches; mlops converts a straight chain",
                    sources[0]
                ),
            ));
        }
    }
    // The output: exactly the last layer.
    let mut outputs = Vec::new();
    if let Some(out) = inner.get("output_layers") {
        node_inputs(out, &mut outputs);
    }
    let last = &layers[layers.len() - 1].name;
    if !outputs.is_empty() && (outputs.len() != 1 || &outputs[0] != last) {
        return Err(Error::data(
            path,
            format!(
                "has outputs {outputs:?}; mlops converts models whose one output is the last layer (`{last}`)"
            ),
        ));
    }
    Ok(())
}

/// The model's input `[h, w, c]`: the InputLayer's `batch_shape`, else the first layer's
/// `batch_input_shape` / `input_shape`, else the model's `build_input_shape`.
/// A non-empty JSON array.
fn with_batch(v: Option<&Json>) -> Option<&Vec<Json>> {
    v.and_then(Json::as_array).filter(|a| !a.is_empty())
}

fn input_shape(
    path: &Path,
    config: &Json,
    inner: &Json,
    raw_layers: &[Json],
    layers: &[Layer],
) -> Result<[usize; 3]> {
    let first_cfg = raw_layers.first().and_then(|l| l.get("config"));

    let found: Option<(&[Json], &str)> = first_cfg
        .and_then(|c| with_batch(c.get("batch_shape")).or(with_batch(c.get("batch_input_shape"))))
        .map(|a| (&a[1..], "batch"))
        .or_else(|| {
            first_cfg
                .and_then(|c| c.get("input_shape"))
                .and_then(Json::as_array)
                .map(|a| (&a[..], "input_shape"))
        })
        .or_else(|| {
            with_batch(inner.get("build_input_shape"))
                .or(with_batch(
                    config
                        .get("build_config")
                        .and_then(|b| b.get("input_shape")),
                ))
                .map(|a| (&a[1..], "build"))
        });
    let Some((dims, _)) = found else {
        return Err(Error::data(
            path,
            "has no input shape (no InputLayer, batch_input_shape or build_input_shape); build the model with keras.Input(shape=(height, width, channels))",
        ));
    };
    image_shape(dims).map_err(|p| match layers.first() {
        Some(first) => layer_error(path, first, p),
        None => Error::data(path, p),
    })
}

/// What a Keras layer with weights feeds.
#[derive(Debug, Clone, Copy)]
enum Use {
    /// Conv2D or Dense: spec layer `spec` (its weight and bias).
    Layer { spec: usize, bias: bool },
    /// BatchNormalization folded into spec layer `spec`.
    Fold {
        spec: usize,
        epsilon: f64,
        center: bool,
        scale: bool,
    },
}

/// Our spec and parameters from the model and its weights.
fn build(path: &Path, model: &Model, store: &Store) -> Result<(ModelSpec, Vec<Vec<f32>>)> {
    let mut specs: Vec<LayerSpec> = Vec::new();
    // For each spec layer, the Keras layer it came from (errors name it).
    let mut origin: Vec<usize> = Vec::new();
    // Keras layers with weights, in model order.
    let mut uses: Vec<(usize, Use)> = Vec::new();
    // The Keras layer that put softmax on a spec layer.
    let mut softmax_from: Vec<(usize, usize)> = Vec::new();
    let to_ours = |a: Act| match a {
        Act::Linear => Activation::None,
        Act::Relu => Activation::Relu,
        Act::Softmax => Activation::Softmax,
    };
    for (k, layer) in model.layers.iter().enumerate() {
        match &layer.op {
            Op::Input => {}
            Op::Conv {
                filters,
                kernel,
                stride,
                padding,
                activation,
                bias,
            } => {
                uses.push((
                    k,
                    Use::Layer {
                        spec: specs.len(),
                        bias: *bias,
                    },
                ));
                specs.push(LayerSpec::Conv2d {
                    filters: *filters,
                    kernel: *kernel,
                    stride: *stride,
                    padding: *padding,
                    activation: to_ours(*activation),
                });
                origin.push(k);
            }
            Op::Pool { max, size, stride } => {
                let stride = (stride != size).then_some(*stride);
                specs.push(if *max {
                    LayerSpec::MaxPool2d { size: *size, stride }
                } else {
                    LayerSpec::AvgPool2d { size: *size, stride }
                });
                origin.push(k);
            }
            Op::Flatten => {
                specs.push(LayerSpec::Flatten);
                origin.push(k);
            }
            Op::Dense {
                units,
                activation,
                bias,
            } => {
                uses.push((
                    k,
                    Use::Layer {
                        spec: specs.len(),
                        bias: *bias,
                    },
                ));
                if *activation == Act::Softmax {
                    softmax_from.push((specs.len(), k));
                }
                specs.push(LayerSpec::Dense {
                    units: *units,
                    activation: to_ours(*activation),
                });
                origin.push(k);
            }
            Op::Dropout { rate } => {
                specs.push(LayerSpec::Dropout { rate: *rate });
                origin.push(k);
            }
            Op::Activation(Act::Linear) => {}
            Op::Activation(Act::Relu) => {
                specs.push(LayerSpec::Relu);
                origin.push(k);
            }
            Op::Activation(Act::Softmax) => match specs.last_mut() {
                Some(LayerSpec::Dense { activation, .. }) if *activation == Activation::None => {
                    *activation = Activation::Softmax;
                    softmax_from.push((specs.len() - 1, k));
                }
                _ => {
                    return Err(layer_error(
                        path,
                        layer,
                        "is a softmax that does not directly follow a Dense layer without activation; mlops applies softmax only on the last Dense layer",
                    ))
                }
            },
            Op::BatchNorm {
                epsilon,
                center,
                scale,
            } => {
                let target = specs.len().checked_sub(1);
                let foldable = target.is_some_and(|t| {
                    matches!(
                        specs[t],
                        LayerSpec::Conv2d { activation: Activation::None, .. }
                            | LayerSpec::Dense { activation: Activation::None, .. }
                    )
                });
                let (Some(t), true) = (target, foldable) else {
                    let after = match target {
                        Some(t) => {
                            let before = &model.layers[origin[t]];
                            let what = match &before.op {
                                Op::Conv { activation, .. } | Op::Dense { activation, .. } => {
                                    format!(
                                        "whose {} activation comes before it",
                                        match activation {
                                            Act::Relu => "relu",
                                            Act::Softmax => "softmax",
                                            Act::Linear => "linear",
                                        }
                                    )
                                }
                                _ => "which has no weights to fold it into".to_string(),
                            };
                            format!("follows `{}` ({}), {what}", before.name, before.class)
                        }
                        None => "comes first".to_string(),
                    };
                    return Err(layer_error(
                        path,
                        layer,
                        format!(
                            "{after}; mlops cannot fold this BatchNormalization: it folds one only into a Conv2D or Dense right before it that has no activation (put the activation after the BatchNormalization). {SUPPORTED}"
                        ),
                    ));
                };
                uses.push((
                    k,
                    Use::Fold {
                        spec: t,
                        epsilon: *epsilon,
                        center: *center,
                        scale: *scale,
                    },
                ));
            }
        }
    }
    for (spec, k) in softmax_from {
        if spec + 1 != specs.len() {
            return Err(layer_error(
                path,
                &model.layers[k],
                "puts a softmax before the end of the model; mlops applies softmax only on the last Dense layer",
            ));
        }
    }
    let classes = match specs.last() {
        Some(LayerSpec::Dense { units, .. }) => *units,
        Some(_) => {
            let last = &model.layers[origin[origin.len() - 1]];
            return Err(layer_error(
                path,
                last,
                "ends the model; mlops converts classifiers that end in a Dense layer (softmax or logits)",
            ));
        }
        None => return Err(Error::data(path, "has no layers mlops converts")),
    };
    let spec = ModelSpec {
        name: model.name.clone(),
        input: model.input,
        classes,
        layers: specs,
    };
    let infos = spec.params().map_err(|e| match e {
        Error::SpecLayer { index, problem, .. } => layer_error(
            path,
            &model.layers[origin[index]],
            format!("does not fit: {problem}"),
        ),
        other => other,
    })?;

    let reader = WeightReader::new(path, store)?;
    // Conv/dense layers in spec order hold weight then bias: spec layer -> param index.
    let mut param_of: HashMap<usize, usize> = HashMap::new();
    let mut p = 0;
    for (i, l) in spec.layers.iter().enumerate() {
        if matches!(l, LayerSpec::Conv2d { .. } | LayerSpec::Dense { .. }) {
            param_of.insert(i, p);
            p += 2;
        }
    }
    let mut params: Vec<Vec<f32>> = vec![Vec::new(); infos.len()];
    for &(k, use_) in &uses {
        let layer = &model.layers[k];
        match use_ {
            Use::Layer { spec: s, bias } => {
                let w = param_of[&s];
                let ours = &infos[w].shape;
                let out = ours[0];
                let keras_shape: Vec<usize> = match ours[..] {
                    [o, kh, kw, i] => vec![kh, kw, i, o],
                    [o, i] => vec![i, o],
                    _ => unreachable!("spec weights are rank 4 or 2"),
                };
                let mut expected = vec![("kernel", keras_shape)];
                if bias {
                    expected.push(("bias", vec![out]));
                }
                let mut values = reader.read(layer, &expected)?;
                let bias_values = if bias {
                    values.pop().unwrap_or_default()
                } else {
                    vec![0.0; out]
                };
                let kernel = values.pop().unwrap_or_default();
                params[w] = transpose_last(&kernel, out);
                params[w + 1] = bias_values;
            }
            Use::Fold {
                spec: s,
                epsilon,
                center,
                scale,
            } => {
                let w = param_of[&s];
                let channels = infos[w].shape[0];
                let mut expected = Vec::new();
                if scale {
                    expected.push(("gamma", vec![channels]));
                }
                if center {
                    expected.push(("beta", vec![channels]));
                }
                expected.push(("moving_mean", vec![channels]));
                expected.push(("moving_variance", vec![channels]));
                let mut values = reader.read(layer, &expected)?.into_iter();
                let gamma = if scale { values.next() } else { None };
                let beta = if center { values.next() } else { None };
                let (Some(mean), Some(var)) = (values.next(), values.next()) else {
                    unreachable!("read returns one tensor per expected weight")
                };
                let (weight, bias) = params.split_at_mut(w + 1);
                fold_batch_norm(
                    &mut weight[w],
                    &mut bias[0],
                    gamma.as_deref(),
                    beta.as_deref(),
                    &mean,
                    &var,
                    epsilon,
                )
                .map_err(|p| layer_error(path, layer, p))?;
            }
        }
    }
    reader.check_unused(model, &uses)?;
    Ok((spec, params))
}

/// `[..., out]` row-major (Keras HWIO or `[in, out]`) to `[out, ...]`.
fn transpose_last(values: &[f32], out: usize) -> Vec<f32> {
    if out == 0 {
        return Vec::new();
    }
    let rest = values.len() / out;
    let mut t = vec![0.0f32; values.len()];
    for r in 0..rest {
        for o in 0..out {
            t[o * rest + r] = values[r * out + o];
        }
    }
    t
}

/// Folds `y = gamma * (x - mean) / sqrt(var + eps) + beta` into the layer before it.
fn fold_batch_norm(
    weight: &mut [f32],
    bias: &mut [f32],
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    mean: &[f32],
    var: &[f32],
    epsilon: f64,
) -> std::result::Result<(), String> {
    let out = bias.len();
    if out == 0 || !weight.len().is_multiple_of(out) {
        return Err("has weights that do not match the layer before it".into());
    }
    let per = weight.len() / out;
    for o in 0..out {
        let v = f64::from(var[o]) + epsilon;
        if v.is_nan() || v <= 0.0 || v.is_infinite() {
            return Err(format!(
                "has moving_variance {} with epsilon {epsilon}: not a positive number",
                var[o]
            ));
        }
        let s = gamma.map_or(1.0, |g| f64::from(g[o])) / v.sqrt();
        for w in &mut weight[o * per..(o + 1) * per] {
            *w = (f64::from(*w) * s) as f32;
        }
        let b =
            (f64::from(bias[o]) - f64::from(mean[o])) * s + beta.map_or(0.0, |b| f64::from(b[o]));
        bias[o] = b as f32;
    }
    Ok(())
}

/// Reads layers' weights from either container, checking them against the config.
struct WeightReader<'a> {
    path: &'a Path,
    store: &'a Store,
    /// Legacy: the layers the file holds weights for (`layer_names` with weights).
    legacy_layers: Vec<String>,
}

impl<'a> WeightReader<'a> {
    fn new(path: &'a Path, store: &'a Store) -> Result<Self> {
        let mut legacy_layers = Vec::new();
        if let Store::Legacy { file, .. } = store {
            let group = file.group("model_weights").map_err(|e| {
                h5_error(
                    path,
                    "has no readable `model_weights` group (not a Keras model file?)",
                    &e,
                )
            })?;
            let attrs = group
                .attrs()
                .map_err(|e| h5_error(path, "`model_weights` attributes cannot be read", &e))?;
            let names = string_list(&attrs, "layer_names").ok_or_else(|| {
                Error::data(
                    path,
                    "its `model_weights` group has no `layer_names` string list",
                )
            })?;
            for name in names {
                let weights = file
                    .group(&format!("model_weights/{name}"))
                    .and_then(|g| g.attrs())
                    .map_err(|e| {
                        h5_error(path, &format!("`model_weights/{name}` cannot be read"), &e)
                    })?;
                let weight_names = string_list(&weights, "weight_names").ok_or_else(|| {
                    Error::data(
                        path,
                        format!("`model_weights/{name}` has no `weight_names` list"),
                    )
                })?;
                if !weight_names.is_empty() {
                    legacy_layers.push(name);
                }
            }
        }
        Ok(WeightReader {
            path,
            store,
            legacy_layers,
        })
    }

    /// The weights of `layer`, one tensor per `expected` `(name, Keras shape)`, checked.
    fn read(&self, layer: &Layer, expected: &[(&str, Vec<usize>)]) -> Result<Vec<Vec<f32>>> {
        let names: Vec<&str> = expected.iter().map(|(n, _)| *n).collect();
        let (file, len, datasets) = match self.store {
            Store::Keras3 { file, len } => {
                let group = format!("layers/{}/vars", layer.key);
                let g = file.group(&group).map_err(|e| {
                    layer_error(
                        self.path,
                        layer,
                        format!("has no weights in the file (`{group}` of model.weights.h5: {e})"),
                    )
                })?;
                // Keras records the layer's name on its group: a cross-check of the
                // class-and-position mapping.
                if let Ok(attrs) = g.attrs() {
                    if let Some(stored) = attrs.get("name").and_then(AttrValue::as_str) {
                        if stored != layer.name {
                            return Err(layer_error(
                                self.path,
                                layer,
                                format!(
                                    "should have its weights at `{group}`, but that group belongs to layer `{stored}`: the file does not match its config"
                                ),
                            ));
                        }
                    }
                }
                let count = g
                    .datasets()
                    .map_err(|e| {
                        layer_error(self.path, layer, format!("has unreadable weights: {e}"))
                    })?
                    .len();
                if count != expected.len() {
                    return Err(layer_error(
                        self.path,
                        layer,
                        format!(
                            "has {count} weights in the file; mlops expects {} ({})",
                            expected.len(),
                            names.join(", ")
                        ),
                    ));
                }
                let datasets: Vec<String> = (0..expected.len())
                    .map(|i| format!("{group}/{i}"))
                    .collect();
                (file, *len, datasets)
            }
            Store::Legacy { file, len } => {
                let group = format!("model_weights/{}", layer.name);
                if !self.legacy_layers.contains(&layer.name) {
                    return Err(layer_error(
                        self.path,
                        layer,
                        "has no weights in the file (not among `model_weights`' layer_names with weights)",
                    ));
                }
                let attrs = file.group(&group).and_then(|g| g.attrs()).map_err(|e| {
                    layer_error(self.path, layer, format!("has unreadable weights: {e}"))
                })?;
                let weight_names = string_list(&attrs, "weight_names").unwrap_or_default();
                if weight_names.len() != expected.len() {
                    return Err(layer_error(
                        self.path,
                        layer,
                        format!(
                            "has {} weights in the file ({}); mlops expects {} ({})",
                            weight_names.len(),
                            weight_names.join(", "),
                            expected.len(),
                            names.join(", ")
                        ),
                    ));
                }
                let datasets = weight_names
                    .iter()
                    .map(|w| format!("{group}/{w}"))
                    .collect();
                (file, *len, datasets)
            }
        };
        expected
            .iter()
            .zip(&datasets)
            .map(|((name, shape), dataset)| {
                read_tensor(self.path, layer, file, len, dataset, name, shape)
            })
            .collect()
    }

    /// Legacy files: every layer the file holds weights for must be one the model reads.
    fn check_unused(&self, model: &Model, uses: &[(usize, Use)]) -> Result<()> {
        let used: HashSet<&str> = uses
            .iter()
            .map(|&(k, _)| model.layers[k].name.as_str())
            .collect();
        match self.legacy_layers.iter().find(|n| !used.contains(n.as_str())) {
            Some(name) => Err(Error::data(
                self.path,
                format!(
                    "holds weights for a layer `{name}` that the model config does not use: the file does not match its config"
                ),
            )),
            None => Ok(()),
        }
    }
}

/// One float tensor, checked against the shape the config implies before it is read.
fn read_tensor(
    path: &Path,
    layer: &Layer,
    file: &hdf5_pure::File,
    file_len: u64,
    dataset: &str,
    name: &str,
    shape: &[usize],
) -> Result<Vec<f32>> {
    let bad = |problem: String| layer_error(path, layer, format!("{name} (`{dataset}`) {problem}"));
    let ds = file
        .dataset(dataset)
        .map_err(|e| bad(format!("cannot be read: {e}")))?;
    let stored = ds
        .shape()
        .map_err(|e| bad(format!("has no readable shape: {e}")))?;
    let wanted: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    if stored != wanted {
        return Err(bad(format!(
            "has shape {stored:?}; the config implies {wanted:?}"
        )));
    }
    let elem = match ds.datatype() {
        Ok(Datatype::FloatingPoint { size, .. }) if matches!(size, 2 | 4 | 8) => u64::from(size),
        Ok(other) => {
            return Err(bad(format!(
                "is stored as {other:?}; mlops reads float weights (quantized Keras layers are not supported)"
            )))
        }
        Err(e) => return Err(bad(format!("has no readable datatype: {e}"))),
    };
    let count: u64 = wanted.iter().product();
    let bytes = count.saturating_mul(elem);
    match ds.layout() {
        Ok(Layout::Contiguous {
            address: Some(address),
            size,
        }) => {
            if size != bytes || address.checked_add(size).is_none_or(|end| end > file_len) {
                return Err(bad(format!(
                    "claims {size} bytes at offset {address} of a {file_len}-byte file; {count} values need {bytes}"
                )));
            }
        }
        Ok(Layout::Contiguous { address: None, .. }) => {
            return Err(bad("was never written (no data in the file)".into()))
        }
        Ok(Layout::Compact { size }) => {
            if size != bytes {
                return Err(bad(format!(
                    "holds {size} bytes; {count} values need {bytes}"
                )));
            }
        }
        Ok(Layout::Chunked { .. }) => {
            if bytes > file_len.saturating_mul(MAX_EXPANSION) {
                return Err(bad(format!(
                    "claims {bytes} bytes of values in a {file_len}-byte file"
                )));
            }
        }
        Ok(other) => {
            return Err(bad(format!(
                "has an unsupported storage layout ({other:?})"
            )))
        }
        Err(e) => return Err(bad(format!("has no readable storage layout: {e}"))),
    }
    let values = ds
        .read_f32()
        .map_err(|e| bad(format!("cannot be read: {e}")))?;
    if values.len() as u64 != count {
        return Err(bad(format!("holds {} values, not {count}", values.len())));
    }
    Ok(values)
}

/// A string-list attribute (Keras splits long ones into `name0`, `name1`, ...). A
/// layer without weights stores `weight_names` as an empty float array: an empty list.
fn string_list(attrs: &HashMap<String, AttrValue>, name: &str) -> Option<Vec<String>> {
    let one = |v: &AttrValue| -> Option<Vec<String>> {
        if let Some(s) = v.as_strings() {
            return Some(s.to_vec());
        }
        let empty = match v {
            AttrValue::F64Array(a) => a.is_empty(),
            AttrValue::F32Array(a) => a.is_empty(),
            AttrValue::I64Array(a) => a.is_empty(),
            AttrValue::I32Array(a) => a.is_empty(),
            AttrValue::U8Array(a) => a.is_empty(),
            _ => false,
        };
        empty.then(Vec::new)
    };
    if let Some(v) = attrs.get(name) {
        return one(v);
    }
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(v) = attrs.get(&format!("{name}{i}")) {
        out.extend(one(v)?);
        i += 1;
    }
    (i > 0).then_some(out)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::artifact::Artifact;
    use crate::data::{Preprocess, SplitKind};
    use crate::runtime::{CpuEngine, Engine};

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/keras")
            .join(name)
    }

    fn read_fixture(name: &str) -> Result<Read> {
        let path = fixture(name);
        let bytes = std::fs::read(&path).unwrap();
        read(&path, &bytes, SourceFormat::detect(&bytes))
    }

    fn softmax(row: &[f32]) -> Vec<f32> {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exp: Vec<f32> = row.iter().map(|v| (v - max).exp()).collect();
        let sum: f32 = exp.iter().sum();
        exp.iter().map(|e| e / sum).collect()
    }

    fn argmax(row: &[f32]) -> usize {
        (0..row.len())
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .unwrap()
    }

    /// Our fp32 engine's probabilities on the first `n` MNIST test images (pixel / 255).
    fn probabilities(read: &Read, n: usize) -> Vec<Vec<f32>> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/mnist");
        let split = crate::data::load_split_limited(&root, SplitKind::Test, Some(n)).unwrap();
        let indices: Vec<usize> = (0..n).collect();
        let (mut x, mut labels) = (Vec::new(), Vec::new());
        split.gather(&indices, &Preprocess::UNIT, &mut x, &mut labels);
        let artifact = Artifact::from_params(&read.spec, &read.params).unwrap();
        let mut engine = CpuEngine::new(&artifact, 1).unwrap();
        let mut logits = Vec::new();
        engine.predict(&x, n, &mut logits).unwrap();
        logits.chunks(read.spec.classes).map(softmax).collect()
    }

    /// The max abs difference from `expected.json` on its 100 images; asserts top-1.
    fn compare_with_keras(read: &Read) -> f32 {
        let expected: Json =
            serde_json::from_slice(&std::fs::read(fixture("expected.json")).unwrap()).unwrap();
        let expected: Vec<Vec<f32>> = expected["probabilities"]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| {
                row.as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap() as f32)
                    .collect()
            })
            .collect();
        assert_eq!(expected.len(), 100);
        let ours = probabilities(read, expected.len());
        let mut max_diff = 0.0f32;
        for (i, (a, b)) in ours.iter().zip(&expected).enumerate() {
            assert_eq!(a.len(), 10);
            assert_eq!(
                argmax(a),
                argmax(b),
                "top-1 of image {i}: {a:?} vs Keras {b:?}"
            );
            for (x, y) in a.iter().zip(b) {
                max_diff = max_diff.max((x - y).abs());
            }
        }
        max_diff
    }

    fn reference_spec() -> ModelSpec {
        ModelSpec {
            name: "reference_cnn".into(),
            ..ModelSpec::reference_cnn()
        }
    }

    #[test]
    fn keras_archive_is_the_reference_cnn_with_keras_outputs() {
        let read = read_fixture("cnn.keras").unwrap();
        assert_eq!(read.spec, reference_spec());
        assert_eq!(read.producer, "keras 3.15.1");
        assert_eq!(read.metadata["keras_version"], "3.15.1");
        assert_eq!(read.source_layout, "nhwc");
        assert_eq!(read.opset, None);
        let infos = read.spec.params().unwrap();
        assert_eq!(read.params.len(), infos.len());
        for (p, info) in read.params.iter().zip(&infos) {
            assert_eq!(p.len(), info.len(), "{}", info.name);
        }
        assert_eq!(read.params.iter().map(Vec::len).sum::<usize>(), 93_322);
        let diff = compare_with_keras(&read);
        eprintln!("cnn.keras: max abs difference from Keras {diff:e}");
        assert!(diff <= 1e-4, "max abs difference {diff}");
    }

    #[test]
    fn legacy_h5_is_the_reference_cnn_with_keras_outputs() {
        let read = read_fixture("cnn.h5").unwrap();
        assert_eq!(read.spec, reference_spec());
        assert_eq!(read.producer, "keras 3.15.1");
        assert_eq!(read.metadata["keras_version"], "3.15.1");
        assert_eq!(read.metadata["backend"], "tensorflow");
        let diff = compare_with_keras(&read);
        eprintln!("cnn.h5: max abs difference from Keras {diff:e}");
        assert!(diff <= 1e-4, "max abs difference {diff}");
        // The same model as the archive, bit for bit.
        let archive = read_fixture("cnn.keras").unwrap();
        assert!(read.params == archive.params);
    }

    #[test]
    fn convert_makes_an_artifact_of_either_file() {
        for (name, format) in [
            ("cnn.keras", SourceFormat::Keras),
            ("cnn.h5", SourceFormat::KerasH5),
        ] {
            let (artifact, report, _) =
                super::super::convert(&fixture(name), &super::super::ConvertConfig::default())
                    .unwrap();
            assert_eq!(report.format, format);
            assert_eq!(report.producer, "keras 3.15.1");
            assert_eq!(report.source_layout, "nhwc");
            assert_eq!(report.parameters, 93_322);
            assert_eq!(report.classes, 10);
            assert_eq!(report.input_shape, [28, 28, 1]);
            assert_eq!(report.input_from, "default");
            assert_eq!(artifact.spec, reference_spec());
        }
    }

    #[test]
    fn deflated_archives_read_the_same() {
        use std::io::Write as _;

        let path = fixture("cnn.keras");
        let bytes = std::fs::read(&path).unwrap();
        let mut original = zip::ZipArchive::new(std::io::Cursor::new(&bytes[..])).unwrap();
        let mut writer = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        for i in 0..original.len() {
            let mut member = original.by_index(i).unwrap();
            let name = member.name().unwrap().to_string();
            let mut data = Vec::new();
            member.read_to_end(&mut data).unwrap();
            writer.start_file(name, options).unwrap();
            writer.write_all(&data).unwrap();
        }
        let deflated = writer.finish().unwrap().into_inner();
        assert!(deflated.len() < bytes.len());
        let read = read(&path, &deflated, SourceFormat::Keras).unwrap();
        assert!(read.params == read_fixture("cnn.keras").unwrap().params);
    }

    #[test]
    fn weights_are_transposed_into_our_layouts() {
        let read = read_fixture("cnn.h5").unwrap();
        let path = fixture("cnn.h5");
        let file = hdf5_pure::File::open(&path).unwrap();
        let kernel = file
            .dataset("model_weights/conv2d_1/reference_cnn/conv2d_1/kernel")
            .unwrap()
            .read_f32()
            .unwrap();
        // Keras [kh, kw, in, out] = [3, 3, 32, 64]; ours [out, kh, kw, in].
        let (o, y, x, i) = (5, 2, 1, 7);
        assert_eq!(
            read.params[2][((o * 3 + y) * 3 + x) * 32 + i],
            kernel[((y * 3 + x) * 32 + i) * 64 + o]
        );
        let dense = file
            .dataset("model_weights/dense/reference_cnn/dense/kernel")
            .unwrap()
            .read_f32()
            .unwrap();
        // Keras [576, 64]; ours [64, 576].
        assert_eq!(read.params[6][9 * 576 + 300], dense[300 * 64 + 9]);
    }

    fn error_of(name: &str) -> String {
        match read_fixture(name) {
            Ok(read) => panic!("{name} converted to {:?}", read.spec),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn unsupported_fixtures_name_the_layer_and_the_problem() {
        for ext in ["keras", "h5"] {
            let e = error_of(&format!("unsupported_batchnorm.{ext}"));
            eprintln!("{ext}: {e}");
            for part in [
                "Keras layer `batch_normalization` (BatchNormalization)",
                "`conv2d_3` (Conv2D), whose relu activation comes before it",
                "no activation",
            ] {
                assert!(e.contains(part), "{ext}: `{part}` not in: {e}");
            }
            let e = error_of(&format!("unsupported_channels_first.{ext}"));
            eprintln!("{ext}: {e}");
            for part in [
                "Keras layer `conv2d_4` (Conv2D)",
                "data_format `channels_first`",
                "channels_last",
            ] {
                assert!(e.contains(part), "{ext}: `{part}` not in: {e}");
            }
            let e = error_of(&format!("unsupported_two_inputs.{ext}"));
            for part in [
                "Keras layer `extra` (InputLayer)",
                "2 inputs (`image`, `extra`)",
                "one image input",
            ] {
                assert!(e.contains(part), "{ext}: `{part}` not in: {e}");
            }
            eprintln!("{ext}: {e}");
        }
    }

    /// Converts cnn.keras with its config changed by `edit`.
    fn with_config(edit: impl FnOnce(&mut Vec<Json>)) -> Result<(ModelSpec, Vec<Vec<f32>>)> {
        let path = fixture("cnn.keras");
        let bytes = std::fs::read(&path).unwrap();
        let mut source = open_keras(&path, &bytes).unwrap();
        edit(source.config["config"]["layers"].as_array_mut().unwrap());
        let model = parse_model(&path, &source.config)?;
        build(&path, &model, &source.store)
    }

    fn config_error(edit: impl FnOnce(&mut Vec<Json>)) -> String {
        match with_config(edit) {
            Ok((spec, _)) => panic!("converted to {spec:?}"),
            Err(e) => e.to_string(),
        }
    }

    /// A change to cnn.keras' layer list.
    type Edit = Box<dyn FnOnce(&mut Vec<Json>)>;

    #[test]
    fn configs_outside_what_we_convert_are_refused_by_layer() {
        // Layers: 0 input, 1 conv2d, 2 max_pooling2d, 3 conv2d_1, 4 max_pooling2d_1,
        // 5 conv2d_2, 6 flatten, 7 dense, 8 dense_1.
        let cases: Vec<(Edit, &[&str])> = vec![
            (
                Box::new(|l| l[1]["config"]["activation"] = "tanh".into()),
                &["Keras layer `conv2d` (Conv2D)", "activation `tanh`"],
            ),
            (
                Box::new(|l| l[2]["config"]["padding"] = "same".into()),
                &["`max_pooling2d` (MaxPooling2D)", "padding `same`"],
            ),
            (
                Box::new(|l| l[4]["config"]["pool_size"] = serde_json::json!([2, 3])),
                &["`max_pooling2d_1` (MaxPooling2D)", "square pool_size"],
            ),
            (
                Box::new(|l| l[3]["config"]["strides"] = serde_json::json!([1, 2])),
                &["`conv2d_1` (Conv2D)", "square strides"],
            ),
            (
                Box::new(|l| l[5]["config"]["dilation_rate"] = serde_json::json!([2, 2])),
                &["`conv2d_2` (Conv2D)", "dilation_rate"],
            ),
            (
                Box::new(|l| l[6]["config"]["data_format"] = "channels_first".into()),
                &["`flatten` (Flatten)", "channels_first"],
            ),
            (
                Box::new(|l| l[7]["config"]["activation"] = "softmax".into()),
                &["`dense` (Dense)", "softmax before the end"],
            ),
            (
                Box::new(|l| l[6]["class_name"] = "MyFlatten".into()),
                &["`flatten` (MyFlatten)", "custom or unsupported layer"],
            ),
            (
                // The config and the weights disagree on a shape.
                Box::new(|l| l[3]["config"]["filters"] = 32.into()),
                &["`conv2d_1` (Conv2D)", "kernel", "shape [3, 3, 32, 64]"],
            ),
            (
                // One conv fewer: conv2d_2's weights would be looked up at conv2d_1's group.
                Box::new(|l| {
                    l.remove(3);
                    l.remove(3);
                }),
                &["`conv2d_2` (Conv2D)", "belongs to layer `conv2d_1`"],
            ),
            (
                Box::new(|l| l[7]["config"]["units"] = 1_000_000_000.into()),
                &["`dense` (Dense)"],
            ),
        ];
        for (edit, parts) in cases {
            let e = config_error(edit);
            for part in parts {
                assert!(e.contains(part), "`{part}` not in: {e}");
            }
        }
    }

    #[test]
    fn layer_variants_convert() {
        // Activation('relu') and Activation('softmax') as layers, Dropout, use_bias false.
        let (spec, params) = with_config(|l| {
            l[7]["config"]["activation"] = "linear".into();
            l[8]["config"]["activation"] = "linear".into();
            let activation = |name: &str, f: &str| {
                serde_json::json!({"class_name": "Activation", "config": {"name": name, "activation": f}})
            };
            l.insert(9, activation("act_1", "softmax"));
            l.insert(8, serde_json::json!({"class_name": "Dropout", "config": {"name": "dropout", "rate": 0.5}}));
            l.insert(8, serde_json::json!({"class_name": "ReLU", "config": {"name": "re_lu"}}));
        })
        .unwrap();
        assert_eq!(
            spec.layers[6..],
            [
                LayerSpec::Dense {
                    units: 64,
                    activation: Activation::None
                },
                LayerSpec::Relu,
                LayerSpec::Dropout { rate: 0.5 },
                LayerSpec::Dense {
                    units: 10,
                    activation: Activation::Softmax
                },
            ]
        );
        assert_eq!(params.len(), 10);
    }

    #[test]
    fn snake_case_matches_keras() {
        for (class, key) in [
            ("Conv2D", "conv2d"),
            ("MaxPooling2D", "max_pooling2d"),
            ("AveragePooling2D", "average_pooling2d"),
            ("BatchNormalization", "batch_normalization"),
            ("InputLayer", "input_layer"),
            ("ReLU", "re_lu"),
            ("Dense", "dense"),
        ] {
            assert_eq!(snake_case(class), key);
        }
    }

    /// A plain Keras-semantics forward pass over Keras layouts, for the synthetic model.
    #[allow(clippy::too_many_arguments)]
    fn keras_forward(
        x: &[f32],
        kernel: &[f32],
        conv_bias: &[f32],
        bn1: [&[f32]; 4],
        dense: &[f32],
        dense_bias: &[f32],
        bn2: [&[f32]; 2],
        eps: f32,
    ) -> Vec<f32> {
        // x [5, 5, 2]; conv 3x3 same, 3 filters; BN; relu; max pool 2 -> [2, 2, 3].
        let mut conv = vec![0.0f32; 5 * 5 * 3];
        for y in 0..5 {
            for xx in 0..5 {
                for o in 0..3 {
                    let mut s = conv_bias[o];
                    for ky in 0..3 {
                        for kx in 0..3 {
                            let (iy, ix) = (y + ky, xx + kx);
                            if iy < 1 || ix < 1 || iy > 5 || ix > 5 {
                                continue;
                            }
                            for i in 0..2 {
                                s += x[((iy - 1) * 5 + ix - 1) * 2 + i]
                                    * kernel[((ky * 3 + kx) * 2 + i) * 3 + o];
                            }
                        }
                    }
                    let [g, b, m, v] = bn1;
                    let s = g[o] * (s - m[o]) / (v[o] + eps).sqrt() + b[o];
                    conv[(y * 5 + xx) * 3 + o] = s.max(0.0);
                }
            }
        }
        let mut pooled = [f32::NEG_INFINITY; 2 * 2 * 3];
        for y in 0..4 {
            for xx in 0..4 {
                for c in 0..3 {
                    let p = &mut pooled[((y / 2) * 2 + xx / 2) * 3 + c];
                    *p = p.max(conv[(y * 5 + xx) * 3 + c]);
                }
            }
        }
        let [m, v] = bn2;
        let logits: Vec<f32> = (0..4)
            .map(|o| {
                let s: f32 =
                    dense_bias[o] + (0..12).map(|i| pooled[i] * dense[i * 4 + o]).sum::<f32>();
                (s - m[o]) / (v[o] + eps).sqrt()
            })
            .collect();
        softmax(&logits)
    }

    /// A weight of the synthetic model: name, values, Keras shape.
    type Tensor<'a> = (&'a str, &'a [f32], Vec<u64>);

    #[test]
    fn batch_norm_after_a_linear_layer_is_folded() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut values = |n: usize, lo: f32, hi: f32| -> Vec<f32> {
            (0..n).map(|_| rng.random_range(lo..hi)).collect()
        };
        let kernel = values(3 * 3 * 2 * 3, -1.0, 1.0);
        let conv_bias = values(3, -0.5, 0.5);
        let bn1: Vec<Vec<f32>> = vec![
            values(3, 0.5, 2.0),
            values(3, -0.5, 0.5),
            values(3, -0.5, 0.5),
            values(3, 0.2, 3.0),
        ];
        let dense = values(12 * 4, -1.0, 1.0);
        let dense_bias = values(4, -0.5, 0.5);
        let bn2: Vec<Vec<f32>> = vec![values(4, -0.5, 0.5), values(4, 0.2, 3.0)];
        let x = values(5 * 5 * 2, 0.0, 1.0);
        let eps = 0.01f32;

        // A Keras 2 style legacy .h5: no InputLayer, `batch_input_shape` on the first layer.
        let config = serde_json::json!({
            "class_name": "Sequential",
            "config": {"name": "bn", "layers": [
                {"class_name": "Conv2D", "config": {"name": "conv", "batch_input_shape": [null, 5, 5, 2],
                    "filters": 3, "kernel_size": [3, 3], "strides": [1, 1], "padding": "same",
                    "data_format": "channels_last", "activation": "linear", "use_bias": true}},
                {"class_name": "BatchNormalization", "config": {"name": "bn_1", "axis": [3], "epsilon": eps}},
                {"class_name": "Activation", "config": {"name": "act", "activation": "relu"}},
                {"class_name": "MaxPooling2D", "config": {"name": "pool", "pool_size": [2, 2], "padding": "valid"}},
                {"class_name": "Flatten", "config": {"name": "flat"}},
                {"class_name": "Dense", "config": {"name": "fc", "units": 4, "activation": "linear"}},
                {"class_name": "BatchNormalization", "config": {"name": "bn_2", "axis": -1, "epsilon": eps,
                    "center": false, "scale": false}},
                {"class_name": "Softmax", "config": {"name": "prob"}}
            ]}
        });
        let mut builder = hdf5_pure::FileBuilder::new();
        builder.set_attr(
            "model_config",
            AttrValue::VarLenAsciiString(config.to_string()),
        );
        builder.set_attr(
            "keras_version",
            AttrValue::VarLenAsciiString("2.15.0".into()),
        );
        let mut weights = builder.create_group("model_weights");
        let layers: Vec<(&str, Vec<Tensor>)> = vec![
            (
                "conv",
                vec![
                    ("kernel:0", &kernel, vec![3, 3, 2, 3]),
                    ("bias:0", &conv_bias, vec![3]),
                ],
            ),
            (
                "bn_1",
                vec![
                    ("gamma:0", &bn1[0], vec![3]),
                    ("beta:0", &bn1[1], vec![3]),
                    ("moving_mean:0", &bn1[2], vec![3]),
                    ("moving_variance:0", &bn1[3], vec![3]),
                ],
            ),
            ("act", vec![]),
            ("pool", vec![]),
            ("flat", vec![]),
            (
                "fc",
                vec![
                    ("kernel:0", &dense, vec![12, 4]),
                    ("bias:0", &dense_bias, vec![4]),
                ],
            ),
            (
                "bn_2",
                vec![
                    ("moving_mean:0", &bn2[0], vec![4]),
                    ("moving_variance:0", &bn2[1], vec![4]),
                ],
            ),
            ("prob", vec![]),
        ];
        weights.set_attr(
            "layer_names",
            AttrValue::VarLenAsciiStringArray(layers.iter().map(|(n, _)| n.to_string()).collect()),
        );
        for (name, tensors) in &layers {
            let mut group = weights.create_group(name);
            group.set_attr(
                "weight_names",
                if tensors.is_empty() {
                    AttrValue::F64Array(Vec::new())
                } else {
                    AttrValue::VarLenAsciiStringArray(
                        tensors.iter().map(|(n, _, _)| n.to_string()).collect(),
                    )
                },
            );
            for (tensor, data, shape) in tensors {
                group
                    .create_dataset(tensor)
                    .with_f32_data(data)
                    .with_shape(shape);
            }
            weights.add_group(group.finish());
        }
        builder.add_group(weights.finish());
        let bytes = builder.finish().unwrap();

        let path = Path::new("bn.h5");
        let read = read(path, &bytes, SourceFormat::detect(&bytes)).unwrap();
        assert_eq!(read.producer, "keras 2.15.0");
        assert_eq!(read.spec.input, [5, 5, 2]);
        assert_eq!(
            read.spec.layers,
            [
                LayerSpec::Conv2d {
                    filters: 3,
                    kernel: 3,
                    stride: 1,
                    padding: Padding::Same,
                    activation: Activation::None
                },
                LayerSpec::Relu,
                LayerSpec::MaxPool2d {
                    size: 2,
                    stride: None
                },
                LayerSpec::Flatten,
                LayerSpec::Dense {
                    units: 4,
                    activation: Activation::Softmax
                },
            ]
        );
        let want = keras_forward(
            &x,
            &kernel,
            &conv_bias,
            [&bn1[0], &bn1[1], &bn1[2], &bn1[3]],
            &dense,
            &dense_bias,
            [&bn2[0], &bn2[1]],
            eps,
        );
        let artifact = Artifact::from_params(&read.spec, &read.params).unwrap();
        let mut engine = CpuEngine::new(&artifact, 1).unwrap();
        let mut logits = Vec::new();
        engine.predict(&x, 1, &mut logits).unwrap();
        let got = softmax(&logits);
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{got:?} vs {want:?}");
        }
    }

    /// Deterministic corruptions of a file: bit flips, random and 0xff bytes (large sizes
    /// and offsets), truncations; positions biased to `hot` ranges (metadata).
    fn mutants(original: &[u8], hot: &[(usize, usize)], count: usize, seed: u64) -> Vec<Vec<u8>> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..count)
            .map(|_| {
                let mut b = original.to_vec();
                let kind = rng.random_range(0..8u32);
                if kind == 7 {
                    b.truncate(rng.random_range(0..original.len()));
                    return b;
                }
                let hits = rng.random_range(1..=4usize);
                for _ in 0..hits {
                    let pos = if rng.random_bool(0.75) {
                        let (start, end) = hot[rng.random_range(0..hot.len())];
                        rng.random_range(start..end.min(b.len()))
                    } else {
                        rng.random_range(0..b.len())
                    };
                    match kind {
                        0..=2 => b[pos] ^= 1 << rng.random_range(0..8),
                        3 | 4 => b[pos] = rng.random(),
                        5 => {
                            let end = (pos + 8).min(b.len());
                            b[pos..end].fill(0xff);
                        }
                        _ => b[pos] = b[pos].wrapping_add(1),
                    }
                }
                b
            })
            .collect()
    }

    /// Runs `read` on every mutant; returns (ok, err) counts and panics on a panic.
    fn survive(name: &str, format: SourceFormat, mutants: Vec<Vec<u8>>) -> (usize, usize) {
        let path = fixture(name);
        let (mut ok, mut err) = (0, 0);
        for (i, bytes) in mutants.into_iter().enumerate() {
            let outcome = std::panic::catch_unwind(|| read(&path, &bytes, format).is_ok());
            match outcome {
                Ok(true) => ok += 1,
                Ok(false) => err += 1,
                Err(_) => panic!("{name}: mutant {i} made the reader panic"),
            }
        }
        (ok, err)
    }

    #[test]
    fn corrupted_files_never_panic() {
        let started = std::time::Instant::now();
        let h5 = std::fs::read(fixture("cnn.h5")).unwrap();
        // Metadata lives around the B-tree, heap, symbol-node and global-heap signatures.
        let mut hot: Vec<(usize, usize)> = (0..h5.len() - 4)
            .filter(|&i| [&b"TREE"[..], b"HEAP", b"SNOD", b"GCOL"].contains(&&h5[i..i + 4]))
            .map(|i| (i.saturating_sub(64), i + 1024))
            .collect();
        hot.push((0, 4096));
        let (ok, err) = survive("cnn.h5", SourceFormat::KerasH5, mutants(&h5, &hot, 2500, 1));
        eprintln!("cnn.h5 mutants: {ok} read, {err} refused");
        assert!(ok > 0 && err > 0, "{ok} read, {err} refused");

        let archive = std::fs::read(fixture("cnn.keras")).unwrap();
        let len = archive.len();
        // Local headers and the JSON members at the start, the central directory at the end.
        let hot = [(0, 8192), (len - 512, len)];
        let (ok, err) = survive(
            "cnn.keras",
            SourceFormat::Keras,
            mutants(&archive, &hot, 1000, 2),
        );
        eprintln!("cnn.keras mutants: {ok} read, {err} refused");
        assert!(err > 0);

        // Most archive mutants fail the zip's CRC: corrupt the weights file inside it
        // directly, through the `.keras` (Keras 3) weight layout.
        let path = fixture("cnn.keras");
        let source = open_keras(&path, &archive).unwrap();
        let Store::Keras3 { file, .. } = &source.store else {
            unreachable!()
        };
        let weights = file.as_bytes().to_vec();
        let mut hot: Vec<(usize, usize)> = (0..weights.len() - 4)
            .filter(|&i| [&b"TREE"[..], b"HEAP", b"SNOD", b"GCOL"].contains(&&weights[i..i + 4]))
            .map(|i| (i.saturating_sub(64), i + 1024))
            .collect();
        hot.push((0, 4096));
        let (mut ok, mut err) = (0, 0);
        for (i, bytes) in mutants(&weights, &hot, 1000, 3).into_iter().enumerate() {
            let outcome = std::panic::catch_unwind(|| {
                let len = bytes.len() as u64;
                let file = hdf5_pure::File::from_bytes(bytes).ok()?;
                let model = parse_model(&path, &source.config).ok()?;
                build(&path, &model, &Store::Keras3 { file, len }).ok()
            });
            match outcome {
                Ok(Some(_)) => ok += 1,
                Ok(None) => err += 1,
                Err(_) => panic!("model.weights.h5: mutant {i} made the reader panic"),
            }
        }
        eprintln!("model.weights.h5 mutants: {ok} read, {err} refused");
        assert!(ok > 0 && err > 0, "{ok} read, {err} refused");
        eprintln!("4500 mutants in {:?}", started.elapsed());
    }
}
