//! Test harness: starts the real `cvserve` binary on a free loopback port with the bundled
//! models and talks HTTP to it. Each test gets its own server (killed on drop).

#![allow(dead_code)]

pub mod workflows;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::Value;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(rel: &str) -> Vec<u8> {
    std::fs::read(repo().join("tests/fixtures").join(rel))
        .unwrap_or_else(|e| panic!("fixture {rel}: {e}"))
}

pub fn b64(rel: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(fixture(rel))
}

pub fn golden(rel: &str) -> Value {
    serde_json::from_slice(&fixture(&format!("golden/{rel}"))).unwrap()
}

/// The back end the test servers run on, as `/info` and the metrics name it.
pub fn backend_name() -> &'static str {
    match std::env::var("CVSERVE_TEST_BACKEND").as_deref() {
        Ok("tract") => "tract",
        _ => "onnxruntime",
    }
}

pub fn ort_dylib() -> String {
    std::env::var("ORT_DYLIB_PATH").unwrap_or_else(|_| {
        repo()
            .join("vendor/onnxruntime/libonnxruntime.so.1.31.1")
            .to_string_lossy()
            .into_owned()
    })
}

/// An answer: status, headers, body parsed as JSON (or `Value::String` when not JSON).
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Value,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub struct Server {
    pub child: Child,
    pub base: String,
    /// The gRPC address (host:port) when GRPC_PORT was given.
    pub grpc: Option<String>,
    pub log: PathBuf,
    agent: ureq::Agent,
}

impl Server {
    /// Starts a server preloading `models` (comma list, or "all"), with extra env vars, and
    /// waits until it is ready.
    pub fn start(models: &str, env: &[(&str, &str)]) -> Server {
        let server = Self::spawn(models, env);
        server.wait_ready(Duration::from_secs(120));
        server
    }

