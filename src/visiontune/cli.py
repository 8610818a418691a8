"""The ``visiontune`` command line: parse -> config -> library call. Nothing below this module reads argparse.

Parsing imports nothing heavy (``visiontune --help`` loads no torch); each command imports the modules it
runs when it runs, so a command whose optional package is missing fails alone, with the ``pip install``
line that fixes it (:mod:`visiontune.extras`), and the others work on the base install.

Why one module of about 600 lines: it is the table of commands, and nothing else. Each command is a short
``_cmd_<name>`` (parse -> config -> one library call) plus its subparser in :func:`build_parser`, which the
generated command-line reference (:mod:`visiontune.reference`) and the every-``--help``-without-extras test read
whole; split per command, the parser would sit in fourteen files with no logic gained. Anything that computes
belongs in the library below (how to add a command: ``docs/architecture.md``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import visiontune as vt
from visiontune.errors import ConfigError, VisiontuneError
from visiontune.extras import install_hint, missing_message
from visiontune.precisions import HOST_PRECISIONS, INFERENCE_PRECISIONS
from visiontune.registry import INFERENCE_PLUGINS


def _cmd_train(args: argparse.Namespace) -> int:
    from visiontune.distributed import is_main

    cfg = vt.load_config(args.config, overrides=args.overrides)
    result = vt.train(cfg)
    if not is_main():  # under torchrun / accelerate launch: process 0 reports
        return 0
    print(json.dumps({"run_dir": str(result.run_dir), "accuracy": result.metrics["test"]["accuracy"],
                      "f1_weighted": result.metrics["test"]["f1_weighted"]}))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from visiontune.distributed import is_main
    from visiontune.infer.evaluate import evaluate_run

    m = evaluate_run(args.run_dir, data=args.data, device=args.device, progress=not args.quiet, backend=args.backend,
                     int8=args.int8, workers=args.workers, batch_size=args.batch_size, predictions=args.predictions,
                     precision=args.precision)
    if not is_main():  # under torchrun / accelerate launch: process 0 reports
        return 0
    if args.json:
        print(json.dumps(m, indent=1))
    else:
        print(f"accuracy {m['accuracy']:.4f}  weighted F1 {m['f1_weighted']:.4f}  macro F1 {m['f1_macro']:.4f}  "
              f"({m['num_samples']} images)")
        w = max(len(c) for c in m["per_class"])
        print(f"{'class':<{w}}  precision  recall  f1      support")
        for c, r in m["per_class"].items():
            print(f"{c:<{w}}  {r['precision']:.4f}     {r['recall']:.4f}  {r['f1']:.4f}  {r['support']}")
    return 0


def _cmd_auto(args: argparse.Namespace) -> int:
    from visiontune.auto import AutoSelect, AutoSettings
    from visiontune.auto.prior import resolve_prior

    out = args.out or f"runs/auto/{_slug_data(args.data)}"
    settings = AutoSettings(
        budget_s=args.budget, folds=args.folds, progress=not args.quiet, unlabeled=args.unlabeled,
        prune=not args.no_prune, executor=args.executor, ray_address=args.ray_address, cpus_per_run=args.cpus_per_run,
        gpus_per_run=args.gpus_per_run, max_in_flight=args.max_in_flight, cost_margin=args.cost_margin, rope=args.rope,
        **({"unlabeled_steps": args.unlabeled_steps} if args.unlabeled_steps is not None else {}),
    )
    sel = AutoSelect(args.data, out, settings, backbones=args.backbone, overrides=args.overrides,
                     prior=resolve_prior(args.prior))
    if args.dry_run:
        print(sel.plan().describe())
        return 0
    record = sel.run()
    print(json.dumps({"out": out, "chosen": record["decision"]["candidate"], "run_dir": record["final"]["run_dir"],
                      "test": record["final"].get("test"), "leaderboard": f"{out}/leaderboard.md"}))
    return 0


def _slug_data(data: str) -> str:
    name = Path(data.rstrip("/")).stem or "data"
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in name)


def _cmd_list(args: argparse.Namespace) -> int:
    from visiontune.registry import DATASETS, METHODS

    if args.what == "methods":
        for name in vt.list_methods():
            print(f"{name:10s} {METHODS.get(name).summary or METHODS.help(name)}")
    elif args.what == "datasets":
        for name in vt.list_datasets():
            print(f"{name:14s} {DATASETS.help(name)}")
    else:
        from visiontune.backbones import describe_backbones

        print(describe_backbones())
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from visiontune.atomic import write_text_atomic
    from visiontune.eval import compare_table, load_run_metrics, plot_comparison

    rows = [load_run_metrics(d) for d in args.run_dirs]
    table = compare_table(rows)
    print(table)
    if args.out:
        from visiontune.rundir import claim_output_folder

        out = claim_output_folder(Path(args.out), "compare", ("comparison.md", "comparison.png"), option="compare --out")

        write_text_atomic(out / "comparison.md", table + "\n")
        plot_comparison(rows, out / "comparison.png")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from visiontune.sweep import aggregate, load_sweep, run_sweep, sweep_status

    if args.sweep_file in ("status", "report") and args.overrides and not Path(args.sweep_file).exists():
        # `visiontune sweep status FILE` / `sweep report FILE`: the same as --status / --report
        setattr(args, args.sweep_file, True)
        args.sweep_file, args.overrides = args.overrides[0], args.overrides[1:]
    if args.dry_run:
        return _sweep_dry_run(args)
    sweep = load_sweep(args.sweep_file, overrides=args.overrides)
    if args.report:
        print(aggregate(sweep))
        return 0
    if args.status:
        states = sweep_status(sweep)
        for name, state in states:
            print(f"{name:60s} {state}")
        print(f"{sum(s == 'done' for _, s in states)}/{len(states)} done")
        return 0
    out = run_sweep(sweep, progress=not args.quiet, workers=args.workers, executor=args.executor,
                    ray_address=args.ray_address, cpus_per_run=args.cpus_per_run, gpus_per_run=args.gpus_per_run)
    print(json.dumps({k: (v if k != "failed" else sorted(v)) for k, v in out.items()}))
    return 1 if out["failed"] else 0


def _sweep_dry_run(args: argparse.Namespace) -> int:
    """Check every run (config, then model + method on the meta device); 1 when any run is invalid."""
    from visiontune.sweep import check_sweep, format_check, load_sweep, summarize_checks

    sweep = load_sweep(args.sweep_file, overrides=args.overrides, validate=False)
    print(f"checking {len(sweep.entries)} runs of {args.sweep_file} (meta device: no weights, no data)", flush=True)
    results = check_sweep(sweep, on_result=lambda r: print(format_check(r), flush=True))
    print(summarize_checks(results))
    return 1 if any(r.status == "invalid" for r in results) else 0


def _cmd_estimate(args: argparse.Namespace) -> int:
    from visiontune.config import read_config_file
    from visiontune.estimate import estimate_memory, format_estimate, parse_size

    data = read_config_file(args.config, "configs/") if args.config else {}
    overrides = list(args.overrides)
    if not (data.get("data") or {}).get("dataset") and not any(o.startswith("data.dataset=") for o in overrides):
        overrides.insert(0, "data.dataset=(not read)")  # the estimate never reads the data
    cfg = vt.load_config(None, overrides=overrides, base=data)
    mem = parse_size(args.device_memory) if args.device_memory else None
    est = estimate_memory(cfg, num_classes=args.num_classes, device=args.device, device_mem=mem)
    print(json.dumps(est.to_dict(), indent=1, default=str) if args.json else format_estimate(est))
    return 0 if est.fits is not False else 1


def _cmd_predict(args: argparse.Namespace) -> int:
    import visiontune.distributed as distributed
    from visiontune.distributed import is_main
    from visiontune.infer import pipeline
    from visiontune.data.bands import ARRAY_EXTENSIONS, transform_channels
    from visiontune.infer.files import check_table_path, collect_images, format_results

    if args.workers < 0:  # was taken as 1 silently
        raise ConfigError(f"--workers {args.workers} is invalid; use a number of image decoding threads >= 0 (0 or 1: one)")
    # Under torchrun / accelerate launch: each process its device (LOCAL_RANK's GPU with --device cuda).
    dist = distributed.setup(args.device)
    predictor = pipeline(args.run_dir, device=str(dist.device) if dist is not None else args.device, top_k=args.top_k,
                         batch_size=args.batch_size, backend=args.backend, int8=args.int8, max_pixels=args.max_pixels,
                         max_aspect=args.max_aspect, settings=("--max-pixels", "--max-aspect"), precision=args.precision)
    if args.output is not None:
        check_table_path(args.output)
    multiband = transform_channels(predictor.transform) is not None
    paths, problems = collect_images(args.inputs, ARRAY_EXTENSIONS) if multiband else collect_images(args.inputs)
    # Progress only where it helps: a folder's worth of images, and never in quiet mode.
    progress = not args.quiet and len(paths) >= 2 * args.batch_size and is_main()
    # Each process predicts a contiguous share of the images; process 0 gets every result, in input order.
    stream = distributed.in_order(predictor.predict_many(distributed.my_items(paths), top_k=args.top_k,
                                                         progress=progress, workers=args.workers))
    if not is_main():
        list(stream)  # hands this process's results to process 0, which writes and reports
        return 0
    if args.output is not None:
        return _predict_to_file(args, stream, problems)
    results = list(stream)
    order = {str(p): i for i, p in enumerate(args.inputs)}
    results += sorted(problems, key=lambda r: order.get(r.source, 0))
    for r in results:
        if r.error is not None:
            where = "" if r.source in r.error else f" {r.source}"
            print(f"visiontune: skipped{where}: {r.error}", file=sys.stderr)
    print(format_results(results, args.format, args.top_k))
    return 1 if any(r.error is not None for r in results) else 0


def _predict_to_file(args: argparse.Namespace, stream: Any, problems: list[Any]) -> int:
    """``predict --output FILE.csv``: rows written as predictions come (bounded memory), a summary printed."""
    from visiontune.infer.files import prediction_header, prediction_row, write_table

    errors = 0

    def rows() -> Any:
        nonlocal errors
        for r in itertools.chain(stream, problems):
            if r.error is not None:
                errors += 1
                where = "" if r.source in r.error else f" {r.source}"
                print(f"visiontune: skipped{where}: {r.error}", file=sys.stderr)
            yield prediction_row(r, args.top_k)

    n = write_table(args.output, prediction_header(args.top_k), rows())
    print(json.dumps({"output": args.output, "images": n, "errors": errors}))
    return 1 if errors else 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import os

    from visiontune.serve.app import serve

    adapters: dict[str, str] = {}
    for spec in args.adapter:
        name, sep, path = spec.partition("=")
        name, path = (name, path) if sep else (Path(spec.rstrip("/")).name, spec)
        if not name or not path:
            raise ConfigError(f"--adapter {spec!r} is malformed; write NAME=RUN_DIR, e.g. --adapter cows=runs/a")
        if name in adapters:
            raise ConfigError(f"adapter name {name!r} is given twice; give each --adapter its own NAME=")
        adapters[name] = path

    serve(adapters, host=args.host, port=args.port, device=args.device, max_bytes=args.max_bytes,
          max_batch=args.max_batch, max_wait_ms=args.batch_wait_ms, log_level=args.log_level,
          max_pixels=args.max_pixels, max_aspect=args.max_aspect, max_decodes=args.max_decodes,
          api_key=args.api_key if args.api_key is not None else (os.environ.get("VISIONTUNE_API_KEY") or None),
          backend=args.backend, int8=args.int8, precision=args.precision,
          allowed_hosts=[h for h in args.allowed_hosts.split(",") if h.strip()] if args.allowed_hosts else None)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import warnings

    from visiontune.infer.export import export_run

    keep = [k for k in (args.keep_fp32 or "").split(",") if k.strip()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = export_run(args.run_dir, out=args.out, fmt=args.format, exporter=args.exporter, opset=args.opset,
                         check=not args.no_check, int8=args.int8, calibration=args.calibration, max_drop=args.max_drop,
                         warn_only=args.warn_only, keep_fp32=keep, smoothing=args.smoothing)
    for w in caught:
        if "visiontune export:" in str(w.message):
            print(f"WARNING {w.message}", file=sys.stderr)  # loud, on stderr, with the numbers
    out = {"model": str(res.model_path), "metadata": str(res.metadata_path), "exporter": res.exporter,
           "merged": res.merged, "max_abs_diff_vs_pytorch": res.max_abs_diff}
    if res.accuracy is not None:
        out["test"] = {k: v for k, v in res.accuracy.items()}
    if res.int8_path is not None:
        out.update(int8_model=str(res.int8_path), int8_metadata=str(res.int8_metadata_path), int8_accepted=res.int8_accepted)
    print(json.dumps(out))
    return 0


def _cmd_bench_infer(args: argparse.Namespace) -> int:
    from visiontune.infer.bench import bench_infer, format_bench

    try:
        sizes = [int(s) for s in args.batch_sizes.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--batch-sizes {args.batch_sizes!r} is invalid; give integers like 1,32") from None
    backends = None if args.backends == "all" else [b.strip() for b in args.backends.split(",") if b.strip()]
    rows = bench_infer(args.run_dir, batch_sizes=sizes, iters=args.iters, min_time_s=args.min_time, device=args.device,
                       backends=backends, export=args.export, rounds=args.rounds, progress=not args.json,
                       bf16=args.bf16)
    print(json.dumps(rows) if args.json else format_bench(rows))
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from visiontune.distributed import is_main
    from visiontune.pretrain import load_pretrain_config, pretrain

    result = pretrain(load_pretrain_config(args.config, overrides=args.overrides))
    if not is_main():  # under torchrun / accelerate launch: process 0 reports
        return 0
    print(json.dumps({"backbone": str(result.backbone), "lineage": str(result.run_dir / "backbone.json"),
                      "steps": result.lineage["training"]["steps"], "wall_time_s": result.lineage["training"]["wall_time_s"],
                      "use": result.lineage["use"]}))
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from visiontune.doctor import diagnose, format_report

    report = diagnose(args.runs_dir, check_hub=not args.offline, hub_timeout_s=args.hub_timeout)
    print(json.dumps(report.to_dict(), indent=1) if args.json else format_report(report))
    return 0


def _cmd_suggest(args: argparse.Namespace) -> int:
    from visiontune.suggest import suggest

    r = suggest(args.unlabeled_dir, args.budget, out=args.out, strategy=args.strategy, run=args.run, labeled=args.labeled,
                overrides=args.overrides, seed=args.seed, cache=args.cache, batch_size=args.batch_size,
                progress=not args.quiet)
    print(json.dumps({"picks": str(r.csv), "contact_sheet": str(r.sheet), "strategy": r.strategy, "rule": r.rule,
                      "pool": r.pool, "budget": len(r.picks),
                      "next": f"visiontune label {r.csv}  (then: visiontune train data.dataset={r.csv})"}))
    return 0


def _cmd_label(args: argparse.Namespace) -> int:
    from visiontune.suggest.label import serve_labels

    serve_labels(args.picks, host=args.host, port=args.port)
    return 0


def _suggest_parsers(sub: Any) -> None:
    """``suggest`` (which images to label next) and ``label`` (the page that labels them)."""
    from visiontune.suggest.strategies import AUTO_COVERAGE, AUTO_SWITCH_PER_CLASS, AUTO_UNCERTAINTY, STRATEGIES

    sg = sub.add_parser("suggest", help="which unlabeled images to label next (active learning), with the reason per image",
                        description="Pick the unlabeled images whose labels would help most: coverage of the pool on a "
                                    "cold start, the model's uncertainty once labels exist. Writes a manifest CSV with an "
                                    "empty label column, its .json and a contact sheet .png.")
    sg.add_argument("unlabeled_dir", metavar="UNLABELED_DIR", help="folder of images to choose from (recursive)")
    sg.add_argument("--budget", type=int, required=True, help="how many images to pick")
    sg.add_argument("--strategy", choices=list(STRATEGIES), default="auto",
                    help=f"auto (default): {AUTO_UNCERTAINTY} once a model exists and the round ends above "
                         f"{AUTO_SWITCH_PER_CLASS:g} labels per class, else {AUTO_COVERAGE} (the best whole policy "
                         "measured in benchmarks/suggest)")
    src = sg.add_mutually_exclusive_group()
    src.add_argument("--run", default=None, metavar="RUN_DIR", help="a trained run: its features and classifier")
    src.add_argument("--labeled", default=None, metavar="DATA",
                     help="labeled images (folder or CSV manifest): the labeled set; a linear probe is fitted on them")
    sg.add_argument("--out", default="picks.csv", help="the picks CSV (default picks.csv); .json and .png beside it")
    sg.add_argument("--seed", type=int, default=0)
    sg.add_argument("--cache", default=None, help="feature store folder (default ~/.cache/visiontune/features)")
    sg.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    sg.add_argument("--quiet", action="store_true", help="no progress bars")
    sg.add_argument("overrides", nargs="*", help="backbone.* settings, e.g. backbone.weights=offline backbone.img_size=112")
    sg.set_defaults(func=_cmd_suggest)

    lb = sub.add_parser("label", help="label the picks of `suggest` in the browser (keyboard, undo, saved as you go)",
                        description="Serve the labeling page of a picks CSV on this machine. "
                                    + _needs("serve", "The page"))
    lb.add_argument("picks", help="the CSV `visiontune suggest` wrote")
    lb.add_argument("--host", default="127.0.0.1")
    lb.add_argument("--port", type=int, default=8765)
    lb.set_defaults(func=_cmd_label)


def _backend_args(p: argparse.ArgumentParser) -> None:
    """``--backend`` and ``--int8``, the same for predict, eval, serve."""
    p.add_argument("--backend", choices=["auto", *(name for name, _, _ in INFERENCE_PLUGINS)], default="auto",
                   help="auto (default): torch for a run directory, the export's own backend for an export; an export "
                        "backend on a run directory uses its export/ (visiontune export --format FORMAT)")
    p.add_argument("--int8", action="store_true", help="use the INT8 export (export backends)")


def _precision_arg(p: argparse.ArgumentParser) -> None:
    """``--precision`` for predict and eval (torch backend)."""
    p.add_argument("--precision", choices=list(INFERENCE_PRECISIONS), default="run",
                   help="torch backend: run (default: the run's optim.precision, fp32 on a CPU), fp32, or bf16 autocast "
                        "(2.4x faster on an AMX CPU, 1.8x with AVX-512 BF16, 99%% of predictions unchanged in our runs; "
                        "emulated and slow on CPUs without either)")


class _Parser(argparse.ArgumentParser):
    """A command's parser that takes options and ``key=value`` overrides in any order, as users type them:
    ``visiontune auto digits --dry-run backbone.weights=none`` (argparse's intermixed parsing)."""

    _intermixing = False

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        # The top-level parser (it has subcommands) parses as usual; a command's parser parses intermixed, which
        # calls this method again for its two passes (hence the flag).
        if self._intermixing or self._subparsers is not None:
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False

    def error(self, message: str) -> Any:  # type: ignore[override]
        """A usage mistake is one line on stderr like every other error (argparse prints its usage block first)."""
        self.exit(2, f"visiontune: error: {self.prog}: {message}; see `{self.prog} --help`\n")


def _needs(extra: str, what: str) -> str:
    """The sentence a command's help ends with when it needs an optional extra."""
    return f"{what} needs the {extra} extra: {install_hint(extra)}"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="visiontune", description="Parameter-efficient fine-tuning of vision backbones.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune and evaluate one configuration")
    t.add_argument("--config", "-c", default=None, help="YAML config file (configs/*.yaml)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. method.name=linear data.train_per_class=10")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="evaluate a finished run on its test split or on other labeled data")
    e.add_argument("run_dir", help="a run directory, or an ONNX export of one (folder, .onnx or its .json)")
    e.add_argument("--data", default=None, help="image folder / CSV / built-in dataset to evaluate on (same labels)")
    e.add_argument("--device", default="cpu",
                   help="cpu (default), cuda, auto; under torchrun each process takes the GPU of its LOCAL_RANK")
    e.add_argument("--workers", type=int, default=0,
                   help="DataLoader worker processes decoding images (default 0: in the main process)")
    e.add_argument("--batch-size", type=int, default=None, help="images per forward pass (default: the run's "
                                                                  "optim.eval_batch_size)")
    e.add_argument("--predictions", default=None, metavar="FILE.csv",
                   help="also write one row per image (file, label, predicted, score) to this CSV file")
    e.add_argument("--json", action="store_true", help="print the full metrics as JSON")
    e.add_argument("--quiet", action="store_true")
    _backend_args(e)
    _precision_arg(e)
    e.set_defaults(func=_cmd_eval)

    dr = sub.add_parser("doctor", help="what this machine can do: versions, extras, CPU/GPU, offline weights, hub, disk",
                        description="What this machine can do with visiontune: Python/torch/timm/peft versions, the "
                                    "installed extras, CPU extensions (AVX2, AVX-512, VNNI, BF16, AMX) and what they mean "
                                    "for bf16, INT8 and 4-bit, GPUs, offline weights, whether the model hub answers, free "
                                    "disk; then the commands that fix what is missing.")
    dr.add_argument("--runs-dir", default="runs", help="where runs are written (run.dir; default runs): its free disk")
    dr.add_argument("--offline", action="store_true", help="do not try to reach the model hub")
    dr.add_argument("--hub-timeout", type=float, default=1.5, metavar="SECONDS",
                    help="how long to wait for the hub to answer (default 1.5)")
    dr.add_argument("--json", action="store_true", help="print the report as JSON")
    dr.set_defaults(func=_cmd_doctor)

    ls = sub.add_parser("list", help="list backbones, methods or datasets")
    ls.add_argument("what", choices=["backbones", "methods", "datasets"])
    ls.set_defaults(func=_cmd_list)

    cp = sub.add_parser("compare", help="comparison table (and plot) of finished runs")
    cp.add_argument("run_dirs", nargs="+")
    cp.add_argument("--out", default=None, help="folder for comparison.md and comparison.png")
    cp.set_defaults(func=_cmd_compare)
    au = sub.add_parser("auto", help="choose the adaptation method for your data by cross-validation and ship that model")
    au.add_argument("data", help="anything data.dataset accepts: a built-in name, an image folder or a CSV manifest")
    au.add_argument("overrides", nargs="*", help="dotted overrides for every candidate, e.g. data.train_per_class=20")
    au.add_argument("--backbone", action="append", default=None, help="backbone to consider (repeat for more; default backbone.name, and with backbone.weights=offline the measured offline pair: MobileNetV2 and DINOv2-S at 112 px)")
    au.add_argument("--budget", default=None, help="time budget, e.g. 20m, 1.5h, 900s (default: none)")
    au.add_argument("--folds", type=int, default=5, help="cross-validation folds (fewer when a class is smaller)")
    au.add_argument("--out", default=None, help="selection folder (default runs/auto/<data name>)")
    au.add_argument("--unlabeled", default=None,
                    help="unlabeled images of the same domain (folder, CSV or built-in name): ExPLoRA pretraining "
                         "becomes a candidate backbone when the budget allows (the test split is left out)")
    au.add_argument("--unlabeled-steps", type=int, default=None, help="ExPLoRA optimizer steps (batch 16; default 200)")
    au.add_argument("--cost-margin", default="0", metavar="POINTS",
                    help="accuracy points a fine-tune's posterior expected gain must add over the probe's to be chosen "
                         "(its training and serving cost; default 0; finite, >= 0)")
    au.add_argument("--prior", default="meta", metavar="meta|flat|FILE",
                    help="prior on each fine-tune's gain over the probe: meta (default: the one learned on the "
                         "meta-benchmark that ships with visiontune; flat if none ships), flat (the folds alone), or a "
                         "prior JSON file from benchmarks/meta/fit_prior.py")
    au.add_argument("--rope", default="1", metavar="POINTS",
                    help="half-width in accuracy points of 'practically equivalent' in the report (default 1)")
    au.add_argument("--no-prune", action="store_true",
                    help="train every fine-tuning candidate on every fold (no successive halving; slower, for comparison)")
    _ray_args(au, "fold", "local: one fold at a time in this process (default)")
    au.add_argument("--max-in-flight", type=int, default=None, metavar="N",
                    help="with --executor ray: at most N folds at a time (default: as many as the cluster fits)")
    au.add_argument("--dry-run", action="store_true", help="print the plan and time estimates; train nothing")
    au.add_argument("--quiet", action="store_true")
    au.set_defaults(func=_cmd_auto)
    sw = sub.add_parser("sweep", help="run a comparison grid (resumable) and write results.csv + report.md")
    sw.add_argument("sweep_file", help="configs/sweeps/*.yaml; `sweep status FILE` / `sweep report FILE` = --status / --report")
    sw.add_argument("overrides", nargs="*", help="dotted overrides applied to the base config of every run")
    sw.add_argument("--dry-run", action="store_true",
                    help="check every run against the real model classes (meta device: no weights, no data, "
                         "no training), list each as ok / invalid; exit 1 if any is invalid")
    sw.add_argument("--status", action="store_true", help="show which runs are done, failed, partial or pending")
    sw.add_argument("--report", action="store_true", help="only rebuild results.csv, report.md and plots from finished runs")
    sw.add_argument("--workers", type=int, default=None,
                    help="runs at a time, each in its own process with cores/N torch threads (default 1: sequential); "
                         "with --executor ray: at most N runs in flight (default: as many as the cluster fits)")
    _ray_args(sw, "run", "local: this process or --workers processes (default)")
    sw.add_argument("--quiet", action="store_true")
    sw.set_defaults(func=_cmd_sweep)
    es = sub.add_parser("estimate", help="parameters and memory per device of a run, before anything is loaded")
    es.add_argument("--config", "-c", default=None, help="YAML run config (configs/*.yaml)")
    es.add_argument("overrides", nargs="*", help="dotted overrides, e.g. backbone.name=vit_7b_patch16_dinov3 method.name=qlora")
    es.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None,
                    help="device to estimate for (default: run.device; auto = cuda if available); decides autocast")
    es.add_argument("--device-memory", default=None,
                    help="memory to check against, e.g. 24GB, 80GiB (default: the current CUDA device's, or this "
                         "machine's RAM on CPU)")
    es.add_argument("--num-classes", type=int, default=10, help="classifier size (the data is not read)")
    es.add_argument("--json", action="store_true", help="print every term as JSON")
    es.set_defaults(func=_cmd_estimate)
    pt = sub.add_parser("pretrain", help="ExPLoRA: extended self-supervised pretraining on unlabeled images -> a new backbone")
    pt.add_argument("--config", "-c", default=None, help="YAML config (configs/pretrain/*.yaml)")
    pt.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.steps=100 explora.recipe=D-ExPLoRA-[1,L]-r32")
    pt.set_defaults(func=_cmd_pretrain)
    pr = sub.add_parser("predict", help="top-k labels of images, files or folders, with a trained run")
    pr.add_argument("run_dir", help="a run directory, or an ONNX export of one (folder, .onnx or its .json)")
    pr.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    pr.add_argument("--top-k", type=int, default=3, help="labels per image (default 3)")
    pr.add_argument("--format", choices=["table", "json", "csv"], default="table")
    pr.add_argument("--batch-size", type=int, default=32)
    pr.add_argument("--workers", type=int, default=2, help="image decoding threads")
    pr.add_argument("--max-pixels", type=int, default=None,
                    help="largest image decoded, width x height (default: the run's data.max_pixels, 40 MP); "
                         "larger JPEGs are decoded at reduced scale, other images are reported as errors")
    pr.add_argument("--max-aspect", type=float, default=None,
                    help="largest longer/shorter side ratio (default: the run's data.max_aspect, 20)")
    pr.add_argument("--device", default="cpu")
    pr.add_argument("--output", "-o", default=None, metavar="FILE.csv",
                    help="write the predictions to this CSV file as they come (for large folders) instead of printing them")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")
    _backend_args(pr)
    _precision_arg(pr)
    pr.set_defaults(func=_cmd_predict)

    sv = sub.add_parser("serve", help="HTTP service + web page: one backbone, several task adapters",
                        description="HTTP service + web page: one backbone, several task adapters. "
                                    + _needs("serve", "The service"))
    sv.add_argument("--adapter", action="append", required=True, metavar="NAME=RUN_DIR",
                    help="a task adapter (repeat for more): a run directory (all must share the backbone) or, with "
                         "onnxruntime, an export")
    sv.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--device", default="cpu")
    sv.add_argument("--max-bytes", type=int, default=10 * 1024 * 1024, help="largest accepted image file")
    sv.add_argument("--max-pixels", type=int, default=40_000_000,
                    help="largest decoded image, width x height (default 40 MP; checked from the header before "
                         "decoding; larger JPEGs are decoded at reduced scale, anything else gets 413)")
    sv.add_argument("--max-aspect", type=float, default=20.0, help="largest longer/shorter side ratio (default 20)")
    sv.add_argument("--max-decodes", type=int, default=2, help="most images decoded at once; more requests wait (default 2)")
    sv.add_argument("--api-key", default=None,
                    help="require this key on /v1/ requests (Authorization: Bearer KEY or X-API-Key: KEY); default: "
                         "$VISIONTUNE_API_KEY, else none. Prefer the variable: a command line is visible to other users")
    sv.add_argument("--allowed-hosts", default=None, help="comma-separated Host header names the server answers "
                    "(default: loopback names on a loopback address, against DNS rebinding; any host otherwise; * = any)")
    sv.add_argument("--max-batch", type=int, default=32, help="most requests batched into one forward pass")
    sv.add_argument("--batch-wait-ms", type=float, default=1.0, help="how long a request waits for batch companions")
    sv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    sv.add_argument("--precision", choices=list(HOST_PRECISIONS), default="fp32",
                    help="torch backend: fp32 (default) or bf16 autocast for every adapter (faster on CPUs with AMX or "
                         "AVX-512 BF16; emulated and slow on CPUs without either)")
    _backend_args(sv)
    sv.set_defaults(func=_cmd_serve)

    ex = sub.add_parser("export", help="export a run's merged model (ONNX or another format, optionally INT8) with labels "
                                       "and preprocessing",
                        description="Export a run's merged model (ONNX, or another export backend's format such as "
                                    "OpenVINO IR; optionally INT8) with labels and preprocessing. "
                                    + _needs("onnx", "Export"))
    ex.add_argument("run_dir")
    formats = [fmt for _, fmt, _ in INFERENCE_PLUGINS if fmt]
    ex.add_argument("--format", choices=formats, default=formats[0],
                    help=f"{formats[0]} (default) or another export backend's format: {', '.join(formats[1:])} (each needs "
                         "its extra, e.g. pip install 'visiontune[openvino]')")
    ex.add_argument("--out", default=None, help="output model path (default <run_dir>/export/ and the format's file name: "
                                                "model.onnx, openvino_model.xml ...)")
    ex.add_argument("--exporter", choices=["auto", "dynamo", "legacy"], default=None,
                    help="ONNX: torch.export-based (needs onnxscript) or the legacy tracer; auto (default) tries them in "
                         "that order")
    ex.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")
    ex.add_argument("--no-check", action="store_true",
                    help="skip the export vs PyTorch comparison and the test-split accuracy measurement")
    ex.add_argument("--int8", action="store_true",
                    help="also write an INT8 model (model.int8.onnx, openvino_model.int8.xml ...): post-training static "
                         "quantization calibrated on the run's training images")
    ex.add_argument("--calibration", type=int, default=None, metavar="N",
                    help="calibration images from the training split (default 128, or all when fewer)")
    ex.add_argument("--max-drop", type=float, default=1.0, metavar="POINTS",
                    help="refuse the INT8 model when it loses more accuracy or weighted F1 than this on the test split (default 1)")
    ex.add_argument("--warn-only", action="store_true", help="keep an INT8 model past --max-drop, with a warning")
    ex.add_argument("--keep-fp32", default=None, metavar="PATTERNS",
                    help="ONNX: comma-separated module paths (* wildcards) kept fp32 in the INT8 model, e.g. '*.mlp.fc2,head'")
    ex.add_argument("--smoothing", type=float, default=None, metavar="ALPHA",
                    help="ONNX: SmoothQuant strength in [0, 1) for INT8 (default: try 0, 0.5, 0.8 and keep the best)")
    ex.set_defaults(func=_cmd_export)

    bi = sub.add_parser("bench-infer", help="latency/throughput on every backend (torch merged/unmerged, exports fp32/INT8)",
                        description="Latency/throughput on every installed backend (torch merged/unmerged, each export "
                                    "backend's fp32/INT8). "
                                    + _needs("onnx", "The ONNX backends"))
    bi.add_argument("run_dir")
    bi.add_argument("--batch-sizes", default="1,32", help="comma-separated; 1 is the latency")
    bi.add_argument("--iters", type=int, default=None, help="timed passes per measurement (default: time-based)")
    bi.add_argument("--min-time", type=float, default=1.0, help="seconds per measurement when --iters is not given")
    bi.add_argument("--device", default="cpu")
    bi.add_argument("--backends", default="all",
                    help=f"comma-separated: {', '.join(name for name, _, _ in INFERENCE_PLUGINS)} (default: all installed)")
    bi.add_argument("--export", default=None, help="folder with the exports (default <run>/export, else exported for "
                                                   "the benchmark)")
    bi.add_argument("--rounds", type=int, default=1, help="alternating measurement rounds; medians over them (default 1)")
    bi.add_argument("--bf16", action="store_true",
                    help="also time the PyTorch model under bf16 autocast (what --precision bf16 runs)")
    bi.add_argument("--json", action="store_true")
    bi.set_defaults(func=_cmd_bench_infer)
    _suggest_parsers(sub)
    return p


