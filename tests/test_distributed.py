"""Data-parallel train/eval/pretrain/predict (issue 19, parts 1-2): 2 gloo processes under torchrun vs one process.

The comparison runs the real command line under ``python -m torch.distributed.run --nproc_per_node 2``
with deterministic data (no augmentation, no dropout) and a global batch (11) that is odd and does
not divide the training set (80), so every batch is split unevenly, padding entries carry zero weight,
and the last accumulation group is short. Tolerances: per-epoch losses within 1e-5 relative, final
trained weights within 1e-5 absolute (float rounding of the gradient all-reduce and of different
batch shapes; measured ~2e-8 here), identical best epoch and test confusion matrix.

Pretraining (ExPLoRA) is compared the same way with a global batch of 7 (shares of 3 and 4 images):
its crops are seeded per image and its iBOT masks per step, so the augmentation (photometric and
geometric, local crops included) is the same in both runs and the comparison is exact up to float
rounding: losses within 1e-5 relative, student / teacher / head weights within 1e-5 absolute, at the
recipe's learning rate (the weights move by ~5e-4 in 4 steps). The one exception is the key bias of
the unfrozen block, whose gradient is zero analytically: AdamW turns its rounding noise into steps of
~lr, different in every run (4.5e-5 apart after 30 steps here). With optim.lr=0.01 the same Adam
amplification of near-zero gradients grows the other differences to ~2e-5 after 4 steps.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import visiontune as vt
from visiontune import distributed
from visiontune.distributed import Dist, GlobalBatchShards
from visiontune.errors import ConfigError
from visiontune.infer.evaluate import evaluate_run
from visiontune.pretrain import build_student, load_pretrain_config, pretrain

SRC = Path(vt.__file__).resolve().parents[1]
RUN = [
    "data.dataset=digits", "data.train_per_class=8", "data.val_per_class=2", "data.test_per_class=1",
    "backbone.name=test_vit", "backbone.weights=none", "backbone.img_size=32", "method.name=lora", "method.rank=4",
    "optim.head_init=zero", "optim.epochs=3", "optim.batch_size=11", "optim.grad_accum=2", "optim.clip_grad=0.5",
    "optim.label_smoothing=0.1", "optim.lr=0.01", "data.augment=false", "run.progress=false", "run.measure_speed=false",
    "run.name=r", "run.threads=1",
]

# Written into the launched processes' sitecustomize: an audit hook logging every file write, rename and
# folder creation under the run folder, per process (RANK), so the test can see who wrote what.
AUDIT = """
import os, sys
_root = os.environ["VT_AUDIT_ROOT"]
_fd = os.open(os.path.join(os.environ["VT_AUDIT_LOG"], "rank%s.log" % os.environ.get("RANK", "x")),
              os.O_WRONLY | os.O_CREAT | os.O_APPEND)
_busy = []
def _hook(event, args):
    if _busy or event not in ("open", "os.rename", "os.replace", "os.mkdir", "os.remove"):
        return
    path = args[0]
    if not isinstance(path, (str, bytes, os.PathLike)):
        return
    path = os.path.abspath(os.fsdecode(path))
    if not path.startswith(_root):
        return
    if event == "open":
        mode, flags = args[1], args[2]
        writes = (mode is not None and any(c in mode for c in "wax+")) or (
            mode is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if not writes:
            return
    _busy.append(1)
    try:
        os.write(_fd, ("%s %s\\n" % (event, path)).encode())
    finally:
        _busy.pop()
sys.addaudithook(_hook)
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
            "OMP_NUM_THREADS": "1"}


def _torchrun_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "visiontune.cli", *args]


