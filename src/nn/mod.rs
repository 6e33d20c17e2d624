//! The CPU numerics: a spec compiled into a [`Plan`], run by an [`Executor`].
//!
//! This is where training and fp32 inference spend their time; `runtime` and `train`
//! drive it, and candle serves as the reference implementation in tests.

pub mod adam;
pub mod denormals;
pub mod executor;
pub mod gemm;
pub mod geometry;
pub mod im2col;
pub mod layers;
pub mod plan;

pub use executor::{softmax_cross_entropy, BatchStats, Executor};
pub use plan::Plan;
