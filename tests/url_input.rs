//! Images given by URL, when ALLOW_URL_INPUT enables them: fetched over http with size and
//! time limits; other schemes refused. A tiny local HTTP server plays the image host.

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
