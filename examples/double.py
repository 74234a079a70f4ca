"""Service B of seed 002, as an external program: reads a number, prints it doubled."""

import json
import sys

value = json.load(sys.stdin)
json.dump(value * 2, sys.stdout)
