//! Workflow errors, with the bodies Roboflow's server answers them with: the short form
//! `{message, error_type, context, inner_error_type, inner_error_message}` and, for
//! definition errors naming a step, the full form with `blocks_errors`
//! (`roboflow-workflows.md` §1.4). `http::workflows` turns them into responses.

use serde_json::{json, Map, Value as Json};

/// One step's part of an error.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockError {
    pub block_id: String,
    pub block_type: Option<String>,
    pub property_name: Option<String>,
    pub property_details: String,
}

/// A workflow error.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkflowError {
    pub status: u16,
    pub message: String,
    pub error_type: &'static str,
    pub context: &'static str,
    pub inner_error_type: Option<&'static str>,
    pub inner_error_message: Option<Box<str>>,
    /// Present: the full form.
    pub blocks_errors: Option<Box<[BlockError]>>,
    /// Seconds to wait before retrying (an overloaded model, a model loading).
    pub retry_after_s: Option<u32>,
}

impl WorkflowError {
    /// The short form.
    pub fn short(
        status: u16,
        error_type: &'static str,
        context: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            message: message.into(),
            error_type,
            context,
            inner_error_type: None,
            inner_error_message: None,
            blocks_errors: None,
            retry_after_s: None,
        }
    }

    /// 400 `WorkflowDefinitionError`: the definition is malformed.
    pub fn definition(message: impl Into<String>) -> Self {
        Self::short(
            400,
            "WorkflowDefinitionError",
            "workflow_compilation | workflow_definition_parsing",
            message,
        )
    }

    /// 400 `WorkflowSyntaxError` naming a step's field.
    pub fn syntax(
        step: &str,
        block_type: Option<&str>,
        property: Option<&str>,
        details: impl Into<String>,
        inner: String,
    ) -> Self {
        Self {
            inner_error_type: Some("ValidationError"),
            inner_error_message: Some(inner.into()),
            blocks_errors: Some(Box::new([BlockError {
                block_id: step.to_owned(),
                block_type: block_type.map(str::to_owned),
                property_name: property.map(str::to_owned),
                property_details: details.into(),
            }])),
            ..Self::short(
                400,
                "WorkflowSyntaxError",
                "workflow_compilation | workflow_definition_parsing",
                "Could not parse workflow definition. Details provided in inner error.",
            )
        }
    }

    /// 400 `InvalidReferenceTargetError`: a selector names no input or step.
    pub fn reference(block_id: &str, property: &str, selector: &str, what: &str) -> Self {
        Self {
            inner_error_type: Some("None"),
            inner_error_message: Some("None".into()),
            blocks_errors: Some(Box::new([BlockError {
                block_id: block_id.to_owned(),
                block_type: None,
                property_name: Some(property.to_owned()),
                property_details: format!("Invalid reference to {selector}"),
            }])),
            ..Self::short(
                400,
                "InvalidReferenceTargetError",
                "workflow_compilation | execution_graph_construction",
                format!("Workflow references '{selector}' which points to a non-existent {what}."),
            )
        }
    }

    /// 400 `RuntimeInputError`: an input missing or unusable.
    pub fn input(message: impl Into<String>) -> Self {
        Self::short(
            400,
            "RuntimeInputError",
            "workflow_execution | runtime_input_validation",
            message,
        )
    }

    /// A step failed: 500 `StepExecutionError` unless `status` says the client or the
    /// server's load is the cause (4xx, 429, 503, 504 keep their status).
    pub fn step(
        step: &str,
        block_type: &str,
        status: u16,
        inner_type: &'static str,
        message: String,
    ) -> Self {
        Self {
            inner_error_type: Some(inner_type),
            inner_error_message: Some(message.as_str().into()),
            blocks_errors: Some(Box::new([BlockError {
                block_id: step.to_owned(),
                block_type: Some(block_type.to_owned()),
                property_name: None,
                property_details: message.clone(),
            }])),
            ..Self::short(
                status,
                "StepExecutionError",
                "workflow_execution | step_execution",
                message,
            )
        }
    }

    /// 4xx for a request over one of the server's workflow limits.
    pub fn limit(status: u16, message: impl Into<String>) -> Self {
        Self::short(
            status,
            "WorkflowLimitError",
            "workflow_execution | runtime_input_validation",
            message,
        )
    }

    /// The JSON body.
    pub fn body(&self) -> Json {
        let mut o = Map::new();
        o.insert("message".into(), json!(self.message));
        o.insert("error_type".into(), json!(self.error_type));
        o.insert("context".into(), json!(self.context));
        o.insert("inner_error_type".into(), json!(self.inner_error_type));
        o.insert(
            "inner_error_message".into(),
            json!(self.inner_error_message.as_deref().unwrap_or("None")),
        );
        if let Some(errors) = &self.blocks_errors {
            o.insert(
                "blocks_errors".into(),
                Json::Array(
                    errors
                        .iter()
                        .map(|e| {
                            json!({"block_id": e.block_id, "block_type": e.block_type,
                                "block_details": null, "property_name": e.property_name,
                                "property_details": e.property_details, "block_traceback": null})
                        })
                        .collect(),
                ),
            );
        }
        if self.blocks_errors.is_some() || self.status >= 500 {
            o.insert("python_blocks_output_streams".into(), Json::Null);
            o.insert("python_blocks_debug_traces".into(), Json::Null);
        }
        Json::Object(o)
    }
}

/// Why a run failed: a workflow error, or an engine error in a model step (which the HTTP
/// layer maps to its status: the server's load keeps its 429 or 503 and Retry-After).
#[derive(Debug)]
pub enum RunError {
    Workflow(WorkflowError),
    Engine {
        step: String,
        block_type: &'static str,
        error: crate::engine::EngineError,
        /// The input image whose bytes did not decode, when that is the cause.
        input: Option<String>,
    },
}

impl From<WorkflowError> for RunError {
    fn from(e: WorkflowError) -> Self {
        RunError::Workflow(e)
    }
}
