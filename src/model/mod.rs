//! Model specs: what a network is (layers, shapes, parameter names), not how it runs.
//!
//! [`spec::ModelSpec`] is read from YAML or taken from [`spec::ModelSpec::reference_cnn`];
//! `nn` compiles it into a runnable plan and `artifact` stores it in `mlops.model`.

pub mod names;
pub mod spec;

pub use names::resolve_layers;
pub use spec::{
    Activation, LayerSpec, ModelSpec, Padding, ParamInfo, Shape, MAX_BATCH, MAX_BATCH_BYTES,
};
