//! The other formats (WebP, GIF, BMP, TIFF, and what libjpeg-turbo or the PNG path leave to
//! it) through the `image` crate: its decoder within the memory budget, the header facts the
//! bounds need, and the conversion of its pixel types into the slot's 8-bit RGB.

use super::*;
use std::io::Cursor;

use image::{ColorType, ImageDecoder, ImageFormat};

/// TIFF compressions decoded within the image's own size: none, CCITT RLE, fax 3 and 4, LZW,
/// Deflate (both codes), PackBits. JPEG and WebP inside a TIFF decode at their own size.
pub(super) const TIFF_PLAIN: [u32; 8] = [1, 2, 3, 4, 5, 8, 32773, 32946];

/// The Compression tag of a TIFF's first image (the one decoded), read as the `tiff` crate
/// reads it (whatever its type, the last of duplicates).
pub(super) fn tiff_compression(data: &[u8]) -> Option<u32> {
    let mut decoder = tiff::decoder::Decoder::new(Cursor::new(data)).ok()?;
    match decoder.find_tag(tiff::tags::Tag::Compression) {
        Ok(Some(value)) => value.into_u32().ok(),
        Ok(None) => Some(1), // absent: uncompressed
        Err(_) => None,
    }
}

/// Whether a WebP file is animated (its VP8X header's animation flag).
pub(super) fn webp_is_animated(data: &[u8]) -> bool {
    data.get(12..16) == Some(b"VP8X") && data.get(20).is_some_and(|f| f & 0x02 != 0)
}

/// libjpeg's warnings (JWRN_*): the decode finished, with damaged data filled in.
pub(super) fn is_warning(message: &str) -> bool {
    [
        "Corrupt JPEG data",
        "Premature end of JPEG file",
        "Invalid SOS parameters for sequential JPEG",
        "Warning: unknown JFIF revision",
        "Inconsistent progression sequence",
        "Unknown Adobe color transform code",
    ]
    .iter()
    .any(|w| message.starts_with(w))
}

pub(super) fn not_an_image(e: image::ImageError) -> DecodeError {
    DecodeError::Undecodable(format!(
        "the bytes are not an image in a known format ({e})."
    ))
}

/// The `image` crate's decoder for `data`, allowed the memory budget.
pub(super) fn general_decoder<'a>(
    data: &'a [u8],
    format: ImageFormat,
    opts: &DecodeOptions,
) -> Result<Box<dyn ImageDecoder + 'a>, DecodeError> {
    let mut reader = image::ImageReader::with_format(Cursor::new(data), format);
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(opts.memory_budget());
    reader.limits(limits);
    reader
        .into_decoder()
        .map(|d| Box::new(d) as Box<dyn ImageDecoder>)
        .map_err(not_an_image)
}

/// Writes a decoded `w x h` buffer of `color` pixels into `out` as 8-bit RGB, oriented by
/// `o`, shrunk by the smallest integer box filter that fits `out`; returns the size written.
/// Samples convert as the `image` crate's `into_rgb8` does (16-bit rounded, float clamped,
/// alpha dropped).
pub(super) fn convert_into(
    native: &[u8],
    color: ColorType,
    w: u32,
    h: u32,
    o: Orientation,
    out: &mut [u8],
) -> (u32, u32) {
    let (ow, oh) = oriented_size(w, h, o);
    let k = shrink_factor(ow, oh, out.len() / 3) as usize;
    let (dw, dh) = ((ow as usize / k).max(1), (oh as usize / k).max(1));
    let channels = color.channel_count() as usize;
    let bpp = color.bytes_per_pixel() as usize;
    let sample = |at: usize| -> u8 {
        match color {
            ColorType::L16 | ColorType::La16 | ColorType::Rgb16 | ColorType::Rgba16 => {
                let v = u16::from_ne_bytes([native[at], native[at + 1]]);
                ((v as u32 + 128) / 257) as u8
            }
            ColorType::Rgb32F | ColorType::Rgba32F => {
                let v = f32::from_ne_bytes([
                    native[at],
                    native[at + 1],
                    native[at + 2],
                    native[at + 3],
                ]);
                (v.clamp(0.0, 1.0) * 255.0).round() as u8
            }
            _ => native[at],
        }
    };
    let size = (bpp / channels).max(1);
    let rgb = |x: usize, y: usize| -> [u8; 3] {
        let at = (y * w as usize + x) * bpp;
        if channels < 3 {
            [sample(at); 3]
        } else {
            [sample(at), sample(at + size), sample(at + 2 * size)]
        }
    };
    let (w, h) = (w as usize, h as usize);
    let source = |dx: usize, dy: usize| source_pixel(o, w, h, dx, dy);
    let n = (k * k) as u32;
    for y in 0..dh {
        for x in 0..dw {
            let px = if k == 1 {
                let (sx, sy) = source(x, y);
                rgb(sx, sy)
            } else {
                let mut sum = [0u32; 3];
                for by in 0..k {
                    for bx in 0..k {
                        // An image narrower than a block repeats its last column (row).
                        let (ox, oy) = (
                            (x * k + bx).min(ow as usize - 1),
                            (y * k + by).min(oh as usize - 1),
                        );
                        let (sx, sy) = source(ox, oy);
                        for (s, v) in sum.iter_mut().zip(rgb(sx, sy)) {
                            *s += v as u32;
                        }
                    }
                }
                sum.map(|s| ((s + n / 2) / n) as u8)
            };
            out[(y * dw + x) * 3..(y * dw + x) * 3 + 3].copy_from_slice(&px);
        }
    }
    (dw as u32, dh as u32)
}
