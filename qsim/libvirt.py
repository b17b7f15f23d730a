"""libvirt domain XML (what ``virsh dumpxml`` writes): find the qcow2 disks, write patched copies with a planned
``<metadata_cache><max_size>`` per disk.

Parsed with defusedxml (``pip install 'qsim[libvirt]'``): no DTDs, no entities, nothing fetched from outside, so a
hostile file cannot expand or read anything. A domain's disk is ``<devices><disk>`` with ``<driver type=...>``
(the image format), ``<source file=...>`` or ``<source dev=...>``, ``<target dev=...>`` and, from libvirt 7.0,
``<driver><metadata_cache><max_size unit=...>`` -- the value libvirt passes to QEMU as the combined ``cache-size``.
The input file is only read: a patched copy goes elsewhere, through ``qsim.safeio``.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from .errors import QsimError
from .safeio import atomic_output

# libvirt's scaled integers (virScaleInteger): bytes by default; k/KiB 1024, KB 1000, and so on up to E/EiB/EB.
_UNIT = re.compile(r"^(?:(b|bytes?)|([kmgtpe])(ib)?|([kmgtpe])b)$", re.IGNORECASE)
_POWERS = "kmgtpe"


@dataclass(frozen=True)
class DomainDisk:
    """One disk of a domain: its target (``vda``), image format, source path (None for network disks), and the
    existing ``<metadata_cache><max_size>`` in bytes (None when not set)."""

    domain: str
    target: str
    format: str | None
    source: str | None
    device: str
    max_size: int | None

    @property
    def name(self) -> str:
        """``domain/target``, how qsim names a libvirt disk."""
        return f"{self.domain}/{self.target}"

    @property
    def is_qcow2(self) -> bool:
        return self.format == "qcow2" and self.device == "disk"


@dataclass(frozen=True)
class Domain:
    path: str
    name: str
    disks: tuple[DomainDisk, ...]

    @property
    def qcow2_disks(self) -> list[DomainDisk]:
        return [d for d in self.disks if d.is_qcow2]


def parse_scaled(text: str | None, unit: str | None, where: str) -> int:
    """A libvirt scaled integer (``<max_size unit='KiB'>1024</max_size>``) in bytes."""
    value = (text or "").strip()
    if not value.isdigit():
        raise QsimError(f"{where}: max_size {value!r} is not a whole number")
    m = _UNIT.match((unit or "bytes").strip())
    if not m:
        raise QsimError(f"{where}: unknown unit {unit!r} (libvirt takes bytes, KiB, MiB, GiB, KB, MB, ...)")
    if m.group(1):
        return int(value)
    letter = (m.group(2) or m.group(4)).lower()
    base = 1000 if m.group(4) else 1024
    return int(value) * base ** (_POWERS.index(letter) + 1)


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise QsimError(f"{path}: no such domain XML file") from None
    except OSError as exc:
        raise QsimError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _parse(path: str, data: bytes) -> ET.Element:
    """The document's root, parsed safely (a DTD, an entity or an external reference is refused)."""
    try:
        from defusedxml import DefusedXmlException
        from defusedxml.ElementTree import DefusedXMLParser
    except ImportError:
        raise QsimError("reading libvirt XML needs defusedxml: pip install 'qsim[libvirt]'", status=2) from None
    parser = DefusedXMLParser(target=ET.TreeBuilder(), forbid_dtd=True)
    try:
        parser.feed(data)
        return parser.close()
    except ET.ParseError as exc:
        line, column = exc.position
        raise QsimError(f"{path}:{line}: not well-formed XML (column {column + 1})") from None
    except DefusedXmlException as exc:
        raise QsimError(f"{path}: refused: {exc} (domain XML needs no DTD or entities)") from None