    /// Starts a server whose preloaded models may fail to load, and waits until their
    /// loading has been tried: ready, or not ready because they failed.
    pub fn start_settled(models: &str, env: &[(&str, &str)]) -> Server {
        let server = Self::spawn(models, env);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(120) {
            let r = server.get("/readiness");
            if r.status == 200 || r.body["reason"] == "preloaded models failed to load" {
                return server;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("preloading did not end:\n{}", server.logs());
    }

    /// Starts a server and returns as soon as it listens (before it is ready).
    pub fn spawn(models: &str, env: &[(&str, &str)]) -> Server {
        let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "cvserve-{}-{}.log",
            std::process::id(),
            uuid_like()
        ));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cvserve"));
        cmd.arg("serve")
            .env("HOST", "127.0.0.1")
            .env("PORT", "0")
            // No gRPC unless a test asks (GRPC_PORT has no ephemeral form: 0 is off).
            .env("GRPC_PORT", "0")
            .env("MODEL_CACHE_DIR", repo().join("models"))
            .env("ORT_DYLIB_PATH", ort_dylib())
            .env("PRELOAD_MODELS", models)
            .env("RING_DIR", std::env::temp_dir())
            .env("LOG_LEVEL", "info")
            // CVSERVE_TEST_BACKEND=tract runs a test binary's servers on tract (test.sh runs
            // the golden comparisons so); unset: BACKEND=auto (ONNX Runtime here).
            .env(
                "BACKEND",
                std::env::var("CVSERVE_TEST_BACKEND").unwrap_or("auto".into()),
            )
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn cvserve");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let mut grpc = None;
        let base = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(addr) = line.strip_prefix("cvserve grpc listening on ") {
                        grpc = Some(addr.trim().to_string());
                    }
                    if let Some(addr) = line.strip_prefix("cvserve listening on ") {
                        break addr.trim().to_string();
                    }
                }
                _ => panic!(
                    "server exited before listening:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                ),
            }
        };
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .into();
        Server {
            child,
            base,
            grpc,
            log,
            agent,
        }
    }

    pub fn wait_ready(&self, limit: Duration) {
        let t = Instant::now();
        while t.elapsed() < limit {
            if self.get("/readiness").status == 200 {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("server not ready in {limit:?}:\n{}", self.logs());
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    fn finish(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Resp {
        let mut r = r.expect("HTTP request failed at the transport level");
        let status = r.status().as_u16();
        let headers = r
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        let text = r.body_mut().read_to_string().unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Resp {
            status,
            headers,
            body,
        }
    }

    pub fn get(&self, path: &str) -> Resp {
        Self::finish(self.agent.get(self.url(path)).call())
    }

    pub fn post_json(&self, path: &str, body: &Value) -> Resp {
        Self::finish(
            self.agent
                .post(self.url(path))
                .header("Content-Type", "application/json")
                .send(serde_json::to_vec(body).unwrap()),
        )
    }

    pub fn post_json_with_headers(
        &self,
        path: &str,
        body: &Value,
        headers: &[(&str, &str)],
    ) -> Resp {
        let mut req = self
            .agent
            .post(self.url(path))
            .header("Content-Type", "application/json");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        Self::finish(req.send(serde_json::to_vec(body).unwrap()))
    }

    pub fn post_raw(&self, path: &str, content_type: Option<&str>, body: &[u8]) -> Resp {
        let mut req = self.agent.post(self.url(path));
        if let Some(ct) = content_type {
            req = req.header("Content-Type", ct);
        }
        Self::finish(req.send(body))
    }

    /// Multipart upload with one part named `name`.
    pub fn post_multipart(&self, path: &str, name: &str, data: &[u8]) -> Resp {
        let boundary = "cvserve-test-boundary-7d1f";
        let mut body = Vec::new();
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"img.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(data);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        self.post_raw(
            path,
            Some(&format!("multipart/form-data; boundary={boundary}")),
            &body,
        )
    }

    /// `/infer/object_detection` with one fixture image and extra fields.
    pub fn detect(&self, model: &str, image: &str, extra: Value) -> Resp {
        let mut body = serde_json::json!({
            "model_id": model,
            "image": {"type": "base64", "value": b64(image)},
        });
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        self.post_json("/infer/object_detection", &body)
    }

    /// Writes `head` (request line and headers) and `body` on a raw socket and returns the
    /// response's status line. For requests a well-behaved client library refuses to send.
    pub fn raw(&self, head: &str, body: &[u8]) -> String {
        use std::io::{Read, Write};
        let addr = self.base.trim_start_matches("http://");
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        stream.write_all(head.as_bytes()).unwrap();
        let _ = stream.write_all(body);
        let mut buf = [0u8; 4096];
        let n = stream.read(&mut buf).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Sends a signal to the server process.
    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }
}

impl Drop for Server {
    /// Stops the server; when the test is failing (unwinding from a failed assertion), its
    /// log goes to the test's output with the failure, the last 200 lines of it.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            use std::io::Write;
            let log = std::fs::read(&self.log).unwrap_or_default();
            let log = String::from_utf8_lossy(&log);
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(200)..];
            // Never a second panic while unwinding (that would abort): write errors are ignored.
            let _ = writeln!(
                std::io::stderr(),
                "---- the log of the server at {} ({}, last {} of {} lines) ----\n{}\n---- end of the server's log ----",
                self.base,
                self.log.display(),
                tail.len(),
                lines.len(),
                tail.join("\n")
            );
        }
    }
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("{}", N.fetch_add(1, Ordering::Relaxed))
}

/// A detection as (class, x1, y1, x2, y2, confidence).
pub fn boxes(predictions: &Value) -> Vec<(String, f64, f64, f64, f64, f64)> {
    predictions
        .as_array()
        .expect("predictions array")
        .iter()
        .map(|p| {
            let (x, y, w, h) = (
                p["x"].as_f64().unwrap(),
                p["y"].as_f64().unwrap(),
                p["width"].as_f64().unwrap(),
                p["height"].as_f64().unwrap(),
            );
            (
                p["class"].as_str().unwrap().to_string(),
                x - w / 2.0,
                y - h / 2.0,
                x + w / 2.0,
                y + h / 2.0,
                p["confidence"].as_f64().unwrap(),
            )
        })
        .collect()
}

pub fn iou(a: &(String, f64, f64, f64, f64, f64), b: &(String, f64, f64, f64, f64, f64)) -> f64 {
    let w = (a.3.min(b.3) - a.1.max(b.1)).max(0.0);
    let h = (a.4.min(b.4) - a.2.max(b.2)).max(0.0);
    let inter = w * h;
    let union = (a.3 - a.1) * (a.4 - a.2) + (b.3 - b.1) * (b.4 - b.2) - inter;
    if union <= 0.0 {
        0.0
    } else {
        inter / union
    }
}

/// The photos with Roboflow's answers in `tests/fixtures/golden/<model>-1/`.
pub const COCO_PHOTOS: [&str; 9] = [
    "astronaut",
    "chelsea",
    "coffee",
    "dog",
    "eagle",
    "giraffe",
    "horses",
    "kite",
    "person",
];

type Box = (String, f64, f64, f64, f64, f64);

