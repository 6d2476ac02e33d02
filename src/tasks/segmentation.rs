//! Instance segmentation: detections as in `detection` (YOLOv8-seg, server NMS) or as the
//! end-to-end heads give them (YOLO26-seg rows, RF-DETR queries), plus a mask per detection
//! on the mask grid the request's `mask_decode_mode` picks. YOLO masks are sigmoid(coefficients
//! . prototypes), computed only inside the detection's box and thresholded at 0.5; an RF-DETR
//! query's mask is its own logits, `> 0`, over the letterboxed image. Each is returned as a
//! polygon (outer contour of the largest piece) or as COCO RLE at original-image resolution.
//! Full-image float masks are never built.

use rayon::prelude::*;
use serde::Serialize;

use super::contours::outer_contour;
pub use super::contours::BoxMask;
use super::detection::{self, Candidate, DetectionParams, YoloLayout};
use super::error::PostprocessError;
use super::heads::{self, DetectionHead, HeadHints};
use super::rle;
use crate::geometry::Geometry;
use crate::model::backend::OutputTensor;

/// Roboflow's `mask_decode_mode`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MaskDecodeMode {
    /// Mask grid = network input size.
    Accurate,
    /// Mask grid = prototype grid (input / 4).
    Fast,
    /// Grid between the two: `int(proto * (1 - t) + input * t)` per axis.
    Tradeoff(f32),
}

impl MaskDecodeMode {
    /// The mask grid (height, width) for prototypes of `proto` and a network input of `input`.
    pub fn grid(self, proto: (usize, usize), input: (usize, usize)) -> (usize, usize) {
        let mix =
            |p: usize, i: usize, t: f32| ((p as f32 * (1.0 - t) + i as f32 * t) as usize).max(1);
        match self {
            MaskDecodeMode::Accurate => input,
            MaskDecodeMode::Fast => proto,
            MaskDecodeMode::Tradeoff(t) => (mix(proto.0, input.0, t), mix(proto.1, input.1, t)),
        }
    }
}

/// Roboflow's `response_mask_format`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MaskFormat {
    Polygon,
    Rle,
}

/// Per-request settings of segmentation.
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentationParams {
    pub detection: DetectionParams,
    pub mode: MaskDecodeMode,
    pub format: MaskFormat,
    /// Largest masks x mask-output pixels one image may cost (MAX_MASK_WORK_PIXELS).
    pub max_work_pixels: u64,
}

/// Default of MAX_MASK_WORK_PIXELS.
pub const MAX_WORK_PIXELS: u64 = 2_000_000_000;

/// Output shapes of a segmentation model, per image.
#[derive(Debug, Clone, PartialEq)]
pub struct SegLayout {
    pub kind: SegKind,
    /// Index of the detections output: `[4 + nc + nm, N]` (YOLO) or `[N, 6 + nm]` (end-to-end);
    /// unused for RF-DETR (its head knows its outputs).
    pub pred: usize,
    /// Index of the `[nm, mh, mw]` prototype output, or of RF-DETR's `[Q, mh, mw]` mask logits.
    pub protos: usize,
    pub pred_dims: (usize, usize),
    pub proto_dims: (usize, usize, usize),
    pub num_classes: usize,
}

/// How a segmentation model lays out its detections and masks.
#[derive(Debug, Clone, PartialEq)]
pub enum SegKind {
    /// YOLOv8/v11-seg: `[4 + nc + nm, N]` candidates, the server runs NMS; mask =
    /// sigmoid(coefficients . prototypes) inside the box.
    Yolo,
    /// YOLO26-seg: `[N, 6 + nm]` rows `x1, y1, x2, y2, score, class, coefficients` (NMS in
    /// the graph); masks as YOLO's.
    EndToEnd,
    /// RF-DETR-seg: boxes as its detection head; each query's own mask logits over the whole
    /// input (`> 0`, not cropped to the box); boxes are not rounded.
    RfDetr(DetectionHead),
}

