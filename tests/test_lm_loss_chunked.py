"""The LM loss in chunks of positions (harness.fitting.training._chunked_lm_loss, used when a batch's
logits exceed LOGITS_BUDGET_BYTES, e.g. Gemma 3's 262k-token head) gives the model's own ``labels=``
loss and the same gradients, in every adapter family, through PEFT, with soft-capping; a model whose
logits it cannot reproduce fails with a clear error."""
import pytest
import torch
from conftest import tiny_model
from test_families import FAMILIES

from harness.errors import MethodFailed
from harness.fitting.training import lm_loss


def _batch(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # a padded row
    labels = ids.masked_fill(mask == 0, -100)
    labels[2, :5] = -100  # answer-only labels, as the reference episodes use
    return ids, mask, labels


def _loss_and_grads(model, ids, mask, labels, budget):
    model.zero_grad(set_to_none=True)
    loss = lm_loss(model, ids, mask, labels, logits_budget=budget)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _check(model, budget_rows=4):
    ids, mask, labels = _batch(model)
    full, g_full = _loss_and_grads(model, ids, mask, labels, budget=2**40)
    rows = budget_rows * model.get_output_embeddings().weight.shape[0] * 4  # 4 positions a chunk: several chunks
    chunked, g_chunked = _loss_and_grads(model, ids, mask, labels, budget=rows)
    assert torch.isfinite(full) and abs(float(full) - float(chunked)) < 1e-5 * max(1.0, abs(float(full)))
    assert g_full.keys() == g_chunked.keys() and g_full
    for n in g_full:
        torch.testing.assert_close(g_chunked[n], g_full[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_lm_loss_equals_models_own(family):
    _check(tiny_model(family))


def test_chunked_lm_loss_with_softcapping_and_peft():
    from peft import LoraConfig, get_peft_model

    model = tiny_model("gemma3_text")
    model.config.final_logit_softcapping = 0.5  # strong capping: a wrong order of operations shows
    _check(model)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)  # non-zero adapters, so they change the logits
    _check(peft_model)


def test_unknown_step_after_head_is_an_error():
    model = tiny_model("llama")
    forward = model.forward

    def scaled(*a, **kw):  # a model that rescales its logits in a way the harness does not know
        out = forward(*a, **kw)
        out.logits = out.logits * 2
        return out
    model.forward = scaled
    ids, mask, labels = _batch(model)
    with pytest.raises(MethodFailed, match="cannot reproduce"):
        lm_loss(model, ids, mask, labels, logits_budget=16)
