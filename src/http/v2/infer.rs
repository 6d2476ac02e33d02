//! An Open Inference Protocol inference, whatever carried it (HTTP JSON, HTTP binary, gRPC):
//! the request's tensors as parsed by its front end, turned into Roboflow's request (its
//! `parameters` are Roboflow's fields) and images, run through the same path as
//! `/infer/<task>`, and answered as the `predictions` tensor: one UTF-8 JSON document per
//! image, byte for byte what `/infer/<task>` answers for it.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use serde_json::{Map, Value};

use super::super::call::RequestContext;
use super::super::error::ApiError;
use super::super::inference::{attach_pictures, infer, InferCall};
use super::super::request::{ImageSource, InferRequest};
use super::super::state::AppState;
use crate::pipeline::frame::{Frame, FramePixels};
use crate::regions::{RegionError, RegionUse};

/// The inputs a model takes (a request carries one of them).
pub const INPUT_IMAGE: &str = "image";
pub const INPUT_PIXELS: &str = "pixels";
/// The output every model answers.
pub const OUTPUT_PREDICTIONS: &str = "predictions";

/// Where a tensor's bytes are in a client's shared-memory region.
#[derive(Debug, Clone, PartialEq)]
pub struct RegionRef {
    pub name: String,
    pub byte_size: u64,
    pub offset: u64,
}

/// What an input tensor carries.
#[derive(Debug, Clone)]
pub enum Contents {
    /// JSON `data` (HTTP without the binary extension), flattened as it was parsed.
    Json(FlatData),
    /// Raw bytes: the binary extension's, or gRPC's `raw_input_contents`.
    Raw(Bytes),
    /// gRPC's typed `contents`: BYTES elements.
    Elements(Vec<Bytes>),
    /// In a shared-memory region.
    Region(RegionRef),
}

/// JSON `data`, flat or nested (row-major), kept compact as it is parsed: numbers 0 to 255
/// as one byte each (a `serde_json::Value` would take 32 bytes per element), or strings.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum FlatData {
    #[default]
    Empty,
    Bytes(Vec<u8>),
    Strings(Vec<String>),
}

