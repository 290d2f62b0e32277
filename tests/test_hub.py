"""Push to / load from the Hub, through a local server that speaks the Hub API (tests/hub_server.py).

The client side is the real `huggingface_hub` / `transformers` / `datasets` code, run in a subprocess because
`HF_ENDPOINT` is read at import time (and the test session itself is offline). The subprocess pushes a PanFoMa
model (+ gene processor when the package has one) and a small Parquet dataset, then loads both back by hub id
into a fresh cache; the tests then check what arrived on the server, byte for byte, and what was loaded back.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_server import LocalHubServer, git_blob_oid  # noqa: E402

MODEL_REPO = "user/panfoma-tiny-test"
DATASET_REPO = "user/panfoma-bench-test"

# Runs in the subprocess; argv: work dir. Writes report.json there.
CLIENT_SCRIPT = textwrap.dedent(
    r"""
    import json, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    torch.manual_seed(0)

    work = Path(sys.argv[1])
    report = {}

    from huggingface_hub import HfApi, snapshot_download
    from transformers import AutoModel
    from panfoma import PanFoMaConfig, PanFoMaModel
    from panfoma.hub.push import add_push_arguments, push_model_to_hub, run_push
    from panfoma.tokenization import PanFoMaGeneProcessor, register_auto_classes

    register_auto_classes()  # idempotent; makes AutoProcessor know the class even if `import panfoma` does not
    processor = PanFoMaGeneProcessor()
    vocab_kwargs = processor.model_config_kwargs()  # vocab_size, vocab_hash, n_bins of the processor
    vocab_size = vocab_kwargs["vocab_size"]

    config = PanFoMaConfig.from_preset("panfoma-tiny", gene_chunk_size=16, num_encoder_layers=2,
                                       num_mamba_layers=2, mamba_implementation="torch", **vocab_kwargs)
    model = PanFoMaModel(config).eval()
    model_dir = work / "model"
    model.save_pretrained(model_dir)

    commit = push_model_to_hub(model_dir, "MODEL_REPO", processor=processor,
                               metrics={"accuracy": 0.875, "macro_f1": 0.5},
                               training_data={"name": "toy cells", "splits": {"train": 40, "test": 8}})
    report["model_commit"] = commit.oid
    api = HfApi()
    report["model_files"] = sorted(f.path for f in api.list_repo_tree("MODEL_REPO", recursive=True))

    # Load back by hub id into the fresh HF_HOME cache, from the local server.
    loaded = AutoModel.from_pretrained("MODEL_REPO").eval()
    report["loaded_class"] = type(loaded).__name__
    report["loaded_from"] = str(loaded.name_or_path)
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(4, vocab_size, (3, 40), generator=g)
    values = torch.randint(1, config.n_bins, (3, 40), generator=g)
    with torch.no_grad():
        a = model(input_ids=input_ids, values=values).pooler_output
        b = loaded(input_ids=input_ids, values=values).pooler_output
    report["pooler_max_abs_diff"] = float((a - b).abs().max())
    sd_a, sd_b = model.state_dict(), loaded.state_dict()
    report["state_dict_keys_equal"] = sorted(sd_a) == sorted(sd_b)
    report["state_dict_max_abs_diff"] = max(float((sd_a[k].float() - sd_b[k].float()).abs().max()) for k in sd_a)
    from transformers import AutoProcessor
    loaded_processor = AutoProcessor.from_pretrained("MODEL_REPO")
    report["loaded_processor_class"] = type(loaded_processor).__name__
    report["loaded_processor_vocab_hash"] = loaded_processor.vocab_hash
    report["processor_vocab_hash"] = processor.vocab_hash

    # A model object (not a folder) is saved and pushed the same way; here a classification head.
    from panfoma import PanFoMaForCellClassification
    config.num_labels = 2
    head_commit = push_model_to_hub(PanFoMaForCellClassification(config), "MODEL_REPO-head", model_card=False)
    report["head_files"] = sorted(f.path for f in api.list_repo_tree("MODEL_REPO-head", recursive=True))

    # The dataset goes through the CLI function (what `panfoma push --dataset` runs).
    import argparse
    parser = add_push_arguments(argparse.ArgumentParser())
    report["dataset_exit_code"] = run_push(parser.parse_args([str(work / "dataset"), "DATASET_REPO", "--dataset"]))
    snap = Path(snapshot_download("DATASET_REPO", repo_type="dataset"))
    report["dataset_snapshot"] = {p.relative_to(snap).as_posix(): p.read_bytes().hex()
                                  for p in sorted(snap.rglob("*")) if p.is_file()}
    import datasets
    ds = datasets.load_dataset("DATASET_REPO")
    report["dataset_rows"] = {split: ds[split].num_rows for split in ds}
    report["dataset_train_first"] = ds["train"][0]
    (work / "report.json").write_text(json.dumps(report))
    """
).replace("MODEL_REPO", MODEL_REPO).replace("DATASET_REPO", DATASET_REPO)


def _write_dataset(folder: Path) -> dict[str, list[dict]]:
    """A tiny PanFoMaBench-shaped folder: Parquet shards per split + a README card with `configs`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {
        "train": [{"gene_ids": [5, 9, 11], "counts": [1.0, 3.0, 2.0], "cancer_type": 0, "patient": "p1"},
                  {"gene_ids": [4, 9], "counts": [7.0, 1.0], "cancer_type": 1, "patient": "p2"},
                  {"gene_ids": [6], "counts": [2.0], "cancer_type": 1, "patient": "p2"}],
        "test": [{"gene_ids": [7, 8], "counts": [1.0, 1.0], "cancer_type": 0, "patient": "p3"}],
    }
    (folder / "data").mkdir(parents=True)
    for split, split_rows in rows.items():
        pq.write_table(pa.Table.from_pylist(split_rows), folder / "data" / f"{split}-00000-of-00001.parquet")
    (folder / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*.parquet\n"
        "  - split: test\n    path: data/test-*.parquet\nlicense: cc-by-4.0\n---\n# Toy PanFoMaBench\n"
    )
    return rows


