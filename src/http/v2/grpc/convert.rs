//! Between gRPC and the engine: messages to v2 requests and back, errors to gRPC statuses,
//! `grpc-timeout` to a deadline, the model configuration to its message.

use super::*;

/// An error as a gRPC status (Triton's codes: unknown model NOT_FOUND, overload UNAVAILABLE).
pub(super) fn status_of(e: ApiError) -> Status {
    use tonic::Code;
    let code = match e.status.as_u16() {
        400 | 413 | 422 => Code::InvalidArgument,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::NotFound,
        408 | 504 => Code::DeadlineExceeded,
        429 | 503 => Code::Unavailable,
        499 => Code::Cancelled,
        501 => Code::Unimplemented,
        _ => Code::Internal,
    };
    Status::new(code, e.message)
}

/// The deadline a gRPC client asks for: `grpc-timeout` (an unreadable one is ignored).
pub(super) fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    metadata
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
}

/// `grpc-timeout`: digits and a unit (H, M, S, m, u, n).
pub(super) fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A gRPC parameter as the JSON value the HTTP protocol carries.
pub(super) fn param_value(p: &pb::InferParameter) -> Value {
    use pb::infer_parameter::ParameterChoice as P;
    match &p.parameter_choice {
        Some(P::BoolParam(b)) => Value::Bool(*b),
        Some(P::Int64Param(i)) => Value::from(*i),
        Some(P::Uint64Param(u)) => Value::from(*u),
        Some(P::DoubleParam(d)) => Value::from(*d),
        Some(P::StringParam(s)) => Value::String(s.clone()),
        None => Value::Null,
    }
}

pub(super) fn params_map(p: &HashMap<String, pb::InferParameter>) -> Map<String, Value> {
    p.iter().map(|(k, v)| (k.clone(), param_value(v))).collect()
}

/// A gRPC inference request as the protocol-neutral [`V2Request`].
pub(super) fn v2_request(req: pb::ModelInferRequest) -> Result<V2Request, ApiError> {
    let mut raw = req.raw_input_contents.into_iter();
    let uses_raw = raw.len() > 0;
    if uses_raw && raw.len() != req.inputs.len() {
        return Err(ApiError::bad_request(format!(
            "raw_input_contents has {} entries for {} inputs",
            raw.len(),
            req.inputs.len()
        )));
    }
    let mut inputs = Vec::with_capacity(req.inputs.len());
    for input in req.inputs {
        let params = params_map(&input.parameters);
        let raw_here = if uses_raw { raw.next() } else { None };
        let contents = if let Some(r) = crate::http::v2::region_ref(&input.name, &params)? {
            if raw_here.as_ref().is_some_and(|b| !b.is_empty()) {
                return Err(ApiError::bad_request(format!(
                    "input '{}' names a shared memory region and also has raw_input_contents",
                    input.name
                )));
            }
            Contents::Region(r)
        } else if let Some(bytes) = raw_here {
            Contents::Raw(bytes)
        } else if let Some(c) = input.contents {
            if !c.bytes_contents.is_empty() {
                Contents::Elements(c.bytes_contents)
            } else if !c.uint_contents.is_empty() {
                let bytes: Option<Vec<u8>> = c
                    .uint_contents
                    .iter()
                    .map(|&v| u8::try_from(v).ok())
                    .collect();
                Contents::Raw(Bytes::from(bytes.ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "input '{}' holds a value that is not 0 to 255",
                        input.name
                    ))
                })?))
            } else {
                return Err(ApiError::bad_request(format!(
                    "input '{}' has no contents of its datatype",
                    input.name
                )));
            }
        } else {
            return Err(ApiError::bad_request(format!(
                "input '{}' has no data: give raw_input_contents, contents or a shared memory region",
                input.name
            )));
        };
        inputs.push(InputTensor::new(
            input.name,
            input.datatype,
            input.shape,
            contents,
        ));
    }
    let mut outputs = Vec::with_capacity(req.outputs.len());
    for o in req.outputs {
        let params = params_map(&o.parameters);
        outputs.push(RequestedOutput {
            region: crate::http::v2::region_ref(&o.name, &params)?,
            binary: None,
            name: o.name,
        });
    }
    Ok(V2Request {
        id: Some(req.id).filter(|id| !id.is_empty()),
        parameters: params_map(&req.parameters),
        inputs,
        outputs,
    })
}

pub(super) fn no_cuda_shm() -> Status {
    Status::unimplemented(
        "CUDA shared memory is not served: frames go through system shared memory",
    )
}

