//! The fused misalignment pass: softmax / KL / top-M / overlap / MSE per row, never N×N in memory.
//!
//! For row i and its support J_i (all j ≠ i, or j < i when progressive), with key cosines s_k(j) and
//! residual cosines s_r(j), P_x(i) = softmax_j(s_x(j)/τ). Everything the outputs need is a row
//! reduction that merges online across column tiles:
//!
//! * running maxima m_k, m_r and Z_x = Σ_j e^{(s_x(j) − m_x)/τ} (log-sum-exp, rescaled when m grows);
//! * U_r = Σ_j e^{(s_r − m_r)/τ}(s_r − s_k) and U_k = Σ_j e^{(s_k − m_k)/τ}(s_k − s_r), which give
//!   KL(P_r‖P_k) = U_r/(τZ_r) − (m_r − m_k)/τ − ln Z_r + ln Z_k and the reverse direction alike;
//! * bounded heaps of the top-M key neighbours (carrying their residual cosine, for the MSE) and of
//!   the top-M residual neighbours (for the overlap).
//!
//! Both cosine matrices are symmetric, so in the full-support mode each upper-triangle tile feeds its
//! row block directly and its column block through a transposed copy: half the GEMM work. Sums are
//! kept in float64; cosines and exponentials are float32.

use std::ops::Range;
use std::sync::Mutex;

use ndarray::ArrayView2;
use rayon::prelude::*;

use crate::cosine::{cosine_tile, normalize_rows, tile_edge, triangle_tiles, Element, UnitRows};
use crate::error::{checked_len, try_zeroed, CoreError, CoreResult};
use crate::pool::Control;
use crate::simd::{dispatch, exp_nonpositive};
use crate::topm::{check_row_count, TopMBank};

/// Settings of [`misalignment`].
#[derive(Debug, Clone, Copy)]
pub struct MisalignParams {
    /// Softmax temperature τ > 0.
    pub tau: f64,
    /// Neighbours kept per row (clamped to the largest support, N − 1).
    pub top_m: usize,
    /// Support j < i instead of j ≠ i: the view of EAMET's progressive residual optimisation.
    pub progressive: bool,
    /// Tile edge in rows; 0 picks one from N and the thread count.
    pub block: usize,
}

impl Default for MisalignParams {
    fn default() -> Self {
        Self { tau: 0.07, top_m: 50, progressive: false, block: 0 }
    }
}

/// Per-row results of [`misalignment`]; matrices are row-major N×m.
#[derive(Debug)]
pub struct Misalignment {
    pub n: usize,
    /// Effective M: `min(top_m, N − 1)`.
    pub m: usize,
    /// A(i) = KL(P_r(i) ‖ P_k(i)).
    pub scores: Vec<f64>,
    /// KL(P_k(i) ‖ P_r(i)): the direction EAMET's alignment loss minimises.
    pub reverse_scores: Vec<f64>,
    /// |topM_r(i) ∩ topM_k(i)| / min(M, |J_i|); 1 for an empty support.
    pub overlap: Vec<f64>,
    /// softmax(s_k/τ)-weighted mean of (s_k − s_r)² over topM_k(i); 0 for an empty support.
    pub topm_mse: Vec<f64>,
    /// Top-M key neighbours, best first; −1 where the support has fewer than M members.
    pub key_neighbors: Vec<i64>,
    /// Key cosine of each key neighbour (NaN in padding).
    pub neighbor_key_cos: Vec<f32>,
    /// Residual cosine of each key neighbour (NaN in padding).
    pub neighbor_residual_cos: Vec<f32>,
}

/// Online reductions of the rows of one row block (struct of arrays, indexed by row within block).
struct BlockState {
    max_k: Vec<f32>,
    max_r: Vec<f32>,
    z_k: Vec<f64>,
    z_r: Vec<f64>,
    u_k: Vec<f64>,
    u_r: Vec<f64>,
    top_k: TopMBank,
    top_r: TopMBank,
}

