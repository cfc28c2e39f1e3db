"""coloproxy: the network half of COLO VM fault tolerance.

Pure core (no I/O): ``coloproxy.packet``, ``coloproxy.compare``, ``coloproxy.seq``.
Shell (I/O): ``coloproxy.pcap``, ``coloproxy.cli`` and, later, capture, engine and daemon.
"""

__version__ = "0.1.0"