@pytest.fixture(scope="module")
def hub_round_trip(tmp_path_factory):
    """Start the local Hub, run the client subprocess once, and hand its report + the server to the tests."""
    work = tmp_path_factory.mktemp("hub_round_trip")
    rows = _write_dataset(work / "dataset")
    script = work / "client.py"
    script.write_text(CLIENT_SCRIPT)
    with LocalHubServer(work / "server") as hub:
        env = {**os.environ, **hub.client_env(work / "hf_home"), "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, str(script), str(work)], env=env, capture_output=True, text=True,
                              timeout=240)
        if proc.returncode != 0:
            pytest.fail(f"client subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        report = json.loads((work / "report.json").read_text())
        yield {"hub": hub, "report": report, "work": work, "rows": rows}


def _tree(hub: LocalHubServer, repo_type: str, repo_id: str) -> dict:
    repo = hub.store.get_repo(repo_type, repo_id)
    return repo.commits[repo.branches["main"]]["tree"]


def _stored_bytes(hub: LocalHubServer, entry: dict) -> bytes:
    if entry["lfs"]:
        return hub.store.lfs_path(entry["lfs"]["oid"]).read_bytes()
    return (hub.store.root / "blobs" / entry["oid"]).read_bytes()


def test_model_files_arrive_with_real_bytes_in_one_commit(hub_round_trip):
    hub, work, report = hub_round_trip["hub"], hub_round_trip["work"], hub_round_trip["report"]
    repo = hub.store.get_repo("model", MODEL_REPO)
    head = repo.branches["main"]
    assert report["model_commit"] == head
    # One push = one commit on top of the repo's initial commit.
    assert repo.commits[repo.commits[head]["parent"]]["parent"] is None
    tree = _tree(hub, "model", MODEL_REPO)
    assert {"config.json", "model.safetensors", "README.md"} <= set(tree)
    assert sorted(tree) == report["model_files"]
    for name in ("config.json", "model.safetensors"):
        assert _stored_bytes(hub, tree[name]) == (work / "model" / name).read_bytes(), name
    # Weights travelled through git-LFS: the pointer holds the sha256 of the real bytes.
    weights = (work / "model" / "model.safetensors").read_bytes()
    assert tree["model.safetensors"]["lfs"]["oid"] == hashlib.sha256(weights).hexdigest()
    assert tree["config.json"]["oid"] == git_blob_oid((work / "model" / "config.json").read_bytes())


def test_pushed_card_is_generated_with_metrics(hub_round_trip):
    from huggingface_hub import ModelCard

    hub = hub_round_trip["hub"]
    card = ModelCard(_stored_bytes(hub, _tree(hub, "model", MODEL_REPO)["README.md"]).decode())
    scores = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert scores == {"accuracy": 0.875, "macro_f1": 0.5}
    assert card.data.library_name == "transformers" and "panfoma" in card.data.tags
    assert "| train | 40 |" in card.text and "2512.03111" in card.text


def test_push_used_preupload_lfs_batch_and_commit_endpoints(hub_round_trip):
    calls = [(method, path.split("?")[0]) for method, path in hub_round_trip["hub"].requests]
    paths = [p for _, p in calls]
    assert ("POST", "/api/repos/create") in calls
    assert f"/api/models/{MODEL_REPO}/preupload/main" in paths
    assert f"/{MODEL_REPO}.git/info/lfs/objects/batch" in paths
    assert any(m == "PUT" and p.startswith("/lfs-upload/") for m, p in calls)
    assert any(p.startswith("/lfs-verify/") for p in paths)
    assert f"/api/models/{MODEL_REPO}/commit/main" in paths
    assert f"/api/datasets/{DATASET_REPO}/commit/main" in paths
    assert not any("xet" in p.lower() for p in paths)
    # Every call the real clients made (push, from_pretrained, snapshot_download, load_dataset) was understood.
    assert hub_round_trip["hub"].unrouted == []


def test_model_loads_back_by_hub_id_with_identical_weights_and_outputs(hub_round_trip):
    report, hub = hub_round_trip["report"], hub_round_trip["hub"]
    assert report["loaded_class"] == "PanFoMaModel"
    assert report["loaded_from"] == MODEL_REPO
    assert report["state_dict_keys_equal"]
    assert report["state_dict_max_abs_diff"] == 0.0
    assert report["pooler_max_abs_diff"] < 1e-6
    # The weights were downloaded from the server (the LFS "CDN" path), not found somewhere locally.
    sha = _tree(hub, "model", MODEL_REPO)["model.safetensors"]["lfs"]["oid"]
    assert ("GET", f"/lfs-objects/{sha}") in hub.requests


def test_model_object_push(hub_round_trip):
    hub, report = hub_round_trip["hub"], hub_round_trip["report"]
    tree = _tree(hub, "model", MODEL_REPO + "-head")
    assert sorted(tree) == report["head_files"]
    assert "README.md" not in tree  # model_card=False and the saved folder has no card
    config = json.loads(_stored_bytes(hub, tree["config.json"]))
    assert config["architectures"] == ["PanFoMaForCellClassification"]
    assert tree["model.safetensors"]["lfs"]["size"] > 0


def test_processor_files_arrive_and_load(hub_round_trip):
    report, hub = hub_round_trip["report"], hub_round_trip["hub"]
    tree = _tree(hub, "model", MODEL_REPO)
    work = hub_round_trip["work"]
    assert {"preprocessor_config.json", "gene_vocab.json"} <= set(tree)
    # The vocabulary file that arrived is the one the processor writes (same bytes).
    from panfoma.tokenization import PanFoMaGeneProcessor

    PanFoMaGeneProcessor().save_pretrained(work / "processor_check")
    assert _stored_bytes(hub, tree["gene_vocab.json"]) == (work / "processor_check" / "gene_vocab.json").read_bytes()
    assert report["loaded_processor_class"] == "PanFoMaGeneProcessor"
    assert report["loaded_processor_vocab_hash"] == report["processor_vocab_hash"]
    # The card describes the processor that was pushed with the model.
    card = _stored_bytes(hub, tree["README.md"]).decode()
    assert report["processor_vocab_hash"] in card


def test_dataset_round_trip(hub_round_trip):
    hub, work, report, rows = (hub_round_trip[k] for k in ("hub", "work", "report", "rows"))
    assert report["dataset_exit_code"] == 0
    local = {p.relative_to(work / "dataset").as_posix(): p.read_bytes().hex()
             for p in sorted((work / "dataset").rglob("*")) if p.is_file()}
    snapshot = {k: v for k, v in report["dataset_snapshot"].items() if k != ".gitattributes"}
    assert snapshot == local
    tree = _tree(hub, "dataset", DATASET_REPO)
    assert tree["data/train-00000-of-00001.parquet"]["lfs"] is not None
    assert report["dataset_rows"] == {split: len(r) for split, r in rows.items()}
    assert report["dataset_train_first"] == rows["train"][0]


# ------------------------------------------------------------------ the server answers like the Hub on bad requests
@pytest.fixture()
def bare_hub(tmp_path):
    with LocalHubServer(tmp_path / "server") as hub:
        hub.store.create_repo("model", "user/r", private=False)
        yield hub


def _request(hub, method, path, body=None, headers=None):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=10)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp, data


