//! What a benchmark figure depends on: CPU model, cores, SIMD features, resource usage.

use serde::{Deserialize, Serialize};

/// The machine a benchmark ran on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    /// CPU model name (`/proc/cpuinfo`), or the architecture when unknown.
    pub cpu: String,
    /// Logical cores available to this process.
    pub cores: usize,
    /// SIMD extensions detected at run time that our kernels use.
    pub simd: Vec<String>,
    /// GPU name (CUDA runs only).
    pub gpu: Option<String>,
    /// GPU driver version (CUDA runs only).
    pub driver: Option<String>,
}

impl Machine {
    /// Describes this machine.
    pub fn detect() -> Self {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|s| s.trim().to_string())
            })
            .unwrap_or_else(|| std::env::consts::ARCH.to_string());
        Machine {
            cpu,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            simd: simd_features(),
            gpu: None,
            driver: None,
        }
    }
}

fn simd_features() -> Vec<String> {
    #[allow(unused_mut)]
    let mut found = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! check {
            ($($f:tt),*) => {$(
                if std::arch::is_x86_feature_detected!($f) {
                    found.push($f.to_string());
                }
            )*};
        }
        check!(
            "sse4.2",
            "avx",
            "avx2",
            "fma",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512vnni"
        );
    }
    found
}

/// CPU time (user + system) and peak resident memory of this process so far.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// Seconds of CPU time used by all threads.
    pub cpu_s: f64,
    /// Peak resident set size in bytes.
    pub peak_rss_bytes: u64,
}

impl Usage {
    /// Reads the current totals (zeros where the platform does not say).
    pub fn now() -> Self {
        // SAFETY: getrusage only writes into the struct we pass; all-zero is a valid rusage.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
            return Usage::default();
        }
        let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
        Usage {
            cpu_s: seconds(usage.ru_utime) + seconds(usage.ru_stime),
            // ru_maxrss is in kilobytes on Linux.
            peak_rss_bytes: usage.ru_maxrss as u64 * 1024,
        }
    }
}
