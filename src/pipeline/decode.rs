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
use std::io::Cursor;
use std::time::Instant;

use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine;
use image::metadata::Orientation;
use image::{ColorType, ImageDecoder, ImageFormat};

use super::ring::SlotHandle;

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
    /// 1/2, 1/4 or 1/8 scale in the DCT domain (far cheaper than decoding it whole and
    /// shrinking it afterwards), never below what the network input needs.
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
    let decoded = if text.bytes().any(|b| b.is_ascii_whitespace()) {
        let compact: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        BASE64.decode(compact)
    } else {
        BASE64.decode(text)
    };
    decoded.map_err(|_| DecodeError::Base64)
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
        let factors = [
            turbojpeg::ScalingFactor::ONE_EIGHTH,
            turbojpeg::ScalingFactor::ONE_QUARTER,
            turbojpeg::ScalingFactor::ONE_HALF,
            turbojpeg::ScalingFactor::ONE,
        ];
        let fits = |f: &turbojpeg::ScalingFactor| f.scale(w0) * f.scale(h0) <= slot_pixels;
        let (ow, oh) = self.oriented_size();
        let o = self.orientation;
        // The most reduced decode that still covers what preprocessing needs ...
        let enough = opts
            .needed
            .filter(|_| into != Target::Full)
            .and_then(|need| {
                factors.iter().copied().find(|f| {
                    let (w, h) = oriented_size(f.scale(w0) as u32, f.scale(h0) as u32, o);
                    fits(f) && need.satisfied_by(w as usize, h as usize, ow as usize, oh as usize)
                })
            });
        // ... else the largest that fits.
        let factor = enough
                .or_else(|| factors.iter().rev().copied().find(fits))
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

fn bad_jpeg(e: turbojpeg::Error) -> DecodeError {
    DecodeError::Undecodable(format!("not a valid JPEG ({e})."))
}

/// `pixels` as libjpeg-turbo's packed RGB output of `w x h`.
fn rgb_image(pixels: &mut [u8], w: usize, h: usize) -> turbojpeg::Image<&mut [u8]> {
    turbojpeg::Image {
        pixels,
        width: w,
        pitch: w * 3,
        height: h,
        format: turbojpeg::PixelFormat::RGB,
    }
}

/// TIFF compressions decoded within the image's own size: none, CCITT RLE, fax 3 and 4, LZW,
/// Deflate (both codes), PackBits. JPEG and WebP inside a TIFF decode at their own size.
const TIFF_PLAIN: [u32; 8] = [1, 2, 3, 4, 5, 8, 32773, 32946];

/// The Compression tag of a TIFF's first image (the one decoded), read as the `tiff` crate
/// reads it (whatever its type, the last of duplicates).
fn tiff_compression(data: &[u8]) -> Option<u32> {
    let mut decoder = tiff::decoder::Decoder::new(Cursor::new(data)).ok()?;
    match decoder.find_tag(tiff::tags::Tag::Compression) {
        Ok(Some(value)) => value.into_u32().ok(),
        Ok(None) => Some(1), // absent: uncompressed
        Err(_) => None,
    }
}

/// Whether a WebP file is animated (its VP8X header's animation flag).
fn webp_is_animated(data: &[u8]) -> bool {
    data.get(12..16) == Some(b"VP8X") && data.get(20).is_some_and(|f| f & 0x02 != 0)
}

/// libjpeg's warnings (JWRN_*): the decode finished, with damaged data filled in.
fn is_warning(message: &str) -> bool {
    [
        "Corrupt JPEG data",
        "Premature end of JPEG file",
        "Invalid SOS parameters for sequential JPEG",
        "Warning: unknown JFIF revision",
        "Inconsistent progression sequence",
        "Unknown Adobe color transform code",
    ]
    .iter()
    .any(|w| message.starts_with(w))
}

/// The `png` crate's decoder for `data`, to 8-bit samples, allocating at most the memory
/// budget of its own (metadata chunks it does not need are skipped).
fn png_decoder<'a>(data: &'a [u8], opts: &DecodeOptions) -> png::Decoder<Cursor<&'a [u8]>> {
    let limits = png::Limits {
        bytes: opts.memory_budget().min(usize::MAX as u64) as usize,
    };
    let mut decoder = png::Decoder::new_with_limits(Cursor::new(data), limits);
    decoder.set_ignore_iccp_chunk(true);
    decoder.set_ignore_text_chunk(true);
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    decoder
}

fn bad_png(e: png::DecodingError) -> DecodeError {
    DecodeError::Undecodable(format!("not a valid PNG ({e})."))
}

fn not_an_image(e: image::ImageError) -> DecodeError {
    DecodeError::Undecodable(format!(
        "the bytes are not an image in a known format ({e})."
    ))
}

/// The `image` crate's decoder for `data`, allowed the memory budget.
fn general_decoder<'a>(
    data: &'a [u8],
    format: ImageFormat,
    opts: &DecodeOptions,
) -> Result<Box<dyn ImageDecoder + 'a>, DecodeError> {
    let mut reader = image::ImageReader::with_format(Cursor::new(data), format);
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(opts.memory_budget());
    reader.limits(limits);
    reader
        .into_decoder()
        .map(|d| Box::new(d) as Box<dyn ImageDecoder>)
        .map_err(not_an_image)
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

