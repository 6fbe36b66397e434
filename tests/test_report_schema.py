"""report.json and its schema: report.schema.json is the one the code generates, and a real run's report
matches it and the typed Report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pydantic
import pytest

from qlora_requant.eval.schema import Report, report_json_schema
from qlora_requant.pipeline.cli import EXIT_OK, main

from support import REPORT_SCHEMA, validate_report, write_config

DELETE = object()
BREAKAGES = [  # (path in report.json, new value or DELETE)
    (("models", "gptq", "ppl"), DELETE),
    (("gate", "passed"), "yes"),
    (("models", "merged", "perplexity"), 1.0),  # a key the schema does not know
    (("models", "gptq", "delta_pct_ci95"), [0.1, 0.2, 0.3]),
    (("stages", "merge", "seconds"), DELETE),
    (("schema_version",), 2),
    (("variants", 0, "serves_on"), ["vLLM"]),
]


@pytest.fixture(scope="module")
def report_json(tmp_path_factory, tiny_base, tiny_adapter, text_files) -> Path:
    folder = tmp_path_factory.mktemp("schema")
    config = write_config(folder / "run.yaml", tiny_base, tiny_adapter, text_files, folder / "run")
    assert main(["run", str(config)]) == EXIT_OK
    return folder / "run" / "report.json"


def test_committed_schema_is_the_one_the_code_generates():
    stale = "report.schema.json is stale: python -m qlora_requant.eval.schema > report.schema.json"
    assert json.dumps(report_json_schema(), indent=2) + "\n" == REPORT_SCHEMA.read_text(), stale
    assert report_json_schema()["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert report_json_schema()["$id"].startswith("urn:qlora-requant:report-schema:")
    printed = subprocess.run(
        [sys.executable, "-m", "qlora_requant.eval.schema"], capture_output=True, text=True, check=True
    ).stdout
    assert printed == REPORT_SCHEMA.read_text()


def test_a_runs_report_matches_the_schema_and_the_typed_report(report_json):
    validate_report(report_json)
    text = report_json.read_text()
    assert Report.model_validate_json(text).to_json() == text  # the typed report writes back the same file


@pytest.mark.parametrize(("path", "value"), BREAKAGES, ids=[".".join(map(str, path)) for path, _ in BREAKAGES])
def test_a_broken_report_fails_validation(report_json, tmp_path, path, value):
    report = json.loads(report_json.read_text())
    parent = report
    for key in path[:-1]:
        parent = parent[key]
    if value is DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    broken = tmp_path / "report.json"
    broken.write_text(json.dumps(report))
    with pytest.raises(jsonschema.ValidationError) as error:
        validate_report(broken)
    assert tuple(error.value.absolute_path) in (path, path[:-1])  # it fails where the copy was broken


def test_the_typed_report_needs_comparisons_on_every_row_but_the_baseline(report_json):
    report = json.loads(report_json.read_text())
    assert "kl" not in report["models"]["baseline"]
    del report["models"]["gptq"]["kl"]  # JSON Schema allows it (kl is optional); the typed Report does not
    with pytest.raises(pydantic.ValidationError, match="models.gptq: delta_pct_ci95, kl and top1_agreement"):
        Report.model_validate(report)
