//! The system shared-memory extension: regions registered, listed and unregistered by name,
//! for ALLOW_CLIENT_SHM's clients (local by default).

use super::*;

#[utoipa::path(get, path = "/v2/systemsharedmemory/status", tag = "open inference protocol",
    responses((status = 200, description = "`[{name, key, offset, byte_size}]` of every registered region", body = Value)))]
pub async fn shm_status(State(st): State<Arc<AppState>>, req: Request) -> Response {
    let answer = remote_allowed(&st, &req).and_then(|()| {
        st.regions
            .status(None)
            .map(|all| json_response(StatusCode::OK, &json!(all)))
            .map_err(region_error)
    });
    finish_v2(answer, None)
}

/// The extension's policy (ALLOW_CLIENT_SHM) for the request's client.
pub(super) fn remote_allowed(st: &AppState, req: &Request) -> Result<(), ApiError> {
    let remote = req.extensions().get::<RemoteIp>().map(|p| p.0);
    st.regions.allowed(remote).map_err(region_error)
}

#[utoipa::path(get, path = "/v2/systemsharedmemory/region/{region_name}/status", tag = "open inference protocol",
    params(("region_name" = String, Path)),
    responses((status = 200, description = "`[{name, key, offset, byte_size}]`", body = Value), (status = 404, description = "Not registered", body = Value)))]
pub async fn shm_region_status(
    State(st): State<Arc<AppState>>,
    Path(name): Path<String>,
    req: Request,
) -> Response {
    let answer = remote_allowed(&st, &req).and_then(|()| {
        st.regions
            .status(Some(&name))
            .map(|s| json_response(StatusCode::OK, &json!(s)))
            .map_err(region_error)
    });
    finish_v2(answer, None)
}

#[derive(Deserialize, utoipa::ToSchema)]
pub struct RegisterRequest {
    /// The POSIX shared-memory name, `/name` (the file `/dev/shm/name`).
    key: String,
    #[serde(default)]
    offset: u64,
    byte_size: u64,
}

#[utoipa::path(post, path = "/v2/systemsharedmemory/region/{region_name}/register", tag = "open inference protocol",
    params(("region_name" = String, Path)),
    request_body = RegisterRequest,
    responses((status = 200, description = "Registered"),
              (status = 400, description = "Bad key, window outside the object, or already registered", body = Value),
              (status = 403, description = "Not a local client (ALLOW_CLIENT_SHM)", body = Value)))]
pub async fn shm_register(
    State(st): State<Arc<AppState>>,
    Path(name): Path<String>,
    req: Request,
) -> Response {
    let answer = async {
        let peer = req.extensions().get::<RemoteIp>().map(|p| p.0);
        let body = read_admin_body(&st, req).await?;
        let r: RegisterRequest = serde_json::from_slice(&body.bytes)
            .map_err(|e| ApiError::bad_request(format!("failed to parse the body: {e}")))?;
        st.regions
            .register(&name, &r.key, r.offset, r.byte_size, peer)
            .map_err(region_error)?;
        Ok(Response::new(Full::new(Bytes::new())))
    }
    .await;
    finish_v2(answer, None)
}

/// Unregisters `name` (none: all), waiting up to REQUEST_TIMEOUT_S for the requests using
/// it; past that, an error: the client must not reuse the memory yet.
pub async fn unregister(st: &AppState, name: Option<&str>) -> Result<(), ApiError> {
    let wait = Duration::from_secs_f64(st.cfg.request_timeout_s.max(0.0));
    if st.regions.unregister(name, wait).await {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "shared memory region {} unregistered, but requests still used it after REQUEST_TIMEOUT_S",
                name.unwrap_or("(all)")
            ),
        ))
    }
}

#[utoipa::path(post, path = "/v2/systemsharedmemory/unregister", tag = "open inference protocol",
    responses((status = 200, description = "Every region unregistered, once no request uses them"),
              (status = 504, description = "Requests still used one after REQUEST_TIMEOUT_S", body = Value)))]
pub async fn shm_unregister_all(State(st): State<Arc<AppState>>, req: Request) -> Response {
    let answer = match remote_allowed(&st, &req) {
        Ok(()) => unregister(&st, None).await,
        Err(e) => Err(e),
    };
    finish_v2(
        answer.map(|()| Response::new(Full::new(Bytes::new()))),
        None,
    )
}

#[utoipa::path(post, path = "/v2/systemsharedmemory/region/{region_name}/unregister", tag = "open inference protocol",
    params(("region_name" = String, Path)),
    responses((status = 200, description = "Unregistered, once no request uses it (an unknown name is no error, as in Triton)"),
              (status = 504, description = "Requests still used it after REQUEST_TIMEOUT_S", body = Value)))]
pub async fn shm_unregister(
    State(st): State<Arc<AppState>>,
    Path(name): Path<String>,
    req: Request,
) -> Response {
    let answer = match remote_allowed(&st, &req) {
        Ok(()) => unregister(&st, Some(&name)).await,
        Err(e) => Err(e),
    };
    finish_v2(
        answer.map(|()| Response::new(Full::new(Bytes::new()))),
        None,
    )
}