/// Computes the mask of one detection: `coeffs` (nm values) against `protos` (`nm x mh x mw`),
/// for the box `bx` (x1, y1, x2, y2 in network pixels) of a network input `input` (h, w), on a
/// grid of `grid` (h, w). Cells are kept when x1 <= cell < x2 on the grid (Roboflow's crop)
/// and the bilinearly resized sigmoid mask is >= 0.5.
pub fn box_mask(
    coeffs: &[f32],
    protos: &[f32],
    proto_dims: (usize, usize, usize),
    bx: (f32, f32, f32, f32),
    input: (usize, usize),
    grid: (usize, usize),
) -> BoxMask {
    let (nm, mh, mw) = proto_dims;
    sampled_mask(bx, (mh, mw), input, grid, true, |(px0, px1), (py0, py1)| {
        let rw = px1 - px0;
        let mut region = vec![0f32; rw * (py1 - py0)];
        for (k, &c) in coeffs.iter().enumerate().take(nm) {
            let plane = &protos[k * mh * mw..(k + 1) * mh * mw];
            for (r, dst) in region.chunks_exact_mut(rw).enumerate() {
                let src = &plane[(py0 + r) * mw + px0..(py0 + r) * mw + px1];
                for (d, s) in dst.iter_mut().zip(src) {
                    *d += c * s;
                }
            }
        }
        for v in region.iter_mut() {
            *v = 1.0 / (1.0 + (-*v).exp());
        }
        region
    })
}

/// RF-DETR's mask of one query: its `mh x mw` logits bilinearly resampled on the grid over
/// the letterboxed image's area `area` (x1, y1, x2, y2 in network pixels), kept where `> 0`.
pub fn query_mask(
    logits: &[f32],
    dims: (usize, usize),
    area: (f32, f32, f32, f32),
    input: (usize, usize),
    grid: (usize, usize),
) -> BoxMask {
    let mw = dims.1;
    sampled_mask(area, dims, input, grid, false, |(px0, px1), (py0, py1)| {
        (py0..py1)
            .flat_map(|y| logits[y * mw + px0..y * mw + px1].iter().copied())
            .collect()
    })
}

/// The cells of the grid (h, w) inside `bx` (x1 <= cell < x2, network pixels), each the
/// bilinear sample (cv2 INTER_LINEAR, half-pixel centres) of an `mh x mw` plane, kept when
/// `>= 0.5` (`probabilities`) or `> 0` (logits). `region(xs, ys)` gives the plane's values
/// over the cells the samples touch (row-major).
fn sampled_mask(
    bx: (f32, f32, f32, f32),
    (mh, mw): (usize, usize),
    input: (usize, usize),
    grid: (usize, usize),
    probabilities: bool,
    region: impl FnOnce((usize, usize), (usize, usize)) -> Vec<f32>,
) -> BoxMask {
    let (gh, gw) = grid;
    let (sx, sy) = (gw as f32 / input.1 as f32, gh as f32 / input.0 as f32);
    let span = |a: f32, b: f32, scale: f32, n: usize| {
        let lo = (a * scale).ceil().clamp(0.0, n as f32) as usize;
        let hi = (b * scale).ceil().clamp(0.0, n as f32) as usize;
        (lo, hi.max(lo))
    };
    let (gx0, gx1) = span(bx.0, bx.2, sx, gw);
    let (gy0, gy1) = span(bx.1, bx.3, sy, gh);
    let (w, h) = (gx1 - gx0, gy1 - gy0);
    let mut mask = BoxMask {
        x0: gx0,
        y0: gy0,
        w,
        h,
        grid_w: gw,
        grid_h: gh,
        bits: vec![false; w * h],
    };
    if w == 0 || h == 0 {
        return mask;
    }
    // Where each grid cell samples the plane (cv2 INTER_LINEAR, half-pixel centres).
    let sample = |g: usize, n_grid: usize, n_plane: usize| -> (usize, usize, f32) {
        if n_grid == n_plane {
            return (g, g, 0.0);
        }
        let src = ((g as f32 + 0.5) * n_plane as f32 / n_grid as f32 - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(n_plane - 1);
        let i1 = (i0 + 1).min(n_plane - 1);
        (i0, i1, src - i0 as f32)
    };
    let xs: Vec<_> = (gx0..gx1).map(|g| sample(g, gw, mw)).collect();
    let ys: Vec<_> = (gy0..gy1).map(|g| sample(g, gh, mh)).collect();
    // The plane cells those samples touch: values only there.
    let (px0, px1) = (xs[0].0, xs[w - 1].1 + 1);
    let (py0, py1) = (ys[0].0, ys[h - 1].1 + 1);
    let rw = px1 - px0;
    let values = region((px0, px1), (py0, py1));
    let at = |x: usize, y: usize| values[(y - py0) * rw + (x - px0)];
    for (j, &(y0, y1, fy)) in ys.iter().enumerate() {
        for (i, &(x0, x1, fx)) in xs.iter().enumerate() {
            let top = at(x0, y0) * (1.0 - fx) + at(x1, y0) * fx;
            let bottom = at(x0, y1) * (1.0 - fx) + at(x1, y1) * fx;
            let v = top * (1.0 - fy) + bottom * fy;
            mask.bits[j * w + i] = if probabilities { v >= 0.5 } else { v > 0.0 };
        }
    }
    mask
}

/// A polygon point in original-image pixels.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Point {
    pub x: f32,
    pub y: f32,
}

