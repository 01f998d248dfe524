"""labkit.parallel: tensor and pipeline parallelism over real torchrun processes (gloo), checked against one process.

Three torchrun launches in all (module-scoped): SmolLM2 split over 3 processes; the small 7B-layout model (random
weights) split over 2 plus SmolLM2's 30 layers over 2 pipeline stages; a run in which one rank is killed.
"""
import time

import pytest
import torch

from labkit import models, parallel as P
from labkit.env import LabkitError

SMOL = models.PRESETS["smollm2-135m-shape"]
LLAMA7B = models.PRESETS["llama2-7b-shape"]


# ---------------------------------------------------------------------------------------------- up-front errors
def test_tp_world_sizes():
    P.check_tp(SMOL, 3)
    for w in (2, 4, 8):
        P.check_tp(LLAMA7B, w)
        P.check_tp(P.small_7b_layout_shape(), w)
    with pytest.raises(LabkitError, match=r"query heads 9 and the KV heads 3.*\[1, 3\]"):
        P.check_tp(SMOL, 2)
    with pytest.raises(LabkitError, match="KV heads"):
        P.check_tp(models.PRESETS["llama-1b-shape"], 16)


def test_bad_requests_fail_before_any_process_starts():
    t0 = time.perf_counter()
    with pytest.raises(LabkitError, match="splits over"):
        P.launch_raw(["tp"], 2, model="smollm2-135m")
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        with pytest.raises(LabkitError, match="NCCL over 2 processes needs 2 GPUs"):
            P.launch_raw(["tp"], 2, backend="nccl", model=P.SMALL_7B_LAYOUT)
    with pytest.raises(LabkitError, match="backend"):
        P.check_backend("mpi", 2)
    with pytest.raises(LabkitError, match="unknown task"):
        P.launch_raw(["train"], 2)
    with pytest.raises(LabkitError, match="stages"):
        P.check_pp(30, 31, 1, 1)
    with pytest.raises(LabkitError, match="micro-batches"):
        P.check_pp(30, 2, 3, 4)
    assert time.perf_counter() - t0 < 5, "validation must not start torchrun"


def test_offload_budget_below_one_layer():
    model, _ = models.load("tiny-llama-shape", device="cpu")
    one = P.layer_bytes(model)
    with pytest.raises(LabkitError, match="cannot hold one decoder layer"):
        P.offload_map(model, one - 1)
    dmap = P.offload_map(model, one + 1)
    on_disk = [k for k, v in dmap.items() if v == "disk"]
    assert on_disk, dmap
    assert P.resident_bytes(model, dmap) <= one + 1


# ---------------------------------------------------------------------------------------------- arithmetic
def test_bubble_and_ring_model():
    assert P.bubble_fraction(2, 1) == 0.5
    assert P.bubble_fraction(4, 13) == pytest.approx(3 / 16)
    assert P.ring_allreduce_wire_bytes(1000, 2) == 1000
    assert P.ring_allreduce_seconds(1e6, 1, 1e-5, 1e9) == 0.0
    alpha, beta = 20e-6, 3e9
    rows = [{"world": w, "bytes": b, "median_s": P.ring_allreduce_seconds(b, w, alpha, beta)}
            for w in (2, 3) for b in (4, 4096, 1 << 20, 1 << 22)]
    a, bb = P.fit_ring(rows)
    assert a == pytest.approx(alpha, rel=1e-6) and bb == pytest.approx(beta, rel=1e-6)
    m1 = P.tp_decode_model(LLAMA7B, 1, bytes_per_element=2, read_bw=3e12, alpha=alpha, beta=beta)
    m8 = P.tp_decode_model(LLAMA7B, 8, bytes_per_element=2, read_bw=3e12, alpha=alpha, beta=beta)
    assert m1["comm_ms"] == 0 and m8["compute_ms"] < m1["compute_ms"] / 4 and m8["comm_ms"] > 0


def test_balanced_split_counts_the_head():
    b = P.balanced_split(SMOL, 2)
    assert b[0] == 0 and b[-1] == 30 and 15 < b[1] < 25  # the LM head weighs about 8 of SmolLM2's layers
    assert P.balanced_split(LLAMA7B, 4) == sorted(P.balanced_split(LLAMA7B, 4))


