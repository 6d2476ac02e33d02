//! `cvserve bench --protocol v2-http|v2-grpc [--shm]`: the Open Inference Protocol's load.
//! Encoded images go as one BYTES element (HTTP: the binary tensor extension; gRPC:
//! `raw_input_contents`). With `--shm`, the images are decoded once up front and each
//! client (closed loop) owns one slot of a shared-memory region it registered: per request
//! it writes its next frame there (as a video client would) and sends only the reference.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use serde_json::json;

use cvserve::http::v2::grpc::pb;
use pb::grpc_inference_service_client::GrpcInferenceServiceClient;
use tonic::transport::Channel;

/// Decoded RGB frames of the bench's images.
struct Frame {
    width: u32,
    height: u32,
    pixels: Vec<u8>,
}

/// One client's slot: a shared-memory object it writes frames into.
struct Slot {
    name: String,
    path: PathBuf,
    map: parking_lot::Mutex<memmap2::MmapMut>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

enum Wire {
    Http {
        client: Box<Client<HttpConnector, Full<Bytes>>>,
        uri: hyper::Uri,
    },
    Grpc {
        clients: Vec<GrpcInferenceServiceClient<Channel>>,
    },
}

/// The v2 load: what is sent, and how.
pub struct V2Target {
    wire: Wire,
    model: String,
    images: Vec<Bytes>,
    frames: Vec<Frame>,
    slots: Vec<Slot>,
    timeout: Duration,
}

fn decode_frames(files: &[PathBuf]) -> anyhow::Result<Vec<Frame>> {
    files
        .iter()
        .map(|f| {
            let img = image::open(f)
                .map_err(|e| anyhow::anyhow!("cannot decode {}: {e}", f.display()))?
                .to_rgb8();
            Ok(Frame {
                width: img.width(),
                height: img.height(),
                pixels: img.into_raw(),
            })
        })
        .collect()
}

fn create_slot(name: &str, bytes: usize) -> anyhow::Result<Slot> {
    let path = Path::new("/dev/shm").join(name);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    file.set_len(bytes as u64)?;
    // SAFETY: the object is this process's own, created above and never truncated while
    // mapped (only unlinked at the end).
    let map = unsafe { memmap2::MmapMut::map_mut(&file)? };
    Ok(Slot {
        name: name.to_owned(),
        path,
        map: parking_lot::Mutex::new(map),
    })
}

impl V2Target {
    /// Sets up the load: the model's name (`coco` of `coco/1`), the clients, and with `shm`
    /// one registered region per client.
    #[allow(clippy::too_many_arguments)]
    pub async fn new(
        protocol: &str,
        url: &str,
        grpc_url: &str,
        model_id: &str,
        files: &[PathBuf],
        shm: bool,
        clients: usize,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let (name, version) = model_id.split_once('/').unwrap_or((model_id, ""));
        let wire = if protocol == "v2-grpc" {
            let channel = || async {
                Channel::from_shared(grpc_url.to_owned())?
                    .tcp_nodelay(true)
                    .connect()
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot connect to {grpc_url}: {e}"))
            };
            let mut list = Vec::new();
            for _ in 0..clients.clamp(1, 4) {
                list.push(
                    GrpcInferenceServiceClient::new(channel().await?)
                        .max_decoding_message_size(usize::MAX)
                        .max_encoding_message_size(usize::MAX),
                );
            }
            Wire::Grpc { clients: list }
        } else {
            let mut connector = HttpConnector::new();
            connector.set_nodelay(true);
            Wire::Http {
                client: Box::new(
                    Client::builder(hyper_util::rt::TokioExecutor::new())
                        .pool_max_idle_per_host(clients.max(1))
                        .build(connector),
                ),
                uri: format!("{url}/v2/models/{name}/versions/{version}/infer").parse()?,
            }
        };
        let images = files
            .iter()
            .map(|f| std::fs::read(f).map(Bytes::from))
            .collect::<Result<_, _>>()?;
        let (frames, slots) = if shm {
            let frames = decode_frames(files)?;
            let largest = frames.iter().map(|f| f.pixels.len()).max().unwrap_or(0);
            let mut slots = Vec::new();
            for k in 0..clients.max(1) {
                let slot = create_slot(
                    &format!("cvserve_bench_{}_{k}", std::process::id()),
                    largest,
                )?;
                register(&wire, url, &slot, largest).await?;
                slots.push(slot);
            }
            (frames, slots)
        } else {
            (Vec::new(), Vec::new())
        };
        Ok(Self {
            wire,
            model: model_id.to_owned(),
            images,
            frames,
            slots,
            timeout,
        })
    }

    /// What the report calls this load.
    pub fn label(&self) -> String {
        let what = if self.slots.is_empty() {
            "encoded images (BYTES)"
        } else {
            "raw frames via shared memory"
        };
        match self.wire {
            Wire::Http { .. } => format!("v2 HTTP infer, {what}"),
            Wire::Grpc { .. } => format!("v2 gRPC ModelInfer, {what}"),
        }
    }

    /// Sends image `i` from client `client`: (status, latency, Retry-After).
    pub async fn send_once(&self, i: usize, client: usize) -> (u16, Duration, Option<Duration>) {
        let started = Instant::now();
        let result = tokio::time::timeout(self.timeout, self.exchange(i, client)).await;
        let status = match result {
            Ok(Ok(status)) => status,
            Ok(Err(e)) => {
                if std::env::var_os("CVSERVE_BENCH_DEBUG").is_some() {
                    eprintln!("error: {e}");
                }
                0
            }
            Err(_) => 0,
        };
        (status, started.elapsed(), None)
    }