impl BlockState {
    fn new(rows: usize, m: usize) -> CoreResult<Self> {
        Ok(Self {
            max_k: vec![f32::NEG_INFINITY; rows],
            max_r: vec![f32::NEG_INFINITY; rows],
            z_k: vec![0.0; rows],
            z_r: vec![0.0; rows],
            u_k: vec![0.0; rows],
            u_r: vec![0.0; rows],
            top_k: TopMBank::new(rows, m)?,
            top_r: TopMBank::new(rows, m)?,
        })
    }
}

/// Which columns of a tile belong to each row's support.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Support {
    /// Every column (off-diagonal tiles).
    All,
    /// Every column but the row's own (diagonal tile, j ≠ i).
    NotSelf,
    /// Columns left of the row's own (diagonal tile, j < i).
    Before,
}

/// Computes the misalignment report of `keys` (N×d_k) against `residuals` (N×d_r).
///
/// Validation errors name the argument (`keys`, `residuals`, `tau`, `top_m`) and, for NaN/Inf or
/// zero rows, the first offending row. Runs on the current rayon pool; `control` reports progress in
/// tiles and stops the work between tiles when cancelled.
pub fn misalignment<K: Element, R: Element>(
    keys: ArrayView2<'_, K>,
    residuals: ArrayView2<'_, R>,
    params: &MisalignParams,
    control: &Control,
) -> CoreResult<Misalignment> {
    let n = keys.nrows();
    for (name, rows, cols) in
        [("keys", keys.nrows(), keys.ncols()), ("residuals", residuals.nrows(), residuals.ncols())]
    {
        if rows == 0 || cols == 0 {
            return Err(CoreError::empty(name, format!("array of shape ({rows}, {cols}) is empty")));
        }
    }
    if residuals.nrows() != n {
        return Err(CoreError::shape(
            "residuals",
            format!(
                "has {} rows but keys has {n}; row i of both must describe the same fact",
                residuals.nrows()
            ),
        ));
    }
    if n < 2 {
        return Err(CoreError::shape("keys", format!("needs at least 2 rows, got {n}")));
    }
    check_row_count(n, "keys")?;
    let inv_tau = (1.0 / params.tau) as f32;
    if !(params.tau.is_finite() && params.tau > 0.0 && inv_tau.is_finite()) {
        return Err(CoreError::parameter(
            "tau",
            format!("must be a finite number > 0 whose inverse fits float32, got {:?}", params.tau),
        ));
    }
    if params.top_m < 1 {
        return Err(CoreError::parameter("top_m", "must be at least 1, got 0"));
    }
    let m = params.top_m.min(n - 1);
    let unit_k = normalize_rows(keys, "keys")?;
    let unit_r = normalize_rows(residuals, "residuals")?;

    let block = match params.block {
        0 => tile_edge(n, 512, rayon::current_num_threads()),
        b => b,
    };
    let tiles = triangle_tiles(n, block, !params.progressive);
    control.set_total(tiles.len());
    let states: Vec<Mutex<BlockState>> = (0..n)
        .step_by(block)
        .map(|s| BlockState::new((s + block).min(n) - s, m).map(Mutex::new))
        .collect::<CoreResult<_>>()?;
    let scratch = checked_len(block, block, "block")?;
    let pass = TilePass {
        unit_k: &unit_k,
        unit_r: &unit_r,
        block,
        progressive: params.progressive,
        inv_tau,
        states: &states,
    };
    tiles.par_iter().try_for_each_init(
        || tile_buffers(scratch),
        |buf, (rows, cols)| -> CoreResult<()> {
            control.check()?;
            let bufs =
                buf.as_mut().map_err(|e| CoreError::OutOfMemory { what: "similarity tiles", bytes: *e })?;
            pass.process_tile(rows.clone(), cols.clone(), bufs);
            control.advance(1);
            Ok(())
        },
    )?;
    finish(n, m, block, params, states)
}

