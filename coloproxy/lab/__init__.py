"""The lab: a host pair, its LAN and a client on one machine, built from network namespaces.

``topology`` builds the namespaces and links (shell); tests use it as is, and the lab runs
QEMU (``vms``, ``qemu``) and coloproxy (``configs``) inside its host namespaces. ``lab``
brings it up and down, ``client`` is its HTTP client, ``demo`` the demo, ``filters`` the
driver of the ``--qemu-filters`` mode; ``console`` and ``diskcheck`` read the guest's checkers.
"""
