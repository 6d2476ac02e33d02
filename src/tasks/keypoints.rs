//! Keypoint detection. YOLOv8/YOLOv11-pose: the detection rows carry `K` keypoints after the
//! class scores, `[4 + nc + 3K, N]` with (x, y, visibility confidence) each in network-input
//! pixels, and boxes go through the same NMS as detection. YOLO26-pose (end-to-end): rows
//! `[N, 6 + 3K]` = x1, y1, x2, y2, score, class, then the keypoints; NMS ran in the graph.
//! Each kept box's keypoints are mapped to the client's image (clipped, rounded, shifted by a
//! static crop, as Roboflow does) and named from `keypoints_metadata.json`.

use serde::Serialize;

use crate::geometry::Geometry;

use super::detection::{self, DetectionParams, ObjectDetectionPrediction, YoloLayout};
use super::heads::{self, Family};

/// Per-request settings: detection's, plus the lowest keypoint confidence reported.
#[derive(Debug, Clone, PartialEq)]
pub struct KeypointsParams {
    pub detection: DetectionParams,
    /// Keypoints scoring below it are left out (Roboflow's `keypoint_confidence`, default 0).
    pub keypoint_confidence: f32,
}

/// One keypoint as Roboflow's `Keypoint` puts it on the wire.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Keypoint {
    pub x: f32,
    pub y: f32,
    pub confidence: f32,
    pub class_id: usize,
    #[serde(rename = "class")]
    pub class_name: String,
}

/// One detection with its keypoints (Roboflow's `KeypointsPrediction`).
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct KeypointsPrediction {
    #[serde(flatten)]
    pub detection: ObjectDetectionPrediction,
    pub keypoints: Vec<Keypoint>,
}

/// The layout of a pose model's output for one image.
#[derive(Debug, Clone, PartialEq)]
pub struct KeypointLayout {
    /// `(4 + nc + 3K, N)` (YOLOv8-pose) or `(N, 6 + 3K)` (end-to-end).
    pub dims: (usize, usize),
    /// Rows `x1, y1, x2, y2, score, class, keypoints` with NMS done in the graph (YOLO26).
    pub end_to_end: bool,
    pub num_classes: usize,
    /// K: the most keypoints any class has.
    pub num_keypoints: usize,
    /// Keypoint names by object class id (from keypoints_metadata.json).
    pub names: Vec<Vec<String>>,
}

impl KeypointLayout {
    /// Checks the output against the model type's layout (both layouts when the type is not
    /// a known family), the classes and the keypoint names.
    pub fn infer(
        model_type: &str,
        item_shape: &[usize],
        num_classes: usize,
        names: Vec<Vec<String>>,
    ) -> Result<Self, String> {
        let num_keypoints = names.iter().map(Vec::len).max().unwrap_or(0);
        if num_keypoints == 0 {
            return Err("keypoints_metadata.json names no keypoints".into());
        }
        let k3 = 3 * num_keypoints;
        let family = Family::from_model_type(model_type);
        let layout = |dims: (usize, usize), end_to_end| Self {
            dims,
            end_to_end,
            num_classes,
            num_keypoints,
            names: names.clone(),
        };
        match (item_shape, family) {
            ([attrs, n], Some(Family::Yolo) | None) if *attrs == 4 + num_classes + k3 => {
                Ok(layout((*attrs, *n), false))
            }
            ([n, attrs], Some(Family::EndToEnd) | None) if *attrs == 6 + k3 => {
                Ok(layout((*n, *attrs), true))
            }
            (s, Some(Family::EndToEnd)) => Err(format!(
                "keypoint output {s:?} of model_type '{model_type}' is not YOLO26-pose [N, 6 + 3 x {num_keypoints} keypoints]"
            )),
            (s, _) => Err(format!(
                "keypoint output {s:?} of model_type '{model_type}' is not YOLOv8-pose [4 + {num_classes} classes + 3 x {num_keypoints} keypoints, N] (nor YOLO26-pose [N, 6 + {k3}])"
            )),
        }
    }
}

