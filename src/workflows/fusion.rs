//! The blocks that combine detections, as Roboflow's Workflows combines them (its
//! `supervision` 0.30 calls): the tiles of `image_slicer` (v1 and v2), `detections_stitch`
//! (none, NMS, NMM), `detections_consensus` and `detections_classes_replacement`. Pure
//! functions on `Detections`; masks are the instances' polygons, filled on a pixel grid where
//! an overlap or a union needs them.

use std::time::Instant;

use crate::tasks::contours::{outer_contour, BoxMask};

use super::value::{Classification, Det, Detections};

/// The tiles of an image of `w x h`: `(x1, y1, x2, y2)` each, row by row, as
/// `image_slicer@v1` (border tiles cut at the edge) or `@v2` (border tiles moved inwards so
/// that every tile has the same size, repeated tiles dropped).
pub fn slice_offsets(
    (w, h): (u32, u32),
    (sw, sh): (u32, u32),
    (ow, oh): (f64, f64),
    v2: bool,
) -> Vec<(u32, u32, u32, u32)> {
    let (sw, sh) = if v2 { (sw.min(w), sh.min(h)) } else { (sw, sh) };
    let stride = |s: u32, o: f64| (s - (o * s as f64) as u32).max(1);
    let (stx, sty) = (stride(sw, ow), stride(sh, oh));
    let anchors = |size: u32, s: u32, st: u32| -> Vec<u32> {
        (0..size)
            .step_by(st as usize)
            .map(|a| {
                if v2 {
                    a - (a + s).saturating_sub(size).min(s)
                } else {
                    a
                }
            })
            .collect()
    };
    let (xs, ys) = (anchors(w, sw, stx), anchors(h, sh, sty));
    let mut out: Vec<(u32, u32, u32, u32)> = Vec::with_capacity(xs.len() * ys.len());
    let mut seen = std::collections::HashSet::new();
    for &y in &ys {
        for &x in &xs {
            let t = (
                x,
                y,
                x.saturating_add(sw).min(w),
                y.saturating_add(sh).min(h),
            );
            if !v2 || seen.insert(t) {
                out.push(t);
            }
        }
    }
    out
}

/// How many tiles `slice_offsets` makes (before v2 drops repeats), without making them.
pub fn slice_count(
    (w, h): (u32, u32),
    (sw, sh): (u32, u32),
    (ow, oh): (f64, f64),
    v2: bool,
) -> u64 {
    let n = |size: u32, s: u32, o: f64| {
        let s = if v2 { s.min(size.max(1)) } else { s };
        let st = (s - (o * s as f64) as u32).max(1) as u64;
        (size as u64).div_ceil(st)
    };
    n(w, sw, ow) * n(h, sh, oh)
}

/// A detection's instance mask: its polygon filled on the pixel grid, over the frame
/// `(x0, y0, w, h)`, boundary pixels included (as OpenCV's `fillPoly` fills the reference's
/// masks); empty for a detection without one (the reference's all-false mask for a box
/// among instances).
fn fill(d: &Det, x0: i64, y0: i64, w: usize, h: usize) -> Vec<bool> {
    let mut bits = vec![false; w * h];
    let Some(poly) = d.polygon.as_ref().filter(|p| p.len() >= 3) else {
        return bits;
    };
    for row in 0..h {
        scan(poly, (y0 + row as i64) as f32, |from, to| {
            let from = (from - x0).max(0);
            let to = (to - x0).min(w as i64 - 1);
            for x in from..=to {
                bits[row * w + x as usize] = true;
            }
        });
    }
    bits
}

/// The pixel runs `(from, to)` (inclusive) of row `y` inside `poly`, its boundary included:
/// the row is sampled just above and just below its line, so that the polygon's top and
/// bottom edges and its corners count.
pub fn scan(poly: &[(f32, f32)], y: f32, mut run: impl FnMut(i64, i64)) {
    const EPS: f32 = 1e-3;
    let mut xs: Vec<f32> = Vec::new();
    for cy in [y - EPS, y + EPS] {
        xs.clear();
        for (i, a) in poly.iter().enumerate() {
            let b = poly[(i + 1) % poly.len()];
            if (a.1 <= cy) != (b.1 <= cy) {
                xs.push(a.0 + (cy - a.1) / (b.1 - a.1) * (b.0 - a.0));
            }
        }
        xs.sort_by(f32::total_cmp);
        for pair in xs.chunks_exact(2) {
            let (from, to) = (
                (pair[0] - EPS).ceil() as i64,
                (pair[1] + EPS).floor() as i64,
            );
            if from <= to {
                run(from, to);
            }
        }
    }
}

/// Most cells a mask frame may have: polygons come from models, inside their image (at
/// most MAX_IMAGE_PIXELS), so a larger frame means coordinates that are not a mask's.
const MAX_FRAME_CELLS: u64 = 1 << 28;

