"""Typed settings of the policy server (`megagym serve` and the `server:` section of a run).

Owns: the `ServerConfig` dataclass — where to bind, which model, engine sizing, the sampling
settings the server accepts (training and validation), the logprob contract, the parsers.
Must not: import vLLM, FastAPI or torch; this is plain data loaded by `megagym.config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class SamplingSetting:
    """One accepted (temperature, top_p) pair. top_k is always "unset" (-1)."""

    temperature: float = 1.0
    top_p: float = 1.0


@dataclass
class ServerConfig:
    model: str = ""
    served_model_name: Optional[str] = None  # the `model` name clients send; default: the model path
    host: str = "127.0.0.1"
    port: int = 8000
    # bearer token required on every endpoint but /health when set. `megagym serve` takes it from
    # the MEGAGYM_API_KEY environment variable or --api-key-file (owner-only), never argv.
    api_key: Optional[str] = None

    # engine sizing
    max_model_len: Optional[int] = None  # default: the model's own (max_position_embeddings)
    dtype: str = "auto"  # "auto": the checkpoint's own (config.json torch_dtype), never a silent downcast
    kv_cache_gib: float = 1.0  # CPU: VLLM_CPU_KVCACHE_SPACE; GPU: ignored (use gpu_memory_utilization)
    gpu_memory_utilization: float = 0.8
    tensor_parallel_size: int = 1
    enforce_eager: bool = True
    seed: int = 0  # the engine's seed, and the root of the per-request seeds below
    # True: a chat request without a `seed` gets one derived from `seed`, its weight version, prompt
    # and how often that prompt came before (request_seeds.py), so that a run's samples repeat. vLLM
    # then samples it with its own generator, which on GPU also leaves FlashInfer's sampling kernel
    # for torch's (slower). False: vLLM's shared generator, samples depend on batch timing.
    request_seeds: bool = False
    enable_prefix_caching: bool = True
    max_num_seqs: int = 256
    shutdown_timeout_s: float = 20.0
    engine_args: dict = field(default_factory=dict)  # extra AsyncEngineArgs (weight_transfer_config, ...)

    # bounded work per request (None: derived from the engine's max_model_len L, see limits.py)
    max_request_bytes: Optional[int] = None  # body size, else 413; default max(4 MiB, 1 KiB x L)
    max_messages: Optional[int] = None  # messages per request; default max(64, L // 4)
    max_text_chars: Optional[int] = None  # all text of one request (messages + tools); default 16 x L
    # connections (uvicorn + megagym/server/connections.py)
    max_connections: int = 2048  # open connections or requests in flight above this: 503
    header_timeout_s: float = 10.0  # a connection that has not sent complete request headers: closed
    body_timeout_s: float = 20.0  # a request body not complete this long after its headers: 408, closed
    keep_alive_s: int = 30  # an idle keep-alive connection: closed

    # sampling guard: a request must match one of these (unset fields take the training values)
    train_sampling: SamplingSetting = field(default_factory=SamplingSetting)
    validation_sampling: SamplingSetting = field(default_factory=SamplingSetting)

    # The logprob quantity returned in `generation_log_probs` / `logprobs.content[i].logprob`.
    # "processed_logprobs" = log_softmax(logits / temperature) after top-p/top-k masking: the
    # quantity the trainer recomputes. "raw_logprobs" ignores temperature (vLLM's default).
    logprobs_mode: Literal["processed_logprobs", "raw_logprobs"] = "processed_logprobs"

    # parsers (vLLM's own); None disables
    tool_parser: Optional[str] = "hermes"
    reasoning_parser: Optional[str] = None  # "qwen3" to split <think> into `reasoning_content`
    chat_template_kwargs: dict = field(default_factory=dict)  # defaults merged under each request's

    # weight sync backend ("shm" on CPU, "nccl" / "ipc" on GPU): enables vLLM weight transfer in
    # the engine and mounts megagym.weights.sync's /weights/* routes on this app
    weight_sync: Optional[Literal["shm", "nccl", "ipc"]] = None
    # weight version reported before any update
    initial_weight_version: int = 0
    # "module:function" entries called with the FastAPI app at creation (e.g. the weight-sync
    # backend adding its control routes); they reach the engine as `app.state.engine`.
    extensions: list = field(default_factory=list)

    def validate(self) -> None:
        if not self.model:
            raise ValueError("model: a model path (HF folder) is required")
        if not 0 < self.port < 65536:
            raise ValueError(f"port: {self.port} is not a valid port")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError("max_model_len must be positive")
        for name in ("max_request_bytes", "max_messages", "max_text_chars"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive (or unset for the default)")
        for name in ("max_connections", "header_timeout_s", "body_timeout_s", "keep_alive_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        for name in ("train_sampling", "validation_sampling"):
            s = getattr(self, name)
            if s.temperature < 0 or not 0 < s.top_p <= 1:
                raise ValueError(f"{name}: temperature must be >= 0 and top_p in (0, 1]")

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model

    def allowed_sampling(self) -> list[tuple[float, float]]:
        return [
            (self.train_sampling.temperature, self.train_sampling.top_p),
            (self.validation_sampling.temperature, self.validation_sampling.top_p),
        ]
