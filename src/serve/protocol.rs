//! The two request/response formats the server speaks, as pure functions over JSON.
//!
//! - TF Serving's REST API (`POST /v1/models/NAME:predict`): `{"instances": [...]}` (row
//!   format) or `{"inputs": [...]}` (columnar; one input, so the same list), each instance
//!   an image as flat numbers or nested exactly as the model's `[h, w, c]`; an optional
//!   `signature_name` must be `serving_default`. The answer is `{"predictions":
//!   [{"class", "label", "probabilities"}, ...]}`, TF Serving's row form for several named
//!   outputs (columnar requests get the columnar `{"outputs": {"class": [...], ...}}`).
//! - KServe's Open Inference Protocol v2 (`POST /v2/models/NAME/infer`): one input tensor
//!   `{"name", "shape": [N, H, W, C], "datatype": "FP32" | "UINT8", "data": [...]}`, data
//!   flat or nested exactly as `shape`; the answer has the outputs `probabilities` (FP32
//!   `[N, classes]`) and `class` (INT64 `[N]`), or the ones the request names in
//!   `outputs`. The binary tensor extension is read and written both ways ([`split_binary`],
//!   [`V2Answer`]).
//!
//! FP32 data is the model's input tensor (already preprocessed as `mlops.input` says);
//! UINT8 data is raw pixels, preprocessed here. Errors name the field and what it takes.
//! Values absurdly far outside the model's input range are refused before the forward
//! pass ([`INPUT_RANGE_SLACK`]), and logits that are not finite are never answered
//! ([`check_finite`]).
//!
//! The numbers are flattened into one `Vec<f32>` while parsing: going through a
//! `serde_json::Value` per number cost ~20% of the server's CPU time (perf). The common
//! body forms are read by a cursor of our own ([`super::scan`], about 2.5x faster per
//! number than serde's visitor); every other body by serde (`FlattenInto`), with the
//! same numbers and the same errors.

use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{json, Value};

use super::scan::Cursor;

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

    /// What one image must be, for messages about a nested or ragged one.
    fn forms(&self) -> String {
        let [h, w, c] = self.input.shape;
        format!(
            "nested images must be exactly [{h}, {w}, {c}]; only a flat list of {} values may \
             be reshaped",
            self.input_len()
        )
    }

    /// The input values that pixels 0..=255 become (`mlops.input`), lowest first: the
    /// range the model was trained on.
    pub fn input_range(&self) -> (f32, f32) {
        self.input.preprocess().range()
    }

    /// The input range in words, for errors about values outside it.
    fn describe_range(&self) -> String {
        let (lo, hi) = self.input_range();
        let InputSpec {
            scale, mean, std, ..
        } = self.input;
        format!(
            "values `(pixel * {scale} - {mean}) / {std}` for pixels 0..=255, i.e. from `{}` to \
             `{}`",
            number(lo),
            number(hi)
        )
    }
}

/// How far beyond the model's input range, in multiples of the range's width, an input
/// value may lie. Further out is absurd (`3e38`): refused before the forward pass, which
/// it would drive past the float range or to a meaningless answer. Inside, values only
/// somewhat off (raw pixels sent to a model of `[0, 1]`) still run, as in TF Serving.
pub const INPUT_RANGE_SLACK: f32 = 1000.0;

/// `v` for a message: plain, or in exponent form when large (`3e38`).
fn number(v: f32) -> String {
    if v.abs() >= 1e6 {
        format!("{v:e}")
    } else {
        v.to_string()
    }
}

/// The lowest and highest of `values` (`(inf, -inf)` when empty).
fn min_max(values: &[f32]) -> (f32, f32) {
    values
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        })
}

/// Refuses images with values more than [`INPUT_RANGE_SLACK`] range widths outside the
/// model's input range, naming the first (`name(i)` names image `i` in the request).
fn check_range(
    values: &[f32],
    shape: &ModelShape,
    name: impl Fn(usize) -> String,
) -> Result<(), BadRequest> {
    let (lo, hi) = shape.input_range();
    let width = (hi - lo).abs().max(f32::MIN_POSITIVE);
    let allowed = (lo - INPUT_RANGE_SLACK * width)..=(hi + INPUT_RANGE_SLACK * width);
    if values.iter().all(|v| allowed.contains(v)) {
        return Ok(());
    }
    let len = shape.input_len().max(1);
    let (i, image) = values
        .chunks(len)
        .enumerate()
        .find(|(_, image)| image.iter().any(|v| !allowed.contains(v)))
        .unwrap_or((0, values));
    let (min, max) = min_max(image);
    Err(bad(format!(
        "{} is far outside the model's input range: its values go from `{}` to `{}`; the \
         model takes {} (values more than {INPUT_RANGE_SLACK} times that range's width \
         beyond it are refused before the forward pass)",
        name(i),
        number(min),
        number(max),
        shape.describe_range()
    )))
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

/// The nesting of one image or tensor as sent: the list lengths at each depth, so
/// nested input can be held to the model's shape exactly (only flat input may be
/// reshaped; `[2][392]` or rows of 27, 29, 28 ... values are not an image of 28x28).
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Nesting {
    /// Length of the lists seen at each depth (the first one; the others must match).
    dims: Vec<Option<usize>>,
    /// Depth of the numbers (all must be at the same depth).
    leaf_depth: Option<usize>,
    /// The first irregularity, described for an error message.
    ragged: Option<String>,
}

impl Nesting {
    pub(super) fn list(&mut self, depth: usize, len: usize) {
        if self.dims.len() <= depth {
            self.dims.resize(depth + 1, None);
        }
        match self.dims[depth] {
            None => self.dims[depth] = Some(len),
            Some(first) if first != len && self.ragged.is_none() => {
                self.ragged = Some(format!(
                    "lists at depth {depth} have {first} and {len} values"
                ));
            }
            Some(_) => {}
        }
    }

    #[inline]
    pub(super) fn number(&mut self, depth: usize) {
        match self.leaf_depth {
            None => self.leaf_depth = Some(depth),
            Some(first) if first != depth && self.ragged.is_none() => {
                self.ragged = Some(format!("numbers at depths {first} and {depth}"));
            }
            Some(_) => {}
        }
    }

    /// The regular shape (`[]` for a lone number), or what makes it ragged.
    fn shape(&self) -> Result<Vec<usize>, &str> {
        if let Some(why) = &self.ragged {
            return Err(why);
        }
        let depth = self.leaf_depth.unwrap_or(self.dims.len());
        Ok(self.dims[..depth.min(self.dims.len())]
            .iter()
            .map_while(|d| *d)
            .collect())
    }
}

/// Appends every number of a nested list (or a lone number) to the buffer and records
/// the nesting.
///
/// With `image` set (TF Serving bodies), an object in place of an image is TF Serving's
/// named or binary form: `{"input": IMAGE}` (the model's one input by name) or
/// `{"b64": "..."}` (PNG/JPEG bytes, decoded and preprocessed as `mlops.input` says).
pub(super) struct FlattenInto<'a> {
    values: &'a mut Vec<f32>,
    nesting: &'a mut Nesting,
    depth: usize,
    image: Option<&'a InputSpec>,
}

impl<'a> FlattenInto<'a> {
    pub(super) fn new(values: &'a mut Vec<f32>, nesting: &'a mut Nesting) -> Self {
        FlattenInto {
            values,
            nesting,
            depth: 0,
            image: None,
        }
    }

    fn with_images(
        values: &'a mut Vec<f32>,
        nesting: &'a mut Nesting,
        image: &'a InputSpec,
    ) -> Self {
        FlattenInto {
            values,
            nesting,
            depth: 0,
            image: Some(image),
        }
    }
}

