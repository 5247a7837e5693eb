"""The kernel: leaves every other package builds on (request context, replies, errors,
config decoding, circuit breaker, resilience). Imports nothing else of the project."""
