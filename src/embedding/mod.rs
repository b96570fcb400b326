//! Text embeddings: a provider trait with two real implementations (local
//! all-MiniLM-L6-v2 on candle, an OpenAI-compatible HTTP endpoint), a
//! micro-batcher that turns concurrent writes into one model call, and two
//! cache tiers keyed by SHA-256 of (model, text): in-process (L1), then
//! optionally Redis, shared by every replica (L2).
pub mod batcher;
pub mod cache;
pub mod local;
pub mod openai;
pub mod redis_cache;

use std::sync::Arc;

use async_trait::async_trait;

use self::{
    batcher::MicroBatcher,
    cache::{CacheKey, EmbeddingCache, SharedEmbeddingCache},
};
use crate::{
    config::{EmbeddingSettings, ProviderKind},
    metrics::EMBEDDING_CACHE,
};

#[derive(Debug, Clone, thiserror::Error)]
pub enum EmbeddingError {
    /// The provider cannot answer now (connection refused, timeout, 5xx, overload).
    #[error("embedding provider unavailable: {0}")]
    Unavailable(String),
    /// The provider answered with something unusable (wrong dimension, bad JSON).
    #[error("embedding provider answered badly: {0}")]
    InvalidResponse(String),
    /// The local model failed to run.
    #[error("embedding model failed: {0}")]
    Model(String),
}

/// Something that turns texts into vectors of one model.
#[async_trait]
pub trait EmbeddingProvider: Send + Sync + 'static {
    /// The name the model is registered under; embeddings are stored per model.
    fn model_name(&self) -> &str;
    fn dimensions(&self) -> usize;
    /// One vector per text, in order, each L2-normalised.
    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbeddingError>;
}

/// A vector and whether it came out of the cache.
#[derive(Debug, Clone)]
pub struct Embedded {
    pub vector: Arc<[f32]>,
    pub from_cache: bool,
}

/// The write path's view of embeddings: the in-process cache, then the shared
/// one if any, then the micro-batched provider.
pub struct Embedder {
    model_name: String,
    dimensions: usize,
    batcher: MicroBatcher,
    cache: EmbeddingCache,
    shared_cache: Option<Arc<dyn SharedEmbeddingCache>>,
}

impl Embedder {
    pub fn new(provider: Arc<dyn EmbeddingProvider>, settings: &EmbeddingSettings) -> Self {
        Embedder {
            model_name: provider.model_name().to_owned(),
            dimensions: provider.dimensions(),
            batcher: MicroBatcher::spawn(
                provider,
                settings.batch_max_size,
                std::time::Duration::from_millis(settings.batch_window_ms),
            ),
            cache: EmbeddingCache::new(settings.cache_capacity),
            shared_cache: None,
        }
    }

    /// Puts `shared_cache` (Redis, when configured) between the in-process
    /// cache and the provider: asked on a local miss, and given every vector
    /// the provider makes.
    pub fn with_shared_cache(mut self, shared_cache: Option<Arc<dyn SharedEmbeddingCache>>) -> Self {
        self.shared_cache = shared_cache;
        self
    }

    pub fn model_name(&self) -> &str {
        &self.model_name
    }

    pub fn dimensions(&self) -> usize {
        self.dimensions
    }

