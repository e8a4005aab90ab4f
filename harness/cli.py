"""Command line: ``python run_benchmarks.py --methods streamline,shortgpt --model M ...``."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from harness import defaults
from harness.errors import RegressionFailure, UsageError
from harness.reference import CALIB_SEQ_LEN as REFERENCE_CALIB_SEQ_LEN
from harness.reference import default_model as reference_default
from harness.reference import shipped as shipped_reference_models

REPO_ROOT = Path(__file__).resolve().parent.parent


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2 (argparse's own convention)
        raise UsageError(f"{message} (see --help)")


def _int(name):
    def parse(value):
        try:
            return int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} expects an integer, got '{value}'") from None
    return parse


def _float(name):
    def parse(value):
        try:
            return float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} expects a number, got '{value}'") from None
    return parse


def _eval_batch_size(value):
    from harness.validation import check_batch_size

    return check_batch_size(value)


def _eval_impl(value):
    if value not in defaults.EVAL_IMPLS:
        raise argparse.ArgumentTypeError(f"--eval-impl expects one of {', '.join(defaults.EVAL_IMPLS)}, got '{value}'")
    return value


def _labels(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items or []:
        method, eq, text = str(item).partition("=")
        if not eq or not method.strip() or not text.strip():
            raise UsageError(f"bad --label '{item}'; write METHOD=TEXT, e.g. shortgpt=ShortGPT")
        out[method.strip()] = text.strip()
    return out


def _list_of(parse_one, name):
    """A comma-separated list (a sweep): ``--ratio 0.1,0.2,0.3``; repeated values are an error."""
    one = parse_one(name)

    def parse(value):
        items = [one(v.strip()) for v in str(value).split(",") if v.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"{name} expects a value or a comma-separated list, got '{value}'")
        if len(set(items)) != len(items):
            raise argparse.ArgumentTypeError(f"{name} lists a value twice: '{value}'")
        return items
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="run_benchmarks.py", description=(
        "Prune a causal LM with registered layer-pruning methods, evaluate each pruned model and the "
        "dense one with lm-eval (and wikitext-2 perplexity), and print one comparison table. "
        "Subcommands, like lm-eval's: run (the default: `run_benchmarks.py --methods ...` is `run --methods ...`), "
        "report DIR (= --report DIR), check FILE (= --check FILE), scores (layer scores and plots only, no "
        "evaluation; = --scores-only) and list (= --list-methods); every flag below works with each."))
    p.add_argument("--methods", default=None, help="comma-separated method names (see --list-methods)")
    p.add_argument("--list-methods", action="store_true",
                   help="list registered methods and post-steps (METHOD+STEP, e.g. shortgpt+lora), one line each")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="YAML file whose keys mirror these flags (e.g. configs/table5_6.yaml); flags given here win")
    _add_model_flags(p.add_argument_group("model and targets"))
    _add_eval_flags(p.add_argument_group("evaluation"))
    _add_calibration_flags(p.add_argument_group("calibration and run"))
    _add_output_flags(p.add_argument_group("outputs and modes"))
    _add_efficiency_flags(p.add_argument_group("efficiency"))
    _add_table_flags(p.add_argument_group("tables"))
    _add_golden_flags(p.add_argument_group("regression (golden files)"))
    return p


def _add_model_flags(p) -> None:
    """--help's "model and targets" flags."""
    p.add_argument("--model", default=None, help="Hub id, local model folder, or a reference model name "
                   f"({', '.join(shipped_reference_models())}; default: {reference_default()} on the reference suite)")
    p.add_argument("--suite", default=None, help="a generated task-suite folder (suite.json) instead of --tasks "
                   "(default for reference models: reference/suite)")
    p.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks "
                   "(default: piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa,boolq)")
    tgt = p.add_mutually_exclusive_group()
    tgt.add_argument("--ratio", type=_list_of(_float, "--ratio"), default=None,
                     help=f"fraction of the dense model's parameters to remove (default {defaults.RATIO}); a "
                     "comma-separated list sweeps: every method at every ratio, dense evaluated once")
    tgt.add_argument("--layers", type=_list_of(_int, "--layers"), default=None,
                     help="number of decoder layers to remove; a comma-separated list (2,4,6) sweeps")
    p.add_argument("--top-boundary", choices=("pre-norm", "post-norm"), default=defaults.TOP_BOUNDARY,
                   help="X_L in window cosines, Block Influence and angular distances: the last layer's output "
                   "before the final norm (default), or after it (post-norm: the released LLM-Streamline and "
                   "ShortGPT code); only windows ending at the top layer change")
    p.add_argument("--ratio-basis", choices=("params", "layers"), default="params",
                   help="what --ratio counts: params = all dense parameters, embeddings included (default; the "
                   "papers' count), layers = decoder layers (n = round(ratio x layers)); a --ratio that resolves "
                   "to more than half of the layers is refused")
    p.add_argument("-o", "--method-opt", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="a method option, e.g. -o streamline.epochs=3 (repeatable; lists use a/b/c); a post-step's "
                   "options: -o lora.r=8 (every +lora run) or -o remove+lora.lora.r=8 (that run only)")
    p.add_argument("--plugins", default=None, help="comma-separated .py files that register extra methods")


