"""The cross-attention aggregator against a plain reference, its attention, scores and encodings."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ips_path.model import CrossAttentionAggregator, Task, grid_encoding, sinusoidal_encoding
from ips_path.runtime.errors import BadInputError

TASKS = [Task("majority", 10), Task("tumour", 2, "binary"), Task("present", 4, "multilabel")]


def reference_aggregate(agg: CrossAttentionAggregator, emb: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """The IPS block written out with loops over slides, tokens and heads (eval mode, no dropout)."""
    p = dict(agg.named_parameters())
    n_heads, d_head = agg.n_heads, agg.dim // agg.n_heads
    all_logits, all_attn = {t.name: [] for t in agg.tasks}, []
    for x in emb:  # (N, D)
        keys, values = x @ p["k_proj.weight"].T, x @ p["v_proj.weight"].T
        attn_b = []
        for t, query in enumerate(p["queries"]):
            q = query @ p["q_proj.weight"].T
            heads, attn_t = [], []
            for h in range(n_heads):
                s = slice(h * d_head, (h + 1) * d_head)
                a = torch.softmax(keys[:, s] @ q[s] / math.sqrt(d_head), dim=0)
                heads.append(a @ values[:, s])
                attn_t.append(a)
            z = F.layer_norm(torch.cat(heads) @ p["out_proj.weight"].T + query, (agg.dim,),
                             p["norm1.weight"], p["norm1.bias"], eps=1e-6)
            hidden = torch.relu(z @ p["mlp.fc1.weight"].T + p["mlp.fc1.bias"])
            z = F.layer_norm(z + hidden @ p["mlp.fc2.weight"].T + p["mlp.fc2.bias"], (agg.dim,),
                             p["norm2.weight"], p["norm2.bias"], eps=1e-6)
            task = agg.tasks[t]
            out = z @ p[f"heads.{task.name}.weight"].T + p[f"heads.{task.name}.bias"]
            all_logits[task.name].append(out[0] if task.kind == "binary" else out)
            attn_b.append(torch.stack(attn_t))
        all_attn.append(torch.stack(attn_b))
    return {k: torch.stack(v) for k, v in all_logits.items()}, torch.stack(all_attn)


def test_aggregator_matches_reference():
    torch.manual_seed(0)
    agg = CrossAttentionAggregator(32, TASKS, n_heads=4).eval()
    emb = torch.randn(3, 17, 32)
    logits, attn = agg(emb)
    ref_logits, ref_attn = reference_aggregate(agg, emb)
    assert logits.keys() == ref_logits.keys()
    assert logits["majority"].shape == (3, 10) and logits["tumour"].shape == (3,)
    assert logits["present"].shape == (3, 4)
    for name in logits:
        torch.testing.assert_close(logits[name], ref_logits[name], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attn, ref_attn, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(agg.attention_logits(emb).softmax(-1), attn)


def test_attention_sums_to_one_per_head_and_token_and_ignores_padding():
    torch.manual_seed(1)
    agg = CrossAttentionAggregator(16, TASKS, n_heads=8, dropout=0.5, attn_dropout=0.5).train()
    emb = torch.randn(2, 9, 16)
    _, attn = agg(emb)
    assert attn.shape == (2, 3, 8, 9)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 3, 8))
    # Padding: slide 1 has 5 real patches; its result equals aggregating those 5 alone.
    agg.eval()
    mask = torch.tensor([[True] * 9, [True] * 5 + [False] * 4])
    logits, attn = agg(emb, mask=mask)
    assert torch.all(attn[1, ..., 5:] == 0)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 3, 8))
    alone, alone_attn = agg(emb[1:, :5])
    torch.testing.assert_close(attn[1:, ..., :5], alone_attn)
    for name in logits:
        torch.testing.assert_close(logits[name][1:], alone[name])


def test_each_task_head_reads_its_own_token():
    agg = CrossAttentionAggregator(16, TASKS, n_heads=2).eval()
    tokens, _ = agg.forward_features(torch.randn(1, 6, 16))
    assert tokens.shape == (1, 3, 16)
    changed = tokens.clone()
    changed[:, 1] += 1.0  # the token of the second task, "tumour"
    before, after = agg.forward_head(tokens), agg.forward_head(changed)
    assert torch.equal(before["majority"], after["majority"]) and torch.equal(before["present"], after["present"])
    assert not torch.equal(before["tumour"], after["tumour"])


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), dim=st.sampled_from([8, 32, 96, 256]), n_heads=st.sampled_from([1, 2, 8]),
       pos=st.sampled_from([None, "1d", "2d"]), cuts=st.lists(st.integers(1, 300), max_size=4), seed=st.integers(0, 99))
def test_mean_attention_logits_is_batch_independent(n, dim, n_heads, pos, cuts, seed):
    """A patch's score has the same bits alone, in chunks, or in the whole slide."""
    torch.manual_seed(seed)
    agg = CrossAttentionAggregator(dim, TASKS, n_heads=n_heads, pos_encoding=pos).eval()
    emb = torch.randn(n, dim) * 3
    positions = {"1d": torch.arange(n) * 7, "2d": torch.randint(0, 1000, (n, 2)), None: None}[pos]
    with torch.no_grad():
        whole = agg.mean_attention_logits(emb, positions)
        bounds = sorted({0, n, *[c % n for c in cuts]})
        parts = torch.cat([agg.mean_attention_logits(emb[a:b], None if positions is None else positions[a:b])
                           for a, b in zip(bounds, bounds[1:], strict=False)])
        single = agg.mean_attention_logits(emb[-1:], None if positions is None else positions[-1:])
        reference = agg.attention_logits(emb[None], None if positions is None else positions[None])[0].mean((0, 1))
    assert torch.equal(parts, whole)
    assert torch.equal(single, whole[-1:])
    torch.testing.assert_close(whole, reference, rtol=1e-4, atol=1e-4)


