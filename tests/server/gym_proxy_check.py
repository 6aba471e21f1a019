"""Drive NeMo Gym's own `vllm_model` proxy (training config) against a running megagym server.

Run with Gym's interpreter (`.venv-gym/bin/python`, Python 3.13, nemo-gym 0.7.0), never with
megagym's: `python gym_proxy_check.py BASE_URL MODEL_NAME TURNS`. It builds Gym's `VLLMModel`
exactly as `vllm_model_for_training.yaml` configures it (`return_token_id_information: true`,
`uses_reasoning_parser: true`), sends a multi-turn Responses-API conversation through Gym's
`/v1/responses` (Gym converts to chat completions, calls our server, converts back), feeds each
call's output items back as input the way Gym's simple agent does, and checks the token fields
and the prefix invariant on Gym's side. Prints one JSON line; exits non-zero on failure.
Must not: import megagym (a different Python).
"""

from __future__ import annotations

import json
import sys
from unittest.mock import MagicMock


def main() -> int:
    base_url, model, turns = sys.argv[1], sys.argv[2], int(sys.argv[3])
    import nemo_gym.server_utils
    from fastapi.testclient import TestClient
    from nemo_gym.server_utils import ServerClient
    from responses_api_models.vllm_model.app import VLLMModel, VLLMModelConfig

    nemo_gym.server_utils.get_global_config_dict = lambda *a, **k: {}
    config = VLLMModelConfig(
        host="127.0.0.1", port=0, base_url=f"{base_url}/v1", api_key="dummy", model=model, entrypoint="",
        name="policy_model", return_token_id_information=True, request_prompt_and_generation_token_ids=False,
        uses_reasoning_parser=True,
    )
    server = VLLMModel(config=config, server_client=MagicMock(spec=ServerClient, global_config_dict={}))
    with TestClient(server.setup_webserver()) as client:  # one event loop for Gym's aiohttp client
        return converse(client, turns)


def converse(client, turns: int) -> int:
    tools = [{"type": "function", "name": "get_weather", "description": "weather",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                             "additionalProperties": False}, "strict": True}]
    items: list = [{"role": "user", "content": "What is the weather in SF?"}]
    previous = None
    calls = []
    for turn in range(turns):
        body = {"input": items, "tools": tools, "max_output_tokens": 8, "temperature": 1.0, "top_p": 1.0}
        r = client.post("/v1/responses", json=body)
        if r.status_code != 200:
            print(json.dumps({"ok": False, "turn": turn, "status": r.status_code, "body": r.text[:2000]}))
            return 1
        output = r.json()["output"]
        last = output[-1]
        prompt, gen, logps = last["prompt_token_ids"], last["generation_token_ids"], last["generation_log_probs"]
        assert len(gen) == len(logps) and gen, f"turn {turn}: bad token fields"
        if previous is not None and prompt[: len(previous)] != previous:
            print(json.dumps({"ok": False, "turn": turn, "error": "prompt does not extend the previous call"}))
            return 1
        previous = prompt + gen
        calls.append({"prompt": len(prompt), "gen": len(gen), "types": [o["type"] for o in output]})
        said = "".join(part.get("text", "") for item in output if item.get("type") == "message"
                       for part in item.get("content") or []).split()
        if turn == 1 and said:
            # as if the model had reasoned: Gym turns this into <think> / reasoning_content. The random
            # model cannot reason, so a piece of its own output is the reasoning: the server refuses a
            # message text that is not in the message's generated ids (an edited message)
            summary = [{"type": "summary_text", "text": said[0]}]
            output = [{"type": "reasoning", "id": "rs_1", "summary": summary}] + output
        items = items + output + [{"role": "user", "content": f"And on day {turn + 1}?"}]
    # over the context length: Gym must end the trajectory cleanly (empty output, length)
    huge = items + [{"role": "user", "content": "word " * 6000}]
    r = client.post("/v1/responses", json={"input": huge, "tools": tools, "max_output_tokens": 8, "temperature": 1.0,
                                               "top_p": 1.0})
    incomplete = r.json().get("incomplete_details") if r.status_code == 200 else None
    if not incomplete or incomplete.get("reason") != "max_output_tokens":
        print(json.dumps({"ok": False, "error": "context overflow not mapped by Gym", "status": r.status_code,
                          "body": r.text[:1000]}))
        return 1
    print(json.dumps({"ok": True, "calls": calls}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
