//! Models downloaded from Roboflow's API, against a local stand-in of the API (nothing
//! reaches the internet): the description at `/ort/<dataset>/<version>`, then the weights and
//! environment.json from the URLs it gives, written atomically into the cache, once for
//! concurrent first requests; Roboflow's 401/403/404, OFFLINE_MODE, and the size and time
//! limits.
//!
//! Tier: full (docs/tests.md).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{b64, repo, Server};
use serde_json::json;

/// A stand-in of Roboflow's API serving shapes-det/1 as `remote/1` (also as `huge/1`, whose
/// weights claim 3 GB, and `slow/1`, whose weights trickle).
struct FakeApi {
    base: String,
    /// Requests for weights files.
    weights_hits: Arc<AtomicUsize>,
    /// Every request.
    hits: Arc<AtomicUsize>,
}

impl FakeApi {
    fn start() -> FakeApi {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let weights_hits = Arc::new(AtomicUsize::new(0));
        let hits = Arc::new(AtomicUsize::new(0));
        let (b, w, h) = (base.clone(), Arc::clone(&weights_hits), Arc::clone(&hits));
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (b, w, h) = (b.clone(), Arc::clone(&w), Arc::clone(&h));
                std::thread::spawn(move || serve(stream, &b, &w, &h));
            }
        });
        FakeApi {
            base,
            weights_hits,
            hits,
        }
    }
}

fn serve(mut stream: TcpStream, base: &str, weights_hits: &AtomicUsize, hits: &AtomicUsize) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
    }
    hits.fetch_add(1, Ordering::SeqCst);
    let target = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let key = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("api_key="))
        .unwrap_or("");
    let reply = |stream: &mut TcpStream, status: &str, body: &[u8]| {
        let _ = write!(
            stream,
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let _ = stream.write_all(body);
    };
    let model = repo().join("models/shapes-det/1");
    match path.split('/').collect::<Vec<_>>().as_slice() {
        ["", "ort", dataset, "1"] => match key {
            "bad" => reply(&mut stream, "401 Unauthorized", b"{}"),
            "noscope" => reply(&mut stream, "403 Forbidden", b"{}"),
            "good" if ["remote", "huge", "slow"].contains(dataset) => {
                let body = json!({"ort": {
                    "type": "object-detection",
                    "modelType": "yolov8n",
                    "model": format!("{base}/files/{dataset}/weights.onnx"),
                    "environment": format!("{base}/files/{dataset}/environment.json"),
                    "classes": ["circle", "rectangle", "triangle", "star"],
                    "colors": {"circle": "#FF0000"},
                }});
                reply(&mut stream, "200 OK", body.to_string().as_bytes());
            }
            _ => reply(&mut stream, "404 Not Found", b"{}"),
        },
        ["", "files", _, "environment.json"] => reply(
            &mut stream,
            "200 OK",
            &std::fs::read(model.join("environment.json")).unwrap(),
        ),
        ["", "files", dataset, "weights.onnx"] => {
            weights_hits.fetch_add(1, Ordering::SeqCst);
            match *dataset {
                "huge" => {
                    let _ = write!(
                        stream,
                        "HTTP/1.1 200 OK\r\nContent-Length: 3000000000\r\nConnection: close\r\n\r\n"
                    );
                    let _ = stream.write_all(&[0u8; 65536]);
                }
                "slow" => {
                    let _ = write!(
                        stream,
                        "HTTP/1.1 200 OK\r\nContent-Length: 100000\r\nConnection: close\r\n\r\n"
                    );
                    for _ in 0..100 {
                        if stream.write_all(&[0u8; 1000]).is_err() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
                _ => {
                    // Slow enough that concurrent first requests overlap.
                    std::thread::sleep(Duration::from_millis(500));
                    reply(
                        &mut stream,
                        "200 OK",
                        &std::fs::read(model.join("weights.onnx")).unwrap(),
                    )
                }
            }
        }
        _ => reply(&mut stream, "404 Not Found", b"{}"),
    }
    let mut rest = Vec::new();
    let _ = reader.read_to_end(&mut rest);
}

fn empty_cache(name: &str) -> PathBuf {
    let root =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    root
}

fn infer(s: &Server, model: &str, key: Option<&str>) -> common::Resp {
    let mut body = json!({"model_id": model, "image": {"type": "base64", "value": b64("samples/shapes/000000.jpg")}});
    if let Some(k) = key {
        body["api_key"] = json!(k);
    }
    s.post_json("/infer/object_detection", &body)
}

#[test]
fn a_missing_model_is_downloaded_once_into_the_cache_and_served() {
    let api = FakeApi::start();
    let cache = empty_cache("download");
    let s = Server::start(
        "none",
        &[
            ("MODEL_CACHE_DIR", cache.to_str().unwrap()),
            ("API_BASE_URL", &api.base),
        ],
    );
    // Without a key, a model missing from the cache is not found (and nothing is asked).
    assert_eq!(infer(&s, "remote/1", None).status, 404);
    assert_eq!(api.hits.load(Ordering::SeqCst), 0);
    // Four concurrent first requests: one download, four answers.
    let answers: Vec<common::Resp> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|_| scope.spawn(|| infer(&s, "remote/1", Some("good"))))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in &answers {
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.body["predictions"][0]["class"], "rectangle", "{}", r.body);
    }
    assert_eq!(
        api.weights_hits.load(Ordering::SeqCst),
        1,
        "downloaded once"
    );
    // The cache holds Roboflow's layout, and no staging leftovers.
    let dir = cache.join("remote/1");
    let weights = std::fs::read(dir.join("weights.onnx")).unwrap();
    assert_eq!(
        weights,
        std::fs::read(repo().join("models/shapes-det/1/weights.onnx")).unwrap()
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("class_names.txt")).unwrap(),
        "circle\nrectangle\ntriangle\nstar\n"
    );
    let env: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("environment.json")).unwrap()).unwrap();
    assert_eq!(env["COLORS"]["circle"], "#FF0000");
    let mt: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("model_type.json")).unwrap()).unwrap();
    assert_eq!(mt["project_task_type"], "object-detection");
    let entries: Vec<String> = std::fs::read_dir(&cache)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "#partial")
        .collect();
    assert_eq!(entries, vec!["remote".to_string()]);
    if let Ok(partial) = std::fs::read_dir(cache.join("#partial")) {
        assert_eq!(partial.count(), 0, "staging leftovers");
    }
    // /model/add with a key (the SDK's flow) downloads too; the key may come as a query
    // parameter or a bearer token.
    std::fs::remove_dir_all(&dir).unwrap();
    s.post_json("/model/clear", &json!({}));
    let r = s.post_json("/model/add?api_key=good", &json!({"model_id": "remote/1"}));
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body["models"].to_string().contains("remote/1"));
    assert_eq!(api.weights_hits.load(Ordering::SeqCst), 2);
}

