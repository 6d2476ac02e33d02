//! Request bodies and query strings, with Roboflow's field names and defaults, turned into
//! validated task parameters. Validation failures are 422 (bad schema) or 400 (bad value).

use serde::Deserialize;
use serde_json::Value;

use super::error::ApiError;
use crate::geometry::DisabledSteps;
use crate::tasks::classification::ClassificationParams;
use crate::tasks::detection::DetectionParams;
use crate::tasks::draw::DrawOptions;
use crate::tasks::keypoints::KeypointsParams;
use crate::tasks::segmentation::{self, MaskDecodeMode, MaskFormat, SegmentationParams};

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum ImageSource {
    /// Base64 text (an optional `data:image/...;base64,` prefix is allowed).
    Base64(String),
    /// Raw bytes (multipart upload).
    Bytes(bytes::Bytes),
    /// An http(s) URL (only with ALLOW_URL_INPUT).
    Url(String),
    /// Raw RGB pixels (the Open Inference Protocol's `pixels` input).
    Frame(crate::pipeline::frame::Frame),
}

/// Roboflow's `InferenceRequestImage`: `{"type": "base64" | "url", "value": ...}`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct RequestImage {
    /// `base64`, or `url` (when the server allows URL input).
    #[serde(rename = "type")]
    #[schema(pattern = "^(base64|url)$", example = "base64")]
    pub kind: String,
    /// The base64 text (a `data:` prefix is accepted) or the URL.
    #[schema(value_type = String)]
    pub value: Option<Value>,
}

impl RequestImage {
    /// The image source this entry names.
    pub fn source(self) -> Result<ImageSource, ApiError> {
        let value = match self.value {
            Some(Value::String(s)) => s,
            Some(_) | None => {
                return Err(ApiError::invalid("image.value must be a string"));
            }
        };
        match self.kind.as_str() {
            "base64" => Ok(ImageSource::Base64(value)),
            "url" => Ok(ImageSource::Url(value)),
            "numpy" | "numpy_object" | "pil" => Err(ApiError::bad_request(format!(
                "image type '{}' is not accepted (Roboflow's ALLOW_NUMPY_INPUT=False); send base64 or url",
                self.kind
            ))),
            other => Err(ApiError::bad_request(format!(
                "unknown image type '{other}'; expected 'base64' or 'url'"
            ))),
        }
    }
}

/// One image or a list of them; a list gets a list of responses in the same order.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum OneOrMany {
    Many(Vec<RequestImage>),
    One(RequestImage),
}

/// `confidence` may be a number or Roboflow's "best" / "default" (both mean the default).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum Confidence {
    Value(f64),
    Named(String),
}

/// The body of `/infer/object_detection`, `/infer/instance_segmentation` and
/// `/infer/classification` (each route reads the fields of its task).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct InferRequest {
    /// `dataset/version` of the model.
    #[schema(example = "coco/1")]
    pub model_id: Option<String>,
    /// One image, or a list of them (the answer is then a list, in order).
    pub image: Option<OneOrMany>,
    /// Used as `inference_id` in the answer.
    pub id: Option<String>,
    /// Roboflow API key: a model missing from the cache is downloaded with it (else
    /// `ROBOFLOW_API_KEY`); a cached model needs none.
    pub api_key: Option<String>,
    /// Lowest score kept: a number in [0, 1], or "best"/"default" (the default).
    #[schema(value_type = Option<f64>, default = 0.4)]
    pub confidence: Option<Confidence>,
    /// IoU above which NMS suppresses a box.
    #[schema(default = 0.3)]
    pub iou_threshold: Option<f64>,
    /// NMS across classes.
    #[schema(default = false)]
    pub class_agnostic_nms: Option<bool>,
    /// Only these class names.
    pub class_filter: Option<Vec<String>>,
    #[schema(default = 300)]
    pub max_detections: Option<i64>,
    /// Boxes entering NMS at most.
    #[schema(default = 3000)]
    pub max_candidates: Option<i64>,
    #[schema(default = false)]
    pub disable_preproc_auto_orient: Option<bool>,
    /// Skip the model's contrast step.
    #[schema(default = false)]
    pub disable_preproc_contrast: Option<bool>,
    /// Skip the model's grayscale step.
    #[schema(default = false)]
    pub disable_preproc_grayscale: Option<bool>,
    /// Skip the model's static crop.
    #[schema(default = false)]
    pub disable_preproc_static_crop: Option<bool>,
    /// Keypoint detection: keypoints scoring below it are left out.
    #[schema(default = 0.0)]
    pub keypoint_confidence: Option<f64>,
    /// Draw the predictions and return the picture (base64 JPEG) in `visualization`.
    #[schema(default = false)]
    pub visualize_predictions: Option<bool>,
    /// Label each box with "class confidence".
    #[schema(default = false)]
    pub visualization_labels: Option<bool>,
    /// Line width of the drawing, 1 to 100.
    #[schema(default = 1)]
    pub visualization_stroke_width: Option<i64>,
    /// Segmentation: the mask grid (`accurate`: network input, `fast`: prototypes,
    /// `tradeoff`: between, by `tradeoff_factor`).
    #[schema(default = "accurate", pattern = "^(accurate|fast|tradeoff)$")]
    pub mask_decode_mode: Option<String>,
    #[schema(default = 0.0)]
    pub tradeoff_factor: Option<f64>,
    /// Segmentation: `polygon` (points) or `rle` (COCO run-length, original resolution).
    #[schema(default = "polygon", pattern = "^(polygon|rle)$")]
    pub response_mask_format: Option<String>,
}