    /// The request's inputs: an encoded image, or the client's slot after writing the frame.
    fn input(&self, i: usize, client: usize) -> (serde_json::Value, Option<Bytes>) {
        if self.slots.is_empty() {
            let img = &self.images[i % self.images.len()];
            let mut element = Vec::with_capacity(img.len() + 4);
            element.extend_from_slice(&(img.len() as u32).to_le_bytes());
            element.extend_from_slice(img);
            let head = json!({"name": "image", "datatype": "BYTES", "shape": [1],
                "parameters": {"binary_data_size": element.len()}});
            return (head, Some(Bytes::from(element)));
        }
        let frame = &self.frames[i % self.frames.len()];
        let slot = &self.slots[client % self.slots.len()];
        slot.map.lock()[..frame.pixels.len()].copy_from_slice(&frame.pixels);
        let head = json!({"name": "pixels", "datatype": "UINT8",
            "shape": [1, frame.height, frame.width, 3],
            "parameters": {"shared_memory_region": slot.name,
                "shared_memory_byte_size": frame.pixels.len()}});
        (head, None)
    }

    async fn exchange(&self, i: usize, client: usize) -> anyhow::Result<u16> {
        let (input, raw) = self.input(i, client);
        match &self.wire {
            Wire::Http { client: http, uri } => {
                let head = json!({"inputs": [input],
                    "outputs": [{"name": "predictions", "parameters": {"binary_data": true}}]})
                .to_string();
                let mut body = head.clone().into_bytes();
                if let Some(raw) = &raw {
                    body.extend_from_slice(raw);
                }
                let req = Request::post(uri.clone())
                    .header("content-type", "application/octet-stream")
                    .header("inference-header-content-length", head.len())
                    .body(Full::new(Bytes::from(body)))?;
                let resp = http.request(req).await?;
                let status = resp.status().as_u16();
                resp.into_body().collect().await?;
                Ok(status)
            }
            Wire::Grpc { clients } => {
                let (name, version) = self.model.split_once('/').unwrap_or((&self.model, ""));
                let mut parameters = std::collections::HashMap::new();
                if let Some(p) = input.get("parameters").and_then(|p| p.as_object()) {
                    if let Some(region) = p.get("shared_memory_region").and_then(|v| v.as_str()) {
                        use pb::infer_parameter::ParameterChoice as P;
                        let size = p["shared_memory_byte_size"].as_i64().unwrap_or(0);
                        parameters.insert(
                            "shared_memory_region".to_string(),
                            pb::InferParameter {
                                parameter_choice: Some(P::StringParam(region.into())),
                            },
                        );
                        parameters.insert(
                            "shared_memory_byte_size".to_string(),
                            pb::InferParameter {
                                parameter_choice: Some(P::Int64Param(size)),
                            },
                        );
                    }
                }
                let req = pb::ModelInferRequest {
                    model_name: name.into(),
                    model_version: version.into(),
                    inputs: vec![pb::model_infer_request::InferInputTensor {
                        name: input["name"].as_str().unwrap_or_default().into(),
                        datatype: input["datatype"].as_str().unwrap_or_default().into(),
                        shape: input["shape"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|d| d.as_i64())
                            .collect(),
                        parameters,
                        contents: None,
                    }],
                    // BYTES elements as in the binary layout (4-byte length first), as Triton's
                    // clients send them.
                    raw_input_contents: raw.into_iter().collect(),
                    ..Default::default()
                };
                let mut c = clients[client % clients.len()].clone();
                Ok(match c.model_infer(req).await {
                    Ok(_) => 200,
                    Err(s) => match s.code() {
                        tonic::Code::Unavailable => 429,
                        tonic::Code::DeadlineExceeded => 504,
                        tonic::Code::InvalidArgument => 400,
                        tonic::Code::NotFound => 404,
                        _ => 500,
                    },
                })
            }
        }
    }

    /// Unregisters the regions (their objects are unlinked when dropped).
    pub async fn finish(&self, url: &str) {
        for slot in &self.slots {
            match &self.wire {
                Wire::Http { client, .. } => {
                    let uri = format!(
                        "{url}/v2/systemsharedmemory/region/{}/unregister",
                        slot.name
                    );
                    if let Ok(req) = Request::post(uri).body(Full::new(Bytes::new())) {
                        let _ = client.request(req).await;
                    }
                }
                Wire::Grpc { clients } => {
                    let _ = clients[0]
                        .clone()
                        .system_shared_memory_unregister(pb::SystemSharedMemoryUnregisterRequest {
                            name: slot.name.clone(),
                        })
                        .await;
                }
            }
        }
    }
}

/// Registers `slot` with the server, over the protocol in use.
async fn register(wire: &Wire, url: &str, slot: &Slot, bytes: usize) -> anyhow::Result<()> {
    match wire {
        Wire::Http { client, .. } => {
            let uri: hyper::Uri =
                format!("{url}/v2/systemsharedmemory/region/{}/register", slot.name).parse()?;
            let body = json!({"key": format!("/{}", slot.name), "byte_size": bytes}).to_string();
            let req = Request::post(uri)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body)))?;
            let resp = client.request(req).await?;
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            anyhow::ensure!(
                status.is_success(),
                "registering {} failed: {}",
                slot.name,
                String::from_utf8_lossy(&body)
            );
        }
        Wire::Grpc { clients } => {
            clients[0]
                .clone()
                .system_shared_memory_register(pb::SystemSharedMemoryRegisterRequest {
                    name: slot.name.clone(),
                    key: format!("/{}", slot.name),
                    offset: 0,
                    byte_size: bytes as u64,
                })
                .await
                .map_err(|s| anyhow::anyhow!("registering {} failed: {s}", slot.name))?;
        }
    }
    Ok(())
}