/// The pixel frame that holds every one of `dets`' polygons (a 1x1 frame when none has
/// one, or when they would need more than MAX_FRAME_CELLS).
fn frame(dets: &[&Det]) -> (i64, i64, usize, usize) {
    let (mut x1, mut y1, mut x2, mut y2) = (f32::MAX, f32::MAX, f32::MIN, f32::MIN);
    for d in dets {
        for p in d.polygon.iter().flatten() {
            x1 = x1.min(p.0);
            y1 = y1.min(p.1);
            x2 = x2.max(p.0);
            y2 = y2.max(p.1);
        }
    }
    let finite = [x1, y1, x2, y2]
        .iter()
        .all(|v| v.is_finite() && v.abs() < 1e8);
    if !finite || x2 < x1 || y2 < y1 {
        return (0, 0, 1, 1);
    }
    let cells = ((x2 - x1) as f64 + 2.0) * ((y2 - y1) as f64 + 2.0);
    if cells > MAX_FRAME_CELLS as f64 {
        return (0, 0, 1, 1);
    }
    // Boundary pixels are filled: the last column and row are inside.
    let (fx, fy) = (x1.floor() as i64, y1.floor() as i64);
    (
        fx,
        fy,
        (x2.ceil() as i64 - fx + 1).max(1) as usize,
        (y2.ceil() as i64 - fy + 1).max(1) as usize,
    )
}

/// Boxes' intersection over union.
pub fn box_iou(a: &Det, b: &Det) -> f32 {
    let iw = (a.x2.min(b.x2) - a.x1.max(b.x1)).max(0.0);
    let ih = (a.y2.min(b.y2) - a.y1.max(b.y1)).max(0.0);
    let inter = iw * ih;
    let union = a.width() * a.height() + b.width() * b.height() - inter;
    if union > 0.0 {
        inter / union
    } else {
        0.0
    }
}

/// One instance's mask over its own frame.
#[derive(Clone)]
struct Mask {
    x0: i64,
    y0: i64,
    w: usize,
    h: usize,
    bits: Vec<bool>,
    area: u64,
}

/// The overlaps of a list of detections: masks' intersection over union for instances (each
/// mask filled once, and only where two boxes meet is anything compared), boxes' otherwise.
struct Overlaps<'a> {
    dets: &'a [Det],
    masks: Vec<Option<Mask>>,
}

impl<'a> Overlaps<'a> {
    fn new(dets: &'a [Det]) -> Self {
        Self {
            dets,
            masks: (0..dets.len()).map(|_| None).collect(),
        }
    }

    fn fill(&mut self, i: usize) {
        if self.masks[i].is_none() {
            let d = &self.dets[i];
            let (x0, y0, w, h) = frame(&[d]);
            let bits = fill(d, x0, y0, w, h);
            let area = bits.iter().filter(|b| **b).count() as u64;
            self.masks[i] = Some(Mask {
                x0,
                y0,
                w,
                h,
                bits,
                area,
            });
        }
    }

    fn iou(&mut self, i: usize, j: usize) -> f32 {
        let (a, b) = (&self.dets[i], &self.dets[j]);
        if a.polygon.is_none() && b.polygon.is_none() {
            return box_iou(a, b);
        }
        self.fill(i);
        self.fill(j);
        match (&self.masks[i], &self.masks[j]) {
            (Some(ma), Some(mb)) => mask_iou(ma, mb),
            _ => 0.0,
        }
    }

    fn mask(&mut self, i: usize) -> &Mask {
        self.fill(i);
        self.masks[i].as_ref().expect("filled")
    }
}

impl Mask {
    fn get(&self, x: i64, y: i64) -> bool {
        x >= self.x0
            && y >= self.y0
            && x < self.x0 + self.w as i64
            && y < self.y0 + self.h as i64
            && self.bits[(y - self.y0) as usize * self.w + (x - self.x0) as usize]
    }

    /// The union of two masks, over the frame holding both.
    fn union(&self, o: &Mask) -> Mask {
        let (x0, y0) = (self.x0.min(o.x0), self.y0.min(o.y0));
        let x1 = (self.x0 + self.w as i64).max(o.x0 + o.w as i64);
        let y1 = (self.y0 + self.h as i64).max(o.y0 + o.h as i64);
        let (w, h) = ((x1 - x0) as usize, (y1 - y0) as usize);
        if (w as u64) * (h as u64) > MAX_FRAME_CELLS {
            return self.clone();
        }
        let mut bits = vec![false; w * h];
        let mut area = 0;
        for y in 0..h {
            for x in 0..w {
                let (px, py) = (x0 + x as i64, y0 + y as i64);
                if self.get(px, py) || o.get(px, py) {
                    bits[y * w + x] = true;
                    area += 1;
                }
            }
        }
        Mask {
            x0,
            y0,
            w,
            h,
            bits,
            area,
        }
    }
}