impl InferRequest {
    /// Parses a JSON body.
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        crate::stage_cpu::span(crate::stage_cpu::Stage::Json, || {
            serde_json::from_slice(body)
        })
        .map_err(|e| ApiError::invalid(format!("Invalid request body: {e}")))
    }

    /// The model id, required.
    pub fn model_id(&self) -> Result<String, ApiError> {
        self.model_id
            .clone()
            .ok_or_else(|| ApiError::invalid("Invalid request body: field 'model_id' is required"))
    }

    /// The images, in order, required.
    pub fn take_images(&mut self) -> Result<(Vec<ImageSource>, bool), ApiError> {
        match self.image.take() {
            None => Err(ApiError::invalid(
                "Invalid request body: field 'image' is required",
            )),
            Some(OneOrMany::One(i)) => Ok((vec![i.source()?], false)),
            Some(OneOrMany::Many(list)) => {
                if list.is_empty() {
                    return Err(ApiError::bad_request("'image' is an empty list"));
                }
                let sources = list
                    .into_iter()
                    .map(RequestImage::source)
                    .collect::<Result<Vec<_>, _>>()?;
                Ok((sources, true))
            }
        }
    }

    /// What to draw, when `visualize_predictions` asks for a picture.
    pub fn draw_options(&self) -> Result<Option<DrawOptions>, ApiError> {
        if self.visualize_predictions != Some(true) {
            return Ok(None);
        }
        let stroke = match self.visualization_stroke_width {
            None => 1,
            Some(w @ 1..=100) => w as u32,
            Some(w) => {
                return Err(ApiError::invalid(format!(
                    "visualization_stroke_width must be 1 to 100, got {w}"
                )))
            }
        };
        Ok(Some(DrawOptions {
            labels: self.visualization_labels.unwrap_or(false),
            stroke,
        }))
    }

    /// The detection parameters, validated.
    pub fn detection_params(&self) -> Result<DetectionParams, ApiError> {
        let d = DetectionParams::default();
        let confidence = match &self.confidence {
            None => d.confidence,
            Some(Confidence::Value(v)) => unit_interval("confidence", *v)?,
            Some(Confidence::Named(s)) if s == "best" || s == "default" => d.confidence,
            Some(Confidence::Named(s)) => {
                return Err(ApiError::invalid(format!(
                    "confidence must be a number in [0, 1], 'best' or 'default', not '{s}'"
                )))
            }
        };
        Ok(DetectionParams {
            confidence,
            iou_threshold: match self.iou_threshold {
                Some(v) => unit_interval("iou_threshold", v)?,
                None => d.iou_threshold,
            },
            class_agnostic_nms: self.class_agnostic_nms.unwrap_or(d.class_agnostic_nms),
            max_detections: count("max_detections", self.max_detections, d.max_detections)?,
            max_candidates: count("max_candidates", self.max_candidates, d.max_candidates)?,
            class_filter: self.class_filter.clone(),
        })
    }
}

