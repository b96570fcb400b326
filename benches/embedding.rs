//! `make bench`, embedding: the local model (candle) against the PyTorch
//! reference (sentence-transformers), same model files, same texts, same
//! batch size and the same number of threads, in one run.
//!
//! Reports texts/s of each and their agreement: the cosine similarity of the
//! two vectors of every text (goal: throughput at least the reference's,
//! cosine >= 0.999). BENCH_EMBEDDING_TEXTS (2048) texts of incident prose,
//! from a few words to ~80, in batches of the service's
//! embedding.batch_max_size (32). The local model runs before and after the
//! reference and its two timings are averaged, so a drift of the machine
//! weighs on both sides.
//!
//! The reference runs `scripts/bench-embedding-reference.py` in the bench
//! virtualenv (.cache/st-venv; `scripts/bench-venv.sh --reference` installs
//! torch and sentence-transformers, ~6 GB). Without it, only the local figures
//! are printed.
use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use datastorage::{config::Settings, embedding::local::LocalMiniLm};

mod common;
use common::{env_or, reference, Rng, ALERT_BASES, TEAMS};

fn texts(count: usize) -> Vec<String> {
    const CAUSES: [&str; 8] = [
        "the readiness probe failed after the upstream connection pool was exhausted",
        "the container was OOMKilled when resident memory passed its limit",
        "garbage collection paused the JVM for several seconds",
        "the registry refused the image pull with an authentication error",
        "the node ran out of ephemeral storage and evicted the pod",
        "a certificate expired and TLS handshakes failed",
        "DNS lookups for the cache service timed out",
        "a deploy rolled out a configuration with a typo in the database URL",
    ];
    let mut rng = Rng::new(6);
    (0..count)
        .map(|i| {
            let alert = *rng.pick(&ALERT_BASES);
            let team = *rng.pick(&TEAMS);
            let mut text = format!("{alert} in namespace {team}, pod api-{i}");
            for _ in 0..rng.below(6) {
                text.push_str("; ");
                let cause: &&str = rng.pick(&CAUSES[..]);
                text.push_str(cause);
            }
            text
        })
        .collect()
}

fn local_run(model: &LocalMiniLm, texts: &[String], batch: usize) -> anyhow::Result<(f64, Vec<Vec<f32>>)> {
    let started = Instant::now();
    let mut vectors = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(batch) {
        vectors.extend(model.embed_blocking(chunk)?);
    }
    Ok((texts.len() as f64 / started.elapsed().as_secs_f64(), vectors))
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

fn main() -> anyhow::Result<()> {
    let count: usize = env_or("BENCH_EMBEDDING_TEXTS", 2048);
    let model_dir = std::env::var("DATASTORAGE_BENCH_MODEL_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/.cache/models/all-MiniLM-L6-v2").into());
    let batch = Settings::default().embedding.batch_max_size;
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let texts = texts(count);
    let model = LocalMiniLm::load(Path::new(&model_dir), "all-MiniLM-L6-v2")?;
    local_run(&model, &texts[..batch.min(texts.len())], batch)?; // warm-up

    println!("## Local embedding vs the PyTorch reference\n\n{count} texts, batches of {batch}, {threads} threads.\n");
    let (first, local_vectors) = local_run(&model, &texts, batch)?;
    let scratch = std::env::var_os("BENCH_RESULTS_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
    let reference = if reference::available() {
        Some(reference::embed(&model_dir, &texts, batch, threads, &scratch)?)
    } else {
        None
    };
    let (second, _) = local_run(&model, &texts, batch)?;
    let local = (first + second) / 2.0;
    // sentence-transformers sorts its input by length before batching, so
    // its batches carry little padding; the service's micro-batches are
    // whatever arrives together. The local model on the same sorted order:
    let mut by_length = texts.clone();
    by_length.sort_by_key(|text| std::cmp::Reverse(text.len()));
    let (sorted, _) = local_run(&model, &by_length, batch)?;
    println!("| implementation | texts/s | vs reference |\n|---|---:|---:|");
    match &reference {
        Some(reference) => {
            println!(
                "| local model (candle), mean of the runs before and after | {local:.0} | {:.2}x |",
                local / reference.texts_per_second
            );
            println!(
                "| local model, texts sorted by length first (as the reference batches them) | {sorted:.0} | {:.2}x |",
                sorted / reference.texts_per_second
            );
            println!(
                "| PyTorch reference ({}) | {:.0} | 1.00x |",
                reference.versions, reference.texts_per_second
            );
            let mut agreement: Vec<f64> = local_vectors
                .iter()
                .zip(reference.vectors.chunks_exact(reference::DIMENSIONS))
                .map(|(a, b)| cosine(a, b))
                .collect();
            agreement.sort_by(f64::total_cmp);
            let mean = agreement.iter().sum::<f64>() / agreement.len() as f64;
            println!(
                "\nAgreement (cosine of the two vectors of each text): min {:.6}, 1st percentile {:.6}, \
                 mean {mean:.6}; {} of {} texts below 0.999.\n",
                agreement[0],
                agreement[agreement.len() / 100],
                agreement.iter().filter(|c| **c < 0.999).count(),
                agreement.len()
            );
        }
        None => println!(
            "| local model (candle) | {local:.0} | n/a |\n| local model, texts sorted by length first | {sorted:.0} | n/a |\n\nNo PyTorch reference: run scripts/bench-venv.sh \
             --reference to install torch and sentence-transformers into .cache/st-venv.\n"
        ),
    }
    Ok(())
}
