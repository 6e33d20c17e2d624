//! The prediction cache: logits of recently seen images, keyed by a hash of the input.
//!
//! Clients often send the same image again (retries, fan-out from several services, a
//! fixed test image in a health probe). A hit skips the forward pass and the batching
//! wait. Keys are SHA-256 of the preprocessed input's bytes, so equal inputs hit and a
//! collision is not a practical concern; eviction is least-recently-used (the `lru`
//! crate).

use std::num::NonZeroUsize;
use std::sync::Mutex;

use lru::LruCache;
use sha2::{Digest, Sha256};

/// A cache key: SHA-256 of one image's input values.
pub type Key = [u8; 32];

/// Up to `capacity` images' logits, least recently used evicted first.
pub struct PredictionCache {
    entries: Mutex<LruCache<Key, Vec<f32>>>,
}

impl PredictionCache {
    /// A cache of `capacity` images; `None` when `capacity` is 0 (caching off).
    pub fn new(capacity: usize) -> Option<Self> {
        NonZeroUsize::new(capacity).map(|c| PredictionCache {
            entries: Mutex::new(LruCache::new(c)),
        })
    }

    /// The key of one image's input values.
    pub fn key(image: &[f32]) -> Key {
        let mut hasher = Sha256::new();
        for v in image {
            hasher.update(v.to_le_bytes());
        }
        hasher.finalize().into()
    }

    /// The cached logits of `key`, if present (and marks them recently used).
    pub fn get(&self, key: &Key) -> Option<Vec<f32>> {
        self.lock().get(key).cloned()
    }

    /// Stores one image's logits.
    pub fn put(&self, key: Key, logits: Vec<f32>) {
        self.lock().put(key, logits);
    }

    /// Images currently cached.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LruCache<Key, Vec<f32>>> {
        // A panic while holding the lock cannot leave the LRU half-updated in a way that
        // matters (worst case a lost entry), so a poisoned lock is still used.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hits_equal_inputs_and_evicts_the_least_recent() {
        assert!(PredictionCache::new(0).is_none());
        let cache = PredictionCache::new(2).unwrap();
        let (a, b, c) = (
            PredictionCache::key(&[0.0, 1.0]),
            PredictionCache::key(&[1.0, 0.0]),
            PredictionCache::key(&[0.5, 0.5]),
        );
        assert_ne!(a, b);
        assert_eq!(a, PredictionCache::key(&[0.0, 1.0]));
        cache.put(a, vec![1.0]);
        cache.put(b, vec![2.0]);
        assert_eq!(cache.get(&a), Some(vec![1.0])); // a is now the most recent
        cache.put(c, vec![3.0]); // evicts b
        assert_eq!(cache.get(&b), None);
        assert_eq!(cache.get(&a), Some(vec![1.0]));
        assert_eq!(cache.len(), 2);
    }
}
