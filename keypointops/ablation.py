"""``keypointops ablate``: each paper's ablation rows, trained at the ``cpu`` preset over several
seeds, evaluated with the keypoint-corruption controls, tabulated beside the paper's own table.

A row is one training run per seed (the ``cpu`` preset of its model with the row's options); a
row may start from another row's checkpoint (``init_from``: KMPNet's stage B and its fine-tune
control start from the stage-A PCB) and names the row it is compared against (``control``). Each
(row, seed) run lives in ``OUT/<paper>/<row>/seed<k>/`` (a normal run folder, resumable) and ends
with ``result.json``: the mAP/CMC of every keypoint setting and of each evaluation variant (the
same weights evaluated with another test embedding, e.g. CTL's V_f^g). A finished run is never
trained again (an evaluation variant added to its row later is evaluated from its checkpoint), so an
interrupted ablation continues where it stopped; ``jobs=2`` runs independent
(row, seed) runs in two processes with one thread each.

The table written to ``OUT/<paper>/ablation.md`` gives, per row, the paper's figures, ours (mean
+- sample standard deviation over seeds), the difference to the control, the mAP change under
each corrupted keypoint setting, and whether the direction of the paper's effect is reproduced:
"yes" (same sign, mean difference larger than the seed spread), "no" (opposite sign, larger than
the spread) or "unresolved" (within the spread); with one seed, only the sign is given.
"""
from __future__ import annotations

import json
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from keypointops.data.corruption import KEYPOINT_CORRUPTIONS, check_corruption

__all__ = ["Row", "Ablation", "ABLATIONS", "run_ablation", "ablation_table", "table_from_runs", "check_rows"]


@dataclass(frozen=True)
class Row:
    """One row of a paper's ablation table, as trained here."""
    name: str                      # the row's key (OUT/<paper>/<name>/)
    label: str                     # the paper's wording of the row
    model: str                     # build_model name
    model_options: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)   # train-setting overrides of the cpu preset
    init_from: str | None = None   # the row whose final checkpoint initialises this one (same seed)
    control: str | None = None     # the row this one is compared against
    paper: tuple = ()              # the paper's figures, in the order of Ablation.columns
    eval_variants: dict = field(default_factory=dict)  # label -> model options for another test embedding


@dataclass(frozen=True)
class Ablation:
    """A paper's ablation: its citation, its table, the column the direction is read from."""
    citation: str
    table: str
    columns: tuple[str, ...]       # the paper's columns (e.g. "MARS mAP")
    main_column: int               # index into columns of the figure compared with our mAP
    rows: tuple[Row, ...]


# KMPNet's two-stage protocol at the cpu preset: stage A is the PCB preset; stage B (and its
# fine-tune control, with the same budget) starts from stage A's weights and restarts the preset's
# schedule, shortened: 10 epochs at the preset's learning rate, x0.1 after 8 (the released code
# restarts the whole schedule for stage B; a new graph branch learns little at the decayed rate).
_STAGE_B = dict(epochs=10, lr_milestones=[8])

