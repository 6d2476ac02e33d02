//! Contour tracing on a binary mask: the mask of one detection over its box (`BoxMask`), the
//! largest 8-connected piece of it (labelled by runs), and that piece's outer contour
//! (Moore-neighbour tracing, straight runs reduced to their end points), which segmentation
//! turns into a polygon.

/// A binary mask over a detection's box on the mask grid: `w x h` cells whose top-left cell
/// is (`x0`, `y0`) of a `grid_w x grid_h` grid.
#[derive(Debug, Clone, PartialEq)]
pub struct BoxMask {
    pub x0: usize,
    pub y0: usize,
    pub w: usize,
    pub h: usize,
    pub grid_w: usize,
    pub grid_h: usize,
    pub bits: Vec<bool>,
}

impl BoxMask {
    pub fn get(&self, x: usize, y: usize) -> bool {
        self.bits[y * self.w + x]
    }
}

/// The first cell (raster order, as an index) of the largest 8-connected piece, by area.
/// Pieces are labelled by runs: each row's runs of set cells are joined (union-find) with the
/// previous row's runs they touch, so the work follows the number of runs, not of cells.
fn largest_piece_start(mask: &BoxMask) -> Option<usize> {
    struct Run {
        x0: usize,
        x1: usize, // exclusive
        y: usize,
    }
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    let mut runs: Vec<Run> = Vec::new();
    let mut parent: Vec<usize> = Vec::new();
    let mut prev = 0..0; // the previous row's runs
    for y in 0..mask.h {
        let row = &mask.bits[y * mask.w..(y + 1) * mask.w];
        let start = runs.len();
        let mut x = 0;
        while x < mask.w {
            if !row[x] {
                x += 1;
                continue;
            }
            let x0 = x;
            while x < mask.w && row[x] {
                x += 1;
            }
            let id = runs.len();
            runs.push(Run { x0, x1: x, y });
            parent.push(id);
            // 8-connected: touching or diagonally adjacent runs of the row above.
            for p in prev.clone() {
                if runs[p].x0 <= x && x0 <= runs[p].x1 {
                    let (a, b) = (root(&mut parent, p), root(&mut parent, id));
                    if a != b {
                        parent[b.max(a)] = a.min(b);
                    }
                }
            }
        }
        prev = start..runs.len();
    }
    let mut area = vec![0usize; runs.len()];
    for (i, run) in runs.iter().enumerate() {
        let r = root(&mut parent, i);
        area[r] += run.x1 - run.x0;
    }
    // Roots are the lowest run of their piece, i.e. its first in raster order.
    let best = (0..runs.len())
        .filter(|&i| parent[i] == i)
        .max_by_key(|&i| (area[i], std::cmp::Reverse(i)))?;
    Some(runs[best].y * mask.w + runs[best].x0)
}

const DIRS: [(i32, i32); 8] = [
    (1, 0),
    (1, 1),
    (0, 1),
    (-1, 1),
    (-1, 0),
    (-1, -1),
    (0, -1),
    (1, -1),
];

/// The outer contour of the largest 8-connected piece of `mask` (by area), as cell
/// coordinates of its boundary cells in tracing order, with straight runs reduced to their
/// end points (like OpenCV's CHAIN_APPROX_SIMPLE). Empty for an empty mask.
pub fn outer_contour(mask: &BoxMask) -> Vec<(i32, i32)> {
    let (w, h) = (mask.w, mask.h);
    let Some(first) = largest_piece_start(mask) else {
        return Vec::new();
    };
    let set = |x: i32, y: i32| {
        x >= 0 && y >= 0 && (x as usize) < w && (y as usize) < h && mask.get(x as usize, y as usize)
    };
    let start = ((first % w) as i32, (first / w) as i32);
    // Moore-neighbour tracing, clockwise; the start's west neighbour is background.
    let mut contour = vec![start];
    let (mut cur, mut back) = (start, 4usize);
    let mut first_move: Option<usize> = None;
    loop {
        let mut next = None;
        for i in 0..8 {
            let d = (back + 1 + i) % 8;
            let (nx, ny) = (cur.0 + DIRS[d].0, cur.1 + DIRS[d].1);
            if set(nx, ny) {
                next = Some((d, (nx, ny)));
                break;
            }
        }
        let Some((d, n)) = next else {
            break; // a single cell
        };
        if cur == start {
            match first_move {
                None => first_move = Some(d),
                Some(f) if f == d => break,
                Some(_) => {}
            }
        }
        // The background cell checked just before `n`, seen from `n`.
        let b = (
            cur.0 + DIRS[(d + 7) % 8].0 - n.0,
            cur.1 + DIRS[(d + 7) % 8].1 - n.1,
        );
        back = DIRS.iter().position(|&v| v == b).unwrap_or(4);
        cur = n;
        if cur != start || contour.len() == 1 {
            contour.push(cur);
        }
        if contour.len() > 4 * w * h + 8 {
            break; // cannot happen on a finite mask; a guard against a tracing bug looping forever
        }
    }
    if contour.len() > 1 && contour.last() == Some(&start) {
        contour.pop();
    }
    simplify(contour)
}

