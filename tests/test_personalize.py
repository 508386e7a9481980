"""Fine-tuning (pva.personalize): prior preservation, reused encodings."""

from __future__ import annotations

import pytest
import torch


def test_prior_preservation_adds_its_loss(make_model):
    from conftest import make_batch

    from pva.personalize import personalized

    model = make_model()
    batch = make_batch(batch_size=3, num_refs=1)
    boxes = [(16, 16, 48, 48)] * 3
    refs = batch["image"]
    prior = make_batch(batch_size=1, num_refs=2, seed=5)
    prior["prompt"] = ["photo of a person"]
    runs = []
    for p in (None, lambda g: prior):
        with personalized(
            model, batch["image"], refs, boxes, steps=2, variant="custom-diffusion", prior=p
        ) as result:
            runs.append(result.losses)
    assert runs[0] != runs[1] and runs[1][0] > runs[0][0]


@pytest.mark.parametrize("variant", ["pva", "custom-diffusion"])
def test_reused_encodings_give_the_same_fine_tuning_with_fewer_encoder_runs(make_model, variant):
    from conftest import count_calls, make_batch

    from pva.personalize import personalized

    model = make_model()
    batch = make_batch(batch_size=3, num_refs=1)
    boxes = [(16, 16, 48, 48), (8, 12, 40, 56), (20, 4, 60, 44)]
    calls = {"vae": 0, "identity": 0}
    count_calls(calls, "vae", model.vae, "encode")
    count_calls(calls, "identity", model.identity_encoder.backbone, "forward")
    runs = {}
    for reuse in (False, True):
        calls.update(vae=0, identity=0)
        with personalized(
            model,
            batch["image"],
            batch["image"],
            boxes,
            steps=8,
            batch_size=1,
            variant=variant,
            lr=1e-3,
            reuse_encodings=reuse,
        ) as result:
            runs[reuse] = (result.losses, result.state, dict(calls))
    (loss_a, state_a, calls_a), (loss_b, state_b, calls_b) = runs[False], runs[True]
    assert loss_b == loss_a  # bit for bit: same encodings, same random draws
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_b[k], state_a[k]) for k in state_a)
    assert calls_a["vae"] == 2 * 8  # image and masked image, every step
    assert calls_b["vae"] <= 2 * 3 * 2  # once per photo and flip
    if variant == "custom-diffusion":
        assert calls_a["identity"] == calls_b["identity"] == 0
    else:  # 3 references a step (2 others + a flipped copy); reused: once per photo and flip
        assert calls_a["identity"] == 8 * 3 and calls_b["identity"] <= 3 * 2
    # the frozen projection gets no gradient (restoring leaves it untouched)
    assert all(p.grad is None for p in model.identity_encoder.projection.parameters())
