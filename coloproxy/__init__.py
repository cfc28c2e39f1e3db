"""coloproxy: the network half of COLO VM fault tolerance.

Pure core (no I/O): ``coloproxy.packet``, ``coloproxy.compare``, ``coloproxy.seq``.
Shell (I/O): ``coloproxy.pcap``, ``coloproxy.cli`` and, later, capture, engine and daemon.

The comparator's modules are compiled when installed; ``COLOPROXY_PURE=1`` runs them from
source instead (``coloproxy.variant``).
"""

import os as _os

__version__ = "0.1.0"

if _os.environ.get("COLOPROXY_PURE", "") not in ("", "0"):
    from coloproxy import variant as _variant

    _variant.force_pure()
