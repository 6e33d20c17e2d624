//! ONNX -> our model spec and fp32 parameters, for the layer subset our spec supports.
//!
//! The graph must be one chain from one 4-D float input to one output, made of Conv,
//! Relu, MaxPool, AveragePool, Flatten (or a constant Reshape to `[batch, -1]`), Gemm
//! (or MatMul + Add), Softmax (last), and Dropout / Identity (dropped). NCHW graphs (what
//! PyTorch and tf2onnx write) map to our NHWC layout: conv weights OIHW become
//! `[out, kh, kw, in]`, and the first dense layer after a flatten gets its columns
//! reordered from `c, h, w` to our `h, w, c` order. A leading `Transpose` with perm
//! `[0, 3, 1, 2]` (what `mlops export --format onnx` writes) marks an NHWC input.
//! Anything else is an error naming the node, its op and what is supported.

use std::collections::HashMap;
use std::path::Path;

use prost::Message as _;

use super::proto::{data_type, AttributeProto, ModelProto, NodeProto, TensorProto};
use crate::model::{Activation, LayerSpec, ModelSpec, Padding, Shape};
use crate::{Error, Result};

/// The ops [`from_onnx`] understands, for error messages.
pub const SUPPORTED_OPS: &str = "Conv, Relu, MaxPool, AveragePool, Flatten, Reshape (to [batch, -1]), Gemm, MatMul + Add, Softmax (last), Dropout, Identity";

/// Largest tensor (values) read from an ONNX file: 2^28, as our spec's parameter limit.
const MAX_VALUES: usize = 1 << 28;

/// A model read from ONNX.
#[derive(Debug, Clone)]
pub struct Imported {
    /// The model as our spec.
    pub spec: ModelSpec,
    /// fp32 parameters in spec order (weight, bias per layer), in our layouts.
    pub params: Vec<Vec<f32>>,
    /// `metadata_props` of the file (`mlops.input`, `mlops.labels` when we wrote it).
    pub metadata: HashMap<String, String>,
    /// `producer_name producer_version`.
    pub producer: String,
    /// Opset of the default domain.
    pub opset: i64,
    /// Nodes in the graph.
    pub nodes: usize,
    /// Whether the graph's input was NCHW (`false`: NHWC with a leading transpose).
    pub nchw_input: bool,
}

fn err(path: &Path, problem: impl Into<String>) -> Error {
    Error::data(path, problem)
}

fn node_name(node: &NodeProto) -> String {
    if node.name.is_empty() {
        format!(
            "`{}` node writing `{}`",
            node.op_type,
            node.output.join(", ")
        )
    } else {
        format!("node `{}` ({})", node.name, node.op_type)
    }
}

fn attr<'a>(node: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

fn attr_i(node: &NodeProto, name: &str, default: i64) -> i64 {
    attr(node, name).map_or(default, |a| a.i)
}

fn attr_ints(node: &NodeProto, name: &str) -> Option<Vec<i64>> {
    attr(node, name).map(|a| a.ints.clone())
}

