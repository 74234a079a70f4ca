"""Stand-ins for image services: they transform JSON descriptions of images."""

from __future__ import annotations

from typing import Any


def adjust(image: dict[str, Any]) -> dict[str, Any]:
    """Normalise brightness to 0.5 and record what was done."""
    return {**image, "brightness": 0.5, "adjusted": True}


def resize(job: dict[str, Any]) -> list[dict[str, Any]]:
    """One rendition per requested width, keeping the aspect ratio."""
    image = job["image"]
    ratio = image["height"] / image["width"]
    return [
        {
            "name": image["name"],
            "width": w,
            "height": round(w * ratio),
            "brightness": image["brightness"],
        }
        for w in job["widths"]
        if w <= image["width"]
    ]


def watermark(job: dict[str, Any]) -> list[dict[str, Any]]:
    return [{**r, "watermark": job["text"]} for r in job["renditions"]]
