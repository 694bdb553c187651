//! Per-row top-M selection (partial selection with a bounded heap) and the `neighbors` kernel.
//!
//! Candidates are ranked by similarity, descending, ties broken by the smaller index, so the selected
//! set does not depend on the order in which tiles arrive. Each row keeps a min-heap of its M best
//! candidates in flat arrays (no allocation per row); most candidates fail the threshold test against
//! the heap's root and cost one comparison.

use std::ops::Range;

use ndarray::ArrayView2;
use rayon::prelude::*;

use crate::cosine::{cosine_tile, normalize_rows, tile_edge, triangle_tiles, Element, UnitRows};
use crate::error::{checked_len, try_zeroed, CoreError, CoreResult};
use crate::pool::Control;

/// Packs a candidate into one integer whose order is the ranking: similarity first (higher wins),
/// then the smaller index. Heaps then compare single `u64`s.
#[inline(always)]
fn rank_key(sim: f32, index: u32) -> u64 {
    let bits = (sim + 0.0).to_bits(); // + 0.0 folds −0.0 into +0.0, which compares equal to it
    let ordered = if bits & 0x8000_0000 != 0 { !bits } else { bits | 0x8000_0000 };
    ((ordered as u64) << 32) | (u32::MAX - index) as u64
}

#[inline(always)]
fn key_sim(key: u64) -> f32 {
    let ordered = (key >> 32) as u32;
    f32::from_bits(if ordered & 0x8000_0000 != 0 { ordered & 0x7fff_ffff } else { !ordered })
}

#[inline(always)]
fn key_index(key: u64) -> u32 {
    u32::MAX - key as u32
}

/// The M best candidates of many rows, stored flat: row r owns slots `r*m .. r*m + len[r]`, a
/// binary min-heap of rank keys whose root is the row's worst kept candidate.
///
/// Each candidate carries one extra f32 (`aux`) that travels with it: the misalignment kernel stores
/// the residual cosine there so the MSE over key neighbours needs no second pass.
#[derive(Debug)]
pub struct TopMBank {
    m: usize,
    keys: Vec<u64>,
    aux: Vec<f32>,
    len: Vec<u32>,
}

impl TopMBank {
    pub fn new(rows: usize, m: usize) -> CoreResult<Self> {
        let slots = checked_len(rows, m, "top_m")?;
        Ok(Self {
            m,
            keys: try_zeroed(slots, "top-M candidates")?,
            aux: try_zeroed(slots, "top-M values")?,
            len: try_zeroed(rows, "top-M lengths")?,
        })
    }

    /// Similarity a candidate must reach (`>=`) to be worth offering to row `r`.
    #[inline(always)]
    pub fn threshold(&self, r: usize) -> f32 {
        if (self.len[r] as usize) < self.m {
            f32::NEG_INFINITY
        } else {
            key_sim(self.keys[r * self.m])
        }
    }

    /// Offers candidate `(sim, index, aux)` to row `r`; keeps it if it ranks among the best M.
    #[inline]
    pub fn offer(&mut self, r: usize, sim: f32, index: u32, aux: f32) {
        let m = self.m;
        if m == 0 {
            return;
        }
        let key = rank_key(sim, index);
        let base = r * m;
        let len = self.len[r] as usize;
        let keys = &mut self.keys[base..base + m];
        let auxs = &mut self.aux[base..base + m];
        let mut pos;
        if len < m {
            // Sift up from the new leaf.
            pos = len;
            while pos > 0 {
                let parent = (pos - 1) / 2;
                if keys[parent] <= key {
                    break;
                }
                keys[pos] = keys[parent];
                auxs[pos] = auxs[parent];
                pos = parent;
            }
            self.len[r] += 1;
        } else {
            if key <= keys[0] {
                return;
            }
            // Replace the root and sift down.
            pos = 0;
            loop {
                let left = 2 * pos + 1;
                if left >= m {
                    break;
                }
                let right = left + 1;
                let child = if right < m && keys[right] < keys[left] { right } else { left };
                if keys[child] >= key {
                    break;
                }
                keys[pos] = keys[child];
                auxs[pos] = auxs[child];
                pos = child;
            }
        }
        keys[pos] = key;
        auxs[pos] = aux;
    }

