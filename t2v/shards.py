"""Splitting a night's jobs between GPU workers: shard `i/n` takes every n-th job starting at the i-th.

The shards of one `n` are disjoint and together cover the catalogue, so n flow runs (one per GPU
worker, each with its own shard) make every clip once, with no coordination between them beyond the
catalogue's order. Round-robin rather than contiguous slices spreads the expensive templates of a
catalogue sorted by size over all GPUs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TypeVar

from t2v.errors import InvalidInput

T = TypeVar("T")
_SHARD = re.compile(r"(\d+)/(\d+)")


def parse_shard(shard: str) -> tuple[int, int]:
    """`"1/4"` -> (1, 4); raises InvalidInput unless it is `i/n` with 0 <= i < n."""
    match = _SHARD.fullmatch(shard.strip())
    if match is None or not 0 <= int(match[1]) < int(match[2]):
        raise InvalidInput(f"`shard` has to be i/n with 0 <= i < n, such as 0/2, but is {shard!r}.")
    return int(match[1]), int(match[2])


def select_shard(jobs: Sequence[T], shard: str | None) -> tuple[T, ...]:
    """The jobs of `shard` in catalogue order; all of them when `shard` is None."""
    if shard is None:
        return tuple(jobs)
    index, count = parse_shard(shard)
    return tuple(jobs[index::count])
