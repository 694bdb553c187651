//! Criterion benchmarks of the Rust kernels, called through the public API inside the core's own
//! thread pool (`pool::run`), so the threading is the one Python sees (`EAMET_NUM_THREADS` or all
//! CPUs).
//!
//! Groups: `misalignment` (N = 2000, d = 256, full and progressive support), `neighbors` (N = 2000,
//! d = 256, M = 50), `second_moment` (dim 1024, batches of 2048 float32 rows) and `normalize_rows`
//! (N = 10000, d = 1024). Small sample sizes keep the whole run under about two minutes:
//!
//!     cargo bench --bench kernels                 (everything)
//!     cargo bench --bench kernels -- misalignment (one group)
//!     cargo bench --bench kernels -- --quick      (a smoke test)

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use ndarray::Array2;

use _core::cosine::normalize_rows;
use _core::covariance::SecondMoment;
use _core::misalign::{misalignment, MisalignParams};
use _core::pool::{self, Control};
use _core::topm::neighbors;

/// An n×d float32 matrix of uniform values in [-0.5, 0.5) from a 64-bit LCG (no `rand` crate).
fn random_matrix(seed: u64, n: usize, d: usize) -> Array2<f32> {
    let mut state = seed;
    Array2::from_shape_simple_fn((n, d), || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    })
}

/// A few samples over a few seconds each: these kernels take milliseconds to tens of milliseconds.
fn configure(group: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    group.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
}

fn bench_misalignment(c: &mut Criterion) {
    let (n, d) = (2000, 256);
    let keys = random_matrix(1, n, d);
    // Residuals partly follow the keys, so that neighbourhoods overlap as in real data.
    let residuals = &keys * 0.5 + &random_matrix(2, n, d);
    let mut group = c.benchmark_group("misalignment");
    configure(&mut group);
    group.throughput(Throughput::Elements((n * (n - 1)) as u64)); // ordered pairs
    for progressive in [false, true] {
        let params = MisalignParams { progressive, ..MisalignParams::default() };
        let name = if progressive { "progressive" } else { "full" };
        group.bench_function(format!("n{n}_d{d}_{name}"), |b| {
            b.iter(|| {
                let control = Control::new();
                pool::run(|| misalignment(keys.view(), residuals.view(), &params, &control))
                    .expect("misalignment")
            })
        });
    }
    group.finish();
}

fn bench_neighbors(c: &mut Criterion) {
    let (n, d, m) = (2000, 256, 50);
    let x = random_matrix(3, n, d);
    let mut group = c.benchmark_group("neighbors");
    configure(&mut group);
    group.throughput(Throughput::Elements((n * (n - 1)) as u64));
    group.bench_function(format!("n{n}_d{d}_m{m}"), |b| {
        b.iter(|| {
            let control = Control::new();
            pool::run(|| neighbors(x.view(), m, 0, &control)).expect("neighbors")
        })
    });
    group.finish();
}

fn bench_second_moment(c: &mut Criterion) {
    let (dim, rows) = (1024, 2048);
    let batch = random_matrix(4, rows, dim);
    let mut acc = SecondMoment::new(dim).expect("accumulator");
    let mut group = c.benchmark_group("second_moment");
    configure(&mut group);
    group.throughput(Throughput::Elements(rows as u64)); // rows per second
    group.bench_function(format!("update_dim{dim}_rows{rows}_f32"), |b| {
        b.iter(|| pool::run(|| acc.update(black_box(batch.view()))).expect("update"))
    });
    group.finish();
    assert!(acc.count() > 0);
}

fn bench_normalize_rows(c: &mut Criterion) {
    let (n, d) = (10_000, 1024);
    let x = random_matrix(5, n, d);
    let mut group = c.benchmark_group("normalize_rows");
    configure(&mut group);
    group.throughput(Throughput::Bytes((n * d * std::mem::size_of::<f32>()) as u64));
    group.bench_function(format!("n{n}_d{d}_f32"), |b| {
        b.iter(|| pool::run(|| normalize_rows(black_box(x.view()), "x")).expect("normalize"))
    });
    group.finish();
}

criterion_group!(kernels, bench_misalignment, bench_neighbors, bench_second_moment, bench_normalize_rows);
criterion_main!(kernels);