/// The name of the model's one input in TF Serving's named forms (and in metadata).
pub const INPUT_NAME: &str = "input";

/// Decodes a `{"b64": ...}` image into `values` as the model's input (flat).
fn push_b64_image(text: &str, input: &InputSpec, values: &mut Vec<f32>) -> Result<usize, String> {
    use base64::Engine as _;
    // Whitespace and line breaks are allowed in base64 bodies (MIME style); the standard
    // alphabet with padding, as TF Serving and Python's base64.b64encode write it.
    let compact: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(compact.as_bytes())
        .map_err(|e| format!("`b64` is not base64 ({e})"))?;
    let pixels = crate::data::images::decode_image(&bytes, input.shape).map_err(|e| {
        format!(
            "`b64` holds {} bytes that are not a PNG/JPEG image ({e})",
            bytes.len()
        )
    })?;
    let preprocess = input.preprocess();
    values.extend(pixels.iter().map(|&p| preprocess.apply(p as f32)));
    Ok(pixels.len())
}

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
        self.nesting.number(self.depth);
        self.values.push(v);
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.nesting.number(self.depth);
        self.values.push(v as f32);
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.nesting.number(self.depth);
        self.values.push(v as f32);
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut len = 0;
        while seq
            .next_element_seed(FlattenInto {
                values: &mut *self.values,
                nesting: &mut *self.nesting,
                depth: self.depth + 1,
                image: None,
            })?
            .is_some()
        {
            len += 1;
        }
        self.nesting.list(self.depth, len);
        Ok(())
    }

    /// TF Serving's `{"input": IMAGE}` and `{"b64": "..."}` (only where an image starts).
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some(input) = self.image else {
            return Err(de::Error::custom("an object where numbers were expected"));
        };
        let Some(key) = map.next_key::<String>()? else {
            return Err(de::Error::custom(format!(
                "an empty object; send the image as numbers, {{\"{INPUT_NAME}\": ...}} or {{\"b64\": \"...\"}}"
            )));
        };
        match key.as_str() {
            "b64" => {
                let text: String = map.next_value()?;
                let len = push_b64_image(&text, input, self.values).map_err(de::Error::custom)?;
                // A flat image of `len` values.
                self.nesting.list(self.depth, len);
                self.nesting.number(self.depth + 1);
            }
            INPUT_NAME => map.next_value_seed(FlattenInto {
                values: self.values,
                nesting: self.nesting,
                depth: self.depth,
                // `{"input": {"b64": ...}}` is TF Serving's named binary form.
                image: Some(input),
            })?,
            other => {
                return Err(de::Error::custom(format!(
                    "the object names `{other}`; this model has one input, `{INPUT_NAME}` (or send {{\"b64\": \"...\"}} image bytes)"
                )))
            }
        }
        if let Some(extra) = map.next_key::<String>()? {
            return Err(de::Error::custom(format!(
                "the object has `{key}` and `{extra}`; this model has one input, `{INPUT_NAME}`"
            )));
        }
        Ok(())
    }
}

/// A list of images: all their numbers in one buffer and each one's count and nesting.
#[derive(Default)]
struct Instances {
    values: Vec<f32>,
    counts: Vec<usize>,
    nestings: Vec<Nesting>,
    /// Images past [`MAX_IMAGES_PER_REQUEST`]: counted, not kept.
    skipped: usize,
}

/// Parses `field`'s list of images (the name goes into error messages); images may be
/// TF Serving objects (`{"input": ...}`, `{"b64": ...}`) read with the model's input.
struct InstancesSeed<'a>(&'static str, &'a InputSpec);

impl<'de> DeserializeSeed<'de> for InstancesSeed<'_> {
    type Value = Instances;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Instances, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for InstancesSeed<'_> {
    type Value = Instances;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "`{}`: a list of images", self.0)
    }

    /// TF Serving's columnar form with named inputs: `{"inputs": {"input": [...]}}`.
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Instances, A::Error> {
        let key = map.next_key::<String>()?;
        if key.as_deref() != Some(INPUT_NAME) {
            return Err(de::Error::custom(format!(
                "`{}` names {}; this model has one input, `{INPUT_NAME}`",
                self.0,
                key.map_or("no input".to_string(), |k| format!("`{k}`"))
            )));
        }
        let instances = map.next_value_seed(InstancesSeed(self.0, self.1))?;
        if let Some(extra) = map.next_key::<String>()? {
            return Err(de::Error::custom(format!(
                "`{}` names `{INPUT_NAME}` and `{extra}`; this model has one input",
                self.0
            )));
        }
        Ok(instances)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Instances, A::Error> {
        let mut out = Instances::default();
        loop {
            if out.counts.len() == MAX_IMAGES_PER_REQUEST {
                // Refused anyway: only count the rest (the body size bounds them).
                match seq.next_element::<IgnoredAny>()? {
                    Some(_) => {
                        out.skipped += 1;
                        continue;
                    }
                    None => return Ok(out),
                }
            }
            let before = out.values.len();
            let mut nesting = Nesting::default();
            let next = seq.next_element_seed(FlattenInto::with_images(
                &mut out.values,
                &mut nesting,
                self.1,
            ));
            match next {
                Ok(Some(())) => {
                    out.counts.push(out.values.len() - before);
                    out.nestings.push(nesting);
                }
                Ok(None) => return Ok(out),
                Err(e) => {
                    let at = out.counts.len();
                    return Err(de::Error::custom(format!(
                        "`{}[{at}]` is not an image: {e}",
                        self.0
                    )));
                }
            }
        }
    }
}

/// TF Serving's one signature name; a request naming another is refused.
pub const SIGNATURE_NAME: &str = "serving_default";

/// A TF Serving predict body: `instances` or `inputs`, and `signature_name`; other keys
/// are ignored.
struct TfRequest {
    found: Option<(&'static str, Instances)>,
    signature: Option<String>,
}

/// Reads a [`TfRequest`] with the model's input (for `b64` images).
struct TfRequestSeed<'a>(&'a InputSpec);

impl<'de> DeserializeSeed<'de> for TfRequestSeed<'_> {
    type Value = TfRequest;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<TfRequest, D::Error> {
        struct Fields<'a>(&'a InputSpec);
        impl<'de> Visitor<'de> for Fields<'_> {
            type Value = TfRequest;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object with `instances`")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TfRequest, A::Error> {
                let mut request = TfRequest {
                    found: None,
                    signature: None,
                };
                while let Some(key) = map.next_key::<String>()? {
                    let field = match key.as_str() {
                        "instances" => "instances",
                        "inputs" => "inputs",
                        "signature_name" => {
                            request.signature = Some(map.next_value::<String>()?);
                            continue;
                        }
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    if request.found.is_some() {
                        return Err(de::Error::custom("give `instances` or `inputs`, not both"));
                    }
                    request.found =
                        Some((field, map.next_value_seed(InstancesSeed(field, self.0))?));
                }
                Ok(request)
            }
        }
        d.deserialize_map(Fields(self.0))
    }
}

/// [`TfRequestSeed`]'s result by the fast path ([`super::scan`]) for its common form: an object
/// of `instances` or `inputs`, a list of images of numbers, and `signature_name`; `None`
/// for anything else (serde reads those).
fn tf_request_scanned(body: &[u8]) -> Option<TfRequest> {
    let mut cursor = Cursor::new(body);
    let mut request = TfRequest {
        found: None,
        signature: None,
    };
    cursor.object(|cursor, key| {
        let field = match key {
            "instances" => "instances",
            "inputs" => "inputs",
            "signature_name" if request.signature.is_none() => {
                request.signature = Some(cursor.string()?.to_string());
                return Some(());
            }
            _ => return None,
        };
        if request.found.is_some() {
            return None;
        }
        let mut out = Instances::default();
        cursor.list(|cursor| {
            if out.counts.len() == MAX_IMAGES_PER_REQUEST {
                return None;
            }
            let (before, mut nesting) = (out.values.len(), Nesting::default());
            cursor.numbers(0, &mut out.values, &mut nesting)?;
            out.counts.push(out.values.len() - before);
            out.nestings.push(nesting);
            Some(())
        })?;
        request.found = Some((field, out));
        Some(())
    })?;
    cursor.end()?;
    Some(request)
}

