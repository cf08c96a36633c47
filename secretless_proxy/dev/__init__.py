"""Development helpers: a throw-away PKI and an echo upstream. Never on the request path."""
