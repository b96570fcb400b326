//! The shared (L2) embedding cache against the project's Redis: an embedder
//! with an empty in-process cache is served from Redis instead of the model,
//! and an unreachable Redis is stepped around without failing or stalling.
use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use async_trait::async_trait;
use datastorage::{
    config::Settings,
    embedding::{
        cache::{EmbeddingCache, SharedEmbeddingCache},
        redis_cache::RedisEmbeddingCache,
        Embedder, EmbeddingError, EmbeddingProvider,
    },
};

use crate::{
    helpers::local_model,
    job_store::{redis_settings, redis_url, unique_prefix},
};

/// The real model, counting the texts it is asked to embed.
struct CountingProvider {
    model: Arc<dyn EmbeddingProvider>,
    texts_embedded: AtomicUsize,
}

#[async_trait]
impl EmbeddingProvider for CountingProvider {
    fn model_name(&self) -> &str {
        self.model.model_name()
    }

    fn dimensions(&self) -> usize {
        self.model.dimensions()
    }

    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbeddingError> {
        self.texts_embedded.fetch_add(texts.len(), Ordering::SeqCst);
        self.model.embed(texts).await
    }
}

fn counting_model() -> Arc<CountingProvider> {
    Arc::new(CountingProvider {
        model: local_model(),
        texts_embedded: AtomicUsize::new(0),
    })
}

/// A new embedder, so a new (empty) in-process cache, in front of `shared_cache`.
fn fresh_embedder(provider: &Arc<CountingProvider>, shared_cache: &Arc<RedisEmbeddingCache>) -> Embedder {
    let shared_cache: Arc<dyn SharedEmbeddingCache> = shared_cache.clone();
    Embedder::new(provider.clone(), &Settings::default().embedding).with_shared_cache(Some(shared_cache))
}

#[tokio::test]
async fn an_embedder_with_an_empty_local_cache_is_served_from_redis() {
    let mut settings = redis_settings(&redis_url(), &unique_prefix());
    // The entries clean themselves up.
    settings.embedding_cache_ttl_secs = 60;
    let shared_cache = Arc::new(RedisEmbeddingCache::connect(&settings).await.unwrap());
    let provider = counting_model();
    let text = "container api OOMKilled: memory limit 512Mi exceeded".to_owned();
    let key = EmbeddingCache::new(1).key(provider.model_name(), &text);

    let first = fresh_embedder(&provider, &shared_cache)
        .embed_all(std::slice::from_ref(&text))
        .await
        .unwrap();
    // The write to Redis is in the background: wait for it to land.
    let mut stored = None;
    for _ in 0..100 {
        stored = shared_cache.get_many(&[key]).await.remove(0);
        if stored.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let second = fresh_embedder(&provider, &shared_cache)
        .embed_all(&[text])
        .await
        .unwrap();

    assert!(!first[0].from_cache);
    assert_eq!(stored, Some(first[0].vector.clone()));
    assert!(second[0].from_cache);
    assert_eq!(second[0].vector, first[0].vector);
    assert_eq!(provider.texts_embedded.load(Ordering::SeqCst), 1, "the model ran once");
    assert_eq!(shared_cache.bypasses(), 0);
}

#[tokio::test]
async fn an_unreachable_redis_is_bypassed_and_counted() {
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let settings = redis_settings(&format!("redis://127.0.0.1:{dead_port}"), &unique_prefix());
    let shared_cache = Arc::new(RedisEmbeddingCache::connect(&settings).await.unwrap());
    let provider = counting_model();
    let text = "disk pressure on node worker-3".to_owned();

    let embedded = fresh_embedder(&provider, &shared_cache)
        .embed_all(std::slice::from_ref(&text))
        .await
        .unwrap();
    let looked_up = shared_cache
        .get_many(&[EmbeddingCache::new(1).key(provider.model_name(), &text)])
        .await;

    assert!(!embedded[0].from_cache);
    assert_eq!(embedded[0].vector.len(), provider.dimensions());
    assert_eq!(provider.texts_embedded.load(Ordering::SeqCst), 1);
    assert_eq!(looked_up, vec![None]);
    // The embedder's lookup and write, and the lookup above.
    assert_eq!(shared_cache.bypasses(), 3);
}
