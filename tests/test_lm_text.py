"""LM-loss training text (post-training, loss=lm, LoRA): a reference model trains on its own episodes,
whole, with the loss on the answers only (as harness.reference.train did); any other model on the
calibration blocks with every token scored, exactly as before."""
import shutil

import pytest
import torch
from conftest import make_context, random_blocks, tiny_model

from harness import reference as R
from harness.fitting.training import lm_loss, train_lm
from harness.reference import world as W
from harness.reference.episodes import identity, training_text
from harness.reference.tokenizer import EOS_ID, PAD_ID
from harness.reference.train import _rows, word_ids
from harness.signals.calibration import CalibrationConfig


def _model():
    d = R.MODELS_DIR / R.NAMES["medium"]
    if not (d / "manifest.json").is_file():
        pytest.skip(f"reference model {d.name} not shipped")
    return d


def _episodes(world):
    """(context, answer) of the calibration stream's episodes, as the world generated them."""
    stream = world.documents("calibration", 10 ** 12, parts=True)
    return [next(stream) for _ in range(W.CALIBRATION_DOCS)]


def _cfg(seq_len=24, seed=0):
    return CalibrationConfig(source=str(R.CALIBRATION_PATH), seq_len=seq_len, seed=seed)


def test_label_mask_covers_exactly_each_episodes_answer():
    """Every episode of the calibration text, drawn whole: the row starts with it at position 0, the
    loss labels exactly its answer words, their '.' and </s> (split by the world, not re-derived),
    and nothing else; the rest of the row is padding."""
    text = training_text(_model(), str(R.CALIBRATION_PATH))
    assert text is not None and len(text) == W.CALIBRATION_DOCS
    data = text.draw(_cfg(seed=5), seed_offset=2, num_samples=len(text))
    world = W.World()
    episodes = _episodes(world)
    picks = torch.randperm(len(episodes), generator=torch.Generator().manual_seed(5 + 2)).tolist()
    assert data.labels is not None and data.input_ids.shape == (len(episodes), 24)
    seen_tasks = set()
    for r, k in enumerate(picks):
        ctx, answer = episodes[k]
        n_ctx, n_ans = len(ctx.split()), len(answer.split()) + 1  # + </s>
        ids, labels, mask = data.input_ids[r], data.labels[r], data.attention_mask[r]
        scored = (labels != -100).nonzero().flatten().tolist()
        assert scored == list(range(n_ctx, n_ctx + n_ans)), (ctx, answer)
        assert torch.equal(labels[n_ctx:n_ctx + n_ans], ids[n_ctx:n_ctx + n_ans])
        assert ids[n_ctx + n_ans - 1] == EOS_ID and ids[0] != EOS_ID  # no BOS; ends with </s>
        assert mask[:n_ctx + n_ans].all() and not mask[n_ctx + n_ans:].any()
        assert (ids[n_ctx + n_ans:] == PAD_ID).all()
        seen_tasks.add(ctx.split()[0])
    assert len(seen_tasks) >= 5  # copy, reverse, repeat and the two-person episodes (names differ)
    assert data.description["format"] == "episodes" and "answers" in data.description["loss_mask"]
    assert data.description["scored_tokens"] == int((data.labels != -100).sum())


def test_episode_rows_are_the_training_rows_and_the_calibration_text():
    """Same rows as harness.reference.train builds (inputs, labels, attention mask), and the episodes
    in stream order tokenise to exactly the calibration text with the model's own tokenizer."""
    from transformers import AutoTokenizer

    model = _model()
    text = training_text(model, str(R.CALIBRATION_PATH))
    data = text.draw(_cfg(), seed_offset=3, num_samples=64)
    world = W.World()
    episodes = _episodes(world)
    picks = torch.randperm(len(episodes), generator=torch.Generator().manual_seed(3))[:64].tolist()
    x, y = _rows(iter([episodes[k] for k in picks]), 64, 24, word_ids(world.vocabulary()))
    assert torch.equal(data.input_ids, x) and torch.equal(data.labels, y)
    assert torch.equal(data.attention_mask, (x != PAD_ID).long())  # train.py's mask
    tok = AutoTokenizer.from_pretrained(model)
    whole = tok(R.CALIBRATION_PATH.read_text(), add_special_tokens=False)["input_ids"]
    assert whole == [t for c, a in text.documents for t in (*c, *a)]


