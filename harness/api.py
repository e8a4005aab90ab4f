"""The Python API for notebooks: the CLI's run and ``--report`` as functions that return data.

    import harness
    res = harness.run(model="ref-opt-12l", methods=["streamline", "remove"], layers=[1, 2], limit=20,
                      method_options={"streamline": {"epochs": 1}})
    res.table                      # the printed table as a pandas DataFrame
    res.records                    # every run's record (dicts, as stored in the JSON files)
    harness.report("results/ref-opt-12l").table

Keywords are the command-line flags without dashes (``calib_samples=8``, ``output_dir="runs"``,
``plots=True``); a list becomes a comma-separated list. Bad input raises ``harness.UsageError``
with the CLI's one-line message (nothing is printed to stderr, nothing exits).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Result:
    records: list[dict]
    tables: list = field(default_factory=list)  # (title, DataFrame, notes) as printed

    @property
    def table(self):
        """The first (main) table as a pandas DataFrame (None without one)."""
        return self.tables[0][1] if self.tables else None


def _argv(options: dict) -> list[str]:
    argv = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if key == "method_options":
            for method, opts in (value or {}).items():
                for name, v in opts.items():
                    argv += ["-o", f"{method}.{name}={v}"]
        elif value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, (list, tuple)):
            argv += [flag, ",".join(str(v) for v in value)]
        else:
            argv += [flag, str(value)]
    return argv


def _parse(argv: list[str]):
    from harness.cli import build_parser
    from harness.config_file import parse_args_with_config

    try:
        return parse_args_with_config(build_parser(), argv)
    except SystemExit as exc:  # argparse's own error (its message went to stderr)
        from harness.errors import UsageError

        raise UsageError(f"bad arguments {argv}: see the message above") from exc


def run(model: str | None = None, methods: list[str] | None = None, **options) -> Result:
    """Run the benchmark as ``run_benchmarks.py`` would (results stored, finished runs reused)."""
    from harness import cli
    from harness.validation import load_plugins

    args = _parse(_argv({"model": model, "methods": methods, **options}))
    load_plugins(cli._split(args.plugins, "--plugins"))
    records, tables = cli._run(args)
    return Result(records, tables)


def report(folder: str, **options) -> Result:
    """The tables of the runs stored under ``folder`` (as ``--report`` renders them; nothing written)."""
    from harness import cli

    args = _parse(_argv(options) + ["--report", str(folder)])
    runs, _settings = cli._report_runs(args)
    return Result(runs, cli._tables(runs, args, cli._split(args.methods, "--methods") or None))
