"""The CLI end to end with a fake `engine` module (no model needed)."""

from __future__ import annotations

import json
import sys
import types

import pandas as pd
import pytest
from wt_fakes import FakeLLM

from wrangling_tasks.__main__ import main


@pytest.fixture
def fake_engine(monkeypatch):
    loaded, llms, options = [], [], []

    class LLM:
        @staticmethod
        def from_pretrained(name, **kwargs):
            loaded.append(name)
            options.append(kwargs)
            llm = FakeLLM()
            llms.append(llm)
            return llm

    monkeypatch.setitem(sys.modules, "engine", types.SimpleNamespace(LLM=LLM))
    return types.SimpleNamespace(names=loaded, llms=llms, options=options)


def test_cli_prints_metrics_and_rows_per_s(fake_engine, capsys):
    code = main(["--task", "entity-matching", "--dataset", "Beer", "--split", "test", "--k", "3",
                 "--model", "smollm2-135m", "--limit", "10", "--no-progress", "--chat"])
    out = capsys.readouterr().out
    assert code == 0 and fake_engine.names == ["smollm2-135m"]
    assert fake_engine.options[0]["policy"] is None                     # the engine's default: float32 products
    assert all(c["chat"] is True for c in fake_engine.llms[0].calls)
    assert "F1 " in out and "rows/s" in out and "items=10" in out and "demos used: 3" in out


def test_cli_json_and_output_file(fake_engine, capsys, tmp_path):
    out_csv = tmp_path / "preds.csv"
    code = main(["--task", "imputation", "--dataset", "Buy", "--limit", "7", "--batch-size", "3", "--json",
                 "--no-progress", "--output", str(out_csv)])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and summary["items"] == 7 and "accuracy" in summary["metrics"]
    assert len(pd.read_csv(out_csv)) == 7


def test_cli_int8_asks_the_engine_for_int8_products(fake_engine, capsys):
    code = main(["--task", "entity-matching", "--dataset", "Beer", "--limit", "4", "--no-progress", "--int8"])
    assert code == 0 and fake_engine.options[0]["policy"] == {"int8_matmul": True}


def test_cli_reports_bad_dataset_without_traceback(fake_engine, capsys):
    assert main(["--task", "ed", "--dataset", "Nope"]) == 2
    assert "unknown error-detection dataset" in capsys.readouterr().err


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--data-dir" in out and "Hospital" in out
