"""The run configuration: run files, number coercion, validation errors that name real flags or run-file keys."""
import dataclasses

import pytest
import yaml

from edge_alast.config import (AlastConfig, LightPeftConfig, LoraConfig, TrainConfig, field_name, parse_number)
from edge_alast.errors import ConfigError
from edge_alast.methods import METHODS


def cfg(**kw):
    return TrainConfig(**{"data": "d", "out": "o", **kw})


def test_from_dict_names_unknown_and_missing_keys():
    with pytest.raises(ConfigError, match="run.yaml: unknown keys lerning_rate"):
        TrainConfig.from_dict({"data": "d", "out": "o", "lerning_rate": 1}, source="run.yaml")
    with pytest.raises(ConfigError, match="missing required keys out"):
        TrainConfig.from_dict({"data": "d"})
    with pytest.raises(ConfigError, match="unknown alast keys bmin"):
        TrainConfig.from_dict({"data": "d", "out": "o", "alast": {"bmin": 0.5}})


@pytest.mark.parametrize("text,value", [("1e-3", 1e-3), ("2.5E+2", 250.0), (".5", 0.5), (3, 3.0)])
def test_yaml_1_1_number_strings_are_numbers(text, value):
    assert parse_number(text) == value
    assert cfg(lr=text).lr == value
    assert TrainConfig.from_dict({"data": "d", "out": "o", "alast": {"alpha": text}}).alast.alpha == value


def test_compile_on_and_off_in_a_run_file_are_the_modes_not_booleans(tmp_path):
    # YAML 1.1 reads a bare on/off as true/false
    for text, mode in (("on", "on"), ("off", "off"), ("auto", "auto")):
        config = TrainConfig.from_dict(yaml.safe_load(f"data: d\nout: o\ncompile: {text}\n"))
        config.validate()
        assert config.compile == mode
    with pytest.raises(ConfigError, match="--compile: must be one of auto, on, off, got 'always'"):
        cfg(compile="always").validate()


@pytest.mark.parametrize("bad", ["fast", True, "nan", None])
def test_parse_number_refuses_non_numbers(bad):
    assert parse_number(bad) is None


@pytest.mark.parametrize("build,message", [
    (lambda: cfg(lr="fast"), "--lr: must be a number, got 'fast'"),
    (lambda: cfg(steps=2.5), "--steps: must be an integer"),
    (lambda: cfg(token_multiple="x"), "token_multiple: must be an integer"),  # a run-file key: named as such
    (lambda: AlastConfig(alpha="low"), "alast.alpha: must be a number"),
    (lambda: AlastConfig(b_min="low"), "--alast-b-min: must be a number"),
    (lambda: LightPeftConfig(mask_l1="x"), "light_peft.mask_l1: must be a number"),
])
def test_number_errors_name_the_field(build, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build()


@pytest.mark.parametrize("config,message", [
    (dict(method="qlora"), "--method: must be one of alast, full, head"),
    (dict(precision="fp8"), "--precision: must be one of"),
    (dict(optimizer="sgd"), "optimizer: must be one of adamw, adam"),
    (dict(val_fraction=1.5), "--val-fraction: must be in (0, 1)"),
    (dict(steps=3, epochs=1.0), "--steps: give --steps or --epochs"),
    (dict(alast={"b_min": 0.0}), "--alast-b-min: must be in (0, 1]"),
    (dict(alast={"temperature": 0.0}), "alast.temperature: must be > 0"),
    (dict(alast={"sampling": "random"}), "alast.sampling: must be one of softmax, topk"),
    (dict(method="lora", lora={"targets": ["qkv", "head"]}), "--lora-targets: must be a non-empty subset"),
    (dict(method="light-peft", light_peft={"mask_l1": -1.0}), "light_peft.mask_l1: must be >= 0"),
    (dict(method="light-peft", steps=10, light_peft={"estimation_steps": 10}),
     "--steps: must exceed --estimation-steps (10)"),
])
def test_validation_names_real_flags_or_run_file_keys(config, message):
    with pytest.raises(ConfigError) as e:
        cfg(**config).validate()
    assert message in str(e.value)


def test_every_flag_named_in_an_error_is_a_flag():
    """field_name gives a flag only for fields the CLI offers; everything else by its run-file key."""
    from edge_alast.cli.main import main

    flags = {opt for p in main.commands["train"].params for opt in p.opts}
    for cls, section in ((TrainConfig, None), (AlastConfig, "alast"), (LoraConfig, "lora"),
                         (LightPeftConfig, "light_peft")):
        for f in dataclasses.fields(cls):
            name = field_name(cls, f.name, section)
            if name.startswith("--"):
                assert name in flags, name
            else:
                assert name == (f"{section}.{f.name}" if section else f.name)


def test_k_trainable_is_checked_against_depth_once_the_model_is_known():
    AlastConfig(k_trainable=13).validate()  # depth unknown: only >= 1
    with pytest.raises(ConfigError, match=r"--alast-k-trainable: must be in \[1, 12\]"):
        AlastConfig(k_trainable=13).validate(12)


def test_method_choices_are_the_method_table():
    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == "method")
    assert tuple(field.metadata["choices"]) == tuple(METHODS)