    /// Embeds every text or none: a provider failure fails the whole set, so
    /// the caller applies its failure policy to the request as a unit.
    #[tracing::instrument(
        name = "embedding",
        skip_all,
        fields(
            texts = texts.len(),
            cache.hit = tracing::field::Empty,
            cache.l1_hits = tracing::field::Empty,
            cache.l2_hits = tracing::field::Empty,
            generated = tracing::field::Empty,
        )
    )]
    pub async fn embed_all(&self, texts: &[String]) -> Result<Vec<Embedded>, EmbeddingError> {
        let keys: Vec<_> = texts.iter().map(|t| self.cache.key(&self.model_name, t)).collect();
        let mut results: Vec<Option<Embedded>> = Vec::with_capacity(texts.len());
        let mut misses = Vec::new();
        for (index, key) in keys.iter().enumerate() {
            match self.cache.get(key).await {
                Some(vector) => results.push(Some(Embedded {
                    vector,
                    from_cache: true,
                })),
                None => {
                    results.push(None);
                    misses.push(index);
                }
            }
        }
        let l1_hits = texts.len() - misses.len();
        count_cache_lookups("l1", l1_hits, misses.len());
        if let Some(shared_cache) = self.shared_cache.as_deref().filter(|_| !misses.is_empty()) {
            let asked = misses.len();
            misses = self
                .fill_from_shared_cache(shared_cache, &keys, misses, &mut results)
                .await;
            count_cache_lookups("l2", asked - misses.len(), misses.len());
        }
        let span = tracing::Span::current();
        span.record("cache.hit", misses.is_empty());
        span.record("cache.l1_hits", l1_hits);
        span.record("cache.l2_hits", texts.len() - l1_hits - misses.len());
        span.record("generated", misses.len());
        if !misses.is_empty() {
            let miss_texts: Vec<String> = misses.iter().map(|&i| texts[i].clone()).collect();
            let vectors = self.batcher.embed(miss_texts).await?;
            let mut fresh = Vec::with_capacity(vectors.len());
            for (index, vector) in misses.into_iter().zip(vectors) {
                if vector.len() != self.dimensions {
                    return Err(EmbeddingError::InvalidResponse(format!(
                        "expected {} dimensions, got {}",
                        self.dimensions,
                        vector.len()
                    )));
                }
                let vector: Arc<[f32]> = vector.into();
                self.cache.insert(keys[index], vector.clone()).await;
                fresh.push((keys[index], vector.clone()));
                results[index] = Some(Embedded {
                    vector,
                    from_cache: false,
                });
            }
            if let Some(shared_cache) = &self.shared_cache {
                shared_cache.put_many(fresh);
            }
        }
        Ok(results.into_iter().map(|r| r.expect("every text resolved")).collect())
    }

    /// Resolves what it can of `misses` (indexes into `keys` and `results`)
    /// from the shared cache, keeping hits in the in-process one too, and
    /// returns the misses left for the provider.
    async fn fill_from_shared_cache(
        &self,
        shared_cache: &dyn SharedEmbeddingCache,
        keys: &[CacheKey],
        misses: Vec<usize>,
        results: &mut [Option<Embedded>],
    ) -> Vec<usize> {
        let miss_keys: Vec<CacheKey> = misses.iter().map(|&index| keys[index]).collect();
        let found = shared_cache.get_many(&miss_keys).await;
        let mut still_missing = Vec::new();
        for (index, vector) in misses.into_iter().zip(found) {
            // A vector of another length is not this model's: ask the provider.
            match vector.filter(|vector| vector.len() == self.dimensions) {
                Some(vector) => {
                    self.cache.insert(keys[index], vector.clone()).await;
                    results[index] = Some(Embedded {
                        vector,
                        from_cache: true,
                    });
                }
                None => still_missing.push(index),
            }
        }
        still_missing
    }
}

fn count_cache_lookups(tier: &'static str, hits: usize, misses: usize) {
    if hits > 0 {
        metrics::counter!(EMBEDDING_CACHE, "tier" => tier, "result" => "hit").increment(hits as u64);
    }
    if misses > 0 {
        metrics::counter!(EMBEDDING_CACHE, "tier" => tier, "result" => "miss").increment(misses as u64);
    }
}

