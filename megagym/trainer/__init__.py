"""The Megatron-Core trainer: with the families' layer specs (megagym/models/<family>/spec.py), the
only code that imports megatron.core.

`megagym.trainer.policy.Policy` is the API the GRPO loop uses; see that module's docstring.
Importing this package itself is cheap (no torch / megatron): submodules are imported on demand.
"""


def quiet_known_warnings() -> None:
    """Hide warnings megatron-core and torch print on every run that need no action from the user
    (no TE/apex on CPU, deprecated collectives called inside megatron-core); others still show.
    Call before megatron.core is imported."""
    import warnings

    for message in (r"Transformer Engine and Apex are not installed", r"Apex is not installed",
                    r"full scope is deprecated", r"`torch\.distributed\.\w+` is deprecated",
                    r"The \.grad attribute of a Tensor that is not a leaf Tensor",
                    r"When using async grad allreduce it is recommended"):
        warnings.filterwarnings("ignore", message=message)
