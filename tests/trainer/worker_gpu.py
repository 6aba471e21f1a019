"""torchrun worker (1 GPU): bf16 Megatron model (TE spec when installed) vs transformers bf16, and
two bf16 train steps. argv: HF_DIR OUT_JSON."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import make_cfg  # noqa: E402

from megagym.trainer.advantages import assign_advantages  # noqa: E402
from megagym.trainer.policy import Policy  # noqa: E402
from megagym.types import Sample  # noqa: E402

hf_dir, out = sys.argv[1], Path(sys.argv[2])
policy = Policy.build(make_cfg(hf_dir, 1, 1, model={"dtype": "bfloat16", "layer_spec": "auto"}))
g = torch.Generator().manual_seed(0)
seqs = [torch.randint(0, 151000, (n,), generator=g).tolist() for n in (33, 17)]
samples = [Sample(token_ids=s, loss_mask=[0] * 5 + [1] * (len(s) - 5), gen_logprobs=[0.0] * len(s),
                  reward=float(i), group_index=0) for i, s in enumerate(seqs)]
lps = policy.compute_logprobs(samples)

from transformers import AutoModelForCausalLM  # noqa: E402

hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).cuda().eval()
diffs, gen_kl = [], []
with torch.no_grad():
    for s, lp in zip(seqs, lps):
        ids = torch.tensor([s], device="cuda")
        ref = torch.log_softmax(hf(ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0].cpu()
        diffs.append(float((lp[1:] - ref).abs().max()))
        d = ref - lp[1:]
        gen_kl.append(float((torch.exp(d) - d - 1).mean()))
for s, lp in zip(samples, lps):
    s.gen_logprobs = [float(x) if m else 0.0 for x, m in zip(lp, s.loss_mask)]
assign_advantages(samples)
metrics = [policy.train_step(samples) for _ in range(2)]
te = any("layer_norm_weight" in n for n, _ in policy.model.named_parameters())
out.write_text(json.dumps({"logprob_diff": max(diffs), "gen_kl": max(gen_kl), "metrics": metrics, "te_spec": te}))
dist.destroy_process_group()
