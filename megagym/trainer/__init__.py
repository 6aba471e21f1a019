"""The Megatron-Core trainer: the only package that imports megatron.core.

`megagym.trainer.policy.Policy` is the API the GRPO loop uses; see that module's docstring.
Importing this package itself is cheap (no torch / megatron): submodules are imported on demand.
"""
