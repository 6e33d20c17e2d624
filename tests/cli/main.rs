//! Integration tests: the real `mlops` binary on the committed fixtures.

mod bench;
mod convert;
mod errors;
mod eval;
mod export;
mod golden;
mod hostile;
mod inspect;
mod pipeline;
mod prune;
mod quantize;
mod report;
mod serve;
mod serve_forms;
mod serve_fuzz;
mod serve_redis;
mod serve_repository;
mod snapshots;
mod train;
mod util;
