//! Models from Roboflow's API: a model id missing from the repository, asked with an API key,
//! is fetched as Roboflow's server fetches it (`inference/core/models/roboflow.py`,
//! `roboflow_api.py`): `GET {API_BASE_URL}/ort/<dataset>/<version>?api_key=…` describes the
//! model (`ort.model` and `ort.environment` URLs, `classes`, `colors`, `type`, `modelType`,
//! `keypoints_metadata`), then the weights and environment.json are fetched from those URLs.
//!
//! The files are written into a hidden directory of the repository (a name no model id can
//! take) and renamed into place in one step, so a half-written model is never visible; a
//! second request for the same model waits for the first download instead of starting its
//! own. Every fetch has a deadline and a size limit.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::{json, Value};

use super::repository::validate_id;

/// Roboflow's public API, the default of `API_BASE_URL`.
pub const DEFAULT_API_BASE_URL: &str = "https://api.roboflow.com";

/// Where downloads are assembled; `#` keeps it out of every model id and listing.
const PARTIAL_DIR: &str = "#partial";

/// Metadata documents (the model description, environment.json) are small.
const MAX_METADATA_BYTES: u64 = 4 << 20;

/// How downloading works.
#[derive(Debug, Clone)]
pub struct DownloadSettings {
    pub api_base_url: String,
    /// Never download (`OFFLINE_MODE`).
    pub offline: bool,
    /// Largest weights file accepted.
    pub max_bytes: u64,
    /// Deadline of one model's whole download.
    pub timeout: Duration,
    /// Used when a request carries none (`ROBOFLOW_API_KEY`).
    pub default_api_key: Option<String>,
}

/// Why a model could not be fetched (each maps to Roboflow's status code).
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("Unauthorized access to roboflow API - check API key and make sure the key is valid for workspace you use.")]
    NotAuthorized,
    #[error("Unauthorized access to roboflow API - check API key and make sure the key is valid and have required scopes.")]
    Forbidden,
    #[error("Requested Roboflow resource not found. Make sure that workspace, project or model you referred in request exists.")]
    NotFound,
    #[error("Could not connect to Roboflow API: {0}")]
    Connection(String),
    #[error("Timeout when attempting to download model '{0}' from Roboflow API (MODEL_DOWNLOAD_TIMEOUT_S)")]
    Timeout(String),
    #[error(
        "Model '{id}' is larger than MODEL_DOWNLOAD_MAX_BYTES ({limit} bytes); it was not stored"
    )]
    TooLarge { id: String, limit: u64 },
    #[error("Malformed answer from Roboflow API: {0}")]
    Malformed(String),
    #[error("Cannot store the downloaded model: {0}")]
    Storage(String),
}

/// Fetches models into a repository, one download per model at a time.
pub struct Downloader {
    settings: DownloadSettings,
    client: reqwest::Client,
    /// One lock per model id being downloaded.
    in_flight: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Downloader {
    pub fn new(settings: DownloadSettings) -> Result<Self, String> {
        let client = http_client()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| format!("cannot build the download client: {e}"))?;
        Ok(Self {
            settings,
            client,
            in_flight: Mutex::default(),
        })
    }

    /// The key a request's own (`api_key`) or the server's default.
    pub fn api_key<'a>(&'a self, asked: Option<&'a str>) -> Option<&'a str> {
        asked
            .filter(|k| !k.is_empty() && *k != "None")
            .or(self.settings.default_api_key.as_deref())
    }

    /// Makes sure `<root>/<id>` exists: nothing to do when it does, or when offline or
    /// without a key (the caller then answers "not in the repository"); else downloads it.
    /// Returns whether a download happened.
    pub async fn ensure(
        &self,
        root: &Path,
        id: &str,
        api_key: Option<&str>,
    ) -> Result<bool, DownloadError> {
        if validate_id(id).is_err() || root.join(id).is_dir() || self.settings.offline {
            return Ok(false);
        }
        let Some(key) = self.api_key(api_key) else {
            return Ok(false);
        };
        let lock = Arc::clone(self.in_flight.lock().entry(id.to_string()).or_default());
        let _guard = lock.lock().await;
        let _forget = ForgetOnDrop(&self.in_flight, id);
        let result = if root.join(id).is_dir() {
            Ok(false) // another request downloaded it while this one waited
        } else {
            let deadline = Instant::now() + self.settings.timeout;
            match tokio::time::timeout_at(deadline.into(), self.download(root, id, key, deadline))
                .await
            {
                Ok(r) => r.map(|()| true),
                Err(_) => Err(DownloadError::Timeout(id.to_string())),
            }
        };
        result
    }

