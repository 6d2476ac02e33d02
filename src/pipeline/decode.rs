//! Decode: compressed image bytes in, RGB pixels in a ring slot out (a [`DecodedImage`]).
//! JPEG goes through libjpeg-turbo straight into the slot; PNG, WebP, GIF, BMP and TIFF go
//! through the `image` crate. EXIF orientation is applied unless disabled. Runs on the decode
//! pool, never on the HTTP reactor threads.

use std::cell::RefCell;
use std::io::Cursor;
use std::time::Instant;

use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine;
use fast_image_resize as fr;
use image::metadata::Orientation;
use image::ImageDecoder;

use super::ring::SlotHandle;

/// Why an image could not be decoded. Every variant is the client's fault (4xx).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("Could not load input image. Cause: the image is empty (zero bytes).")]
    Empty,
    #[error("Could not load input image. Cause: Malformed base64 input image.")]
    Base64,
    #[error("Could not load input image. Cause: {0}")]
    Undecodable(String),
    #[error(
        "Could not load input image. Cause: its header claims {width}x{height} pixels, \
         more than the {max} allowed (MAX_IMAGE_PIXELS)."
    )]
    TooManyPixels { width: u64, height: u64, max: u64 },
    /// The request's deadline passed while decoding (504, not the client's input fault).
    #[error("Deadline exceeded while decoding the image")]
    DeadlineExceeded,
}

/// Per-request decode settings.
#[derive(Debug, Clone, Copy)]
pub struct DecodeOptions {
    /// Apply EXIF orientation (Roboflow's default).
    pub auto_orient: bool,
    /// Largest width x height a header may claim.
    pub max_image_pixels: u64,
    /// The smallest image preprocessing needs, if known: a JPEG much larger is decoded at
    /// 1/2, 1/4 or 1/8 scale in the DCT domain (far cheaper than decoding it whole and
    /// shrinking it afterwards), never below what the network input needs.
    pub needed: Option<NeededSize>,
    /// Decoding stops past this instant (checked between rows of large PNGs).
    pub deadline: Option<Instant>,
}

impl DecodeOptions {
    fn past_deadline(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }
}

/// What preprocessing needs of a decoded image to resize it without upsampling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NeededSize {
    pub width: u32,
    pub height: u32,
    /// Letterbox keeps the aspect ratio, so only the fitting side must reach the input size.
    pub keep_aspect: bool,
}

impl NeededSize {
    /// Whether a `w x h` decode (oriented) of an `ow x oh` image is large enough.
    fn satisfied_by(&self, w: usize, h: usize, ow: usize, oh: usize) -> bool {
        let (nw, nh) = (self.width as f64, self.height as f64);
        if self.keep_aspect {
            let r = (nw / ow as f64).min(nh / oh as f64);
            w as f64 >= (ow as f64 * r).floor() && h as f64 >= (oh as f64 * r).floor()
        } else {
            w as f64 >= nw && h as f64 >= nh
        }
    }
}

/// An image decoded into a ring slot: `width x height` RGB pixels, rows packed, at the start
/// of the slot. When the original was larger than a slot holds it was decoded at a reduced
/// scale; `orig_*` keep the size the client sent, which responses report and boxes map to.
#[derive(Debug)]
pub struct DecodedImage {
    pub slot: SlotHandle,
    pub width: u32,
    pub height: u32,
    pub orig_width: u32,
    pub orig_height: u32,
}

impl DecodedImage {
    /// The RGB pixels, `width * height * 3` bytes.
    pub fn pixels(&self) -> &[u8] {
        &self.slot.bytes()[..self.width as usize * self.height as usize * 3]
    }
}

