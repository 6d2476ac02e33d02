//! Object detection: one image's slice of the model output in, predictions in original-image
//! pixels out. Reads the YOLOv8 layout (`[4 + nc, N]`, no objectness) and the YOLOv5 layout
//! (`[N, 5 + nc]`, score = objectness x class score), keeps candidates at or above the
//! confidence threshold, runs NMS with true IoU (per class or class-agnostic) and maps the
//! kept boxes back through the preprocessing [`Geometry`].

use serde::Serialize;

use crate::geometry::Geometry;

/// How a detection head lays out its output for one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum YoloLayout {
    /// `[4 + nc (+ extra), N]`: attribute-major, box then class scores (Ultralytics v8/v11).
    V8,
    /// `[N, 5 + nc]`: anchor-major, box, objectness, class scores (YOLOv5).
    V5,
}

/// Thresholds and limits of one request (Roboflow's field names and defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct DetectionParams {
    pub confidence: f32,
    pub iou_threshold: f32,
    pub class_agnostic_nms: bool,
    pub max_detections: usize,
    pub max_candidates: usize,
    pub class_filter: Option<Vec<String>>,
}

impl Default for DetectionParams {
    fn default() -> Self {
        Self {
            confidence: 0.4,
            iou_threshold: 0.3,
            class_agnostic_nms: false,
            max_detections: 300,
            max_candidates: 3000,
            class_filter: None,
        }
    }
}

/// A box in network-input pixels; `anchor` is its column/row in the output (segmentation
/// reads the mask coefficients there).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub x1: f32,
    pub y1: f32,
    pub x2: f32,
    pub y2: f32,
    pub confidence: f32,
    pub class_id: usize,
    pub anchor: usize,
}

impl Candidate {
    /// `(x1, y1, x2, y2)`.
    pub fn corners(&self) -> (f32, f32, f32, f32) {
        (self.x1, self.y1, self.x2, self.y2)
    }

    fn area(&self) -> f32 {
        (self.x2 - self.x1).max(0.0) * (self.y2 - self.y1).max(0.0)
    }

    fn iou(&self, o: &Candidate) -> f32 {
        let w = (self.x2.min(o.x2) - self.x1.max(o.x1)).max(0.0);
        let h = (self.y2.min(o.y2) - self.y1.max(o.y1)).max(0.0);
        let inter = w * h;
        let union = self.area() + o.area() - inter;
        if union <= 0.0 {
            0.0
        } else {
            inter / union
        }
    }
}

/// Reads the candidates scoring at least `confidence` (inclusive, as Roboflow's legacy
/// back-end) from one image's output. `dims` is that output's shape without the batch axis.
pub fn candidates(
    out: &[f32],
    dims: (usize, usize),
    layout: YoloLayout,
    num_classes: usize,
    confidence: f32,
) -> Vec<Candidate> {
    let mut found = Vec::new();
    match layout {
        YoloLayout::V8 => {
            let (attrs, n) = dims;
            debug_assert!(attrs >= 4 + num_classes && out.len() >= attrs * n);
            // Class-major sweep keeps reads sequential.
            let mut best = vec![f32::NEG_INFINITY; n];
            let mut best_class = vec![0usize; n];
            for c in 0..num_classes {
                let row = &out[(4 + c) * n..(5 + c) * n];
                for (i, &s) in row.iter().enumerate() {
                    if s > best[i] {
                        best[i] = s;
                        best_class[i] = c;
                    }
                }
            }
            for i in 0..n {
                if best[i] >= confidence {
                    found.push(xywh(
                        out[i],
                        out[n + i],
                        out[2 * n + i],
                        out[3 * n + i],
                        best[i],
                        best_class[i],
                        i,
                    ));
                }
            }
        }
        YoloLayout::V5 => {
            let (n, attrs) = dims;
            debug_assert!(attrs >= 5 + num_classes && out.len() >= attrs * n);
            for i in 0..n {
                let row = &out[i * attrs..(i + 1) * attrs];
                let obj = row[4];
                if obj < confidence {
                    continue; // score = obj x class <= obj
                }
                let (class_id, cls) = row[5..5 + num_classes].iter().enumerate().fold(
                    (0, f32::NEG_INFINITY),
                    |acc, (c, &s)| if s > acc.1 { (c, s) } else { acc },
                );
                let score = obj * cls;
                if score >= confidence {
                    found.push(xywh(row[0], row[1], row[2], row[3], score, class_id, i));
                }
            }
        }
    }
    found
}