impl InferRequest {
    /// The segmentation parameters, validated (Roboflow answers 400 to a bad mask argument).
    pub fn segmentation_params(&self) -> Result<SegmentationParams, ApiError> {
        let mode = match self.mask_decode_mode.as_deref().unwrap_or("accurate") {
            "accurate" => MaskDecodeMode::Accurate,
            "fast" => MaskDecodeMode::Fast,
            "tradeoff" => {
                let t = self.tradeoff_factor.unwrap_or(0.0);
                if !(0.0..=1.0).contains(&t) {
                    return Err(ApiError::bad_request(format!(
                        "tradeoff_factor must be in [0, 1], got {t}"
                    )));
                }
                MaskDecodeMode::Tradeoff(t as f32)
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "mask_decode_mode must be 'accurate', 'fast' or 'tradeoff', not '{other}'"
                )))
            }
        };
        let format = match self.response_mask_format.as_deref().unwrap_or("polygon") {
            "polygon" => MaskFormat::Polygon,
            "rle" => MaskFormat::Rle,
            other => {
                return Err(ApiError::invalid(format!(
                    "response_mask_format must be 'polygon' or 'rle', not '{other}'"
                )))
            }
        };
        Ok(SegmentationParams {
            detection: self.detection_params()?,
            mode,
            format,
            max_work_pixels: segmentation::MAX_WORK_PIXELS,
        })
    }

    /// The classification parameters, validated.
    pub fn classification_params(&self) -> Result<ClassificationParams, ApiError> {
        Ok(ClassificationParams {
            confidence: self.detection_params()?.confidence,
        })
    }

    /// Keypoint detection's parameters: detection's plus `keypoint_confidence` (default 0).
    pub fn keypoints_params(&self) -> Result<KeypointsParams, ApiError> {
        Ok(KeypointsParams {
            detection: self.detection_params()?,
            keypoint_confidence: match self.keypoint_confidence {
                Some(v) => unit_interval("keypoint_confidence", v)?,
                None => 0.0,
            },
        })
    }

    /// The `disable_preproc_*` switches of the request.
    pub fn disabled_steps(&self) -> DisabledSteps {
        DisabledSteps {
            auto_orient: self.disable_preproc_auto_orient.unwrap_or(false),
            static_crop: self.disable_preproc_static_crop.unwrap_or(false),
            contrast: self.disable_preproc_contrast.unwrap_or(false),
            grayscale: self.disable_preproc_grayscale.unwrap_or(false),
        }
    }
}

fn unit_interval(name: &str, v: f64) -> Result<f32, ApiError> {
    if (0.0..=1.0).contains(&v) {
        Ok(v as f32)
    } else {
        Err(ApiError::invalid(format!(
            "{name} must be in [0, 1], got {v}"
        )))
    }
}

fn count(name: &str, v: Option<i64>, default: usize) -> Result<usize, ApiError> {
    match v {
        None => Ok(default),
        Some(n) if (0..=100_000).contains(&n) => Ok(n as usize),
        Some(n) => Err(ApiError::invalid(format!(
            "{name} must be between 0 and 100000, got {n}"
        ))),
    }
}