def test_resume_key_ignores_only_what_cannot_change_the_result():
    a, b = cfg(checkpoint_every_seconds=5, out="x"), cfg(checkpoint_every_seconds=60, out="y", resume=True)
    assert a.resume_key() == b.resume_key()
    assert cfg(lr=1e-3).resume_key() != cfg(lr=1e-4).resume_key()
    # where a run ends is its result: the stop rules are kept, and with them the curve they read
    assert cfg(eval_every=5).resume_key() == cfg(eval_every=10).resume_key()
    stops = cfg(eval_every=5, stop_at_plateau=True)
    assert stops.resume_key() != cfg(eval_every=5).resume_key()
    assert stops.resume_key() != cfg(eval_every=10, stop_at_plateau=True).resume_key()
    assert cfg(max_tflops=3.0).resume_key() != cfg(max_tflops=4.0).resume_key()
    assert cfg(eval_every=5).resume_differs(stops.resume_key()) == ["stop_at_plateau"]
    assert stops.resume_differs(cfg(eval_every=5).resume_key()) == ["stop_at_plateau"]
    assert stops.resume_differs(cfg(eval_every=10, stop_at_plateau=True).resume_key()) == ["eval_every"]


def test_sections_accept_mappings_from_the_python_api():
    c = TrainConfig(data="d", out="o", lora={"r": 4}, alast={"b_init": 0.8})
    assert isinstance(c.lora, LoraConfig) and c.lora.r == 4 and c.alast.b_init == 0.8
    assert TrainConfig.from_dict(c.to_dict()) == c


def test_resolved_precision_is_part_of_the_resume_key():
    c = cfg(precision="auto")
    assert c.resume_key("fp32")["precision_resolved"] == "fp32"
    assert c.resume_key("fp32") != c.resume_key("bf16")


@pytest.mark.parametrize("method, lr", [("full", 3e-5), ("alast", 3e-5), ("head", 1e-3), ("lora", 1e-3),
                                        ("alast-lora", 1e-3), ("light-peft", 1e-3), ("light-peft+alast", 1e-3)])
def test_no_lr_takes_the_method_default_and_says_so(method, lr):
    config = cfg(method=method)
    assert config.lr == lr and config.lr_source == "method default"
    given = cfg(method=method, lr=2e-4)
    assert given.lr == 2e-4 and given.lr_source == "given"


def test_a_fleet_run_config_without_lr_leaves_it_to_the_method():
    from edge_alast.fleet.settings import FleetSettings

    settings = FleetSettings.from_run_config({"method": "alast-lora", "out": "/tmp/x", "val-data": "/tmp/v",
                                              "weights": "/tmp/w.safetensors"})
    assert settings.train["lr"] is None
    assert TrainConfig.from_dict({**settings.train, "data": "d", "out": "o"}).lr == 1e-3