def test_positional_encodings():
    pe = sinusoidal_encoding(torch.tensor([0, 1, 250_000]), 8)
    assert pe.shape == (3, 8) and pe.dtype == torch.float32
    torch.testing.assert_close(pe[0], torch.tensor([0.0, 1.0] * 4))
    torch.testing.assert_close(pe[1, :2], torch.tensor([math.sin(1.0), math.cos(1.0)]))
    # channels 2-3 have frequency 10000 ** (-2 / 8) = 0.1
    torch.testing.assert_close(pe[2, 2:4], torch.tensor([math.sin(25_000.0), math.cos(25_000.0)]))
    grid = torch.tensor([[3, 40], [40, 3]])
    ge = grid_encoding(grid, 16)
    torch.testing.assert_close(ge[0, :8], sinusoidal_encoding(torch.tensor(3), 8))
    torch.testing.assert_close(ge[0, 8:], ge[1, :8])  # row and column use separate halves
    agg = CrossAttentionAggregator(16, TASKS[:1], n_heads=2, pos_encoding="2d").eval()
    emb = torch.zeros(1, 2, 16)
    logits_a, _ = agg(emb, grid[None])
    logits_b, _ = agg(emb, grid.flip(0)[None])
    assert torch.equal(logits_a["majority"], logits_b["majority"])  # a permutation of the same set
    logits_c, _ = agg(emb, (grid + 5)[None])
    assert not torch.allclose(logits_a["majority"], logits_c["majority"])


def test_1d_encoding_uses_stream_indices():
    agg = CrossAttentionAggregator(16, TASKS[:1], n_heads=2, pos_encoding="1d").eval()
    emb = torch.randn(1, 4, 16)
    default = agg.attention_logits(emb)
    torch.testing.assert_close(default, agg.attention_logits(emb, torch.arange(4)[None]))
    assert not torch.allclose(default, agg.attention_logits(emb, torch.arange(100, 104)[None]))


def test_bad_configurations_are_refused():
    with pytest.raises(BadInputError, match="divisible"):
        CrossAttentionAggregator(30, TASKS, n_heads=8)
    with pytest.raises(BadInputError, match="unique"):
        CrossAttentionAggregator(16, [Task("a", 2), Task("a", 3)], n_heads=2)
    with pytest.raises(BadInputError, match="pos_encoding"):
        CrossAttentionAggregator(16, TASKS, n_heads=2, pos_encoding="3d")
    with pytest.raises(BadInputError, match="divisible by 4"):
        CrossAttentionAggregator(18, TASKS, n_heads=2, pos_encoding="2d")
