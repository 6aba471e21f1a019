"""megagym: GRPO on NeMo Gym environments with a Megatron-Core trainer and vLLM policy servers.

The package is split so that each part can be imported on its own: `megagym.server` needs vLLM,
`megagym.trainer` is the only package that imports megatron.core, and `megagym.gym` /
`megagym.rollout` talk to NeMo Gym over HTTP only (Gym runs in its own Python).
"""

__version__ = "0.1.0"
