//! Criterion benchmarks of each training kernel in isolation, on the reference CNN's
//! shapes at 32 images: the shard one thread runs of a batch of 64 on 2 cores.
//!
//! `cargo bench --bench train_kernels`; throughput is in images/s of that shard, so the
//! figures add up like the training step's parts (the step itself is `bench_main`'s
//! `reference_cnn/train_step_batch64`, over both threads).

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};

use mlops::model::ModelSpec;
use mlops::nn::adam::Adam;
use mlops::nn::gemm::{matmul, matmul_transposed, MatRef};
use mlops::nn::layers;
use mlops::nn::plan::{ConvOp, DenseOp, Op, PoolOp};
use mlops::nn::{softmax_cross_entropy, Plan};

/// Images per shard.
const SHARD: usize = 32;

/// Deterministic values in [-1, 1), varied enough that no branch predicts them.
fn values(len: usize, salt: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7919 + salt * 104_729) % 2001) as f32 / 1000.5 - 1.0)
        .collect()
}

struct Ops {
    convs: Vec<ConvOp>,
    pools: Vec<PoolOp>,
    dense: Vec<DenseOp>,
}

fn reference_ops(plan: &Plan) -> Ops {
    let mut ops = Ops {
        convs: Vec::new(),
        pools: Vec::new(),
        dense: Vec::new(),
    };
    for op in &plan.ops {
        match op {
            Op::Conv(c) => ops.convs.push(c.clone()),
            Op::MaxPool(p) => ops.pools.push(p.clone()),
            Op::Dense(d) => ops.dense.push(d.clone()),
            _ => {}
        }
    }
    ops
}

