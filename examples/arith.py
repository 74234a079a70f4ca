"""Service A of seed 002: adds 2."""


def add_two(value: int) -> int:
    return value + 2