def read_domain(path: str) -> Domain:
    """The domain's name and its disks, in document order."""
    root = _parse(path, _read(path))
    if root.tag != "domain":
        raise QsimError(f"{path}: not libvirt domain XML (the root element is <{root.tag}>, expected <domain>)")
    name = (root.findtext("name") or "").strip()
    if not name:
        raise QsimError(f"{path}: the domain has no <name>")
    disks = []
    for k, disk in enumerate(root.findall("./devices/disk")):
        target = disk.find("target")
        dev = target.get("dev") if target is not None else None
        if not dev:
            raise QsimError(f"{path}: disk {k + 1} of domain {name} has no <target dev=...>")
        driver = disk.find("driver")
        source = disk.find("source")
        src = None
        if source is not None:
            src = source.get("file") or source.get("dev") or source.get("volume")
        max_size = None
        size_el = driver.find("./metadata_cache/max_size") if driver is not None else None
        if size_el is not None:
            max_size = parse_scaled(size_el.text, size_el.get("unit"), f"{path}: {name}/{dev}")
        disks.append(DomainDisk(name, dev, driver.get("type") if driver is not None else None, src,
                                disk.get("device", "disk"), max_size))
    targets = [d.target for d in disks]
    if len(set(targets)) != len(targets):
        raise QsimError(f"{path}: domain {name} names target {next(t for t in targets if targets.count(t) > 1)} twice")
    return Domain(path, name, tuple(disks))


def patched_xml(path: str, max_sizes: dict[str, int]) -> bytes:
    """The domain XML with ``<metadata_cache><max_size unit='bytes'>`` set for each target in ``max_sizes``
    (replacing what was there), indented as virsh indents. Every other byte stays as it was: the edits are spliced
    into the original text at the positions the parser reports, so a diff shows only them."""
    data = _read(path)
    _parse(path, data)  # refuses what is unsafe before the positional pass below
    root = _element_tree(data)
    edits, seen = [], set()
    for devices in _children(root, "devices"):
        for disk in _children(devices, "disk"):
            dev = next((t["attrs"].get("dev") for t in _children(disk, "target")), None)
            if dev not in max_sizes:
                continue
            seen.add(dev)
            edits.append(_metadata_cache_edit(data, disk, int(max_sizes[dev])))
    missing = set(max_sizes) - seen
    if missing:
        raise QsimError(f"{path}: no disk with target {', '.join(sorted(missing))}")
    for start, end, text in sorted(edits, reverse=True):
        data = data[:start] + text.encode("utf-8") + data[end:]
    return data


def _metadata_cache_edit(data: bytes, disk: dict, max_size: int) -> tuple[int, int, str]:
    """(start, end, replacement) that gives ``disk`` a ``<metadata_cache>`` of ``max_size`` bytes."""
    driver = next(iter(_children(disk, "driver")), None)
    if driver is None:  # libvirt writes <driver> first in a disk
        indent = _indent(data, disk["start"]) + "  "
        text = f"\n{indent}<driver name='qemu' type='qcow2'>{_cache_xml(indent, max_size)}\n{indent}</driver>"
        return disk["tag_end"], disk["tag_end"], text
    indent = _indent(data, driver["start"])
    cache = next(iter(_children(driver, "metadata_cache")), None)
    if cache is not None:
        return cache["start"], cache["end"], _cache_xml(indent, max_size).lstrip()
    if driver["empty"]:
        return driver["tag_end"] - 2, driver["tag_end"], f">{_cache_xml(indent, max_size)}\n{indent}</driver>"
    # children already: the new one goes last, on the line the end tag's indentation starts
    block = _cache_xml(indent, max_size)[1 + len(indent):]
    return driver["close_start"], driver["close_start"], f"{block}\n{indent}"


def _cache_xml(indent: str, max_size: int) -> str:
    """A newline, then the element at one level (two spaces) below ``indent``."""
    inner = indent + "  "
    return (f"\n{inner}<metadata_cache>\n{inner}  <max_size unit='bytes'>{max_size}</max_size>\n"
            f"{inner}</metadata_cache>")


def _indent(data: bytes, start: int) -> str:
    line_start = data.rfind(b"\n", 0, start) + 1
    before = data[line_start:start].decode("utf-8", "replace")
    return before if not before.strip() else ""


def _children(node: dict, name: str) -> list[dict]:
    return [c for c in node["children"] if c["name"] == name]


