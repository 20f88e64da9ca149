"""`tuneforge forgetting-table`: one recipe, several cures for forgetting, the trade-off measured.

Each variant trains the same recipe (same data, seed and step budget) with one cure from ``retain`` (or none)
by ``python -m tuneforge train RECIPE k=v... <variant overrides> output_dir=<out>/<variant>`` in a child
process, with the forgetting report on (the recipe's ``task.general_eval``, held-out general data). The table
then shows, per variant: the domain metric after training, the general metric before and after and its
change, the general loss change, and wall time. This is the seed texts' trade-off between adapting and
keeping, measured rather than asserted.

Variants and what they add (``variant.NAME.KEY=VALUE`` overrides a variant's option):

* ``none``: nothing;
* ``l2sp``: ``retain.l2sp`` with its defaults;
* ``ewc``: ``retain.ewc.fisher_data=<general_train>``;
* ``replay``: ``retain.replay.data=<general_train>``;
* ``distill``: ``retain.distill`` with its defaults (the starting model as teacher).

``general_train`` is general data *other* than the evaluation file (EWC measures its Fisher on it and replay
trains on it; using the evaluation file would score the cure on what it saw). A recipe whose forgetting
extension names a ``general_recipe`` (another objective scoring the backbone, e.g. STS Spearman for a
classifier) gets that objective's metric in the general columns. Outputs, written atomically:
``forgetting_table.md``, ``forgetting_table.json`` and ``forgetting_table.png``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.track.atomic import atomic_write_bytes, atomic_write_text

__all__ = ["VARIANTS", "VariantResult", "forgetting_table", "split_table_overrides"]

VARIANTS = ("none", "l2sp", "ewc", "replay", "distill")
_NEEDS_GENERAL = {"ewc": "retain.ewc.fisher_data", "replay": "retain.replay.data"}


@dataclass
class VariantResult:
    """One row of the table (None where the run failed)."""

    variant: str
    domain_after: float | None = None
    general_before: float | None = None
    general_after: float | None = None
    general_change: float | None = None
    general_loss_change: float | None = None
    general_metric: str | None = None
    wall_s: float | None = None
    error: str | None = None


def split_table_overrides(overrides: list[str]) -> tuple[list[str], dict[str, list[str]], Path | None, Path | None,
                                                         list[str]]:
    """(variants, per-variant overrides, general_train, output_dir, the remaining run overrides)."""
    variants: list[str] = list(VARIANTS)
    options: dict[str, list[str]] = {}
    general = out = None
    rest = []
    for o in overrides:
        key, _, value = o.partition("=")
        if key == "variants":
            variants = [v.strip() for v in value.split(",") if v.strip()]
        elif key.startswith("variant."):
            name, _, sub = key.removeprefix("variant.").partition(".")
            options.setdefault(name, []).append(f"retain.{name}.{sub}={value}")
        elif key == "general_train":
            general = Path(value)
        elif key == "output_dir":
            out = Path(value)
        else:
            rest.append(o)
    unknown = [v for v in [*variants, *options] if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"unknown variant '{unknown[0]}'; allowed: {', '.join(VARIANTS)}", key="variants")
    return variants, options, general, out, rest


def _variant_overrides(variant: str, options: dict[str, list[str]], general: Path | None) -> list[str]:
    if variant == "none":
        return []
    extra = list(options.get(variant, []))
    if variant in _NEEDS_GENERAL:
        if general is None:
            raise ConfigError(f"variant '{variant}' trains or measures on general data: give general_train=FILE "
                              "(other general data than the recipe's general_eval)", key="general_train")
        extra.append(f"{_NEEDS_GENERAL[variant]}={general}")
    if not extra:
        extra = [f"retain.{variant}={{}}"]
    return extra


def forgetting_table(recipe: str | None, overrides: list[str], variants: list[str], options: dict[str, list[str]],
                     general: Path | None, output_dir: Path, *, overwrite: bool = False, quiet: bool = False,
                     command: str = "") -> list[VariantResult]:
    """Train every variant, then write the table (see module docstring)."""
    base = load_config(recipe, overrides)
    listed = base.extension("forgetting")
    if base.task.general_eval is None and (listed is None or (listed.general_eval is None
                                                              and listed.general_recipe is None)):
        raise ConfigError("the forgetting table needs held-out general data: set task.general_eval=FILE", key="task.general_eval")
    plans = {v: _variant_overrides(v, options, general) for v in variants}
    for extra in plans.values():  # every variant's config checked before the first one trains
        load_config(recipe, [*overrides, *extra])
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise ConfigError(f"{output_dir} exists and is not empty; use --overwrite", key="output_dir")
    output_dir.mkdir(parents=True, exist_ok=True)
    from tuneforge.objectives import get_objective

    metric = get_objective(base).default_metric
    rows = []
    for v in variants:
        run_dir = output_dir / v
        args = [sys.executable, "-m", "tuneforge", "train", *([recipe] if recipe else []), *overrides, *plans[v],
                f"output_dir={run_dir}", "--overwrite", "--quiet"]
        if not quiet:
            print(f"[{v}] training ...", flush=True)
        t0 = time.perf_counter()
        (output_dir / "logs").mkdir(exist_ok=True)
        with (output_dir / "logs" / f"{v}.log").open("w", encoding="utf-8") as log:
            proc = subprocess.run(args, stdout=log, stderr=subprocess.STDOUT)
        row = VariantResult(v, wall_s=round(time.perf_counter() - t0, 1))
        if proc.returncode != 0:
            row.error = f"exit {proc.returncode}, see logs/{v}.log"
        else:
            _fill(row, json.loads((run_dir / "metrics.json").read_text(encoding="utf-8")), metric)
        rows.append(row)
        if not quiet:
            print(f"[{v}] {row}", flush=True)
    _write(output_dir, rows, metric, command)
    return rows


def _fill(row: VariantResult, metrics: dict[str, Any], metric: str) -> None:
    block = metrics.get("forgetting") or {}
    row.domain_after = block.get("domain", {}).get(metric, {}).get("after")
    row.general_metric = block.get("general_metric", metric)  # another objective's metric (general_recipe)
    general = block.get("general", {}).get(row.general_metric, {})
    row.general_before, row.general_after, row.general_change = general.get("before"), general.get("after"), \
        general.get("change")
    row.general_loss_change = block.get("general", {}).get("loss", {}).get("change")


def _write(out: Path, rows: list[VariantResult], metric: str, command: str) -> None:
    def f(x: float | None, signed: bool = False) -> str:
        return "n/a" if x is None else f"{x:+.4f}" if signed else f"{x:.4f}"

    general = next((r.general_metric for r in rows if r.general_metric), metric)
    title = metric if general == metric else f"domain {metric}, general {general}"
    lines = [f"# Forgetting table ({title})", "", f"`{command}`" if command else "", "",
             f"| variant | domain {metric} after | general {general} before | general after | change | "
             "general loss change | wall s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.error:
            lines.append(f"| {r.variant} | failed: {r.error} | | | | | {r.wall_s} |")
        else:
            lines.append(f"| {r.variant} | {f(r.domain_after)} | {f(r.general_before)} | {f(r.general_after)} | "
                         f"{f(r.general_change, True)} | {f(r.general_loss_change, True)} | {r.wall_s} |")
    atomic_write_text(out / "forgetting_table.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "forgetting_table.json", json.dumps([asdict(r) for r in rows], indent=2))
    _plot(out, rows, general)


def _plot(out: Path, rows: list[VariantResult], metric: str) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.error is None and r.general_change is not None]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([r.variant for r in ok], [r.general_change for r in ok], color="tab:red")
    for i, r in enumerate(ok):
        ax.annotate(f"domain {r.domain_after:.3g}" if r.domain_after is not None else "", (i, r.general_change),
                    ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(f"general {metric} change")
    ax.set_title("What each cure keeps")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(out / "forgetting_table.png", buf.getvalue())
