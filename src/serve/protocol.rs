//! The two request/response formats the server speaks, as pure functions over JSON.
//!
//! - TF Serving's REST API (`POST /v1/models/NAME:predict`): `{"instances": [...]}` (row
//!   format) or `{"inputs": [...]}` (columnar; one input, so the same list), each instance
//!   an image as nested or flat numbers; the answer is `{"predictions": [{"class",
//!   "label", "probabilities"}, ...]}`, TF Serving's row form for several named outputs
//!   (columnar requests get the columnar `{"outputs": {"class": [...], ...}}`).
//! - KServe's Open Inference Protocol v2 (`POST /v2/models/NAME/infer`): one input tensor
//!   `{"name", "shape": [N, H, W, C], "datatype": "FP32" | "UINT8", "data": [...]}`; the
//!   answer has the outputs `probabilities` (FP32 `[N, classes]`) and `class` (INT64
//!   `[N]`), or the ones the request names in `outputs`.
//!
//! FP32 data is the model's input tensor (already preprocessed as `mlops.input` says);
//! UINT8 data is raw pixels, preprocessed here. Errors name the field and what it takes.
//!
//! The numbers are flattened into one `Vec<f32>` while parsing ([`FlattenInto`]): going
//! through a `serde_json::Value` per number cost ~20% of the server's CPU time (perf).

use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
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

/// Images one request may carry; more are refused before any work is done.
pub const MAX_IMAGES_PER_REQUEST: usize = 4096;

impl ModelShape {
    /// Values per image.
    pub(crate) fn input_len(&self) -> usize {
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

/// Appends every number of a nested list (or a lone number) to the buffer.
struct FlattenInto<'a>(&'a mut Vec<f32>);

impl<'de> DeserializeSeed<'de> for FlattenInto<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for FlattenInto<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("numbers or nested lists of numbers")
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        let v = v as f32;
        if !v.is_finite() {
            return Err(E::custom("a number is beyond the float32 range"));
        }
        self.0.push(v);
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.0.push(v as f32);
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.0.push(v as f32);
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(FlattenInto(self.0))?.is_some() {}
        Ok(())
    }
}

/// A list of images: all their numbers in one buffer and each one's count.
#[derive(Default)]
struct Instances {
    values: Vec<f32>,
    counts: Vec<usize>,
}

