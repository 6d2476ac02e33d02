//! Decoding every format into a slot, its bounds and its errors.

use std::io::Cursor;

use super::*;
use crate::pipeline::ring::Ring;
use std::sync::Arc;

const OPTS: DecodeOptions = DecodeOptions {
    auto_orient: true,
    max_image_pixels: 100_000_000,
    max_jpeg_scans: 100,
    max_decode_work: 2_000_000_000,
    needed: None,
    deadline: None,
};

/// Every EXIF orientation, the identity first.
const ORIENTATIONS: [Orientation; 8] = [
    Orientation::NoTransforms,
    Orientation::Rotate90,
    Orientation::Rotate180,
    Orientation::Rotate270,
    Orientation::FlipHorizontal,
    Orientation::FlipVertical,
    Orientation::Rotate90FlipH,
    Orientation::Rotate270FlipH,
];

fn ring(pixels: usize) -> Arc<Ring> {
    Ring::create(&std::env::temp_dir(), 2, pixels * 3).unwrap()
}

fn gradient(w: u32, h: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 5) as u8, 128]))
}

fn encode(img: &image::RgbImage, fmt: image::ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, fmt).unwrap();
    out.into_inner()
}

/// The largest difference between two images' samples (over the shorter one).
fn max_diff(a: &[u8], b: &[u8]) -> i32 {
    a.iter()
        .zip(b)
        .map(|(a, b)| (*a as i32 - *b as i32).abs())
        .max()
        .unwrap_or(0)
}

/// `img` encoded as `fmt`, decoded with `opts` into a slot of `slot_pixels`.
fn in_slot(
    img: &image::RgbImage,
    fmt: image::ImageFormat,
    slot_pixels: usize,
    opts: &DecodeOptions,
) -> Result<DecodedImage, DecodeError> {
    let ring = ring(slot_pixels);
    decode_into(
        &encode(img, fmt),
        ring.try_acquire().unwrap(),
        opts,
        &|| false,
    )
}

/// `img` as PNG, decoded into a slot of `slot_pixels`.
fn png_in_slot(img: &image::RgbImage, slot_pixels: usize) -> DecodedImage {
    in_slot(img, image::ImageFormat::Png, slot_pixels, &OPTS).unwrap()
}

#[test]
fn png_decodes_exactly() {
    let img = gradient(37, 21);
    let d = png_in_slot(&img, 4096);
    assert_eq!(
        (d.width, d.height, d.orig_width, d.orig_height),
        (37, 21, 37, 21)
    );
    assert_eq!(d.pixels(), img.as_raw().as_slice());
}

#[test]
fn sixteen_bit_rgba_and_grey_pngs_decode_to_their_8_bit_rgb() {
    let img = gradient(33, 17);
    let rgba16 = image::DynamicImage::ImageRgb8(img.clone()).into_rgba16();
    let grey = image::DynamicImage::ImageRgb8(img.clone()).into_luma8();
    let ring = ring(4096);
    let decode_png = |d: image::DynamicImage| {
        let mut out = Cursor::new(Vec::new());
        d.write_to(&mut out, image::ImageFormat::Png).unwrap();
        decode_into(
            &out.into_inner(),
            ring.try_acquire().unwrap(),
            &OPTS,
            &|| false,
        )
        .unwrap()
    };
    let d = decode_png(image::DynamicImage::ImageRgba16(rgba16));
    assert_eq!(d.pixels(), img.as_raw().as_slice());
    let d = decode_png(image::DynamicImage::ImageLuma8(grey.clone()));
    let expected: Vec<u8> = grey.as_raw().iter().flat_map(|&v| [v; 3]).collect();
    assert_eq!(d.pixels(), expected.as_slice());
}

#[test]
fn png_larger_than_a_slot_is_box_shrunk_in_the_slot() {
    // 40x20 of 2x2 blocks of one colour each, in a slot of 300 pixels: halved exactly.
    let img = image::RgbImage::from_fn(40, 20, |x, y| {
        image::Rgb([(x / 2 * 10) as u8, (y / 2 * 20) as u8, 7])
    });
    let d = png_in_slot(&img, 300);
    assert_eq!(
        (d.width, d.height, d.orig_width, d.orig_height),
        (20, 10, 40, 20)
    );
    let half = image::RgbImage::from_fn(20, 10, |x, y| {
        image::Rgb([(x * 10) as u8, (y * 20) as u8, 7])
    });
    assert_eq!(d.pixels(), half.as_raw().as_slice());
}

