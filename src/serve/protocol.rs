//! The two request/response formats the server speaks, as pure functions over JSON.
//!
//! - TF Serving's REST API (`POST /v1/models/NAME:predict`): `{"instances": [...]}` (row
//!   format) or `{"inputs": [...]}` (columnar; one input, so the same list), each instance
//!   an image as nested or flat numbers; the answer is `{"predictions": [{"class",
//!   "label", "probabilities"}, ...]}`, TF Serving's row form for several named outputs.
//! - KServe's Open Inference Protocol v2 (`POST /v2/models/NAME/infer`): one input tensor
//!   `{"name", "shape": [N, H, W, C], "datatype": "FP32" | "UINT8", "data": [...]}`; the
//!   answer has the outputs `probabilities` (FP32 `[N, classes]`) and `class` (INT64
//!   `[N]`), or the ones the request names in `outputs`.
//!
//! FP32 data is the model's input tensor (already preprocessed as `mlops.input` says);
//! UINT8 data is raw pixels, preprocessed here. Errors name the field and what it takes.

use serde_json::{json, Value};

use crate::artifact::InputSpec;

/// What a request must fit: the model's input and its classes.
#[derive(Debug, Clone)]
pub struct ModelShape {
    /// How pixels become the input tensor, and its `[h, w, c]`.
    pub input: InputSpec,
    /// Class names, one per output.
    pub labels: Vec<String>,
}

impl ModelShape {
    fn input_len(&self) -> usize {
        self.input.shape.iter().product()
    }

    fn describe(&self) -> String {
        let [h, w, c] = self.input.shape;
        format!(
            "{h}x{w}x{c} = {} values per image (floats as `value = (pixel * {} - {}) / {}`)",
            self.input_len(),
            self.input.scale,
            self.input.mean,
            self.input.std
        )
    }
}

/// Images parsed from a request, ready for the model.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// `[count, h, w, c]` input values.
    pub images: Vec<f32>,
    /// Number of images.
    pub count: usize,
}

/// A request that does not fit; the message goes back with status 400.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct BadRequest(pub String);

fn bad(message: impl Into<String>) -> BadRequest {
    BadRequest(message.into())
}

/// Appends every number of a nested list to `out`; `false` on anything else.
fn flatten_numbers(value: &Value, out: &mut Vec<f32>) -> bool {
    match value {
        Value::Number(n) => match n.as_f64() {
            Some(v) => {
                out.push(v as f32);
                true
            }
            None => false,
        },
        Value::Array(items) => items.iter().all(|item| flatten_numbers(item, out)),
        _ => false,
    }
}

/// Parses a TF Serving predict body.
pub fn parse_tf_serving(body: &Value, shape: &ModelShape) -> Result<Batch, BadRequest> {
    let (field, instances) = match (body.get("instances"), body.get("inputs")) {
        (Some(v), None) => ("instances", v),
        (None, Some(v)) => ("inputs", v),
        (Some(_), Some(_)) => return Err(bad("give `instances` or `inputs`, not both")),
        (None, None) => {
            return Err(bad(format!(
                "expected {{\"instances\": [image, ...]}} with each image {}",
                shape.describe()
            )))
        }
    };
    let list = instances
        .as_array()
        .ok_or_else(|| bad(format!("`{field}` must be a list of images")))?;
    if list.is_empty() {
        return Err(bad(format!("`{field}` is empty")));
    }
    let len = shape.input_len();
    let mut images = Vec::with_capacity(list.len() * len);
    for (i, instance) in list.iter().enumerate() {
        let before = images.len();
        if !flatten_numbers(instance, &mut images) {
            return Err(bad(format!("`{field}[{i}]` is not a list of numbers")));
        }
        let got = images.len() - before;
        if got != len {
            return Err(bad(format!(
                "`{field}[{i}]` has {got} values; the model takes {}",
                shape.describe()
            )));
        }
    }
    Ok(Batch {
        images,
        count: list.len(),
    })
}

fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let exp: Vec<f32> = logits.iter().map(|&v| (v - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.into_iter().map(|v| v / sum).collect()
}

/// The TF Serving answer for `logits` (`[count, classes]`).
pub fn tf_serving_response(logits: &[f32], shape: &ModelShape) -> Value {
    let classes = shape.labels.len();
    let predictions: Vec<Value> = logits
        .chunks_exact(classes)
        .map(|row| {
            let class = crate::runtime::argmax(row);
            json!({
                "class": class,
                "label": shape.labels[class],
                "probabilities": softmax(row),
            })
        })
        .collect();
    json!({ "predictions": predictions })
}

/// The outputs a v2 request may ask for.
pub const V2_OUTPUTS: [&str; 2] = ["probabilities", "class"];

/// A parsed v2 request: the images and the outputs to return.
#[derive(Debug, Clone, PartialEq)]
pub struct V2Request {
    /// The input tensor's images.
    pub batch: Batch,
    /// Names from [`V2_OUTPUTS`], in the order to return them.
    pub outputs: Vec<&'static str>,
    /// The request's `id`, echoed back.
    pub id: Option<Value>,
}

/// Parses a KServe v2 infer body.
pub fn parse_v2(body: &Value, shape: &ModelShape) -> Result<V2Request, BadRequest> {
    let inputs = body
        .get("inputs")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("expected `inputs`: a list with one tensor"))?;
    if inputs.len() != 1 {
        return Err(bad(format!(
            "`inputs` has {} tensors; the model takes one",
            inputs.len()
        )));
    }
    let input = &inputs[0];
    let dims: Vec<usize> = input
        .get("shape")
        .and_then(Value::as_array)
        .and_then(|d| d.iter().map(|v| v.as_u64().map(|n| n as usize)).collect())
        .ok_or_else(|| bad("`inputs[0].shape` must be a list of sizes, e.g. [1, 28, 28, 1]"))?;
    let len = shape.input_len();
    let count = dims.first().copied().unwrap_or(0);
    let per_image: usize = dims.iter().skip(1).product();
    if dims.len() < 2 || count == 0 || per_image != len {
        return Err(bad(format!(
            "`inputs[0].shape` is {dims:?}; the model takes [N, ...] with {}",
            shape.describe()
        )));
    }
    let datatype = input.get("datatype").and_then(Value::as_str).unwrap_or("");
    let data = input
        .get("data")
        .ok_or_else(|| bad("`inputs[0].data` is missing"))?;
    let mut values = Vec::with_capacity(count * len);
    if !flatten_numbers(data, &mut values) {
        return Err(bad("`inputs[0].data` is not a list of numbers"));
    }
    if values.len() != count * len {
        return Err(bad(format!(
            "`inputs[0].data` has {} values; shape {dims:?} needs {}",
            values.len(),
            count * len
        )));
    }
    match datatype {
        "FP32" => {}
        "UINT8" => {
            let InputSpec {
                scale, mean, std, ..
            } = shape.input;
            if values
                .iter()
                .any(|&p| !(0.0..=255.0).contains(&p) || p.fract() != 0.0)
            {
                return Err(bad("`inputs[0].data` holds UINT8 pixels: integers 0..=255"));
            }
            for v in &mut values {
                *v = (*v * scale - mean) / std;
            }
        }
        other => {
            return Err(bad(format!(
                "`inputs[0].datatype` is `{other}`; use FP32 (the input tensor) or UINT8 (pixels)"
            )))
        }
    }
    let outputs = match body.get("outputs").and_then(Value::as_array) {
        None => V2_OUTPUTS.to_vec(),
        Some(asked) => asked
            .iter()
            .enumerate()
            .map(|(i, o)| {
                let name = o.get("name").and_then(Value::as_str).unwrap_or("");
                V2_OUTPUTS
                    .iter()
                    .copied()
                    .find(|known| *known == name)
                    .ok_or_else(|| {
                        bad(format!(
                            "`outputs[{i}].name` is `{name}`; this model has {V2_OUTPUTS:?}"
                        ))
                    })
            })
            .collect::<Result<_, _>>()?,
    };
    Ok(V2Request {
        batch: Batch {
            images: values,
            count,
        },
        outputs,
        id: body.get("id").cloned(),
    })
}

