//! Object-detection heads: which output layout a model has, chosen once at load from
//! `model_type.json`'s `model_type` and the graph's outputs (as Roboflow picks its model
//! class), and how one image's outputs become boxes in network-input pixels.
//!
//! | head | model types | outputs | NMS |
//! |---|---|---|---|
//! | YOLOv8 | yolov8, yolov11, yolov12, … | `[4 + nc, N]` | server |
//! | YOLOv5 | yolov5 | `[N, 5 + nc]` | server |
//! | end-to-end | yolov10, yolo26 | `[N, 6]`: x1, y1, x2, y2, score, class | in the graph |
//! | YOLO-NAS | yolo_nas_* | boxes `[N, 4]` x1y1x2y2, scores `[N, nc]` | server |
//! | RF-DETR | rfdetr-* | `dets` `[Q, 4]` normalised cx, cy, w, h; `labels` `[Q, C]` logits | none: top-k |

use crate::model::backend::OutputTensor;

use super::detection::{self, Candidate, DetectionParams, YoloLayout};

/// Roboflow's name of the background class some RF-DETR exports list first.
pub const RFDETR_BACKGROUND: &str = "background_class83422";

/// How one detection model lays out its outputs (indices are output positions).
#[derive(Debug, Clone, PartialEq)]
pub enum DetectionHead {
    Yolo {
        layout: YoloLayout,
        dims: (usize, usize),
    },
    EndToEnd {
        output: usize,
        n: usize,
        attrs: usize,
    },
    Nas {
        boxes: usize,
        scores: usize,
        n: usize,
    },
    RfDetr {
        dets: usize,
        labels: usize,
        queries: usize,
        classes: usize,
        /// Column of the background class, when class_names.txt lists it (dropped there).
        background: Option<usize>,
    },
}

/// The model family `model_type` names, as far as the output layout goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Yolo,
    EndToEnd,
    Nas,
    RfDetr,
}

impl Family {
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        let t = model_type.to_ascii_lowercase();
        if t.starts_with("rfdetr") {
            Some(Family::RfDetr)
        } else if t.starts_with("yolov10") || t.starts_with("yolo26") {
            Some(Family::EndToEnd)
        } else if t.starts_with("yolo_nas") || t.starts_with("yolonas") {
            Some(Family::Nas)
        } else if t.starts_with("yolo") {
            Some(Family::Yolo)
        } else {
            None
        }
    }
}

/// `name [shape]` of every output, for load errors.
pub fn describe(outputs: &[OutputTensor]) -> String {
    outputs
        .iter()
        .map(|o| format!("{} {:?}", o.name, o.shape))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What picks a detection or segmentation head besides the outputs.
#[derive(Debug, Clone, Copy)]
pub struct HeadHints<'a> {
    /// `model_type.json`'s `model_type`: names the family when it is a known one.
    pub model_type: &'a str,
    /// Class names (the background class of an RF-DETR export already taken out).
    pub num_classes: usize,
    /// RF-DETR: the background column of the class scores.
    pub background: Option<usize>,
}

impl<'a> HeadHints<'a> {
    pub fn new(model_type: &'a str, num_classes: usize, background: Option<usize>) -> Self {
        Self {
            model_type,
            num_classes,
            background,
        }
    }
}

impl DetectionHead {
    /// Picks the head from the model type (when it names a known family) and checks it
    /// against the outputs; with an unknown model type, the outputs alone decide.
    pub fn infer(hints: HeadHints<'_>, outputs: &[OutputTensor]) -> Result<Self, String> {
        let (model_type, num_classes) = (hints.model_type, hints.num_classes);
        let background = hints.background;
        let family = Family::from_model_type(model_type);
        let tried: Vec<Family> = match family {
            Some(f) => vec![f],
            None => vec![Family::RfDetr, Family::Nas, Family::Yolo, Family::EndToEnd],
        };
        let mut why = Vec::new();
        for f in tried {
            match Self::try_family(f, outputs, num_classes, background) {
                Ok(head) => return Ok(head),
                Err(e) => why.push(e),
            }
        }
        Err(format!(
            "cannot decode the outputs of model_type '{model_type}' for the {num_classes} classes of class_names.txt: {} (outputs found: {})",
            why.join("; "),
            describe(outputs)
        ))
    }

