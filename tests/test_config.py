import pytest

from obdk.config import FORMAT_VERSION, LowRankConfig


def test_json_round_trip():
    c = LowRankConfig(method="svd-llm", keep=0.6, alloc="global", targets=["*mlp*"], ignore=["*down_proj"],
                      rank_multiple=16, damping=0.1, correct="zs")
    assert LowRankConfig.from_json(c.to_json()) == c
    assert c.to_dict()["version"] == FORMAT_VERSION


@pytest.mark.parametrize("kw,field", [
    ({"method": "nope"}, "method"), ({"keep": 0.0}, "keep"), ({"keep": 1.5}, "keep"), ({"alloc": "x"}, "alloc"),
    ({"rank_multiple": 0}, "rank_multiple"), ({"damping": -1}, "damping"), ({"floor": 2}, "floor"),
    ({"compute_dtype": "float16"}, "compute_dtype"), ({"solver": "qr"}, "solver"), ({"fisher": "x"}, "fisher"),
    ({"version": FORMAT_VERSION + 1}, "version"),
])
def test_bad_fields_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        LowRankConfig(**kw)


def test_unknown_key_in_dict():
    with pytest.raises(ValueError, match="bogus"):
        LowRankConfig.from_dict({"bogus": 1})


def test_needed_stats_and_defaults():
    assert LowRankConfig(method="svd").needed_stats == ()
    assert LowRankConfig(method="svd-llm").needed_stats == ("cx",)
    assert LowRankConfig(method="obd").needed_stats == ("cx", "cg")
    assert LowRankConfig(method="obd").resolved_alloc == "global"
    assert set(LowRankConfig(method="zs-svd").needed_stats) == {"cx", "grad"}
    assert LowRankConfig(method="obd", alloc="zero-sum").needed_stats == ("cx", "cg", "grad")
    # obd's default correction: the ZS step, then the K-FAC step (best measured); each takes its own gradient
    assert LowRankConfig(method="obd").resolved_correct == "zs+kfac"
    assert LowRankConfig(method="obd", correct="none").resolved_correct is None
    assert LowRankConfig(method="svd-llm").resolved_correct is None
    assert LowRankConfig(method="svd-llm", correct="seq").resolved_correct == "seq"
    assert LowRankConfig.from_json(LowRankConfig(method="obd", correct="none").to_json()).resolved_correct is None