/// Query parameters of the legacy route `/{dataset}/{version}`, as an [`InferRequest`]
/// (Roboflow's rules: `confidence` and `overlap` of 1 or more are percentages; confidence is
/// floored at 0.01).
pub fn legacy_params(query: &str) -> Result<(InferRequest, LegacyOptions), ApiError> {
    let mut req = InferRequest {
        model_id: None,
        image: None,
        id: None,
        api_key: None,
        confidence: None,
        iou_threshold: None,
        class_agnostic_nms: None,
        class_filter: None,
        max_detections: None,
        max_candidates: None,
        disable_preproc_auto_orient: None,
        disable_preproc_contrast: None,
        disable_preproc_grayscale: None,
        disable_preproc_static_crop: None,
        keypoint_confidence: None,
        visualize_predictions: None,
        visualization_labels: None,
        visualization_stroke_width: None,
        mask_decode_mode: None,
        tradeoff_factor: None,
        response_mask_format: None,
    };
    let mut opts = LegacyOptions::default();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        // NaN and infinities parse as f64 but are no confidence or overlap (NaN was taken
        // as 0.01 by the clamp below).
        let float = |v: &str| {
            v.parse::<f64>()
                .ok()
                .filter(|f| f.is_finite())
                .ok_or_else(|| {
                    ApiError::invalid(format!("query parameter {k} must be a number, got '{v}'"))
                })
        };
        let boolean = |v: &str| match v.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => Ok(true),
            "false" | "0" | "no" => Ok(false),
            _ => Err(ApiError::invalid(format!(
                "query parameter {k} must be true or false, got '{v}'"
            ))),
        };
        match k.as_ref() {
            "confidence" => {
                req.confidence = Some(match v.as_ref() {
                    "best" | "default" => Confidence::Named(v.to_string()),
                    s => {
                        let mut c = float(s)?;
                        if c >= 1.0 {
                            c /= 100.0;
                        }
                        Confidence::Value(c.max(0.01))
                    }
                })
            }
            "overlap" => {
                let mut o = float(&v)?;
                if o >= 1.0 {
                    o /= 100.0;
                }
                req.iou_threshold = Some(o);
            }
            "max_detections" => {
                req.max_detections = Some(v.parse().map_err(|_| {
                    ApiError::invalid(format!("max_detections must be an integer, got '{v}'"))
                })?)
            }
            "class_agnostic_nms" => req.class_agnostic_nms = Some(boolean(&v)?),
            "disable_preproc_auto_orient" => req.disable_preproc_auto_orient = Some(boolean(&v)?),
            "disable_preproc_contrast" => req.disable_preproc_contrast = Some(boolean(&v)?),
            "disable_preproc_grayscale" => req.disable_preproc_grayscale = Some(boolean(&v)?),
            "disable_preproc_static_crop" => req.disable_preproc_static_crop = Some(boolean(&v)?),
            "keypoint_confidence" => req.keypoint_confidence = Some(float(&v)?),
            "mask_decode_mode" => req.mask_decode_mode = Some(v.to_string()),
            "tradeoff_factor" => req.tradeoff_factor = Some(float(&v)?),
            "response_mask_format" => req.response_mask_format = Some(v.to_string()),
            "format" => {
                if !matches!(v.as_ref(), "json" | "image" | "image_and_json") {
                    return Err(ApiError::invalid(format!(
                        "format must be json, image or image_and_json, got '{v}'"
                    )));
                }
                req.visualize_predictions = Some(v != "json");
                opts.format = v.to_string();
            }
            "labels" => req.visualization_labels = Some(boolean(&v)?),
            "stroke" => {
                req.visualization_stroke_width = Some(v.parse().map_err(|_| {
                    ApiError::invalid(format!("stroke must be an integer, got '{v}'"))
                })?)
            }
            "image" => opts.image_url = Some(v.to_string()),
            "api_key" => req.api_key = Some(v.to_string()),
            "image_type" => opts.image_type = v.to_string(),
            _ => {} // countinference and the like are accepted and have no effect here
        }
    }
    Ok((req, opts))
}

/// Legacy-route options that are not task parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct LegacyOptions {
    pub format: String,
    pub image_url: Option<String>,
    pub image_type: String,
}

impl Default for LegacyOptions {
    fn default() -> Self {
        Self {
            format: "json".into(),
            image_url: None,
            image_type: "base64".into(),
        }
    }
}

/// Finds the `"model_id"` of a JSON body in its first bytes as they arrive, without parsing
/// the rest (so the waiting room can decide before the image is read). Each byte is searched
/// once, however the body is cut into pieces.
#[derive(Debug, Default)]
pub struct ModelIdScanner {
    /// Bytes searched for the key so far.
    searched: usize,
    /// Where the key starts, once seen.
    key_at: Option<usize>,
}

/// What the first bytes tell so far.
#[derive(Debug, PartialEq)]
pub enum ModelIdScan<'a> {
    Found(&'a str),
    NotYet,
    /// Not in the first [`MODEL_ID_SCAN_BYTES`] (or escaped): decided after parsing.
    GaveUp,
}

