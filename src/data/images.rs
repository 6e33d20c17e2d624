//! Folders of PNG/JPEG images (flat, or one sub-folder per class) as a [`Split`].
//!
//! Used for calibration sets: users have pictures, not IDX files. Every image is converted
//! to the model's input shape (grey or RGB, resized with a triangle filter when its size
//! differs) so it goes through the same preprocessing as the training data.

use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use sha2::{Digest, Sha256};

use super::Split;
use crate::io::FileRecord;
use crate::{Error, Result};

fn is_image(path: &Path) -> bool {
    matches!(
        path.extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("png" | "jpg" | "jpeg")
    )
}

/// Image files under `dir` (flat, or one level of class folders), sorted, with their
/// class index (the sorted sub-folder's position; 0 for a flat folder).
fn list(dir: &Path) -> Result<Vec<(PathBuf, u8)>> {
    let read = |d: &Path| -> Result<Vec<PathBuf>> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(d)
            .map_err(|e| Error::io("read folder", d, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        paths.sort();
        Ok(paths)
    };
    let entries = read(dir)?;
    let mut files: Vec<(PathBuf, u8)> = entries
        .iter()
        .filter(|p| p.is_file() && is_image(p))
        .map(|p| (p.clone(), 0))
        .collect();
    let classes: Vec<&PathBuf> = entries.iter().filter(|p| p.is_dir()).collect();
    for (class, sub) in classes.iter().enumerate() {
        for p in read(sub)? {
            if p.is_file() && is_image(&p) {
                files.push((p, class.min(255) as u8));
            }
        }
    }
    Ok(files)
}

/// True when `dir` holds PNG/JPEG images (directly or in class folders).
pub fn looks_like_image_folder(dir: &Path) -> bool {
    list(dir).is_ok_and(|f| !f.is_empty())
}

/// Loads every image of `dir`, converted to `shape` (`[h, w, c]`, c = 1 or 3): grey or
/// RGB bytes, NHWC, resized (triangle filter) when an image's size differs. Labels are
/// the sorted class sub-folder's index, 0 for images directly in `dir`.
///
/// # Errors
/// - [`Error::Data`] when `c` is not 1 or 3, `dir` holds no PNG or JPEG image, or an
///   image cannot be decoded (naming it).
/// - [`Error::Io`] when `dir`, a class folder or an image cannot be read.
pub fn load_image_folder(dir: &Path, shape: [usize; 3]) -> Result<Split> {
    let c = shape[2];
    if c != 1 && c != 3 {
        return Err(Error::data(
            dir,
            format!("images can feed models with 1 or 3 input channels, this one has {c}"),
        ));
    }
    let files = list(dir)?;
    if files.is_empty() {
        return Err(Error::data(
            dir,
            "no PNG or JPEG images found (flat, or in one sub-folder per class)",
        ));
    }
    let mut split = decode_images(&files, shape)?;
    split.files[0].path = dir.display().to_string();
    Ok(split)
}

/// Loads image files (PNG/JPEG, in the given order) converted to `shape` as
/// [`load_image_folder`] does; labels are 0.
///
/// # Errors
/// - [`Error::Data`] when `c` is not 1 or 3, there are no files, or an image cannot be
///   decoded (naming it).
/// - [`Error::Io`] when a file cannot be read.
pub fn load_image_files(paths: &[PathBuf], shape: [usize; 3]) -> Result<Split> {
    let c = shape[2];
    if c != 1 && c != 3 {
        return Err(Error::data(
            paths.first().map_or(Path::new("."), PathBuf::as_path),
            format!("images can feed models with 1 or 3 input channels, this one has {c}"),
        ));
    }
    if paths.is_empty() {
        return Err(Error::Config("no image files given".into()));
    }
    let files: Vec<(PathBuf, u8)> = paths.iter().map(|p| (p.clone(), 0)).collect();
    let mut split = decode_images(&files, shape)?;
    split.files = paths
        .iter()
        .map(|p| crate::io::FileRecord::of(p))
        .collect::<Result<_>>()?;
    Ok(split)
}

/// Largest image side decoded, in pixels, and most memory one decode may allocate: the
/// image's header is checked against them before its pixels are allocated (a 1 KB PNG
/// can claim 100,000 x 100,000 pixels).
pub const MAX_IMAGE_SIDE: u32 = 8192;

/// See [`MAX_IMAGE_SIDE`]: 256 MiB.
pub const MAX_IMAGE_ALLOC: u64 = 256 << 20;

/// One PNG/JPEG (any format the `image` crate reads with our features) as `shape`'s
/// pixel bytes, HWC: grey (`c == 1`) or RGB (`c == 3`), resized with a triangle filter
/// when its size differs. The same conversion for `--calib` folders, `predict` files and
/// the server's `b64` instances.
///
/// # Errors
/// The decoder's message when the bytes are not an image of a known format, or the
/// image is larger than [`MAX_IMAGE_SIDE`] / [`MAX_IMAGE_ALLOC`].
pub fn decode_image(bytes: &[u8], shape: [usize; 3]) -> std::result::Result<Vec<u8>, String> {
    let [h, w, c] = shape;
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| e.to_string())?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_IMAGE_ALLOC);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| e.to_string())?;
    let img = if img.width() as usize != w || img.height() as usize != h {
        img.resize_exact(w as u32, h as u32, FilterType::Triangle)
    } else {
        img
    };
    Ok(if c == 1 {
        img.to_luma8().into_raw()
    } else {
        img.to_rgb8().into_raw()
    })
}

