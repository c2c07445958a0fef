"""--push-to-hub (embtune/hub_upload.py) against a fake Hub: what is refused before training,
and an upload that fails after it. The upload of a real run is in test_train_integration."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import HfApi

from embtune.config import TrainConfig
from embtune.errors import TrainingStopped, UsageError
from embtune.hub_upload import check_hub_push, push_model_folder, upload_files


def push_config(out: Path, **options: object) -> TrainConfig:
    return TrainConfig(
        model="m", train_data=["t.jsonl"], output_dir=str(out), push_to_hub=True, **options
    )


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Offline mode off, a token in HF_TOKEN, and a Hub that knows it as user 'someone'."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token")
    monkeypatch.setattr(HfApi, "whoami", lambda self, **kwargs: {"name": "someone"})
    return monkeypatch


def test_without_push_to_hub_nothing_is_checked(tmp_path: Path) -> None:
    config = TrainConfig(model="m", train_data=["t.jsonl"], output_dir=str(tmp_path))
    assert check_hub_push(config) is None


def test_a_name_alone_goes_under_the_tokens_account(online: pytest.MonkeyPatch) -> None:
    assert check_hub_push(push_config(Path("runs/my-model"))) == "someone/my-model"
    config = push_config(Path("x"), hub_model_id="team/embedder")
    assert check_hub_push(config) == "team/embedder"


def test_offline_mode_is_refused(online: pytest.MonkeyPatch) -> None:
    online.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError, match="offline mode is on"):
        check_hub_push(push_config(Path("x")))


def test_no_token_is_refused(online: pytest.MonkeyPatch) -> None:
    online.delenv("HF_TOKEN")
    online.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(UsageError, match="no Hugging Face token.*--hub-token"):
        check_hub_push(push_config(Path("x")))


def test_a_token_the_hub_rejects_is_refused(online: pytest.MonkeyPatch) -> None:
    def whoami(self: HfApi, **kwargs: object) -> dict:
        raise RuntimeError("401 Unauthorized: invalid token")

    online.setattr(HfApi, "whoami", whoami)
    with pytest.raises(UsageError, match="did not accept the token.*401 Unauthorized"):
        check_hub_push(push_config(Path("x")))


def test_a_bad_repository_name_is_refused(online: pytest.MonkeyPatch) -> None:
    with pytest.raises(UsageError, match="--hub-model-id: 'a/b/c' is not a repository name"):
        check_hub_push(push_config(Path("x"), hub_model_id="a/b/c"))


def test_hub_options_need_push_to_hub(tmp_path: Path) -> None:
    config = TrainConfig(
        model="m", train_data=["t.jsonl"], output_dir=str(tmp_path), hub_model_id="a/b"
    )
    with pytest.raises(UsageError, match="--hub-model-id only applies with --push-to-hub"):
        config.validate()


def test_the_token_never_reaches_the_saved_options(tmp_path: Path) -> None:
    config = push_config(tmp_path, hub_token="hf_secret")
    assert "hf_secret" not in str(config.to_dict())


def test_a_failed_upload_stops_the_run_naming_the_saved_model(
    online: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def create_repo(self: HfApi, repo_id: str, **kwargs: object) -> object:
        raise ConnectionError("the Hub could not be reached")

    online.setattr(HfApi, "create_repo", create_repo)
    files = upload_files(["model.safetensors", "README.md"])
    assert files == [
        "README.md",
        "model.safetensors",
        "negatives_budget.json",
        "train_config.yaml",
        "train_summary.json",
    ]
    config = push_config(tmp_path, hub_model_id="someone/m")
    with pytest.raises(TrainingStopped) as stopped:
        push_model_folder(tmp_path, files, config, "embtune train: 5 steps")
    message = str(stopped.value)
    assert "the upload to someone/m failed: the Hub could not be reached" in message
    assert f"hf upload someone/m {tmp_path} --include README.md" in message
