//! Task-specific output decoding: how a model's raw outputs become Roboflow predictions.
//! The decoder is chosen once per model from its task and the shapes of a warm-up run.

pub mod classification;
pub mod contours;
pub mod detection;
pub mod draw;
pub mod error;
pub mod heads;
pub mod keypoints;
pub mod rle;
pub mod segmentation;

pub use error::PostprocessError;

use crate::geometry::Geometry;
use crate::model::backend::OutputTensor;
use crate::model::repository::TaskType;
use classification::{Activation, ClassificationOutput, ClassificationParams};
use detection::{DetectionParams, ObjectDetectionPrediction};
use heads::{DetectionHead, HeadHints};
use keypoints::{KeypointLayout, KeypointsParams, KeypointsPrediction};
use segmentation::{InstanceSegmentationPrediction, SegLayout, SegmentationParams};

/// Per-request settings of the task.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskParams {
    Detection(DetectionParams),
    Segmentation(SegmentationParams),
    Classification(ClassificationParams),
    Keypoints(KeypointsParams),
}

/// One image's predictions.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskOutput {
    Detection(Vec<ObjectDetectionPrediction>),
    Segmentation(Vec<InstanceSegmentationPrediction>),
    Classification(ClassificationOutput),
    Keypoints(Vec<KeypointsPrediction>),
}

/// What the repository says that decides how a model's outputs are read.
#[derive(Debug, Clone, Copy)]
pub struct DecoderHints<'a> {
    pub task: TaskType,
    /// `model_type.json`'s `model_type` (picks the detection head).
    pub model_type: &'a str,
    /// Class names (the background class of an RF-DETR export already taken out).
    pub num_classes: usize,
    pub multi_label: bool,
    /// RF-DETR: the background column class_names.txt listed.
    pub background: Option<usize>,
    /// Keypoint names by object class (keypoints_metadata.json).
    pub keypoints: &'a [Vec<String>],
}

impl DecoderHints<'_> {
    /// What picks a detection or segmentation head.
    fn head(&self) -> HeadHints<'_> {
        HeadHints::new(self.model_type, self.num_classes, self.background)
    }
}

/// How to read one model's outputs.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputDecoder {
    Detection(DetectionHead),
    Segmentation(SegLayout),
    Keypoints(KeypointLayout),
    Classification {
        multi_label: bool,
        /// Softmax, sigmoid or none, decided once at load from probe runs.
        activation: Activation,
    },
}

impl OutputDecoder {
    /// Picks the decoder from the task, the model type and the outputs of probe runs (each
    /// on a different input), checking that the class count agrees with `class_names.txt`
    /// (as Roboflow's `validate_model` does). An error names the outputs found.
    pub fn infer(hints: DecoderHints<'_>, probes: &[Vec<OutputTensor>]) -> Result<Self, String> {
        let outputs = probes.first().ok_or("no probe run")?;
        let num_classes = hints.num_classes;
        let with_outputs = |e: String| format!("{e} (outputs found: {})", heads::describe(outputs));
        match hints.task {
            TaskType::ObjectDetection => {
                DetectionHead::infer(hints.head(), outputs).map(OutputDecoder::Detection)
            }
            TaskType::KeypointDetection => {
                let out = outputs.first().ok_or("the model has no output")?;
                KeypointLayout::infer(
                    hints.model_type,
                    out.item_shape(),
                    num_classes,
                    hints.keypoints.to_vec(),
                )
                .map(OutputDecoder::Keypoints)
                .map_err(with_outputs)
            }
            TaskType::InstanceSegmentation => SegLayout::infer(hints.head(), outputs)
                .map(OutputDecoder::Segmentation)
                .map_err(with_outputs),
            TaskType::Classification => {
                let out = outputs.first().ok_or("the model has no output")?;
                match out.item_shape() {
                    [n] if *n == num_classes => Ok(OutputDecoder::Classification {
                        multi_label: hints.multi_label,
                        activation: Activation::from_probes(
                            probes.iter().filter_map(|p| p.first()).flat_map(|o| {
                                (0..o.shape.first().copied().unwrap_or(0)).map(|i| o.item(i))
                            }),
                            hints.multi_label,
                        ),
                    }),
                    s => Err(with_outputs(format!(
                        "classification output must be [batch, {num_classes}] for the classes of class_names.txt, got {s:?}"
                    ))),
                }
            }
        }
    }

    /// Decodes image `i` of a batch; `input` is the network's (height, width). Costly steps
    /// stop once `cancelled()` is true.
    #[allow(clippy::too_many_arguments)]
    pub fn decode(
        &self,
        outputs: &[OutputTensor],
        i: usize,
        input: (usize, usize),
        class_names: &[String],
        geo: &Geometry,
        params: &TaskParams,
        cancelled: &(dyn Fn() -> bool + Sync),
    ) -> Result<TaskOutput, PostprocessError> {
        match (self, params) {
            (OutputDecoder::Detection(head), TaskParams::Detection(p)) => {
                let kept = head
                    .boxes(outputs, i, input, class_names.len(), p)
                    .map_err(PostprocessError::Model)?;
                Ok(TaskOutput::Detection(detection::predictions(
                    &kept,
                    class_names,
                    geo,
                    p,
                    head.rounds(),
                )))
            }
            (OutputDecoder::Keypoints(layout), TaskParams::Keypoints(p)) => {
                let out = outputs
                    .first()
                    .ok_or_else(|| PostprocessError::model("missing output"))?;
                Ok(TaskOutput::Keypoints(keypoints::postprocess(
                    out.item(i),
                    layout,
                    class_names,
                    geo,
                    p,
                )))
            }
            (OutputDecoder::Segmentation(layout), TaskParams::Segmentation(p)) => {
                Ok(TaskOutput::Segmentation(segmentation::postprocess(
                    outputs,
                    i,
                    layout,
                    input,
                    class_names,
                    geo,
                    p,
                    cancelled,
                )?))
            }
            (
                OutputDecoder::Classification {
                    multi_label,
                    activation,
                },
                TaskParams::Classification(p),
            ) => {
                let out = outputs
                    .first()
                    .ok_or_else(|| PostprocessError::model("missing output"))?;
                Ok(TaskOutput::Classification(if *multi_label {
                    classification::multi_label(out.item(i), *activation, class_names, p)
                } else {
                    classification::single_label(out.item(i), *activation, class_names, p)
                }))
            }
            _ => Err(PostprocessError::model(
                "the request's parameters do not fit the model's task",
            )),
        }
    }
}
