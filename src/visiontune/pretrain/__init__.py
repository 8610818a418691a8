"""ExPLoRA: parameter-efficient extended self-supervised pretraining on unlabeled target-domain images.

Khanna et al., "ExPLoRA: Parameter-Efficient Extended Pre-Training to Adapt Vision Transformers under
Domain Shifts", ICML 2025, https://arxiv.org/abs/2406.10973. Starting from DINOv2 weights, train one
or two blocks in full, every norm layer, and LoRA on q/v elsewhere with DINOv2's own objective
(:mod:`visiontune.pretrain.losses`), then merge: the result is a new backbone file for any fine-tuning
method (``backbone.weights=<run>/backbone.safetensors``), with its lineage in ``backbone.json``.

::

    import visiontune as vt
    cfg = vt.load_pretrain_config("configs/pretrain/explora-elpv.yaml", overrides=["optim.steps=100"])
    result = vt.pretrain(cfg)
    vt.train(vt.load_config("configs/demo.yaml", overrides=result.overrides()))
"""

from visiontune.lazy import lazy_attributes

_CONFIG = ("PretrainConfig", "Recipe", "load_pretrain_config", "parse_recipe", "pretrain_config_from_dict", "resolve_unfrozen")
_RUNS = ("BACKBONE_FILE", "LINEAGE_FILE", "PretrainResult", "load_backbone", "plot_history")
_LOOP = ("build_student", "export_checkpoint", "pretrain")

__all__ = sorted(_CONFIG + _RUNS + _LOOP)
# Loaded on first use (torch, timm, peft), so importing the package is free.
__getattr__ = lazy_attributes(__name__, {**dict.fromkeys(_CONFIG, "visiontune.pretrain.config"),
                                         **dict.fromkeys(_RUNS, "visiontune.pretrain.runs"),
                                         **dict.fromkeys(_LOOP, "visiontune.pretrain.loop")})