/// Thread-local key and residual cosine tiles; `Err(bytes)` if allocation failed.
fn tile_buffers(len: usize) -> Result<[Vec<f32>; 2], usize> {
    let alloc = || try_zeroed::<f32>(len, "similarity tiles").map_err(|_| len * 4);
    Ok([alloc()?, alloc()?])
}

/// What every tile of one misalignment pass shares: the unit rows, the tiling, the settings and the
/// reductions of each row block.
struct TilePass<'a> {
    unit_k: &'a UnitRows,
    unit_r: &'a UnitRows,
    /// Tile edge; row block b holds rows b·block.. and owns `states[b]`.
    block: usize,
    progressive: bool,
    /// 1/τ in float32, as the exponentials use it.
    inv_tau: f32,
    states: &'a [Mutex<BlockState>],
}

impl TilePass<'_> {
    /// Computes the key and residual cosine tiles of `rows × cols` into `bufs` and folds them into
    /// the reductions of the row block and, for an off-diagonal tile of the full support, of the
    /// column block too.
    fn process_tile(&self, rows: Range<usize>, cols: Range<usize>, bufs: &mut [Vec<f32>; 2]) {
        let Self { unit_k, unit_r, block, progressive, inv_tau, states } = *self;
        let (h, w) = (rows.len(), cols.len());
        let [tk, tr] = bufs;
        cosine_tile(unit_k, rows.clone(), unit_k, cols.clone(), tk);
        cosine_tile(unit_r, rows.clone(), unit_r, cols.clone(), tr);
        let (tk, tr) = (&tk[..h * w], &tr[..h * w]);
        let diagonal = rows.start == cols.start;
        let support = match (diagonal, progressive) {
            (false, _) => Support::All,
            (true, false) => Support::NotSelf,
            (true, true) => Support::Before,
        };
        {
            let mut state = states[rows.start / block].lock().unwrap_or_else(|e| e.into_inner());
            update_rows(&mut state, tk, tr, w, cols.start, support, inv_tau);
        }
        if !diagonal && !progressive {
            // The same tile, read by columns, serves the rows of the column block.
            let mut state = states[cols.start / block].lock().unwrap_or_else(|e| e.into_inner());
            update_columns(&mut state, tk, tr, w, rows.start, inv_tau);
        }
    }
}

const LANES: usize = 16;

/// `LANES` consecutive values starting at `at`, as an array reference (helps vectorisation).
#[inline(always)]
fn lanes(values: &[f32], at: usize) -> &[f32; LANES] {
    values[at..at + LANES].try_into().expect("LANES values")
}

/// Folds the rows of a tile (`sk`, `sr`: row-major, `w` columns, global column indices
/// `first_col..`) into the reductions of the block's rows 0.. (one per tile row).
#[inline(always)]
fn update_rows_generic(
    state: &mut BlockState,
    sk: &[f32],
    sr: &[f32],
    w: usize,
    first_col: usize,
    support: Support,
    inv_tau: f32,
) {
    for r in 0..sk.len() / w {
        let segments = match support {
            Support::All => [0..w, w..w],
            Support::NotSelf => [0..r, r + 1..w],
            Support::Before => [0..r, w..w],
        };
        let (row_k, row_r) = (&sk[r * w..(r + 1) * w], &sr[r * w..(r + 1) * w]);
        update_one_row(state, r, row_k, row_r, first_col, segments, inv_tau);
    }
}

dispatch!(fn update_rows(state: &mut BlockState, sk: &[f32], sr: &[f32], w: usize, first_col: usize, support: Support, inv_tau: f32) => update_rows_generic);