/// Bytes at the start of a JSON body searched for its `model_id`.
pub const MODEL_ID_SCAN_BYTES: usize = 64 << 10;
const MODEL_ID_KEY: &[u8] = b"\"model_id\"";
/// Longest `: "value"` after the key that is waited for.
const MODEL_ID_VALUE_BYTES: usize = 512;

impl ModelIdScanner {
    /// Looks at `body`, the bytes received so far (it only grows between calls).
    pub fn feed<'a>(&mut self, body: &'a [u8]) -> ModelIdScan<'a> {
        let key_at = match self.key_at {
            Some(k) => k,
            None => {
                // Only the new bytes, plus a key's length before them (a key cut in two).
                let from = self.searched.saturating_sub(MODEL_ID_KEY.len() - 1);
                let to = body.len().min(MODEL_ID_SCAN_BYTES);
                self.searched = to;
                match body[from.min(to)..to]
                    .windows(MODEL_ID_KEY.len())
                    .position(|w| w == MODEL_ID_KEY)
                {
                    Some(i) => *self.key_at.insert(from + i),
                    None if to >= MODEL_ID_SCAN_BYTES => return ModelIdScan::GaveUp,
                    None => return ModelIdScan::NotYet,
                }
            }
        };
        let end = body
            .len()
            .min(key_at + MODEL_ID_KEY.len() + MODEL_ID_VALUE_BYTES);
        match scan_model_id(&body[key_at..end]) {
            Some(id) => ModelIdScan::Found(id),
            None if end < key_at + MODEL_ID_KEY.len() + MODEL_ID_VALUE_BYTES => ModelIdScan::NotYet,
            None => ModelIdScan::GaveUp,
        }
    }
}

/// The top-level `"model_id"` string of a JSON body, read from its first bytes without
/// parsing the rest (so the waiting room can decide before the image is read). `None` when
/// the prefix does not hold the whole value yet, or the value has escapes: the caller then
/// decides after parsing.
pub fn scan_model_id(prefix: &[u8]) -> Option<&str> {
    const KEY: &[u8] = b"\"model_id\"";
    let at = prefix.windows(KEY.len()).position(|w| w == KEY)?;
    let rest = &prefix[at + KEY.len()..];
    let rest = rest.trim_ascii_start().strip_prefix(b":")?;
    let rest = rest.trim_ascii_start().strip_prefix(b"\"")?;
    let end = rest.iter().position(|&b| b == b'"' || b == b'\\')?;
    if rest[end] != b'"' {
        return None;
    }
    std::str::from_utf8(&rest[..end]).ok()
}