def test_server_refuses_lfs_content_with_wrong_sha(bare_hub):
    resp, _ = _request(bare_hub, "PUT", "/lfs-upload/" + "0" * 64, body=b"not the announced content")
    assert resp.status == 400
    assert not bare_hub.store.has_lfs("0" * 64)


def test_server_refuses_commit_of_unuploaded_lfs_object(bare_hub):
    lines = [{"key": "header", "value": {"summary": "x"}},
             {"key": "lfsFile", "value": {"path": "w.safetensors", "algo": "sha256", "oid": "a" * 64, "size": 3}}]
    body = "\n".join(json.dumps(item) for item in lines).encode()
    resp, _ = _request(bare_hub, "POST", "/api/models/user/r/commit/main", body,
                       {"Content-Type": "application/x-ndjson"})
    assert resp.status == 422
    assert "w.safetensors" not in _tree(bare_hub, "model", "user/r")


def test_server_error_codes_match_the_hub(bare_hub):
    resp, _ = _request(bare_hub, "HEAD", "/user/r/resolve/main/missing.json")
    assert resp.status == 404 and resp.getheader("X-Error-Code") == "EntryNotFound"
    assert resp.getheader("X-Repo-Commit") == bare_hub.store.get_repo("model", "user/r").branches["main"]
    resp, _ = _request(bare_hub, "HEAD", "/user/r/resolve/nobranch/.gitattributes")
    assert resp.getheader("X-Error-Code") == "RevisionNotFound"
    resp, _ = _request(bare_hub, "GET", "/api/models/user/absent")
    assert resp.getheader("X-Error-Code") == "RepoNotFound"
    # A stale parent commit is refused instead of silently overwriting newer work.
    body = json.dumps({"key": "header", "value": {"summary": "x", "parentCommit": "f" * 40}}).encode()
    resp, _ = _request(bare_hub, "POST", "/api/models/user/r/commit/main", body)
    assert resp.status == 412


