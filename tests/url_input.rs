//! Images given by URL, when ALLOW_URL_INPUT enables them: fetched over http with size and
//! time limits; other schemes refused. A tiny local HTTP server plays the image host.
//!
//! Tier: full (docs/tests.md).

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;

use common::{boxes, fixture, Server};
use serde_json::json;

/// Serves `body` with `status` to every connection, on a free port.
fn image_host(status: &'static str, body: Vec<u8>) -> String {
    serve_with(status, "Content-Type: image/jpeg", body)
}

/// Answers every request with a redirect to `to`.
fn redirector(to: &str) -> String {
    serve_with("302 Found", &format!("Location: {to}"), vec![])
}

fn serve_with(status: &'static str, header: &str, body: Vec<u8>) -> String {
    let header = header.to_owned();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let head = format!(
                "HTTP/1.1 {status}\r\n{header}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body);
        }
    });
    format!("http://{addr}")
}

fn detect_url(s: &Server, url: &str) -> common::Resp {
    s.post_json(
        "/infer/object_detection",
        &json!({"model_id": "coco/1", "image": {"type": "url", "value": url}}),
    )
}

#[test]
fn url_images_are_fetched_when_allowed_within_limits() {
    let host = image_host("200 OK", fixture("images/dog.jpg"));
    // The stand-in image host is on loopback, which is refused unless allow-listed.
    let s = Server::start(
        "coco/1",
        &[
            ("ALLOW_URL_INPUT", "true"),
            ("URL_MAX_BYTES", "200000"),
            ("URL_ALLOW_HOSTS", "127.0.0.1"),
        ],
    );
    let r = detect_url(&s, &format!("{host}/dog.jpg"));
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(boxes(&r.body["predictions"]).iter().any(|b| b.0 == "dog"));
    // The legacy route's ?image= too.
    let r = s.get(&format!("/coco/1?image={host}/dog.jpg"));
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(boxes(&r.body["predictions"]).iter().any(|b| b.0 == "dog"));

    let r = detect_url(&s, "file:///etc/passwd");
    assert_eq!(r.status, 400);
    assert!(r.body["message"].as_str().unwrap().contains("http"));
    let big = image_host("200 OK", fixture("images/kite.jpg")); // 1.4 MB > URL_MAX_BYTES
    let r = detect_url(&s, &format!("{big}/kite.jpg"));
    assert_eq!(r.status, 400);
    assert!(r.body["message"]
        .as_str()
        .unwrap()
        .contains("URL_MAX_BYTES"));
    let missing = image_host("404 Not Found", b"nope".to_vec());
    let r = detect_url(&s, &format!("{missing}/x.jpg"));
    assert_eq!(r.status, 400);
    assert!(r.body["message"].as_str().unwrap().contains("404"));
}

#[test]
fn url_images_are_refused_by_default() {
    let host = image_host("200 OK", fixture("images/dog.jpg"));
    let s = Server::start("coco/1", &[]);
    let r = detect_url(&s, &format!("{host}/dog.jpg"));
    assert_eq!(r.status, 400);
    assert!(r.body["message"]
        .as_str()
        .unwrap()
        .contains("ALLOW_URL_INPUT"));
}

/// Server-side request forgery: loopback, private and link-local (cloud metadata)
/// destinations are refused by default, whether named directly, by a host name resolving
/// to one, or reached through a redirect from an allowed host.
#[test]
fn url_images_from_private_addresses_are_refused_unless_allow_listed() {
    let host = image_host("200 OK", fixture("images/dog.jpg"));
    let port = host.rsplit(':').next().unwrap().to_owned();
    let s = Server::start("coco/1", &[("ALLOW_URL_INPUT", "true")]);
    for url in [
        format!("{host}/dog.jpg"),
        format!("http://localhost:{port}/dog.jpg"),
        format!("http://[::1]:{port}/dog.jpg"),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        "http://10.255.255.1/x.jpg".to_owned(),
    ] {
        let r = detect_url(&s, &url);
        assert_eq!(r.status, 400, "{url}: {:?}", r.body);
        let msg = r.body["message"].as_str().unwrap();
        assert!(msg.contains("URL_DENY_PRIVATE"), "{url}: {msg}");
    }

    // Allowed host 127.0.0.1 redirecting to a private address: refused at the redirect.
    let allowing = Server::start(
        "coco/1",
        &[
            ("ALLOW_URL_INPUT", "true"),
            ("URL_ALLOW_HOSTS", "127.0.0.1"),
        ],
    );
    let hop = redirector("http://10.255.255.1/x.jpg");
    let r = detect_url(&allowing, &format!("{hop}/start.jpg"));
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert!(
        r.body["message"].as_str().unwrap().contains("redirect"),
        "{:?}",
        r.body
    );
    // And an allowed redirect still works.
    let hop = redirector(&format!("{host}/dog.jpg"));
    let r = detect_url(&allowing, &format!("{hop}/start.jpg"));
    assert_eq!(r.status, 200, "{:?}", r.body);
}

