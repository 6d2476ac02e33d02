//! What flows between workflow steps: images (the client's, or windows of them: crops),
//! detections with their lineage (which image, crop or detection they came from, and where
//! it sits in the root image), classifications, and plain JSON. Each kind is serialised as
//! Roboflow's Workflows answers it (`roboflow-workflows.md` §3), detections in the root
//! image's coordinates unless an output asks for its own (`coordinates_system: own`).

use std::sync::Arc;

use image::RgbImage;
use serde_json::{json, Map, Value as Json};

use crate::engine::ImageInput;
use crate::tasks::classification::ClassificationOutput;

/// Where an image (or the image a detection was made on) sits in its parent: offset of its
/// top-left corner, and the parent's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Origin {
    pub x: i64,
    pub y: i64,
    pub width: u32,
    pub height: u32,
}

impl Origin {
    fn to_json(self) -> Json {
        json!({"offset_x": self.x, "offset_y": self.y, "width": self.width, "height": self.height})
    }
}

/// An image's or a detection's ancestry: its parent (an input image, a crop's source
/// detection) and the input image at the root, each with where it sits.
#[derive(Debug, Clone, PartialEq)]
pub struct Lineage {
    pub parent_id: Arc<str>,
    pub parent: Origin,
    pub root_id: Arc<str>,
    pub root: Origin,
}

impl Lineage {
    /// An input image's own lineage: itself at the root.
    pub fn root(id: &str, width: u32, height: u32) -> Self {
        let id: Arc<str> = id.into();
        let origin = Origin {
            x: 0,
            y: 0,
            width,
            height,
        };
        Self {
            parent_id: Arc::clone(&id),
            parent: origin,
            root_id: id,
            root: origin,
        }
    }

    /// The lineage of a window at `(x, y)` of an image of `width x height` whose lineage is
    /// `self`, made from the detection (or slice) `id`.
    pub fn child(&self, id: &str, x: i64, y: i64, width: u32, height: u32) -> Self {
        Self {
            parent_id: id.into(),
            parent: Origin {
                x,
                y,
                width,
                height,
            },
            root_id: Arc::clone(&self.root_id),
            root: Origin {
                x: self.root.x + x,
                y: self.root.y + y,
                ..self.root
            },
        }
    }

    /// `parent_id` and, for a child, `parent_origin`, `root_parent_id`, `root_parent_origin`.
    fn put(&self, out: &mut Map<String, Json>) {
        out.insert("parent_id".into(), Json::from(&*self.parent_id));
        if self.parent_id != self.root_id {
            out.insert("parent_origin".into(), self.parent.to_json());
            out.insert("root_parent_id".into(), Json::from(&*self.root_id));
            out.insert("root_parent_origin".into(), self.root.to_json());
        }
    }
}

/// Where an image's pixels are.
#[derive(Clone)]
pub enum Pixels {
    /// An input image as the client sent it: decoded by the model's pipeline straight into
    /// its ring slot, and decoded whole (once) only when a crop or a drawing needs it.
    Encoded {
        input: ImageInput,
        decoded: Arc<tokio::sync::OnceCell<Arc<RgbImage>>>,
    },
    /// A window of a decoded image (a crop): never copied until a model's ring slot or an
    /// encoder reads it.
    Window {
        image: Arc<RgbImage>,
        x: u32,
        y: u32,
        width: u32,
        height: u32,
    },
}

/// One image of a workflow.
#[derive(Clone)]
pub struct WfImage {
    pub pixels: Pixels,
    pub lineage: Lineage,
    /// The base64 text to echo when the image is an output unchanged (the client's own).
    pub base64: Option<Arc<str>>,
}

impl WfImage {
    /// A window's size; `None` for an input image not decoded yet.
    pub fn size(&self) -> Option<(u32, u32)> {
        match &self.pixels {
            Pixels::Window { width, height, .. } => Some((*width, *height)),
            Pixels::Encoded { decoded, .. } => decoded.get().map(|i| (i.width(), i.height())),
        }
    }
}

/// One keypoint of a detection.
#[derive(Debug, Clone, PartialEq)]
pub struct Keypoint {
    pub class_id: usize,
    pub class_name: String,
    pub confidence: f32,
    pub x: f32,
    pub y: f32,
}