/// Compares our predictions with golden ones: each golden box scoring clearly above the
/// threshold (by 0.03) has a box of ours of its class with IoU >= `min_iou` and confidence
/// within `conf_tol`; each box of ours scoring clearly above it has such a golden box, or
/// overlaps a golden box of its class (the reference's NMS suppresses overlaps harder:
/// intersection over the other box's area).
///
/// One exception, counted and returned for the caller to bound: an argmax tie between two
/// classes of one anchor (scores within 0.002, so a JPEG decoder's last bit flips it). It
/// shows as a golden box whose class ours gives to a stronger same-place box (IoU >=
/// `min_iou`), or as two golden boxes of different classes at one place within `conf_tol` of
/// which ours keeps one.
pub fn match_golden(
    ours: &Value,
    golden: &Value,
    threshold: f64,
    min_iou: f64,
    conf_tol: f64,
    what: &str,
) -> usize {
    let ours = boxes(ours);
    let gold = boxes(golden);
    let close =
        |a: &Box, b: &Box| a.0 == b.0 && iou(a, b) >= min_iou && (a.5 - b.5).abs() <= conf_tol;
    let mut ties = 0;
    for g in gold.iter().filter(|g| g.5 >= threshold + 0.03) {
        if ours.iter().any(|o| close(o, g)) {
            continue;
        }
        let stronger_same_place = ours
            .iter()
            .any(|o| o.0 == g.0 && iou(o, g) >= min_iou && o.5 > g.5);
        let twin_kept = gold.iter().any(|t| {
            t.0 != g.0
                && iou(t, g) >= min_iou
                && (t.5 - g.5).abs() <= conf_tol
                && ours.iter().any(|o| close(o, t))
        });
        assert!(
            stronger_same_place || twin_kept,
            "{what}: golden {g:?} has no match in {ours:?}"
        );
        ties += 1;
    }
    for o in ours.iter().filter(|o| o.5 >= threshold + 0.03) {
        let matched = gold.iter().any(|g| close(o, g));
        let overlapped = gold.iter().any(|g| g.0 == o.0 && iou(o, g) > 0.0);
        assert!(
            matched || overlapped,
            "{what}: our {o:?} is not in golden {gold:?}"
        );
    }
    ties
}

/// The tolerance of the first golden tests: IoU >= 0.85, confidence within 0.03, no ties.
pub fn assert_matches_golden(ours: &Value, golden: &Value, threshold: f64, what: &str) {
    let ties = match_golden(ours, golden, threshold, 0.85, 0.03, what);
    assert_eq!(
        ties, 0,
        "{what}: a golden box is only matched by a class tie"
    );
}

/// Runs a Python check script of `tests/` with the interpreter of a venv made by
/// `scripts/setup.sh --sdk`, and returns whether it succeeded and what it printed.
pub fn python_check(python: &str, script: &str, args: &[&std::ffi::OsStr]) -> (bool, String) {
    let out = Command::new(python)
        .arg(repo().join("tests").join(script))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{python}: {e} (scripts/setup.sh --sdk installs it)"));
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), report)
}

/// A binary mask, row-major.
pub struct Mask {
    pub w: usize,
    pub h: usize,
    pub bits: Vec<bool>,
}

impl Mask {
    /// From COCO column-major run lengths.
    pub fn from_runs(h: usize, w: usize, counts: &[u32]) -> Mask {
        let mut bits = vec![false; w * h];
        let (mut i, mut value) = (0usize, false);
        for &c in counts {
            for k in i..i + c as usize {
                let (x, y) = (k / h, k % h);
                bits[y * w + x] = value;
            }
            i += c as usize;
            value = !value;
        }
        assert_eq!(i, w * h, "runs must cover the image");
        Mask { w, h, bits }
    }