/// The API key a request carries outside its body: `?api_key=`, else `Authorization:
/// Bearer <key>` (Roboflow's order; the body's `api_key` comes after both).
pub fn query_api_key(req: &axum::extract::Request) -> Option<String> {
    form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
        .find(|(k, _)| k == "api_key")
        .map(|(_, v)| v.into_owned())
        .or_else(|| {
            req.headers()
                .get(hyper::header::AUTHORIZATION)?
                .to_str()
                .ok()?
                .strip_prefix("Bearer ")
                .map(|k| k.trim().to_string())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_id_is_found_however_the_body_is_cut() {
        let body = br#"{"api_key": "x", "model_id": "coco/1", "image": "abc"}"#;
        for step in [1, 3, 7, body.len()] {
            let mut scan = ModelIdScanner::default();
            let mut found = None;
            for end in (step..=body.len()).step_by(step).chain([body.len()]) {
                if let ModelIdScan::Found(id) = scan.feed(&body[..end]) {
                    found = Some(id.to_owned());
                    break;
                }
            }
            assert_eq!(found.as_deref(), Some("coco/1"), "in pieces of {step}");
        }
        // Not in the first 64 KiB: given up, decided after parsing.
        let mut late = vec![b' '; MODEL_ID_SCAN_BYTES + 10];
        late.extend_from_slice(br#""model_id": "coco/1""#);
        assert_eq!(ModelIdScanner::default().feed(&late), ModelIdScan::GaveUp);
    }

    #[test]
    fn the_model_id_is_read_from_the_first_bytes() {
        let body = br#"{"api_key": "x", "model_id" : "coco/1", "image": {"type": "base64", "value": "/9j/4AAQ"#;
        assert_eq!(scan_model_id(body), Some("coco/1"));
        // Not all there yet, or escaped: decided after parsing.
        assert_eq!(scan_model_id(br#"{"model_id": "coc"#), None);
        assert_eq!(scan_model_id(br#"{"model_id": "co\u0063o/1"}"#), None);
        assert_eq!(scan_model_id(br#"{"image": "abc"}"#), None);
    }

    #[test]
    fn defaults_are_roboflows() {
        let r = InferRequest::parse(br#"{"model_id":"a/1","image":{"type":"base64","value":"x"}}"#)
            .unwrap();
        assert_eq!(r.detection_params().unwrap(), DetectionParams::default());
        let r = InferRequest::parse(br#"{"model_id":"a/1","confidence":"best"}"#).unwrap();
        assert_eq!(r.detection_params().unwrap().confidence, 0.4);
    }

    #[test]
    fn a_list_of_images_is_a_list() {
        let mut r = InferRequest::parse(
            br#"{"model_id":"a/1","image":[{"type":"base64","value":"x"},{"type":"url","value":"http://h/i.jpg"}]}"#,
        )
        .unwrap();
        let (images, list) = r.take_images().unwrap();
        assert!(list);
        assert_eq!(
            images,
            vec![
                ImageSource::Base64("x".into()),
                ImageSource::Url("http://h/i.jpg".into())
            ]
        );
    }

    #[test]
    fn out_of_range_parameters_are_rejected() {
        for body in [
            r#"{"confidence": 1.5}"#,
            r#"{"confidence": "high"}"#,
            r#"{"iou_threshold": -0.1}"#,
            r#"{"max_detections": -1}"#,
        ] {
            let r = InferRequest::parse(body.as_bytes()).unwrap();
            assert_eq!(r.detection_params().unwrap_err().status, 422, "{body}");
        }
        assert_eq!(InferRequest::parse(b"{not json").unwrap_err().status, 422);
        assert_eq!(
            InferRequest::parse(br#"{"confidence": "0.5", "image": 3}"#)
                .unwrap_err()
                .status,
            422
        );
    }

    #[test]
    fn mask_arguments_are_checked() {
        let p = |body: &str| {
            InferRequest::parse(body.as_bytes())
                .unwrap()
                .segmentation_params()
        };
        assert_eq!(p("{}").unwrap().mode, MaskDecodeMode::Accurate);
        assert_eq!(p("{}").unwrap().format, MaskFormat::Polygon);
        assert_eq!(
            p(r#"{"mask_decode_mode":"tradeoff","tradeoff_factor":0.25,"response_mask_format":"rle"}"#).unwrap(),
            SegmentationParams {
                detection: DetectionParams::default(),
                mode: MaskDecodeMode::Tradeoff(0.25),
                format: MaskFormat::Rle,
                max_work_pixels: segmentation::MAX_WORK_PIXELS,
            }
        );
        assert_eq!(
            p(r#"{"mask_decode_mode":"tradeoff","tradeoff_factor":1.5}"#)
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(p(r#"{"mask_decode_mode":"best"}"#).unwrap_err().status, 400);
        assert_eq!(
            p(r#"{"response_mask_format":"png"}"#).unwrap_err().status,
            422
        );
    }

    #[test]
    fn legacy_percentages_and_floor() {
        let (r, o) = legacy_params("confidence=50&overlap=30&format=json&api_key=x").unwrap();
        let p = r.detection_params().unwrap();
        assert!((p.confidence - 0.5).abs() < 1e-6);
        assert!((p.iou_threshold - 0.3).abs() < 1e-6);
        assert_eq!(o.format, "json");
        let (r, _) = legacy_params("confidence=0.001").unwrap();
        assert!((r.detection_params().unwrap().confidence - 0.01).abs() < 1e-6);
        let (r, _) = legacy_params("confidence=0.25&max_detections=5").unwrap();
        let p = r.detection_params().unwrap();
        assert!((p.confidence - 0.25).abs() < 1e-6);
        assert_eq!(p.max_detections, 5);
        assert!(legacy_params("confidence=abc").is_err());
    }
}