/// One detection, corners in the pixels of the image it was made on.
#[derive(Debug, Clone, PartialEq)]
pub struct Det {
    pub x1: f32,
    pub y1: f32,
    pub x2: f32,
    pub y2: f32,
    pub confidence: f32,
    pub class_id: i64,
    pub class_name: String,
    pub detection_id: String,
    pub lineage: Lineage,
    /// Instance segmentation: the mask's outline.
    pub polygon: Option<Vec<(f32, f32)>>,
    pub keypoints: Option<Vec<Keypoint>>,
}

impl Det {
    pub fn width(&self) -> f32 {
        (self.x2 - self.x1).abs()
    }

    pub fn height(&self) -> f32 {
        (self.y2 - self.y1).abs()
    }

    /// Moved by `(dx, dy)`: box, polygon and keypoints.
    pub fn shifted(&self, dx: f32, dy: f32) -> Det {
        let mut d = self.clone();
        d.x1 += dx;
        d.x2 += dx;
        d.y1 += dy;
        d.y2 += dy;
        if let Some(p) = &mut d.polygon {
            p.iter_mut().for_each(|(x, y)| {
                *x += dx;
                *y += dy
            });
        }
        if let Some(k) = &mut d.keypoints {
            k.iter_mut().for_each(|k| {
                k.x += dx;
                k.y += dy
            });
        }
        d
    }

    fn to_json(&self) -> Json {
        let mut o = Map::new();
        let (w, h) = (self.width() as f64, self.height() as f64);
        o.insert("width".into(), json!(w));
        o.insert("height".into(), json!(h));
        o.insert("x".into(), json!(self.x1.min(self.x2) as f64 + w / 2.0));
        o.insert("y".into(), json!(self.y1.min(self.y2) as f64 + h / 2.0));
        o.insert("confidence".into(), json!(self.confidence as f64));
        o.insert("class_id".into(), json!(self.class_id));
        if let Some(p) = &self.polygon {
            let pts: Vec<Json> = p
                .iter()
                .map(|(x, y)| json!({"x": *x as f64, "y": *y as f64}))
                .collect();
            o.insert("points".into(), Json::Array(pts));
        }
        o.insert("class".into(), json!(self.class_name));
        o.insert("detection_id".into(), json!(self.detection_id));
        self.lineage.put(&mut o);
        if let Some(k) = &self.keypoints {
            let kps: Vec<Json> = k
                .iter()
                .map(|k| {
                    json!({"class_id": k.class_id, "class": k.class_name,
                        "confidence": k.confidence as f64, "x": k.x as f64, "y": k.y as f64})
                })
                .collect();
            o.insert("keypoints".into(), Json::Array(kps));
        }
        Json::Object(o)
    }
}

/// One image's detections.
#[derive(Debug, Clone, PartialEq)]
pub struct Detections {
    /// The size of the image they were made on.
    pub width: u32,
    pub height: u32,
    /// That image's lineage (what root conversion reads when there are no detections).
    pub lineage: Lineage,
    pub dets: Vec<Det>,
}

impl Detections {
    /// In the root image's coordinates: shifted by where the image sits in the root, sized
    /// as the root, with the root as every detection's parent.
    pub fn to_root(&self) -> Detections {
        let needs = |l: &Lineage| {
            l.root.x != 0
                || l.root.y != 0
                || l.root.width != self.width
                || l.root.height != self.height
        };
        if self.dets.is_empty() {
            // No detections on a crop: the root image's size (as the reference).
            let l = &self.lineage;
            if self.width == 0 || !needs(l) {
                return self.clone();
            }
            return Detections {
                width: l.root.width,
                height: l.root.height,
                lineage: Lineage::root(&l.root_id, l.root.width, l.root.height),
                dets: Vec::new(),
            };
        }
        if !self.dets.iter().any(|d| needs(&d.lineage)) {
            return self.clone();
        }
        let root = &self.dets[0].lineage;
        let (w, h) = (root.root.width, root.root.height);
        let own = Lineage::root(&root.root_id, w, h);
        Detections {
            width: w,
            height: h,
            lineage: own.clone(),
            dets: self
                .dets
                .iter()
                .map(|d| {
                    let mut s = d.shifted(d.lineage.root.x as f32, d.lineage.root.y as f32);
                    s.lineage = own.clone();
                    s
                })
                .collect(),
        }
    }

