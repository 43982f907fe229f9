"""`python -m benchmarks.engine_host`: the host-time harness runs end to end on the CPU (engine with the model
stubbed, decode steps through DecodeGraphs.run with no-op replays), so the figure it reports stays real."""

from __future__ import annotations

from benchmarks import engine_host


def test_engine_host_harness_steps_every_request(tmp_path, capsys):
    # The harness asserts each timed step returns one output per request (base and adapter rows mixed).
    assert engine_host.main(["--batch", "6", "--steps", "4", "--adapters", "2", "--prompt", "20",
                             "--demo-dir", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "engine host time per decode step, batch 6, 2 adapters + base" in out
    # Streamed outputs as the engine process's wire tuples and as RequestOutputs, in alternating blocks on one
    # engine: every step of both hands out one output a request.
    assert engine_host.main(["--batch", "6", "--steps", "20", "--adapters", "2", "--prompt", "20",
                             "--compare-wire-deltas", "--demo-dir", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "20 steps each in alternating blocks of 10: as wire tuples" in out
    # Base-only requests on an engine with LoRA enabled and one without, alternating.
    assert engine_host.main(["--batch", "6", "--steps", "20", "--prompt", "20", "--compare-lora-off",
                             "--demo-dir", str(tmp_path / "demo")]) == 0
    assert "20 steps each in alternating blocks of 10: LoRA enabled" in capsys.readouterr().out