    fn try_family(
        family: Family,
        outputs: &[OutputTensor],
        nc: usize,
        background: Option<usize>,
    ) -> Result<Self, String> {
        let shape2 = |i: usize| match outputs.get(i).map(|o| o.item_shape()) {
            Some(&[a, b]) => Some((a, b)),
            _ => None,
        };
        match family {
            Family::Yolo => {
                let dims = shape2(0).ok_or("YOLO needs one [batch, a, b] output")?;
                if dims.0 == 4 + nc {
                    Ok(DetectionHead::Yolo {
                        layout: YoloLayout::V8,
                        dims,
                    })
                } else if dims.1 == 5 + nc {
                    Ok(DetectionHead::Yolo {
                        layout: YoloLayout::V5,
                        dims,
                    })
                } else {
                    Err(format!(
                        "{dims:?} is neither YOLOv8 [4+nc, N] nor YOLOv5 [N, 5+nc]"
                    ))
                }
            }
            Family::EndToEnd => match shape2(0) {
                Some((n, attrs)) if attrs == 6 => Ok(DetectionHead::EndToEnd {
                    output: 0,
                    n,
                    attrs,
                }),
                _ => Err("an end-to-end (NMS-free) model needs one [batch, N, 6] output".into()),
            },
            Family::Nas => {
                // Roboflow reads boxes from the first output and scores from the second.
                match (shape2(0), shape2(1)) {
                    (Some((n, 4)), Some((ns, c))) if n == ns && c == nc => Ok(DetectionHead::Nas {
                        boxes: 0,
                        scores: 1,
                        n,
                    }),
                    _ => Err(format!(
                        "YOLO-NAS needs boxes [batch, N, 4] then scores [batch, N, {nc}]"
                    )),
                }
            }
            Family::RfDetr => {
                let named = |name: &str| outputs.iter().position(|o| o.name == name);
                let dets = named("dets")
                    .or_else(|| (0..outputs.len()).find(|&i| shape2(i).is_some_and(|d| d.1 == 4)));
                let labels = named("labels").or_else(|| {
                    (0..outputs.len()).find(|&i| Some(i) != dets && shape2(i).is_some())
                });
                let (Some(d), Some(l)) = (dets, labels) else {
                    return Err("RF-DETR needs dets [batch, Q, 4] and labels [batch, Q, C]".into());
                };
                let (Some((q, 4)), Some((ql, classes))) = (shape2(d), shape2(l)) else {
                    return Err("RF-DETR needs dets [batch, Q, 4] and labels [batch, Q, C]".into());
                };
                let needed = nc + background.map_or(0, |_| 1);
                if q != ql || classes < needed {
                    return Err(format!(
                        "RF-DETR labels [{ql}, {classes}] do not hold the {needed} classes of the {q} queries"
                    ));
                }
                Ok(DetectionHead::RfDetr {
                    dets: d,
                    labels: l,
                    queries: q,
                    classes,
                    background,
                })
            }
        }
    }

    /// Whether the server runs NMS on this head's boxes.
    pub fn needs_nms(&self) -> bool {
        matches!(self, DetectionHead::Yolo { .. } | DetectionHead::Nas { .. })
    }

    /// Whether boxes are rounded to whole pixels (Roboflow does not round RF-DETR's).
    pub fn rounds(&self) -> bool {
        !matches!(self, DetectionHead::RfDetr { .. })
    }

    /// Image `i`'s boxes in network-input pixels (`input` is (height, width)), kept as
    /// Roboflow keeps them: after NMS where the server runs it, else after the confidence
    /// filter and top-k of NMS-free heads.
    pub fn boxes(
        &self,
        outputs: &[OutputTensor],
        i: usize,
        input: (usize, usize),
        num_classes: usize,
        p: &DetectionParams,
    ) -> Result<Vec<Candidate>, String> {
        let item = |o: usize| {
            outputs
                .get(o)
                .map(|t| t.item(i))
                .ok_or_else(|| format!("output {o} is missing"))
        };
        let cands = match *self {
            DetectionHead::Yolo { layout, dims } => {
                detection::candidates(item(0)?, dims, layout, num_classes, p.confidence)
            }
            DetectionHead::EndToEnd { output, n, attrs } => {
                end_to_end(item(output)?, n, attrs, num_classes, p)
            }
            DetectionHead::Nas { boxes, scores, n } => {
                nas(item(boxes)?, item(scores)?, n, num_classes, p.confidence)
            }
            DetectionHead::RfDetr {
                dets,
                labels,
                queries,
                classes,
                background,
            } => rf_detr(
                item(dets)?,
                item(labels)?,
                queries,
                classes,
                background,
                num_classes,
                input,
                p,
            ),
        };
        Ok(if self.needs_nms() {
            detection::nms(
                cands,
                p.iou_threshold,
                p.class_agnostic_nms,
                p.max_candidates,
                p.max_detections,
            )
        } else {
            cands
        })
    }
}