ABLATIONS: dict[str, Ablation] = {
    "kmpnet": Ablation(
        "Chen, Döring, Zhang, Yang, Gall and Schiele, Keypoint Message Passing for Video-Based Person "
        "Re-Identification, AAAI 2022 (KMPNet)",
        "Table 3 (graph structure, PCB visual branch)", ("MARS top-1", "MARS mAP"), 1, (
            Row("pcb", "PCB baseline (stage A)", "pcb", paper=(85.3, 84.6)),
            Row("pcb+finetune", "+ fine-tune (longer training, no GCN)", "pcb", train=_STAGE_B, init_from="pcb",
                control="pcb", paper=(84.7, 84.6)),
            Row("spatial", "+ spatial graph only", "kmpnet", dict(graph="spatial"), _STAGE_B, "pcb",
                "pcb+finetune", (88.6, 85.5)),
            Row("temporal", "+ temporal graph only", "kmpnet", dict(graph="temporal"), _STAGE_B, "pcb",
                "pcb+finetune", (88.7, 85.3)),
            Row("both", "+ both = KMPNet", "kmpnet", dict(graph="both"), _STAGE_B, "pcb", "pcb+finetune",
                (89.7, 86.5), eval_variants={"x_g (graph branch, Table 4: 61.7 / 57.3)": dict(embedding="x_g")}),
            Row("both-released-gather", "+ both, the released code's keypoint sampling (not in the paper)",
                "kmpnet", dict(graph="both", gather="released"), _STAGE_B, "pcb", "both"),
            Row("both-no-graph-gradient", "+ both, the graph's gradient kept out of the CNN (not in the paper)",
                "kmpnet", dict(graph="both", graph_gradient=False), _STAGE_B, "pcb", "both",
                eval_variants={"x_g (graph branch)": dict(embedding="x_g")}),
        )),
    "alignnet": Ablation(
        "Rambhatla and Jones, Body Part Alignment and Temporal Attention for Video-Based Person "
        "Re-Identification, BMVC 2019 (AlignNet)", "Table 1(b) (component analysis)", ("PRID2011 R1", "iLIDS-VID R1", "MARS R1"), 2, (
            Row("baseline", "Baseline", "alignnet", dict(use_parts=False, use_tap=False), paper=(85.4, 75.7, 79.7)),
            Row("parts", "AlignNet + AvgPool", "alignnet", dict(use_tap=False), control="baseline",
                paper=(94.4, 80.7, 82.6)),
            Row("full", "AlignNet + TAP (full model)", "alignnet", control="parts", paper=(94.4, 86.0, 83.2)),
        )),
    "ctl": Ablation(
        "Liu, Zha, Wu, Zheng and Sun, Spatial-Temporal Correlation and Topology Learning for Person "
        "Re-Identification in Videos, CVPR 2021 (CTL)", "Table 3 (component ablation, MARS)", ("R-1", "mAP"), 1, (
            Row("basel", "Basel", "ctl", dict(variant="basel"), paper=(88.6, 82.7)),
            Row("contre", "Basel+ContRe", "ctl", dict(variant="basel+contre"), control="basel", paper=(89.4, 85.4)),
            Row("contre+3d", "Basel+ContRe+3D", "ctl", dict(variant="basel+contre+3d"), control="contre",
                paper=(90.7, 86.0)),
            Row("full", "Basel+ContRe+3D+CS (full CTL)", "ctl", control="basel", paper=(91.4, 86.7),
                eval_variants={"V_f^g (global feature only)": dict(embedding="global")}),
            Row("full-shortcut", "full CTL with a shortcut on the first graph layer too (not in the paper)", "ctl",
                dict(first_layer_shortcut=True), control="basel"),
        )),
    "rgcn": Ablation(
        "Pan, Liu, Chen, He, Zheng, Zheng and He, Pose-Aided Video-based Person Re-Identification via "
        "Recurrent Graph Convolutional Network, arXiv 2209.11582, 2022 (RGCN/LGCN)",
        "Table III (appearance with and without the pose branch, AP)", ("MARS mAP", "MARS R1"), 0, (
            Row("appearance", "AP (appearance only)", "rgcn", dict(pose_branch=False), paper=(81.1, 85.2)),
            Row("rgcn", "AP+RGCN", "rgcn", control="appearance", paper=(82.6, 87.9),
                eval_variants={"f^a only": dict(embedding="appearance"), "f^p only": dict(embedding="pose")}),
            Row("lgcn", "AP+LGCN", "lgcn", control="appearance", paper=(82.3, 88.0),
                eval_variants={"f^a only": dict(embedding="appearance"), "f^p only": dict(embedding="pose")}),
        )),
}


def check_rows(paper: str, rows: list[str] | None = None) -> list[Row]:
    """The rows of ``paper`` (all, or those named, with the rows they start from); a ``ValueError``
    listing the valid choices otherwise."""
    if paper not in ABLATIONS:
        raise ValueError(f"unknown paper {paper!r}; choose from {', '.join(ABLATIONS)}")
    table = {row.name: row for row in ABLATIONS[paper].rows}
    if rows is None:
        return list(table.values())
    unknown = [name for name in rows if name not in table]
    if unknown:
        raise ValueError(f"{paper} has no ablation row {unknown[0]!r}; choose from {', '.join(table)}")
    wanted = set(rows)
    for name in rows:  # a row needs the row it starts from
        while table[name].init_from:
            name = table[name].init_from
            wanted.add(name)
    return [row for row in table.values() if row.name in wanted]


# ----------------------------------------------------------------------------------------- one run

def _run_folder(out: Path, paper: str, row: Row, seed: int) -> Path:
    return out / paper / row.name / f"seed{seed}"


