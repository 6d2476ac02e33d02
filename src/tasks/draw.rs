//! Server-side drawing of predictions on the original image, as Roboflow's server draws them
//! (legacy `format=image`/`image_and_json`, `visualize_predictions` on `/infer/*`): boxes of
//! width `stroke` in the class colour (`COLORS` of environment.json, else one default
//! colour), segmentation polygons outlined and closed, and with `labels` a
//! `"{class} {confidence:.2f}"` label on a filled background at the box's top-left, clipped to
//! the image; classification writes the top class (every predicted class for multi-label)
//! at the top-left. Runs on the postprocess pool, only when asked.

use std::collections::HashMap;
use std::sync::LazyLock;

use ab_glyph::{FontRef, PxScale};
use image::{Rgb, RgbImage};
use imageproc::drawing::{
    draw_filled_circle_mut, draw_filled_rect_mut, draw_line_segment_mut, draw_text_mut, text_size,
};
use imageproc::rect::Rect;

use super::classification::ClassificationOutput;
use super::detection::ObjectDetectionPrediction;
use super::segmentation::MaskBody;
use super::TaskOutput;

/// Roboflow's default annotation colour (#4892EA), for classes without a `COLORS` entry.
pub const DEFAULT_COLOR: [u8; 3] = [0x48, 0x92, 0xEA];

/// DejaVu Sans (Bitstream Vera licence, see assets/DejaVuSans-LICENSE.txt).
static FONT: LazyLock<FontRef<'static>> = LazyLock::new(|| {
    FontRef::try_from_slice(include_bytes!("../../assets/DejaVuSans.ttf"))
        .expect("the bundled font parses")
});

/// What to draw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DrawOptions {
    pub labels: bool,
    /// Line width in pixels (at least 1).
    pub stroke: u32,
}

/// Draws `output` on `img` (the image as the client sent it, oriented).
pub fn draw(
    img: &mut RgbImage,
    output: &TaskOutput,
    colors: &HashMap<String, [u8; 3]>,
    opts: DrawOptions,
) {
    let color = |class: &str| Rgb(*colors.get(class).unwrap_or(&DEFAULT_COLOR));
    let stroke = opts.stroke.clamp(1, 100);
    match output {
        TaskOutput::Detection(preds) => {
            for p in preds {
                boxed(img, p, color(&p.class_name), stroke, opts.labels);
            }
        }
        TaskOutput::Segmentation(preds) => {
            for p in preds {
                let c = color(&p.detection.class_name);
                if let MaskBody::Polygon { points, .. } = &p.mask {
                    for (i, a) in points.iter().enumerate() {
                        let b = &points[(i + 1) % points.len()];
                        thick_line(img, (a.x, a.y), (b.x, b.y), c, stroke);
                    }
                }
                boxed(img, &p.detection, c, stroke, opts.labels);
            }
        }
        TaskOutput::Keypoints(preds) => {
            for p in preds {
                let c = color(&p.detection.class_name);
                boxed(img, &p.detection, c, stroke, opts.labels);
                // Each keypoint a dot in the class colour (Roboflow's vertex annotator).
                for k in &p.keypoints {
                    draw_filled_circle_mut(
                        img,
                        (k.x as i32, k.y as i32),
                        (stroke as i32 + 2).max(3),
                        c,
                    );
                }
            }
        }
        TaskOutput::Classification(out) => {
            let lines: Vec<(String, Rgb<u8>)> = match out {
                ClassificationOutput::SingleLabel {
                    top, confidence, ..
                } if !top.is_empty() => vec![(format!("{top} {confidence:.2}"), color(top))],
                ClassificationOutput::SingleLabel { .. } => vec![],
                ClassificationOutput::MultiLabel {
                    predictions,
                    predicted_classes,
                } => predicted_classes
                    .iter()
                    .map(|c| {
                        let conf = predictions.get(c).map_or(0.0, |s| s.confidence);
                        (format!("{c} {conf:.2}"), color(c))
                    })
                    .collect(),
            };
            let mut y = 0i32;
            for (text, c) in lines {
                y += label(img, &text, 0, y, c, scale_for(img)) as i32;
            }
        }
    }
}

/// Text size for an image: readable on phone photos and thumbnails alike.
fn scale_for(img: &RgbImage) -> f32 {
    (img.width().max(img.height()) as f32 / 60.0).clamp(12.0, 48.0)
}

fn boxed(img: &mut RgbImage, p: &ObjectDetectionPrediction, c: Rgb<u8>, stroke: u32, labels: bool) {
    let (x1, y1) = (p.x - p.width / 2.0, p.y - p.height / 2.0);
    outline(img, (x1, y1, x1 + p.width, y1 + p.height), c.0, stroke);
    if labels {
        let text = format!("{} {:.2}", p.class_name, p.confidence);
        let px = scale_for(img);
        text_label(
            img,
            &text,
            x1.round() as i32,
            y1.round() as i32,
            c.0,
            [255, 255, 255],
            px,
            (px / 6.0).ceil() as u32,
        );
    }
}

/// A box outline `stroke` pixels wide in `c`, growing inwards from the corners `(x1, y1)`,
/// `(x2, y2)` (rounded to whole pixels).
pub fn outline(img: &mut RgbImage, corners: (f32, f32, f32, f32), c: [u8; 3], stroke: u32) {
    let (x0, y0) = (corners.0.round() as i32, corners.1.round() as i32);
    let (w, h) = (
        (corners.2 - corners.0).round() as i32,
        (corners.3 - corners.1).round() as i32,
    );
    for k in 0..stroke.clamp(1, 100) as i32 {
        let (rw, rh) = (w - 2 * k, h - 2 * k);
        if rw <= 0 || rh <= 0 {
            break;
        }
        let r = Rect::at(x0 + k, y0 + k).of_size(rw as u32, rh as u32);
        imageproc::drawing::draw_hollow_rect_mut(img, r, Rgb(c));
    }
}

