//! Artifact -> ONNX: fp32 graphs, and int8 artifacts as QDQ graphs (QuantizeLinear /
//! DequantizeLinear around float operators, the form ONNX Runtime fuses into
//! QLinearConv / QGemm; see "Quantize ONNX models", onnxruntime.ai/docs/performance/
//! model-optimizations/quantization.html, and the QuantizeLinear operator spec).
//!
//! By default the graph takes the same tensor our engines take: `input`, `[batch, h, w,
//! c]` f32, preprocessed as `mlops.input` says (recorded in the file's `metadata_props`),
//! and a leading `Transpose` makes it NCHW, the layout ONNX's Conv and pooling operators
//! define; [`InputLayout::Nchw`] declares `[batch, c, h, w]` instead (PyTorch's order).
//! conv weights become OIHW and the first dense layer after a flatten gets its columns
//! reordered from our `h, w, c` flatten order to ONNX's `c, h, w`.

use std::collections::BTreeMap;

use prost::Message as _;
use serde::Serialize;

use super::proto::{
    attribute_type, data_type, AttributeProto, Dimension, GraphProto, ModelProto, NodeProto,
    OperatorSetIdProto, StringStringEntryProto, TensorProto, TensorShapeProto, TensorTypeProto,
    TypeProto, ValueInfoProto,
};
use crate::artifact::{Artifact, LayerPrecision, Precision, TensorData};
use crate::io::{FileRecord, MLOPS_VERSION};
use crate::model::{Activation, LayerSpec, Shape};
use crate::{Error, Result};

/// Opsets `mlops export --format onnx` writes (13: per-axis QuantizeLinear; 21: the newest
/// whose operators we use unchanged).
pub const OPSETS: std::ops::RangeInclusive<i64> = 13..=21;

/// The default opset (what PyTorch's exporter writes by default, and ONNX Runtime 1.14+
/// runs fully).
pub const DEFAULT_OPSET: i64 = 17;

/// The memory order of the exported graph's `input`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum InputLayout {
    /// `[batch, h, w, c]`, as our artifacts and TF Serving take images; a `Transpose` at
    /// the front of the graph makes it NCHW for ONNX's Conv.
    #[default]
    Nhwc,
    /// `[batch, c, h, w]`, as PyTorch exports take images; no transpose.
    Nchw,
}

/// What an ONNX export wrote (the `metrics` of `mlops export --format onnx --json`).
#[derive(Debug, Clone, Serialize)]
pub struct OnnxExportReport {
    /// `onnx`.
    pub format: String,
    /// Opset of the default domain.
    pub opset: i64,
    /// `fp32` or `int8-qdq`.
    pub graph: String,
    /// Precision of the input artifact.
    pub from_precision: Precision,
    /// Operator types in the graph, in first-use order.
    pub op_types: Vec<String>,
    /// Nodes in the graph.
    pub nodes: usize,
    /// Input name and shape (`-1`: any batch), in `input_layout` order.
    pub input: (String, [i64; 4]),
    /// `nhwc` or `nchw`.
    pub input_layout: InputLayout,
    /// Output name (`logits`, or `probabilities` when the model ends in softmax).
    pub output: String,
    /// Bytes of the input file.
    pub bytes_before: u64,
    /// Bytes of the ONNX file.
    pub bytes_after: u64,
    /// `bytes_after / bytes_before`.
    pub size_ratio: f64,
}

/// Activation quantization of one int8-static layer's input.
#[derive(Debug, Clone, Copy, PartialEq)]
struct QParams {
    scale: f32,
    zero_point: u8,
}

/// The graph being built: nodes, initializers and fresh names.
struct Builder {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    next: usize,
}

fn ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attribute_type::INTS,
        ints: values.to_vec(),
        ..Default::default()
    }
}

fn int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attribute_type::INT,
        i: value,
        ..Default::default()
    }
}

impl Builder {
    fn node(
        &mut self,
        op: &str,
        name: &str,
        inputs: Vec<String>,
        attribute: Vec<AttributeProto>,
    ) -> String {
        self.next += 1;
        let output = format!("{name}_{}", self.next);
        self.nodes.push(NodeProto {
            input: inputs,
            output: vec![output.clone()],
            name: format!("{op}_{}", self.next),
            op_type: op.into(),
            attribute,
            ..Default::default()
        });
        output
    }

