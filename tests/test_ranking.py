"""The highest logits of each row found through its blocks' maxima: what topk and argmax find."""

from __future__ import annotations

import pytest
import torch

from zmqchat.ranking import argmax_rows, top_indices


def crowded_logits(vocabulary: int) -> torch.Tensor:
    """Rows of random logits, the first row's highest crowded into its first blocks."""
    torch.manual_seed(0)
    logits = torch.randn(6, vocabulary)
    crowded = min(200, vocabulary // 2)
    logits[0, :crowded] = 10 + torch.rand(crowded)
    return logits


@pytest.mark.parametrize("vocabulary, k", [(49152, 16), (49152, 64), (1000, 64), (96, 64), (300, 1)])
def test_the_highest_logits_are_those_topk_finds_whether_or_not_blocks_divide_the_row(vocabulary, k):
    logits = crowded_logits(vocabulary).reshape(2, 3, vocabulary)
    got = top_indices(logits, k)
    assert got.shape == (2, 3, k)
    assert torch.equal(got.sort(-1).values, logits.topk(k, dim=-1).indices.sort(-1).values)


@pytest.mark.parametrize("vocabulary", [49152, 1000, 96])
def test_the_highest_logit_is_the_one_argmax_finds_the_first_of_equals(vocabulary):
    logits = crowded_logits(vocabulary)
    logits[1, [5, vocabulary - 1]] = 50  # equals: argmax takes the first
    logits[2] = float("-inf")  # a row a grammar masked whole
    logits[2, vocabulary - 1] = 0
    assert torch.equal(argmax_rows(logits), logits.argmax(-1))
    assert argmax_rows(logits)[1] == 5 and argmax_rows(logits)[2] == vocabulary - 1