/// What a JPEG's markers say, read without decoding: its frame and how many scans it has.
#[derive(Debug, Default)]
struct JpegLayout {
    width: u32,
    height: u32,
    /// Horizontal and vertical sampling factors of each component.
    sampling: Vec<(u8, u8)>,
    scans: u64,
    /// Progressive (SOF2, 6, 10, 14).
    progressive: bool,
    /// Components in the first scan.
    first_scan_components: usize,
    cmyk: bool,
}

impl JpegLayout {
    fn read(data: &[u8]) -> Result<Self, DecodeError> {
        let bad = |why: &str| DecodeError::Undecodable(format!("not a valid JPEG ({why})."));
        let mut layout = JpegLayout::default();
        let mut frame = false;
        let mut adobe_transform = None;
        let mut i = 2; // after SOI
        while i + 1 < data.len() {
            if data[i] != 0xFF {
                // Entropy-coded data: skip to the next marker (0xFF not followed by a
                // stuffed zero or a restart marker).
                match memchr::memchr(0xFF, &data[i..]) {
                    Some(at) => i += at,
                    None => break,
                }
                continue;
            }
            let marker = data[i + 1];
            match marker {
                0xFF => i += 1, // fill byte
                0x00 | 0xD0..=0xD7 | 0x01 | 0xD8 => i += 2,
                0xD9 => break,
                _ => {
                    let Some(len) = data.get(i + 2..i + 4) else {
                        break;
                    };
                    let len = u16::from_be_bytes([len[0], len[1]]) as usize;
                    let segment = data
                        .get(i + 4..(i + 2 + len).min(data.len()))
                        .unwrap_or(&[]);
                    match marker {
                        0xC0..=0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF if !frame => {
                            if segment.len() < 6 {
                                return Err(bad("short frame header"));
                            }
                            frame = true;
                            layout.progressive = matches!(marker, 0xC2 | 0xC6 | 0xCA | 0xCE);
                            layout.height = u16::from_be_bytes([segment[1], segment[2]]) as u32;
                            layout.width = u16::from_be_bytes([segment[3], segment[4]]) as u32;
                            let n = segment[5] as usize;
                            layout.sampling = segment[6..]
                                .chunks_exact(3)
                                .take(n)
                                .map(|c| ((c[1] >> 4).max(1), (c[1] & 15).max(1)))
                                .collect();
                            if layout.sampling.len() != n || n == 0 {
                                return Err(bad("short frame header"));
                            }
                        }
                        0xDA => {
                            if layout.scans == 0 {
                                layout.first_scan_components =
                                    segment.first().copied().unwrap_or(0) as usize;
                            }
                            layout.scans += 1;
                        }
                        0xEE if segment.starts_with(b"Adobe") && segment.len() >= 12 => {
                            adobe_transform = Some(segment[11]);
                        }
                        _ => {}
                    }
                    i += 2 + len.max(2);
                }
            }
        }
        if !frame {
            return Err(bad("no frame header"));
        }
        layout.cmyk =
            layout.sampling.len() == 4 || (layout.sampling.len() > 4 && adobe_transform.is_some());
        Ok(layout)
    }

    /// Whether libjpeg buffers every coefficient of the image before output: a progressive
    /// file, several scans, or a first scan without every component.
    fn buffered(&self) -> bool {
        self.progressive || self.scans > 1 || self.first_scan_components < self.sampling.len()
    }

