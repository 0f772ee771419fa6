"""Health checks for ``orch check``: host probes, link probes, and the parsers of macOS
command output (Thunderbolt topology, interfaces, Metal memory) they rely on."""
