"""lowercase_words: a tiny Gym resources server whose reward a random tiny model can learn.

Owns: `/verify` for megagym's own environment. The reward of one answer (all text the model
produced: output messages and reasoning summaries) is

    reward = (share of characters that are lowercase ASCII letters or spaces)
           * (share of distinct words among the lowercase words, [a-z]+ runs)

so it is dense (every character counts) and a collapse onto one repeated token cannot max it out
(" the the the" scores 1 on the first factor and 1/k on the second). An answer without words
scores 0. Loaded purely through Gym configuration (configs/lowercase_words.yaml) from megagym's
`envs/` folder, which megagym hands to Gym as an extra component root.
Must not: call a model or keep per-rollout state; verification is a pure function of the text.
"""

import re

from nemo_gym.base_resources_server import (
    BaseResourcesServerConfig,
    BaseVerifyRequest,
    BaseVerifyResponse,
    SimpleResourcesServer,
)

_WORD = re.compile(r"[a-z]+")


def answer_text(output) -> str:
    """Concatenate the text of every output item the model produced."""
    parts = []
    for item in output:
        for c in getattr(item, "content", None) or []:
            text = getattr(c, "text", None)
            if isinstance(text, str):
                parts.append(text)
        for s in getattr(item, "summary", None) or []:
            text = getattr(s, "text", None)
            if isinstance(text, str):
                parts.append(text)
    return "".join(parts)


def score(text: str) -> tuple[float, float, float]:
    """(reward, lowercase share, distinct-word share) of an answer."""
    if not text:
        return 0.0, 0.0, 0.0
    lower = sum(1 for ch in text if ("a" <= ch <= "z") or ch == " ") / len(text)
    words = _WORD.findall(text)
    distinct = len(set(words)) / len(words) if words else 0.0
    return lower * distinct, lower, distinct


class LowercaseWordsConfig(BaseResourcesServerConfig):
    pass


class LowercaseWordsVerifyResponse(BaseVerifyResponse):
    lowercase_share: float
    distinct_share: float


class LowercaseWordsServer(SimpleResourcesServer):
    ray_enabled = False
    config: LowercaseWordsConfig

    async def verify(self, body: BaseVerifyRequest) -> LowercaseWordsVerifyResponse:
        reward, lower, distinct = score(answer_text(body.response.output))
        return LowercaseWordsVerifyResponse(
            **body.model_dump(), reward=reward, lowercase_share=lower, distinct_share=distinct
        )


if __name__ == "__main__":
    LowercaseWordsServer.run_webserver()