/// The mask part of a segmentation prediction.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
#[serde(untagged)]
pub enum MaskBody {
    Polygon {
        points: Vec<Point>,
        mask_format: &'static str,
    },
    Rle {
        rle: rle::Rle,
        mask_format: &'static str,
    },
}

/// One instance as Roboflow's `InstanceSegmentationPrediction` puts it on the wire.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct InstanceSegmentationPrediction {
    #[serde(flatten)]
    pub detection: detection::ObjectDetectionPrediction,
    #[serde(flatten)]
    pub mask: MaskBody,
}

/// Polygon of a mask, mapped to original-image pixels and clipped to the image.
fn polygon(mask: &BoxMask, input: (usize, usize), geo: &Geometry) -> Vec<Point> {
    let (kx, ky) = (
        input.1 as f32 / mask.grid_w as f32,
        input.0 as f32 / mask.grid_h as f32,
    );
    outer_contour(mask)
        .into_iter()
        .map(|(x, y)| {
            let (ox, oy) = geo.to_original(
                (mask.x0 as i32 + x) as f32 * kx,
                (mask.y0 as i32 + y) as f32 * ky,
            );
            Point {
                x: ox.clamp(0.0, geo.orig_w as f32) + geo.shift_x as f32,
                y: oy.clamp(0.0, geo.orig_h as f32) + geo.shift_y as f32,
            }
        })
        .collect()
}

/// The mask at original-image resolution as COCO RLE: each original pixel takes the value of
/// the grid cell its centre falls in. Only the box's columns are sampled. With a static crop
/// the mask lies at the crop's place in the full image, empty around it.
fn rle_mask(mask: &BoxMask, input: (usize, usize), geo: &Geometry) -> rle::Rle {
    let (ow, oh) = (geo.orig_w as usize, geo.orig_h as usize);
    let (gx_per_net, gy_per_net) = (
        mask.grid_w as f32 / input.1 as f32,
        mask.grid_h as f32 / input.0 as f32,
    );
    let (nx_per_o, ny_per_o) = (
        geo.content_w / geo.orig_w as f32,
        geo.content_h / geo.orig_h as f32,
    );
    let cell_x = |ox: usize| ((ox as f32 + 0.5) * nx_per_o + geo.left) * gx_per_net;
    let cell_y = |oy: usize| ((oy as f32 + 0.5) * ny_per_o + geo.top) * gy_per_net;
    let inside = |c: f32, lo: usize, len: usize| {
        let c = c.floor();
        (c >= lo as f32 && c < (lo + len) as f32).then(|| c as usize - lo)
    };
    // Original rows whose centre falls in the box's grid rows.
    let rows: Vec<Option<usize>> = (0..oh)
        .map(|oy| inside(cell_y(oy), mask.y0, mask.h))
        .collect();
    let (fw, fh) = (geo.full_w as usize, geo.full_h as usize);
    let (sx, sy) = (geo.shift_x as usize, geo.shift_y as usize);
    // The crop's rows and columns that lie inside the full image.
    let (kept_w, kept_h) = (ow.min(fw.saturating_sub(sx)), oh.min(fh.saturating_sub(sy)));
    let below = fh - sy.min(fh) - kept_h;
    let mut runs = rle::RunBuilder::new();
    runs.push_many(false, sx.min(fw) * fh);
    for ox in 0..kept_w {
        runs.push_many(false, sy.min(fh));
        match inside(cell_x(ox), mask.x0, mask.w) {
            None => runs.push_many(false, kept_h),
            Some(cx) => {
                for r in &rows[..kept_h] {
                    runs.push(r.is_some_and(|cy| mask.get(cx, cy)));
                }
            }
        }
        runs.push_many(false, below);
    }
    runs.push_many(false, (fw - sx.min(fw) - kept_w) * fh);
    rle::Rle {
        size: [fh, fw],
        counts: rle::encode_counts(&runs.finish()),
    }
}

