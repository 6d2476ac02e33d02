//! Small shared types of the network input: how an image is fitted to it ([`ResizeMode`]),
//! its value range ([`Normalization`]), its size ([`InputSpec`]), and where the original image
//! lies in it ([`Geometry`]). Preprocessing produces a `Geometry`; the task decoders map
//! network coordinates back through it. The lowest room: it imports nothing of the crate.

/// How an image is fitted to the network input (Roboflow's `PREPROCESSING.resize.format`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ResizeMode {
    /// "Stretch to": both axes scaled independently.
    Stretch,
    /// "Fit (black|grey|white edges) in": aspect kept, centred, padded with `pad`.
    Letterbox { pad: u8 },
}

impl ResizeMode {
    /// Parses Roboflow's format string. Unknown or absent formats stretch, as Roboflow does;
    /// the other "Fit" variants fall back to black edges, as Roboflow does.
    pub fn from_roboflow(format: Option<&str>) -> Self {
        match format {
            Some("Fit (white edges) in") => ResizeMode::Letterbox { pad: 255 },
            Some("Fit (grey edges) in") => ResizeMode::Letterbox { pad: 114 },
            Some(f) if f.starts_with("Fit") || f.starts_with("Fill") => {
                ResizeMode::Letterbox { pad: 0 }
            }
            _ => ResizeMode::Stretch,
        }
    }
}

/// The value range the network expects.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Normalization {
    /// RGB / 255 (detection, segmentation).
    ZeroToOne,
    /// (RGB / 255 - 0.5) / 0.5 (classification).
    MinusOneToOne,
}

impl Normalization {
    /// The float value of each byte value.
    pub fn lut(self) -> [f32; 256] {
        let mut lut = [0f32; 256];
        for (v, out) in lut.iter_mut().enumerate() {
            *out = match self {
                Normalization::ZeroToOne => v as f32 / 255.0,
                Normalization::MinusOneToOne => (v as f32 / 255.0 - 0.5) / 0.5,
            };
        }
        lut
    }
}

/// What the network input looks like.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InputSpec {
    pub width: u32,
    pub height: u32,
    pub resize: ResizeMode,
    pub normalization: Normalization,
}

impl InputSpec {
    /// f32 values of one image in the batch tensor.
    pub fn image_len(&self) -> usize {
        3 * self.width as usize * self.height as usize
    }
}

/// Where the original image lies in the network input: content of `content_w x content_h`
/// network pixels starting at (`left`, `top`), standing for `orig_w x orig_h` original pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Geometry {
    pub left: f32,
    pub top: f32,
    pub content_w: f32,
    pub content_h: f32,
    pub orig_w: u32,
    pub orig_h: u32,
}

impl Geometry {
    /// Computes the placement of a `src_w x src_h` image in `spec` (Roboflow's letterbox
    /// maths: the longer side fills, the other is truncated to whole pixels, centred).
    pub fn compute(src_w: u32, src_h: u32, orig_w: u32, orig_h: u32, spec: &InputSpec) -> Self {
        let (nw, nh) = (spec.width, spec.height);
        let (cw, ch) = match spec.resize {
            ResizeMode::Stretch => (nw, nh),
            ResizeMode::Letterbox { .. } => {
                let r = src_w as f64 / src_h as f64;
                if r > nw as f64 / nh as f64 {
                    (nw, ((nw as f64 / r) as u32).clamp(1, nh))
                } else {
                    (((nh as f64 * r) as u32).clamp(1, nw), nh)
                }
            }
        };
        Geometry {
            left: ((nw - cw) / 2) as f32,
            top: ((nh - ch) / 2) as f32,
            content_w: cw as f32,
            content_h: ch as f32,
            orig_w,
            orig_h,
        }
    }

    /// Maps a point in network-input pixels to original-image pixels (not clipped).
    pub fn to_original(&self, x: f32, y: f32) -> (f32, f32) {
        (
            (x - self.left) * self.orig_w as f32 / self.content_w,
            (y - self.top) * self.orig_h as f32 / self.content_h,
        )
    }
}
