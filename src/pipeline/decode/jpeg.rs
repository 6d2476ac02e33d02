//! JPEG: what a file's markers say before decoding (frame, sampling, scans: the work and
//! memory bounds), and libjpeg-turbo's errors and output image.

use super::*;

pub(super) fn bad_jpeg(e: turbojpeg::Error) -> DecodeError {
    DecodeError::Undecodable(format!("not a valid JPEG ({e})."))
}

/// `pixels` as libjpeg-turbo's packed RGB output of `w x h`.
pub(super) fn rgb_image(pixels: &mut [u8], w: usize, h: usize) -> turbojpeg::Image<&mut [u8]> {
    turbojpeg::Image {
        pixels,
        width: w,
        pitch: w * 3,
        height: h,
        format: turbojpeg::PixelFormat::RGB,
    }
}

/// What a JPEG's markers say, read without decoding: its frame and how many scans it has.
#[derive(Debug, Default)]
pub(super) struct JpegLayout {
    pub(super) width: u32,
    pub(super) height: u32,
    /// Horizontal and vertical sampling factors of each component.
    pub(super) sampling: Vec<(u8, u8)>,
    pub(super) scans: u64,
    /// Progressive (SOF2, 6, 10, 14).
    pub(super) progressive: bool,
    /// Components in the first scan.
    pub(super) first_scan_components: usize,
    pub(super) cmyk: bool,
}

impl JpegLayout {
    pub(super) fn read(data: &[u8]) -> Result<Self, DecodeError> {
        let bad = |why: &str| DecodeError::Undecodable(format!("not a valid JPEG ({why})."));
        let mut layout = JpegLayout::default();
        let mut frame = false;
        let mut adobe_transform = None;
        let mut i = 2; // after SOI
        while i + 1 < data.len() {
            if data[i] != 0xFF {
                // Entropy-coded data: skip to the next marker (0xFF not followed by a
                // stuffed zero or a restart marker).
                match memchr::memchr(0xFF, &data[i..]) {
                    Some(at) => i += at,
                    None => break,
                }
                continue;
            }
            let marker = data[i + 1];
            match marker {
                0xFF => i += 1, // fill byte
                0x00 | 0xD0..=0xD7 | 0x01 | 0xD8 => i += 2,
                0xD9 => break,
                _ => {
                    let Some(len) = data.get(i + 2..i + 4) else {
                        break;
                    };
                    let len = u16::from_be_bytes([len[0], len[1]]) as usize;
                    let segment = data
                        .get(i + 4..(i + 2 + len).min(data.len()))
                        .unwrap_or(&[]);
                    match marker {
                        0xC0..=0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF if !frame => {
                            if segment.len() < 6 {
                                return Err(bad("short frame header"));
                            }
                            frame = true;
                            layout.progressive = matches!(marker, 0xC2 | 0xC6 | 0xCA | 0xCE);
                            layout.height = u16::from_be_bytes([segment[1], segment[2]]) as u32;
                            layout.width = u16::from_be_bytes([segment[3], segment[4]]) as u32;
                            let n = segment[5] as usize;
                            layout.sampling = segment[6..]
                                .chunks_exact(3)
                                .take(n)
                                .map(|c| ((c[1] >> 4).max(1), (c[1] & 15).max(1)))
                                .collect();
                            if layout.sampling.len() != n || n == 0 {
                                return Err(bad("short frame header"));
                            }
                        }
                        0xDA => {
                            if layout.scans == 0 {
                                layout.first_scan_components =
                                    segment.first().copied().unwrap_or(0) as usize;
                            }
                            layout.scans += 1;
                        }
                        0xEE if segment.starts_with(b"Adobe") && segment.len() >= 12 => {
                            adobe_transform = Some(segment[11]);
                        }
                        _ => {}
                    }
                    i += 2 + len.max(2);
                }
            }
        }
        if !frame {
            return Err(bad("no frame header"));
        }
        layout.cmyk =
            layout.sampling.len() == 4 || (layout.sampling.len() > 4 && adobe_transform.is_some());
        Ok(layout)
    }

    /// Whether libjpeg buffers every coefficient of the image before output: a progressive
    /// file, several scans, or a first scan without every component.
    pub(super) fn buffered(&self) -> bool {
        self.progressive || self.scans > 1 || self.first_scan_components < self.sampling.len()
    }

    /// Bytes of the DCT coefficients libjpeg buffers (see [`Self::buffered`]): 64
    /// coefficients of 2 bytes per 8x8 block of each component, padded to whole MCUs.
    pub(super) fn coefficients(&self) -> u64 {
        let hmax = self.sampling.iter().map(|s| s.0).max().unwrap_or(1) as u64;
        let vmax = self.sampling.iter().map(|s| s.1).max().unwrap_or(1) as u64;
        let (w, h) = (self.width as u64, self.height as u64);
        self.sampling
            .iter()
            .map(|&(hs, vs)| {
                let bw = (w * hs as u64)
                    .div_ceil(8 * hmax)
                    .next_multiple_of(hs as u64);
                let bh = (h * vs as u64)
                    .div_ceil(8 * vmax)
                    .next_multiple_of(vs as u64);
                (bw + hs as u64) * (bh + vs as u64) * 128
            })
            .sum()
    }
}
