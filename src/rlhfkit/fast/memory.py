"""Trainable weights that live in a memory-mapped checkpoint get their own memory before training."""

from __future__ import annotations

import bisect

import torch


def file_mapped_ranges() -> list[tuple[int, int]]:
    """Sorted (start, end) address ranges of this process's file-backed mappings; empty where
    ``/proc/self/maps`` does not exist (not Linux)."""
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:  # "start-end perms offset dev inode [path]"; inode 0: anonymous
                fields = line.split()
                if len(fields) >= 6 and fields[4] != "0":
                    start, end = fields[0].split("-")
                    ranges.append((int(start, 16), int(end, 16)))
    except OSError:
        return []
    return sorted(ranges)


def copy_file_mapped(params: list[torch.Tensor]) -> int:
    """Give trainable weights that still live in a memory-mapped checkpoint their own memory;
    returns how many were copied.

    Why: ``from_pretrained`` maps safetensors files copy-on-write and an fp32 weight of the
    file's dtype stays a view of the mapping, so the first optimizer step writes every page of
    it and each write faults and copies one page; one copy here is ~8x cheaper (bench/README.md,
    "The first step's copy-on-write faults"). Weights already in anonymous memory (built,
    converted, LoRA) are left.
    """
    ranges = file_mapped_ranges()
    copied = 0
    with torch.no_grad():
        for p in params:
            if in_file_mapping(p, ranges):
                p.data = p.data.clone()
                copied += 1
    return copied


def in_file_mapping(tensor: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    """Whether a CPU tensor's memory starts inside one of ``ranges`` (``file_mapped_ranges()``)."""
    if tensor.device.type != "cpu" or tensor.numel() == 0:
        return False
    address = tensor.data_ptr()
    i = bisect.bisect_right(ranges, (address, float("inf"))) - 1
    return i >= 0 and address < ranges[i][1]