#[test]
fn png_decoding_stops_at_the_deadline() {
    let img = gradient(64, 200);
    let opts = DecodeOptions {
        deadline: Some(Instant::now()),
        ..OPTS
    };
    let e = in_slot(&img, image::ImageFormat::Png, 64 * 200, &opts).unwrap_err();
    assert_eq!(e, DecodeError::DeadlineExceeded);
}

#[test]
fn jpeg_decodes_close_to_the_original() {
    let img = gradient(64, 48);
    let d = in_slot(&img, image::ImageFormat::Jpeg, 4096, &OPTS).unwrap();
    assert_eq!((d.width, d.height), (64, 48));
    let max_diff = max_diff(d.pixels(), img.as_raw());
    assert!(max_diff < 40, "max diff {max_diff}");
}

#[test]
fn oversized_jpeg_is_decoded_at_a_reduced_scale_keeping_the_original_size() {
    let img = gradient(200, 100);
    // The slot holds exactly a half-scale decode.
    let d = in_slot(&img, image::ImageFormat::Jpeg, 100 * 50, &OPTS).unwrap();
    assert_eq!((d.width, d.height), (100, 50));
    assert_eq!((d.orig_width, d.orig_height), (200, 100));
}

#[test]
fn a_large_jpeg_is_decoded_only_as_large_as_the_network_needs() {
    let img = gradient(800, 400);
    let data = encode(&img, image::ImageFormat::Jpeg);
    let ring = ring(800 * 400);
    let decode = |needed| {
        let opts = DecodeOptions { needed, ..OPTS };
        let d = decode_into(&data, ring.try_acquire().unwrap(), &opts, &|| false).unwrap();
        assert_eq!((d.orig_width, d.orig_height), (800, 400));
        (d.width, d.height)
    };
    let stretch = |width, height| {
        Some(NeededSize {
            width,
            height,
            keep_aspect: false,
        })
    };
    let letterbox = |width, height| {
        Some(NeededSize {
            width,
            height,
            keep_aspect: true,
        })
    };
    assert_eq!(decode(None), (800, 400));
    assert_eq!(decode(stretch(100, 50)), (100, 50));
    assert_eq!(decode(stretch(100, 51)), (200, 100));
    assert_eq!(decode(stretch(224, 200)), (400, 200));
    assert_eq!(
        decode(stretch(224, 224)),
        (800, 400),
        "1/2 would be 200 rows < 224"
    );
    // Letterbox into 160x160: content is 160x80, so 1/4 (200x100) is enough.
    assert_eq!(decode(letterbox(160, 160)), (200, 100));
    assert_eq!(
        decode(stretch(1000, 1000)),
        (800, 400),
        "never more than the original"
    );
}

#[test]
fn oversized_png_is_shrunk_into_the_slot() {
    let img = gradient(200, 100);
    let d = png_in_slot(&img, 5000);
    assert!(d.width as usize * d.height as usize <= 5000);
    assert_eq!((d.orig_width, d.orig_height), (200, 100));
    assert!((d.width as f64 / d.height as f64 - 2.0).abs() < 0.05);
}

#[test]
fn bad_inputs_are_client_errors_and_free_the_slot() {
    let ring = ring(4096);
    assert_eq!(
        decode_into(b"", ring.try_acquire().unwrap(), &OPTS, &|| false).unwrap_err(),
        DecodeError::Empty
    );
    assert!(matches!(
        decode_into(b"hello world", ring.try_acquire().unwrap(), &OPTS, &|| {
            false
        })
        .unwrap_err(),
        DecodeError::Undecodable(_)
    ));
    let mut truncated = encode(&gradient(64, 48), image::ImageFormat::Jpeg);
    truncated.truncate(40);
    assert!(decode_into(&truncated, ring.try_acquire().unwrap(), &OPTS, &|| false).is_err());
    assert_eq!(ring.in_use(), 0);
}

/// An image whose header claims `side x side` pixels, in a format without checksums.
pub(crate) fn fake_header(fmt: image::ImageFormat, side: u32) -> Vec<u8> {
    let mut data = encode(&gradient(8, 8), fmt);
    match fmt {
        image::ImageFormat::Bmp => {
            data[18..22].copy_from_slice(&(side as i32).to_le_bytes());
            data[22..26].copy_from_slice(&(side as i32).to_le_bytes());
        }
        image::ImageFormat::Jpeg => {
            let sof = data.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
            data[sof + 5..sof + 7].copy_from_slice(&(side as u16).to_be_bytes());
            data[sof + 7..sof + 9].copy_from_slice(&(side as u16).to_be_bytes());
        }
        _ => unreachable!(),
    }
    data
}

