//! Property tests of everything a client controls before inference: base64, the JSON body,
//! the legacy query string, and image decoding. Arbitrary bytes and structured-but-wrong
//! values must give an answer (Ok, or an error whose status is 4xx), never a panic; decoding
//! never claims more pixels than MAX_IMAGE_PIXELS allows.
//!
//! Tier: full (docs/tests.md).

use std::io::Cursor;
use std::sync::Arc;

use proptest::prelude::*;
use serde_json::{json, Value};

use cvserve::http::request::{legacy_params, ImageSource, InferRequest};
use cvserve::pipeline::decode::{base64_bytes, decode_into, DecodeOptions};
use cvserve::pipeline::ring::Ring;

const MAX_PIXELS: u64 = 1 << 20;

fn ring() -> Arc<Ring> {
    use std::sync::OnceLock;
    static RING: OnceLock<Arc<Ring>> = OnceLock::new();
    Arc::clone(RING.get_or_init(|| Ring::create(&std::env::temp_dir(), 4, 512 * 512 * 3).unwrap()))
}

fn opts() -> DecodeOptions {
    DecodeOptions {
        auto_orient: true,
        max_image_pixels: MAX_PIXELS,
        max_jpeg_scans: 100,
        max_decode_work: 2_000_000_000,
        needed: None,
        deadline: None,
    }
}

fn client_error(status: u16) -> bool {
    (400..500).contains(&status)
}

/// Every field of an inference request, each given a value of any JSON type.
fn wrong_values() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::from),
        Just(json!("best")),
        Just(json!(-1)),
        Just(json!(1e300)),
    ];
    let value = leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map(".{0,6}", inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    });
    let fields = [
        "model_id",
        "image",
        "confidence",
        "iou_threshold",
        "max_detections",
        "max_candidates",
        "class_filter",
        "class_agnostic_nms",
        "mask_decode_mode",
        "tradeoff_factor",
        "response_mask_format",
        "disable_preproc_auto_orient",
        "visualize_predictions",
        "id",
    ];
    prop::collection::vec((0..fields.len(), value), 0..8).prop_map(move |kvs| {
        let mut m = serde_json::Map::new();
        for (i, v) in kvs {
            m.insert(fields[i].to_string(), v);
        }
        Value::Object(m)
    })
}