/// Folds the columns `segments` of one row's key and residual cosines into row `r` of `state`.
#[inline(always)]
fn update_one_row(
    state: &mut BlockState,
    r: usize,
    row_k: &[f32],
    row_r: &[f32],
    first_col: usize,
    segments: [Range<usize>; 2],
    inv_tau: f32,
) {
    if segments.iter().all(|s| s.is_empty()) {
        return;
    }
    let mut maxima = [f32::NEG_INFINITY; 2];
    for seg in segments.clone() {
        segment_max(&row_k[seg.clone()], &row_r[seg], &mut maxima);
    }
    let new_k = state.max_k[r].max(maxima[0]);
    let new_r = state.max_r[r].max(maxima[1]);
    // Rescale what earlier tiles summed under the old maxima (exp(−inf) = 0 on the first tile).
    let scale_k = (((state.max_k[r] - new_k) * inv_tau) as f64).exp();
    let scale_r = (((state.max_r[r] - new_r) * inv_tau) as f64).exp();
    let mut sums =
        [state.z_k[r] * scale_k, state.z_r[r] * scale_r, state.u_k[r] * scale_k, state.u_r[r] * scale_r];
    for seg in segments.clone() {
        segment_sums(&row_k[seg.clone()], &row_r[seg], new_k, new_r, inv_tau, &mut sums);
    }
    state.max_k[r] = new_k;
    state.max_r[r] = new_r;
    [state.z_k[r], state.z_r[r], state.u_k[r], state.u_r[r]] = sums;
    for seg in segments {
        let start = first_col + seg.start;
        offer_segment(&mut state.top_k, r, &row_k[seg.clone()], Some(&row_r[seg.clone()]), start);
        offer_segment(&mut state.top_r, r, &row_r[seg], None, start);
    }
}

#[inline(always)]
fn segment_max(sk: &[f32], sr: &[f32], maxima: &mut [f32; 2]) {
    let mut lk = [f32::NEG_INFINITY; LANES];
    let mut lr = [f32::NEG_INFINITY; LANES];
    let full = sk.len() / LANES * LANES;
    for at in (0..full).step_by(LANES) {
        let (a, b) = (lanes(sk, at), lanes(sr, at));
        for l in 0..LANES {
            lk[l] = if a[l] > lk[l] { a[l] } else { lk[l] };
            lr[l] = if b[l] > lr[l] { b[l] } else { lr[l] };
        }
    }
    for (&a, &b) in sk[full..].iter().zip(&sr[full..]) {
        lk[0] = lk[0].max(a);
        lr[0] = lr[0].max(b);
    }
    maxima[0] = lk.iter().fold(maxima[0], |m, &v| m.max(v));
    maxima[1] = lr.iter().fold(maxima[1], |m, &v| m.max(v));
}

/// Adds `[Σe_k, Σe_r, Σe_k(s_k − s_r), Σe_r(s_r − s_k)]` over one segment into `sums` (float64 lanes).
#[inline(always)]
fn segment_sums(sk: &[f32], sr: &[f32], max_k: f32, max_r: f32, inv_tau: f32, sums: &mut [f64; 4]) {
    let mut acc = [[0f64; LANES]; 4];
    let full = sk.len() / LANES * LANES;
    for at in (0..full).step_by(LANES) {
        let (a, b) = (lanes(sk, at), lanes(sr, at));
        for l in 0..LANES {
            let ek = exp_nonpositive((a[l] - max_k) * inv_tau);
            let er = exp_nonpositive((b[l] - max_r) * inv_tau);
            let diff = a[l] - b[l];
            acc[0][l] += ek as f64;
            acc[1][l] += er as f64;
            acc[2][l] += (ek * diff) as f64;
            acc[3][l] -= (er * diff) as f64;
        }
    }
    for (&a, &b) in sk[full..].iter().zip(&sr[full..]) {
        let ek = exp_nonpositive((a - max_k) * inv_tau);
        let er = exp_nonpositive((b - max_r) * inv_tau);
        acc[0][0] += ek as f64;
        acc[1][0] += er as f64;
        acc[2][0] += (ek * (a - b)) as f64;
        acc[3][0] -= (er * (a - b)) as f64;
    }
    for (s, lanes) in sums.iter_mut().zip(&acc) {
        *s += lanes.iter().sum::<f64>();
    }
}