fn conv(c: &mut Criterion) {
    mlops::nn::denormals::flush_denormals_on_this_thread();
    let plan = Plan::compile(&ModelSpec::reference_cnn()).unwrap();
    let params = plan.init_params(0);
    let ops = reference_ops(&plan);
    let mut group = c.benchmark_group("train_conv_shard32");
    group.throughput(Throughput::Elements(SHARD as u64));
    for (index, op) in ops.convs.iter().enumerate() {
        let name = format!("conv{}", index + 1);
        let x = values(SHARD * op.input.iter().product::<usize>(), index);
        let (weight, bias) = (&params[op.weight], &params[op.weight + 1]);
        let (mut patches, mut out) = (Vec::new(), Vec::new());
        // Filled here too: a filtered run may skip the forward bench that fills them.
        layers::conv_pre_activation(op, weight, bias, &x, SHARD, &mut patches, &mut out);
        group.bench_function(format!("{name}_forward"), |b| {
            b.iter(|| {
                layers::conv_pre_activation(
                    op,
                    weight,
                    bias,
                    black_box(&x),
                    SHARD,
                    &mut patches,
                    &mut out,
                )
            })
        });
        let rows = SHARD * op.output[0] * op.output[1];
        let filters = op.output[2];
        let grad = values(rows * filters, index + 10);
        let (mut dw, mut db, mut scratch) =
            (vec![0.0; weight.len()], vec![0.0; filters], Vec::new());
        let mut dx = (!op.first).then(|| vec![0.0; x.len()]);
        group.bench_function(format!("{name}_backward"), |b| {
            b.iter(|| {
                layers::conv_backward(
                    op,
                    weight,
                    &patches,
                    black_box(&grad),
                    SHARD,
                    &mut dw,
                    &mut db,
                    &mut scratch,
                    dx.as_deref_mut(),
                )
            })
        });
        if op.is_tap_major() {
            continue;
        }
        for chunk in [1, 2, 4, 8] {
            let (mut chunk_patches, mut chunk_scratch) = (Vec::new(), Vec::new());
            group.bench_function(format!("{name}_backward_chunked{chunk}"), |b| {
                b.iter(|| {
                    layers::conv_backward_chunked(
                        op,
                        weight,
                        &x,
                        black_box(&grad),
                        SHARD,
                        chunk,
                        &mut dw,
                        &mut db,
                        &mut chunk_patches,
                        &mut chunk_scratch,
                        dx.as_deref_mut(),
                    )
                })
            });
            group.bench_function(format!("{name}_forward_chunked{chunk}"), |b| {
                b.iter(|| {
                    layers::conv_pre_activation_chunked(
                        op,
                        weight,
                        bias,
                        black_box(&x),
                        SHARD,
                        chunk,
                        &mut chunk_patches,
                        &mut out,
                    )
                })
            });
        }
        // The weight gradient's GEMM alone, in both operand orders: grad^T * patches, and
        // (patches^T * grad)^T written transposed.
        let k = op.patch_len();
        group.bench_function(format!("{name}_weight_grad_gemm"), |b| {
            b.iter(|| {
                matmul(
                    &mut dw,
                    MatRef::new(black_box(&grad), rows, filters).t(),
                    MatRef::new(&patches, rows, k),
                    false,
                )
            })
        });
        group.bench_function(format!("{name}_weight_grad_gemm_transposed"), |b| {
            b.iter(|| {
                matmul_transposed(
                    &mut dw,
                    MatRef::new(&patches, rows, k).t(),
                    MatRef::new(black_box(&grad), rows, filters),
                    false,
                )
            })
        });
        // The same GEMMs on one chunk of 4 images, as the chunked backward runs them.
        let chunk_rows = 4 * op.output[0] * op.output[1];
        let mut chunk_scratch = vec![0.0; chunk_rows * k];
        group.bench_function(format!("{name}_chunk4_weight_grad_gemm"), |b| {
            b.iter(|| {
                matmul(
                    &mut dw,
                    MatRef::new(
                        &black_box(&grad)[..chunk_rows * filters],
                        chunk_rows,
                        filters,
                    )
                    .t(),
                    MatRef::new(&patches[..chunk_rows * k], chunk_rows, k),
                    true,
                )
            })
        });
        group.bench_function(format!("{name}_chunk4_weight_grad_gemm_transposed"), |b| {
            b.iter(|| {
                matmul_transposed(
                    &mut dw,
                    MatRef::new(&patches[..chunk_rows * k], chunk_rows, k).t(),
                    MatRef::new(
                        &black_box(&grad)[..chunk_rows * filters],
                        chunk_rows,
                        filters,
                    ),
                    true,
                )
            })
        });
        group.bench_function(format!("{name}_chunk4_input_grad_gemm"), |b| {
            b.iter(|| {
                matmul(
                    &mut chunk_scratch,
                    MatRef::new(
                        &black_box(&grad)[..chunk_rows * filters],
                        chunk_rows,
                        filters,
                    ),
                    MatRef::new(weight, filters, k),
                    false,
                )
            })
        });
        group.bench_function(format!("{name}_chunk4_input_grad_gemm_transposed"), |b| {
            b.iter(|| {
                matmul_transposed(
                    &mut chunk_scratch,
                    MatRef::new(weight, filters, k).t(),
                    MatRef::new(
                        &black_box(&grad)[..chunk_rows * filters],
                        chunk_rows,
                        filters,
                    )
                    .t(),
                    false,
                )
            })
        });
        if !op.first {
            scratch.resize(rows * k, 0.0);
            group.bench_function(format!("{name}_input_grad_gemm"), |b| {
                b.iter(|| {
                    matmul(
                        &mut scratch,
                        MatRef::new(black_box(&grad), rows, filters),
                        MatRef::new(weight, filters, k),
                        false,
                    )
                })
            });
            group.bench_function(format!("{name}_input_grad_gemm_transposed"), |b| {
                b.iter(|| {
                    matmul_transposed(
                        &mut scratch,
                        MatRef::new(weight, filters, k).t(),
                        MatRef::new(black_box(&grad), rows, filters).t(),
                        false,
                    )
                })
            });
            let dx = dx.as_mut().expect("input gradient");
            group.bench_function(format!("{name}_col2im"), |b| {
                b.iter(|| layers::col2im(op, black_box(&scratch), SHARD, dx))
            });
        }
    }
    group.finish();
}

