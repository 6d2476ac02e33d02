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
    /// (RGB / 255 - mean) / std with ImageNet's mean and std (RF-DETR); letterbox padding is
    /// 0 after normalising (the mean colour), as Roboflow pads the normalised image.
    ImageNet,
}

const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

impl Normalization {
    /// The float value of each byte value, per channel (R, G, B).
    pub fn luts(self) -> [[f32; 256]; 3] {
        let mut luts = [[0f32; 256]; 3];
        for (c, lut) in luts.iter_mut().enumerate() {
            for (v, out) in lut.iter_mut().enumerate() {
                let x = v as f32 / 255.0;
                *out = match self {
                    Normalization::ZeroToOne => x,
                    Normalization::MinusOneToOne => (x - 0.5) / 0.5,
                    Normalization::ImageNet => (x - IMAGENET_MEAN[c]) / IMAGENET_STD[c],
                };
            }
        }
        luts
    }

    /// The float value of letterbox padding of byte value `pad` in channel `c`.
    pub fn pad_value(self, luts: &[[f32; 256]; 3], c: usize, pad: u8) -> f32 {
        match self {
            Normalization::ImageNet => 0.0,
            _ => luts[c][pad as usize],
        }
    }
}

/// Roboflow's `static-crop`: the kept region in percent of the (oriented) image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StaticCrop {
    pub x_min: f64,
    pub y_min: f64,
    pub x_max: f64,
    pub y_max: f64,
}

/// Where a static crop lies in an image, in the image's pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropRect {
    /// The pixels kept: `int(percent / 100 * side)` on each edge, as Roboflow crops.
    pub x0: u32,
    pub y0: u32,
    pub x1: u32,
    pub y1: u32,
    /// Where predictions are mapped: Roboflow's `round(x_min% * W)` shift and
    /// `round(side * (max% - min%))` size.
    pub shift_x: u32,
    pub shift_y: u32,
    pub map_w: u32,
    pub map_h: u32,
}

impl StaticCrop {
    /// The crop of a `w x h` image; at least one pixel on each side.
    pub fn rect(&self, w: u32, h: u32) -> CropRect {
        let frac = |p: f64| (p / 100.0).clamp(0.0, 1.0);
        let (fx0, fy0) = (frac(self.x_min), frac(self.y_min));
        let (fx1, fy1) = (frac(self.x_max).max(fx0), frac(self.y_max).max(fy0));
        let edge = |f: f64, side: u32| ((f * side as f64) as u32).min(side);
        let (x0, y0) = (edge(fx0, w).min(w - 1), edge(fy0, h).min(h - 1));
        let (x1, y1) = (edge(fx1, w).max(x0 + 1), edge(fy1, h).max(y0 + 1));
        CropRect {
            x0,
            y0,
            x1,
            y1,
            shift_x: (fx0 * w as f64).round() as u32,
            shift_y: (fy0 * h as f64).round() as u32,
            map_w: ((w as f64 * (fx1 - fx0)).round() as u32).max(1),
            map_h: ((h as f64 * (fy1 - fy0)).round() as u32).max(1),
        }
    }
}

/// Roboflow's `contrast` types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contrast {
    /// "Contrast Stretching": values between the 2nd and 98th percentiles stretched to 0..255.
    Stretching,
    /// "Histogram Equalization": of the grey image (the result is grey).
    HistogramEqualization,
    /// "Adaptive Equalization": CLAHE (clip limit 0.03, 8x8 tiles) of the grey image.
    AdaptiveEqualization,
}

impl Contrast {
    pub fn from_roboflow(s: &str) -> Option<Self> {
        match s {
            "Contrast Stretching" => Some(Contrast::Stretching),
            "Histogram Equalization" => Some(Contrast::HistogramEqualization),
            "Adaptive Equalization" => Some(Contrast::AdaptiveEqualization),
            _ => None,
        }
    }
}

/// The `PREPROCESSING` steps applied before resizing, in Roboflow's order: static crop,
/// contrast, grayscale.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Steps {
    pub static_crop: Option<StaticCrop>,
    pub contrast: Option<Contrast>,
    pub grayscale: bool,
}

/// The request's `disable_preproc_*` switches (and the `DISABLE_PREPROC_*` settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DisabledSteps {
    pub auto_orient: bool,
    pub static_crop: bool,
    pub contrast: bool,
    pub grayscale: bool,
}

impl DisabledSteps {
    /// Either set of switches disables a step.
    pub fn or(self, o: DisabledSteps) -> Self {
        Self {
            auto_orient: self.auto_orient || o.auto_orient,
            static_crop: self.static_crop || o.static_crop,
            contrast: self.contrast || o.contrast,
            grayscale: self.grayscale || o.grayscale,
        }
    }
}

impl Steps {
    /// The steps left once `disabled` are taken out.
    pub fn without(self, disabled: DisabledSteps) -> Self {
        Self {
            static_crop: self.static_crop.filter(|_| !disabled.static_crop),
            contrast: self.contrast.filter(|_| !disabled.contrast),
            grayscale: self.grayscale && !disabled.grayscale,
        }
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
/// network pixels starting at (`left`, `top`), standing for `orig_w x orig_h` original pixels
/// (the static crop's size when there is one), which lie at (`shift_x`, `shift_y`) in the
/// `full_w x full_h` image the client sent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Geometry {
    pub left: f32,
    pub top: f32,
    pub content_w: f32,
    pub content_h: f32,
    pub orig_w: u32,
    pub orig_h: u32,
    pub shift_x: u32,
    pub shift_y: u32,
    pub full_w: u32,
    pub full_h: u32,
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
            shift_x: 0,
            shift_y: 0,
            full_w: orig_w,
            full_h: orig_h,
        }
    }

    /// The same placement for a crop of a `full_w x full_h` image mapped at `crop`.
    pub fn cropped(self, crop: &CropRect, full_w: u32, full_h: u32) -> Self {
        Self {
            orig_w: crop.map_w,
            orig_h: crop.map_h,
            shift_x: crop.shift_x,
            shift_y: crop.shift_y,
            full_w,
            full_h,
            ..self
        }
    }

    /// Maps a point in network-input pixels to the client's image: clipped to the crop (or
    /// image), rounded to whole pixels, then shifted by the crop, as Roboflow does.
    pub fn to_full_rounded(&self, x: f32, y: f32) -> (f32, f32) {
        let (ox, oy) = self.to_original(x, y);
        (
            ox.clamp(0.0, self.orig_w as f32).round() + self.shift_x as f32,
            oy.clamp(0.0, self.orig_h as f32).round() + self.shift_y as f32,
        )
    }

    /// Maps a point in network-input pixels to original-image pixels (not clipped).
    pub fn to_original(&self, x: f32, y: f32) -> (f32, f32) {
        (
            (x - self.left) * self.orig_w as f32 / self.content_w,
            (y - self.top) * self.orig_h as f32 / self.content_h,
        )
    }
}