/// Parses `body` with `seed`, refusing trailing bytes as `serde_json::from_slice` does.
fn from_slice_seed<'de, S: DeserializeSeed<'de>>(
    body: &'de [u8],
    seed: S,
) -> Result<S::Value, serde_json::Error> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let value = seed.deserialize(&mut deserializer)?;
    deserializer.end()?;
    Ok(value)
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

/// Checks one image's nesting: flat with `len` values, or nested exactly as the model's
/// `[h, w, c]`. `name` is the image's field (`instances[3]`).
fn check_image(
    name: &str,
    count: usize,
    nesting: &Nesting,
    shape: &ModelShape,
) -> Result<(), BadRequest> {
    let len = shape.input_len();
    let dims = match nesting.shape() {
        Ok(dims) => dims,
        Err(why) => {
            return Err(bad(format!(
                "`{name}` is ragged ({why}); {}",
                shape.forms()
            )))
        }
    };
    if dims.len() <= 1 {
        if count == len && dims.len() == 1 {
            return Ok(());
        }
        let what = if dims.is_empty() {
            "is a single number".to_string()
        } else {
            format!("has {count} values")
        };
        return Err(bad(format!(
            "`{name}` {what}; the model takes {}",
            shape.describe()
        )));
    }
    if dims == shape.input.shape {
        return Ok(());
    }
    Err(bad(format!(
        "`{name}` has shape {dims:?} ({count} values); {} (the model takes {})",
        shape.forms(),
        shape.describe()
    )))
}

/// Parses a TF Serving predict body into `[count, h, w, c]` input values.
///
/// # Errors
/// [`BadRequest`] (400) naming the field when the body is not JSON or not of the API's
/// form, `signature_name` is not [`SIGNATURE_NAME`], there is neither `instances` nor
/// `inputs` (or both), the list is empty or holds more than [`MAX_IMAGES_PER_REQUEST`]
/// images, an image is not numbers, is ragged or not of the model's shape (flat
/// `h * w * c`, or nested exactly `[h, w, c]`), or a value lies more than
/// [`INPUT_RANGE_SLACK`] range widths outside the model's input range.
pub fn parse_tf_serving(body: &[u8], shape: &ModelShape) -> Result<TfServingRequest, BadRequest> {
    let TfRequest { found, signature } = match tf_request_scanned(body) {
        Some(request) => request,
        None => from_slice_seed(body, TfRequestSeed(&shape.input)).map_err(unreadable)?,
    };
    if let Some(name) = signature {
        if !name.is_empty() && name != SIGNATURE_NAME {
            return Err(bad(format!(
                "`signature_name` is `{name}`; this model has [\"{SIGNATURE_NAME}\"]"
            )));
        }
    }
    let Some((field, instances)) = found else {
        return Err(bad(format!(
            "expected {{\"instances\": [image, ...]}} with each image {}",
            shape.describe()
        )));
    };
    if instances.counts.is_empty() {
        return Err(bad(format!("`{field}` is empty")));
    }
    let images = instances.counts.len() + instances.skipped;
    if images > MAX_IMAGES_PER_REQUEST {
        return Err(bad(format!(
            "`{field}` has {images} images; send at most {MAX_IMAGES_PER_REQUEST} per request"
        )));
    }
    for (i, (&count, nesting)) in instances.counts.iter().zip(&instances.nestings).enumerate() {
        check_image(&format!("{field}[{i}]"), count, nesting, shape)?;
    }
    check_range(&instances.values, shape, |i| format!("`{field}[{i}]`"))?;
    Ok(TfServingRequest {
        batch: Batch {
            count: instances.counts.len(),
            images: instances.values,
        },
        columnar: field == "inputs",
    })
}

/// Why logits cannot be answered: a prediction is only made of finite numbers.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Unanswerable {
    /// The image's values lie outside the model's input range and drove the forward pass
    /// past the float range: the client's to fix (400).
    #[error("{0}")]
    OutOfRange(String),
    /// The image lies within the model's input range and still gave non-finite logits:
    /// the artifact is broken (500).
    #[error("{0}")]
    BrokenModel(String),
}

/// Checks that every image's logits are finite. `images` are the inputs the logits came
/// from (`[count, h, w, c]`), `name(i)` names image `i` in the request
/// (`` `instances[3]` ``). `logits` are `[count, classes]`.
///
/// # Errors
/// For the first image with a non-finite logit: [`Unanswerable::OutOfRange`] when its
/// values lie outside the model's input range (the client's to fix), else
/// [`Unanswerable::BrokenModel`].
pub fn check_finite(
    logits: &[f32],
    images: &[f32],
    shape: &ModelShape,
    name: impl Fn(usize) -> String,
) -> Result<(), Unanswerable> {
    let classes = shape.labels.len().max(1);
    let Some(bad_image) = logits
        .chunks_exact(classes)
        .position(|row| row.iter().any(|v| !v.is_finite()))
    else {
        return Ok(());
    };
    let len = shape.input_len();
    let image = images
        .get(bad_image * len..(bad_image + 1) * len)
        .unwrap_or(&[]);
    let (lo, hi) = shape.input_range();
    let (min, max) = min_max(image);
    // Float rounding in a client's own preprocessing is not "out of range".
    let slack = (hi - lo).abs() * 1e-3 + 1e-6;
    let range = shape.describe_range();
    let who = name(bad_image);
    if min >= lo - slack && max <= hi + slack {
        return Err(Unanswerable::BrokenModel(format!(
            "the model gave non-finite logits for {who}, whose values lie within its input \
             range ({range}): the artifact is broken; check it with `mlops eval`"
        )));
    }
    Err(Unanswerable::OutOfRange(format!(
        "{who} is outside the model's input range: its values go from `{}` to `{}` and the \
         forward pass gave non-finite logits; the model takes {range}",
        number(min),
        number(max)
    )))
}

use crate::predict::softmax;

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

/// Parses the guide's `POST /predict` body, `{"input": X}` (other keys ignored), as its
/// Flask/FastAPI server reads it (`np.array(input).reshape(-1, 28, 28, 1)`): `X` is one
/// image (any nesting of exactly `h * w * c` numbers, or `{"b64": "..."}`) or a list of
/// such images.
///
/// # Errors
/// [`BadRequest`] naming what is wrong: not JSON, no `input`, an image of the wrong size
/// (saying how many values it takes), more than [`MAX_IMAGES_PER_REQUEST`] images, values
/// far outside the input range.
pub fn parse_guide(body: &[u8], shape: &ModelShape) -> Result<Batch, BadRequest> {
    let parsed = match guide_scanned(body) {
        Some(input) => Some(input),
        None => from_slice_seed(body, GuideBodySeed(&shape.input)).map_err(unreadable)?,
    };
    let Some(input) = parsed else {
        return Err(bad(format!(
            "expected {{\"input\": IMAGE}} or {{\"input\": [IMAGE, ...]}} with each image {}",
            shape.describe()
        )));
    };
    let len = shape.input_len();
    let total = input.values.len();
    // One image when it has exactly one image's values (or is a `b64` object); a list of
    // numbers is one image of the wrong size; a list of lists or objects, several images.
    let images = if input.object || total == len {
        1
    } else if input.numbers_at_top || input.items.is_empty() {
        return Err(bad(format!(
            "`input` has {total} values; the model takes {}",
            shape.describe()
        )));
    } else {
        if input.items.len() > MAX_IMAGES_PER_REQUEST {
            return Err(bad(format!(
                "`input` has {} images; send at most {MAX_IMAGES_PER_REQUEST} per request",
                input.items.len()
            )));
        }
        if let Some((i, n)) = input.items.iter().enumerate().find(|(_, &n)| n != len) {
            return Err(bad(format!(
                "`input[{i}]` has {n} values; the model takes {} (or send one image as `input`)",
                shape.describe()
            )));
        }
        input.items.len()
    };
    check_range(&input.values, shape, |i| format!("`input[{i}]`"))?;
    Ok(Batch {
        images: input.values,
        count: images,
    })
}

