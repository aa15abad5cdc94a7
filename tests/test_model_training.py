"""The gradient phase and the training step: gradients only through the selected patches, activation
checkpointing equal to the plain pass, task losses, prediction, and a tiny model that learns."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from ips_path.model import IPSModel, PatchChunk, Task, build_encoder, compute_loss, task_losses, train_step
from ips_path.runtime.errors import BadInputError

TASKS = [Task("main", 3), Task("tumour", 2, "binary"), Task("present", 4, "multilabel")]
TARGETS = {"main": torch.tensor([2, 0]), "tumour": torch.tensor([1, 0]),
           "present": torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1]])}


def pixel_model(**kw) -> IPSModel:
    torch.manual_seed(0)
    options = dict(dim=16, n_heads=4, n_select=5, chunk_size=6, dropout=0.0, attn_dropout=0.0) | kw
    return IPSModel(build_encoder("smallcnn", widths=(8, 16, 24)), TASKS, **options)


def pixel_slides(sizes=(23, 17), seed=0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g) for n in sizes]


def stream(x: torch.Tensor, size: int = 4, grid: torch.Tensor | None = None) -> list[PatchChunk]:
    return [PatchChunk(x[i:i + size], None if grid is None else grid[i:i + size]) for i in range(0, len(x), size)]


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def bn_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def test_gradients_reach_the_encoder_only_through_the_selected_patches():
    model = pixel_model()
    reference = copy.deepcopy(model)
    slides = pixel_slides()
    # Selected before the step: the step's train-mode pass moves the BatchNorm running statistics.
    selected = torch.stack([x[reference.select_top_patches(stream(x)).indices] for x in slides])
    encoded_with_grad = []
    model.encoder.register_forward_hook(
        lambda module, args, out: encoded_with_grad.append(len(args[0])) if torch.is_grad_enabled() else None)

    result = train_step(model, [stream(x) for x in slides], TARGETS, torch.optim.SGD(model.parameters(), lr=0.0))

    assert result["n_selected"] == [5, 5]
    assert sum(encoded_with_grad) == 2 * 5  # B * M patches, not the 40 of the slides
    # Reference: encode exactly the selected patches with gradients, nothing else.
    reference.train()
    emb = reference.embed(selected.flatten(0, 1)).view(2, 5, -1)
    logits, _ = reference.aggregator(emb)
    loss = compute_loss(logits, TARGETS, TASKS)
    loss.backward()
    assert result["loss"] == pytest.approx(loss.item(), rel=1e-5)
    expected = grads(reference)
    actual = grads(model)
    assert actual.keys() == expected.keys()
    assert any(k.startswith("encoder.") for k in actual)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("encoder", ["smallcnn", "features"])
def test_checkpointed_gradient_phase_equals_plain(encoder):
    torch.manual_seed(0)
    enc = (build_encoder("smallcnn", widths=(8, 16)) if encoder == "smallcnn"
           else build_encoder("features", in_features=12, out_dim=16))
    plain = IPSModel(enc, TASKS, dim=16, n_heads=2, grad_chunk_size=3, dropout=0.2, attn_dropout=0.2)
    checkpointed = copy.deepcopy(plain)
    checkpointed.checkpoint = True
    initial_stats = bn_state(plain)
    patches = (torch.randint(0, 256, (2, 7, 3, 16, 16), dtype=torch.uint8) if encoder == "smallcnn"
               else torch.randn(2, 7, 12))
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    losses = []
    for model in (plain, checkpointed):
        model.train()
        torch.manual_seed(1)  # the same dropout masks
        logits, _ = model.forward_selected(patches, mask=mask)
        loss = compute_loss(logits, TARGETS, TASKS)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1])
    expected, actual = grads(plain), grads(checkpointed)
    assert actual.keys() == expected.keys() and len(actual) == len(list(plain.parameters()))
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-6)
    # Recomputation in backward must not update BatchNorm running statistics a second time.
    after_plain, after_checkpointed = bn_state(plain), bn_state(checkpointed)
    for key in after_plain:
        torch.testing.assert_close(after_checkpointed[key], after_plain[key], rtol=0, atol=0)
    changed = [k for k in initial_stats if "running_mean" in k and not torch.equal(initial_stats[k], after_plain[k])]
    assert changed
    counts = {k: int(v) for k, v in after_checkpointed.items() if "num_batches" in k}
    assert set(counts.values()) == {4}  # 11 real patches in pieces of at most 3: four updates
    assert all(m.momentum == 0.1 for m in checkpointed.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_checkpoint_needs_piece_size():
    with pytest.raises(BadInputError, match="grad_chunk_size"):
        pixel_model(checkpoint=True)


def test_task_losses_and_class_weights():
    logits = {"main": torch.randn(4, 3), "tumour": torch.randn(4), "present": torch.randn(4, 4)}
    targets = {"main": torch.tensor([0, 2, 1, 2]), "tumour": torch.tensor([1, 0, 0, 1]),
               "present": torch.randint(0, 2, (4, 4))}
    per_task = task_losses(logits, targets, TASKS)
    torch.testing.assert_close(per_task["main"], F.cross_entropy(logits["main"], targets["main"]))
    torch.testing.assert_close(per_task["tumour"],
                               F.binary_cross_entropy_with_logits(logits["tumour"], targets["tumour"].float()))
    torch.testing.assert_close(per_task["present"],
                               F.binary_cross_entropy_with_logits(logits["present"], targets["present"].float()))
    torch.testing.assert_close(compute_loss(logits, targets, TASKS), sum(per_task.values()))

    weights = {"main": torch.tensor([1.0, 2.0, 3.0]), "tumour": torch.tensor([1.0, 3.0]),
               "present": torch.tensor([1.0, 2.0, 1.0, 5.0])}
    weighted = task_losses(logits, targets, TASKS, weights)
    torch.testing.assert_close(weighted["main"], F.cross_entropy(logits["main"], targets["main"], weights["main"]))
    per_slide = F.binary_cross_entropy_with_logits(logits["tumour"], targets["tumour"].float(), reduction="none")
    w = torch.tensor([3.0, 1.0, 1.0, 3.0])
    torch.testing.assert_close(weighted["tumour"], (w * per_slide).sum() / w.sum())
    torch.testing.assert_close(weighted["present"], F.binary_cross_entropy_with_logits(
        logits["present"], targets["present"].float(), pos_weight=weights["present"]))

    with pytest.raises(BadInputError, match="expected \\(4, 4\\)"):
        task_losses(logits, targets | {"present": torch.tensor([1, 0, 0, 1])}, TASKS)
    with pytest.raises(BadInputError, match="no targets for task\\(s\\) tumour"):
        compute_loss(logits, {"main": targets["main"], "present": targets["present"]}, TASKS)
    with pytest.raises(BadInputError, match="class weights need 3"):
        compute_loss(logits, targets, TASKS, {"main": torch.ones(2)})


def test_task_validation_and_probabilities():
    for bad in (dict(n_classes=1), dict(n_classes=3, kind="binary"), dict(n_classes=2, kind="ordinal")):
        with pytest.raises(BadInputError):
            Task("x", **bad)
    with pytest.raises(BadInputError, match="contain no"):
        Task("a.b", 2)
    binary = Task("t", 2, "binary").probabilities(torch.tensor([0.0, 100.0]))
    torch.testing.assert_close(binary, torch.tensor([[0.5, 0.5], [0.0, 1.0]]))
    torch.testing.assert_close(Task("m", 3).probabilities(torch.zeros(3)), torch.full((3,), 1 / 3))
    torch.testing.assert_close(Task("l", 2, "multilabel").probabilities(torch.zeros(2)), torch.full((2,), 0.5))


def test_predict_slide_returns_probabilities_attention_and_every_patch_logit():
    model = pixel_model(pos_encoding="2d")
    x = pixel_slides((19,))[0]
    grid = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(5), indexing="ij"), -1).view(-1, 2)[:19]
    model.train()
    prediction = model.predict_slide(stream(x, 7, grid))
    assert model.training
    assert {k: v.shape for k, v in prediction.probabilities.items()} == {
        "main": (3,), "tumour": (2,), "present": (4,)}
    torch.testing.assert_close(prediction.probabilities["main"].sum(), torch.tensor(1.0))
    torch.testing.assert_close(prediction.probabilities["tumour"].sum(), torch.tensor(1.0))
    assert prediction.attention.shape == (3, 4, 5)
    torch.testing.assert_close(prediction.attention.sum(-1), torch.ones(3, 4))
    assert prediction.selection.all_logits.shape == (19,)
    # Same result as the gradient-phase path in eval mode on the selected patches.
    selection = prediction.selection
    model.eval()
    with torch.no_grad():
        logits, attention = model.forward_selected(selection.patches[None], selection.positions[None])
    torch.testing.assert_close(attention[0], prediction.attention, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits["main"][0], prediction.logits["main"], rtol=1e-4, atol=1e-5)


def test_train_step_pads_small_slides_clips_and_runs_under_autocast():
    model = pixel_model(pos_encoding="1d", n_select=6)
    slides = pixel_slides((20, 4))  # the second slide has fewer patches than M
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train_step(model, [stream(x) for x in slides], TARGETS, optimizer, grad_clip=0.01)
    assert result["n_selected"] == [6, 4]
    assert result["grad_norm"] > 0.01
    clipped = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).norm()
    assert clipped == pytest.approx(0.01, rel=1e-3)
    assert set(result["losses"]) == {"main", "tumour", "present"}
    assert result["loss"] == pytest.approx(sum(result["losses"].values()), rel=1e-5)
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.grad is not None)
    bf16 = train_step(model, [stream(x) for x in slides], TARGETS, optimizer, autocast_dtype=torch.bfloat16)
    assert bf16["grad_norm"] is None and torch.isfinite(torch.tensor(bf16["loss"]))


def test_tiny_model_overfits_a_tiny_problem():
    """Eight slides of 16 noise patches, two of which carry the class in their features; 4 patches are
    kept per slide. Memorising eight slides through selection + aggregation must drive the loss down
    (over seeds 0-19 the final loss was 0.1-8 % of the first)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    tasks = [Task("signal", 3), Task("strong", 2, "binary")]
    model = IPSModel(build_encoder("features", in_features=8, out_dim=16), tasks, dim=16, n_heads=2,
                     n_select=4, chunk_size=8, dropout=0.0, attn_dropout=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    targets = {"signal": torch.arange(8) % 3, "strong": (torch.arange(8) // 3) % 2}
    slides = []
    for label, strong in zip(targets["signal"], targets["strong"], strict=True):
        x = torch.randn(16, 8, generator=g) * 0.5
        x[torch.randperm(16, generator=g)[:2], label] += 3.0 + 3.0 * strong
        slides.append(x)

    losses = [train_step(model, [stream(x, 5) for x in slides], targets, optimizer)["loss"] for _ in range(100)]

    assert losses[-1] < 0.2 * losses[0], losses[::10]
    for x, label, strong in zip(slides, targets["signal"], targets["strong"], strict=True):
        prediction = model.predict_slide(stream(x, 5))
        assert prediction.probabilities["signal"].argmax() == label
        assert prediction.probabilities["strong"].argmax() == strong
