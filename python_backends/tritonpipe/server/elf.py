"""The dynamic section of an ELF file: which shared libraries it needs and the soname it has.

Parsed here rather than with ``readelf`` so that packing a bundle needs no binutils.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ElfInfo:
    needed: tuple[str, ...]
    soname: str | None


def read_elf(path: Path) -> ElfInfo | None:
    """DT_NEEDED and DT_SONAME of an ELF file; None when ``path`` is not ELF."""
    with open(path, "rb") as f:
        ident = f.read(16)
        if len(ident) < 16 or ident[:4] != b"\x7fELF":
            return None
        is64 = ident[4] == 2
        end = "<" if ident[5] == 1 else ">"
        if is64:
            header = struct.unpack(end + "HHIQQQIHHHHHH", f.read(48))
            phoff, phentsize, phnum = header[4], header[8], header[9]
            ph_fmt, dyn_fmt = end + "IIQQQQQQ", end + "qQ"
        else:
            header = struct.unpack(end + "HHIIIIIHHHHHH", f.read(36))
            phoff, phentsize, phnum = header[4], header[8], header[9]
            ph_fmt, dyn_fmt = end + "IIIIIIII", end + "iI"
        loads: list[tuple[int, int, int]] = []  # (vaddr, offset, filesz)
        dynamic: tuple[int, int] | None = None
        for i in range(phnum):
            f.seek(phoff + i * phentsize)
            raw = struct.unpack(ph_fmt, f.read(struct.calcsize(ph_fmt)))
            if is64:
                p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = raw[:6]
            else:
                p_type, p_offset, p_vaddr, _paddr, p_filesz = raw[:5]
            if p_type == 1:  # PT_LOAD
                loads.append((p_vaddr, p_offset, p_filesz))
            elif p_type == 2:  # PT_DYNAMIC
                dynamic = (p_offset, p_filesz)
        if dynamic is None:
            return ElfInfo(needed=(), soname=None)  # statically linked
        f.seek(dynamic[0])
        blob = f.read(dynamic[1])
        size = struct.calcsize(dyn_fmt)
        needed_offsets: list[int] = []
        soname_offset: int | None = None
        strtab: int | None = None
        for pos in range(0, len(blob) - size + 1, size):
            tag, value = struct.unpack_from(dyn_fmt, blob, pos)
            if tag == 0:  # DT_NULL
                break
            if tag == 1:  # DT_NEEDED
                needed_offsets.append(value)
            elif tag == 5:  # DT_STRTAB
                strtab = value
            elif tag == 14:  # DT_SONAME
                soname_offset = value
        if strtab is None:
            return ElfInfo(needed=(), soname=None)
        base = next((off + strtab - va for va, off, sz in loads if va <= strtab < va + sz), strtab)

        def string(offset: int) -> str:
            f.seek(base + offset)
            chunk = b""
            while b"\0" not in chunk:
                more = f.read(256)
                if not more:
                    break
                chunk += more
            return chunk.split(b"\0", 1)[0].decode("utf-8", "replace")

        return ElfInfo(
            needed=tuple(string(o) for o in needed_offsets),
            soname=string(soname_offset) if soname_offset is not None else None,
        )
