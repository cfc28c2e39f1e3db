"""The daemon (shell): wiring capture, comparator, rewriter, control socket and metrics."""
