//! Response bodies with Roboflow's field names: inference responses and the model registry.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use serde::Serialize;

use crate::engine::ServedModel;
use crate::model::repository::TaskType;
use crate::tasks::classification::ClassificationOutput;
use crate::tasks::detection::ObjectDetectionPrediction;
use crate::tasks::keypoints::KeypointsPrediction;
use crate::tasks::segmentation::InstanceSegmentationPrediction;
use crate::tasks::TaskOutput;

/// `{width, height}` of the image as the client sent it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ImageSize {
    pub width: u32,
    pub height: u32,
}

/// `resolved_model` (Roboflow 1.8.x standard server).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ResolvedModel {
    pub model_id: String,
}

/// The task-specific part of a response.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum TaskBody {
    Detection {
        predictions: Vec<ObjectDetectionPrediction>,
    },
    Segmentation {
        predictions: Vec<InstanceSegmentationPrediction>,
    },
    Classification(ClassificationOutput),
    Keypoints {
        predictions: Vec<KeypointsPrediction>,
    },
}

impl From<TaskOutput> for TaskBody {
    fn from(out: TaskOutput) -> Self {
        match out {
            TaskOutput::Detection(predictions) => TaskBody::Detection { predictions },
            TaskOutput::Segmentation(predictions) => TaskBody::Segmentation { predictions },
            TaskOutput::Classification(c) => TaskBody::Classification(c),
            TaskOutput::Keypoints(predictions) => TaskBody::Keypoints { predictions },
        }
    }
}

/// One image's inference response.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct InferResponse {
    pub inference_id: String,
    /// Seconds from the request's arrival to its answer.
    pub time: f64,
    pub image: ImageSize,
    #[serde(flatten)]
    pub body: TaskBody,
    /// The predictions drawn on the image (base64 JPEG), when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub visualization: Option<String>,
    pub resolved_model: ResolvedModel,
}

/// `ModelsDescriptions` entry.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ModelDescription {
    pub model_id: String,
    pub task_type: &'static str,
    pub batch_size: Option<usize>,
    pub input_height: u32,
    pub input_width: u32,
    pub vram_bytes: Option<u64>,
    pub request_aliases: Vec<String>,
    pub request_paths: Vec<&'static str>,
    /// cvserve's: the back end (`onnxruntime` or `tract`) and execution provider the model
    /// runs on, its inference instances running now, and how many may start on demand
    /// (INSTANCES_PER_MODEL).
    pub backend: &'static str,
    pub execution_provider: String,
    pub instances: usize,
    pub max_instances: usize,
}

/// `ModelsDescriptions`, the answer of `/model/registry`, `/model/add`, `/model/remove`, `/model/clear`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ModelsDescriptions {
    pub models: Vec<ModelDescription>,
    pub total_vram_bytes: Option<u64>,
    pub gpu_memory_used: Option<u64>,
    pub gpu_memory_total: Option<u64>,
}

impl ModelsDescriptions {
    pub fn of(models: &[ServedModel]) -> Self {
        Self {
            models: models
                .iter()
                .map(|m| ModelDescription {
                    model_id: m.id.clone(),
                    task_type: m.task.as_str(),
                    batch_size: m.fixed_batch,
                    input_height: m.input_height,
                    input_width: m.input_width,
                    vram_bytes: None,
                    request_aliases: vec![],
                    request_paths: vec![task_path(m.task)],
                    backend: m.backend,
                    execution_provider: m.provider.clone(),
                    instances: m.instances,
                    max_instances: m.max_instances,
                })
                .collect(),
            total_vram_bytes: None,
            gpu_memory_used: None,
            gpu_memory_total: None,
        }
    }
}

/// A JSON response with the given status.
pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    let body = crate::stage_cpu::span(crate::stage_cpu::Stage::Answer, || {
        serde_json::to_vec(value)
    })
    .unwrap_or_else(|e| {
        format!(r#"{{"message":"Internal error: cannot encode the response: {e}"}}"#).into_bytes()
    });
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// The path of a task's route (the `route` label of the request metrics).
pub fn task_path(task: TaskType) -> &'static str {
    match task {
        TaskType::ObjectDetection => "/infer/object_detection",
        TaskType::InstanceSegmentation => "/infer/instance_segmentation",
        TaskType::Classification => "/infer/classification",
        TaskType::KeypointDetection => "/infer/keypoints_detection",
    }
}
