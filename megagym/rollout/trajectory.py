"""One Gym trajectory (the answer of an agent's `/run`) -> one training `Sample`.

Owns: walking `response.output` in order; every item that carries `generation_token_ids` is the
last item of one model call and holds that call's `prompt_token_ids`, `generation_token_ids` and
`generation_log_probs`. Each call contributes a context delta (its prompt minus what the previous
calls already covered — tool outputs and user turns land here; loss mask 0) and an action (its
generated tokens; loss mask 1, with the sampling logprobs). The prompt of every call must start
with all tokens of the calls before it (contiguity); otherwise the trajectory was re-tokenized or
re-templated on the way and training on it would be off-policy, so this raises `ContiguityError`
naming the row, the call and the first differing position.
Must not: tokenize, call servers, or guess missing token fields.
"""

from __future__ import annotations

from megagym.token_versions import expand
from megagym.types import Sample


class TrajectoryError(ValueError):
    """A trajectory that cannot become a sample (missing fields, no generated tokens)."""


class ContiguityError(TrajectoryError):
    """A model call's prompt does not extend the tokens of the calls before it."""


def model_calls(output: list[dict]) -> list[dict]:
    """The output items that close a model call (they carry non-empty generation_token_ids)."""
    return [item for item in output if item.get("generation_token_ids")]


def trajectory_to_sample(result: dict, row_index: int, env: str = "", weight_version: int = 0,
                         call_versions: list | None = None) -> Sample:
    """Build the training sample of one `/run` result (see module docstring for the rules).

    `call_versions`: per model call, the weight-version boundaries the policy server recorded
    (megagym.token_versions) or None; a call without them is stamped `weight_version`."""
    response = result.get("response")
    if not isinstance(response, dict) or not isinstance(response.get("output"), list):
        raise TrajectoryError(f"row {row_index}: /run result has no response.output")
    calls = model_calls(response["output"])
    if not calls:
        inc = response.get("incomplete_details")
        kinds = [item.get("type") for item in response["output"]]
        raise TrajectoryError(
            f"row {row_index}: trajectory has no generated tokens (incomplete_details={inc}, "
            f"output item types {kinds}); a prompt longer than the policy server's context ends "
            "this way")
    token_ids: list[int] = []
    loss_mask: list[int] = []
    logprobs: list[float] = []
    turn_starts: list[int] = []
    versions: list[int] = []
    for turn, item in enumerate(calls):
        prompt = item.get("prompt_token_ids")
        gen = item["generation_token_ids"]
        lps = item.get("generation_log_probs")
        if prompt is None or lps is None:
            raise TrajectoryError(
                f"row {row_index}: model call {turn} lacks prompt_token_ids or generation_log_probs "
                "(is the policy model config vllm_model_for_training.yaml?)")
        if len(lps) != len(gen):
            raise TrajectoryError(
                f"row {row_index}: model call {turn} has {len(gen)} generated tokens but {len(lps)} logprobs")
        n_seen = len(token_ids)
        if prompt[:n_seen] != token_ids:
            i = next((j for j, (a, b) in enumerate(zip(prompt, token_ids)) if a != b), min(len(prompt), n_seen))
            got = prompt[i] if i < len(prompt) else "<end of prompt>"
            raise ContiguityError(
                f"row {row_index}: model call {turn} breaks token contiguity: its prompt "
                f"({len(prompt)} tokens) does not start with the {n_seen} tokens of the calls before "
                f"it; first difference at position {i} (expected {token_ids[i] if i < n_seen else '?'}, "
                f"got {got})")
        delta = prompt[n_seen:]
        token_ids.extend(delta)
        loss_mask.extend([0] * len(delta))
        logprobs.extend([0.0] * len(delta))
        versions.extend([-1] * len(delta))
        turn_starts.append(len(token_ids))
        token_ids.extend(gen)
        loss_mask.extend([1] * len(gen))
        logprobs.extend(float(x) for x in lps)
        bounds = call_versions[turn] if call_versions and turn < len(call_versions) else None
        try:
            versions.extend(expand(bounds, len(gen)) if bounds else [weight_version] * len(gen))
        except ValueError as e:
            raise TrajectoryError(f"row {row_index}: model call {turn}: {e}") from None
    inc = response.get("incomplete_details") or {}
    reward = result.get("reward")
    if reward is None:
        raise TrajectoryError(f"row {row_index}: /run result has no reward")
    return Sample(
        token_ids=token_ids,
        loss_mask=loss_mask,
        gen_logprobs=logprobs,
        reward=float(reward),
        group_index=row_index,
        row_index=row_index,
        env=env,
        turn_starts=turn_starts,
        truncated=inc.get("reason") == "max_output_tokens",
        mask_sample=bool(result.get("mask_sample")),
        weight_version=min(v for v in versions if v >= 0),
        token_versions=versions if len({v for v in versions if v >= 0}) > 1 else [],
    )
