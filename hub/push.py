"""Share PanFoMa models and PanFoMaBench datasets on the Hugging Face Hub.

`push_model_to_hub` sends the weights (safetensors), config, model code, gene processor and a generated model
card in ONE commit, so a repo never holds a model without its processor or card. `push_dataset_to_hub` sends
a built PanFoMaBench folder (Parquet shards + dataset card) to a dataset repo. Both use
`HfApi.create_repo` + `HfApi.create_commit` (not `upload_folder`, which may split a large folder into several
commits).

The CLI wiring is two lines in the `panfoma` entry point:

    add_push_arguments(subparsers.add_parser("push", help="..."))   # then, on dispatch:
    return run_push(args)

Example:
    >>> from panfoma.hub.push import push_model_to_hub
    >>> push_model_to_hub("runs/pretrain/final", "me/panfoma-small", metrics={"accuracy": 0.91})  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import os
import re
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

#: Never pushed: VCS metadata, caches, Trainer/Accelerate checkpoints and logs (they hold optimizer state).
IGNORE_PATTERNS = (".git", ".git/*", "*/.git/*", "__pycache__", "*/__pycache__/*", "*.pyc", ".cache/*",
                   "checkpoint-*", "checkpoints/*", "runs/*", "*.lock", ".DS_Store")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def _is_ignored(rel_path: str) -> bool:
    return any(fnmatch.fnmatch(rel_path, pat) or fnmatch.fnmatch(rel_path.split("/")[0], pat)
               for pat in IGNORE_PATTERNS)


def _folder_files(folder: Path) -> dict[str, Path]:
    """path in repo -> local file, for every file of `folder` not matched by IGNORE_PATTERNS."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            rel = path.relative_to(folder).as_posix()
            if not _is_ignored(rel):
                files[rel] = path
    return files


def _check_repo_id(repo_id: str) -> None:
    if not isinstance(repo_id, str) or repo_id.count("/") > 1 or not repo_id.strip("/") or " " in repo_id:
        raise ValueError(f"repo_id must look like 'namespace/name' (or 'name' for your own namespace), got {repo_id!r}.")


def _check_model_folder(folder: Path) -> dict:
    """Refuse folders that are not a saved PanFoMa model; return its config dict."""
    if not folder.exists():
        raise FileNotFoundError(f"model folder {folder} does not exist; save the model with model.save_pretrained().")
    if not folder.is_dir():
        raise ValueError(f"{folder} is a file; pass the folder written by model.save_pretrained().")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{folder} has no config.json: it is not a saved model folder (model.save_pretrained(folder)).")
    config = json.loads(config_path.read_text())
    if config.get("model_type") != "panfoma":
        raise ValueError(
            f"{folder} holds a {config.get('model_type')!r} model, not PanFoMa; push_model_to_hub writes a PanFoMa model "
            "card. Use huggingface_hub.HfApi().upload_folder for other models."
        )
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        found = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = f" Found {found}: re-save with model.save_pretrained(folder) to get safetensors." if found else ""
        raise ValueError(f"{folder} has no {' or '.join(WEIGHT_FILES)}.{hint}")
    return config


#: A name that looks like a size preset (panfoma-tiny/-small/-base, or a made-up panfoma-large): never a checkpoint.
_PRESET_LIKE = re.compile(r"^panfoma[-_][A-Za-z0-9._-]*$", re.IGNORECASE)
NO_PUBLISHED_WEIGHTS = (
    "no pretrained PanFoMa weights are published (on the Hub or elsewhere), and {name!r} is not a folder here: "
    "panfoma-tiny/-small/-base name size presets, not checkpoints. Make a model first: `panfoma pretrain --config {preset} --dataset BENCH --output-dir runs/model` "
    "(in Python: `PanFoMaForPreTraining(PanFoMaConfig.from_preset({preset!r}, ...))`), then pass that folder"
)


