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
    pub fn update(&mut self, params: &mut [Vec<f32>], grads: &[Vec<f32>], learning_rate: f32) {
        self.step += 1;
        let t = self.step as f64;
        let (b1, b2) = (self.beta1, self.beta2);
        let alpha = (learning_rate as f64 * (1.0 - (b2 as f64).powf(t)).sqrt()
            / (1.0 - (b1 as f64).powf(t))) as f32;
        for (((p, g), m), v) in params
            .iter_mut()
            .zip(grads)
            .zip(&mut self.m)
            .zip(&mut self.v)
        {
            for i in 0..p.len() {
                let gi = g[i];
                m[i] = b1 * m[i] + (1.0 - b1) * gi;
                v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
                p[i] -= alpha * m[i] / (v[i].sqrt() + self.epsilon);
            }
        }
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