    /// Pixels whose centre is inside the polygon or within half a pixel of its outline.
    pub fn from_polygon(w: usize, h: usize, pts: &[(f64, f64)]) -> Mask {
        let mut bits = vec![false; w * h];
        let n = pts.len();
        if n == 0 {
            return Mask { w, h, bits };
        }
        // Only pixels within half a pixel of the polygon's bounds can be inside or near it.
        let span = |f: fn(&(f64, f64)) -> f64, len: usize| {
            let lo = pts.iter().map(f).fold(f64::INFINITY, f64::min) - 0.5;
            let hi = pts.iter().map(f).fold(f64::NEG_INFINITY, f64::max) + 0.5;
            (lo.ceil().max(0.0) as usize)..((hi.floor() + 1.0).clamp(0.0, len as f64) as usize)
        };
        let (xs, ys) = (span(|p| p.0, w), span(|p| p.1, h));
        for y in ys {
            for x in xs.clone() {
                let (px, py) = (x as f64, y as f64);
                let mut inside = false;
                let mut near = false;
                for i in 0..n {
                    let (a, b) = (pts[i], pts[(i + 1) % n]);
                    if (a.1 > py) != (b.1 > py) && px < (b.0 - a.0) * (py - a.1) / (b.1 - a.1) + a.0
                    {
                        inside = !inside;
                    }
                    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
                    let len2 = dx * dx + dy * dy;
                    let t = if len2 == 0.0 {
                        0.0
                    } else {
                        (((px - a.0) * dx + (py - a.1) * dy) / len2).clamp(0.0, 1.0)
                    };
                    let (cx, cy) = (a.0 + t * dx - px, a.1 + t * dy - py);
                    near |= cx * cx + cy * cy <= 0.25;
                }
                bits[y * w + x] = inside || near;
            }
        }
        Mask { w, h, bits }
    }

    pub fn iou(&self, o: &Mask) -> f64 {
        assert_eq!((self.w, self.h), (o.w, o.h));
        let inter = self
            .bits
            .iter()
            .zip(&o.bits)
            .filter(|(a, b)| **a && **b)
            .count();
        let union = self
            .bits
            .iter()
            .zip(&o.bits)
            .filter(|(a, b)| **a || **b)
            .count();
        inter as f64 / union.max(1) as f64
    }
}

/// IoU of two x1, y1, x2, y2 boxes.
pub fn bbox_iou(a: [f64; 4], b: [f64; 4]) -> f64 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let i = w * h;
    i / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - i)
}

/// A prediction's box as x1, y1, x2, y2.
pub fn pred_box(p: &Value) -> [f64; 4] {
    let (x, y, w, h) = (
        p["x"].as_f64().unwrap(),
        p["y"].as_f64().unwrap(),
        p["width"].as_f64().unwrap(),
        p["height"].as_f64().unwrap(),
    );
    [x - w / 2.0, y - h / 2.0, x + w / 2.0, y + h / 2.0]
}

/// A prediction's polygon (`points`) as (x, y) pairs.
pub fn polygon_points(p: &Value) -> Vec<(f64, f64)> {
    p["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| (q["x"].as_f64().unwrap(), q["y"].as_f64().unwrap()))
        .collect()
}

/// The value of the metric lines of `s` that start with `prefix` (name and labels), summed;
/// 0 when there is none.
pub fn metric(s: &Server, prefix: &str) -> f64 {
    let text = s.get("/metrics").body;
    text.as_str()
        .expect("metrics are text")
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until `cond` holds, looking every 20 ms; fails the test after `limit`. Tests wait on
/// the server's own state this way, never on a sleep of a guessed length.
pub fn eventually(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while t.elapsed() < limit {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out after {limit:?} waiting for {what}");
}

impl Server {
    /// A field of the server's /proc/PID/status in KiB (`"VmRSS:"`: now, `"VmHWM:"`: the
    /// peak, `"RssAnon:"`: anonymous memory now).
    pub fn proc_kib(&self, field: &str) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap()
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/PID/status"))
    }
}

/// A port free now (GRPC_PORT has no ephemeral form).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A gRPC ModelInfer request of one encoded image (a BYTES element in `raw_input_contents`:
/// its 4-byte little-endian length, then the file) for `model_name`'s latest version.
pub fn grpc_image_request(
    model_name: &str,
    image: &[u8],
) -> cvserve::http::v2::grpc::pb::ModelInferRequest {
    use cvserve::http::v2::grpc::pb;
    let mut element = (image.len() as u32).to_le_bytes().to_vec();
    element.extend_from_slice(image);
    pb::ModelInferRequest {
        model_name: model_name.into(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: "image".into(),
            datatype: "BYTES".into(),
            shape: vec![1],
            ..Default::default()
        }],
        raw_input_contents: vec![element.into()],
        ..Default::default()
    }
}

/// A test that this machine cannot run (`why`) passes saying so, except under `CI` (set,
/// and not 0 or false), where it fails: CI must run every test.
pub fn not_run(why: &str) {
    let ci = std::env::var("CI").unwrap_or_default();
    assert!(
        matches!(ci.as_str(), "" | "0" | "false"),
        "cannot run under CI={ci}: {why}"
    );
    eprintln!("not run: {why}");
}
