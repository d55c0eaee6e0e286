"""Rollout engines: batched generation with per-token logprobs behind SGLang's HTTP protocol."""