/// Standard alphabet, padding optional (clients differ).
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Decodes base64 text, accepting a `data:image/...;base64,` prefix and line breaks.
pub fn base64_bytes(text: &str) -> Result<Vec<u8>, DecodeError> {
    let text = text.trim();
    let text = match text.strip_prefix("data:") {
        Some(rest) => rest
            .split_once(',')
            .map(|(_, b)| b)
            .ok_or(DecodeError::Base64)?,
        None => text,
    };
    let decoded = if text.bytes().any(|b| b.is_ascii_whitespace()) {
        let compact: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        BASE64.decode(compact)
    } else {
        BASE64.decode(text)
    };
    decoded.map_err(|_| DecodeError::Base64)
}

thread_local! {
    static DECOMPRESSOR: RefCell<Option<turbojpeg::Decompressor>> = const { RefCell::new(None) };
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Decodes `data` into `slot`.
pub fn decode_into(
    data: &[u8],
    slot: SlotHandle,
    opts: &DecodeOptions,
) -> Result<DecodedImage, DecodeError> {
    if data.is_empty() {
        return Err(DecodeError::Empty);
    }
    if data.starts_with(b"\x89PNG\r\n\x1a\n") {
        return decode_png(data, slot, opts);
    }
    if data.starts_with(&[0xFF, 0xD8]) {
        match decode_jpeg(data, slot, opts) {
            Ok(img) => Ok(img),
            // libjpeg-turbo rejects a few valid files (e.g. CMYK); give `image` a chance.
            Err((Some(slot), turbo_err)) => decode_other(data, slot, opts).map_err(|e| {
                if matches!(e, DecodeError::Undecodable(_)) {
                    turbo_err
                } else {
                    e
                }
            }),
            Err((None, e)) => Err(e),
        }
    } else {
        decode_other(data, slot, opts)
    }
}

fn check_pixels(width: u64, height: u64, opts: &DecodeOptions) -> Result<(), DecodeError> {
    if width == 0 || height == 0 {
        return Err(DecodeError::Undecodable(format!(
            "the image has no pixels ({width}x{height})."
        )));
    }
    if width * height > opts.max_image_pixels {
        return Err(DecodeError::TooManyPixels {
            width,
            height,
            max: opts.max_image_pixels,
        });
    }
    Ok(())
}

/// On failure returns the slot back when another decoder may still try.
fn decode_jpeg(
    data: &[u8],
    mut slot: SlotHandle,
    opts: &DecodeOptions,
) -> Result<DecodedImage, (Option<SlotHandle>, DecodeError)> {
    DECOMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.is_none() {
            *cell = Some(turbojpeg::Decompressor::new().map_err(|e| {
                (
                    None,
                    DecodeError::Undecodable(format!("cannot start the JPEG decoder: {e}")),
                )
            })?);
        }
        let dec = cell.as_mut().expect("initialised above");
        let header = match dec.read_header(data) {
            Ok(h) => h,
            Err(e) => {
                // Let the second decoder look too: it reports absurd dimensions precisely.
                return Err((
                    Some(slot),
                    DecodeError::Undecodable(format!("not a valid JPEG ({e})")),
                ));
            }
        };
        if let Err(e) = check_pixels(header.width as u64, header.height as u64, opts) {
            return Err((None, e));
        }
        let orientation = if opts.auto_orient {
            exif_orientation(data)
        } else {
            Orientation::NoTransforms
        };
        let slot_pixels = slot.bytes().len() / 3;
        let factors = [
            turbojpeg::ScalingFactor::ONE_EIGHTH,
            turbojpeg::ScalingFactor::ONE_QUARTER,
            turbojpeg::ScalingFactor::ONE_HALF,
            turbojpeg::ScalingFactor::ONE,
        ];
        let fits = |f: &turbojpeg::ScalingFactor| {
            f.scale(header.width) * f.scale(header.height) <= slot_pixels
        };
        let (ow, oh) = oriented_size(header.width as u32, header.height as u32, orientation);
        // The most reduced decode that still covers what preprocessing needs ...
        let enough = opts.needed.and_then(|need| {
            factors.iter().copied().find(|f| {
                let (w, h) = oriented_size(
                    f.scale(header.width) as u32,
                    f.scale(header.height) as u32,
                    orientation,
                );
                fits(f) && need.satisfied_by(w as usize, h as usize, ow as usize, oh as usize)
            })
        });
        // ... else the largest that fits a slot.
        let factor = enough
            .or_else(|| factors.iter().rev().copied().find(fits))
            .ok_or_else(|| {
                (
                    None,
                    DecodeError::Undecodable(format!(
                    "a {}x{} JPEG does not fit a ring slot even at 1/8 scale (RING_SLOT_PIXELS).",
                    header.width, header.height
                )),
                )
            })?;
        let (w, h) = (factor.scale(header.width), factor.scale(header.height));
        if dec.set_scaling_factor(factor).is_err() {
            return Err((
                Some(slot),
                DecodeError::Undecodable("unsupported JPEG scaling".into()),
            ));
        }
        let result = if orientation == Orientation::NoTransforms {
            let out = turbojpeg::Image {
                pixels: &mut slot.bytes_mut()[..w * h * 3],
                width: w,
                pitch: w * 3,
                height: h,
                format: turbojpeg::PixelFormat::RGB,
            };
            dec.decompress(data, out)
        } else {
            SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                scratch.resize(w * h * 3, 0);
                let out = turbojpeg::Image {
                    pixels: &mut scratch[..],
                    width: w,
                    pitch: w * 3,
                    height: h,
                    format: turbojpeg::PixelFormat::RGB,
                };
                let r = dec.decompress(data, out);
                if r.is_ok() {
                    orient_into(&scratch, w as u32, h as u32, orientation, slot.bytes_mut());
                }
                r
            })
        };
        let _ = dec.set_scaling_factor(turbojpeg::ScalingFactor::ONE);
        match result {
            Ok(()) => {
                let (dw, dh) = oriented_size(w as u32, h as u32, orientation);
                Ok(DecodedImage {
                    slot,
                    width: dw,
                    height: dh,
                    orig_width: ow,
                    orig_height: oh,
                })
            }
            Err(e) => Err((
                Some(slot),
                DecodeError::Undecodable(format!("not a valid JPEG ({e})")),
            )),
        }
    })
}

