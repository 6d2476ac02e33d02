//! The service: `inference.GRPCInferenceService`'s calls (health, metadata, inference, the
//! stream, the repository, shared memory) on the engine, admitted, bounded and counted as
//! over HTTP.

use super::*;

pub(super) struct Grpc {
    pub(super) state: Arc<AppState>,
}

/// Counts a call in the request metrics, as the HTTP front end does (route `grpc ...`).
pub(super) fn observe(ctx: RequestContext, status: &str, started: Instant) {
    if let Some(labels) = ctx.labels() {
        let model = labels.model.as_deref().unwrap_or("none");
        METRICS
            .requests_total
            .with_label_values(&[model, labels.route, status])
            .inc();
        METRICS
            .request_seconds
            .with_label_values(&[model, labels.route])
            .observe(started.elapsed().as_secs_f64());
    }
}

/// Lets a call load or unload models (MODEL_CONTROL; the token in `authorization` metadata).
fn authorized<T>(st: &AppState, req: &Request<T>) -> Result<(), Status> {
    let authorization = req
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    crate::http::control::may_control_models(st, authorization).map_err(status_of)
}

/// The metrics label of gRPC inference calls.
pub(super) const GRPC_INFER_ROUTE: &str = "grpc ModelInfer";

impl Grpc {
    /// One inference, admitted and bounded like an HTTP one.
    pub(super) async fn infer_one(
        &self,
        req: pb::ModelInferRequest,
        metadata: &tonic::metadata::MetadataMap,
        peer: Option<std::net::IpAddr>,
    ) -> Result<pb::ModelInferResponse, Status> {
        let st = &self.state;
        let _in_flight = st.in_flight.enter();
        let now = Instant::now();
        let mut ctx = RequestContext::new(
            RequestId(uuid::Uuid::new_v4().to_string()),
            GRPC_INFER_ROUTE,
        );
        let answer = async {
            let call::Entry {
                arrived,
                deadline,
                presence: _presence,
            } = call::enter(st, || Ok(grpc_timeout(metadata)))?;
            ctx.peer = peer.map(crate::http::budget::client_key);
            ctx.remote = peer;
            // The message is held until the answer: counted like an HTTP body.
            let mut lease = st.body_memory.lease(ctx.peer);
            lease
                .cover(prost::Message::encoded_len(&req))
                .map_err(crate::http::budget::body_memory_full)?;
            ctx.hold(lease);
            let version = Some(req.model_version.as_str()).filter(|v| !v.is_empty());
            let (model_id, version) = resolve_model(st, &req.model_name, version)?;
            ctx.admit(st, &model_id, arrived, deadline)?;
            let request = v2_request(req)?;
            let answer = v2::run(
                st, &model_id, &version, request, arrived, deadline, &mut ctx,
            )
            .await;
            ctx.served(&answer);
            answer
        }
        .await;
        let status = match &answer {
            Ok(_) => "200".to_string(),
            Err(e) => e.status.as_str().to_string(),
        };
        observe(ctx, &status, now);
        let r = answer.map_err(status_of)?;
        let mut output = pb::model_infer_response::InferOutputTensor {
            name: OUTPUT_PREDICTIONS.into(),
            datatype: "BYTES".into(),
            shape: vec![r.predictions.len() as i64],
            ..Default::default()
        };
        let mut raw_output_contents = Vec::new();
        if let Some(region) = &r.written_to {
            let p = |c| pb::InferParameter {
                parameter_choice: Some(c),
            };
            use pb::infer_parameter::ParameterChoice as P;
            output.parameters = HashMap::from([
                (
                    "shared_memory_region".into(),
                    p(P::StringParam(region.name.clone())),
                ),
                (
                    "shared_memory_byte_size".into(),
                    p(P::Int64Param(region.byte_size as i64)),
                ),
                (
                    "shared_memory_offset".into(),
                    p(P::Int64Param(region.offset as i64)),
                ),
            ]);
        } else {
            raw_output_contents.push(Bytes::from(v2::serialize_bytes(&r.predictions)));
        }
        Ok(pb::ModelInferResponse {
            model_name: r.model_name,
            model_version: r.model_version,
            id: r.id,
            outputs: vec![output],
            raw_output_contents,
            ..Default::default()
        })
    }
}

pub(super) fn api<T>(r: Result<T, ApiError>) -> Result<Response<T>, Status> {
    r.map(Response::new).map_err(status_of)
}

pub(super) type InferStream = std::pin::Pin<
    Box<dyn futures_util::Stream<Item = Result<pb::ModelStreamInferResponse, Status>> + Send>,
