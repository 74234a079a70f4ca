"""The pure core: scores, rubric compilation, input mapping and the request state machine.

Nothing here does I/O or reads a clock; time comes in as an argument.
"""
