import itertools
from collections import Counter

import pytest
import torch

from orderlab import ranks as R
from orderlab.builder import build
from orderlab.tasks import StarGraph, hash_split


def walk(edges, start, goal):
    """Reference: follow the unique path from start to goal by depth-first search over the edge list."""
    out = {}
    for a, b in edges:
        out.setdefault(a, []).append(b)
    stack = [[start]]
    while stack:
        p = stack.pop()
        if p[-1] == goal:
            return p
        stack.extend(p + [b] for b in out.get(p[-1], []))
    return None


@pytest.mark.parametrize("degree,path_len,nodes", [(3, 5, 50), (2, 5, 50), (5, 3, 11)])
def test_graphs_are_stars_and_the_answer_is_the_path(degree, path_len, nodes):
    t = StarGraph(degree, path_len, nodes)
    x, r = t.batch(300, "train", seed=1)
    E = degree * (path_len - 1)
    assert t.seq_len == 3 * E + 3 + path_len and t.vocab_size == nodes + 3 and x.shape == (300, t.seq_len)
    R.validate(r, x, mask_id=t.mask_id)
    assert (r[:, : t.prompt_len] == 0).all() and (r[:, t.prompt_len :] == 1).all()
    first_is_path_edge = 0
    for row in x.tolist():
        edges = [tuple(e) for e in t.edge_list(torch.tensor([row]))[0].tolist()]
        assert row[3 * E - 1 :][:4] == [t.slash, row[3 * E], row[3 * E + 1], t.equals]
        start, goal, path = row[3 * E], row[3 * E + 1], row[t.prompt_len :]
        labels = {v for e in edges for v in e}
        assert len(labels) == 1 + E and max(labels) < nodes  # distinct labels
        deg = Counter(a for a, _ in edges)
        assert deg[start] == degree and all(c == 1 for v, c in deg.items() if v != start)  # a star of paths
        assert goal not in deg and goal != start  # the goal is a leaf
        assert path == walk(edges, start, goal) and len(path) == path_len
        first_is_path_edge += edges[0] in set(zip(path, path[1:]))
    # the edge list is shuffled: the first edge is on the path about 1/degree of the time
    assert abs(first_is_path_edge / 300 - 1 / degree) < 0.1


def test_reverse_targets_and_render():
    fwd, rev = StarGraph(), StarGraph(reverse=True)
    x, _ = fwd.batch(16, "test", seed=0)
    xr, _ = rev.batch(16, "test", seed=0)
    assert torch.equal(x[:, : fwd.prompt_len], xr[:, : fwd.prompt_len])
    assert torch.equal(x[:, fwd.prompt_len :].flip(1), xr[:, fwd.prompt_len :])
    t = StarGraph(degree=2, path_len=3, nodes=5)
    tok = torch.tensor([3, 1, t.bar, 0, 3, t.bar, 0, 2, t.bar, 2, 4, t.slash, 0, 1, t.equals, 0, 3, 1])
    assert t.render(tok) == "3,1|0,3|0,2|2,4/0,1=0,3,1"
    tok[-2] = t.mask_id
    assert t.render(tok) == "3,1|0,3|0,2|2,4/0,1=0,?,1"


def test_splits_disjoint_by_graph_exhaustive_on_a_tiny_space():
    t = StarGraph(degree=2, path_len=2, nodes=4)  # 4 centres x 3 goals x 2 other leaves = 24 graphs
    def key(row):
        return frozenset(map(tuple, t.edge_list(torch.tensor([row]))[0].tolist())), row[6], row[7]

    seen = {}
    for k, split in enumerate(("train", "valid", "test")):
        x, _ = t.batch(1500, split, seed=0)
        graphs = Counter()
        for row in x.tolist():
            graphs[key(row)] += 1
        seen[split] = set(graphs)
        # both shufflings of a graph's two edges occur, in the same split
        orders = {tuple(row[:2]) for row in x.tolist() if key(row) == next(iter(graphs))}
        assert len(orders) == 2, split
    assert sum(len(s) for s in seen.values()) == 24  # every graph, in exactly one split
    assert not (seen["train"] & seen["valid"] or seen["train"] & seen["test"] or seen["valid"] & seen["test"])
    # and the split is hash_split of the sorted edge codes with start and goal
    x, _ = t.batch(50, "valid", seed=2)
    e = t.edge_list(x)
    code = (e[:, :, 0] * 4 + e[:, :, 1]).sort(1).values
    assert (hash_split(torch.cat([code, x[:, 6:8]], 1)) == 1).all()


def test_deterministic_score_freqs_registry_and_errors():
    t = StarGraph()
    x, r = t.batch(4, "valid", seed=5)
    assert torch.equal(x, StarGraph().batch(4, "valid", seed=5)[0])
    assert not torch.equal(x, t.batch(4, "valid", seed=6)[0])
    pred = x.clone()
    pred[1, -2] = (pred[1, -2] + 1) % 50
    pred[2, 0] = (pred[2, 0] + 1) % 50  # the prompt is not scored
    m = t.metrics(pred, x, r)
    assert m["exact_match"].tolist() == [1.0, 0.0, 1.0, 1.0] and abs(float(m["token_accuracy"][1]) - 0.8) < 1e-6
    f = t.token_freqs()
    assert f.shape == (53,) and abs(float(f.sum()) - 1) < 1e-5
    assert abs(float(f[t.bar]) - 11 / 44) < 1e-6 and abs(float(f[t.slash]) - 1 / 44) < 1e-6
    assert isinstance(build("task", {"name": "stargraph", "degree": 5, "path_len": 5}), StarGraph)
    with pytest.raises(ValueError, match="nodes must be >= 1 \\+ degree"):
        StarGraph(degree=5, path_len=5, nodes=20)
    for kw in ({"degree": 1}, {"path_len": 1}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            StarGraph(**kw)


def test_all_labels_used_uniformly_enough():
    # labels are a uniformly random injection: every id appears, centres included
    x, _ = StarGraph(degree=2, path_len=3, nodes=8).batch(2000, "train", seed=0)
    centres = Counter(x[:, 3 * 4].tolist())
    assert set(centres) == set(range(8)) and min(centres.values()) > 150
    assert len(set(itertools.chain.from_iterable(x[:, :11].tolist())) - {8}) == 8