/// The guide's `input`, flattened while parsed (no `serde_json::Value`: it doubled the
/// endpoint's CPU time): all numbers, and per top-level list item its count.
#[derive(Default)]
struct GuideInput {
    values: Vec<f32>,
    /// Numbers per top-level item (when `input` is a list).
    items: Vec<usize>,
    /// Some top-level item is a number (so `input` is one flat image).
    numbers_at_top: bool,
    /// `input` is an object (`{"b64": ...}`): one image.
    object: bool,
}

/// [`GuideBodySeed`]'s result by the fast path ([`super::scan`]) for its common form,
/// `{"input": [...]}` with lists of numbers; `None` for anything else (serde reads it).
fn guide_scanned(body: &[u8]) -> Option<GuideInput> {
    let mut cursor = Cursor::new(body);
    let mut found = None;
    cursor.object(|cursor, key| {
        if key != INPUT_NAME || found.is_some() || cursor.peek()? != b'[' {
            return None;
        }
        let mut input = GuideInput::default();
        cursor.list(|cursor| {
            let (before, mut nesting) = (input.values.len(), Nesting::default());
            cursor.numbers(0, &mut input.values, &mut nesting)?;
            if nesting.leaf_depth == Some(0) {
                input.numbers_at_top = true;
            }
            input.items.push(input.values.len() - before);
            Some(())
        })?;
        found = Some(input);
        Some(())
    })?;
    cursor.end()?;
    found
}

/// Reads `{"input": ..., ...}` (other keys ignored); `None` without `input`.
struct GuideBodySeed<'a>(&'a InputSpec);

impl<'de> DeserializeSeed<'de> for GuideBodySeed<'_> {
    type Value = Option<GuideInput>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for GuideBodySeed<'_> {
    type Value = Option<GuideInput>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object with `input`")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(key) = map.next_key::<String>()? {
            if key == INPUT_NAME && found.is_none() {
                found = Some(map.next_value_seed(GuideInputSeed(self.0))?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }
}

/// Reads the `input` value itself.
struct GuideInputSeed<'a>(&'a InputSpec);

