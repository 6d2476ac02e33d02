//! Criterion benches of each CPU stage, on synthetic inputs built from the test photos:
//! JPEG decode (VGA, 720p, 1080p), resize/letterbox into the batch tensor, YOLO decode + NMS
//! (few and many candidates), mask decoding per mode, polygon tracing, RLE, JSON encoding.
//! `cargo bench --bench stages`; numbers are in docs/benchmarks.md.

use std::hint::black_box;
use std::io::Cursor;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use cvserve::geometry::{
    Contrast, Geometry, InputSpec, Normalization, ResizeMode, StaticCrop, Steps,
};
use cvserve::http::response::{ImageSize, InferResponse, ResolvedModel, TaskBody};
use cvserve::pipeline::decode::{decode_into, DecodeOptions, NeededSize};
use cvserve::pipeline::preprocess::preprocess_into;
use cvserve::pipeline::ring::Ring;
use cvserve::tasks::contours::outer_contour;
use cvserve::tasks::detection::{self, DetectionParams, YoloLayout};
use cvserve::tasks::rle;
use cvserve::tasks::segmentation::{box_mask, MaskDecodeMode};

fn photo(w: u32, h: u32) -> image::RgbImage {
    let src =
        image::load_from_memory(include_bytes!("../tests/fixtures/images/horses.jpg")).unwrap();
    src.resize_exact(w, h, image::imageops::FilterType::Triangle)
        .into_rgb8()
}

fn jpeg(img: &image::RgbImage) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
        .encode_image(img)
        .unwrap();
    out.into_inner()
}

const SIZES: [(&str, u32, u32); 3] = [
    ("vga", 640, 480),
    ("720p", 1280, 720),
    ("1080p", 1920, 1080),
];

fn bench_decode(c: &mut Criterion) {
    let ring = Ring::create(&std::env::temp_dir(), 1, 1920 * 1080 * 3).unwrap();
    let opts = DecodeOptions {
        auto_orient: true,
        max_image_pixels: 100_000_000,
        max_jpeg_scans: 100,
        max_decode_work: 2_000_000_000,
        needed: None,
        deadline: None,
    };
    let mut g = c.benchmark_group("decode_jpeg");
    for (name, w, h) in SIZES {
        let data = jpeg(&photo(w, h));
        g.throughput(Throughput::Elements(1));
        g.bench_function(name, |b| {
            b.iter(|| {
                let img = decode_into(
                    black_box(&data),
                    ring.try_acquire().unwrap(),
                    &opts,
                    &|| false,
                )
                .unwrap();
                black_box(img.width);
            })
        });
    }
    // The same 1080p frame for a 640x640 letterbox input, decoded at the DCT scale it needs.
    let data = jpeg(&photo(1920, 1080));
    let reduced = DecodeOptions {
        needed: Some(NeededSize {
            width: 640,
            height: 640,
            keep_aspect: true,
        }),
        ..opts
    };
    g.bench_function("1080p_reduced_scale_for_640", |b| {
        b.iter(|| {
            let img = decode_into(
                black_box(&data),
                ring.try_acquire().unwrap(),
                &reduced,
                &|| false,
            )
            .unwrap();
            black_box(img.width);
        })
    });
    g.finish();
}

fn bench_preprocess(c: &mut Criterion) {
    let mut g = c.benchmark_group("preprocess_into_tensor");
    for (name, w, h) in SIZES {
        let img = photo(w, h);
        for (mode, resize, size) in [
            ("letterbox640", ResizeMode::Letterbox { pad: 0 }, 640),
            ("stretch416", ResizeMode::Stretch, 416),
        ] {
            let spec = InputSpec {
                width: size,
                height: size,
                resize,
                normalization: Normalization::ZeroToOne,
            };
            let mut out = vec![0f32; spec.image_len()];
            g.bench_function(BenchmarkId::new(mode, name), |b| {
                b.iter(|| {
                    black_box(
                        preprocess_into(
                            img.as_raw(),
                            w,
                            h,
                            w,
                            h,
                            &Steps::default(),
                            &spec,
                            &mut out,
                        )
                        .unwrap(),
                    )
                })
            });
        }
        // environment.json's steps before the 416 stretch (coco-* variants).
        let spec = InputSpec {
            width: 416,
            height: 416,
            resize: ResizeMode::Stretch,
            normalization: Normalization::ZeroToOne,
        };
        let crop = StaticCrop {
            x_min: 20.0,
            y_min: 10.0,
            x_max: 85.0,
            y_max: 90.0,
        };
        let mut out = vec![0f32; spec.image_len()];
        for (step, steps) in [
            (
                "static_crop",
                Steps {
                    static_crop: Some(crop),
                    ..Steps::default()
                },
            ),
            (
                "grayscale",
                Steps {
                    grayscale: true,
                    ..Steps::default()
                },
            ),
            (
                "contrast_stretching",
                Steps {
                    contrast: Some(Contrast::Stretching),
                    ..Steps::default()
                },
            ),
            (
                "histogram_equalization",
                Steps {
                    contrast: Some(Contrast::HistogramEqualization),
                    ..Steps::default()
                },
            ),
            (
                "adaptive_equalization",
                Steps {
                    contrast: Some(Contrast::AdaptiveEqualization),
                    ..Steps::default()
                },
            ),
        ] {
            g.bench_function(BenchmarkId::new(format!("stretch416_{step}"), name), |b| {
                b.iter(|| {
                    black_box(
                        preprocess_into(img.as_raw(), w, h, w, h, &steps, &spec, &mut out).unwrap(),
                    )
                })
            });
        }
    }
    g.finish();
}

