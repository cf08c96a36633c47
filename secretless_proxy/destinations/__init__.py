"""Where the proxy connects: address classes, the resolver, admission and pinning of upstream addresses."""
