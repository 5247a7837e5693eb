"""Prompt -> token ids exactly as the engine prefills them (chat template + `tokenizers`).

Shared by the gateway's tokenizer filter and the MLX daemon; imports neither."""
