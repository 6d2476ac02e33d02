//! Raw RGB frames a client sends as pixels (the Open Inference Protocol's `pixels` input): in
//! the request body, or in a shared-memory region of the client's. Nothing to decode: the
//! frame is copied once, into its ring slot, where a decoded image would be, and goes on
//! through the same pipeline. A frame in a region is read with `pread` (see
//! [`crate::regions`]), so a client that shrinks its region mid-read gets an error, not a
//! crashed server.

use bytes::Bytes;

use super::decode::{DecodeError, DecodedImage};
use super::ring::SlotHandle;
use crate::regions::RegionUse;

/// A `width x height` RGB frame, rows packed (`width * height * 3` bytes).
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub width: u32,
    pub height: u32,
    pub pixels: FramePixels,
}

/// Where a frame's bytes are.
#[derive(Debug, Clone)]
pub enum FramePixels {
    /// In memory (a slice of the request body).
    Bytes(Bytes),
    /// At `offset` in a client's region (held registered while the request lives).
    Region {
        region: std::sync::Arc<RegionUse>,
        offset: u64,
    },
    /// The `width x height` window at (`x`, `y`) of a decoded image (a workflow's crop): its
    /// rows are copied straight into the slot, never into a buffer of their own first.
    Window {
        image: std::sync::Arc<image::RgbImage>,
        x: u32,
        y: u32,
    },
}

impl PartialEq for FramePixels {
    /// The same bytes, or the same place in the same region.
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Bytes(a), Self::Bytes(b)) => a == b,
            (
                Self::Region { region, offset },
                Self::Region {
                    region: r2,
                    offset: o2,
                },
            ) => std::sync::Arc::ptr_eq(region, r2) && offset == o2,
            (
                Self::Window { image, x, y },
                Self::Window {
                    image: i2,
                    x: x2,
                    y: y2,
                },
            ) => std::sync::Arc::ptr_eq(image, i2) && x == x2 && y == y2,
            _ => false,
        }
    }
}

impl Frame {
    /// Bytes of the frame.
    pub fn len(&self) -> usize {
        self.width as usize * self.height as usize * 3
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies the frame's pixels into `out` (exactly [`Self::len`] bytes).
    pub fn read_into(&self, out: &mut [u8]) -> Result<(), DecodeError> {
        let (w, h) = (self.width, self.height);
        let len = self.len();
        match &self.pixels {
            FramePixels::Bytes(b) => {
                if b.len() != len {
                    return Err(DecodeError::Undecodable(format!(
                        "a {w}x{h} RGB frame has {len} bytes, not {}",
                        b.len()
                    )));
                }
                out.copy_from_slice(b);
            }
            FramePixels::Region { region, offset } => region
                .read_at(*offset, out)
                .map_err(|e| DecodeError::Undecodable(e.to_string()))?,
            FramePixels::Window { image, x, y } => {
                if x + w > image.width() || y + h > image.height() {
                    return Err(DecodeError::Undecodable(format!(
                        "a {w}x{h} window at ({x}, {y}) does not fit a {}x{} image",
                        image.width(),
                        image.height()
                    )));
                }
                let stride = image.width() as usize * 3;
                let row = w as usize * 3;
                let src = image.as_raw();
                for (r, dst) in out.chunks_exact_mut(row).take(h as usize).enumerate() {
                    let start = (*y as usize + r) * stride + *x as usize * 3;
                    dst.copy_from_slice(&src[start..start + row]);
                }
            }
        }
        Ok(())
    }

    /// Copies the frame into `slot`, refusing one larger than a slot (RING_SLOT_PIXELS) or
    /// than MAX_IMAGE_PIXELS.
    pub fn copy_into(
        self,
        mut slot: SlotHandle,
        max_image_pixels: u64,
    ) -> Result<DecodedImage, DecodeError> {
        let (w, h) = (self.width, self.height);
        let pixels = w as u64 * h as u64;
        if pixels > max_image_pixels {
            return Err(DecodeError::TooManyPixels {
                width: w as u64,
                height: h as u64,
                max: max_image_pixels,
            });
        }
        let len = self.len();
        let out = slot.bytes_mut();
        if len > out.len() {
            return Err(DecodeError::FrameTooLarge {
                width: w,
                height: h,
                max: out.len() as u64 / 3,
            });
        }
        self.read_into(&mut out[..len])?;
        Ok(DecodedImage {
            slot,
            width: w,
            height: h,
            orig_width: w,
            orig_height: h,
        })
    }
}
