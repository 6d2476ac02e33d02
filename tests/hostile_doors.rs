//! Hostile clients at the Open Inference Protocol's doors: gRPC streams whose answers are
//! never read, shared-memory windows named to make the server allocate, another user's file
//! or another server's ring registered as a region. Each test reproduces a hole the server
//! once had and asserts what a bystander or the owner of the file sees.
//!
//! As in `hostile.rs`, no test waits a fixed time: each waits (bounded) for the server's own
//! state, read from `/metrics` or `/proc`.
//!
//! Tier: full (docs/tests.md).

mod common;

use std::time::Duration;

use common::{eventually, fixture, free_port, metric, Server};
use cvserve::http::v2::grpc::pb;
use pb::grpc_inference_service_client::GrpcInferenceServiceClient;
use serde_json::json;

/// A file in /dev/shm (where client regions live) removed when dropped.
struct ShmFile(std::path::PathBuf);

impl ShmFile {
    fn new(tag: &str, bytes: &[u8]) -> ShmFile {
        let path = std::path::PathBuf::from(format!(
            "/dev/shm/cvserve-test-{tag}-{}",
            std::process::id()
        ));
        std::fs::write(&path, bytes).unwrap();
        ShmFile(path)
    }

    /// Its POSIX shared-memory key, `/name`.
    fn key(&self) -> String {
        format!("/{}", self.0.file_name().unwrap().to_str().unwrap())
    }
}

impl Drop for ShmFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn register(s: &Server, name: &str, key: &str, byte_size: usize) -> common::Resp {
    s.post_json(
        &format!("/v2/systemsharedmemory/region/{name}/register"),
        &json!({"key": key, "offset": 0, "byte_size": byte_size}),
    )
}

/// 32 streams on one connection that never read their answers (a 1-byte receive window),
/// each sending 8 requests: every request is still answered by the server (its place,
/// ticket and ring slots given back), and a bystander on the same model is served. The
/// server once ran a stream's requests only while its client read, so the frozen requests
/// held the model's places until the client went away.
#[test]
fn never_read_grpc_streams_leave_the_model_to_a_bystander() {
    let grpc_port = free_port().to_string();
    let s = Server::start(
        "shapes-det/1",
        &[
            ("GRPC_PORT", grpc_port.as_str()),
            ("MAX_INFLIGHT_REQUESTS", "64"),
            ("REQUEST_TIMEOUT_S", "10"),
        ],
    );
    let addr = format!("http://{}", s.grpc.clone().unwrap());
    let image = fixture("samples/shapes/000000.jpg");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let stalled = {
        let channel = rt.block_on(async {
            tonic::transport::Endpoint::from_shared(addr.clone())
                .unwrap()
                .initial_stream_window_size(Some(1))
                .connect()
                .await
                .expect("connect")
        });
        let client = GrpcInferenceServiceClient::new(channel);
        let mut streams = Vec::new();
        for _ in 0..32 {
            let requests: Vec<_> = (0..8)
                .map(|_| common::grpc_image_request("shapes-det", &image))
                .collect();
            let mut c = client.clone();
            let answers = rt
                .block_on(c.model_stream_infer(tokio_stream::iter(requests)))
                .expect("the stream opens");
            streams.push(answers);
        }
        streams
    };
    // Answered: served, or refused past MAX_INFLIGHT_REQUESTS (32 streams x 4 at once).
    let answered = |s: &Server| -> f64 {
        let text = s.get("/metrics").body;
        text.as_str()
            .unwrap()
            .lines()
            .filter(|l| {
                l.starts_with("cvserve_requests_total{") && l.contains("route=\"grpc ModelInfer\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    eventually(
        "the 256 stream requests to be answered and their places given back",
        Duration::from_secs(60),
        || {
            answered(&s) >= 256.0
                && metric(&s, "cvserve_inflight_requests") == 0.0
                && metric(&s, "cvserve_requests_in_line") == 0.0
                && metric(&s, "cvserve_ring_slots_in_use") == 0.0
        },
    );
    // A bystander, over gRPC and over HTTP, while the streams are still open and unread.
    let bystander = rt.block_on(async {
        let mut c = GrpcInferenceServiceClient::connect(addr.clone())
            .await
            .expect("connect");
        c.model_infer(common::grpc_image_request("shapes-det", &image))
            .await
    });
    assert!(bystander.is_ok(), "{bystander:?}");
    let r = s.detect("shapes-det/1", "samples/shapes/000000.jpg", json!({}));
    assert_eq!(r.status, 200, "{:?}", r.body);
    // Answers unread past REQUEST_TIMEOUT_S end their streams' work, counted.
    eventually(
        "the unread streams to be ended",
        Duration::from_secs(60),
        || metric(&s, "cvserve_grpc_closed_total{reason=\"unread_answers\"}") >= 1.0,
    );
    // ... and their connection closed: the stalled client's streams end in an error.
    let mut first = stalled.into_iter().next().unwrap().into_inner();
    let ended = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match first.message().await {
                    Ok(Some(_)) => continue,
                    other => return other.map(|_| ()),
                }
            }
        })
        .await
    });
    assert!(
        matches!(ended, Ok(Err(_))),
        "the stalled connection is still open: {ended:?}"
    );
}

