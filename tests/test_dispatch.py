"""The lean Master's hook dispatch (secretless_proxy.dispatch) behaves as mitmproxy's own."""

from __future__ import annotations

import asyncio
import logging

from mitmproxy import addonmanager, exceptions, master, options
from mitmproxy.proxy.layers.http import HttpRequestHook
from mitmproxy.test import tflow

from secretless_proxy import dispatch


class Recorder:
    def __init__(self, name: str, calls: list[str], *, fail: bool = False, halt: bool = False, sub=None) -> None:
        self.name, self.calls, self.fail, self.halt = name, calls, fail, halt
        if sub is not None:
            self.addons = [sub]

    def request(self, flow) -> None:
        self.calls.append(self.name)
        if self.fail:
            raise RuntimeError(f"boom in {self.name}")
        if self.halt:
            raise exceptions.AddonHalt()


class AsyncRecorder(Recorder):
    async def request(self, flow) -> None:  # type: ignore[override]
        await asyncio.sleep(0)
        self.calls.append(self.name)


def managers() -> tuple[addonmanager.AddonManager, addonmanager.AddonManager]:
    ours = master.Master(options.Options()).addons
    dispatch.install(ours)
    return master.Master(options.Options()).addons, ours


async def fire(manager: addonmanager.AddonManager) -> None:
    await manager.trigger_event(HttpRequestHook(tflow.tflow()))


def chain(calls: list[str], **kw) -> list[object]:
    return [Recorder("a", calls), AsyncRecorder("b", calls, sub=Recorder("b.sub", calls, **kw)), Recorder("c", calls)]


class TestDispatch:
    async def test_same_order_as_mitmproxy_with_sub_addons_and_async_hooks(self) -> None:
        """Handlers run in chain order, a parent before its sub-addons, async ones awaited in place."""
        theirs, ours = managers()
        seen_theirs: list[str] = []
        seen_ours: list[str] = []
        theirs.add(*chain(seen_theirs))
        ours.add(*chain(seen_ours))
        await fire(theirs)
        await fire(ours)
        assert seen_ours == seen_theirs == ["a", "b", "b.sub", "c"]

    async def test_an_error_is_logged_and_skips_only_the_rest_of_that_addon(self, caplog) -> None:
        """An exception in one handler: logged as mitmproxy's 'Addon error', the next top-level addon still runs."""
        theirs, ours = managers()
        seen_theirs: list[str] = []
        seen_ours: list[str] = []
        theirs.add(Recorder("a", seen_theirs, fail=True, sub=Recorder("a.sub", seen_theirs)), Recorder("c", seen_theirs))
        ours.add(Recorder("a", seen_ours, fail=True, sub=Recorder("a.sub", seen_ours)), Recorder("c", seen_ours))
        with caplog.at_level(logging.ERROR):
            await fire(theirs)
            await fire(ours)
        assert seen_ours == seen_theirs == ["a", "c"]
        assert sum("Addon error: boom in a" in r.getMessage() for r in caplog.records) == 2

    async def test_addon_halt_stops_the_chain(self) -> None:
        """AddonHalt from a handler ends the dispatch of that hook, as in mitmproxy."""
        _, ours = managers()
        seen: list[str] = []
        ours.add(Recorder("a", seen, halt=True), Recorder("c", seen))
        await fire(ours)
        assert seen == ["a"]

    async def test_the_table_follows_the_chain(self) -> None:
        """An addon added or removed after a hook was dispatched is (no longer) called."""
        _, ours = managers()
        seen: list[str] = []
        first = Recorder("a", seen)
        ours.add(first)
        await fire(ours)
        ours.add(Recorder("c", seen))
        await fire(ours)
        ours.remove(first)
        await fire(ours)
        assert seen == ["a", "a", "c", "c"]

    async def test_install_is_idempotent(self) -> None:
        """Installing twice keeps one wrapper (add is wrapped once)."""
        _, ours = managers()
        add = ours.add
        dispatch.install(ours)
        assert ours.add is add

    async def test_a_non_callable_hook_is_logged_like_mitmproxy(self, caplog) -> None:
        """A hook attribute that is not callable: mitmproxy's 'Addon error' per dispatch, the next addon still runs."""
        theirs, ours = managers()
        seen_theirs: list[str] = []
        seen_ours: list[str] = []

        class Broken:
            request = 42

        theirs.add(Broken(), Recorder("c", seen_theirs))
        ours.add(Broken(), Recorder("c", seen_ours))
        with caplog.at_level(logging.ERROR):
            await fire(theirs)
            await fire(ours)
        assert seen_ours == seen_theirs == ["c"]
        assert sum("not callable" in r.getMessage() for r in caplog.records) == 2