fn simplify(points: Vec<(i32, i32)>) -> Vec<(i32, i32)> {
    let n = points.len();
    if n < 3 {
        return points;
    }
    (0..n)
        .filter(|&i| {
            let (p, c, q) = (points[(i + n - 1) % n], points[i], points[(i + 1) % n]);
            (c.0 - p.0, c.1 - p.1) != (q.0 - c.0, q.1 - c.1)
        })
        .map(|i| points[i])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask_from(rows: &[&str]) -> BoxMask {
        let h = rows.len();
        let w = rows[0].len();
        BoxMask {
            x0: 0,
            y0: 0,
            w,
            h,
            grid_w: w,
            grid_h: h,
            bits: rows
                .iter()
                .flat_map(|r| r.chars().map(|c| c == '#'))
                .collect(),
        }
    }

    #[test]
    fn contour_of_a_rectangle_is_its_four_corners() {
        let m = mask_from(&["......", ".####.", ".####.", ".####.", "......"]);
        let c = outer_contour(&m);
        let mut sorted = c.clone();
        sorted.sort();
        assert_eq!(sorted, vec![(1, 1), (1, 3), (4, 1), (4, 3)], "{c:?}");
    }

    #[test]
    fn contour_keeps_the_largest_piece_and_ignores_holes() {
        let m = mask_from(&[
            "##.......",
            "##.#####.",
            "...#...#.",
            "...#...#.",
            "...#####.",
        ]);
        let c = outer_contour(&m);
        let mut sorted = c.clone();
        sorted.sort();
        assert_eq!(sorted, vec![(3, 1), (3, 4), (7, 1), (7, 4)], "{c:?}");
    }

    #[test]
    fn pieces_that_join_further_down_are_one_piece() {
        // A U (9 cells, its arms only meet in the last row) beside a 2x3 block (6 cells).
        let m = mask_from(&["#...#.##", "#...#.##", "#####.##"]);
        assert_eq!(largest_piece_start(&m), Some(0));
        let c = outer_contour(&m);
        for corner in [(0, 0), (4, 0), (0, 2), (4, 2)] {
            assert!(c.contains(&corner), "{corner:?} missing from {c:?}");
        }
        assert!(
            c.iter().all(|&(x, _)| x <= 4),
            "the block is not part of the U: {c:?}"
        );
        // Equal areas: the first piece in raster order wins.
        assert_eq!(
            largest_piece_start(&mask_from(&["##..", "....", "..##"])),
            Some(0)
        );
    }

    #[test]
    fn contour_of_a_diagonal_shape_and_a_single_cell() {
        let m = mask_from(&["#...", ".#..", "..#.", "...#"]);
        let c = outer_contour(&m);
        assert!(c.contains(&(0, 0)) && c.contains(&(3, 3)), "{c:?}");
        assert_eq!(
            outer_contour(&mask_from(&["...", ".#.", "..."])),
            vec![(1, 1)]
        );
        assert!(outer_contour(&mask_from(&["...", "..."])).is_empty());
    }

    #[test]
    fn contour_traces_every_boundary_cell_of_a_blob() {
        // A plus-shaped blob: every '#' with a background 4-neighbour is on the contour
        // before simplification; after it, the corners remain.
        let m = mask_from(&[".....", "..#..", ".###.", "..#..", "....."]);
        let c = outer_contour(&m);
        let mut sorted = c.clone();
        sorted.sort();
        assert_eq!(sorted, vec![(1, 2), (2, 1), (2, 3), (3, 2)], "{c:?}");
    }
}
