//! Preprocess: a decoded image (RGB pixels in a ring slot) in, one image's row of the model's
//! NCHW float batch tensor out: environment.json's static crop, contrast and grayscale steps
//! (Roboflow's order), then the resize (stretch, or letterbox with black/grey/white edges) and
//! the model's value range. The returned [`Geometry`] is what postprocessing needs to map
//! network coordinates back to the client's image.
//!
//! The ring slot is only read. The crop is a window of the resize; contrast stretching and
//! grayscale are per-value maps, applied to the resized pixels. The two equalisations need
//! the histogram of the whole (cropped) image and turn it grey: they work on a one-byte grey
//! plane of the crop (a third of an RGB copy), resized as grey.

use std::cell::RefCell;

use fast_image_resize as fr;

use crate::geometry::{Contrast, Geometry, InputSpec, ResizeMode, Steps};

#[derive(Default)]
struct Scratch {
    resizer: fr::Resizer,
    /// The resized content (RGB, or grey on the grey path).
    resized: Vec<u8>,
    /// The grey plane of the crop (equalisations only).
    grey: Vec<u8>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Resizes `pixels` (`src_w x src_h` RGB, standing for an `orig_w x orig_h` image) into
/// `out`, one image's `3 x H x W` slice of the batch tensor, after `steps`; returns its
/// geometry.
#[allow(clippy::too_many_arguments)]
pub fn preprocess_into(
    pixels: &[u8],
    src_w: u32,
    src_h: u32,
    orig_w: u32,
    orig_h: u32,
    steps: &Steps,
    spec: &InputSpec,
    out: &mut [f32],
) -> Result<Geometry, String> {
    debug_assert_eq!(out.len(), spec.image_len());
    // The window of the slot that is kept, in slot pixels, and the geometry in the client's.
    let (window, geo) = match steps.static_crop {
        Some(crop) => {
            let r = crop.rect(orig_w, orig_h);
            let (sx, sy) = (src_w as f64 / orig_w as f64, src_h as f64 / orig_h as f64);
            let scale = |v: u32, k: f64, side: u32| ((v as f64 * k).round() as u32).min(side);
            let (x0, y0) = (scale(r.x0, sx, src_w - 1), scale(r.y0, sy, src_h - 1));
            let (x1, y1) = (
                scale(r.x1, sx, src_w).max(x0 + 1),
                scale(r.y1, sy, src_h).max(y0 + 1),
            );
            let geo = Geometry::compute(r.x1 - r.x0, r.y1 - r.y0, r.map_w, r.map_h, spec)
                .cropped(&r, orig_w, orig_h);
            ((x0, y0, x1 - x0, y1 - y0), geo)
        }
        None => (
            (0, 0, src_w, src_h),
            Geometry::compute(src_w, src_h, orig_w, orig_h, spec),
        ),
    };
    let (cw, ch) = (geo.content_w as u32, geo.content_h as u32);
    let luts = spec.normalization.luts();
    let grey_path = matches!(
        steps.contrast,
        Some(Contrast::HistogramEqualization | Contrast::AdaptiveEqualization)
    );
    SCRATCH.with(|cell| {
        let Scratch {
            resizer,
            resized,
            grey,
        } = &mut *cell.borrow_mut();
        // Bilinear interpolation without antialiasing: what OpenCV's INTER_LINEAR (and so
        // Roboflow) does.
        let bilinear = fr::ResizeOptions::new()
            .resize_alg(fr::ResizeAlg::Interpolation(fr::FilterType::Bilinear));
        let (wx, wy, ww, wh) = window;
        if grey_path {
            grey_plane(pixels, src_w, window, grey);
            match steps.contrast {
                Some(Contrast::HistogramEqualization) => equalize_hist(grey),
                _ => clahe(grey, ww as usize, wh as usize),
            }
            resized.resize(cw as usize * ch as usize, 0);
            let src = fr::images::ImageRef::new(ww, wh, grey, fr::PixelType::U8)
                .map_err(|e| e.to_string())?;
            let mut dst = fr::images::Image::from_slice_u8(cw, ch, resized, fr::PixelType::U8)
                .map_err(|e| e.to_string())?;
            resizer
                .resize(&src, &mut dst, &bilinear)
                .map_err(|e| e.to_string())?;
            write_chw(
                resized,
                1,
                &Identity,
                cw as usize,
                ch as usize,
                &geo,
                spec,
                &luts,
                out,
            );
        } else {
            resized.resize(cw as usize * ch as usize * 3, 0);
            let src = fr::images::ImageRef::new(src_w, src_h, pixels, fr::PixelType::U8x3)
                .map_err(|e| e.to_string())?;
            let mut dst = fr::images::Image::from_slice_u8(cw, ch, resized, fr::PixelType::U8x3)
                .map_err(|e| e.to_string())?;
            let opts = if window == (0, 0, src_w, src_h) {
                bilinear
            } else {
                bilinear.crop(wx as f64, wy as f64, ww as f64, wh as f64)
            };
            resizer
                .resize(&src, &mut dst, &opts)
                .map_err(|e| e.to_string())?;
            let stretch = (steps.contrast == Some(Contrast::Stretching))
                .then(|| stretch_lut(pixels, src_w, window));
            let (cw, ch) = (cw as usize, ch as usize);
            if stretch.is_none() && !steps.grayscale {
                // The usual case: each value straight to its float (no byte map per pixel).
                write_chw(resized, 3, &Identity, cw, ch, &geo, spec, &luts, out);
            } else {
                let map = ValueMap {
                    lut: stretch.unwrap_or_else(identity_lut),
                    grey: steps.grayscale,
                };
                write_chw(resized, 3, &map, cw, ch, &geo, spec, &luts, out);
            }
        }
        Ok(geo)
    })
}

/// What happens to each resized RGB pixel before normalising.
trait PixelMap: Sync {
    fn map(&self, px: &[u8]) -> [u8; 3];
}

struct Identity;

impl PixelMap for Identity {
    #[inline]
    fn map(&self, px: &[u8]) -> [u8; 3] {
        if px.len() == 1 {
            [px[0]; 3]
        } else {
            [px[0], px[1], px[2]]
        }
    }
}

/// A per-value map of every channel (contrast stretching), then grey (OpenCV's weights).
struct ValueMap {
    lut: [u8; 256],
    grey: bool,
}

impl PixelMap for ValueMap {
    #[inline]
    fn map(&self, px: &[u8]) -> [u8; 3] {
        let (r, g, b) = (
            self.lut[px[0] as usize],
            self.lut[px[1] as usize],
            self.lut[px[2] as usize],
        );
        if self.grey {
            [grey(r, g, b); 3]
        } else {
            [r, g, b]
        }
    }
}

fn identity_lut() -> [u8; 256] {
    std::array::from_fn(|v| v as u8)
}

/// OpenCV's `BGR2GRAY` on 8-bit values (fixed point, 14 bits).
#[inline]
fn grey(r: u8, g: u8, b: u8) -> u8 {
    ((r as u32 * 4899 + g as u32 * 9617 + b as u32 * 1868 + (1 << 13)) >> 14) as u8
}

/// The grey plane of `window` (x, y, w, h) of an RGB image `width` pixels wide.
fn grey_plane(rgb: &[u8], width: u32, window: (u32, u32, u32, u32), grey_out: &mut Vec<u8>) {
    let (x0, y0, w, h) = (
        window.0 as usize,
        window.1 as usize,
        window.2 as usize,
        window.3 as usize,
    );
    grey_out.clear();
    grey_out.reserve(w * h);
    for y in y0..y0 + h {
        let row = &rgb[(y * width as usize + x0) * 3..(y * width as usize + x0 + w) * 3];
        grey_out.extend(row.chunks_exact(3).map(|p| grey(p[0], p[1], p[2])));
    }
}

/// skimage's `rescale_intensity(image, in_range=(p2, p98))` with NumPy's (linearly
/// interpolated) 2nd and 98th percentiles of every channel value in the window, as a table.
fn stretch_lut(rgb: &[u8], width: u32, window: (u32, u32, u32, u32)) -> [u8; 256] {
    let (x0, y0, w, h) = (
        window.0 as usize,
        window.1 as usize,
        window.2 as usize,
        window.3 as usize,
    );
    let mut hist = [0u64; 256];
    for y in y0..y0 + h {
        for &v in &rgb[(y * width as usize + x0) * 3..(y * width as usize + x0 + w) * 3] {
            hist[v as usize] += 1;
        }
    }
    let n: u64 = hist.iter().sum();
    // The k-th smallest value (0-based).
    let nth = |k: u64| {
        let mut seen = 0;
        for (v, &c) in hist.iter().enumerate() {
            seen += c;
            if seen > k {
                return v as f64;
            }
        }
        255.0
    };
    let percentile = |q: f64| {
        let pos = q / 100.0 * (n.max(1) - 1) as f64;
        let lo = pos.floor();
        let (a, b) = (nth(lo as u64), nth((lo as u64 + 1).min(n.max(1) - 1)));
        a + (pos - lo) * (b - a)
    };
    let (p2, p98) = (percentile(2.0), percentile(98.0));
    std::array::from_fn(|v| {
        let v = (v as f64).clamp(p2, p98);
        if p98 > p2 {
            ((v - p2) / (p98 - p2) * 255.0) as u8
        } else {
            v as u8
        }
    })
}

/// OpenCV's `equalizeHist`, in place.
fn equalize_hist(grey: &mut [u8]) {
    let mut hist = [0u64; 256];
    for &v in grey.iter() {
        hist[v as usize] += 1;
    }
    let total = grey.len() as u64;
    let Some(first) = hist.iter().position(|&c| c > 0) else {
        return;
    };
    if hist[first] == total {
        return; // one value: OpenCV leaves it as it is
    }
    let scale = 255.0f32 / (total - hist[first]) as f32;
    let mut lut = [0u8; 256];
    let mut sum = 0u64;
    for v in first + 1..256 {
        sum += hist[v];
        lut[v] = (sum as f32 * scale).round_ties_even().clamp(0.0, 255.0) as u8;
    }
    for v in grey.iter_mut() {
        *v = lut[*v as usize];
    }
}

/// Rounds half to even, as OpenCV's `cvRound`, for `0 <= x < 2^22`: adding and subtracting
/// 1.5 x 2^23 leaves the nearest integer. `f32::round_ties_even` is a libm call on baseline
/// x86-64 (no SSE4.1 round instruction), once per pixel here.
#[inline]
fn round_half_even(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (x + MAGIC) - MAGIC
}

/// OpenCV's CLAHE with Roboflow's settings (clip limit 0.03, 8x8 tiles), in place: a clipped
/// histogram per tile (on the image extended by reflection to a multiple of the tiles, as
/// OpenCV does), its cumulative table, and each pixel interpolated bilinearly between the
/// tables of the four nearest tiles.
fn clahe(grey: &mut [u8], w: usize, h: usize) {
    clahe_with(grey, w, h, 0.03);
}

fn clahe_with(grey: &mut [u8], w: usize, h: usize, clip_limit: f64) {
    const TILES: usize = 8;
    if w == 0 || h == 0 {
        return;
    }
    let (ew, eh) = if w.is_multiple_of(TILES) && h.is_multiple_of(TILES) {
        (w, h)
    } else {
        (w + TILES - w % TILES, h + TILES - h % TILES)
    };
    // BORDER_REFLECT_101 past the right and bottom edges.
    let reflect = |i: usize, n: usize| {
        if i < n {
            i
        } else {
            (2 * (n - 1)).saturating_sub(i).min(n - 1)
        }
    };
    let (tw, th) = (ew / TILES, eh / TILES);
    let tile_total = (tw * th) as f64;
    let clip = ((clip_limit * tile_total / 256.0) as u64).max(1);
    let lut_scale = 255.0 / tile_total as f32;
    let mut luts = vec![[0u8; 256]; TILES * TILES];
    for ty in 0..TILES {
        for tx in 0..TILES {
            let mut hist = [0u64; 256];
            for y in ty * th..(ty + 1) * th {
                let row = reflect(y, h) * w;
                for x in tx * tw..(tx + 1) * tw {
                    hist[grey[row + reflect(x, w)] as usize] += 1;
                }
            }
            let mut clipped = 0;
            for c in hist.iter_mut() {
                if *c > clip {
                    clipped += *c - clip;
                    *c = clip;
                }
            }
            let batch = clipped / 256;
            let mut residual = clipped - batch * 256;
            for c in hist.iter_mut() {
                *c += batch;
            }
            if residual > 0 {
                let step = (256 / residual as usize).max(1);
                let mut i = 0;
                while i < 256 && residual > 0 {
                    hist[i] += 1;
                    i += step;
                    residual -= 1;
                }
            }
            let lut = &mut luts[ty * TILES + tx];
            let mut sum = 0u64;
            for (v, c) in hist.iter().enumerate() {
                sum += c;
                lut[v] = (sum as f32 * lut_scale).round_ties_even().clamp(0.0, 255.0) as u8;
            }
        }
    }
    // Per column: the two tiles and the weight of the second; columns sharing their two
    // tiles form a run, so the four tables of a run are picked once per row.
    let cols: Vec<(usize, usize, f32)> = (0..w)
        .map(|x| {
            let f = x as f32 * (1.0 / tw as f32) - 0.5;
            let t1 = f.floor();
            let a = f - t1;
            let t1i = t1 as isize;
            (t1i.max(0) as usize, ((t1i + 1) as usize).min(TILES - 1), a)
        })
        .collect();
    let mut runs: Vec<(usize, usize)> = Vec::new(); // (first column, end)
    for x in 0..w {
        match runs.last_mut() {
            Some(r) if (cols[r.0].0, cols[r.0].1) == (cols[x].0, cols[x].1) => r.1 = x + 1,
            _ => runs.push((x, x + 1)),
        }
    }
    let weights: Vec<f32> = cols.iter().map(|c| c.2).collect();
    for y in 0..h {
        let f = y as f32 * (1.0 / th as f32) - 0.5;
        let t1 = f.floor();
        let ya = f - t1;
        let t1i = t1 as isize;
        let (r1, r2) = (t1i.max(0) as usize, ((t1i + 1) as usize).min(TILES - 1));
        let row = &mut grey[y * w..(y + 1) * w];
        for &(x0, x1) in &runs {
            let (c1, c2, _) = cols[x0];
            let (l11, l12) = (&luts[r1 * TILES + c1], &luts[r1 * TILES + c2]);
            let (l21, l22) = (&luts[r2 * TILES + c1], &luts[r2 * TILES + c2]);
            for (v, &xa) in row[x0..x1].iter_mut().zip(&weights[x0..x1]) {
                let s = *v as usize;
                let top = l11[s] as f32 * (1.0 - xa) + l12[s] as f32 * xa;
                let bottom = l21[s] as f32 * (1.0 - xa) + l22[s] as f32 * xa;
                *v = round_half_even(top * (1.0 - ya) + bottom * ya).clamp(0.0, 255.0) as u8;
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn write_chw<M: PixelMap>(
    pixels: &[u8],
    channels: usize,
    map: &M,
    cw: usize,
    ch: usize,
    geo: &Geometry,
    spec: &InputSpec,
    luts: &[[f32; 256]; 3],
    out: &mut [f32],
) {
    let (nw, nh) = (spec.width as usize, spec.height as usize);
    let plane = nw * nh;
    if let ResizeMode::Letterbox { pad } = spec.resize {
        if cw != nw || ch != nh {
            for (c, p) in out.chunks_mut(plane).enumerate() {
                p.fill(spec.normalization.pad_value(luts, c, pad));
            }
        }
    }
    let (left, top) = (geo.left as usize, geo.top as usize);
    let (r_plane, rest) = out.split_at_mut(plane);
    let (g_plane, b_plane) = rest.split_at_mut(plane);
    for y in 0..ch {
        let row = &pixels[y * cw * channels..(y + 1) * cw * channels];
        let base = (top + y) * nw + left;
        let r = &mut r_plane[base..base + cw];
        let g = &mut g_plane[base..base + cw];
        let b = &mut b_plane[base..base + cw];
        for (x, px) in row.chunks_exact(channels).enumerate() {
            let [pr, pg, pb] = map.map(px);
            r[x] = luts[0][pr as usize];
            g[x] = luts[1][pg as usize];
            b[x] = luts[2][pb as usize];
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn round_half_even_is_cv_round_on_pixel_values() {
        // Every quarter step from 0 to 256 (ties included) and values just off the ties.
        for i in 0..=1024 {
            let x = i as f32 / 4.0;
            for v in [x, x + 1e-4, (x - 1e-4).max(0.0)] {
                assert_eq!(round_half_even(v), v.round_ties_even(), "{v}");
            }
        }
    }

    use super::*;
    use crate::geometry::{Contrast, Normalization, Steps};

    fn spec(resize: ResizeMode) -> InputSpec {
        InputSpec {
            width: 640,
            height: 640,
            resize,
            normalization: Normalization::ZeroToOne,
        }
    }

    #[test]
    fn roboflow_format_strings() {
        for (format, mode) in [
            (Some("Stretch to"), ResizeMode::Stretch),
            (None, ResizeMode::Stretch),
            (
                Some("Fit (black edges) in"),
                ResizeMode::Letterbox { pad: 0 },
            ),
            (
                Some("Fit (grey edges) in"),
                ResizeMode::Letterbox { pad: 114 },
            ),
            (
                Some("Fit (white edges) in"),
                ResizeMode::Letterbox { pad: 255 },
            ),
            (
                Some("Fit (reflect edges) in"),
                ResizeMode::Letterbox { pad: 0 },
            ),
        ] {
            assert_eq!(ResizeMode::from_roboflow(format), mode, "{format:?}");
        }
    }

    #[test]
    fn letterbox_geometry_matches_roboflow() {
        // 640x480 into 640x640: width fills, height int(640/(4/3)) = 480, top pad 80.
        let g = Geometry::compute(640, 480, 640, 480, &spec(ResizeMode::Letterbox { pad: 0 }));
        assert_eq!(
            (g.left, g.top, g.content_w, g.content_h),
            (0.0, 80.0, 640.0, 480.0)
        );
        // 768x576 (dog.jpg) into 416x416.
        let s = InputSpec {
            width: 416,
            height: 416,
            ..spec(ResizeMode::Letterbox { pad: 0 })
        };
        let g = Geometry::compute(768, 576, 768, 576, &s);
        assert_eq!((g.content_w, g.content_h, g.top), (416.0, 312.0, 52.0));
        // Tall image: height fills.
        let g = Geometry::compute(300, 600, 300, 600, &spec(ResizeMode::Letterbox { pad: 0 }));
        assert_eq!((g.left, g.content_w, g.content_h), (160.0, 320.0, 640.0));
    }

    #[test]
    fn to_original_inverts_the_placement() {
        let g = Geometry::compute(640, 480, 640, 480, &spec(ResizeMode::Letterbox { pad: 0 }));
        assert_eq!(g.to_original(320.0, 80.0), (320.0, 0.0));
        assert_eq!(g.to_original(640.0, 560.0), (640.0, 480.0));
        let g = Geometry::compute(1280, 960, 1280, 960, &spec(ResizeMode::Stretch));
        assert_eq!(g.to_original(320.0, 320.0), (640.0, 480.0));
        // Decoded at half scale: coordinates still map to the original size.
        let g = Geometry::compute(640, 480, 1280, 960, &spec(ResizeMode::Letterbox { pad: 0 }));
        assert_eq!(g.to_original(640.0, 560.0), (1280.0, 960.0));
    }

    /// A 4x2 all-white image letterboxed into a 4x4 input padded with `pad`.
    fn white_4x2_into_4x4(pad: u8, normalization: Normalization) -> (Geometry, Vec<f32>) {
        let s = InputSpec {
            width: 4,
            height: 4,
            resize: ResizeMode::Letterbox { pad },
            normalization,
        };
        let pixels = vec![255u8; 4 * 2 * 3];
        let mut out = vec![-9f32; s.image_len()];
        let g = preprocess_into(&pixels, 4, 2, 4, 2, &Steps::default(), &s, &mut out).unwrap();
        (g, out)
    }

    #[test]
    fn letterbox_pads_and_normalises() {
        // Rows 0 and 3 are padding.
        let (g, out) = white_4x2_into_4x4(114, Normalization::ZeroToOne);
        assert_eq!((g.top, g.content_h), (1.0, 2.0));
        for c in 0..3 {
            let plane = &out[c * 16..(c + 1) * 16];
            assert!(plane[..4].iter().all(|&v| (v - 114.0 / 255.0).abs() < 1e-6));
            assert!(plane[4..12].iter().all(|&v| (v - 1.0).abs() < 1e-6));
            assert!(plane[12..]
                .iter()
                .all(|&v| (v - 114.0 / 255.0).abs() < 1e-6));
        }
    }

    #[test]
    fn channels_stay_in_rgb_order_and_classification_range() {
        let s = InputSpec {
            width: 2,
            height: 2,
            resize: ResizeMode::Stretch,
            normalization: Normalization::MinusOneToOne,
        };
        let pixels = [255u8, 0, 127].repeat(4);
        let mut out = vec![0f32; s.image_len()];
        preprocess_into(&pixels, 2, 2, 2, 2, &Steps::default(), &s, &mut out).unwrap();
        assert!(out[..4].iter().all(|&v| (v - 1.0).abs() < 1e-6));
        assert!(out[4..8].iter().all(|&v| (v + 1.0).abs() < 1e-6));
        assert!(out[8..].iter().all(|&v| v.abs() < 0.01));
    }

    /// A 42x26 grey test card (not a multiple of the tiles: OpenCV's reflection applies).
    fn card() -> Vec<u8> {
        let mut g = Vec::new();
        for y in 0..26usize {
            for x in 0..42usize {
                let band = if (x / 9 + y / 5) % 2 == 1 { 40 } else { 0 };
                g.push(((x * 7 + y * 13 + (x * y) % 17 + band) % 256) as u8);
            }
        }
        g
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    // What OpenCV 4.12 (cv2.createCLAHE(clipLimit, (8, 8)).apply, cv2.equalizeHist) and
    // skimage 0.26 (rescale_intensity between np.percentile 2 and 98) give for the card.
    // CLAHE clips each tile's histogram at max(1, floor(clipLimit * tile pixels / 256)); the
    // card's tiles (the card extended to 48x32) hold 6x4 = 24 pixels, so every limit below
    // 21.34, Roboflow's 0.03 included, clips at 1 (CLAHE_003), and 40 clips at 3 (CLAHE_40).
    // Rounding 3.75 up to 4 would give OpenCV's answer for 43 and above, where nothing of the
    // card is clipped: 16 pixels more than one level away from CLAHE_40.
    const CLAHE_003: &str = "1520354047474643378a80716060554a5c6e202e37405563757c81d4ecf4fa0e1e2a4059ff1520354a6a2a4060757e78706759aaa8a39a95939fb7983a4a6080949ca5a3a5ff1527354a668a648325395b758a9f4a6a8aaaa69f94918ab5b3adaaadb8bfddc65a759dbfc6cacfd4b80b2035506a8aaa9db14a6e93aac1d8637a8da09d9c7a7976c5c3c8a2afbbd7f0dc819ebdd2e2cbd7dce5405b46607da1c7b0c3617d92a49cb15a707f908e78727371aabcc6cdafceeafbed9abdd6e4dbe1e7f3ef5a70817294b9dac2cc7086927a8c9a7d8595b496adbb9ebf5a6a545e7950629088f3f411ff27462e5d812214304c2f47684d6bb2ac8e9ac5b06a80aa95b6ceb0d4ee405c8e657fa56abcaafa190b40705c85a39d35674065835a956c83b4919ccac3ed6a98c2b4d6bfd7eadd826f8fa98dc5ade0d0173435786a87a3a1bd3a5e7d63937aa57f96b4a2c3b4d9ec75a4d4cae4d2e2d8ed859f91b8a8d3c4eae6255e5f9a8c9e95b8b464567c6a8d7aa48788bfb3d0c4e5e17db7b0efd8e7dbf4eba499c9bedfd4f7f1ec4f4d969cb3a4beb6c75a8a7699879d8c757ea6cdbeefe8f72a4a4a8a7f9f9080a3f4ffffff1c1840404010123e406e5c4a6352cabfb5c0b1bfb5a5d1607163808487386a72a5a3a0bfbbbc12181a24262b4a58621e285d6a627e756f95bab3b6aaa0b2acabd0617b7b7ab6be50858a90c3c1c2e1df202135353c61656c773d4348807a76958882b0b4aaa4b6ada5a8d665639aa0b0da62a2aab2b6e0e0e3e552535759848ca2a4a8555f666a9892857d7eccc3b3c7bdbab4b8eb727a84bcccd280bfcad4d8dff4f8ff757e7ca0b1cadfdedf959596958f95848078dfccd8cfcecadfe3f194a0a6b5d4dffc121d252e383d506222272e374147484e5ecac0bdbdb7afabb6db655e6666594c4062b9f7faff18222aff2a45505762707e8c25323e454a536a797fc4bfbdb4b5bcc2bfca5565655d5a666a8bd213202e404f6115223d50606e76869d2a3a424d5e707f8d8bab9c958f9aa3acb5cd4f5a575f71777fa6c20f1e33526a843555809fa7b1c0cdd6608799a5aab3cabd86aaa3a7bfbec6dadfe4809aa7a4a6bfd4b8dc2a4a7eb5bcca6288a0bac7cccfd5d9657c87939fabb8aa86a9b6c6d7e3e9eef4e994a9b7c1d7e9f7f2ff4879a2cfdee41020406a7e85627384c4c4c6b4b1b0b4baa55d5a687a9b7892a8b4f40ffb1019212a2d4e152c498060852a486a95a47e8b8c97b4b6b2b7959fa7bdb254688ab297aebbcbb6ff19281b2d446360802c4f7e7295b24a6a95ca9ca6a07f8acad3adb4b893aad4c3608abdaac6d1baced3402a4e6a4e7cb59dc65a8a759fcab8608aaf9cb0ad90928ec2cad0b3c4dbbff2db8eb5a8cfe9d1dee9db426556759891cfbad57e6d98bfb4d06a8fb0aab19a929a89dfc5d6dcccf1dffdf4aacec5f4e6eaf2ecfa50758380aeacd4c9d69a86aea4c4c8bcc5d7cfe3cedacde885957b896e886da096ff16112a2039345d6122163928514168598bd0c7ddd4ece4";
    const CLAHE_40: &str = "0b152a40474e4a473a8a7c6a554a3a2a40600b1528355563757c81d4ecf4fa0715203555ff0b152a40602040608086867a6e5caaa3988a878a95b79125395b80949ca5a3a5ff132330436695648a1a2e50758caa4a7595bfb8ae9f958cb5aea3a0a7b8bfddcd4a6e9cbfc6cacfd4b80b1e31507293bfb0c3406e95b5cced68809aaca79e7f7975c2c0c49bacbfd7f0dc7a9dbed2e2cbd7dce53d58416188b0dac0d464899bb5a4c15a74858f8e77706f6daabac3cfacceeafbed95bdd6e4dbe1e7f3ef557087759fc7efd5d47a8f9e85969f77808fb797adbd99bf525f47546c41529282f3f40dff24422957801a0c27442642754f75b8b2929dc7b26080aa95b5ceb0d4ee3558875a71a56abcaafa1509406e5880a39d2a5c35608a639f7591ba959dcac3ed6390baacd0b8d3e5d7786383a58ac2aadecf1032347a6a8ba7a3bf30547d64957daf8798b59fbfacd9ee6594cfc4e5cde2d3e9709185b0a0cdbfeae6226369b098b1a2bfb860507e658d7aa48688bfafd6c4eae165b0a7f7dbecdfefe48c84c1b6dccdf7f1ec595cb2bdd4bfcec1cc528771967d9f886e73a3d5c6f7f0ff0b3535756795806a93eaffffff19175553510a0e464a866e557861dfcfbfc4b5d3cab1db4a5c488082831d50589a9c96beb6bb080d101d20275866721c25647f729a887b98c8bcb8aa9eb5afacd54c6e7775bac43a7a8084c4c1c2dddb16162c303e6970788340454a9491869d8c81afb2a6a2b8ada4a7da5853969fafdf559da4adb6dddfe1e35050595a8891a5b0b355626975a097867b79c8bdb0c6bbb6b7baec696f7db7cfd475bfcad4d6dbf4f8ff80857fa4bcd4eae6e6959998958e91807870dfc8d5cfcecadfe3f190989eaad4dffc08121b242d344b67181d23303c403d4a59cbbfb6b5aea7a2add7585057584c3c3557b4f7faff0e1820ff203a4a56637583911a283a42455065737cbcb4b4b0aebabcb8c2465a5c52505b6086d20815283a4a5c0b18324d63787e8ca320394049596a7a8687a08c888899a0a5adc045504d52646e789fc204142f5068812a558ab5b8c6cfdbe260859ca4aeb5caba7fa09ca7bfc2c6d4dfe46a879c9fa0bfd4b8dc25477cbfc6d46095acd2d8dadbdee1637886949da8b09f7aa1b0c8dfe1e9eef4e98298b4c1d7e9f7f2ff427cacddebf20615356a828a627386c4c2beaaa5a3a4b39a484356708f6e859faff405fb060e1a2a274e0b2543805a8620406592af7f8f8d95b0abaaa7858ba7c3ac3d507aac87acbacbb6ff0e1d10284770648e23498872a9c7406095d4a3aa9f7c83cacca3aab88ab5ddca457cbf9fc4d1baced33520476a518ccab3db609f80b5dfd1528ab7a5b3b18e8e83bfc1cdaebfdcbcedd879a994c4e1cbd8e3d438605276a19ddfc7eb8972a4cfc5e56a9abfb4c4a1979a7ee4bfd1dac3edd4fcf392c2b6efdbe4efe4fa4a718782b8b5f4e2f1a28dc3b4d5e1d7dfefe7efd6decdf27a86666e4b6945756bff0b0720162e29585d180c2f1f48355d4e8befe4f2e7fff7";
    const EQUALIZED: &str = "00050c131e2934404b797b7e82868a929ba483878c949da6b1bcc8f6f8fbfd01060d141ffe02070f16220b131f2c3a46535f6882878d97a1aeb9c5b88c959facb8c3d1dae5fe030a111e2b38293609111c2936431a29384655626a7376858b95a1afbccbd7cd9dabb8c5d3dee8efe90109111f2e3d4b3e4c1a29384655622f40505f69736d75799ba8b8aebccdd9e6ddb1c0d1dde8e1ecf2f718291e2e3e4e5d5362324353625766445666707673787c81a1b1c1d3cbd9e7efecc8d7e5eee9f1f7faf82234463d4e5f6a66704b5d69626d757a7e848d8995a59eb08b9893a2b5aec0d2cbf8fc03ff09151020340c0713251e32443d507c817f858e8a7f86908c9cafa8bcd190a1b5afc1d5d1e1dbfd05020e1f182e433d11251f3449435751648381899590a18692a49fb5b0c5d9d5afabc0d4d1e3deedea0614112520384e495f1a32474359556764718d8a9b97abc090a4bab8cfcde0ddedb5cecbdedbeceaf5f3142c29413e56536766403d555166647270789f9db3b0c8c3a1b9b8d1cfe4e3f0efd7d5e8e8f3f2f9f9f82b2943415b596b6a7649626070707877777d9db5b3cdcbe0859494acacc5c5c5ddf9ffffff0e0e25252507071c1c38383853537f7f7f89899b9b9bb3849393ababab8ea6a8c3c5c8e0e1e303040416181a383a3a161836383a5657596d82828e9092abacaec990a8abacc8c99fbcc0c1dde0e3f2f3070920232746494c502e32345356596e70728597989cb8babdc0dba4a6c3c8cbe4b3d2d5d9ddf0f2f4f522272c3251565b5f6244494e536b6e71737b9c9fa4c1c8cdd1d4ecbac0c3e0e4e7c8e4e8eceef1fafbfc2b3238595f64686b705b6066696d797a7c7da4abcbd1d5dae0e5f5d2d7dbe1f2f5f70104090e131a222b10151e252e363e464e808285898c92989ec08e949ba1a8b0b8c0defbfcfe02060bfc0d131c252f3a434c151f29323d46505962888c939ba2acb5bdc8959da5afb8c0cbd3ed02070d131c25040a111a25323d47531e2934404b5660686e868a929ba4afb9c3cf9da6b1bcc8d2dae4ea01060d141f2b101a2734414e5b666d414e5b666d73767a76929ca6b3c0cdd7e1e9c0cdd7e1e9eff5eef40e1623323e4b2232404e5d677075794957646d74777b7f7ba4b1c0ced9e5edf2edc9d5e1eaf1f6f9f6f92232404e5d67030c162738473d4c5d7e838a858c98a5b5ab878e9cabb9afbdcedafb00fc020b15251a2b040e1a2b1f2f0f1e2f4153495b68728187909e97a5b5c8bd94a2b3c3bacddae8e1fe05100a15273a2f411323362c3e502034475b5364706a75909f98abbcb5c8d7d2a6b9cdc3d5e5deecf3110c1a2e253a4c44572b3e36495d55364b5f59697471777c97a8bcb5cbdbd7e7e3bcd1cbdbeae7f1f7f6182e273d514b5f5969433d51645f6d4b606e6b75757a807eb5b1c8dad7e8e5f0eed2e4e0edecf5faf8fd223a504b605d6b69755b56686672797b828b8a9b98aeabc0899897aca8c0bcd3d1fb01000d0b1e1a322f0c0a1c18322e46435b807f88869492";
    const STRETCHED: &str = "0000080f171e262e356870787f878e969ea581899198a0a8afb7bef1f9ffff0001091018ff00030b131a070f182129323b434c8089929aa3acb5bdb39199a2abb3bcc5ced6ff00050e1720281e27040d161e2730151e28323c464f5963869099a3adb7c1cac2a0aab3bdc7d1dbe4dc00040e18222c352d36151e28323c46232e39434e59525c679ea9b3acb7c2ccd7d0afbac5d0dbd3dee9f4141e17222d38423b4625303b463e49313d4955615a66727ea3afbbc7c1ccd8e4debecad6e2dce8f4fff91a26322c38434f495535414d47535f6b7885928c99a6a1ae909d97a4b1acb9c6c1f9ff00ff04110c192608020f1c1724312c39717e7986938d798795919fada9b7c595a3b1adbbc9c5d3cfff00000a181422302c0e1c182634303e3a48817d8b9995a38796a5a2b1aebdccc9adaab9c8c5d4d1e0dd01100d1c1928383443152433303f3c4b4857928e9e9aaab995a5b6b3c4c2d2d0e0b2c3c1d1cfdfddedeb10211e2f2d3d3b4b492e2c3c3a4a48585666a2a0b0aebebca3b5b3c5c4d5d4e5e4cac9dbdaebeafbfaf9201e302f403f514f61344645565566656475a0b1b0c2c1d2869898ababbdbdbdd0fbffffff0a0a1c1c1c030316162828283b3b7979798b8b9e9e9eb0859797aaaaaa94a8a9bcbdbed2d3d400000013141528292a13142728293d3e3f537f80949596aaabacbf95a9aaabbebfa2b7b9bbd0d2d4e9eb0204191b1d323436392224263b3d3f545658869a9d9fb3b6b8bacfa5a8bcbec1d5b0c6c9ccd0e5e9ecef1a1d21243a3d4043473134383b5154575a709fa2a5bbbec2c5c8deb6b9bcd2d5d8bed5dadee2e7fdffff2024283f43484c51554045494d52686d7175a5aac1c5c9ced2d6edc6cacfd3eaeef80000040a0f151a200c11171c22272d32387b80868b91969ca1b993989ea3a9aeb3b9d1ffffff000107ff090f161c2329303611181e252c32393f468a91979ea4abb1b8be99a0a6adb3bac1c7e00002090f161c00050d151c242c333b171e262e353d454c54878e969ea5adb5bcc4a0a8afb7bec6ced5dd0001091018200c151d262f384049522f384049525a636c62969fa8b0b9c2cad3dcb9c2cad3dce4ede3ec0a131b242d351a242e38414b555f68343e48525b656f7970a5afb9c3ccd6e0eae1bfc9d3dde7f0faf1fb1a242e38414b0008131d28332c364178838d86919ca6b1aa89949faab5adb8c3ceff00ff0007111c1520000a152018230b17232f3b34404c587d8995a19aa6b2beb898a4b0bcb6c2cedad3ff000c05111d29232f0f1b27212d39192633403b48554f5c95a29daab7b1becbc6a8b5c2bcc9d6d1deeb0d0815221c2936313e202d2734413c2735433f4d5b5765739aa9b7b2c1cfcad8d4b7c5c1cfddd8e7f5f014221d2c3a35433f4d302c3a48435235455451605c6c7b78b2afbececadad6e5e2c6d5d2e1deedfcf9ff1a2939354541514d5c403d4c4958676f7f908d9e9cacaaba8c9d9aaba9b9b7c7c5ff00000907171525230805161424223230407c7a8a889896";

    #[test]
    fn equalisations_match_opencv() {
        // The two references are far apart (849 pixels more than one level), so a clip limit
        // that were ignored cannot match both.
        let far = hex(CLAHE_003)
            .iter()
            .zip(hex(CLAHE_40))
            .filter(|(a, b)| a.abs_diff(*b) > 1)
            .count();
        assert!(
            far > 800,
            "the CLAHE references differ in only {far} pixels"
        );
        // CLAHE's interpolation rounds a float sum: at most one pixel in a thousand may land
        // one level apart from OpenCV's. 2.0 clips at 1 on this card, as 0.03 does.
        for (clip, want) in [(0.03, CLAHE_003), (2.0, CLAHE_003), (40.0, CLAHE_40)] {
            let mut g = card();
            clahe_with(&mut g, 42, 26, clip);
            let want = hex(want);
            let off: Vec<i32> = g
                .iter()
                .zip(&want)
                .map(|(&a, &b)| (a as i32 - b as i32).abs())
                .filter(|&d| d > 0)
                .collect();
            assert!(off.iter().all(|&d| d <= 1), "CLAHE clip {clip}: {off:?}");
            assert!(
                off.len() * 1000 <= want.len(),
                "CLAHE clip {clip}: {} pixels differ",
                off.len()
            );
        }
        let mut g = card();
        equalize_hist(&mut g);
        assert_eq!(g, hex(EQUALIZED));
    }

    /// CLAHE of a flat 64x64 image of value 128, worked out by hand with OpenCV's algorithm.
    /// Each 8x8 tile holds 64 pixels, so its histogram is a single bin of 64 at 128. The clip
    /// count is max(1, floor(limit * 64 / 256)); the excess 64 - clip is handed out one count
    /// per bin from bin 0 in steps of 256 / excess (4 for every excess from 52 to 64), so bins
    /// 0, 4, ..., 128 (33 of them) get one each, and the table at 128 is
    /// round(cumulative(128) * 255 / 64) with cumulative(128) = 33 + clip:
    ///   limit 0.03 or 4 -> clip 1  -> 34 -> 135.47 -> 135
    ///   limit 30        -> clip 7 (7.5 truncated) -> 40 -> 159.38 -> 159 (rounded, 8: 163)
    ///   limit 40        -> clip 10 -> 43 -> 171.33 -> 171
    ///   limit 1000      -> clip 250 >= 64: nothing clipped, cumulative 64 -> 255
    /// All tables are equal, so the bilinear interpolation changes nothing. (OpenCV 4.12 gives
    /// exactly these.) A higher limit never lowers the output here, and every step is visible.
    #[test]
    fn clahe_clip_limit_on_a_flat_image_is_as_worked_out_by_hand() {
        for (limit, want) in [
            (0.03, 135u8),
            (4.0, 135),
            (30.0, 159),
            (40.0, 171),
            (1000.0, 255),
        ] {
            let mut g = vec![128u8; 64 * 64];
            clahe_with(&mut g, 64, 64, limit);
            let mut seen = g.clone();
            seen.sort_unstable();
            seen.dedup();
            assert_eq!(seen, [want], "clip limit {limit}");
        }
    }

    #[test]
    fn contrast_stretching_matches_skimage_and_grey_matches_opencv() {
        let rgb: Vec<u8> = card().iter().flat_map(|&v| [v, v, v]).collect();
        let lut = stretch_lut(&rgb, 42, (0, 0, 42, 26));
        let got: Vec<u8> = card().iter().map(|&v| lut[v as usize]).collect();
        assert_eq!(got, hex(STRETCHED));
        // cv2.cvtColor(BGR2GRAY) of red, green, blue, (12, 200, 99), (250, 251, 3).
        let px = [
            (255, 0, 0),
            (0, 255, 0),
            (0, 0, 255),
            (12, 200, 99),
            (250, 251, 3),
        ];
        let want = [76, 150, 29, 132, 222];
        for ((r, g, b), w) in px.into_iter().zip(want) {
            assert_eq!(grey(r, g, b), w);
        }
    }

    #[test]
    fn static_crop_maps_boxes_back_into_the_full_image() {
        use crate::geometry::StaticCrop;
        // A 200x100 image, crop x 20-85 %, y 10-90 %: pixels 40..170 x 10..90.
        let steps = Steps {
            static_crop: Some(StaticCrop {
                x_min: 20.0,
                y_min: 10.0,
                x_max: 85.0,
                y_max: 90.0,
            }),
            ..Steps::default()
        };
        let s = InputSpec {
            width: 26,
            height: 16,
            resize: ResizeMode::Stretch,
            normalization: Normalization::ZeroToOne,
        };
        // White inside the crop window, black outside: the input must be all white.
        let image = |w: usize, h: usize, k: usize| -> Vec<u8> {
            (0..h)
                .flat_map(|y| (0..w).map(move |x| (x, y)))
                .flat_map(|(x, y)| {
                    let inside = (40 / k..170 / k).contains(&x) && (10 / k..90 / k).contains(&y);
                    [if inside { 255 } else { 0 }; 3]
                })
                .collect()
        };
        let mut out = vec![0f32; s.image_len()];
        let g = preprocess_into(
            &image(200, 100, 1),
            200,
            100,
            200,
            100,
            &steps,
            &s,
            &mut out,
        )
        .unwrap();
        assert!(
            out.iter().all(|&v| v > 0.99),
            "the input sees only the crop"
        );
        assert_eq!(
            (g.orig_w, g.orig_h, g.shift_x, g.shift_y),
            (130, 80, 40, 10)
        );
        assert_eq!((g.full_w, g.full_h), (200, 100));
        // The network's far corner is the crop's far corner in the client's image.
        assert_eq!(g.to_full_rounded(26.0, 16.0), (170.0, 90.0));
        assert_eq!(g.to_full_rounded(-5.0, 0.0), (40.0, 10.0));
        // Decoded at half size: the same geometry in the client's pixels.
        let g2 =
            preprocess_into(&image(100, 50, 2), 100, 50, 200, 100, &steps, &s, &mut out).unwrap();
        assert_eq!(g2, g);
        assert!(out.iter().all(|&v| v > 0.99));
    }

    #[test]
    fn grey_steps_make_the_three_planes_equal() {
        let s = InputSpec {
            width: 8,
            height: 8,
            resize: ResizeMode::Stretch,
            normalization: Normalization::ZeroToOne,
        };
        let pixels: Vec<u8> = (0..16 * 16usize)
            .flat_map(|i| [(i % 256) as u8, 200, (i * 3 % 256) as u8])
            .collect();
        for contrast in [
            None,
            Some(Contrast::HistogramEqualization),
            Some(Contrast::AdaptiveEqualization),
        ] {
            let steps = Steps {
                contrast,
                grayscale: contrast.is_none(),
                ..Steps::default()
            };
            let mut out = vec![0f32; s.image_len()];
            preprocess_into(&pixels, 16, 16, 16, 16, &steps, &s, &mut out).unwrap();
            assert_eq!(out[..64], out[64..128], "{contrast:?}");
            assert_eq!(out[..64], out[128..], "{contrast:?}");
        }
    }

    #[test]
    fn imagenet_normalisation_pads_with_the_mean() {
        let (_, out) = white_4x2_into_4x4(0, Normalization::ImageNet);
        assert_eq!(out[0], 0.0, "padding is 0 after normalising");
        assert!((out[4] - (1.0 - 0.485) / 0.229).abs() < 1e-5);
        assert!((out[32 + 4] - (1.0 - 0.406) / 0.225).abs() < 1e-5);
    }
}
