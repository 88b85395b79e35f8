"""Path-finding on path-star graphs (Bachmann & Nagarajan 2024, "The pitfalls of next-token prediction").

A graph ``G(d, l)`` has a centre node with ``degree`` = d arms, each a path of ``l - 1``
further nodes; node labels are ``l_i`` distinct ids drawn from ``0..nodes-1``. The prompt is
the shuffled edge list (each edge directed away from the centre, as in the reference
code), then the start (the centre) and the goal (the leaf of one arm); the answer is the
path of ``path_len`` = l nodes from the centre to the goal, both included (or goal to
centre with ``reverse=True``, the paper's "reversed" targets).

**Why the order matters.** Left to right, the first answer token after the centre asks
"which of d arms leads to the goal?", which is only answerable by planning ahead; teacher
-forced next-token training instead learns the "Clever Hans" shortcut of following the
edge out of the previous node (trivial given the true prefix) and never learns the hard
first step, so it ends at ~1/d accuracy. From the goal backwards every step is a lookup
(the unique edge into the current node), so reversed targets, a right-to-left order, or
an any-order model with a policy that reveals the path from the goal end are easy.

Layout (the reference's numeral tokenizer without commas)::

    a b | c d | ... | y z / start goal = v_1 v_2 ... v_l

Tokens: ``0..nodes-1`` node ids, then ``|``, ``/``, ``=``. Ranks are 0 on the prompt and
1 on the path; there is no padding (``pad_id`` 0 is never used). The defaults (d=3,
l=5, 50 ids) give 12 edges and 44 tokens; the paper's main graphs are G(2,5), G(5,5),
G(20,5) with 50 ids.

Splits hash the graph, not its presentation: the sorted edge list with the start and
goal (``hash_split``), so two shufflings of one graph never land in different splits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from orderlab.registry import register
from orderlab.tasks.base import Task, exact_match, sample_split

__all__ = ["StarGraph"]


@register("task", "stargraph")
class StarGraph(Task):
    """Path from the centre to a leaf of a ``degree``-arm star of arms ``path_len - 1`` long."""

    metric = "exact_match"

    def __init__(self, degree: int = 3, path_len: int = 5, nodes: int = 50, reverse: bool = False):
        if degree < 2:
            raise ValueError(f"degree must be >= 2 (one arm has nothing to choose), got {degree}")
        if path_len < 2:
            raise ValueError(f"path_len must be >= 2 (the centre and the goal), got {path_len}")
        need = 1 + degree * (path_len - 1)
        if nodes < need:
            raise ValueError(f"nodes must be >= 1 + degree * (path_len - 1) = {need} distinct labels, got {nodes}")
        self.degree, self.path_len, self.nodes, self.reverse = degree, path_len, nodes, reverse
        self.bar, self.slash, self.equals = nodes, nodes + 1, nodes + 2
        self.vocab_size = nodes + 3
        self.pad_id = 0
        self.eos_id = None
        self.edges = degree * (path_len - 1)
        self.prompt_len = 3 * self.edges + 3  # 2 per edge, E-1 bars, '/', start, goal, '='
        self.seq_len = self.prompt_len + path_len

    def __repr__(self) -> str:
        return f"StarGraph(degree={self.degree}, path_len={self.path_len}, nodes={self.nodes}, reverse={self.reverse})"

    def _draw(self, m: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        d, k, E = self.degree, self.path_len - 1, self.edges
        labels = torch.rand(m, self.nodes, generator=g).argsort(1)[:, : 1 + d * k]  # distinct labels
        centre, arms = labels[:, 0], labels[:, 1:].view(m, d, k)  # the goal's arm is arm 0 (labels are random)
        src = torch.cat([centre[:, None, None].expand(m, d, 1), arms[:, :, :-1]], dim=2).reshape(m, E)
        dst = arms.reshape(m, E)
        order = torch.rand(m, E, generator=g).argsort(1)  # shuffle the edge list
        src, dst = src.gather(1, order), dst.gather(1, order)
        goal = arms[:, 0, -1]
        path = torch.cat([centre[:, None], arms[:, 0]], dim=1)  # [m, l]
        if self.reverse:
            path = path.flip(1)
        col = lambda v: torch.full((m, 1), v, dtype=torch.long)  # noqa: E731
        triples = torch.stack([src, dst, torch.full_like(src, self.bar)], dim=2).reshape(m, 3 * E)[:, :-1]
        tokens = torch.cat([triples, col(self.slash), centre[:, None], goal[:, None], col(self.equals), path], dim=1)
        key = torch.cat([(src * self.nodes + dst).sort(1).values, centre[:, None], goal[:, None]], dim=1)
        return tokens, key

    def batch(self, n: int, split: str = "train", seed: int = 0) -> tuple[Tensor, Tensor]:
        tokens = sample_split(self._draw, n, split, seed, what="star graphs")
        ranks = torch.zeros_like(tokens)
        ranks[:, self.prompt_len :] = 1
        return tokens, ranks

    def edge_list(self, tokens: Tensor) -> Tensor:
        """Long ``[B, edges, 2]``: the (from, to) pairs of the prompt."""
        triples = torch.cat([tokens[:, : 3 * self.edges - 1], tokens.new_full((tokens.shape[0], 1), self.bar)], 1)
        return triples.view(-1, self.edges, 3)[:, :, :2]

    def score(self, pred: Tensor, tokens: Tensor, ranks: Tensor) -> Tensor:
        """1.0 iff the whole path matches (the path to a leaf of a tree is unique)."""
        return exact_match(pred, tokens, ranks)

    def token_freqs(self) -> Tensor:
        """Frequencies over a fixed sample of 2**13 train sequences."""
        return self._sampled_freqs(1 << 13)

    def render(self, tokens: Tensor) -> str:
        """``"3,17|17,8|.../3,40=3,17,..."`` as in the reference data files; mask as ``?``."""
        marks = {self.bar: "|", self.slash: "/", self.equals: "="}
        out = []
        for t in tokens.tolist():
            s = str(t) if 0 <= t < self.nodes else marks.get(t, "?")
            if out and s not in "|/=" and out[-1] not in "|/=":
                out.append(",")
            out.append(s)
        return "".join(out)
