"""What the fuzzers found, one regression test each (the inputs are in the corpora too)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from services.boot.tftp_packets import TftpError, parse_oack
from shared.partitions import GPT_HEADER, read_partitions
from shared.vdisk_layout import FORMAT, HEADER, MAGIC, LayoutError, open_chain


def test_an_oack_that_is_not_ascii_is_a_tftp_error() -> None:
    # Was a UnicodeDecodeError out of the client's parse.
    with pytest.raises(TftpError, match="not ASCII"):
        parse_oack(b"\x00\x06\x80lksize\x001428\x00tsize\x00123\x00")


@pytest.mark.parametrize("block_size", [0, 1, 1000, 1 << 30])
def test_a_delta_map_with_an_impossible_block_size_is_a_layout_error(
    tmp_path: Path, block_size: int
) -> None:
    # Block size 0 was a ZeroDivisionError; 1 a bitmap of a bit per byte.
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(8192))
    (tmp_path / "v2.data").write_bytes(bytes(8192))
    bitmap = bytes(-(-(8192 // max(block_size, 1)) // 8) or 1)
    (tmp_path / "v2.map").write_bytes(HEADER.pack(MAGIC, FORMAT, block_size, 8192, 0) + bitmap)
    with pytest.raises(LayoutError, match="block size"):
        open_chain([base, tmp_path / "v2.map"])


@pytest.mark.parametrize("entries_lba", [2**61, 2**64 - 1, 4096])
def test_gpt_entries_outside_the_image_are_no_partition_table(
    tmp_path: Path, entries_lba: int
) -> None:
    # An entries LBA past 2**63 bytes was a ValueError out of seek().
    mbr = bytearray(512)
    mbr[446 + 4] = 0xEE  # a protective MBR
    struct.pack_into("<II", mbr, 446 + 8, 1, 2047)
    mbr[510:512] = b"\x55\xaa"
    head = bytearray(GPT_HEADER.size)
    GPT_HEADER.pack_into(head, 0, b"EFI PART", 0x10000, 92, 0, 0, 1, 2047, 34, 2014,
                         bytes(16), entries_lba, 128, 128, 0)  # fmt: skip
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(mbr) + bytes(head) + bytes((1 << 20) - 512 - len(head)))
    assert read_partitions(image) == []
