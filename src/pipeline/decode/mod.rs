//! Decode: compressed image bytes in, RGB pixels in a ring slot out (a [`DecodedImage`]).
//! JPEG goes through libjpeg-turbo straight into the slot; PNG through the `png` crate row
//! by row into it (interlaced ones pass by pass); WebP, GIF, BMP, TIFF (and CMYK JPEGs, PNGs
//! with an EXIF orientation) through the `image` crate into one buffer of their own pixel type, converted into the
//! slot. EXIF orientation is applied unless disabled. Runs on the decode pool, never on the
//! HTTP reactor threads.
//!
//! Every decode is bounded before it starts, from the file's header alone: pixels
//! (MAX_IMAGE_PIXELS), JPEG scans (MAX_JPEG_SCANS), work (pixels x passes,
//! MAX_DECODE_WORK_PIXELS) and memory beyond the slot ([`DecodeOptions::memory_budget`]:
//! 4 bytes per allowed pixel), whatever the format. A job whose deadline passed or whose
//! client went away is not decoded; PNGs check between row bands.

use std::cell::RefCell;
use std::time::Instant;

use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine;
use image::metadata::Orientation;
use image::{ColorType, ImageDecoder, ImageFormat};

use super::ring::SlotHandle;

mod jpeg;
mod orient;
mod other;
mod png;

use self::jpeg::*;
use self::orient::*;
pub use self::orient::{exif_orientation, orient_into};
use self::other::*;
pub use self::png::ADAM7_PASSES;
use self::png::*;

/// Why an image could not be decoded. Every variant but the last two is the client's fault
/// (4xx).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("Could not load input image. Cause: the image is empty (zero bytes).")]
    Empty,
    #[error("Could not load input image. Cause: Malformed base64 input image.")]
    Base64,
    #[error("Could not load input image. Cause: {0}")]
    Undecodable(String),
    #[error(
        "Could not load input image. Cause: its header claims {width}x{height} pixels, \
         more than the {max} allowed (MAX_IMAGE_PIXELS)."
    )]
    TooManyPixels { width: u64, height: u64, max: u64 },
    #[error(
        "Could not load input image. Cause: the frame has {width}x{height} pixels, more than \
         the {max} a ring slot holds (RING_SLOT_PIXELS)."
    )]
    FrameTooLarge { width: u32, height: u32, max: u64 },
    #[error(
        "Could not load input image. Cause: the JPEG has {scans} scans, more than the {max} \
         allowed (MAX_JPEG_SCANS)."
    )]
    TooManyScans { scans: u64, max: u64 },
    #[error(
        "Could not load input image. Cause: decoding it is {work} pixel-passes of work \
         (pixels x JPEG scans), more than the {max} allowed (MAX_DECODE_WORK_PIXELS)."
    )]
    TooMuchWork { work: u64, max: u64 },
    #[error(
        "Could not load input image. Cause: decoding this {what} takes {needed} bytes of \
         memory, more than the {budget} one decode may use (4 bytes x MAX_IMAGE_PIXELS)."
    )]
    TooMuchMemory {
        what: &'static str,
        needed: u64,
        budget: u64,
    },
    /// The request's deadline passed before or while decoding (504, not the input's fault).
    #[error("Deadline exceeded while decoding the image")]
    DeadlineExceeded,
    /// Nobody waits for the image any more: its client went away.
    #[error("The client went away before the image was decoded")]
    Cancelled,
}

/// Per-request decode settings.
#[derive(Debug, Clone, Copy)]
pub struct DecodeOptions {
    /// Apply EXIF orientation (Roboflow's default).
    pub auto_orient: bool,
    /// Largest width x height a header may claim.
    pub max_image_pixels: u64,
    /// Most scans a JPEG may have (progressive JPEGs have about 10).
    pub max_jpeg_scans: u64,
    /// Most pixels x passes (JPEG scans) one decode may work through.
    pub max_decode_work: u64,
    /// The smallest image preprocessing needs, if known: a JPEG much larger is decoded at
    /// 1/2, 1/4 or 1/8 scale in the DCT domain (cheaper than decoding it whole and shrinking
    /// it afterwards), never below what the network input needs.
    pub needed: Option<NeededSize>,
    /// Decoding stops past this instant (checked before decoding and between PNG rows).
    pub deadline: Option<Instant>,
}