/// Each ReLU'd conv fused with the max-pool after it, as training runs them
/// (`conv_relu_max_pool_forward` / `_backward`, chunks of 4 images), against the separate
/// kernels they replace: the whole conv output written, then pooled (and the pool's
/// gradient written in full, then read by the conv's backward pass).
fn conv_pool_fused(c: &mut Criterion) {
    mlops::nn::denormals::flush_denormals_on_this_thread();
    let plan = Plan::compile(&ModelSpec::reference_cnn()).unwrap();
    let params = plan.init_params(0);
    let mut group = c.benchmark_group("train_conv_pool_fused_shard32");
    group.throughput(Throughput::Elements(SHARD as u64));
    const CHUNK: usize = 4;
    let pairs = plan.ops.windows(2).filter_map(|w| match w {
        [Op::Conv(conv), Op::MaxPool(pool)] if conv.relu && layers::fuses_relu_max_pool(pool) => {
            Some((conv.clone(), pool.clone()))
        }
        _ => None,
    });
    for (index, (conv, pool)) in pairs.enumerate() {
        let name = format!("conv{}_pool{}", index + 1, index + 1);
        let x = values(SHARD * conv.input.iter().product::<usize>(), index + 60);
        let (weight, bias) = (&params[conv.weight], &params[conv.weight + 1]);
        let (mut patches, mut pre, mut out, mut argmax) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let forward = |patches: &mut Vec<f32>,
                       pre: &mut Vec<f32>,
                       out: &mut Vec<f32>,
                       argmax: &mut Vec<u32>| {
            layers::conv_relu_max_pool_forward(
                &conv,
                &pool,
                weight,
                bias,
                black_box(&x),
                SHARD,
                CHUNK,
                patches,
                pre,
                out,
                argmax,
            )
        };
        forward(&mut patches, &mut pre, &mut out, &mut argmax);
        group.bench_function(format!("{name}_fused_forward"), |b| {
            b.iter(|| forward(&mut patches, &mut pre, &mut out, &mut argmax))
        });
        let chunk = if conv.is_tap_major() { SHARD } else { CHUNK };
        let (mut conv_out, mut sep_patches, mut sep_out, mut sep_argmax) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let separate_forward = |sep_patches: &mut Vec<f32>,
                                conv_out: &mut Vec<f32>,
                                sep_out: &mut Vec<f32>,
                                sep_argmax: &mut Vec<u32>| {
            layers::conv_pre_activation_chunked(
                &conv,
                weight,
                bias,
                black_box(&x),
                SHARD,
                chunk,
                sep_patches,
                conv_out,
            );
            layers::relu_max_pool_forward(&pool, conv_out, SHARD, sep_out, sep_argmax)
        };
        // Filled here too: a filtered run may skip the forward bench that fills them.
        separate_forward(
            &mut sep_patches,
            &mut conv_out,
            &mut sep_out,
            &mut sep_argmax,
        );
        group.bench_function(format!("{name}_separate_forward"), |b| {
            b.iter(|| {
                separate_forward(
                    &mut sep_patches,
                    &mut conv_out,
                    &mut sep_out,
                    &mut sep_argmax,
                )
            })
        });
        let grad = values(out.len(), index + 70);
        let filters = conv.output[2];
        let (mut dw, mut db, mut scratch) =
            (vec![0.0; weight.len()], vec![0.0; filters], Vec::new());
        let mut dx = (!conv.first).then(|| vec![0.0; x.len()]);
        group.bench_function(format!("{name}_fused_backward"), |b| {
            b.iter(|| {
                layers::conv_relu_max_pool_backward(
                    &conv,
                    &pool,
                    weight,
                    &x,
                    &out,
                    &argmax,
                    black_box(&grad),
                    SHARD,
                    CHUNK,
                    &mut dw,
                    &mut db,
                    &mut patches,
                    &mut pre,
                    &mut scratch,
                    dx.as_deref_mut(),
                )
            })
        });
        let mut dconv = vec![0.0; conv_out.len()];
        group.bench_function(format!("{name}_separate_backward"), |b| {
            b.iter(|| {
                layers::relu_max_pool_backward(
                    &pool,
                    &sep_out,
                    &sep_argmax,
                    black_box(&grad),
                    SHARD,
                    &mut dconv,
                );
                if conv.is_tap_major() {
                    layers::conv_backward(
                        &conv,
                        weight,
                        &sep_patches,
                        &dconv,
                        SHARD,
                        &mut dw,
                        &mut db,
                        &mut scratch,
                        None,
                    )
                } else {
                    layers::conv_backward_chunked(
                        &conv,
                        weight,
                        &x,
                        &dconv,
                        SHARD,
                        CHUNK,
                        &mut dw,
                        &mut db,
                        &mut sep_patches,
                        &mut scratch,
                        dx.as_deref_mut(),
                    )
                }
            })
        });
    }
    group.finish();
}

