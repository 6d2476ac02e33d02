//! EXIF orientation: read from a JPEG's APP1 segment without decoding, and applied while
//! copying pixels into the slot.

use image::metadata::Orientation;

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

pub(super) fn oriented_size(w: u32, h: u32, o: Orientation) -> (u32, u32) {
    match o {
        Orientation::Rotate90
        | Orientation::Rotate270
        | Orientation::Rotate90FlipH
        | Orientation::Rotate270FlipH => (h, w),
        _ => (w, h),
    }
}

/// The pixel of a `w x h` image that lands at `(dx, dy)` once oriented by `o`.
pub(super) fn source_pixel(
    o: Orientation,
    w: usize,
    h: usize,
    dx: usize,
    dy: usize,
) -> (usize, usize) {
    match o {
        Orientation::NoTransforms => (dx, dy),
        Orientation::Rotate90 => (dy, h - 1 - dx),
        Orientation::Rotate180 => (w - 1 - dx, h - 1 - dy),
        Orientation::Rotate270 => (w - 1 - dy, dx),
        Orientation::FlipHorizontal => (w - 1 - dx, dy),
        Orientation::FlipVertical => (dx, h - 1 - dy),
        Orientation::Rotate90FlipH => (dy, dx),
        Orientation::Rotate270FlipH => (w - 1 - dy, h - 1 - dx),
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
            let (sx, sy) = source_pixel(o, w, h, dx, dy);
            let s = (sy * w + sx) * 3;
            let d = (dy * dw + dx) * 3;
            dst[d..d + 3].copy_from_slice(&src[s..s + 3]);
        }
    }
}