/// Offers a segment to a row's heap; a vector compare skips the 16-wide chunks below the threshold.
#[inline(always)]
fn offer_segment(bank: &mut TopMBank, r: usize, values: &[f32], aux: Option<&[f32]>, first_col: usize) {
    let mut thr = bank.threshold(r);
    let full = values.len() / LANES * LANES;
    for at in (0..full).step_by(LANES) {
        let chunk = lanes(values, at);
        let mut hit = false;
        for &v in chunk {
            hit |= v >= thr;
        }
        if hit {
            bank.offer_row(r, chunk, aux.map(|a| &a[at..at + LANES]), first_col + at);
            thr = bank.threshold(r);
        }
    }
    bank.offer_row(r, &values[full..], aux.map(|a| &a[full..]), first_col + full);
}

/// Folds the columns of a tile into the reductions of the column block's rows: column c of the tile
/// is row c of `state`, and tile row r is global column `first_row + r`. Works on strips of 16
/// columns, so that the running sums stay in registers while the strip is read row by row.
#[inline(always)]
fn update_columns_generic(
    state: &mut BlockState,
    sk: &[f32],
    sr: &[f32],
    w: usize,
    first_row: usize,
    inv_tau: f32,
) {
    let h = sk.len() / w;
    let full = w / LANES * LANES;
    let mut hits = vec![0u32; h];
    for c0 in (0..full).step_by(LANES) {
        let mut mk = [f32::NEG_INFINITY; LANES];
        let mut mr = [f32::NEG_INFINITY; LANES];
        for r in 0..h {
            let (a, b) = (lanes(sk, r * w + c0), lanes(sr, r * w + c0));
            for l in 0..LANES {
                mk[l] = if a[l] > mk[l] { a[l] } else { mk[l] };
                mr[l] = if b[l] > mr[l] { b[l] } else { mr[l] };
            }
        }
        let mut thr_k: [f32; LANES] = std::array::from_fn(|l| state.top_k.threshold(c0 + l));
        let mut thr_r: [f32; LANES] = std::array::from_fn(|l| state.top_r.threshold(c0 + l));
        let mut acc = [[0f64; LANES]; 4];
        for l in 0..LANES {
            let c = c0 + l;
            let (old_k, old_r) = (state.max_k[c], state.max_r[c]);
            mk[l] = mk[l].max(old_k);
            mr[l] = mr[l].max(old_r);
            let scale_k = (((old_k - mk[l]) * inv_tau) as f64).exp();
            let scale_r = (((old_r - mr[l]) * inv_tau) as f64).exp();
            acc[0][l] = state.z_k[c] * scale_k;
            acc[1][l] = state.z_r[c] * scale_r;
            acc[2][l] = state.u_k[c] * scale_k;
            acc[3][l] = state.u_r[c] * scale_r;
        }
        // One pass over the strip: the sums, and which rows hold a candidate for some column's heap
        // (against the thresholds before this strip, which can only rise, so no candidate is missed).
        for (r, hit) in hits.iter_mut().enumerate() {
            let (a, b) = (lanes(sk, r * w + c0), lanes(sr, r * w + c0));
            let mut mask = 0u32;
            for l in 0..LANES {
                let ek = exp_nonpositive((a[l] - mk[l]) * inv_tau);
                let er = exp_nonpositive((b[l] - mr[l]) * inv_tau);
                let diff = a[l] - b[l];
                acc[0][l] += ek as f64;
                acc[1][l] += er as f64;
                acc[2][l] += (ek * diff) as f64;
                acc[3][l] -= (er * diff) as f64;
                mask |= ((a[l] >= thr_k[l]) as u32) << l | ((b[l] >= thr_r[l]) as u32) << (l + LANES);
            }
            *hit = mask;
        }
        for l in 0..LANES {
            let c = c0 + l;
            state.max_k[c] = mk[l];
            state.max_r[c] = mr[l];
            [state.z_k[c], state.z_r[c], state.u_k[c], state.u_r[c]] =
                [acc[0][l], acc[1][l], acc[2][l], acc[3][l]];
        }
        for (r, &mask) in hits.iter().enumerate().filter(|(_, &m)| m != 0) {
            let (a, b) = (lanes(sk, r * w + c0), lanes(sr, r * w + c0));
            let j = (first_row + r) as u32;
            // Visit only the flagged lanes; thresholds may have risen since, so test again.
            let mut bits = mask;
            while bits != 0 {
                let bit = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let l = bit % LANES;
                if bit < LANES && a[l] >= thr_k[l] {
                    state.top_k.offer(c0 + l, a[l], j, b[l]);
                    thr_k[l] = state.top_k.threshold(c0 + l);
                } else if bit >= LANES && b[l] >= thr_r[l] {
                    state.top_r.offer(c0 + l, b[l], j, 0.0);
                    thr_r[l] = state.top_r.threshold(c0 + l);
                }
            }
        }
    }
    // Columns left over at the edge of the matrix: gather each and treat it as a row.
    let mut col_k = vec![0f32; h];
    let mut col_r = vec![0f32; h];
    for c in full..w {
        for r in 0..h {
            col_k[r] = sk[r * w + c];
            col_r[r] = sr[r * w + c];
        }
        update_one_row(state, c, &col_k, &col_r, first_row, [0..h, h..h], inv_tau);
    }
}

