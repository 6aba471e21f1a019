"""NeMo Gym as a service: configuration (`config.py`), composition of `gym env start` (`compose.py`),
the lifecycle of a running stack (`stack.py`), stopping its processes (`kill.py`), the policy
model name Gym must send (`model_name.py`) and `megagym gym start|stop` (`cli.py`).

megagym never imports nemo_gym: Gym runs from its own Python 3.13 venv (`.venv-gym`) and is
reached over HTTP only. `GymStack` and `ServerInstance` load on first use: the run config imports
`megagym.gym.config`, and code that never talks to Gym (the Megatron trainer, run alone on a lent
GPU machine, which need not have httpx) must not need an HTTP client (tests/trainer/test_bare_gpu_machine.py).
"""

from megagym.gym.config import EnvironmentSpec, GymConfig, resolve_environments
from megagym.gym.errors import GymError

__all__ = ["EnvironmentSpec", "GymConfig", "GymError", "GymStack", "ServerInstance", "resolve_environments"]


def __getattr__(name: str):
    if name in ("GymStack", "ServerInstance"):
        from megagym.gym import stack

        return getattr(stack, name)
    raise AttributeError(f"module 'megagym.gym' has no attribute {name!r}")
