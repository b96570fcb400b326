//! Text embeddings: a provider trait with two real implementations (local
//! all-MiniLM-L6-v2 on candle, an OpenAI-compatible HTTP endpoint), a
//! micro-batcher that turns concurrent writes into one model call, and an
//! in-process cache keyed by SHA-256 of (model, text).
pub mod batcher;
pub mod cache;
pub mod local;
pub mod openai;

use std::sync::Arc;

use async_trait::async_trait;

use self::{batcher::MicroBatcher, cache::EmbeddingCache};
use crate::config::{EmbeddingSettings, ProviderKind};

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

/// The write path's view of embeddings: cache first, then the micro-batched provider.
pub struct Embedder {
    model_name: String,
    dimensions: usize,
    batcher: MicroBatcher,
    cache: EmbeddingCache,
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
        }
    }

    pub fn model_name(&self) -> &str {
        &self.model_name
    }

    pub fn dimensions(&self) -> usize {
        self.dimensions
    }

    /// Embeds every text or none: a provider failure fails the whole set, so
    /// the caller applies its failure policy to the request as a unit.
    #[tracing::instrument(skip_all, fields(texts = texts.len()))]
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
        if !misses.is_empty() {
            let miss_texts: Vec<String> = misses.iter().map(|&i| texts[i].clone()).collect();
            let vectors = self.batcher.embed(miss_texts).await?;
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
                results[index] = Some(Embedded {
                    vector,
                    from_cache: false,
                });
            }
        }
        Ok(results.into_iter().map(|r| r.expect("every text resolved")).collect())
    }
}

/// Builds the configured provider. Loading the local model reads ~90 MB; do it once per process.
pub fn provider_from_settings(settings: &EmbeddingSettings) -> anyhow::Result<Arc<dyn EmbeddingProvider>> {
    Ok(match settings.provider {
        ProviderKind::Local => Arc::new(local::LocalMiniLm::load(&settings.model_dir, &settings.model_name)?),
        ProviderKind::Openai => Arc::new(openai::OpenAiEmbedder::new(settings.openai.clone())?),
    })
}
