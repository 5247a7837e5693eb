"""Pickers: choose one endpoint among a request's eligible candidates.

One picker per module, registered by type name (`registry.register_picker`), selected
per cluster in YAML (`picker: {type: ..., config: {...}}` or the short form
`lb_policy: NAME`). `builtins` lists the built-in modules.
"""
