"""Run files: a mapping of option names, read with a size cap and without YAML anchors or aliases."""
import pytest

from edge_alast.cli.options import RUN_FILE_MAX_BYTES, load_run_file
from edge_alast.config import TrainConfig
from edge_alast.errors import ConfigError

# 377 bytes of nested aliases that PyYAML would expand to 9**9 = 387 million strings (the probe hid its
# 658-byte file in lora.targets, which was not checked for other methods).
LAUGHS = "\n".join(["a: &a [" + ",".join(['"lol"'] * 9) + "]"]
                   + [f"{b}: &{b} [" + ",".join([f"*{a}"] * 9) + "]" for a, b in zip("abcdefgh", "bcdefghi")]
                   + ["lora: {targets: *i}", "data: d", "out: o"]) + "\n"


def test_a_run_file_with_aliases_is_refused_before_anything_is_built(tmp_path):
    path = tmp_path / "laughs.yaml"
    path.write_text(LAUGHS)
    with pytest.raises(ConfigError, match=r"laughs.yaml, line 1: YAML anchors and aliases"):
        load_run_file(str(path))
    path.write_text("data: &d /images\nval_data: /images\n")  # an anchor alone is refused too
    with pytest.raises(ConfigError, match="anchors and aliases"):
        load_run_file(str(path))


def test_a_run_file_over_the_size_cap_is_refused_unread(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("data: d\n# " + "x" * RUN_FILE_MAX_BYTES + "\n")
    with pytest.raises(ConfigError, match="big.yaml is larger than 1024 KiB"):
        load_run_file(str(path))


def test_an_ordinary_run_file_fills_the_config_and_every_section_is_validated(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data: /images\nout: /runs/a\nmethod: head\nlr: 1e-3\nmax-image-pixels: 12000000\n")
    config = TrainConfig.from_dict(load_run_file(str(path)), source=str(path))
    config.validate()
    assert config.lr == 1e-3 and config.max_image_pixels == 12_000_000
    path.write_text("data: /images\nout: /runs/a\nmethod: head\nlora:\n  targets: [qkv, everything]\n")
    with pytest.raises(ConfigError, match="--lora-targets: must be a non-empty subset"):
        TrainConfig.from_dict(load_run_file(str(path)), source=str(path)).validate()


@pytest.mark.parametrize("args", [["train-ort", "--lr", "nan"], ["train-ort", "--lr", "inf"], ["train-ort", "--lr", "2"],
                                  ["train-ort", "--steps", "0"], ["train-ort", "--seed", "1" * 70],
                                  ["export", "{tmp}", "--trainable-fraction", "nan"]])
def test_the_commands_own_float_and_integer_options_are_finite_and_in_range(tmp_path, args):
    from click.testing import CliRunner

    from edge_alast.cli.main import main

    base = ["--artifacts", str(tmp_path), "--data", str(tmp_path), "--out", str(tmp_path / "o")]
    base += [] if "--steps" in args else ["--steps", "1"]
    argv = [a.format(tmp=tmp_path) for a in args] + (base if args[0] == "train-ort" else [])
    result = CliRunner().invoke(main, argv)
    option = args[1] if args[0] == "train-ort" else args[2]
    assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output, result.output
