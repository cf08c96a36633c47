"""The admin side: health/metrics listener, the mTLS admin API, its HTTP layer and the admin CLI."""
