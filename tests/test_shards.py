"""Shards of a night: disjoint, covering, in catalogue order; bad specs named."""

import pytest

from t2v.errors import InvalidInput
from t2v.shards import parse_shard, select_shard


def test_shards_are_disjoint_and_cover_the_night():
    jobs = list("abcdefg")
    shards = [select_shard(jobs, f"{i}/3") for i in range(3)]
    assert shards == [("a", "d", "g"), ("b", "e"), ("c", "f")]
    assert sorted(j for shard in shards for j in shard) == jobs
    assert select_shard(jobs, None) == tuple(jobs)
    assert select_shard(["a"], "1/2") == ()


@pytest.mark.parametrize("bad", ["2/2", "1", "-1/2", "0/0", "a/b", "1/2/3"])
def test_bad_shards_are_named(bad):
    with pytest.raises(InvalidInput, match="`shard`"):
        parse_shard(bad)
