//! PNG: the `png` crate's decoder within the memory budget, decoding row by row (interlaced
//! files pass by pass) straight into the ring slot.

use super::*;
use std::io::Cursor;

/// The `png` crate's decoder for `data`, to 8-bit samples, allocating at most the memory
/// budget of its own (metadata chunks it does not need are skipped).
pub(super) fn png_decoder<'a>(
    data: &'a [u8],
    opts: &DecodeOptions,
) -> ::png::Decoder<Cursor<&'a [u8]>> {
    let limits = ::png::Limits {
        bytes: opts.memory_budget().min(usize::MAX as u64) as usize,
    };
    let mut decoder = ::png::Decoder::new_with_limits(Cursor::new(data), limits);
    decoder.set_ignore_iccp_chunk(true);
    decoder.set_ignore_text_chunk(true);
    decoder.set_transformations(::png::Transformations::normalize_to_color8());
    decoder
}

pub(super) fn bad_png(e: ::png::DecodingError) -> DecodeError {
    DecodeError::Undecodable(format!("not a valid PNG ({e})."))
}

/// Adam7 interlacing: each pass's first column and row, and its steps across and down.
pub const ADAM7_PASSES: [(usize, usize, usize, usize); 7] = [
    (0, 0, 8, 8),
    (4, 0, 8, 8),
    (0, 4, 4, 8),
    (2, 0, 4, 4),
    (0, 2, 2, 4),
    (1, 0, 2, 2),
    (0, 1, 1, 2),
];

/// PNG into `out`, row by row: 16-bit samples are stripped to 8 bits, palettes and grey
/// are expanded, alpha is dropped, and an image larger than `out` is shrunk on the fly by
/// an integer box filter. Memory beyond `out` is one row, whatever the bit depth, plus for a
/// shrunk interlaced image the sums of its output pixels; the deadline and the client are
/// checked between row bands.
pub(super) fn decode_png(
    data: &[u8],
    out: &mut [u8],
    interlaced: bool,
    opts: &DecodeOptions,
    gone: &dyn Fn() -> bool,
) -> Result<(u32, u32), DecodeError> {
    let mut reader = png_decoder(data, opts).read_info().map_err(bad_png)?;
    let (w, h) = (reader.info().width, reader.info().height);
    let channels = reader.output_color_type().0.samples();
    let k = shrink_factor(w, h, out.len() / 3) as usize;
    let (dw, dh) = ((w as usize / k).max(1), (h as usize / k).max(1));
    // Pixels averaged into each output pixel (fewer than k x k when a side is shorter than k).
    let n = (k.min(w as usize) * k.min(h as usize)) as u32;
    let out = &mut out[..dw * dh * 3];
    let rgb = |px: &[u8]| -> [u8; 3] {
        match channels {
            1 | 2 => [px[0]; 3],
            _ => [px[0], px[1], px[2]],
        }
    };
    let ends_early = || DecodeError::Undecodable("the PNG ends early.".into());
    if interlaced {
        // Adam7: seven passes, each a subsampled image; every pixel arrives once.
        let mut sums = vec![0u32; if k > 1 { dw * dh * 3 } else { 0 }];
        let mut rows = 0usize;
        for (x0, y0, dx, dy) in ADAM7_PASSES {
            if x0 >= w as usize || y0 >= h as usize {
                continue;
            }
            for y in (y0..h as usize).step_by(dy) {
                if rows.is_multiple_of(64) {
                    opts.check(gone)?;
                }
                rows += 1;
                let row = reader.next_row().map_err(bad_png)?.ok_or_else(ends_early)?;
                let (oy, xs) = (y / k, (x0..w as usize).step_by(dx));
                if oy >= dh {
                    continue;
                }
                for (x, px) in xs.zip(row.data().chunks_exact(channels)) {
                    let ox = x / k;
                    if ox >= dw {
                        continue;
                    }
                    let at = (oy * dw + ox) * 3;
                    if k == 1 {
                        out[at..at + 3].copy_from_slice(&rgb(px));
                    } else {
                        for (s, v) in sums[at..at + 3].iter_mut().zip(rgb(px)) {
                            *s += v as u32;
                        }
                    }
                }
            }
        }
        if k > 1 {
            for (d, s) in out.iter_mut().zip(&sums) {
                *d = ((*s + n / 2) / n) as u8;
            }
        }
        return Ok((dw as u32, dh as u32));
    }
    let mut acc = vec![0u32; if k > 1 { dw * 3 } else { 0 }];
    for y in 0..h as usize {
        if y.is_multiple_of(64) {
            opts.check(gone)?;
        }
        let row = reader.next_row().map_err(bad_png)?.ok_or_else(ends_early)?;
        let row = row.data();
        let oy = y / k;
        if oy >= dh {
            continue; // the last rows of a shrunk image that do not fill a block
        }
        if k == 1 {
            let dst = &mut out[oy * dw * 3..(oy + 1) * dw * 3];
            for (d, px) in dst.chunks_exact_mut(3).zip(row.chunks_exact(channels)) {
                d.copy_from_slice(&rgb(px));
            }
            continue;
        }
        for (x, px) in row.chunks_exact(channels).take(dw * k).enumerate() {
            let a = &mut acc[(x / k) * 3..(x / k) * 3 + 3];
            for (a, v) in a.iter_mut().zip(rgb(px)) {
                *a += v as u32;
            }
        }
        if (y + 1) % k == 0 || (h as usize) < k && y + 1 == h as usize {
            let dst = &mut out[oy * dw * 3..(oy + 1) * dw * 3];
            for (d, a) in dst.iter_mut().zip(acc.iter_mut()) {
                *d = ((*a + n / 2) / n) as u8;
                *a = 0;
            }
        }
    }
    Ok((dw as u32, dh as u32))
}