fn pool_relu_dense(c: &mut Criterion) {
    mlops::nn::denormals::flush_denormals_on_this_thread();
    let plan = Plan::compile(&ModelSpec::reference_cnn()).unwrap();
    let params = plan.init_params(0);
    let ops = reference_ops(&plan);
    let mut group = c.benchmark_group("train_pool_relu_dense_shard32");
    group.throughput(Throughput::Elements(SHARD as u64));
    for (index, op) in ops.pools.iter().enumerate() {
        let name = format!("pool{}", index + 1);
        let x = values(SHARD * op.input.iter().product::<usize>(), index + 20);
        let (mut out, mut argmax) = (Vec::new(), Vec::new());
        group.bench_function(format!("{name}_relu_max_pool_forward"), |b| {
            b.iter(|| {
                layers::relu_max_pool_forward(op, black_box(&x), SHARD, &mut out, &mut argmax)
            })
        });
        let grad = values(out.len(), index + 30);
        let mut dx = vec![0.0; x.len()];
        group.bench_function(format!("{name}_relu_max_pool_backward"), |b| {
            b.iter(|| {
                layers::relu_max_pool_backward(op, &out, &argmax, black_box(&grad), SHARD, &mut dx)
            })
        });
        // The unfused pair it replaces, for comparison.
        let mut relu_x = x.clone();
        let mut plain = Vec::new();
        group.bench_function(format!("{name}_relu_then_max_pool_forward"), |b| {
            b.iter(|| {
                relu_x.copy_from_slice(black_box(&x));
                layers::relu_in_place(&mut relu_x);
                layers::max_pool_forward(op, &relu_x, SHARD, &mut plain)
            })
        });
        group.bench_function(format!("{name}_max_pool_then_relu_backward"), |b| {
            b.iter(|| {
                layers::max_pool_backward(op, &relu_x, &plain, black_box(&grad), SHARD, &mut dx);
                layers::relu_backward(&mut dx, &relu_x);
            })
        });
    }
    for (index, op) in ops.dense.iter().enumerate() {
        let name = format!("dense{}", index + 1);
        let x = values(SHARD * op.inputs, index + 40);
        let (weight, bias) = (&params[op.weight], &params[op.weight + 1]);
        let mut out = Vec::new();
        group.bench_function(format!("{name}_forward"), |b| {
            b.iter(|| layers::dense_forward(op, weight, bias, black_box(&x), SHARD, &mut out))
        });
        let grad = values(SHARD * op.units, index + 50);
        let (mut dw, mut db, mut dx) = (
            vec![0.0; weight.len()],
            vec![0.0; op.units],
            vec![0.0; x.len()],
        );
        group.bench_function(format!("{name}_backward"), |b| {
            b.iter(|| {
                layers::dense_backward(
                    op,
                    weight,
                    &x,
                    black_box(&grad),
                    SHARD,
                    &mut dw,
                    &mut db,
                    Some(&mut dx),
                )
            })
        });
    }
    let logits = values(SHARD * plan.classes, 60);
    let labels: Vec<u8> = (0..SHARD).map(|i| (i % plan.classes) as u8).collect();
    let mut dlogits = Vec::new();
    group.bench_function("softmax_cross_entropy", |b| {
        b.iter(|| {
            softmax_cross_entropy(
                black_box(&logits),
                &labels,
                plan.classes,
                64,
                Some(&mut dlogits),
            )
        })
    });
    group.finish();

    // Adam runs once per step on the summed gradients, not per shard: its throughput is
    // per batch of 64.
    let mut group = c.benchmark_group("train_adam");
    group.throughput(Throughput::Elements(64));
    let mut weights = params.clone();
    let grads: Vec<Vec<f32>> = params
        .iter()
        .enumerate()
        .map(|(i, p)| values(p.len(), i))
        .collect();
    let mut adam = Adam::new(&weights);
    group.bench_function("update_93k_params", |b| {
        b.iter(|| adam.update(&mut weights, black_box(&grads), 1e-3))
    });
    group.finish();
}

criterion_group!(benches, conv, conv_pool_fused, pool_relu_dense);
criterion_main!(benches);