fn xywh(
    cx: f32,
    cy: f32,
    w: f32,
    h: f32,
    confidence: f32,
    class_id: usize,
    anchor: usize,
) -> Candidate {
    Candidate {
        x1: cx - w / 2.0,
        y1: cy - h / 2.0,
        x2: cx + w / 2.0,
        y2: cy + h / 2.0,
        confidence,
        class_id,
        anchor,
    }
}

/// Greedy NMS with true IoU: boxes in descending confidence; a box is dropped when its IoU
/// with a kept box of the same class (any class when `class_agnostic`) exceeds
/// `iou_threshold`. Keeps at most `max_candidates` boxes going in and `max_detections` out.
pub fn nms(
    mut cands: Vec<Candidate>,
    iou_threshold: f32,
    class_agnostic: bool,
    max_candidates: usize,
    max_detections: usize,
) -> Vec<Candidate> {
    let by_conf = |a: &Candidate, b: &Candidate| b.confidence.total_cmp(&a.confidence);
    if cands.len() > max_candidates && max_candidates > 0 {
        cands.select_nth_unstable_by(max_candidates - 1, by_conf);
        cands.truncate(max_candidates);
    }
    cands.sort_by(by_conf);
    let mut kept: Vec<Candidate> = Vec::new();
    for c in cands {
        if kept.len() >= max_detections {
            break;
        }
        let suppressed = kept
            .iter()
            .any(|k| (class_agnostic || k.class_id == c.class_id) && k.iou(&c) > iou_threshold);
        if !suppressed {
            kept.push(c);
        }
    }
    kept
}

/// One detection as Roboflow's `ObjectDetectionPrediction` puts it on the wire.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct ObjectDetectionPrediction {
    pub x: f32,
    pub y: f32,
    pub width: f32,
    pub height: f32,
    pub confidence: f32,
    #[serde(rename = "class")]
    pub class_name: String,
    pub class_id: usize,
    pub detection_id: String,
}

/// A kept box mapped to the client's image: clipped to the image (or static crop), rounded
/// to whole pixels (as Roboflow does, so `x` and `y` are multiples of 0.5), then shifted by
/// the crop.
pub fn to_original_box(c: &Candidate, geo: &Geometry) -> (f32, f32, f32, f32) {
    let (x1, y1) = geo.to_full_rounded(c.x1, c.y1);
    let (x2, y2) = geo.to_full_rounded(c.x2, c.y2);
    (x1, y1, x2, y2)
}

/// As [`to_original_box`] without the rounding (Roboflow's RF-DETR boxes).
fn to_original_box_exact(c: &Candidate, geo: &Geometry) -> (f32, f32, f32, f32) {
    let map = |x: f32, y: f32| {
        let (ox, oy) = geo.to_original(x, y);
        (
            ox.clamp(0.0, geo.orig_w as f32) + geo.shift_x as f32,
            oy.clamp(0.0, geo.orig_h as f32) + geo.shift_y as f32,
        )
    };
    let (x1, y1) = map(c.x1, c.y1);
    let (x2, y2) = map(c.x2, c.y2);
    (x1, y1, x2, y2)
}

/// A kept box as a prediction in the client's image (centre, size), with a fresh id;
/// `round`: corners rounded to whole pixels first.
pub fn prediction_rounded(
    c: &Candidate,
    class_name: &str,
    geo: &Geometry,
    round: bool,
) -> ObjectDetectionPrediction {
    let (x1, y1, x2, y2) = if round {
        to_original_box(c, geo)
    } else {
        to_original_box_exact(c, geo)
    };
    ObjectDetectionPrediction {
        x: (x1 + x2) / 2.0,
        y: (y1 + y2) / 2.0,
        width: x2 - x1,
        height: y2 - y1,
        confidence: c.confidence,
        class_name: class_name.to_string(),
        class_id: c.class_id,
        detection_id: uuid::Uuid::new_v4().to_string(),
    }
}

