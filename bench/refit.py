"""Weight-sync (refit) benchmark: time and GB/s of pushing a whole model into a live vLLM engine.

For each model it starts the test-only vLLM app (`megagym.testing.vllm_app`: vLLM
`AsyncLLM` + the `/weights` router), pushes the full HF-named weights through a sender
`--repeats` times after one warm-up push, and prints the median against a plain in-process
copy of the same bytes into model-sized memory (one `copy_` per tensor: the floor for any
transport that must write every byte once).

Models:
- `tiny`     : the tiny random Qwen3 of the tests (fp32, 2 layers, tied; ~79 MB), real checkpoint.
- `qwen3-4b` : Qwen3-4B shapes (hidden 2560, 36 layers, 32/8 heads, head_dim 128, inter 9728,
               vocab 151936, tied) in bf16 (~8.0 GB); the engine starts with `load_format=dummy`
               and the trainer side streams random tensors layer by layer (one layer's tensors
               are generated once and re-sent under each layer's names, as an exporter would
               stream them), so the bench holds ~1 layer on the trainer side. `--layers` trims it.

The time covers pause, every bucket (trainer copy into /dev/shm, engine load and repack),
finish (tied lm_head refresh, prefix-cache reset) and resume, as the training loop sees it.

    python bench/refit.py --model tiny --repeats 5
    python bench/refit.py --model qwen3-4b --bucket-mb 512 --repeats 2
    python bench/refit.py --model tiny --backend nccl   # GPU machine with vLLM (unverified here)
    python bench/refit.py --run-dir runs/tiny_cpu       # step-time breakdown of a finished run

`--run-dir` reads a run's metrics.jsonl (e.g. after `bash launch/local.sh`) and prints the mean
seconds per step of generation / training / sync / validation / checkpoint / idle, each as a share of the step, with sync
against training as the ratio: what weight sync costs the loop.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megagym.weights.sync.buckets import leaked_segments, nbytes_of  # noqa: E402
from megagym.testing.vllm_app import VLLMTestServer  # noqa: E402
from megagym.weights.sync.sender import make_sender  # noqa: E402

QWEN3_4B = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
                max_position_embeddings=4096)


def tiny_model(root: Path):
    from safetensors.torch import load_file

    from megagym.testing.tiny_qwen3 import write_tiny_qwen3

    a, b = write_tiny_qwen3(root / "A", seed=0), write_tiny_qwen3(root / "B", seed=1)
    streams = [load_file(str(d / "model.safetensors")) for d in (b, a)]
    return a, ["--dtype", "float32"], (lambda i: iter(streams[i % 2].items()))


def qwen3_4b_model(root: Path, layers: int):
    from megagym.testing.tiny_qwen3 import copy_tokenizer, tiny_qwen3_config

    cfg = tiny_qwen3_config(**{**QWEN3_4B, "num_hidden_layers": layers, "torch_dtype": "bfloat16"})
    cfg.save_pretrained(root / "4b")
    copy_tokenizer(root / "4b")
    h, inter, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    layer = {  # one decoder layer, re-sent under every layer's names
        "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        "self_attn.q_proj.weight": rnd(q, h), "self_attn.k_proj.weight": rnd(kv, h),
        "self_attn.v_proj.weight": rnd(kv, h), "self_attn.o_proj.weight": rnd(h, q),
        "self_attn.q_norm.weight": torch.ones(hd, dtype=torch.bfloat16),
        "self_attn.k_norm.weight": torch.ones(hd, dtype=torch.bfloat16),
        "mlp.gate_proj.weight": rnd(inter, h), "mlp.up_proj.weight": rnd(inter, h),
        "mlp.down_proj.weight": rnd(h, inter),
    }
    embed = rnd(cfg.vocab_size, h)
    norm = torch.ones(h, dtype=torch.bfloat16)

    def stream(_i):
        yield "model.embed_tokens.weight", embed
        for li in range(layers):
            for k, t in layer.items():
                yield f"model.layers.{li}.{k}", t
        yield "model.norm.weight", norm

    return root / "4b", ["--dtype", "bfloat16", "--load-format", "dummy"], stream


def plain_copy_seconds(stream) -> tuple[float, int]:
    """One `copy_` of every tensor into its own preallocated destination (memory touched once first)."""
    pairs = [(t, torch.empty_like(t)) for _, t in stream]
    for _, dst in pairs:
        dst.zero_()
    t0 = time.perf_counter()
    for src, dst in pairs:
        dst.copy_(src)
    return time.perf_counter() - t0, sum(nbytes_of(s) for s, _ in pairs)


def step_breakdown(run_dir: str) -> None:
    """Mean seconds per training step of each phase of a finished run, from its metrics.jsonl."""
    from megagym.metrics.writer import read_metrics

    steps = [r for r in read_metrics(run_dir) if "time/step" in r and "time/training" in r]
    if not steps:
        raise SystemExit(f"{run_dir}: no step timings in metrics.jsonl")
    phases = ("generation", "training", "sync", "validation", "checkpoint", "idle", "step")
    mean = {k: statistics.fmean(r.get(f"time/{k}", 0.0) for r in steps) for k in phases}
    print(f"{run_dir}: {len(steps)} steps")
    print("| phase | mean s / step | share of step |")
    print("|---|---|---|")
    for k in phases:
        print(f"| {k} | {mean[k]:.2f} | {mean[k] / mean['step']:.0%} |")
    print(f"\nsync / training = {mean['sync'] / mean['training']:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description="weight-sync benchmark")
    p.add_argument("--model", choices=["tiny", "qwen3-4b"], default="tiny")
    p.add_argument("--layers", type=int, default=36, help="qwen3-4b only")
    p.add_argument("--backend", choices=["shm", "nccl", "ipc"], default="shm")
    p.add_argument("--bucket-mb", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--master-port", type=int, default=29555, help="nccl only")
    p.add_argument("--run-dir", default="", help="print the step-time breakdown of this run instead")
    a = p.parse_args()
    if a.run_dir:
        step_breakdown(a.run_dir)
        return

    with tempfile.TemporaryDirectory(prefix="refit-bench-") as tmp:
        root = Path(tmp)
        if a.model == "tiny":
            model_dir, server_args, stream = tiny_model(root)
        else:
            model_dir, server_args, stream = qwen3_4b_model(root, a.layers)
        env = {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"} if a.backend == "ipc" else None
        server = VLLMTestServer(str(model_dir), log_path=root / "server.log", backend=a.backend,
                                extra_args=server_args, env=env or {})
        sender = None
        try:
            t0 = time.perf_counter()
            server.start(timeout_s=900)
            print(f"engine up in {time.perf_counter() - t0:.1f} s", flush=True)
            kw = {"bucket_bytes": a.bucket_mb << 20}
            if a.backend == "shm":
                kw["validate"] = a.model == "tiny"  # dummy-loaded engine has no checkpoint to check
            if a.backend == "nccl":
                kw.update(master_address="127.0.0.1", master_port=a.master_port)
            sender = make_sender(a.backend, [server.url], **kw)
            t0 = time.perf_counter()
            sender.init()
            init_s = time.perf_counter() - t0
            runs = []
            for i in range(a.repeats + 1):
                stats = sender.send(stream(i))
                print(f"  sync {i}{' (warm-up)' if i == 0 else ''}: {stats.seconds:.3f} s, {stats.buckets} buckets, "
                      f"{stats.bytes / 1e9:.3f} GB, {stats.gb_per_s:.2f} GB/s, trainer pack {stats.pack_seconds:.3f} s, "
                      f"engine " + " ".join(f"{k} {v:.3f}" for k, v in (stats.server_timings or {}).items()),
                      flush=True)
                if i:
                    runs.append(stats)
        except BaseException:
            print(f"--- server log (tail) ---\n{server.tail(80)}", file=sys.stderr)
            raise
        finally:
            if sender is not None:
                sender.close()
            server.stop()
        assert leaked_segments(os.getpid()) == [], "leaked /dev/shm segments"

        # The plain copy runs after the engine is gone, so both never hold the model at once.
        copy_s, copy_bytes = min(plain_copy_seconds(stream(0)) for _ in range(3))
        sync_s = statistics.median(r.seconds for r in runs)
        nbytes = runs[0].bytes
        assert nbytes == copy_bytes
        print()
        print(f"| model | backend | bytes | buckets | init s | sync s (median of {a.repeats}) | sync GB/s "
              f"| plain copy s | copy GB/s | sync / copy |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        print(f"| {a.model}{'' if a.model == 'tiny' else f' ({a.layers} layers)'} | {a.backend} "
              f"| {nbytes / 1e9:.3f} GB | {runs[0].buckets} | {init_s:.3f} | {sync_s:.3f} | {nbytes / sync_s / 1e9:.2f} "
              f"| {copy_s:.3f} | {copy_bytes / copy_s / 1e9:.2f} | {sync_s / copy_s:.1f}x |")


if __name__ == "__main__":
    main()