# ---------------------------------------------------------------------------------------------- loud failures
@pytest.mark.parametrize("config,message", [
    (dict(lr=float("inf")), "--lr: must be a finite number, got inf"),
    (dict(lr=float("nan")), "--lr: must be a finite number, got nan"),
    (dict(lr=1e30), "--lr: must be in (0, 1], got 1e+30"),
    (dict(lr=0.0), "--lr: must be in (0, 1], got 0.0"),
    (dict(checkpoint_every_seconds=float("nan")), "--checkpoint-every-seconds: must be a finite number"),
    (dict(epochs=float("inf")), "--epochs: must be a finite number"),
    (dict(epochs="1e400"), "--epochs: must be a number"),  # a numeric string that overflows to inf
    (dict(seed=10**70), "--seed: must be in [0, 9223372036854775807]"),
    (dict(seed=-1), "--seed: must be in [0, 9223372036854775807]"),
    (dict(alast={"seed": 2**64}), "alast.seed: must be in [0, 9223372036854775807]"),
    (dict(max_image_pixels=0), "--max-image-pixels: must be >= 1"),
    (dict(max_aspect_ratio=0.5), "--max-aspect-ratio: must be >= 1"),
    (dict(max_aspect_ratio=float("nan")), "--max-aspect-ratio: must be a finite number"),
    (dict(lora={"dropout": float("inf")}), "--lora-dropout: must be a finite number"),
    (dict(weight_decay=-0.1), "weight_decay: must be >= 0"),
    # every section is checked whatever the method: lora.targets and light_peft of a head or alast run
    (dict(method="head", lora={"targets": ["qkv", "head"]}), "--lora-targets: must be a non-empty subset"),
    (dict(method="alast", light_peft={"rank_keep_ratio": 2.0}), "light_peft.rank_keep_ratio: must be in (0, 1]"),
    (dict(method="lora", alast={"b_min": 3.0}), "--alast-b-min: must be in (0, 1]"),
    # the stop rules: the plateau is read from --eval-every's curve; a budget of no compute is no budget
    (dict(stop_at_plateau=True), "--stop-at-plateau: needs --eval-every N"),
    (dict(stop_at_plateau="yes", eval_every=5), "--stop-at-plateau: must be true or false, got 'yes'"),
    (dict(export="no"), "--export: must be true or false, got 'no'"),
    (dict(plateau_window=0), "plateau_window: must be >= 1, got 0"),
    (dict(plateau_min_gain=-0.1), "plateau_min_gain: must be >= 0"),
    (dict(max_tflops=0), "--max-tflops: must be > 0, got 0"),
])
def test_non_finite_and_out_of_range_values_name_the_field(config, message):
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({"data": "d", "out": "o", **config}, source="run.yaml").validate()
    assert message in str(e.value)


def test_the_cli_refuses_non_finite_options_with_exit_2(tmp_path):
    from click.testing import CliRunner
    from edge_alast.cli.main import main

    for option, value in (("--lr", "nan"), ("--lr", "inf"), ("--checkpoint-every-seconds", "nan"),
                          ("--epochs", "inf"), ("--seed", "1" * 70), ("--max-image-pixels", "0")):
        result = CliRunner().invoke(main, ["train", "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                                           option, value])
        assert result.exit_code == 2 and f"{option}:" in result.output, (option, result.output)


def test_image_limit_defaults_are_the_data_layers():
    from edge_alast.data.images import ImageLimits

    limits = ImageLimits(**cfg().image_limits)
    assert limits == ImageLimits() and limits.max_pixels == 40_000_000 and limits.max_aspect_ratio == 20


def test_a_checkpoint_predating_new_settings_resumes_and_a_changed_setting_is_named():
    """A checkpoint's resume key written before max_image_pixels, max_aspect_ratio and alast.anneal_last/freeze
    existed: those count as their defaults (anneal_last as 0, what runs did then), so it resumes; a setting that
    really differs is named."""
    config = TrainConfig(data="d", out="o", method="alast", alast={"anneal_last": 0.0})
    saved = config.resume_key("fp32")
    for new_key in ("max_image_pixels", "max_aspect_ratio"):
        saved.pop(new_key)
    saved["alast"] = {k: v for k, v in saved["alast"].items() if k not in ("anneal_last", "freeze")}
    assert config.resume_differs(saved, "fp32") == []
    # today's default anneals: that checkpoint did not, so resuming it under the default would change the run
    assert TrainConfig(data="d", out="o", method="alast").resume_differs(saved, "fp32") == ["alast"]
    assert TrainConfig(data="d", out="o", method="alast", alast={"anneal_last": 0.0},
                       max_aspect_ratio=5.0).resume_differs(saved, "fp32") == [
        "max_aspect_ratio"]
    assert config.resume_differs({**saved, "seed": 7}, "fp32") == ["seed"]


@pytest.mark.parametrize("method,alast,expected", [
    ("alast", {}, 0.2),                                   # the default: reference, annealed (the stated rule's pick)
    ("alast", {"update": "relative"}, 0.0),               # not measured with annealing
    ("alast", {"update": "coauthors"}, 0.0),              # reproduces the co-authors' code, which does not anneal
    ("alast", {"update": "static"}, 0.0),                 # matched-cost baselines stay at their run's keep ratios
    ("alast", {"anneal_last": 0.0}, 0.0),                 # given: kept, off included
    ("alast", {"update": "relative", "anneal_last": 0.3}, 0.3),
    ("alast-lora", {}, 0.0),                              # adapters: not measured with annealing
    ("light-peft+alast", {}, 0.0),
])
def test_anneal_last_defaults_per_method_and_update(method, alast, expected):
    assert TrainConfig(data="d", out="o", method=method, alast=alast).alast.anneal_last == expected