def _add_eval_flags(p) -> None:
    """--help's "evaluation" flags."""
    p.add_argument("--data-dir", default=None,
                   help="local benchmark files laid out like shared/data (tasks, wikitext-2, calibration)")
    p.add_argument("--limit", type=_int("--limit"), default=None, help="evaluate only the first N items per task")
    p.add_argument("--eval-batch-size", type=_eval_batch_size, default=defaults.EVAL_BATCH_SIZE, metavar="N|auto|auto:K",
                   help=f"lm-eval batch size: N, auto (lm-eval's detection) or auto:K (re-detected K times; "
                   f"default {defaults.EVAL_BATCH_SIZE})")
    p.add_argument("--eval-impl", type=_eval_impl, default=defaults.EVAL_IMPL, metavar="fast|fast-shared|stock",
                   help="loglikelihood path: fast (LM head and log-softmax only at scored positions, same "
                   "numbers), fast-shared (also runs a context shared by several choices once, the choices "
                   "packed behind it under a 4-D attention mask) or stock (lm-eval's HFLM as is); not part of "
                   "the run key "
                   f"(default {defaults.EVAL_IMPL})")
    p.add_argument("--num-fewshot", "--num_fewshot", dest="num_fewshot", default=None, metavar="N|TASK=N,...",
                   help="few-shot examples per task, lm-eval's semantics (its few-shot split, sampler and seed); "
                   "per task: mmlu=5,default=0 (default: each task's own, 0 for most)")
    p.add_argument("--include-path", "--include_path", dest="include_path", default=None, metavar="DIR",
                   help="a folder of your own lm-eval task YAMLs (as lm_eval --include_path); --tasks can name them")
    p.add_argument("--model-args", "--model_args", dest="model_args", default=None, metavar="KEY=VALUE,...",
                   help="passed to from_pretrained in lm-eval's syntax, e.g. revision=main,trust_remote_code=True,"
                   "attn_implementation=sdpa (recorded in the result)")
    p.add_argument("--log-samples", "--log_samples", dest="log_samples", action="store_true",
                   help="also write lm-eval's per-sample JSONL (samples_<task>_<time>.jsonl) beside each run")
    p.add_argument("--stability-scores", choices=("sum", "mean"), default="sum",
                   help="per-choice scores the stability weights come from: sum = lm-eval's summed "
                   "log-likelihood (default), mean = per token (closer to the paper's perplexities); "
                   "recorded in each run's stability block")
    p.add_argument("--ppl", action="store_true", help="also measure wikitext-2 test perplexity")
    p.add_argument("--ppl-seq-len", type=_int("--ppl-seq-len"), default=None,
                   help="perplexity window (default min(2048, model positions))")
    p.add_argument("--ppl-stride", type=_int("--ppl-stride"), default=None, help="window stride (default = window)")
    p.add_argument("--ppl-max-windows", type=_int("--ppl-max-windows"), default=None)


def _add_calibration_flags(p) -> None:
    """--help's "calibration and run" flags."""
    p.add_argument("--calib-data", default=None, help="calibration text: .txt/.jsonl file or Hub dataset "
                   "id[:config] (default wikitext-2; with --data-dir its wikitext2 valid.txt)")
    p.add_argument("--calib-split", default="train")
    p.add_argument("--calib-field", default="text")
    p.add_argument("--calib-samples", type=_int("--calib-samples"), default=defaults.CALIB_SAMPLES)
    p.add_argument("--calib-seq-len", type=_int("--calib-seq-len"), default=None,
                   help=f"tokens per calibration block (default {defaults.CALIB_SEQ_LEN}; "
                   f"{REFERENCE_CALIB_SEQ_LEN} for reference models)")
    p.add_argument("--calib-batch-size", type=_int("--calib-batch-size"), default=defaults.CALIB_BATCH_SIZE)
    p.add_argument("--seed", type=_list_of(_int, "--seed"), default=[defaults.SEED],
                   help="seed of the calibration draw and of training; a comma-separated list (0,1,2) runs every "
                   "method once per seed (the dense run once) and the tables show mean ± std over the seeds")
    p.add_argument("--dtype", default=defaults.DTYPE, help="float32 | float16 | bfloat16")
    p.add_argument("--device", default=defaults.DEVICE, help="cpu | cuda | cuda:N | auto (accelerate device_map)")


def _add_output_flags(p) -> None:
    """--help's "outputs and modes" flags."""
    p.add_argument("--output-dir", default=defaults.OUTPUT_DIR, help="where result JSON and tables go")
    p.add_argument("--force", action="store_true", help="re-run even when a result JSON exists, and evaluate every network afresh (without it, a "
                   "network an earlier run in the folder already evaluated reuses that evaluation)")
    p.add_argument("--save-models", action="store_true", help="save every pruned model next to its result")
    p.add_argument("--report", default=None, metavar="DIR",
                   help="only re-render tables and plots from the JSON under DIR")
    p.add_argument("--paper", default=None, metavar="FILE",
                   help="a paper's typed numbers (results/paper/*.yaml): after the table, print each matching paper "
                   "row beside ours with the delta per column (README: Reproducing the papers)")
    p.add_argument("--plots", action="store_true",
                   help="also draw the layer-score heatmaps, Block Influence and accuracy-vs-ratio plots (PNG + PDF "
                   "next to the tables)")
    p.add_argument("--scores-only", action="store_true",
                   help="compute and write every layer score (window cosine, BI, angular distance; CSV + JSON) and "
                   "their plots; no evaluation (same as the `scores` subcommand)")
    p.add_argument("--efficiency", action="store_true",
                   help="measure params, FLOPs/token, prefill latency, decode throughput and peak memory of the dense "
                   "and every pruned model; the table shows Speedup / Dec. Speedup / Ideal / Mem. vs dense")