/// Bytes one decode may allocate per pixel of MAX_IMAGE_PIXELS in formats other than JPEG
/// and PNG (8-bit RGBA), so 16-bit and alpha images cannot multiply a request's memory.
const OTHER_BYTES_PER_PIXEL: u64 = 4;

/// PNG, row by row into the slot: 16-bit samples are stripped to 8 bits, palettes and grey
/// are expanded, alpha is dropped, and an image larger than a slot is shrunk on the fly by an
/// integer box filter. Memory beyond the slot is one row, whatever the bit depth; the
/// deadline is checked between rows. Interlaced PNGs and those with an EXIF orientation go
/// through the general decoder.
fn decode_png(
    data: &[u8],
    mut slot: SlotHandle,
    opts: &DecodeOptions,
) -> Result<DecodedImage, DecodeError> {
    let bad = |e: png::DecodingError| DecodeError::Undecodable(format!("not a valid PNG ({e})."));
    let mut decoder = png::Decoder::new(Cursor::new(data));
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let header = decoder.read_header_info().map_err(bad)?;
    let (w, h) = (header.width, header.height);
    check_pixels(w as u64, h as u64, opts)?;
    let interlaced = header.interlaced;
    let mut reader = decoder.read_info().map_err(bad)?;
    let oriented = opts.auto_orient
        && reader
            .info()
            .exif_metadata
            .as_deref()
            .and_then(Orientation::from_exif_chunk)
            .is_some_and(|o| o != Orientation::NoTransforms);
    if interlaced || oriented {
        drop(reader);
        return decode_other(data, slot, opts);
    }
    let channels = reader.output_color_type().0.samples();
    let slot_pixels = slot.bytes().len() / 3;
    // The smallest integer shrink that fits the slot.
    let mut k = 1usize;
    while (w as usize / k).max(1) * (h as usize / k).max(1) > slot_pixels {
        k += 1;
    }
    let (dw, dh) = ((w as usize / k).max(1), (h as usize / k).max(1));
    let out = &mut slot.bytes_mut()[..dw * dh * 3];
    let mut acc = vec![0u32; if k > 1 { dw * 3 } else { 0 }];
    let rgb = |px: &[u8]| -> [u8; 3] {
        match channels {
            1 | 2 => [px[0]; 3],
            _ => [px[0], px[1], px[2]],
        }
    };
    for y in 0..h as usize {
        if y % 64 == 0 && opts.past_deadline() {
            return Err(DecodeError::DeadlineExceeded);
        }
        let row = reader
            .next_row()
            .map_err(bad)?
            .ok_or_else(|| DecodeError::Undecodable("the PNG ends early.".into()))?;
        let row = row.data();
        let oy = y / k;
        if oy >= dh {
            continue; // the last rows of a shrunk image that do not fill a block
        }
        if k == 1 {
            let dst = &mut out[oy * dw * 3..(oy + 1) * dw * 3];
            for (d, px) in dst.chunks_exact_mut(3).zip(row.chunks_exact(channels)) {
                d.copy_from_slice(&rgb(px));
            }
            continue;
        }
        for (x, px) in row.chunks_exact(channels).take(dw * k).enumerate() {
            let a = &mut acc[(x / k) * 3..(x / k) * 3 + 3];
            for (a, v) in a.iter_mut().zip(rgb(px)) {
                *a += v as u32;
            }
        }
        if (y + 1) % k == 0 {
            let n = (k * k) as u32;
            let dst = &mut out[oy * dw * 3..(oy + 1) * dw * 3];
            for (d, a) in dst.iter_mut().zip(acc.iter_mut()) {
                *d = ((*a + n / 2) / n) as u8;
                *a = 0;
            }
        }
    }
    Ok(DecodedImage {
        slot,
        width: dw as u32,
        height: dh as u32,
        orig_width: w,
        orig_height: h,
    })
}

