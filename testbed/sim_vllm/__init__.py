"""A simulated vLLM server: vLLM's HTTP surface over a modelled engine.

The engine models what a cache-aware router cares about — a block-level prefix
cache with LRU, time to first token that falls with cached prefix, a decode rate
and a concurrency limit with a waiting queue — without running a model, so one
machine can host a fleet of backends. `kvgate sim-vllm` runs it
(see `testbed.sim_vllm.cli`).
"""