impl<'de> DeserializeSeed<'de> for GuideInputSeed<'_> {
    type Value = GuideInput;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<GuideInput, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for GuideInputSeed<'_> {
    type Value = GuideInput;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("`input`: an image or a list of images")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<GuideInput, A::Error> {
        let mut input = GuideInput {
            object: true,
            ..GuideInput::default()
        };
        let mut nesting = Nesting::default();
        FlattenInto::with_images(&mut input.values, &mut nesting, self.0).visit_map(map)?;
        Ok(input)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<GuideInput, A::Error> {
        let mut input = GuideInput::default();
        loop {
            let before = input.values.len();
            let mut nesting = Nesting::default();
            let next = seq.next_element_seed(FlattenInto::with_images(
                &mut input.values,
                &mut nesting,
                self.0,
            ));
            match next {
                Ok(Some(())) => {
                    if nesting.leaf_depth == Some(0) {
                        input.numbers_at_top = true;
                    }
                    input.items.push(input.values.len() - before);
                }
                Ok(None) => return Ok(input),
                Err(e) => {
                    return Err(de::Error::custom(format!(
                        "`input[{}]` is not an image: {e}",
                        input.items.len()
                    )))
                }
            }
        }
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<GuideInput, E> {
        Ok(GuideInput {
            values: vec![0.0],
            numbers_at_top: true,
            ..GuideInput::default()
        })
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<GuideInput, E> {
        self.visit_f64(v as f64)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<GuideInput, E> {
        self.visit_f64(v as f64)
    }
}

/// The guide's `/predict` answer: `predictions` as Keras' `model.predict(...).tolist()`
/// (one probability list per image), with the classes and labels beside.
pub fn guide_response(logits: &[f32], shape: &ModelShape) -> Value {
    let classes = shape.labels.len();
    let rows = logits.chunks_exact(classes);
    let class: Vec<usize> = rows.clone().map(crate::runtime::argmax).collect();
    let label: Vec<&str> = class.iter().map(|&c| shape.labels[c].as_str()).collect();
    let probabilities: Vec<Vec<f32>> = rows.map(softmax).collect();
    json!({
        "predictions": probabilities,
        "classes": class,
        "labels": label,
        "status": "success",
    })
}

/// The outputs a v2 request may ask for.
pub const V2_OUTPUTS: [&str; 2] = ["probabilities", "class"];

/// A parsed v2 request: the images and the outputs to return.
#[derive(Debug, Clone, PartialEq)]
pub struct V2Request {
    /// The input tensor's images.
    pub batch: Batch,
    /// Names from [`V2_OUTPUTS`], in the order to return them, each with whether it goes
    /// back as binary data (the binary tensor extension's `binary_data`, or the request's
    /// `binary_data_output`).
    pub outputs: Vec<(&'static str, bool)>,
    /// The request's `id`, echoed back.
    pub id: Option<Value>,
}

/// One tensor's numbers, flattened, and their nesting as sent.
struct Flat(Vec<f32>, Nesting);

impl<'de> Deserialize<'de> for Flat {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (mut values, mut nesting) = (Vec::new(), Nesting::default());
        FlattenInto::new(&mut values, &mut nesting).deserialize(d)?;
        Ok(Flat(values, nesting))
    }
}

#[derive(Deserialize)]
struct V2Body {
    inputs: Vec<V2Input>,
    outputs: Option<Vec<V2Output>>,
    id: Option<Value>,
    parameters: Option<Value>,
}

#[derive(Deserialize)]
struct V2Input {
    shape: Vec<usize>,
    datatype: String,
    data: Option<Flat>,
    parameters: Option<Value>,
}

#[derive(Deserialize)]
struct V2Output {
    name: String,
    parameters: Option<Value>,
}

/// A [`V2Body`] by the fast path ([`super::scan`]) for its common form: only `inputs`, each
/// with `name`, `shape`, `datatype` and `data` (lists of numbers); `None` for anything
/// else (serde reads it).
fn v2_scanned(json: &[u8]) -> Option<V2Body> {
    let mut cursor = Cursor::new(json);
    let mut inputs = None;
    cursor.object(|cursor, key| {
        if key != "inputs" || inputs.is_some() {
            return None;
        }
        let mut list = Vec::new();
        cursor.list(|cursor| {
            list.push(v2_input_scanned(cursor)?);
            Some(())
        })?;
        inputs = Some(list);
        Some(())
    })?;
    cursor.end()?;
    Some(V2Body {
        inputs: inputs?,
        outputs: None,
        id: None,
        parameters: None,
    })
}

fn v2_input_scanned(cursor: &mut Cursor) -> Option<V2Input> {
    let (mut named, mut shape, mut datatype, mut data) = (false, None, None, None);
    cursor.object(|cursor, key| {
        match key {
            "name" if !named => {
                cursor.string()?;
                named = true;
            }
            "shape" if shape.is_none() => {
                let mut dims = Vec::new();
                cursor.list(|cursor| {
                    dims.push(usize::try_from(cursor.integer()?).ok()?);
                    Some(())
                })?;
                shape = Some(dims);
            }
            "datatype" if datatype.is_none() => datatype = Some(cursor.string()?.to_string()),
            "data" if data.is_none() => {
                let (mut values, mut nesting) = (Vec::new(), Nesting::default());
                cursor.numbers(0, &mut values, &mut nesting)?;
                data = Some(Flat(values, nesting));
            }
            _ => return None,
        }
        Some(())
    })?;
    Some(V2Input {
        shape: shape?,
        datatype: datatype?,
        data,
        parameters: None,
    })
}

/// The header of the KServe v2 binary tensor extension (tritonclient's `binary_data=True`):
/// the length of the JSON part of the body; tensor bytes follow it.
pub const BINARY_HEADER: &str = "inference-header-content-length";

/// The extension's name in `GET /v2` (as Triton reports it).
pub const BINARY_EXTENSION: &str = "binary_tensor_data";

/// A v2 boolean parameter `key` (absent: `None`).
fn parameter_bool(parameters: Option<&Value>, key: &str) -> Option<bool> {
    parameters.and_then(|p| p.get(key)).and_then(Value::as_bool)
}

/// Splits a v2 body into its JSON part and its binary tensor bytes, by the
/// `Inference-Header-Content-Length` value (`None`: all JSON).
///
/// # Errors
/// [`BadRequest`] when the header is not a number or is longer than the body.
pub fn split_binary<'a>(
    body: &'a [u8],
    header: Option<&str>,
) -> Result<(&'a [u8], &'a [u8]), BadRequest> {
    let Some(header) = header else {
        return Ok((body, &[]));
    };
    let json_len: usize = header.trim().parse().map_err(|_| {
        bad(format!(
            "`Inference-Header-Content-Length: {header}` is not a byte count"
        ))
    })?;
    if json_len > body.len() {
        return Err(bad(format!(
            "`Inference-Header-Content-Length` is {json_len} but the body has {} bytes",
            body.len()
        )));
    }
    Ok(body.split_at(json_len))
}

/// Parses a KServe v2 infer body into `[count, h, w, c]` input values (UINT8 pixels
/// preprocessed as `mlops.input` says). `json` is the JSON part and `binary` the tensor
/// bytes after it ([`split_binary`]; empty without the binary tensor extension): an input
/// with `parameters.binary_data_size` takes its values from there, little-endian, row
/// major (FP32: 4 bytes per value, UINT8: 1).
///
/// # Errors
/// [`BadRequest`] (400) naming the field when the body is not JSON or not of the API's
/// form, has other than one input, a `shape` that is not `[N, ...]` with `h * w * c`
/// values per image (or more than [`MAX_IMAGES_PER_REQUEST`] images), `data` missing, of
/// the wrong length, ragged or nested unlike `shape`, both `data` and
/// `binary_data_size`, a `binary_data_size` that does not match the shape or the bytes
/// sent (or bytes left over), a `datatype` other than FP32 or UINT8, UINT8 data that are
/// not integers in `0..=255`, FP32 values that are not finite or more than
/// [`INPUT_RANGE_SLACK`] range widths outside the input range, or an unknown output name.
pub fn parse_v2(json: &[u8], binary: &[u8], shape: &ModelShape) -> Result<V2Request, BadRequest> {
    let body: V2Body = match v2_scanned(json) {
        Some(body) => body,
        None => serde_json::from_slice(json).map_err(unreadable)?,
    };
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
    let binary_size = input
        .parameters
        .as_ref()
        .and_then(|p| p.get("binary_data_size"));
    let mut values = match (binary_size, input.data) {
        (Some(_), Some(_)) => {
            return Err(bad(
                "`inputs[0]` has both `data` and `parameters.binary_data_size`; send one",
            ))
        }
        (Some(size), None) => {
            let size = size.as_u64().ok_or_else(|| {
                bad("`inputs[0].parameters.binary_data_size` is not a byte count")
            })?;
            binary_values(size, binary, &input.datatype, count * len)?
        }
        (None, Some(Flat(values, nesting))) => {
            if !binary.is_empty() {
                return Err(bad(format!(
                    "the body has {} bytes after its JSON part but no input names them (`parameters.binary_data_size`)",
                    binary.len()
                )));
            }
            if values.len() != count * len {
                return Err(bad(format!(
                    "`inputs[0].data` has {} values; shape {dims:?} needs {}",
                    values.len(),
                    count * len
                )));
            }
            // Flat (row-major, as the protocol sends it) or nested exactly as `shape`.
            match nesting.shape() {
                Ok(nested) if nested.len() == 1 || nested == dims => {}
                Ok(nested) => {
                    return Err(bad(format!(
                        "`inputs[0].data` is nested as {nested:?} but `shape` is {dims:?}; send it flat (row-major) or nested exactly as `shape`"
                    )))
                }
                Err(why) => {
                    return Err(bad(format!(
                        "`inputs[0].data` is ragged ({why}); send it flat (row-major) or nested exactly as `shape` {dims:?}"
                    )))
                }
            }
            values
        }
        (None, None) => {
            return Err(bad(
                "`inputs[0].data` is missing: send the tensor's values as a JSON list, or as binary data (`parameters.binary_data_size` and `Inference-Header-Content-Length`)",
            ))
        }
    };
    match input.datatype.as_str() {
        "FP32" => {
            if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                return Err(bad(format!(
                    "image {} of `inputs[0]` holds a value that is not finite",
                    i / len
                )));
            }
            check_range(&values, shape, |i| format!("image {i} of `inputs[0].data`"))?
        }
        "UINT8" => {
            let preprocess = shape.input.preprocess();
            if values
                .iter()
                .any(|&p| !(0.0..=255.0).contains(&p) || p.fract() != 0.0)
            {
                return Err(bad("`inputs[0].data` holds UINT8 pixels: integers 0..=255"));
            }
            for v in &mut values {
                *v = preprocess.apply(*v);
            }
        }
        other => {
            return Err(bad(format!(
                "`inputs[0].datatype` is `{other}`; use FP32 (the input tensor) or UINT8 (pixels)"
            )))
        }
    }
    let all_binary =
        parameter_bool(body.parameters.as_ref(), "binary_data_output").unwrap_or(false);
    let outputs = match body.outputs {
        None => V2_OUTPUTS.iter().map(|&o| (o, all_binary)).collect(),
        Some(asked) => asked
            .iter()
            .enumerate()
            .map(|(i, o)| {
                let name = V2_OUTPUTS
                    .iter()
                    .copied()
                    .find(|known| *known == o.name)
                    .ok_or_else(|| {
                        bad(format!(
                            "`outputs[{i}].name` is `{}`; this model has {V2_OUTPUTS:?}",
                            o.name
                        ))
                    })?;
                let binary =
                    parameter_bool(o.parameters.as_ref(), "binary_data").unwrap_or(all_binary);
                Ok((name, binary))
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

/// The values of a binary input of `size` bytes: FP32 or UINT8, little-endian, exactly
/// `values` of them and exactly the bytes sent.
fn binary_values(
    size: u64,
    binary: &[u8],
    datatype: &str,
    values: usize,
) -> Result<Vec<f32>, BadRequest> {
    let width = match datatype {
        "FP32" => 4,
        "UINT8" => 1,
        other => {
            return Err(bad(format!(
                "`inputs[0].datatype` is `{other}`; use FP32 (the input tensor) or UINT8 (pixels)"
            )))
        }
    };
    let expected = values * width;
    if size != expected as u64 {
        return Err(bad(format!(
            "`inputs[0].parameters.binary_data_size` is {size}; {values} {datatype} values take {expected} bytes"
        )));
    }
    if binary.len() != expected {
        return Err(bad(format!(
            "the body has {} bytes after its JSON part (`Inference-Header-Content-Length`); `binary_data_size` says {expected}",
            binary.len()
        )));
    }
    Ok(if width == 4 {
        binary
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    } else {
        binary.iter().map(|&b| f32::from(b)).collect()
    })
}

/// A v2 answer: the JSON part, and the binary tensor bytes that follow it (empty when
/// every output went back as JSON).
#[derive(Debug, Clone, PartialEq)]
pub struct V2Answer {
    /// The response object.
    pub json: Value,
    /// Binary outputs, in the order of `outputs`, little-endian.
    pub binary: Vec<u8>,
}

/// The v2 answer for `logits` (`[count, classes]`): the named `outputs` (as JSON `data`
/// or, when asked, binary with `parameters.binary_data_size`), and `id` echoed.
pub fn v2_response(
    model: &str,
    version: u64,
    outputs: &[(&str, bool)],
    id: Option<&Value>,
    logits: &[f32],
    classes: usize,
) -> V2Answer {
    let count = logits.len() / classes;
    let mut binary = Vec::new();
    let outputs: Vec<Value> = outputs
        .iter()
        .map(|&(name, as_binary)| {
            let (datatype, shape, data): (&str, Value, Value) = match name {
                "probabilities" => {
                    let p: Vec<f32> = logits.chunks_exact(classes).flat_map(softmax).collect();
                    let data = if as_binary {
                        binary.extend(p.iter().flat_map(|v| v.to_le_bytes()));
                        Value::Null
                    } else {
                        json!(p)
                    };
                    ("FP32", json!([count, classes]), data)
                }
                _ => {
                    let c: Vec<i64> = logits
                        .chunks_exact(classes)
                        .map(|r| crate::runtime::argmax(r) as i64)
                        .collect();
                    let data = if as_binary {
                        binary.extend(c.iter().flat_map(|v| v.to_le_bytes()));
                        Value::Null
                    } else {
                        json!(c)
                    };
                    ("INT64", json!([count]), data)
                }
            };
            if as_binary {
                let size = match datatype {
                    "FP32" => count * classes * 4,
                    _ => count * 8,
                };
                json!({"name": name, "datatype": datatype, "shape": shape,
                       "parameters": {"binary_data_size": size}})
            } else {
                json!({"name": name, "datatype": datatype, "shape": shape, "data": data})
            }
        })
        .collect();
    let mut answer = json!({
        "model_name": model, "model_version": version.to_string(), "outputs": outputs,
    });
    if let Some(id) = id {
        answer["id"] = id.clone();
    }
    V2Answer {
        json: answer,
        binary,
    }
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
        let body = json!({"instances": [[[[0.0], [1.0]], [[0.5], [0.25]]], [1, 2, 3, 4]]});
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
        assert!(err.contains("`inputs[0]` is not an image"), "{err}");
        assert!(parse_tf_serving(b"{}", &shape()).is_err());
        let huge = br#"{"instances": [[1e300, 0, 0, 0]]}"#;
        let err = parse_tf_serving(huge, &shape()).unwrap_err().0;
        assert!(err.contains("float32 range"), "{err}");
    }

    /// The scanner's path ([`super::super::scan`]) and serde's give the same images bit
    /// for bit and the same errors: each body is parsed as sent (scanned) and with an
    /// extra key (which sends it to serde).
    #[test]
    fn scanned_and_serde_bodies_agree() {
        let shape = shape();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        // Python's full-precision reprs, signs, exponents, integers, nested and flat.
        let nested = "[[[0.050980392156862744], [-0.0]], [[1e-3], [0.5019607843137255]]]";
        let images = [
            nested.to_string(),
            "[0.1, 0.2, 7, -0.3]".to_string(),
            "[[0.1, 0.2], [0.3]]".to_string(),
            "[[0.1], [0.2], [0.3], [0.4], [0.5]]".to_string(),
            "[1, 2, 3]".to_string(),
            "[]".to_string(),
        ];
        for image in &images {
            // A ragged image is left to serde by the scanner too (its error is serde's).
            let ragged = image == "[[0.1, 0.2], [0.3]]";
            let scanned = format!(
                r#"{{"instances": [{image}, {nested}], "signature_name": "serving_default"}}"#
            );
            let by_serde = format!(r#"{{"instances": [{image}, {nested}], "other": null}}"#);
            assert_eq!(
                tf_request_scanned(scanned.as_bytes()).is_some(),
                !ragged,
                "{scanned}"
            );
            assert!(
                tf_request_scanned(by_serde.as_bytes()).is_none(),
                "{by_serde}"
            );
            let (a, b) = (
                parse_tf_serving(scanned.as_bytes(), &shape),
                parse_tf_serving(by_serde.as_bytes(), &shape),
            );
            match (a, b) {
                (Ok(a), Ok(b)) => {
                    assert_eq!(bits(&a.batch.images), bits(&b.batch.images), "{image}");
                    assert_eq!((a.batch.count, a.columnar), (b.batch.count, b.columnar));
                }
                (a, b) => assert_eq!(a.map(|_| ()), b.map(|_| ()), "{image}"),
            }

            let flat = image.replace(['[', ']'], "");
            let v2 = |extra: &str| {
                format!(
                    r#"{{"inputs": [{{"name": "input", "shape": [1, 2, 2, 1], "datatype": "FP32", "data": [{flat}]}}]{extra}}}"#
                )
            };
            let (scanned, by_serde) = (v2(""), v2(r#", "id": "x""#));
            assert!(v2_scanned(scanned.as_bytes()).is_some(), "{scanned}");
            assert!(v2_scanned(by_serde.as_bytes()).is_none(), "{by_serde}");
            match (
                parse_v2(scanned.as_bytes(), &[], &shape),
                parse_v2(by_serde.as_bytes(), &[], &shape),
            ) {
                (Ok(a), Ok(b)) => {
                    assert_eq!(bits(&a.batch.images), bits(&b.batch.images), "{flat}");
                    assert_eq!(a.outputs, b.outputs);
                }
                (a, b) => assert_eq!(a.map(|_| ()), b.map(|_| ()), "{flat}"),
            }

            // The guide's `input`: one image, or a list of them.
            // (Unwrapped, each row of the ragged image is an item on its own.)
            for (input, ragged) in [(format!("[{image}]"), ragged), (image.clone(), false)] {
                let (scanned, by_serde) = (
                    format!(r#"{{"input": {input}}}"#),
                    format!(r#"{{"input": {input}, "other": 1}}"#),
                );
                assert_eq!(
                    guide_scanned(scanned.as_bytes()).is_some(),
                    !ragged,
                    "{scanned}"
                );
                assert!(guide_scanned(by_serde.as_bytes()).is_none(), "{by_serde}");
                match (
                    parse_guide(scanned.as_bytes(), &shape),
                    parse_guide(by_serde.as_bytes(), &shape),
                ) {
                    (Ok(a), Ok(b)) => {
                        assert_eq!(bits(&a.images), bits(&b.images), "{input}");
                        assert_eq!(a.count, b.count);
                    }
                    (a, b) => assert_eq!(a.map(|_| ()), b.map(|_| ()), "{input}"),
                }
            }
        }
    }

    /// Shapes that are not plain JSON integers of at most 18 digits are serde's to judge.
    #[test]
    fn v2_shapes_the_scanner_leaves_to_serde() {
        for dims in [
            "-0",
            "1.0",
            "01",
            "1e0",
            "-1",
            "1234567890123456789",
            "\"1\"",
            "null",
        ] {
            let body = format!(
                r#"{{"inputs": [{{"name": "input", "shape": [{dims}, 2, 2, 1], "datatype": "FP32", "data": [0, 0, 0, 0]}}]}}"#
            );
            assert!(v2_scanned(body.as_bytes()).is_none(), "{body}");
            assert!(parse_v2(body.as_bytes(), &[], &shape()).is_err(), "{body}");
        }
    }

    fn tf_error(body: Value) -> String {
        parse_tf_serving(body.to_string().as_bytes(), &shape())
            .unwrap_err()
            .0
    }

    /// Issue 10: nested images are held to the model's shape exactly; only flat ones are
    /// reshaped (rows of 1 and 3 values, `[4][1]` or `[1][4]` made 4 values and ran).
    #[test]
    fn nested_images_must_match_the_model_shape() {
        let ragged = tf_error(json!({"instances": [[[[0], [1]], [[2], [3]]], [[0, 1, 2], [3]]]}));
        assert!(ragged.contains("`instances[1]` is ragged"), "{ragged}");
        assert!(ragged.contains("[2, 2, 1]"), "{ragged}");
        let reshaped = tf_error(json!({"instances": [[[0], [1], [2], [3]]]}));
        assert!(
            reshaped.contains("`instances[0]` has shape [4, 1]"),
            "{reshaped}"
        );
        let two_rows = tf_error(json!({"inputs": [[[0, 1, 2, 3]]]}));
        assert!(
            two_rows.contains("`inputs[0]` has shape [1, 4]"),
            "{two_rows}"
        );
        let depths = tf_error(json!({"instances": [[[[0], [1]], [[2], 3]]]}));
        assert!(depths.contains("ragged (numbers at depths"), "{depths}");
        let lone = tf_error(json!({"instances": [7]}));
        assert!(lone.contains("`instances[0]` is a single number"), "{lone}");
        let empty = tf_error(json!({"instances": [[]]}));
        assert!(empty.contains("has 0 values"), "{empty}");

        let nested = |data: Value| {
            json!({"inputs": [{"name": "input", "shape": [1, 2, 2, 1], "datatype": "FP32",
                "data": data}]})
        };
        let ok = nested(json!([[[[0], [1]], [[2], [3]]]]));
        assert!(parse_v2(ok.to_string().as_bytes(), &[], &shape()).is_ok());
        let flat = nested(json!([0, 1, 2, 3]));
        assert!(parse_v2(flat.to_string().as_bytes(), &[], &shape()).is_ok());
        let wrong = nested(json!([[0, 1], [2, 3]]));
        let err = parse_v2(wrong.to_string().as_bytes(), &[], &shape())
            .unwrap_err()
            .0;
        assert!(
            err.contains("nested as [2, 2] but `shape` is [1, 2, 2, 1]"),
            "{err}"
        );
        let ragged = nested(json!([[0, 1, 2], [3]]));
        let err = parse_v2(ragged.to_string().as_bytes(), &[], &shape())
            .unwrap_err()
            .0;
        assert!(err.contains("`inputs[0].data` is ragged"), "{err}");
    }

    /// Issue 10: an unknown `signature_name` was silently ignored; more images than a
    /// request may carry are counted, not kept.
    #[test]
    fn signature_name_and_image_count_are_checked() {
        let image = json!([0, 0, 0, 0]);
        let named = |name: &str| json!({"signature_name": name, "instances": [image]});
        assert!(
            parse_tf_serving(named("serving_default").to_string().as_bytes(), &shape()).is_ok()
        );
        assert!(parse_tf_serving(named("").to_string().as_bytes(), &shape()).is_ok());
        let err = tf_error(named("predict_images"));
        assert!(
            err.contains(
                "`signature_name` is `predict_images`; this model has [\"serving_default\"]"
            ),
            "{err}"
        );
        let err = tf_error(json!({"signature_name": 3, "instances": [image]}));
        assert!(err.contains("does not fit the API"), "{err}");
        let many = vec![json!([0]); MAX_IMAGES_PER_REQUEST + 5];
        let err = tf_error(json!({ "instances": many }));
        assert!(err.contains("has 4101 images; send at most 4096"), "{err}");
    }

    /// Issue 14: the KServe v2 binary tensor extension both ways (tritonclient's default
    /// `binary_data=True`); issue 10 had refused it by name.
    #[test]
    fn v2_reads_and_writes_binary_tensors() {
        let input = json!({"name": "input", "shape": [1, 2, 2, 1], "datatype": "FP32",
            "parameters": {"binary_data_size": 16}});
        let json_part = json!({ "inputs": [input] }).to_string();
        let tensor: Vec<u8> = [0.0f32, 1.0, 0.5, 0.25]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let mut body = json_part.clone().into_bytes();
        body.extend_from_slice(&tensor);
        let header = json_part.len().to_string();
        let (j, b) = split_binary(&body, Some(&header)).unwrap();
        let request = parse_v2(j, b, &shape()).unwrap();
        assert_eq!(request.batch.images, vec![0.0, 1.0, 0.5, 0.25]);
        assert_eq!(
            request.outputs,
            vec![("probabilities", false), ("class", false)]
        );
        // UINT8 pixels, one byte each, preprocessed.
        let pixels = json!({"inputs": [{"name": "input", "shape": [1, 2, 2, 1],
            "datatype": "UINT8", "parameters": {"binary_data_size": 4}}],
            "parameters": {"binary_data_output": true},
            "outputs": [{"name": "class"}, {"name": "probabilities", "parameters": {"binary_data": false}}]})
        .to_string();
        let request = parse_v2(pixels.as_bytes(), &[0, 255, 0, 255], &shape()).unwrap();
        assert_eq!(request.batch.images[1], 1.0);
        assert_eq!(
            request.outputs,
            vec![("class", true), ("probabilities", false)]
        );
        let answer = v2_response("m", 1, &request.outputs, None, &[0.0, 0.0, 3.0], 3);
        assert_eq!(answer.binary, 2i64.to_le_bytes().to_vec());
        assert_eq!(
            answer.json["outputs"][0],
            json!({"name": "class", "datatype": "INT64", "shape": [1],
                   "parameters": {"binary_data_size": 8}})
        );
        assert!(answer.json["outputs"][1]["data"].is_array());
        // What does not add up is named.
        for (json_part, binary, needle) in [
            (
                json_part.as_str(),
                &tensor[..12],
                "the body has 12 bytes after its JSON part",
            ),
            (json_part.as_str(), &[][..], "the body has 0 bytes"),
            (
                &pixels[..],
                &[0u8, 1, 2][..],
                "the body has 3 bytes after its JSON part",
            ),
        ] {
            let err = parse_v2(json_part.as_bytes(), binary, &shape())
                .unwrap_err()
                .0;
            assert!(err.contains(needle), "{err}");
        }
        let wrong_size = json_part.replace("16", "20");
        let err = parse_v2(wrong_size.as_bytes(), &tensor, &shape())
            .unwrap_err()
            .0;
        assert!(err.contains("4 FP32 values take 16 bytes"), "{err}");
        let both = json!({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
            "data": [0, 0, 0, 0], "parameters": {"binary_data_size": 16}}]})
        .to_string();
        let err = parse_v2(both.as_bytes(), &tensor, &shape()).unwrap_err().0;
        assert!(err.contains("both `data` and"), "{err}");
        let stray = json!({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
            "data": [0, 0, 0, 0]}]})
        .to_string();
        let err = parse_v2(stray.as_bytes(), &tensor, &shape()).unwrap_err().0;
        assert!(err.contains("no input names them"), "{err}");
        let nan: Vec<u8> = [f32::NAN, 0.0, 0.0, 0.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let err = parse_v2(json_part.as_bytes(), &nan, &shape())
            .unwrap_err()
            .0;
        assert!(err.contains("not finite"), "{err}");
        assert!(split_binary(b"{}", Some("3")).is_err());
        assert!(split_binary(b"{}", Some("x")).is_err());
        let missing = json!({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32"}]});
        let err = parse_v2(missing.to_string().as_bytes(), &[], &shape())
            .unwrap_err()
            .0;
        assert!(err.contains("`inputs[0].data` is missing"), "{err}");
    }

    /// Issue 10: logits that are not finite are never an answer; the error says whether
    /// the input is out of the model's range (the client's to fix) or the model is broken.
    #[test]
    fn non_finite_logits_are_refused_with_the_input_range() {
        let name = |i: usize| format!("`instances[{i}]`");
        let images = [0.0, 0.5, 1.0, 0.25, 3e38, -3e38, 0.0, 0.0];
        let fine = [0.0, 1.0, 2.0, 0.5, 0.5, 0.5];
        assert_eq!(check_finite(&fine, &images, &shape(), name), Ok(()));
        let overflow = [0.0, 1.0, 2.0, f32::NAN, f32::INFINITY, 0.0];
        let Err(Unanswerable::OutOfRange(err)) = check_finite(&overflow, &images, &shape(), name)
        else {
            panic!("expected out of range");
        };
        assert!(
            err.contains("`instances[1]` is outside the model's input range"),
            "{err}"
        );
        assert!(err.contains("from `-3e38` to `3e38`"), "{err}");
        assert!(err.contains("i.e. from `0` to `1`"), "{err}");
        let broken = [f32::NAN, 1.0, 2.0, 0.0, 0.0, 0.0];
        let Err(Unanswerable::BrokenModel(err)) = check_finite(&broken, &images, &shape(), name)
        else {
            panic!("expected a broken model");
        };
        assert!(err.contains("`instances[0]`"), "{err}");
    }

    /// Issue 10: absurd values (`3e38`) are refused before the forward pass, naming the
    /// model's range; values only somewhat off (raw pixels to a `[0, 1]` model) still run.
    #[test]
    fn absurd_input_values_are_refused_before_the_forward_pass() {
        let err = tf_error(json!({"instances": [[0, 0, 0, 0], [0, 3e38, 0.5, 0]]}));
        assert!(
            err.contains("`instances[1]` is far outside the model's input range"),
            "{err}"
        );
        assert!(err.contains("from `0` to `3e38`"), "{err}");
        assert!(err.contains("i.e. from `0` to `1`"), "{err}");
        let raw = json!({"instances": [[0, 255, 128, 1000]]});
        assert!(parse_tf_serving(raw.to_string().as_bytes(), &shape()).is_ok());
        let v2 = json!({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
            "data": [0, -1e9, 0, 0]}]});
        let err = parse_v2(v2.to_string().as_bytes(), &[], &shape())
            .unwrap_err()
            .0;
        assert!(
            err.contains("image 0 of `inputs[0].data` is far outside"),
            "{err}"
        );
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

    /// v2 errors are one readable sentence (they had runs of spaces from line breaks
    /// inside the string literals).
    #[test]
    fn v2_errors_have_no_runs_of_spaces() {
        let bodies = [
            json!({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32"}]}),
            json!({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                "data": [[0.1, 0.2], [0.3], [0.4]]}]}),
            json!({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                "data": [[0.1, 0.2], [0.3, 0.4]]}]}),
        ];
        for body in bodies {
            let err = parse_v2(body.to_string().as_bytes(), &[], &shape())
                .unwrap_err()
                .0;
            assert!(!err.contains("  "), "{err}");
        }
        let flat = json!({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
            "data": [0.1, 0.2, 0.3, 0.4]}]});
        let err = parse_v2(flat.to_string().as_bytes(), b"xx", &shape())
            .unwrap_err()
            .0;
        assert!(
            err.contains("no input names them") && !err.contains("  "),
            "{err}"
        );
    }

    #[test]
    fn v2_checks_shape_datatype_and_outputs() {
        let body = json!({"id": "r1", "inputs": [{"name": "input", "shape": [1, 2, 2, 1],
            "datatype": "UINT8", "data": [0, 255, 51, 102]}], "outputs": [{"name": "class"}]});
        let request = parse_v2(body.to_string().as_bytes(), &[], &shape()).unwrap();
        let scale = crate::data::PIXEL_SCALE;
        assert_eq!(
            request.batch.images,
            vec![0.0, 255.0 * scale, 51.0 * scale, 102.0 * scale]
        );
        assert_eq!(request.outputs, vec![("class", false)]);
        let answer = v2_response(
            "m",
            4,
            &request.outputs,
            request.id.as_ref(),
            &[0.0, 0.0, 3.0],
            3,
        );
        assert!(answer.binary.is_empty());
        let answer = answer.json;
        assert_eq!(answer["outputs"][0]["data"], json!([2]));
        assert_eq!(answer["id"], "r1");
        assert_eq!(answer["model_version"], "4");

        let wrong_shape = json!({"inputs": [{"name": "input", "shape": [1, 3],
            "datatype": "FP32", "data": [0, 0, 0]}]});
        let err = parse_v2(wrong_shape.to_string().as_bytes(), &[], &shape())
            .unwrap_err()
            .0;
        assert!(err.contains("`inputs[0].shape` is [1, 3]"), "{err}");
        let short = json!({"inputs": [{"name": "input", "shape": [2, 4],
            "datatype": "FP32", "data": [0, 0, 0, 0]}]});
        let err = parse_v2(short.to_string().as_bytes(), &[], &shape())
            .unwrap_err()
            .0;
        assert!(err.contains("has 4 values; shape [2, 4] needs 8"), "{err}");
        let dtype = json!({"inputs": [{"name": "input", "shape": [1, 4],
            "datatype": "FP16", "data": [0, 0, 0, 0]}]});
        assert!(parse_v2(dtype.to_string().as_bytes(), &[], &shape())
            .unwrap_err()
            .0
            .contains("FP16"));
        let output = json!({"inputs": [{"name": "input", "shape": [1, 4],
            "datatype": "FP32", "data": [0, 0, 0, 0]}], "outputs": [{"name": "logits"}]});
        assert!(parse_v2(output.to_string().as_bytes(), &[], &shape())
            .unwrap_err()
            .0
            .contains("`outputs[0].name`"));
        // Sizes whose product wraps around a usize are refused, not multiplied.
        let wraps = json!({"inputs": [{"name": "input", "shape": [1, 1u64 << 62, 16],
            "datatype": "FP32", "data": [0, 0, 0, 0]}]});
        let err = parse_v2(wraps.to_string().as_bytes(), &[], &shape())
            .unwrap_err()
            .0;
        assert!(err.contains("`inputs[0].shape`"), "{err}");
        let many = json!({"inputs": [{"name": "input", "shape": [1u64 << 60, 4],
            "datatype": "FP32", "data": [0, 0, 0, 0]}]});
        let err = parse_v2(many.to_string().as_bytes(), &[], &shape())
            .unwrap_err()
            .0;
        assert!(err.contains("at most"), "{err}");
        let pixels = json!({"inputs": [{"name": "input", "shape": [1, 4],
            "datatype": "UINT8", "data": [0, 0, 0, 300]}]});
        assert!(parse_v2(pixels.to_string().as_bytes(), &[], &shape())
            .unwrap_err()
            .0
            .contains("0..=255"));
    }
}