/// An encoded image named in a shared-memory window costs the server a buffer of the
/// window's size: 24 clients naming 32 MiB windows at once, waiting for the model's two
/// ring slots, are held to the body budget (64 MiB here) like bodies of that size, the rest
/// refused with 429 and Retry-After, and the server's peak memory grows by about the budget,
/// not by 24 windows (768 MiB). The server once read each window into a buffer of its own
/// outside the budget, held while the request waited for its turn.
#[test]
fn shared_memory_reads_are_held_to_the_body_budget() {
    const WINDOW: usize = 32 << 20;
    let s = Server::start(
        "shapes-det/1",
        &[
            ("MAX_BODY_MEMORY_BYTES", &(64usize << 20).to_string()),
            ("MAX_BODY_BYTES", &(WINDOW + 1024).to_string()),
            ("BODY_MEMORY_PEER_SHARE", "1.0"),
            ("CVSERVE_INJECT_DELAY_MS", "300"),
            ("MAX_BATCH_SIZE", "1"),
            // Two images in flight: the others wait for a slot, holding what they read.
            ("RING_SLOTS", "2"),
        ],
    );
    // One BYTES element: its length, then a JPEG padded with zeros to the window's end
    // (a decoder stops at the JPEG's end).
    let jpeg = fixture("samples/shapes/000000.jpg");
    let mut window = ((WINDOW - 4) as u32).to_le_bytes().to_vec();
    window.extend_from_slice(&jpeg);
    window.resize(WINDOW, 0);
    let file = ShmFile::new("budget", &window);
    drop(window);
    let r = register(&s, "big", &file.key(), WINDOW);
    assert_eq!(r.status, 200, "{:?}", r.body);
    let body = json!({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
        "parameters": {"shared_memory_region": "big", "shared_memory_byte_size": WINDOW}}]});
    // Warm: one request served, then the peak is measured from here.
    let r = s.post_json("/v2/models/shapes-det/infer", &body);
    assert_eq!(r.status, 200, "{:?}", r.body);
    std::fs::write(format!("/proc/{}/clear_refs", s.child.id()), "5").unwrap();
    let before = s.proc_kib("VmRSS:");
    let statuses: Vec<(u16, Option<String>)> = std::thread::scope(|scope| {
        let calls: Vec<_> = (0..24)
            .map(|_| {
                scope.spawn(|| {
                    let r = s.post_json("/v2/models/shapes-det/infer", &body);
                    (r.status, r.header("retry-after").map(str::to_owned))
                })
            })
            .collect();
        calls.into_iter().map(|c| c.join().unwrap()).collect()
    });
    let growth_mib = (s.proc_kib("VmHWM:").saturating_sub(before)) >> 10;
    let served = statuses.iter().filter(|(st, _)| *st == 200).count();
    let refused: Vec<_> = statuses.iter().filter(|(st, _)| *st == 429).collect();
    assert_eq!(served + refused.len(), 24, "{statuses:?}");
    assert!(served >= 1, "{statuses:?}");
    assert!(
        !refused.is_empty(),
        "none refused past the budget: {statuses:?}"
    );
    assert!(
        refused.iter().all(|(_, retry)| retry.is_some()),
        "{statuses:?}"
    );
    assert!(
        growth_mib < 64 + 96,
        "peak memory grew by {growth_mib} MiB for a 64 MiB budget"
    );
    assert_eq!(metric(&s, "cvserve_body_bytes_held"), 0.0);
}