def check_pretrained_reference(model_name_or_path: str | os.PathLike, flag: str = "model") -> None:
    """Refuse, before any network access, a model reference that cannot hold pretrained weights.

    A local folder must hold a saved model (`config.json`); a name that is not a folder must be a Hub id
    (`namespace/name`). A preset-like name (`panfoma-base`) with no such folder gets the fix (no weights are
    published: pretrain a model), not 20 s of Hub retries and a network error. `flag` names the argument in messages
    (`model` for a positional, `--model` for an option). Raises `FileNotFoundError` or `ValueError`.

    Example:
        >>> try:
        ...     check_pretrained_reference("panfoma-base")
        ... except FileNotFoundError as error:
        ...     print(str(error).startswith("no pretrained PanFoMa weights are published"))
        True
    """
    path = Path(os.path.expanduser(str(model_name_or_path)))
    text = str(model_name_or_path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{flag} {text}: the folder has no config.json, so it is not a saved model; pass the "
                             "output folder of `panfoma pretrain` or `panfoma finetune` (or of model.save_pretrained)")
        return
    if path.exists():
        raise ValueError(f"{flag} {text} is a file; pass the model folder (the output folder of `panfoma pretrain` "
                         "or `panfoma finetune`)")
    if _PRESET_LIKE.match(text):
        # The pretraining presets (training/configs/*.yaml) that a user would train.
        preset = text.lower() if text.lower() in ("panfoma-small", "panfoma-base") else "panfoma-small"
        raise FileNotFoundError(NO_PUBLISHED_WEIGHTS.format(name=text, preset=preset) + f" as {flag}.")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    looks_like_path = (text.startswith((".", "/", "~")) or "\\" in text or text.endswith("/") or text.count("/") != 1
                       or offline)
    if looks_like_path:
        raise FileNotFoundError(
            f"{flag} {text}: no such folder" + (" (and it is not a Hub id 'namespace/name')" if not offline else
                                                " (HF_HUB_OFFLINE is set, so Hub ids are not tried)")
            + "; pass the output folder of `panfoma pretrain` or `panfoma finetune`")


def push_model_to_hub(
    model_dir_or_model,
    repo_id: str,
    processor=None,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload PanFoMa model, processor and model card",
    model_card: bool | str = True,
    training_data=None,
    metrics=None,
    base_model: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    endpoint: str | None = None,
):
    """Push a PanFoMa model, its gene processor and a generated model card to the Hub in one commit.

    Args:
        model_dir_or_model: a folder written by `save_pretrained`, or a PanFoMa `PreTrainedModel` (saved to a
            temporary folder first).
        repo_id: `"namespace/name"` (created if missing).
        processor: the gene processor to ship (saved with `save_pretrained`); if `None`, processor files already in
            the folder are pushed as they are.
        private: create the repo private (ignored if it exists).
        token: Hub token (default: the logged-in token / `HF_TOKEN`).
        commit_message: the commit title.
        model_card: `True` generates README.md from the config, processor, data and metrics (replacing any
            README.md in the folder, on the Hub only); `False` pushes the folder's own README.md if any; a string
            is pushed as the README.md text.
        training_data / metrics / base_model: passed to `generate_model_card`.
        revision / create_pr: target branch, or open a pull request.
        endpoint: Hub URL (default: `HF_ENDPOINT` or huggingface.co).

    Returns:
        `huggingface_hub.CommitInfo` of the commit (`.oid`, `.commit_url`).

    Raises:
        FileNotFoundError / ValueError: a missing folder, a folder without config.json or safetensors weights, a
            non-PanFoMa model, a processor whose vocabulary hash differs from the model's.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    _check_repo_id(repo_id)
    with tempfile.TemporaryDirectory(prefix="panfoma-push-") as tmp:
        tmp = Path(tmp)
        if hasattr(model_dir_or_model, "save_pretrained") and hasattr(model_dir_or_model, "config"):
            folder = tmp / "model"
            model_dir_or_model.save_pretrained(folder)
            model = model_dir_or_model
        elif isinstance(model_dir_or_model, (str, os.PathLike)):
            folder, model = Path(model_dir_or_model), None
        else:
            raise TypeError(
                "model_dir_or_model must be a saved model folder or a PreTrainedModel, got "
                f"{type(model_dir_or_model).__name__}."
            )
        _check_model_folder(folder)
        files = _folder_files(folder)

        if processor is not None:
            if not hasattr(processor, "save_pretrained"):
                raise TypeError(f"processor must have save_pretrained (a PanFoMa gene processor), got {type(processor)}.")
            processor_dir = tmp / "processor"
            processor.save_pretrained(processor_dir)
            files.update(_folder_files(processor_dir))  # processor files win over stale copies in the folder

        card_text = None
        if model_card is True:
            from panfoma import PanFoMaConfig

            from .model_card import generate_model_card

            config = model.config if model is not None else PanFoMaConfig.from_pretrained(folder)
            card_text = generate_model_card(
                config, processor=processor, training_data=training_data, metrics=metrics, base_model=base_model,
                model=model, repo_id=repo_id if "/" in repo_id else None,
            )
        elif isinstance(model_card, str):
            card_text = model_card
        elif model_card is not False:
            raise TypeError(f"model_card must be True, False or the card text, got {type(model_card).__name__}.")

        operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path)) for rel, path in files.items()
                      if not (card_text is not None and rel == "README.md")]
        if card_text is not None:
            operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card_text.encode()))

        api = HfApi(endpoint=endpoint, token=token)
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        logger.info("pushing %d files to %s", len(operations), repo_url)
        commit = api.create_commit(
            repo_id=repo_url.repo_id, operations=operations, commit_message=commit_message, repo_type="model",
            revision=revision, create_pr=create_pr,
        )
    logger.info("pushed model to %s", commit.commit_url)
    return commit


def push_dataset_to_hub(
    dataset_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload PanFoMaBench dataset",
    revision: str | None = None,
    create_pr: bool = False,
    endpoint: str | None = None,
):
    """Push a built PanFoMaBench folder (Parquet shards + README.md dataset card) to a Hub dataset repo in one commit.

    After the push, `datasets.load_dataset("namespace/name")` reads the same splits as
    `datasets.load_dataset(dataset_dir)`.

    Args:
        dataset_dir: the folder written by the PanFoMaBench builder.
        repo_id: `"namespace/name"` of the dataset repo (created if missing).
        private / token / commit_message / revision / create_pr / endpoint: as in `push_model_to_hub`.

    Returns:
        `huggingface_hub.CommitInfo`.

    Raises:
        FileNotFoundError / ValueError: a missing folder, or one without Parquet shards or a README.md card.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    _check_repo_id(repo_id)
    folder = Path(dataset_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset folder {folder} does not exist; build it first (PanFoMaBench builder).")
    files = _folder_files(folder)
    if not any(rel.endswith(".parquet") for rel in files):
        raise ValueError(f"{folder} has no .parquet shards: it is not a built PanFoMaBench folder.")
    if "README.md" not in files:
        raise ValueError(
            f"{folder} has no README.md dataset card; the builder writes one (with the `configs` split mapping). "
            "Rebuild the dataset or add a card before sharing it."
        )
    operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path)) for rel, path in files.items()]
    api = HfApi(endpoint=endpoint, token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="dataset")
    logger.info("pushing %d files to %s", len(operations), repo_url)
    commit = api.create_commit(
        repo_id=repo_url.repo_id, operations=operations, commit_message=commit_message, repo_type="dataset",
        revision=revision, create_pr=create_pr,
    )
    logger.info("pushed dataset to %s", commit.commit_url)
    return commit


