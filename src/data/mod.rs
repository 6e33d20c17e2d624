//! Labelled image data sets: IDX folders (MNIST layout) loaded into memory as bytes.
//!
//! A [`Dataset`] holds a `train` and a `test` [`Split`]; pixels stay `u8` until a batch is
//! assembled, where they become `f32` in `[0, 1]` (the scaling recorded in `mlops.input`).

pub mod idx;
pub mod images;

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::io::FileRecord;
use crate::{Error, Result};

/// Which part of a data set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitKind {
    /// `train-*` files.
    Train,
    /// `t10k-*` (or `test-*`) files.
    Test,
}

impl SplitKind {
    fn prefixes(self) -> &'static [&'static str] {
        match self {
            SplitKind::Train => &["train"],
            SplitKind::Test => &["t10k", "test"],
        }
    }
}

/// Images and labels of one split, pixels as bytes in NHWC order.
#[derive(Debug, Clone)]
pub struct Split {
    /// `count * height * width * channels` bytes.
    pub images: Vec<u8>,
    /// One class index per image.
    pub labels: Vec<u8>,
    /// Number of images.
    pub count: usize,
    /// Image shape `[height, width, channels]`.
    pub shape: [usize; 3],
    /// The two files it came from, with size and sha256 (for reports and lineage).
    pub files: Vec<FileRecord>,
}

/// Scale from a pixel byte to the network's input value (Keras' `x / 255`).
pub const PIXEL_SCALE: f32 = 1.0 / 255.0;

/// How a pixel byte becomes a network input value: `(pixel * scale - mean) / std`.
///
/// The one definition every path uses (training, evaluation, calibration, benchmarks and
/// serve's UINT8 input), taken from an artifact's `mlops.input`, so all of them feed a
/// model the same numbers. [`Preprocess::UNIT`] is `pixel / 255` exactly (subtracting 0
/// and dividing by 1 change no bit), what `mlops train` uses and records.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Preprocess {
    /// Multiplies the byte.
    pub scale: f32,
    /// Subtracted after scaling.
    pub mean: f32,
    /// Divided by last.
    pub std: f32,
}

impl Preprocess {
    /// Bytes scaled to `[0, 1]`.
    pub const UNIT: Preprocess = Preprocess {
        scale: PIXEL_SCALE,
        mean: 0.0,
        std: 1.0,
    };

    /// The input value of `pixel` (a byte value, `0.0..=255.0`).
    #[inline]
    pub fn apply(&self, pixel: f32) -> f32 {
        (pixel * self.scale - self.mean) / self.std
    }

    /// The values pixels 0 and 255 become, lowest first: the range a model was trained on.
    pub fn range(&self) -> (f32, f32) {
        let (a, b) = (self.apply(0.0), self.apply(255.0));
        (a.min(b), a.max(b))
    }
}

impl Split {
    /// Values per image.
    pub fn image_len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Keeps only the first `n` images (for quick runs and tests).
    pub fn truncate(&mut self, n: usize) {
        if n < self.count {
            self.count = n;
            self.images.truncate(n * self.image_len());
            self.labels.truncate(n);
        }
    }

    /// The largest label plus one.
    pub fn classes_seen(&self) -> usize {
        self.labels
            .iter()
            .copied()
            .max()
            .map_or(0, |m| m as usize + 1)
    }

    /// Writes the images at `indices` into `out` (NHWC, each pixel through `preprocess`)
    /// and their labels into `labels`.
    pub fn gather(
        &self,
        indices: &[usize],
        preprocess: &Preprocess,
        out: &mut Vec<f32>,
        labels: &mut Vec<u8>,
    ) {
        let len = self.image_len();
        out.clear();
        labels.clear();
        for &i in indices {
            out.extend(
                self.images[i * len..(i + 1) * len]
                    .iter()
                    .map(|&p| preprocess.apply(p as f32)),
            );
            labels.push(self.labels[i]);
        }
    }
}

/// `batch` deterministic stand-in images of `input_len` values in `[0, 1]` (a fixed
/// pattern, not noise), for timing when no data is given.
pub fn synthetic_batch(input_len: usize, batch: usize) -> Vec<f32> {
    (0..batch * input_len)
        .map(|i| ((i * 7919) % 255) as f32 / 255.0)
        .collect()
}

/// A data set folder: its train and test splits.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// The folder it was read from.
    pub root: PathBuf,
    /// Training images.
    pub train: Split,
    /// Evaluation images.
    pub test: Split,
}

impl Dataset {
    /// Loads both splits of an IDX folder, checking they agree with each other.
    ///
    /// # Errors
    /// As [`Dataset::load_limited`].
    pub fn load(root: &Path) -> Result<Self> {
        Self::load_limited(root, None, None)
    }

    /// Loads at most `train_limit` training and `test_limit` test images.
    ///
    /// # Errors
    /// As [`load_split_limited`] for either split, and [`Error::Data`] naming `root` when
    /// the train and test images differ in shape.
    pub fn load_limited(
        root: &Path,
        train_limit: Option<usize>,
        test_limit: Option<usize>,
    ) -> Result<Self> {
        let train = load_split_limited(root, SplitKind::Train, train_limit)?;
        let test = load_split_limited(root, SplitKind::Test, test_limit)?;
        if train.shape != test.shape {
            return Err(Error::data(
                root,
                format!(
                    "train images are {:?} but test images are {:?}",
                    train.shape, test.shape
                ),
            ));
        }
        Ok(Dataset {
            root: root.to_path_buf(),
            train,
            test,
        })
    }
}

