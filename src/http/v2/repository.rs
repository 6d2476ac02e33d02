//! Triton's model repository extension: the index of the models (loaded or not) and loading
//! and unloading one by name, over HTTP (gRPC shares the functions).

use super::*;

/// The repository: every model in it or loaded, as `name` + `version`, with its state.
pub fn repository_index_of(st: &AppState, ready_only: bool) -> Vec<Value> {
    let loaded: Vec<String> = st
        .engine
        .served_models()
        .into_iter()
        .map(|m| m.id)
        .collect();
    let mut ids = st.engine.models().available();
    ids.extend(loaded.iter().cloned());
    ids.sort();
    ids.dedup();
    ids.into_iter()
        .filter_map(|id| {
            let (name, version) = id.split_once('/')?;
            let is_ready = loaded.contains(&id);
            if ready_only && !is_ready {
                return None;
            }
            let mut v = json!({"name": name, "version": version,
                "state": if is_ready { "READY" } else { "UNAVAILABLE" }});
            if !is_ready {
                v["reason"] = "unloaded".into();
            }
            Some(v)
        })
        .collect()
}

#[utoipa::path(post, path = "/v2/repository/index", tag = "open inference protocol",
    request_body(content = Value, description = "Optional `{\"ready\": true}`: loaded models only"),
    responses((status = 200, description = "`[{name, version, state, reason}]`", body = Value)))]
pub async fn repository_index(State(st): State<Arc<AppState>>, req: Request) -> Response {
    let answer = async {
        let body = read_admin_body(&st, req).await?;
        let ready_only = if body.bytes.iter().all(u8::is_ascii_whitespace) {
            false
        } else {
            let v: Value = serde_json::from_slice(&body.bytes)
                .map_err(|e| ApiError::bad_request(format!("failed to parse the body: {e}")))?;
            v.get("ready").and_then(Value::as_bool).unwrap_or(false)
        };
        Ok(json_response(
            StatusCode::OK,
            &Value::Array(repository_index_of(&st, ready_only)),
        ))
    }
    .await;
    finish_v2(answer, None)
}

/// Loads model `name`'s highest version in the repository (Triton's default version
/// policy: the latest one).
pub async fn load_model(st: &AppState, name: &str) -> Result<(), ApiError> {
    let (_, available) = versions_of(st, name);
    let version = available.last().ok_or_else(|| {
        ApiError::not_found(format!(
            "failed to load '{name}': no version of it is in the model repository"
        ))
    })?;
    st.engine
        .add_model(&format!("{name}/{version}"), None)
        .await
        .map_err(|e| match e {
            EngineError::Load(LoadError::Failed { .. }) => {
                ApiError::bad_request(format!("failed to load '{name}': {e}"))
            }
            other => ApiError::from(other),
        })
}

/// Unloads every loaded version of model `name`.
pub fn unload_model(st: &AppState, name: &str) -> Result<(), ApiError> {
    let (loaded, available) = versions_of(st, name);
    if loaded.is_empty() && available.is_empty() {
        return Err(ApiError::not_found(format!(
            "failed to unload '{name}': it is not a model of this server"
        )));
    }
    for v in loaded {
        st.engine.remove_model(&format!("{name}/{v}"));
    }
    Ok(())
}

#[utoipa::path(post, path = "/v2/repository/models/{model_name}/load", tag = "open inference protocol",
    params(("model_name" = String, Path)),
    responses((status = 200, description = "Loaded (its highest version in the repository)"), (status = 404, description = "Not in the repository", body = Value),
        (status = 401, description = "MODEL_CONTROL=explicit without the admin token", body = Value), (status = 403, description = "MODEL_CONTROL=none", body = Value)))]
pub async fn repository_load(
    State(st): State<Arc<AppState>>,
    Path(name): Path<String>,
    req: Request,
) -> Response {
    admin_call(&st, req, load_model(&st, &name)).await
}

#[utoipa::path(post, path = "/v2/repository/models/{model_name}/unload", tag = "open inference protocol",
    params(("model_name" = String, Path)),
    responses((status = 200, description = "Unloaded (every loaded version)"), (status = 404, description = "Unknown model", body = Value),
        (status = 401, description = "MODEL_CONTROL=explicit without the admin token", body = Value), (status = 403, description = "MODEL_CONTROL=none", body = Value)))]
pub async fn repository_unload(
    State(st): State<Arc<AppState>>,
    Path(name): Path<String>,
    req: Request,
) -> Response {
    admin_call(&st, req, async { unload_model(&st, &name) }).await
}

/// A repository call: reads its (empty or JSON) body, then runs `action`
/// and answers 200 with no body, or the action's error.
async fn admin_call(
    st: &AppState,
    req: Request,
    action: impl std::future::Future<Output = Result<(), ApiError>>,
) -> Response {
    let answer = async {
        may_control_models_http(st, req.headers())?;
        read_admin_body(st, req).await?;
        action.await?;
        Ok(Response::new(Full::new(Bytes::new())))
    }
    .await;
    finish_v2(answer, None)
}
