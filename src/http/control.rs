//! Model control (MODEL_CONTROL, as Triton's `--model-control-mode`): who may load, unload
//! and clear models over any API, HTTP or gRPC. `open` lets anyone (Roboflow's behaviour,
//! the default for drop-in use); `explicit` asks for the administrator's token
//! (`Authorization: Bearer <ADMIN_TOKEN>`, compared in constant time, never logged);
//! `none` lets nobody.

use hyper::{HeaderMap, StatusCode};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::state::AppState;
use crate::config::ModelControl;
use crate::metrics::METRICS;

/// The administrator's token: ADMIN_TOKEN, or the contents of ADMIN_TOKEN_FILE (trimmed).
pub fn admin_token(cfg: &crate::config::ServeConfig) -> anyhow::Result<Option<String>> {
    let token = match (&cfg.admin_token, &cfg.admin_token_file) {
        (Some(t), _) => Some(t.0.trim().to_owned()),
        (None, Some(path)) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("ADMIN_TOKEN_FILE {}: {e}", path.display()))?
                .trim()
                .to_owned(),
        ),
        (None, None) => None,
    };
    if token.as_deref() == Some("") {
        anyhow::bail!("the admin token is empty (ADMIN_TOKEN or ADMIN_TOKEN_FILE)");
    }
    if cfg.model_control == ModelControl::Explicit && token.is_none() {
        tracing::warn!(
            "MODEL_CONTROL=explicit without ADMIN_TOKEN: no client can load or unload models"
        );
    }
    Ok(token)
}

/// Lets a call load, unload or clear models, or refuses it: 403 under MODEL_CONTROL=none,
/// 401 under `explicit` without the admin token (`authorization`: the `Authorization`
/// value, HTTP's header or gRPC's metadata).
pub fn may_control_models(st: &AppState, authorization: Option<&str>) -> Result<(), ApiError> {
    match st.cfg.model_control {
        ModelControl::Open => Ok(()),
        ModelControl::None => {
            METRICS
                .model_control_refused
                .with_label_values(&["off"])
                .inc();
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "Models are not loaded or unloaded over the API on this server (MODEL_CONTROL=none)",
            ))
        }
        ModelControl::Explicit => {
            // The scheme is case-insensitive (RFC 7235).
            let given = authorization.and_then(|v| {
                let v = v.trim();
                let (scheme, token) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then_some(token)
            });
            match (&st.admin_token, given) {
                (Some(token), Some(given))
                    if bool::from(token.as_bytes().ct_eq(given.trim().as_bytes())) =>
                {
                    Ok(())
                }
                _ => {
                    METRICS
                        .model_control_refused
                        .with_label_values(&["no_token"])
                        .inc();
                    Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "Loading and unloading models needs the admin token (MODEL_CONTROL=explicit): send Authorization: Bearer <ADMIN_TOKEN>",
                ))
                }
            }
        }
    }
}

/// [`may_control_models`] for an HTTP request's headers.
pub fn may_control_models_http(st: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let authorization = headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    may_control_models(st, authorization)
}
