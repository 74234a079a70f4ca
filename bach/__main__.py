from __future__ import annotations

from bach.cli import main

main()