impl SegLayout {
    /// Picks the layout from the model type (when it names a known family) and the outputs;
    /// with an unknown model type, the outputs alone decide.
    pub fn infer(hints: HeadHints<'_>, outputs: &[OutputTensor]) -> Result<Self, String> {
        let (model_type, num_classes) = (hints.model_type, hints.num_classes);
        let background = hints.background;
        let family = heads::Family::from_model_type(model_type);
        let pred = outputs.iter().position(|o| o.item_shape().len() == 2);
        let three_d = outputs.iter().position(|o| o.item_shape().len() == 3);
        let Some(protos) = three_d else {
            return Err("segmentation needs a mask output: [B, nm, H, W] prototypes (YOLO) or [B, Q, H, W] mask logits (RF-DETR)".into());
        };
        let qd = outputs[protos].item_shape();
        let proto_dims = (qd[0], qd[1], qd[2]);
        let layout = |kind: SegKind, pred: usize, pd: &[usize]| SegLayout {
            kind,
            pred,
            protos,
            pred_dims: (pd[0], pd[1]),
            proto_dims,
            num_classes,
        };
        let rf_detr = || -> Result<SegLayout, String> {
            let head =
                DetectionHead::infer(HeadHints::new("rfdetr", num_classes, background), outputs)?;
            let DetectionHead::RfDetr { queries, .. } = head else {
                unreachable!("an rfdetr model type gives the RF-DETR head")
            };
            if proto_dims.0 != queries {
                return Err(format!(
                    "RF-DETR masks {qd:?} do not hold one mask per query ({queries})"
                ));
            }
            Ok(layout(SegKind::RfDetr(head), 0, &[queries, 4]))
        };
        let prototypes = |end_to_end: bool| -> Result<SegLayout, String> {
            let pred = pred.ok_or("no [B, a, b] detections output")?;
            let pd = outputs[pred].item_shape();
            let nm = proto_dims.0;
            if end_to_end {
                if pd[1] != 6 + nm {
                    return Err(format!(
                        "YOLO26-seg needs [N, 6 + {nm}] rows (x1, y1, x2, y2, score, class, {nm} mask coefficients), got {pd:?}"
                    ));
                }
                Ok(layout(SegKind::EndToEnd, pred, pd))
            } else {
                if pd[0] != 4 + num_classes + nm {
                    return Err(format!(
                        "YOLOv8-seg needs [4 + {num_classes} classes + {nm} mask coefficients, N], got {pd:?}"
                    ));
                }
                Ok(layout(SegKind::Yolo, pred, pd))
            }
        };
        use heads::Family;
        let tried: &[Family] = match family {
            Some(Family::Nas) => {
                return Err(format!(
                    "model_type '{model_type}': YOLO-NAS has no segmentation layout"
                ))
            }
            Some(Family::RfDetr) => &[Family::RfDetr],
            Some(Family::EndToEnd) => &[Family::EndToEnd],
            Some(Family::Yolo) => &[Family::Yolo],
            None => &[Family::Yolo, Family::EndToEnd, Family::RfDetr],
        };
        let mut why = Vec::new();
        for &f in tried {
            let attempt = match f {
                Family::RfDetr => rf_detr(),
                Family::EndToEnd => prototypes(true),
                _ => prototypes(false),
            };
            match attempt {
                Ok(l) => return Ok(l),
                Err(e) => why.push(e),
            }
        }
        Err(format!(
            "cannot decode the outputs of segmentation model_type '{model_type}' for the {num_classes} classes of class_names.txt: {}",
            why.join("; ")
        ))
    }
}

