"""benchmarks.module_set: the A/B flags' module constants, set inside the block and restored after it, also when the
block raises."""

from __future__ import annotations

import pytest

import kernels.consumer_expand as ce
from benchmarks.module_set import module_set


def rank_block() -> int:
    return ce.RANK_BLOCK


def test_a_constant_is_set_inside_the_block_and_restored_after_it():
    before = rank_block()
    with module_set(f"kernels.consumer_expand.RANK_BLOCK={before * 2}"):
        assert rank_block() == before * 2
    assert rank_block() == before
    with pytest.raises(RuntimeError), module_set("kernels.consumer_expand.RANK_BLOCK=1"):
        assert rank_block() == 1
        raise RuntimeError
    assert rank_block() == before
    with module_set(None):
        assert rank_block() == before


def test_a_bad_spec_is_refused():
    before = rank_block()
    for spec, error in (("kernels.consumer_expand.NO_SUCH_CONSTANT=1", AttributeError),
                        ("kernels.consumer_expand.RANK_BLOCK=not a literal", ValueError)):
        with pytest.raises(error), module_set(spec):
            pytest.fail(f"the block ran under {spec!r}")
        assert rank_block() == before
        assert not hasattr(ce, "NO_SUCH_CONSTANT")
    with pytest.raises(ValueError, match="literal"), module_set("kernels.consumer_expand.RANK_BLOCK=not a literal"):
        pytest.fail("the block ran under a value that is not a literal")


def test_several_constants_joined_by_semicolons_are_set_together_and_all_restored():
    before, early = rank_block(), ce.EARLY_B_PER_THREAD
    with module_set(f"kernels.consumer_expand.RANK_BLOCK={before * 2};kernels.consumer_expand.EARLY_B_PER_THREAD=7"):
        assert (rank_block(), ce.EARLY_B_PER_THREAD) == (before * 2, 7)
    assert (rank_block(), ce.EARLY_B_PER_THREAD) == (before, early)
    # the second one bad: the first is restored too
    bad = "kernels.consumer_expand.RANK_BLOCK=1;kernels.consumer_expand.NOPE=1"
    with pytest.raises(AttributeError), module_set(bad):
        pytest.fail("the block ran")
    assert rank_block() == before
