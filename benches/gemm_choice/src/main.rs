//! Times upper-triangle similarity tiles with faer and with gemm; prints GFLOP/s per tile edge.
use std::time::Instant;

use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

fn tiles(x: &[f32], n: usize, d: usize, b: usize, use_faer: bool) -> f64 {
    let nb = n.div_ceil(b);
    let pairs: Vec<(usize, usize)> = (0..nb).flat_map(|i| (i..nb).map(move |j| (i, j))).collect();
    let start = Instant::now();
    pairs.par_iter().for_each_init(
        || vec![0f32; b * b],
        |out, &(bi, bj)| {
            let (r0, c0) = (bi * b, bj * b);
            let (r1, c1) = ((r0 + b).min(n), (c0 + b).min(n));
            let (m, k) = (r1 - r0, c1 - c0);
            if use_faer {
                let lhs = MatRef::from_row_major_slice(&x[r0 * d..r1 * d], m, d);
                let rhs = MatRef::from_row_major_slice(&x[c0 * d..c1 * d], k, d).transpose();
                let dst = MatMut::from_row_major_slice_mut(&mut out[..m * k], m, k);
                faer::linalg::matmul::matmul(dst, Accum::Replace, lhs, rhs, 1.0f32, Par::Seq);
            } else {
                // SAFETY: all strides and sizes describe the slices above.
                unsafe {
                    gemm::gemm(
                        m, k, d, out.as_mut_ptr(), 1, k as isize, false, x[r0 * d..].as_ptr(), 1,
                        d as isize, x[c0 * d..].as_ptr(), d as isize, 1, 0.0f32, 1.0f32, false, false,
                        false, gemm::Parallelism::None,
                    );
                }
            }
            std::hint::black_box(&out);
        },
    );
    start.elapsed().as_secs_f64()
}

fn main() {
    let mut args = std::env::args().skip(1).map(|s| s.parse::<usize>().expect("integer argument"));
    let n = args.next().unwrap_or(10_000);
    let d = args.next().unwrap_or(1024);
    let x: Vec<f32> = (0..n * d).map(|i| ((i as u64 * 2_654_435_761) % 1000) as f32 / 1000.0 - 0.5).collect();
    println!("command: cargo run --release -- {n} {d}   ({} rayon threads)", rayon::current_num_threads());
    println!("| tile edge | crate | best of 3 s | GFLOP/s on computed tiles |\n|---:|---|---:|---:|");
    for b in [256usize, 512, 768, 1024] {
        let nb = n.div_ceil(b);
        let flops = 2.0 * (nb * (nb + 1) / 2 * b * b) as f64 * d as f64;
        for (name, use_faer) in [("faer 0.24", true), ("gemm 0.19", false)] {
            let best = (0..3).map(|_| tiles(&x, n, d, b, use_faer)).fold(f64::INFINITY, f64::min);
            println!("| {b} | {name} | {best:.3} | {:.0} |", flops / best / 1e9);
        }
    }
}