fn decode_other(
    data: &[u8],
    mut slot: SlotHandle,
    opts: &DecodeOptions,
) -> Result<DecodedImage, DecodeError> {
    let rgb = decode_full(data, opts.max_image_pixels, opts.auto_orient)?;
    let (w, h) = rgb.dimensions();
    let slot_pixels = slot.bytes().len() / 3;
    if (w as usize) * (h as usize) <= slot_pixels {
        slot.bytes_mut()[..rgb.len()].copy_from_slice(&rgb);
        return Ok(DecodedImage {
            slot,
            width: w,
            height: h,
            orig_width: w,
            orig_height: h,
        });
    }
    // Larger than a slot: keep the aspect ratio, shrink to fit (far above any network input).
    let scale = (slot_pixels as f64 / (w as f64 * h as f64)).sqrt();
    let (dw, dh) = (
        ((w as f64 * scale) as u32).max(1),
        ((h as f64 * scale) as u32).max(1),
    );
    let src = fr::images::ImageRef::new(w, h, rgb.as_raw(), fr::PixelType::U8x3)
        .map_err(|e| DecodeError::Undecodable(e.to_string()))?;
    let mut dst = fr::images::Image::from_slice_u8(
        dw,
        dh,
        &mut slot.bytes_mut()[..dw as usize * dh as usize * 3],
        fr::PixelType::U8x3,
    )
    .map_err(|e| DecodeError::Undecodable(e.to_string()))?;
    fr::Resizer::new()
        .resize(
            &src,
            &mut dst,
            &fr::ResizeOptions::new()
                .resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::Bilinear)),
        )
        .map_err(|e| DecodeError::Undecodable(e.to_string()))?;
    Ok(DecodedImage {
        slot,
        width: dw,
        height: dh,
        orig_width: w,
        orig_height: h,
    })
}

