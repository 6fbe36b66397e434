"""The plan: which stages a config asks for, what each depends on, computed without touching anything."""

from __future__ import annotations

from qlora_requant.pipeline.config import load_config
from qlora_requant.pipeline.plan import STAGE_KINDS, plan

from support import base_section, write_config


def stage_table(config) -> list[tuple]:
    """What identifies each planned stage (everything but the work function)."""
    return [(s.name, s.kind, s.output, s.settings, s.inputs) for s in plan(config)]


def test_the_default_plan_merges_requantizes_and_scores_each_model(tmp_path, tiny_base, tiny_adapter, text_files):
    config = load_config(write_config(tmp_path / "run.yaml", tiny_base, tiny_adapter, text_files, tmp_path / "run"))
    stages = plan(config)
    run = tmp_path / "run"
    assert [(s.name, s.kind, s.output) for s in stages] == [
        ("merge", "merge", run / "merged"),
        ("requantize", "requantize", run / "gptq"),
        ("reference", "reference", run / "evaluation" / "reference"),
        ("score_merged", "score", run / "evaluation" / "merged"),
        ("score_gptq", "score", run / "evaluation" / "gptq"),
    ]
    merge, requantize, reference, score_merged, score_gptq = stages
    assert merge.inputs == (tiny_base, tiny_adapter)
    assert requantize.inputs == (run / "merged", text_files["calibration"])
    # the reference reads none of the run's checkpoints: a new variant or a re-run merge leaves it standing
    assert reference.inputs == (tiny_base, tiny_adapter, text_files["eval"])
    assert score_merged.inputs == (run / "evaluation" / "reference", run / "merged")
    assert score_gptq.inputs == (run / "evaluation" / "reference", run / "gptq")
    assert score_gptq.settings["model"] == "gptq" and "models" not in score_gptq.settings["evaluation"]
    assert set(merge.settings) == {"base", "adapter", "dtype", "merge_base", "max_shard_size"}
    assert merge.settings["merge_base"] == "nf4" and merge.settings["dtype"] == "float16"
    assert requantize.settings["gptq"]["bits"] == 4 and requantize.settings["variant"] == ""
    assert {stage.kind for stage in stages} <= set(STAGE_KINDS)


def test_plan_is_pure(tmp_path, tiny_base, tiny_adapter, text_files):
    config = load_config(write_config(tmp_path / "run.yaml", tiny_base, tiny_adapter, text_files, tmp_path / "run"))
    assert stage_table(config) == stage_table(config)
    assert not (tmp_path / "run").exists()


def test_keys_no_output_depends_on_are_not_settings(tmp_path, tiny_base, tiny_adapter, text_files):
    path = write_config(tmp_path / "run.yaml", tiny_base, tiny_adapter, text_files, tmp_path / "run")
    plain = stage_table(load_config(path))
    changed = stage_table(
        load_config(
            path,
            [
                "base.model_id=org/name",
                "adapter.model_id=org/adapter",
                "evaluation.seed=7",
                "evaluation.bootstrap_samples=500",
                "evaluation.overlap=warn",
            ],
        )
    )
    assert changed == plain
    rescored = stage_table(load_config(path, ["evaluation.max_windows=3"]))
    assert [a == b for a, b in zip(rescored, plain)] == [True, True, False, False, False]
    # which models are scored chooses the scoring stages, and changes none of them
    narrowed = stage_table(load_config(path, ["evaluation.models=[gptq]"]))
    assert narrowed == [row for row in plain if row[0] != "score_merged"]


def test_saving_the_dequantized_base_and_both_merge_bases(tmp_path, tiny_base, tiny_adapter, text_files):
    path = write_config(
        tmp_path / "run.yaml",
        tiny_base,
        tiny_adapter,
        text_files,
        tmp_path / "run",
        base=base_section(tiny_base, save_dequantized=True),
        merge={"merge_base": "original", "compare_merge_bases": True},
    )
    stages = plan(load_config(path))
    assert [s.name for s in stages] == [
        "dequantize",
        "merge",
        "requantize",
        "merge_nf4",
        "requantize_nf4",
        "reference",
        "score_merged",
        "score_gptq",
        "score_merged_nf4",
        "score_gptq_nf4",
    ]
    assert [s.settings.get("merge_base") for s in stages[1:4:2]] == ["original", "nf4"]
    assert stages[4].inputs[0] == tmp_path / "run" / "merged_nf4"


def test_each_gptq_variant_is_its_own_stage(tmp_path, tiny_base, tiny_adapter, text_files):
    path = write_config(tmp_path / "run.yaml", tiny_base, tiny_adapter, text_files, tmp_path / "run")
    variants = "requantize.variants=[{name: w4g128}, {name: w3, bits: 3}, {name: w4pc, group_size: -1, gptaq: true}]"
    stages = plan(load_config(path, [variants]))
    run = tmp_path / "run"
    assert [(s.name, s.output) for s in stages] == [
        ("merge", run / "merged"),
        ("requantize_w4g128", run / "gptq_w4g128"),
        ("requantize_w3", run / "gptq_w3"),
        ("requantize_w4pc", run / "gptq_w4pc"),
        ("reference", run / "evaluation" / "reference"),
        ("score_merged", run / "evaluation" / "merged"),
        ("score_gptq_w4g128", run / "evaluation" / "gptq_w4g128"),
        ("score_gptq_w3", run / "evaluation" / "gptq_w3"),
        ("score_gptq_w4pc", run / "evaluation" / "gptq_w4pc"),
    ]
    settings = [stage.settings["gptq"] for stage in stages[1:4]]
    assert [(s["bits"], s["group_size"], s["gptaq"]) for s in settings] == [
        (4, 64, False),
        (3, 64, False),
        (4, -1, True),
    ]
    # a change to one variant changes that variant's settings only (its scoring re-runs on its new output)
    changed = plan(load_config(path, [variants.replace("bits: 3", "bits: 2")]))
    assert [a.settings == b.settings for a, b in zip(stages, changed)] == [True, True, False, True, *[True] * 5]
