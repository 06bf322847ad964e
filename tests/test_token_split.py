"""Token-level influence (logix.token_split): the per-position parts of a sequence's score add up
to the score `log.influence` gives from the logged row, and rows logged during training are refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import logix
from logix.token_split import token_influence

VOCAB, N_TRAIN = 23, 24


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False)  # fmt: skip
    return GPT2LMHeadModel(config).eval()


def sequences(count: int, seed: int):
    """(ids, attention mask): right-padded token sequences of 5 to 10 tokens."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, 11, (count,), generator=g)
    ids = torch.randint(1, VOCAB, (count, int(lengths.max())), generator=g)
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
    return ids * mask, mask


def sequence_losses(model, batch):
    """Each sequence's summed next-token loss, padding left out."""
    ids, mask = batch
    positions = torch.arange(ids.shape[1]).expand(len(ids), -1)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    token = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    return (token * mask[:, 1:]).sum(dim=1)


@pytest.fixture(scope="module", params=["full", 4])
def logged(request, tmp_path_factory):
    """A logging pass at a fixed checkpoint (eval mode, no optimizer step), EK-FAC statistics."""
    model = gpt2()
    ids, mask = sequences(N_TRAIN, seed=1)
    path = tmp_path_factory.mktemp("tokens") / "log"
    with logix.init(path, rank=request.param, statistics=["kfac", "ekfac"]) as run:
        run.watch(model)
        for start in range(0, N_TRAIN, 8):
            rows = slice(start, start + 8)
            with run.capture(list(range(start, start + 8)), mask=mask[rows], reduction="sum"):
                sequence_losses(model, (ids[rows], mask[rows])).sum().backward()
            model.zero_grad(set_to_none=True)
    log = logix.open(path)
    q_ids, q_mask = sequences(3, seed=2)
    with log.query(model) as q:
        with q.capture([100, 101, 102], mask=q_mask, reduction="sum"):
            sequence_losses(model, (q_ids, q_mask)).sum().backward()
    model.zero_grad(set_to_none=True)
    return model, log, q, ids, mask


@pytest.mark.parametrize("preconditioner", ["identity", "ekfac"])
def test_the_parts_add_up_to_the_logged_score(logged, preconditioner):
    model, log, q, ids, mask = logged
    chosen = [5, 0, 17, 9]
    whole = log.influence(q, preconditioner)
    split = token_influence(log, q, model, chosen, (ids[chosen], mask[chosen]), sequence_losses,
                            preconditioner=preconditioner)  # fmt: skip
    assert split.values.shape == (3, 4, ids.shape[1])
    assert split.ids.tolist() == chosen and split.query_ids.tolist() == [100, 101, 102]
    column = {int(i): c for c, i in enumerate(whole.train_ids)}
    expected = whole.values[:, [column[i] for i in chosen]].double()
    torch.testing.assert_close(split.values.sum(dim=-1), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    padded = mask[chosen] == 0  # positions past a sequence's end carry nothing
    assert bool((split.values[:, padded] == 0).all())
    # more than one position matters: the split says something the sum does not
    assert bool(((split.values != 0).sum(dim=-1) > 1).all())


def test_the_model_is_left_as_it_was(logged, tmp_path):
    model, log, q, ids, mask = logged
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model.train()
    split = token_influence(log, q, model, [1, 2], (ids[[1, 2]], mask[[1, 2]]), sequence_losses)
    assert model.training and all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())
    model.eval()
    split.save(tmp_path / "tokens.h5")
    back = logix.TokenScores.load(tmp_path / "tokens.h5")
    assert torch.equal(back.values, split.values) and back.ids.tolist() == [1, 2]


def test_rows_logged_during_training_are_refused(tmp_path):
    model = gpt2().train()
    ids, mask = sequences(8, seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with logix.init(tmp_path / "log", rank=4, statistics="ekfac") as run:
        run.watch(model, optimizer=opt)
        for start in range(0, 8, 4):
            rows = slice(start, start + 4)
            with run.capture(list(range(start, start + 4)), mask=mask[rows], reduction="sum"):
                sequence_losses(model, (ids[rows], mask[rows])).sum().backward()
            opt.step()
            opt.zero_grad()
    log = logix.open(tmp_path / "log")
    with log.query(model) as q:
        with q.capture([0], mask=mask[:1], reduction="sum"):
            sequence_losses(model, (ids[:1], mask[:1])).sum().backward()
    with pytest.raises(logix.ConfigError, match="was logged during training"):
        token_influence(log, q, model, [0], (ids[:1], mask[:1]), sequence_losses)


def test_a_loss_of_the_wrong_shape_is_refused(logged):
    model, log, q, ids, mask = logged
    with pytest.raises(logix.ConfigError, match=r"one loss per id, shape \(2,\)"):
        token_influence(log, q, model, [1, 2], (ids[[1, 2]], mask[[1, 2]]), lambda m, b: sequence_losses(m, b).sum())


@pytest.mark.parametrize("preconditioner", ["identity", "ekfac"])
def test_the_query_side_parts_add_up_too(logged, preconditioner):
    """Which query positions a train sequence's score comes from: summed over them, the score."""
    model, log, q, ids, mask = logged
    q_ids, q_mask = sequences(3, seed=2)  # the fixture's queries, captured with their summed loss
    chosen = [3, 11, 20]
    split = log.query_token_influence(model, (q_ids, q_mask), sequence_losses, chosen, query_ids=[100, 101, 102],
                                      preconditioner=preconditioner)  # fmt: skip
    whole = log.influence(q, preconditioner)
    column = {int(i): c for c, i in enumerate(whole.train_ids)}
    expected = whole.values[:, [column[i] for i in chosen]].double()
    assert split.values.shape == (3, 3, q_ids.shape[1]) and split.query_ids.tolist() == [100, 101, 102]
    torch.testing.assert_close(split.values.sum(dim=-1), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    assert bool((split.values[q_mask[:, None, :].expand_as(split.values) == 0] == 0).all())  # padding carries nothing
