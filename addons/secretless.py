"""mitmproxy entry script: ``mitmdump -s addons/secretless.py --set secretless_config=FILE``.

A thin shim so the same addon runs under plain mitmdump; ``secretless-proxy run`` is the
leaner, faster way to run it.
"""

from secretless_proxy.addon import Secretless

addons = [Secretless()]