/// A tensor's values as f32 (FLOAT) or i64 (INT64), checked against its dims.
enum Values {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

struct Constant {
    dims: Vec<usize>,
    values: Values,
}

fn read_tensor(path: &Path, t: &TensorProto) -> Result<Constant> {
    let what = || format!("tensor `{}`", t.name);
    if t.data_location == 1 || !t.external_data.is_empty() {
        return Err(err(
            path,
            format!(
                "{} keeps its data in an external file; save the model with its weights inside (onnx.save_model(..., save_as_external_data=False))",
                what()
            ),
        ));
    }
    let mut dims = Vec::with_capacity(t.dims.len());
    let mut count = 1usize;
    for &d in &t.dims {
        let d = usize::try_from(d)
            .map_err(|_| err(path, format!("{} has a negative dimension {d}", what())))?;
        count = count
            .checked_mul(d)
            .filter(|&c| c <= MAX_VALUES)
            .ok_or_else(|| {
                err(
                    path,
                    format!("{} is larger than {MAX_VALUES} values", what()),
                )
            })?;
        dims.push(d);
    }
    let values = match t.data_type {
        data_type::FLOAT => {
            let v: Vec<f32> = if !t.raw_data.is_empty() {
                if t.raw_data.len() != count * 4 {
                    return Err(err(
                        path,
                        format!("{} holds {} bytes for {count} f32 values", what(), t.raw_data.len()),
                    ));
                }
                t.raw_data
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect()
            } else {
                t.float_data.clone()
            };
            if v.len() != count {
                return Err(err(
                    path,
                    format!("{} holds {} values for dims {dims:?}", what(), v.len()),
                ));
            }
            Values::F32(v)
        }
        data_type::INT64 => {
            let v: Vec<i64> = if !t.raw_data.is_empty() {
                if t.raw_data.len() != count * 8 {
                    return Err(err(
                        path,
                        format!("{} holds {} bytes for {count} i64 values", what(), t.raw_data.len()),
                    ));
                }
                t.raw_data
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
                    .collect()
            } else {
                t.int64_data.clone()
            };
            if v.len() != count {
                return Err(err(
                    path,
                    format!("{} holds {} values for dims {dims:?}", what(), v.len()),
                ));
            }
            Values::I64(v)
        }
        other => {
            return Err(err(
                path,
                format!(
                    "{} has element type {other}; only float32 weights are supported (an int8 QDQ model: convert its fp32 original and quantize with `mlops quantize`)",
                    what()
                ),
            ))
        }
    };
    Ok(Constant { dims, values })
}

/// Our conv weight layout `[out, kh, kw, in]` from ONNX's `[out, in, kh, kw]`.
fn oihw_to_ohwi(w: &[f32], out: usize, inp: usize, k: usize) -> Vec<f32> {
    let mut o = vec![0.0; w.len()];
    for f in 0..out {
        for c in 0..inp {
            for y in 0..k {
                for x in 0..k {
                    o[((f * k + y) * k + x) * inp + c] = w[((f * inp + c) * k + y) * k + x];
                }
            }
        }
    }
    o
}

/// Dense weight `[out, c*h*w]` with columns in ONNX's `c, h, w` order, reordered to our
/// `h, w, c` flatten order.
pub(crate) fn chw_columns_to_hwc(w: &[f32], out: usize, hwc: [usize; 3]) -> Vec<f32> {
    let [h, wd, c] = hwc;
    let n = h * wd * c;
    let mut o = vec![0.0; w.len()];
    for f in 0..out {
        for ch in 0..c {
            for y in 0..h {
                for x in 0..wd {
                    o[f * n + (y * wd + x) * c + ch] = w[f * n + (ch * h + y) * wd + x];
                }
            }
        }
    }
    o
}

/// Reads an ONNX model (`bytes` of the file at `path`) into our spec and parameters.
///
/// # Errors
/// [`Error::Data`] naming `path` and the node: not a protobuf ModelProto, no graph, more
/// than one input or output, a dynamic spatial size, an op outside [`SUPPORTED_OPS`],
/// attributes our layers cannot express (groups, dilations, asymmetric or non-`same`
/// padding, non-square kernels, `ceil_mode`), a branching graph, weights that are not
/// float32 initializers or that are larger than 2^28 values; [`Error::Spec`] when the
/// result fails our spec's checks.
pub fn from_onnx(path: &Path, bytes: &[u8]) -> Result<Imported> {
    let model = ModelProto::decode(bytes).map_err(|e| {
        err(
            path,
            format!("not an ONNX model (its protobuf does not decode: {e})"),
        )
    })?;
    let graph = model
        .graph
        .as_ref()
        .ok_or_else(|| err(path, "the ONNX model has no graph"))?;
    let opset = model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map_or(0, |o| o.version);
    let mut constants: HashMap<&str, &TensorProto> = graph
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    for node in &graph.node {
        if node.op_type == "Constant" {
            if let (Some(out), Some(t)) = (
                node.output.first(),
                attr(node, "value").and_then(|a| a.t.as_ref()),
            ) {
                constants.insert(out.as_str(), t);
            }
        }
    }
    let inputs: Vec<_> = graph
        .input
        .iter()
        .filter(|i| !constants.contains_key(i.name.as_str()))
        .collect();
    if inputs.len() != 1 {
        return Err(err(
            path,
            format!(
                "the graph has {} inputs ({}); mlops models take one image tensor",
                inputs.len(),
                inputs
                    .iter()
                    .map(|i| format!("`{}`", i.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    if graph.output.len() != 1 {
        return Err(err(
            path,
            format!(
                "the graph has {} outputs; mlops models have one",
                graph.output.len()
            ),
        ));
    }
    let input = inputs[0];
    let output = graph.output[0].name.clone();
    let tensor_type = input
        .r#type
        .as_ref()
        .and_then(|t| t.tensor_type.as_ref())
        .ok_or_else(|| err(path, format!("input `{}` is not a tensor", input.name)))?;
    if tensor_type.elem_type != data_type::FLOAT {
        return Err(err(
            path,
            format!(
                "input `{}` has element type {}; mlops models take float32 images",
                input.name, tensor_type.elem_type
            ),
        ));
    }
    let dims: Vec<Option<i64>> = tensor_type
        .shape
        .as_ref()
        .map(|s| {
            s.dim
                .iter()
                .map(|d| d.dim_value.filter(|&v| v > 0))
                .collect()
        })
        .unwrap_or_default();
    if dims.len() != 4 {
        return Err(err(
            path,
            format!(
                "input `{}` has {} dimensions; mlops models take 4-D images ([batch, channels, height, width] or [batch, height, width, channels])",
                input.name,
                dims.len()
            ),
        ));
    }
    let fixed = |i: usize| -> Result<usize> {
        dims[i]
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| {
                err(
                    path,
                    format!(
                        "input `{}` has a dynamic dimension {i}; only the batch may be dynamic",
                        input.name
                    ),
                )
            })
    };

    // Consumers of each value, to walk the chain and refuse branches.
    let mut consumers: HashMap<&str, Vec<&NodeProto>> = HashMap::new();
    for node in graph.node.iter().filter(|n| n.op_type != "Constant") {
        for i in &node.input {
            if !i.is_empty() && !constants.contains_key(i.as_str()) {
                consumers.entry(i.as_str()).or_default().push(node);
            }
        }
    }
    let next = |value: &str| -> Result<Option<&NodeProto>> {
        match consumers.get(value).map(Vec::as_slice) {
            None | Some([]) => Ok(None),
            Some([one]) => Ok(Some(*one)),
            Some(many) => Err(err(
                path,
                format!(
                    "value `{value}` feeds {} nodes ({}); mlops models are one chain of layers",
                    many.len(),
                    many.iter()
                        .map(|n| node_name(n))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        }
    };
    let constant = |node: &NodeProto, index: usize| -> Result<Constant> {
        let name = node
            .input
            .get(index)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| err(path, format!("{} has no input {index}", node_name(node))))?;
        let t = constants.get(name.as_str()).ok_or_else(|| {
            err(
                path,
                format!(
                    "{}: input `{name}` is computed, not a constant; mlops needs constant weights",
                    node_name(node)
                ),
            )
        })?;
        read_tensor(path, t)
    };
    let f32s = |node: &NodeProto, index: usize| -> Result<(Vec<usize>, Vec<f32>)> {
        let c = constant(node, index)?;
        match c.values {
            Values::F32(v) => Ok((c.dims, v)),
            Values::I64(_) => Err(err(
                path,
                format!(
                    "{}: input {index} is int64, expected float32",
                    node_name(node)
                ),
            )),
        }
    };

    // The input layout: NHWC when the first node transposes it to NCHW.
    let mut cur = input.name.clone();
    let mut nchw_input = true;
    if let Some(first) = next(&cur)? {
        if first.op_type == "Transpose"
            && attr_ints(first, "perm").as_deref() == Some(&[0, 3, 1, 2])
        {
            nchw_input = false;
            cur = first.output.first().cloned().unwrap_or_default();
        }
    }
    let input_hwc = if nchw_input {
        [fixed(2)?, fixed(3)?, fixed(1)?]
    } else {
        [fixed(1)?, fixed(2)?, fixed(3)?]
    };

    let mut layers: Vec<LayerSpec> = Vec::new();
    let mut params: Vec<Vec<f32>> = Vec::new();
    let mut shape = Shape::Spatial(input_hwc);
    // The spatial shape a flatten flattened, until the dense layer that reads it.
    let mut flattened: Option<[usize; 3]> = None;
    let unsupported = |node: &NodeProto, why: &str| {
        err(
            path,
            format!("{} {why}; mlops converts {SUPPORTED_OPS}", node_name(node)),
        )
    };
    let mut visited = 0usize;
    while cur != output {
        visited += 1;
        if visited > graph.node.len() + 1 {
            return Err(err(path, "the graph has a cycle"));
        }
        let node = next(&cur)?.ok_or_else(|| {
            err(
                path,
                format!(
                    "value `{cur}` is not read by any node and is not the graph output `{output}`"
                ),
            )
        })?;
        if !node.domain.is_empty() && node.domain != "ai.onnx" {
            return Err(unsupported(
                node,
                &format!("is in domain `{}`", node.domain),
            ));
        }
        let square = |name: &str, default: i64| -> Result<usize> {
            let v = attr_ints(node, name).unwrap_or_else(|| vec![default, default]);
            match v.as_slice() {
                [a, b] if a == b && *a > 0 => Ok(*a as usize),
                _ => Err(unsupported(
                    node,
                    &format!("has `{name}` {v:?}; only square values"),
                )),
            }
        };
        let spatial = |shape: Shape| -> Result<[usize; 3]> {
            match shape {
                Shape::Spatial(s) => Ok(s),
                Shape::Flat(_) => Err(unsupported(node, "reads a flat tensor")),
            }
        };
        match node.op_type.as_str() {
            "Conv" => {
                let [h, w, c] = spatial(shape)?;
                let (wdims, weight) = f32s(node, 1)?;
                let [out, inp, kh, kw] = wdims[..] else {
                    return Err(unsupported(node, &format!("has a weight of dims {wdims:?}")));
                };
                if kh != kw {
                    return Err(unsupported(node, &format!("has a {kh}x{kw} kernel; only square kernels")));
                }
                if attr_i(node, "group", 1) != 1 || inp != c {
                    return Err(unsupported(node, "is a grouped/depthwise convolution"));
                }
                if square("dilations", 1)? != 1 {
                    return Err(unsupported(node, "has dilations"));
                }
                let stride = square("strides", 1)?;
                let bias = if node.input.len() > 2 && !node.input[2].is_empty() {
                    f32s(node, 2)?.1
                } else {
                    vec![0.0; out]
                };
                if bias.len() != out {
                    return Err(unsupported(node, &format!("has {} biases for {out} filters", bias.len())));
                }
                let auto_pad = attr(node, "auto_pad").map(|a| String::from_utf8_lossy(&a.s).to_string());
                let pads = attr_ints(node, "pads").unwrap_or_else(|| vec![0; 4]);
                let (top, bottom) = Padding::Same.amounts(h, kh, stride);
                let (left, right) = Padding::Same.amounts(w, kh, stride);
                let same_pads = [top, left, bottom, right].map(|p| p as i64);
                let padding = match auto_pad.as_deref() {
                    Some("SAME_UPPER") => Padding::Same,
                    Some("VALID") => Padding::Valid,
                    None | Some("NOTSET") | Some("") if pads.iter().all(|&p| p == 0) => Padding::Valid,
                    None | Some("NOTSET") | Some("") if pads == same_pads => Padding::Same,
                    _ => {
                        return Err(unsupported(
                            node,
                            &format!(
                                "has padding {pads:?} (auto_pad {auto_pad:?}); mlops supports none (`valid`) or TF `same` ({same_pads:?} here)"
                            ),
                        ))
                    }
                };
                if padding == Padding::Valid && (h < kh || w < kh) {
                    return Err(unsupported(node, "has a kernel larger than its input"));
                }
                shape = Shape::Spatial(match padding {
                    Padding::Valid => [(h - kh) / stride + 1, (w - kh) / stride + 1, out],
                    Padding::Same => [h.div_ceil(stride), w.div_ceil(stride), out],
                });
                params.push(oihw_to_ohwi(&weight, out, inp, kh));
                params.push(bias);
                layers.push(LayerSpec::Conv2d {
                    filters: out,
                    kernel: kh,
                    stride,
                    padding,
                    activation: Activation::None,
                });
            }
            "MaxPool" | "AveragePool" => {
                let [h, w, c] = spatial(shape)?;
                let size = square("kernel_shape", 0)?;
                let stride = square("strides", 1)?;
                if attr_ints(node, "pads").is_some_and(|p| p.iter().any(|&v| v != 0))
                    || attr(node, "auto_pad").is_some_and(|a| !a.s.is_empty() && a.s != b"NOTSET" && a.s != b"VALID")
                {
                    return Err(unsupported(node, "pads its input; mlops pools without padding"));
                }
                if attr_i(node, "ceil_mode", 0) != 0 {
                    return Err(unsupported(node, "has ceil_mode 1; mlops pools with floor"));
                }
                if attr_ints(node, "dilations").is_some_and(|d| d.iter().any(|&v| v != 1)) {
                    return Err(unsupported(node, "has dilations"));
                }
                if node.output.len() > 1 {
                    return Err(unsupported(node, "also returns indices"));
                }
                if h < size || w < size {
                    return Err(unsupported(node, "has a window larger than its input"));
                }
                shape = Shape::Spatial([(h - size) / stride + 1, (w - size) / stride + 1, c]);
                let stride = (stride != size).then_some(stride);
                layers.push(if node.op_type == "MaxPool" {
                    LayerSpec::MaxPool2d { size, stride }
                } else {
                    LayerSpec::AvgPool2d { size, stride }
                });
            }
            "Flatten" | "Reshape" => {
                if node.op_type == "Flatten" && attr_i(node, "axis", 1) != 1 {
                    return Err(unsupported(node, "flattens from an axis other than 1"));
                }
                if node.op_type == "Reshape" {
                    let c = constant(node, 1)?;
                    let Values::I64(target) = c.values else {
                        return Err(unsupported(node, "has a non-int64 shape"));
                    };
                    let n = shape.checked_len().unwrap_or(0) as i64;
                    let ok = matches!(target.as_slice(), [b, rest] if (*b == -1 || *b == 0 || dims[0] == Some(*b)) && (*rest == -1 || *rest == n));
                    if !ok {
                        return Err(unsupported(node, &format!("reshapes to {target:?}; only to [batch, -1]")));
                    }
                }
                if let Shape::Spatial(s) = shape {
                    flattened = Some(s);
                    shape = Shape::Flat(s.iter().product());
                    layers.push(LayerSpec::Flatten);
                }
            }
            "Gemm" | "MatMul" => {
                let Shape::Flat(n) = shape else {
                    return Err(unsupported(node, "reads a 4-D tensor; flatten first"));
                };
                let (wdims, weight) = f32s(node, 1)?;
                let trans_b = node.op_type == "Gemm" && attr_i(node, "transB", 0) == 1;
                if node.op_type == "Gemm"
                    && (attr_i(node, "transA", 0) != 0
                        || attr(node, "alpha").is_some_and(|a| a.f != 1.0)
                        || attr(node, "beta").is_some_and(|a| a.f != 1.0))
                {
                    return Err(unsupported(node, "has transA or alpha/beta other than 1"));
                }
                let (out, inp) = match (&wdims[..], trans_b) {
                    ([o, i], true) => (*o, *i),
                    ([i, o], false) => (*o, *i),
                    _ => return Err(unsupported(node, &format!("has a weight of dims {wdims:?}"))),
                };
                if inp != n {
                    return Err(unsupported(node, &format!("takes {inp} features but gets {n}")));
                }
                let mut w = if trans_b {
                    weight
                } else {
                    let mut t = vec![0.0; weight.len()];
                    for i in 0..inp {
                        for o in 0..out {
                            t[o * inp + i] = weight[i * out + o];
                        }
                    }
                    t
                };
                // Inside the graph spatial tensors are NCHW (a leading transpose made an NHWC
                // input so), so a flatten gave `c, h, w` order.
                if let Some(hwc) = flattened.take() {
                    if hwc[2] > 1 {
                        w = chw_columns_to_hwc(&w, out, hwc);
                    }
                }
                let mut bias = vec![0.0; out];
                if node.op_type == "Gemm" && node.input.len() > 2 && !node.input[2].is_empty() {
                    let (bdims, b) = f32s(node, 2)?;
                    if b.len() != out || bdims.len() > 2 {
                        return Err(unsupported(node, &format!("has a bias of dims {bdims:?} for {out} outputs")));
                    }
                    bias = b;
                }
                let mut last = node.output.first().cloned().unwrap_or_default();
                if node.op_type == "MatMul" {
                    // MatMul + Add(bias) is how some exporters write a dense layer.
                    if let Some(add) = next(&last)?.filter(|n| n.op_type == "Add") {
                        let other = add.input.iter().position(|i| *i != last).unwrap_or(1);
                        let (_, b) = f32s(add, other)?;
                        if b.len() != out {
                            return Err(unsupported(add, &format!("adds {} values to {out} outputs", b.len())));
                        }
                        bias = b;
                        last = add.output.first().cloned().unwrap_or_default();
                    }
                }
                params.push(w);
                params.push(bias);
                layers.push(LayerSpec::Dense {
                    units: out,
                    activation: Activation::None,
                });
                shape = Shape::Flat(out);
                cur = last;
                continue;
            }
            "Relu" => {
                match layers.last_mut() {
                    Some(
                        LayerSpec::Conv2d { activation, .. } | LayerSpec::Dense { activation, .. },
                    ) if *activation == Activation::None => *activation = Activation::Relu,
                    _ => layers.push(LayerSpec::Relu),
                }
            }
            "Softmax" => {
                let out = node.output.first().map(String::as_str);
                let axis = attr_i(node, "axis", if opset >= 13 { -1 } else { 1 });
                match layers.last_mut() {
                    Some(LayerSpec::Dense { activation, .. })
                        if *activation == Activation::None
                            && out == Some(output.as_str())
                            && (axis == -1 || axis == 1) =>
                    {
                        *activation = Activation::Softmax
                    }
                    _ => {
                        return Err(unsupported(
                            node,
                            "is not the last node after a dense layer; mlops applies softmax only to the output",
                        ))
                    }
                }
            }
            "Dropout" | "Identity" => {}
            "QuantizeLinear" | "DequantizeLinear" | "QLinearConv" | "QGemm" | "MatMulInteger"
            | "ConvInteger" | "DynamicQuantizeLinear" => {
                return Err(unsupported(
                    node,
                    "is quantized; convert the fp32 model and run `mlops quantize --int8` on the result",
                ))
            }
            "BatchNormalization" => {
                return Err(unsupported(
                    node,
                    "is not supported; export the model in inference mode with batch norm folded into the conv (torch.onnx.export(..., training=TrainingMode.EVAL, do_constant_folding=True))",
                ))
            }
            _ => return Err(unsupported(node, "is not supported")),
        }
        cur = node.output.first().cloned().unwrap_or_default();
    }
    let classes = match shape {
        Shape::Flat(n) => n,
        Shape::Spatial(_) => {
            return Err(err(
                path,
                "the graph ends in a 4-D tensor; mlops classifiers end in a dense layer",
            ))
        }
    };
    let spec = ModelSpec {
        name: graph.name.clone(),
        input: input_hwc,
        classes,
        layers,
    };
    spec.shapes()?;
    Ok(Imported {
        spec,
        params,
        metadata: model
            .metadata_props
            .iter()
            .map(|p| (p.key.clone(), p.value.clone()))
            .collect(),
        producer: format!("{} {}", model.producer_name, model.producer_version)
            .trim()
            .to_string(),
        opset,
        nodes: graph.node.len(),
        nchw_input,
    })
}