dispatch!(fn update_columns(state: &mut BlockState, sk: &[f32], sr: &[f32], w: usize, first_row: usize, inv_tau: f32) => update_columns_generic);

fn finish(
    n: usize,
    m: usize,
    block: usize,
    params: &MisalignParams,
    states: Vec<Mutex<BlockState>>,
) -> CoreResult<Misalignment> {
    let nm = checked_len(n, m, "top_m")?;
    let mut out = Misalignment {
        n,
        m,
        scores: try_zeroed(n, "scores")?,
        reverse_scores: try_zeroed(n, "scores")?,
        overlap: try_zeroed(n, "overlap")?,
        topm_mse: try_zeroed(n, "topm_mse")?,
        key_neighbors: try_zeroed(nm, "key neighbours")?,
        neighbor_key_cos: try_zeroed(nm, "key neighbour cosines")?,
        neighbor_residual_cos: try_zeroed(nm, "key neighbour cosines")?,
    };
    let tau = params.tau;
    for (b, state) in states.into_iter().enumerate() {
        let state = state.into_inner().unwrap_or_else(|e| e.into_inner());
        for r in 0..state.max_k.len() {
            let i = b * block + r;
            let support = if params.progressive { i } else { n - 1 };
            let key_top = state.top_k.sorted_row(r);
            let res_top = state.top_r.sorted_row(r);
            for s in 0..m {
                let (j, ck, cr) =
                    key_top.get(s).map_or((-1, f32::NAN, f32::NAN), |&(v, j, a)| (j as i64, v, a));
                out.key_neighbors[i * m + s] = j;
                out.neighbor_key_cos[i * m + s] = ck;
                out.neighbor_residual_cos[i * m + s] = cr;
            }
            if support == 0 {
                out.overlap[i] = 1.0;
                continue;
            }
            let (mk, mr) = (state.max_k[r] as f64, state.max_r[r] as f64);
            let (zk, zr) = (state.z_k[r], state.z_r[r]);
            let log_ratio = zk.ln() - zr.ln();
            // KL is non-negative; the clamp removes float64 rounding of order 1e−15 around zero.
            out.scores[i] = (state.u_r[r] / (tau * zr) - (mr - mk) / tau + log_ratio).max(0.0);
            out.reverse_scores[i] = (state.u_k[r] / (tau * zk) - (mk - mr) / tau - log_ratio).max(0.0);
            out.overlap[i] = overlap(&key_top, &res_top) as f64 / key_top.len() as f64;
            out.topm_mse[i] = weighted_mse(&key_top, tau);
        }
    }
    Ok(out)
}

