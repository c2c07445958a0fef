"""``--push-to-hub``: the finished run's model uploaded to a Hugging Face Hub repository.

Uploaded: the files of the final model's save (weights or the LoRA adapter, config, tokenizer,
the sentence-transformers modules, embtune_encoder.json / embtune_reranker.json, the model card
README.md) and the run's :data:`RUN_FILES` (train_summary.json, train_config.yaml, which never
holds a token, negatives_budget.json). Not uploaded: checkpoints (optimizer state, only for
--resume), best/, merged_model/, interpolated/, the learning-rate trials, the logs
(train_log.jsonl, tensorboard/, wandb/), trainer_state.json, and dev_split.json and
rejected_rows.jsonl, which hold rows of the training data.

What can be checked is checked before training starts (:func:`check_hub_push`): offline mode,
a token, the token's account and the repository name. An upload that fails after training
stops the command with exit status 3, saying where the model is and how to upload it then.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from embtune.config import TrainConfig
from embtune.errors import TrainingStopped, UsageError
from embtune.run_files import BUDGET_FILE, CONFIG_FILE, SUMMARY_FILE

RUN_FILES = (SUMMARY_FILE, CONFIG_FILE, BUDGET_FILE)
_TRUE = {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """True when Hugging Face's offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)."""
    from huggingface_hub import constants

    variables = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.is_offline_mode() or any((v or "").upper() in _TRUE for v in variables)


def hub_token(config: TrainConfig) -> str | None:
    """--hub-token, else HF_TOKEN or the token `hf auth login` saved."""
    import huggingface_hub

    return config.hub_token or huggingface_hub.get_token()


def check_hub_push(config: TrainConfig) -> str | None:
    """With --push-to-hub, refuse what would make the upload fail (offline mode, no token, a
    token the Hub rejects, a bad repository name) and return the repository as OWNER/NAME;
    None without --push-to-hub."""
    if not config.push_to_hub:
        return None
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if hub_offline():
        raise UsageError(
            "--push-to-hub: Hugging Face's offline mode is on (HF_HUB_OFFLINE), so nothing can "
            "be uploaded; unset it, or drop --push-to-hub and upload the folder later"
        )
    token = hub_token(config)
    if not token:
        raise UsageError(
            "--push-to-hub: no Hugging Face token; log in with `hf auth login`, set HF_TOKEN, "
            "or pass --hub-token"
        )
    name = config.hub_model_id or Path(config.output_dir).resolve().name
    option = "--hub-model-id" if config.hub_model_id else "--hub-model-id (default: --output-dir)"
    try:
        if "/" not in name:
            name = f"{_account(HfApi(token=token))}/{name}"
        validate_repo_id(name)
    except HFValidationError as exc:
        raise UsageError(f"{option}: {name!r} is not a repository name: {exc}") from exc
    return name


def _account(api: object) -> str:
    """The token's account, asked of the Hub (a rejected token is refused here)."""
    try:
        return api.whoami()["name"]  # type: ignore[attr-defined]
    except Exception as exc:  # HTTP errors, no network: the same refusal either way
        raise UsageError(
            f"--push-to-hub: the Hub did not accept the token or could not be reached: "
            f"{_reason(exc)}; check the token (`hf auth whoami`) or give --hub-model-id "
            "OWNER/NAME"
        ) from exc


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def upload_files(model_files: list[str]) -> list[str]:
    """The files of a run folder --push-to-hub uploads: the model's save and RUN_FILES."""
    return sorted({*model_files, *RUN_FILES})


def push_model_folder(folder: Path, files: list[str], config: TrainConfig, message: str) -> str:
    """Create the repository if missing and upload ``files`` of ``folder`` in one commit;
    returns the commit's address. A failure stops the run (exit 3) naming the way to upload
    the saved model by hand."""
    from huggingface_hub import HfApi

    repo_id = config.hub_model_id
    try:
        api = HfApi(token=hub_token(config))
        repo = api.create_repo(
            repo_id, private=True if config.hub_private_repo else None, exist_ok=True
        )
        commit = api.upload_folder(
            repo_id=repo.repo_id,
            folder_path=str(folder),
            allow_patterns=files,
            commit_message=message,
        )
    except Exception as exc:  # HTTP, network and permission errors alike
        includes = " ".join(f"--include {shlex.quote(name)}" for name in files)
        raise TrainingStopped(
            f"--push-to-hub: the upload to {repo_id} failed: {_reason(exc)}. The model is "
            f"saved in {folder}; upload it with: hf upload {repo_id} {folder} {includes}"
        ) from exc
    return str(getattr(commit, "commit_url", "") or f"https://huggingface.co/{repo.repo_id}")


def push_finished_run(out: Path, model_files: list[str], config: TrainConfig, steps: int) -> str:
    """Upload a finished run's model (:func:`upload_files`) to --hub-model-id; say where."""
    files = upload_files(model_files)
    print(f"embtune train: uploading {len(files)} files of {out} to {config.hub_model_id}")
    url = push_model_folder(out, files, config, f"embtune train: {steps} steps")
    print(f"embtune train: uploaded to {url}")
    return url