/// Turns one image's output into its predictions with keypoints.
pub fn postprocess(
    out: &[f32],
    layout: &KeypointLayout,
    class_names: &[String],
    geo: &Geometry,
    params: &KeypointsParams,
) -> Vec<KeypointsPrediction> {
    let p = &params.detection;
    let (d0, d1) = layout.dims;
    let first = 4 + layout.num_classes;
    // Value `a` (x, y, confidence) of keypoint `k` of the box from row/column `anchor`.
    let at = |anchor: usize, k: usize, a: usize| {
        if layout.end_to_end {
            out[anchor * d1 + 6 + 3 * k + a]
        } else {
            out[(first + 3 * k + a) * d1 + anchor]
        }
    };
    let kept = if layout.end_to_end {
        heads::end_to_end(out, d0, d1, layout.num_classes, p)
    } else {
        detection::kept(out, layout.dims, YoloLayout::V8, layout.num_classes, p)
    };
    kept.iter()
        .filter_map(|c| {
            let name = class_names.get(c.class_id)?;
            if !detection::passes_filter(&p.class_filter, name) {
                return None;
            }
            let kp_names = layout.names.get(c.class_id).map_or(&[][..], Vec::as_slice);
            let keypoints = (0..layout.num_keypoints.min(kp_names.len()))
                .filter_map(|k| {
                    let confidence = at(c.anchor, k, 2);
                    if confidence < params.keypoint_confidence {
                        return None;
                    }
                    let (x, y) = geo.to_full_rounded(at(c.anchor, k, 0), at(c.anchor, k, 1));
                    Some(Keypoint {
                        x,
                        y,
                        confidence,
                        class_id: k,
                        class_name: kp_names[k].clone(),
                    })
                })
                .collect();
            Some(KeypointsPrediction {
                detection: detection::prediction(c, name, geo),
                keypoints,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::{InputSpec, Normalization, ResizeMode};

    #[test]
    fn keypoints_are_mapped_named_and_filtered() {
        // One class with 2 keypoints, 2 columns; column 1 is the box.
        let names = vec![vec!["nose".to_string(), "tail".to_string()]];
        let layout = KeypointLayout::infer("yolov8n-pose", &[4 + 1 + 6, 2], 1, names).unwrap();
        let rows: [[f32; 2]; 11] = [
            [0.0, 50.0],
            [0.0, 50.0],
            [0.0, 20.0],
            [0.0, 20.0],
            [0.1, 0.9],
            [0.0, 45.2],
            [0.0, 44.0],
            [0.0, 0.8],
            [0.0, 300.0], // off the image: clipped
            [0.0, 55.0],
            [0.0, 0.2],
        ];
        let out: Vec<f32> = rows.iter().flatten().copied().collect();
        // 100x100 network input stretched from a 200x100 image.
        let spec = InputSpec {
            width: 100,
            height: 100,
            resize: ResizeMode::Stretch,
            normalization: Normalization::ZeroToOne,
        };
        let geo = Geometry::compute(200, 100, 200, 100, &spec);
        let params = KeypointsParams {
            detection: DetectionParams::default(),
            keypoint_confidence: 0.0,
        };
        let preds = postprocess(&out, &layout, &["cat".into()], &geo, &params);
        assert_eq!(preds.len(), 1);
        let kp = &preds[0].keypoints;
        assert_eq!(kp.len(), 2);
        assert_eq!(
            (kp[0].x, kp[0].y, kp[0].class_name.as_str()),
            (90.0, 44.0, "nose")
        );
        assert_eq!((kp[1].x, kp[1].y, kp[1].class_id), (200.0, 55.0, 1));
        let strict = KeypointsParams {
            keypoint_confidence: 0.5,
            ..params
        };
        let preds = postprocess(&out, &layout, &["cat".into()], &geo, &strict);
        assert_eq!(preds[0].keypoints.len(), 1, "the tail's 0.2 is under 0.5");
        assert!(KeypointLayout::infer(
            "yolov8n-pose",
            &[4 + 1 + 3, 2],
            1,
            vec![vec!["a".into(), "b".into()]]
        )
        .is_err());
    }

    #[test]
    fn yolo26_rows_carry_their_keypoints_without_nms() {
        let names = vec![vec!["nose".to_string()]];
        // [N, 6 + 3]: two overlapping boxes of one class (both kept: NMS ran in the graph).
        let rows = vec![
            10.0, 10.0, 30.0, 30.0, 0.9, 0.0, 12.0, 14.0, 0.7, //
            11.0, 11.0, 31.0, 31.0, 0.8, 0.0, 20.0, 22.0, 0.6, //
            0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
        ];
        let layout = KeypointLayout::infer("yolo26n-pose", &[3, 9], 1, names.clone()).unwrap();
        assert!(layout.end_to_end);
        let spec = InputSpec {
            width: 100,
            height: 100,
            resize: ResizeMode::Stretch,
            normalization: Normalization::ZeroToOne,
        };
        let geo = Geometry::compute(100, 100, 100, 100, &spec);
        let params = KeypointsParams {
            detection: DetectionParams::default(),
            keypoint_confidence: 0.0,
        };
        let preds = postprocess(&rows, &layout, &["cat".into()], &geo, &params);
        assert_eq!(preds.len(), 2);
        let kp = |i: usize| {
            let k = &preds[i].keypoints[0];
            (k.x, k.y, k.confidence)
        };
        assert_eq!((kp(0), kp(1)), ((12.0, 14.0, 0.7), (20.0, 22.0, 0.6)));
        // The YOLOv8 layout under a YOLO26 type (and the reverse) is refused.
        assert!(KeypointLayout::infer("yolo26n-pose", &[4 + 1 + 3, 5], 1, names.clone()).is_err());
        assert!(KeypointLayout::infer("yolov8n-pose", &[3, 9], 1, names).is_err());
    }
}
