"""What was on the host veth before we shaped it, and the pure rules for recording it.

A Snapshot is JSON-serializable (``to_dict`` / ``from_dict``): the agent persists it and hands it
back to ``unshape``. Qdisc options are kept as the raw netlink bytes the kernel dumped, so the
restore sends the kernel exactly what it reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from netshape.errors import OutOfRange, Unrestorable

SNAPSHOT_VERSION = 1
TC_H_ROOT = 0xFFFFFFFF
TC_H_INGRESS = 0xFFFFFFF1

# Qdiscs whose classes only exist when someone adds them: a dump with such classes is a tree we
# would have to rebuild class by class, which we do not do.
USER_CLASS_QDISCS = frozenset({"htb", "hfsc", "cbq", "drr", "qfq", "ets", "atm"})


@dataclass(frozen=True)
class TcObject:
    """One dumped qdisc, class or filter of a device."""

    what: str  # "qdisc", "class" or "filter"
    kind: str  # TCA_KIND: "tbf", "htb", "u32", ...
    handle: int
    parent: int
    info: int = 0
    options: bytes = b""
    redirect_ifindex: int | None = None  # filters: where a mirred action redirects to


@dataclass(frozen=True)
class SavedQdisc:
    """A root qdisc as the kernel dumped it: enough to create it again, byte for byte."""

    kind: str
    handle: int
    options_hex: str

    @property
    def options(self) -> bytes:
        return bytes.fromhex(self.options_hex)


@dataclass(frozen=True)
class Snapshot:
    """The veth's state before shaping, per direction we took over.

    ``root_taken``: we replaced the root qdisc (traffic into the pod); ``root_before`` is what
    was there, None meaning the kernel's default (restored by deleting ours).
    ``ingress_taken``: we put a redirect filter on the ingress hook (traffic out of the pod);
    ``ingress_qdisc_created``: there was no ingress/clsact qdisc, we added it and remove it again.
    """

    host_ifname: str
    target_key: str
    root_taken: bool = False
    root_before: SavedQdisc | None = None
    ingress_taken: bool = False
    ingress_qdisc_created: bool = False
    version: int = field(default=SNAPSHOT_VERSION)

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "host_ifname": self.host_ifname,
            "target_key": self.target_key,
            "root_taken": self.root_taken,
            "root_before": None
            if self.root_before is None
            else {
                "kind": self.root_before.kind,
                "handle": self.root_before.handle,
                "options_hex": self.root_before.options_hex,
            },
            "ingress_taken": self.ingress_taken,
            "ingress_qdisc_created": self.ingress_qdisc_created,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Snapshot:
        version = data.get("version")
        if version != SNAPSHOT_VERSION:
            raise OutOfRange(f"snapshot version {version!r} is not supported; accepted: {SNAPSHOT_VERSION}")
        root = data.get("root_before")
        return cls(
            host_ifname=str(data["host_ifname"]),
            target_key=str(data["target_key"]),
            root_taken=bool(data["root_taken"]),
            root_before=None
            if root is None
            else SavedQdisc(kind=str(root["kind"]), handle=int(root["handle"]), options_hex=str(root["options_hex"])),
            ingress_taken=bool(data["ingress_taken"]),
            ingress_qdisc_created=bool(data["ingress_qdisc_created"]),
        )


def fmt_handle(handle: int) -> str:
    """tc's notation: 8001: or 1:10."""
    major, minor = handle >> 16, handle & 0xFFFF
    return f"{major:x}:" if minor == 0 else f"{major:x}:{minor:x}"


def record_root(ifname: str, objects: list[TcObject]) -> SavedQdisc | None:
    """What to save of the device's root qdisc tree; None = the kernel's default.

    The kernel's default qdiscs (noqueue on a veth, pfifo_fast, mq) have handle 0; any qdisc
    someone added has a non-zero handle. We restore a root qdisc with its own options, including
    the hidden inner queue a TBF makes itself, but not a tree someone built below it (classes
    they added, qdiscs grafted on them, filters): we refuse rather than lose it.
    """
    root = next((o for o in objects if o.what == "qdisc" and o.parent == TC_H_ROOT), None)
    if root is None or root.handle == 0:
        return None
    major = root.handle & 0xFFFF0000
    below = [o for o in objects if o is not root and _under(o, major)]
    grafted = [o for o in below if o.what == "qdisc" and o.handle != 0]
    filters = [o for o in below if o.what == "filter"]
    classes = [o for o in below if o.what == "class"] if root.kind in USER_CLASS_QDISCS else []
    if grafted or filters or classes:
        parts = []
        for name, items in (("classes", classes), ("child qdiscs", grafted), ("filters", filters)):
            if items:
                parts.append(f"{len(items)} {name}")
        raise Unrestorable(
            f"{ifname} has a root qdisc tree {root.kind} {fmt_handle(root.handle)} with {', '.join(parts)}; "
            "netshape restores a single root qdisc (like the CNI bandwidth plugin's tbf) but not a "
            "tree, and refuses to replace it"
        )
    return SavedQdisc(kind=root.kind, handle=root.handle, options_hex=root.options.hex())


def _under(obj: TcObject, major: int) -> bool:
    if obj.what == "filter":
        return obj.parent & 0xFFFF0000 == major and obj.parent != TC_H_INGRESS
    if obj.what == "class":
        return obj.handle & 0xFFFF0000 == major
    return obj.parent & 0xFFFF0000 == major and obj.parent not in (TC_H_ROOT, TC_H_INGRESS)