#[test]
fn bad_keys_unknown_models_offline_mode_and_limits_answer_like_roboflow() {
    let api = FakeApi::start();
    let cache = empty_cache("download-errors");
    let s = Server::start(
        "none",
        &[
            ("MODEL_CACHE_DIR", cache.to_str().unwrap()),
            ("API_BASE_URL", &api.base),
            ("MODEL_DOWNLOAD_MAX_BYTES", "20000000"),
            ("MODEL_DOWNLOAD_TIMEOUT_S", "2"),
        ],
    );
    let r = infer(&s, "remote/1", Some("bad"));
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(r.body["message"]
        .as_str()
        .unwrap()
        .contains("check API key"));
    assert_eq!(infer(&s, "remote/1", Some("noscope")).status, 403);
    let r = infer(&s, "nowhere/1", Some("good"));
    assert_eq!(r.status, 404, "{}", r.body);
    // Weights over MODEL_DOWNLOAD_MAX_BYTES, and weights that do not arrive in time:
    // refused, nothing stored, and the server goes on serving.
    let r = infer(&s, "huge/1", Some("good"));
    assert_eq!(r.status, 502, "{}", r.body);
    assert!(r.body["message"]
        .as_str()
        .unwrap()
        .contains("MODEL_DOWNLOAD_MAX_BYTES"));
    let r = infer(&s, "slow/1", Some("good"));
    assert_eq!(r.status, 504, "{}", r.body);
    for id in ["huge/1", "slow/1", "nowhere/1"] {
        assert!(!cache.join(id).exists(), "{id} must not be visible");
    }
    // The key never shows in an answer.
    assert!(!r.body.to_string().contains("good"));
    assert_eq!(infer(&s, "remote/1", Some("good")).status, 200);
    drop(s);

    // OFFLINE_MODE never downloads, key or not.
    let api = FakeApi::start();
    let cache = empty_cache("download-offline");
    let s = Server::start(
        "none",
        &[
            ("MODEL_CACHE_DIR", cache.to_str().unwrap()),
            ("API_BASE_URL", &api.base),
            ("OFFLINE_MODE", "true"),
            ("ROBOFLOW_API_KEY", "good"),
        ],
    );
    assert_eq!(infer(&s, "remote/1", Some("good")).status, 404);
    assert_eq!(api.hits.load(Ordering::SeqCst), 0);
    drop(s);

    // ROBOFLOW_API_KEY is the key of requests that carry none.
    let s = Server::start(
        "none",
        &[
            ("MODEL_CACHE_DIR", cache.to_str().unwrap()),
            ("API_BASE_URL", &api.base),
            ("ROBOFLOW_API_KEY", "good"),
        ],
    );
    assert_eq!(infer(&s, "remote/1", None).status, 200);
}