/// NMS-free rows `x1, y1, x2, y2, score, class`: those scoring above `confidence` (strictly,
/// as Roboflow's YOLOv10 class), in the graph's order (by score), at most `max_detections`.
pub(crate) fn end_to_end(
    out: &[f32],
    n: usize,
    attrs: usize,
    num_classes: usize,
    p: &DetectionParams,
) -> Vec<Candidate> {
    out.chunks_exact(attrs)
        .take(n)
        .enumerate()
        .filter(|(_, r)| r[4] > p.confidence && r[5] >= 0.0 && (r[5] as usize) < num_classes)
        .take(p.max_detections)
        .map(|(anchor, r)| Candidate {
            x1: r[0],
            y1: r[1],
            x2: r[2],
            y2: r[3],
            confidence: r[4],
            class_id: r[5] as usize,
            anchor,
        })
        .collect()
}

/// YOLO-NAS: box `x1, y1, x2, y2` and per-class scores; the best class scoring at least
/// `confidence` (inclusive, as the legacy NMS).
fn nas(boxes: &[f32], scores: &[f32], n: usize, nc: usize, confidence: f32) -> Vec<Candidate> {
    (0..n)
        .filter_map(|i| {
            let row = &scores[i * nc..(i + 1) * nc];
            let (class_id, &s) = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1))?;
            (s >= confidence).then(|| Candidate {
                x1: boxes[4 * i],
                y1: boxes[4 * i + 1],
                x2: boxes[4 * i + 2],
                y2: boxes[4 * i + 3],
                confidence: s,
                class_id,
                anchor: i,
            })
        })
        .collect()
}