def _add_efficiency_flags(p) -> None:
    """--help's "efficiency" flags."""
    p.add_argument("--eff-batch-size", type=_int("--eff-batch-size"), default=4, help="prefill batch (efficiency)")
    p.add_argument("--eff-seq-len", type=_int("--eff-seq-len"), default=256,
                   help="prefill tokens per sequence and the FLOPs context (efficiency; capped at the model's positions)")
    p.add_argument("--eff-decode-batch-size", type=_int("--eff-decode-batch-size"), default=1)
    p.add_argument("--eff-prompt-len", type=_int("--eff-prompt-len"), default=32, help="decode prompt tokens")
    p.add_argument("--eff-new-tokens", type=_int("--eff-new-tokens"), default=64,
                   help="tokens generated with the KV cache per decode measurement")
    p.add_argument("--eff-warmup", type=_int("--eff-warmup"), default=2, help="untimed warm-up runs")
    p.add_argument("--eff-repeats", type=_int("--eff-repeats"), default=5, help="timed runs (the median is reported)")


def _add_table_flags(p) -> None:
    """--help's "tables" flags."""
    p.add_argument("--table-metric", default=None,
                   help="the metric shown per task: any metric lm-eval reports (acc, acc_norm, exact_match, f1, "
                   "mcc, word_perplexity, ...), per task e.g. acc,hellaswag=acc_norm (default acc; printed with "
                   "the table)")
    p.add_argument("--table-preset", default=None, choices=("streamline", "shortgpt", "llm-pruner"),
                   help="the metric each paper reports per task (README: Reproducing a paper's protocol); "
                   "--table-metric entries override it")
    p.add_argument("--per-task-retained", action="store_true",
                   help="add a table of each score / the dense score x 100")
    p.add_argument("--stderr", action="store_true", help="show lm-eval's standard error with each score")
    p.add_argument("--wandb", default=None, metavar="PROJECT",
                   help="log every run (config, metrics, Ave./Per.) and the tables and figures to Weights & Biases "
                   "project PROJECT; offline (files under <output>/<model>/wandb, `wandb sync` uploads them) unless "
                   "WANDB_MODE says otherwise; needs pip install wandb")
    p.add_argument("--html", action="store_true",
                   help="also write report.html beside the tables: tables, figures, run settings, links to the JSON")
    p.add_argument("--all-stability", action="store_true",
                   help="show Stab. for every run (default: only where its n_eff, the effective number of items "
                   "behind it, reaches 30)")
    p.add_argument("--paired", default=None, metavar="METHOD",
                   help="also compare every run with METHOD's run at the same target, item by item: the Per. "
                   "difference with a 95%% paired bootstrap interval and the items only one of the two gets right "
                   "(printed; written as paired_METHOD.md/csv/tex)")
    p.add_argument("--label", action="append", default=[], metavar="METHOD=TEXT",
                   help="the row label of a method (repeatable), e.g. --label shortgpt=ShortGPT --label dense=Dense")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars (lm-eval's too)")
    p.add_argument("--progress", action="store_true",
                   help="draw progress bars even when stderr is not a terminal (default: bars only on a terminal)")
    p.add_argument("--max-loss-growth", type=_float("--max-loss-growth"), default=None, metavar="FACTOR",
                   help="a method whose training loss ends above its starting loss x FACTOR fails "
                   "(status: failed; default 2)")


def _add_golden_flags(p) -> None:
    """--help's "regression (golden files)" flags."""
    p.add_argument("--write-golden", default=None, metavar="FILE",
                   help="after the run, store its command line and metrics as a golden file")
    p.add_argument("--check", default=None, metavar="FILE",
                   help="re-run the golden file's command and fail (exit 1) if a metric drops below golden - tolerance")
    p.add_argument("--tolerance", type=_float("--tolerance"), default=None,
                   help="allowed change for --check, either way, as a fraction of accuracy (default 0.02)")
    p.add_argument("--accept-better", action="store_true",
                   help="with --check: a metric above golden + tolerance passes (reported as 'better') instead of "
                   "failing; regenerate the golden file to record it")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show lm-eval's and transformers' warnings and full error causes; with --list-methods: every option")


def _split(value: str | None, flag: str = "list") -> list[str]:
    """Comma list; an empty or repeated item is a usage error naming ``flag``."""
    from harness.validation import split_list

    return split_list(value, flag)


def _method_options(items: list[str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for item in items:
        head, eq, value = item.partition("=")
        method, dot, key = head.partition(".")
        if not eq or not dot or not method or not key:
            raise UsageError(f"bad method option '{item}'; write METHOD.KEY=VALUE, e.g. streamline.epochs=3")
        out.setdefault(method.strip(), {})[key.strip()] = value.strip()
    return out


def _verbose(argv) -> bool:
    return any(a in ("-v", "--verbose") for a in (sys.argv[1:] if argv is None else argv))


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if os.environ.get("RANK", "0") != "0":  # data-parallel launch (torchrun, accelerate launch): rank 0 prints
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    try:
        return _main(argv)
    except BrokenPipeError:  # `--report ... | head`: the reader left; end quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes stdout at exit
        return 1
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        verbose = getattr(exc, "verbose", None)  # set once the arguments (and any YAML config) are parsed
        if verbose is None:
            verbose = _verbose(argv)
        if exc.__cause__ is not None and verbose:  # the underlying exception, for a bug report
            import traceback

            print("".join(traceback.format_exception(exc.__cause__)).rstrip(), file=sys.stderr)
        return 2
    except RegressionFailure as exc:
        print(f"regression: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        import errno

        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG):
            raise
        where = f" '{exc.filename}'" if exc.filename else ""
        fix = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space",
               errno.ENAMETOOLONG: "use a shorter path"}.get(exc.errno, "pass a folder you can write to")
        print(f"error: cannot write{where} ({exc.strerror}); {fix} (finished runs are kept and skipped next time)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished runs are saved and will be skipped next time", file=sys.stderr)
        return 130


SUBCOMMANDS = {"run": None, "scores": "--scores-only", "list": "--list-methods", "report": "--report", "check": "--check"}


def subcommand_argv(argv: list[str]) -> list[str]:
    """``report DIR ...`` -> ``--report DIR ...`` and the like (``run`` is the default and may be left out)."""
    if not argv or argv[0] not in SUBCOMMANDS:
        return argv
    cmd, rest = argv[0], argv[1:]
    flag = SUBCOMMANDS[cmd]
    if cmd in ("report", "check"):
        if not rest or rest[0].startswith("-"):
            raise UsageError(f"`{cmd}` needs a {'folder' if cmd == 'report' else 'golden file'}: "
                             f"run_benchmarks.py {cmd} {'DIR' if cmd == 'report' else 'FILE'} [flags]")
        return [flag, rest[0], *rest[1:]]
    return rest if flag is None else [flag, *rest]


def _main(argv) -> int:
    from harness.config_file import parse_args_with_config

    argv = subcommand_argv(list(sys.argv[1:] if argv is None else argv))
    args = parse_args_with_config(build_parser(), argv)
    try:
        return _dispatch(args, argv)
    except UsageError as exc:
        exc.verbose = bool(args.verbose)  # --verbose given on the command line or as `verbose: true` in a config
        raise


def _dispatch(args, argv) -> int:
    from harness.plugins.registry import available_methods, available_post_steps
    from harness.validation import load_plugins

    load_plugins(_split(args.plugins, "--plugins"))  # any error in a plugin file: one line naming it
    if args.list_methods:
        _list_methods(available_methods(), available_post_steps(), args.verbose)
        return 0

    from harness.results import report

    if args.report:
        runs, stored = _report_runs(args)
        if stored is not None:
            print(f"table settings from {stored} (flags given here override them)")
        paper = _load_paper(args)
        if runs:
            report.check_metric_spec(args.table_metric, report.run_column_metrics(runs))
        _publish(args, runs, Path(args.report), _split(args.methods, "--methods") or None, paper)
        return 0

    if args.scores_only:
        return _scores(args)

    if args.check:
        return _check(args, argv)
    if args.tolerance is not None:
        raise UsageError("--tolerance only applies with --check FILE")
    records, _ = _run(args)
    failed = [r.get("label") or r["method"] for r in records if r.get("status") == "failed"]
    if failed:  # every other run is stored and the table printed; the exit code says not all went well
        print(f"{len(failed)} run(s) failed: {', '.join(failed)} (the reason is in each run's JSON, 'failure')",
              file=sys.stderr)
        return 1
    if args.write_golden:
        from harness.results.regression import write_golden

        path = write_golden(args.write_golden, _golden_argv(argv), records)
        print(f"wrote golden results {path}")
    return 0


def _list_methods(methods: dict, steps: dict, verbose: bool) -> None:
    """One line per method and post-step; with -v/--verbose every option, its default and its help."""
    from harness.plugins.options import describe_options

    def show(prefix: str, name: str, spec) -> None:
        print(f"{prefix}{name:<{24 - len(prefix)}} {spec.help}")
        if verbose:
            for opt, typ, default, text in describe_options(spec.config_cls):
                print(f"    {name}.{opt}: {typ} = {default}" + (f"  -- {text}" if text else ""))

    for name, spec in methods.items():
        show("", name, spec)
    print("\npost-steps (append to any method: METHOD+STEP, e.g. remove+lora; options -o STEP.KEY=VALUE):")
    for name, spec in steps.items():
        show("+", name, spec)


def _golden_argv(argv) -> list[str]:
    """The run's own arguments, without the ones that only say where things go."""
    argv = list(sys.argv[1:] if argv is None else argv)
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--write-golden", "--output-dir"):
            skip = True
            continue
        if a.startswith(("--write-golden=", "--output-dir=")) or a in ("--force",):
            continue
        out.append(a)
    return out


def _check(args, argv) -> int:
    from harness.results.regression import (
        DEFAULT_TOLERANCE,
        check,
        check_tolerance,
        load_golden,
    )

    golden = load_golden(args.check)
    tol = DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance
    check_tolerance(tol)  # before the (long) re-run
    print(f"regression check against {args.check}: re-running `{golden['command']}` (tolerance {tol})")
    from harness.io import make_temp_dir

    with make_temp_dir("sb_check") as tmp:
        from harness.config_file import parse_args_with_config

        run_args = parse_args_with_config(build_parser(), golden["argv"] + ["--output-dir", tmp, "--force"]
                                          + (["--no-progress"] if args.no_progress else []))
        records, _ = _run(run_args)
    print()
    check(golden, records, tol, accept_better=args.accept_better)
    return 0


def _reference_defaults(args) -> None:
    """No --model: the built-in reference model and suite. A reference model gets its suite and calibration text."""
    from harness import reference

    if not args.model:
        args.model = reference.default_model()
        print(f"Using the built-in reference model {args.model} ({reference.MODELS_DIR / args.model}) "
              f"on the reference suite ({reference.SUITE_DIR}); everything runs offline.")
        print("To run a Hub model instead: --model facebook/opt-1.3b --tasks "
              "piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa,boolq --ratio 0.25 "
              "(add --data-dir ../shared/data to read the task files locally)")
    ref_dir = reference.resolve(args.model)
    if ref_dir is None:
        return
    args.model = str(ref_dir)
    if not args.tasks and not args.suite:
        args.suite = str(reference.SUITE_DIR)
    if not args.calib_data:  # its world's text (wikitext would be almost all <unk> for its vocabulary)
        args.calib_data = str(reference.CALIBRATION_PATH)
    if args.calib_seq_len is None:
        args.calib_seq_len = reference.CALIB_SEQ_LEN


def _common_setup(args) -> bool:
    """What every command that loads a model does first: conflicting flags, number ranges, progress
    bars (returns whether they show) and the reference model's defaults."""
    from harness import progress, validation

    if args.progress and args.no_progress:
        raise UsageError("give either --progress or --no-progress, not both")
    validation.check_numbers(args)
    if getattr(args, "write_golden", None) is not None:
        validation.check_golden_target(args.write_golden)
    show_progress = progress.decide(force_on=args.progress, force_off=args.no_progress)
    progress.set_enabled(show_progress)  # every tqdm bar, lm-eval's included
    _reference_defaults(args)
    if args.calib_seq_len is None:
        args.calib_seq_len = defaults.CALIB_SEQ_LEN
    return show_progress


def _calibration_config(args, seed: int | None = None):
    """The calibration text: --calib-data, else --data-dir's wikitext-2 file, else the default source."""
    from harness.signals.calibration import LOCAL_DEFAULT, CalibrationConfig

    if args.calib_data:
        source = args.calib_data
    elif args.data_dir:
        source = str(Path(args.data_dir) / LOCAL_DEFAULT)
        if not Path(source).is_file():
            raise UsageError(f"missing calibration file {source}; pass --calib-data or fix --data-dir")
    else:
        source = CalibrationConfig().source
    if args.calib_data and Path(args.calib_data).suffix in (".txt", ".jsonl", ".json", ".gz") \
            and not Path(args.calib_data).is_file():
        raise UsageError(f"calibration file '{args.calib_data}' does not exist; pass an existing .txt or .jsonl file")
    return CalibrationConfig(source=source, split=args.calib_split, field=args.calib_field,
                             num_samples=args.calib_samples, seq_len=args.calib_seq_len,
                             seed=_one_seed(args) if seed is None else seed,
                             batch_size=args.calib_batch_size, top_boundary=args.top_boundary)


def _run(args):
    from harness.evaluation.quiet import quiet_lm_eval
    from harness.results import report

    show_progress = _common_setup(args)
    if args.wandb:  # fail before the run, not after it
        import importlib.util

        if not str(args.wandb).strip():
            raise UsageError("--wandb needs a project name, e.g. --wandb layer-pruning")
        if importlib.util.find_spec("wandb") is None:
            raise UsageError("--wandb needs the wandb package: pip install wandb==0.31.0 (or pip install -e '.[track]')")
    seeds = list(args.seed)  # the first builds the run's options; the others replace it (_with_seed)
    methods = _split(args.methods, "--methods")
    tasks = _split(args.tasks, "--tasks")
    quiet_lm_eval()
    if args.suite and args.tasks:
        raise UsageError("give either --tasks or --suite, not both")
    report.parse_metric_spec(args.table_metric, args.table_preset)
    idle = sorted(set(_labels(args.label)) - set(methods or []) - {"dense"})
    if idle:  # e.g. a shared config file's labels, run with fewer --methods
        print(f"note: --label given for methods not being run: {', '.join(idle)}")
    _log_levels(args.verbose)
    from harness.runner import run_benchmark

    opts = _run_options(args, methods, tasks, seeds[0], show_progress)
    from harness.evaluation.task_checks import static_column_metrics

    report.check_metric_spec(args.table_metric, static_column_metrics(opts.eval))  # names checked, no model yet
    if args.paired and args.paired not in opts.methods:
        raise UsageError(f"--paired {args.paired}: not one of this run's methods ({', '.join(opts.methods)}); "
                         f"add it to --methods or pair with one of them")
    paper = _load_paper(args)  # a bad paper file fails before the run
    sink = {}
    records = run_benchmark(opts, on_session=(lambda s: sink.setdefault("session", s)) if args.plots else None)
    for seed in seeds[1:]:  # the dense run does not depend on the seed: found and skipped
        print(f"seed {seed}:")
        records += [r for r in run_benchmark(_with_seed(opts, seed)) if r["method"] != "dense"]
    from harness.results.store import slug

    out = Path(args.output_dir) / slug(args.model)
    shown, order = _with_stored_runs(records, out, opts.methods)
    tables = _publish(args, shown, out, order, paper, session=sink.get("session"), run_eval=opts.eval, ran=records)
    return records, tables


def _with_stored_runs(records: list[dict], out: Path, methods: list[str]) -> tuple[list[dict], list[str]]:
    """The runs the folder's tables show after a run: this invocation's, plus every run already stored
    in ``out`` under the same evaluation (model, tasks, limit, dtype) that this invocation did not
    produce again (another method, target or seed), so that a sweep run piece by piece into one
    folder keeps whole tables, costs and plots there - what ``report DIR`` renders. A stored run with
    the label, target and seed of one of this invocation's runs is left out: the new one stands for
    it; of several stored runs in one slot the newest shows. Returns the runs and the method order
    (the folder's stored order, this run's new methods appended; this run's order when the folder has
    none)."""
    from harness.results import report, table_settings
    from harness.results.store import load_runs, run_identity

    if not out.is_dir():
        return records, list(methods)
    groups = {report.eval_group_key(r) for r in records}
    mine = {run_identity(r) for r in records}
    taken = {report.slot_key(r) for r in records}
    earlier = [r for r in load_runs(str(out)) if report.eval_group_key(r) in groups and run_identity(r) not in mine
               and report.slot_key(r) not in taken and r["method"] != "dense"]
    extra, _older = report.newest_per_slot(earlier)
    _note_in_progress(out)
    stored = table_settings.read(out)
    order = (stored[0].get("methods") or "").split(",") if stored else []
    order = [m for m in order if m] or list(methods)
    order += [m for m in methods if m not in order]
    if extra:
        names = sorted({r.get("label") or r["method"] for r in extra})
        print(f"note: the tables also show {len(extra)} run(s) stored earlier in {out} under the same evaluation "
              f"({', '.join(names)}); --output-dir elsewhere gives tables of this run alone")
    return records + extra, order


def _log_levels(verbose: bool) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:  # lm-eval warns about every task's fewshot default and every in-memory model
        for name in ("lm_eval", "lm-eval", "datasets", "transformers"):
            logging.getLogger(name).setLevel(logging.ERROR)


def _publish(args, runs: list[dict], out: Path, method_order, paper, session=None, run_eval=None,
             ran: list[dict] | None = None) -> list:
    """Tables (printed and written; for `report` the cross-model summary first), the paper
    comparison, plots and report.html, for `run` and `report` alike; after a run (``run_eval`` given) also the table settings, the layer scores of
    ``session``, lm-eval task YAMLs and W&B (``ran``: the runs this invocation made, the ones logged
    there; ``runs`` may hold earlier ones of the folder too). Returns the tables."""
    from harness.results import plots, report, table_settings

    tables = _tables(runs, args, method_order)
    if run_eval is None:  # report DIR
        if not tables:
            raise UsageError(f"no complete result set (dense + methods) under '{out}'")
        _summary(runs, args, out)
    else:
        print()
    print(report.render_text(tables))
    written = report.write_reports(tables, out)
    from harness.results.costs import cost_tables

    costs = cost_tables(runs, method_order, _labels(getattr(args, "label", [])))
    if costs:  # what each run took, from its timings
        written += report.write_reports(costs, out, stem="costs")
    if run_eval is not None:
        written.append(table_settings.write(out, args, method_order))
    for path in written:
        print(f"wrote {path}")
    _paper_comparison(runs, args, paper, out, method_order)
    _paired(runs, args, out, method_order)
    if run_eval is None:
        _report_plots(runs, args, out)
    elif args.plots:
        from harness.results.scores import write_scores
        from harness.runner import layer_scores

        payload = layer_scores(session)  # the sweep's cached pass, or one forward pass now
        for path in write_scores(payload, out) + plots.render_plots(out, runs, payload, args.table_metric):
            print(f"wrote {path}")
    if run_eval is not None:
        _task_yamls(run_eval, out)
    _html(args, out, tables, runs)
    if run_eval is not None and args.wandb:
        from harness.results.tracking import log_to_wandb

        dirs = log_to_wandb(args.wandb, ran if ran is not None else runs, tables, out, group=out.name)
        print(f"logged {len(dirs)} W&B run(s) to project {args.wandb} under {out / 'wandb'} "
              f"(mode {os.environ.get('WANDB_MODE')})")
    return tables


def _run_options(args, methods, tasks, seed: int, show_progress: bool):
    """The run's one configuration, built once and frozen (harness.runner.RunOptions): every flag
    that shapes the run, the targets as one list; the first seed (others: _with_seed)."""
    from harness.evaluation.eval_config import DEFAULT_TASKS, EvalConfig, parse_model_args
    from harness.model.target import Target
    from harness.runner import RunOptions

    if args.layers:
        targets = [Target(layers=n) for n in args.layers]
    else:
        targets = [Target(ratio=r, basis=args.ratio_basis) for r in (args.ratio or [defaults.RATIO])]
    extra = {} if args.max_loss_growth is None else {"max_loss_growth": args.max_loss_growth}
    return RunOptions(
        model=args.model,
        methods=methods,
        method_options=_method_options(args.method_opt),
        targets=targets,
        eval=EvalConfig(tasks=tasks or list(DEFAULT_TASKS), data_dir=args.data_dir, limit=args.limit,
                        batch_size=args.eval_batch_size, ppl=args.ppl, ppl_seq_len=args.ppl_seq_len,
                        ppl_stride=args.ppl_stride, ppl_max_windows=args.ppl_max_windows, suite=args.suite,
                        num_fewshot=args.num_fewshot, include_path=args.include_path,
                        model_args=parse_model_args(args.model_args), eval_impl=args.eval_impl),
        calibration=_calibration_config(args, seed),
        dtype=args.dtype, device=args.device, seed=seed, output_dir=args.output_dir, force=args.force,
        save_models=args.save_models, progress=show_progress,
        efficiency=_efficiency_config(args, seed) if args.efficiency else None,
        all_layer_stats=bool(args.plots), log_samples=bool(args.log_samples),
        stability_scores=args.stability_scores, **extra,
    )


def _task_yamls(cfg, out: Path) -> None:
    """Local data: its lm-eval task YAMLs beside the results, for stock lm-eval on a saved model."""
    from harness.evaluation.local_data import write_task_yamls

    paths = write_task_yamls(cfg, out / "lm_eval_tasks")
    if paths:
        print(f"wrote {len(paths)} lm-eval task YAML(s) to {out / 'lm_eval_tasks'} (stock lm-eval on a saved "
              f"model: lm_eval --model hf --include_path {out / 'lm_eval_tasks'} --tasks "
              f"{','.join(p.stem for p in paths)} ...)")


def _html(args, folder: Path, tables, runs) -> None:
    """--html: report.html in the folder, after its tables and figures are written."""
    if getattr(args, "html", False):
        from harness.results.html import write_html

        print(f"wrote {write_html(folder, tables, runs, f'streamline-bench: {folder.name}')}")


def _one_seed(args) -> int:
    """The seed where only one is meaningful (the scores command)."""
    if not isinstance(args.seed, list):
        return args.seed
    if len(args.seed) > 1:
        raise UsageError(f"--seed {','.join(map(str, args.seed))}: this command takes one seed; "
                         "a list of seeds is for runs (the tables then show mean ± std)")
    return args.seed[0]


def _with_seed(opts, seed: int):
    """The run's options with another seed: calibration draw, training and efficiency inputs."""
    import dataclasses

    eff = opts.efficiency and dataclasses.replace(opts.efficiency, seed=seed)
    return dataclasses.replace(opts, seed=seed, calibration=dataclasses.replace(opts.calibration, seed=seed),
                               efficiency=eff)


def _efficiency_config(args, seed: int | None = None):
    from harness.evaluation.efficiency import EfficiencyConfig

    cfg = EfficiencyConfig(batch_size=args.eff_batch_size, seq_len=args.eff_seq_len,
                           decode_batch_size=args.eff_decode_batch_size, decode_prompt_len=args.eff_prompt_len,
                           new_tokens=args.eff_new_tokens, warmup=args.eff_warmup, repeats=args.eff_repeats,
                           seed=_one_seed(args) if seed is None else seed)
    cfg.validate()
    return cfg


def _tables(records, args, method_order):
    """The plain table; with several targets or --efficiency, rows grouped by target (a Target
    column, efficiency ratios) and a methods x targets table of Per."""
    from harness.results import report

    efficiency = bool(getattr(args, "efficiency", False)) or any(r.get("efficiency") for r in records)
    options = {"preset": getattr(args, "table_preset", None), "labels": _labels(getattr(args, "label", [])),
               "stderr": bool(getattr(args, "stderr", False)), "all_stability": bool(getattr(args, "all_stability", False))}
    if not report.spans_targets(records) and not efficiency:
        tables = report.build_tables(records, args.table_metric, method_order=method_order, **options)
    else:
        tables = report.build_target_tables(records, args.table_metric, method_order, efficiency=efficiency,
                                            **options)
        if report.spans_targets(records):
            tables += report.build_compact_table(records, args.table_metric, method_order, **options)
    if getattr(args, "per_task_retained", False):
        tables += report.retained_tables([t for t in tables if not t[0].endswith("Per. by target")])
    return tables


def _report_runs(args):
    """--report DIR: the runs stored under DIR, and the table settings of DIR filled into every table
    flag not given (returns the runs and the settings file used, or None)."""
    from harness.results import table_settings
    from harness.results.store import load_runs

    if not Path(args.report).is_dir():
        raise UsageError(f"--report directory '{args.report}' does not exist")
    from harness.results.report import newest_per_slot

    runs, older = newest_per_slot(load_runs(args.report))
    for run, kept in older:  # e.g. a method run again with other calibration: the newer run is the row
        print(f"note: {Path(run['_path']).name} is left out of the tables: {Path(kept['_path']).name} is a newer "
              f"run with the same label, target and seed")
    _note_in_progress(Path(args.report))
    return runs, table_settings.apply(args, Path(args.report))  # the run's metric, labels, order (flags win)


def _note_in_progress(folder: Path) -> None:
    """A note for each run under ``folder`` that another process sharing the sweep is still running."""
    from harness.results.claim import in_progress

    for stem, who in in_progress(folder):
        print(f"note: {stem} is still running ({who}); it is not in these tables yet")


def _summary(runs, args, out: Path) -> None:
    """Several models under one folder: the models x methods table(s) of Per. first (summary.md/csv/tex)."""
    from harness.results import report
    from harness.results.summary import summary_tables

    tables = summary_tables(runs, args.table_metric, _split(args.methods, "--methods") or None,
                            preset=getattr(args, "table_preset", None), labels=_labels(getattr(args, "label", [])))
    if tables:
        print(report.render_text(tables))
        for path in report.write_reports(tables, out, stem="summary"):
            print(f"wrote {path}")
        print()


def _load_paper(args):
    if not getattr(args, "paper", None):
        return None
    from harness.results.paper import load_paper

    return load_paper(args.paper)


def _paper_comparison(runs, args, paper, out: Path, method_order) -> None:
    """--paper FILE: each matching paper row beside ours with the deltas (printed; also
    written as vs_paper.md/csv/tex next to the tables)."""
    if paper is None:
        return
    from harness.results import report
    from harness.results.paper import render_comparison

    text, tables = render_comparison(runs, paper, args.table_metric, preset=getattr(args, "table_preset", None),
                                     labels=_labels(getattr(args, "label", [])), method_order=method_order)
    print()
    print(text)
    if tables:
        for path in report.write_reports(tables, out, stem="vs_paper"):
            print(f"wrote {path}")


def _paired(runs, args, out: Path, method_order) -> None:
    """--paired METHOD: every run against METHOD's, item by item (printed; paired_METHOD.md/csv/tex)."""
    if not getattr(args, "paired", None):
        return
    from harness.results import report
    from harness.results.paired import paired_tables

    tables = paired_tables(runs, args.paired, args.table_metric, method_order,
                           preset=getattr(args, "table_preset", None), labels=_labels(getattr(args, "label", [])))
    print()
    print(report.render_text(tables))
    from harness.results.store import slug

    for path in report.write_reports(tables, out, stem=f"paired_{slug(args.paired)}"):
        print(f"wrote {path}")


def _report_plots(runs, args, out: Path) -> None:
    """--report: the accuracy plot from the runs; the heatmaps and BI from every layer_scores.json
    under the folder (one set per model)."""
    from harness.results import plots
    from harness.results.scores import SCORES_STEM, read_scores

    written = plots.render_plots(out, runs, None, args.table_metric)
    found = sorted({p.parent for p in out.rglob(f"{SCORES_STEM}.json")})
    for folder in found:
        payload = read_scores(folder)
        if payload is not None:
            written += plots.render_plots(folder, runs, payload, args.table_metric, accuracy=False)
    for path in written:
        print(f"wrote {path}")


def _scores(args) -> int:
    """`scores --model M`: every layer score (CSV + JSON) and the heatmaps / BI plot; no lm-eval."""
    import time

    from harness import validation
    from harness.model.adapters import get_adapter
    from harness.model.loading import check_model_source, load_model
    from harness.results import plots
    from harness.results.scores import compute_scores, write_scores
    from harness.results.store import slug
    from harness.signals.calibration import load_calibration

    show_progress = _common_setup(args)
    cal_cfg = _calibration_config(args)
    validation.check_calibration_source(cal_cfg.source, args.calib_field)
    check_model_source(args.model)
    t = time.perf_counter()
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    calibration = load_calibration(cal_cfg, tokenizer)
    payload = compute_scores(model, get_adapter(model), calibration, args.model, progress=show_progress)
    out = Path(args.output_dir) / slug(args.model)
    written = write_scores(payload, out) + plots.render_plots(out, [], payload, args.table_metric)
    print(f"scored {payload['num_layers']} layers on {payload['tokens']:,} calibration tokens "
          f"({time.perf_counter() - t:.1f}s)")
    for n, start in payload["choices"]["streamline"].items():
        print(f"  n={n:>2}: streamline/remove window {start}..{start + int(n) - 1}, angular window "
              f"{payload['choices']['angular'][n]}..{payload['choices']['angular'][n] + int(n) - 1}, shortgpt layers "
              f"{payload['choices']['shortgpt'][n]}")
    for path in written:
        print(f"wrote {path}")
    return 0
