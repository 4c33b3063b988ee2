"""Colour on the terminal, by the NO_COLOR and FORCE_COLOR conventions.

forge colours only the labels of its messages on stderr (``Error:``); results on stdout are never
coloured, so they can be piped and parsed. The rules, first match wins:

- ``FORCE_COLOR`` set to anything but an empty string or ``0``: colour, even into a pipe or file;
- ``NO_COLOR`` set to a non-empty string (https://no-color.org): no colour;
- otherwise colour only when the stream is a terminal and ``TERM`` is not ``dumb``.
"""

from __future__ import annotations

import os
from typing import TextIO

import click


def color_enabled(stream: TextIO) -> bool:
    """Return whether messages written to `stream` should carry ANSI colour."""
    forced = os.environ.get("FORCE_COLOR", "")
    if forced not in ("", "0"):
        return True
    if os.environ.get("NO_COLOR", ""):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and os.environ.get("TERM") != "dumb"


def echo_error(message: str, stream: TextIO) -> None:
    """Write ``Error: message`` to `stream`, with the label in bold red when colour is enabled."""
    color = color_enabled(stream)
    label = click.style("Error:", fg="red", bold=True) if color else "Error:"
    click.echo(f"{label} {message}", file=stream, color=color)
