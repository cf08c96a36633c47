"""Hook dispatch for the lean Master, with each hook's handlers looked up once (speed, not behaviour).

mitmproxy's ``AddonManager.trigger_event`` walks the whole chain for every hook of every request:
for each top-level addon a coroutine (``invoke_addon``), a generator over the addon and its
sub-addons (``traverse``) and a ``getattr`` per addon, then the arguments. A request fires about
ten hooks (``requestheaders``, ``request``, ``responseheaders``, ``response`` and an ``update``
after each), and most addons implement none of them. A py-spy profile of bench case (c) put that
walk at ~5 % of the proxy's CPU.

``install`` replaces ``trigger_event`` on one manager with the same dispatch over a table of
``hook name -> [(top-level addon, [handlers])]``, built on first use and dropped whenever the
chain changes (``add``, ``remove``, ``register``, ``clear``). Same order, same ``safecall`` per
top-level addon (an error in one addon's handler is logged and skips the rest of that addon's
handlers, as mitmproxy does), same ``AddonHalt``. Only ``secretless-proxy run`` installs it: its
chain is fixed once built. Under ``mitmdump -s`` scripts add and drop sub-addons as they reload,
so mitmproxy's own dispatch stays.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable
from typing import Any

from mitmproxy import exceptions, hooks
from mitmproxy.addonmanager import AddonManager, safecall, traverse

Table = dict[str, list[list[Callable[..., Any]]]]


def handlers(chain: list[Any], name: str) -> list[list[Callable[..., Any]]]:
    """For each top-level addon in ``chain`` with a ``name`` hook (its own or a sub-addon's), the handlers in order."""
    out = []
    for top in chain:
        funcs = []
        for addon in traverse([top]):
            func = getattr(addon, name, None)
            if not func or isinstance(func, types.ModuleType):  # e.g. `from mitmproxy import log`
                continue
            if not callable(func):
                # mitmproxy raises this inside safecall on every dispatch: logged, the rest of that
                # top-level addon skipped, the next one still run. Same here, not at table build.
                funcs.append(_not_callable(name, addon))
                continue
            funcs.append(func)
        if funcs:
            out.append(funcs)
    return out


def _not_callable(name: str, addon: Any) -> Callable[..., None]:
    def fail(*args: Any) -> None:
        raise exceptions.AddonManagerError(f"Addon handler {name} ({addon}) not callable")
    return fail


def install(manager: AddonManager) -> None:
    """Give ``manager`` the table-driven ``trigger_event`` (idempotent)."""
    if getattr(manager, "_secretless_dispatch", False):
        return
    table: Table = {}

    def invalidating(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            table.clear()
            try:
                return method(*args, **kwargs)
            finally:
                table.clear()  # load hooks run inside may have looked a hook up meanwhile
        return wrapper

    for name in ("add", "remove", "register", "clear"):
        setattr(manager, name, invalidating(getattr(manager, name)))

    async def trigger_event(event: hooks.Hook) -> None:
        entries = table.get(event.name)
        if entries is None:
            entries = table[event.name] = handlers(manager.chain, event.name)
        for funcs in entries:
            try:
                with safecall():
                    for func in funcs:
                        res = func(*event.args())
                        if res is not None and inspect.isawaitable(res):
                            await res
            except exceptions.AddonHalt:
                return

    manager.trigger_event = trigger_event  # type: ignore[method-assign]
    manager._secretless_dispatch = True  # type: ignore[attr-defined]
