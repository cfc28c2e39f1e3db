"""The ``net`` layer: what coloproxy sets up in a host's network stack (docs/data-path.md).

| module | pure? | does |
|---|---|---|
| ``rules`` | pure | names of our links and chain; the ``iptables-restore`` text for one pair |
| ``host`` | shell | creates and removes a host's links, bridge, VXLAN, tc mirror and rules |
| ``netns`` | shell | creates and deletes network namespaces, runs code and commands inside one |

This module imports nothing from its submodules, so importing the pure ``rules`` does not
drag the shell in (tests/test_purity.py follows imports).
"""

from coloproxy.errors import ColoproxyError


class NetError(ColoproxyError):
    """A netlink request, a sysctl write or an iptables command failed.

    The message names the object or command that failed; ``__cause__`` is the original
    exception (a pyroute2 ``NetlinkError``, an ``OSError``) when there is one.
    """
