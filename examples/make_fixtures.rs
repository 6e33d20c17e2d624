//! Regenerates `fixtures/mnist-tiny/` (the test suite's data) from `fixtures/mnist/`.
//!
//! Run: `cargo run --release --example make_fixtures`. Takes the first 512 training and
//! 256 test images of MNIST (deterministic, no sampling) and writes them as gzip IDX.

use std::io::Write;
use std::path::Path;

use mlops::data::idx::{encode_idx, read_idx};

const TRAIN: usize = 512;
const TEST: usize = 256;

fn write_gz(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    // Level 9 and no file name or time in the header: the output is reproducible.
    let mut encoder = flate2::GzBuilder::new()
        .mtime(0)
        .write(std::fs::File::create(path)?, flate2::Compression::best());
    encoder.write_all(bytes)?;
    encoder.finish()?;
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let src = Path::new("fixtures/mnist");
    let dst = Path::new("fixtures/mnist-tiny");
    std::fs::create_dir_all(dst)?;
    for (prefix, count) in [("train", TRAIN), ("t10k", TEST)] {
        let images = read_idx(&src.join(format!("{prefix}-images-idx3-ubyte.gz")))?;
        let labels = read_idx(&src.join(format!("{prefix}-labels-idx1-ubyte.gz")))?;
        let per_image = images.dims[1] * images.dims[2];
        write_gz(
            &dst.join(format!("{prefix}-images-idx3-ubyte.gz")),
            &encode_idx(
                &[count, images.dims[1], images.dims[2]],
                &images.values[..count * per_image],
            ),
        )?;
        write_gz(
            &dst.join(format!("{prefix}-labels-idx1-ubyte.gz")),
            &encode_idx(&[count], &labels.values[..count]),
        )?;
        println!(
            "{prefix}: {count} images of {}x{}",
            images.dims[1], images.dims[2]
        );
    }
    Ok(())
}
