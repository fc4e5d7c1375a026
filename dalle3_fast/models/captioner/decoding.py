"""Caption decoding: greedy, beam search and nucleus sampling, with or without the KV cache.

Every method asks a ``NextTokenScorer`` for the logits of the last position of growing
sequences. With the cache it feeds only the tokens it has not seen and keeps each causal
layer's keys/values; without it, it recomputes the whole prefix (the ground truth that
tests compare the cache against). Image keys/values of the cross-attention are computed
once per call either way.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dalle3_fast.models.captioner.layers import LayerCache

METHODS = ("greedy", "beam", "nucleus")


@dataclass
class GenerationOutput:
    """``sequences`` (B, 1 + T): BOS, the generated tokens, EOS, then pad. ``scores`` (B,): the sum of the
    chosen tokens' log-probabilities (beam: divided by length ** length_penalty). ``logits`` (B, T, V): the raw
    logits at every step (greedy/nucleus only; rows after a sequence's EOS are not meaningful)."""

    sequences: torch.Tensor
    scores: torch.Tensor
    logits: torch.Tensor | None = None


class NextTokenScorer:
    """Logits of the next token for sequences that grow by one token per call."""

    def __init__(self, model, image_tokens: torch.Tensor, max_len: int, use_cache: bool):
        self.model = model
        self.image_kv = model.multimodal.image_kv(image_tokens)
        self.use_cache = use_cache
        self.caches = model.new_caches(image_tokens.shape[0], max_len, image_tokens.dtype, image_tokens.device) \
            if use_cache else None

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.use_cache:
            return self.model.token_logits(tokens, self.image_kv)[:, -1]
        seen = self.caches[0][0].length
        return self.model.token_logits(tokens[:, seen:], self.image_kv, self.caches)[:, -1]

    def reorder(self, index: torch.Tensor) -> None:
        self.image_kv = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.image_kv]
        if self.caches is not None:
            for stack in self.caches:
                for cache in stack:
                    cache.reorder(index)


def new_layer_caches(num_layers: int, batch: int, heads: int, max_len: int, head_dim: int, dtype, device):
    return [LayerCache(batch, heads, max_len, head_dim, dtype, device) for _ in range(num_layers)]


def _suppress_specials(logits: torch.Tensor, ids: tuple[int, ...]) -> torch.Tensor:
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32), copy=True)
    logits[:, list(ids)] = float("-inf")
    return logits


def greedy(scorer, batch, bos, eos, pad, max_new_tokens, device) -> GenerationOutput:
    return _left_to_right(scorer, batch, bos, eos, pad, max_new_tokens, device, pick=lambda logp: logp.argmax(-1))


def nucleus(scorer, batch, bos, eos, pad, max_new_tokens, device, *, top_p, temperature, generator):
    def pick(logp):
        probs = torch.softmax(logp / temperature, dim=-1)
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > top_p  # the top token always stays in
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        if generator is not None:
            sorted_p = sorted_p.to(generator.device)
        choice = torch.multinomial(sorted_p, 1, generator=generator).to(order.device)
        return order.gather(-1, choice).squeeze(-1)

    return _left_to_right(scorer, batch, bos, eos, pad, max_new_tokens, device, pick=pick)


