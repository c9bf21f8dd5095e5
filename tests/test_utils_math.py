"""Pure pieces of utils checked against direct, slow references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from utils.data import MicroBatchPlan
from utils.engine import lr_lambda
from utils.losses import count_label_tokens, next_token_loss_sum, scored_positions, token_loss_sum
from utils.model import count_parameters, flops_per_token, merge_lora_state_dict, preset_config


def test_next_token_loss_matches_loop():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    labels = torch.randint(0, 11, (3, 7))
    labels[0, :4] = -100
    labels[2, 5] = -100
    expected = 0.0
    for b in range(3):
        for t in range(6):
            target = labels[b, t + 1].item()
            if target != -100:
                expected -= torch.log_softmax(logits[b, t], -1)[target].item()
    assert next_token_loss_sum(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    assert count_label_tokens(labels) == int((labels[:, 1:] != -100).sum())


def test_fully_masked_batch_gives_zero_not_nan():
    logits = torch.randn(2, 5, 9, requires_grad=True)
    labels = torch.full((2, 5), -100)
    loss = next_token_loss_sum(logits, labels)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() == 0
    keep, targets, _ = scored_positions(labels)
    assert not keep.any() and targets.numel() == 0
    empty = token_loss_sum(logits[keep], targets)  # what the head gives for no kept position: (0, V)
    empty.backward()
    assert empty.item() == 0.0 and torch.isfinite(logits.grad).all()


def test_scored_positions_select_what_next_token_loss_scores():
    """The kept logits, in row-major order, against the returned targets and weights give next_token_loss_sum."""
    torch.manual_seed(1)
    logits, labels, weights = torch.randn(3, 7, 11), torch.randint(0, 11, (3, 7)), torch.rand(3, 7)
    labels[0, :4] = -100
    labels[2, 5:] = -100
    keep, targets, w = scored_positions(labels, weights)
    assert keep.sum() == count_label_tokens(labels) == targets.numel() == w.numel()
    assert not keep[:, -1].any() and keep[0, 3] and not keep[0, 2]  # position t scores labels[t + 1]
    for wt, ws in ((None, None), (weights, w)):
        assert token_loss_sum(logits[keep], targets, ws).item() == pytest.approx(
            next_token_loss_sum(logits, labels, wt).item(), rel=1e-6)


def test_lr_schedule_shape():
    kw = dict(warmup=10, total=110, min_ratio=0.1)
    assert lr_lambda(0, kind="cosine", **kw) == pytest.approx(0.1)
    assert lr_lambda(9, kind="cosine", **kw) == pytest.approx(1.0)
    assert lr_lambda(60, kind="cosine", **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_lambda(110, kind="cosine", **kw) == pytest.approx(0.1)
    assert lr_lambda(60, kind="linear", **kw) == pytest.approx(0.55)
    assert lr_lambda(60, kind="constant", **kw) == 1.0


LENGTHS = np.random.default_rng(0).integers(10, 300, 100)


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("micro,world,gas", [(8, 1, 1), (4, 2, 1), (1, 1, 8), (2, 2, 2), (1, 4, 2)])
def test_plan_covers_the_same_rows_per_global_batch(micro, world, gas, grouped):
    """Whatever the split over ranks and accumulation, optimizer step s sees the same 8 rows (also when
    rows are grouped by length: chunks of 40 rows, blocks of one step's 8)."""
    kw = {"lengths": LENGTHS, "group_rows": 40, "block_rows": 8} if grouped else {}
    reference = MicroBatchPlan(100, 8, 1, 0, seed=3, **kw)
    plans = [MicroBatchPlan(100, micro, world, r, seed=3, **kw) for r in range(world)]
    for epoch in range(2):
        for step in range(100 // 8):
            seen = sorted(i for p in plans for k in range(step * gas, (step + 1) * gas) for i in p.rows(epoch, k))
            assert seen == sorted(reference.rows(epoch, step))
    assert plans[0].micro_batches_per_epoch // gas == reference.micro_batches_per_epoch


def test_length_grouping_fills_batches_and_keeps_their_order_random():
    """Grouped plans are still seeded permutations; each step's rows come from one length-sorted chunk, so
    they pad far less than random batches, and the steps of a chunk are not simply longest first."""
    plain = MicroBatchPlan(100, 8, 1, 0, seed=3)
    grouped = MicroBatchPlan(100, 8, 1, 0, seed=3, lengths=LENGTHS, group_rows=40, block_rows=8)
    perm = grouped.permutation(0)
    assert sorted(perm.tolist()) == list(range(100)) and perm.tolist() == grouped.permutation(0).tolist()
    assert sorted(perm[:40].tolist()) == sorted(plain.permutation(0)[:40].tolist())  # same chunks, reordered

    def padding(plan):  # padded slots minus real tokens over one epoch
        batches = [LENGTHS[plan.rows(0, k)] for k in range(plan.micro_batches_per_epoch)]
        return sum(len(b) * b.max() - b.sum() for b in batches)
    assert padding(grouped) < 0.3 * padding(plain)
    maxima = [[LENGTHS[grouped.rows(e, k)].max() for k in range(5)] for e in range(4)]
    assert any(m != sorted(m, reverse=True) for m in maxima)


def test_length_groups_only_for_collators_that_pad():
    """--group_by_length groups rows of collators that pad to the longest row, not packed rows, and is off
    when asked."""
    from types import SimpleNamespace

    from utils.chat import PackedCollator, PaddedCollator
    from utils.trainer import length_groups

    on, off = SimpleNamespace(group_by_length=True), SimpleNamespace(group_by_length=False)
    rows = [{"input_ids": [5] * (n % 7 + 1), "labels": [5] * (n % 7 + 1)} for n in range(1000)]
    got = length_groups(on, rows, PaddedCollator(0), block_rows=4)
    assert got["lengths"].tolist() == [n % 7 + 1 for n in range(1000)]
    assert (got["group_rows"], got["block_rows"]) == (200, 4)  # 50 steps of 4 rows
    assert length_groups(on, rows[:400], PaddedCollator(0), 4)["group_rows"] == 100  # at most a quarter
    assert length_groups(on, rows[:16], PaddedCollator(0), 4)["group_rows"] == 4  # one step: no grouping
    assert length_groups(off, rows, PaddedCollator(0), 4) == {}
    assert length_groups(on, rows, PackedCollator(0), 4) == {}


def test_plan_is_seeded_and_epochs_differ():
    a, b = MicroBatchPlan(50, 5, 1, 0, seed=1), MicroBatchPlan(50, 5, 1, 0, seed=1)
    assert a.rows(0, 3) == b.rows(0, 3)
    assert a.permutation(0).tolist() != a.permutation(1).tolist()
    assert sorted(a.permutation(1).tolist()) == list(range(50))


def test_presets_sizes():
    from transformers import LlamaForCausalLM

    sizes = {}
    for name in ("nano", "tiny"):
        sizes[name] = count_parameters(LlamaForCausalLM(preset_config(name, 8000, 256)))
    assert sizes["nano"] < 1_000_000
    assert 4_000_000 < sizes["tiny"] < 7_000_000
    cfg = preset_config("base", 32000, 1024)
    per_layer = 4 * cfg.hidden_size**2 + 3 * cfg.hidden_size * cfg.intermediate_size + 2 * cfg.hidden_size
    n = cfg.num_hidden_layers * per_layer + cfg.vocab_size * cfg.hidden_size + cfg.hidden_size
    assert 90e6 < n < 130e6
    assert flops_per_token(n, 12, 768, 1024) == 6 * n + 12 * 12 * 768 * 1024


def test_lora_merge_equals_adapter_forward():
    """Folding B@A*scale into W gives the same outputs as the peft model with adapters."""
    from transformers import LlamaForCausalLM

    from utils.model import apply_lora

    torch.manual_seed(0)
    base = LlamaForCausalLM(preset_config("nano", 64, 32))
    peft_model = apply_lora(base, dim=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # peft starts B at zero; make the adapters matter
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        merged = merge_lora_state_dict(peft_model.state_dict(), scale=8 / 4)
        plain = LlamaForCausalLM(preset_config("nano", 64, 32))
        plain.load_state_dict(merged, strict=False)
        got = plain(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert not math.isclose(got.abs().sum().item(), 0.0)