    fn constant(&mut self, name: String, dims: &[usize], data_type: i32, raw: Vec<u8>) -> String {
        self.initializers.push(TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type,
            name: name.clone(),
            raw_data: raw,
            ..Default::default()
        });
        name
    }

    fn f32s(&mut self, name: String, dims: &[usize], values: &[f32]) -> String {
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.constant(name, dims, data_type::FLOAT, raw)
    }

    /// `x` through QuantizeLinear and DequantizeLinear with `q` (uint8, per tensor).
    fn qdq(&mut self, x: String, q: QParams, tag: &str) -> String {
        let scale = self.f32s(format!("{tag}.scale"), &[], &[q.scale]);
        let zero = self.constant(
            format!("{tag}.zero_point"),
            &[],
            data_type::UINT8,
            vec![q.zero_point],
        );
        let quantized = self.node(
            "QuantizeLinear",
            &format!("{tag}.q"),
            vec![x, scale.clone(), zero.clone()],
            vec![],
        );
        self.node(
            "DequantizeLinear",
            &format!("{tag}.dq"),
            vec![quantized, scale, zero],
            vec![],
        )
    }
}

/// A weight layer's parameters as the ONNX graph needs them.
enum Weights {
    /// fp32 weight (already in the ONNX layout, of dims `.0`) and bias.
    Float(Vec<usize>, Vec<f32>, Vec<f32>),
    /// int8 weight (ONNX layout), per-output-channel scales, bias, input quantization.
    Int8 {
        dims: Vec<usize>,
        weight: Vec<i8>,
        scales: Vec<f32>,
        bias: Vec<f32>,
        input: QParams,
    },
}

/// Our conv weight `[out, kh, kw, in]` as ONNX's `[out, in, kh, kw]`.
fn ohwi_to_oihw<T: Copy>(w: &[T], out: usize, k: usize, inp: usize) -> Vec<T> {
    let mut o = Vec::with_capacity(w.len());
    for f in 0..out {
        for c in 0..inp {
            for y in 0..k {
                for x in 0..k {
                    o.push(w[((f * k + y) * k + x) * inp + c]);
                }
            }
        }
    }
    o
}

/// Dense weight `[out, h*w*c]` with columns in our `h, w, c` flatten order, reordered to
/// ONNX's `c, h, w` (what `Flatten` of an NCHW tensor gives).
pub(crate) fn hwc_columns_to_chw<T: Copy>(w: &[T], out: usize, hwc: [usize; 3]) -> Vec<T> {
    let [h, wd, c] = hwc;
    let n = h * wd * c;
    let mut o = Vec::with_capacity(w.len());
    for f in 0..out {
        let row = &w[f * n..(f + 1) * n];
        for ch in 0..c {
            for y in 0..h {
                for x in 0..wd {
                    o.push(row[(y * wd + x) * c + ch]);
                }
            }
        }
    }
    o
}

fn f32_tensor(artifact: &Artifact, name: &str) -> Result<Vec<f32>> {
    artifact
        .tensor(name)
        .and_then(|t| t.data.to_f32())
        .ok_or_else(|| Error::Config(format!("the artifact has no float tensor `{name}`")))
}

/// The ONNX IR version that goes with `opset` (onnx/docs/Versioning.md).
fn ir_version(opset: i64) -> i64 {
    match opset {
        ..=14 => 7,
        15..=18 => 8,
        19..=20 => 9,
        _ => 10,
    }
}

fn value_info(name: &str, dims: &[Option<i64>]) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            tensor_type: Some(TensorTypeProto {
                elem_type: data_type::FLOAT,
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|d| match d {
                            Some(v) => Dimension {
                                dim_value: Some(*v),
                                dim_param: None,
                            },
                            None => Dimension {
                                dim_value: None,
                                dim_param: Some("batch".into()),
                            },
                        })
                        .collect(),
                }),
            }),
        }),
    }
}