    /// Bytes of the DCT coefficients libjpeg buffers (see [`Self::buffered`]): 64
    /// coefficients of 2 bytes per 8x8 block of each component, padded to whole MCUs.
    fn coefficients(&self) -> u64 {
        let hmax = self.sampling.iter().map(|s| s.0).max().unwrap_or(1) as u64;
        let vmax = self.sampling.iter().map(|s| s.1).max().unwrap_or(1) as u64;
        let (w, h) = (self.width as u64, self.height as u64);
        self.sampling
            .iter()
            .map(|&(hs, vs)| {
                let bw = (w * hs as u64)
                    .div_ceil(8 * hmax)
                    .next_multiple_of(hs as u64);
                let bh = (h * vs as u64)
                    .div_ceil(8 * vmax)
                    .next_multiple_of(vs as u64);
                (bw + hs as u64) * (bh + vs as u64) * 128
            })
            .sum()
    }
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
fn decode_png(
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

/// Writes a decoded `w x h` buffer of `color` pixels into `out` as 8-bit RGB, oriented by
/// `o`, shrunk by the smallest integer box filter that fits `out`; returns the size written.
/// Samples convert as the `image` crate's `into_rgb8` does (16-bit rounded, float clamped,
/// alpha dropped).
fn convert_into(
    native: &[u8],
    color: ColorType,
    w: u32,
    h: u32,
    o: Orientation,
    out: &mut [u8],
) -> (u32, u32) {
    let (ow, oh) = oriented_size(w, h, o);
    let k = shrink_factor(ow, oh, out.len() / 3) as usize;
    let (dw, dh) = ((ow as usize / k).max(1), (oh as usize / k).max(1));
    let channels = color.channel_count() as usize;
    let bpp = color.bytes_per_pixel() as usize;
    let sample = |at: usize| -> u8 {
        match color {
            ColorType::L16 | ColorType::La16 | ColorType::Rgb16 | ColorType::Rgba16 => {
                let v = u16::from_ne_bytes([native[at], native[at + 1]]);
                ((v as u32 + 128) / 257) as u8
            }
            ColorType::Rgb32F | ColorType::Rgba32F => {
                let v = f32::from_ne_bytes([
                    native[at],
                    native[at + 1],
                    native[at + 2],
                    native[at + 3],
                ]);
                (v.clamp(0.0, 1.0) * 255.0).round() as u8
            }
            _ => native[at],
        }
    };
    let size = (bpp / channels).max(1);
    let rgb = |x: usize, y: usize| -> [u8; 3] {
        let at = (y * w as usize + x) * bpp;
        if channels < 3 {
            [sample(at); 3]
        } else {
            [sample(at), sample(at + size), sample(at + 2 * size)]
        }
    };
    let (w, h) = (w as usize, h as usize);
    let source = |dx: usize, dy: usize| source_pixel(o, w, h, dx, dy);
    let n = (k * k) as u32;
    for y in 0..dh {
        for x in 0..dw {
            let px = if k == 1 {
                let (sx, sy) = source(x, y);
                rgb(sx, sy)
            } else {
                let mut sum = [0u32; 3];
                for by in 0..k {
                    for bx in 0..k {
                        // An image narrower than a block repeats its last column (row).
                        let (ox, oy) = (
                            (x * k + bx).min(ow as usize - 1),
                            (y * k + by).min(oh as usize - 1),
                        );
                        let (sx, sy) = source(ox, oy);
                        for (s, v) in sum.iter_mut().zip(rgb(sx, sy)) {
                            *s += v as u32;
                        }
                    }
                }
                sum.map(|s| ((s + n / 2) / n) as u8)
            };
            out[(y * dw + x) * 3..(y * dw + x) * 3 + 3].copy_from_slice(&px);
        }
    }
    (dw as u32, dh as u32)
}

/// Reads the EXIF orientation from a JPEG's APP1 segment without decoding anything else.
pub fn exif_orientation(jpeg: &[u8]) -> Orientation {
    let mut i = 2; // after SOI
    while i + 4 <= jpeg.len() {
        if jpeg[i] != 0xFF {
            break;
        }
        let marker = jpeg[i + 1];
        if marker == 0xFF {
            i += 1; // fill byte
            continue;
        }
        if marker == 0xDA || marker == 0xD9 {
            break; // start of scan / end of image: no EXIF before the pixels
        }
        let len = u16::from_be_bytes([jpeg[i + 2], jpeg[i + 3]]) as usize;
        if len < 2 || i + 2 + len > jpeg.len() {
            break;
        }
        let segment = &jpeg[i + 4..i + 2 + len];
        if marker == 0xE1 && segment.starts_with(b"Exif\0\0") {
            return Orientation::from_exif_chunk(&segment[6..])
                .unwrap_or(Orientation::NoTransforms);
        }
        i += 2 + len;
    }
    Orientation::NoTransforms
}

fn oriented_size(w: u32, h: u32, o: Orientation) -> (u32, u32) {
    match o {
        Orientation::Rotate90
        | Orientation::Rotate270
        | Orientation::Rotate90FlipH
        | Orientation::Rotate270FlipH => (h, w),
        _ => (w, h),
    }
}

/// The pixel of a `w x h` image that lands at `(dx, dy)` once oriented by `o`.
fn source_pixel(o: Orientation, w: usize, h: usize, dx: usize, dy: usize) -> (usize, usize) {
    match o {
        Orientation::NoTransforms => (dx, dy),
        Orientation::Rotate90 => (dy, h - 1 - dx),
        Orientation::Rotate180 => (w - 1 - dx, h - 1 - dy),
        Orientation::Rotate270 => (w - 1 - dy, dx),
        Orientation::FlipHorizontal => (w - 1 - dx, dy),
        Orientation::FlipVertical => (dx, h - 1 - dy),
        Orientation::Rotate90FlipH => (dy, dx),
        Orientation::Rotate270FlipH => (w - 1 - dy, h - 1 - dx),
    }
}

/// Writes `src` (w x h RGB) into `dst` transformed by `o`, with the same meaning as
/// `image::DynamicImage::apply_orientation`.
pub fn orient_into(src: &[u8], w: u32, h: u32, o: Orientation, dst: &mut [u8]) {
    let (w, h) = (w as usize, h as usize);
    let (dw, dh) = {
        let (a, b) = oriented_size(w as u32, h as u32, o);
        (a as usize, b as usize)
    };
    for dy in 0..dh {
        for dx in 0..dw {
            let (sx, sy) = source_pixel(o, w, h, dx, dy);
            let s = (sy * w + sx) * 3;
            let d = (dy * dw + dx) * 3;
            dst[d..d + 3].copy_from_slice(&src[s..s + 3]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::ring::Ring;
    use std::sync::Arc;

    const OPTS: DecodeOptions = DecodeOptions {
        auto_orient: true,
        max_image_pixels: 100_000_000,
        max_jpeg_scans: 100,
        max_decode_work: 2_000_000_000,
        needed: None,
        deadline: None,
    };

    fn ring(pixels: usize) -> Arc<Ring> {
        Ring::create(&std::env::temp_dir(), 2, pixels * 3).unwrap()
    }

    fn gradient(w: u32, h: u32) -> image::RgbImage {
        image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 5) as u8, 128]))
    }

    fn encode(img: &image::RgbImage, fmt: image::ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, fmt).unwrap();
        out.into_inner()
    }

