"""NaN/inf guard: a step whose loss or gradient is not finite is skipped and logged with its rows;
--max-nonfinite-steps of them in a row stop the run (exit 3) with a checkpoint from before."""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import embtune.objectives.infonce as infonce_module
from embtune.cli import main
from embtune.objectives.infonce import contrastive_loss
from embtune.training.run import LOG_FILE
from tests.conftest import single_thread
from tests.test_train_integration import _tiny_beir


def poison(
    monkeypatch: pytest.MonkeyPatch,
    loss_at: Collection[int] = (),
    gradient_at: Collection[int] = (),
) -> None:
    """Make the loss NaN at the given (1-based) steps, or only its gradient."""
    step = 0

    def loss(query_emb: torch.Tensor, passage_emb: torch.Tensor, *args, **kwargs):
        nonlocal step
        step += 1
        if step in gradient_at:  # the loss stays finite; backward brings NaN
            query_emb.register_hook(lambda grad: torch.full_like(grad, float("nan")))
        out = contrastive_loss(query_emb, passage_emb, *args, **kwargs)
        if step in loss_at:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(infonce_module, "contrastive_loss", loss)


def argv(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--model", str(model), "--train-data", str(data), "-o", str(out),
        "--batch-size", "4", "--train-group-size", "3", "--logging-steps", "1",
        "--learning-rate", "1e-3", "--warmup-ratio", "0", "--save-steps", "1",
        "--cache-dir", str(out.parent / "cache"), *extra,
    ]  # fmt: skip


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "model.safetensors")


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_non_finite_step_is_skipped_and_logged_with_its_rows(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _tiny_beir(tmp_path / "beir")
    out = tmp_path / "run"
    poison(monkeypatch, loss_at={2, 3}, gradient_at={5})
    with single_thread():
        code = main(argv(tiny_model, data, out, "--max-steps", "6", "--max-nonfinite-steps", "3"))
    assert code == 0  # two in a row stay below the limit of three

    rows = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]
    skipped = {r["step"]: r for r in rows if "skipped" in r}
    assert {step: r["skipped"] for step, r in skipped.items()} == {
        2: "non-finite loss",
        3: "non-finite loss",
        5: "non-finite gradient",
    }
    for record in skipped.values():
        assert len(record["rows"]) == 4 and all(isinstance(r, int) for r in record["rows"])
        assert all(s.startswith(f"{data}/qrels/train.tsv query q") for s in record["sources"])
    assert [r["step"] for r in rows if "loss" in r] == [1, 4, 6]
    # A skipped step leaves the weights alone; the steps around it do change them.
    assert same_weights(out / "checkpoint-1", out / "checkpoint-3")
    assert same_weights(out / "checkpoint-4", out / "checkpoint-5")
    assert not same_weights(out / "checkpoint-3", out / "checkpoint-4")
    assert all(torch.isfinite(w).all() for w in weights(out).values())


def test_too_many_non_finite_steps_in_a_row_stop_with_a_checkpoint_from_before(
    tiny_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = _tiny_beir(tmp_path / "beir")
    out = tmp_path / "run"
    poison(monkeypatch, loss_at=range(4, 100))
    extra = ("--max-steps", "10", "--save-steps", "3", "--max-nonfinite-steps", "3")
    with single_thread():
        code = main(argv(tiny_model, data, out, *extra))
    assert code == 3
    # (progress bars share stderr)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("embtune")]
    assert len(err) == 1, err
    assert err[0].startswith(
        "embtune train: stopped: steps 4-6: 3 steps in a row had a non-finite loss and were "
        f"skipped (rows in {out / LOG_FILE}); stopped. {out / 'checkpoint-6'} holds the model "
        "from before the failure (after step 3)"
    ), err[0]
    assert same_weights(out / "checkpoint-3", out / "checkpoint-6")
    assert not (out / "model.safetensors").exists(), "no final model from a failed run"
    rows = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows if "skipped" in r] == [4, 5, 6]