def _run_one(job: dict) -> dict:
    """Trains (or resumes) one (row, seed) and evaluates it under every keypoint setting; returns and
    writes its ``result.json``. Runs in a worker process when ``jobs > 1``."""
    import torch

    from keypointops import engine
    from keypointops.checkpoints import load_checkpoint, model_from_checkpoint

    torch.set_num_threads(job["threads"])
    folder = Path(job["folder"])
    result_path = folder / "result.json"
    row: Row = job["row"]
    config = engine.make_config(row.model, "cpu", job["data"], job["root"], seed=job["seed"], workers=job["workers"],
                                max_steps=job["max_steps"], init_from=job["init_from"],
                                train_overrides={**row.train, **job["train_overrides"]},
                                model_overrides={**row.model_options, **job["model_overrides"]},
                                data_options=job["data_options"])
    device = torch.device("cpu")
    if result_path.exists():  # finished: only the evaluation variants added to its row since then
        result = json.loads(result_path.read_text())
        if all(label in result["variants"] for label in row.eval_variants):
            return result
        dataset = engine.dataset_of(config)
    else:
        run = engine.train(config, folder, resume=(folder / "model.pt").exists(), evaluate_at_end=False,
                           log=lambda line: None)
        dataset = run["dataset"]
        result = {"row": row.name, "seed": job["seed"], "epochs": config["train"]["epochs"],
                  "split": dataset.evaluation_split, "keypoints": {}, "variants": {}}
        settings = engine.evaluate_keypoint_settings(run["model"].eval(), dataset, config, device, job["keypoints"])
        result["keypoints"] = {setting: engine.summary(evaluation) for setting, evaluation in settings.items()}
    state = load_checkpoint(folder / "model.pt")
    for label, options in row.eval_variants.items():
        if label in result["variants"]:
            continue
        variant = model_from_checkpoint(state, **options)
        result["variants"][label] = engine.summary(
            engine.evaluate_models({"model": variant}, dataset, config, device)["model"])
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, result_path)
    return result


def run_ablation(paper: str, out: str | os.PathLike, *, seeds: int = 3, data: str = "synthetic-hard",
                 root: str | None = None, rows: list[str] | None = None, jobs: int = 1,
                 keypoints: tuple[str, ...] = KEYPOINT_CORRUPTIONS, workers: int = 0, threads: int | None = None,
                 max_steps: int | None = None,
                 train_overrides: dict | None = None, model_overrides: dict | None = None,
                 data_options: dict | None = None, log=print) -> str:
    """Runs the ablation of ``paper`` (see the module docstring) and returns the markdown table (also
    written to ``out/<paper>/ablation.md``). ``threads``: torch threads of each run (default: the
    cores shared by the ``jobs``); the other options size the runs as ``keypointops train``'s do."""
    if not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be a positive integer, got {seeds!r}")
    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs!r}")
    keypoints = tuple(check_corruption(k) for k in keypoints)
    if "as-is" not in keypoints:
        keypoints = ("as-is",) + keypoints
    selected = check_rows(paper, rows)
    out = Path(out)
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    done: dict[tuple[str, int], dict] = {}
    pending = [(row, seed) for row in selected for seed in range(seeds)]
    context = get_context("spawn")
    while pending:
        ready = [(row, seed) for row, seed in pending if not row.init_from or (row.init_from, seed) in done]
        jobs_now = [dict(row=row, seed=seed, folder=str(_run_folder(out, paper, row, seed)), data=data, root=root,
                         init_from=str(_run_folder(out, paper, _row(paper, row.init_from), seed) / "model.pt")
                         if row.init_from else None, keypoints=keypoints, workers=workers, max_steps=max_steps,
                         threads=threads, train_overrides=dict(train_overrides or {}),
                         model_overrides=dict(model_overrides or {}), data_options=dict(data_options or {}))
                    for row, seed in ready]
        log(f"{paper}: running {', '.join(f'{r.name}/seed{s}' for r, s in ready)}")
        if jobs == 1:
            results = [_run_one(job) for job in jobs_now]
        else:
            with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
                results = list(pool.map(_run_one, jobs_now))
        for (row, seed), result in zip(ready, results):
            done[(row.name, seed)] = result
            log(f"{paper}: {row.name}/seed{seed}: mAP {result['keypoints']['as-is']['mAP']:.1f}")
        pending = [job for job in pending if job not in ready]
    return _write_table(paper, out, {row.name: [done[(row.name, s)] for s in range(seeds)] for row in selected},
                        data)


def table_from_runs(paper: str, out: str | os.PathLike, *, rows: list[str] | None = None, data: str = "") -> str:
    """The table of the (row, seed) runs already finished under ``out`` (any number of seeds per row;
    rows with none are left out), written to ``out/<paper>/ablation.md``; trains nothing."""
    out = Path(out)
    results = {}
    for row in check_rows(paper, rows):
        found = sorted((json.loads(path.read_text()) for path in (out / paper / row.name).glob("seed*/result.json")),
                       key=lambda result: result["seed"])
        if found:
            results[row.name] = found
    if not results:
        raise ValueError(f"no finished {paper} ablation run under {out / paper}")
    return _write_table(paper, out, results, data)


