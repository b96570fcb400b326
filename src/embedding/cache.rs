//! In-process (L1) embedding cache, and the trait of the shared (L2) cache
//! behind it. Keys are SHA-256 of (model, text) so no cache ever holds the
//! texts themselves and two models never share entries.
use std::sync::Arc;

use async_trait::async_trait;
use sha2::{Digest, Sha256};

pub type CacheKey = [u8; 32];

/// A cache shared by every replica, asked when the in-process one misses.
/// It only saves model calls, so it never fails an embedding nor slows one
/// down: when unreachable it answers misses and drops writes.
#[async_trait]
pub trait SharedEmbeddingCache: Send + Sync + 'static {
    /// Exactly one answer per key, in order; None for a miss.
    async fn get_many(&self, keys: &[CacheKey]) -> Vec<Option<Arc<[f32]>>>;
    /// Stores the entries in the background and returns at once.
    fn put_many(&self, entries: Vec<(CacheKey, Arc<[f32]>)>);
}

pub struct EmbeddingCache {
    entries: moka::future::Cache<CacheKey, Arc<[f32]>>,
}

impl EmbeddingCache {
    pub fn new(capacity: u64) -> Self {
        EmbeddingCache {
            entries: moka::future::Cache::new(capacity),
        }
    }

    pub fn key(&self, model: &str, text: &str) -> CacheKey {
        let mut hasher = Sha256::new();
        hasher.update(model.as_bytes());
        // A separator byte that cannot occur in UTF-8 keeps ("ab","c") apart from ("a","bc").
        hasher.update([0xff]);
        hasher.update(text.as_bytes());
        hasher.finalize().into()
    }

    pub async fn get(&self, key: &CacheKey) -> Option<Arc<[f32]>> {
        self.entries.get(key).await
    }

    pub async fn insert(&self, key: CacheKey, vector: Arc<[f32]>) {
        self.entries.insert(key, vector).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_separate_models_and_text_boundaries() {
        let cache = EmbeddingCache::new(10);
        assert_ne!(cache.key("m1", "text"), cache.key("m2", "text"));
        assert_ne!(cache.key("ab", "c"), cache.key("a", "bc"));
        assert_eq!(cache.key("m", "t"), cache.key("m", "t"));
    }
}