/// Decodes `files` (path, label) into a split of `shape`; one record for all of them.
fn decode_images(files: &[(PathBuf, u8)], shape: [usize; 3]) -> Result<Split> {
    let [h, w, c] = shape;
    let mut images = Vec::with_capacity(files.len() * h * w * c);
    let mut labels = Vec::with_capacity(files.len());
    let mut hasher = Sha256::new();
    let mut total_bytes = 0u64;
    for (path, label) in files {
        let bytes = std::fs::read(path).map_err(|e| Error::io("read", path, e))?;
        hasher.update(&bytes);
        total_bytes += bytes.len() as u64;
        let pixels = decode_image(&bytes, shape)
            .map_err(|e| Error::data(path, format!("unreadable image: {e}")))?;
        images.extend_from_slice(&pixels);
        labels.push(*label);
    }
    // One record for all of them: total size and the sha256 of all images in order.
    let digest = hasher.finalize();
    Ok(Split {
        images,
        labels,
        count: files.len(),
        shape,
        files: vec![FileRecord {
            path: String::new(),
            bytes: total_bytes,
            sha256: crate::io::hex(&digest),
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_and_resizes_a_class_folder() {
        let dir = tempfile::tempdir().unwrap();
        for (class, value) in [("a", 10u8), ("b", 200u8)] {
            std::fs::create_dir_all(dir.path().join(class)).unwrap();
            image::GrayImage::from_pixel(56, 56, image::Luma([value]))
                .save(dir.path().join(class).join("x.png"))
                .unwrap();
        }
        let split = load_image_folder(dir.path(), [28, 28, 1]).unwrap();
        assert_eq!(split.count, 2);
        assert_eq!(split.labels, vec![0, 1]);
        assert_eq!(split.images.len(), 2 * 784);
        assert_eq!(split.images[0], 10);
        assert_eq!(split.images[784], 200);
    }

    #[test]
    fn empty_and_unreadable_folders_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_image_folder(dir.path(), [28, 28, 1])
            .unwrap_err()
            .to_string();
        assert!(err.contains("no PNG or JPEG"), "{err}");
        std::fs::write(dir.path().join("bad.png"), b"not a png").unwrap();
        let err = load_image_folder(dir.path(), [28, 28, 1])
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad.png"), "{err}");
    }
}