/// The size of a `text_label` of `text` (`px` pixels, `pad` padding).
pub fn label_size(text: &str, px: f32, pad: u32) -> (u32, u32) {
    let (tw, th) = text_size(PxScale::from(px), &*FONT, text);
    (tw + 2 * pad, th + 2 * pad)
}

/// A filled label background in `bg` with `fg` text of `px` pixels and `pad` pixels of
/// padding, its top-left at (x, y) moved inside the image; returns its height.
#[allow(clippy::too_many_arguments)]
pub fn text_label(
    img: &mut RgbImage,
    text: &str,
    x: i32,
    y: i32,
    bg: [u8; 3],
    fg: [u8; 3],
    px: f32,
    pad: u32,
) -> u32 {
    let scale = PxScale::from(px);
    let (tw, th) = text_size(scale, &*FONT, text);
    let (bw, bh) = (tw + 2 * pad, th + 2 * pad);
    let x = x.clamp(0, (img.width() as i32 - bw as i32).max(0));
    let y = y.clamp(0, (img.height() as i32 - bh as i32).max(0));
    draw_filled_rect_mut(img, Rect::at(x, y).of_size(bw, bh), Rgb(bg));
    draw_text_mut(
        img,
        Rgb(fg),
        x + pad as i32,
        y + pad as i32,
        scale,
        &*FONT,
        text,
    );
    bh
}

/// A filled label background in `c` with white text, its top-left at (x, y) moved inside the
/// image; returns its height.
fn label(img: &mut RgbImage, text: &str, x: i32, y: i32, c: Rgb<u8>, px: f32) -> u32 {
    text_label(
        img,
        text,
        x,
        y,
        c.0,
        [255, 255, 255],
        px,
        (px / 6.0).ceil() as u32,
    )
}

/// A line `stroke` pixels wide from `a` to `b`.
pub fn thick_line(img: &mut RgbImage, a: (f32, f32), b: (f32, f32), c: Rgb<u8>, stroke: u32) {
    let half = (stroke as f32 - 1.0) / 2.0;
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let len = (dx * dx + dy * dy).sqrt().max(1e-3);
    let (nx, ny) = (-dy / len, dx / len);
    for k in 0..stroke {
        let o = k as f32 - half;
        draw_line_segment_mut(
            img,
            (a.0 + nx * o, a.1 + ny * o),
            (b.0 + nx * o, b.1 + ny * o),
            c,
        );
    }
}

/// Encodes as JPEG (libjpeg-turbo, quality 90).
pub fn encode_jpeg(img: &RgbImage) -> Result<Vec<u8>, String> {
    encode_jpeg_quality(img, 90)
}

/// Encodes as JPEG at `quality` (workflows answer quality 95, as Roboflow's).
pub fn encode_jpeg_quality(img: &RgbImage, quality: i32) -> Result<Vec<u8>, String> {
    let image = turbojpeg::Image {
        pixels: img.as_raw().as_slice(),
        width: img.width() as usize,
        pitch: img.width() as usize * 3,
        height: img.height() as usize,
        format: turbojpeg::PixelFormat::RGB,
    };
    turbojpeg::compress(image, quality, turbojpeg::Subsamp::Sub2x2)
        .map(|b| b.to_vec())
        .map_err(|e| format!("cannot encode the visualisation: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn det(x: f32, y: f32, w: f32, h: f32, class: &str) -> ObjectDetectionPrediction {
        ObjectDetectionPrediction {
            x,
            y,
            width: w,
            height: h,
            confidence: 0.87,
            class_name: class.into(),
            class_id: 0,
            detection_id: String::new(),
        }
    }

    #[test]
    fn boxes_are_drawn_in_the_class_colour_and_nothing_else_changes() {
        let mut img = RgbImage::from_pixel(100, 80, Rgb([10, 10, 10]));
        let colors = HashMap::from([("dog".to_string(), [255, 0, 0])]);
        let out = TaskOutput::Detection(vec![det(50.0, 40.0, 40.0, 20.0, "dog")]);
        draw(
            &mut img,
            &out,
            &colors,
            DrawOptions {
                labels: false,
                stroke: 2,
            },
        );
        // Edges (two pixels wide) in red, the inside and the outside untouched.
        for (x, y) in [(30, 30), (31, 31), (69, 40), (50, 49), (50, 48)] {
            assert_eq!(img.get_pixel(x, y).0, [255, 0, 0], "({x},{y})");
        }
        for (x, y) in [(50, 40), (32, 32), (5, 5), (29, 30), (50, 51)] {
            assert_eq!(img.get_pixel(x, y).0, [10, 10, 10], "({x},{y})");
        }
    }

    #[test]
    fn labels_stay_inside_the_image_and_hex_colours_parse() {
        let mut img = RgbImage::from_pixel(120, 60, Rgb([0, 0, 0]));
        let out = TaskOutput::Detection(vec![det(5.0, 3.0, 10.0, 6.0, "cat")]);
        draw(
            &mut img,
            &out,
            &HashMap::new(),
            DrawOptions {
                labels: true,
                stroke: 1,
            },
        );
        assert_eq!(img.get_pixel(0, 0).0, DEFAULT_COLOR);
    }
}