/// `artifact` (whose file is `record`) as an ONNX model at `opset`: the encoded file and
/// what it holds. fp32/fp16/bf16 artifacts give an fp32 graph (half weights widen
/// exactly); int8 artifacts give a QDQ graph with our scales and zero points, int8
/// per-channel weights and int32 biases (`bias / (input_scale * weight_scale)`, rounded,
/// as the ONNX QDQ convention asks), fp32-excluded layers staying float.
///
/// # Errors
/// [`Error::Config`] for an opset outside [`OPSETS`], an int8 artifact with dynamic
/// (weights-only) layers (ONNX's QDQ form has no per-image activation scale; export the
/// fp32 parent and let ONNX Runtime's `quantize_dynamic` do it), or an int32 bias that
/// overflows.
pub fn to_onnx(
    artifact: &Artifact,
    record: &FileRecord,
    opset: i64,
    layout: InputLayout,
) -> Result<(Vec<u8>, OnnxExportReport)> {
    if !OPSETS.contains(&opset) {
        return Err(Error::Config(format!(
            "`--opset {opset}` is not supported: use {} to {} (default {DEFAULT_OPSET})",
            OPSETS.start(),
            OPSETS.end()
        )));
    }
    let spec = &artifact.spec;
    let shapes = spec.shapes()?;
    let int8 = artifact.precision == Precision::Int8;
    let params = artifact.params_f32();
    let infos = spec.params()?;
    let index_of = |name: &str| infos.iter().position(|i| i.name == name);

    // Per layer: how its weights go into the graph.
    let mut weights: BTreeMap<usize, Weights> = BTreeMap::new();
    for (index, layer) in spec.layers.iter().enumerate() {
        let (LayerSpec::Conv2d { .. } | LayerSpec::Dense { .. }) = layer else {
            continue;
        };
        let wname = format!("layers.{index}.weight");
        let bname = format!("layers.{index}.bias");
        let (wi, bi) = (
            index_of(&wname).ok_or_else(|| Error::Config(format!("no `{wname}`")))?,
            index_of(&bname).ok_or_else(|| Error::Config(format!("no `{bname}`")))?,
        );
        let precision = if int8 {
            LayerPrecision::of_layer(artifact.quantization.as_ref(), &wname)?
        } else {
            LayerPrecision::Fp32
        };
        let dims = onnx_weight_dims(spec, &shapes, index);
        let entry = match precision {
            LayerPrecision::Fp32 => Weights::Float(
                dims,
                to_onnx_layout(spec, &shapes, index, &params[wi]),
                params[bi].clone(),
            ),
            LayerPrecision::Int8Dynamic => {
                return Err(Error::Config(format!(
                    "`{wname}` is dynamic int8 (weights-only, activations quantized per image at run time); ONNX's QDQ form needs calibrated activation scales: quantize with `--calib`, or export the fp32 parent with `--format onnx` and quantize it with ONNX Runtime's `quantize_dynamic`"
                )))
            }
            LayerPrecision::Int8Static => {
                let Some(TensorData::I8(q)) = artifact.tensor(&wname).map(|t| &t.data) else {
                    return Err(Error::Config(format!("`{wname}` is not int8")));
                };
                let scale = f32_tensor(artifact, &format!("layers.{index}.input_scale"))?;
                let zero = match artifact
                    .tensor(&format!("layers.{index}.input_zero_point"))
                    .map(|t| &t.data)
                {
                    Some(TensorData::U8(z)) if !z.is_empty() => z[0],
                    _ => {
                        return Err(Error::Config(format!(
                            "`layers.{index}.input_zero_point` is missing"
                        )))
                    }
                };
                Weights::Int8 {
                    dims,
                    weight: to_onnx_layout(spec, &shapes, index, q),
                    scales: f32_tensor(artifact, &format!("{wname}_scale"))?,
                    bias: params[bi].clone(),
                    input: QParams {
                        scale: scale.first().copied().unwrap_or(1.0),
                        zero_point: zero,
                    },
                }
            }
        };
        weights.insert(index, entry);
    }

    // Where to put Q/DQ pairs: `q_at[k]` quantizes the input of layer `k` (the model's
    // input for k = 0). Each int8-static layer's input gets its calibrated parameters, and
    // so does every tensor back to the previous weight layer's activation when only max
    // pooling, flatten, dropout and ReLU lie between (they commute with a monotone uint8
    // quantization), so that ONNX Runtime sees DQ -> Conv -> (Relu) -> Q and fuses
    // QLinearConv.
    let mut q_at: Vec<Option<QParams>> = vec![None; spec.layers.len() + 1];
    for (&index, w) in &weights {
        let Weights::Int8 { input, .. } = w else {
            continue;
        };
        let mut k = index;
        q_at[k] = Some(*input);
        while k > 0
            && matches!(
                spec.layers[k - 1],
                LayerSpec::MaxPool2d { .. }
                    | LayerSpec::Flatten
                    | LayerSpec::Dropout { .. }
                    | LayerSpec::Relu
            )
        {
            k -= 1;
            q_at[k] = Some(*input);
        }
    }

    let mut b = Builder {
        nodes: Vec::new(),
        initializers: Vec::new(),
        next: 0,
    };
    let [h, w, c] = spec.input;
    let (h, w, c) = (h as i64, w as i64, c as i64);
    let input_dims = match layout {
        InputLayout::Nhwc => [-1, h, w, c],
        InputLayout::Nchw => [-1, c, h, w],
    };
    let mut cur = match layout {
        InputLayout::Nhwc => b.node(
            "Transpose",
            "input_nchw",
            vec!["input".into()],
            vec![ints("perm", &[0, 3, 1, 2])],
        ),
        InputLayout::Nchw => "input".to_string(),
    };
    // The parameters `cur` was last quantized with (no second identical Q/DQ pair).
    let mut quantized: Option<QParams> = None;
    if let Some(q) = q_at[0] {
        cur = b.qdq(cur, q, "input");
        quantized = Some(q);
    }
    let mut output_name = "logits".to_string();
    for (index, layer) in spec.layers.iter().enumerate() {
        let tag = format!("layers.{index}");
        let activation = match layer {
            LayerSpec::Conv2d {
                filters,
                kernel,
                stride,
                padding,
                activation,
            } => {
                let Shape::Spatial([ih, iw, _]) = shapes[index] else {
                    return Err(Error::Config(format!("{tag}: conv on a flat input")));
                };
                let (top, bottom) = padding.amounts(ih, *kernel, *stride);
                let (left, right) = padding.amounts(iw, *kernel, *stride);
                let pads = [top, left, bottom, right];
                let inputs = weight_inputs(&mut b, &weights[&index], &tag, *filters, cur)?;
                cur = b.node(
                    "Conv",
                    &tag,
                    inputs,
                    vec![
                        ints("kernel_shape", &[*kernel as i64, *kernel as i64]),
                        ints("strides", &[*stride as i64, *stride as i64]),
                        ints("pads", &pads.map(|p| p as i64)),
                        ints("dilations", &[1, 1]),
                        int("group", 1),
                    ],
                );
                *activation
            }
            LayerSpec::Dense {
                units, activation, ..
            } => {
                let inputs = weight_inputs(&mut b, &weights[&index], &tag, *units, cur)?;
                cur = b.node("Gemm", &tag, inputs, vec![int("transB", 1)]);
                *activation
            }
            LayerSpec::MaxPool2d { size, stride } | LayerSpec::AvgPool2d { size, stride } => {
                let op = if matches!(layer, LayerSpec::MaxPool2d { .. }) {
                    "MaxPool"
                } else {
                    "AveragePool"
                };
                let s = stride.unwrap_or(*size) as i64;
                cur = b.node(
                    op,
                    &tag,
                    vec![cur],
                    vec![
                        ints("kernel_shape", &[*size as i64, *size as i64]),
                        ints("strides", &[s, s]),
                    ],
                );
                Activation::None
            }
            LayerSpec::Flatten => {
                cur = b.node("Flatten", &tag, vec![cur], vec![int("axis", 1)]);
                Activation::None
            }
            LayerSpec::Dropout { .. } => Activation::None,
            LayerSpec::Relu => Activation::Relu,
        };
        match activation {
            Activation::None => {}
            Activation::Relu => cur = b.node("Relu", &format!("{tag}.relu"), vec![cur], vec![]),
            Activation::Softmax => {
                cur = b.node(
                    "Softmax",
                    &format!("{tag}.softmax"),
                    vec![cur],
                    vec![int("axis", -1)],
                );
                output_name = "probabilities".into();
            }
        }
        if !matches!(layer, LayerSpec::Dropout { .. }) {
            quantized = None;
        }
        if let Some(q) = q_at[index + 1] {
            if quantized != Some(q) {
                cur = b.qdq(cur, q, &format!("{tag}.out"));
                quantized = Some(q);
            }
        }
    }
    // The last node writes the graph's output.
    let last = b
        .nodes
        .last_mut()
        .ok_or_else(|| Error::Config("empty model".into()))?;
    last.output = vec![output_name.clone()];

    let op_types = b.nodes.iter().fold(Vec::<String>::new(), |mut seen, n| {
        if !seen.contains(&n.op_type) {
            seen.push(n.op_type.clone());
        }
        seen
    });
    let nodes = b.nodes.len();
    let metadata_props = [
        ("mlops.version", MLOPS_VERSION.to_string()),
        ("mlops.input", json(&artifact.input)),
        ("mlops.labels", json(&artifact.labels)),
        ("mlops.model", json(spec)),
        ("mlops.precision", artifact.precision.as_str().to_string()),
        ("mlops.source_sha256", record.sha256.clone()),
        ("mlops.source_digest", artifact.digest()),
    ]
    .into_iter()
    .map(|(key, value)| StringStringEntryProto {
        key: key.into(),
        value,
    })
    .collect();
    let model = ModelProto {
        ir_version: ir_version(opset),
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: opset,
        }],
        producer_name: "mlops".into(),
        producer_version: MLOPS_VERSION.into(),
        doc_string: format!(
            "{} exported by mlops {MLOPS_VERSION} from {} ({} artifact); input: {} {:?} f32 (-1: any batch), value = (pixel * {} - {}) / {}",
            if spec.name.is_empty() { "model" } else { &spec.name },
            record.path,
            artifact.precision,
            match layout {
                InputLayout::Nhwc => "NHWC",
                InputLayout::Nchw => "NCHW",
            },
            input_dims,
            artifact.input.scale,
            artifact.input.mean,
            artifact.input.std
        ),
        graph: Some(GraphProto {
            node: b.nodes,
            name: if spec.name.is_empty() {
                "mlops".into()
            } else {
                spec.name.clone()
            },
            initializer: b.initializers,
            input: vec![value_info(
                "input",
                &[
                    None,
                    Some(input_dims[1]),
                    Some(input_dims[2]),
                    Some(input_dims[3]),
                ],
            )],
            output: vec![value_info(&output_name, &[None, Some(spec.classes as i64)])],
            ..Default::default()
        }),
        metadata_props,
        ..Default::default()
    };
    let bytes = model.encode_to_vec();
    let report = OnnxExportReport {
        format: "onnx".into(),
        opset,
        graph: if int8 { "int8-qdq" } else { "fp32" }.into(),
        from_precision: artifact.precision,
        op_types,
        nodes,
        input: ("input".into(), input_dims),
        input_layout: layout,
        output: output_name,
        bytes_before: record.bytes,
        bytes_after: bytes.len() as u64,
        size_ratio: bytes.len() as f64 / record.bytes.max(1) as f64,
    };
    Ok((bytes, report))
}

