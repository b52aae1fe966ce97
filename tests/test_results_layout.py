"""results/ holds only what the notebooks and the benchmarks write, each file named after its producer."""

import re

from wadi_core.artifacts import REPO_ROOT

RESULTS = REPO_ROOT / "results"
NAME = re.compile(r"^(\d\d|benchmarks)_[a-z0-9_.-]+\.(csv|md|tex|png|pdf)$")  # NN_name (notebook NN) or benchmarks_*


def test_every_table_and_figure_is_named_after_its_notebook_or_benchmark():
    files = [path for kind in ("tables", "figures") for path in sorted((RESULTS / kind).iterdir())]
    assert files, "results/tables and results/figures are empty"
    misnamed = [str(path.relative_to(RESULTS)) for path in files if not NAME.match(path.name)]
    assert not misnamed, f"name these NN_name (the notebook's number) or benchmarks_name: {misnamed}"


def test_every_notebook_saves_its_claims_table():
    notebooks = sorted(path.name[:2] for path in (REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    missing = [nn for nn in notebooks if not (RESULTS / "tables" / f"{nn}_claims.csv").exists()]
    assert not missing, f"notebooks without results/tables/NN_claims.csv: {missing}"