    async fn download(
        &self,
        root: &Path,
        id: &str,
        key: &str,
        deadline: Instant,
    ) -> Result<(), DownloadError> {
        let url = format!(
            "{}/ort/{id}",
            self.settings.api_base_url.trim_end_matches('/')
        );
        let described = self
            .get(
                &url,
                &[
                    ("nocache", "true"),
                    ("device", "cvserve"),
                    ("dynamic", "true"),
                    ("api_key", key),
                ],
                MAX_METADATA_BYTES,
                id,
            )
            .await?;
        let described: Value = serde_json::from_slice(&described)
            .map_err(|e| DownloadError::Malformed(format!("model description: {e}")))?;
        let ort = described.get("ort").ok_or_else(|| {
            DownloadError::Malformed("no `ort` key in the model description".into())
        })?;
        let field = |k: &str| {
            ort.get(k)
                .and_then(Value::as_str)
                .ok_or_else(|| DownloadError::Malformed(format!("no `ort.{k}` URL")))
        };
        let (model_url, env_url) = (field("model")?, field("environment")?);
        let env = self.get(env_url, &[], MAX_METADATA_BYTES, id).await?;
        let mut env: Value = serde_json::from_slice(&env)
            .map_err(|e| DownloadError::Malformed(format!("environment.json: {e}")))?;
        if let (Some(colors), Some(obj)) = (ort.get("colors"), env.as_object_mut()) {
            obj.insert("COLORS".into(), colors.clone());
        }
        // Roboflow's defaults for versions that do not say.
        let task = ort
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("object-detection");
        let model_type = ort
            .get("modelType")
            .and_then(Value::as_str)
            .filter(|t| *t != "ort")
            .unwrap_or(match task {
                "instance-segmentation" => "yolact",
                "classification" => "vit",
                "keypoint-detection" => "yolov8n",
                _ => "yolov5v2s",
            });

        let partial = root.join(PARTIAL_DIR).join(format!(
            "{}-{}-{}",
            id.replace('/', "."),
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        // Removed however this ends: here before answering, or by the guard when the client
        // went away mid-download (the future is dropped).
        let mut cleanup = RemoveOnDrop(partial.clone());
        let staged = self
            .stage(
                &partial, id, model_url, &env, ort, task, model_type, deadline,
            )
            .await;
        let done = match staged {
            Ok(()) => publish(&partial, &root.join(id)).await,
            Err(e) => Err(e),
        };
        let _ = tokio::fs::remove_dir_all(&partial).await;
        cleanup.0 = PathBuf::new();
        done
    }

    /// Writes every file of the model into `dir`.
    #[allow(clippy::too_many_arguments)]
    async fn stage(
        &self,
        dir: &Path,
        id: &str,
        model_url: &str,
        env: &Value,
        ort: &Value,
        task: &str,
        model_type: &str,
        deadline: Instant,
    ) -> Result<(), DownloadError> {
        // File work goes through tokio::fs (the blocking pool), never on a reactor thread.
        let storage = |e: std::io::Error| DownloadError::Storage(e.to_string());
        tokio::fs::create_dir_all(dir).await.map_err(storage)?;
        self.fetch_to_file(model_url, &dir.join("weights.onnx"), id, deadline)
            .await?;
        let json = |v: &Value| serde_json::to_vec_pretty(v).unwrap_or_default();
        let mut files = vec![
            ("environment.json", json(env)),
            (
                "model_type.json",
                json(&json!({"project_task_type": task, "model_type": model_type, "model_id": id})),
            ),
        ];
        if let Some(classes) = ort.get("classes").and_then(Value::as_array) {
            let lines: Vec<&str> = classes.iter().filter_map(Value::as_str).collect();
            files.push(("class_names.txt", (lines.join("\n") + "\n").into_bytes()));
        }
        if let Some(kp) = ort.get("keypoints_metadata") {
            files.push(("keypoints_metadata.json", json(kp)));
        }
        for (name, bytes) in files {
            tokio::fs::write(dir.join(name), bytes)
                .await
                .map_err(storage)?;
        }
        Ok(())
    }

    /// A small document, at most `limit` bytes.
    async fn get(
        &self,
        url: &str,
        query: &[(&str, &str)],
        limit: u64,
        id: &str,
    ) -> Result<Vec<u8>, DownloadError> {
        let mut resp = self.send(url, query).await?;
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(connection)? {
            body.extend_from_slice(&chunk);
            if body.len() as u64 > limit {
                return Err(DownloadError::TooLarge {
                    id: id.to_string(),
                    limit,
                });
            }
        }
        Ok(body)
    }

    /// Streams `url` into `path`, refusing more than `max_bytes` (declared or received).
    async fn fetch_to_file(
        &self,
        url: &str,
        path: &Path,
        id: &str,
        deadline: Instant,
    ) -> Result<(), DownloadError> {
        use tokio::io::AsyncWriteExt;
        let limit = self.settings.max_bytes;
        let too_large = || DownloadError::TooLarge {
            id: id.to_string(),
            limit,
        };
        let storage = |e: std::io::Error| DownloadError::Storage(e.to_string());
        let mut resp = self.send(url, &[]).await?;
        if resp.content_length().is_some_and(|n| n > limit) {
            return Err(too_large());
        }
        let mut file = tokio::fs::File::create(path).await.map_err(storage)?;
        let mut written = 0u64;
        while let Some(chunk) = resp.chunk().await.map_err(connection)? {
            written += chunk.len() as u64;
            if written > limit {
                return Err(too_large());
            }
            if Instant::now() >= deadline {
                return Err(DownloadError::Timeout(id.to_string()));
            }
            file.write_all(&chunk).await.map_err(storage)?;
        }
        file.sync_all().await.map_err(storage)
    }

    /// Sends a GET and maps Roboflow's error statuses.
    async fn send(
        &self,
        url: &str,
        query: &[(&str, &str)],
    ) -> Result<reqwest::Response, DownloadError> {
        let mut url = reqwest::Url::parse(url)
            .map_err(|e| DownloadError::Malformed(format!("bad URL: {e}")))?;
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        let resp = self.client.get(url).send().await.map_err(connection)?;
        match resp.status().as_u16() {
            200..=299 => Ok(resp),
            401 => Err(DownloadError::NotAuthorized),
            403 => Err(DownloadError::Forbidden),
            404 => Err(DownloadError::NotFound),
            s => Err(DownloadError::Connection(format!(
                "Roboflow API answered {s}"
            ))),
        }
    }
}

/// Drops a model's download lock from the map, even when the waiting request is cancelled.
struct ForgetOnDrop<'a>(
    &'a Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    &'a str,
);

impl Drop for ForgetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.lock().remove(self.1);
    }
}

