import pytest
import torch

from orderlab import ranks as R


def test_validate_errors_name_the_problem():
    with pytest.raises(R.RanksError, match=r"shape \[B, L\].*\(4,\)"):
        R.validate(torch.zeros(4, dtype=torch.long))
    with pytest.raises(R.RanksError, match="integer"):
        R.validate(torch.zeros(2, 3))
    with pytest.raises(R.RanksError, match=r"-2 < -1 at \[1, 2\]"):
        R.validate(torch.tensor([[0, 1, 1], [0, 1, -2]]))
    with pytest.raises(R.RanksError, match="tokens must have the shape"):
        R.validate(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(R.RanksError, match=r"\[0, 1\] is given"):
        R.validate(torch.tensor([[0, 0, 1]]), torch.tensor([[3, 9, 9]]), mask_id=9)


def test_dense_and_sets():
    r = torch.tensor([[0, 5, 5, 9, -1, 2], [3, 3, 3, -1, -1, 0]])
    d = R.dense(r)
    assert d.tolist() == [[0, 2, 2, 3, -1, 1], [1, 1, 1, -1, -1, 0]]
    assert R.num_sets(r).tolist() == [3, 1]
    assert R.sets(r) == [[[5], [1, 2], [3]], [[0, 1, 2]]]
