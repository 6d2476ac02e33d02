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
        match &self.pixels {
            FramePixels::Bytes(b) => {
                if b.len() != len {
                    return Err(DecodeError::Undecodable(format!(
                        "a {w}x{h} RGB frame has {len} bytes, not {}",
                        b.len()
                    )));
                }
                out[..len].copy_from_slice(b);
            }
            FramePixels::Region { region, offset } => region
                .read_at(*offset, &mut out[..len])
                .map_err(|e| DecodeError::Undecodable(e.to_string()))?,
        }
        Ok(DecodedImage {
            slot,
            width: w,
            height: h,
            orig_width: w,
            orig_height: h,
        })
    }
}