def _torchrun_killed_after(args: list[str], tmp: Path, checkpoint: Path) -> None:
    """Start ``visiontune ARGS`` under torchrun and kill every process of it once ``checkpoint`` exists."""
    import psutil

    proc = subprocess.Popen(_torchrun_command(args), env=_env(), cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not checkpoint.exists() and proc.poll() is None:  # no clock: the checkpoint is the signal
        time.sleep(0.02)
    # torchrun's workers are not in its process group: kill the launcher and every process under it.
    for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            p.kill()
    proc.wait()
    assert checkpoint.exists(), f"no {checkpoint} before the run ended"


def _torchrun(args: list[str], tmp: Path, audit_root: Path | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    env = _env()
    if audit_root is not None:
        hook_dir = tmp / "audit_site"
        hook_dir.mkdir(exist_ok=True)
        (hook_dir / "sitecustomize.py").write_text(AUDIT)
        (tmp / "audit").mkdir(exist_ok=True)
        env.update(VT_AUDIT_ROOT=str(audit_root.resolve()), VT_AUDIT_LOG=str(tmp / "audit"),
                   PYTHONPATH=os.pathsep.join([str(hook_dir), env["PYTHONPATH"]]))
    proc = subprocess.run(_torchrun_command(args), env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def single_and_ddp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same run in one process (in this test process) and in 2 gloo processes (torchrun)."""
    tmp = tmp_path_factory.mktemp("ddp")
    one = vt.train(vt.load_config(None, [*RUN, f"run.dir={tmp / 'one'}"])).run_dir
    proc = _torchrun(["train", *RUN, f"run.dir={tmp / 'two'}"], tmp, audit_root=tmp / "two")
    return {"one": one, "two": tmp / "two" / "r", "tmp": tmp, "stdout": proc.stdout}


def test_two_processes_train_like_one_with_the_same_global_batch(single_and_ddp) -> None:
    one = json.loads((single_and_ddp["one"] / "metrics.json").read_text())
    two = json.loads((single_and_ddp["two"] / "metrics.json").read_text())
    assert two["run"]["processes"] == 2 and "processes" not in one["run"]
    h1, h2 = one["train"]["history"], two["train"]["history"]
    assert len(h1) == len(h2) == 3
    for a, b in zip(h1, h2):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-9)
    # The weights moved (so the comparison means something), and moved the same way.
    w1, w2 = load_file(str(single_and_ddp["one"] / "adapter.safetensors")), load_file(str(single_and_ddp["two"] / "adapter.safetensors"))
    assert sorted(w1) == sorted(w2)
    assert max(float(w1[k].abs().max()) for k in w1 if "lora_B" in k) > 1e-3
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=0)
    assert two["train"]["best_epoch"] == one["train"]["best_epoch"]
    assert two["test"]["confusion"] == one["test"]["confusion"]
    assert two["test"]["num_samples"] == one["test"]["num_samples"] == 10
    # The command line reports once (process 0), not once per process.
    assert single_and_ddp["stdout"].count('"run_dir"') == 1


@pytest.mark.parametrize("runs", ["single_and_ddp", "fsdp_lora"])
def test_only_process_zero_writes_the_run_directory(runs: str, request: pytest.FixtureRequest) -> None:
    """DDP and FSDP (where process 1 takes part in gathering every checkpoint and the adapter) alike."""
    logs = request.getfixturevalue(runs)["tmp"] / "audit"
    rank0 = (logs / "rank0.log").read_text()
    assert "metrics.json" in rank0 and "adapter.safetensors" in rank0 and "checkpoint" in rank0
    rank1 = (logs / "rank1.log").read_text() if (logs / "rank1.log").exists() else ""
    assert rank1 == "", rank1[:2000]


def test_two_processes_probe_head_init_and_prefix_cache(tmp_path: Path) -> None:
    """LP-FT (probe features extracted in shares and gathered) and the frozen-prefix cache under 2 processes.

    The probe head is a scikit-learn fit on features that differ from one process's by float rounding, so
    the tolerance is looser than for the gradient steps alone (5e-3; ~6e-4 measured).
    """
    cfg = [*RUN[:3], "data.test_per_class=3", *[o for o in RUN[4:] if not o.startswith(("optim.head_init", "optim.epochs"))],
           "optim.epochs=2", "method.blocks=last:1"]
    one = vt.train(vt.load_config(None, [*cfg, f"run.dir={tmp_path / 'one'}"])).metrics
    _torchrun(["train", *cfg, f"run.dir={tmp_path / 'two'}"], tmp_path)
    two = json.loads((tmp_path / "two" / "r" / "metrics.json").read_text())
    assert one["train"]["head_init"] == two["train"]["head_init"] == "probe"
    assert one["train"]["prefix_cache"]["used"] and two["train"]["prefix_cache"]["used"]
    for a, b in zip(one["train"]["history"], two["train"]["history"], strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
    assert two["test"]["confusion"] == one["test"]["confusion"] and two["test"]["num_samples"] == 30
    w1 = load_file(str(tmp_path / "one" / "r" / "adapter.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "r" / "adapter.safetensors"))
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=5e-3, rtol=0)


def test_two_process_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_result(single_and_ddp) -> None:
    """Kill every process of a 2-process run after its first checkpoint; resume under torchrun; same end."""
    tmp = single_and_ddp["tmp"]
    run = [*[o for o in RUN if not o.startswith(("optim.epochs", "run.name"))], "optim.epochs=12", "run.name=k"]
    _torchrun(["train", *run, f"run.dir={tmp / 'whole'}"], tmp)
    _torchrun_killed_after(["train", *run, f"run.dir={tmp / 'killed'}"], tmp, tmp / "killed" / "k" / "checkpoint" / "last.safetensors")
    assert not (tmp / "killed" / "k" / "metrics.json").exists(), "the run ended before it was killed"
    _torchrun(["train", *run, f"run.dir={tmp / 'killed'}", "run.resume=true"], tmp)
    whole = json.loads((tmp / "whole" / "k" / "metrics.json").read_text())
    resumed = json.loads((tmp / "killed" / "k" / "metrics.json").read_text())
    assert resumed["train"]["segments"] == 2 and resumed["train"]["resumed_after_epoch"] >= 1
    for a, b in zip(whole["train"]["history"], resumed["train"]["history"], strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-6)
    w1 = load_file(str(tmp / "whole" / "k" / "adapter.safetensors"))
    w2 = load_file(str(tmp / "killed" / "k" / "adapter.safetensors"))
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def eleven_images(single_and_ddp) -> Path:
    """A labeled folder of 11 digits (not a multiple of the 2 processes)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    root = single_and_ddp["tmp"] / "eleven"
    for i in range(11):
        (root / str(d.target[i])).mkdir(parents=True, exist_ok=True)
        Image.fromarray((d.images[i] * 16).astype(np.uint8)).save(root / str(d.target[i]) / f"img{i:02d}.png")
    return root


def test_two_process_eval_scores_each_image_exactly_once(single_and_ddp, eleven_images) -> None:
    tmp, run = single_and_ddp["tmp"], single_and_ddp["one"]
    single = evaluate_run(run, data=str(eleven_images), progress=False, predictions=tmp / "one.csv", batch_size=4)
    proc = _torchrun(["eval", str(run), "--data", str(eleven_images), "--json", "--quiet", "--batch-size", "4",
                      "--predictions", str(tmp / "two.csv")], tmp)
    two = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert two["num_samples"] == single["num_samples"] == 11 and two["processes"] == 2
    assert two["confusion"] == single["confusion"] and two["accuracy"] == single["accuracy"]
    rows1 = list(csv.DictReader((tmp / "one.csv").open()))
    rows2 = list(csv.DictReader((tmp / "two.csv").open()))
    assert len(rows2) == 11 and len({r["file"] for r in rows2}) == 11  # each image once
    assert [(r["file"], r["label"], r["predicted"]) for r in rows2] == [(r["file"], r["label"], r["predicted"]) for r in rows1]
    for a, b in zip(rows1, rows2):
        assert float(b["score"]) == pytest.approx(float(a["score"]), abs=1e-5)


def test_two_process_predict_writes_every_image_once_in_input_order(single_and_ddp, eleven_images) -> None:
    """``predict --output`` under torchrun: shares of 6 and 5 images, process 0 writes the CSV (and alone writes)."""
    from visiontune.cli import main

    tmp, run = single_and_ddp["tmp"], single_and_ddp["one"]
    args = [str(run), str(eleven_images), "--top-k", "2", "--batch-size", "4", "--quiet"]
    assert main(["predict", *args, "--output", str(tmp / "pred1.csv")]) == 0
    audit, out = tmp / "pred_audit", tmp / "pred_out"
    audit.mkdir()
    out.mkdir()
    proc = _torchrun(["predict", *args, "--output", str(out / "pred2.csv")], audit, audit_root=out)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"output": str(out / "pred2.csv"), "images": 11, "errors": 0}
    assert proc.stdout.count('"output"') == 1  # process 0 reports
    rows1 = list(csv.DictReader((tmp / "pred1.csv").open()))
    rows2 = list(csv.DictReader((out / "pred2.csv").open()))
    assert len(rows1) == len(rows2) == 11
    assert [r["file"] for r in rows2] == [r["file"] for r in rows1]  # input order, each image once
    for a, b in zip(rows1, rows2):
        assert (b["label_1"], b["label_2"], b["error"]) == (a["label_1"], a["label_2"], a["error"])
        assert float(b["score_1"]) == pytest.approx(float(a["score_1"]), abs=1e-6)
        assert float(b["score_2"]) == pytest.approx(float(a["score_2"]), abs=1e-6)
    assert "pred2.csv" in (audit / "audit" / "rank0.log").read_text()
    assert not (audit / "audit" / "rank1.log").exists() or (audit / "audit" / "rank1.log").read_text() == ""


# ----------------------------------------------------------------------------- pretrain (ExPLoRA)

PRETRAIN = [
    "data.dataset=digits", "data.max_images=48", "backbone.name=test_vit", "backbone.weights=none", "backbone.img_size=32",
    "crops.local_number=2", "crops.local_size=16", "ssl.prototypes=64", "ssl.head_hidden_dim=32", "ssl.head_bottleneck_dim=16",
    "explora.rank=4", "optim.batch_size=7", "run.progress=false", "run.plot=false", "run.threads=1", "run.name=p",
]


def _pretrain_state(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    from visiontune.checkpoint import load_checkpoint

    ck = load_checkpoint(run / "checkpoint" / "last.safetensors", "pretrain")
    return {net: ck[net] for net in ("student", "teacher", "heads", "center_dino", "center_ibot")}


def _assert_same_pretraining(one: Path, two: Path, rel: float, atol: float) -> None:
    h1, h2 = json.loads((one / "history.json").read_text()), json.loads((two / "history.json").read_text())
    assert [r["step"] for r in h1] == [r["step"] for r in h2]
    for a, b in zip(h1, h2):
        for k in ("loss", "dino", "ibot", "koleo", "teacher_feat_std", "teacher_entropy"):
            assert b[k] == pytest.approx(a[k], rel=rel), (a["step"], k)
        assert b["masked_patches"] == a["masked_patches"] and b["backbone_trained"] == a["backbone_trained"]
    s1, s2 = _pretrain_state(one), _pretrain_state(two)
    for net in s1:
        assert sorted(s1[net]) == sorted(s2[net])
        for k in s1[net]:
            if k.endswith("attn.qkv.k.bias"):
                # Its gradient is zero (a key bias shifts every attention logit of a query alike; softmax ignores it),
                # so what AdamW makes of it is float noise divided by its own size, in one process as in two.
                continue
            torch.testing.assert_close(s2[net][k], s1[net][k], atol=atol, rtol=0, msg=lambda m, net=net, k=k: f"{net} {k}: {m}")
    b1, b2 = load_file(str(one / "backbone.safetensors")), load_file(str(two / "backbone.safetensors"))
    for k in b1:
        torch.testing.assert_close(b2[k], b1[k], atol=atol, rtol=0)


def test_two_process_pretraining_matches_one_process_and_only_process_zero_writes(tmp_path: Path) -> None:
    """Odd global batch (7 = 3 + 4), photometric crops, local crops, iBOT masks, KoLeo, a head warm-up step."""
    run = [*PRETRAIN, "optim.steps=4", "ssl.head_warmup_steps=1", "crops.photometric=true"]
    one = pretrain(load_pretrain_config(None, [*run, f"run.dir={tmp_path / 'one'}"]))
    proc = _torchrun(["pretrain", *run, f"run.dir={tmp_path / 'two'}"], tmp_path, audit_root=tmp_path / "two")
    two = tmp_path / "two" / "p"
    assert not one.history[0]["backbone_trained"] and one.history[1]["backbone_trained"]
    # The weights moved (so the comparison means something), and moved the same way.
    _assert_same_pretraining(one.run_dir, two, rel=1e-5, atol=1e-5)
    start = build_student(load_pretrain_config(None, run))[0].state_dict()
    trained = _pretrain_state(two)["student"]
    assert max(float((trained[k] - start[k]).abs().max()) for k in trained) > 1e-4
    assert proc.stdout.count('"backbone"') == 1  # process 0 reports
    logs = tmp_path / "audit"
    rank0 = (logs / "rank0.log").read_text()
    assert all(f in rank0 for f in ("backbone.safetensors", "backbone.json", "history.json", "config.yaml", "checkpoint"))
    rank1 = (logs / "rank1.log").read_text() if (logs / "rank1.log").exists() else ""
    assert rank1 == "", rank1[:2000]


def test_two_process_pretraining_killed_after_a_checkpoint_resumes_like_one_uninterrupted_process(tmp_path: Path) -> None:
    """Sinkhorn-Knopp centering (its sums run over both processes); kill every process after a checkpoint."""
    run = [*PRETRAIN, "optim.steps=30", "run.checkpoint_every=1", "ssl.centering=sinkhorn", "crops.photometric=false"]
    one = pretrain(load_pretrain_config(None, [*run, f"run.dir={tmp_path / 'one'}"])).run_dir
    _torchrun_killed_after(["pretrain", *run, f"run.dir={tmp_path / 'two'}"], tmp_path,
                           tmp_path / "two" / "p" / "checkpoint" / "last.safetensors")
    assert not (tmp_path / "two" / "p" / "backbone.json").exists(), "the run ended before it was killed"
    _torchrun(["pretrain", *run, f"run.dir={tmp_path / 'two'}", "run.resume=true"], tmp_path)
    two = tmp_path / "two" / "p"
    assert json.loads((two / "backbone.json").read_text())["training"]["steps"] == 30
    _assert_same_pretraining(one, two, rel=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the pieces, in one process


@pytest.mark.parametrize("n,batch,world", [(80, 11, 2), (10, 4, 3), (7, 7, 2), (5, 3, 3)])
def test_global_batch_shards_partition_each_one_process_batch(n: int, batch: int, world: int) -> None:
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(3)
    one = [b.tolist() for b in tqdm(DataLoader(range(n), batch_size=batch, shuffle=True, generator=g), disable=True)]
    shards = [list(GlobalBatchShards(n, batch, 3, r, world)) for r in range(world)]
    assert all(len(s) == len(one) for s in shards)
    for i, batch_ids in enumerate(one):
        parts = [s[i] for s in shards]
        assert len({len(p) for p in parts}) == 1  # every process runs the same number of images
        real = [j for p in parts for j in p if j >= 0]
        assert real == batch_ids  # in order, each once
        assert all(-j - 1 in batch_ids for p in parts for j in p if j < 0)  # padding copies an image of the batch


def test_shards_and_errors_without_a_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(torch.arange(11)), batch_size=4)
    assert distributed.shard_eval(loader) is loader  # one process: untouched
    assert distributed.shard_train(loader, 0, 0) is loader
    ranges = []
    for rank in range(3):
        monkeypatch.setattr(distributed, "_CURRENT", Dist(None, rank, 3, torch.device("cpu")))
        sharded = distributed.shard_eval(loader)
        ranges.append([int(x) for (b,) in sharded for x in b])
        assert sharded.total == 11
    assert [i for r in ranges for i in r] == list(range(11))
    monkeypatch.setattr(distributed, "_CURRENT", Dist(None, 0, 8, torch.device("cpu")))
    with pytest.raises(ConfigError, match="optim.batch_size=4 is the global batch.*at least 8"):
        distributed.shard_train(loader, 0, 0)
    monkeypatch.setattr(distributed, "_CURRENT", None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="run.device='cuda:1' under a launcher.*LOCAL_RANK"):
        distributed.setup("cuda:1")


def test_prediction_files_are_csv(tmp_path: Path, single_and_ddp) -> None:
    with pytest.raises(ConfigError, match="Parquet output needs pyarrow.*write a .csv"):
        evaluate_run(single_and_ddp["one"], predictions=tmp_path / "p.parquet", progress=False)
    with pytest.raises(ConfigError, match="name the file \\*.csv"):
        evaluate_run(single_and_ddp["one"], predictions=tmp_path / "p.txt", progress=False)


# ----------------------------------------------------------------------------- FSDP (run.parallel=fsdp)

# A manifest with fixed splits of odd sizes: 40 training images (global batches 11, 11, 11, 7: uneven shares with
# zero-weight padding), 9 validation images (eval batches of 4: shares of 4 and 5 images, 1 and 2 batches, so the
# sharded model runs a padding forward on process 0) and 11 test images.
FSDP_RUN = [
    "backbone.name=test_vit", "backbone.weights=none", "backbone.img_size=32", "method.name=lora", "method.rank=4",
    "optim.head_init=zero", "optim.epochs=6", "optim.batch_size=11", "optim.grad_accum=2", "optim.clip_grad=0.5",
    "optim.label_smoothing=0.1", "optim.lr=0.01", "optim.eval_batch_size=4", "data.augment=false", "run.progress=false",
    "run.measure_speed=false", "run.name=f", "run.threads=1",
]


def _fsdp_args(data: Path, *extra: str) -> list[str]:
    return [f"data.dataset={data}", *FSDP_RUN, *extra]


def _same_training(one: Path, two: Path, rel: float, atol: float) -> dict[str, Any]:
    """Assert that two runs' per-epoch losses and weights (the saved best epoch's, and the last epoch's in the
    checkpoint) agree; returns the second run's metrics."""
    from visiontune.checkpoint import load_checkpoint

    m1, m2 = json.loads((one / "metrics.json").read_text()), json.loads((two / "metrics.json").read_text())
    for a, b in zip(m1["train"]["history"], m2["train"]["history"], strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=rel)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=rel)
    last = [load_checkpoint(r / "checkpoint" / "last.safetensors", "train")["model"] for r in (one, two)]
    for w1, w2 in [[load_file(str(r / "adapter.safetensors")) for r in (one, two)], last]:
        assert sorted(w1) == sorted(w2)
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    assert m2["train"]["best_epoch"] == m1["train"]["best_epoch"]
    assert m2["test"]["confusion"] == m1["test"]["confusion"]
    return m2


@pytest.fixture(scope="module")
def fsdp_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("fsdp_data")
    d = load_digits()
    rows = ["path,label,split"]
    for i, split in enumerate(["train"] * 40 + ["val"] * 9 + ["test"] * 11):
        Image.fromarray((d.images[i] * 16).astype(np.uint8)).save(root / f"{i:03d}.png")
        rows.append(f"{i:03d}.png,{d.target[i]},{split}")
    (root / "digits.csv").write_text("\n".join(rows) + "\n")
    return root / "digits.csv"


@pytest.fixture(scope="module")
def fsdp_lora(tmp_path_factory: pytest.TempPathFactory, fsdp_data: Path) -> dict[str, Path]:
    """LoRA in one process and sharded over 2 gloo processes (FSDP2), with an audit of who writes."""
    tmp = tmp_path_factory.mktemp("fsdp")
    one = vt.train(vt.load_config(None, [*_fsdp_args(fsdp_data), f"run.dir={tmp / 'one'}"])).run_dir
    _torchrun(["train", *_fsdp_args(fsdp_data, "run.parallel=fsdp"), f"run.dir={tmp / 'two'}"], tmp, audit_root=tmp / "two")
    return {"one": one, "two": tmp / "two" / "f", "tmp": tmp}


def test_fsdp_lora_trains_like_one_process_and_writes_the_same_run_directory(fsdp_lora) -> None:
    """Losses within 1e-5 relative, adapter weights within 1e-5 (measured: 2.5e-7); each test image scored once."""
    from visiontune.checkpoint import load_checkpoint

    one, two = fsdp_lora["one"], fsdp_lora["two"]
    m2 = _same_training(one, two, rel=1e-5, atol=1e-5)
    assert m2["run"]["processes"] == 2 and m2["train"]["fsdp_units"] == 3  # test_vit: 2 blocks, then the root
    assert m2["test"]["num_samples"] == 11 and m2["run"]["val_size"] == 9
    # The checkpoint holds whole tensors in the one-process layout: the same keys, shapes and optimizer state.
    c1, c2 = (load_checkpoint(r / "checkpoint" / "last.safetensors", "train") for r in (one, two))
    assert max(float(v.abs().max()) for k, v in c2["model"].items() if "lora_B" in k) > 1e-2  # the adapters moved
    for part in ("model", "optimizer"):
        flat1 = {k: v for k, v in _flatten(c1[part])}
        flat2 = {k: v for k, v in _flatten(c2[part])}
        assert sorted(flat1) == sorted(flat2)
        for k, v in flat1.items():
            assert getattr(flat2[k], "shape", None) == getattr(v, "shape", None), k
    # The finished run directory reads back like a one-process one (evaluation rebuilds the plain model).
    again = evaluate_run(two, progress=False)
    assert again["confusion"] == m2["test"]["confusion"] and again["num_samples"] == 11


def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(obj, dict):
        return [kv for k, v in obj.items() for kv in _flatten(v, f"{prefix}{k}.")]
    if isinstance(obj, (list, tuple)):
        return [kv for i, v in enumerate(obj) for kv in _flatten(v, f"{prefix}{i}.")]
    return [(prefix, obj)]


def test_fsdp_full_fine_tuning_trains_like_one_process(tmp_path: Path, fsdp_data: Path) -> None:
    """Every parameter sharded and trained (measured: weights within 8e-7 after 3 epochs)."""
    args = [o for o in _fsdp_args(fsdp_data, "method.name=full", "optim.epochs=3") if o != "method.rank=4"]
    one = vt.train(vt.load_config(None, [*args, f"run.dir={tmp_path / 'one'}"])).run_dir
    _torchrun(["train", *args, "run.parallel=fsdp", f"run.dir={tmp_path / 'two'}"], tmp_path)
    m2 = _same_training(one, tmp_path / "two" / "f", rel=1e-5, atol=1e-5)
    assert m2["train"]["fsdp_units"] == 3 and m2["test"]["num_samples"] == 11


def test_fsdp_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_result(tmp_path: Path, fsdp_data: Path) -> None:
    """With the probe head init, whose epoch-0 validation is the sharded model's first forward (without gradients)."""
    args = [o for o in _fsdp_args(fsdp_data, "run.parallel=fsdp") if o != "optim.head_init=zero"]
    _torchrun(["train", *args, f"run.dir={tmp_path / 'whole'}"], tmp_path)
    killed = [*args, f"run.dir={tmp_path / 'killed'}"]
    _torchrun_killed_after(["train", *killed], tmp_path, tmp_path / "killed" / "f" / "checkpoint" / "last.safetensors")
    assert not (tmp_path / "killed" / "f" / "metrics.json").exists(), "the run ended before it was killed"
    _torchrun(["train", *killed, "run.resume=true"], tmp_path)
    resumed = _same_training(tmp_path / "whole" / "f", tmp_path / "killed" / "f", rel=1e-6, atol=1e-6)
    assert resumed["train"]["segments"] == 2 and resumed["train"]["resumed_after_epoch"] >= 1
    whole = json.loads((tmp_path / "whole" / "f" / "metrics.json").read_text())
    assert resumed["train"]["head_init"] == whole["train"]["head_init"] == "probe" and "epoch0_val_accuracy" in whole["train"]


@pytest.mark.parametrize("n,batch", [(9, 4), (11, 4), (1, 3), (8, 4)])
def test_fsdp_evaluation_loaders_give_every_process_as_many_batches(monkeypatch: pytest.MonkeyPatch, n: int, batch: int) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(torch.arange(n)), batch_size=batch)
    batches = []
    for rank in range(2):
        monkeypatch.setattr(distributed, "_CURRENT", Dist(None, rank, 2, torch.device("cpu"), sharded=True))
        sharded = distributed.shard_eval(loader)
        batches.append([b.tolist() for (b,) in sharded])
        assert len(sharded) == len(batches[-1])
    assert len(batches[0]) == len(batches[1]) == -(-(n - n // 2) // batch)
    own = [b for r in range(2) for b in batches[r][: -(-len(distributed.share(n, r, 2)) // batch)]]
    assert [i for b in own for i in b] == list(range(n))  # the real batches: every image once, in order
    assert all(b == [0] for r in range(2) for b in batches[r][-(-len(distributed.share(n, r, 2)) // batch):])


def test_fsdp_settings_that_cannot_work_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    base = ["data.dataset=digits", "run.parallel=fsdp"]
    with pytest.raises(ConfigError, match="qlora with run.parallel=fsdp.*4-bit.*use run.parallel=ddp"):
        vt.load_config(None, [*base, "method.name=qlora"])
    with pytest.raises(ConfigError, match="prefix_cache=views with run.parallel=fsdp"):
        vt.load_config(None, [*base, "run.prefix_cache=views"])
    with pytest.raises(ConfigError, match="run.parallel='zero' is not one of ddp, fsdp"):
        vt.load_config(None, ["data.dataset=digits", "run.parallel=zero"])
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.warns(UserWarning, match="run.parallel=fsdp in one process: nothing to shard"):
        assert distributed.setup("cpu", "fsdp") is None
