"""The benchmarks' ``--settings``: aliases, result names and any KV policy text form."""

from __future__ import annotations

import pytest

from gemma4_mlx.bench.common import EXACT, choose, default_policy, setting_name
from gemma4_mlx.cache import KVPolicy

ALIASES = {"fp32": KVPolicy("exact"), "affine4": KVPolicy("affine", bits=4), "tq": default_policy()}


def test_aliases_text_forms_and_result_names_mix():
    chosen = choose(ALIASES, "affine4,turboquant:k3.5,v2,tiers=2,tq,affine:8")
    assert list(chosen)[0] == "fp32"
    policies = list(chosen.values())[1:]
    assert [p.kind for p in policies] == ["affine", "turboquant", "turboquant", "affine"]
    assert (policies[1].key_bits, policies[1].value_bits, policies[1].key_tiers) == (3.5, 2, 2)
    assert policies[1].exact_dtype == EXACT  # the benchmarks' bf16 exact tokens
    assert policies[2] == default_policy() and policies[3].key_bits == 8
    # a result name (the text form str(policy)) picks the same setting back
    again = choose(ALIASES, ";".join(list(chosen)[1:]))
    assert list(again) == list(chosen)


def test_semicolons_separate_and_duplicates_collapse():
    name = setting_name(default_policy())
    chosen = choose(ALIASES, f"tq;{name};turboquant:k3,v2,exact=float32")
    assert len(chosen) == 3
    assert list(chosen.values())[2].exact_dtype == "float32"


def test_unknown_setting_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        choose(ALIASES, "affine4,bogus")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'bogus'" in err and "affine4" in err


def test_exact_cache_read_grouped_is_its_own_row():
    chosen = choose(ALIASES, "fp32;exact:attention=grouped")
    assert list(chosen) == ["fp32", "exact:attention=grouped"]
    assert chosen["fp32"].attention == "sdpa" and chosen["exact:attention=grouped"].attention == (
        "grouped"
    )
    assert choose(ALIASES, "exact:attention=grouped") == chosen  # the name picks it back
