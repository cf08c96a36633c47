"""Credential kinds: one provider module per kind, behind one small protocol (``base.Provider``).

``base`` holds the protocol and the value types (``IssuedCredential``, ``RequestContext``,
``CredentialKind``); ``registry.KINDS`` maps each ``kind:`` value to its ``CredentialKind``.
This ``__init__`` imports nothing on purpose: importing ``credentials.base`` must not pull in
every provider (and their HTTP, JWT and AWS libraries).
"""