    /// The largest difference between two images' samples (over the shorter one).
    fn max_diff(a: &[u8], b: &[u8]) -> i32 {
        a.iter()
            .zip(b)
            .map(|(a, b)| (*a as i32 - *b as i32).abs())
            .max()
            .unwrap_or(0)
    }

    /// `img` as PNG, decoded into a slot of `slot_pixels`.
    fn png_in_slot(img: &image::RgbImage, slot_pixels: usize) -> DecodedImage {
        let ring = ring(slot_pixels);
        let data = encode(img, image::ImageFormat::Png);
        decode_into(&data, ring.try_acquire().unwrap(), &OPTS, &|| false).unwrap()
    }

    #[test]
    fn png_decodes_exactly() {
        let img = gradient(37, 21);
        let d = png_in_slot(&img, 4096);
        assert_eq!(
            (d.width, d.height, d.orig_width, d.orig_height),
            (37, 21, 37, 21)
        );
        assert_eq!(d.pixels(), img.as_raw().as_slice());
    }

    #[test]
    fn sixteen_bit_rgba_and_grey_pngs_decode_to_their_8_bit_rgb() {
        let img = gradient(33, 17);
        let rgba16 = image::DynamicImage::ImageRgb8(img.clone()).into_rgba16();
        let grey = image::DynamicImage::ImageRgb8(img.clone()).into_luma8();
        let ring = ring(4096);
        let decode_png = |d: image::DynamicImage| {
            let mut out = Cursor::new(Vec::new());
            d.write_to(&mut out, image::ImageFormat::Png).unwrap();
            decode_into(
                &out.into_inner(),
                ring.try_acquire().unwrap(),
                &OPTS,
                &|| false,
            )
            .unwrap()
        };
        let d = decode_png(image::DynamicImage::ImageRgba16(rgba16));
        assert_eq!(d.pixels(), img.as_raw().as_slice());
        let d = decode_png(image::DynamicImage::ImageLuma8(grey.clone()));
        let expected: Vec<u8> = grey.as_raw().iter().flat_map(|&v| [v; 3]).collect();
        assert_eq!(d.pixels(), expected.as_slice());
    }

    #[test]
    fn png_larger_than_a_slot_is_box_shrunk_in_the_slot() {
        // 40x20 of 2x2 blocks of one colour each, in a slot of 300 pixels: halved exactly.
        let img = image::RgbImage::from_fn(40, 20, |x, y| {
            image::Rgb([(x / 2 * 10) as u8, (y / 2 * 20) as u8, 7])
        });
        let d = png_in_slot(&img, 300);
        assert_eq!(
            (d.width, d.height, d.orig_width, d.orig_height),
            (20, 10, 40, 20)
        );
        let half = image::RgbImage::from_fn(20, 10, |x, y| {
            image::Rgb([(x * 10) as u8, (y * 20) as u8, 7])
        });
        assert_eq!(d.pixels(), half.as_raw().as_slice());
    }

    #[test]
    fn png_decoding_stops_at_the_deadline() {
        let img = gradient(64, 200);
        let ring = ring(64 * 200);
        let opts = DecodeOptions {
            deadline: Some(Instant::now()),
            ..OPTS
        };
        let e = decode_into(
            &encode(&img, image::ImageFormat::Png),
            ring.try_acquire().unwrap(),
            &opts,
            &|| false,
        )
        .unwrap_err();
        assert_eq!(e, DecodeError::DeadlineExceeded);
    }

    #[test]
    fn jpeg_decodes_close_to_the_original() {
        let img = gradient(64, 48);
        let ring = ring(4096);
        let d = decode_into(
            &encode(&img, image::ImageFormat::Jpeg),
            ring.try_acquire().unwrap(),
            &OPTS,
            &|| false,
        )
        .unwrap();
        assert_eq!((d.width, d.height), (64, 48));
        let max_diff = max_diff(d.pixels(), img.as_raw());
        assert!(max_diff < 40, "max diff {max_diff}");
    }

    #[test]
    fn oversized_jpeg_is_decoded_at_a_reduced_scale_keeping_the_original_size() {
        let img = gradient(200, 100);
        let ring = ring(100 * 50); // holds exactly a half-scale decode
        let d = decode_into(
            &encode(&img, image::ImageFormat::Jpeg),
            ring.try_acquire().unwrap(),
            &OPTS,
            &|| false,
        )
        .unwrap();
        assert_eq!((d.width, d.height), (100, 50));
        assert_eq!((d.orig_width, d.orig_height), (200, 100));
    }