/// A metadata value as JSON text, as the artifact's own metadata holds it. Specs, input
/// specs and label lists are plain data: serialising them cannot fail.
fn json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

/// A weight in ONNX's layout: conv `[out, kh, kw, in]` to OIHW; the dense layer right
/// after a flatten (dropout between allowed) gets `c, h, w` column order; other dense
/// weights are already `[out, in]`, which Gemm with `transB = 1` takes.
fn to_onnx_layout<T: Copy>(
    spec: &crate::model::ModelSpec,
    shapes: &[Shape],
    index: usize,
    w: &[T],
) -> Vec<T> {
    match &spec.layers[index] {
        LayerSpec::Conv2d {
            filters, kernel, ..
        } => {
            let inp = match shapes[index] {
                Shape::Spatial([_, _, c]) => c,
                Shape::Flat(n) => n,
            };
            ohwi_to_oihw(w, *filters, *kernel, inp)
        }
        LayerSpec::Dense { units, .. } => {
            // The flatten this dense layer reads, if only dropouts lie between.
            let flatten = (0..index)
                .rev()
                .find(|&k| !matches!(spec.layers[k], LayerSpec::Dropout { .. }))
                .filter(|&k| matches!(spec.layers[k], LayerSpec::Flatten));
            match flatten.map(|k| shapes[k]) {
                Some(Shape::Spatial(hwc)) if hwc[2] > 1 => hwc_columns_to_chw(w, *units, hwc),
                _ => w.to_vec(),
            }
        }
        _ => w.to_vec(),
    }
}