impl FlatData {
    pub fn len(&self) -> usize {
        match self {
            FlatData::Empty => 0,
            FlatData::Bytes(b) => b.len(),
            FlatData::Strings(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<'de> serde::Deserialize<'de> for FlatData {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut out = FlatData::Empty;
        serde::de::DeserializeSeed::deserialize(Collect(&mut out), d)?;
        Ok(out)
    }
}

/// Appends every element of a (nested) JSON array to the data.
struct Collect<'a>(&'a mut FlatData);

impl<'de> serde::de::DeserializeSeed<'de> for Collect<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Collect<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("integers 0 to 255 or strings, flat or nested in arrays")
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<(), E> {
        let byte = u8::try_from(v).map_err(|_| E::custom(format!("{v} is not 0 to 255")))?;
        match self.0 {
            FlatData::Empty => *self.0 = FlatData::Bytes(vec![byte]),
            FlatData::Bytes(b) => b.push(byte),
            FlatData::Strings(_) => return Err(E::custom("numbers and strings mixed")),
        }
        Ok(())
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<(), E> {
        let v = u64::try_from(v).map_err(|_| E::custom(format!("{v} is not 0 to 255")))?;
        self.visit_u64(v)
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
        self.visit_string(v.to_owned())
    }

    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<(), E> {
        match self.0 {
            FlatData::Empty => *self.0 = FlatData::Strings(vec![v]),
            FlatData::Strings(s) => s.push(v),
            FlatData::Bytes(_) => return Err(E::custom("numbers and strings mixed")),
        }
        Ok(())
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Collect(&mut *self.0))?.is_some() {}
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct InputTensor {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
    pub contents: Contents,
}

impl InputTensor {
    pub fn new(name: String, datatype: String, shape: Vec<i64>, contents: Contents) -> Self {
        Self {
            name,
            datatype,
            shape,
            contents,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct RequestedOutput {
    pub name: String,
    /// HTTP: the binary extension's `binary_data`.
    pub binary: Option<bool>,
    pub region: Option<RegionRef>,
}

/// One inference request, parsed.
#[derive(Debug, Clone, Default)]
pub struct V2Request {
    pub id: Option<String>,
    /// Roboflow's request fields by name (unknown ones are ignored, as Triton's own are).
    pub parameters: Map<String, Value>,
    pub inputs: Vec<InputTensor>,
    pub outputs: Vec<RequestedOutput>,
}

/// The answer: the `predictions` elements, and where they went when asked into a region.
#[derive(Debug)]
pub struct V2Response {
    pub model_name: String,
    pub model_version: String,
    pub id: String,
    pub predictions: Vec<Bytes>,
    /// Set when the output was written into a region (then no data is sent).
    pub written_to: Option<RegionRef>,
    /// HTTP: whether the output goes in binary (`binary_data`).
    pub binary: Option<bool>,
}

/// A model's v2 name and version (`coco`, `1`) as the Roboflow id `coco/1`: the version
/// given, else the highest loaded, else the highest in the repository.
pub fn resolve_model(
    state: &AppState,
    name: &str,
    version: Option<&str>,
) -> Result<(String, String), ApiError> {
    if name.is_empty() || name.contains('/') {
        return Err(ApiError::bad_request(format!(
            "Request for unknown model: '{name}' is not a model name"
        )));
    }
    if let Some(v) = version.filter(|v| !v.is_empty()) {
        return Ok((format!("{name}/{v}"), v.to_owned()));
    }
    let highest = |ids: Vec<String>| {
        ids.into_iter()
            .filter_map(|id| {
                let (d, v) = id.split_once('/')?;
                (d == name).then(|| v.to_owned())
            })
            .max_by_key(|v| (v.parse::<u64>().unwrap_or(0), v.clone()))
    };
    let loaded: Vec<String> = state
        .engine
        .served_models()
        .into_iter()
        .map(|m| m.id)
        .collect();
    let version = highest(loaded)
        .or_else(|| highest(state.engine.models().available()))
        .ok_or_else(|| {
            ApiError::not_found(format!("Request for unknown model: '{name}' is not found"))
        })?;
    Ok((format!("{name}/{version}"), version))
}

/// A region error as an answer: an unknown region is 404, as in Triton; a refusal is 403.
pub fn region_error(e: RegionError) -> ApiError {
    match e {
        RegionError::NotFound(_) => ApiError::not_found(e.to_string()),
        RegionError::Refused(_) => ApiError::new(hyper::StatusCode::FORBIDDEN, e.to_string()),
        RegionError::Invalid(_) => ApiError::bad_request(e.to_string()),
    }
}

/// Runs `request` on `model_id` (already admitted into `ctx`).
pub async fn run(
    state: &Arc<AppState>,
    model_id: &str,
    version: &str,
    mut request: V2Request,
    started: Instant,
    deadline: Instant,
    ctx: &mut RequestContext,
) -> Result<V2Response, ApiError> {
    if request.inputs.len() != 1 {
        return Err(ApiError::bad_request(format!(
            "expected 1 input ('{INPUT_IMAGE}' or '{INPUT_PIXELS}') but got {}",
            request.inputs.len()
        )));
    }
    let output = match request.outputs.len() {
        0 => RequestedOutput {
            name: OUTPUT_PREDICTIONS.into(),
            ..Default::default()
        },
        1 if request.outputs[0].name == OUTPUT_PREDICTIONS => request.outputs.remove(0),
        _ => {
            let names: Vec<_> = request.outputs.iter().map(|o| o.name.as_str()).collect();
            return Err(ApiError::bad_request(format!(
                "unexpected inference output(s) {names:?}: the model answers '{OUTPUT_PREDICTIONS}' only"
            )));
        }
    };
    // Claimed before any work: an output region that is missing or too small is known now.
    let out_region = output
        .region
        .as_ref()
        .map(|r| state.regions.get(&r.name, ctx.remote).map_err(region_error))
        .transpose()?;
    let mut input = request.inputs.remove(0);
    if let (INPUT_IMAGE, Contents::Region(r)) = (input.name.as_str(), &input.contents) {
        input.contents = Contents::Raw(read_region(state, r, ctx).await?);
    }
    let images = images_of(state, input, ctx.remote)?;
    let mut fields = request.parameters;
    fields.insert("model_id".into(), Value::String(model_id.to_owned()));
    let roboflow: InferRequest = serde_json::from_value(Value::Object(fields))
        .map_err(|e| ApiError::bad_request(format!("invalid request parameters: {e}")))?;
    let inference_id = request.id.clone().unwrap_or_else(|| ctx.request_id.clone());
    let call = InferCall {
        model_id,
        expected: None,
        inference_id: &inference_id,
        started,
        deadline,
    };
    let (mut responses, pictures) = infer(state, call, &roboflow, images, ctx).await?;
    let predictions = state
        .engine
        .run_cpu(move || {
            attach_pictures(&mut responses, pictures);
            responses
                .iter()
                .map(|r| serde_json::to_vec(r).map(Bytes::from))
                .collect::<Result<Vec<_>, _>>()
        })
        .await?
        .map_err(|e| ApiError::internal(format!("cannot encode the predictions: {e}")))?;
    let written_to = match (out_region, output.region) {
        (Some(region), Some(r)) => {
            // Never written after the deadline: an unregister may have given up waiting.
            if Instant::now() >= deadline {
                return Err(ApiError::new(
                    hyper::StatusCode::GATEWAY_TIMEOUT,
                    "Deadline exceeded before the output could be written to its region",
                ));
            }
            let bytes = serialize_bytes(&predictions);
            if bytes.len() as u64 > r.byte_size {
                return Err(ApiError::bad_request(format!(
                    "output '{OUTPUT_PREDICTIONS}' is {} bytes, more than shared_memory_byte_size {} of region '{}'",
                    bytes.len(),
                    r.byte_size,
                    r.name
                )));
            }
            region.write_at(r.offset, &bytes).map_err(region_error)?;
            Some(r)
        }
        _ => None,
    };
    let (model_name, _) = model_id.split_once('/').unwrap_or((model_id, ""));
    Ok(V2Response {
        model_name: model_name.to_owned(),
        model_version: version.to_owned(),
        id: request.id.unwrap_or_default(),
        predictions,
        written_to,
        binary: output.binary,
    })
}

/// BYTES elements as the binary extension lays them out: each a 4-byte little-endian length
/// then its bytes.
pub fn serialize_bytes(elements: &[Bytes]) -> Vec<u8> {
    let mut out = Vec::with_capacity(elements.iter().map(|e| e.len() + 4).sum());
    for e in elements {
        out.extend_from_slice(&(e.len() as u32).to_le_bytes());
        out.extend_from_slice(e);
    }
    out
}

/// The elements of a BYTES tensor in the binary layout.
pub fn deserialize_bytes(data: &Bytes) -> Result<Vec<Bytes>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let Some(len) = data.get(at..at + 4) else {
            return Err("a BYTES element's 4-byte length is cut short".into());
        };
        let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
        at += 4;
        if data.len() - at < len {
            return Err(format!(
                "a BYTES element claims {len} bytes, but only {} remain",
                data.len() - at
            ));
        }
        out.push(data.slice(at..at + len));
        at += len;
    }
    Ok(out)
}

/// The batch size of a shape whose dimensions after the first are `rest` (`None`: any).
fn batch_of(input: &InputTensor, rest: &[Option<i64>]) -> Result<usize, ApiError> {
    let shape = &input.shape;
    let wrong = || {
        let want: Vec<String> = std::iter::once("B".to_string())
            .chain(
                rest.iter()
                    .map(|d| d.map_or("-1".into(), |d| d.to_string())),
            )
            .collect();
        ApiError::bad_request(format!(
            "input '{}' has shape {shape:?}; expected [{}]",
            input.name,
            want.join(", ")
        ))
    };
    if shape.len() != rest.len() + 1 || shape.iter().any(|&d| d < 1) {
        return Err(wrong());
    }
    for (d, want) in shape[1..].iter().zip(rest) {
        if want.is_some_and(|w| w != *d) {
            return Err(wrong());
        }
    }
    Ok(shape[0] as usize)
}

/// The images an input tensor carries.
fn images_of(
    state: &AppState,
    input: InputTensor,
    remote: Option<std::net::IpAddr>,
) -> Result<Vec<ImageSource>, ApiError> {
    // A batch larger than the ring can ever hold is refused before its images are built.
    let slots = state.engine.ring().slots();
    if let Some(&b) = input.shape.first().filter(|&&b| b > slots as i64) {
        return Err(crate::engine::EngineError::TooManyImages {
            count: b as usize,
            limit: slots,
            setting: "RING_SLOTS",
        }
        .into());
    }
    match input.name.as_str() {
        INPUT_IMAGE => encoded_images(input),
        INPUT_PIXELS => frames(state, input, remote),
        other => Err(ApiError::bad_request(format!(
            "unexpected inference input '{other}': the model takes '{INPUT_IMAGE}' (BYTES, encoded images) or '{INPUT_PIXELS}' (UINT8, [B, H, W, 3] RGB)"
        ))),
    }
}

fn expect_datatype(input: &InputTensor, datatype: &str) -> Result<(), ApiError> {
    if input.datatype != datatype {
        return Err(ApiError::bad_request(format!(
            "input '{}' has datatype {}; expected {datatype}",
            input.name, input.datatype
        )));
    }
    Ok(())
}

/// The bytes of an `image` input in a shared-memory region, counted against the body budget
/// like a body's (held by the call until its answer) and read on the blocking pool, never on
/// the reactor.
async fn read_region(
    state: &AppState,
    r: &RegionRef,
    ctx: &mut RequestContext,
) -> Result<Bytes, ApiError> {
    let limit = state.cfg.max_body_bytes as u64;
    if r.byte_size > limit {
        return Err(ApiError::new(
            hyper::StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "input 'image' is {} bytes in its region, more than MAX_BODY_BYTES ({limit})",
                r.byte_size
            ),
        ));
    }
    let region = state
        .regions
        .get(&r.name, ctx.remote)
        .map_err(region_error)?;
    let mut lease = state.body_memory.lease(ctx.peer);
    lease
        .cover(r.byte_size as usize)
        .map_err(crate::http::budget::body_memory_full)?;
    let (offset, len) = (r.offset, r.byte_size as usize);
    // The lease travels with the buffer: a call cancelled mid-read leaves the buffer
    // counted until the read ends and frees it.
    let (lease, read) = tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; len];
        let read = region.read_at(offset, &mut buf).map(|()| Bytes::from(buf));
        (lease, read)
    })
    .await
    .map_err(|e| ApiError::internal(format!("reading the region failed: {e}")))?;
    ctx.hold(lease);
    read.map_err(region_error)
}

