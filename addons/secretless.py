"""mitmproxy entry script: ``mitmdump -s addons/secretless.py --set secretless_config=FILE``.

A thin shim so the same addons run under plain mitmdump: the ``Secretless`` addon and the
admin listeners that ``server.py`` owns, in the order ``secretless-proxy run`` loads them.
``secretless-proxy run`` is the leaner, faster way to run them.
"""

from secretless_proxy.server import secretless_addons

addons = secretless_addons()
