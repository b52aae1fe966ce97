"""Metric tests, in the manner of the Recommenders notebook tests: the tiny-profile metrics each notebook records
in ``results/tables`` (FID, CLIP score, attribute accuracies, precision/recall, direction-change ratios, exact
parameter counts) are held to stored values with ``pytest.approx`` tolerances, so a drift that still passes a
claim's threshold is caught.

The unit-test stage checks the committed tables; ``make test-nbval`` runs this module again on the tables that the
re-executed notebooks have just written (``WADI_METRICS_RESULTS_DIR``). After an intended change, re-execute the
notebooks and update the values below from the new tables.
"""

import os
from pathlib import Path

import pandas as pd
import pytest

from wadi_core.artifacts import REPO_ROOT

TABLES = Path(os.environ.get("WADI_METRICS_RESULTS_DIR", REPO_ROOT / "results")) / "tables"
EXACT = ("trainable (exact)",)  # integers: equal, not approximately equal
RELATIVE = ("FID", "%", "ratio", "_mean")  # scale-free metrics: 2 % relative; the others (accuracies, cosines) ±0.01

EXPECTED: dict[str, dict[str, dict[str, float]]] = {
    "00_teacher_coco14_like": {
        "teacher, DDIM-25, CFG 2.0": {
            "FID": 17.8789,
            "CLIP score (cosine)": 0.884807,
            "acc. objects": 0.986328,
            "acc. all": 0.962891,
        },
        "teacher one-step (t=999) = student at init": {
            "FID": 335.972,
            "CLIP score (cosine)": 0.709382,
            "acc. objects": 0.277344,
            "acc. all": 0.253906,
        },
        "real coco17-like images": {
            "FID": 17.4435,
            "CLIP score (cosine)": 0.8975,
            "acc. objects": 1,
            "acc. all": 0.998047,
        },
    },
    "00_teacher_guidance_sweep": {
        "1.0": {"objects": 0.90625, "all": 0.859375},
        "1.5": {"objects": 0.984375, "all": 0.96875},
        "2.0": {"objects": 1, "all": 0.984375},
        "3.0": {"objects": 1, "all": 0.984375},
        "4.5": {"objects": 1, "all": 0.984375},
    },
    "01_direction_metrics_ft": {
        "1 − cos": {"norm_mean": 0.00167598, "direction_mean": 0.000192003, "ratio_mean": 0.114562},
        "angle (rad)": {"norm_mean": 0.00167598, "direction_mean": 0.015967, "ratio_mean": 9.52696},
    },
    "01_fig1c_swaps": {
        "norm from teacher": {"FID": 227.45, "CLIP score (cosine)": 0.584993, "acc. objects": 0.849609},
        "direction from teacher": {"FID": 311.79, "CLIP score (cosine)": 0.714736, "acc. objects": 0.279297},
        "vanilla one-step": {"FID": 220.893, "CLIP score (cosine)": 0.587842, "acc. objects": 0.865234},
    },
    "01_direction_change_by_student": {
        "LoRaD (WaDi)": {"norm mean %": 3.07597e-07, "direction mean %": 1.00903},
        "Full FT (SwiftBrush)": {"norm mean %": 0.167598, "direction mean %": 0.0192003},
        "LoRA": {"norm mean %": 3.09045, "direction mean %": 2.38432},
        "DoRA": {"norm mean %": 2.61094, "direction mean %": 2.15425},
        "DoRA (frozen norm)": {"norm mean %": 2.37497e-06, "direction mean %": 3.12134},
    },
    "02_trainable_parameters": {
        "Table 1: WaDi on SD1.5": {"trainable (exact)": 83795968},
        "Table 1: WaDi on SD2.1": {"trainable (exact)": 94429184},
        "Table 1: WaDi on PixArt-α (student rule)": {"trainable (exact)": 82563072},
        "PixArt-α without the 3 adaln_single Linears": {"trainable (exact)": 81219584},
        "Rank ablation A: r=64": {"trainable (exact)": 20948992},
        "Rank ablation B: r=128": {"trainable (exact)": 41897984},
        "Rank ablation C: r=256": {"trainable (exact)": 83795968},
        "Rank ablation D: r=512": {"trainable (exact)": 167591936},
        "Fake score on SD1.5 (code: r=32)": {"trainable (exact)": 9378816},
        "LoRA at the same rank on SD1.5 (r=256)": {"trainable (exact)": 108118016},
    },
    "03_students_coco14_like": {
        "teacher DDIM-25, CFG 2.0": {
            "FID": 17.7083,
            "CLIP score (cosine)": 0.88484,
            "acc. objects": 0.986328,
            "acc. all": 0.970703,
        },
        "teacher one-step (student at init)": {
            "FID": 341.379,
            "CLIP score (cosine)": 0.704761,
            "acc. objects": 0.236328,
            "acc. all": 0.216797,
        },
        "LoRaD (WaDi)": {
            "FID": 59.6982,
            "CLIP score (cosine)": 0.791087,
            "acc. objects": 0.908203,
            "acc. all": 0.894531,
        },
        "Full FT (SwiftBrush)": {
            "FID": 220.893,
            "CLIP score (cosine)": 0.587842,
            "acc. objects": 0.865234,
            "acc. all": 0.84375,
        },
        "LoRA": {"FID": 76.2495, "CLIP score (cosine)": 0.765774, "acc. objects": 0.941406, "acc. all": 0.892578},
        "DoRA": {"FID": 78.4217, "CLIP score (cosine)": 0.760892, "acc. objects": 0.947266, "acc. all": 0.917969},
        "DoRA (frozen norm)": {
            "FID": 140.187,
            "CLIP score (cosine)": 0.630071,
            "acc. objects": 0.917969,
            "acc. all": 0.890625,
        },
    },
    "03_rank_ablation": {
        "5": {"FID": 89.6505, "precision": 0.109375, "recall": 0.738281, "acc. objects": 0.796875},
        "10": {"FID": 73.6327, "precision": 0.203125, "recall": 0.77002, "acc. objects": 0.882812},
        "19": {"FID": 59.6982, "precision": 0.318359, "recall": 0.822266, "acc. objects": 0.908203},
        "38": {"FID": 98.3619, "precision": 0.205078, "recall": 0.649902, "acc. objects": 0.857422},
    },
    "03_deviation_study": {
        "tiny recipe": {"FID": 108.745, "acc. objects": 0.701172},
        "official loop (no warm-up, 1:1)": {"FID": 123.398, "acc. objects": 0.611328},
        "+ DMD gradient normalisation": {"FID": 144.004, "acc. objects": 0.582031},
        "+ student EMA 0.99": {"FID": 134.455, "acc. objects": 0.583984},
    },
    "04_table1_coco14_like": {
        "teacher (DDIM-25, CFG 3.0)": {
            "FID": 18.3101,
            "CLIP score (cosine)": 0.886818,
            "precision": 0.947266,
            "recall": 0.958984,
            "acc. objects": 0.988281,
        },
        "Full FT (SwiftBrush)": {
            "FID": 221.403,
            "CLIP score (cosine)": 0.584304,
            "precision": 0.078125,
            "recall": 0.222168,
            "acc. objects": 0.892578,
        },
        "LoRA": {
            "FID": 75.6073,
            "CLIP score (cosine)": 0.769695,
            "precision": 0.330078,
            "recall": 0.661133,
            "acc. objects": 0.949219,
        },
        "DoRA": {
            "FID": 77.6474,
            "CLIP score (cosine)": 0.753894,
            "precision": 0.328125,
            "recall": 0.66748,
            "acc. objects": 0.941406,
        },
        "DoRA (frozen norm)": {
            "FID": 140.261,
            "CLIP score (cosine)": 0.632031,
            "precision": 0.154297,
            "recall": 0.395508,
            "acc. objects": 0.908203,
        },
        "LoRaD (WaDi)": {
            "FID": 59.8243,
            "CLIP score (cosine)": 0.797603,
            "precision": 0.335938,
            "recall": 0.807129,
            "acc. objects": 0.925781,
        },
    },
    "04_table1_coco17_like": {
        "teacher (DDIM-25, CFG 3.0)": {
            "FID": 16.634,
            "CLIP score (cosine)": 0.884649,
            "precision": 0.980469,
            "recall": 0.939453,
            "acc. objects": 0.998047,
        },
        "Full FT (SwiftBrush)": {
            "FID": 225.678,
            "CLIP score (cosine)": 0.598976,
            "precision": 0.242188,
            "recall": 0.178711,
            "acc. objects": 0.871094,
        },
        "LoRA": {
            "FID": 74.8465,
            "CLIP score (cosine)": 0.775076,
            "precision": 0.455078,
            "recall": 0.59668,
            "acc. objects": 0.9375,
        },
        "DoRA": {
            "FID": 76.7945,
            "CLIP score (cosine)": 0.766275,
            "precision": 0.466797,
            "recall": 0.664062,
            "acc. objects": 0.935547,
        },
        "DoRA (frozen norm)": {
            "FID": 141.334,
            "CLIP score (cosine)": 0.6395,
            "precision": 0.326172,
            "recall": 0.391602,
            "acc. objects": 0.898438,
        },
        "LoRaD (WaDi)": {
            "FID": 64.6393,
            "CLIP score (cosine)": 0.803116,
            "precision": 0.474609,
            "recall": 0.717773,
            "acc. objects": 0.896484,
        },
    },
}


def tolerance(column: str, expected: float):
    if column in EXACT:
        return expected
    if any(key in column for key in RELATIVE):
        return pytest.approx(expected, rel=0.02, abs=1e-6)
    return pytest.approx(expected, abs=0.01)


@pytest.mark.parametrize("table", sorted(EXPECTED))
def test_notebook_metrics_match_the_stored_values(table):
    path = TABLES / f"{table}.csv"
    assert path.exists(), f"{path} is missing: the notebook that writes it did not run or renamed it"
    measured = pd.read_csv(path, index_col=0)
    measured.index = measured.index.map(str)
    assert sorted(measured.index) == sorted(EXPECTED[table]), f"{table}: rows changed"
    drifted = {
        (row, column): (measured.loc[row, column], expected)
        for row, values in EXPECTED[table].items()
        for column, expected in values.items()
        if measured.loc[row, column] != tolerance(column, expected)
    }
    assert not drifted, f"{table}: (row, column): (measured, stored) drifted beyond tolerance: {drifted}"