/// `image`, BYTES `[B]`: encoded image files (JSON strings are base64 text or URLs, as in
/// Roboflow's `image.value`).
fn encoded_images(input: InputTensor) -> Result<Vec<ImageSource>, ApiError> {
    expect_datatype(&input, "BYTES")?;
    let batch = batch_of(&input, &[])?;
    let elements: Vec<ImageSource> = match input.contents {
        Contents::Json(FlatData::Strings(items)) => items
            .into_iter()
            .map(|s| {
                if s.starts_with("http://") || s.starts_with("https://") {
                    ImageSource::Url(s)
                } else {
                    ImageSource::Base64(s)
                }
            })
            .collect(),
        Contents::Json(FlatData::Empty) => Vec::new(),
        Contents::Json(FlatData::Bytes(_)) => {
            return Err(ApiError::bad_request(
                "input 'image' holds numbers; send base64 text or URLs",
            ))
        }
        Contents::Elements(e) => e.into_iter().map(ImageSource::Bytes).collect(),
        Contents::Raw(raw) => deserialize_bytes(&raw)
            .map_err(|e| ApiError::bad_request(format!("input 'image': {e}")))?
            .into_iter()
            .map(ImageSource::Bytes)
            .collect(),
        // Read by `read_region` before the images are built.
        Contents::Region(_) => {
            return Err(ApiError::internal(
                "input 'image' in a region was not read before its images were built",
            ))
        }
    };
    if elements.len() != batch {
        return Err(ApiError::bad_request(format!(
            "input 'image' has shape [{batch}] but holds {} elements",
            elements.len()
        )));
    }
    Ok(elements)
}

