//! The HTTP framing of v2 inference: the request's JSON, then with
//! `Inference-Header-Content-Length` the binary tensors in the order of the inputs that declare
//! `binary_data_size` (Triton's binary tensor extension), or shared-memory references; and the
//! answer as JSON, or the JSON then the binary output.

use super::*;

#[derive(Deserialize)]
pub(super) struct JsonRequest {
    id: Option<String>,
    #[serde(default)]
    parameters: Map<String, Value>,
    inputs: Vec<JsonInput>,
    #[serde(default)]
    outputs: Vec<JsonOutput>,
}

#[derive(Deserialize)]
pub(super) struct JsonInput {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Map<String, Value>,
    data: Option<infer::FlatData>,
}

#[derive(Deserialize)]
pub(super) struct JsonOutput {
    name: String,
    #[serde(default)]
    parameters: Map<String, Value>,
}

/// `shared_memory_region`, `shared_memory_byte_size` and `shared_memory_offset` of a
/// tensor's parameters (region and size go together).
pub fn region_ref(
    tensor: &str,
    params: &Map<String, Value>,
) -> Result<Option<RegionRef>, ApiError> {
    let Some(name) = params.get("shared_memory_region") else {
        return Ok(None);
    };
    let name = name.as_str().ok_or_else(|| {
        ApiError::bad_request(format!("'{tensor}': shared_memory_region must be a string"))
    })?;
    let number = |key: &str| -> Result<Option<u64>, ApiError> {
        params
            .get(key)
            .map(|v| {
                v.as_u64().ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "'{tensor}': {key} must be a non-negative integer"
                    ))
                })
            })
            .transpose()
    };
    let byte_size = number("shared_memory_byte_size")?.ok_or_else(|| {
        ApiError::bad_request(format!(
            "'{tensor}': shared_memory_region needs shared_memory_byte_size"
        ))
    })?;
    Ok(Some(RegionRef {
        name: name.to_owned(),
        byte_size,
        offset: number("shared_memory_offset")?.unwrap_or(0),
    }))
}

