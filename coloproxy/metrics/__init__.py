"""Prometheus metrics of one proxy (shell).

=============  ==============================================================================
``figures``    what the parts count, in the shapes read at scrape time (protocols, the engine's)
``families``   what each source becomes at scrape time: the metric families, in their order
``collector``  ``Metrics``: the registry and the sources attached to it, read at each scrape
``server``     ``MetricsServer``: ``GET /metrics`` over HTTP/1.1 on the event loop
=============  ==============================================================================
"""

from coloproxy.metrics.collector import Metrics
from coloproxy.metrics.families import protocol_label
from coloproxy.metrics.figures import EngineFigures, Histogram
from coloproxy.metrics.server import MetricsError, MetricsServer

__all__ = [
    "EngineFigures",
    "Histogram",
    "Metrics",
    "MetricsError",
    "MetricsServer",
    "protocol_label",
]