    pub fn to_json(&self) -> Json {
        // Detections made from nothing (`fusion::empty`) have no image: null, as the
        // reference answers an empty `sv.Detections`.
        let (w, h) = if self.width == 0 && self.height == 0 {
            (Json::Null, Json::Null)
        } else {
            (json!(self.width), json!(self.height))
        };
        json!({
            "image": {"width": w, "height": h},
            "predictions": self.dets.iter().map(Det::to_json).collect::<Vec<_>>(),
        })
    }
}

/// One image's classification, as the model route answers it plus its lineage.
#[derive(Debug, Clone, PartialEq)]
pub struct Classification {
    pub output: ClassificationOutput,
    pub inference_id: String,
    pub time: f64,
    pub model_id: String,
    pub width: u32,
    pub height: u32,
    pub lineage: Lineage,
}

impl Classification {
    /// The top class and its confidence (single-label), or the most confident class.
    pub fn top(&self) -> Option<(String, usize, f32)> {
        match &self.output {
            ClassificationOutput::SingleLabel { predictions, .. } => predictions
                .first()
                .map(|p| (p.class_name.clone(), p.class_id, p.confidence)),
            ClassificationOutput::MultiLabel { predictions, .. } => predictions
                .iter()
                .max_by(|a, b| a.1.confidence.total_cmp(&b.1.confidence))
                .map(|(n, s)| (n.clone(), s.class_id, s.confidence)),
        }
    }

    pub fn to_json(&self) -> Json {
        let mut o = Map::new();
        o.insert("inference_id".into(), json!(self.inference_id));
        o.insert("time".into(), json!(self.time));
        o.insert("resolved_model".into(), json!({"model_id": self.model_id}));
        o.insert(
            "image".into(),
            json!({"width": self.width, "height": self.height}),
        );
        // Confidences as the reference writes them: Python floats rounded to 4 places
        // (single-label), not f32 values widened.
        let r4 = |c: f32| (c as f64 * 10_000.0).round() / 10_000.0;
        match &self.output {
            ClassificationOutput::SingleLabel {
                predictions,
                top,
                confidence,
            } => {
                let preds: Vec<Json> = predictions
                    .iter()
                    .map(|p| json!({"class": p.class_name, "class_id": p.class_id, "confidence": r4(p.confidence)}))
                    .collect();
                o.insert("predictions".into(), Json::Array(preds));
                o.insert("top".into(), json!(top));
                o.insert("confidence".into(), json!(r4(*confidence)));
            }
            ClassificationOutput::MultiLabel {
                predictions,
                predicted_classes,
            } => {
                let preds: Map<String, Json> = predictions
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.clone(),
                            json!({"confidence": v.confidence as f64, "class_id": v.class_id}),
                        )
                    })
                    .collect();
                o.insert("predictions".into(), Json::Object(preds));
                o.insert("predicted_classes".into(), json!(predicted_classes));
            }
        }
        o.insert("prediction_type".into(), json!("classification"));
        o.insert("parent_id".into(), Json::from(&*self.lineage.parent_id));
        o.insert("root_parent_id".into(), Json::from(&*self.lineage.root_id));
        Json::Object(o)
    }
}

/// A value in a workflow.
#[derive(Clone)]
pub enum Value {
    /// Numbers, strings, booleans, null, and lists and dicts of them.
    Json(Json),
    Image(Arc<WfImage>),
    Detections(Arc<Detections>),
    Classification(Arc<Classification>),
    /// One detection, inside a filter's statement, with the size of its image.
    Detection(Arc<(Det, u32, u32)>),
    List(Vec<Value>),
    /// `$steps.<name>.*`: a step's outputs by name.
    Dict(Vec<(String, Value)>),
}

impl Value {
    pub fn null() -> Self {
        Value::Json(Json::Null)
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Value::Json(Json::Null))
    }

    pub fn as_json(&self) -> Option<&Json> {
        match self {
            Value::Json(j) => Some(j),
            _ => None,
        }
    }

    /// A kind name for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Json(Json::Null) => "null",
            Value::Json(Json::Bool(_)) => "boolean",
            Value::Json(Json::Number(_)) => "number",
            Value::Json(Json::String(_)) => "string",
            Value::Json(Json::Array(_)) | Value::List(_) => "list",
            Value::Json(Json::Object(_)) | Value::Dict(_) => "dictionary",
            Value::Image(_) => "image",
            Value::Detections(_) => "detections",
            Value::Classification(_) => "classification_prediction",
            Value::Detection(_) => "detection",
        }
    }
}