/// A kept box as a prediction, corners rounded (every head but RF-DETR).
pub fn prediction(c: &Candidate, class_name: &str, geo: &Geometry) -> ObjectDetectionPrediction {
    prediction_rounded(c, class_name, geo, true)
}

/// Whether `class_filter` lets a class through.
pub fn passes_filter(filter: &Option<Vec<String>>, class_name: &str) -> bool {
    filter
        .as_ref()
        .is_none_or(|f| f.iter().any(|c| c == class_name))
}

/// The boxes of one image's YOLO output that pass the threshold and survive NMS.
pub fn kept(
    out: &[f32],
    dims: (usize, usize),
    layout: YoloLayout,
    num_classes: usize,
    params: &DetectionParams,
) -> Vec<Candidate> {
    nms(
        candidates(out, dims, layout, num_classes, params.confidence),
        params.iou_threshold,
        params.class_agnostic_nms,
        params.max_candidates,
        params.max_detections,
    )
}

/// Turns one image's output (YOLOv5/v8 layout) into its predictions.
pub fn postprocess(
    out: &[f32],
    dims: (usize, usize),
    layout: YoloLayout,
    class_names: &[String],
    geo: &Geometry,
    params: &DetectionParams,
) -> Vec<ObjectDetectionPrediction> {
    let kept = kept(out, dims, layout, class_names.len(), params);
    predictions(&kept, class_names, geo, params, true)
}

