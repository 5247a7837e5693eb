"""Imports every built-in filter module so that their `@register` decorators run."""

from filters import access_log, auth, kvcache, prompt, rate_limit, tokenizer  # noqa: F401