/// A region must be a file of the server's own user: another user's 0600 file in /dev/shm,
/// which its owner never opened to anyone, is refused (403) and left as it was. The server
/// once wrote its predictions into such a file with its own rights. Needs root, to own a
/// file as another user: under `CI` (set, and not 0 or false) a machine without it fails
/// this test; elsewhere it says so and passes.
#[test]
fn another_users_file_is_never_a_region() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        common::not_run("making a file of another user needs root");
        return;
    }
    let s = Server::start("shapes-det/1", &[]);
    let content = b"the other user's secret, not predictions".repeat(64);
    let foreign = ShmFile::new("foreign", &content);
    std::os::unix::fs::chown(&foreign.0, Some(12345), Some(12345)).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&foreign.0, std::fs::Permissions::from_mode(0o600)).unwrap();
    let r = register(&s, "theirs", &foreign.key(), content.len());
    assert_eq!(r.status, 403, "{:?}", r.body);
    assert!(
        r.body["error"].as_str().unwrap_or("").contains("uid 12345"),
        "{:?}",
        r.body
    );
    // Not registered, so an inference cannot write into it.
    let infer = s.post_json(
        "/v2/models/shapes-det/infer",
        &json!({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
            "data": [common::b64("samples/shapes/000000.jpg")]}],
            "outputs": [{"name": "predictions", "parameters": {
                "shared_memory_region": "theirs", "shared_memory_byte_size": content.len()}}]}),
    );
    assert_eq!(infer.status, 404, "{:?}", infer.body);
    assert_eq!(std::fs::read(&foreign.0).unwrap(), content);
    assert_eq!(
        metric(&s, "cvserve_shm_refused_total{reason=\"foreign_owner\"}"),
        1.0
    );
    // The server's own user's file is a region.
    let own = ShmFile::new("own", &content);
    assert_eq!(register(&s, "ours", &own.key(), content.len()).status, 200);
}

/// Another cvserve's ring, through a hard link or a copy under any name, is refused as a
/// region: the second server once wrote predictions into the first one's ring.
#[test]
fn another_servers_ring_is_never_a_region() {
    let first = Server::start(
        "shapes-det/1",
        &[("RING_DIR", "/dev/shm"), ("RING_SLOTS", "2")],
    );
    let second = Server::start("shapes-det/1", &[]);
    let prefix = format!("cvserve-ring-{}-", first.child.id());
    let ring = std::fs::read_dir("/dev/shm")
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix))
        })
        .expect("the first server's ring in /dev/shm");
    let link =
        std::path::PathBuf::from(format!("/dev/shm/cvserve-test-link-{}", std::process::id()));
    let _ = std::fs::remove_file(&link);
    std::fs::hard_link(&ring, &link).unwrap();
    let link = ShmFile(link);
    let r = register(&second, "stolen", &link.key(), 4096);
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert!(
        r.body["error"]
            .as_str()
            .unwrap_or("")
            .contains("cvserve ring"),
        "{:?}",
        r.body
    );
    // A copy of its first page is known too.
    let mut page = vec![0u8; 4096];
    use std::os::unix::fs::FileExt;
    std::fs::File::open(&ring)
        .unwrap()
        .read_exact_at(&mut page, 0)
        .unwrap();
    let copy = ShmFile::new("copy", &page);
    assert_eq!(register(&second, "copied", &copy.key(), 4096).status, 400);
    assert_eq!(
        metric(&second, "cvserve_shm_refused_total{reason=\"ring\"}"),
        2.0
    );
    // An ordinary file of the same size registers.
    let plain = ShmFile::new("plain", &[7u8; 4096]);
    assert_eq!(register(&second, "plain", &plain.key(), 4096).status, 200);
}