>;

#[tonic::async_trait]
impl GrpcInferenceService for Grpc {
    async fn server_live(
        &self,
        _: Request<pb::ServerLiveRequest>,
    ) -> Result<Response<pb::ServerLiveResponse>, Status> {
        Ok(Response::new(pb::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<pb::ServerReadyRequest>,
    ) -> Result<Response<pb::ServerReadyResponse>, Status> {
        Ok(Response::new(pb::ServerReadyResponse {
            ready: self.state.readiness() == Readiness::Ready,
        }))
    }

    async fn model_ready(
        &self,
        req: Request<pb::ModelReadyRequest>,
    ) -> Result<Response<pb::ModelReadyResponse>, Status> {
        let r = req.into_inner();
        let version = Some(r.version.as_str()).filter(|v| !v.is_empty());
        let (id, _) = resolve_model(&self.state, &r.name, version).map_err(status_of)?;
        Ok(Response::new(pb::ModelReadyResponse {
            ready: self.state.engine.models().get(&id).is_some(),
        }))
    }

    async fn server_metadata(
        &self,
        _: Request<pb::ServerMetadataRequest>,
    ) -> Result<Response<pb::ServerMetadataResponse>, Status> {
        Ok(Response::new(pb::ServerMetadataResponse {
            name: "cvserve".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: crate::http::v2::EXTENSIONS
                .iter()
                .map(|e| e.to_string())
                .collect(),
        }))
    }

    async fn model_metadata(
        &self,
        req: Request<pb::ModelMetadataRequest>,
    ) -> Result<Response<pb::ModelMetadataResponse>, Status> {
        let r = req.into_inner();
        let version = Some(r.version.as_str()).filter(|v| !v.is_empty());
        let meta =
            crate::http::v2::model_metadata_of(&self.state, &r.name, version).map_err(status_of)?;
        let tensors = |v: &Value| -> Vec<pb::model_metadata_response::TensorMetadata> {
            v.as_array()
                .into_iter()
                .flatten()
                .map(|t| pb::model_metadata_response::TensorMetadata {
                    name: t["name"].as_str().unwrap_or_default().into(),
                    datatype: t["datatype"].as_str().unwrap_or_default().into(),
                    shape: t["shape"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_i64)
                        .collect(),
                })
                .collect()
        };
        Ok(Response::new(pb::ModelMetadataResponse {
            name: r.name,
            versions: meta["versions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            platform: meta["platform"].as_str().unwrap_or_default().into(),
            inputs: tensors(&meta["inputs"]),
            outputs: tensors(&meta["outputs"]),
        }))
    }

    async fn model_infer(
        &self,
        req: Request<pb::ModelInferRequest>,
    ) -> Result<Response<pb::ModelInferResponse>, Status> {
        let peer = req.remote_addr().map(|a: SocketAddr| a.ip());
        let metadata = req.metadata().clone();
        let answer = self.infer_one(req.into_inner(), &metadata, peer).await?;
        Ok(Response::new(answer))
    }

    type ModelStreamInferStream = InferStream;

    async fn model_stream_infer(
        &self,
        req: Request<tonic::Streaming<pb::ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        let peer = req.remote_addr();
        let grpc = Arc::new(Grpc {
            state: Arc::clone(&self.state),
        });
        Ok(Response::new(stream::drive(grpc, req.into_inner(), peer)))
    }

    async fn model_config(
        &self,
        req: Request<pb::ModelConfigRequest>,
    ) -> Result<Response<pb::ModelConfigResponse>, Status> {
        let r = req.into_inner();
        let version = Some(r.version.as_str()).filter(|v| !v.is_empty());
        let cfg =
            crate::http::v2::model_config_of(&self.state, &r.name, version).map_err(status_of)?;
        Ok(Response::new(pb::ModelConfigResponse {
            config: Some(model_config_pb(&cfg)),
        }))
    }

    async fn model_statistics(
        &self,
        _: Request<pb::ModelStatisticsRequest>,
    ) -> Result<Response<pb::ModelStatisticsResponse>, Status> {
        Err(Status::unimplemented(
            "the statistics extension is not served: see /metrics",
        ))
    }

    async fn repository_index(
        &self,
        req: Request<pb::RepositoryIndexRequest>,
    ) -> Result<Response<pb::RepositoryIndexResponse>, Status> {
        let ready = req.into_inner().ready;
        let models = crate::http::v2::repository_index_of(&self.state, ready)
            .into_iter()
            .map(|m| pb::repository_index_response::ModelIndex {
                name: m["name"].as_str().unwrap_or_default().into(),
                version: m["version"].as_str().unwrap_or_default().into(),
                state: m["state"].as_str().unwrap_or_default().into(),
                reason: m["reason"].as_str().unwrap_or_default().into(),
            })
            .collect();
        Ok(Response::new(pb::RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        req: Request<pb::RepositoryModelLoadRequest>,
    ) -> Result<Response<pb::RepositoryModelLoadResponse>, Status> {
        authorized(&self.state, &req)?;
        let name = req.into_inner().model_name;
        api(crate::http::v2::load_model(&self.state, &name)
            .await
            .map(|()| pb::RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        req: Request<pb::RepositoryModelUnloadRequest>,
    ) -> Result<Response<pb::RepositoryModelUnloadResponse>, Status> {
        authorized(&self.state, &req)?;
        let name = req.into_inner().model_name;
        api(crate::http::v2::unload_model(&self.state, &name)
            .map(|()| pb::RepositoryModelUnloadResponse {}))
    }

    async fn system_shared_memory_status(
        &self,
        req: Request<pb::SystemSharedMemoryStatusRequest>,
    ) -> Result<Response<pb::SystemSharedMemoryStatusResponse>, Status> {
        let peer = req.remote_addr().map(|a| a.ip());
        let regions = &self.state.regions;
        regions
            .allowed(peer)
            .map_err(|e| status_of(region_error(e)))?;
        let name = req.into_inner().name;
        let name = Some(name.as_str()).filter(|n| !n.is_empty());
        let all = regions
            .status(name)
            .map_err(|e| status_of(region_error(e)))?;
        let regions = all
            .into_iter()
            .map(|r| {
                (
                    r.name.clone(),
                    pb::system_shared_memory_status_response::RegionStatus {
                        name: r.name,
                        key: r.key,
                        offset: r.offset,
                        byte_size: r.byte_size,
                    },
                )
            })
            .collect();
        Ok(Response::new(pb::SystemSharedMemoryStatusResponse {
            regions,
        }))
    }

    async fn system_shared_memory_register(
        &self,
        req: Request<pb::SystemSharedMemoryRegisterRequest>,
    ) -> Result<Response<pb::SystemSharedMemoryRegisterResponse>, Status> {
        let peer = req.remote_addr().map(|a| a.ip());
        let r = req.into_inner();
        self.state
            .regions
            .register(&r.name, &r.key, r.offset, r.byte_size, peer)
            .map_err(|e| status_of(region_error(e)))?;
        Ok(Response::new(pb::SystemSharedMemoryRegisterResponse {}))
    }

    async fn system_shared_memory_unregister(
        &self,
        req: Request<pb::SystemSharedMemoryUnregisterRequest>,
    ) -> Result<Response<pb::SystemSharedMemoryUnregisterResponse>, Status> {
        let peer = req.remote_addr().map(|a| a.ip());
        self.state
            .regions
            .allowed(peer)
            .map_err(|e| status_of(region_error(e)))?;
        let name = req.into_inner().name;
        let name = Some(name.as_str()).filter(|n| !n.is_empty());
        api(crate::http::v2::unregister(&self.state, name)
            .await
            .map(|()| pb::SystemSharedMemoryUnregisterResponse {}))
    }

    async fn cuda_shared_memory_status(
        &self,
        _: Request<pb::CudaSharedMemoryStatusRequest>,
    ) -> Result<Response<pb::CudaSharedMemoryStatusResponse>, Status> {
        Err(no_cuda_shm())
    }

    async fn cuda_shared_memory_register(
        &self,
        _: Request<pb::CudaSharedMemoryRegisterRequest>,
    ) -> Result<Response<pb::CudaSharedMemoryRegisterResponse>, Status> {
        Err(no_cuda_shm())
    }

    async fn cuda_shared_memory_unregister(
        &self,
        _: Request<pb::CudaSharedMemoryUnregisterRequest>,
    ) -> Result<Response<pb::CudaSharedMemoryUnregisterResponse>, Status> {
        Err(no_cuda_shm())
    }

    async fn trace_setting(
        &self,
        _: Request<pb::TraceSettingRequest>,
    ) -> Result<Response<pb::TraceSettingResponse>, Status> {
        Err(Status::unimplemented("the trace extension is not served"))
    }

    async fn log_settings(
        &self,
        _: Request<pb::LogSettingsRequest>,
    ) -> Result<Response<pb::LogSettingsResponse>, Status> {
        Err(Status::unimplemented(
            "the logging extension is not served: set LOG_LEVEL",
        ))
    }
}