    /// Row `r`'s candidates, best first: `(similarity, index, aux)`.
    pub fn sorted_row(&self, r: usize) -> Vec<(f32, u32, f32)> {
        let base = r * self.m;
        let len = self.len[r] as usize;
        let mut slots: Vec<usize> = (base..base + len).collect();
        slots.sort_unstable_by(|&a, &b| self.keys[b].cmp(&self.keys[a]));
        slots.into_iter().map(|s| (key_sim(self.keys[s]), key_index(self.keys[s]), self.aux[s])).collect()
    }

    /// Offers every element of `values`, the similarities of row `r` to columns `first_col..`; `aux`,
    /// when given, is aligned with `values`.
    #[inline]
    pub fn offer_row(&mut self, r: usize, values: &[f32], aux: Option<&[f32]>, first_col: usize) {
        let mut thr = self.threshold(r);
        for (c, &v) in values.iter().enumerate() {
            if v >= thr {
                let a = aux.map_or(0.0, |a| a[c]);
                self.offer(r, v, (first_col + c) as u32, a);
                thr = self.threshold(r);
            }
        }
    }
}

/// Checks that row indices fit the u32 the heaps store.
pub fn check_row_count(n: usize, argument: &str) -> CoreResult<()> {
    if n > u32::MAX as usize {
        return Err(CoreError::shape(argument, format!("{n} rows exceed the supported 2^32 - 1")));
    }
    Ok(())
}

/// Result of [`neighbors`]: `indices[i*m..][..m]` are row i's neighbours, best first, `-1`-padded.
#[derive(Debug)]
pub struct Neighbors {
    pub n: usize,
    pub m: usize,
    pub indices: Vec<i64>,
    pub sims: Vec<f32>,
}

/// For every row of `x`, its `top_m` most cosine-similar other rows (self excluded).
///
/// `top_m` is clamped to N − 1. Same as [`neighbor_lists`] with `progressive = false`.
pub fn neighbors<T: Element>(
    x: ArrayView2<'_, T>,
    top_m: usize,
    block: usize,
    control: &Control,
) -> CoreResult<Neighbors> {
    neighbor_lists(x, top_m, false, block, control)
}

/// [`neighbors`] over the support j ≠ i, or with `progressive` only j < i (earlier rows), so that
/// row i has min(M, i) neighbours and `-1`/NaN padding after them.
///
/// Symmetric tiles: each upper-triangle tile feeds its row block and, transposed, its column block;
/// `progressive` masks the pairs offered to the heaps, not the tiles computed.
pub fn neighbor_lists<T: Element>(
    x: ArrayView2<'_, T>,
    top_m: usize,
    progressive: bool,
    block: usize,
    control: &Control,
) -> CoreResult<Neighbors> {
    let n = x.nrows();
    if n < 2 {
        return Err(CoreError::shape("x", format!("needs at least 2 rows, got {n}")));
    }
    if top_m < 1 {
        return Err(CoreError::parameter("top_m", "must be at least 1, got 0"));
    }
    check_row_count(n, "x")?;
    let m = top_m.min(n - 1);
    let unit = normalize_rows(x, "x")?;
    let block = if block == 0 { tile_edge(n, 512, rayon::current_num_threads()) } else { block };
    let tiles = triangle_tiles(n, block, true);
    control.set_total(tiles.len());
    let banks: Vec<std::sync::Mutex<TopMBank>> = (0..n)
        .step_by(block)
        .map(|s| TopMBank::new((s + block).min(n) - s, m).map(std::sync::Mutex::new))
        .collect::<CoreResult<_>>()?;
    tiles.par_iter().try_for_each_init(
        || vec![0f32; block * block],
        |tile, (rows, cols)| -> CoreResult<()> {
            control.check()?;
            neighbor_tile(&unit, rows.clone(), cols.clone(), block, progressive, tile, &banks);
            control.advance(1);
            Ok(())
        },
    )?;
    let mut indices = try_zeroed::<i64>(checked_len(n, m, "top_m")?, "neighbour indices")?;
    let mut sims = try_zeroed::<f32>(n * m, "neighbour similarities")?;
    for (b, bank) in banks.into_iter().enumerate() {
        let bank = bank.into_inner().unwrap_or_else(|e| e.into_inner());
        for r in 0..bank.len.len() {
            let i = b * block + r;
            let row = bank.sorted_row(r);
            for s in 0..m {
                let (sim, j) = row.get(s).map_or((f32::NAN, -1), |&(v, j, _)| (v, j as i64));
                indices[i * m + s] = j;
                sims[i * m + s] = sim;
            }
        }
    }
    Ok(Neighbors { n, m, indices, sims })
}

