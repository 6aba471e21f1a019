"""Single-process worker: the bf16 path on CPU (Megatron mixed-precision optimizer with fp32 main
params) — logprobs near the fp32 transformers model, two finite train steps, bf16 export.
argv: HF_DIR OUT_JSON."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import make_cfg  # noqa: E402

from megagym.trainer.advantages import assign_advantages  # noqa: E402
from megagym.trainer.policy import Policy  # noqa: E402
from megagym.types import Sample  # noqa: E402

hf_dir, out = sys.argv[1], Path(sys.argv[2])
policy = Policy.build(make_cfg(hf_dir, 1, 1, model={"dtype": "bfloat16"}))
g = torch.Generator().manual_seed(0)
samples = [Sample(token_ids=torch.randint(0, 151000, (20,), generator=g).tolist(), loss_mask=[0] * 5 + [1] * 15,
                  gen_logprobs=[0.0] * 20, reward=float(i), group_index=0) for i in range(4)]
lps = policy.compute_logprobs(samples)

from transformers import AutoModelForCausalLM  # noqa: E402

hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
diff = 0.0
with torch.no_grad():
    for s, lp in zip(samples, lps):
        ids = torch.tensor([s.token_ids])
        ref = torch.log_softmax(hf(ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
        diff = max(diff, float((lp[1:] - ref).abs().max()))
for s, lp in zip(samples, lps):
    s.gen_logprobs = [float(x) if m else 0.0 for x, m in zip(lp, s.loss_mask)]
assign_advantages(samples)
metrics = [policy.train_step(samples) for _ in range(2)]
dtypes = sorted({str(t.dtype) for _, t in policy.export_hf()})
out.write_text(json.dumps({"logprob_diff_vs_fp32": diff, "metrics": metrics, "export_dtypes": dtypes}))
