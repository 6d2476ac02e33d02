//! Who loads models and what a load costs the others: MODEL_CONTROL (`open`, `explicit`
//! with the admin token, `none`) over the Roboflow admin routes, the Open Inference
//! Protocol's repository over HTTP and gRPC, and requests; a cold load bounded by the
//! request's deadline (503 with Retry-After while the load goes on); preloaded models never
//! unloaded to make room.
//!
//! Tier: quick (docs/tests.md).

mod common;

use std::time::Duration;

use common::{b64, eventually, free_port, metric, Server};
use serde_json::json;

const MODEL: &str = "shapes-cls/1";
const OTHER: &str = "shapes-det/1";
const TOKEN: &str = "s3cret-admin-token";

fn classify(s: &Server) -> common::Resp {
    s.post_json(
        "/infer/classification",
        &json!({"model_id": MODEL, "image": {"type": "base64", "value": b64("samples/shapes-cls/000000.jpg")}}),
    )
}

fn loaded(s: &Server) -> String {
    s.get("/model/registry").body.to_string()
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[test]
fn explicit_model_control_needs_the_admin_token_and_requests_never_load() {
    let grpc_port = free_port().to_string();
    let s = Server::start(
        MODEL,
        &[
            ("MODEL_CONTROL", "explicit"),
            ("ADMIN_TOKEN", TOKEN),
            ("GRPC_PORT", grpc_port.as_str()),
        ],
    );
    let add = json!({"model_id": OTHER});
    // A request naming a model that is not loaded does not load it.
    let r = s.detect(OTHER, "samples/shapes/000000.jpg", json!({}));
    assert_eq!(r.status, 404, "{:?}", r.body);
    assert!(
        r.body.to_string().contains("MODEL_CONTROL=explicit"),
        "{:?}",
        r.body
    );
    // Loading, unloading and clearing need the token, on every API.
    for headers in [vec![], vec![("Authorization", bearer("wrong"))]] {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(s.post_json_with_headers("/model/add", &add, &h).status, 401);
        let remove = json!({"model_id": MODEL});
        assert_eq!(
            s.post_json_with_headers("/model/remove", &remove, &h)
                .status,
            401
        );
        assert_eq!(
            s.post_json_with_headers("/model/clear", &json!({}), &h)
                .status,
            401
        );
        let unload = "/v2/repository/models/shapes-cls/unload";
        assert_eq!(s.post_json_with_headers(unload, &json!({}), &h).status, 401);
    }
    assert!(loaded(&s).contains(MODEL), "{}", loaded(&s));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let grpc_unload = |token: Option<&str>| {
        use cvserve::http::v2::grpc::pb;
        let addr = format!("http://{}", s.grpc.clone().unwrap());
        rt.block_on(async {
            let mut c =
                pb::grpc_inference_service_client::GrpcInferenceServiceClient::connect(addr)
                    .await
                    .unwrap();
            let mut req = tonic::Request::new(pb::RepositoryModelUnloadRequest {
                model_name: "shapes-cls".into(),
                ..Default::default()
            });
            if let Some(t) = token {
                req.metadata_mut()
                    .insert("authorization", bearer(t).parse().unwrap());
            }
            c.repository_model_unload(req).await.map(drop)
        })
    };
    let refused = grpc_unload(None).unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    assert_eq!(classify(&s).status, 200);
    // With the token: loaded, then served.
    let auth = bearer(TOKEN);
    let h = [("Authorization", auth.as_str())];
    let r = s.post_json_with_headers("/model/add", &add, &h);
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = s.detect(OTHER, "samples/shapes/000000.jpg", json!({}));
    assert_eq!(r.status, 200, "{:?}", r.body);
    grpc_unload(Some(TOKEN)).expect("unloaded with the token");
    assert!(!loaded(&s).contains(MODEL), "{}", loaded(&s));
    // The token is never written to the log; the refusals are counted.
    assert!(!s.logs().contains(TOKEN));
    assert_eq!(
        metric(
            &s,
            "cvserve_model_control_refused_total{reason=\"no_token\"}"
        ),
        9.0
    );
}

#[test]
fn with_model_control_none_only_the_preloaded_models_serve() {
    let s = Server::start(MODEL, &[("MODEL_CONTROL", "none")]);
    let r = s.post_json("/model/add", &json!({"model_id": OTHER}));
    assert_eq!(r.status, 403, "{:?}", r.body);
    let r = s.post_json("/model/remove", &json!({"model_id": MODEL}));
    assert_eq!(r.status, 403, "{:?}", r.body);
    assert_eq!(s.post_json("/model/clear", &json!({})).status, 403);
    let r = s.post_json("/v2/repository/models/shapes-det/load", &json!({}));
    assert_eq!(r.status, 403, "{:?}", r.body);
    let r = s.detect(OTHER, "samples/shapes/000000.jpg", json!({}));
    assert_eq!(r.status, 404, "{:?}", r.body);
    assert_eq!(classify(&s).status, 200);
    assert!(!loaded(&s).contains(OTHER));
}

/// A request for a model that is still loading waits for it only until its deadline, then
/// gets 503 with Retry-After; the load goes on, and a later request is served. Meanwhile
/// the preloaded model serves. (Roboflow blocks the request until the model is loaded.)
#[test]
fn a_cold_load_answers_503_at_the_deadline_and_goes_on() {
    let s = Server::start(
        MODEL,
        &[
            ("CVSERVE_INJECT_LOAD_DELAY_MS", "4000"),
            ("CVSERVE_INJECT_MODEL", OTHER),
        ],
    );
    let body = json!({"model_id": OTHER, "image": {"type": "base64", "value": b64("samples/shapes/000000.jpg")}});
    let r = s.post_json_with_headers(
        "/infer/object_detection",
        &body,
        &[("X-Request-Timeout-Ms", "300")],
    );
    assert_eq!(r.status, 503, "{:?}", r.body);
    let retry: u64 = r
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!(retry >= 1, "{retry}");
    assert!(r.body.to_string().contains("is loading"), "{:?}", r.body);
    // The other model serves while the load runs.
    assert_eq!(classify(&s).status, 200);
    assert!(
        !loaded(&s).contains(OTHER),
        "loaded already: the injected delay is too short"
    );
    // The load went on without the request that started it.
    eventually("the load to finish", Duration::from_secs(60), || {
        loaded(&s).contains(OTHER)
    });
    let r = s.post_json("/infer/object_detection", &body);
    assert_eq!(r.status, 200, "{:?}", r.body);
}

/// MAX_ACTIVE_MODELS=1 with a preloaded model: naming another model cannot unload it (503,
/// no Retry-After: no retry can succeed until an administrator unloads it).
#[test]
fn a_preloaded_model_is_never_evicted_by_a_request_for_another() {
    let s = Server::start(MODEL, &[("MAX_ACTIVE_MODELS", "1")]);
    let r = s.detect(OTHER, "samples/shapes/000000.jpg", json!({}));
    assert_eq!(r.status, 503, "{:?}", r.body);
    assert!(r.header("retry-after").is_none());
    assert!(
        r.body.to_string().contains("PRELOAD_MODELS"),
        "{:?}",
        r.body
    );
    assert_eq!(metric(&s, "cvserve_models_evicted_total"), 0.0);
    assert_eq!(classify(&s).status, 200);
}
