//! Client for an OpenAI-compatible `POST {base_url}/v1/embeddings` endpoint
//! (OpenAI, vLLM, Ollama, text-embeddings-inference). Transient failures —
//! connection errors, timeouts, 429 and 5xx — are retried with exponential
//! backoff; anything else fails at once.
use std::time::Duration;

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::{EmbeddingError, EmbeddingProvider};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAiSettings {
    /// e.g. `https://api.openai.com`; `/v1/embeddings` is appended.
    pub base_url: String,
    /// The provider's model name; also the name embeddings are stored under.
    pub model: String,
    #[serde(serialize_with = "serialize_optional_secret")]
    pub api_key: Option<SecretString>,
    /// Dimension of the returned vectors; answers of another size are refused.
    pub dimensions: usize,
    /// Send `dimensions` in the request (models that can shorten their output).
    pub request_dimensions: bool,
    /// Per attempt.
    pub timeout_ms: u64,
    pub max_retries: u32,
    pub initial_backoff_ms: u64,
}

fn serialize_optional_secret<S: serde::Serializer>(value: &Option<SecretString>, s: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(secret) => crate::config::serialize_secret(secret, s),
        None => s.serialize_none(),
    }
}

impl Default for OpenAiSettings {
    fn default() -> Self {
        OpenAiSettings {
            base_url: String::new(),
            model: String::new(),
            api_key: None,
            dimensions: 0,
            request_dimensions: false,
            timeout_ms: 10_000,
            max_retries: 3,
            initial_backoff_ms: 100,
        }
    }
}

impl OpenAiSettings {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.base_url.starts_with("http://") || self.base_url.starts_with("https://"),
            "embedding.openai.base_url must be an http(s) URL"
        );
        anyhow::ensure!(!self.model.is_empty(), "embedding.openai.model must be set");
        anyhow::ensure!(
            (1..=16_000).contains(&self.dimensions),
            "embedding.openai.dimensions must be within 1..=16000"
        );
        anyhow::ensure!(self.timeout_ms >= 1, "embedding.openai.timeout_ms must be positive");
        Ok(())
    }
}

pub struct OpenAiEmbedder {
    client: reqwest::Client,
    endpoint: String,
    settings: OpenAiSettings,
}

#[derive(Serialize)]
struct EmbeddingsRequest<'a> {
    model: &'a str,
    input: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    dimensions: Option<usize>,
}

#[derive(Deserialize)]
struct EmbeddingsResponse {
    data: Vec<EmbeddingData>,
}

#[derive(Deserialize)]
struct EmbeddingData {
    index: usize,
    embedding: Vec<f32>,
}

enum Attempt {
    Retry(EmbeddingError),
    Fail(EmbeddingError),
}

impl OpenAiEmbedder {
    pub fn new(settings: OpenAiSettings) -> anyhow::Result<Self> {
        settings.validate()?;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(settings.timeout_ms))
            .build()?;
        let endpoint = format!("{}/v1/embeddings", settings.base_url.trim_end_matches('/'));
        Ok(OpenAiEmbedder {
            client,
            endpoint,
            settings,
        })
    }

    async fn attempt(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, Attempt> {
        let mut request = self.client.post(&self.endpoint).json(&EmbeddingsRequest {
            model: &self.settings.model,
            input: texts,
            dimensions: self.settings.request_dimensions.then_some(self.settings.dimensions),
        });
        if let Some(key) = &self.settings.api_key {
            request = request.bearer_auth(key.expose_secret());
        }
        let response = request
            .send()
            .await
            .map_err(|e| Attempt::Retry(EmbeddingError::Unavailable(without_url(e).to_string())))?;
        let status = response.status();
        if status == reqwest::StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            return Err(Attempt::Retry(EmbeddingError::Unavailable(format!("HTTP {status}"))));
        }
        if !status.is_success() {
            return Err(Attempt::Fail(EmbeddingError::InvalidResponse(format!("HTTP {status}"))));
        }
        let body: EmbeddingsResponse = response
            .json()
            .await
            .map_err(|e| Attempt::Fail(EmbeddingError::InvalidResponse(without_url(e).to_string())))?;
        self.vectors_from(texts.len(), body).map_err(Attempt::Fail)
    }

    fn vectors_from(&self, expected: usize, body: EmbeddingsResponse) -> Result<Vec<Vec<f32>>, EmbeddingError> {
        let mut vectors = vec![None; expected];
        for item in body.data {
            if item.embedding.len() != self.settings.dimensions {
                return Err(EmbeddingError::InvalidResponse(format!(
                    "expected {} dimensions, got {}",
                    self.settings.dimensions,
                    item.embedding.len()
                )));
            }
            let slot = vectors
                .get_mut(item.index)
                .ok_or_else(|| EmbeddingError::InvalidResponse(format!("index {} out of range", item.index)))?;
            *slot = Some(normalise(item.embedding));
        }
        vectors
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| EmbeddingError::InvalidResponse("missing embeddings in the answer".into()))
    }
}

