"""The edge: what reaches the proxy port before and around a flow (protocols, limits, heads, WebSockets, shutdown)."""