# ---------------------------------------------------------------------------------------------- real processes
@pytest.fixture(scope="module")
def smol_tp3():
    return P.launch(["tp"], 3, model="smollm2-135m", timeout_s=240)["tp"]


@pytest.fixture(scope="module")
def tp2_and_pp():
    return P.launch(["tp", "pp"], 2, model=P.SMALL_7B_LAYOUT, extra=["--microbatches", "2"], timeout_s=240)


def _check_tp(r, layers, hidden):
    assert r["tokens_equal"], (r["tokens"], r["ref_tokens"])
    # fp32: the split changes only the summation order of o_proj/down_proj; 1e-5 of the largest logit is ~50 ulp
    assert r["max_abs_logit_diff"] <= 1e-5 * r["logit_scale"], r["max_abs_logit_diff"]
    assert r["max_abs_logit_diff"] > 0 or r["world"] == 1  # a real split reorders sums: identical bits would be odd
    assert r["allreduce_calls"] == 2 * layers
    assert r["commdebug_counts"] == {"c10d_functional.all_reduce": 2 * layers}
    per_token_per_layer = r["allreduce_bytes"] / r["prompt_len"] / layers
    shape = P.model_shape(r["model"])
    assert per_token_per_layer == P.allreduce_bytes_per_token_per_layer(shape, 4) == 2 * hidden * 4
    assert r["local_q_out"] == shape.num_attention_heads * shape.head_dim // r["world"]


def test_smollm2_tp3_matches_one_process(smol_tp3):
    assert smol_tp3["world"] == 3 and not smol_tp3["random_weights"]
    _check_tp(smol_tp3, 30, 576)


def test_small_7b_layout_tp2_matches_one_process(tp2_and_pp):
    r = tp2_and_pp["tp"]
    assert r["world"] == 2 and r["random_weights"]
    _check_tp(r, 4, 1024)


def test_pipeline_two_stages_matches_whole_model(tp2_and_pp):
    r = tp2_and_pp["pp"]
    assert r["bounds"] == [0, 15, 30] and r["model"] == "smollm2-135m"
    assert {row["schedule"] for row in r["rows"]} == {"GPipe", "1F1B"}
    for row in r["rows"]:
        assert row["argmax_equal"]
        assert row["max_abs_logit_diff"] <= 1e-5 * row["logit_scale"], row
        assert 0 <= row["bubble"] < 1 and row["predicted"] == pytest.approx(1 / 3)


def test_a_killed_rank_ends_the_run_with_an_error():
    """Rank 1 is SIGKILLed while rank 0 all-reduces with it: rank 0 raises by itself, torchrun reports the failure.

    torchrun's monitor is slowed to 3 s so that rank 0's own error (not torchrun's SIGTERM) ends it.
    """
    timeout = 90
    run = P.launch_raw(["die"], 2, model=P.SMALL_7B_LAYOUT, pg_timeout_s=20, timeout_s=timeout,
                       extra=["--kill-rank", "1"], monitor_interval_s=3)
    out = run.output
    assert run.returncode not in (0, 124), out[-2000:]  # failed, and not by our own timeout
    assert run.seconds < timeout and run.result is None
    assert "Signal 9 (SIGKILL)" in out or "exitcode  : -9" in out, out[-2000:]
    assert "[rank0]" in out and ("Connection closed by peer" in out or "Timed out" in out or "timeout" in out.lower()), \
        out[-3000:]


def test_cli_refuses_nccl_without_gpus(capsys):
    from labkit import cli

    if torch.cuda.is_available() and torch.cuda.device_count() >= 2:
        pytest.skip("this machine has 2 GPUs: NCCL is allowed")
    assert cli.main(["bench", "parallel", "--backend", "nccl"]) == 1
    assert "NCCL over 2 processes needs 2 GPUs" in capsys.readouterr().err
    assert cli.main(["bench", "parallel", "--tp", "3"]) == 1  # the 7B layout's 32 heads do not split over 3
    assert "splits over" in capsys.readouterr().err


@pytest.mark.parametrize("args, says", [(["--new-tokens", "-1"], "must be at least 1"),
                                        (["--tp", "0"], "must be at least 1"),
                                        (["--offload-budget-mb", "0"], "positive budget")])
def test_cli_refuses_bad_counts_before_launching(args, says, capsys):
    """Counts and budgets are checked by argparse, before any torchrun process starts (exit status 2, one line)."""
    from labkit import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "parallel", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