def _element_tree(data: bytes) -> dict:
    """Every element with its byte positions: ``start`` (its '<'), ``tag_end`` (after the start tag's '>'),
    ``close_start`` (the end tag's '<'), ``end`` (after the element), ``empty`` (written as ``<x/>``)."""
    from xml.parsers import expat

    parser = expat.ParserCreate()
    stack: list[dict] = [{"name": None, "children": []}]

    def start(name, attrs):
        pos = parser.CurrentByteIndex
        tag_end = _tag_end(data, pos)
        node = {"name": name, "attrs": attrs, "start": pos, "tag_end": tag_end,
                "empty": data[tag_end - 2:tag_end] == b"/>", "children": []}
        stack[-1]["children"].append(node)
        stack.append(node)

    def end(name):
        node = stack.pop()
        if node["empty"]:
            node["close_start"] = node["end"] = node["tag_end"]
        else:
            node["close_start"] = parser.CurrentByteIndex
            node["end"] = _tag_end(data, parser.CurrentByteIndex)

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.Parse(data, True)
    return stack[0]["children"][0]


def _tag_end(data: bytes, pos: int) -> int:
    """The offset just after the tag starting at ``pos`` ('>' outside quoted attribute values)."""
    quote = None
    for i in range(pos, len(data)):
        ch = data[i:i + 1]
        if quote:
            if ch == quote:
                quote = None
        elif ch in (b"'", b'"'):
            quote = ch
        elif ch == b">":
            return i + 1
    raise QsimError("unterminated tag")  # cannot happen after a successful parse


def write_patched(path: str, out_path: str, max_sizes: dict[str, int]) -> None:
    """Write the patched copy to ``out_path`` (never over ``path`` itself)."""
    if os.path.exists(out_path) and os.path.samefile(path, out_path):
        raise QsimError(f"{out_path}: is the input domain XML; qsim never changes a file in place (write elsewhere)")
    data = patched_xml(path, max_sizes)
    with atomic_output(out_path) as f:
        f.write(data)


def read_mapping(path: str) -> dict[str, str]:
    """A mapping file: one ``DISK TRACE`` pair a line (``#`` starts a comment), DISK being ``domain/target`` or the
    image's path as the domain XML names it, TRACE the name the sweep gave the trace (or its file name's stem)."""
    mapping: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise QsimError(f"{path}: no such mapping file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise QsimError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    for number, line in enumerate(lines, 1):
        fields = line.split("#", 1)[0].replace("=", " ").split()
        if not fields:
            continue
        if len(fields) != 2:
            raise QsimError(f"{path}:{number}: expected 'DISK TRACE' (domain/target or image path, then a trace "
                            f"name), got {line.strip()!r}")
        if fields[0] in mapping:
            raise QsimError(f"{path}:{number}: {fields[0]} is mapped twice")
        mapping[fields[0]] = fields[1]
    return mapping


def disk_names(disk: DomainDisk) -> list[str]:
    """Names a trace may carry to be this disk's, by default: the image file's stem, ``domain-target``."""
    names = [f"{disk.domain}-{disk.target}"]
    if disk.source:
        names.insert(0, os.path.basename(disk.source).split(".")[0])
    return names


def map_disks(disks: list[DomainDisk], traces: dict[str, set[str]], mapping: dict[str, str] | None = None,
              mapping_path: str = "--map") -> dict[str, str]:
    """Each disk's trace (``domain/target`` -> trace name): from ``mapping`` where it names the disk, else the one
    trace whose name (or alias, in ``traces``: name -> aliases) equals one of ``disk_names``."""
    mapping = mapping or {}
    known = {d.name for d in disks} | {d.source for d in disks if d.source}
    for key in mapping:
        if key not in known:
            raise QsimError(f"{mapping_path}: {key} is not a qcow2 disk of the domains given")
    out = {}
    for disk in disks:
        wanted = mapping.get(disk.name) or (mapping.get(disk.source) if disk.source else None)
        candidates = [wanted] if wanted else disk_names(disk)
        found = sorted({name for name, aliases in traces.items() for c in candidates if c in aliases})
        if len(found) > 1:
            raise QsimError(f"{disk.name}: several traces match ({', '.join(found)}); say which in a --map file")
        if not found:
            how = f"{mapping_path} maps it to {wanted}, which is not" if wanted else \
                f"no trace is named {' or '.join(candidates)}, and it is not in a --map file; not"
            raise QsimError(f"{disk.name} ({disk.source}): {how} among the traces")
        out[disk.name] = found[0]
    return out