#[test]
fn absurd_header_dimensions_are_refused_before_decoding() {
    let ring = ring(16);
    for fmt in [image::ImageFormat::Bmp, image::ImageFormat::Jpeg] {
        for side in [50000, 60000] {
            let err = decode_into(
                &fake_header(fmt, side),
                ring.try_acquire().unwrap(),
                &OPTS,
                &|| false,
            )
            .unwrap_err();
            assert!(
                matches!(err, DecodeError::TooManyPixels { .. }),
                "{fmt:?} {side}: {err:?}"
            );
        }
    }
    assert_eq!(ring.in_use(), 0);
}

#[test]
fn orientation_matches_the_image_crate_for_all_eight_cases() {
    let img = gradient(5, 3);
    for o in ORIENTATIONS {
        let mut expected = image::DynamicImage::ImageRgb8(img.clone());
        expected.apply_orientation(o);
        let mut out = vec![0u8; 5 * 3 * 3];
        orient_into(img.as_raw(), 5, 3, o, &mut out);
        assert_eq!(out, expected.into_rgb8().into_raw(), "{o:?}");
    }
}

#[test]
fn exif_orientation_is_read_from_app1() {
    let jpeg = encode(&gradient(8, 4), image::ImageFormat::Jpeg);
    assert_eq!(exif_orientation(&jpeg), Orientation::NoTransforms);
    // Insert an APP1 Exif segment (little-endian TIFF, one IFD entry: Orientation = 6).
    let mut tiff = vec![b'I', b'I', 42, 0, 8, 0, 0, 0, 1, 0];
    tiff.extend_from_slice(&[0x12, 0x01, 3, 0, 1, 0, 0, 0, 6, 0, 0, 0]);
    tiff.extend_from_slice(&[0, 0, 0, 0]);
    let mut seg = b"Exif\0\0".to_vec();
    seg.extend_from_slice(&tiff);
    let mut with_exif = vec![0xFF, 0xD8, 0xFF, 0xE1];
    with_exif.extend_from_slice(&((seg.len() + 2) as u16).to_be_bytes());
    with_exif.extend_from_slice(&seg);
    with_exif.extend_from_slice(&jpeg[2..]);
    assert_eq!(exif_orientation(&with_exif), Orientation::Rotate90);
    let ring = ring(4096);
    let d = decode_into(&with_exif, ring.try_acquire().unwrap(), &OPTS, &|| false).unwrap();
    assert_eq!(
        (d.width, d.height, d.orig_width, d.orig_height),
        (4, 8, 4, 8)
    );
    let no_orient = DecodeOptions {
        auto_orient: false,
        ..OPTS
    };
    let d = decode_into(&with_exif, ring.try_acquire().unwrap(), &no_orient, &|| {
        false
    })
    .unwrap();
    assert_eq!((d.width, d.height), (8, 4));
}

#[test]
fn base64_accepts_data_urls_missing_padding_and_line_breaks() {
    assert_eq!(base64_bytes("aGVsbG8=").unwrap(), b"hello");
    assert_eq!(base64_bytes("aGVsbG8").unwrap(), b"hello");
    assert_eq!(
        base64_bytes("data:image/jpeg;base64,aGVsbG8=").unwrap(),
        b"hello"
    );
    assert_eq!(base64_bytes("aGVs\nbG8=\n").unwrap(), b"hello");
    assert_eq!(
        base64_bytes("not base64!").unwrap_err(),
        DecodeError::Base64
    );
    assert_eq!(
        base64_bytes("data:nocomma").unwrap_err(),
        DecodeError::Base64
    );
}

use crate::testing::{adam7_png16, progressive_jpeg};

fn scan_bomb(w: u32, h: u32, extra: usize) -> Vec<u8> {
    progressive(w, h, extra, turbojpeg::Subsamp::Sub2x2)
}

fn progressive(w: u32, h: u32, extra: usize, subsamp: turbojpeg::Subsamp) -> Vec<u8> {
    progressive_jpeg(&gradient(w, h), extra, subsamp)
}