/// Bytes per allowed pixel (MAX_IMAGE_PIXELS) one decode may allocate beyond its output.
pub const DECODE_BYTES_PER_PIXEL: u64 = 4;

impl DecodeOptions {
    /// Memory one decode may allocate beyond where its pixels go (the ring slot).
    pub fn memory_budget(&self) -> u64 {
        self.max_image_pixels.saturating_mul(DECODE_BYTES_PER_PIXEL)
    }

    /// Whether work on the image should stop: its deadline passed or `gone()` (nobody waits).
    fn check(&self, gone: &dyn Fn() -> bool) -> Result<(), DecodeError> {
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            Err(DecodeError::DeadlineExceeded)
        } else if gone() {
            Err(DecodeError::Cancelled)
        } else {
            Ok(())
        }
    }
}

/// What preprocessing needs of a decoded image to resize it without upsampling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NeededSize {
    pub width: u32,
    pub height: u32,
    /// Letterbox keeps the aspect ratio, so only the fitting side must reach the input size.
    pub keep_aspect: bool,
}

impl NeededSize {
    /// Whether a `w x h` decode (oriented) of an `ow x oh` image is large enough.
    fn satisfied_by(&self, w: usize, h: usize, ow: usize, oh: usize) -> bool {
        let (nw, nh) = (self.width as f64, self.height as f64);
        if self.keep_aspect {
            let r = (nw / ow as f64).min(nh / oh as f64);
            w as f64 >= (ow as f64 * r).floor() && h as f64 >= (oh as f64 * r).floor()
        } else {
            w as f64 >= nw && h as f64 >= nh
        }
    }
}

/// An image decoded into a ring slot: `width x height` RGB pixels, rows packed, at the start
/// of the slot. When the original was larger than a slot holds it was decoded at a reduced
/// scale; `orig_*` keep the size the client sent, which responses report and boxes map to.
#[derive(Debug)]
pub struct DecodedImage {
    pub slot: SlotHandle,
    pub width: u32,
    pub height: u32,
    pub orig_width: u32,
    pub orig_height: u32,
}

impl DecodedImage {
    /// The RGB pixels, `width * height * 3` bytes.
    pub fn pixels(&self) -> &[u8] {
        &self.slot.bytes()[..self.width as usize * self.height as usize * 3]
    }
}

/// Standard alphabet, padding optional (clients differ).
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Decodes base64 text, accepting a `data:image/...;base64,` prefix and line breaks.
pub fn base64_bytes(text: &str) -> Result<Vec<u8>, DecodeError> {
    let text = text.trim();
    let text = match text.strip_prefix("data:") {
        Some(rest) => rest
            .split_once(',')
            .map(|(_, b)| b)
            .ok_or(DecodeError::Base64)?,
        None => text,
    };
    // Line breaks are rare: decoded as sent first, the text is looked through for them only
    // when that fails (one pass over megabytes saved for everyone else).
    BASE64
        .decode(text)
        .or_else(|_| {
            let compact: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
            BASE64.decode(compact)
        })
        .map_err(|_| DecodeError::Base64)
}

