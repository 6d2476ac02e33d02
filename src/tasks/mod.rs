//! Task-specific output decoding: how a model's raw outputs become Roboflow predictions.
//! The decoder is chosen once per model from its task and the shapes of a warm-up run.

pub mod detection;

use crate::model::backend::OutputTensor;
use crate::model::repository::TaskType;
use crate::pipeline::preprocess::Geometry;
use detection::{DetectionParams, ObjectDetectionPrediction, YoloLayout};

/// Per-request settings of the task.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskParams {
    Detection(DetectionParams),
}

/// One image's predictions.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskOutput {
    Detection(Vec<ObjectDetectionPrediction>),
}

/// How to read one model's outputs.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputDecoder {
    Detection {
        layout: YoloLayout,
        dims: (usize, usize),
    },
}

impl OutputDecoder {
    /// Picks the decoder from the task and the outputs of a warm-up run, checking that the
    /// class count agrees with `class_names.txt` (as Roboflow's `validate_model` does).
    pub fn infer(
        task: TaskType,
        outputs: &[OutputTensor],
        num_classes: usize,
    ) -> Result<Self, String> {
        match task {
            TaskType::ObjectDetection => {
                let out = outputs.first().ok_or("the model has no output")?;
                let dims = match out.item_shape() {
                    [a, b] => (*a, *b),
                    s => return Err(format!("detection output must be [batch, a, b], got {s:?}")),
                };
                if dims.0 == 4 + num_classes {
                    Ok(OutputDecoder::Detection {
                        layout: YoloLayout::V8,
                        dims,
                    })
                } else if dims.1 == 5 + num_classes {
                    Ok(OutputDecoder::Detection {
                        layout: YoloLayout::V5,
                        dims,
                    })
                } else {
                    Err(format!(
                        "output shape {:?} matches neither YOLOv8 [4+nc, N] nor YOLOv5 [N, 5+nc] \
                         for the {num_classes} classes of class_names.txt",
                        out.item_shape()
                    ))
                }
            }
            other => Err(format!("task {} is not served yet", other.as_str())),
        }
    }

    /// Decodes image `i` of a batch.
    pub fn decode(
        &self,
        outputs: &[OutputTensor],
        i: usize,
        class_names: &[String],
        geo: &Geometry,
        params: &TaskParams,
    ) -> Result<TaskOutput, String> {
        match (self, params) {
            (OutputDecoder::Detection { layout, dims }, TaskParams::Detection(p)) => {
                let out = outputs.first().ok_or("missing output")?;
                Ok(TaskOutput::Detection(detection::postprocess(
                    out.item(i),
                    *dims,
                    *layout,
                    class_names,
                    geo,
                    p,
                )))
            }
        }
    }
}