/// Builds the configured provider. Loading the local model reads ~90 MB; do it once per process.
pub fn provider_from_settings(settings: &EmbeddingSettings) -> anyhow::Result<Arc<dyn EmbeddingProvider>> {
    Ok(match settings.provider {
        ProviderKind::Local => Arc::new(local::LocalMiniLm::load(&settings.model_dir, &settings.model_name)?),
        ProviderKind::Openai => Arc::new(openai::OpenAiEmbedder::new(settings.openai.clone())?),
    })
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashMap,
        sync::{
            atomic::{AtomicUsize, Ordering},
            Mutex,
        },
    };

    use super::*;

    const MODEL: &str = "fake";

    /// Three dimensions derived from the text, counting the texts it embeds.
    #[derive(Default)]
    struct FakeProvider {
        texts_embedded: AtomicUsize,
    }

    #[async_trait]
    impl EmbeddingProvider for FakeProvider {
        fn model_name(&self) -> &str {
            MODEL
        }

        fn dimensions(&self) -> usize {
            3
        }

        async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbeddingError> {
            self.texts_embedded.fetch_add(texts.len(), Ordering::SeqCst);
            Ok(texts.iter().map(|text| vec![text.len() as f32, 1.0, 0.0]).collect())
        }
    }

    #[derive(Default)]
    struct MapCache {
        entries: Mutex<HashMap<CacheKey, Arc<[f32]>>>,
        lookups: AtomicUsize,
    }

    #[async_trait]
    impl SharedEmbeddingCache for MapCache {
        async fn get_many(&self, keys: &[CacheKey]) -> Vec<Option<Arc<[f32]>>> {
            self.lookups.fetch_add(keys.len(), Ordering::SeqCst);
            let entries = self.entries.lock().unwrap();
            keys.iter().map(|key| entries.get(key).cloned()).collect()
        }

        fn put_many(&self, entries: Vec<(CacheKey, Arc<[f32]>)>) {
            self.entries.lock().unwrap().extend(entries);
        }
    }

    fn key(text: &str) -> CacheKey {
        EmbeddingCache::new(1).key(MODEL, text)
    }

    fn embedder(provider: &Arc<FakeProvider>, shared_cache: &Arc<MapCache>) -> Embedder {
        let settings = crate::config::Settings::default().embedding;
        Embedder::new(provider.clone(), &settings).with_shared_cache(Some(shared_cache.clone()))
    }

    #[tokio::test]
    async fn a_local_miss_is_served_by_the_shared_cache_and_kept_locally() {
        let (provider, shared_cache) = (Arc::new(FakeProvider::default()), Arc::new(MapCache::default()));
        let stored: Arc<[f32]> = vec![9.0, 9.0, 9.0].into();
        shared_cache.put_many(vec![(key("known"), stored.clone())]);
        let embedder = embedder(&provider, &shared_cache);

        for _ in 0..2 {
            let embedded = embedder.embed_all(&["known".into()]).await.unwrap();
            assert!(embedded[0].from_cache);
            assert_eq!(embedded[0].vector, stored);
        }
        assert_eq!(provider.texts_embedded.load(Ordering::SeqCst), 0);
        assert_eq!(shared_cache.lookups.load(Ordering::SeqCst), 1, "the second call hit L1");
    }

    #[tokio::test]
    async fn provider_vectors_go_to_the_shared_cache_and_only_misses_reach_the_provider() {
        let (provider, shared_cache) = (Arc::new(FakeProvider::default()), Arc::new(MapCache::default()));
        shared_cache.put_many(vec![(key("known"), vec![9.0, 9.0, 9.0].into())]);
        let embedder = embedder(&provider, &shared_cache);

        let embedded = embedder.embed_all(&["known".into(), "new".into()]).await.unwrap();

        assert_eq!(provider.texts_embedded.load(Ordering::SeqCst), 1);
        assert!(embedded[0].from_cache && !embedded[1].from_cache);
        let stored = shared_cache.entries.lock().unwrap().get(&key("new")).cloned();
        assert_eq!(stored, Some(embedded[1].vector.clone()));
    }

    #[tokio::test]
    async fn a_shared_entry_of_another_length_is_a_miss() {
        let (provider, shared_cache) = (Arc::new(FakeProvider::default()), Arc::new(MapCache::default()));
        shared_cache.put_many(vec![(key("odd"), vec![1.0, 2.0].into())]);
        let embedder = embedder(&provider, &shared_cache);

        let embedded = embedder.embed_all(&["odd".into()]).await.unwrap();

        assert!(!embedded[0].from_cache);
        assert_eq!(embedded[0].vector.len(), 3);
        assert_eq!(provider.texts_embedded.load(Ordering::SeqCst), 1);
    }
}
