"""keypointops.ablation: row selection, the table (mean +- spread, directions), a tiny end-to-end run
with resume, and bad input."""
import dataclasses
import json

import pytest

from keypointops.ablation import ABLATIONS, ablation_table, check_rows, run_ablation, table_from_runs


def _result(row: str, seed: int, maps: dict, variants: dict | None = None) -> dict:
    return {"row": row, "seed": seed, "keypoints": {k: {"mAP": v, "rank1": v + 1.0} for k, v in maps.items()},
            "variants": {k: {"mAP": v, "rank1": v} for k, v in (variants or {}).items()}}


def test_rows_with_their_starting_rows_and_bad_names():
    assert [r.name for r in check_rows("kmpnet", ["both"])] == ["pcb", "both"]
    assert len(check_rows("ctl")) == len(ABLATIONS["ctl"].rows)
    with pytest.raises(ValueError, match="choose from kmpnet, alignnet, ctl, rgcn"):
        check_rows("pcb")
    with pytest.raises(ValueError, match="no ablation row 'tap'; choose from baseline, parts, full"):
        check_rows("alignnet", ["tap"])


@pytest.mark.parametrize("paper", list(ABLATIONS))
def test_every_row_has_its_controls_budget_and_starting_point(paper):
    """A method and its control train with the same settings from the same weights; the only row
    that may differ is one whose control is the row it starts from (KMPNet's "+ fine-tune", which
    measures the extra training itself)."""
    rows = {row.name: row for row in ABLATIONS[paper].rows}
    for row in rows.values():
        if row.control is None or row.control == row.init_from:
            continue
        control = rows[row.control]
        assert row.train == control.train, (row.name, control.name)
        assert row.init_from == control.init_from, (row.name, control.name)


def test_table_mean_spread_and_direction():
    results = {
        "baseline": [_result("baseline", s, {"as-is": 40.0 + s, "shuffled": 40.0 + s}) for s in range(3)],
        "parts": [_result("parts", s, {"as-is": 50.0 + s, "shuffled": 42.0 + s}) for s in range(3)],
        "full": [_result("full", s, {"as-is": 50.0 + 2 * s, "shuffled": 41.0}) for s in range(3)],
    }
    table = ablation_table("alignnet", results, data="synthetic-hard")
    lines = {line.split(" | ")[0].lstrip("| ").split(":")[0]: line for line in table.splitlines()
             if line.startswith("| ") and ":" in line.split(" | ")[0]}
    assert "| 3 | 41.0 ± 1.0 |" in lines["baseline"]                  # mean +- sample sd over 3 seeds
    assert "10.0 ± 0.0 (vs baseline) | +2.9 | yes |" in lines["parts"]  # paper MARS R1 82.6 - 79.7
    assert "| -8.0 ± 0.0 |" in lines["parts"]                          # shuffled keypoints cost 8 mAP
    assert "(vs parts) | +0.6 | unresolved |" in lines["full"]         # 1.0 +- 1.0: within the spread


def test_rows_with_fewer_seeds_compare_on_the_seeds_both_ran():
    results = {"baseline": [_result("baseline", s, {"as-is": 40.0 + 5 * s}) for s in range(3)],
               "parts": [_result("parts", 1, {"as-is": 47.0, "shuffled": 40.0})]}
    lines = ablation_table("alignnet", results).splitlines()
    parts = next(line for line in lines if line.startswith("| parts:"))
    assert "| 1 | 47.0 | 48.0 | 2.0 (vs baseline) | +2.9 | 1 seed: same sign |" in parts  # seed 1 vs seed 1 (45.0)
    assert "shuffled" not in lines[4]                    # a setting only some runs were evaluated with


def test_validation_split_is_named_in_the_table(tmp_path):
    """With ``validation_ids`` every row trains without those identities and is evaluated on them;
    result.json and the table say so."""
    table = run_ablation("alignnet", tmp_path / "out", seeds=1, data="synthetic", rows=["baseline"],
                         keypoints=("as-is",), max_steps=1,
                         train_overrides=dict(epochs=1, frames=2, batch_size=4, height=64, width=32, instances=2),
                         model_overrides=dict(width=0.125), root=str(tmp_path / "data"), log=lambda line: None,
                         data_options=dict(num_train_ids=6, num_test_ids=3, frames=4, size=[64, 32], validation_ids=2))
    result = json.loads((tmp_path / "out" / "alignnet" / "baseline" / "seed0" / "result.json").read_text())
    assert result["split"] == "validation" and "Ours: synthetic data (validation split)" in table


def test_tiny_run_resumes_and_writes_table(tmp_path, monkeypatch):
    options = dict(seeds=1, data="synthetic", rows=["baseline", "parts"], keypoints=("as-is", "shuffled"),
                   max_steps=1, train_overrides=dict(epochs=1, frames=2, batch_size=4, height=64, width=32,
                                                     instances=2),
                   model_overrides=dict(width=0.125),
                   data_options=dict(num_train_ids=4, num_test_ids=3, frames=4, size=[64, 32]),
                   root=str(tmp_path / "data"),
                   log=lambda line: None)
    table = run_ablation("alignnet", tmp_path / "out", **options)
    assert (tmp_path / "out" / "alignnet" / "ablation.md").read_text().strip() == table.strip()
    assert "Ours: synthetic data (test split)" in table
    result_path = tmp_path / "out" / "alignnet" / "parts" / "seed0" / "result.json"
    result = json.loads(result_path.read_text())
    assert set(result["keypoints"]) == {"as-is", "shuffled"}
    result["keypoints"]["as-is"]["mAP"] = 123.0  # a finished run is read back, never trained again
    result_path.write_text(json.dumps(result))
    assert "| 123.0 |" in run_ablation("alignnet", tmp_path / "out", **options)
    assert "| 123.0 |" in table_from_runs("alignnet", tmp_path / "out")     # trains nothing
    # An evaluation variant added to a finished row is evaluated from the run's checkpoint, not retrained.
    checkpoint = tmp_path / "out" / "alignnet" / "parts" / "seed0" / "model.pt"
    trained_at = checkpoint.stat().st_mtime_ns
    ablation = ABLATIONS["alignnet"]
    rows = tuple(dataclasses.replace(row, eval_variants={"the same weights": {}}) if row.name == "parts" else row
                 for row in ablation.rows)
    monkeypatch.setitem(ABLATIONS, "alignnet", dataclasses.replace(ablation, rows=rows))
    table = run_ablation("alignnet", tmp_path / "out", **options)
    result = json.loads(result_path.read_text())
    assert result["keypoints"]["as-is"]["mAP"] == 123.0 and checkpoint.stat().st_mtime_ns == trained_at
    assert 0.0 <= result["variants"]["the same weights"]["mAP"] <= 100.0
    assert "| parts, test embedding the same weights |" in table
    with pytest.raises(ValueError, match="no finished ctl ablation run"):
        table_from_runs("ctl", tmp_path / "out")


def test_bad_arguments():
    with pytest.raises(ValueError, match="seeds must be a positive integer"):
        run_ablation("ctl", "/nonexistent", seeds=0)
    with pytest.raises(ValueError, match="unknown keypoint setting 'mirror'"):
        run_ablation("ctl", "/nonexistent", keypoints=("mirror",))


def test_table_only_without_runs_is_a_one_line_error(tmp_path, capsys):
    from keypointops.cli import main

    assert main(["ablate", "--paper", "ctl", "--table-only", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no finished ctl ablation run" in err
