"""edgefleet: run ML models on fleets of edge devices. Composition root: CLI and demo."""

__version__ = "0.1.0"