/// RF-DETR: sigmoid of every query x class logit, the `max_detections` best over all pairs,
/// those above `confidence` (strictly); the background column (if any) is dropped and the
/// classes after it move down one, as Roboflow's `RFDETRObjectDetection` does.
#[allow(clippy::too_many_arguments)]
fn rf_detr(
    dets: &[f32],
    logits: &[f32],
    queries: usize,
    classes: usize,
    background: Option<usize>,
    num_classes: usize,
    input: (usize, usize),
    p: &DetectionParams,
) -> Vec<Candidate> {
    let sigmoid = |x: f32| 1.0 / (1.0 + (-x).exp());
    let mut scored: Vec<(f32, usize)> = logits[..queries * classes]
        .iter()
        .enumerate()
        .map(|(k, &l)| (sigmoid(l), k))
        .filter(|&(s, _)| s > p.confidence)
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    scored.truncate(p.max_detections);
    let (h, w) = (input.0 as f32, input.1 as f32);
    scored
        .into_iter()
        .filter_map(|(score, k)| {
            let (q, mut class_id) = (k / classes, k % classes);
            if let Some(bg) = background {
                if class_id == bg {
                    return None;
                }
                if class_id > bg {
                    class_id -= 1;
                }
            }
            if class_id >= num_classes {
                return None;
            }
            let b = &dets[4 * q..4 * q + 4];
            let (cx, cy, bw, bh) = (b[0] * w, b[1] * h, b[2] * w, b[3] * h);
            Some(Candidate {
                x1: cx - bw / 2.0,
                y1: cy - bh / 2.0,
                x2: cx + bw / 2.0,
                y2: cy + bh / 2.0,
                confidence: score,
                class_id,
                anchor: q,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::backend::OutputBuffer;

    fn tensor(name: &str, shape: &[usize], data: Vec<f32>) -> OutputTensor {
        OutputTensor {
            name: name.into(),
            shape: shape.to_vec(),
            data: OutputBuffer::from(data),
        }
    }

    fn params(confidence: f32) -> DetectionParams {
        DetectionParams {
            confidence,
            ..DetectionParams::default()
        }
    }

    #[test]
    fn model_type_picks_the_family_and_outputs_must_fit_it() {
        let e2e = [tensor("output0", &[1, 3, 6], vec![0.0; 18])];
        assert_eq!(
            DetectionHead::infer(HeadHints::new("yolov10n", 4, None), &e2e).unwrap(),
            DetectionHead::EndToEnd {
                output: 0,
                n: 3,
                attrs: 6
            }
        );
        // An unknown model type: the outputs decide.
        assert!(matches!(
            DetectionHead::infer(HeadHints::new("", 4, None), &e2e).unwrap(),
            DetectionHead::EndToEnd { .. }
        ));
        // A YOLOv8 model type with an end-to-end output: a load error naming the outputs.
        let e = DetectionHead::infer(HeadHints::new("yolov8n", 4, None), &e2e).unwrap_err();
        assert!(e.contains("output0 [1, 3, 6]"), "{e}");
        let detr = [
            tensor("dets", &[1, 2, 4], vec![0.0; 8]),
            tensor("labels", &[1, 2, 5], vec![0.0; 10]),
        ];
        assert!(matches!(
            DetectionHead::infer(HeadHints::new("rfdetr-nano", 4, None), &detr).unwrap(),
            DetectionHead::RfDetr {
                dets: 0,
                labels: 1,
                queries: 2,
                classes: 5,
                ..
            }
        ));
        let nas = [
            tensor("boxes", &[1, 7, 4], vec![0.0; 28]),
            tensor("scores", &[1, 7, 3], vec![0.0; 21]),
        ];
        assert!(matches!(
            DetectionHead::infer(HeadHints::new("yolo_nas_s", 3, None), &nas).unwrap(),
            DetectionHead::Nas {
                boxes: 0,
                scores: 1,
                n: 7
            }
        ));
        let e = DetectionHead::infer(HeadHints::new("yolo_nas_s", 5, None), &nas).unwrap_err();
        assert!(e.contains("scores [1, 7, 3]"), "{e}");
    }

    #[test]
    fn end_to_end_rows_are_filtered_strictly_without_nms() {
        // Two overlapping boxes of one class both survive: the graph already ran NMS.
        let rows = vec![
            10.0, 10.0, 50.0, 50.0, 0.9, 1.0, //
            12.0, 12.0, 50.0, 50.0, 0.8, 1.0, //
            0.0, 0.0, 5.0, 5.0, 0.4, 0.0, //
            0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
        ];
        let out = [tensor("output0", &[1, 4, 6], rows)];
        let head = DetectionHead::infer(HeadHints::new("yolo26n", 2, None), &out).unwrap();
        let kept = head.boxes(&out, 0, (64, 64), 2, &params(0.4)).unwrap();
        assert_eq!(kept.len(), 2, "0.4 is not above 0.4");
        assert_eq!((kept[1].x1, kept[1].class_id), (12.0, 1));
        let one = DetectionParams {
            max_detections: 1,
            ..params(0.1)
        };
        assert_eq!(head.boxes(&out, 0, (64, 64), 2, &one).unwrap().len(), 1);
    }

    #[test]
    fn rf_detr_takes_top_pairs_and_drops_the_background_column() {
        // 2 queries x 3 columns; column 0 is the background.
        let dets = vec![0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.1, 0.1];
        let logits = vec![
            5.0, 3.0, -20.0, // query 0: background (dropped), class 0 at sigmoid(3)
            -20.0, -20.0, 2.0, // query 1: class 1 at sigmoid(2)
        ];
        let out = [
            tensor("dets", &[1, 2, 4], dets),
            tensor("labels", &[1, 2, 3], logits),
        ];
        let head = DetectionHead::infer(HeadHints::new("rfdetr-base", 2, Some(0)), &out).unwrap();
        let kept = head.boxes(&out, 0, (100, 200), 2, &params(0.5)).unwrap();
        assert_eq!(kept.len(), 2);
        assert_eq!(kept[0].class_id, 0);
        assert!((kept[0].confidence - 0.952_574).abs() < 1e-5);
        // cx 0.5 * 200, w 0.5 * 200: x from 50 to 150; cy 0.5 * 100, h 0.25 * 100.
        assert_eq!(
            (kept[0].x1, kept[0].x2, kept[0].y1, kept[0].y2),
            (50.0, 150.0, 37.5, 62.5)
        );
        assert_eq!(kept[1].class_id, 1);
        // The top-k counts the background pair too (as Roboflow's does).
        let top1 = DetectionParams {
            max_detections: 1,
            ..params(0.5)
        };
        assert!(head
            .boxes(&out, 0, (100, 200), 2, &top1)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn nas_runs_nms_on_corner_boxes() {
        let boxes = vec![
            0.0, 0.0, 10.0, 10.0, 0.0, 0.0, 10.0, 9.0, 20.0, 20.0, 30.0, 30.0,
        ];
        let scores = vec![0.9, 0.1, 0.8, 0.1, 0.1, 0.5];
        let out = [
            tensor("boxes", &[1, 3, 4], boxes),
            tensor("scores", &[1, 3, 2], scores),
        ];
        let head = DetectionHead::infer(HeadHints::new("yolo_nas_m", 2, None), &out).unwrap();
        let kept = head.boxes(&out, 0, (32, 32), 2, &params(0.4)).unwrap();
        assert_eq!(kept.len(), 2, "the second box overlaps the first");
        assert_eq!((kept[0].confidence, kept[1].class_id), (0.9, 1));
    }
}
