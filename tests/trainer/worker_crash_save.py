"""Single-process worker: save a good checkpoint, train a step, then die (os._exit) in the middle of
the next save. argv: HF_DIR ROOT. The test then checks what is on disk."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import make_cfg  # noqa: E402

from megagym.trainer import checkpoint  # noqa: E402
from megagym.trainer.policy import Policy  # noqa: E402
from megagym.types import Sample  # noqa: E402

hf_dir, root = sys.argv[1], Path(sys.argv[2])
policy = Policy.build(make_cfg(hf_dir, 1, 1))
s = Sample(token_ids=list(range(100, 112)), loss_mask=[0] * 4 + [1] * 8, gen_logprobs=[-11.0] * 12, reward=1.0,
           advantage=1.0)
policy.train_step([s])
checkpoint.save_step(policy, root, {"data_position": 1})
policy.train_step([s])


def crash(tmp):
    assert (tmp / "dist" / "metadata.json").exists()  # every shard written, COMPLETE not yet
    os._exit(17)


checkpoint._before_commit = crash
checkpoint.save_step(policy, root, {"data_position": 2})
