"""wolkvox-exporter: wolkvox billing usage as Prometheus metrics."""

__version__ = "0.2.0"
