"""The job contract and the queue: the one package that knows Redis keys.

FastAPI-free on purpose: the worker imports it, and its image carries no web stack. Split by
concern: `contract` (requests, jobs, statuses), `keys` (every key name), `scripts` (the Lua
steps), `store` (what both sides share), `api_store`, `worker_store`, `webhook_store`, and
`views` (records read back as clients see them).
"""
