"""End-to-end extended pretraining on tiny models: outputs, lineage, exact resume, data sources, CLI, fine-tuning use."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import visiontune as vt
from visiontune.checkpoint import load_checkpoint
from visiontune.cli import main
from visiontune.errors import ConfigError, DataError
from visiontune.pretrain import export_checkpoint, load_backbone, load_pretrain_config, pretrain
from visiontune.pretrain.crops import load_unlabeled

TINY = [
    "data.dataset=digits", "data.max_images=48", "backbone.name=test_vit", "backbone.weights=none", "backbone.img_size=32",
    "crops.local_number=2", "crops.local_size=16", "ssl.prototypes=64", "ssl.head_hidden_dim=32",
    "ssl.head_bottleneck_dim=16", "explora.rank=4", "optim.steps=4", "optim.batch_size=8", "run.progress=false",
    "run.plot=false", "crops.photometric=false",
    "run.threads=1",  # tiny tensors: a second thread only adds synchronisation (~10x slower on a busy CPU)
]


def _cfg(tmp_path, *extra: str):
    return load_pretrain_config(None, [*TINY, f"run.dir={tmp_path / 'pre'}", *extra])


def test_pretrain_writes_backbone_lineage_and_plot_and_finetunes(tmp_path):
    res = pretrain(_cfg(tmp_path, "run.name=a", "ssl.head_warmup_steps=1", "run.plot=true", "crops.photometric=true"))
    d = res.run_dir
    for f in ("backbone.safetensors", "backbone.json", "loss.png", "history.json", "config.yaml", "checkpoint/last.safetensors"):
        assert (d / f).is_file(), f
    lin = json.loads((d / "backbone.json").read_text())
    assert lin["recipe"] == "D-ExPLoRA-[L]-r4"
    assert lin["base"]["name"] == "test_vit" and lin["base"]["weights"] == "none"
    assert lin["data"]["images"] == 48 and lin["training"]["steps"] == 4 and lin["training"]["images_seen"] == 32
    assert lin["explora"]["unfrozen_blocks_1based"] == [2] and lin["explora"]["lora_blocks_1based"] == [1]
    assert lin["backbone"]["sha256"] and lin["training"]["wall_time_s"] > 0
    hist = res.history
    assert [h["step"] for h in hist] == [1, 2, 3, 4]
    assert not hist[0]["backbone_trained"] and hist[1]["backbone_trained"]
    assert all(np.isfinite([h["loss"], h["dino"], h["ibot"], h["koleo"]]).all() for h in hist)
    assert any(h["masked_patches"] > 0 for h in hist)
    # The backbone changed (block L, norms, merged LoRA), and only there: embeddings and tokens are as loaded.
    state = load_file(str(res.backbone))
    from visiontune.backbones import create_backbone
    from visiontune.config import BackboneConfig

    torch.manual_seed(0)
    orig = create_backbone(BackboneConfig(name="test_vit", weights="none", img_size=32), num_classes=0).state_dict()
    assert set(state) == set(orig)
    assert torch.equal(state["patch_embed.proj.weight"], orig["patch_embed.proj.weight"])
    assert torch.equal(state["blocks.0.mlp.fc1.weight"], orig["blocks.0.mlp.fc1.weight"])  # not a LoRA target
    assert not torch.equal(state["blocks.1.mlp.fc1.weight"], orig["blocks.1.mlp.fc1.weight"])  # unfrozen block
    # Any fine-tuning method uses it through backbone.weights=<file>.
    run = vt.train(vt.load_config(None, [
        "data.dataset=digits", "data.train_per_class=4", "data.test_per_class=4", "method.name=linear",
        *res.overrides(), "run.progress=false", "run.measure_speed=false", f"run.dir={tmp_path / 'runs'}",
    ]))
    assert run.metrics["run"]["backbone_identity"]["sha256"] == lin["backbone"]["sha256"]
    assert (tmp_path / "pre" / "a" / "backbone.json").is_file()
    with pytest.raises(ConfigError, match="already holds a finished pretraining run"):
        pretrain(_cfg(tmp_path, "run.name=a"))


def test_interrupted_run_resumes_exactly(tmp_path):
    full = pretrain(_cfg(tmp_path, "run.name=full"))

    def crash(step: int, row: dict) -> None:
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(_cfg(tmp_path, "run.name=cut", "run.checkpoint_every=100"), callback=crash)
    assert load_checkpoint(tmp_path / "pre" / "cut" / "checkpoint" / "last.safetensors", "pretrain")["step"] == 2
    student = export_checkpoint(tmp_path / "pre" / "cut", "student")
    assert student.name == "student-step2.safetensors" and student.is_file()
    resumed = pretrain(_cfg(tmp_path, "run.name=cut", "run.checkpoint_every=100", "run.resume=true"))
    a, b = load_file(str(full.backbone)), load_file(str(resumed.backbone))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in full.history], abs=1e-6)


def test_unlabeled_sources_flat_folder_and_eval_exclusion(tmp_path):
    folder = tmp_path / "imgs" / "nested"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((20, 20), 40 * i, dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
        Image.fromarray(np.full((20, 20), 9 * i, dtype=np.uint8)).save(folder / f"n{i}.jpg")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    pool = load_unlabeled(str(tmp_path / "imgs"))
    assert len(pool) == 6  # flat and nested images, labels not needed
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        load_unlabeled(str(tmp_path / "imgs"))
    run_cfg = tmp_path / "probe.yaml"
    run_cfg.write_text(yaml.safe_dump({"data": {"dataset": "digits", "train_per_class": 5, "test_per_class": 10, "seed": 0}}))
    every = load_unlabeled("digits")
    kept = load_unlabeled("digits", exclude_eval_of=str(run_cfg))
    assert kept.excluded == 100 and len(kept) == len(every) - 100
    held = set(every.ids) - set(kept.ids)
    from visiontune.data import load_records, make_splits

    test_ids = set(make_splits(load_records("digits"), vt.load_config(run_cfg).data)["test"].ids)
    assert held == test_ids


def test_multiband_pretraining_end_to_end(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(8):
        np.save(tmp_path / f"tile{i}.npy", rng.random((40, 40, 5)).astype(np.float32) * (1 + np.arange(5)))
    res = pretrain(load_pretrain_config(None, [
        *[o for o in TINY if not o.startswith("data.")], f"data.dataset={tmp_path}", "data.channels=5",
        "crops.photometric=false", "optim.steps=2", "optim.batch_size=4", f"run.dir={tmp_path / 'pre'}",
    ]))
    lin = res.lineage
    assert lin["backbone"]["in_chans"] == 5 and lin["explora"]["new_patch_embed"]
    assert lin["data"]["mean"][4] > lin["data"]["mean"][0]  # band statistics measured on the data
    model = load_backbone(res.backbone)
    assert model.forward_features(torch.randn(1, 5, 32, 32)).shape[-1] == 32
    with pytest.raises(ConfigError, match="photometric"):
        load_pretrain_config(None, [f"data.dataset={tmp_path}", "data.channels=5"])


def test_cli_pretrain_and_bad_config(tmp_path, capsys):
    assert main(["pretrain", *TINY, "optim.steps=2", f"run.dir={tmp_path}", "run.name=cli"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["steps"] == 2 and out["backbone"].endswith("backbone.safetensors")
    assert main(["pretrain", "data.dataset=digits", "crops.local_numbr=2", "ssl.mask_ratio=[0.6,0.2]"]) == 2
    err = capsys.readouterr().err
    assert "crops.local_numbr" in err and "Did you mean crops.local_number" in err and "ssl.mask_ratio" in err


def test_pretraining_never_loads_a_planted_pickle(tmp_path):
    """Issue 18 item 1: resume and export_checkpoint refuse a pickle checkpoint instead of unpickling it."""
    import pickle

    from visiontune.checkpoint import CheckpointError

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "payload-ran"), "w"))

    run_dir = tmp_path / "pre" / "copied"
    (run_dir / "checkpoint").mkdir(parents=True)
    (run_dir / "checkpoint" / "last.pt").write_bytes(pickle.dumps({"student": Payload()}))
    _cfg(tmp_path, "run.name=copied").dump(run_dir / "config.yaml")
    with pytest.raises(CheckpointError, match="last.pt is a pickle checkpoint"):
        pretrain(_cfg(tmp_path, "run.name=copied", "run.resume=true"))
    with pytest.raises(ConfigError, match="unfinished pretraining run with a checkpoint"):
        pretrain(_cfg(tmp_path, "run.name=copied"))
    with pytest.raises(CheckpointError, match="last.pt is a pickle checkpoint"):
        export_checkpoint(run_dir, "student")
    assert not (tmp_path / "payload-ran").exists()
