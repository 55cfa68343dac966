"""`bot engine bench` runs end to end (tiny sizes) and reports every figure the issue asks for."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from engine import bench


def test_bench_cli_json(tmp_path: Path, capsys) -> None:
    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers(dest="cmd"))
    out = tmp_path / "bench.json"
    args = parser.parse_args(["bench", "--json", "--out", str(out), "--seconds", "1", "--batch-sizes", "1,2",
                              "--reps", "1", "--callers", "6", "--turns", "1", "--speak-n", "2", "--turn-every", "0.5"])
    assert args.func(args) == 0
    printed = json.loads(out.read_text())
    assert capsys.readouterr().out.strip().endswith(out.read_text().strip())  # the report goes to stdout
    rows = printed["backends"]["onnx"]["understand"]
    assert [(r["seconds"], r["batch"]) for r in rows] == [(1.0, 1), (1.0, 2)]
    assert all(r["utterances_per_s"] > 0 and r["latency_ms"]["p95"] >= r["latency_ms"]["p50"] > 0 for r in rows)
    assert printed["batching_gain"] > 0
    assert printed["batching"]["batched"]["mean_batch"] >= 1
    assert printed["p95_added_wait_ms"] >= 0 and printed["realtime_callers"]["batched"] >= 0
    assert printed["speak"]["voice"] == "piper" and printed["speak"]["first_audio_ms"]["p50"] > 0


def test_bench_refuses_bad_arguments_with_a_message(capsys) -> None:
    """Each of these used to end in a traceback (or, --batch-sizes 0 and --speak-n 0, in a report of nothing)."""
    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers(dest="cmd"))
    for argv, says in ((["--seconds", "abc"], "comma-separated numbers"), (["--batch-sizes", "0"], "batch size >= 1"),
                       (["--backend", "bogus"], "unknown engine backend 'bogus'"), (["--reps", "0"], "--reps"),
                       (["--speak-n", "0"], "--speak-n must be >= 1"), (["--seconds", "0"], "between 0.2 and 60")):
        args = parser.parse_args(["bench", *argv])
        assert args.func(args) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and says in err, (argv, err)


def test_bot_cli_exposes_bench() -> None:
    from bot.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["engine", "bench", "--json", "--no-speak"])
    assert args.func is bench.cmd_bench


def test_gpu_benchmark_script_runs_its_steps_on_cpu(tmp_path: Path) -> None:
    """ops/bench/gpu_backend measures on a borrowed GPU; its dry run keeps every step working here."""
    import soundfile as sf

    from ops.bench import gpu_backend

    clips = bench.speech_clips([2.0, 3.0], 4, voice_kind="espeak")
    for name in ("val", "real"):
        d = tmp_path / name
        d.mkdir()
        rows = []
        for i, c in enumerate(clips):
            sf.write(d / f"{i}.wav", c, 8000, subtype="PCM_16")
            rows.append(json.dumps({"audio": f"{i}.wav", "intent": "pay_bill", "slots": {}}))
        (d / "manifest.jsonl").write_text("\n".join(rows) + "\n")
    pack = tmp_path / "clips.npz"
    gpu_backend.pack([str(tmp_path / "val"), str(tmp_path / "real")], 3, str(pack))
    out = tmp_path / "report.json"
    assert gpu_backend.run(str(pack), str(out), reps=2, dry_run=True) == 0
    report = json.loads(out.read_text())
    assert report["parity"]["n"] == 6 and report["parity"]["val"]["n"] == 3
    assert report["parity"]["same_intent"] == 1.0
    assert [r["batch"] for r in report["gpu_by_batch_4s"]] == [1, 3]
    assert report["paced"][0]["turns"] > 0 and report["concurrent"][0]["utterances_per_s"] > 0