def _left_to_right(scorer, batch, bos, eos, pad, max_new_tokens, device, pick) -> GenerationOutput:
    tokens = torch.full((batch, 1), bos, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    scores = None
    all_logits = []
    for _ in range(max_new_tokens):
        logits = scorer(tokens)
        all_logits.append(logits)
        logp = torch.log_softmax(_suppress_specials(logits, (pad, bos)), dim=-1)
        nxt = pick(logp)
        gained = torch.where(finished, 0.0, logp.gather(-1, nxt[:, None]).squeeze(-1))
        scores = gained if scores is None else scores + gained
        nxt = torch.where(finished, pad, nxt)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        finished |= nxt == eos
        if bool(finished.all()):
            break
    return GenerationOutput(tokens, scores, torch.stack(all_logits, dim=1))


def beam_search(scorer, batch, bos, eos, pad, max_new_tokens, device, *, num_beams, length_penalty):
    """Standard beam search (transformers' semantics, early_stopping=False).

    Scorer rows are laid out (batch, beam). A hypothesis ending in EOS after n generated tokens
    (EOS included) scores sum_logprob / n ** length_penalty; an item is done when it holds
    ``num_beams`` hypotheses and its best live beam cannot beat the worst of them.
    """
    K = num_beams
    tokens = torch.full((batch * K, 1), bos, dtype=torch.long, device=device)
    beam_scores = torch.zeros(batch, K, dtype=torch.float64, device=device)
    beam_scores[:, 1:] = float("-inf")  # all beams start identical: expand only the first
    beam_scores = beam_scores.view(-1)
    hypotheses: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    done = [False] * batch

    def add(b, score, seq):
        hyps = hypotheses[b]
        hyps.append((score, seq))
        hyps.sort(key=lambda h: -h[0])
        del hyps[K:]

    for step in range(max_new_tokens):
        n_generated = step + 1
        logp = torch.log_softmax(_suppress_specials(scorer(tokens), (pad, bos)), dim=-1)
        V = logp.shape[-1]
        candidates = (beam_scores[:, None] + logp).view(batch, K * V)
        top_scores, top_index = candidates.topk(2 * K, dim=1)
        top_scores, top_index = top_scores.tolist(), top_index.tolist()
        rows = tokens.tolist()
        next_beam, next_token, next_score = [], [], []
        for b in range(batch):
            chosen = []
            if not done[b]:
                for rank, (score, index) in enumerate(zip(top_scores[b], top_index[b])):
                    beam, token = divmod(index, V)
                    if score == float("-inf"):
                        break
                    if token == eos:
                        if rank < K:
                            add(b, score / n_generated ** length_penalty, rows[b * K + beam][1:] + [eos])
                        continue
                    chosen.append((b * K + beam, token, score))
                    if len(chosen) == K:
                        break
                best_live = max((s for _, _, s in chosen), default=float("-inf"))
                if len(hypotheses[b]) == K and (
                        not chosen or hypotheses[b][-1][0] >= best_live / n_generated ** length_penalty):
                    done[b] = True
            if done[b]:  # finished items carry pads from here on
                chosen = []
            chosen += [(b * K + j, pad, float("-inf")) for j in range(len(chosen), K)]
            for row, token, score in chosen:
                next_beam.append(row)
                next_token.append(token)
                next_score.append(score)
        if all(done):
            break
        index = torch.tensor(next_beam, dtype=torch.long, device=device)
        tokens = torch.cat([tokens.index_select(0, index),
                            torch.tensor(next_token, dtype=torch.long, device=device)[:, None]], dim=1)
        beam_scores = torch.tensor(next_score, dtype=torch.float64, device=device)
        scorer.reorder(index)

    # Items that ran out of tokens: their live beams become hypotheses as they stand.
    rows = tokens.tolist()
    live_scores = beam_scores.tolist()
    n_generated = tokens.shape[1] - 1
    for b in range(batch):
        if done[b]:
            continue
        for j in range(K):
            score = live_scores[b * K + j]
            if score != float("-inf"):
                add(b, score / max(n_generated, 1) ** length_penalty, rows[b * K + j][1:])

    best = [hypotheses[b][0] if hypotheses[b] else (float("-inf"), []) for b in range(batch)]
    width = 1 + max(len(seq) for _, seq in best)
    sequences = torch.full((batch, width), pad, dtype=torch.long, device=device)
    sequences[:, 0] = bos
    for b, (_, seq) in enumerate(best):
        if seq:
            sequences[b, 1: 1 + len(seq)] = torch.tensor(seq, dtype=torch.long, device=device)
    return GenerationOutput(sequences, torch.tensor([s for s, _ in best], dtype=torch.float64, device=device))
