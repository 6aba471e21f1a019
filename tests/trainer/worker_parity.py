"""torchrun worker: Megatron vs transformers logits / logprobs and HF->Megatron->HF at several layouts.

argv: HF_DIR UNTIED_HF_DIR OUT_JSON [LAYOUTS]. Runs the layouts TP1, TP2, PP2, TP2xPP2 in one launch
(re-initialising Megatron's parallel state) on 4 ranks; rank 0 writes the results. LAYOUTS (comma
separated, e.g. "tp1,pp2" on 2 ranks or "tp3" on 3 for a real model; UNTIED_HF_DIR may then be "-")
picks some.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import make_cfg  # noqa: E402

from megagym.trainer import head  # noqa: E402
from megagym.trainer.policy import Policy  # noqa: E402
from megagym.trainer.step import build_micro_batch, run_schedule  # noqa: E402
from megagym.types import Sample  # noqa: E402
from megagym.weights.load import SafetensorsReader  # noqa: E402

hf_dir, untied_dir, out_path = sys.argv[1:4]
only = sys.argv[4].split(",") if len(sys.argv) > 4 else None
TEMP = 0.7
vocab = json.loads((Path(hf_dir) / "config.json").read_text())["vocab_size"]
g = torch.Generator().manual_seed(0)
seqs = [torch.randint(0, min(151000, vocab), (n,), generator=g).tolist() for n in (13, 9, 17, 5)]


def hf_reference(path):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return [m(torch.tensor([s])).logits[0] for s in seqs]


def megatron_logits(policy):
    """Full-vocab logits per sequence, on rank 0 (micro-batches of mixed lengths through the pipeline)."""
    mbs = [build_micro_batch(ids, seqs, [[1] * len(s) for s in seqs], {}, {}) for ids in ([0, 1], [2], [3])]
    got = {}

    def collect(hidden, mb):
        full = head.full_logits(head.unwrap(policy.model), hidden, policy.arch.vocab_size)
        for row, sid in enumerate(mb.sample_ids):
            got[sid] = full[row, : len(seqs[sid]) - 1].clone()
        return hidden.new_zeros(()), torch.zeros((), dtype=torch.int)

    run_schedule(policy.model, mbs, collect, forward_only=True)
    mine = got if policy._reports() else {}
    box = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, box, dst=0)
    if dist.get_rank() == 0:
        merged = {}
        for part in box:
            merged.update(part)
        return merged


results = {}
LAYOUTS = [("tp1", hf_dir, 1, 1), ("tp2", hf_dir, 2, 1), ("pp2", hf_dir, 1, 2),
           ("tp2pp2", hf_dir, 2, 2), ("tp2pp2_untied", untied_dir, 2, 2),
           ("tp3", hf_dir, 3, 1)]  # tp3 only when asked for (3 ranks): a model with 9 heads / 3 KV heads
for name, path, tp, pp in LAYOUTS:
    if (only is None and name == "tp3") or (only is not None and name not in only):
        continue
    policy = Policy.build(make_cfg(path, tp, pp, grpo={"temperature": TEMP}))
    logits = megatron_logits(policy)
    samples = [Sample(token_ids=s, loss_mask=[1] * len(s), gen_logprobs=[0.0] * len(s), reward=0.0) for s in seqs]
    lps = policy.compute_logprobs(samples if dist.get_rank() == 0 else None)
    exported = {k: v.clone() for k, v in policy.export_hf()}
    if dist.get_rank() == 0:
        ref = hf_reference(path)
        logit_diff = max(float((logits[i] - ref[i][:-1]).abs().max()) for i in range(len(seqs)))
        lp_diff = 0.0
        for i, s in enumerate(seqs):
            want = torch.log_softmax(ref[i][:-1] / TEMP, dim=-1).gather(-1, torch.tensor(s[1:])[:, None])[:, 0]
            lp_diff = max(lp_diff, float((lps[i][1:] - want).abs().max()))
        reader = SafetensorsReader(path)
        exact = set(exported) == set(reader.weight_map) and all(
            torch.equal(exported[k], reader.get(k)) for k in reader.weight_map)
        results[name] = {"logit_diff": logit_diff, "logprob_diff": lp_diff, "export_exact": exact,
                         "names_missing": sorted(set(reader.weight_map) - set(exported)),
                         "names_extra": sorted(set(exported) - set(reader.weight_map))}
    del policy
    dist.barrier()

if dist.get_rank() == 0:
    Path(out_path).write_text(json.dumps(results, indent=1))
dist.destroy_process_group()