    #[test]
    fn a_large_jpeg_is_decoded_only_as_large_as_the_network_needs() {
        let img = gradient(800, 400);
        let data = encode(&img, image::ImageFormat::Jpeg);
        let ring = ring(800 * 400);
        let decode = |needed| {
            let opts = DecodeOptions { needed, ..OPTS };
            let d = decode_into(&data, ring.try_acquire().unwrap(), &opts, &|| false).unwrap();
            assert_eq!((d.orig_width, d.orig_height), (800, 400));
            (d.width, d.height)
        };
        let stretch = |width, height| {
            Some(NeededSize {
                width,
                height,
                keep_aspect: false,
            })
        };
        let letterbox = |width, height| {
            Some(NeededSize {
                width,
                height,
                keep_aspect: true,
            })
        };
        assert_eq!(decode(None), (800, 400));
        assert_eq!(decode(stretch(100, 50)), (100, 50));
        assert_eq!(decode(stretch(100, 51)), (200, 100));
        assert_eq!(decode(stretch(224, 200)), (400, 200));
        assert_eq!(
            decode(stretch(224, 224)),
            (800, 400),
            "1/2 would be 200 rows < 224"
        );
        // Letterbox into 160x160: content is 160x80, so 1/4 (200x100) is enough.
        assert_eq!(decode(letterbox(160, 160)), (200, 100));
        assert_eq!(
            decode(stretch(1000, 1000)),
            (800, 400),
            "never more than the original"
        );
    }

    #[test]
    fn oversized_png_is_shrunk_into_the_slot() {
        let img = gradient(200, 100);
        let ring = ring(5000);
        let d = decode_into(
            &encode(&img, image::ImageFormat::Png),
            ring.try_acquire().unwrap(),
            &OPTS,
            &|| false,
        )
        .unwrap();
        assert!(d.width as usize * d.height as usize <= 5000);
        assert_eq!((d.orig_width, d.orig_height), (200, 100));
        assert!((d.width as f64 / d.height as f64 - 2.0).abs() < 0.05);
    }

    #[test]
    fn bad_inputs_are_client_errors_and_free_the_slot() {
        let ring = ring(4096);
        assert_eq!(
            decode_into(b"", ring.try_acquire().unwrap(), &OPTS, &|| false).unwrap_err(),
            DecodeError::Empty
        );
        assert!(matches!(
            decode_into(b"hello world", ring.try_acquire().unwrap(), &OPTS, &|| {
                false
            })
            .unwrap_err(),
            DecodeError::Undecodable(_)
        ));
        let mut truncated = encode(&gradient(64, 48), image::ImageFormat::Jpeg);
        truncated.truncate(40);
        assert!(decode_into(&truncated, ring.try_acquire().unwrap(), &OPTS, &|| false).is_err());
        assert_eq!(ring.in_use(), 0);
    }

    /// An image whose header claims `side x side` pixels, in a format without checksums.
    pub(crate) fn fake_header(fmt: image::ImageFormat, side: u32) -> Vec<u8> {
        let mut data = encode(&gradient(8, 8), fmt);
        match fmt {
            image::ImageFormat::Bmp => {
                data[18..22].copy_from_slice(&(side as i32).to_le_bytes());
                data[22..26].copy_from_slice(&(side as i32).to_le_bytes());
            }
            image::ImageFormat::Jpeg => {
                let sof = data.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
                data[sof + 5..sof + 7].copy_from_slice(&(side as u16).to_be_bytes());
                data[sof + 7..sof + 9].copy_from_slice(&(side as u16).to_be_bytes());
            }
            _ => unreachable!(),
        }
        data
    }

    #[test]
    fn absurd_header_dimensions_are_refused_before_decoding() {
        let ring = ring(16);
        for fmt in [image::ImageFormat::Bmp, image::ImageFormat::Jpeg] {
            for side in [50000, 60000] {
                let err = decode_into(
                    &fake_header(fmt, side),
                    ring.try_acquire().unwrap(),
                    &OPTS,
                    &|| false,
                )
                .unwrap_err();
                assert!(
                    matches!(err, DecodeError::TooManyPixels { .. }),
                    "{fmt:?} {side}: {err:?}"
                );
            }
        }
        assert_eq!(ring.in_use(), 0);
    }

    #[test]
    fn orientation_matches_the_image_crate_for_all_eight_cases() {
        let img = gradient(5, 3);
        for o in [
            Orientation::NoTransforms,
            Orientation::Rotate90,
            Orientation::Rotate180,
            Orientation::Rotate270,
            Orientation::FlipHorizontal,
            Orientation::FlipVertical,
            Orientation::Rotate90FlipH,
            Orientation::Rotate270FlipH,
        ] {
            let mut expected = image::DynamicImage::ImageRgb8(img.clone());
            expected.apply_orientation(o);
            let mut out = vec![0u8; 5 * 3 * 3];
            orient_into(img.as_raw(), 5, 3, o, &mut out);
            assert_eq!(out, expected.into_rgb8().into_raw(), "{o:?}");
        }
    }

