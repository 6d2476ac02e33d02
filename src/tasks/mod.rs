//! Task-specific output decoding: how a model's raw outputs become Roboflow predictions.
//! The decoder is chosen once per model from its task and the shapes of a warm-up run.

pub mod classification;
pub mod detection;
pub mod draw;
pub mod rle;
pub mod segmentation;

use crate::geometry::Geometry;
use crate::model::backend::OutputTensor;
use crate::model::repository::TaskType;
use classification::{Activation, ClassificationOutput, ClassificationParams};
use detection::{DetectionParams, ObjectDetectionPrediction, YoloLayout};
use segmentation::{InstanceSegmentationPrediction, SegLayout, SegmentationParams};

/// Per-request settings of the task.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskParams {
    Detection(DetectionParams),
    Segmentation(SegmentationParams),
    Classification(ClassificationParams),
}

/// One image's predictions.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskOutput {
    Detection(Vec<ObjectDetectionPrediction>),
    Segmentation(Vec<InstanceSegmentationPrediction>),
    Classification(ClassificationOutput),
}

/// Why an image's outputs gave no answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PostprocessError {
    /// The outputs do not fit the model's layout (a server-side fault).
    #[error("{0}")]
    Model(String),
    /// The answer would cost more than a work budget allows (the request's fault).
    #[error("{0}")]
    OverBudget(String),
    /// Nobody waits for the answer any more (deadline passed or client gone).
    #[error("cancelled")]
    Cancelled,
}

impl From<&str> for PostprocessError {
    fn from(s: &str) -> Self {
        PostprocessError::Model(s.to_owned())
    }
}

impl From<String> for PostprocessError {
    fn from(s: String) -> Self {
        PostprocessError::Model(s)
    }
}

/// How to read one model's outputs.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputDecoder {
    Detection {
        layout: YoloLayout,
        dims: (usize, usize),
    },
    Segmentation(SegLayout),
    Classification {
        multi_label: bool,
        /// Softmax, sigmoid or none, decided once at load from probe runs.
        activation: Activation,
    },
}

impl OutputDecoder {
    /// Picks the decoder from the task and the outputs of probe runs (each on a different
    /// input), checking that the class count agrees with `class_names.txt` (as Roboflow's
    /// `validate_model` does).
    pub fn infer(
        task: TaskType,
        probes: &[Vec<OutputTensor>],
        num_classes: usize,
        multi_label: bool,
    ) -> Result<Self, String> {
        let outputs = probes.first().ok_or("no probe run")?;
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
            TaskType::InstanceSegmentation => {
                let pred = outputs.iter().position(|o| o.item_shape().len() == 2);
                let protos = outputs.iter().position(|o| o.item_shape().len() == 3);
                let (Some(pred), Some(protos)) = (pred, protos) else {
                    return Err("segmentation needs a [B, 4+nc+nm, N] output and a [B, nm, H, W] prototype output".into());
                };
                let (pd, qd) = (outputs[pred].item_shape(), outputs[protos].item_shape());
                let layout = SegLayout {
                    pred,
                    protos,
                    pred_dims: (pd[0], pd[1]),
                    proto_dims: (qd[0], qd[1], qd[2]),
                    num_classes,
                };
                if pd[0] != 4 + num_classes + qd[0] {
                    return Err(format!(
                        "output {pd:?} does not hold 4 box values, {num_classes} class scores and {} mask coefficients",
                        qd[0]
                    ));
                }
                Ok(OutputDecoder::Segmentation(layout))
            }
            TaskType::Classification => {
                let out = outputs.first().ok_or("the model has no output")?;
                match out.item_shape() {
                    [n] if *n == num_classes => Ok(OutputDecoder::Classification {
                        multi_label,
                        activation: Activation::from_probes(
                            probes.iter().filter_map(|p| p.first()).flat_map(|o| {
                                (0..o.shape.first().copied().unwrap_or(0)).map(|i| o.item(i))
                            }),
                            multi_label,
                        ),
                    }),
                    s => Err(format!(
                        "classification output must be [batch, {num_classes}] for the classes of class_names.txt, got {s:?}"
                    )),
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
            (OutputDecoder::Segmentation(layout), TaskParams::Segmentation(p)) => {
                Ok(TaskOutput::Segmentation(segmentation::postprocess(
                    outputs[layout.pred].item(i),
                    outputs[layout.protos].item(i),
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
                let out = outputs.first().ok_or("missing output")?;
                Ok(TaskOutput::Classification(if *multi_label {
                    classification::multi_label(out.item(i), *activation, class_names, p)
                } else {
                    classification::single_label(out.item(i), *activation, class_names, p)
                }))
            }
            _ => Err("the request's parameters do not fit the model's task".into()),
        }
    }
}
