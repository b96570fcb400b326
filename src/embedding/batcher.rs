//! Micro-batching: texts from concurrent writes queue here and one worker
//! sends them to the provider together, because a model call on 32 texts costs
//! far less than 32 calls on one. While a call runs, new texts queue up and
//! form the next batch, so batches grow with load without a long fixed wait.
use std::{sync::Arc, time::Duration};

use tokio::sync::{mpsc, oneshot};

use super::{EmbeddingError, EmbeddingProvider};
use crate::metrics::{EMBEDDING_BATCH_SIZE, EMBEDDING_SECONDS};

struct Pending {
    text: String,
    reply: oneshot::Sender<Result<Vec<f32>, EmbeddingError>>,
}

#[derive(Clone)]
pub struct MicroBatcher {
    queue: mpsc::Sender<Pending>,
}

/// Bounded so that a stalled provider pushes back on writers instead of growing memory.
const QUEUE_CAPACITY: usize = 4096;

impl MicroBatcher {
    pub fn spawn(provider: Arc<dyn EmbeddingProvider>, max_batch: usize, window: Duration) -> Self {
        let (queue, receiver) = mpsc::channel(QUEUE_CAPACITY);
        tokio::spawn(run_worker(provider, receiver, max_batch, window));
        MicroBatcher { queue }
    }

    /// Vectors for `texts`, in order.
    pub async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, EmbeddingError> {
        let mut replies = Vec::with_capacity(texts.len());
        for text in texts {
            let (reply, answer) = oneshot::channel();
            self.queue
                .send(Pending { text, reply })
                .await
                .map_err(|_| EmbeddingError::Unavailable("embedding worker stopped".into()))?;
            replies.push(answer);
        }
        let mut vectors = Vec::with_capacity(replies.len());
        for answer in replies {
            let vector = answer
                .await
                .map_err(|_| EmbeddingError::Unavailable("embedding worker stopped".into()))??;
            vectors.push(vector);
        }
        Ok(vectors)
    }
}

async fn run_worker(
    provider: Arc<dyn EmbeddingProvider>,
    mut receiver: mpsc::Receiver<Pending>,
    max_batch: usize,
    window: Duration,
) {
    while let Some(first) = receiver.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + window;
        while batch.len() < max_batch {
            // Take what is already queued without waiting, then wait out the window.
            match receiver.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => match tokio::time::timeout_at(deadline, receiver.recv()).await {
                    Ok(Some(next)) => batch.push(next),
                    _ => break,
                },
            }
        }
        // A writer whose call was cancelled no longer waits: skip its text.
        batch.retain(|pending| !pending.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let texts: Vec<String> = batch.iter().map(|p| p.text.clone()).collect();
        tracing::debug!(batch_size = texts.len(), "embedding batch");
        let model = provider.model_name().to_owned();
        metrics::histogram!(EMBEDDING_BATCH_SIZE, "model" => model.clone()).record(texts.len() as f64);
        let started = std::time::Instant::now();
        let embedded = provider.embed(&texts).await;
        metrics::histogram!(EMBEDDING_SECONDS, "model" => model).record(started.elapsed().as_secs_f64());
        match embedded {
            Ok(vectors) if vectors.len() == batch.len() => {
                for (pending, vector) in batch.into_iter().zip(vectors) {
                    let _ = pending.reply.send(Ok(vector));
                }
            }
            Ok(vectors) => {
                let error =
                    EmbeddingError::InvalidResponse(format!("{} vectors for {} texts", vectors.len(), batch.len()));
                for pending in batch {
                    let _ = pending.reply.send(Err(error.clone()));
                }
            }
            Err(error) => {
                for pending in batch {
                    let _ = pending.reply.send(Err(error.clone()));
                }
            }
        }
    }
}
