"""kvproto: the LMCache controller wire protocol (chunk keys, messages, worker side).

A leaf package: it imports nothing else from the project.
"""
