"""The ``keypointops`` command: a tiny train run (table, run folder), the ONNX export round trip,
and the one-line errors of bad input."""
import argparse
import json
import shutil
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import without_run_plots  # noqa: F401 (the fixture)
from keypointops.cli import main
from keypointops.data.synthetic import HARD

TINY = ["--workers", "0", "--threads", "1", "--epochs", "2", "--batch-size", "4", "--frames", "2", "--height", "64",
        "--width", "32", "--model-option", "width=0.125", "--data-option", "num_train_ids=6",
        "--data-option", "num_test_ids=5", "--data-option", "frames=6", "--data-option", "size=[64,32]"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny ``keypointops train`` run, given a relative --root: (run folder, its stdout)."""
    out = tmp_path_factory.mktemp("run")
    root = tmp_path_factory.mktemp("data") / "synthetic"
    capture = tmp_path_factory.mktemp("log") / "stdout.txt"
    with open(capture, "w") as f:
        saved, sys.stdout = sys.stdout, f
        try:
            code = main(["train", *TINY, "--root", os.path.relpath(root), "--out", str(out)])
        finally:
            sys.stdout = saved
    assert code == 0
    return out, capture.read_text()


def test_train_prints_table_and_writes_run_folder(run):
    out, stdout = run
    assert {"config.json", "metrics.jsonl", "model.pt", "cmc.png", "curves.png", "ranking.png"} <= {
        p.name for p in out.iterdir()}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert "mAP" in records[-1] and "mAP" not in records[0]  # evaluated once, at the end
    table = [line for line in stdout.splitlines() if line.startswith("|")]
    assert table[0].split("|")[2:-1] == [" rank-1 ", " rank-5 ", " rank-10 ", " rank-20 ", "   mAP ", "  mINP "]
    rows = {line.split("|")[1].strip(): [float(x) for x in line.split("|")[2:-1]] for line in table[2:]}
    assert set(rows) == {"kmpnet", "global colour histogram", "4-stripe colour histogram"}
    assert rows["kmpnet"][4] == pytest.approx(records[-1]["mAP"], abs=0.05)
    for values in rows.values():
        assert all(0 <= v <= 100 for v in values) and values[:4] == sorted(values[:4])


def test_run_folder_log_and_dataset_statistics(run):
    out, stdout = run
    log = (out / "log.txt").read_text()
    assert stdout.strip() and stdout.strip() in log.strip()   # everything printed, the dataset table first
    header = next(line for line in log.splitlines() if line.startswith("=> "))
    path, split = header.removeprefix("=> MARS from ").split(", query / gallery: ")
    assert path.endswith("synthetic") and split == "test"  # the data's path, and what is evaluated
    assert "  subset   | # ids | # tracklets | # images" in log
    train_row = next(line for line in log.splitlines() if line.startswith("  train "))
    assert train_row.split("|")[1].strip() == "6"   # --data-option num_train_ids=6
    assert log.index("# tracklets") < log.index("epoch 1/2")


def test_train_on_a_validation_split(tmp_path, capsys):
    """``--data-option validation_ids=N`` trains without N training identities and evaluates on
    them: the statistics, the summary line and results.json name the validation split."""
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--max-steps", "1", "--root", str(tmp_path / "data"),
                 "--data-option", "validation_ids=2", "--no-baselines", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "query / gallery: validation" in stdout and "(validation split)" in stdout
    train_row = next(line for line in stdout.splitlines() if line.startswith("  train "))
    assert train_row.split("|")[1].strip() == "4"   # 6 training identities, 2 held out
    assert json.loads((out / "results.json").read_text())["split"] == "validation"


def test_evaluate_checkpoint(run, capsys, tmp_path):
    out, stdout = run
    assert main(["evaluate", "--checkpoint", str(out / "model.pt"), "--workers", "0", "--threads", "1",
                 "--out", str(tmp_path / "eval")]) == 0
    printed = capsys.readouterr().out
    table = [line for line in printed.splitlines() if line.startswith("|")]
    trained = [line for line in stdout.splitlines() if line.startswith("|")]
    assert table == trained  # the same numbers as at the end of training
    assert "kmpnet after 2 epochs on synthetic" in printed
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["data"] == "synthetic" and set(results["results"]) == {
        "kmpnet", "global colour histogram", "4-stripe colour histogram"}
    assert {"cmc.png", "ranking.png"} <= {p.name for p in (tmp_path / "eval").iterdir()}


def test_epoch_counts_read_as_english():
    from keypointops.cli import _epochs

    assert (_epochs(1), _epochs(2)) == ("1 epoch", "2 epochs")


def test_help_describes_every_option(capsys):
    from keypointops import __version__
    from keypointops.cli import _parser

    parser = _parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, sub in subparsers.items():
        for action in sub._actions:
            assert action.help, (name, action.option_strings)
        assert "``" not in sub.format_help(), name
    assert "the model to train (default: kmpnet)" in " ".join(subparsers["train"].format_help().split())
    assert "``" not in parser.format_help() and "examples:" in parser.format_help()
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"keypointops {__version__}"


@pytest.mark.parametrize("fmt, suffix", [("onnx", ".onnx"), ("exported", ".pt2")])
def test_export_serves_any_batch(run, capsys, fmt, suffix):
    out, _ = run
    assert main(["export", "--checkpoint", str(out / "model.pt"), "--format", fmt]) == 0
    printed = capsys.readouterr().out
    assert (out / f"model{suffix}").is_file()
    # KMPNet's embedding reads no keypoint at inference (the graph branch is dropped): one input
    assert "inputs images [batch, frames, 3, 64, 32]; output embedding [batch, D]" in printed
    errors = dict(item.rsplit(" ", 1) for item in printed.split("traced one): ")[1].strip().split(", "))
    assert set(errors) == {"batch 1", "batch 5", "batch 2 of 3 frames"}
    assert all(float(e) <= 1e-4 for e in errors.values()), errors
    if fmt == "onnx":
        import onnx

        graph = onnx.load(str(out / "model.onnx")).graph
        assert {node.domain for node in graph.node} <= {"", "ai.onnx"}  # standard ops only
        assert [i.name for i in graph.input] == ["images"]
        assert not graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")  # dynamic batch


def test_embed_reproduces_evaluate(run, tmp_path, capsys):
    """`embed` writes one embedding per query and gallery tracklet; fed to evaluate, it gives the
    run's mAP."""
    import numpy as np

    from keypointops.evaluation import evaluate

    out, _ = run
    feats = tmp_path / "feats.npz"
    assert main(["embed", "--checkpoint", str(out / "model.pt"), "--out", str(feats), "--workers", "0",
                 "--threads", "1"]) == 0
    with np.load(feats) as f:
        arrays = {k: f[k] for k in f.files}
    assert len(arrays["query_paths"]) == len(arrays["query_pids"]) == len(arrays["query_features"])
    result = evaluate(*(torch_tensor(arrays[k]) for k in ("query_features", "gallery_features")),
                      arrays["query_pids"], arrays["gallery_pids"], arrays["query_camids"], arrays["gallery_camids"])
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert 100 * result["mAP"] == pytest.approx(record["mAP"], abs=1e-4)


def torch_tensor(array):
    import torch

    return torch.from_numpy(array)


def one_line_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.split("\r")[-1].strip()  # what stays on screen after a cleared progress bar
    assert len(err.splitlines()) == 1 and "Traceback" not in err and match in err, err


def test_missing_dataset_folder(capsys, tmp_path):
    one_line_error(capsys, ["train", "--data", "mars", "--root", str(tmp_path / "nowhere")], "mars")


def test_checkpoint_of_another_model(run, capsys):
    out, _ = run
    one_line_error(capsys, ["train", "--model", "pcb", "--resume", "--out", str(out)], "holds a 'kmpnet' model")
    one_line_error(capsys, ["export", "--checkpoint", str(out / "model.pt"), "--model", "ctl"], "not 'ctl'")


def test_init_from_a_checkpoint_of_an_unrelated_model(run, capsys, tmp_path):
    out, _ = run
    root = json.loads((out / "config.json").read_text())["root"]
    one_line_error(capsys, ["train", *TINY, "--root", root, "--out", str(tmp_path), "--model", "pcb",
                            "--init-from", str(out / "model.pt")],
                   "a 'pcb' model can only start from a 'pcb' checkpoint")


def test_resume_does_not_read_the_init_from_checkpoint_again(run, tmp_path, without_run_plots):
    """Stage B resumes from its own checkpoint: the stage-A file it started from may be gone."""
    out, _ = run
    root = json.loads((out / "config.json").read_text())["root"]
    stage_a = tmp_path / "stage_a.pt"
    shutil.copy(out / "model.pt", stage_a)
    stage_b = tmp_path / "stage_b"
    argv = ["train", *TINY, "--root", root, "--out", str(stage_b), "--model", "kmpnet", "--init-from", str(stage_a),
            "--no-baselines"]
    assert main([*argv[:argv.index("--epochs") + 1], "1", *argv[argv.index("--epochs") + 2:]]) == 0
    stage_a.unlink()
    assert main([*argv, "--resume"]) == 0
    epochs = [json.loads(line)["epoch"] for line in (stage_b / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


def test_corrupt_checkpoint(capsys, tmp_path):
    (tmp_path / "model.pt").write_bytes(b"PK\x03\x04 truncated")
    one_line_error(capsys, ["evaluate", "--checkpoint", str(tmp_path / "model.pt")], "corrupt")


def test_unknown_model_from_the_console():
    proc = subprocess.run([sys.executable, "-m", "keypointops", "train", "--model", "nope"], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2
    assert "invalid choice: 'nope'" in proc.stderr and "Traceback" not in proc.stderr


def test_dataset_choices_are_the_registry_and_there_is_no_bench_command(capsys):
    from keypointops.data import DATASET_NAMES

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", "nope"])
    assert exit_info.value.code == 2
    assert f"choose from {', '.join(map(repr, DATASET_NAMES))}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench"])  # the benchmarks are `pytest bench/` in the source checkout
    assert "invalid choice: 'bench'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, match", [
    (["--grad-clip", "-1"], "grad_clip must be > 0"),
    (["--grad-clip", "0"], "grad_clip must be > 0"),
    (["--epochs", "0"], "nothing to train"),
    (["--max-steps", "0"], "--max-steps) must be >= 1"),
    (["--max-steps", "-1"], "--max-steps) must be >= 1"),
    (["--threads", "-1"], "--threads must be >= 1"),
    (["--data-option", "foo=1"], "--data-option 'foo' is not an option of synthetic; its options are"),
])
def test_bad_settings_are_one_line_errors(capsys, tmp_path, argv, match):
    one_line_error(capsys, ["train", "--root", str(tmp_path / "data"), "--out", str(tmp_path / "run"), *argv], match)
    assert not (tmp_path / "data").exists()  # refused before any work


def test_unknown_model_option_lists_the_options(run, capsys, tmp_path):
    out, _ = run
    root = json.loads((out / "config.json").read_text())["root"]
    one_line_error(capsys, ["train", *TINY, "--root", root, "--out", str(tmp_path / "run"), "--model-option", "foo=1"],
                   "--model-option 'foo' is not an option of kmpnet; its options are")


def test_relative_root_is_stored_absolute(run, capsys, tmp_path, monkeypatch):
    out, _ = run
    assert os.path.isabs(json.loads((out / "config.json").read_text())["root"])
    monkeypatch.chdir(tmp_path)  # evaluate from another folder
    assert main(["evaluate", "--checkpoint", str(out / "model.pt"), "--workers", "0", "--threads", "1"]) == 0


def test_existing_run_folder_needs_resume_or_overwrite(run, capsys, tmp_path):
    out, _ = run
    root = json.loads((out / "config.json").read_text())["root"]
    one_line_error(capsys, ["train", *TINY, "--root", root, "--out", str(out)], "--overwrite")
    assert (out / "model.pt").is_file() and (out / "metrics.jsonl").is_file()  # untouched
    # --overwrite replaces the run: no file of the old one stays beside the new weights.
    (tmp_path / "model.onnx").write_bytes(b"an old export")
    (tmp_path / ".model.pt.x1y2.tmp").write_bytes(b"an interrupted checkpoint write")
    args = ["train", *TINY, "--epochs", "1", "--max-steps", "1", "--no-baselines", "--root", root, "--out", str(tmp_path)]
    assert main([*args, "--overwrite"]) == 0
    assert not (tmp_path / "model.onnx").exists() and not (tmp_path / ".model.pt.x1y2.tmp").exists()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_corrupt_metrics_on_resume_names_the_file(run, capsys, tmp_path):
    import shutil

    out, _ = run
    shutil.copytree(out, tmp_path / "run")
    (tmp_path / "run" / "metrics.jsonl").write_text('{"epoch": 1}\n{"epo')
    one_line_error(capsys, ["train", *TINY, "--root", json.loads((out / "config.json").read_text())["root"],
                            "--out", str(tmp_path / "run"), "--resume"], "metrics.jsonl: corrupt metrics file")


def test_diverging_training_names_the_step_and_suggests_a_lower_lr(run, capsys, tmp_path):
    out, _ = run
    root = json.loads((out / "config.json").read_text())["root"]
    one_line_error(capsys, ["train", *TINY, "--epochs", "1", "--lr", "1e12", "--no-baselines", "--root", root,
                            "--out", str(tmp_path)], "try a lower learning rate than lr=1e+12")


def test_data_error_in_a_loader_worker_is_one_line(run, capsys, tmp_path):
    import shutil

    out, _ = run
    root = tmp_path / "data"
    shutil.copytree(json.loads((out / "config.json").read_text())["root"], root)
    for image in (root / "bbox_test").rglob("*.jpg"):
        image.write_bytes(b"not an image")
    one_line_error(capsys, ["evaluate", "--checkpoint", str(out / "model.pt"), "--root", str(root), "--workers", "1",
                            "--threads", "1"], f"cannot decode image {root / 'bbox_test'}")


def test_synth_is_atomic_and_refuses_to_mix_datasets(capsys, tmp_path, monkeypatch):
    from keypointops.data import synthetic

    (tmp_path / "file").write_text("x")
    one_line_error(capsys, ["synth", "--out", str(tmp_path / "file")], "is a file")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "identity_0001").mkdir()
    one_line_error(capsys, ["synth", "--out", str(tmp_path / "old")], "--replace")

    def interrupted(root, **params):
        (Path(root) / "info").mkdir()
        raise KeyboardInterrupt
    monkeypatch.setattr(synthetic, "generate", interrupted)
    assert main(["synth", "--out", str(tmp_path / "new")]) == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "old"]  # nothing half-written

    def complete(root, **params):
        (Path(root) / "synthetic.json").write_text("{}")
        return {"counts": {}}
    monkeypatch.setattr(synthetic, "generate", complete)
    assert main(["synth", "--out", str(tmp_path / "old"), "--replace"]) == 0
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == ["synthetic.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "old"]


def test_synth_hard(tmp_path, capsys):
    out = tmp_path / "hard"
    assert main(["synth", "--hard", "--out", str(out), "--ids", "3", "--frames", "3", "--size", "32", "16"]) == 0
    assert "wrote the synthetic dataset" in capsys.readouterr().out
    params = json.loads((out / "synthetic.json").read_text())["params"]
    hard = {k: v for k, v in HARD.items() if k not in ("num_train_ids", "num_test_ids", "frames", "size")}
    assert params == {**hard, "num_train_ids": 3, "num_test_ids": 3, "frames": 3, "size": [32, 16],
                      "person_height": list(HARD["person_height"]), "feet": list(HARD["feet"])}
    wide = tmp_path / "wide"
    assert main(["synth", "--hard", "--out", str(wide), "--ids", "3", "--frames", "3", "--size", "32", "16",
                 "--body-spread", "2"]) == 0
    assert json.loads((wide / "synthetic.json").read_text())["params"] == {**params, "body_spread": 2.0}


def test_evaluate_keypoint_settings_one_row_each(run, capsys):
    out, stdout = run
    assert main(["evaluate", "--checkpoint", str(out / "model.pt"), "--workers", "0", "--threads", "1",
                 "--keypoints", "as-is,zeroed,shuffled"]) == 0
    rows = {line.split("|")[1].strip(): line for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and "method" not in line}
    assert {"kmpnet, keypoints as-is", "kmpnet, keypoints zeroed", "kmpnet, keypoints shuffled"} <= set(rows)
    # KMPNet's test embedding is its visual branch alone: keypoints cannot change it
    assert rows["kmpnet, keypoints zeroed"].split("|")[2:] == rows["kmpnet, keypoints as-is"].split("|")[2:]


def test_evaluate_another_embedding_of_the_same_weights(run, capsys):
    out, _ = run
    assert main(["evaluate", "--checkpoint", str(out / "model.pt"), "--workers", "0", "--threads", "1",
                 "--model-option", "embedding=x_g", "--keypoints", "as-is,shuffled"]) == 0
    rows = {line.split("|")[1].strip(): line for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and "method" not in line}
    # the graph branch's embedding reads the keypoints: shuffling them changes its figures
    assert {"kmpnet, embedding=x_g, keypoints as-is", "kmpnet, embedding=x_g, keypoints shuffled"} <= set(rows)
    assert (rows["kmpnet, embedding=x_g, keypoints shuffled"].split("|")[2:]
            != rows["kmpnet, embedding=x_g, keypoints as-is"].split("|")[2:])
    one_line_error(capsys, ["evaluate", "--checkpoint", str(out / "model.pt"), "--model-option", "embeding=x_g"],
                   "--model-option 'embeding' is not an option of kmpnet")


def test_keypoint_and_ablation_bad_input(run, capsys):
    out, _ = run
    one_line_error(capsys, ["evaluate", "--checkpoint", str(out / "model.pt"), "--keypoints", "as-is,mirrored"],
                   "unknown keypoint setting 'mirrored'; choose from as-is, zeroed, shuffled, swapped, shifted")
    one_line_error(capsys, ["ablate", "--paper", "ctl", "--seeds", "0", "--out", str(out / "abl")],
                   "seeds must be a positive integer")
    one_line_error(capsys, ["ablate", "--paper", "ctl", "--rows", "basel,tap", "--out", str(out / "abl")],
                   "ctl has no ablation row 'tap'; choose from basel, contre, contre+3d, full")
    with pytest.raises(SystemExit) as exit_info:
        main(["ablate", "--paper", "pcb"])
    assert exit_info.value.code == 2 and "invalid choice: 'pcb'" in capsys.readouterr().err
