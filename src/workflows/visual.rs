//! The visualisation blocks: boxes, labels, masks, polygons, crops and classification labels
//! drawn on a copy of the image, as supervision's annotators draw them (colours by class or
//! by index from the block's palette), on the CPU pool. Text is DejaVu, not OpenCV's Hershey.

use image::{Rgb, RgbImage};
use serde_json::Value as Json;

use super::blocks::{BlockType, Kind};
use super::exec::{num, text};
use super::value::{Classification, Det, Detections, Value};
use crate::tasks::classification::ClassificationOutput;
use crate::tasks::draw;

/// What a visualisation step draws, with its settings.
#[derive(Clone)]
pub struct DrawSettings {
    kind: Kind,
    thickness: u32,
    palette: Vec<[u8; 3]>,
    by_index: bool,
    text: String,
    text_position: String,
    text_color: [u8; 3],
    text_scale: f32,
    padding: u32,
    opacity: f32,
    scale_factor: f32,
}

/// supervision's default palette (`ColorPalette.DEFAULT`), which Roboflow's blocks use.
const PALETTE: [&str; 21] = [
    "A351FB", "FF4040", "FFA1A0", "FF7633", "FFB633", "D1D435", "4CFB12", "94CF1A", "40DE8A",
    "1B9640", "00D6C1", "2E9CAA", "00C4FF", "364797", "6675FF", "0019EF", "863AFF", "530087",
    "CD3AFF", "FF97CA", "FF39C9",
];

fn hex(s: &str) -> Option<[u8; 3]> {
    let s = s.trim().trim_start_matches('#');
    if s.len() != 6 {
        return None;
    }
    let p = |i: usize| u8::from_str_radix(&s[i..i + 2], 16).ok();
    Some([p(0)?, p(2)?, p(4)?])
}

fn named_color(s: &str) -> Option<[u8; 3]> {
    Some(match s.to_ascii_uppercase().as_str() {
        "WHITE" => [255, 255, 255],
        "BLACK" => [0, 0, 0],
        "RED" => [255, 0, 0],
        "GREEN" => [0, 255, 0],
        "BLUE" => [0, 0, 255],
        "YELLOW" => [255, 255, 0],
        "ROBOFLOW" => [0xA3, 0x51, 0xFB],
        other => return hex(other),
    })
}

impl DrawSettings {
    pub fn of(block: &BlockType, get: &dyn Fn(&str) -> Option<Value>) -> Self {
        let custom: Vec<[u8; 3]> = match get("custom_colors") {
            Some(Value::Json(Json::Array(a))) => {
                a.iter().filter_map(|c| c.as_str().and_then(hex)).collect()
            }
            _ => Vec::new(),
        };
        let palette =
            if text(&get("color_palette")).as_deref() == Some("CUSTOM") && !custom.is_empty() {
                custom
            } else {
                PALETTE.iter().filter_map(|h| hex(h)).collect()
            };
        let n = |k: &str, d: f64| num(&get(k)).unwrap_or(d);
        let thickness_key = if block.kind == Kind::CropVisualization {
            "border_thickness"
        } else {
            "thickness"
        };
        Self {
            kind: block.kind,
            thickness: n(thickness_key, 2.0).clamp(1.0, 100.0) as u32,
            palette,
            by_index: text(&get("color_axis")).as_deref() == Some("INDEX"),
            text: text(&get("text")).unwrap_or_else(|| "Class".into()),
            // A crop visualisation's anchor is `position` (TOP_CENTER); labels' `text_position`.
            text_position: if block.kind == Kind::CropVisualization {
                text(&get("position")).unwrap_or_else(|| "TOP_CENTER".into())
            } else {
                text(&get("text_position")).unwrap_or_else(|| "TOP_LEFT".into())
            },
            text_color: text(&get("text_color"))
                .and_then(|c| named_color(&c))
                .unwrap_or([255, 255, 255]),
            text_scale: n("text_scale", 1.0).clamp(0.1, 10.0) as f32,
            padding: n("text_padding", 10.0).clamp(0.0, 100.0) as u32,
            opacity: n("opacity", 0.5).clamp(0.0, 1.0) as f32,
            // A crop drawn at most 4x its size, and never larger than the image (the
            // reference has no bound).
            scale_factor: n("scale_factor", 2.0).clamp(0.01, 4.0) as f32,
        }
    }

    /// The crop anchor (`position`) of a crop visualisation, read as its text position.
    pub fn position(&self) -> &str {
        &self.text_position
    }

