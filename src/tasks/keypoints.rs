//! Keypoint detection (YOLOv8/YOLOv11-pose): the detection rows carry `K` keypoints after the
//! class scores, `[4 + nc + 3K, N]` with (x, y, visibility confidence) each in network-input
//! pixels. Boxes go through the same NMS as detection; each kept box's keypoints are read
//! from its column, mapped to the client's image (clipped, rounded, shifted by a static crop,
//! as Roboflow does) and named from `keypoints_metadata.json`.

use serde::Serialize;

use crate::geometry::Geometry;

use super::detection::{self, DetectionParams, ObjectDetectionPrediction, YoloLayout};

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
    /// `(4 + nc + 3K, N)`.
    pub dims: (usize, usize),
    pub num_classes: usize,
    /// K: the most keypoints any class has.
    pub num_keypoints: usize,
    /// Keypoint names by object class id (from keypoints_metadata.json).
    pub names: Vec<Vec<String>>,
}

impl KeypointLayout {
    /// Checks a `[4 + nc + 3K, N]` output against the classes and the keypoint names.
    pub fn infer(
        item_shape: &[usize],
        num_classes: usize,
        names: Vec<Vec<String>>,
    ) -> Result<Self, String> {
        let num_keypoints = names.iter().map(Vec::len).max().unwrap_or(0);
        if num_keypoints == 0 {
            return Err("keypoints_metadata.json names no keypoints".into());
        }
        match item_shape {
            [attrs, n] if *attrs == 4 + num_classes + 3 * num_keypoints => Ok(Self {
                dims: (*attrs, *n),
                num_classes,
                num_keypoints,
                names,
            }),
            s => Err(format!(
                "keypoint output {s:?} is not YOLOv8-pose [4 + {num_classes} classes + 3 x {num_keypoints} keypoints, N]"
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
    let kept = detection::kept(out, layout.dims, YoloLayout::V8, layout.num_classes, p);
    let (_, n) = layout.dims;
    let first = 4 + layout.num_classes;
    kept.iter()
        .filter_map(|c| {
            let name = class_names.get(c.class_id)?;
            if !detection::passes_filter(&p.class_filter, name) {
                return None;
            }
            let kp_names = layout.names.get(c.class_id).map_or(&[][..], Vec::as_slice);
            let keypoints = (0..layout.num_keypoints.min(kp_names.len()))
                .filter_map(|k| {
                    let at = |a: usize| out[(first + 3 * k + a) * n + c.anchor];
                    let confidence = at(2);
                    if confidence < params.keypoint_confidence {
                        return None;
                    }
                    let (x, y) = geo.to_full_rounded(at(0), at(1));
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
        let layout = KeypointLayout::infer(&[4 + 1 + 6, 2], 1, names).unwrap();
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
        assert!(
            KeypointLayout::infer(&[4 + 1 + 3, 2], 1, vec![vec!["a".into(), "b".into()]]).is_err()
        );
    }
}
