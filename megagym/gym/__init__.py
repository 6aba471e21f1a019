"""NeMo Gym as a service: configuration (`config.py`), composition of `gym env start` (`compose.py`),
the lifecycle of a running stack (`stack.py`), stopping its processes (`kill.py`), the policy
model name Gym must send (`model_name.py`) and `megagym gym start|stop` (`cli.py`).

megagym never imports nemo_gym: Gym runs from its own Python 3.13 venv (`.venv-gym`) and is
reached over HTTP only.
"""

from megagym.gym.config import EnvironmentSpec, GymConfig, resolve_environments
from megagym.gym.errors import GymError
from megagym.gym.stack import GymStack, ServerInstance

__all__ = ["EnvironmentSpec", "GymConfig", "GymError", "GymStack", "ServerInstance", "resolve_environments"]
