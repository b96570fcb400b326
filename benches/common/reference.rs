//! The PyTorch sentence-transformers reference (`scripts/bench-embedding-reference.py`
//! in the bench virtualenv `.cache/st-venv`), run as a child process.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context;

pub const DIMENSIONS: usize = 384;

pub struct Reference {
    pub texts_per_second: f64,
    pub versions: String,
    /// `texts.len() * DIMENSIONS` floats, the texts' vectors in order.
    pub vectors: Vec<f32>,
}

fn python() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/st-venv/bin/python")
}

/// Whether the bench virtualenv has torch and sentence-transformers
/// (`scripts/bench-venv.sh --reference` installs them).
pub fn available() -> bool {
    Command::new(python())
        .args(["-c", "import torch, sentence_transformers"])
        .output()
        .is_ok_and(|out| out.status.success())
}

/// Embeds `texts` with the reference (see `available`). `scratch` holds the
/// texts and vectors handed to and from the child.
pub fn embed(
    model_dir: &str,
    texts: &[String],
    batch: usize,
    threads: usize,
    scratch: &Path,
) -> anyhow::Result<Reference> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::create_dir_all(scratch)?;
    let (input, output): (PathBuf, PathBuf) = (
        scratch.join("embedding-texts.json"),
        scratch.join("embedding-reference.f32"),
    );
    std::fs::write(&input, serde_json::to_vec(texts)?)?;
    let run = Command::new(python())
        .arg(root.join("scripts/bench-embedding-reference.py"))
        .args([
            "--model",
            model_dir,
            "--threads",
            &threads.to_string(),
            "--batch",
            &batch.to_string(),
        ])
        .arg("--texts")
        .arg(&input)
        .arg("--out")
        .arg(&output)
        .output()
        .context("running the PyTorch reference")?;
    anyhow::ensure!(
        run.status.success(),
        "the PyTorch reference failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(
        run.stdout
            .split(|b| *b == b'\n')
            .rfind(|line| !line.is_empty())
            .context("the reference printed nothing")?,
    )?;
    let raw = std::fs::read(&output)?;
    anyhow::ensure!(
        raw.len() == texts.len() * DIMENSIONS * 4,
        "reference vectors: wrong size"
    );
    Ok(Reference {
        texts_per_second: report["texts_per_second"].as_f64().context("texts_per_second")?,
        versions: report["versions"].as_str().unwrap_or("").to_owned(),
        vectors: raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
    })
}