def command_parsers(parser: argparse.ArgumentParser | None = None) -> dict[str, argparse.ArgumentParser]:
    """Each command's parser by name (the generated CLI reference and the tests read them)."""
    parser = parser or build_parser()
    return dict(next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices)


def _ray_args(p: argparse.ArgumentParser, unit: str, local: str) -> None:
    """--executor, --ray-address, --cpus-per-run, --gpus-per-run: the same for ``sweep`` (runs) and ``auto`` (folds)."""
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help=f"{local}; ray: each {unit} a Ray task on a local instance or the cluster at --ray-address "
                        "(pip install 'visiontune[cluster]')")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to join, e.g. HOST:6379 (default: RAY_ADDRESS, else a local instance)")
    p.add_argument("--cpus-per-run", type=int, default=None,
                   help=f"Ray: CPUs reserved per {unit}, also its torch threads (default: a GPU's share of the CPUs "
                        "with GPUs, else 4)")
    p.add_argument("--gpus-per-run", type=float, default=None,
                   help=f"Ray: GPUs per {unit} (default 1 when the cluster has GPUs, else 0)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ok = False
    try:
        code = args.func(args)
        ok = True
        return code
    except VisiontuneError as e:
        print(f"visiontune: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        message = missing_message(e.name or "", f"visiontune {args.command}")
        if message is None:
            raise  # not an optional package: a broken install, shown as it is
        print(f"visiontune: error: {message}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine said no (permissions, a full disk, a vanished file): one line, not a traceback
        where = f" ({e.filename})" if e.filename else ""
        print(f"visiontune: error: {e.strerror or e}{where}; check the path, its permissions and free space",
              file=sys.stderr)
        return 2
    finally:
        # Only a command that joined a launcher's process group imported this module; nothing to leave otherwise.
        distributed = sys.modules.get("visiontune.distributed")
        if distributed is not None:
            distributed.finish(ok)


if __name__ == "__main__":
    sys.exit(main())