/// An image host that answers each request after `delay` with `body`, each connection on its
/// own thread; counts the requests it got and the most it served at once.
struct SlowHost {
    url: String,
    requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    most_at_once: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

fn slow_host(delay: std::time::Duration, body: Vec<u8>) -> SlowHost {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::sync::Arc;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let requests = Arc::new(AtomicUsize::new(0));
    let most_at_once = Arc::new(AtomicUsize::new(0));
    let now = Arc::new(AtomicUsize::new(0));
    let (r, m) = (Arc::clone(&requests), Arc::clone(&most_at_once));
    let body = Arc::new(body);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let (r, m, now, body) = (
                Arc::clone(&r),
                Arc::clone(&m),
                Arc::clone(&now),
                Arc::clone(&body),
            );
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf);
                r.fetch_add(1, SeqCst);
                m.fetch_max(now.fetch_add(1, SeqCst) + 1, SeqCst);
                std::thread::sleep(delay);
                now.fetch_sub(1, SeqCst);
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes());
                // In 1 KiB pieces, as a slow link delivers them: the server sees the bytes
                // arrive a piece at a time, whatever this machine's loopback does.
                let _ = stream.set_nodelay(true);
                for piece in body.chunks(1024) {
                    if stream.write_all(piece).is_err() {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_micros(100));
                }
            });
        }
    });
    SlowHost {
        url,
        requests,
        most_at_once,
    }
}

fn url_list(host: &str, n: usize) -> serde_json::Value {
    let images: Vec<_> = (0..n)
        .map(|i| json!({"type": "url", "value": format!("{host}/{i}.jpg")}))
        .collect();
    json!({"model_id": "coco/1", "image": images})
}

fn url_server(extra: &[(&str, &str)]) -> Server {
    let mut env = vec![
        ("ALLOW_URL_INPUT", "true"),
        ("URL_ALLOW_HOSTS", "127.0.0.1"),
    ];
    env.extend_from_slice(extra);
    Server::start("coco/1", &env)
}

/// Hardening II, URL row: a list of more images than the server takes in one request
/// (RING_SLOTS) is refused with 413 before a single URL is fetched (it fetched them all,
/// 100 x 19 MB, before refusing).
#[test]
fn a_url_list_longer_than_a_request_may_hold_is_refused_before_any_fetch() {
    let host = slow_host(std::time::Duration::ZERO, fixture("images/dog.jpg"));
    let s = url_server(&[]);
    let r = s.post_json("/infer/object_detection", &url_list(&host.url, 100));
    assert_eq!(r.status, 413, "{:?}", r.body);
    assert!(r.body["message"].as_str().unwrap().contains("RING_SLOTS"));
    let fetched = host.requests.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(fetched, 0, "URLs fetched before the refusal");
}

/// Hardening II, URL row: slow URLs are fetched a few at a time (4), all within the
/// request's deadline (here `X-Request-Timeout-Ms`): 8 URLs of 4 s each against a 2.5 s
/// deadline get the 504 naming the fetch (they were fetched one after another, 32 s).
#[test]
fn slow_urls_are_fetched_a_few_at_a_time_within_the_request_deadline() {
    let host = slow_host(std::time::Duration::from_secs(4), fixture("images/dog.jpg"));
    let s = url_server(&[]);
    let r = s.post_json_with_headers(
        "/infer/object_detection",
        &url_list(&host.url, 8),
        &[("X-Request-Timeout-Ms", "2500")],
    );
    assert_eq!(r.status, 504, "{:?}", r.body);
    assert!(
        r.body["message"].as_str().unwrap().contains("fetching"),
        "{:?}",
        r.body
    );
    let at_once = host.most_at_once.load(std::sync::atomic::Ordering::SeqCst);
    assert!((1..=4).contains(&at_once), "{at_once} fetches at once");
    // Fast URLs in a list are all fetched and answered, in order.
    let fast = slow_host(std::time::Duration::ZERO, fixture("images/dog.jpg"));
    let r = s.post_json("/infer/object_detection", &url_list(&fast.url, 6));
    assert_eq!(r.status, 200, "{:?}", r.body);
    let answers = r.body.as_array().expect("one answer per image");
    assert_eq!(answers.len(), 6);
    assert!(answers
        .iter()
        .all(|a| boxes(&a["predictions"]).iter().any(|b| b.0 == "dog")));
}

/// Hardening II, URL row: fetched bytes count against the body budget like a body's
/// (MAX_BODY_MEMORY_BYTES, one client's share of it): images larger than the client's share
/// are refused with 413 (a retry could never pass), a small one still served. The image
/// arrives 1 KiB at a time, so the share runs out with the fetched bytes exactly at it and
/// the request's JSON body on top: still 413, not 429 (the request's own body counts).
#[test]
fn fetched_url_bytes_count_against_the_body_budget() {
    let s = url_server(&[
        ("MAX_BODY_MEMORY_BYTES", "1048576"),
        ("MAX_BODY_BYTES", "65536"),
    ]);
    let big = slow_host(std::time::Duration::ZERO, fixture("images/kite.jpg")); // 1.4 MB
    let r = detect_url(&s, &format!("{}/kite.jpg", big.url));
    assert_eq!(r.status, 413, "{:?}", r.body);
    assert!(r.body["message"]
        .as_str()
        .unwrap()
        .contains("BODY_MEMORY_PEER_SHARE"));
    let small = slow_host(std::time::Duration::ZERO, fixture("images/dog.jpg")); // 160 KB
    let r = detect_url(&s, &format!("{}/dog.jpg", small.url));
    assert_eq!(r.status, 200, "{:?}", r.body);
    // Nothing stays counted once answered.
    let held = s
        .get("/metrics")
        .body
        .as_str()
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("cvserve_request_body_bytes ")
                .map(|v| v.parse::<f64>().unwrap())
        });
    assert_eq!(held, Some(0.0));
}
