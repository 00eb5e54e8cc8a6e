"""Layer `cli`: the click commands (`intellect-node …`). The top layer: it may import every other one.

See docs/architecture.md for the layers."""

from intellect.node.cli.main import main

__all__ = ["main"]
