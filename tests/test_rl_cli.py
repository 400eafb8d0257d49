"""`steepest rl` on a tiny budget: the files, the table, the JSON, resume and bad input."""

from __future__ import annotations

import json

import pytest

from steepest.cli import main

pytest.importorskip("gymnasium")

TINY = [
    "--env",
    "CartPole-v1",
    "--steps",
    "256",
    "--seeds",
    "2",
    "--set",
    "n_steps=64",
    "--set",
    "value_epochs=2",
    "--checkpoint-every",
    "1",
]


def test_rl_command_writes_report_and_resumes(tmp_path, capsys, one_thread):
    out = tmp_path / "rl"
    assert main(["rl", *TINY, "--methods", "trpo,vpg", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "steepest rl: CartPole-v1" in text and "trpo" in text and "vpg" in text
    for name in ("results.json", "return_vs_steps.png", "return_vs_time.png", "report.html"):
        assert (out / name).stat().st_size > 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["env"] == "CartPole-v1" and doc["target"] == 475.0
    assert [(r["method"], r["seed"]) for r in doc["runs"]] == [
        ("trpo", 0),
        ("trpo", 1),
        ("vpg", 0),
        ("vpg", 1),
    ]
    for r in doc["runs"]:
        assert r["steps"] == 256 and len(r["history"]) == 2 and not r["resumed"]
        last = r["episodes"][-10:]
        assert r["final_return"] == pytest.approx(sum(e[1] for e in last) / len(last))
    assert doc["summary"]["trpo"]["seeds"] == 2
    assert doc["machine"]["torch_threads"] == 1 and "load_average" in doc["machine"]
    assert "ended with the highest median return" in (out / "report.html").read_text()
    # resume: the finished runs are loaded from their checkpoints, not rerun, same numbers
    assert (
        main(["rl", *TINY, "--methods", "trpo,vpg", "--out", str(out), "--resume", "--quiet"]) == 0
    )
    again = json.loads((out / "results.json").read_text())
    assert all(r["resumed"] for r in again["runs"])
    assert [r["episodes"] for r in again["runs"]] == [r["episodes"] for r in doc["runs"]]
    # a longer budget continues the checkpointed runs from where they stopped
    more = [a if a != "256" else "384" for a in TINY]
    assert main(["rl", *more, "--methods", "trpo", "--out", str(out), "--resume", "--quiet"]) == 0
    longer = json.loads((out / "results.json").read_text())
    assert longer["runs"][0]["steps"] == 384
    assert longer["runs"][0]["history"][:2] == doc["runs"][0]["history"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--methods", "trpo,acktr"], "acktr needs steepest.KFAC"),
        (["--env", "NoSuchEnv-v0"], "unknown gymnasium environment"),
        (["--set", "max_kl=-1"], "max_kl must be a finite positive number"),
        (["--set", "nsteps=3"], "KEY one of"),
        (["--set", "n_steps=abc"], "not a valid int"),
    ],
)
def test_rl_command_refuses_bad_input(tmp_path, capsys, args, message):
    assert main(["rl", "--steps", "64", "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("steepest: error:") and message in err
    assert not (tmp_path / "o").exists()