/// An HTTP inference body: JSON, or with `Inference-Header-Content-Length` the JSON then the
/// binary tensors, in the order of the inputs that declare `binary_data_size`.
pub(super) fn parse_request(body: Bytes, header_len: Option<usize>) -> Result<V2Request, ApiError> {
    let header_len = header_len.unwrap_or(body.len());
    if header_len > body.len() {
        return Err(ApiError::bad_request(format!(
            "Inference-Header-Content-Length ({header_len}) is larger than the body ({} bytes)",
            body.len()
        )));
    }
    let parsed: JsonRequest = serde_json::from_slice(&body[..header_len])
        .map_err(|e| ApiError::bad_request(format!("failed to parse the request JSON: {e}")))?;
    let mut at = header_len;
    let mut inputs = Vec::with_capacity(parsed.inputs.len());
    for input in parsed.inputs {
        let contents = if let Some(r) = region_ref(&input.name, &input.parameters)? {
            Contents::Region(r)
        } else if let Some(size) = input.parameters.get("binary_data_size") {
            let size = size.as_u64().ok_or_else(|| {
                ApiError::bad_request(format!(
                    "'{}': binary_data_size must be a non-negative integer",
                    input.name
                ))
            })? as usize;
            if body.len() - at < size {
                return Err(ApiError::bad_request(format!(
                    "'{}': binary_data_size is {size} but only {} bytes of binary data remain",
                    input.name,
                    body.len() - at
                )));
            }
            at += size;
            Contents::Raw(body.slice(at - size..at))
        } else if let Some(data) = input.data {
            Contents::Json(data)
        } else {
            return Err(ApiError::bad_request(format!(
                "input '{}' has no data: give `data`, `binary_data_size` or a shared memory region",
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
    if at != body.len() {
        return Err(ApiError::bad_request(format!(
            "{} bytes of binary data follow the JSON that no input claims",
            body.len() - at
        )));
    }
    let binary_output = parsed
        .parameters
        .get("binary_data_output")
        .and_then(Value::as_bool);
    let mut outputs = Vec::with_capacity(parsed.outputs.len());
    for o in parsed.outputs {
        outputs.push(RequestedOutput {
            region: region_ref(&o.name, &o.parameters)?,
            binary: o
                .parameters
                .get("binary_data")
                .and_then(Value::as_bool)
                .or(binary_output),
            name: o.name,
        });
    }
    if outputs.is_empty() && binary_output.is_some() {
        outputs.push(RequestedOutput {
            name: OUTPUT_PREDICTIONS.into(),
            binary: binary_output,
            region: None,
        });
    }
    Ok(V2Request {
        id: parsed.id,
        parameters: parsed.parameters,
        inputs,
        outputs,
    })
}

/// The HTTP answer: JSON, or the JSON then the binary output (binary extension).
pub(super) fn http_answer(r: V2Response) -> Result<HttpResponse, ApiError> {
    let shape = [r.predictions.len() as i64];
    let mut output = json!({
        "name": OUTPUT_PREDICTIONS,
        "datatype": "BYTES",
        "shape": shape,
    });
    let mut binary = None;
    if let Some(region) = &r.written_to {
        output["parameters"] = json!({
            "shared_memory_region": region.name,
            "shared_memory_byte_size": region.byte_size,
            "shared_memory_offset": region.offset,
        });
    } else if r.binary == Some(true) {
        let bytes = infer::serialize_bytes(&r.predictions);
        output["parameters"] = json!({ "binary_data_size": bytes.len() });
        binary = Some(bytes);
    } else {
        let data: Vec<Value> = r
            .predictions
            .iter()
            .map(|p| Value::String(String::from_utf8_lossy(p).into_owned()))
            .collect();
        output["data"] = Value::Array(data);
    }
    let mut head = json!({
        "model_name": r.model_name,
        "model_version": r.model_version,
        "outputs": [output],
    });
    if !r.id.is_empty() {
        head["id"] = Value::String(r.id);
    }
    let head = serde_json::to_vec(&head)
        .map_err(|e| ApiError::internal(format!("cannot encode the answer: {e}")))?;
    let Some(binary) = binary else {
        let mut resp = Response::new(Full::new(Bytes::from(head)));
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        return Ok(resp);
    };
    let header_len = head.len();
    let mut body = head;
    body.extend_from_slice(&binary);
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    let h = resp.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(
        "inference-header-content-length",
        HeaderValue::from(header_len),
    );
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body of the binary tensor extension: the JSON header, then `binary`.
    fn framed(header: &Value, binary: &[u8]) -> (Bytes, usize) {
        let mut body = serde_json::to_vec(header).unwrap();
        let header_len = body.len();
        body.extend_from_slice(binary);
        (Bytes::from(body), header_len)
    }

    fn raw(c: &Contents) -> &[u8] {
        match c {
            Contents::Raw(b) => b,
            other => panic!("not raw bytes: {other:?}"),
        }
    }

    fn refused(body: Bytes, header_len: Option<usize>) -> String {
        let e = parse_request(body, header_len).expect_err("must be refused");
        assert_eq!(e.status, StatusCode::BAD_REQUEST, "{}", e.message);
        e.message
    }

    #[test]
    fn binary_tensors_follow_the_json_in_the_order_of_their_inputs() {
        let header = json!({
            "id": "r1",
            "parameters": {"confidence": 0.5},
            "inputs": [
                {"name": "a", "shape": [3], "datatype": "UINT8", "parameters": {"binary_data_size": 3}},
                {"name": "j", "shape": [2], "datatype": "UINT8", "data": [7, 8]},
                {"name": "b", "shape": [2], "datatype": "UINT8", "parameters": {"binary_data_size": 2}}
            ]
        });
        let (body, len) = framed(&header, b"xyzUV");
        let r = parse_request(body, Some(len)).unwrap();
        assert_eq!(r.id.as_deref(), Some("r1"));
        assert_eq!(r.parameters["confidence"], 0.5);
        let names: Vec<_> = r.inputs.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["a", "j", "b"]);
        assert_eq!(raw(&r.inputs[0].contents), b"xyz");
        assert!(matches!(r.inputs[1].contents, Contents::Json(_)));
        assert_eq!(raw(&r.inputs[2].contents), b"UV");
        assert_eq!(r.inputs[0].shape, [3]);
        assert_eq!(r.inputs[0].datatype, "UINT8");
        assert!(r.outputs.is_empty());
    }

    #[test]
    fn a_plain_json_body_needs_no_header_length() {
        let body = json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["x"]}]});
        let r = parse_request(Bytes::from(body.to_string()), None).unwrap();
        assert_eq!(r.inputs.len(), 1);
        assert!(matches!(r.inputs[0].contents, Contents::Json(_)));
    }

    #[test]
    fn framing_that_does_not_add_up_is_a_400_naming_the_problem() {
        let input = |size: u64| json!({"inputs": [{"name": "a", "shape": [3], "datatype": "UINT8", "parameters": {"binary_data_size": size}}]});
        // The header length claims more than the body holds.
        let (body, len) = framed(&input(3), b"xyz");
        assert!(refused(body, Some(len + 4)).contains("Inference-Header-Content-Length"));
        // An input claims more binary data than follows the JSON.
        let (body, len) = framed(&input(5), b"xyz");
        assert!(refused(body, Some(len)).contains("only 3 bytes of binary data remain"));
        // Bytes follow that no input claims.
        let (body, len) = framed(&input(2), b"xyz");
        assert!(refused(body, Some(len)).contains("1 bytes of binary data follow the JSON"));
        // A size that is not a count.
        let bad = json!({"inputs": [{"name": "a", "shape": [3], "datatype": "UINT8", "parameters": {"binary_data_size": -1}}]});
        let (body, len) = framed(&bad, b"");
        assert!(
            refused(body, Some(len)).contains("binary_data_size must be a non-negative integer")
        );
        // An input with nothing at all.
        let empty = json!({"inputs": [{"name": "a", "shape": [3], "datatype": "UINT8"}]});
        assert!(refused(Bytes::from(empty.to_string()), None).contains("has no data"));
        // A header that is not the request's JSON.
        assert!(refused(Bytes::from_static(b"{\"inputs\": 3}"), None).contains("failed to parse"));
    }

    #[test]
    fn binary_output_asked_for_the_whole_request_or_per_output() {
        let input = json!([{"name": "j", "shape": [1], "datatype": "UINT8", "data": [1]}]);
        let whole = json!({"parameters": {"binary_data_output": true}, "inputs": input});
        let r = parse_request(Bytes::from(whole.to_string()), None).unwrap();
        assert_eq!(r.outputs.len(), 1);
        assert_eq!(r.outputs[0].name, OUTPUT_PREDICTIONS);
        assert_eq!(r.outputs[0].binary, Some(true));
        let per_output = json!({
            "parameters": {"binary_data_output": true},
            "inputs": input,
            "outputs": [{"name": "predictions", "parameters": {"binary_data": false}}]
        });
        let r = parse_request(Bytes::from(per_output.to_string()), None).unwrap();
        assert_eq!(
            r.outputs[0].binary,
            Some(false),
            "the output's own choice wins"
        );
    }

    #[test]
    fn a_shared_memory_input_names_its_region_size_and_offset() {
        let body = json!({"inputs": [{"name": "pixels", "shape": [1, 2, 2, 3], "datatype": "UINT8",
            "parameters": {"shared_memory_region": "cam0", "shared_memory_byte_size": 12, "shared_memory_offset": 24}}]});
        let r = parse_request(Bytes::from(body.to_string()), None).unwrap();
        match &r.inputs[0].contents {
            Contents::Region(reg) => {
                assert_eq!(
                    (reg.name.as_str(), reg.byte_size, reg.offset),
                    ("cam0", 12, 24)
                )
            }
            other => panic!("not a region: {other:?}"),
        }
        let no_size = json!({"inputs": [{"name": "pixels", "shape": [1], "datatype": "UINT8",
            "parameters": {"shared_memory_region": "cam0"}}]});
        assert!(refused(Bytes::from(no_size.to_string()), None)
            .contains("needs shared_memory_byte_size"));
    }
}