/// Deletes a staging directory when dropped (on the blocking pool when a runtime runs).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let dir = std::mem::take(&mut self.0);
        if dir.as_os_str().is_empty() {
            return;
        }
        let remove = move || {
            let _ = std::fs::remove_dir_all(&dir);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(remove)),
            Err(_) => remove(),
        }
    }
}

/// A builder for every outbound HTTP client of the server (model downloads, URL images): no
/// proxy from the environment, and TLS by rustls on ring, installed as the process's crypto
/// provider the first time (reqwest is built without a provider of its own).
pub fn http_client() -> reqwest::ClientBuilder {
    static PROVIDER: std::sync::Once = std::sync::Once::new();
    PROVIDER.call_once(|| {
        // Err only when another provider was installed first: that one serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    reqwest::Client::builder().no_proxy()
}

fn connection(e: reqwest::Error) -> DownloadError {
    // The URL may carry the API key: never put it in an error message.
    DownloadError::Connection(e.without_url().to_string())
}

/// Moves the staged model to its place in one rename (a concurrent process that got there
/// first wins; its copy is as good).
async fn publish(staged: &Path, target: &Path) -> Result<(), DownloadError> {
    let storage = |e: std::io::Error| DownloadError::Storage(e.to_string());
    if let Some(parent) = target.parent() {
        tokio::fs::create_dir_all(parent).await.map_err(storage)?;
    }
    match tokio::fs::rename(staged, target).await {
        Ok(()) => Ok(()),
        Err(_) if tokio::fs::metadata(target).await.is_ok_and(|m| m.is_dir()) => Ok(()),
        Err(e) => Err(storage(e)),
    }
}

/// The directory downloads are staged in (cleaned at start: leftovers of a killed process).
pub fn partial_dir(root: &Path) -> PathBuf {
    root.join(PARTIAL_DIR)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// reqwest is built without a crypto provider of its own: without ring installed first,
    /// building a client panics ("No rustls crypto provider is configured").
    #[test]
    fn outbound_clients_get_tls_from_ring() {
        let client = http_client().build();
        assert!(client.is_ok(), "{:?}", client.err());
        let provider = rustls::crypto::CryptoProvider::get_default().expect("a provider");
        assert!(provider
            .cipher_suites
            .iter()
            .any(|s| s.suite() == rustls::CipherSuite::TLS13_AES_128_GCM_SHA256));
    }
}
