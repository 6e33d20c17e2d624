//! Criterion benchmarks of the hot paths, on synthetic tensors (no disk I/O).
//!
//! `cargo bench --bench bench_main`; throughput is reported in images/s.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};

use mlops::model::ModelSpec;
use mlops::nn::{Executor, Plan};

const BATCH: usize = 64;

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn inputs(plan: &Plan, batch: usize) -> (Vec<f32>, Vec<u8>) {
    let x = (0..batch * plan.input_len)
        .map(|i| ((i * 7919) % 255) as f32 / 255.0)
        .collect();
    let labels = (0..batch).map(|i| (i % plan.classes) as u8).collect();
    (x, labels)
}

fn reference_cnn(c: &mut Criterion) {
    mlops::nn::denormals::flush_denormals_on_this_thread();
    let plan = Plan::compile(&ModelSpec::reference_cnn()).unwrap();
    let params = plan.init_params(0);
    let mut executor = Executor::new(&plan, threads());
    let mut group = c.benchmark_group("reference_cnn");

    let (x, labels) = inputs(&plan, BATCH);
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("train_step_batch64", |b| {
        b.iter(|| executor.train_step(black_box(&params), black_box(&x), &labels, 0))
    });
    let mut logits = Vec::new();
    group.bench_function("forward_batch64", |b| {
        b.iter(|| executor.predict(black_box(&params), black_box(&x), BATCH, &mut logits))
    });

    let (x1, _) = inputs(&plan, 1);
    let mut single = Executor::new(&plan, 1);
    group.throughput(Throughput::Elements(1));
    group.bench_function("forward_batch1", |b| {
        b.iter(|| single.predict(black_box(&params), black_box(&x1), 1, &mut logits))
    });
    group.finish();
}

/// The int8 GEMM on the reference CNN's second conv (batch 32 per thread): throughput in
/// multiply-adds, for each kernel this CPU has.
fn int8_gemm(c: &mut Criterion) {
    use mlops::runtime::int8::gemm::{gemm_u8i8, Kernel, PackedWeights};
    let (m, n, k) = (32 * 11 * 11, 64, 288);
    let a: Vec<u8> = (0..m * k).map(|i| (i * 31 % 256) as u8).collect();
    let w: Vec<i8> = (0..n * k)
        .map(|i| ((i * 17 % 255) as i32 - 127) as i8)
        .collect();
    let packed = PackedWeights::new(&w, n, k);
    let mut out = vec![0i32; m * n];
    let mut group = c.benchmark_group("int8_gemm_conv2");
    group.throughput(Throughput::Elements((m * n * k) as u64));
    let mut kernels = vec![Kernel::Portable];
    if Kernel::detect() != Kernel::Portable {
        kernels.push(Kernel::detect());
    }
    for kernel in kernels {
        group.bench_function(kernel.name(), |b| {
            b.iter(|| gemm_u8i8(kernel, black_box(&a), m, &packed, &mut out))
        });
    }
    group.finish();
}

criterion_group!(benches, reference_cnn, int8_gemm);
criterion_main!(benches);
