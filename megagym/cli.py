"""The `megagym` command: one subcommand per capability, each owned by its own module.

Owns: dispatching `megagym <subcommand> ...` to the module that implements it. Must not: hold
any behaviour of its own beyond that table; subcommand modules are imported lazily so that
`megagym convert` does not pay for vLLM and `megagym serve` does not import megatron.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, function taking argv, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "serve": ("megagym.server.cli", "main", "run the OpenAI-compatible policy server on vLLM"),
    "gym": ("megagym.gym.cli", "main", "start or stop the NeMo Gym servers of a config"),
    "train": ("megagym.train", "main", "run GRPO training from a config"),
    "convert": ("megagym.weights.convert", "main", "convert a megagym checkpoint to an HF folder"),
    "plot": ("megagym.metrics.plot", "main", "plot the metrics of a run directory"),
    "data": ("megagym.data.prepare", "main", "prepare Gym JSONL datasets"),
    "eval": ("megagym.eval", "main", "validate one checkpoint (or HF folder) and write a JSON result"),
    "eval-merge": ("megagym.eval", "merge_main", "tabulate and plot eval results (Markdown, CSV, PNG)"),
    "cluster": ("megagym.cluster", "main", "helpers of the Slurm scripts (query a run, serve, wait)"),
    "model": ("megagym.models.cli", "main", "import a GGUF file or fetch a known model as an HF folder"),
    "tiny-model": ("megagym.testing.tiny_qwen3", "main", "write a tiny random Qwen3 checkpoint"),
}


def usage() -> str:
    lines = ["usage: megagym <command> [args...]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, _, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        import difflib

        close = difflib.get_close_matches(name, list(SUBCOMMANDS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        print(f"megagym: unknown command '{name}'{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, func_name, _ = SUBCOMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("megagym"):
            print(f"megagym: '{name}' is not available in this build ({e.name} missing)", file=sys.stderr)
            return 2
        raise
    result = getattr(module, func_name)(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
