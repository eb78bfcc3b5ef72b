"""Serving: an OpenAI-compatible persona chat server over a continuous-batching engine with a paged KV cache.

`engine` (scheduler, batching, sampling), `kv_cache` (paged blocks + prefix cache), `personas` (built-in
speakers and Character Card V2), `api` (FastAPI app), `metrics` (Prometheus), `client` (`chat --url`),
`commands` (`gigafactory serve`). Reads only the run directory; never imports the trainer.
"""
