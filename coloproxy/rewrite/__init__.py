"""Rewrite layer (pure): make client -> guest copies acceptable to the secondary (queue S-in)."""

from coloproxy.rewrite.ingress import IngressRewriter, OffsetLookup, RewriteOutcome, RewriteStatus

__all__ = ["IngressRewriter", "OffsetLookup", "RewriteOutcome", "RewriteStatus"]