/// The whole image as RGB, oriented, through the `image` crate (formats other than JPEG and
/// plain PNG, and drawing): at most `max_pixels`, allocating at most 4 bytes per allowed
/// pixel.
pub fn decode_full(
    data: &[u8],
    max_pixels: u64,
    auto_orient: bool,
) -> Result<image::RgbImage, DecodeError> {
    let undecodable = |e: image::ImageError| {
        DecodeError::Undecodable(format!(
            "the bytes are not an image in a known format ({e})."
        ))
    };
    let format = image::guess_format(data).map_err(undecodable)?;
    let mut reader = image::ImageReader::with_format(Cursor::new(data), format);
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(max_pixels.saturating_mul(OTHER_BYTES_PER_PIXEL));
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(undecodable)?;
    let (w, h) = decoder.dimensions();
    let opts = DecodeOptions {
        auto_orient,
        max_image_pixels: max_pixels,
        needed: None,
        deadline: None,
    };
    check_pixels(w as u64, h as u64, &opts)?;
    let orientation = if auto_orient {
        decoder.orientation().unwrap_or(Orientation::NoTransforms)
    } else {
        Orientation::NoTransforms
    };
    let mut img = image::DynamicImage::from_decoder(decoder).map_err(undecodable)?;
    img.apply_orientation(orientation);
    Ok(img.into_rgb8())
}

/// Reads the EXIF orientation from a JPEG's APP1 segment without decoding anything else.
pub fn exif_orientation(jpeg: &[u8]) -> Orientation {
    let mut i = 2; // after SOI
    while i + 4 <= jpeg.len() {
        if jpeg[i] != 0xFF {
            break;
        }
        let marker = jpeg[i + 1];
        if marker == 0xFF {
            i += 1; // fill byte
            continue;
        }
        if marker == 0xDA || marker == 0xD9 {
            break; // start of scan / end of image: no EXIF before the pixels
        }
        let len = u16::from_be_bytes([jpeg[i + 2], jpeg[i + 3]]) as usize;
        if len < 2 || i + 2 + len > jpeg.len() {
            break;
        }
        let segment = &jpeg[i + 4..i + 2 + len];
        if marker == 0xE1 && segment.starts_with(b"Exif\0\0") {
            return Orientation::from_exif_chunk(&segment[6..])
                .unwrap_or(Orientation::NoTransforms);
        }
        i += 2 + len;
    }
    Orientation::NoTransforms
}

fn oriented_size(w: u32, h: u32, o: Orientation) -> (u32, u32) {
    match o {
        Orientation::Rotate90
        | Orientation::Rotate270
        | Orientation::Rotate90FlipH
        | Orientation::Rotate270FlipH => (h, w),
        _ => (w, h),
    }
}