/// Kept boxes as predictions, leaving out classes `class_filter` does not name.
pub fn predictions(
    kept: &[Candidate],
    class_names: &[String],
    geo: &Geometry,
    params: &DetectionParams,
    round: bool,
) -> Vec<ObjectDetectionPrediction> {
    kept.iter()
        .filter_map(|c| {
            let name = class_names.get(c.class_id)?;
            if !passes_filter(&params.class_filter, name) {
                return None;
            }
            Some(prediction_rounded(c, name, geo, round))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(x1: f32, y1: f32, x2: f32, y2: f32, conf: f32, class_id: usize) -> Candidate {
        Candidate {
            x1,
            y1,
            x2,
            y2,
            confidence: conf,
            class_id,
            anchor: 0,
        }
    }

    /// A v8 output `[4 + nc, n]` from rows of (cx, cy, w, h, scores...).
    fn v8_output(rows: &[[f32; 6]]) -> Vec<f32> {
        let n = rows.len();
        let mut out = vec![0f32; 6 * n];
        for (i, r) in rows.iter().enumerate() {
            for a in 0..6 {
                out[a * n + i] = r[a];
            }
        }
        out
    }

    #[test]
    fn v8_decodes_centre_boxes_and_best_class_inclusively() {
        let out = v8_output(&[
            [100.0, 50.0, 20.0, 10.0, 0.1, 0.9],
            [10.0, 10.0, 4.0, 4.0, 0.4, 0.2],
            [10.0, 10.0, 4.0, 4.0, 0.39, 0.2],
        ]);
        let c = candidates(&out, (6, 3), YoloLayout::V8, 2, 0.4);
        assert_eq!(c.len(), 2, "0.4 is kept (inclusive), 0.39 is not");
        assert_eq!(
            (c[0].x1, c[0].y1, c[0].x2, c[0].y2),
            (90.0, 45.0, 110.0, 55.0)
        );
        assert_eq!((c[0].class_id, c[0].confidence), (1, 0.9));
        assert_eq!((c[1].class_id, c[1].anchor), (0, 1));
    }

    #[test]
    fn v5_multiplies_objectness_by_class_score() {
        // [n, 5 + 2]
        let out = vec![
            50.0, 50.0, 10.0, 10.0, 0.8, 0.1, 0.75, // 0.6 -> kept as class 1
            50.0, 50.0, 10.0, 10.0, 0.9, 0.3, 0.2, // 0.27 -> dropped
        ];
        let c = candidates(&out, (2, 7), YoloLayout::V5, 2, 0.4);
        assert_eq!(c.len(), 1);
        assert!((c[0].confidence - 0.6).abs() < 1e-6);
        assert_eq!(c[0].class_id, 1);
    }

    #[test]
    fn nms_suppresses_overlaps_of_the_same_class_only() {
        let a = cand(0.0, 0.0, 10.0, 10.0, 0.9, 0);
        let b = cand(1.0, 1.0, 11.0, 11.0, 0.8, 0); // IoU 81/119 = 0.68 with a
        let c = cand(1.0, 1.0, 11.0, 11.0, 0.7, 1); // other class
        let d = cand(20.0, 20.0, 30.0, 30.0, 0.6, 0); // disjoint
        let kept = nms(vec![d, c, b, a], 0.3, false, 3000, 300);
        assert_eq!(kept, vec![a, c, d]);
        let kept = nms(vec![d, c, b, a], 0.3, true, 3000, 300);
        assert_eq!(kept, vec![a, d]);
    }

    #[test]
    fn nms_uses_iou_not_intersection_over_the_smaller_box() {
        // A small box inside a large one: intersection/small-area = 1, IoU = 0.25.
        let big = cand(0.0, 0.0, 20.0, 20.0, 0.9, 0);
        let small = cand(5.0, 5.0, 15.0, 15.0, 0.8, 0);
        assert_eq!(nms(vec![big, small], 0.3, false, 3000, 300).len(), 2);
        assert_eq!(nms(vec![big, small], 0.2, false, 3000, 300).len(), 1);
    }

    #[test]
    fn nms_limits_candidates_and_detections() {
        let boxes: Vec<_> = (0..10)
            .map(|i| {
                cand(
                    i as f32 * 20.0,
                    0.0,
                    i as f32 * 20.0 + 10.0,
                    10.0,
                    0.5 + i as f32 * 0.01,
                    0,
                )
            })
            .collect();
        let kept = nms(boxes.clone(), 0.3, false, 3000, 4);
        assert_eq!(kept.len(), 4);
        assert!((kept[0].confidence - 0.59).abs() < 1e-6);
        let kept = nms(boxes, 0.3, false, 3, 300);
        assert_eq!(kept.len(), 3, "only the 3 best candidates enter NMS");
        assert!((kept[2].confidence - 0.57).abs() < 1e-6);
    }

    #[test]
    fn boxes_map_back_through_the_letterbox_clipped_and_rounded() {
        let spec = crate::geometry::InputSpec {
            width: 640,
            height: 640,
            resize: crate::geometry::ResizeMode::Letterbox { pad: 0 },
            normalization: crate::geometry::Normalization::ZeroToOne,
        };
        let geo = Geometry::compute(640, 480, 640, 480, &spec);
        let c = cand(-5.0, 70.3, 100.4, 200.6, 0.9, 0);
        assert_eq!(to_original_box(&c, &geo), (0.0, 0.0, 100.0, 121.0));
    }

    #[test]
    fn postprocess_builds_roboflow_predictions_and_applies_the_class_filter() {
        let spec = crate::geometry::InputSpec {
            width: 100,
            height: 100,
            resize: crate::geometry::ResizeMode::Stretch,
            normalization: crate::geometry::Normalization::ZeroToOne,
        };
        let geo = Geometry::compute(200, 100, 200, 100, &spec);
        let out = v8_output(&[
            [50.0, 50.0, 20.0, 10.0, 0.1, 0.9],
            [10.0, 10.0, 4.0, 4.0, 0.8, 0.0],
        ]);
        let names = vec!["cat".to_string(), "dog".to_string()];
        let p = postprocess(
            &out,
            (6, 2),
            YoloLayout::V8,
            &names,
            &geo,
            &DetectionParams::default(),
        );
        assert_eq!(p.len(), 2);
        assert_eq!(
            (p[0].x, p[0].y, p[0].width, p[0].height),
            (100.0, 50.0, 40.0, 10.0)
        );
        assert_eq!((p[0].class_name.as_str(), p[0].class_id), ("dog", 1));
        assert_ne!(p[0].detection_id, p[1].detection_id);
        let only_cats = DetectionParams {
            class_filter: Some(vec!["cat".into()]),
            ..Default::default()
        };
        let p = postprocess(&out, (6, 2), YoloLayout::V8, &names, &geo, &only_cats);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].class_name, "cat");
    }
}
