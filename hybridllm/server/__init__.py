"""`hybridllm serve`: an HTTP server compatible with OpenAI clients and llama.cpp's llama-server.

    hybridllm serve model.gguf [--host 127.0.0.1] [--port 8080] [--ctx 4096] [--parallel 1] [--token T]

Endpoints: /v1/chat/completions, /v1/completions, /v1/models, /completion (llama-server's native API,
streamed or not), /tokenize, /detokenize, /apply-template, /props, /slots, /metrics (Prometheus), /health
(503 while loading, "ok", or "degraded" with a reason).

Layout: `engine_api` is the narrow interface the server needs from whatever runs the model, and
`local_engine` adapts hybridllm's in-process engine to it; `params` validates requests, `slots` limits
concurrent generations (FIFO queue beyond --parallel), `generation` runs one (SSE or not), `openai_api`
and `native_api` are the routes, `app` ties them together and `cli` registers the subcommand.
"""