    fn color(&self, i: usize, class_id: i64) -> [u8; 3] {
        let key = if self.by_index {
            i
        } else {
            class_id.max(0) as usize
        };
        self.palette[key % self.palette.len()]
    }

    /// Draws detections (boxes, labels, masks, polygons or crops) on `img`.
    pub fn draw(&self, img: &mut RgbImage, dets: &Detections) {
        if self.kind == Kind::Mask {
            self.masks(img, dets);
            return;
        }
        // A crop visualisation reads the crops from the image before anything is drawn.
        let source = (self.kind == Kind::CropVisualization).then(|| img.clone());
        for (i, d) in dets.dets.iter().enumerate() {
            let color = self.color(i, d.class_id);
            match self.kind {
                Kind::Label => {
                    let text = match self.text.as_str() {
                        "Confidence" => format!("{:.2}", d.confidence),
                        "Class and Confidence" => format!("{} {:.2}", d.class_name, d.confidence),
                        "Index" => i.to_string(),
                        "Dimensions" => format!("{} x {}", d.width().round(), d.height().round()),
                        _ => d.class_name.clone(),
                    };
                    // OpenCV's HERSHEY font at scale 1 is about 22 px tall.
                    draw::text_label(
                        img,
                        &text,
                        d.x1.round() as i32,
                        d.y1.round() as i32,
                        color,
                        self.text_color,
                        22.0 * self.text_scale,
                        self.padding,
                    );
                }
                Kind::Polygon => {
                    if let Some(p) = &d.polygon {
                        for (k, a) in p.iter().enumerate() {
                            let b = p[(k + 1) % p.len()];
                            draw::thick_line(img, *a, b, Rgb(color), self.thickness);
                        }
                    }
                }
                Kind::CropVisualization => {
                    if let Some(src) = &source {
                        self.crop(img, src, d, color);
                    }
                }
                _ => draw::outline(img, (d.x1, d.y1, d.x2, d.y2), color, self.thickness),
            }
        }
    }

    /// supervision's CropAnnotator: the box's pixels scaled by `scale_factor`, placed at the
    /// box's anchor (`position`), with a border in the detection's colour.
    fn crop(&self, img: &mut RgbImage, src: &RgbImage, d: &Det, color: [u8; 3]) {
        let (w, h) = (src.width() as i64, src.height() as i64);
        let clip = |v: f32, max: i64| (v as i64).clamp(0, max);
        let (x1, y1, x2, y2) = (clip(d.x1, w), clip(d.y1, h), clip(d.x2, w), clip(d.y2, h));
        if x2 <= x1 || y2 <= y1 {
            return;
        }
        let crop = image::imageops::crop_imm(
            src,
            x1 as u32,
            y1 as u32,
            (x2 - x1) as u32,
            (y2 - y1) as u32,
        )
        .to_image();
        // At most the image's own pixel count, however large the scale asked.
        let room = (src.width() as f32 * src.height() as f32)
            / (crop.width() as f32 * crop.height() as f32);
        let scale = self.scale_factor.min(room.sqrt());
        let (cw, ch) = (
            ((crop.width() as f32 * scale) as u32).max(1),
            ((crop.height() as f32 * scale) as u32).max(1),
        );
        let scaled = image::imageops::resize(&crop, cw, ch, image::imageops::FilterType::Triangle);
        let (cw, ch) = (cw as i64, ch as i64);
        let (cx, cy) = (((d.x1 + d.x2) / 2.0) as i64, ((d.y1 + d.y2) / 2.0) as i64);
        let (ax, ay) = (d.x1 as i64, d.y1 as i64);
        let (bx, by) = (d.x2 as i64, d.y2 as i64);
        let (px, py) = match self.position() {
            "TOP_LEFT" => (ax - cw, ay - ch),
            "TOP_RIGHT" => (bx, ay - ch),
            "CENTER_LEFT" => (ax - cw, cy - ch / 2),
            "CENTER" | "CENTER_OF_MASS" => (cx - cw / 2, cy - ch / 2),
            "CENTER_RIGHT" => (bx, cy - ch / 2),
            "BOTTOM_LEFT" => (ax - cw, by),
            "BOTTOM_CENTER" => (cx - cw / 2, by),
            "BOTTOM_RIGHT" => (bx, by),
            _ => (cx - cw / 2, ay - ch),
        };
        image::imageops::overlay(img, &scaled, px, py);
        draw::outline(
            img,
            (px as f32, py as f32, (px + cw) as f32, (py + ch) as f32),
            color,
            self.thickness,
        );
    }

