"""Endpoint discovery: a cluster's endpoints from DNS (A/AAAA/SRV) or a watched file.

`config` holds the `discovery:` block (a leaf), `endpoints` turns what a source
found into endpoint configs and merges them into the gateway config, `dns` and
`file` are the sources, and `watch` runs one watcher per cluster that hands every
change to the hot-reload machinery (`gateway.reload.Generations`).
"""
