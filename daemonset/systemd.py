"""systemd-managed cgroups changed through systemd's D-Bus API, as a kubelet's systemd driver does.

On a node whose kubelet and runtime use the systemd cgroup driver, the pod's cgroup is a slice
(``kubepods-burstable-pod<uid>.slice``) and runc's container cgroup a scope
(``cri-containerd-<id>.scope``). systemd owns them: on every ``systemctl daemon-reload`` it writes
each unit's properties (CPUQuota=, MemoryMax=, ...) into its cgroup files again, undoing a direct
write. So a change to such a cgroup is made twice, as runc's systemd manager makes it: first
``SetUnitProperties(unit, runtime=true, ...)`` (the same as ``systemctl set-property --runtime``;
gone at reboot, kept across reloads), then the exact value into the file.

D-Bus is spoken with jeepney (pure Python, no C library, blocking calls that fit the agent's threads).
The pure part maps a cgroup file and value to unit properties (``properties_for``); ``Systemd`` does
the calls. A cgroup whose directory is not a loaded unit (the cgroupfs driver, crun's ``container/``
child, a test's fixture tree) is not systemd's: ``unit_of`` and ``Systemd.manages`` say so.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Any

log = logging.getLogger("chaos-agent.systemd")

# systemd's "infinity" for a uint64 property (USEC_INFINITY, CGROUP_LIMIT_MAX).
INFINITY = 2**64 - 1
USEC_PER_SEC = 1_000_000
DEFAULT_CPU_PERIOD_US = 100_000

_DESTINATION = "org.freedesktop.systemd1"
_MANAGER_PATH = "/org/freedesktop/systemd1"
_MANAGER = "org.freedesktop.systemd1.Manager"
_UNIT_SUFFIXES = {".slice": "org.freedesktop.systemd1.Slice", ".scope": "org.freedesktop.systemd1.Scope",
                  ".service": "org.freedesktop.systemd1.Service"}
_UNIT_NAME = re.compile(r"^[A-Za-z0-9:_.\\-]+\.(slice|scope|service)$")

# The unit properties behind each cgroup file cgroupctl writes (systemd.resource-control(5)).
CPU_PROPERTIES = ("CPUQuotaPerSecUSec", "CPUQuotaPeriodUSec")
MEMORY_PROPERTIES = {"memory.max": "MemoryMax", "memory.high": "MemoryHigh", "memory.swap.max": "MemorySwapMax"}
PROPERTIES = CPU_PROPERTIES + tuple(MEMORY_PROPERTIES.values())


class SystemdError(RuntimeError):
    """A D-Bus call to systemd failed; the message names the unit, the call and systemd's answer."""


class NoBus(SystemdError):
    """The system bus cannot be reached (no /run/dbus/system_bus_socket in this mount namespace)."""


# ---- pure ----------------------------------------------------------------------------------------


def unit_of(cgroup_dir: str) -> str | None:
    """The unit a cgroup directory is named after (``.../kubepods-burstable-pod<uid>.slice`` ->
    that slice), or None when the name is not a unit's."""
    name = os.path.basename(os.path.normpath(cgroup_dir))
    return name if _UNIT_NAME.match(name) else None


def _limit(text: str) -> int:
    text = text.strip()
    return INFINITY if text == "max" else int(text)