/// The v2 answer for `logits` (`[count, classes]`): the named `outputs`, and `id` echoed.
pub fn v2_response(
    model: &str,
    outputs: &[&str],
    id: Option<&Value>,
    logits: &[f32],
    classes: usize,
) -> Value {
    let count = logits.len() / classes;
    let outputs: Vec<Value> = outputs
        .iter()
        .map(|&name| match name {
            "probabilities" => json!({
                "name": name, "datatype": "FP32", "shape": [count, classes],
                "data": logits.chunks_exact(classes).flat_map(softmax).collect::<Vec<f32>>(),
            }),
            _ => json!({
                "name": name, "datatype": "INT64", "shape": [count],
                "data": logits.chunks_exact(classes).map(crate::runtime::argmax).collect::<Vec<usize>>(),
            }),
        })
        .collect();
    let mut answer = json!({ "model_name": model, "model_version": "1", "outputs": outputs });
    if let Some(id) = id {
        answer["id"] = id.clone();
    }
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> ModelShape {
        ModelShape {
            input: InputSpec::unit_scaled([2, 2, 1]),
            labels: vec!["a".into(), "b".into(), "c".into()],
        }
    }

    #[test]
    fn tf_serving_takes_nested_or_flat_images_and_names_bad_ones() {
        let body = json!({"instances": [[[0.0], [1.0], [0.5], [0.25]], [1, 2, 3, 4]]});
        let batch = parse_tf_serving(&body, &shape()).unwrap();
        assert_eq!(batch.count, 2);
        assert_eq!(batch.images, vec![0.0, 1.0, 0.5, 0.25, 1.0, 2.0, 3.0, 4.0]);
        let short = json!({"instances": [[0.0, 1.0, 0.5, 0.25], [1, 2, 3]]});
        let err = parse_tf_serving(&short, &shape()).unwrap_err().0;
        assert!(err.contains("`instances[1]` has 3 values"), "{err}");
        let text = json!({"inputs": [["x", 1, 2, 3]]});
        let err = parse_tf_serving(&text, &shape()).unwrap_err().0;
        assert!(
            err.contains("`inputs[0]` is not a list of numbers"),
            "{err}"
        );
        assert!(parse_tf_serving(&json!({}), &shape()).is_err());
    }

    #[test]
    fn tf_serving_answer_has_class_label_and_probabilities() {
        let answer = tf_serving_response(&[0.0, 2.0, 1.0, 5.0, 0.0, 0.0], &shape());
        let p = &answer["predictions"];
        assert_eq!(p[0]["class"], 1);
        assert_eq!(p[0]["label"], "b");
        assert_eq!(p[1]["class"], 0);
        let probs: Vec<f64> = p[0]["probabilities"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-6);
        assert!(probs[1] > probs[2] && probs[2] > probs[0]);
    }

    #[test]
    fn v2_checks_shape_datatype_and_outputs() {
        let body = json!({"id": "r1", "inputs": [{"name": "input", "shape": [1, 2, 2, 1],
            "datatype": "UINT8", "data": [0, 255, 51, 102]}], "outputs": [{"name": "class"}]});
        let request = parse_v2(&body, &shape()).unwrap();
        let scale = crate::data::PIXEL_SCALE;
        assert_eq!(
            request.batch.images,
            vec![0.0, 255.0 * scale, 51.0 * scale, 102.0 * scale]
        );
        assert_eq!(request.outputs, vec!["class"]);
        let answer = v2_response(
            "m",
            &request.outputs,
            request.id.as_ref(),
            &[0.0, 0.0, 3.0],
            3,
        );
        assert_eq!(answer["outputs"][0]["data"], json!([2]));
        assert_eq!(answer["id"], "r1");

        let wrong_shape = json!({"inputs": [{"name": "input", "shape": [1, 3],
            "datatype": "FP32", "data": [0, 0, 0]}]});
        let err = parse_v2(&wrong_shape, &shape()).unwrap_err().0;
        assert!(err.contains("`inputs[0].shape` is [1, 3]"), "{err}");
        let short = json!({"inputs": [{"name": "input", "shape": [2, 4],
            "datatype": "FP32", "data": [0, 0, 0, 0]}]});
        let err = parse_v2(&short, &shape()).unwrap_err().0;
        assert!(err.contains("has 4 values; shape [2, 4] needs 8"), "{err}");
        let dtype = json!({"inputs": [{"name": "input", "shape": [1, 4],
            "datatype": "FP16", "data": [0, 0, 0, 0]}]});
        assert!(parse_v2(&dtype, &shape()).unwrap_err().0.contains("FP16"));
        let output = json!({"inputs": [{"name": "input", "shape": [1, 4],
            "datatype": "FP32", "data": [0, 0, 0, 0]}], "outputs": [{"name": "logits"}]});
        assert!(parse_v2(&output, &shape())
            .unwrap_err()
            .0
            .contains("`outputs[0].name`"));
        let pixels = json!({"inputs": [{"name": "input", "shape": [1, 4],
            "datatype": "UINT8", "data": [0, 0, 0, 300]}]});
        assert!(parse_v2(&pixels, &shape())
            .unwrap_err()
            .0
            .contains("0..=255"));
    }
}