/// Cosine search assumes unit vectors; providers that do not normalise get normalised here.
fn normalise(mut vector: Vec<f32>) -> Vec<f32> {
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        vector.iter_mut().for_each(|x| *x /= norm);
    }
    vector
}

/// reqwest errors print the URL, which may carry credentials in its query.
fn without_url(error: reqwest::Error) -> reqwest::Error {
    error.without_url()
}

#[async_trait]
impl EmbeddingProvider for OpenAiEmbedder {
    fn model_name(&self) -> &str {
        &self.settings.model
    }

    fn dimensions(&self) -> usize {
        self.settings.dimensions
    }

    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbeddingError> {
        let mut backoff = Duration::from_millis(self.settings.initial_backoff_ms);
        let mut attempt = 0;
        loop {
            match self.attempt(texts).await {
                Ok(vectors) => return Ok(vectors),
                Err(Attempt::Fail(error)) => return Err(error),
                Err(Attempt::Retry(error)) if attempt >= self.settings.max_retries => return Err(error),
                Err(Attempt::Retry(error)) => {
                    tracing::warn!(%error, attempt, "embedding request failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    attempt += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    };

    use axum::{extract::State, http::StatusCode, routing::post, Json, Router};

    use super::*;

    /// A real HTTP server on loopback that fails the first `failures` calls with 503.
    async fn serve_embeddings(failures: usize) -> (String, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let app = Router::new()
            .route(
                "/v1/embeddings",
                post(
                    |State((calls, failures)): State<(Arc<AtomicUsize>, usize)>,
                     Json(body): Json<serde_json::Value>| async move {
                        let n = calls.fetch_add(1, Ordering::SeqCst);
                        if n < failures {
                            return Err(StatusCode::SERVICE_UNAVAILABLE);
                        }
                        let inputs = body["input"].as_array().cloned().unwrap_or_default();
                        let data: Vec<_> = inputs
                            .iter()
                            .enumerate()
                            .rev()
                            .map(|(i, _)| serde_json::json!({"index": i, "embedding": [3.0, 4.0]}))
                            .collect();
                        Ok(Json(serde_json::json!({ "data": data })))
                    },
                ),
            )
            .with_state((calls.clone(), failures));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (format!("http://{address}"), calls)
    }

    fn settings(base_url: String, max_retries: u32) -> OpenAiSettings {
        OpenAiSettings {
            base_url,
            model: "test-model".into(),
            dimensions: 2,
            max_retries,
            initial_backoff_ms: 1,
            ..OpenAiSettings::default()
        }
    }

    #[tokio::test]
    async fn retries_transient_failures_and_orders_by_index() {
        let (url, calls) = serve_embeddings(2).await;
        let embedder = OpenAiEmbedder::new(settings(url, 3)).unwrap();
        let vectors = embedder.embed(&["a".into(), "b".into()]).await.unwrap();
        assert_eq!(vectors, vec![vec![0.6, 0.8], vec![0.6, 0.8]]);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn gives_up_after_max_retries_as_unavailable() {
        let (url, calls) = serve_embeddings(usize::MAX).await;
        let embedder = OpenAiEmbedder::new(settings(url, 2)).unwrap();
        let error = embedder.embed(&["a".into()]).await.unwrap_err();
        assert!(matches!(error, EmbeddingError::Unavailable(_)), "{error:?}");
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn refuses_vectors_of_the_wrong_dimension() {
        let (url, _) = serve_embeddings(0).await;
        let mut s = settings(url, 0);
        s.dimensions = 3;
        let error = OpenAiEmbedder::new(s).unwrap().embed(&["a".into()]).await.unwrap_err();
        assert!(matches!(error, EmbeddingError::InvalidResponse(_)), "{error:?}");
    }
}
