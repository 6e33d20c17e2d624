//! Adam as Keras implements it (epsilon outside the square root, bias correction folded
//! into the step size), so our runs are comparable with the Keras reference figures.

/// Adam hyper-parameters and moments for every parameter tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Adam {
    /// First-moment decay (Keras: 0.9).
    pub beta1: f32,
    /// Second-moment decay (Keras: 0.999).
    pub beta2: f32,
    /// Added to the root of the second moment (Keras: 1e-7).
    pub epsilon: f32,
    /// Updates applied so far.
    pub step: u64,
    /// First moments, parameter order.
    pub m: Vec<Vec<f32>>,
    /// Second moments, parameter order.
    pub v: Vec<Vec<f32>>,
}

impl Adam {
    /// Zero moments shaped like `params`, Keras' default betas and epsilon.
    pub fn new(params: &[Vec<f32>]) -> Self {
        Adam {
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-7,
            step: 0,
            m: params.iter().map(|p| vec![0.0; p.len()]).collect(),
            v: params.iter().map(|p| vec![0.0; p.len()]).collect(),
        }
    }

    /// One update of `params` with `grads` at `learning_rate`.
    ///
    /// Element-wise, so it runs on the worker pool in chunks and in SIMD: on one thread
    /// without SIMD it took ~5% of a training step while the other core waited. The
    /// result does not depend on the split (IEEE `sqrt` and division are exact in any
    /// lane).
    ///
    /// # Panics
    /// If a gradient is shorter than its parameter, or the moments were made for other
    /// shapes (not by [`Adam::new`] on these parameters).
    pub fn update(&mut self, params: &mut [Vec<f32>], grads: &[Vec<f32>], learning_rate: f32) {
        use rayon::prelude::*;
        /// Values per task: big enough to amortise a task hand-off, small enough to
        /// split the largest tensors across the cores.
        const CHUNK: usize = 8192;
        self.step += 1;
        let t = self.step as f64;
        let (b1, b2, epsilon) = (self.beta1, self.beta2, self.epsilon);
        let alpha = (learning_rate as f64 * (1.0 - (b2 as f64).powf(t)).sqrt()
            / (1.0 - (b1 as f64).powf(t))) as f32;
        let constants = Constants {
            b1,
            b2,
            alpha,
            epsilon,
        };
        params
            .par_iter_mut()
            .zip(grads)
            .zip(&mut self.m)
            .zip(&mut self.v)
            .for_each(|(((p, g), m), v)| {
                let len = p.len();
                assert!(g.len() >= len && m.len() == len && v.len() == len);
                p.par_chunks_mut(CHUNK)
                    .zip(g[..len].par_chunks(CHUNK))
                    .zip(m.par_chunks_mut(CHUNK))
                    .zip(v.par_chunks_mut(CHUNK))
                    .for_each(|(((p, g), m), v)| update_chunk(p, g, m, v, constants));
            });
    }
}

#[derive(Clone, Copy)]
struct Constants {
    b1: f32,
    b2: f32,
    alpha: f32,
    epsilon: f32,
}

/// Adam on one chunk (all four slices the same length), compiled for AVX-512 and AVX2 too.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512bw+avx512dq",
    "x86_64+avx2+fma"
))]
fn update_chunk(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: Constants) {
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        *m = k.b1 * *m + (1.0 - k.b1) * g;
        *v = k.b2 * *v + (1.0 - k.b2) * g * g;
        *p -= k.alpha * *m / (v.sqrt() + k.epsilon);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// First step of Adam moves each weight by ~lr against the gradient's sign
    /// (m_hat / sqrt(v_hat) = g / |g| after bias correction).
    #[test]
    fn first_step_moves_by_learning_rate() {
        let mut params = vec![vec![1.0f32, -2.0]];
        let mut adam = Adam::new(&params);
        adam.update(&mut params, &[vec![0.5, -3.0]], 0.01);
        assert!((params[0][0] - 0.99).abs() < 1e-5, "{:?}", params);
        assert!((params[0][1] + 1.99).abs() < 1e-5, "{:?}", params);
    }
}