#[test]
fn jpeg_scans_and_work_are_counted_from_the_markers_and_refused_before_decoding() {
    let plain = encode(&gradient(64, 48), image::ImageFormat::Jpeg);
    assert_eq!(JpegLayout::read(&plain).unwrap().scans, 1);
    let progressive = scan_bomb(64, 48, 0);
    let scans = JpegLayout::read(&progressive).unwrap().scans;
    assert!((6..=12).contains(&scans), "{scans} scans");
    let ring = ring(64 * 48);
    // A progressive file decodes; its scans are what the limits see.
    let d = decode_into(&progressive, ring.try_acquire().unwrap(), &OPTS, &|| false).unwrap();
    assert_eq!((d.width, d.height), (64, 48));
    drop(d);
    let bomb = scan_bomb(64, 48, 200);
    assert_eq!(JpegLayout::read(&bomb).unwrap().scans, scans + 200);
    let e = decode_into(&bomb, ring.try_acquire().unwrap(), &OPTS, &|| false).unwrap_err();
    assert_eq!(
        e,
        DecodeError::TooManyScans {
            scans: scans + 200,
            max: 100
        }
    );
    let work = 64 * 48 * (scans + 50);
    let tight = DecodeOptions {
        max_decode_work: work - 1,
        ..OPTS
    };
    let e = decode_into(
        &scan_bomb(64, 48, 50),
        ring.try_acquire().unwrap(),
        &tight,
        &|| false,
    )
    .unwrap_err();
    assert_eq!(
        e,
        DecodeError::TooMuchWork {
            work,
            max: work - 1
        }
    );
    assert_eq!(ring.in_use(), 0);
}

#[test]
fn progressive_jpeg_coefficients_count_against_the_memory_budget() {
    // 4:2:0: 1.5 components' worth of 8x8 blocks of 128 bytes, about 3 B/px; 4:4:4: 6.
    let coefficients = |data: &[u8]| JpegLayout::read(data).unwrap().coefficients();
    let px = 256 * 256;
    let c420 = coefficients(&scan_bomb(256, 256, 0));
    assert!((3 * px..4 * px).contains(&c420), "{c420}");
    let bomb = progressive(256, 256, 0, turbojpeg::Subsamp::None);
    let coefficients = coefficients(&bomb);
    assert!((6 * px..7 * px).contains(&coefficients), "{coefficients}");
    let ring = ring(256 * 256);
    let small = DecodeOptions {
        max_image_pixels: 256 * 256 * 3 / 4, // too few pixels anyway
        ..OPTS
    };
    assert!(matches!(
        decode_into(&bomb, ring.try_acquire().unwrap(), &small, &|| false),
        Err(DecodeError::TooManyPixels { .. })
    ));
    // Pixels allowed, but the budget (4 B per allowed pixel) below the coefficients.
    let budget_short = DecodeOptions {
        max_image_pixels: coefficients / 4 - 1,
        ..OPTS
    };
    assert!(256 * 256 <= budget_short.max_image_pixels);
    assert!(matches!(
        decode_into(&bomb, ring.try_acquire().unwrap(), &budget_short, &|| false),
        Err(DecodeError::TooMuchMemory { what: "JPEG", .. })
    ));
    // A baseline JPEG of the same size buffers nothing.
    let plain = encode(&gradient(256, 256), image::ImageFormat::Jpeg);
    decode_into(&plain, ring.try_acquire().unwrap(), &budget_short, &|| {
        false
    })
    .unwrap();
}

#[test]
fn a_job_nobody_waits_for_or_past_its_deadline_is_not_decoded() {
    let ring = ring(4096);
    for data in [
        encode(&gradient(64, 48), image::ImageFormat::Jpeg),
        encode(&gradient(64, 48), image::ImageFormat::Gif),
    ] {
        let e = decode_into(&data, ring.try_acquire().unwrap(), &OPTS, &|| true).unwrap_err();
        assert_eq!(e, DecodeError::Cancelled);
        let late = DecodeOptions {
            deadline: Some(Instant::now()),
            ..OPTS
        };
        let e = decode_into(&data, ring.try_acquire().unwrap(), &late, &|| false).unwrap_err();
        assert_eq!(e, DecodeError::DeadlineExceeded);
    }
    assert_eq!(ring.in_use(), 0);
}

