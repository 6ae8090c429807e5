"""The IPython extension: ``%load_ext session_watchdog`` and the ``%watchdog`` line magic.
"""

from __future__ import annotations

import sys
from typing import Any, Dict

from session_watchdog import channel
from session_watchdog.config import ConfigError
from session_watchdog.notebook.handle import _start, stop
from session_watchdog.notebook.status import status
from session_watchdog.notebook.wait import wait

# --------------------------------------------------------------------------------------------
# IPython extension: %load_ext session_watchdog


_MAGIC_USAGE = ("usage: %watchdog [status | wait | stop | start key=value ...]\n"
                "  status  the session clock, machine, trainer and pending requests\n"
                "  wait    block with a live view until training ends (keeps Colab busy)\n"
                "  stop    stop the watchdog (training is not touched)\n"
                "  start   start it, e.g. %watchdog start max_session=11h30m")


def _watchdog_magic(line: str) -> Any:
    """``%watchdog status|wait|stop|start key=value ...``."""
    words = line.split()
    command, args = (words[0], words[1:]) if words else ("status", [])
    if command == "status" and not args:
        return status()
    if command == "wait" and not args:
        return wait()
    if command == "stop" and not args:
        stop()
        return None
    if command == "start":
        overrides: Dict[str, str] = {}
        for arg in args:
            key, sep, value = arg.partition("=")
            if not sep or not key:
                print(f"%watchdog start: expected key=value, got {arg!r}", file=sys.stderr)
                return None
            overrides[key] = value
        try:
            handle = _start(overrides, stacklevel=2)
        except (ConfigError, RuntimeError, channel.ChannelError) as err:
            print(f"session-watchdog: error: {err}", file=sys.stderr)
            return None
        print(f"session-watchdog: {handle!r}")
        return None
    print(_MAGIC_USAGE, file=sys.stderr)
    return None


def load_ipython_extension(ip: Any) -> None:
    """``%load_ext session_watchdog``: start with defaults, hooks and the ``%watchdog`` magic.

    A watchdog already started with ``start(...)`` is kept as it is (no comparison with the
    defaults: loading the extension is not a request for different settings).
    """
    ip.register_magic_function(_watchdog_magic, magic_kind="line", magic_name="watchdog")
    try:
        handle = _start({}, shell=ip, compare=False)
    except (ConfigError, RuntimeError, channel.ChannelError) as err:  # one line, no traceback
        print(f"session-watchdog: not started: {err}", file=sys.stderr)
        return
    print(f"session-watchdog: {handle!r}; %watchdog status | wait | stop")


def unload_ipython_extension(ip: Any) -> None:
    """``%unload_ext session_watchdog``: stop the watchdog and remove the magic."""
    stop()
    ip.magics_manager.magics["line"].pop("watchdog", None)