def properties_for(file_name: str, value: str) -> list[tuple[str, int]]:
    """The unit properties that make systemd write ``value`` into ``file_name``; [] for other files.

    ``cpu.max "150000 100000"`` -> CPUQuotaPerSecUSec 1500000 (and CPUQuotaPeriodUSec when the
    period is not systemd's default 100 ms); ``"max 100000"`` -> infinity. systemd keeps the quota
    per second to 1/100 of a percent (100 us per second) in its drop-in, so a quota that is a whole
    number of 10 us at a 100 ms period comes back exactly after a reload.
    """
    if file_name == "cpu.max":
        quota, _, period = value.strip().partition(" ")
        period_us = int(period) if period else DEFAULT_CPU_PERIOD_US
        per_sec = INFINITY if quota == "max" else -(-int(quota) * USEC_PER_SEC // period_us)
        props = [("CPUQuotaPerSecUSec", per_sec)]
        if period_us != DEFAULT_CPU_PERIOD_US:
            props.append(("CPUQuotaPeriodUSec", period_us))
        return props
    prop = MEMORY_PROPERTIES.get(file_name)
    return [(prop, _limit(value))] if prop else []


def properties_of_files(file_names: Iterable[str]) -> tuple[str, ...]:
    """The unit properties that stand for these cgroup files (to save and put back with them)."""
    names = set(file_names)
    out: list[str] = []
    if "cpu.max" in names:
        out += CPU_PROPERTIES
    out += [p for f, p in MEMORY_PROPERTIES.items() if f in names]
    return tuple(out)


# ---- D-Bus ---------------------------------------------------------------------------------------


class Systemd:
    """systemd's manager on the system bus: which units it has, their properties, SetUnitProperties.

    One connection, opened on first use and again after it breaks; calls are serialized (they are
    few: one per cgroup file a change writes). ``bus`` is a D-Bus address ("unix:path=...") or
    "SYSTEM" (DBUS_SYSTEM_BUS_ADDRESS, else /run/dbus/system_bus_socket).
    """

    def __init__(self, bus: str = "SYSTEM", timeout_s: float = 5.0):
        self.bus = bus
        self.timeout_s = timeout_s
        self._conn: Any = None
        self._lock = threading.Lock()
        self._paths: dict[str, str | None] = {}  # unit -> object path (None: not a unit of systemd's)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _call(self, path: str, interface: str, method: str, signature: str, body: tuple) -> tuple:
        from jeepney import DBusAddress, DBusErrorResponse, new_method_call
        from jeepney.io.blocking import open_dbus_connection

        with self._lock:
            for attempt in (1, 2):
                try:
                    if self._conn is None:
                        self._conn = open_dbus_connection(bus=self.bus)
                    msg = new_method_call(DBusAddress(path, bus_name=_DESTINATION, interface=interface), method,
                                          signature, body)
                    reply = self._conn.send_and_get_reply(msg, timeout=self.timeout_s)
                    from jeepney.wrappers import unwrap_msg

                    return unwrap_msg(reply)
                except DBusErrorResponse as e:
                    raise SystemdError(f"{method} on {path}: {e.name}: {' '.join(map(str, e.data))}") from None
                except (OSError, EOFError, TimeoutError) as e:
                    if self._conn is not None:
                        try:
                            self._conn.close()
                        except OSError:
                            pass
                        self._conn = None
                    if attempt == 2 or isinstance(e, (FileNotFoundError, ConnectionRefusedError, PermissionError)):
                        raise NoBus(f"the system bus ({self.bus}) cannot be reached for {method}: {e}") from None
        raise AssertionError("unreachable")

    def unit_path(self, unit: str) -> str | None:
        """The object path of a loaded unit, or None when systemd has no such unit."""
        if unit in self._paths:
            return self._paths[unit]
        try:
            (path,) = self._call(_MANAGER_PATH, _MANAGER, "GetUnit", "s", (unit,))
        except SystemdError as e:
            if "NoSuchUnit" not in str(e):
                raise
            path = None
        if len(self._paths) > 4096:
            self._paths.clear()
        self._paths[unit] = path
        return path

    def manages(self, cgroup_dir: str) -> str | None:
        """The unit behind ``cgroup_dir`` when systemd manages it (None: write the file alone)."""
        unit = unit_of(cgroup_dir)
        if unit is None:
            return None
        path = self.unit_path(unit)
        if path is None:
            return None
        return unit

    def forget(self, unit: str) -> None:
        """Forget a unit's object path (it went away; a new one of the same name may come)."""
        self._paths.pop(unit, None)

    def get_properties(self, unit: str, names: Iterable[str] = PROPERTIES) -> dict[str, int]:
        """The unit's current values of ``names`` (uint64 properties), as systemd holds them."""
        path = self.unit_path(unit)
        if path is None:
            raise SystemdError(f"no unit {unit} is loaded")
        interface = _UNIT_SUFFIXES[unit[unit.rindex("."):]]
        (values,) = self._call(path, "org.freedesktop.DBus.Properties", "GetAll", "s", (interface,))
        return {n: int(values[n][1]) for n in names if n in values}

    def set_properties(self, unit: str, properties: Mapping[str, int] | Iterable[tuple[str, int]]) -> None:
        """SetUnitProperties(unit, runtime=true, ...): systemd writes the cgroup files and keeps the
        values until reboot, across daemon-reloads (``systemctl set-property --runtime``)."""
        items = list(properties.items()) if isinstance(properties, Mapping) else list(properties)
        if not items:
            return
        body = (unit, True, [(name, ("t", int(value))) for name, value in items])
        try:
            self._call(_MANAGER_PATH, _MANAGER, "SetUnitProperties", "sba(sv)", body)
        except SystemdError as e:
            if "NoSuchUnit" in str(e):
                self.forget(unit)
            shown = ", ".join(f"{n}={'infinity' if v == INFINITY else v}" for n, v in items)
            raise SystemdError(f"SetUnitProperties {unit} {shown}: {e}") from None

    def call_manager(self, method: str, signature: str, body: tuple) -> tuple:
        """Any method of systemd's manager (tests make transient pod slices with StartTransientUnit)."""
        return self._call(_MANAGER_PATH, _MANAGER, method, signature, body)