    #[test]
    fn exif_orientation_is_read_from_app1() {
        let jpeg = encode(&gradient(8, 4), image::ImageFormat::Jpeg);
        assert_eq!(exif_orientation(&jpeg), Orientation::NoTransforms);
        // Insert an APP1 Exif segment (little-endian TIFF, one IFD entry: Orientation = 6).
        let mut tiff = vec![b'I', b'I', 42, 0, 8, 0, 0, 0, 1, 0];
        tiff.extend_from_slice(&[0x12, 0x01, 3, 0, 1, 0, 0, 0, 6, 0, 0, 0]);
        tiff.extend_from_slice(&[0, 0, 0, 0]);
        let mut seg = b"Exif\0\0".to_vec();
        seg.extend_from_slice(&tiff);
        let mut with_exif = vec![0xFF, 0xD8, 0xFF, 0xE1];
        with_exif.extend_from_slice(&((seg.len() + 2) as u16).to_be_bytes());
        with_exif.extend_from_slice(&seg);
        with_exif.extend_from_slice(&jpeg[2..]);
        assert_eq!(exif_orientation(&with_exif), Orientation::Rotate90);
        let ring = ring(4096);
        let d = decode_into(&with_exif, ring.try_acquire().unwrap(), &OPTS, &|| false).unwrap();
        assert_eq!(
            (d.width, d.height, d.orig_width, d.orig_height),
            (4, 8, 4, 8)
        );
        let no_orient = DecodeOptions {
            auto_orient: false,
            ..OPTS
        };
        let d = decode_into(&with_exif, ring.try_acquire().unwrap(), &no_orient, &|| {
            false
        })
        .unwrap();
        assert_eq!((d.width, d.height), (8, 4));
    }