def test_server_tree_and_paths_info_listings(bare_hub):
    repo = bare_hub.store.get_repo("model", "user/r")
    bare_hub.store.commit(repo, "main", "add", [("file", "a/b/c.json", b"{}"), ("file", "a/d.txt", b"hi")])
    resp, data = _request(bare_hub, "GET", "/api/models/user/r/tree/main/a")
    listing = {e["path"]: e["type"] for e in json.loads(data)}
    assert listing == {"a/b": "directory", "a/d.txt": "file"}
    resp, data = _request(bare_hub, "GET", "/api/models/user/r/tree/main?recursive=true")
    assert {e["path"] for e in json.loads(data) if e["type"] == "file"} == {".gitattributes", "a/b/c.json", "a/d.txt"}
    body = json.dumps({"paths": ["a/d.txt", "a/b", "nope"]}).encode()
    resp, data = _request(bare_hub, "POST", "/api/models/user/r/paths-info/main", body,
                          {"Content-Type": "application/json"})
    info = {e["path"]: e for e in json.loads(data)}
    assert set(info) == {"a/d.txt", "a/b"}
    assert info["a/d.txt"]["oid"] == git_blob_oid(b"hi") and info["a/d.txt"]["size"] == 2


# ------------------------------------------------------------------ bad input to the push helpers (no network)
def test_push_model_refuses_bad_folders(tmp_path):
    from panfoma.hub.push import push_model_to_hub

    with pytest.raises(FileNotFoundError, match="does not exist"):
        push_model_to_hub(tmp_path / "absent", "user/x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        push_model_to_hub(tmp_path / "empty", "user/x")
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="not PanFoMa"):
        push_model_to_hub(other, "user/x")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "panfoma"}))
    (pickled / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        push_model_to_hub(pickled, "user/x")
    with pytest.raises(ValueError, match="namespace/name"):
        push_model_to_hub(pickled, "a/b/c")
    with pytest.raises(TypeError, match="saved model folder or a PreTrainedModel"):
        push_model_to_hub(42, "user/x")


def test_push_dataset_refuses_bad_folders(tmp_path):
    from panfoma.hub.push import push_dataset_to_hub

    with pytest.raises(FileNotFoundError, match="does not exist"):
        push_dataset_to_hub(tmp_path / "absent", "user/x")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "README.md").write_text("# card")
    with pytest.raises(ValueError, match="no .parquet shards"):
        push_dataset_to_hub(tmp_path / "d", "user/x")
    _write_dataset(tmp_path / "nocard")
    (tmp_path / "nocard" / "README.md").unlink()
    with pytest.raises(ValueError, match="no README.md dataset card"):
        push_dataset_to_hub(tmp_path / "nocard", "user/x")
