"""Weight sync: stream the trainer's HF-named weights into running vLLM engines after each step.

- `buckets`      packing `(name, tensor)` streams into byte buckets + manifest; /dev/shm segments
- `sender`       trainer side: `make_sender("shm"|"nccl"|"ipc", urls)`, then `init` / `send`
- `engine_side`  engine side: `engine_kwargs(backend)` for `AsyncEngineArgs`; the pause -> update
                 -> finish -> resume sequence on an `AsyncLLM` (`WeightSyncState`, `apply_update`)
- `routes`       the FastAPI `router` (`/weights/...`) a policy server mounts
- `shm_backend`  runs inside vLLM workers: the `megagym_shm` transfer engine and worker RPCs

This package must not import megatron; `buckets` and `sender` must not need vLLM for "shm".
Import submodules explicitly (nothing is re-exported here, so importing the package stays cheap).
"""