/// Two masks' intersection over union, compared only where their frames meet.
fn mask_iou(ma: &Mask, mb: &Mask) -> f32 {
    let (x1, y1) = (ma.x0.max(mb.x0), ma.y0.max(mb.y0));
    let x2 = (ma.x0 + ma.w as i64).min(mb.x0 + mb.w as i64);
    let y2 = (ma.y0 + ma.h as i64).min(mb.y0 + mb.h as i64);
    let mut inter = 0u64;
    for y in y1..y2 {
        let (ra, rb) = ((y - ma.y0) as usize * ma.w, (y - mb.y0) as usize * mb.w);
        for x in x1..x2 {
            inter +=
                u64::from(ma.bits[ra + (x - ma.x0) as usize] && mb.bits[rb + (x - mb.x0) as usize]);
        }
    }
    let union = ma.area + mb.area - inter;
    if union == 0 {
        0.0
    } else {
        inter as f32 / union as f32
    }
}

/// How masks combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskJoin {
    Union,
    Intersection,
}

/// The polygon of the union (or intersection) of `dets`' masks, and its box; `None` when it
/// is empty.
/// A polygon and its box `(x1, y1, x2, y2)`.
type Outline = (Vec<(f32, f32)>, (f32, f32, f32, f32));

fn joined(dets: &[&Det], how: MaskJoin) -> Option<Outline> {
    let (x0, y0, w, h) = frame(dets);
    let mut bits = fill(dets[0], x0, y0, w, h);
    for d in &dets[1..] {
        let m = fill(d, x0, y0, w, h);
        for (b, n) in bits.iter_mut().zip(m) {
            *b = match how {
                MaskJoin::Union => *b || n,
                MaskJoin::Intersection => *b && n,
            };
        }
    }
    let mask = BoxMask {
        x0: 0,
        y0: 0,
        w,
        h,
        grid_w: w,
        grid_h: h,
        bits,
    };
    let (mut bx1, mut by1, mut bx2, mut by2) = (usize::MAX, usize::MAX, 0, 0);
    for y in 0..h {
        for x in 0..w {
            if mask.get(x, y) {
                bx1 = bx1.min(x);
                by1 = by1.min(y);
                bx2 = bx2.max(x);
                by2 = by2.max(y);
            }
        }
    }
    if bx1 == usize::MAX {
        return None;
    }
    let poly: Vec<(f32, f32)> = outer_contour(&mask)
        .into_iter()
        .map(|(x, y)| ((x as i64 + x0) as f32, (y as i64 + y0) as f32))
        .collect();
    // The box of a mask as supervision's mask_to_xyxy gives it: first and last set pixels.
    let b = (
        (bx1 as i64 + x0) as f32,
        (by1 as i64 + y0) as f32,
        (bx2 as i64 + x0) as f32,
        (by2 as i64 + y0) as f32,
    );
    Some((poly, b))
}

/// How overlapping tiles' detections are reconciled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overlap {
    None,
    Nms,
    Nmm,
}

impl Overlap {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "none" => Overlap::None,
            "nms" => Overlap::Nms,
            "nmm" => Overlap::Nmm,
            _ => return None,
        })
    }
}

/// Class-aware NMS as supervision's `with_nms`: the most confident first, a detection
/// dropped when it overlaps a kept one of its class by more than `thr`; survivors in their
/// order.
fn nms(dets: Vec<Det>, thr: f32, deadline: Instant) -> Option<Vec<Det>> {
    let mut overlaps = Overlaps::new(&dets);
    let mut order: Vec<usize> = (0..dets.len()).collect();
    order.sort_by(|&a, &b| dets[b].confidence.total_cmp(&dets[a].confidence));
    let mut keep = vec![true; dets.len()];
    for (k, &i) in order.iter().enumerate() {
        if Instant::now() >= deadline {
            return None;
        }
        if !keep[i] {
            continue;
        }
        for &j in &order[k + 1..] {
            if keep[j] && dets[j].class_id == dets[i].class_id && overlaps.iou(i, j) > thr {
                keep[j] = false;
            }
        }
    }
    drop(overlaps);
    Some(
        dets.into_iter()
            .zip(keep)
            .filter_map(|(d, k)| k.then_some(d))
            .collect(),
    )
}

