"""exitbench: trains early-exit networks under one protocol and evaluates every exit policy."""

PROTOCOL_VERSION = 7  # bump when a change alters the numbers a run produces; it is part of every run id
