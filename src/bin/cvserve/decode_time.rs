//! `cvserve decode-time`: what decoding each image costs the server, in CPU time of the
//! decoding thread, by the server's own path (the header checks, then libjpeg-turbo or the
//! other decoders into a ring slot), whole and at the reduced scale a network input allows.
//! The floor of the front end's decode stage, beside its ceiling (scripts/front_end_table.sh).

use std::path::PathBuf;

use anyhow::Context;
use cvserve::pipeline::decode::{decode_into, DecodeOptions, NeededSize};
use cvserve::pipeline::ring::Ring;

#[derive(clap::Args)]
pub struct DecodeTimeConfig {
    /// Image files, or folders of them.
    #[arg(long, num_args = 1.., required = true)]
    images: Vec<PathBuf>,
    /// Decodes of each image (the best of three rounds is kept).
    #[arg(long, default_value_t = 30)]
    repeat: u32,
    /// A network input `WxH` (stretched to): also time the reduced-scale decode it allows.
    #[arg(long)]
    input: Option<String>,
}

/// The files of a folder that are timed.
const IMAGE_EXTENSIONS: [&str; 8] = ["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"];

/// This thread's CPU time, seconds.
fn thread_cpu() -> f64 {
    cvserve::stage_cpu::thread_ns() as f64 / 1e9
}

pub fn run(cfg: DecodeTimeConfig) -> anyhow::Result<()> {
    let mut files = Vec::new();
    for p in &cfg.images {
        if p.is_dir() {
            let mut inner: Vec<PathBuf> = std::fs::read_dir(p)?
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                        IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str())
                    })
                })
                .collect();
            inner.sort();
            files.extend(inner);
        } else {
            files.push(p.clone());
        }
    }
    let needed = match &cfg.input {
        None => None,
        Some(s) => {
            let (w, h) = s
                .split_once('x')
                .and_then(|(w, h)| Some((w.parse().ok()?, h.parse().ok()?)))
                .context("--input is WxH, e.g. 416x416")?;
            Some(NeededSize {
                width: w,
                height: h,
                keep_aspect: false,
            })
        }
    };
    // One slot as large as the largest image, in tmpfs like the server's ring (RING_DIR,
    // /dev/shm), else in the temporary directory.
    let mut largest = 64 * 64 * 3;
    for f in &files {
        let (w, h) = image::ImageReader::open(f)?
            .with_guessed_format()?
            .into_dimensions()
            .with_context(|| f.display().to_string())?;
        largest = largest.max(w as usize * h as usize * 3);
    }
    let ring = Ring::create(std::path::Path::new("/dev/shm"), 1, largest)
        .or_else(|_| Ring::create(&std::env::temp_dir(), 1, largest))?;
    let opts = DecodeOptions {
        auto_orient: true,
        max_image_pixels: 8192 * 8192,
        max_jpeg_scans: 1000,
        max_decode_work: u64::MAX,
        needed: None,
        deadline: None,
    };
    let time = |data: &[u8], opts: &DecodeOptions| -> anyhow::Result<(f64, u32, u32)> {
        let mut best = f64::MAX;
        let mut size = (0, 0);
        for _ in 0..3 {
            let start = thread_cpu();
            for _ in 0..cfg.repeat.max(1) {
                let slot = ring.try_acquire().context("the ring slot is busy")?;
                let d = decode_into(data, slot, opts, &|| false)?;
                size = (d.width, d.height);
            }
            best = best.min((thread_cpu() - start) * 1000.0 / cfg.repeat.max(1) as f64);
        }
        Ok((best, size.0, size.1))
    };
    let mut sums = (0.0, 0.0);
    for f in &files {
        let data = std::fs::read(f)?;
        let (full, w, h) = time(&data, &opts).with_context(|| f.display().to_string())?;
        sums.0 += full;
        let mut line = format!("{}: {w}x{h} {full:.2} ms", f.display());
        if needed.is_some() {
            let reduced = DecodeOptions { needed, ..opts };
            let (ms, rw, rh) = time(&data, &reduced)?;
            sums.1 += ms;
            line += &format!(
                ", reduced for {} {rw}x{rh} {ms:.2} ms",
                cfg.input.as_ref().unwrap()
            );
        }
        println!("{line}");
    }
    let n = files.len().max(1) as f64;
    if needed.is_some() {
        println!(
            "mean: {:.2} ms whole, {:.2} ms reduced",
            sums.0 / n,
            sums.1 / n
        );
    } else {
        println!("mean: {:.2} ms", sums.0 / n);
    }
    Ok(())
}