#[test]
fn a_truncated_jpeg_decodes_what_it_holds_without_a_second_decoder() {
    // OpenCV (Roboflow) accepts a truncated JPEG with a warning; so does libjpeg-turbo.
    let full = encode(&gradient(64, 48), image::ImageFormat::Jpeg);
    let cut = &full[..full.len() * 2 / 3];
    let ring = ring(4096);
    let d = decode_into(cut, ring.try_acquire().unwrap(), &OPTS, &|| false).unwrap();
    assert_eq!((d.width, d.height), (64, 48));
    // The first rows are there.
    let first_row_diff = max_diff(&d.pixels()[..64 * 3], gradient(64, 48).as_raw());
    assert!(first_row_diff < 40, "{first_row_diff}");
}

#[test]
fn interlaced_pngs_stream_pass_by_pass_exactly_and_shrunk() {
    let value = |x: u32, y: u32| (x * 7 + y * 13) as u8;
    let data = adam7_png16(37, 29, value);
    // The reference decoder agrees on what the file holds.
    let reference = image::load_from_memory(&data).unwrap().into_rgb8();
    let expected = image::RgbImage::from_fn(37, 29, |x, y| image::Rgb([value(x, y); 3]));
    assert!(reference == expected, "the reference decoder disagrees");
    let d = decode_into(&data, ring(4096).try_acquire().unwrap(), &OPTS, &|| false).unwrap();
    assert_eq!((d.width, d.height), (37, 29));
    assert!(d.pixels() == expected.as_raw().as_slice());
    // Into a slot of a quarter: every output pixel the rounded mean of its 2x2 block.
    let small = ring(18 * 14);
    let d = decode_into(&data, small.try_acquire().unwrap(), &OPTS, &|| false).unwrap();
    assert_eq!(
        (d.width, d.height, d.orig_width, d.orig_height),
        (18, 14, 37, 29)
    );
    for (i, px) in d.pixels().chunks_exact(3).enumerate() {
        let (x, y) = ((i % 18) as u32 * 2, (i / 18) as u32 * 2);
        let sum: u32 = [(x, y), (x + 1, y), (x, y + 1), (x + 1, y + 1)]
            .iter()
            .map(|&(x, y)| value(x, y) as u32)
            .sum();
        assert_eq!(px, [((sum + 2) / 4) as u8; 3], "pixel {i}");
    }
    // With a deadline already passed, no row is decoded.
    let late = DecodeOptions {
        deadline: Some(Instant::now()),
        ..OPTS
    };
    let e = decode_into(&data, ring(4096).try_acquire().unwrap(), &late, &|| false);
    assert_eq!(e.unwrap_err(), DecodeError::DeadlineExceeded);
}

#[test]
fn other_formats_decode_as_the_image_crate_does_oriented_and_shrunk() {
    let img = gradient(40, 30);
    let rgba16 = image::DynamicImage::ImageRgb8(img.clone()).into_rgba16();
    let mut cases: Vec<(Vec<u8>, image::RgbImage)> = Vec::new();
    for fmt in [
        image::ImageFormat::Bmp,
        image::ImageFormat::Gif,
        image::ImageFormat::Tiff,
        image::ImageFormat::WebP,
    ] {
        let data = encode(&img, fmt);
        let expected = image::load_from_memory(&data).unwrap().into_rgb8();
        cases.push((data, expected));
    }
    let mut tiff16 = Cursor::new(Vec::new());
    image::DynamicImage::ImageRgba16(rgba16)
        .write_to(&mut tiff16, image::ImageFormat::Tiff)
        .unwrap();
    let tiff16 = tiff16.into_inner();
    let expected = image::load_from_memory(&tiff16).unwrap().into_rgb8();
    cases.push((tiff16, expected));
    let ring = ring(40 * 30);
    for (data, expected) in &cases {
        let d = decode_into(data, ring.try_acquire().unwrap(), &OPTS, &|| false).unwrap();
        assert_eq!((d.width, d.height), (40, 30));
        assert!(d.pixels() == expected.as_raw().as_slice());
        drop(d);
        let full = decode_full(data, &OPTS, &|| false).unwrap();
        assert!(&full == expected);
    }
    // Shrunk into a slot of a quarter: the rounded mean of each 2x2 block.
    let (data, expected) = &cases[0];
    let quarter = super::tests::ring(20 * 15);
    let d = decode_into(data, quarter.try_acquire().unwrap(), &OPTS, &|| false).unwrap();
    assert_eq!((d.width, d.height), (20, 15));
    let px = |x: u32, y: u32, c: usize| expected.get_pixel(x, y)[c] as u32;
    for (i, got) in d.pixels().chunks_exact(3).enumerate() {
        let (x, y) = ((i % 20) as u32 * 2, (i / 20) as u32 * 2);
        for (c, &v) in got.iter().enumerate() {
            let sum = px(x, y, c) + px(x + 1, y, c) + px(x, y + 1, c) + px(x + 1, y + 1, c);
            assert_eq!(v as u32, (sum + 2) / 4, "pixel {i} channel {c}");
        }
    }
    // Oriented like `image`'s apply_orientation, for every orientation.
    let mut native = Vec::new();
    for p in img.pixels() {
        native.extend_from_slice(&[p[0], p[1], p[2], 255]);
    }
    for &o in &ORIENTATIONS[1..] {
        let mut out = vec![0u8; 40 * 30 * 3];
        let size = convert_into(&native, ColorType::Rgba8, 40, 30, o, &mut out);
        let mut turned = image::DynamicImage::ImageRgb8(img.clone());
        turned.apply_orientation(o);
        let turned = turned.into_rgb8();
        assert_eq!(size, turned.dimensions(), "{o:?}");
        assert!(out == turned.into_raw(), "{o:?}");
    }
}

