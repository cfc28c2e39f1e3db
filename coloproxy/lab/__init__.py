"""The lab: a host pair, its LAN and a client on one machine, built from network namespaces.

``topology`` builds the namespaces and links (shell); tests use it as is, and the lab runs
QEMU and coloproxy inside its host namespaces.
"""