/// `pixels`, UINT8 `[B, H, W, 3]`: RGB frames, rows packed.
fn frames(
    state: &AppState,
    input: InputTensor,
    remote: Option<std::net::IpAddr>,
) -> Result<Vec<ImageSource>, ApiError> {
    expect_datatype(&input, "UINT8")?;
    let batch = batch_of(&input, &[None, None, Some(3)])?;
    let (h, w) = (input.shape[1], input.shape[2]);
    if h > u32::MAX as i64 || w > u32::MAX as i64 {
        return Err(ApiError::bad_request("input 'pixels' is too large"));
    }
    let (w, h) = (w as u32, h as u32);
    // Bounded before anything is allocated: the frame by MAX_IMAGE_PIXELS, the batch by the
    // ring (an image of a request holds a slot).
    let pixels = (w as u64).saturating_mul(h as u64);
    if pixels > state.cfg.max_image_pixels {
        return Err(crate::engine::EngineError::Decode(
            crate::pipeline::decode::DecodeError::TooManyPixels {
                width: w as u64,
                height: h as u64,
                max: state.cfg.max_image_pixels,
            },
        )
        .into());
    }
    let frame_len = pixels * 3;
    let total = frame_len.saturating_mul(batch as u64);
    let wrong_size = |got: u64| {
        ApiError::bad_request(format!(
            "input 'pixels' of shape {:?} needs {total} bytes, but {got} were given",
            input.shape
        ))
    };
    let frame = |pixels| {
        ImageSource::Frame(Frame {
            width: w,
            height: h,
            pixels,
        })
    };
    match input.contents {
        Contents::Region(r) => {
            if r.byte_size != total {
                return Err(wrong_size(r.byte_size));
            }
            let region: Arc<RegionUse> =
                Arc::new(state.regions.get(&r.name, remote).map_err(region_error)?);
            region.check(r.offset, total).map_err(region_error)?;
            Ok((0..batch as u64)
                .map(|i| {
                    frame(FramePixels::Region {
                        region: Arc::clone(&region),
                        offset: r.offset + i * frame_len,
                    })
                })
                .collect())
        }
        Contents::Raw(raw) => {
            if raw.len() as u64 != total {
                return Err(wrong_size(raw.len() as u64));
            }
            let n = frame_len as usize;
            Ok((0..batch)
                .map(|i| frame(FramePixels::Bytes(raw.slice(i * n..(i + 1) * n))))
                .collect())
        }
        Contents::Elements(_) => Err(ApiError::bad_request(
            "input 'pixels' must be sent in raw_input_contents (or as uint_contents)",
        )),
        Contents::Json(data) => {
            let bytes = match data {
                FlatData::Bytes(b) => b,
                FlatData::Empty => Vec::new(),
                FlatData::Strings(_) => {
                    return Err(ApiError::bad_request(
                        "input 'pixels' holds strings; send integers 0 to 255",
                    ))
                }
            };
            if bytes.len() as u64 != total {
                return Err(wrong_size(bytes.len() as u64));
            }
            let raw = Bytes::from(bytes);
            let n = frame_len as usize;
            Ok((0..batch)
                .map(|i| frame(FramePixels::Bytes(raw.slice(i * n..(i + 1) * n))))
                .collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_elements_round_trip_and_truncation_is_an_error() {
        let elements = vec![
            Bytes::from_static(b"ab"),
            Bytes::new(),
            Bytes::from_static(b"xyz"),
        ];
        let raw = Bytes::from(serialize_bytes(&elements));
        assert_eq!(&raw[..6], &[2, 0, 0, 0, b'a', b'b']);
        assert_eq!(deserialize_bytes(&raw).unwrap(), elements);
        assert!(deserialize_bytes(&raw.slice(..raw.len() - 1)).is_err());
        assert!(deserialize_bytes(&Bytes::from_static(&[1, 0])).is_err());
    }

    #[test]
    fn nested_json_data_flattens_in_row_major_order_compactly() {
        let flat: FlatData = serde_json::from_str("[[[1, 2], [3]], [4]]").unwrap();
        assert_eq!(flat, FlatData::Bytes(vec![1, 2, 3, 4]));
        let flat: FlatData = serde_json::from_str(r#"[["a"], "b"]"#).unwrap();
        assert_eq!(flat, FlatData::Strings(vec!["a".into(), "b".into()]));
        for bad in ["[256]", "[-1]", "[1.5]", r#"[1, "a"]"#, "[true]", "{}"] {
            assert!(serde_json::from_str::<FlatData>(bad).is_err(), "{bad}");
        }
    }
}