fn neighbor_tile(
    unit: &UnitRows,
    rows: Range<usize>,
    cols: Range<usize>,
    block: usize,
    progressive: bool,
    tile: &mut [f32],
    banks: &[std::sync::Mutex<TopMBank>],
) {
    let (h, w) = (rows.len(), cols.len());
    cosine_tile(unit, rows.clone(), unit, cols.clone(), tile);
    let diagonal = rows.start == cols.start;
    // Off the diagonal, the row side of an upper tile sees only later rows (j > i), which progressive
    // excludes; the column side sees only earlier ones and always counts.
    if diagonal || !progressive {
        let mut bank = banks[rows.start / block].lock().unwrap_or_else(|e| e.into_inner());
        for r in 0..h {
            let values = &tile[r * w..(r + 1) * w];
            if diagonal {
                bank.offer_row(r, &values[..r], None, cols.start);
                if !progressive {
                    bank.offer_row(r, &values[r + 1..], None, cols.start + r + 1);
                }
            } else {
                bank.offer_row(r, values, None, cols.start);
            }
        }
    }
    if !diagonal {
        let mut bank = banks[cols.start / block].lock().unwrap_or_else(|e| e.into_inner());
        let mut thr: Vec<f32> = (0..w).map(|c| bank.threshold(c)).collect();
        for r in 0..h {
            let values = &tile[r * w..(r + 1) * w];
            for c in 0..w {
                if values[c] >= thr[c] {
                    bank.offer(c, values[c], (rows.start + r) as u32, 0.0);
                    thr[c] = bank.threshold(c);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    #[test]
    fn rank_keys_order_like_the_ranking_and_round_trip() {
        let sims = [-1.0f32, -0.5, -1e-30, -0.0, 0.0, 1e-30, 0.25, 1.0];
        for (a, &sa) in sims.iter().enumerate() {
            assert_eq!(key_sim(rank_key(sa, 7)), sa + 0.0);
            assert_eq!(key_index(rank_key(sa, 7)), 7);
            for &sb in &sims[a..] {
                let want = (sa + 0.0).partial_cmp(&(sb + 0.0)).unwrap();
                assert_eq!(rank_key(sa, 3).cmp(&rank_key(sb, 3)), want, "{sa} vs {sb}");
            }
        }
        assert!(rank_key(0.5, 2) > rank_key(0.5, 9), "the smaller index wins a tie");
    }

    #[test]
    fn bank_keeps_the_best_with_index_tie_break() {
        let mut bank = TopMBank::new(1, 3).unwrap();
        for (j, v) in [0.1f32, 0.9, 0.5, 0.9, 0.2, 0.5, 0.95].iter().enumerate() {
            bank.offer(0, *v, j as u32, -(j as f32));
        }
        let row = bank.sorted_row(0);
        assert_eq!(row.iter().map(|e| e.1).collect::<Vec<_>>(), vec![6, 1, 3]);
        assert_eq!(row[1].2, -1.0);
    }

    #[test]
    fn bank_matches_a_full_sort_on_random_streams() {
        let mut s = 12345u64;
        for m in [1usize, 2, 5, 17] {
            let vals: Vec<f32> = (0..200)
                .map(|_| {
                    s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
                    ((s >> 40) % 50) as f32 / 50.0 // many ties
                })
                .collect();
            let mut bank = TopMBank::new(1, m).unwrap();
            bank.offer_row(0, &vals, None, 0);
            let mut order: Vec<u32> = (0..200).collect();
            order.sort_by(|&a, &b| vals[b as usize].total_cmp(&vals[a as usize]).then(a.cmp(&b)));
            let got: Vec<u32> = bank.sorted_row(0).iter().map(|e| e.1).collect();
            assert_eq!(got, order[..m].to_vec());
        }
    }

    #[test]
    fn neighbors_match_brute_force_across_tiles() {
        let (n, d) = (53, 6);
        let mut s = 99u64;
        let x = Array2::from_shape_fn((n, d), |_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        });
        let c = Control::new();
        for block in [8, 16, 64] {
            let nb = neighbors(x.view(), 5, block, &c).unwrap();
            let u = normalize_rows(x.view(), "x").unwrap();
            for i in 0..n {
                let mut cand: Vec<(f32, usize)> = (0..n)
                    .filter(|&j| j != i)
                    .map(|j| (u.row(i).iter().zip(u.row(j)).map(|(a, b)| a * b).sum(), j))
                    .collect();
                cand.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                for (k, &(want, _)) in cand.iter().take(5).enumerate() {
                    assert!((nb.sims[i * 5 + k] - want).abs() < 1e-5, "block {block} row {i}");
                }
            }
        }
    }

    #[test]
    fn progressive_neighbors_are_earlier_rows_only_and_padded() {
        let (n, d) = (41, 5);
        let mut s = 7u64;
        let x = Array2::from_shape_fn((n, d), |_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        });
        let u = normalize_rows(x.view(), "x").unwrap();
        // d = 1: every cosine is exactly ±1, so the lists are decided by the index tie-break alone.
        let signs = Array2::from_shape_fn((n, 1), |(i, _)| if (i * 7) % 3 == 0 { -2.0f32 } else { 0.5 });
        for block in [1, 7, 16, 64] {
            for top_m in [4, 100] {
                let nb = neighbor_lists(x.view(), top_m, true, block, &Control::new()).unwrap();
                let m = top_m.min(n - 1);
                assert_eq!((nb.n, nb.m), (n, m));
                for i in 0..n {
                    let mut cand: Vec<(f32, usize)> = (0..i)
                        .map(|j| (u.row(i).iter().zip(u.row(j)).map(|(a, b)| a * b).sum(), j))
                        .collect();
                    cand.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                    let what = format!("block {block} top_m {top_m} row {i}");
                    for k in 0..m {
                        let (j, v) = (nb.indices[i * m + k], nb.sims[i * m + k]);
                        match cand.get(k) {
                            Some(&(want, _)) => {
                                assert!(j >= 0 && (j as usize) < i && (v - want).abs() < 1e-5, "{what}")
                            }
                            None => assert!(j == -1 && v.is_nan(), "{what}"),
                        }
                    }
                }
                let ties = neighbor_lists(signs.view(), top_m, true, block, &Control::new()).unwrap();
                for i in 0..n {
                    let same = |j: usize| signs[(j, 0)] == signs[(i, 0)];
                    let mut want: Vec<i64> = (0..i).filter(|&j| same(j)).map(|j| j as i64).collect();
                    want.extend((0..i).filter(|&j| !same(j)).map(|j| j as i64));
                    want.resize(m.max(want.len()), -1);
                    assert_eq!(&ties.indices[i * m..(i + 1) * m], &want[..m], "ties, block {block} row {i}");
                }
            }
        }
    }

    #[test]
    fn top_m_is_clamped_and_errors_are_named() {
        let x = Array2::<f32>::from_shape_fn((3, 2), |(i, j)| (i + 2 * j + 1) as f32);
        let nb = neighbors(x.view(), 10, 0, &Control::new()).unwrap();
        assert_eq!(nb.m, 2);
        assert!(nb.indices.iter().all(|&j| j >= 0));
        assert!(matches!(neighbors(x.view(), 0, 0, &Control::new()), Err(CoreError::Parameter { .. })));
        let one = Array2::<f32>::ones((1, 2));
        assert!(matches!(neighbors(one.view(), 1, 0, &Control::new()), Err(CoreError::Shape { .. })));
    }
}
