//! How the inference engines spread a batch over threads and keep it in cache: one shard
//! of consecutive images per thread, each run through the whole network a few images at a
//! time (a 64-image conv1 output alone is 1.4 MB as int8, 5.5 MB as fp32: far past L2).

use rayon::prelude::*;

/// Images run through the whole network together.
pub const IMAGES_PER_PASS: usize = 8;

/// Per-thread state `S` (an engine's scratch buffers) plus each shard's logits.
#[derive(Debug)]
pub struct Shards<S> {
    shards: Vec<(S, Vec<f32>)>,
}

impl<S: Default + Send> Shards<S> {
    /// One shard per thread.
    pub fn new(threads: usize) -> Self {
        Shards {
            shards: (0..threads.max(1))
                .map(|_| (S::default(), Vec::new()))
                .collect(),
        }
    }

    /// The first shard's state (single-threaded tools such as per-layer traces).
    pub fn first(&mut self) -> &mut S {
        &mut self.shards[0].0
    }

    /// Logits `[batch, classes]` of `x` into `logits`: `pass(state, images, count, out)`
    /// runs `count` images through the network and appends their logits to `out`.
    /// Batch 1 stays on the calling thread (no hand-off in the latency path).
    pub fn predict(
        &mut self,
        x: &[f32],
        batch: usize,
        input_len: usize,
        logits: &mut Vec<f32>,
        pass: impl Fn(&mut S, &[f32], usize, &mut Vec<f32>) + Sync,
    ) {
        let shards = if batch <= 1 { 1 } else { self.shards.len() };
        let run = |(state, out): &mut (S, Vec<f32>), (start, end): (usize, usize)| {
            out.clear();
            let mut first = start;
            while first < end {
                let last = (first + IMAGES_PER_PASS).min(end);
                pass(
                    state,
                    &x[first * input_len..last * input_len],
                    last - first,
                    out,
                );
                first = last;
            }
        };
        let range = |i: usize| (i * batch / shards, (i + 1) * batch / shards);
        if shards == 1 {
            run(&mut self.shards[0], range(0));
        } else {
            self.shards[..shards]
                .par_iter_mut()
                .enumerate()
                .for_each(|(i, shard)| run(shard, range(i)));
        }
        logits.clear();
        for (_, out) in &self.shards[..shards] {
            logits.extend_from_slice(out);
        }
    }
}