def test_lm_loss_on_episodes_is_the_reference_training_loss():
    """train_lm's loss on an episode draw is the loss the reference model was trained on."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(_model()).eval()
    data = training_text(_model(), str(R.CALIBRATION_PATH)).draw(_cfg(), num_samples=16)
    with torch.no_grad():
        ours = lm_loss(model, data.input_ids, data.attention_mask, data.labels)
        theirs = model(input_ids=data.input_ids, attention_mask=(data.input_ids != PAD_ID).long(),
                       labels=data.labels).loss
        blocks = lm_loss(model, data.input_ids, data.attention_mask)  # every real token: context words too
    assert torch.allclose(ours, theirs)
    assert ours < 0.1 < blocks  # the trained model solves the answers; random context words are not predictable


def test_only_the_world_calibration_text_of_a_reference_model_gets_episodes(tmp_path):
    model = _model()
    copy = tmp_path / "calibration.txt"  # the same text elsewhere: same episodes
    shutil.copy(R.CALIBRATION_PATH, copy)
    assert training_text(model, str(copy)) is not None
    assert identity(model, str(copy)) == identity(model, str(R.CALIBRATION_PATH)) is not None
    edited = tmp_path / "edited.txt"  # another text: no episode boundaries known
    edited.write_text(R.CALIBRATION_PATH.read_text().replace("copy", "reverse", 1))
    assert training_text(model, str(edited)) is None and identity(model, str(edited)) is None
    other = tmp_path / "ref-opt-16l"  # any other model: a Hub id, a folder (even one with a manifest)
    shutil.copytree(model, other)
    for name in (str(other), "facebook/opt-125m", None):
        assert training_text(name, str(R.CALIBRATION_PATH)) is None


def test_other_models_get_unchanged_blocks_with_every_token_scored():
    """No lm_text (every non-reference model): lm_training_data is training_data's draw, no labels,
    and train_lm's loss and steps are what they were (labels = the real tokens)."""
    torch.manual_seed(0)
    model = tiny_model("opt", layers=4)
    ctx = make_context(model, 1)
    assert ctx.lm_text is None
    plain = ctx.training_data(8, seed_offset=2)
    data = ctx.lm_training_data(8, seed_offset=2)
    assert data.labels is None
    assert torch.equal(data.input_ids, plain.input_ids) and torch.equal(data.attention_mask, plain.attention_mask)
    assert data.description == {**plain.description, "format": "blocks", "loss_mask": "every real token"}
    ids, mask = plain.input_ids, plain.attention_mask.clone()
    mask[0, -3:] = 0
    with torch.no_grad():
        assert torch.equal(lm_loss(model, ids, mask), lm_loss(model, ids, mask, ids.masked_fill(mask == 0, -100)))
    log = train_lm(model, [model.model.decoder.final_layer_norm.weight], random_blocks(8, 16), steps=2, lr=1e-3,
                   batch_size=4, progress=False)
    assert log["tokens"] == 2 * 4 * 16 and log["scored_tokens"] == 2 * 4 * 15


def test_methods_train_the_lm_loss_on_the_context_lm_text():
    """Post-training, loss=lm and LoRA all draw through lm_training_data: with a document text set,
    they train on its rows and record its format and loss mask; the MSE fit keeps the blocks."""
    from harness.signals.calibration import DocumentText
    from conftest import run_method

    torch.manual_seed(0)
    docs = tuple(((5 + i % 7, 9, 10), (11 + i % 5, 12, 2)) for i in range(40))
    text = DocumentText(docs, pad_id=1, description={"source": "x.txt", "format": "episodes", "loss_mask": "answers"})
    ctx = make_context(tiny_model("opt", layers=5), 2)
    ctx.lm_text = text
    res = run_method("streamline", ctx, epochs=1, train_samples=8, post_train_steps=2, post_train_batch_size=4)
    post = res.extra["post_training"]
    assert post["data"]["format"] == "episodes" and post["data"]["loss_mask"] == "answers"
    assert post["scored_tokens"] == 2 * 4 * 3 and post["tokens"] == 2 * 4 * 6
    assert "format" not in res.extra["training"]["data"]  # the MSE fit: calibration blocks as before
    ctx = make_context(tiny_model("opt", layers=5), 2)
    ctx.lm_text = text
    res = run_method("streamline", ctx, epochs=1, train_samples=8, loss="lm")
    assert res.extra["training"]["data"]["format"] == "episodes"
    ctx = make_context(tiny_model("opt", layers=5), 2)
    ctx.lm_text = text
    res = run_method("remove+lora", ctx, **{"lora": {"steps": 2, "batch_size": 4}})
    assert res.extra["lora"]["training"]["data"]["format"] == "episodes"
    # an explicit other text is read as blocks (every token scored), whatever the model
    ctx = make_context(tiny_model("opt", layers=5), 2)
    ctx.lm_text = text
    assert ctx.lm_training_data(4, source="other.txt").labels is None
