//! Criterion benchmarks of the hot paths, on synthetic tensors (no disk I/O).
//!
//! `cargo bench --bench bench_main`; throughput is reported in images/s.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};

use mlops::model::ModelSpec;
use mlops::nn::{Executor, Plan};
use mlops::runtime::{CpuEngine, Engine as _};

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
    group.finish();
}

/// Whole forward passes as `eval`, `bench` and `serve` run them (`CpuEngine`): fp32 on the
/// in-place kernel, and int8 (static, calibrated on synthetic images) on the integer one.
fn inference(c: &mut Criterion) {
    mlops::nn::denormals::flush_denormals_on_this_thread();
    let spec = ModelSpec::reference_cnn();
    let plan = Plan::compile(&spec).unwrap();
    let fp32 = mlops::artifact::Artifact::from_params(&spec, &plan.init_params(0)).unwrap();
    let (x, _) = inputs(&plan, BATCH);
    let calib = mlops::data::Split {
        images: x.iter().map(|v| (v * 255.0) as u8).collect(),
        labels: vec![0; BATCH],
        count: BATCH,
        shape: spec.input,
        files: Vec::new(),
    };
    let config = mlops::quantize::QuantConfig {
        method: mlops::quantize::CalibMethod::MinMax,
        samples: BATCH,
        seed: 0,
        per_tensor: false,
        dynamic: false,
        exclude: Vec::new(),
    };
    let (int8, _) = mlops::quantize::quantize(&fp32, None, Some(&calib), &config).unwrap();
    let mut group = c.benchmark_group("inference");
    for (name, artifact) in [("fp32", &fp32), ("int8", &int8)] {
        let mut session = CpuEngine::new(artifact, threads()).unwrap();
        let mut single = CpuEngine::new(artifact, 1).unwrap();
        let mut logits = Vec::new();
        group.throughput(Throughput::Elements(BATCH as u64));
        group.bench_function(format!("{name}_forward_batch64"), |b| {
            b.iter(|| session.predict(black_box(&x), BATCH, &mut logits).unwrap())
        });
        group.throughput(Throughput::Elements(1));
        group.bench_function(format!("{name}_forward_batch1"), |b| {
            b.iter(|| {
                single
                    .predict(black_box(&x[..plan.input_len]), 1, &mut logits)
                    .unwrap()
            })
        });
    }
    group.finish();
}

/// The fp32 forward pass at batch 64 on every engine this CPU has: each in-place kernel
/// and the training executor (what CPUs with neither AVX-512 nor AVX2 run).
fn fp32_kernels(c: &mut Criterion) {
    use mlops::runtime::fp32::{FloatModel, Kernel};
    mlops::nn::denormals::flush_denormals_on_this_thread();
    let plan = Plan::compile(&ModelSpec::reference_cnn()).unwrap();
    let params = plan.init_params(0);
    let (x, _) = inputs(&plan, BATCH);
    let mut logits = Vec::new();
    let mut group = c.benchmark_group("fp32_forward_batch64");
    group.throughput(Throughput::Elements(BATCH as u64));
    for kernel in Kernel::available() {
        let mut model = FloatModel::new(&plan, &params, threads(), kernel);
        group.bench_function(kernel.name(), |b| {
            b.iter(|| model.predict(black_box(&x), BATCH, &mut logits))
        });
    }
    let mut executor = Executor::new(&plan, threads());
    group.bench_function("executor", |b| {
        b.iter(|| executor.predict(&params, black_box(&x), BATCH, &mut logits))
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
    for kernel in Kernel::available() {
        group.bench_function(kernel.name(), |b| {
            b.iter(|| gemm_u8i8(kernel, black_box(&a), m, &packed, &mut out))
        });
    }
    group.finish();
}

/// `mlops serve`'s request parsing, the largest share of its CPU time after HTTP itself:
/// TF Serving and KServe v2 (FP32 and UINT8) bodies of 64 images (in bytes per second of
/// body), one image as a Python client writes it, and the v2 binary tensor extension's
/// FP32 body of the 64 images (JSON header + raw bytes).
fn serve_parse(c: &mut Criterion) {
    use mlops::serve::protocol::{parse_tf_serving, parse_v2, ModelShape};
    let spec = ModelSpec::reference_cnn();
    let shape = ModelShape {
        input: mlops::artifact::InputSpec::unit_scaled(spec.input),
        labels: (0..spec.classes).map(|c| c.to_string()).collect(),
    };
    let plan = Plan::compile(&spec).unwrap();
    let (x, _) = inputs(&plan, BATCH);
    let images: Vec<&[f32]> = x.chunks_exact(plan.input_len).collect();
    let tf = serde_json::json!({ "instances": images }).to_string();
    let pixels: Vec<u8> = x.iter().map(|v| (v * 255.0) as u8).collect();
    let v2 = serde_json::json!({"inputs": [{"name": "input", "shape": [BATCH, 28, 28, 1],
        "datatype": "UINT8", "data": pixels}]})
    .to_string();
    let mut group = c.benchmark_group("serve_parse_batch64");
    group.throughput(Throughput::Bytes(tf.len() as u64));
    group.bench_function("tf_serving_fp32", |b| {
        b.iter(|| parse_tf_serving(black_box(tf.as_bytes()), &shape).unwrap())
    });
    // What Python clients send: one image nested 28x28x1, `pixels / 255.0` written in full
    // double precision (16-17 digits), as `numpy.tolist()` and `json.dumps` do.
    let nested: Vec<Vec<Vec<f64>>> = pixels[..plan.input_len]
        .chunks_exact(28)
        .map(|row| row.iter().map(|&p| vec![p as f64 / 255.0]).collect())
        .collect();
    let client = serde_json::json!({ "instances": [nested] }).to_string();
    group.throughput(Throughput::Bytes(client.len() as u64));
    group.bench_function("tf_serving_client_image", |b| {
        b.iter(|| parse_tf_serving(black_box(client.as_bytes()), &shape).unwrap())
    });
    let v2_fp32 = serde_json::json!({"inputs": [{"name": "input", "shape": [BATCH, 28, 28, 1],
        "datatype": "FP32", "data": x}]})
    .to_string();
    group.throughput(Throughput::Bytes(v2_fp32.len() as u64));
    group.bench_function("v2_fp32", |b| {
        b.iter(|| parse_v2(black_box(v2_fp32.as_bytes()), &[], &shape).unwrap())
    });
    group.throughput(Throughput::Bytes(v2.len() as u64));
    group.bench_function("v2_uint8", |b| {
        b.iter(|| parse_v2(black_box(v2.as_bytes()), &[], &shape).unwrap())
    });
    let raw: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    let header = serde_json::json!({"inputs": [{"name": "input", "shape": [BATCH, 28, 28, 1],
        "datatype": "FP32", "parameters": {"binary_data_size": raw.len()}}]})
    .to_string();
    group.throughput(Throughput::Bytes((header.len() + raw.len()) as u64));
    group.bench_function("v2_binary_fp32", |b| {
        b.iter(|| parse_v2(black_box(header.as_bytes()), black_box(&raw), &shape).unwrap())
    });
    group.finish();
}

criterion_group!(
    benches,
    reference_cnn,
    inference,
    fp32_kernels,
    int8_gemm,
    serve_parse
);
criterion_main!(benches);
