"""The OpenAI-compatible policy server on vLLM (`megagym serve`).

config.py   ServerConfig (plain data)       tokens.py      chat rendering + the on-policy token-ID fix
protocol.py request models and errors        sampling.py    the sampling guard
limits.py   bounded work per request         connections.py connection deadlines (uvicorn protocol)
engine.py   AsyncLLM lifecycle, weight hook  app.py         the FastAPI app
cli.py      `megagym serve`                  process.py     start/stop a server subprocess
"""
