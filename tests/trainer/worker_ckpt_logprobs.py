"""torchrun worker: token logprobs of a megagym checkpoint's model (the trained model) and of the
HF folder it was trained from, on fixed sequences.

argv: HF_DIR CKPT_DIR OUT_JSON. 1 rank. Writes {"seqs", "trained", "base"} (temperature-1
logprobs of each next token) for tests that compare a converted folder with the trained model.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import make_cfg  # noqa: E402

from megagym.trainer.policy import Policy  # noqa: E402
from megagym.types import Sample  # noqa: E402

hf_dir, ckpt, out_path = sys.argv[1:4]
vocab = json.loads((Path(hf_dir) / "config.json").read_text())["vocab_size"]
g = torch.Generator().manual_seed(3)
seqs = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (11, 7)]
samples = [Sample(token_ids=s, loss_mask=[1] * len(s), gen_logprobs=[0.0] * len(s), reward=0.0) for s in seqs]

policy = Policy.build(make_cfg(hf_dir, grpo={"temperature": 1.0}))
base = [lp[1:].tolist() for lp in policy.compute_logprobs(samples)]
policy.load(ckpt)
trained = [lp[1:].tolist() for lp in policy.compute_logprobs(samples)]
Path(out_path).write_text(json.dumps({"seqs": seqs, "trained": trained, "base": base}))
dist.destroy_process_group()