/// Parses `field`'s list of images (the name goes into error messages).
struct InstancesSeed(&'static str);

impl<'de> DeserializeSeed<'de> for InstancesSeed {
    type Value = Instances;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Instances, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for InstancesSeed {
    type Value = Instances;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "`{}`: a list of images", self.0)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Instances, A::Error> {
        let mut out = Instances::default();
        loop {
            let before = out.values.len();
            let next = seq.next_element_seed(FlattenInto(&mut out.values));
            match next {
                Ok(Some(())) => out.counts.push(out.values.len() - before),
                Ok(None) => return Ok(out),
                Err(e) => {
                    let at = out.counts.len();
                    return Err(de::Error::custom(format!(
                        "`{}[{at}]` is not a list of numbers ({e})",
                        self.0
                    )));
                }
            }
        }
    }
}

/// A TF Serving predict body: `instances` or `inputs`; other keys are ignored.
struct TfRequest(Option<(&'static str, Instances)>);

impl<'de> Deserialize<'de> for TfRequest {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> Visitor<'de> for Fields {
            type Value = TfRequest;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object with `instances`")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TfRequest, A::Error> {
                let mut found = None;
                while let Some(key) = map.next_key::<String>()? {
                    let field = match key.as_str() {
                        "instances" => "instances",
                        "inputs" => "inputs",
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    if found.is_some() {
                        return Err(de::Error::custom("give `instances` or `inputs`, not both"));
                    }
                    found = Some((field, map.next_value_seed(InstancesSeed(field))?));
                }
                Ok(TfRequest(found))
            }
        }
        d.deserialize_map(Fields)
    }
}

/// A body serde could not read: not JSON at all, or JSON of the wrong form.
fn unreadable(e: serde_json::Error) -> BadRequest {
    if e.is_syntax() || e.is_eof() {
        bad(format!("the body is not JSON: {e}"))
    } else {
        bad(format!("the body does not fit the API: {e}"))
    }
}

/// A parsed TF Serving request.
#[derive(Debug, Clone, PartialEq)]
pub struct TfServingRequest {
    /// The images.
    pub batch: Batch,
    /// Sent as `inputs` (columnar), so answered as `outputs`.
    pub columnar: bool,
}

/// Parses a TF Serving predict body.
pub fn parse_tf_serving(body: &[u8], shape: &ModelShape) -> Result<TfServingRequest, BadRequest> {
    let TfRequest(found) = serde_json::from_slice(body).map_err(unreadable)?;
    let Some((field, instances)) = found else {
        return Err(bad(format!(
            "expected {{\"instances\": [image, ...]}} with each image {}",
            shape.describe()
        )));
    };
    if instances.counts.is_empty() {
        return Err(bad(format!("`{field}` is empty")));
    }
    if instances.counts.len() > MAX_IMAGES_PER_REQUEST {
        return Err(bad(format!(
            "`{field}` has {} images; send at most {MAX_IMAGES_PER_REQUEST} per request",
            instances.counts.len()
        )));
    }
    let len = shape.input_len();
    if let Some(i) = instances.counts.iter().position(|&n| n != len) {
        return Err(bad(format!(
            "`{field}[{i}]` has {} values; the model takes {}",
            instances.counts[i],
            shape.describe()
        )));
    }
    Ok(TfServingRequest {
        batch: Batch {
            count: instances.counts.len(),
            images: instances.values,
        },
        columnar: field == "inputs",
    })
}

fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let exp: Vec<f32> = logits.iter().map(|&v| (v - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.into_iter().map(|v| v / sum).collect()
}

/// The TF Serving answer for `logits` (`[count, classes]`): row form, or columnar for
/// requests that came as `inputs`.
pub fn tf_serving_response(logits: &[f32], shape: &ModelShape, columnar: bool) -> Value {
    let classes = shape.labels.len();
    let rows = logits.chunks_exact(classes);
    let class: Vec<usize> = rows.clone().map(crate::runtime::argmax).collect();
    let label: Vec<&str> = class.iter().map(|&c| shape.labels[c].as_str()).collect();
    let probabilities: Vec<Vec<f32>> = rows.map(softmax).collect();
    if columnar {
        return json!({ "outputs": {
            "class": class, "label": label, "probabilities": probabilities,
        }});
    }
    let predictions: Vec<Value> = (0..class.len())
        .map(|i| {
            json!({
                "class": class[i],
                "label": label[i],
                "probabilities": probabilities[i],
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

/// One tensor's numbers, flattened.
struct Flat(Vec<f32>);

impl<'de> Deserialize<'de> for Flat {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut values = Vec::new();
        FlattenInto(&mut values).deserialize(d)?;
        Ok(Flat(values))
    }
}

#[derive(Deserialize)]
struct V2Body {
    inputs: Vec<V2Input>,
    outputs: Option<Vec<V2Output>>,
    id: Option<Value>,
}

#[derive(Deserialize)]
struct V2Input {
    shape: Vec<usize>,
    datatype: String,
    data: Flat,
}

#[derive(Deserialize)]
struct V2Output {
    name: String,
}

/// Parses a KServe v2 infer body.
pub fn parse_v2(body: &[u8], shape: &ModelShape) -> Result<V2Request, BadRequest> {
    let body: V2Body = serde_json::from_slice(body).map_err(unreadable)?;
    let [input] = <[V2Input; 1]>::try_from(body.inputs).map_err(|inputs| {
        bad(format!(
            "`inputs` has {} tensors; the model takes one",
            inputs.len()
        ))
    })?;
    let dims = input.shape;
    let len = shape.input_len();
    let count = dims.first().copied().unwrap_or(0);
    if count > MAX_IMAGES_PER_REQUEST {
        return Err(bad(format!(
            "`inputs[0].shape` has {count} images; send at most {MAX_IMAGES_PER_REQUEST} per request"
        )));
    }
    // Checked: sizes come from the client and must not wrap around.
    let per_image = dims
        .iter()
        .skip(1)
        .try_fold(1usize, |acc, &d| acc.checked_mul(d));
    if dims.len() < 2 || count == 0 || per_image != Some(len) {
        return Err(bad(format!(
            "`inputs[0].shape` is {dims:?}; the model takes [N, ...] with {}",
            shape.describe()
        )));
    }
    let Flat(mut values) = input.data;
    if values.len() != count * len {
        return Err(bad(format!(
            "`inputs[0].data` has {} values; shape {dims:?} needs {}",
            values.len(),
            count * len
        )));
    }
    match input.datatype.as_str() {
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
    let outputs = match body.outputs {
        None => V2_OUTPUTS.to_vec(),
        Some(asked) => asked
            .iter()
            .enumerate()
            .map(|(i, o)| {
                V2_OUTPUTS
                    .iter()
                    .copied()
                    .find(|known| *known == o.name)
                    .ok_or_else(|| {
                        bad(format!(
                            "`outputs[{i}].name` is `{}`; this model has {V2_OUTPUTS:?}",
                            o.name
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
        id: body.id,
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
        let request = parse_tf_serving(body.to_string().as_bytes(), &shape()).unwrap();
        assert!(!request.columnar);
        let batch = request.batch;
        assert_eq!(batch.count, 2);
        assert_eq!(batch.images, vec![0.0, 1.0, 0.5, 0.25, 1.0, 2.0, 3.0, 4.0]);
        let short = json!({"instances": [[0.0, 1.0, 0.5, 0.25], [1, 2, 3]]});
        let err = parse_tf_serving(short.to_string().as_bytes(), &shape())
            .unwrap_err()
            .0;
        assert!(err.contains("`instances[1]` has 3 values"), "{err}");
        let text = json!({"inputs": [["x", 1, 2, 3]]});
        let err = parse_tf_serving(text.to_string().as_bytes(), &shape())
            .unwrap_err()
            .0;
        assert!(
            err.contains("`inputs[0]` is not a list of numbers"),
            "{err}"
        );
        assert!(parse_tf_serving(b"{}", &shape()).is_err());
        let huge = br#"{"instances": [[1e300, 0, 0, 0]]}"#;
        let err = parse_tf_serving(huge, &shape()).unwrap_err().0;
        assert!(err.contains("float32 range"), "{err}");
    }

    #[test]
    fn tf_serving_answer_has_class_label_and_probabilities() {
        let logits = [0.0, 2.0, 1.0, 5.0, 0.0, 0.0];
        let columnar = tf_serving_response(&logits, &shape(), true);
        assert_eq!(columnar["outputs"]["class"], json!([1, 0]));
        assert_eq!(columnar["outputs"]["label"], json!(["b", "a"]));
        let answer = tf_serving_response(&logits, &shape(), false);
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
        let request = parse_v2(body.to_string().as_bytes(), &shape()).unwrap();
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
        let err = parse_v2(wrong_shape.to_string().as_bytes(), &shape())
            .unwrap_err()
            .0;
        assert!(err.contains("`inputs[0].shape` is [1, 3]"), "{err}");
        let short = json!({"inputs": [{"name": "input", "shape": [2, 4],
            "datatype": "FP32", "data": [0, 0, 0, 0]}]});
        let err = parse_v2(short.to_string().as_bytes(), &shape())
            .unwrap_err()
            .0;
        assert!(err.contains("has 4 values; shape [2, 4] needs 8"), "{err}");
        let dtype = json!({"inputs": [{"name": "input", "shape": [1, 4],
            "datatype": "FP16", "data": [0, 0, 0, 0]}]});
        assert!(parse_v2(dtype.to_string().as_bytes(), &shape())
            .unwrap_err()
            .0
            .contains("FP16"));
        let output = json!({"inputs": [{"name": "input", "shape": [1, 4],
            "datatype": "FP32", "data": [0, 0, 0, 0]}], "outputs": [{"name": "logits"}]});
        assert!(parse_v2(output.to_string().as_bytes(), &shape())
            .unwrap_err()
            .0
            .contains("`outputs[0].name`"));
        // Sizes whose product wraps around a usize are refused, not multiplied.
        let wraps = json!({"inputs": [{"name": "input", "shape": [1, 1u64 << 62, 16],
            "datatype": "FP32", "data": [0, 0, 0, 0]}]});
        let err = parse_v2(wraps.to_string().as_bytes(), &shape())
            .unwrap_err()
            .0;
        assert!(err.contains("`inputs[0].shape`"), "{err}");
        let many = json!({"inputs": [{"name": "input", "shape": [1u64 << 60, 4],
            "datatype": "FP32", "data": [0, 0, 0, 0]}]});
        let err = parse_v2(many.to_string().as_bytes(), &shape())
            .unwrap_err()
            .0;
        assert!(err.contains("at most"), "{err}");
        let pixels = json!({"inputs": [{"name": "input", "shape": [1, 4],
            "datatype": "UINT8", "data": [0, 0, 0, 300]}]});
        assert!(parse_v2(pixels.to_string().as_bytes(), &shape())
            .unwrap_err()
            .0
            .contains("0..=255"));
    }
}
