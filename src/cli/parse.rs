//! Value parsers for numeric flags: every number a user types is checked against a range
//! at parse time (clap prints `error: invalid value 'X' for '--flag': ...` and exits 2),
//! so no command meets a NaN, an infinity, a zero count or a size that would be
//! allocated unchecked (issue 10: `bench --duration inf` panicked, `--iters 0` silently ran
//! one sample, `--duration NaN` was accepted).

use std::fmt::Display;
use std::str::FromStr;

/// Largest batch a flag may ask for (images per step or per forward pass).
pub(crate) const MAX_BATCH: usize = mlops::model::MAX_BATCH;

/// Longest time a timing flag may ask for, in seconds (one hour).
pub(crate) const MAX_SECONDS: f64 = mlops::bench::MAX_SECONDS;

fn number<T: FromStr>(text: &str) -> Result<T, String>
where
    T::Err: Display,
{
    text.trim()
        .parse::<T>()
        .map_err(|e| format!("`{text}` is not a number ({e})"))
}

fn integer_in(text: &str, lo: usize, hi: usize) -> Result<usize, String> {
    let n: usize = number(text)?;
    if (lo..=hi).contains(&n) {
        Ok(n)
    } else {
        Err(format!("must be in {lo}..={hi}"))
    }
}

/// A finite float in `[lo, hi]` (or `[lo, hi)` when `open_hi`).
fn float_in(text: &str, lo: f64, hi: f64, open_hi: bool) -> Result<f64, String> {
    let x: f64 = number(text)?;
    let inside = x.is_finite() && x >= lo && if open_hi { x < hi } else { x <= hi };
    if inside {
        Ok(x)
    } else {
        Err(format!(
            "must be a finite number in [{lo}, {hi}{}",
            if open_hi { ")" } else { "]" }
        ))
    }
}

/// A count of at least 1 (epochs, iterations, repeats, samples ...), at most 10^9.
pub(crate) fn at_least_one(text: &str) -> Result<usize, String> {
    integer_in(text, 1, 1_000_000_000)
}

/// A count that may be 0 (warm-up iterations), at most 10^9.
pub(crate) fn count(text: &str) -> Result<usize, String> {
    integer_in(text, 0, 1_000_000_000)
}

/// Images per step or forward pass: 1 to [`MAX_BATCH`].
pub(crate) fn batch(text: &str) -> Result<usize, String> {
    integer_in(text, 1, MAX_BATCH)
}

/// Worker threads: 1 to 1024.
pub(crate) fn threads(text: &str) -> Result<usize, String> {
    integer_in(text, 1, 1024)
}

/// A step count of at least 1 (pruning frequency).
pub(crate) fn steps(text: &str) -> Result<u64, String> {
    Ok(at_least_one(text)? as u64)
}

/// A fraction in `[0, 1]` (accuracies).
pub(crate) fn fraction(text: &str) -> Result<f64, String> {
    float_in(text, 0.0, 1.0, false)
}

/// An accuracy drop in `[-1, 1]` (`--max-accuracy-drop`; a negative bound asks for a gain).
pub(crate) fn accuracy_drop(text: &str) -> Result<f64, String> {
    float_in(text, -1.0, 1.0, false)
}

/// A fraction in `[0, 1)` (sparsity, regressions).
pub(crate) fn fraction_below_one(text: &str) -> Result<f64, String> {
    float_in(text, 0.0, 1.0, true)
}

/// A finite number in `(0, hi]`.
fn positive_up_to(text: &str, hi: f64) -> Result<f32, String> {
    match float_in(text, 0.0, hi, false) {
        Ok(x) if x > 0.0 => Ok(x as f32),
        _ => Err(format!("must be a finite number in (0, {hi}]")),
    }
}

/// A share in `(0, 1]` (structured pruning's old `--keep`).
pub(crate) fn share(text: &str) -> Result<f32, String> {
    positive_up_to(text, 1.0)
}

/// A sparsity in `[0, 1)`.
pub(crate) fn sparsity(text: &str) -> Result<f32, String> {
    Ok(fraction_below_one(text)? as f32)
}

/// A learning rate: finite, in `(0, 10]`.
pub(crate) fn learning_rate(text: &str) -> Result<f32, String> {
    positive_up_to(text, 10.0)
}

/// A polynomial exponent: finite, in `(0, 100]`.
pub(crate) fn exponent(text: &str) -> Result<f32, String> {
    positive_up_to(text, 100.0)
}

/// A percentile kept by calibration: `[50, 100)`.
pub(crate) fn percentile(text: &str) -> Result<f32, String> {
    Ok(float_in(text, 50.0, 100.0, true)? as f32)
}

/// An input-mapping scale or mean: finite, magnitude at most 10^6.
pub(crate) fn finite(text: &str) -> Result<f32, String> {
    Ok(float_in(text, -1e6, 1e6, false)? as f32)
}

/// An input-mapping std: finite, in `(0, 10^6]`.
pub(crate) fn positive(text: &str) -> Result<f32, String> {
    positive_up_to(text, 1e6)
}

/// A duration in seconds that may be 0 (warm-up), finite, at most [`MAX_SECONDS`].
pub(crate) fn seconds_or_zero(text: &str) -> Result<f64, String> {
    float_in(text, 0.0, MAX_SECONDS, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 10: `inf`, `1e300`, `NaN` and 0 were accepted (and panicked or ran silently).
    #[test]
    fn numbers_out_of_range_are_refused_with_the_range() {
        for bad in ["inf", "1e300", "NaN", "-1", "x"] {
            assert!(seconds_or_zero(bad).is_err(), "{bad}");
        }
        assert!(seconds_or_zero("0.5").is_ok());
        assert!(seconds_or_zero("0").is_ok());
        assert!(at_least_one("0").unwrap_err().contains("1..="));
        assert!(batch("70000").is_err());
        assert!(sparsity("1").is_err());
        assert!(sparsity("0.5").is_ok());
        assert!(learning_rate("NaN").is_err());
        assert!(share("0").is_err());
        assert!(fraction("1.5").is_err());
    }
}