/// The model configuration (as [`crate::http::v2::model_config_of`] gives it in JSON) as its message.
pub(super) fn model_config_pb(cfg: &Value) -> pb::ModelConfig {
    let data_type = |t: &str| match t {
        "TYPE_UINT8" => pb::DataType::TypeUint8 as i32,
        _ => pb::DataType::TypeString as i32,
    };
    let dims = |v: &Value| -> Vec<i64> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_i64)
            .collect()
    };
    let reshape = |v: &Value| {
        v.get("reshape").map(|r| pb::ModelTensorReshape {
            shape: dims(&r["shape"]),
        })
    };
    let list = |v: &Value| v.as_array().cloned().unwrap_or_default();
    let queue = &cfg["dynamic_batching"]["default_queue_policy"];
    pb::ModelConfig {
        name: cfg["name"].as_str().unwrap_or_default().into(),
        platform: cfg["platform"].as_str().unwrap_or_default().into(),
        backend: cfg["backend"].as_str().unwrap_or_default().into(),
        max_batch_size: cfg["max_batch_size"].as_i64().unwrap_or(0) as i32,
        input: list(&cfg["input"])
            .iter()
            .map(|i| pb::ModelInput {
                name: i["name"].as_str().unwrap_or_default().into(),
                data_type: data_type(i["data_type"].as_str().unwrap_or_default()),
                dims: dims(&i["dims"]),
                reshape: reshape(i),
                ..Default::default()
            })
            .collect(),
        output: list(&cfg["output"])
            .iter()
            .map(|o| pb::ModelOutput {
                name: o["name"].as_str().unwrap_or_default().into(),
                data_type: data_type(o["data_type"].as_str().unwrap_or_default()),
                dims: dims(&o["dims"]),
                reshape: reshape(o),
                ..Default::default()
            })
            .collect(),
        instance_group: list(&cfg["instance_group"])
            .iter()
            .map(|g| pb::ModelInstanceGroup {
                name: g["name"].as_str().unwrap_or_default().into(),
                count: g["count"].as_i64().unwrap_or(1) as i32,
                kind: if g["kind"] == "KIND_GPU" {
                    pb::model_instance_group::Kind::Gpu as i32
                } else {
                    pb::model_instance_group::Kind::Cpu as i32
                },
                ..Default::default()
            })
            .collect(),
        scheduling_choice: Some(pb::model_config::SchedulingChoice::DynamicBatching(
            pb::ModelDynamicBatching {
                max_queue_delay_microseconds: cfg["dynamic_batching"]
                    ["max_queue_delay_microseconds"]
                    .as_u64()
                    .unwrap_or(0),
                default_queue_policy: Some(pb::ModelQueuePolicy {
                    timeout_action: pb::model_queue_policy::TimeoutAction::Reject as i32,
                    default_timeout_microseconds: queue["default_timeout_microseconds"]
                        .as_u64()
                        .unwrap_or(0),
                    allow_timeout_override: true,
                    max_queue_size: queue["max_queue_size"].as_u64().unwrap_or(0) as u32,
                }),
                ..Default::default()
            },
        )),
        parameters: cfg["parameters"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| {
                (
                    k.clone(),
                    pb::ModelParameter {
                        string_value: v["string_value"].as_str().unwrap_or_default().into(),
                    },
                )
            })
            .collect(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::v2::infer::{INPUT_IMAGE, INPUT_PIXELS};

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("150m"), Some(Duration::from_millis(150)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("5u"), Some(Duration::from_micros(5)));
        assert_eq!(parse_grpc_timeout("5x"), None);
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("1234567890S"), None);
    }

    #[test]
    fn raw_contents_go_to_their_inputs_in_order() {
        let input = |name: &str| pb::model_infer_request::InferInputTensor {
            name: name.into(),
            datatype: "BYTES".into(),
            shape: vec![1],
            ..Default::default()
        };
        let req = pb::ModelInferRequest {
            inputs: vec![input(INPUT_IMAGE), input(INPUT_PIXELS)],
            raw_input_contents: vec![Bytes::from_static(b"a"), Bytes::from_static(b"b")],
            ..Default::default()
        };
        let v = v2_request(req).unwrap();
        let raws: Vec<_> = v
            .inputs
            .iter()
            .map(|i| match &i.contents {
                Contents::Raw(b) => b.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(raws, [Bytes::from_static(b"a"), Bytes::from_static(b"b")]);
        let short = pb::ModelInferRequest {
            inputs: vec![input(INPUT_IMAGE), input(INPUT_PIXELS)],
            raw_input_contents: vec![Bytes::from_static(b"a")],
            ..Default::default()
        };
        assert!(v2_request(short).is_err());
    }
}