def _write_table(paper: str, out: Path, results: dict[str, list[dict]], data: str) -> str:
    """:func:`ablation_table` of ``results`` (row name -> its seeds' results), written to
    ``out/<paper>/ablation.md`` and returned."""
    table = ablation_table(paper, results, data=data)
    (out / paper).mkdir(parents=True, exist_ok=True)
    (out / paper / "ablation.md").write_text(table + "\n")
    return table


def _row(paper: str, name: str) -> Row:
    return next(row for row in ABLATIONS[paper].rows if row.name == name)


# ----------------------------------------------------------------------------------------- the table

def _mean_sd(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _fmt(mean: float, sd: float) -> str:
    return f"{mean:.1f}" if math.isnan(sd) else f"{mean:.1f} ± {sd:.1f}"


def _direction(paper_delta: float | None, ours: list[float]) -> str:
    if paper_delta is None:
        return "-"
    mean, sd = _mean_sd(ours)
    if math.isnan(sd):  # one seed: no spread to judge the difference against
        if abs(paper_delta) < 0.5:
            return "1 seed: no effect" if abs(mean) <= 1.0 else "1 seed: an effect"
        return f"1 seed: {'same' if (mean > 0) == (paper_delta > 0) else 'opposite'} sign"
    spread = sd
    if abs(paper_delta) < 0.5:  # the paper reports no effect
        return "yes (no effect)" if abs(mean) <= max(spread, 1.0) else "no"
    if abs(mean) <= spread:
        return "unresolved"
    return "yes" if (mean > 0) == (paper_delta > 0) else "no"


def ablation_table(paper: str, results: dict[str, list[dict]], *, data: str = "") -> str:
    """The markdown table of ``results`` ({row name: [result.json of each seed]})."""
    ablation = ABLATIONS[paper]
    rows = [row for row in ablation.rows if row.name in results]
    seeds = max(len(v) for v in results.values())
    settings = [k for k in KEYPOINT_CORRUPTIONS   # the settings every run was evaluated with
                if k != "as-is" and all(k in r["keypoints"] for row in rows for r in results[row.name])]
    main = ablation.columns[ablation.main_column]
    splits = {r.get("split", "test") for row in rows for r in results[row.name]}  # results before "split": test
    head = (["row", *[f"paper {c}" for c in ablation.columns], "seeds", "ours mAP", "ours rank-1", "vs control (mAP)",
             f"paper vs control ({main})", "direction"] + [f"{s} (mAP change)" for s in settings])
    lines = [f"### {paper}: {ablation.table}", "",
             f"{ablation.citation}. Ours: {data or 'synthetic'} data ({' and '.join(sorted(splits))} split), cpu "
             f"preset, up to {seeds} seed(s), mean ± sample "
             "standard deviation over seeds; vs control: the mean of the per-seed differences over the seeds both rows "
             "ran; keypoint columns: mAP with corrupted test keypoints minus mAP as-is.", "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]

    def maps(name: str, setting: str = "as-is") -> list[float]:
        return [r["keypoints"][setting]["mAP"] for r in results[name]]

    for row in rows:
        own = maps(row.name)
        cells = [f"{row.name}: {row.label}"]
        cells += [f"{v:.1f}" for v in row.paper] if row.paper else ["-"] * len(ablation.columns)
        cells += [str(len(own)), _fmt(*_mean_sd(own)),
                  _fmt(*_mean_sd([r["keypoints"]["as-is"]["rank1"] for r in results[row.name]]))]
        if row.control and row.control in results:
            control = _row(paper, row.control)
            control_maps = {r["seed"]: r["keypoints"]["as-is"]["mAP"] for r in results[row.control]}
            deltas = [r["keypoints"]["as-is"]["mAP"] - control_maps[r["seed"]] for r in results[row.name]
                      if r["seed"] in control_maps]
            paper_delta = (row.paper[ablation.main_column] - control.paper[ablation.main_column]
                           if row.paper and control.paper else None)
            cells += [f"{_fmt(*_mean_sd(deltas))} (vs {row.control})",
                      "-" if paper_delta is None else f"{paper_delta:+.1f}", _direction(paper_delta, deltas)]
        else:
            cells += ["-", "-", "-"]
        cells += [_fmt(*_mean_sd([a - b for a, b in zip(maps(row.name, s), own)])) for s in settings]
        lines.append("| " + " | ".join(cells) + " |")
        for label in row.eval_variants:
            variant = [r["variants"][label]["mAP"] for r in results[row.name]]
            lines.append("| " + " | ".join([f"{row.name}, test embedding {label}"] + ["-"] * len(ablation.columns)
                                           + [str(len(variant)), _fmt(*_mean_sd(variant)), "-", "-", "-", "-"]
                                           + ["-"] * len(settings)) + " |")
    return "\n".join(lines)
