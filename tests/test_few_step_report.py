"""The few-step report compares each solver setting with the recipe at the same task and t0."""

import json
import time

import pytest

from sdedit_jax.tools import few_step_report


def _row(task, t0, variant, nfe, kid, kid_std, l2):
    return {"task": task, "t0": t0, "variant": variant, "nfe": nfe, "kid": kid,
            "kid_std": kid_std, "l2": l2}  # fmt: skip


def _rows():
    return [
        _row("paint", 0.0, "guides", 0, 0.08, 0.005, 0.0),
        _row("paint", 0.35, "base", 350, 0.050, 0.010, 8.0),
        _row("paint", 0.65, "base", 650, 0.030, 0.004, 12.0),
        # Within the 0.35 recipe's KID std and L2 tolerance, but not the 0.65 recipe's.
        _row("paint", 0.35, "sde@20", 20, 0.058, 0.011, 8.3),
        _row("paint", 0.65, "sde@20", 20, 0.038, 0.005, 12.3),
        # L2 off by 6 % at 0.65; too many calls for 0.35 (50 * 10 > 350).
        _row("paint", 0.65, "sde@50", 50, 0.031, 0.004, 11.28),
        _row("paint", 0.35, "sde@50", 50, 0.050, 0.010, 8.0),
    ]


def test_each_setting_is_judged_against_the_recipe_at_its_own_t0():
    verdicts = {(v["t0"], v["variant"]): v for v in few_step_report.target_rows(_rows())}
    assert set(verdicts) == {(0.35, "sde@20"), (0.65, "sde@20"), (0.65, "sde@50"), (0.35, "sde@50")}
    assert verdicts[0.35, "sde@20"]["target_holds"]
    assert verdicts[0.35, "sde@20"]["kid_minus_recipe_x1e3"] == pytest.approx(8.0)
    assert verdicts[0.35, "sde@20"]["recipe_nfe"] == 350
    assert not verdicts[0.65, "sde@20"]["target_holds"]  # KID gap 8 > the 0.65 recipe's std 4
    assert not verdicts[0.65, "sde@50"]["target_holds"]  # L2 ratio 0.94
    assert verdicts[0.65, "sde@50"]["l2_over_recipe"] == pytest.approx(0.94)
    assert not verdicts[0.35, "sde@50"]["target_holds"]  # more than a tenth of 350 calls
    assert verdicts[0.35, "sde@50"]["quality_holds"]
    assert not verdicts[0.65, "sde@50"]["quality_holds"]


def test_report_writes_verdicts_plot_and_a_column_per_task_and_t0(tmp_path, capsys):
    source = tmp_path / "run"
    source.mkdir()
    (source / "results.json").write_text(json.dumps({"rows": _rows()}))
    (source / "results.csv").write_text("task\n")
    few_step_report.main(str(source), str(tmp_path / "report"))
    written = {p.name for p in (tmp_path / "report").iterdir()}
    assert written == {"results.json", "results.csv", "target.csv", "quality_vs_nfe.png"}
    lines = (tmp_path / "report" / "target.csv").read_text().splitlines()
    assert len(lines) == 5 and lines[0].startswith("task,t0,variant")
    table = capsys.readouterr().out
    assert "| setting | paint t0=0.35 | paint t0=0.65 |" in table
    assert "| sde@20 | +8.0 / 1.038 **holds** | +8.0 / 1.025 no |" in table
    figure = few_step_report.plot(_rows())
    assert len(figure.axes) == 4  # (KID, L2) x (t0 = 0.35, 0.65) for the one task


def test_a_running_sweep_is_reported_from_its_partial_csv(tmp_path):
    rows = _rows()
    fields = list(rows[0])
    lines = [",".join(fields)] + [",".join(str(r[k]) for k in fields) for r in rows]
    (tmp_path / "results.json").write_text(json.dumps({"rows": rows[:2]}))  # an earlier run's
    (tmp_path / "results.csv").write_text("task\n")
    time.sleep(0.01)
    (tmp_path / "results.partial.csv").write_text("\n".join(lines) + "\n")
    loaded, files = few_step_report.load_rows(str(tmp_path))
    assert files == ["results.partial.csv"]
    assert loaded == rows and isinstance(loaded[1]["nfe"], int)
