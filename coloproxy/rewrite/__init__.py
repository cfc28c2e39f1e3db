"""Rewrite layer (pure): the secondary's TCP sequence spaces (queue S-in, and after a takeover
the SVM's output), learnt on host S."""

from coloproxy.rewrite.ingress import IngressRewriter, OffsetLookup, RewriteOutcome, RewriteStatus
from coloproxy.rewrite.secondary import SecondaryRewriter

__all__ = [
    "IngressRewriter",
    "OffsetLookup",
    "RewriteOutcome",
    "RewriteStatus",
    "SecondaryRewriter",
]