thread_local! {
    static DECOMPRESSOR: RefCell<Option<turbojpeg::Decompressor>> = const { RefCell::new(None) };
    /// EXIF-rotated JPEGs are decoded here first, then turned into the slot (at most a
    /// slot's size, kept per decode thread).
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Decodes `data` into `slot`; `gone()` says the client went away (checked before decoding
/// and between PNG row bands, like the deadline).
pub fn decode_into(
    data: &[u8],
    mut slot: SlotHandle,
    opts: &DecodeOptions,
    gone: &dyn Fn() -> bool,
) -> Result<DecodedImage, DecodeError> {
    opts.check(gone)?;
    let probe = Probe::read(data, opts)?;
    let out = slot.bytes_mut();
    let into = Target::Slot {
        pixels: out.len() / 3,
    };
    probe.within_budget(into, opts)?;
    let (width, height) = probe.decode(data, out, into, opts, gone)?;
    let (orig_width, orig_height) = probe.oriented_size();
    Ok(DecodedImage {
        slot,
        width,
        height,
        orig_width,
        orig_height,
    })
}

/// The whole image as RGB, oriented, at full size (drawing), within the same bounds as
/// [`decode_into`], its own pixels counted in the memory budget.
pub fn decode_full(
    data: &[u8],
    opts: &DecodeOptions,
    gone: &dyn Fn() -> bool,
) -> Result<image::RgbImage, DecodeError> {
    opts.check(gone)?;
    let opts = DecodeOptions {
        needed: None,
        ..*opts
    };
    let probe = Probe::read(data, &opts)?;
    probe.within_budget(Target::Full, &opts)?;
    let (w, h) = probe.oriented_size();
    let mut out = vec![0u8; w as usize * h as usize * 3];
    let (dw, dh) = probe.decode(data, &mut out, Target::Full, &opts, gone)?;
    debug_assert_eq!((dw, dh), (w, h));
    image::RgbImage::from_raw(w, h, out)
        .ok_or_else(|| DecodeError::Undecodable("the decoded image has the wrong size.".into()))
}

/// Where decoded pixels go: a ring slot of `pixels` (larger images are decoded smaller), or a
/// buffer of exactly the oriented full size.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Target {
    Slot { pixels: usize },
    Full,
}

/// What an image's header says: its format, size and orientation, and what decoding it costs.
#[derive(Debug)]
struct Probe {
    kind: Kind,
    width: u32,
    height: u32,
    orientation: Orientation,
}

#[derive(Debug)]
enum Kind {
    /// libjpeg-turbo; `coefficients` bytes are buffered for a progressive or multi-scan file
    /// (see [`JpegLayout::buffered`]).
    Jpeg { coefficients: u64 },
    /// The `png` crate, row by row.
    Png { interlaced: bool },
    /// The `image` crate: a buffer of `color` pixels, plus `extra` bytes per pixel the
    /// decoder allocates of its own.
    Image {
        format: ImageFormat,
        color: ColorType,
        extra: u64,
    },
}

impl Probe {
    /// Reads the header and refuses, before any pixel is decoded, what is over a limit.
    fn read(data: &[u8], opts: &DecodeOptions) -> Result<Self, DecodeError> {
        if data.is_empty() {
            return Err(DecodeError::Empty);
        }
        if data.starts_with(&[0xFF, 0xD8]) {
            return Self::jpeg(data, opts);
        }
        if data.starts_with(b"\x89PNG\r\n\x1a\n") {
            if let Some(probe) = Self::png(data, opts)? {
                return Ok(probe);
            }
        }
        Self::image(data, opts, None)
    }

    fn jpeg(data: &[u8], opts: &DecodeOptions) -> Result<Self, DecodeError> {
        let layout = JpegLayout::read(data)?;
        check_pixels(layout.width as u64, layout.height as u64, opts)?;
        if layout.scans > opts.max_jpeg_scans {
            return Err(DecodeError::TooManyScans {
                scans: layout.scans,
                max: opts.max_jpeg_scans,
            });
        }
        let work = layout.width as u64 * layout.height as u64 * layout.scans.max(1);
        if work > opts.max_decode_work {
            return Err(DecodeError::TooMuchWork {
                work,
                max: opts.max_decode_work,
            });
        }
        if layout.cmyk {
            // libjpeg-turbo gives no RGB for CMYK; the general decoder does.
            let buffered = layout.buffered().then(|| layout.coefficients());
            return Self::image(data, opts, buffered);
        }
        let orientation = if opts.auto_orient {
            exif_orientation(data)
        } else {
            Orientation::NoTransforms
        };
        Ok(Self {
            kind: Kind::Jpeg {
                coefficients: if layout.buffered() {
                    layout.coefficients()
                } else {
                    0
                },
            },
            width: layout.width,
            height: layout.height,
            orientation,
        })
    }

    /// `None` for a PNG with an EXIF orientation to apply (the general decoder does that).
    fn png(data: &[u8], opts: &DecodeOptions) -> Result<Option<Self>, DecodeError> {
        let mut decoder = png_decoder(data, opts);
        let header = decoder.read_header_info().map_err(bad_png)?;
        let (width, height, interlaced) = (header.width, header.height, header.interlaced);
        check_pixels(width as u64, height as u64, opts)?;
        let reader = decoder.read_info().map_err(bad_png)?;
        let oriented = opts.auto_orient
            && reader
                .info()
                .exif_metadata
                .as_deref()
                .and_then(Orientation::from_exif_chunk)
                .is_some_and(|o| o != Orientation::NoTransforms);
        Ok((!oriented).then_some(Self {
            kind: Kind::Png { interlaced },
            width,
            height,
            orientation: Orientation::NoTransforms,
        }))
    }

    /// Through the `image` crate; `coefficients`: what a CMYK JPEG buffers.
    fn image(
        data: &[u8],
        opts: &DecodeOptions,
        coefficients: Option<u64>,
    ) -> Result<Self, DecodeError> {
        let format = image::guess_format(data).map_err(not_an_image)?;
        let mut decoder = general_decoder(data, format, opts)?;
        let (width, height) = decoder.dimensions();
        check_pixels(width as u64, height as u64, opts)?;
        let orientation = if opts.auto_orient {
            decoder.orientation().unwrap_or(Orientation::NoTransforms)
        } else {
            Orientation::NoTransforms
        };
        // What each decoder allocates besides the buffer it fills, per pixel (read in their
        // sources): WebP, a lossless image without alpha through an RGBA buffer (4), a lossy
        // one its YUV planes and alpha planes (6.5), an animation's first frame a canvas, a
        // frame and those (14); a GIF frame smaller than its screen goes through an RGBA frame
        // buffer (4); TIFF decodes the whole image into its own buffer (CMYK: 4 or 8 bytes)
        // and copies it; a CMYK JPEG through zune its coefficients when buffered, and rows.
        let color = decoder.color_type();
        let extra = match format {
            ImageFormat::WebP if webp_is_animated(data) => 14,
            ImageFormat::WebP => 7,
            ImageFormat::Gif => 4,
            ImageFormat::Tiff => {
                let method = tiff_compression(data);
                if !method.is_some_and(|m| TIFF_PLAIN.contains(&m)) {
                    let method = method.map_or_else(|| "unreadable".to_owned(), |m| m.to_string());
                    return Err(DecodeError::Undecodable(format!(
                        "TIFF compression {method} is not accepted: only uncompressed, LZW, \
                         Deflate, PackBits and fax TIFFs are (JPEG or WebP inside a TIFF decodes \
                         at its own size, whatever the TIFF's header says)."
                    )));
                }
                // Its own buffer of the file's samples: 2 bytes more than ours for CMYK 16.
                color.bytes_per_pixel() as u64 + 2
            }
            ImageFormat::Jpeg => {
                coefficients
                    .unwrap_or(0)
                    .div_ceil(width as u64 * height as u64)
                    + 3
            }
            _ => 0,
        };
        Ok(Self {
            kind: Kind::Image {
                format,
                color,
                extra,
            },
            width,
            height,
            orientation,
        })
    }

    fn pixels(&self) -> u64 {
        self.width as u64 * self.height as u64
    }

    fn oriented_size(&self) -> (u32, u32) {
        oriented_size(self.width, self.height, self.orientation)
    }

    /// Bytes the decode allocates beyond the slot (for [`Target::Full`], its output too).
    fn memory(&self, into: Target) -> u64 {
        let px = self.pixels();
        let own = match (&self.kind, into) {
            (Kind::Jpeg { coefficients }, _) => {
                let turned = self.orientation != Orientation::NoTransforms;
                coefficients
                    + if turned && into == Target::Full {
                        3 * px
                    } else {
                        0
                    }
            }
            (Kind::Png { interlaced: false }, _) => 0,
            (Kind::Png { interlaced: true }, Target::Slot { pixels }) => {
                // Sums of the pixels each output pixel averages, when shrunk.
                let k = shrink_factor(self.width, self.height, pixels);
                if k > 1 {
                    12 * (self.width / k).max(1) as u64 * (self.height / k).max(1) as u64
                } else {
                    0
                }
            }
            (Kind::Png { interlaced: true }, Target::Full) => 0,
            (Kind::Image { color, extra, .. }, _) => px * (color.bytes_per_pixel() as u64 + extra),
        };
        own + if into == Target::Full { 3 * px } else { 0 }
    }

    fn within_budget(&self, into: Target, opts: &DecodeOptions) -> Result<(), DecodeError> {
        let needed = self.memory(into);
        let budget = opts.memory_budget();
        if needed > budget {
            return Err(DecodeError::TooMuchMemory {
                what: match self.kind {
                    Kind::Jpeg { .. } => "JPEG",
                    Kind::Png { .. } => "PNG",
                    Kind::Image { format, .. } => format.extensions_str()[0],
                },
                needed,
                budget,
            });
        }
        Ok(())
    }

    /// Decodes into `out`; returns the size written (oriented).
    fn decode(
        &self,
        data: &[u8],
        out: &mut [u8],
        into: Target,
        opts: &DecodeOptions,
        gone: &dyn Fn() -> bool,
    ) -> Result<(u32, u32), DecodeError> {
        match self.kind {
            Kind::Jpeg { .. } => self.decode_jpeg(data, out, into, opts),
            Kind::Png { interlaced } => decode_png(data, out, interlaced, opts, gone),
            Kind::Image { format, color, .. } => {
                let mut decoder = general_decoder(data, format, opts)?;
                let native_len = decoder.total_bytes();
                // What the decoder allocates of its own (a GIF frame of any size, a TIFF's
                // chunks) is held to what the budget leaves beside the buffer it fills.
                let mut limits = image::Limits::default();
                limits.max_alloc = Some(opts.memory_budget().saturating_sub(native_len));
                decoder.set_limits(limits).map_err(not_an_image)?;
                let mut native = vec![0u8; native_len as usize];
                opts.check(gone)?;
                decoder.read_image(&mut native).map_err(not_an_image)?;
                opts.check(gone)?;
                Ok(convert_into(
                    &native,
                    color,
                    self.width,
                    self.height,
                    self.orientation,
                    out,
                ))
            }
        }
    }

    fn decode_jpeg(
        &self,
        data: &[u8],
        out: &mut [u8],
        into: Target,
        opts: &DecodeOptions,
    ) -> Result<(u32, u32), DecodeError> {
        DECOMPRESSOR.with(|cell| {
            let mut cell = cell.borrow_mut();
            if cell.is_none() {
                *cell = Some(turbojpeg::Decompressor::new().map_err(bad_jpeg)?);
            }
            let dec = cell.as_mut().expect("initialised above");
            let decoded = self.decode_jpeg_with(dec, data, out, into, opts);
            if decoded.is_err() {
                // A handle whose header read failed can answer the next read with no header
                // at all (width -1): the next image gets a fresh one.
                *cell = None;
            }
            decoded
        })
    }

    fn decode_jpeg_with(
        &self,
        dec: &mut turbojpeg::Decompressor,
        data: &[u8],
        out: &mut [u8],
        into: Target,
        opts: &DecodeOptions,
    ) -> Result<(u32, u32), DecodeError> {
        // The scans were counted already; libjpeg-turbo's own limit is a second guard.
        dec.set_scan_limit(opts.max_jpeg_scans.min(u32::MAX as u64) as u32)
            .map_err(bad_jpeg)?;
        let header = dec.read_header(data).map_err(bad_jpeg)?;
        if (header.width as u32, header.height as u32) != (self.width, self.height) {
            return Err(DecodeError::Undecodable(
                "the JPEG's frame header is inconsistent.".into(),
            ));
        }
        let (w0, h0) = (header.width, header.height);
        let slot_pixels = out.len() / 3;
        // libjpeg-turbo's scales with SIMD inverse DCTs, smallest first. Its other eighths
        // (3/8, 5/8, 6/8, 7/8) run plain C and decode the test photos slower than 4/8 and
        // mostly slower than 8/8 (docs/benchmarks.md, "Reduced-scale JPEG decoding").
        let factors = [1, 2, 4, 8]
            .map(|m| turbojpeg::ScalingFactor::new(m, 8))
            .into_iter();
        let fits = |f: &turbojpeg::ScalingFactor| f.scale(w0) * f.scale(h0) <= slot_pixels;
        let (ow, oh) = self.oriented_size();
        let o = self.orientation;
        // The most reduced decode that still covers what preprocessing needs ...
        let enough = opts
            .needed
            .filter(|_| into != Target::Full)
            .and_then(|need| {
                factors.clone().find(|f| {
                    let (w, h) = oriented_size(f.scale(w0) as u32, f.scale(h0) as u32, o);
                    fits(f) && need.satisfied_by(w as usize, h as usize, ow as usize, oh as usize)
                })
            });
        // ... else the largest that fits.
        let factor = enough
                .or_else(|| factors.clone().rev().find(fits))
                .ok_or_else(|| {
                    DecodeError::Undecodable(format!(
                        "a {w0}x{h0} JPEG does not fit a ring slot even at 1/8 scale (RING_SLOT_PIXELS)."
                    ))
                })?;
        let (w, h) = (factor.scale(w0), factor.scale(h0));
        dec.set_scaling_factor(factor).map_err(bad_jpeg)?;
        let result = if o == Orientation::NoTransforms {
            dec.decompress(data, rgb_image(&mut out[..w * h * 3], w, h))
        } else if into == Target::Full {
            let mut turned = vec![0u8; w * h * 3];
            let r = dec.decompress(data, rgb_image(&mut turned[..], w, h));
            orient_into(&turned, w as u32, h as u32, o, out);
            r
        } else {
            SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                scratch.resize(w * h * 3, 0);
                let r = dec.decompress(data, rgb_image(&mut scratch[..], w, h));
                orient_into(&scratch, w as u32, h as u32, o, out);
                r
            })
        };
        let _ = dec.set_scaling_factor(turbojpeg::ScalingFactor::ONE);
        match result {
            Ok(()) => Ok(oriented_size(w as u32, h as u32, o)),
            // Damaged data (a truncated file, a bad code): libjpeg-turbo decoded what it
            // could and warned, as OpenCV's decoder (Roboflow's) accepts too.
            Err(turbojpeg::Error::TurboJpegError(m)) if is_warning(&m) => {
                Ok(oriented_size(w as u32, h as u32, o))
            }
            Err(e) => Err(bad_jpeg(e)),
        }
    }
}

fn check_pixels(width: u64, height: u64, opts: &DecodeOptions) -> Result<(), DecodeError> {
    if width == 0 || height == 0 {
        return Err(DecodeError::Undecodable(format!(
            "the image has no pixels ({width}x{height})."
        )));
    }
    if width * height > opts.max_image_pixels {
        return Err(DecodeError::TooManyPixels {
            width,
            height,
            max: opts.max_image_pixels,
        });
    }
    Ok(())
}

/// The smallest integer shrink of a `w x h` image that fits `pixels`.
fn shrink_factor(w: u32, h: u32, pixels: usize) -> u32 {
    let mut k = 1u32;
    while ((w / k).max(1) as usize) * ((h / k).max(1) as usize) > pixels {
        k += 1;
    }
    k
}

#[cfg(test)]
mod tests;
