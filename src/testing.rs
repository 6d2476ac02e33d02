//! Hostile images for the tests (unit and integration): small files that decode to many
//! pixels or cost much work. The server never calls these.

use std::io::Write;

use crate::pipeline::decode::ADAM7_PASSES;

/// A 16-bit RGBA PNG of `w x h` with Adam7 interlacing (the `png` encoder writes none),
/// written by hand: every colour sample `value(x, y) * 257`, so its 8-bit value is `value`
/// however a decoder rounds, and alpha opaque.
pub fn adam7_png16(w: u32, h: u32, value: impl Fn(u32, u32) -> u8) -> Vec<u8> {
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut row = Vec::new();
    for (x0, y0, dx, dy) in ADAM7_PASSES {
        let (x0, y0) = (x0 as u32, y0 as u32);
        if x0 >= w || y0 >= h {
            continue;
        }
        for y in (y0..h).step_by(dy) {
            row.clear();
            row.push(0); // no filter
            for x in (x0..w).step_by(dx) {
                let v = value(x, y);
                row.extend_from_slice(&[v, v, v, v, v, v, 255, 255]);
            }
            z.write_all(&row).expect("writing to memory");
        }
    }
    let idat = z.finish().expect("writing to memory");
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[16, 6, 0, 0, 1]); // 16-bit RGBA, interlaced
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    for (kind, data) in [(b"IHDR", &ihdr), (b"IDAT", &idat), (b"IEND", &Vec::new())] {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut crc = flate2::Crc::new();
        crc.update(kind);
        crc.update(data);
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        out.extend_from_slice(&crc.sum().to_be_bytes());
    }
    out
}

/// `img` as a progressive JPEG whose smallest scan is repeated `extra` more times before the
/// end of the image: each repeat makes libjpeg-turbo run over the image's coefficients again
/// (a scan bomb, cheap on the wire).
pub fn progressive_jpeg(
    img: &image::RgbImage,
    extra: usize,
    subsamp: turbojpeg::Subsamp,
) -> Vec<u8> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut c = turbojpeg::Compressor::new().expect("a JPEG compressor");
    c.set_progressive(true).expect("progressive");
    c.set_subsamp(subsamp).expect("subsampling");
    let jpeg = c
        .compress_to_vec(turbojpeg::Image {
            pixels: img.as_raw().as_slice(),
            width: w,
            pitch: w * 3,
            height: h,
            format: turbojpeg::PixelFormat::RGB,
        })
        .expect("compressing");
    let eoi = jpeg.len() - 2;
    let mut starts: Vec<usize> = jpeg
        .windows(2)
        .enumerate()
        .filter(|(_, m)| *m == [0xFF, 0xDA])
        .map(|(i, _)| i)
        .collect();
    starts.push(eoi);
    let scan = starts
        .windows(2)
        .map(|w| w[0]..w[1])
        .min_by_key(|r| r.len())
        .expect("a progressive JPEG has scans");
    let mut out = jpeg[..eoi].to_vec();
    for _ in 0..extra {
        out.extend_from_slice(&jpeg[scan.clone()]);
    }
    out.extend_from_slice(&[0xFF, 0xD9]);
    out
}
