//! COCO run-length encoding of binary masks (column-major runs, first run of zeros), with
//! the compact string form of pycocotools (`counts` as a string).

use serde::Serialize;

/// `{"size": [height, width], "counts": "..."}`.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Rle {
    pub size: [usize; 2],
    pub counts: String,
}

/// Builds run lengths from pixels given in column-major order.
pub struct RunBuilder {
    counts: Vec<u32>,
    current: bool,
    run: u32,
}

impl Default for RunBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl RunBuilder {
    pub fn new() -> Self {
        Self {
            counts: Vec::new(),
            current: false,
            run: 0,
        }
    }

    pub fn push(&mut self, bit: bool) {
        self.push_many(bit, 1);
    }

    pub fn push_many(&mut self, bit: bool, n: usize) {
        if n == 0 {
            return;
        }
        if bit != self.current {
            self.counts.push(self.run);
            self.current = bit;
            self.run = 0;
        }
        self.run += n as u32;
    }

    /// The run lengths, starting with a (possibly empty) run of zeros.
    pub fn finish(mut self) -> Vec<u32> {
        self.counts.push(self.run);
        self.counts
    }
}

/// pycocotools' `rleToString`.
pub fn encode_counts(counts: &[u32]) -> String {
    let mut s = String::new();
    for (i, &c) in counts.iter().enumerate() {
        let mut x = c as i64;
        if i > 2 {
            x -= counts[i - 2] as i64;
        }
        loop {
            let mut ch = (x & 0x1f) as u8;
            x >>= 5;
            let more = if ch & 0x10 != 0 { x != -1 } else { x != 0 };
            if more {
                ch |= 0x20;
            }
            s.push((ch + 48) as char);
            if !more {
                break;
            }
        }
    }
    s
}

/// pycocotools' `rleFrString`.
pub fn decode_counts(s: &str) -> Result<Vec<u32>, String> {
    let bytes = s.as_bytes();
    let mut counts: Vec<u32> = Vec::new();
    let mut p = 0;
    while p < bytes.len() {
        let (mut x, mut k) = (0i64, 0u32);
        loop {
            let c = bytes[p]
                .checked_sub(48)
                .ok_or_else(|| format!("invalid RLE character at {p}"))? as i64;
            x |= (c & 0x1f) << (5 * k);
            p += 1;
            k += 1;
            if c & 0x20 == 0 {
                if c & 0x10 != 0 {
                    x |= -1i64 << (5 * k);
                }
                break;
            }
            if p >= bytes.len() || k > 12 {
                return Err("truncated RLE string".into());
            }
        }
        if counts.len() > 2 {
            x += counts[counts.len() - 2] as i64;
        }
        counts.push(u32::try_from(x).map_err(|_| "negative run in RLE".to_string())?);
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_start_with_zeros_and_alternate() {
        let mut b = RunBuilder::new();
        for bit in [true, true, false, true] {
            b.push(bit);
        }
        b.push_many(false, 3);
        assert_eq!(b.finish(), vec![0, 2, 1, 1, 3]);
    }

    #[test]
    fn string_form_round_trips_and_matches_pycocotools() {
        // A 4x4 mask with a 2x2 block at rows 1-2, cols 1-2 has counts [5, 2, 2, 2, 5]; from the
        // fourth run on, the string stores differences to the run two back (2 - 2, 5 - 2).
        assert_eq!(encode_counts(&[5, 2, 2, 2, 5]), "52203");
        for counts in [
            vec![0, 1],
            vec![5, 2, 2, 2, 5],
            vec![123456, 7, 99999, 1, 0, 250000],
            vec![10, 1000, 3, 5000, 2],
        ] {
            assert_eq!(decode_counts(&encode_counts(&counts)).unwrap(), counts);
        }
        assert!(decode_counts("\u{1}").is_err());
    }
}