/// Class-aware non-max merging as supervision's `with_nmm`: per class (in class order), the
/// most confident detection takes every other of its class overlapping it by `thr` or more;
/// each group becomes one detection, its box (mask) the union, its confidence the mean
/// weighted by box area, the rest the most confident member's.
fn nmm(dets: Vec<Det>, thr: f32, deadline: Instant) -> Option<Vec<Det>> {
    let mut classes: Vec<i64> = dets.iter().map(|d| d.class_id).collect();
    classes.sort_unstable();
    classes.dedup();
    let mut out = Vec::new();
    let mut overlaps = Overlaps::new(&dets);
    for c in classes {
        let mut order: Vec<usize> = (0..dets.len()).filter(|&i| dets[i].class_id == c).collect();
        order.sort_by(|&a, &b| dets[a].confidence.total_cmp(&dets[b].confidence));
        let masks = dets.iter().any(|d| d.polygon.is_some());
        while let Some(top) = order.pop() {
            if Instant::now() >= deadline {
                return None;
            }
            let mut members = vec![top];
            if masks {
                // Instances (supervision's mask NMM): the group's union grows, and what is
                // left is compared with the union again until nothing more joins.
                let mut union = overlaps.mask(top).clone();
                loop {
                    let (group, rest): (Vec<usize>, Vec<usize>) = order
                        .iter()
                        .partition(|&&j| mask_iou(overlaps.mask(j), &union) >= thr);
                    if group.is_empty() {
                        break;
                    }
                    for &j in &group {
                        union = union.union(overlaps.mask(j));
                    }
                    order = rest;
                    members.extend(group.iter().rev());
                }
            } else {
                let (group, rest): (Vec<usize>, Vec<usize>) =
                    order.iter().partition(|&&j| overlaps.iou(top, j) >= thr);
                order = rest;
                members.extend(group.iter().rev());
            }
            out.push(merge_group(
                &members.iter().map(|&i| &dets[i]).collect::<Vec<_>>(),
            ));
        }
    }
    Some(out)
}

fn merge_group(group: &[&Det]) -> Det {
    if group.len() == 1 {
        return group[0].clone();
    }
    let winner = group
        .iter()
        .copied()
        .reduce(|a, b| if b.confidence > a.confidence { b } else { a })
        .expect("a group has members");
    let areas: Vec<f64> = group
        .iter()
        .map(|d| (d.width() * d.height()) as f64)
        .collect();
    let total: f64 = areas.iter().sum();
    let mut m = winner.clone();
    if total > 0.0 {
        m.confidence = (group
            .iter()
            .zip(&areas)
            .map(|(d, a)| d.confidence as f64 * a)
            .sum::<f64>()
            / total) as f32;
    }
    m.x1 = group.iter().map(|d| d.x1).fold(f32::MAX, f32::min);
    m.y1 = group.iter().map(|d| d.y1).fold(f32::MAX, f32::min);
    m.x2 = group.iter().map(|d| d.x2).fold(f32::MIN, f32::max);
    m.y2 = group.iter().map(|d| d.y2).fold(f32::MIN, f32::max);
    if group.iter().any(|d| d.polygon.is_some()) {
        m.polygon = joined(group, MaskJoin::Union).map(|(p, _)| p);
    }
    m
}

/// `detections_stitch`: each tile's detections moved by the tile's place in the reference
/// image (`offset`), given the reference's size and lineage (`into`), then reconciled;
/// `None` when the run's deadline passes first.
pub fn stitch(
    tiles: Vec<(Detections, (i64, i64))>,
    into: &Detections,
    how: Overlap,
    thr: f32,
    deadline: Instant,
) -> Option<Detections> {
    let mut all = Vec::new();
    for (t, (dx, dy)) in tiles {
        for d in &t.dets {
            let mut m = d.shifted(dx as f32, dy as f32);
            m.lineage = into.lineage.clone();
            all.push(m);
        }
    }
    let dets = match how {
        Overlap::None => all,
        Overlap::Nms => nms(all, thr, deadline)?,
        Overlap::Nmm => nmm(all, thr, deadline)?,
    };
    Some(Detections {
        dets,
        ..into.clone()
    })
}

/// How `detections_consensus` aggregates a value over the detections that agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Agg {
    Average,
    Max,
    Min,
}

impl Agg {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "average" => Agg::Average,
            "max" => Agg::Max,
            "min" => Agg::Min,
            _ => return None,
        })
    }

    fn of(self, v: impl Iterator<Item = f64>) -> f64 {
        let v: Vec<f64> = v.collect();
        match self {
            Agg::Average => v.iter().sum::<f64>() / v.len().max(1) as f64,
            Agg::Max => v.iter().copied().fold(f64::MIN, f64::max),
            Agg::Min => v.iter().copied().fold(f64::MAX, f64::min),
        }
    }

    /// The member chosen by a value (the first of equals): the largest for max, the
    /// smallest for min.
    fn pick<'a>(self, group: &[&'a Det], key: impl Fn(&Det) -> f64) -> &'a Det {
        let mut best = group[0];
        for d in &group[1..] {
            let better = match self {
                Agg::Min => key(d) < key(best),
                _ => key(d) > key(best),
            };
            if better {
                best = d;
            }
        }
        best
    }
}

/// How masks of agreeing instances aggregate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskAgg {
    Union,
    Intersection,
    Max,
    Min,
}

