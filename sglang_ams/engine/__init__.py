"""The engine side of the plugin: per-process runtime, request state and the compaction step.

Everything here runs inside SGLang's scheduler process; patches/ wires it to SGLang's functions.
"""
