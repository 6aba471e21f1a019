"""The OpenAI-compatible policy server on vLLM (`megagym serve`).

config.py   ServerConfig (plain data)      tokens.py  chat rendering + the on-policy token-ID fix
protocol.py request models and errors       sampling.py the sampling guard
engine.py   AsyncLLM lifecycle, weight hook app.py     the FastAPI app        cli.py  `megagym serve`
"""