/// A valid small PNG or JPEG, then damaged: bytes flipped, cut short, or header fields
/// (dimensions) overwritten.
fn damaged_image() -> impl Strategy<Value = Vec<u8>> {
    let base = prop_oneof![
        Just(image::ImageFormat::Png),
        Just(image::ImageFormat::Jpeg)
    ]
    .prop_map(|fmt| {
        let img =
            image::RgbImage::from_fn(24, 16, |x, y| image::Rgb([x as u8 * 9, y as u8 * 13, 77]));
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, fmt).unwrap();
        out.into_inner()
    });
    (
        base,
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        any::<prop::sample::Index>(),
        any::<bool>(),
    )
        .prop_map(|(mut data, flips, cut, truncate)| {
            let n = data.len();
            for (i, b) in flips {
                data[i.index(n)] = b;
            }
            if truncate {
                data.truncate(cut.index(n).max(1));
            }
            data
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn base64_of_any_text_is_bytes_or_a_clear_error(text in ".{0,200}") {
        let _ = base64_bytes(&text);
    }

    /// Arbitrary bytes never panic the parser (an answer either way).
    #[test]
    fn any_body_bytes_never_panic_the_parser(body in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = InferRequest::parse(&body);
    }

    /// A valid body (fields present or absent, one image or a list, compact or pretty, with a
    /// field cvserve does not read) parses to exactly what its client meant, Roboflow's
    /// defaults where a field is absent; the same body cut short anywhere, or followed by
    /// anything but whitespace, is a 422 saying the body is invalid. Numbers are k / 1024,
    /// exact through JSON text, so they compare with `==`.
    #[test]
    fn a_valid_body_means_what_it_says_and_a_broken_one_is_a_422(
        conf in prop::option::of(0u32..=1024),
        iou in prop::option::of(0u32..=1024),
        agnostic in prop::option::of(any::<bool>()),
        max_det in prop::option::of(1u32..10_000),
        list in any::<bool>(),
        n in 1usize..4,
        pretty in any::<bool>(),
        cut in any::<prop::sample::Index>(),
        junk in "[a-z0-9}\\]\\[,]{1,4}",
    ) {
        let images: Vec<Value> = (0..n)
            .map(|i| json!({"type": "base64", "value": format!("aW1n{i}")}))
            .collect();
        let image = if list { json!(images) } else { images[0].clone() };
        let mut body = json!({"model_id": "coco/1", "image": image, "disable_active_learning": true});
        if let Some(k) = conf { body["confidence"] = json!(f64::from(k) / 1024.0); }
        if let Some(k) = iou { body["iou_threshold"] = json!(f64::from(k) / 1024.0); }
        if let Some(a) = agnostic { body["class_agnostic_nms"] = json!(a); }
        if let Some(m) = max_det { body["max_detections"] = json!(m); }
        let text = if pretty {
            serde_json::to_vec_pretty(&body).unwrap()
        } else {
            serde_json::to_vec(&body).unwrap()
        };
        let mut r = InferRequest::parse(&text).expect("a valid body parses");
        prop_assert_eq!(r.model_id().unwrap(), "coco/1");
        let d = r.detection_params().unwrap();
        prop_assert_eq!(d.confidence, conf.map_or(0.4, |k| k as f32 / 1024.0));
        prop_assert_eq!(d.iou_threshold, iou.map_or(0.3, |k| k as f32 / 1024.0));
        prop_assert_eq!(d.class_agnostic_nms, agnostic.unwrap_or(false));
        prop_assert_eq!(d.max_detections, max_det.map_or(300, |m| m as usize));
        let (got, is_list) = r.take_images().unwrap();
        prop_assert_eq!(is_list, list);
        prop_assert_eq!(got.len(), if list { n } else { 1 });
        for (i, img) in got.iter().enumerate() {
            match img {
                ImageSource::Base64(v) => prop_assert_eq!(v, &format!("aW1n{i}")),
                _ => prop_assert!(false, "image {} is not base64", i),
            }
        }
        let broken = |bytes: &[u8]| match InferRequest::parse(bytes) {
            Ok(_) => Err(format!("accepted {:?}", String::from_utf8_lossy(bytes))),
            Err(e) if e.status.as_u16() == 422 && e.message.starts_with("Invalid request body") => Ok(()),
            Err(e) => Err(format!("{e:?}")),
        };
        let short = &text[..cut.index(text.len())];
        prop_assert_eq!(broken(short), Ok(()));
        let mut long = text.clone();
        long.extend_from_slice(junk.as_bytes());
        prop_assert_eq!(broken(&long), Ok(()));
    }

    #[test]
    fn wrong_values_in_every_field_are_a_4xx(body in wrong_values()) {
        let bytes = serde_json::to_vec(&body).unwrap();
        match InferRequest::parse(&bytes) {
            Err(e) => prop_assert!(client_error(e.status.as_u16()), "{e:?}"),
            Ok(mut r) => {
                for result in [
                    r.detection_params().map(drop),
                    r.segmentation_params().map(drop),
                    r.classification_params().map(drop),
                    r.model_id().map(drop),
                    r.take_images().map(drop),
                ] {
                    if let Err(e) = result {
                        prop_assert!(client_error(e.status.as_u16()), "{e:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn any_legacy_query_parses_or_is_a_4xx(query in "[a-z_=&%0-9.A-Z+-]{0,80}") {
        match legacy_params(&query) {
            Err(e) => prop_assert!(client_error(e.status.as_u16()), "{e:?}"),
            Ok((r, _)) => {
                if let Err(e) = r.detection_params() {
                    prop_assert!(client_error(e.status.as_u16()), "{e:?}");
                }
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(data in prop::collection::vec(any::<u8>(), 0..400)) {
        let Some(slot) = ring().try_acquire() else { return Ok(()); };
        if let Ok(img) = decode_into(&data, slot, &opts(), &|| false) {
            prop_assert!(u64::from(img.orig_width) * u64::from(img.orig_height) <= MAX_PIXELS);
        }
    }

    #[test]
    fn damaged_images_decode_or_fail_cleanly(data in damaged_image()) {
        let Some(slot) = ring().try_acquire() else { return Ok(()); };
        if let Ok(img) = decode_into(&data, slot, &opts(), &|| false) {
            prop_assert!(u64::from(img.orig_width) * u64::from(img.orig_height) <= MAX_PIXELS);
            prop_assert_eq!(img.pixels().len(), img.width as usize * img.height as usize * 3);
        }
    }
}