#[test]
fn formats_whose_decoder_needs_more_than_the_budget_are_refused_before_allocating() {
    // 100x100 with a budget of 4 B x 10,000 px = 40,000 bytes: an 8-bit RGB BMP (3 B/px)
    // fits; a GIF (RGBA and a frame buffer: 8 B/px) and a WebP (3 and 7) do not.
    let opts = DecodeOptions {
        max_image_pixels: 10_000,
        ..OPTS
    };
    let img = gradient(100, 100);
    let ring = ring(100 * 100);
    let bmp = encode(&img, image::ImageFormat::Bmp);
    decode_into(&bmp, ring.try_acquire().unwrap(), &opts, &|| false).unwrap();
    for fmt in [image::ImageFormat::Gif, image::ImageFormat::WebP] {
        let e = decode_into(
            &encode(&img, fmt),
            ring.try_acquire().unwrap(),
            &opts,
            &|| false,
        )
        .unwrap_err();
        assert!(
            matches!(e, DecodeError::TooMuchMemory { budget: 40_000, .. }),
            "{fmt:?}: {e:?}"
        );
    }
    // Drawing needs the full-size RGB image besides: a BMP that fits a slot does not fit
    // the budget with its copy.
    assert!(matches!(
        decode_full(&bmp, &opts, &|| false),
        Err(DecodeError::TooMuchMemory { .. })
    ));
    assert_eq!(ring.in_use(), 0);
}

#[test]
fn a_jpeg_whose_header_cannot_be_read_leaves_the_next_jpeg_decodable() {
    // libjpeg-turbo answered the header read after a failed one with width -1.
    let good = encode(&gradient(64, 48), image::ImageFormat::Jpeg);
    let ring = ring(4096);
    let e = decode_into(
        &good[..good.len().min(300)],
        ring.try_acquire().unwrap(),
        &OPTS,
        &|| false,
    );
    assert!(matches!(e, Err(DecodeError::Undecodable(_))), "{e:?}");
    let d = decode_into(&good, ring.try_acquire().unwrap(), &OPTS, &|| false).unwrap();
    assert_eq!((d.width, d.height), (64, 48));
}

#[test]
fn tiffs_with_an_image_of_another_format_inside_are_refused() {
    let plain = encode(&gradient(16, 16), image::ImageFormat::Tiff);
    assert_eq!(tiff_compression(&plain), Some(1));
    let ring = ring(4096);
    decode_into(&plain, ring.try_acquire().unwrap(), &OPTS, &|| false).unwrap();
    // The same file claiming JPEG ("new-style", 7) compression.
    let entry = plain
        .windows(4)
        .position(|w| w == [0x03, 0x01, 0x03, 0x00])
        .expect("a Compression entry, SHORT, little-endian");
    let mut nested = plain.clone();
    nested[entry + 8] = 7;
    assert_eq!(tiff_compression(&nested), Some(7));
    let e = decode_into(&nested, ring.try_acquire().unwrap(), &OPTS, &|| false).unwrap_err();
    assert!(
        matches!(&e, DecodeError::Undecodable(m) if m.contains("TIFF compression 7")),
        "{e:?}"
    );
}