/// Writes the HTTP/2 client preface and an empty SETTINGS frame on a new gRPC connection.
fn h2_connect(s: &Server) -> std::net::TcpStream {
    use std::io::Write;
    let mut c = std::net::TcpStream::connect(s.grpc.as_deref().unwrap()).unwrap();
    c.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
    c.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).unwrap();
    c
}

/// A PING frame (not an acknowledgement).
const PING: [u8; 17] = [0, 0, 8, 6, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];

/// Reads until the server closes the connection; false if it is still open after `limit`.
fn closed_by_server(c: &mut std::net::TcpStream, limit: Duration) -> bool {
    use std::io::Read;
    c.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let until = std::time::Instant::now() + limit;
    let mut buf = [0u8; 4096];
    while std::time::Instant::now() < until {
        match c.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return true,
        }
    }
    false
}

/// A client that floods control frames (PINGs here; SETTINGS and WINDOW_UPDATE count the
/// same) past their rate has its connection closed, counted; a connection that sends only
/// PINGs, however regularly, is idle and closed after GRPC_IDLE_TIMEOUT_S. A bystander's
/// call is answered meanwhile. The server once answered every PING of a flood and let
/// PINGs keep a connection open for ever.
#[test]
fn grpc_control_frame_floods_and_ping_only_connections_are_closed() {
    use std::io::Write;
    let grpc_port = free_port().to_string();
    let s = Server::start(
        "shapes-det/1",
        &[
            ("GRPC_PORT", grpc_port.as_str()),
            ("GRPC_IDLE_TIMEOUT_S", "2"),
        ],
    );
    // 5,000 PINGs at once: past the burst of 2,000.
    let mut flood = h2_connect(&s);
    let pings: Vec<u8> = PING
        .iter()
        .copied()
        .cycle()
        .take(PING.len() * 5000)
        .collect();
    let _ = flood.write_all(&pings);
    assert!(closed_by_server(&mut flood, Duration::from_secs(20)));
    assert_eq!(
        metric(&s, "cvserve_grpc_closed_total{reason=\"control_flood\"}"),
        1.0
    );
    // A PING every 200 ms (5 a second, far below the rate) and nothing else: idle.
    let mut pinger = h2_connect(&s);
    let started = std::time::Instant::now();
    let mut closed = false;
    while started.elapsed() < Duration::from_secs(20) {
        if pinger.write_all(&PING).is_err()
            || closed_by_server(&mut pinger, Duration::from_millis(200))
        {
            closed = true;
            break;
        }
    }
    assert!(closed, "a PING-only connection was kept open for 20 s");
    eventually(
        "the idle close to be counted",
        Duration::from_secs(10),
        || metric(&s, "cvserve_grpc_closed_total{reason=\"idle\"}") >= 1.0,
    );
    // A bystander is served.
    let addr = format!("http://{}", s.grpc.clone().unwrap());
    let image = fixture("samples/shapes/000000.jpg");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let answer = rt.block_on(async {
        let mut c = GrpcInferenceServiceClient::connect(addr)
            .await
            .expect("connect");
        c.model_infer(common::grpc_image_request("shapes-det", &image))
            .await
    });
    assert!(answer.is_ok(), "{answer:?}");
}