impl MaskAgg {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "union" => MaskAgg::Union,
            "intersection" => MaskAgg::Intersection,
            "max" => MaskAgg::Max,
            "min" => MaskAgg::Min,
            _ => return None,
        })
    }
}

/// How many objects the consensus needs: in all, or per class.
#[derive(Debug, Clone, PartialEq)]
pub enum Required {
    Count(usize),
    PerClass(Vec<(String, usize)>),
}

/// `detections_consensus`'s settings.
#[derive(Debug, Clone)]
pub struct Consensus {
    pub required_votes: usize,
    pub class_aware: bool,
    pub iou_threshold: f32,
    pub confidence: f32,
    pub classes_to_consider: Option<Vec<String>>,
    pub required_objects: Option<Required>,
    pub presence: Agg,
    pub merge_confidence: Agg,
    pub merge_boxes: Agg,
    pub merge_masks: MaskAgg,
}

/// What the consensus of one image's sources is.
#[derive(Debug, Clone)]
pub struct Agreement {
    pub predictions: Detections,
    pub object_present: bool,
    /// Per class (or `any_object`), the aggregated confidence.
    pub presence: Vec<(String, f64)>,
}

impl Consensus {
    /// Walks the sources' detections in order: a detection not yet used finds, in every
    /// other source, its best overlap of the same class (by more than the IoU threshold);
    /// with enough votes they merge into one detection, and all of them are used.
    /// `None` when the run's deadline passes first.
    pub fn agree(
        &self,
        sources: &[std::sync::Arc<Detections>],
        deadline: Instant,
    ) -> Option<Agreement> {
        let none = Agreement {
            predictions: empty(),
            object_present: false,
            presence: Vec::new(),
        };
        if sources.iter().all(|s| s.dets.is_empty()) {
            return Some(none);
        }
        let frame = sources
            .iter()
            .find(|s| !s.dets.is_empty())
            .expect("one source has detections");
        let considered: Vec<Vec<&Det>> = sources
            .iter()
            .map(|s| {
                s.dets
                    .iter()
                    .filter(|d| {
                        self.classes_to_consider
                            .as_ref()
                            .is_none_or(|c| c.contains(&d.class_name))
                    })
                    .collect()
            })
            .collect();
        let mut used: std::collections::HashSet<&str> = Default::default();
        let mut merged: Vec<Det> = Vec::new();
        for (si, source) in considered.iter().enumerate() {
            for d in source {
                if Instant::now() >= deadline {
                    return None;
                }
                if used.contains(d.detection_id.as_str()) {
                    continue;
                }
                let mut matches: Vec<&Det> = Vec::new();
                for (oi, other) in considered.iter().enumerate() {
                    if oi == si {
                        continue;
                    }
                    let mut best: Option<(&Det, f32)> = None;
                    for o in other {
                        if used.contains(o.detection_id.as_str())
                            || (self.class_aware && o.class_name != d.class_name)
                        {
                            continue;
                        }
                        let v = box_iou(d, o);
                        if v <= self.iou_threshold {
                            continue;
                        }
                        if best.is_none_or(|(_, b)| b < v) {
                            best = Some((o, v));
                        }
                    }
                    matches.extend(best.map(|(o, _)| o));
                }
                if matches.len() + 1 < self.required_votes {
                    continue;
                }
                let mut group = vec![*d];
                group.extend(matches);
                let m = self.merge(&group);
                if m.confidence < self.confidence {
                    continue;
                }
                for g in &group {
                    used.insert(g.detection_id.as_str());
                }
                merged.push(m);
            }
        }
        if merged.is_empty() {
            return Some(none);
        }
        let predictions = Detections {
            dets: merged,
            width: frame.width,
            height: frame.height,
            lineage: frame.lineage.clone(),
        };
        let (present, presence) = self.presence(&predictions.dets);
        Some(Agreement {
            predictions,
            object_present: present,
            presence,
        })
    }