/// Finds `PREFIX-KIND-idxN-ubyte[.gz]` in `root`.
fn find_file(root: &Path, split: SplitKind, kind: &str) -> Result<PathBuf> {
    let ranks: &[u8] = if kind == "images" { &[3, 4] } else { &[1] };
    let mut tried = Vec::new();
    for prefix in split.prefixes() {
        for rank in ranks {
            for ext in ["", ".gz"] {
                let name = format!("{prefix}-{kind}-idx{rank}-ubyte{ext}");
                let path = root.join(&name);
                if path.is_file() {
                    return Ok(path);
                }
                tried.push(name);
            }
        }
    }
    Err(Error::data(
        root,
        format!("no {kind} file found (looked for {})", tried.join(", ")),
    ))
}

/// Loads one split of an IDX folder.
///
/// # Errors
/// As [`load_split_limited`].
pub fn load_split(root: &Path, split: SplitKind) -> Result<Split> {
    load_split_limited(root, split, None)
}

/// Loads at most `limit` images (and labels) of one split, reading no more of the files
/// than that ([`idx::read_idx_limited`]). Images of rank 3 (`N, H, W`) get one channel.
///
/// # Errors
/// - [`Error::Data`] when `root` is not a folder, lacks the split's images or labels
///   (`train-*`, or `t10k-*` / `test-*`: `images-idx{3,4}-ubyte`, `labels-idx1-ubyte`,
///   optionally `.gz`), a file is not valid IDX
///   ([`idx::read_idx_limited`]), the images are not of rank 3 or 4, the labels not of
///   rank 1, or their counts differ.
/// - [`Error::Io`] when a file cannot be read.
pub fn load_split_limited(root: &Path, split: SplitKind, limit: Option<usize>) -> Result<Split> {
    if !root.is_dir() {
        return Err(Error::data(root, "data folder does not exist"));
    }
    let image_path = find_file(root, split, "images")?;
    let label_path = find_file(root, split, "labels")?;
    let images = idx::read_idx_limited(&image_path, limit)?;
    let labels = idx::read_idx_limited(&label_path, limit)?;
    let shape = match images.dims[..] {
        [_, h, w] => [h, w, 1],
        [_, h, w, c] => [h, w, c],
        _ => {
            return Err(Error::data(
                &image_path,
                format!(
                    "expected images of rank 3 (N,H,W) or 4 (N,H,W,C), found dimensions {:?}",
                    images.dims
                ),
            ))
        }
    };
    if labels.dims.len() != 1 {
        return Err(Error::data(
            &label_path,
            format!(
                "expected a rank-1 label file, found dimensions {:?}",
                labels.dims
            ),
        ));
    }
    let count = images.dims[0];
    if labels.dims[0] != count {
        return Err(Error::data(
            &label_path,
            format!(
                "{} labels but `{}` holds {count} images",
                labels.dims[0],
                image_path.display()
            ),
        ));
    }
    let files = vec![FileRecord::of(&image_path)?, FileRecord::of(&label_path)?];
    Ok(Split {
        images: images.values,
        labels: labels.values,
        count,
        shape,
        files,
    })
}

/// A short description of a split for reports.
#[derive(Debug, Clone, Serialize)]
pub struct SplitSummary {
    /// Images used.
    pub count: usize,
    /// `[height, width, channels]`.
    pub shape: [usize; 3],
}

impl Split {
    /// Checks the images fit a model's input (for calibration, where labels are unused).
    ///
    /// # Errors
    /// [`Error::Data`] when the images' `[h, w, c]` differs from `input`.
    pub fn check_shape(&self, input: [usize; 3]) -> Result<()> {
        self.check_fits(input, usize::MAX)
    }

    /// Checks the images fit a model's input and its labels its classes.
    ///
    /// # Errors
    /// [`Error::Data`] when the images' `[h, w, c]` differs from `input` (naming the image
    /// file), or a label is `classes` or more (naming the label file).
    pub fn check_fits(&self, input: [usize; 3], classes: usize) -> Result<()> {
        // An image folder has one record for all its files; an IDX split one per file.
        let file = |i: usize| {
            self.files
                .get(i)
                .or(self.files.first())
                .map_or_else(PathBuf::new, |f| PathBuf::from(&f.path))
        };
        if self.shape != input {
            return Err(Error::data(
                file(0),
                format!(
                    "images are {:?} (h, w, c) but the model expects {:?}; use a model spec whose `input` matches",
                    self.shape, input
                ),
            ));
        }
        if self.classes_seen() > classes {
            return Err(Error::data(
                file(1),
                format!(
                    "holds label {} but the model has {classes} classes; set `classes` in the model spec",
                    self.classes_seen() - 1
                ),
            ));
        }
        Ok(())
    }
}