# ------------------------------------------------------------------------------------------------ CLI
def add_push_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `panfoma push` arguments to `parser` (a sub-parser of the `panfoma` command)."""
    parser.add_argument("path", help="model folder (save_pretrained output) or, with --dataset, a built dataset folder")
    parser.add_argument("repo_id", help="Hub repo id, e.g. my-name/panfoma-small")
    parser.add_argument("--dataset", action="store_true", help="push a PanFoMaBench dataset folder (dataset repo)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login)")
    parser.add_argument("--commit-message", default=None, help="commit title")
    parser.add_argument("--revision", default=None, help="branch to push to (default: main)")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of pushing to a branch")
    parser.add_argument("--metrics", default=None,
                        help="JSON file of metrics for the model card: {name: value} or a list of {name, value, ...}")
    parser.add_argument("--training-data", default=None,
                        help="built dataset folder (split sizes are read from it) or JSON file describing the data")
    parser.add_argument("--base-model", default=None, help="Hub id of the model this one was fine-tuned from")
    parser.add_argument("--no-card", action="store_true", help="push the folder's own README.md, do not generate one")
    return parser


def _load_json_arg(value: str | None, what: str):
    if value is None:
        return None
    path = Path(value)
    if not path.is_file():
        raise FileNotFoundError(f"--{what} file {path} does not exist.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"--{what} file {path} is not valid JSON: {err}") from err


def run_push(args: argparse.Namespace) -> int:
    """Run `panfoma push` from parsed arguments; returns the exit code (0)."""
    common = dict(private=args.private, token=args.token, revision=args.revision, create_pr=args.create_pr)
    if args.commit_message:
        common["commit_message"] = args.commit_message
    if args.dataset:
        if args.metrics or args.training_data or args.base_model or args.no_card:
            raise ValueError("--metrics/--training-data/--base-model/--no-card apply to models, not to --dataset.")
        commit = push_dataset_to_hub(args.path, args.repo_id, **common)
    else:
        training_data = args.training_data
        if training_data is not None and Path(training_data).suffix == ".json":
            training_data = _load_json_arg(training_data, "training-data")
        commit = push_model_to_hub(
            args.path, args.repo_id, model_card=not args.no_card, metrics=_load_json_arg(args.metrics, "metrics"),
            training_data=training_data, base_model=args.base_model, **common,
        )
    logger.info("commit %s: %s", commit.oid, commit.commit_url)
    return 0


__all__ = ["push_model_to_hub", "push_dataset_to_hub", "add_push_arguments", "run_push", "check_pretrained_reference"]
