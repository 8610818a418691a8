import struct

import pytest

from visiontune.eval import compute_metrics, plot_comparison, plot_confusion, plot_history

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path):
    """(width, height) from the IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 2000  # a real rendered figure, not an empty file
    return struct.unpack(">II", data[16:24])


def test_confusion_plot_scales_with_number_of_classes(tmp_path):
    small = plot_confusion([[5, 1], [0, 4]], ["ok", "defect"], tmp_path / "small.png", title="t")
    n = 20
    confusion = [[10 if i == j else (1 if j == (i + 1) % n else 0) for j in range(n)] for i in range(n)]
    names = [f"a rather long class name {i}" for i in range(n)]
    big = plot_confusion(confusion, names, tmp_path / "sub" / "big.png")
    assert small == tmp_path / "small.png" and big.parent.name == "sub"
    (w_small, h_small), (w_big, h_big) = png_size(small), png_size(big)
    assert w_big > 2 * w_small and h_big > 2 * h_small


def test_confusion_plot_handles_class_without_samples(tmp_path):
    m = compute_metrics([0, 1], [0, 1], ["a", "b", "absent"])
    w, h = png_size(plot_confusion(m["confusion"], ["a", "b", "absent"], tmp_path / "c.png"))
    assert w > 100 and h > 100  # an all-zero row (no samples) must not break row normalisation


def test_confusion_plot_rejects_mismatched_matrix(tmp_path):
    with pytest.raises(ValueError, match="3x3"):
        plot_confusion([[1, 2], [3, 4]], ["a", "b", "c"], tmp_path / "x.png")


def test_history_plot_adds_panels_for_val_and_lr(tmp_path):
    loss_only = [{"epoch": e, "train_loss": 1.0 / (e + 1)} for e in range(3)]
    full = [{"epoch": e, "train_loss": 1.0 / (e + 1), "val_accuracy": 0.5 + 0.1 * e, "lr": 1e-3 * (3 - e)}
            for e in range(3)]
    w1, _ = png_size(plot_history(loss_only, tmp_path / "h1.png"))
    w3, _ = png_size(plot_history(full, tmp_path / "h3.png"))
    assert w3 > 2 * w1


def test_history_plot_rejects_empty_or_malformed(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        plot_history([], tmp_path / "h.png")
    with pytest.raises(ValueError, match="train_loss"):
        plot_history([{"epoch": 1}], tmp_path / "h.png")


def _run(method, trainable, acc, backbone="vit_s"):
    return {"run": {"method": method, "backbone": backbone}, "params": {"trainable": trainable},
            "test": {"accuracy": acc}}


def test_comparison_plot(tmp_path):
    rows = [_run("linear", 3_850, 0.71), _run("lora", 300_000, 0.82), _run("full", 22_000_000, 0.80, "resnet18")]
    png_size(plot_comparison(rows, tmp_path / "cmp.png"))
    with pytest.raises(ValueError, match="none of the 1 runs"):
        plot_comparison([{"run": {}, "test": {}}], tmp_path / "bad.png")