/// Writes `src` (w x h RGB) into `dst` transformed by `o`, with the same meaning as
/// `image::DynamicImage::apply_orientation`.
pub fn orient_into(src: &[u8], w: u32, h: u32, o: Orientation, dst: &mut [u8]) {
    let (w, h) = (w as usize, h as usize);
    let (dw, dh) = {
        let (a, b) = oriented_size(w as u32, h as u32, o);
        (a as usize, b as usize)
    };
    for dy in 0..dh {
        for dx in 0..dw {
            let (sx, sy) = match o {
                Orientation::NoTransforms => (dx, dy),
                Orientation::Rotate90 => (dy, h - 1 - dx),
                Orientation::Rotate180 => (w - 1 - dx, h - 1 - dy),
                Orientation::Rotate270 => (w - 1 - dy, dx),
                Orientation::FlipHorizontal => (w - 1 - dx, dy),
                Orientation::FlipVertical => (dx, h - 1 - dy),
                Orientation::Rotate90FlipH => (dy, dx),
                Orientation::Rotate270FlipH => (w - 1 - dy, h - 1 - dx),
            };
            let s = (sy * w + sx) * 3;
            let d = (dy * dw + dx) * 3;
            dst[d..d + 3].copy_from_slice(&src[s..s + 3]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::ring::Ring;
    use std::sync::Arc;

    const OPTS: DecodeOptions = DecodeOptions {
        auto_orient: true,
        max_image_pixels: 100_000_000,
        needed: None,
        deadline: None,
    };

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

    /// `img` as PNG, decoded into a slot of `slot_pixels`.
    fn png_in_slot(img: &image::RgbImage, slot_pixels: usize) -> DecodedImage {
        let ring = ring(slot_pixels);
        let data = encode(img, image::ImageFormat::Png);
        decode_into(&data, ring.try_acquire().unwrap(), &OPTS).unwrap()
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
            decode_into(&out.into_inner(), ring.try_acquire().unwrap(), &OPTS).unwrap()
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
        let ring = ring(64 * 200);
        let opts = DecodeOptions {
            deadline: Some(Instant::now()),
            ..OPTS
        };
        let e = decode_into(
            &encode(&img, image::ImageFormat::Png),
            ring.try_acquire().unwrap(),
            &opts,
        )
        .unwrap_err();
        assert_eq!(e, DecodeError::DeadlineExceeded);
    }

    #[test]
    fn jpeg_decodes_close_to_the_original() {
        let img = gradient(64, 48);
        let ring = ring(4096);
        let d = decode_into(
            &encode(&img, image::ImageFormat::Jpeg),
            ring.try_acquire().unwrap(),
            &OPTS,
        )
        .unwrap();
        assert_eq!((d.width, d.height), (64, 48));
        let max_diff = d
            .pixels()
            .iter()
            .zip(img.as_raw())
            .map(|(a, b)| (*a as i32 - *b as i32).abs())
            .max()
            .unwrap();
        assert!(max_diff < 40, "max diff {max_diff}");
    }

    #[test]
    fn oversized_jpeg_is_decoded_at_a_reduced_scale_keeping_the_original_size() {
        let img = gradient(200, 100);
        let ring = ring(100 * 50); // holds exactly a half-scale decode
        let d = decode_into(
            &encode(&img, image::ImageFormat::Jpeg),
            ring.try_acquire().unwrap(),
            &OPTS,
        )
        .unwrap();
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
            let d = decode_into(&data, ring.try_acquire().unwrap(), &opts).unwrap();
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
        let ring = ring(5000);
        let d = decode_into(
            &encode(&img, image::ImageFormat::Png),
            ring.try_acquire().unwrap(),
            &OPTS,
        )
        .unwrap();
        assert!(d.width as usize * d.height as usize <= 5000);
        assert_eq!((d.orig_width, d.orig_height), (200, 100));
        assert!((d.width as f64 / d.height as f64 - 2.0).abs() < 0.05);
    }

    #[test]
    fn bad_inputs_are_client_errors_and_free_the_slot() {
        let ring = ring(4096);
        assert_eq!(
            decode_into(b"", ring.try_acquire().unwrap(), &OPTS).unwrap_err(),
            DecodeError::Empty
        );
        assert!(matches!(
            decode_into(b"hello world", ring.try_acquire().unwrap(), &OPTS).unwrap_err(),
            DecodeError::Undecodable(_)
        ));
        let mut truncated = encode(&gradient(64, 48), image::ImageFormat::Jpeg);
        truncated.truncate(40);
        assert!(decode_into(&truncated, ring.try_acquire().unwrap(), &OPTS).is_err());
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
                let err = decode_into(&fake_header(fmt, side), ring.try_acquire().unwrap(), &OPTS)
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
        for o in [
            Orientation::NoTransforms,
            Orientation::Rotate90,
            Orientation::Rotate180,
            Orientation::Rotate270,
            Orientation::FlipHorizontal,
            Orientation::FlipVertical,
            Orientation::Rotate90FlipH,
            Orientation::Rotate270FlipH,
        ] {
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
        let d = decode_into(&with_exif, ring.try_acquire().unwrap(), &OPTS).unwrap();
        assert_eq!(
            (d.width, d.height, d.orig_width, d.orig_height),
            (4, 8, 4, 8)
        );
        let no_orient = DecodeOptions {
            auto_orient: false,
            ..OPTS
        };
        let d = decode_into(&with_exif, ring.try_acquire().unwrap(), &no_orient).unwrap();
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
}
