"""Toy tasks shared by the policy-gradient tests (imported as ``from toy_tasks import ChainTask``)."""

import torch


class ChainTask:
    """Position 0 given (token 0), positions 1..n to generate, every answer token is 1.
    ``exact``: score = exact match (0/1); otherwise the fraction of correct positions."""

    eos_id, pad_id, metric = None, 0, "toy"

    def __init__(self, n=3, exact=True, vocab_size=2):
        self.n, self.exact, self.seq_len, self.vocab_size = n, exact, n + 1, vocab_size

    def batch(self, b, split="train", seed=0):
        tokens = torch.ones(b, self.seq_len, dtype=torch.long)
        tokens[:, 0] = 0
        ranks = torch.ones_like(tokens)
        ranks[:, 0] = 0
        return tokens, ranks

    def score(self, pred, tokens, ranks):
        ok = (pred == tokens) | (ranks < 1)
        return ok.all(1).double() if self.exact else ok[:, 1:].double().mean(1)
