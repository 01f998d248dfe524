"""labkit.claims: the verdict rules of the article's claims ledger."""
import pytest

from labkit import claims, models, roofline


def test_memory_and_time_rules():
    s7 = models.PRESETS["llama2-7b-shape"]
    stored = roofline.weight_bytes(s7.n_params(), 16)
    assert claims.memory_verdict(14.2, stored)[0] == "holds"  # 14.2 vs 13.5 GB
    assert claims.memory_verdict(5.0, stored)[0] == "does not hold"
    read = roofline.weight_bytes(roofline.linear_params(s7), 16)
    v, why = claims.time_possible(12.4, read)
    assert v == "possible" and "A100 floor" in why
    assert claims.time_possible(5.0, read)[0] == "not possible"  # 13 GB cannot be read in 5 ms at 1.555 TB/s
    ok, ratio = claims.time_holds_for(12.4, 21.4, 4.22e12)  # HF generate on an H200, scaled to an A100
    assert not ok and ratio == pytest.approx(21.4 * 4.22e12 / 1.555e12 / 12.4)
    assert claims.time_holds_for(12.4, 3.76, 4.22e12)[0]


def test_throughput_rule_and_api_rule():
    assert claims.throughput_consistent(83, 12.4)[0] == "consistent"  # 80.6 tok/s, 3% off
    assert claims.throughput_consistent(250, 4.3)[0] == "inconsistent"  # 232.6 tok/s, 7.5% off
    assert claims.api_verdict(lambda: {}["missing"]) == ("does not exist", "KeyError: 'missing'")
    assert claims.api_verdict(lambda: None)[0] == "exists"


def test_table_prints_every_row():
    rows = [claims.Claim("a", "says a", "", "holds", "because", ["Reference run (not this run): X"]),
            claims.Claim("b", "says b", "measured b", "wrong", "why b", kind="wording")]
    text = claims.table(rows)
    assert "1. [figure] a: HOLDS" in text and "not measurable here" in text and "2. [wording] b: WRONG" in text
    assert "Reference run (not this run): X" in text
