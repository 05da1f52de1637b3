"""The method table: what each method trains and how it is planned, asked of the record, not its name."""
import pytest

from edge_alast.methods import ESTIMATE, FINETUNE, METHODS, method_spec


def test_plan_kinds():
    kinds = {name: spec.plan_kind for name, spec in METHODS.items()}
    assert kinds == {"alast": "alast", "full": "full", "head": "head", "lora": "full", "alast-lora": "alast",
                     "light-peft": "full", "light-peft+alast": "full"}  # Light-PEFT plans its estimation stage


def test_light_peft_stages_and_alast_only_when_fine_tuning():
    spec = METHODS["light-peft+alast"]
    assert spec.stages == (ESTIMATE, FINETUNE)
    assert not spec.uses_alast(ESTIMATE) and spec.uses_alast(FINETUNE)
    assert METHODS["alast"].stages == (FINETUNE,) and METHODS["alast"].uses_alast(FINETUNE)
    assert not METHODS["lora"].uses_alast(FINETUNE)


def test_unknown_method_names_the_known_ones():
    with pytest.raises(KeyError, match="known: alast, full"):
        method_spec("qlora")


def test_every_method_has_a_summary_for_help():
    assert all(spec.summary for spec in METHODS.values())