fn overlap(a: &[(f32, u32, f32)], b: &[(f32, u32, f32)]) -> usize {
    let mut ia: Vec<u32> = a.iter().map(|e| e.1).collect();
    let mut ib: Vec<u32> = b.iter().map(|e| e.1).collect();
    ia.sort_unstable();
    ib.sort_unstable();
    let (mut x, mut y, mut common) = (0, 0, 0);
    while x < ia.len() && y < ib.len() {
        match ia[x].cmp(&ib[y]) {
            std::cmp::Ordering::Less => x += 1,
            std::cmp::Ordering::Greater => y += 1,
            std::cmp::Ordering::Equal => {
                common += 1;
                x += 1;
                y += 1;
            }
        }
    }
    common
}

/// Σ w_j (s_k − s_r)² with w = softmax(s_k/τ) over the key neighbours (best first).
fn weighted_mse(key_top: &[(f32, u32, f32)], tau: f64) -> f64 {
    let Some(&(best, _, _)) = key_top.first() else {
        return 0.0;
    };
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for &(sk, _, sr) in key_top {
        let w = ((sk as f64 - best as f64) / tau).exp();
        num += w * (sk as f64 - sr as f64).powi(2);
        den += w;
    }
    num / den
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::random;
    use ndarray::Array2;

    /// Definitions evaluated directly in float64 for one row.
    fn naive_row(
        k: &Array2<f64>,
        r: &Array2<f64>,
        i: usize,
        tau: f64,
        m: usize,
        progressive: bool,
    ) -> (f64, f64, f64, f64) {
        let cos = |x: &Array2<f64>, a: usize, b: usize| {
            x.row(a).dot(&x.row(b)) / (x.row(a).dot(&x.row(a)).sqrt() * x.row(b).dot(&x.row(b)).sqrt())
        };
        let support: Vec<usize> =
            (0..k.nrows()).filter(|&j| if progressive { j < i } else { j != i }).collect();
        if support.is_empty() {
            return (0.0, 0.0, 1.0, 0.0);
        }
        let sk: Vec<f64> = support.iter().map(|&j| cos(k, i, j)).collect();
        let sr: Vec<f64> = support.iter().map(|&j| cos(r, i, j)).collect();
        let logsoft = |s: &[f64]| {
            let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = mx / tau + s.iter().map(|v| (v / tau - mx / tau).exp()).sum::<f64>().ln();
            s.iter().map(|v| v / tau - lse).collect::<Vec<_>>()
        };
        let (lk, lr) = (logsoft(&sk), logsoft(&sr));
        let a: f64 = lr.iter().zip(&lk).map(|(r, k)| r.exp() * (r - k)).sum();
        let rev: f64 = lk.iter().zip(&lr).map(|(k, r)| k.exp() * (k - r)).sum();
        let mm = m.min(support.len());
        let top = |s: &[f64]| {
            let mut o: Vec<usize> = (0..s.len()).collect();
            o.sort_by(|&x, &y| s[y].total_cmp(&s[x]).then(x.cmp(&y)));
            o.truncate(mm);
            o
        };
        let (tk, tr) = (top(&sk), top(&sr));
        let ov = tk.iter().filter(|x| tr.contains(x)).count() as f64 / mm as f64;
        let w: Vec<f64> = tk.iter().map(|&x| (sk[x] / tau).exp()).collect();
        let mse =
            tk.iter().zip(&w).map(|(&x, w)| w * (sk[x] - sr[x]).powi(2)).sum::<f64>() / w.iter().sum::<f64>();
        (a, rev, ov, mse)
    }

    #[test]
    fn matches_float64_definitions_for_both_supports_and_many_tilings() {
        let (n, dk, dr) = (45, 7, 4);
        let k = random(1, n, dk);
        let r = random(2, n, dr);
        // A small τ makes the softmax peaked and the float32 error (∝ 1/τ) larger.
        for (tau, tol) in [(0.3, 2e-5), (0.01, 2e-3)] {
            for progressive in [false, true] {
                for block in [8, 16, 64] {
                    let p = MisalignParams { tau, top_m: 6, progressive, block };
                    let out = misalignment(k.view(), r.view(), &p, &Control::new()).unwrap();
                    for i in 0..n {
                        let (a, rev, ov, mse) = naive_row(&k, &r, i, tau, 6, progressive);
                        let what = format!("tau {tau} block {block} progressive {progressive} row {i}");
                        assert!(
                            (out.scores[i] - a).abs() < tol * (1.0 + a),
                            "{what}: {} vs {a}",
                            out.scores[i]
                        );
                        assert!((out.reverse_scores[i] - rev).abs() < tol * (1.0 + rev), "{what}");
                        assert!((out.overlap[i] - ov).abs() < 1e-12, "{what}");
                        assert!((out.topm_mse[i] - mse).abs() < 1e-5, "{what}");
                    }
                }
            }
        }
    }

    #[test]
    fn identical_embeddings_score_zero() {
        let k = random(3, 40, 5);
        let p = MisalignParams { tau: 0.07, top_m: 50, progressive: false, block: 16 };
        let out = misalignment(k.view(), k.view(), &p, &Control::new()).unwrap();
        assert_eq!(out.m, 39);
        assert!(out.scores.iter().all(|&a| a.abs() < 1e-9));
        assert!(out.overlap.iter().all(|&o| o == 1.0));
    }

    #[test]
    fn progressive_row_zero_has_empty_support() {
        let k = random(4, 5, 3);
        let r = random(5, 5, 3);
        let p = MisalignParams { tau: 0.1, top_m: 3, progressive: true, block: 0 };
        let out = misalignment(k.view(), r.view(), &p, &Control::new()).unwrap();
        assert_eq!((out.scores[0], out.overlap[0], out.topm_mse[0]), (0.0, 1.0, 0.0));
        assert_eq!(&out.key_neighbors[..3], &[-1, -1, -1]);
        assert_eq!(&out.key_neighbors[3..6], &[0, -1, -1]);
    }

    #[test]
    fn bad_inputs_are_named() {
        let k = random(6, 4, 3);
        let c = Control::new();
        let p = MisalignParams::default();
        let short = random(7, 3, 3);
        assert!(
            matches!(misalignment(k.view(), short.view(), &p, &c), Err(CoreError::Shape { argument, .. }) if argument == "residuals")
        );
        let bad_tau = MisalignParams { tau: 0.0, ..p };
        assert!(
            matches!(misalignment(k.view(), k.view(), &bad_tau, &c), Err(CoreError::Parameter { argument, .. }) if argument == "tau")
        );
        let bad_m = MisalignParams { top_m: 0, ..p };
        assert!(
            matches!(misalignment(k.view(), k.view(), &bad_m, &c), Err(CoreError::Parameter { argument, .. }) if argument == "top_m")
        );
        let mut nan = k.clone();
        nan[(2, 1)] = f64::NAN;
        assert!(matches!(
            misalignment(k.view(), nan.view(), &p, &c),
            Err(CoreError::NonFinite { row: 2, .. })
        ));
        let empty = Array2::<f64>::zeros((0, 3));
        assert!(matches!(misalignment(empty.view(), empty.view(), &p, &c), Err(CoreError::Empty { .. })));
        c.cancel();
        assert!(matches!(misalignment(k.view(), k.view(), &p, &c), Err(CoreError::Cancelled)));
    }
}
