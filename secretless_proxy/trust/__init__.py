"""Workload identity: SPIFFE IDs, trust bundles per trust domain, the proof a connection carries."""
