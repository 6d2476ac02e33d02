//! Preprocess: a decoded image (RGB pixels in a ring slot) in, one image's row of the model's
//! NCHW float batch tensor out, resized as environment.json says (stretch, or letterbox with
//! black/grey/white edges) and scaled to the model's range. The returned [`Geometry`] is what
//! postprocessing needs to map network coordinates back to the original image.

use std::cell::RefCell;

use fast_image_resize as fr;

use crate::geometry::{Geometry, InputSpec, ResizeMode};

thread_local! {
    static RESIZER: RefCell<(fr::Resizer, Vec<u8>)> = RefCell::new((fr::Resizer::new(), Vec::new()));
}

/// Resizes `pixels` (`src_w x src_h` RGB) into `out`, one image's `3 x H x W` slice of the
/// batch tensor, and returns its geometry.
pub fn preprocess_into(
    pixels: &[u8],
    src_w: u32,
    src_h: u32,
    orig_w: u32,
    orig_h: u32,
    spec: &InputSpec,
    out: &mut [f32],
) -> Result<Geometry, String> {
    debug_assert_eq!(out.len(), spec.image_len());
    let geo = Geometry::compute(src_w, src_h, orig_w, orig_h, spec);
    let (cw, ch) = (geo.content_w as u32, geo.content_h as u32);
    let lut = spec.normalization.lut();
    RESIZER.with(|cell| {
        let (resizer, scratch) = &mut *cell.borrow_mut();
        scratch.resize(cw as usize * ch as usize * 3, 0);
        let src = fr::images::ImageRef::new(src_w, src_h, pixels, fr::PixelType::U8x3)
            .map_err(|e| e.to_string())?;
        let mut dst = fr::images::Image::from_slice_u8(cw, ch, scratch, fr::PixelType::U8x3)
            .map_err(|e| e.to_string())?;
        // Bilinear interpolation without antialiasing: what OpenCV's INTER_LINEAR (and so
        // Roboflow) does.
        resizer
            .resize(
                &src,
                &mut dst,
                &fr::ResizeOptions::new()
                    .resize_alg(fr::ResizeAlg::Interpolation(fr::FilterType::Bilinear)),
            )
            .map_err(|e| e.to_string())?;
        write_chw(scratch, cw as usize, ch as usize, &geo, spec, &lut, out);
        Ok(geo)
    })
}

fn write_chw(
    rgb: &[u8],
    cw: usize,
    ch: usize,
    geo: &Geometry,
    spec: &InputSpec,
    lut: &[f32; 256],
    out: &mut [f32],
) {
    let (nw, nh) = (spec.width as usize, spec.height as usize);
    let plane = nw * nh;
    if let ResizeMode::Letterbox { pad } = spec.resize {
        if cw != nw || ch != nh {
            out.fill(lut[pad as usize]);
        }
    }
    let (left, top) = (geo.left as usize, geo.top as usize);
    let (r_plane, rest) = out.split_at_mut(plane);
    let (g_plane, b_plane) = rest.split_at_mut(plane);
    for y in 0..ch {
        let row = &rgb[y * cw * 3..(y + 1) * cw * 3];
        let base = (top + y) * nw + left;
        let r = &mut r_plane[base..base + cw];
        let g = &mut g_plane[base..base + cw];
        let b = &mut b_plane[base..base + cw];
        for (x, px) in row.chunks_exact(3).enumerate() {
            r[x] = lut[px[0] as usize];
            g[x] = lut[px[1] as usize];
            b[x] = lut[px[2] as usize];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::Normalization;

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
        assert_eq!(
            ResizeMode::from_roboflow(Some("Stretch to")),
            ResizeMode::Stretch
        );
        assert_eq!(ResizeMode::from_roboflow(None), ResizeMode::Stretch);
        assert_eq!(
            ResizeMode::from_roboflow(Some("Fit (black edges) in")),
            ResizeMode::Letterbox { pad: 0 }
        );
        assert_eq!(
            ResizeMode::from_roboflow(Some("Fit (grey edges) in")),
            ResizeMode::Letterbox { pad: 114 }
        );
        assert_eq!(
            ResizeMode::from_roboflow(Some("Fit (white edges) in")),
            ResizeMode::Letterbox { pad: 255 }
        );
        assert_eq!(
            ResizeMode::from_roboflow(Some("Fit (reflect edges) in")),
            ResizeMode::Letterbox { pad: 0 }
        );
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

    #[test]
    fn letterbox_pads_and_normalises() {
        // A 4x2 all-white image into 4x4 grey-edged: rows 0 and 3 are padding.
        let s = InputSpec {
            width: 4,
            height: 4,
            resize: ResizeMode::Letterbox { pad: 114 },
            normalization: Normalization::ZeroToOne,
        };
        let pixels = vec![255u8; 4 * 2 * 3];
        let mut out = vec![-1f32; s.image_len()];
        let g = preprocess_into(&pixels, 4, 2, 4, 2, &s, &mut out).unwrap();
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
        preprocess_into(&pixels, 2, 2, 2, 2, &s, &mut out).unwrap();
        assert!(out[..4].iter().all(|&v| (v - 1.0).abs() < 1e-6));
        assert!(out[4..8].iter().all(|&v| (v + 1.0).abs() < 1e-6));
        assert!(out[8..].iter().all(|&v| v.abs() < 0.01));
    }
}
