"""torchrun worker (1 GPU): the benchmark-scale options in bf16 on CUDA against the plain step.

Packed rows use THD `PackedSeqParams` when transformer-engine is installed (the TE spec), the
local spec's sample-by-sample attention otherwise (`segment_attention.py`); recomputation and
chunked logprobs as on CPU. argv: HF_DIR OUT_JSON.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import make_cfg  # noqa: E402

from megagym.trainer.advantages import assign_advantages  # noqa: E402
from megagym.trainer.policy import Policy, packed_layout  # noqa: E402
from megagym.types import Sample  # noqa: E402

hf_dir, out = sys.argv[1], Path(sys.argv[2])
g = torch.Generator().manual_seed(0)
samples = []
for i, n in enumerate((33, 17, 64, 9, 40, 21)):
    ids = torch.randint(0, 151000, (n,), generator=g).tolist()
    samples.append(Sample(token_ids=ids, loss_mask=[0] * 4 + [1] * (n - 4), gen_logprobs=[-11.9] * n,
                          reward=float(i % 2), group_index=i // 3))
assign_advantages(samples)
results = {}
variants = {"base": {}, "packed": {"optim": {"pack_sequences": True}},
            "recompute": {"parallel": {"recompute": "full"}}, "chunked": {"optim": {"logprob_chunk_tokens": 16}}}
for name, sec in variants.items():
    cfg = make_cfg(hf_dir, 1, 1, model={"dtype": "bfloat16", "layer_spec": "auto"},
                   optim={"micro_batch_tokens": 128, "clip_grad": 0.0, "lr": 1e-5, **sec.get("optim", {})},
                   parallel=sec.get("parallel", {}))
    policy = Policy.build(cfg)
    lps = policy.compute_logprobs(samples)
    m = policy.train_step(samples)
    results[name] = {"loss": m["loss"], "grad_norm": m["grad_norm"], "tokens": m["tokens"],
                     "lps": [lp.tolist() for lp in lps], "layout": packed_layout(cfg)}
    del policy
base = results["base"]
summary = {k: {"loss_diff": abs(r["loss"] - base["loss"]), "grad_norm_rel": abs(r["grad_norm"] / base["grad_norm"] - 1),
               "tokens_equal": r["tokens"] == base["tokens"], "layout": r["layout"],
               "logprob_diff": max(abs(a - b) for x, y in zip(r["lps"], base["lps"]) for a, b in zip(x, y))}
           for k, r in results.items() if k != "base"}
out.write_text(json.dumps(summary))
dist.destroy_process_group()