/// The weight and bias inputs of a Conv/Gemm node after `x`: float initializers, or
/// (int8) `x` through Q/DQ, int8 weights through a per-channel DequantizeLinear and an
/// int32 bias through DequantizeLinear with scale `input_scale * weight_scale`.
fn weight_inputs(
    b: &mut Builder,
    weights: &Weights,
    tag: &str,
    out: usize,
    x: String,
) -> Result<Vec<String>> {
    match weights {
        Weights::Float(dims, w, bias) => {
            let w = b.f32s(format!("{tag}.weight"), dims, w);
            let bias = b.f32s(format!("{tag}.bias"), &[out], bias);
            Ok(vec![x, w, bias])
        }
        Weights::Int8 {
            dims,
            weight,
            scales,
            bias,
            input,
        } => {
            if scales.len() != out && scales.len() != 1 {
                return Err(Error::Config(format!(
                    "`{tag}.weight_scale` has {} values for {out} channels",
                    scales.len()
                )));
            }
            let scales: Vec<f32> = if scales.len() == 1 {
                vec![scales[0]; out]
            } else {
                scales.clone()
            };
            // `x` already went through Q/DQ with `input` (`q_at` in `to_onnx`).
            let wq = b.constant(
                format!("{tag}.weight_quantized"),
                dims,
                data_type::INT8,
                weight.iter().map(|&v| v as u8).collect(),
            );
            let ws = b.f32s(format!("{tag}.weight_scale"), &[out], &scales);
            let wz = b.constant(
                format!("{tag}.weight_zero_point"),
                &[out],
                data_type::INT8,
                vec![0; out],
            );
            let w = b.node(
                "DequantizeLinear",
                &format!("{tag}.weight"),
                vec![wq, ws, wz],
                vec![int("axis", 0)],
            );
            let mut bias_q = Vec::with_capacity(out);
            let mut bias_scale = Vec::with_capacity(out);
            for (o, &v) in bias.iter().enumerate() {
                let s = input.scale * scales[o];
                let q = (v as f64 / s as f64).round_ties_even();
                if !(i32::MIN as f64..=i32::MAX as f64).contains(&q) || !q.is_finite() {
                    return Err(Error::Config(format!(
                        "`{tag}.bias[{o}]` = {v} does not fit int32 at scale {s:e}; export the fp32 parent instead"
                    )));
                }
                bias_q.push(q as i32);
                bias_scale.push(s);
            }
            let bq = b.constant(
                format!("{tag}.bias_quantized"),
                &[out],
                data_type::INT32,
                bias_q.iter().flat_map(|v| v.to_le_bytes()).collect(),
            );
            let bs = b.f32s(format!("{tag}.bias_scale"), &[out], &bias_scale);
            let bz = b.constant(
                format!("{tag}.bias_zero_point"),
                &[out],
                data_type::INT32,
                vec![0; 4 * out],
            );
            let bias = b.node(
                "DequantizeLinear",
                &format!("{tag}.bias"),
                vec![bq, bs, bz],
                vec![int("axis", 0)],
            );
            Ok(vec![x, w, bias])
        }
    }
}

/// A weight's dims in ONNX: conv `[out, in, k, k]`, dense `[out, in]` (Gemm, `transB`).
fn onnx_weight_dims(spec: &crate::model::ModelSpec, shapes: &[Shape], index: usize) -> Vec<usize> {
    let inputs = match shapes[index] {
        Shape::Spatial([h, w, c]) => match spec.layers[index] {
            LayerSpec::Conv2d { .. } => c,
            _ => h * w * c,
        },
        Shape::Flat(n) => n,
    };
    match &spec.layers[index] {
        LayerSpec::Conv2d {
            filters, kernel, ..
        } => vec![*filters, inputs, *kernel, *kernel],
        LayerSpec::Dense { units, .. } => vec![*units, inputs],
        _ => Vec::new(),
    }
}