    fn merge(&self, group: &[&Det]) -> Det {
        let (class_name, class_id) = match self.merge_confidence {
            Agg::Average => {
                // The most common class (the first met of equals).
                let mut counts: Vec<((&str, i64), usize)> = Vec::new();
                for d in group {
                    let k = (d.class_name.as_str(), d.class_id);
                    match counts.iter_mut().find(|(c, _)| *c == k) {
                        Some((_, n)) => *n += 1,
                        None => counts.push((k, 1)),
                    }
                }
                let mut best = counts[0];
                for c in &counts[1..] {
                    if c.1 > best.1 {
                        best = *c;
                    }
                }
                (best.0 .0.to_owned(), best.0 .1)
            }
            agg => {
                let d = agg.pick(group, |d| d.confidence as f64);
                (d.class_name.clone(), d.class_id)
            }
        };
        let mut m = group[0].clone();
        m.class_name = class_name;
        m.class_id = class_id;
        m.confidence = self
            .merge_confidence
            .of(group.iter().map(|d| d.confidence as f64)) as f32;
        m.detection_id = uuid::Uuid::new_v4().to_string();
        m.keypoints = None;
        m.polygon = None;
        if group.iter().any(|d| d.polygon.is_some()) {
            let area = |d: &Det| {
                let (x0, y0, w, h) = frame(&[d]);
                fill(d, x0, y0, w, h).iter().filter(|b| **b).count() as f64
            };
            let mask = match self.merge_masks {
                MaskAgg::Union => joined(group, MaskJoin::Union),
                MaskAgg::Intersection => joined(group, MaskJoin::Intersection),
                MaskAgg::Max => joined(&[Agg::Max.pick(group, area)], MaskJoin::Union),
                MaskAgg::Min => joined(&[Agg::Min.pick(group, area)], MaskJoin::Union),
            };
            if let Some((poly, (x1, y1, x2, y2))) = mask {
                (m.x1, m.y1, m.x2, m.y2) = (x1, y1, x2, y2);
                m.polygon = Some(poly);
            }
            return m;
        }
        match self.merge_boxes {
            Agg::Average => {
                let n = group.len() as f32;
                m.x1 = group.iter().map(|d| d.x1).sum::<f32>() / n;
                m.y1 = group.iter().map(|d| d.y1).sum::<f32>() / n;
                m.x2 = group.iter().map(|d| d.x2).sum::<f32>() / n;
                m.y2 = group.iter().map(|d| d.y2).sum::<f32>() / n;
            }
            agg => {
                let d = agg.pick(group, |d| (d.width() * d.height()) as f64);
                (m.x1, m.y1, m.x2, m.y2) = (d.x1, d.y1, d.x2, d.y2);
            }
        }
        m
    }

    fn presence(&self, dets: &[Det]) -> (bool, Vec<(String, f64)>) {
        let required = match (&self.required_objects, self.class_aware) {
            (None, _) => Required::Count(0),
            (Some(Required::PerClass(p)), false) => Required::Count(p.iter().map(|x| x.1).sum()),
            (Some(r), _) => r.clone(),
        };
        if let Required::Count(n) = required {
            if dets.len() < n {
                return (false, Vec::new());
            }
        }
        if !self.class_aware {
            let c = self.presence.of(dets.iter().map(|d| d.confidence as f64));
            return (true, vec![("any_object".into(), c)]);
        }
        let mut classes: Vec<&str> = dets.iter().map(|d| d.class_name.as_str()).collect();
        classes.sort_unstable();
        classes.dedup();
        if let Required::PerClass(p) = &required {
            for (class, n) in p {
                if dets.iter().filter(|d| &d.class_name == class).count() < *n {
                    return (false, Vec::new());
                }
            }
        }
        let per = classes
            .into_iter()
            .map(|c| {
                let v = self.presence.of(dets
                    .iter()
                    .filter(|d| d.class_name == c)
                    .map(|d| d.confidence as f64));
                (c.to_owned(), v)
            })
            .collect();
        (true, per)
    }
}

/// Detections made from nothing (no source image): the reference answers their image size
/// as null.
pub fn empty() -> Detections {
    Detections {
        width: 0,
        height: 0,
        lineage: super::value::Lineage::root("", 0, 0),
        dets: Vec::new(),
    }
}