/// A v8 output `[4 + 80, 8400]` with `hits` anchors scoring above 0.5 in clusters.
fn yolo_output(hits: usize) -> Vec<f32> {
    let (nc, n) = (80, 8400);
    let mut out = vec![0.01f32; (4 + nc) * n];
    for i in 0..n {
        let (cx, cy) = ((i % 80) as f32 * 8.0, (i / 80) as f32 * 6.0);
        out[i] = cx;
        out[n + i] = cy;
        out[2 * n + i] = 40.0;
        out[3 * n + i] = 30.0;
    }
    for k in 0..hits {
        let i = (k * 7919) % n;
        out[(4 + k % nc) * n + i] = 0.5 + (k % 50) as f32 / 100.0;
    }
    out
}

fn bench_detection(c: &mut Criterion) {
    let spec = InputSpec {
        width: 640,
        height: 640,
        resize: ResizeMode::Letterbox { pad: 0 },
        normalization: Normalization::ZeroToOne,
    };
    let geo = Geometry::compute(1280, 720, 1280, 720, &spec);
    let names: Vec<String> = (0..80).map(|i| format!("class{i}")).collect();
    let params = DetectionParams::default();
    let mut g = c.benchmark_group("yolo_decode_nms");
    for hits in [10, 1000, 3000] {
        let out = yolo_output(hits);
        g.bench_function(
            BenchmarkId::from_parameter(format!("{hits}_candidates")),
            |b| {
                b.iter(|| {
                    black_box(detection::postprocess(
                        &out,
                        (84, 8400),
                        YoloLayout::V8,
                        &names,
                        &geo,
                        &params,
                    ))
                })
            },
        );
    }
    g.finish();
}

/// 32 prototypes of 160x160 where coefficient 0 draws a disc.
fn prototypes() -> (Vec<f32>, Vec<f32>) {
    let (nm, mh, mw) = (32, 160, 160);
    let mut protos = vec![0f32; nm * mh * mw];
    for k in 0..nm {
        for y in 0..mh {
            for x in 0..mw {
                let (dx, dy) = (x as f32 - 80.0, y as f32 - 80.0);
                protos[k * mh * mw + y * mw + x] = if k == 0 {
                    (20.0 - (dx * dx + dy * dy).sqrt()) / 4.0
                } else {
                    ((x * 31 + y * 17 + k * 7) % 13) as f32 / 100.0 - 0.06
                };
            }
        }
    }
    let mut coeffs = vec![0.05f32; nm];
    coeffs[0] = 1.0;
    (protos, coeffs)
}

fn bench_masks(c: &mut Criterion) {
    let (protos, coeffs) = prototypes();
    // A 120x120 network-pixel detection around the disc.
    let bx = (260.0, 260.0, 380.0, 380.0);
    let mut g = c.benchmark_group("mask_per_detection_120px_box");
    for (name, mode) in [
        ("fast", MaskDecodeMode::Fast),
        ("tradeoff_0.5", MaskDecodeMode::Tradeoff(0.5)),
        ("accurate", MaskDecodeMode::Accurate),
    ] {
        let grid = mode.grid((160, 160), (640, 640));
        g.bench_function(name, |b| {
            b.iter(|| {
                black_box(box_mask(
                    &coeffs,
                    &protos,
                    (32, 160, 160),
                    bx,
                    (640, 640),
                    grid,
                ))
            })
        });
    }
    g.finish();

    let mask = box_mask(&coeffs, &protos, (32, 160, 160), bx, (640, 640), (640, 640));
    c.bench_function("polygon_trace_120px_mask", |b| {
        b.iter(|| black_box(outer_contour(&mask)))
    });
    c.bench_function("rle_1280x720_mask", |b| {
        b.iter(|| {
            let mut runs = rle::RunBuilder::new();
            for x in 0..1280 {
                if (500..740).contains(&x) {
                    runs.push_many(false, 240);
                    runs.push_many(true, 240);
                    runs.push_many(false, 240);
                } else {
                    runs.push_many(false, 720);
                }
            }
            black_box(rle::encode_counts(&runs.finish()))
        })
    });
}

fn bench_json(c: &mut Criterion) {
    let preds: Vec<detection::ObjectDetectionPrediction> = (0..20)
        .map(|i| detection::ObjectDetectionPrediction {
            x: 100.5 + i as f32,
            y: 200.0,
            width: 50.0,
            height: 80.0,
            confidence: 0.87654,
            class_name: "person".into(),
            class_id: 0,
            detection_id: "0b1c9e3a-5f7d-4c1e-9a2b-3c4d5e6f7a8b".into(),
        })
        .collect();
    let response = InferResponse {
        inference_id: "0b1c9e3a-5f7d-4c1e-9a2b-3c4d5e6f7a8b".into(),
        time: 0.05,
        image: ImageSize {
            width: 1280,
            height: 720,
        },
        body: TaskBody::Detection { predictions: preds },
        visualization: None,
        resolved_model: ResolvedModel {
            model_id: "coco/1".into(),
        },
    };
    c.bench_function("json_response_20_detections", |b| {
        b.iter(|| black_box(serde_json::to_vec(&response).unwrap()))
    });
}

criterion_group! {
    name = stages;
    config = Criterion::default().sample_size(30).warm_up_time(std::time::Duration::from_millis(500)).measurement_time(std::time::Duration::from_secs(2));
    targets = bench_decode, bench_preprocess, bench_detection, bench_masks, bench_json
}
criterion_main!(stages);
