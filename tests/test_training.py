"""The flow-matching loop the trained references share: seeded, averaged, saved and loadable."""

from __future__ import annotations

import pytest
import torch

from diffopt.evaluation import ref_wan, training, zoo


def _tiny_wan() -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=1, attention_head_dim=12, in_channels=1,
        out_channels=1, text_dim=8, freq_dim=8, ffn_dim=16, num_layers=1, rope_max_seq_len=16,
    )  # fmt: skip


def _run(steps: int = 4, warmup: int = 2, *, lr: float = 1e-2, trained=None):
    """Train the tiny Wan from scratch, or go on training `trained` (model, embeddings)."""
    torch.manual_seed(0)
    model, embeddings = trained or (_tiny_wan(), zoo.ClassEmbeddings(2, 8))
    images = torch.rand(6, 1, 8, 8) * 2 - 1

    def draw(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(0, len(images), (3,), generator=gen)
        return ref_wan.moving_digits(images[index], gen, frames=2), index

    def velocity(model, xt, sigma, condition):
        return model(hidden_states=xt, timestep=sigma * 1000, **condition, return_dict=False)[0]

    schedule = training.Schedule(steps, lr=lr, warmup=warmup, log_every=100)
    return training.train(model, embeddings, draw, velocity, schedule, from_scratch=trained is None)


def test_training_is_seeded_and_returns_the_average():
    model, _, losses = _run()
    again, _, losses_again = _run()
    assert len(losses) == 4 and losses == losses_again
    for a, b in zip(model.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.proj_out.weight.abs().sum() > 0  # started at zero (adaLN-Zero), then learned


def test_saved_weights_load_back_as_fp32(tmp_path):
    model, embeddings, _ = _run()
    training.save_fp16(model, embeddings, tmp_path)
    loaded, loaded_embeddings = zoo.load_trained(
        type(model), tmp_path, lambda m: zoo.ClassEmbeddings(2, 8)
    )
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    weight = model.proj_out.weight
    torch.testing.assert_close(loaded.proj_out.weight, weight.half().float())
    torch.testing.assert_close(loaded_embeddings.tokens, embeddings.tokens.half().float())


def test_resuming_goes_on_from_the_saved_weights(tmp_path):
    model, embeddings, _ = _run()
    training.save_fp16(model, embeddings, tmp_path)
    resumed = _tiny_wan(), zoo.ClassEmbeddings(2, 8)
    zoo.load_weights(*resumed, tmp_path)
    for m in resumed:
        m.requires_grad_(True)
    again, _, losses = _run(lr=1e-9, trained=resumed)  # a step too small to move the weights
    torch.testing.assert_close(again.proj_out.weight, model.proj_out.weight.half().float())
    _, _, scratch = _run(lr=1e-9)
    assert losses[0] != scratch[0]  # from scratch, the zeroed output gives another loss


def test_a_warmup_longer_than_the_run_is_refused():
    for steps, warmup in ((4, 1), (4, 3)):
        with pytest.raises(ValueError, match="pass another --warmup"):
            _run(steps, warmup)


def test_a_missing_folder_names_the_script_that_makes_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train_ref_wan\.py"):
        zoo.load_trained(type(_tiny_wan()), tmp_path / "ref-wan", ref_wan.class_embeddings)
