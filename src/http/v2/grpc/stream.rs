//! `ModelStreamInfer`, driven by the server: each request of a stream runs as its own task
//! under its own deadline, whether or not the client reads its answers. Finished answers
//! wait for the client in order, at most [`STREAM_IN_FLIGHT`] of them; while they wait no
//! further request is read (the client's sends stop at HTTP/2's flow control). An answer the
//! client has not taken within REQUEST_TIMEOUT_S ends the stream's work (its running
//! requests are cancelled) and closes its connection, so a client that never reads holds
//! at most that queue's bytes for that long, never a place, ticket, lease or ring slot.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::stream::FuturesOrdered;

use super::*;

/// The stream of `requests` from a client at `peer`, answered by tasks of its own.
pub(super) fn drive(
    grpc: Arc<Grpc>,
    requests: tonic::Streaming<pb::ModelInferRequest>,
    peer: Option<SocketAddr>,
) -> InferStream {
    let (answers, queue) = tokio::sync::mpsc::channel(STREAM_IN_FLIGHT);
    tokio::spawn(run(grpc, requests, peer, answers));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(queue))
}

/// A request of a stream being answered on a task of its own; cancelled when dropped (the
/// stream ended by the server or by its client).
struct Running {
    id: String,
    task: tokio::task::JoinHandle<pb::ModelStreamInferResponse>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Future for Running {
    type Output = pb::ModelStreamInferResponse;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.task).poll(cx).map(|done| {
            done.unwrap_or_else(|e| {
                tracing::error!(error = %e, "a stream's request failed on its task");
                failed(
                    self.id.clone(),
                    "internal error while answering the request",
                )
            })
        })
    }
}

/// The answer of a request that failed: the stream goes on.
fn failed(id: String, why: &str) -> pb::ModelStreamInferResponse {
    pb::ModelStreamInferResponse {
        error_message: why.to_owned(),
        infer_response: Some(pb::ModelInferResponse {
            id,
            ..Default::default()
        }),
    }
}

async fn run(
    grpc: Arc<Grpc>,
    mut requests: tonic::Streaming<pb::ModelInferRequest>,
    client: Option<SocketAddr>,
    answers: tokio::sync::mpsc::Sender<Result<pb::ModelStreamInferResponse, Status>>,
) {
    let peer = client.map(|a| a.ip());
    let unread_limit = Duration::from_secs_f64(grpc.state.cfg.request_timeout_s);
    // A stream's `grpc-timeout` bounds the whole stream (the client enforces it); each of
    // its requests gets REQUEST_TIMEOUT_S from its arrival.
    let metadata = Arc::new(tonic::metadata::MetadataMap::new());
    let mut running: FuturesOrdered<Running> = FuturesOrdered::new();
    // How the client's side ended: Ok when it closed, a broken stream's status otherwise.
    let mut ended: Option<Result<(), Status>> = None;
    loop {
        if ended.is_some() && running.is_empty() {
            break;
        }
        tokio::select! {
            biased;
            Some(answer) = running.next() => {
                match tokio::time::timeout(unread_limit, answers.send(Ok(answer))).await {
                    Ok(Ok(())) => {}
                    // The client is gone: its requests still running are cancelled.
                    Ok(Err(_)) => return,
                    Err(_) => {
                        METRICS.grpc_closed.with_label_values(&["unread_answers"]).inc();
                        tracing::warn!(
                            ?peer,
                            "a gRPC stream's answers were not read within REQUEST_TIMEOUT_S: its work is stopped and its connection closed"
                        );
                        if let Some(client) = client {
                            super::transport::close(client);
                        }
                        return;
                    }
                }
            }
            next = requests.next(), if ended.is_none() && running.len() < STREAM_IN_FLIGHT => {
                match next {
                    None => ended = Some(Ok(())),
                    Some(Err(status)) => ended = Some(Err(status)),
                    Some(Ok(one)) => {
                        let (grpc, metadata) = (Arc::clone(&grpc), Arc::clone(&metadata));
                        let id = one.id.clone();
                        let task = tokio::spawn(async move {
                            let id = one.id.clone();
                            match grpc.infer_one(one, &metadata, peer).await {
                                Ok(r) => pb::ModelStreamInferResponse {
                                    error_message: String::new(),
                                    infer_response: Some(r),
                                },
                                // An error answers that request; the stream goes on.
                                Err(status) => failed(id, status.message()),
                            }
                        });
                        running.push_back(Running { id, task });
                    }
                }
            }
            else => break,
        }
    }
    // A broken stream ends with its status, after the answers before it.
    if let Some(Err(status)) = ended {
        let _ = tokio::time::timeout(unread_limit, answers.send(Err(status))).await;
    }
}