    #[test]
    fn base64_accepts_data_urls_missing_padding_and_line_breaks() {
        assert_eq!(base64_bytes("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_bytes("aGVsbG8").unwrap(), b"hello");
        assert_eq!(
            base64_bytes("data:image/jpeg;base64,aGVsbG8=").unwrap(),
            b"hello"
        );
        assert_eq!(base64_bytes("aGVs\nbG8=\n").unwrap(), b"hello");
        assert_eq!(
            base64_bytes("not base64!").unwrap_err(),
            DecodeError::Base64
        );
        assert_eq!(
            base64_bytes("data:nocomma").unwrap_err(),
            DecodeError::Base64
        );
    }

    use crate::testing::{adam7_png16, progressive_jpeg};

    fn scan_bomb(w: u32, h: u32, extra: usize) -> Vec<u8> {
        progressive(w, h, extra, turbojpeg::Subsamp::Sub2x2)
    }

    fn progressive(w: u32, h: u32, extra: usize, subsamp: turbojpeg::Subsamp) -> Vec<u8> {
        progressive_jpeg(&gradient(w, h), extra, subsamp)
    }

    #[test]
    fn jpeg_scans_and_work_are_counted_from_the_markers_and_refused_before_decoding() {
        let plain = encode(&gradient(64, 48), image::ImageFormat::Jpeg);
        assert_eq!(JpegLayout::read(&plain).unwrap().scans, 1);
        let progressive = scan_bomb(64, 48, 0);
        let scans = JpegLayout::read(&progressive).unwrap().scans;
        assert!((6..=12).contains(&scans), "{scans} scans");
        let ring = ring(64 * 48);
        // A progressive file decodes; its scans are what the limits see.
        let d = decode_into(&progressive, ring.try_acquire().unwrap(), &OPTS, &|| false).unwrap();
        assert_eq!((d.width, d.height), (64, 48));
        drop(d);
        let bomb = scan_bomb(64, 48, 200);
        assert_eq!(JpegLayout::read(&bomb).unwrap().scans, scans + 200);
        let e = decode_into(&bomb, ring.try_acquire().unwrap(), &OPTS, &|| false).unwrap_err();
        assert_eq!(
            e,
            DecodeError::TooManyScans {
                scans: scans + 200,
                max: 100
            }
        );
        let work = 64 * 48 * (scans + 50);
        let tight = DecodeOptions {
            max_decode_work: work - 1,
            ..OPTS
        };
        let e = decode_into(
            &scan_bomb(64, 48, 50),
            ring.try_acquire().unwrap(),
            &tight,
            &|| false,
        )
        .unwrap_err();
        assert_eq!(
            e,
            DecodeError::TooMuchWork {
                work,
                max: work - 1
            }
        );
        assert_eq!(ring.in_use(), 0);
    }

    #[test]
    fn progressive_jpeg_coefficients_count_against_the_memory_budget() {
        // 4:2:0: 1.5 components' worth of 8x8 blocks of 128 bytes, about 3 B/px; 4:4:4: 6.
        let coefficients = |data: &[u8]| JpegLayout::read(data).unwrap().coefficients();
        let px = 256 * 256;
        let c420 = coefficients(&scan_bomb(256, 256, 0));
        assert!((3 * px..4 * px).contains(&c420), "{c420}");
        let bomb = progressive(256, 256, 0, turbojpeg::Subsamp::None);
        let coefficients = coefficients(&bomb);
        assert!((6 * px..7 * px).contains(&coefficients), "{coefficients}");
        let ring = ring(256 * 256);
        let small = DecodeOptions {
            max_image_pixels: 256 * 256 * 3 / 4, // too few pixels anyway
            ..OPTS
        };
        assert!(matches!(
            decode_into(&bomb, ring.try_acquire().unwrap(), &small, &|| false),
            Err(DecodeError::TooManyPixels { .. })
        ));
        // Pixels allowed, but the budget (4 B per allowed pixel) below the coefficients.
        let budget_short = DecodeOptions {
            max_image_pixels: coefficients / 4 - 1,
            ..OPTS
        };
        assert!(256 * 256 <= budget_short.max_image_pixels);
        assert!(matches!(
            decode_into(&bomb, ring.try_acquire().unwrap(), &budget_short, &|| false),
            Err(DecodeError::TooMuchMemory { what: "JPEG", .. })
        ));
        // A baseline JPEG of the same size buffers nothing.
        let plain = encode(&gradient(256, 256), image::ImageFormat::Jpeg);
        decode_into(&plain, ring.try_acquire().unwrap(), &budget_short, &|| {
            false
        })
        .unwrap();
    }

    #[test]
    fn a_job_nobody_waits_for_or_past_its_deadline_is_not_decoded() {
        let ring = ring(4096);
        for data in [
            encode(&gradient(64, 48), image::ImageFormat::Jpeg),
            encode(&gradient(64, 48), image::ImageFormat::Gif),
        ] {
            let e = decode_into(&data, ring.try_acquire().unwrap(), &OPTS, &|| true).unwrap_err();
            assert_eq!(e, DecodeError::Cancelled);
            let late = DecodeOptions {
                deadline: Some(Instant::now()),
                ..OPTS
            };
            let e = decode_into(&data, ring.try_acquire().unwrap(), &late, &|| false).unwrap_err();
            assert_eq!(e, DecodeError::DeadlineExceeded);
        }
        assert_eq!(ring.in_use(), 0);
    }

    #[test]
    fn a_truncated_jpeg_decodes_what_it_holds_without_a_second_decoder() {
        // OpenCV (Roboflow) accepts a truncated JPEG with a warning; so does libjpeg-turbo.
        let full = encode(&gradient(64, 48), image::ImageFormat::Jpeg);
        let cut = &full[..full.len() * 2 / 3];
        let ring = ring(4096);
        let d = decode_into(cut, ring.try_acquire().unwrap(), &OPTS, &|| false).unwrap();
        assert_eq!((d.width, d.height), (64, 48));
        // The first rows are there.
        let first_row_diff = max_diff(&d.pixels()[..64 * 3], gradient(64, 48).as_raw());
        assert!(first_row_diff < 40, "{first_row_diff}");
    }

    #[test]
    fn interlaced_pngs_stream_pass_by_pass_exactly_and_shrunk() {
        let value = |x: u32, y: u32| (x * 7 + y * 13) as u8;
        let data = adam7_png16(37, 29, value);
        // The reference decoder agrees on what the file holds.
        let reference = image::load_from_memory(&data).unwrap().into_rgb8();
        let expected = image::RgbImage::from_fn(37, 29, |x, y| image::Rgb([value(x, y); 3]));
        assert!(reference == expected, "the reference decoder disagrees");
        let d = decode_into(&data, ring(4096).try_acquire().unwrap(), &OPTS, &|| false).unwrap();
        assert_eq!((d.width, d.height), (37, 29));
        assert!(d.pixels() == expected.as_raw().as_slice());
        // Into a slot of a quarter: every output pixel the rounded mean of its 2x2 block.
        let small = ring(18 * 14);
        let d = decode_into(&data, small.try_acquire().unwrap(), &OPTS, &|| false).unwrap();
        assert_eq!(
            (d.width, d.height, d.orig_width, d.orig_height),
            (18, 14, 37, 29)
        );
        for (i, px) in d.pixels().chunks_exact(3).enumerate() {
            let (x, y) = ((i % 18) as u32 * 2, (i / 18) as u32 * 2);
            let sum: u32 = [(x, y), (x + 1, y), (x, y + 1), (x + 1, y + 1)]
                .iter()
                .map(|&(x, y)| value(x, y) as u32)
                .sum();
            assert_eq!(px, [((sum + 2) / 4) as u8; 3], "pixel {i}");
        }
        // With a deadline already passed, no row is decoded.
        let late = DecodeOptions {
            deadline: Some(Instant::now()),
            ..OPTS
        };
        let e = decode_into(&data, ring(4096).try_acquire().unwrap(), &late, &|| false);
        assert_eq!(e.unwrap_err(), DecodeError::DeadlineExceeded);
    }

    #[test]
    fn other_formats_decode_as_the_image_crate_does_oriented_and_shrunk() {
        let img = gradient(40, 30);
        let rgba16 = image::DynamicImage::ImageRgb8(img.clone()).into_rgba16();
        let mut cases: Vec<(Vec<u8>, image::RgbImage)> = Vec::new();
        for fmt in [
            image::ImageFormat::Bmp,
            image::ImageFormat::Gif,
            image::ImageFormat::Tiff,
            image::ImageFormat::WebP,
        ] {
            let data = encode(&img, fmt);
            let expected = image::load_from_memory(&data).unwrap().into_rgb8();
            cases.push((data, expected));
        }
        let mut tiff16 = Cursor::new(Vec::new());
        image::DynamicImage::ImageRgba16(rgba16)
            .write_to(&mut tiff16, image::ImageFormat::Tiff)
            .unwrap();
        let tiff16 = tiff16.into_inner();
        let expected = image::load_from_memory(&tiff16).unwrap().into_rgb8();
        cases.push((tiff16, expected));
        let ring = ring(40 * 30);
        for (data, expected) in &cases {
            let d = decode_into(data, ring.try_acquire().unwrap(), &OPTS, &|| false).unwrap();
            assert_eq!((d.width, d.height), (40, 30));
            assert!(d.pixels() == expected.as_raw().as_slice());
            drop(d);
            let full = decode_full(data, &OPTS, &|| false).unwrap();
            assert!(&full == expected);
        }
        // Shrunk into a slot of a quarter: the rounded mean of each 2x2 block.
        let (data, expected) = &cases[0];
        let quarter = super::tests::ring(20 * 15);
        let d = decode_into(data, quarter.try_acquire().unwrap(), &OPTS, &|| false).unwrap();
        assert_eq!((d.width, d.height), (20, 15));
        let px = |x: u32, y: u32, c: usize| expected.get_pixel(x, y)[c] as u32;
        for (i, got) in d.pixels().chunks_exact(3).enumerate() {
            let (x, y) = ((i % 20) as u32 * 2, (i / 20) as u32 * 2);
            for (c, &v) in got.iter().enumerate() {
                let sum = px(x, y, c) + px(x + 1, y, c) + px(x, y + 1, c) + px(x + 1, y + 1, c);
                assert_eq!(v as u32, (sum + 2) / 4, "pixel {i} channel {c}");
            }
        }
        // Oriented like `image`'s apply_orientation, for every orientation.
        let mut native = Vec::new();
        for p in img.pixels() {
            native.extend_from_slice(&[p[0], p[1], p[2], 255]);
        }
        for o in [
            Orientation::Rotate90,
            Orientation::Rotate180,
            Orientation::Rotate270,
            Orientation::FlipHorizontal,
            Orientation::FlipVertical,
            Orientation::Rotate90FlipH,
            Orientation::Rotate270FlipH,
        ] {
            let mut out = vec![0u8; 40 * 30 * 3];
            let size = convert_into(&native, ColorType::Rgba8, 40, 30, o, &mut out);
            let mut turned = image::DynamicImage::ImageRgb8(img.clone());
            turned.apply_orientation(o);
            let turned = turned.into_rgb8();
            assert_eq!(size, turned.dimensions(), "{o:?}");
            assert!(out == turned.into_raw(), "{o:?}");
        }
    }

    #[test]
    fn formats_whose_decoder_needs_more_than_the_budget_are_refused_before_allocating() {
        // 100x100 with a budget of 4 B x 10,000 px = 40,000 bytes: an 8-bit RGB BMP (3 B/px)
        // fits; a GIF (RGBA and a frame buffer: 8 B/px) and a WebP (3 and 7) do not.
        let opts = DecodeOptions {
            max_image_pixels: 10_000,
            ..OPTS
        };
        let img = gradient(100, 100);
        let ring = ring(100 * 100);
        let bmp = encode(&img, image::ImageFormat::Bmp);
        decode_into(&bmp, ring.try_acquire().unwrap(), &opts, &|| false).unwrap();
        for fmt in [image::ImageFormat::Gif, image::ImageFormat::WebP] {
            let e = decode_into(
                &encode(&img, fmt),
                ring.try_acquire().unwrap(),
                &opts,
                &|| false,
            )
            .unwrap_err();
            assert!(
                matches!(e, DecodeError::TooMuchMemory { budget: 40_000, .. }),
                "{fmt:?}: {e:?}"
            );
        }
        // Drawing needs the full-size RGB image besides: a BMP that fits a slot does not fit
        // the budget with its copy.
        assert!(matches!(
            decode_full(&bmp, &opts, &|| false),
            Err(DecodeError::TooMuchMemory { .. })
        ));
        assert_eq!(ring.in_use(), 0);
    }

    #[test]
    fn a_jpeg_whose_header_cannot_be_read_leaves_the_next_jpeg_decodable() {
        // libjpeg-turbo answered the header read after a failed one with width -1.
        let good = encode(&gradient(64, 48), image::ImageFormat::Jpeg);
        let ring = ring(4096);
        let e = decode_into(
            &good[..good.len().min(300)],
            ring.try_acquire().unwrap(),
            &OPTS,
            &|| false,
        );
        assert!(matches!(e, Err(DecodeError::Undecodable(_))), "{e:?}");
        let d = decode_into(&good, ring.try_acquire().unwrap(), &OPTS, &|| false).unwrap();
        assert_eq!((d.width, d.height), (64, 48));
    }

    #[test]
    fn tiffs_with_an_image_of_another_format_inside_are_refused() {
        let plain = encode(&gradient(16, 16), image::ImageFormat::Tiff);
        assert_eq!(tiff_compression(&plain), Some(1));
        let ring = ring(4096);
        decode_into(&plain, ring.try_acquire().unwrap(), &OPTS, &|| false).unwrap();
        // The same file claiming JPEG ("new-style", 7) compression.
        let entry = plain
            .windows(4)
            .position(|w| w == [0x03, 0x01, 0x03, 0x00])
            .expect("a Compression entry, SHORT, little-endian");
        let mut nested = plain.clone();
        nested[entry + 8] = 7;
        assert_eq!(tiff_compression(&nested), Some(7));
        let e = decode_into(&nested, ring.try_acquire().unwrap(), &OPTS, &|| false).unwrap_err();
        assert!(
            matches!(&e, DecodeError::Undecodable(m) if m.contains("TIFF compression 7")),
            "{e:?}"
        );
    }
}