/// What replaces a detection's class: a classification of its crop, or (for text from
/// another block) a string.
pub enum Replacement<'a> {
    Classification(&'a Classification),
    Text(&'a str),
    Missing,
}

/// `detections_classes_replacement`: each detection takes the top class (class id,
/// confidence) of the classification of its crop (matched by the crop's parent, the
/// detection's id; text is matched by position), or the fallback; without either it is
/// dropped. Replaced detections get new ids.
pub fn replace_classes(
    dets: &Detections,
    classes: &[Replacement<'_>],
    fallback: Option<(&str, i64)>,
) -> Detections {
    let fallback_det = |d: &Det| {
        fallback.map(|(name, id)| {
            let mut n = d.clone();
            n.class_name = name.to_owned();
            n.class_id = if id < 0 { i64::MAX } else { id };
            n.confidence = 0.0;
            n
        })
    };
    let texts = classes.iter().any(|c| matches!(c, Replacement::Text(_)));
    let mut out = Vec::new();
    if texts {
        for (i, d) in dets.dets.iter().enumerate() {
            let n = match classes.get(i) {
                Some(Replacement::Text(t)) => {
                    let mut n = d.clone();
                    n.class_name = (*t).to_owned();
                    n.class_id = 0;
                    n.confidence = 1.0;
                    Some(n)
                }
                _ => fallback_det(d),
            };
            out.extend(n);
        }
    } else {
        let cls: Vec<&Classification> = classes
            .iter()
            .filter_map(|c| match c {
                Replacement::Classification(c) => Some(*c),
                _ => None,
            })
            .collect();
        // No classification with a top class at all: empty detections.
        if cls.iter().all(|c| c.top().is_none()) {
            return empty();
        }
        for d in &dets.dets {
            let Some(c) = cls.iter().find(|c| *c.lineage.parent_id == *d.detection_id) else {
                continue;
            };
            // Multi-label with no predicted class: dropped, fallback or not (as the reference).
            if let crate::tasks::classification::ClassificationOutput::MultiLabel {
                predicted_classes,
                ..
            } = &c.output
            {
                if predicted_classes.is_empty() {
                    continue;
                }
            }
            let n = match c.top() {
                Some((name, id, conf)) => {
                    let mut n = d.clone();
                    n.class_name = name;
                    n.class_id = id as i64;
                    // The confidence as the classification answers it (4 places).
                    n.confidence = ((conf as f64 * 10_000.0).round() / 10_000.0) as f32;
                    Some(n)
                }
                None => fallback_det(d),
            };
            out.extend(n);
        }
    }
    for n in &mut out {
        n.detection_id = uuid::Uuid::new_v4().to_string();
    }
    if out.is_empty() {
        return empty();
    }
    Detections {
        dets: out,
        ..dets.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workflows::value::Lineage;
    use std::sync::Arc;

    fn det(id: &str, class: i64, conf: f32, b: (f32, f32, f32, f32)) -> Det {
        Det {
            x1: b.0,
            y1: b.1,
            x2: b.2,
            y2: b.3,
            confidence: conf,
            class_id: class,
            class_name: format!("c{class}"),
            detection_id: id.into(),
            lineage: Lineage::root("image", 1000, 1000),
            polygon: None,
            keypoints: None,
        }
    }

    fn later() -> Instant {
        Instant::now() + std::time::Duration::from_secs(60)
    }

    fn dets(d: Vec<Det>) -> Detections {
        Detections {
            width: 1000,
            height: 1000,
            lineage: Lineage::root("image", 1000, 1000),
            dets: d,
        }
    }

    /// The reference's tiles of kite.jpg (1352x900) at 640x640, overlap 0.2: v1 cuts the
    /// border tiles, v2 moves them in (x at 0, 512, 712; y at 0, 260).
    #[test]
    fn tiles_as_the_reference_cuts_them() {
        let v1 = slice_offsets((1352, 900), (640, 640), (0.2, 0.2), false);
        assert_eq!(v1.len(), 6);
        assert_eq!(v1[2], (1024, 0, 1352, 640));
        assert_eq!(v1[5], (1024, 512, 1352, 900));
        let v2 = slice_offsets((1352, 900), (640, 640), (0.2, 0.2), true);
        let xs: Vec<u32> = v2.iter().map(|t| t.0).collect();
        assert_eq!(xs, [0, 512, 712, 0, 512, 712]);
        assert!(v2.iter().all(|t| t.2 - t.0 == 640 && t.3 - t.1 == 640));
        assert_eq!(v2[3].1, 260);
        // A tile larger than the image: v2 one tile of the image's size, repeats dropped.
        let one = slice_offsets((300, 200), (640, 640), (0.5, 0.5), true);
        assert_eq!(one, [(0, 0, 300, 200)]);
        assert_eq!(slice_count((1352, 900), (640, 640), (0.2, 0.2), true), 6);
        assert_eq!(
            slice_count((1000, 1000), (1, 1), (0.0, 0.0), false),
            1_000_000
        );
        // v1 keeps a tile larger than the image whole: one tile, counted as one.
        assert_eq!(slice_count((300, 200), (4000, 4000), (0.9, 0.9), false), 1);
        assert_eq!(
            slice_offsets((300, 200), (4000, 4000), (0.9, 0.9), false),
            [(0, 0, 300, 200)]
        );
        // Offsets near u32::MAX do not wrap.
        let huge = slice_offsets((431, 1), (u32::MAX, 1), (0.9999999, 0.0), false);
        assert!(huge.iter().all(|t| t.2 > t.0 && t.2 <= 431), "{huge:?}");
    }

    /// NMS keeps the most confident of overlapping same-class boxes, other classes and the
    /// order untouched; NMM merges them into their union, the confidence weighted by area.
    #[test]
    fn stitching_reconciles_overlaps() {
        let a = det("a", 1, 0.6, (0.0, 0.0, 100.0, 100.0));
        let b = det("b", 1, 0.9, (10.0, 0.0, 110.0, 100.0));
        let c = det("c", 2, 0.5, (10.0, 0.0, 110.0, 100.0));
        let into = dets(vec![]);
        let tile = |d: Vec<Det>| (dets(d), (0, 0));
        let s = stitch(
            vec![tile(vec![a.clone()]), tile(vec![b.clone(), c.clone()])],
            &into,
            Overlap::Nms,
            0.3,
            later(),
        )
        .unwrap();
        let ids: Vec<&str> = s.dets.iter().map(|d| d.detection_id.as_str()).collect();
        assert_eq!(ids, ["b", "c"]);
        let s = stitch(
            vec![tile(vec![a.clone()]), tile(vec![b.clone(), c.clone()])],
            &into,
            Overlap::Nmm,
            0.3,
            later(),
        )
        .unwrap();
        assert_eq!(s.dets.len(), 2);
        let m = &s.dets[0];
        assert_eq!((m.detection_id.as_str(), m.x1, m.x2), ("b", 0.0, 110.0));
        assert!((m.confidence - 0.75).abs() < 1e-6);
        let s = stitch(
            vec![(dets(vec![a.clone()]), (500, 300))],
            &into,
            Overlap::None,
            0.3,
            later(),
        )
        .unwrap();
        assert_eq!((s.dets[0].x1, s.dets[0].y2), (500.0, 400.0));
        // Past the run's deadline, reconciling stops: no CPU spent past it.
        let past = Instant::now() - std::time::Duration::from_millis(1);
        assert!(stitch(vec![tile(vec![a, b, c])], &into, Overlap::Nms, 0.3, past).is_none());
    }

    /// Overlaps of instances are their masks' overlaps, not their boxes'.
    #[test]
    fn masks_overlap_by_their_pixels() {
        let mut a = det("a", 1, 0.9, (0.0, 0.0, 100.0, 100.0));
        let mut b = a.clone();
        // Two triangles of the same box: boxes agree, masks barely touch.
        a.polygon = Some(vec![(0.0, 0.0), (100.0, 0.0), (0.0, 100.0)]);
        b.polygon = Some(vec![(100.0, 100.0), (100.0, 0.0), (0.0, 100.0)]);
        assert!(box_iou(&a, &b) > 0.99);
        let pair = [a.clone(), b.clone()];
        assert!(Overlaps::new(&pair).iou(0, 1) < 0.05);
        // Far apart: nothing compared, no overlap.
        let mut c = a.clone();
        c.shifted(500.0, 0.0).clone_into(&mut c);
        assert_eq!(Overlaps::new(&[a.clone(), c]).iou(0, 1), 0.0);
        let (poly, bx) = joined(&[&a, &b], MaskJoin::Union).unwrap();
        assert!(poly.len() >= 4);
        assert_eq!(bx, (0.0, 0.0, 100.0, 100.0));
    }

    fn consensus() -> Consensus {
        Consensus {
            required_votes: 2,
            class_aware: true,
            iou_threshold: 0.3,
            confidence: 0.0,
            classes_to_consider: None,
            required_objects: None,
            presence: Agg::Max,
            merge_confidence: Agg::Average,
            merge_boxes: Agg::Average,
            merge_masks: MaskAgg::Union,
        }
    }

    /// Two sources agree on an object: one detection, averaged; a detection only one source
    /// saw gets no vote through.
    #[test]
    fn consensus_needs_its_votes() {
        let s1 = dets(vec![
            det("a1", 1, 0.8, (0.0, 0.0, 100.0, 100.0)),
            det("a2", 2, 0.9, (500.0, 500.0, 600.0, 600.0)),
        ]);
        let s2 = dets(vec![det("b1", 1, 0.6, (10.0, 0.0, 110.0, 100.0))]);
        let c = consensus();
        let (s1, s2) = (Arc::new(s1), Arc::new(s2));
        let r = c.agree(&[s1.clone(), s2.clone()], later()).unwrap();
        assert_eq!(r.predictions.dets.len(), 1);
        let m = &r.predictions.dets[0];
        assert_eq!((m.x1, m.x2, m.class_id), (5.0, 105.0, 1));
        assert!((m.confidence - 0.7).abs() < 1e-6);
        assert!(r.object_present);
        assert_eq!(r.presence.len(), 1);
        assert_eq!(r.presence[0].0, "c1");
        // Two objects required: not present.
        let c2 = Consensus {
            required_objects: Some(Required::Count(2)),
            ..consensus()
        };
        assert!(
            !c2.agree(&[s1.clone(), s2.clone()], later())
                .unwrap()
                .object_present
        );
        let past = Instant::now() - std::time::Duration::from_millis(1);
        assert!(c2.agree(&[s1.clone(), s2.clone()], past).is_none());
        // One vote is enough: both objects, presence per class.
        let c1 = Consensus {
            required_votes: 1,
            class_aware: false,
            ..consensus()
        };
        let r = c1.agree(&[s1, s2], later()).unwrap();
        assert_eq!(r.predictions.dets.len(), 2);
        assert_eq!(r.presence[0].0, "any_object");
        assert!((r.presence[0].1 - 0.9).abs() < 1e-6);
        // Nothing anywhere: empty, unsized.
        let r = consensus()
            .agree(&[Arc::new(dets(vec![])), Arc::new(dets(vec![]))], later())
            .unwrap();
        assert!(!r.object_present && r.predictions.width == 0);
    }
}