    /// Writes a classification on `img`: its top class (single-label) or every class by
    /// confidence (multi-label), one line each, at `text_position`.
    pub fn draw_classification(&self, img: &mut RgbImage, c: &Classification) {
        let mut lines: Vec<(String, usize, f32)> = match &c.output {
            ClassificationOutput::SingleLabel { predictions, .. } => predictions
                .iter()
                .max_by(|a, b| a.confidence.total_cmp(&b.confidence))
                .map(|p| (p.class_name.clone(), p.class_id, p.confidence))
                .into_iter()
                .collect(),
            ClassificationOutput::MultiLabel {
                predictions,
                predicted_classes,
            } => predicted_classes
                .iter()
                .filter_map(|n| {
                    predictions
                        .get(n)
                        .map(|s| (n.clone(), s.class_id, s.confidence))
                })
                .collect(),
        };
        lines.sort_by(|a, b| b.2.total_cmp(&a.2));
        let px = 22.0 * self.text_scale;
        let spacing = (20.0 * self.text_scale) as i32 + 2 * self.padding as i32 + 7;
        let n = lines.len() as i32;
        let (w, h) = (img.width() as i32, img.height() as i32);
        for (i, (name, id, conf)) in lines.iter().enumerate() {
            let label = match self.text.as_str() {
                "Confidence" => format!("{conf:.2}"),
                "Class and Confidence" => format!("{name} {conf:.2}"),
                _ => name.clone(),
            };
            let (tw, _) = draw::label_size(&label, px, self.padding);
            let pos = self.text_position.as_str();
            let y = if pos.starts_with("BOTTOM") {
                h - spacing * (n - i as i32)
            } else if pos.starts_with("CENTER") {
                (h - spacing * n) / 2 + spacing * i as i32
            } else {
                spacing * i as i32
            };
            let x = if pos.ends_with("RIGHT") {
                w - tw as i32
            } else if pos.ends_with("CENTER") || pos == "CENTER" {
                (w - tw as i32) / 2
            } else {
                0
            };
            let color = self.color(i, *id as i64);
            draw::text_label(img, &label, x, y, color, self.text_color, px, self.padding);
        }
    }
}

/// The pixels of `poly` (boundary included), as runs `(y, from, to)` inside `w x h`.
fn runs(poly: &[(f32, f32)], w: u32, h: u32, mut run: impl FnMut(u32, u32, u32)) {
    if poly.len() < 3 {
        return;
    }
    let y0 = poly
        .iter()
        .map(|p| p.1)
        .fold(f32::MAX, f32::min)
        .floor()
        .max(0.0) as i64;
    let y1 = poly
        .iter()
        .map(|p| p.1)
        .fold(f32::MIN, f32::max)
        .ceil()
        .min(h as f32 - 1.0) as i64;
    for y in y0..=y1 {
        super::fusion::scan(poly, y as f32, |from, to| {
            let (from, to) = (from.max(0), to.min(w as i64 - 1));
            if from <= to {
                run(y as u32, from as u32, to as u32);
            }
        });
    }
}

impl DrawSettings {
    /// supervision's MaskAnnotator: every instance painted in its colour on one copy, the
    /// largest first (smaller ones on top), then the copy blended with the image once.
    fn masks(&self, img: &mut RgbImage, dets: &Detections) {
        let (w, h) = img.dimensions();
        let mut order: Vec<usize> = (0..dets.dets.len()).collect();
        let area = |d: &Det| d.width() * d.height();
        order.sort_by(|&a, &b| area(&dets.dets[b]).total_cmp(&area(&dets.dets[a])));
        let mut painted = img.clone();
        let mut touched = vec![false; (w as usize) * (h as usize)];
        for i in order {
            let d = &dets.dets[i];
            let color = self.color(i, d.class_id);
            if let Some(p) = &d.polygon {
                runs(p, w, h, |y, from, to| {
                    for x in from..=to {
                        painted.put_pixel(x, y, Rgb(color));
                        touched[(y * w + x) as usize] = true;
                    }
                });
            }
        }
        let o = self.opacity;
        for (k, (p, q)) in img.pixels_mut().zip(painted.pixels()).enumerate() {
            if touched[k] {
                for c in 0..3 {
                    p.0[c] = (p.0[c] as f32 * (1.0 - o) + q.0[c] as f32 * o).round() as u8;
                }
            }
        }
    }
}