/// Turns image `i`'s outputs into its instances. Refuses (before computing any mask) an
/// image whose masks would cost more than `params.max_work_pixels`, and stops as soon as
/// `cancelled()` says nobody waits for the answer.
#[allow(clippy::too_many_arguments)]
pub fn postprocess(
    outputs: &[OutputTensor],
    i: usize,
    layout: &SegLayout,
    input: (usize, usize),
    class_names: &[String],
    geo: &Geometry,
    params: &SegmentationParams,
    cancelled: &(dyn Fn() -> bool + Sync),
) -> Result<Vec<InstanceSegmentationPrediction>, PostprocessError> {
    let p = &params.detection;
    let item = |o: usize| {
        outputs
            .get(o)
            .map(|t| t.item(i))
            .ok_or_else(|| PostprocessError::Model(format!("output {o} is missing")))
    };
    let protos = item(layout.protos)?;
    let nc = layout.num_classes;
    let nm = layout.proto_dims.0;
    let (pred, kept): (&[f32], Vec<Candidate>) = match &layout.kind {
        SegKind::Yolo => {
            let pred = item(layout.pred)?;
            (
                pred,
                detection::kept(pred, layout.pred_dims, YoloLayout::V8, nc, p),
            )
        }
        SegKind::EndToEnd => {
            let pred = item(layout.pred)?;
            let (rows, width) = layout.pred_dims;
            (pred, heads::end_to_end(pred, rows, width, nc, p))
        }
        SegKind::RfDetr(head) => (
            &[],
            head.boxes(outputs, i, input, nc, p)
                .map_err(PostprocessError::Model)?,
        ),
    };
    let kept: Vec<Candidate> = kept
        .into_iter()
        .filter(|c| {
            class_names
                .get(c.class_id)
                .is_some_and(|n| detection::passes_filter(&p.class_filter, n))
        })
        .collect();
    let grid = params
        .mode
        .grid((layout.proto_dims.1, layout.proto_dims.2), input);
    let per_mask = match params.format {
        MaskFormat::Rle => geo.full_w as u64 * geo.full_h as u64,
        MaskFormat::Polygon => grid.0 as u64 * grid.1 as u64,
    };
    let work = kept.len() as u64 * per_mask;
    if work > params.max_work_pixels {
        return Err(PostprocessError::OverBudget(format!(
            "{} masks x {per_mask} pixels each = {work} pixels of mask work, more than MAX_MASK_WORK_PIXELS ({}): raise confidence, lower max_detections or ask for polygons",
            kept.len(),
            params.max_work_pixels
        )));
    }
    let (_, mh, mw) = layout.proto_dims;
    kept.par_iter()
        .map(|c| {
            // Other postprocess threads take masks of this image: counted where they run.
            crate::stage_cpu::span(crate::stage_cpu::Stage::Postprocess, || {
                if cancelled() {
                    return None;
                }
                let mask = match &layout.kind {
                    SegKind::Yolo => {
                        let (attrs, n) = layout.pred_dims;
                        let coeff_row = 4 + nc;
                        let coeffs: Vec<f32> = (0..nm.min(attrs - coeff_row))
                            .map(|k| pred[(coeff_row + k) * n + c.anchor])
                            .collect();
                        box_mask(&coeffs, protos, layout.proto_dims, c.corners(), input, grid)
                    }
                    SegKind::EndToEnd => {
                        let width = layout.pred_dims.1;
                        let row = &pred[c.anchor * width..(c.anchor + 1) * width];
                        box_mask(
                            &row[6..],
                            protos,
                            layout.proto_dims,
                            c.corners(),
                            input,
                            grid,
                        )
                    }
                    SegKind::RfDetr(_) => query_mask(
                        &protos[c.anchor * mh * mw..(c.anchor + 1) * mh * mw],
                        (mh, mw),
                        (
                            geo.left,
                            geo.top,
                            geo.left + geo.content_w,
                            geo.top + geo.content_h,
                        ),
                        input,
                        grid,
                    ),
                };
                let body = match params.format {
                    MaskFormat::Polygon => MaskBody::Polygon {
                        points: polygon(&mask, input, geo),
                        mask_format: "polygon",
                    },
                    MaskFormat::Rle => MaskBody::Rle {
                        rle: rle_mask(&mask, input, geo),
                        mask_format: "rle",
                    },
                };
                let round = !matches!(layout.kind, SegKind::RfDetr(_));
                Some(InstanceSegmentationPrediction {
                    detection: detection::prediction_rounded(
                        c,
                        &class_names[c.class_id],
                        geo,
                        round,
                    ),
                    mask: body,
                })
            })
        })
        .collect::<Option<Vec<_>>>()
        .ok_or(PostprocessError::Cancelled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grids_follow_roboflow() {
        let (p, i) = ((160, 160), (640, 640));
        assert_eq!(MaskDecodeMode::Accurate.grid(p, i), (640, 640));
        assert_eq!(MaskDecodeMode::Fast.grid(p, i), (160, 160));
        assert_eq!(MaskDecodeMode::Tradeoff(0.0).grid(p, i), (160, 160));
        assert_eq!(MaskDecodeMode::Tradeoff(0.5).grid(p, i), (400, 400));
        assert_eq!(MaskDecodeMode::Tradeoff(1.0).grid(p, i), (640, 640));
    }

    /// Prototypes where mask k is +10 inside a square and -10 outside.
    fn square_protos(mh: usize, mw: usize, sq: (usize, usize, usize, usize)) -> Vec<f32> {
        let mut p = vec![-10f32; mh * mw];
        for y in sq.1..sq.3 {
            for x in sq.0..sq.2 {
                p[y * mw + x] = 10.0;
            }
        }
        p
    }

    #[test]
    fn box_mask_is_cropped_to_the_box_on_every_grid() {
        // One prototype, a 16x16 proto grid for a 64x64 input; the object fills proto cells 4..12.
        let protos = square_protos(16, 16, (4, 4, 12, 12));
        for (grid, cell) in [((16, 16), 4.0f32), ((64, 64), 1.0), ((40, 40), 1.6)] {
            // Box covers only the left half of the object: x 16..32 of 16..48.
            let m = box_mask(
                &[1.0],
                &protos,
                (1, 16, 16),
                (16.0, 16.0, 32.0, 48.0),
                (64, 64),
                grid,
            );
            let set: usize = m.bits.iter().filter(|&&b| b).count();
            let expected_w = (32.0 / cell).ceil() - (16.0 / cell).ceil();
            let expected_h = (48.0 / cell).ceil() - (16.0 / cell).ceil();
            assert_eq!(
                (m.w, m.h),
                (expected_w as usize, expected_h as usize),
                "{grid:?}"
            );
            // The object covers the whole box (up to a border cell of interpolation).
            assert!(
                set as f32 >= 0.8 * (m.w * m.h) as f32,
                "{grid:?}: {set} of {}",
                m.w * m.h
            );
        }
        // A coefficient of the opposite sign gives an empty mask (box inside the object, so no
        // cell interpolates with the outside).
        let m = box_mask(
            &[-1.0],
            &protos,
            (1, 16, 16),
            (20.0, 20.0, 44.0, 44.0),
            (64, 64),
            (64, 64),
        );
        assert!(m.w > 0 && m.bits.iter().all(|b| !b));
    }

    #[test]
    fn rle_at_original_resolution_matches_the_box() {
        // Stretch 64x64 network, original 128x32: a full mask over network box (0,0)-(32,64)
        // covers original columns 0..64, all rows.
        let spec = crate::geometry::InputSpec {
            width: 64,
            height: 64,
            resize: crate::geometry::ResizeMode::Stretch,
            normalization: crate::geometry::Normalization::ZeroToOne,
        };
        let geo = Geometry::compute(128, 32, 128, 32, &spec);
        let mask = BoxMask {
            x0: 0,
            y0: 0,
            w: 32,
            h: 64,
            grid_w: 64,
            grid_h: 64,
            bits: vec![true; 32 * 64],
        };
        let r = rle_mask(&mask, (64, 64), &geo);
        assert_eq!(r.size, [32, 128]);
        let counts = rle::decode_counts(&r.counts).unwrap();
        assert_eq!(counts, vec![0, 64 * 32, 64 * 32]);
    }

    fn tensor(name: &str, shape: &[usize], data: Vec<f32>) -> OutputTensor {
        OutputTensor {
            name: name.into(),
            shape: shape.to_vec(),
            data: crate::model::backend::OutputBuffer::from(data),
        }
    }

    fn params() -> SegmentationParams {
        SegmentationParams {
            detection: DetectionParams::default(),
            mode: MaskDecodeMode::Accurate,
            format: MaskFormat::Polygon,
            max_work_pixels: MAX_WORK_PIXELS,
        }
    }

    fn stretch(size: u32) -> Geometry {
        let spec = crate::geometry::InputSpec {
            width: size,
            height: size,
            resize: crate::geometry::ResizeMode::Stretch,
            normalization: crate::geometry::Normalization::ZeroToOne,
        };
        Geometry::compute(size, size, size, size, &spec)
    }

    #[test]
    fn layouts_follow_the_model_type_and_name_what_they_need() {
        let protos = || tensor("output1", &[1, 2, 4, 4], vec![0.0; 32]);
        let v8 = [
            tensor("output0", &[1, 4 + 3 + 2, 5], vec![0.0; 45]),
            protos(),
        ];
        let e2e = [tensor("output0", &[1, 5, 6 + 2], vec![0.0; 40]), protos()];
        assert_eq!(
            SegLayout::infer(HeadHints::new("yolov8n-seg", 3, None), &v8)
                .unwrap()
                .kind,
            SegKind::Yolo
        );
        assert_eq!(
            SegLayout::infer(HeadHints::new("yolo26n-seg", 3, None), &e2e)
                .unwrap()
                .kind,
            SegKind::EndToEnd
        );
        // An unknown type: the outputs decide.
        assert_eq!(
            SegLayout::infer(HeadHints::new("", 3, None), &e2e)
                .unwrap()
                .kind,
            SegKind::EndToEnd
        );
        // A YOLO26 type with a YOLOv8 output: an error naming the expected rows.
        let e = SegLayout::infer(HeadHints::new("yolo26n-seg", 3, None), &v8).unwrap_err();
        assert!(e.contains("YOLO26-seg needs [N, 6 + 2]"), "{e}");
        let dets = || tensor("dets", &[1, 3, 4], vec![0.0; 12]);
        let labels = || tensor("labels", &[1, 3, 4], vec![0.0; 12]);
        let detr = [
            dets(),
            labels(),
            tensor("masks", &[1, 3, 4, 4], vec![0.0; 48]),
        ];
        let l = SegLayout::infer(HeadHints::new("rfdetr-seg-nano", 3, None), &detr).unwrap();
        assert!(matches!(
            l.kind,
            SegKind::RfDetr(DetectionHead::RfDetr { queries: 3, .. })
        ));
        assert_eq!((l.protos, l.proto_dims), (2, (3, 4, 4)));
        // Masks for 2 queries while there are 3: refused.
        let short = [
            dets(),
            labels(),
            tensor("masks", &[1, 2, 4, 4], vec![0.0; 32]),
        ];
        assert!(SegLayout::infer(HeadHints::new("rfdetr-seg-nano", 3, None), &short).is_err());
    }

    #[test]
    fn end_to_end_rows_carry_their_own_coefficients_without_nms() {
        // Prototype 0 is the left half of an 8x8 input, prototype 1 the right half.
        let mut protos = vec![-10f32; 2 * 8 * 8];
        for y in 0..8 {
            for x in 0..8 {
                protos[if x < 4 { 0 } else { 64 } + y * 8 + x] = 10.0;
            }
        }
        // Two overlapping boxes of one class over the whole input (both kept: no NMS); the
        // first selects prototype 0, the second prototype 1; a third row scores too low.
        let rows = vec![
            0.0, 0.0, 8.0, 8.0, 0.9, 0.0, 1.0, 0.0, //
            0.0, 0.0, 8.0, 8.0, 0.8, 0.0, 0.0, 1.0, //
            0.0, 0.0, 8.0, 8.0, 0.1, 0.0, 1.0, 1.0,
        ];
        let outputs = [
            tensor("output0", &[1, 3, 8], rows),
            tensor("output1", &[1, 2, 8, 8], protos),
        ];
        let layout = SegLayout::infer(HeadHints::new("yolo26n-seg", 1, None), &outputs).unwrap();
        let preds = postprocess(
            &outputs,
            0,
            &layout,
            (8, 8),
            &["a".into()],
            &stretch(8),
            &params(),
            &|| false,
        )
        .unwrap();
        assert_eq!(preds.len(), 2);
        let xs = |p: &InstanceSegmentationPrediction| match &p.mask {
            MaskBody::Polygon { points, .. } => points
                .iter()
                .map(|q| q.x)
                .fold((f32::MAX, f32::MIN), |a, x| (a.0.min(x), a.1.max(x))),
            MaskBody::Rle { .. } => unreachable!(),
        };
        assert!(xs(&preds[0]).1 <= 4.0, "left half: {:?}", xs(&preds[0]));
        assert!(xs(&preds[1]).0 >= 4.0, "right half: {:?}", xs(&preds[1]));
    }

    #[test]
    fn rf_detr_masks_are_the_query_logits_over_the_letterboxed_image() {
        // A 16x8 image letterboxed into a 16x16 input: content rows 4..12. One query whose
        // 4x4 logits are positive everywhere: its mask is the image, not the padding.
        let spec = crate::geometry::InputSpec {
            width: 16,
            height: 16,
            resize: crate::geometry::ResizeMode::Letterbox { pad: 0 },
            normalization: crate::geometry::Normalization::ImageNet,
        };
        let geo = Geometry::compute(16, 8, 16, 8, &spec);
        let m = query_mask(
            &[5.0; 16],
            (4, 4),
            (
                geo.left,
                geo.top,
                geo.left + geo.content_w,
                geo.top + geo.content_h,
            ),
            (16, 16),
            (16, 16),
        );
        assert_eq!((m.x0, m.y0, m.w, m.h), (0, 4, 16, 8));
        assert!(m.bits.iter().all(|&b| b));
        // Logits of zero are not kept (> 0, as Roboflow's `mask > 0`).
        let m = query_mask(&[0.0; 16], (4, 4), (0.0, 0.0, 16.0, 16.0), (16, 16), (4, 4));
        assert!(m.bits.iter().all(|&b| !b));
        // Through the decoder: the box is not rounded and the mask is not cut to the box.
        let dets = vec![0.25, 0.5, 0.25, 0.25]; // a box over x 2..6 of 16
        let labels = vec![4.0, -20.0];
        let outputs = [
            tensor("dets", &[1, 1, 4], dets),
            tensor("labels", &[1, 1, 2], labels),
            tensor("masks", &[1, 1, 4, 4], vec![5.0; 16]),
        ];
        let layout =
            SegLayout::infer(HeadHints::new("rfdetr-seg-nano", 2, None), &outputs).unwrap();
        let preds = postprocess(
            &outputs,
            0,
            &layout,
            (16, 16),
            &["a".into(), "b".into()],
            &geo,
            &params(),
            &|| false,
        )
        .unwrap();
        assert_eq!(preds.len(), 1);
        let MaskBody::Polygon { points, .. } = &preds[0].mask else {
            unreachable!()
        };
        let max_x = points.iter().map(|p| p.x).fold(0f32, f32::max);
        assert!(
            max_x >= 15.0,
            "the mask spans the image beyond its box: {points:?}"
        );
    }
}