/// Serialises a value: detections converted to the root image's coordinates when
/// `to_root`; images as base64 JPEG (`encoded`: the images encoded for this answer, in the
/// order they are met).
pub fn to_json(v: &Value, to_root: bool, images: &mut dyn FnMut(&WfImage) -> Json) -> Json {
    match v {
        Value::Json(j) => j.clone(),
        Value::Detections(d) if to_root => d.to_root().to_json(),
        Value::Detections(d) => d.to_json(),
        Value::Classification(c) => c.to_json(),
        Value::Detection(d) => d.0.to_json(),
        Value::Image(i) => images(i),
        Value::List(items) => {
            Json::Array(items.iter().map(|i| to_json(i, to_root, images)).collect())
        }
        Value::Dict(items) => Json::Object(
            items
                .iter()
                .map(|(k, v)| (k.clone(), to_json(v, to_root, images)))
                .collect(),
        ),
    }
}

/// An image as Roboflow's Workflows answers it: base64 JPEG, made-up video metadata for a
/// still image, and for a crop where it came from.
pub fn image_json(img: &WfImage, base64: String) -> Json {
    let mut o = Map::new();
    o.insert("type".into(), json!("base64"));
    o.insert("value".into(), Json::String(base64));
    let now = chrono_like_now();
    o.insert(
        "video_metadata".into(),
        json!({"video_identifier": &*img.lineage.parent_id, "frame_number": 0,
               "frame_timestamp": now, "fps": 30.0, "measured_fps": null,
               "comes_from_video_file": null, "total_frames": null}),
    );
    if img.lineage.parent_id != img.lineage.root_id {
        img.lineage.put(&mut o);
    }
    Json::Object(o)
}

/// The current UTC time as ISO 8601 with microseconds (Python's `datetime.isoformat()`).
fn chrono_like_now() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}",
        now.year(),
        now.month() as u8,
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.microsecond()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn det(x1: f32, lineage: Lineage) -> Det {
        Det {
            x1,
            y1: 10.0,
            x2: x1 + 20.0,
            y2: 30.0,
            confidence: 0.5,
            class_id: 1,
            class_name: "a".into(),
            detection_id: "d".into(),
            lineage,
            polygon: Some(vec![(x1, 10.0)]),
            keypoints: None,
        }
    }

    /// Detections made on a crop at (438, 210) of a 773x512 image come back shifted into
    /// the root, sized as the root, with the root as their parent (no origin fields).
    #[test]
    fn crop_detections_convert_to_the_root_image() {
        let root = Lineage::root("image", 773, 512);
        let crop = root.child("det-1", 438, 210, 773, 512);
        let d = Detections {
            width: 155,
            height: 137,
            lineage: crop.clone(),
            dets: vec![det(76.0, crop)],
        };
        let own = d.to_json();
        assert_eq!(own["predictions"][0]["x"], 86.0);
        assert_eq!(own["predictions"][0]["parent_id"], "det-1");
        assert_eq!(own["predictions"][0]["parent_origin"]["offset_x"], 438);
        assert_eq!(own["predictions"][0]["root_parent_id"], "image");
        let rooted = d.to_root().to_json();
        assert_eq!(rooted["image"], json!({"width": 773, "height": 512}));
        assert_eq!(rooted["predictions"][0]["x"], 524.0);
        assert_eq!(rooted["predictions"][0]["y"], 230.0);
        assert_eq!(rooted["predictions"][0]["points"][0]["x"], 514.0);
        assert_eq!(rooted["predictions"][0]["parent_id"], "image");
        assert!(rooted["predictions"][0].get("parent_origin").is_none());
    }

    /// Detections on the input image itself are left as they are.
    #[test]
    fn root_detections_are_not_converted() {
        let root = Lineage::root("image", 100, 100);
        let d = Detections {
            width: 100,
            height: 100,
            lineage: root.clone(),
            dets: vec![det(5.0, root)],
        };
        assert_eq!(d.to_root(), d);
        let keys: Vec<String> = d.to_json()["predictions"][0]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        assert_eq!(
            keys,
            [
                "width",
                "height",
                "x",
                "y",
                "confidence",
                "class_id",
                "points",
                "class",
                "detection_id",
                "parent_id"
            ]
        );
    }
}
