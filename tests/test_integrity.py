"""A user's files are never lost, a report never comes from bytes that changed, and bad input is exit 2
before any compute, leaving a finished run as it was."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qlora_requant.pipeline.cli import EXIT_BAD_INPUT, EXIT_OK, main
from qlora_requant.pipeline.isolated import run_isolated
from qlora_requant.quant.errors import InputError

from support import assert_gone, copy_run, descendants, failing_work, save_model, tiny_llama, write_config


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def started(run_dir: Path, before: str) -> list[str]:
    """Stages the last run started, from run.log."""
    new = (run_dir / "run.log").read_text()[len(before) :]
    return [line.split("stage ")[1].split(":")[0] for line in new.splitlines() if ": start (" in line]


@pytest.fixture
def run_copy(finished_run, tmp_path) -> tuple[Path, Path]:
    """A copy of the finished run to damage: (its config, its run directory)."""
    return copy_run(finished_run, tmp_path)


def test_a_folder_that_is_not_a_run_is_refused_untouched(tmp_path, tiny_base, tiny_adapter, text_files, capsys):
    users = tmp_path / "mine"
    (users / "merged").mkdir(parents=True)
    (users / "merged" / "notes.txt").write_text("keep me")
    (users / ".x.old").write_text("keep me too")
    (users / "report.md").write_text("my report")
    before = snapshot(users)
    config = write_config(tmp_path / "run.yaml", tiny_base, tiny_adapter, text_files, users)
    assert main(["run", str(config)]) == EXIT_BAD_INPUT
    assert (
        f"output_dir {users} is not empty and not a qlora-requant run (no run.json; it holds .x.old, merged, "
        "report.md); qlora-requant writes only into a new or empty folder or a run's own" in capsys.readouterr().err
    )
    assert snapshot(users) == before and sorted(p.name for p in users.iterdir()) == [".x.old", "merged", "report.md"]


def test_an_edited_result_is_refused_by_report_and_recomputed_by_run(run_copy, capsys):
    config, run_dir = run_copy
    scores_file = run_dir / "evaluation" / "gptq" / "scores.json"
    scores = json.loads(scores_file.read_text())
    scores["models"]["gptq"]["window_nll"] = [n * 0.9 for n in scores["models"]["gptq"]["window_nll"]]
    scores_file.write_text(json.dumps(scores))
    assert main(["report", str(run_dir)]) == EXIT_BAD_INPUT
    assert (
        f"{scores_file}: not the file the score_gptq stage wrote (its SHA-256 differs from the one in "
        "score_gptq.json); re-run that stage: qlora-requant run CONFIG --force score_gptq"
    ) in capsys.readouterr().err
    log = (run_dir / "run.log").read_text()
    assert main(["run", str(config)]) == EXIT_OK
    assert started(run_dir, log) == ["score_gptq"]
    assert main(["report", str(run_dir)]) == EXIT_OK


def test_a_damaged_stage_record_is_rerun_by_run_and_refused_by_report(run_copy, capsys):
    config, run_dir = run_copy
    record = run_dir / "stages" / "requantize.json"
    record.write_text(record.read_text().replace('"bits": 4', '"bits": 3'))
    assert main(["report", str(run_dir)]) == EXIT_BAD_INPUT
    assert (
        f"{record}: changed since the stage wrote it (its checksum does not match); re-run that stage: "
        "qlora-requant run CONFIG --force requantize"
    ) in capsys.readouterr().err
    record.write_text("{ not json")
    log = (run_dir / "run.log").read_text()
    assert main(["run", str(config)]) == EXIT_OK
    assert started(run_dir, log) == ["requantize"]  # the same GPTQ bytes: the evaluation stands
    assert "the requantize stage runs again" in capsys.readouterr().err


def flip_a_byte_keeping_the_time(path: Path) -> None:
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_bit_rot_under_a_kept_time_never_feeds_a_stage(run_copy, capsys):
    config, run_dir = run_copy
    assert main(["run", str(config), "--force", "merge"]) == EXIT_OK
    merged = run_dir / "merged" / "model.safetensors"
    flip_a_byte_keeping_the_time(merged)
    capsys.readouterr()
    assert main(["run", str(config), "--set", "requantize.damp_percent=0.02"]) == EXIT_BAD_INPUT
    assert (
        f"{merged}: its bytes changed after the merge stage wrote it, although its size and modification time did "
        "not (a failing disk, or an edit that kept the time); re-run that stage: qlora-requant run CONFIG --force "
        "merge"
    ) in capsys.readouterr().err
    log = (run_dir / "run.log").read_text()
    assert main(["run", str(config), "--set", "verify=full"]) == EXIT_OK  # full: every file hashed, merge redone
    assert started(run_dir, log) == ["merge"]  # the same merged bytes again: GPTQ and evaluation stand


def test_after_a_forced_merge_later_runs_hash_nothing_again(run_copy, monkeypatch):
    import qlora_requant.pipeline.manifest as manifest

    config, run_dir = run_copy
    assert main(["run", str(config), "--force", "merge"]) == EXIT_OK
    hashed = []
    real = manifest.sha256
    monkeypatch.setattr(manifest, "sha256", lambda path: hashed.append(path) or real(path))
    assert main(["run", str(config)]) == EXIT_OK
    assert main(["run", str(config)]) == EXIT_OK
    assert hashed == []


def test_a_moved_run_resumes_without_rerunning(run_copy):
    config, moved = run_copy  # the finished run, copied to another folder
    log = (moved / "run.log").read_text()
    assert main(["run", str(config)]) == EXIT_OK
    assert started(moved, log) == []


def test_adapter_weights_outside_target_modules_are_ignored_end_to_end(
    tmp_path, tiny_base, tiny_adapter, text_files, capsys
):
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter, adapter)
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    adapter_config["target_modules"] = ["q_proj", "k_proj"]
    (adapter / "adapter_config.json").write_text(json.dumps(adapter_config))
    config = write_config(tmp_path / "run.yaml", tiny_base, adapter, text_files, tmp_path / "run")
    assert main(["run", str(config)]) == EXIT_OK
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["stages"]["merge"]["modules_merged"] == 4
    assert abs(report["models"]["merged"]["delta_pct"]) < 0.05 and report["models"]["merged"]["kl"] < 1e-5
    assert "ignoring LoRA weights of 10 module(s) outside its target_modules, as PEFT does" in capsys.readouterr().err


def bad_config(tmp_path, tiny_base, tiny_adapter, text_files, **changes) -> Path:
    config = write_config(tmp_path / "run.yaml", tiny_base, tiny_adapter, text_files, tmp_path / "run")
    tree = yaml.safe_load(config.read_text())
    for key, value in changes.items():
        section, _, leaf = key.rpartition("__")
        (tree[section] if section else tree)[leaf] = value
    config.write_text(yaml.safe_dump(tree))
    return config


def test_output_dir_a_file_or_a_symlink_loop_and_base_a_symlink_loop(
    tmp_path, tiny_base, tiny_adapter, text_files, capsys
):
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    cases = [
        (dict(output_dir=str(a_file)), f"output_dir {a_file} is a file; give a folder"),
        (dict(output_dir=str(loop / "run")), f"output_dir: {loop / 'run'} cannot be resolved"),
        (dict(base__path=str(loop)), f"base.path: {loop} cannot be resolved"),
    ]
    for changes, expected in cases:
        config = bad_config(tmp_path, tiny_base, tiny_adapter, text_files, **changes)
        assert main(["run", str(config)]) == EXIT_BAD_INPUT, changes
        assert expected in capsys.readouterr().err
    assert a_file.read_text() == "mine"


def test_an_output_dir_on_a_read_only_file_system(tmp_path, tiny_base, tiny_adapter, text_files, capsys):
    mount_point = tmp_path / "read-only"
    mount_point.mkdir()
    if (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount_point)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("mounting a read-only tmpfs needs root")
    try:
        config = bad_config(tmp_path, tiny_base, tiny_adapter, text_files, output_dir=str(mount_point / "run"))
        assert main(["run", str(config)]) == EXIT_BAD_INPUT
        assert (
            f"output_dir {mount_point / 'run'}: {mount_point} cannot be written (a read-only file system, or no "
            "permission); choose a writable output_dir"
        ) in capsys.readouterr().err
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_wrong_types_and_encodings_in_inputs(tmp_path, tiny_base, tiny_adapter, text_files, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter, adapter)
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**adapter_config, "lora_alpha": "16"}))
    not_utf8 = tmp_path / "calibration.txt"
    not_utf8.write_bytes(text_files["calibration"].read_bytes()[:2000] + b"\n\ncaf\xe9 au lait\n")
    bad_jsonl = tmp_path / "eval.jsonl"
    bad_jsonl.write_text('{"text": "fine"}\n{"text": "missing quote}\n')
    cases = [
        (
            dict(adapter__path=str(adapter)),
            f"{adapter / 'adapter_config.json'}: lora_alpha is '16', but must be a number; fix adapter_config.json",
        ),
        (dict(evaluation__seed=-1), "evaluation.seed: Input should be greater than or equal to 0"),
        (
            dict(requantize__calibration={"path": str(not_utf8)}),
            f"{not_utf8}: line {len(not_utf8.read_bytes().splitlines())} is not UTF-8 text (byte 4 of the line",
        ),
        (
            dict(evaluation__text={"path": str(bad_jsonl)}),
            f"{bad_jsonl}: line 2 is not valid JSON (Invalid control character, column 25); a .jsonl file",
        ),
    ]
    for changes, expected in cases:
        config = bad_config(tmp_path, tiny_base, tiny_adapter, text_files, **changes)
        assert main(["validate", str(config)]) == EXIT_BAD_INPUT, changes
        assert expected in capsys.readouterr().err, changes
    raw = tmp_path / "latin1.yaml"
    raw.write_bytes(b"output_dir: caf\xe9\n")
    assert main(["validate", str(raw)]) == EXIT_BAD_INPUT
    assert f"{raw}: not UTF-8 text (byte 15: invalid continuation byte); save the config as UTF-8" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "run").exists()


def test_a_base_the_cpu_4bit_kernel_cannot_run_is_refused_up_front(tmp_path, tokenizer, text_files, capsys):
    from support import random_adapter

    base = save_model(tiny_llama(tokenizer, intermediate_size=200), tokenizer, tmp_path / "base")
    adapter = random_adapter(base, tmp_path / "adapter")
    config = write_config(tmp_path / "run.yaml", base, adapter, text_files, tmp_path / "run")
    assert main(["run", str(config)]) == EXIT_BAD_INPUT
    assert (
        f"{base}: bitsandbytes' CPU kernel cannot run 4-bit Linear layers whose in_features is not a multiple of "
        "64 (2 here, e.g. model.layers.0.mlp.down_proj.weight with 200), so the baseline cannot be scored on CPU; "
        "run with device: cuda (GPU kernels have no such limit)"
    ) in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "failure, expected",
    [
        (
            OSError(errno.ENOSPC, "No space left on device"),
            "{run_dir}: the disk filled up during the requantize stage ([Errno 28] No space left on device); free some "
            "space or choose an output_dir on a larger disk, then run again",
        ),
        (  # how safetensors (Rust) reports it from inside gptqmodel's save
            RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
            "{run_dir}: the disk filled up during the requantize stage ([Errno 28] No space left on device)",
        ),
        (
            OSError(errno.EDQUOT, "Disk quota exceeded", "/quota/x"),
            "/quota/x: the disk quota ran out during the requantize stage ([Errno 122] Disk quota exceeded); free "
            "some of your quota or choose an output_dir elsewhere, then run again",
        ),
        (
            OSError(errno.EIO, "Input/output error"),
            "{run_dir}: the disk failed to write (I/O error) during the requantize stage ([Errno 5] Input/output "
            "error); check the disk (dmesg) or choose an output_dir on another, then run again",
        ),
        (
            OSError(errno.EROFS, "Read-only file system"),
            "the file system became read-only during the requantize stage ([Errno 30] Read-only file system); "
            "remount it writable or choose another output_dir",
        ),
    ],
)
def test_a_failed_write_inside_a_stage_is_exit_2_and_keeps_earlier_stages(
    run_copy, monkeypatch, capsys, failure, expected
):
    import qlora_requant.pipeline.stages.requantize as requantize

    config, run_dir = run_copy
    before = snapshot(run_dir / "gptq")

    def gptq_fails(work, spec, log_file):  # the write fails in the GPTQ stage's own process
        return run_isolated(failing_work, {**spec, "failure": failure}, log_file)

    monkeypatch.setattr(requantize, "run_isolated", gptq_fails)
    assert main(["run", str(config), "--force", "requantize"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert expected.format(run_dir=run_dir) in err and "Traceback" not in err
    assert snapshot(run_dir / "gptq") == before and not (run_dir / ".gptq.partial").exists()
    assert main(["report", str(run_dir)]) == EXIT_OK  # the finished run is still whole


def test_a_file_size_limit_during_the_merge_is_exit_2(run_copy):
    """EFBIG from the kernel (RLIMIT_FSIZE, as `ulimit -f` sets it), in a process of its own."""
    config, run_dir = run_copy
    before = snapshot(run_dir / "merged")
    limited = (
        "import resource, sys; from qlora_requant.pipeline.cli import main; "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000)); sys.exit(main(sys.argv[1:]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", limited, "run", str(config), "--stages", "merge", "--force", "merge"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == EXIT_BAD_INPUT, done.stderr[-2000:]
    assert "a file grew past the file-size limit during the merge stage ([Errno 27] File too large); raise the " in (
        done.stderr
    )
    assert "Traceback" not in done.stderr
    assert snapshot(run_dir / "merged") == before and not (run_dir / ".merged.partial").exists()


def test_report_on_a_folder_that_is_not_a_run_leaves_nothing(tmp_path, capsys):
    (tmp_path / "data.txt").write_text("mine")
    assert main(["report", str(tmp_path)]) == EXIT_BAD_INPUT
    assert f"{tmp_path / 'run.json'}: missing, so {tmp_path} is not a qlora-requant run" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.txt"]


def test_gptqmodel_logs_are_rotated(tmp_path):
    from qlora_requant.pipeline.stages.requantize import KEPT_GPTQ_LOGS, _keep_newest_logs

    for i in range(8):
        path = tmp_path / f"gptq_log_{i}.log"
        path.write_text(str(i))
        os.utime(path, ns=(i * 10**9, i * 10**9))
    (tmp_path / "mine.log").write_text("not gptqmodel's")
    _keep_newest_logs(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["mine.log", *(f"gptq_log_{i}.log" for i in range(8 - KEPT_GPTQ_LOGS, 8))]
    )


def test_a_gptq_checkpoint_the_default_kernel_cannot_run_gets_another_or_exit_2(tmp_path, monkeypatch, caplog):
    import qlora_requant.pipeline.stages.requantize as requantize

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Phi3ForCausalLM"]}))
    outcomes = {
        "": {"failed": ["IndexError: index 529575936 is out of bounds for dimension 0 with size 128"]},
        "gptq_torch_fused": {"missing": ["model.layers.0.mlp.gate_up_proj.qweight"]},
        "gptq_torch_int8": {"kernel": "TorchInt8Linear", "finite": True, "relative_error": 0.12},
    }
    monkeypatch.setattr(requantize, "probe", lambda out, merged, ids, device, backend, loader, log: outcomes[backend])
    check = requantize._check_runs(tmp_path, tmp_path, [1, 2, 3], "cpu", 4, "transformers", tmp_path / "run.log")
    assert check == {"kernel": "TorchInt8Linear", "backend": "gptq_torch_int8", "check_relative_error": 0.12}
    assert "the default GPTQ kernel did not run this checkpoint" in caplog.text

    outcomes["gptq_torch_int8"] = {"kernel": "TorchInt8Linear", "finite": False, "relative_error": float("nan")}
    outcomes["gptq_torch"] = {"kernel": "TorchLinear", "finite": True, "relative_error": 1.41}
    with pytest.raises(InputError) as refused:
        requantize._check_runs(tmp_path, tmp_path, [1, 2, 3], "cpu", 4, "transformers", tmp_path / "run.log")
    assert str(refused.value) == (
        f"{tmp_path}: the GPTQ checkpoint of this Phi3ForCausalLM model does not run in plain transformers on cpu "
        "with any gptqmodel kernel (default: failed: IndexError: index 529575936 is out of bounds for dimension 0 "
        "with size 128; gptq_torch_fused: 1 weights not loaded, e.g. model.layers.0.mlp.gate_up_proj.qweight; "
        "gptq_torch_int8: TorchInt8Linear gives NaN or Inf logits; gptq_torch: TorchLinear logits off by 1.41 "
        "(limit 0.5)); this architecture cannot be released as GPTQ with these versions: try other requantize "
        "settings or report it"
    )


def test_a_folder_with_another_tools_run_json_is_refused_untouched(
    tmp_path, tiny_base, tiny_adapter, text_files, capsys
):
    users = tmp_path / "theirs"
    (users / "merged").mkdir(parents=True)
    (users / "merged" / "NOTES.txt").write_text("keep me")
    (users / "run.json").write_text(json.dumps({"experiment": "sweep-3", "versions": {"torch": "2.13"}}))
    before = snapshot(users)
    config = write_config(tmp_path / "run.yaml", tiny_base, tiny_adapter, text_files, users)
    assert main(["run", str(config), "--stages", "merge"]) == EXIT_BAD_INPUT
    assert (
        f"{users / 'run.json'}: written by another tool, so {users} is not a qlora-requant run; give a new or empty "
        "folder, or the output_dir of a run"
    ) in capsys.readouterr().err
    assert main(["report", str(users)]) == EXIT_BAD_INPUT
    assert snapshot(users) == before and sorted(p.name for p in users.iterdir()) == ["merged", "run.json"]


def test_a_run_json_of_this_tool_carries_its_marker(finished_run):
    from qlora_requant.pipeline.run_record import RUN_FORMAT

    record = json.loads((finished_run[1] / "run.json").read_text())
    assert (record["tool"], record["run_format"]) == ("qlora-requant", RUN_FORMAT)
    assert record["tool_version"] == record["versions"]["qlora-requant"]


def test_a_merge_that_overflows_float16_is_exit_2_and_publishes_nothing(
    tmp_path, tiny_base, tiny_adapter, text_files, capsys
):
    from safetensors.torch import load_file, save_file

    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter, adapter)
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors[key] = tensors[key] * 1e6
    save_file(tensors, adapter / "adapter_model.safetensors")
    config = write_config(tmp_path / "run.yaml", tiny_base, adapter, text_files, tmp_path / "run")
    assert main(["run", str(config), "--stages", "merge"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert (
        "error: merge: tensor 'model.layers.1.self_attn.v_proj.weight' overflows float16 once merged (largest " in err
    )
    assert "the dtype's limit 6.55e+04); set merge.dtype: bfloat16 or float32, or check the adapter" in err
    assert not (tmp_path / "run" / "merged").exists() and not (tmp_path / "run" / ".merged.partial").exists()
    assert main(["run", str(config), "--stages", "merge", "--set", "merge.dtype=float32"]) == EXIT_OK


def test_the_stage_processes_are_not_shadowed_by_files_beside_the_run(finished_run, tmp_path):
    """The stages' processes come from a server started as `python -c`, which puts its working directory first on
    sys.path: it starts in an empty folder, so a user's random.py beside the run does not replace the standard
    library's (the run's own process starts as a console script, here as `python -P`)."""
    for module in ("random", "queue", "concurrent", "json"):
        (tmp_path / f"{module}.py").write_text("raise SystemExit('a user module was imported')\n")
    run_dir = finished_run[1]
    check = (
        "import json, sys\nfrom pathlib import Path\nfrom qlora_requant.pipeline.stages.requantize import probe\n"
        "print(json.dumps(probe(Path(sys.argv[1]), Path(sys.argv[2]), [1, 5, 9, 20, 33], 'cpu', '', 'transformers', "
        "Path(sys.argv[3]))))"
    )
    arguments = [str(run_dir / "gptq"), str(run_dir / "merged"), str(tmp_path / "check.log")]
    done = subprocess.run(
        [sys.executable, "-P", "-c", check, *arguments], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["finite"] and result["relative_error"] < 0.5, (result, done.stderr[-2000:])


def test_stages_by_name_and_repeated_stage_flags(run_copy, capsys):
    config, run_dir = run_copy
    log = (run_dir / "run.log").read_text()
    assert main(["run", str(config), "--stages", "merge", "--stages", "requantize", "--force", "requantize"]) == EXIT_OK
    assert started(run_dir, log) == ["requantize"]
    assert "skipped, complete and unchanged (" in (run_dir / "run.log").read_text()[len(log) :]
    assert main(["run", str(config), "--force", "requantize_w4"]) == EXIT_BAD_INPUT
    assert (
        "--force requantize_w4: not a stage of this run; give a stage as the console names it (merge, requantize, "
        "reference, score_merged, score_gptq) or a kind of stage (dequantize, merge, requantize, reference, score, "
        "evaluate)"
    ) in capsys.readouterr().err


def test_models_narrows_a_job_to_some_models_stages_and_the_report_is_a_step_of_its_own(run_copy, capsys):
    config, run_dir = run_copy
    log = (run_dir / "run.log").read_text()
    for arguments, message in (
        (["--models", "gptq_w9"], "--models gptq_w9: not a model of this run; give one of merged, gptq, or its index"),
        (["--models", "2"], "--models 2: this run has 2 models (0 merged, 1 gptq); give one of them"),
        (["--models", "baseline"], "the baseline and base_nf4 are scored by the reference stage"),
        (["--stages", "merge", "--models", "1"], "--stages merge has none: add score (or requantize) to --stages"),
    ):
        assert main(["run", str(config), *arguments]) == EXIT_BAD_INPUT
        error = capsys.readouterr().err
        assert "error: --models" in error and message in error
    assert (run_dir / "run.log").read_text() == log  # refused before the run directory was touched
    report = (run_dir / "report.json").stat().st_mtime_ns
    assert main(["run", str(config), "--stages", "score", "--models", "1", "--force", "score"]) == EXIT_OK
    assert "Stages done: score_gptq; the report is written by a job with --stages report" in capsys.readouterr().err
    assert started(run_dir, log) == ["score_gptq"] and (run_dir / "report.json").stat().st_mtime_ns == report
    log = (run_dir / "run.log").read_text()
    assert main(["run", str(config), "--stages", "report"]) == EXIT_OK
    assert started(run_dir, log) == [] and (run_dir / "report.json").stat().st_mtime_ns > report


def test_sigterm_to_the_main_process_stops_its_children_and_leaves_a_resumable_run(run_copy):
    """As `kill PID` and Kubernetes stop a job: the GPTQ output check (a process of its own) goes with the run."""
    import signal
    import time

    config, run_dir = run_copy
    before = snapshot(run_dir / "gptq")
    command = [sys.executable, "-m", "qlora_requant.pipeline.cli", "run", str(config), "--force", "requantize"]
    logged = len((run_dir / "run.log").read_text(errors="replace"))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while "checking that the GPTQ checkpoint loads" not in (run_dir / "run.log").read_text(errors="replace")[logged:]:
        assert process.poll() is None and time.monotonic() < deadline, "the run never started its check"
        time.sleep(0.05)
    children = descendants(process.pid)  # the stages' process server and the check it runs
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143, err[-2000:]
    assert (
        "interrupted by SIGTERM during the requantize stage; nothing half-written is kept and completed stages "
        "stand: run the same command again to resume"
    ) in err
    assert "Traceback" not in err
    assert_gone(children)
    assert snapshot(run_dir / "gptq") == before and not (run_dir / ".gptq.partial").exists()
    assert main(["report", str(run_dir)]) == EXIT_OK  # the lock is free and the finished_run run whole


def test_ctrl_c_during_the_merge_exits_130_without_a_traceback(run_copy, monkeypatch, capsys):
    import signal

    import qlora_requant.pipeline.checkpoint as checkpoint

    config, run_dir = run_copy
    before = snapshot(run_dir / "merged")
    real_write = checkpoint.write_file

    def interrupted_write(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "write_file", interrupted_write)
    assert main(["run", str(config), "--force", "merge"]) == 130
    err = capsys.readouterr().err
    assert "interrupted by SIGINT during the merge stage; nothing half-written is kept" in err
    assert snapshot(run_dir / "merged") == before and not (run_dir / ".merged.partial").exists()
    monkeypatch.undo()
    assert main(["report", str(run_dir)]) == EXIT_OK
